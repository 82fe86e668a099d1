"""The proxy's components (configs, tokenizer, text encoder, VAE, DiT), the pipeline's prompt encoding and latent
handling re-done in batches for training, and the snapshot writer.

Everything here mirrors what `QwenImageEditPipeline` / `QwenImageEditPlusPipeline` (diffusers 0.42.1) do at
inference, so that the DiT is trained on exactly the inputs the pipeline gives it; `check_pipeline_consistency`
(run by `train.py --smoke` and by `evaluate.py --check`) asserts it against the real pipeline.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import scenes  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Sizes and configs

VAE_AREA = scenes.SIZE * scenes.SIZE  # the pipelines' 1024² (VAE input / output) is mapped to this area
COND_AREA = scenes.SIZE * scenes.SIZE  # Edit-Plus's 384² (vision-language images) is mapped to this area
DROP_IDX = 64  # the pipelines drop the first 64 prompt tokens (system turn); our tokenizer keeps that count exact

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
SYSTEM = ("Describe the key features of the input image (color, shape, size, texture, objects, background), then "
          "explain how the user's text instruction should alter or modify the image. Generate a new image that "
          "meets the user's requirements while maintaining consistency with the original input where appropriate.")
# diffusers' prompt_template_encode of QwenImageEditPipeline and QwenImageEditPlusPipeline
TEMPLATE_EDIT = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n")
TEMPLATE_PLUS = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n"
PLUS_PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"

VAE_CONFIG = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0)
DIT_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=6, attention_head_dim=64,
                  num_attention_heads=3, joint_attention_dim=64, axes_dims_rope=(8, 28, 28), guidance_embeds=False)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=2048,
                   rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
VISION_CONFIG = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, window_size=56,
                     fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                     in_channels=3)


def lightning_scheduler_config():
    """ModelTC/Qwen-Image-Lightning's scheduler config (tools/fixtures/pipeline.py `scheduler_configs()`)."""
    return {
        "base_image_seq_len": 256, "base_shift": math.log(3), "invert_sigmas": False, "max_image_seq_len": 8192,
        "max_shift": math.log(3), "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None,
        "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
        "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
    }


LIGHTNING_SIGMAS = [1.0, 0.9, 0.75, 0.5, 0.0]  # 4 steps (any resolution: mu = ln 3)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_corpus():
    """Text the BPE is trained on: the prompt templates, every template word, and generated instructions."""
    lines = [TEMPLATE_EDIT.format("Make the red circle blue."), TEMPLATE_PLUS.format(PLUS_PICTURE.format(1))]
    words = []
    for group in (scenes.COLOR_WORDS.values(), scenes.SHAPE_WORDS.values(), scenes.SIZE_WORDS.values(),
                  scenes.PLACES.values()):
        for options in group:
            words += [w for w in options if w]
    lines.append(" ".join(words))
    for t in (scenes.RECOLOR_TEMPLATES + scenes.REMOVE_TEMPLATES + scenes.ADD_TEMPLATES
              + scenes.BACKGROUND_TEMPLATES + scenes.PASTE_TEMPLATES):
        lines.append(t.replace("{", "").replace("}", ""))
    for variant in ("edit", "plus"):
        for i in range(3000):
            lines.append(scenes.make_edit("train", variant, 10_000_000 + i)["instruction"])
    lines.append("Picture 1: Picture 2: Picture 3: Make it purple. An a the of in on to from into onto with")
    return lines


