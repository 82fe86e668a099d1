"""PyTorch reference for `benches/pipeline_bench.rs` and the stages of `qwen-edit --demo --size full`: the networks
other than the DiT with random bf16 weights created on the GPU, batch 1, Edit v1's 1024² shapes, and the stages as
diffusers' `QwenImageEditPipeline` runs them, so that both the networks and the stage overheads can be compared.

    python tools/bench/torch_stage_bench.py --json torch_stages.json [--dit-json torch.json] [--reps 5]
        [--sections vae,text_encoder,encode_prompt] [--compile vae,text_encoder]
    python tools/bench/torch_stage_bench.py --device cpu --small --json /tmp/stages.json   # CPU smoke test

Sections (each writes the JSON again when it ends, so a run cut short keeps what it measured):
- `vae`: `AutoencoderKLQwenImage` with the published config (read from crates/qwen-image/src/published.rs, the
  Rust side's own copy): encode a 1024² image (posterior mode) and decode 128² latents, with
  `torch.backends.cudnn.benchmark` False (PyTorch's default) and True; then the image-encoding and decoding stages
  as the pipeline runs them (PIL image → `VaeImageProcessor.preprocess` → device → `_encode_vae_image` →
  `_pack_latents`; packed latents → `_unpack_latents` → de-normalize → decode → `postprocess` to PIL).
- `text_encoder`: `Qwen2_5_VLForConditionalGeneration` (published Qwen2.5-VL-7B config, SDPA) created on the device
  in bf16 (seconds, no host copy), at the Rust benchmark's shapes: 1469 tokens holding one 74×74-patch image (1369
  merged tokens: 66 text tokens, `<|vision_start|>`, the image, `<|vision_end|>`, 32 text tokens). The whole forward
  (`model.model`, no `lm_head`, no KV cache: what the Rust encoder computes), the vision tower alone and the
  language model alone (called with exactly the arguments the whole forward passes it, captured by a hook).
- `encode_prompt`: diffusers' `QwenImageEditPipeline.encode_prompt` on a 1024² image and "Make it purple", with
  Qwen's real tokenizer (tests/fixtures/processor/tokenizer) and `Qwen2VLProcessor`: processor + tokenizer + the
  text encoder as diffusers calls it (`output_hidden_states=True`, so `lm_head` and the KV cache too) + the masked
  extraction; also the processor alone and the text-encoder call alone.
- `plus2` (not in the default `--sections`): Edit-Plus with two input images as `QwenImageEditPlusPipeline` runs
  its stages (`plus2_section`); summed with `--dit-json`'s `plus2` case as `edit.plus2_stages`.
- `--compile`: `torch.compile` (default mode) of the VAE's `encode`/`decode` and of the text encoder's `model.model`;
  the first call (compilation) is reported separately from the medians. Off by default (minutes per network).
- `edit`: the whole PyTorch edit's stages summed with the DiT's 4 steps from `torch_dit_bench.py`'s JSON
  (`--dit-json`, case `--dit-case`): `none` and the seed's `cat` schedule (caching steps 1 and 3, reuse steps 2
  and 4), once with the networks alone and once with the stages as diffusers runs them.

Times are medians of `--reps` runs after one warm-up call, timed with CUDA events after a device synchronization
(on the CPU: wall clock). Peak memory per measurement: `torch.cuda.max_memory_allocated` after
`reset_peak_memory_stats` (absolute, weights included, and above what was allocated when the measurement started).

Needs torch with CUDA, transformers 5 and diffusers 0.42.1 (pure Python; tools/bench/gpu_run.sh installs the carried
wheel on a host that lacks it).
"""
import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "crates/qwen-image/src/published.rs"
FIXTURES = ROOT / "tests/fixtures/processor"
PROMPT = "Make it purple"
MB = 1 << 20


# ---------------------------------------------------------------------------------------------------- configs


def published_config(name):
    """A `pub const NAME: &str = r#"…"#;` JSON config of crates/qwen-image/src/published.rs."""
    m = re.search(r'pub const %s: &str = r#"(.*?)"#;' % name, PUBLISHED.read_text(), re.S)
    if not m:
        raise SystemExit(f"{name} not found in {PUBLISHED}")
    return json.loads(m.group(1))


def vae_kwargs(small):
    cfg = {k: v for k, v in published_config("VAE_CONFIG").items() if not k.startswith("_")}
    if small:
        cfg["base_dim"] = 8
    return cfg


