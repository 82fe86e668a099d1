"""Where a DiT training step's time goes (train.py `dit_stage`), part by part and as whole steps.

    nice python3 tools/proxy/profile_step.py [--batch 32] [--variant edit|plus] [--steps 3] [--profile]

Parts (each timed alone, mean of --steps repetitions after one warm-up): render (sources + target), VAE encode
(`pm.encode_latents` of sources + target), image processor (`pm.pixel_values`, the HF processor on a list of
tensors, and `pm.pixel_values_fast` when present), text encoder forward, DiT forward + loss + backward (text encoder
included), clip + AdamW + EMA. Then whole steps as `dit_stage` runs them, with the pool cache off and on (where
train.py has it). `--profile`: torch.profiler's top ops of one whole step.

On the CPU with one thread these are a proxy for the GPU's time: the FLOP-bound parts (VAE, DiT) are far slower
here, while Python / processor overheads show at about their real size. The VAE is `--vae` (default: the trained one
in /work/main/.dev/proxy/work if present, else a random one: the same cost).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_model as pm  # noqa: E402
import train_data  # noqa: E402
import train_dit  # noqa: E402
import train_vae  # noqa: E402


def timeit(fn, steps, device):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--variant", default="edit", choices=["edit", "plus"])
    ap.add_argument("--pool", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vae", default="/work/main/.dev/proxy/work")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    plus = args.variant == "plus"
    tokenizer = pm.build_tokenizer()
    processor = pm.build_processor(tokenizer)
    pool = train_data.generate_pool("train", args.variant, args.pool, 1)
    pm.patch_causal_conv()
    pm.patch_text_encoder_fast(pm.vision_tokens_per_image(processor) * processor.image_processor.merge_size ** 2)
    if (Path(args.vae) / "vae_final.pt").exists():
        vae, _ = train_vae.load_vae(args.vae, device)
    else:
        vae = pm.build_vae(1).to(device).eval()
    vae.requires_grad_(False)
    te = pm.build_text_encoder(tokenizer, 2).to(device).train()
    te.lm_head.requires_grad_(False)
    dit = pm.build_dit(3, zero_cond_t=plus).to(device)
    groups = [{"params": list(dit.parameters()), "lr": 1e-4},
              {"params": [p for p in te.parameters() if p.requires_grad], "lr": 1e-4}]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.0, fused=device.type == "cuda")
    params = [p for gr in opt.param_groups for p in gr["params"]]
    ema = [p.detach().clone() for p in params]
    pool = train_data.to_device(train_data.tokenize_pool(pool, tokenizer, processor, plus), device)
    g = torch.Generator(device).manual_seed(0)
    n_cond = 2 if plus else 1
    grp = torch.nonzero(pool["n_src"] == n_cond).flatten()
    idx = grp[torch.randint(0, len(grp), (args.batch,), device=device, generator=g)]
    noop = torch.rand(args.batch, device=device, generator=g) < train_data.NOOP_FRACTION
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, variant {args.variant}, "
          f"{n_cond} condition image(s); torch {torch.__version__}")

    b = args.batch
    res = {}
    srcs = [train_data.render_u8(pool["src_obj"][idx, k], pool["src_bg"][idx, k]) for k in range(n_cond)]
    res["render (sources + target)"] = timeit(
        lambda: [train_data.render_u8(pool["src_obj"][idx, k], pool["src_bg"][idx, k]) for k in range(n_cond)]
        + [train_data.render_u8(pool["tgt_obj"][idx], pool["tgt_bg"][idx])], args.steps, device)
    all_imgs = torch.cat(srcs + [srcs[0]])

    def vae_enc():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return pm.encode_latents(vae, all_imgs).float()

    res[f"VAE encode ({len(all_imgs)} images)"] = timeit(vae_enc, args.steps, device)
    vl = torch.stack(srcs, 1).flatten(0, 1)
    res[f"image processor, HF ({len(vl)} images)"] = timeit(lambda: pm.pixel_values(processor, vl), args.steps,
                                                            device)
    if hasattr(pm, "pixel_values_fast"):
        res[f"image processor, batched ({len(vl)} images)"] = timeit(
            lambda: pm.pixel_values_fast(processor, vl), args.steps, device)
    batcher = train_data.Batcher(pool, tokenizer, processor, vae, plus, device)
    bt = batcher.batch(idx, noop)

    def te_fwd():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return pm.encode_prompts_fast(te, bt["ids"], bt["attn"], bt["pix"], bt["grid"])

    res[f"text encoder forward (no grad, {bt['ids'].shape[1]} tokens)"] = timeit(te_fwd, args.steps, device)

    def fwd_bwd():
        loss = train_dit.dit_loss(dit, te, bt, g, device, True)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    res["text encoder + DiT forward, loss, backward"] = timeit(fwd_bwd, args.steps, device)

    def opt_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 0.005)

    fwd_bwd()
    res["clip + AdamW + EMA"] = timeit(opt_step, args.steps, device)
    total = sum(res.values())
    for k, v in res.items():
        print(f"  {k:<52} {v * 1000:9.1f} ms  {100 * v / total:5.1f} %")

    def make_step(batcher):
        def step():
            bt = batcher.batch(idx, noop)
            loss = train_dit.dit_loss(dit, te, bt, g, device, True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt_step()
        return step

    import inspect

    variants = [("per-step render + VAE + HF processor (cache off)", {})]
    if "cache" in inspect.signature(train_data.Batcher.__init__).parameters:
        variants = [(variants[0][0], dict(cache=False)), ("pool cache on", dict(cache=True))]
    for name, kw in variants:
        t0 = time.perf_counter()
        bat = train_data.Batcher(pool, tokenizer, processor, vae, plus, device, **kw)
        setup = time.perf_counter() - t0
        per = timeit(make_step(bat), args.steps, device)
        print(f"whole step, {name}: {per * 1000:.1f} ms (set-up {setup:.1f} s for a pool of {args.pool})")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for name, kw in variants:
            bat = train_data.Batcher(pool, tokenizer, processor, vae, plus, device, **kw)
            step = make_step(bat)
            step()
            with profile(activities=acts) as prof:
                step()
            print(f"\n== torch.profiler, one whole step, {name}")
            key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