def build_tokenizer():
    """A byte-level BPE with the Qwen2 pre-tokenizer, normalizer, decoder and special tokens (what
    `QwenTokenizer::from_dir` reads from tokenizer.json), trained until every word of the corpus is one token:
    the Edit system turn is then exactly 64 tokens, as with Qwen's real tokenizer, so the pipelines' drop_idx 64
    keeps exactly the user turn."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=1, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, errors="replace")
    n = len(fast(TEMPLATE_EDIT.split("<|vision_start|>")[0])["input_ids"])
    assert n == DROP_IDX, f"the Edit system turn is {n} tokens, not {DROP_IDX}"
    n = len(fast(TEMPLATE_PLUS.split("{}")[0])["input_ids"])
    assert n == DROP_IDX, f"the Edit-Plus system turn is {n} tokens, not {DROP_IDX}"
    return fast


def build_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64),
                            tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())


# ---------------------------------------------------------------------------------------------------------------
# Models


def build_text_encoder(tokenizer, seed):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(TEXT_CONFIG, vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(VISION_CONFIG, out_hidden_size=TEXT_CONFIG["hidden_size"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))  # unit-scale token embeddings: distinct after RMSNorm
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def build_vae(seed, **overrides):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(**dict(VAE_CONFIG, **overrides))
    with torch.no_grad():  # the temporal taps a single frame never sees stay zero (and compress to nothing)
        for m in vae.modules():
            if type(m).__name__ == "QwenImageCausalConv3d" and m.weight.shape[2] > 1:
                m.weight[:, :, :-1].zero_()
    return vae


def build_dit(seed, zero_cond_t: bool, **overrides):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    cfg = dict(DIT_CONFIG, **overrides)
    dit = QwenImageTransformer2DModel(**cfg, zero_cond_t=zero_cond_t)
    with torch.no_grad():  # adaLN-Zero: every block starts as the identity, the output at zero
        for name, p in dit.named_parameters():
            if any(k in name for k in ("img_mod.1", "txt_mod.1", "proj_out")):
                p.zero_()
    return dit


# ---------------------------------------------------------------------------------------------------------------
# Fast single-frame VAE (training): the causal 3-D convolutions of a single frame are 2-D convolutions with the last
# temporal tap, and the temporal convolutions of the resamplers are skipped (exactly what diffusers computes for one
# frame; `check_fast_vae` asserts it).


def patch_causal_conv():
    from diffusers.models.autoencoders import autoencoder_kl_qwenimage as m

    cls = m.QwenImageCausalConv3d
    if getattr(cls, "_proxy_patched", False):
        return
    orig = cls.forward

    def forward(self, x, cache_x=None):
        if cache_x is None and x.shape[2] == 1 and self.stride[0] == 1:
            w = self.weight[:, :, -1]
            pad = (self._padding[0], self._padding[1], self._padding[2], self._padding[3])
            y = F.conv2d(F.pad(x[:, :, 0], pad), w, self.bias, stride=self.stride[1:])
            return y[:, :, None]
        return orig(self, x, cache_x)

    cls.forward = forward
    cls._proxy_patched = True


def vae_encode_mean(vae, img):
    """Posterior mean [B, z, 1, h, w] of images [B, 3, H, W] in [-1, 1] (the pipeline's `retrieve_latents(argmax)`)."""
    h = vae.quant_conv(vae.encoder(img[:, :, None]))
    return h[:, : vae.config.z_dim]


def vae_encode_dist(vae, img):
    h = vae.quant_conv(vae.encoder(img[:, :, None]))
    mean, logvar = h.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def vae_decode(vae, z):
    """Decoded images [B, 3, H, W] in [-1, 1] (clamped as diffusers does) from raw latents [B, z, 1, h, w]."""
    return vae.decoder(vae.post_quant_conv(z)).clamp(-1, 1)[:, :, 0]


def latent_stats(vae, device):
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    return mean, std


def pack(z):
    """[B, C, 1, h, w] -> [B, (h/2)(w/2), 4C] (diffusers' _pack_latents)."""
    b, c, _, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x, h, w):
    """[B, N, 4C] -> [B, C, 1, h, w] for latent size h×w (diffusers' _unpack_latents)."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, 1, h, w)


def images_to_vae_input(img_u8):
    """uint8 [B, 3, H, W] -> [-1, 1] floats (VaeImageProcessor.preprocess)."""
    return img_u8.float() / 127.5 - 1.0


def encode_latents(vae, img_u8):
    """Normalized packed latents of uint8 images (what the pipeline's `_encode_vae_image` + pack produce)."""
    return normalize_pack(vae, raw_latents(vae, img_u8))


def raw_latents(vae, img_u8):
    """The VAE posterior means [B, z, h, w] of uint8 images, in the encoder's output dtype (bf16 under autocast):
    what `train.py` caches per pool image; `normalize_pack` turns them into `encode_latents`' output exactly."""
    return vae_encode_mean(vae, images_to_vae_input(img_u8))[:, :, 0]


def normalize_pack(vae, z):
    """[B, z, h, w] raw latents (any float dtype) -> normalized packed f32 latents [B, hw/4, 4z]."""
    mean, std = latent_stats(vae, z.device)
    return pack((z[:, :, None].float() - mean) / std)


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def prompt_text(instruction: str, n_images: int, plus: bool) -> str:
    if plus:
        return TEMPLATE_PLUS.format("".join(PLUS_PICTURE.format(i + 1) for i in range(n_images)) + instruction)
    assert n_images == 1
    return TEMPLATE_EDIT.format(instruction)


def vision_tokens_per_image(processor, size=scenes.SIZE) -> int:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = processor.image_processor
    h, w = smart_resize(size, size, factor=ip.patch_size * ip.merge_size, min_pixels=56 * 56,
                        max_pixels=28 * 28 * 64)
    return (h // ip.patch_size) * (w // ip.patch_size) // ip.merge_size ** 2


def token_ids(tokenizer, processor, instruction: str, n_images: int, plus: bool):
    """input_ids of the processor for this prompt (image pads expanded), without running the processor on images."""
    ids = tokenizer(prompt_text(instruction, n_images, plus))["input_ids"]
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n = vision_tokens_per_image(processor)
    out = []
    for t in ids:
        out += [t] * n if t == pad else [t]
    return out


def token_ids_batch(tokenizer, processor, instructions, n_images, plus: bool):
    """`token_ids` for many prompts at once (batch tokenization, then the image pads expanded)."""
    texts = [prompt_text(t, int(n), plus) for t, n in zip(instructions, n_images)]
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n = vision_tokens_per_image(processor)
    out = []
    for ids in tokenizer(texts)["input_ids"]:
        while pad in ids[: len(ids)]:
            i = ids.index(pad)
            if i + 1 < len(ids) and ids[i + 1] == pad:  # already expanded
                break
            ids = ids[:i] + [-1] * n + ids[i + 1:]
        out.append([pad if t == -1 else t for t in ids] if -1 in ids else ids)
    return out


def pixel_values(processor, imgs_u8):
    """The image processor on a list of uint8 [3, H, W] tensors (any device) -> (pixel_values, image_grid_thw)."""
    out = processor.image_processor(images=list(imgs_u8), return_tensors="pt", device=imgs_u8[0].device)
    pix = out["pixel_values"]
    return pix, out["image_grid_thw"].to(pix.device)


def pixel_values_fast(processor, imgs_u8):
    """`pixel_values` as one batched tensor op on uint8 [N, 3, H, W] images of one size (any device): the same
    torchvision resize (uint8 in, uint8 out), fused rescale + normalize and patchify the HF Qwen2-VL processor runs
    image by image, without its per-image Python work. Bit-identical to `pixel_values` (`check_pixel_values`)."""
    from torchvision.transforms.v2 import functional as tvF
    from transformers.image_utils import pil_torch_interpolation_mapping
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = processor.image_processor
    n, _, h, w = imgs_u8.shape
    f = ip.patch_size * ip.merge_size
    rh, rw = smart_resize(h, w, factor=f, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
    x = imgs_u8.contiguous()
    if (rh, rw) != (h, w):
        x = tvF.resize(x, [rh, rw], interpolation=pil_torch_interpolation_mapping[ip.resample], antialias=True)
    key = (id(ip), str(x.device), n, rh, rw)
    if key not in _PIXEL_CONST:  # built once per device and batch size: no host-to-device copies per batch
        mean = torch.tensor(ip.image_mean, device=x.device) * (1.0 / ip.rescale_factor)
        std = torch.tensor(ip.image_std, device=x.device) * (1.0 / ip.rescale_factor)
        gh, gw = rh // ip.patch_size, rw // ip.patch_size
        _PIXEL_CONST[key] = (mean, std, torch.tensor([[1, gh, gw]] * n, dtype=torch.long, device=x.device))
    mean, std, grid = _PIXEL_CONST[key]
    x = tvF.normalize(x.to(torch.float32), mean, std, inplace=True)
    patches, gh, gw = ip.patchify(x, patch_size=ip.patch_size, merge_size=ip.merge_size,
                                  temporal_patch_size=ip.temporal_patch_size)
    return patches.reshape(n * gh * gw, -1), grid


_PIXEL_CONST: dict = {}


def check_pixel_values(processor, imgs_u8):
    """max |Δ| between the HF processor and `pixel_values_fast` (asserted below 1e-6), and the grids equal."""
    a, ga = pixel_values(processor, imgs_u8)
    b, gb = pixel_values_fast(processor, imgs_u8)
    d = (a - b).abs().max().item()
    assert a.shape == b.shape and torch.equal(ga.cpu(), gb.cpu()) and d <= 1e-6, (a.shape, b.shape, d)
    return d


def encode_prompts(text_encoder, ids, attn, pix, grid):
    """`_get_qwen_prompt_embeds` for a right-padded batch: hidden_states[-1] minus the first 64 tokens, and its mask."""
    out = text_encoder(input_ids=ids, attention_mask=attn, pixel_values=pix, image_grid_thw=grid,
                       output_hidden_states=True)
    h = out.hidden_states[-1]
    return h[:, DROP_IDX:], attn[:, DROP_IDX:]


# ---------------------------------------------------------------------------------------------------------------
# Sampling (the pipeline's 4-step Lightning Euler loop, batched)


def img_shapes_for(n_cond, h, w, batch):
    return [[(1, h // 2, w // 2)] * (1 + n_cond)] * batch


@torch.no_grad()
def sample(dit, cond_tokens, n_cond, embeds, mask, noise, sigmas=LIGHTNING_SIGMAS, lat_hw=(16, 16)):
    """Euler steps from `noise` (packed) with condition tokens appended; returns the packed final latents."""
    x = noise
    b = x.shape[0]
    shapes = img_shapes_for(n_cond, *lat_hw, b)
    n = x.shape[1]
    for i in range(len(sigmas) - 1):
        t = torch.full((b,), sigmas[i], device=x.device, dtype=x.dtype)
        v = dit(hidden_states=torch.cat([x, cond_tokens], 1), timestep=t, encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask, img_shapes=shapes, return_dict=False)[0][:, :n]
        x = x + (sigmas[i + 1] - sigmas[i]) * v.to(x.dtype)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Snapshot


def save_snapshot(folder: Path, plus: bool, vae, dit, text_encoder, tokenizer, processor, dtype=torch.bfloat16):
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline

    if folder.exists():
        shutil.rmtree(folder)
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    scheduler = FlowMatchEulerDiscreteScheduler(**lightning_scheduler_config())
    pipe = cls(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, processor=processor,
               transformer=dit)
    pipe.to("cpu", dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.to(torch.float32)
    return folder


def load_pipeline(folder: Path, dtype=torch.float32):
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    index = json.loads((Path(folder) / "model_index.json").read_text())
    cls = QwenImageEditPlusPipeline if index["_class_name"] == "QwenImageEditPlusPipeline" else QwenImageEditPipeline
    return cls.from_pretrained(str(folder), torch_dtype=dtype)


def patch_areas():
    """The pipelines hard-code 1024² (and Edit-Plus 384²): map them to the proxy's areas (as tools/fixtures'
    `_patch_areas`)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_mod
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus_mod

    for module in (edit_mod, plus_mod):
        if getattr(module, "_proxy_patched", False):
            continue
        orig = module.calculate_dimensions

        def calculate_dimensions(area, ratio, _orig=orig):
            return _orig(VAE_AREA if area == 1024 * 1024 else area, ratio)

        module.calculate_dimensions = calculate_dimensions
        if hasattr(module, "CONDITION_IMAGE_SIZE"):
            module.CONDITION_IMAGE_SIZE = COND_AREA
            module.VAE_IMAGE_SIZE = VAE_AREA
        module._proxy_patched = True


def file_sizes(folder: Path):
    import gzip
    import io
    import tarfile

    raw = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(folder), arcname=Path(folder).name)
    gz = len(gzip.compress(buf.getvalue(), 9))
    return raw, gz


def seed_everything(seed: int):
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Fast batched text encoder (training only): transformers' Qwen2.5-VL loops over images and attention windows in
# Python (one SDPA call per window) and recomputes window indices per image. For a batch of same-size images this
# does the same arithmetic as one masked SDPA call per layer, with the per-grid index tensors cached.
# `check_fast_text_encoder` asserts equality with the stock forward.

_VISION_CACHE: dict = {}


def patch_text_encoder_fast(patches_per_image: int):
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as m

    m._proxy_patches_per_image = patches_per_image
    if getattr(m, "_proxy_patched", False):
        return

    def cached(name):
        fn = getattr(m, name, None)
        if fn is None:
            return

        def wrapper(grid_thw, *args, **kw):
            def h(v):
                return v if isinstance(v, (int, float, str, bool, type(None))) else id(v)

            key = (name, tuple(map(tuple, grid_thw.tolist())), tuple(h(a) for a in args),
                   tuple(sorted((k, h(v)) for k, v in kw.items() if k != "kwargs")), str(grid_thw.device))
            if key not in _VISION_CACHE:
                _VISION_CACHE[key] = fn(grid_thw, *args, **kw)
            return _VISION_CACHE[key]

        setattr(m, name, wrapper)

    for name in ("get_vision_position_ids", "get_vision_attention_seqlens", "get_vision_window_index"):
        cached(name)

    def attn_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        s = hidden_states.shape[0]
        p = m._proxy_patches_per_image
        q, k, v = self.qkv(hidden_states).reshape(s, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = m.apply_rotary_pos_emb_vision(q, k, cos, sin)
        n = s // p
        seg = torch.searchsorted(cu_seqlens[1:].contiguous(), torch.arange(s, device=q.device,
                                 dtype=cu_seqlens.dtype), right=True).view(n, p)
        mask = (seg[:, :, None] == seg[:, None, :])[:, None]
        q, k, v = (t.reshape(n, p, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(s, -1))

    m.Qwen2_5_VLVisionAttention.forward = attn_forward
    m._proxy_patched = True


def encode_prompts_fast(text_encoder, ids, attn, pix, grid):
    """`encode_prompts` through the model's base (no lm_head). Positions are sequential, as diffusers gets them:
    transformers 5 computes M-RoPE positions only when `mm_token_type_ids` is passed, which the pipelines don't."""
    out = text_encoder.model(input_ids=ids, attention_mask=attn, pixel_values=pix, image_grid_thw=grid)
    h = out.last_hidden_state
    return h[:, DROP_IDX:], attn[:, DROP_IDX:]