def text_encoder_config(small):
    """The published Qwen2.5-VL-7B config (flat legacy layout, as the checkpoints ship it); `small`: 2 layers of
    width 64, a 2-block vision tower of width 32 (Qwen's vocabulary and special token ids stay)."""
    from transformers import Qwen2_5_VLConfig

    cfg = published_config("TEXT_ENCODER_CONFIG")
    if small:
        text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_window_layers=2)
        cfg.update(text)
        cfg["text_config"].update(text)
        cfg["text_config"].pop("layer_types", None)
        cfg["rope_scaling"]["mrope_section"] = cfg["text_config"]["rope_scaling"]["mrope_section"] = [2, 3, 3]
        cfg["vision_config"].update(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                                    fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig.from_dict(cfg)


# ---------------------------------------------------------------------------------------------------- timing


class Bench:
    """Timing, peak memory and the JSON being written."""

    def __init__(self, args):
        self.args = args
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.result = {
            "torch": torch.__version__, "device": torch.cuda.get_device_name(self.dev) if self.cuda else "cpu",
            "small": args.small, "reps": args.reps, "sections": {},
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if self.cuda else None,
        }
        for mod in ("transformers", "diffusers"):
            try:
                self.result[mod] = __import__(mod).__version__
            except ImportError:
                self.result[mod] = None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def allocated(self):
        return torch.cuda.memory_allocated(self.dev) if self.cuda else 0

    def time(self, fn, reps=None, warmup=1):
        """{ms: median, first_ms: the first call (compilation, autotuning), peak_bytes, peak_over_start_bytes}."""
        reps = reps or self.args.reps
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)
        start_alloc = self.allocated()
        t = time.perf_counter()
        with torch.no_grad():
            fn()
        self.sync()
        first = (time.perf_counter() - t) * 1e3
        with torch.no_grad():
            for _ in range(warmup - 1):
                fn()
        times = []
        for _ in range(reps):
            self.sync()
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                with torch.no_grad():
                    fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                with torch.no_grad():
                    fn()
                times.append((time.perf_counter() - t) * 1e3)
        peak = torch.cuda.max_memory_allocated(self.dev) if self.cuda else 0
        return {"ms": statistics.median(times), "first_ms": first, "all_ms": times,
                "peak_bytes": peak, "peak_over_start_bytes": max(0, peak - start_alloc)}

    def save(self):
        self.result["edit"] = edit_sum(self)
        tmp = self.args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=2)
        os.replace(tmp, self.args.json)

    def report(self, name, r):
        mem = f", peak {r['peak_bytes'] / 2**30:.2f} GiB (+{r['peak_over_start_bytes'] / 2**30:.2f})" if self.cuda else ""
        print(f"  {name:44}: {r['ms']:8.1f} ms  (first call {r['first_ms']:.0f} ms{mem})", flush=True)


def compiled(bench, name, fn):
    """`torch.compile(fn)` timed: the first call (compilation) separately, then medians; an error entry instead if it
    fails or if a call after the first compiles again (guards that fail on every call would make every timed call a
    compilation)."""
    from torch._dynamo.utils import counters

    def graphs():
        return counters["stats"]["unique_graphs"] if "stats" in counters else 0

    try:
        torch._dynamo.reset()
        counters.clear()
        cfn = torch.compile(fn)
        calls = []
        for _ in range(3):
            before = graphs()
            bench.sync()
            t = time.perf_counter()
            with torch.no_grad():
                cfn()
            bench.sync()
            calls.append({"seconds": time.perf_counter() - t, "new_graphs": graphs() - before})
        out = {"compile_seconds": calls[0]["seconds"], "calls": calls,
               "dynamo_stats": dict(counters["stats"]) if "stats" in counters else {}}
        if calls[2]["new_graphs"]:
            out["error"] = "compiles again on every call (failing guards): not timed"
            print(f"  {name} (torch.compile): {out['error']}; calls {calls}", flush=True)
            return out
        r = bench.time(cfn)
        out.update({k: v for k, v in r.items() if k != "first_ms"})
        bench.report(f"{name} (torch.compile; compiled in {out['compile_seconds']:.0f} s)", r)
        return out
    except Exception as e:  # noqa: BLE001 — a compile failure must not lose the eager numbers
        print(f"  {name} (torch.compile) failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def randn(bench, shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=bench.dev).manual_seed(seed)
    return torch.randn(shape, generator=g, device=bench.dev, dtype=dtype)


def create(bench, build):
    """`build()` under the device and bf16 as the default dtype: parameters are created (randomly initialized) on
    the device directly."""
    t = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with bench.dev:
            model = build()
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.eval().requires_grad_(False)
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.bfloat16}:
        raise SystemExit(f"parameters created as {dtypes}, not bf16")
    bench.sync()
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, {"parameters": params, "weights_bytes": size, "create_seconds": time.perf_counter() - t}


# ---------------------------------------------------------------------------------------------------- VAE


def sample_image(side):
    """A real photo (the processor fixtures' crop of scikit-image's "chelsea"), resized to side² as the pipeline's
    `VaeImageProcessor.resize` does before encoding."""
    from PIL import Image

    return Image.open(FIXTURES / "images/chelsea.png").convert("RGB").resize((side, side), Image.LANCZOS)


def encode_and_pack(bench, pipe, image, height, width):
    """One image as the pipelines' image-encoding stage runs it: PIL → `VaeImageProcessor.preprocess` at
    `height × width` → device → `_encode_vae_image` → `_pack_latents`."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
    latents = pipe._encode_vae_image(image=pixels.to(device=bench.dev, dtype=vae.dtype), generator=None)
    return pipe._pack_latents(latents, 1, vae.config.z_dim, latents.shape[3], latents.shape[4])


def vae_section(bench, side):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    print(f"== VAE: encode {side}², decode {side // 8}² latents", flush=True)
    vae, info = create(bench, lambda: AutoencoderKLQwenImage(**vae_kwargs(bench.args.small)))
    print(f"  {info['parameters'] / 1e6:.1f} M parameters, created in {info['create_seconds']:.1f} s", flush=True)
    out = dict(info, image_side=side, latent_side=side // 8)
    x = randn(bench, (1, 3, 1, side, side)).clamp(-1, 1)
    z = randn(bench, (1, vae.config.z_dim, 1, side // 8, side // 8), seed=1)
    previous = torch.backends.cudnn.benchmark
    for flag in {"both": (False, True), "off": (False,), "on": (True,)}[bench.args.cudnn_benchmark]:
        torch.backends.cudnn.benchmark = flag
        key = f"cudnn_benchmark_{str(flag).lower()}"
        enc = bench.time(lambda: vae.encode(x).latent_dist.mode())
        dec = bench.time(lambda: vae.decode(z).sample)
        bench.report(f"encode ({key})", enc)
        bench.report(f"decode ({key})", dec)
        out[key] = {"encode": enc, "decode": dec}
    torch.backends.cudnn.benchmark = previous
    if bench.args.skip_vae_stages:
        bench.result["sections"]["vae"] = out
        bench.save()
        return

    # The stages as QwenImageEditPipeline.__call__ runs them (cudnn.benchmark as PyTorch's default leaves it).
    pipe = QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                 tokenizer=None, processor=None, transformer=None)
    image = sample_image(side)
    z_dim = vae.config.z_dim

    def encode_stage():
        return encode_and_pack(bench, pipe, image, side, side)

    packed = encode_stage()

    def decode_stage():
        latents = pipe._unpack_latents(packed, side, side, pipe.vae_scale_factor).to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        latents = latents / inv_std + mean
        decoded = vae.decode(latents, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(decoded, output_type="pil")

    out["encode_stage"] = bench.time(encode_stage)
    out["decode_stage"] = bench.time(decode_stage)
    bench.report("encode stage (PIL → packed latents)", out["encode_stage"])
    bench.report("decode stage (packed latents → PIL)", out["decode_stage"])
    bench.result["sections"]["vae"] = out
    bench.save()
    if "vae" in bench.args.compile:
        out["compile"] = {
            "encode": compiled(bench, "encode", lambda: vae.encode(x).latent_dist.mode()),
            "decode": compiled(bench, "decode", lambda: vae.decode(z).sample),
        }
        bench.save()
    del pipe, vae


# ---------------------------------------------------------------------------------------------------- text encoder


def prompt_ids(cfg, grid, before=66, after=32, seed=0x12345678):
    """The Rust benchmark's token ids: `before` text tokens, `<|vision_start|>`, the image's tokens,
    `<|vision_end|>`, `after` text tokens (text ids in 14..400, from the same LCG)."""
    merge = cfg.vision_config.spatial_merge_size
    image = grid[0] * grid[1] * grid[2] // (merge * merge)
    state = seed

    def text(n):
        nonlocal state
        out = []
        for _ in range(n):
            state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
            out.append(14 + (state >> 33) % 386)
        return out

    return text(before) + [cfg.vision_start_token_id] + [cfg.image_token_id] * image + [cfg.vision_end_token_id] \
        + text(after)


def captured_call(module):
    """A forward pre-hook that keeps the arguments of `module`'s next call; returns (store, handle)."""
    store = {}

    def hook(_mod, args, kwargs):
        store.setdefault("call", (args, dict(kwargs)))

    return store, module.register_forward_pre_hook(hook, with_kwargs=True)


def text_encoder_section(bench, grid):
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = text_encoder_config(bench.args.small)
    ids = prompt_ids(cfg, grid)
    print(f"== text encoder (Qwen2.5-VL{'' if bench.args.small else '-7B'}, random bf16): {len(ids)} tokens, "
          f"grid {grid}", flush=True)
    model, info = create(bench, lambda: Qwen2_5_VLForConditionalGeneration._from_config(
        cfg, attn_implementation="sdpa", dtype=torch.bfloat16))
    print(f"  {info['parameters'] / 1e9:.2f} B parameters, created in {info['create_seconds']:.1f} s "
          f"(attention: {model.config._attn_implementation})", flush=True)
    vc = cfg.vision_config
    patches = grid[0] * grid[1] * grid[2]
    features = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    input_ids = torch.tensor([ids], device=bench.dev)
    mask = torch.ones_like(input_ids)
    pixels = randn(bench, (patches, features))
    grid_thw = torch.tensor([grid], device=bench.dev)
    inner = model.model

    def whole():
        return inner(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid_thw,
                     use_cache=False).last_hidden_state

    stores = {}
    handles = []
    for name, mod in (("vision", inner.visual), ("language_model", inner.language_model)):
        stores[name], handle = captured_call(mod)
        handles.append(handle)
    with torch.no_grad():
        hidden = whole()
    for h in handles:
        h.remove()
    info["lm_head_bytes"] = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    out = dict(info, tokens=len(ids), image_grid_thw=list(grid), image_tokens=ids.count(cfg.image_token_id),
               patches=patches, output_finite=bool(torch.isfinite(hidden).all()),
               attention=model.config._attn_implementation)
    out["forward"] = bench.time(whole)
    for name in ("vision", "language_model"):
        args, kwargs = stores[name]["call"]
        mod = inner.visual if name == "vision" else inner.language_model
        out[name] = bench.time(lambda: mod(*args, **kwargs))
    for name in ("vision", "language_model", "forward"):
        bench.report(name, out[name])
    bench.result["sections"]["text_encoder"] = out
    bench.save()
    return model, out


def tokenizer_dir():
    """Qwen's tokenizer from the processor fixtures, decompressed into a temporary folder."""
    d = Path(tempfile.mkdtemp(prefix="qwen-tokenizer-"))
    for f in (FIXTURES / "tokenizer").iterdir():
        if f.suffix == ".gz":
            with gzip.open(f, "rb") as src, open(d / f.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copy(f, d / f.name)
    return d


def qwen_processor():
    """Qwen's real tokenizer (tests/fixtures/processor/tokenizer) and the Qwen2-VL processor of the snapshot."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok_dir = tokenizer_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    config = json.loads((FIXTURES / "preprocessor_config.json").read_text())
    image_processor = Qwen2VLImageProcessor(**{k: v for k, v in config.items() if k not in (
        "image_processor_type", "processor_class")})
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    return tokenizer, processor


def encode_prompt_section(bench, model, side):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    print(f"== encode_prompt (diffusers QwenImageEditPipeline, Qwen's tokenizer): {side}² image, {PROMPT!r}",
          flush=True)
    tokenizer, processor = qwen_processor()
    image_processor = processor.image_processor
    pipe = QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=model,
                                 tokenizer=tokenizer, processor=processor, transformer=None)
    image = sample_image(side)
    text = [pipe.prompt_template_encode.format(PROMPT)]
    inputs = processor(text=text, images=image, padding=True, return_tensors="pt").to(bench.dev)
    embeds, _ = pipe.encode_prompt(prompt=PROMPT, image=image, device=bench.dev)
    out = {"tokens": int(inputs["input_ids"].shape[1]), "prompt_embeds_tokens": int(embeds.shape[1]),
           "image_grid_thw": inputs["image_grid_thw"].tolist()[0], "image_processor": type(image_processor).__name__}
    out["encode_prompt"] = bench.time(lambda: pipe.encode_prompt(prompt=PROMPT, image=image, device=bench.dev))
    out["processor"] = bench.time(
        lambda: processor(text=text, images=image, padding=True, return_tensors="pt").to(bench.dev))
    out["text_encoder_call"] = bench.time(lambda: model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"], output_hidden_states=True))
    print(f"  {out['tokens']} tokens (grid {out['image_grid_thw']}), {out['prompt_embeds_tokens']} prompt embeddings",
          flush=True)
    for name in ("processor", "text_encoder_call", "encode_prompt"):
        bench.report(name, out[name])
    bench.result["sections"]["encode_prompt"] = out
    bench.save()


PLUS2_PROMPT = "Put the cup in her hand"


def plus2_section(bench, model, side):
    """Edit-Plus with two input images (`gpu_run.sh` mode `plus2`: astronaut.png and coffee.png), the stages as
    `QwenImageEditPlusPipeline.__call__` runs them: each image resized to the VL area (384², `CONDITION_IMAGE_SIZE`)
    for `encode_prompt`, and to the VAE area (1024², `VAE_IMAGE_SIZE`) for `prepare_latents`' encode and packing.
    The decode stage is Edit v1's (the same 1024² output)."""
    from PIL import Image
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    cond_area, vae_area = (32 * 32, side * side) if bench.args.small else (plus.CONDITION_IMAGE_SIZE,
                                                                          plus.VAE_IMAGE_SIZE)
    print(f"== Edit-Plus, two images (QwenImageEditPlusPipeline): {PLUS2_PROMPT!r}", flush=True)
    tokenizer, processor = qwen_processor()
    vae, _ = create(bench, lambda: AutoencoderKLQwenImage(**vae_kwargs(bench.args.small)))
    pipe = QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=model,
                                     tokenizer=tokenizer, processor=processor, transformer=None)
    images = [Image.open(FIXTURES / f"images/{n}.png").convert("RGB") for n in ("astronaut", "coffee")]
    sizes = [(plus.calculate_dimensions(cond_area, im.width / im.height),
              plus.calculate_dimensions(vae_area, im.width / im.height)) for im in images]
    condition = [pipe.image_processor.resize(im, h, w) for im, ((w, h), _) in zip(images, sizes)]

    def encode_images():
        return torch.cat([encode_and_pack(bench, pipe, im, h, w) for im, (_, (w, h)) in zip(images, sizes)], dim=1)

    embeds, _ = pipe.encode_prompt(prompt=PLUS2_PROMPT, image=condition, device=bench.dev)
    out = {"condition_sizes": [list(c) for c, _ in sizes], "vae_sizes": [list(v) for _, v in sizes],
           "prompt_embeds_tokens": int(embeds.shape[1]), "image_tokens": int(encode_images().shape[1])}
    out["encode_prompt"] = bench.time(lambda: pipe.encode_prompt(prompt=PLUS2_PROMPT, image=condition,
                                                                 device=bench.dev))
    out["encode_images"] = bench.time(encode_images)
    print(f"  {out['prompt_embeds_tokens']} prompt embeddings, {out['image_tokens']} image tokens", flush=True)
    for name in ("encode_prompt", "encode_images"):
        bench.report(f"plus2 {name}", out[name])
    bench.result["sections"]["plus2"] = out
    bench.save()
    del pipe, vae


def compile_text_encoder(bench, model, grid):
    cfg = model.config
    ids = torch.tensor([prompt_ids(cfg, grid)], device=bench.dev)
    vc = cfg.vision_config
    pixels = randn(bench, (grid[0] * grid[1] * grid[2], vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2))
    grid_thw = torch.tensor([grid], device=bench.dev)
    mask = torch.ones_like(ids)
    print("== text encoder, torch.compile", flush=True)
    r = compiled(bench, "forward", lambda: model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                                       image_grid_thw=grid_thw, use_cache=False).last_hidden_state)
    bench.result["sections"]["text_encoder"]["compile"] = {"forward": r}
    bench.save()


# ---------------------------------------------------------------------------------------------------- edit


def edit_sum(bench):
    """The PyTorch edit's stages summed: text encoder + VAE encode + 4 DiT steps + VAE decode, for `none` and the
    seed's `cat` schedule (DiT totals from torch_dit_bench.py's JSON), networks alone and stages as diffusers runs
    them, and the two-image Edit-Plus stages with the JSON's `plus2` case; None where a part is missing."""
    s = bench.result["sections"]
    dit_all = {}
    if bench.args.dit_json and os.path.exists(bench.args.dit_json):
        with open(bench.args.dit_json) as f:
            dit_all = json.load(f)
    steps = lambda case: dit_all.get("dit", {}).get(case, {}).get("four_step_totals_ms", {})  # noqa: E731
    totals = steps(bench.args.dit_case)
    te, ep, vae, p2 = s.get("text_encoder"), s.get("encode_prompt"), s.get("vae"), s.get("plus2")
    ms = lambda d, *path: (lambda v: v if isinstance(v, (int, float)) else None)(  # noqa: E731
        _dig(d, *path))
    variants = {
        "networks": (ms(te, "forward", "ms"), ms(vae, "cudnn_benchmark_false", "encode", "ms"),
                     ms(vae, "cudnn_benchmark_false", "decode", "ms"), totals),
        "networks_cudnn_benchmark": (ms(te, "forward", "ms"), ms(vae, "cudnn_benchmark_true", "encode", "ms"),
                                     ms(vae, "cudnn_benchmark_true", "decode", "ms"), totals),
        "stages": (ms(ep, "encode_prompt", "ms"), ms(vae, "encode_stage", "ms"), ms(vae, "decode_stage", "ms"),
                   totals),
        "plus2_stages": (ms(p2, "encode_prompt", "ms"), ms(p2, "encode_images", "ms"),
                         ms(vae, "decode_stage", "ms"), steps("plus2")),
    }
    out = {"dit_json": bench.args.dit_json, "dit_case": bench.args.dit_case,
           "dit_four_step_totals_ms": totals or None}
    for name, (text, encode, decode, dit) in variants.items():
        parts = {"text": text, "encode_image": encode, "decode": decode}
        out[name] = {"parts_ms": parts, "total_ms": {
            spec: (text + encode + dit[spec] + decode) if None not in (text, encode, decode) and spec in dit
            else None for spec in ("none", "cat")}}
    return out


def _dig(d, *path):
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


# ---------------------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="torch_stages.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny configs and a 64² image (CPU smoke test)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sections", default="vae,text_encoder,encode_prompt")
    ap.add_argument("--compile", default="", help="comma-separated: vae, text_encoder (torch.compile, minutes)")
    ap.add_argument("--dit-json", default=None, help="torch_dit_bench.py's JSON, for the whole edit's sum")
    ap.add_argument("--dit-case", default="v1")
    ap.add_argument("--cudnn-benchmark", choices=["both", "off", "on"], default="both",
                    help="VAE timings with torch.backends.cudnn.benchmark off (PyTorch's default), on, or both")
    ap.add_argument("--skip-vae-stages", action="store_true",
                    help="time the VAE networks only, not the pipeline's image-encoding and decoding stages")
    args = ap.parse_args()
    args.sections = [s for s in args.sections.split(",") if s]
    args.compile = [s for s in args.compile.split(",") if s]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --small for the CPU smoke test)")
    torch.backends.cuda.matmul.allow_tf32 = True
    bench = Bench(args)
    side = 64 if args.small else 1024
    grid = [1, 4, 4] if args.small else [1, 74, 74]
    print(f"torch {torch.__version__}, transformers {bench.result['transformers']}, diffusers "
          f"{bench.result['diffusers']}, device {bench.result['device']}", flush=True)
    if "vae" in args.sections:
        vae_section(bench, side)
    if {"text_encoder", "encode_prompt", "plus2"} & set(args.sections):
        model, _ = text_encoder_section(bench, grid)
        if "encode_prompt" in args.sections:
            encode_prompt_section(bench, model, side)
        if "plus2" in args.sections:
            plus2_section(bench, model, side)
        if "text_encoder" in args.compile:
            compile_text_encoder(bench, model, grid)
        del model
    bench.save()
    e = bench.result["edit"]
    for name in ("networks", "stages", "plus2_stages"):
        t = e[name]["total_ms"]
        if t["none"] is not None:
            print(f"PyTorch edit, {name} summed: none {t['none']:.0f} ms, cat {t['cat']:.0f} ms "
                  f"({e[name]['parts_ms']})", flush=True)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
