"""Controlled CPU experiments on the DiT training recipe of train.py (the runs behind tools/proxy/README.md's
"Recipe study" section).

    nice -n 10 python3 tools/proxy/recipe_lab.py prep --cache /tmp/rc/cache.pt        # pool + val latents, once
    nice -n 10 python3 tools/proxy/recipe_lab.py diag --cache /tmp/rc/cache.pt        # v1: losses in/out of the mask
    nice -n 10 python3 tools/proxy/recipe_lab.py train --cache /tmp/rc/cache.pt --json A.json [recipe flags]

`prep` builds a pool of training edits and a validation set (train.py's split 'val') with train.py's `Batcher`
(latents of every image, token change masks) and saves them, so that every run sees the same data. `train` runs
train.py's own step (`dit_loss`, AdamW, clip, warm-up) from the v1 snapshot (`--init v1`, the default) or from
scratch (`--init scratch`) for `--steps` steps with a fixed seed (the same batches, σ and noise in every run that
keeps the batch size), and validates with train.py's `validate` (4 Lightning steps, per-task success and losses
in/out of the edit mask; success of the current weights, or of an EMA with `--ema D`) every `--eval-every` steps;
`--decay` adds train.py's lr decay over the last 30 % of the steps. The curve goes to `--json`. One thread
(`torch.set_num_threads(1)`): the machine's other core is for builds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_model as pm  # noqa: E402
import train_data  # noqa: E402
import train_dit  # noqa: E402
import train_vae  # noqa: E402

V1 = Path("/work/proxy-trained-v1")
VAE_WORK = Path("/work/main/.dev/proxy/work")
CPU = torch.device("cpu")


def setup(variant):
    tokenizer = pm.build_tokenizer()
    processor = pm.build_processor(tokenizer)
    pm.patch_causal_conv()
    pm.patch_text_encoder_fast(pm.vision_tokens_per_image(processor) * processor.image_processor.merge_size ** 2)
    vae, _ = train_vae.load_vae(VAE_WORK, CPU)
    vae.requires_grad_(False)
    return tokenizer, processor, vae


def prep(args):
    tokenizer, processor, vae = setup(args.variant)
    plus = args.variant == "plus"
    t0 = time.time()
    tasks = args.tasks.split(",") if args.tasks else [None]
    parts = [train_data.generate_pool("train", args.variant, args.pool // len(tasks), 1, task=t) for t in tasks]
    pool = {k: sum((p[k] for p in parts), []) if k == "texts" else np.concatenate([p[k] for p in parts])
            for k in parts[0]}
    pool = train_data.to_device(train_data.tokenize_pool(pool, tokenizer, processor, plus), CPU)
    batcher = train_data.Batcher(pool, tokenizer, processor, vae, plus, CPU)
    val = train_data.val_set(args.variant, args.val, CPU)
    val = train_data.to_device(train_data.tokenize_pool(val, tokenizer, processor, plus), CPU)
    vb = train_data.Batcher(val, tokenizer, processor, vae, plus, CPU)
    torch.save({"variant": args.variant, "pool": pool, "pool_cache": batcher.cache_state(), "val": val,
                "val_cache": vb.cache_state()}, args.cache)
    print(f"prep: {len(pool['texts'])} training edits, {len(val['texts'])} validation edits in "
          f"{time.time() - t0:.0f}s; edited tokens: train {batcher.mask_tok.mean():.3f}, "
          f"val {vb.mask_tok.mean():.3f} of all")


def load_cache(path, tokenizer, processor, vae):
    d = torch.load(path, weights_only=False)
    plus = d["variant"] == "plus"
    out = []
    for name in ("pool", "val"):
        b = train_data.Batcher(d[name], tokenizer, processor, vae, plus, CPU, cache=False)
        b.load_cache_state(d[f"{name}_cache"])
        out.append(b)
    return d, out[0], out[1]


def models(init, tokenizer, seed, plus):
    """(text encoder, DiT): built as train.py builds them; `v1` loads the v1 snapshot's (EMA, bf16) weights."""
    te = pm.build_text_encoder(tokenizer, seed + 2)
    dit = pm.build_dit(seed + 3, zero_cond_t=plus)
    if init == "v1":
        train_dit.load_snapshot_weights(train_dit.snapshot_folder(V1, plus), te, dit)
    return te, dit


def fmt(v):
    return (f"success {v['success']:.3f} {v['per_task']} ΔE {v['per_task_delta_e']} | loss in "
            f"{' '.join(f'{x:.3f}' for x in v['loss_in'])} out {' '.join(f'{x:.3f}' for x in v['loss_out'])}")


@torch.no_grad()
def diag(args):
    """v1 on the validation set: train.py's validation, and the losses of two reference predictors: `copy` (x0
    predicted as the source's latents) and `mean` (x0 predicted as 0, the latents' mean)."""
    tokenizer, processor, vae = setup(args.variant)
    d, _, vb = load_cache(args.cache, tokenizer, processor, vae)
    plus = d["variant"] == "plus"
    te, dit = models(args.init, tokenizer, args.seed, plus)
    v = train_dit.validate(dit, te, dit.state_dict(), te.state_dict(), d["val"], vb, CPU, plus)
    print(f"{args.init}: {fmt(v)}")
    print("per-task loss in mask (σ 1, .9, .75, .5):", v["per_task_loss_in"])
    # reference predictors: predicting x0 = ref gives the velocity error |x0 - ref|² / σ², at σ = 1 |x0 - ref|²
    idx = torch.arange(len(d["val"]["texts"]))
    bt = vb.batch(idx, torch.zeros(len(idx), dtype=torch.bool), n_src=1)
    edited = bt["edited"]
    for name, ref in (("copy", bt["cond"][:, -bt["x0"].shape[1]:]), ("mean", torch.zeros_like(bt["x0"]))):
        e = (bt["x0"] - ref).pow(2).mean(-1)
        print(f"{name} predictor at σ=1: in {(e * edited).sum() / edited.sum():.3f} "
              f"out {(e * (1 - edited)).sum() / (1 - edited).sum():.3f}")
    print(f"edited tokens: {edited.mean():.3f} of all; per task:",
          {t: round(float(edited[d['val']['task'] == i].mean()), 3) for t, i in train_data.TASK_ID.items()
           if (d['val']['task'] == i).any()})


def run(args):
    torch.manual_seed(args.seed)
    tokenizer, processor, vae = setup(args.variant)
    d, batcher, vb = load_cache(args.cache, tokenizer, processor, vae)
    plus = d["variant"] == "plus"
    te, dit = models(args.init, tokenizer, args.seed, plus)
    te.requires_grad_(True)
    te.lm_head.requires_grad_(False)
    te.train()
    groups = [{"params": list(dit.parameters()), "lr": args.lr},
              {"params": [p for p in te.parameters() if p.requires_grad], "lr": args.te_lr}]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.0)
    params = [p for gr in opt.param_groups for p in gr["params"]]
    ema = [p.detach().clone() for p in params]
    curve = []

    def evaluate(step):
        ema_dit, ema_te = dit.state_dict(), te.state_dict()
        if args.ema:  # success of the EMA weights (as train.py validates and exports), losses of the current ones
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_copy_(params, ema)
            ema_dit = {k: v.clone() for k, v in dit.state_dict().items()}
            ema_te = {k: v.clone() for k, v in te.state_dict().items()}
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
        v = train_dit.validate(dit, te, ema_dit, ema_te, d["val"], vb, CPU, plus)
        v.update(step=step, time_s=round(time.time() - t0, 1))
        curve.append(v)
        print(f"[{args.name}] step {step} ({time.time() - t0:.0f}s): {fmt(v)}", flush=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "curve": curve}, indent=1))

    t0 = time.time()
    if args.eval_first:
        evaluate(0)
    batcher.set_task_weights(train_dit.parse_task_weights(args.task_weights))
    for step in range(args.steps):
        warm = min(1.0, (step + 1) / args.warmup)
        frac = step / args.steps  # train.py's schedule: constant, then cosine to 0.1 over the last 30 %
        decay = 1.0 if frac < 0.7 or not args.decay else 0.1 + 0.45 * (1 + math.cos(math.pi * (frac - 0.7) / 0.3))
        for gi, gr in enumerate(opt.param_groups):
            gr["lr"] = (args.lr if gi == 0 else args.te_lr) * warm * decay
        g = torch.Generator().manual_seed(args.seed * 7919 + step)
        n_cond, idx = batcher.draw(args.batch, g)
        noop = torch.rand(args.batch, generator=g) < args.noop
        bt = batcher.batch(idx, noop, n_src=n_cond)
        loss = train_dit.dit_loss(dit, te, bt, g, CPU, True, mask_weight=args.mask_weight,
                              sigmas=args.sigmas)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - args.ema)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evaluate(step + 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["prep", "diag", "train"])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--variant", default="edit")
    ap.add_argument("--tasks", default="", help="prep: comma-separated tasks, equal shares (default: train.py's mix)")
    ap.add_argument("--pool", type=int, default=1536)
    ap.add_argument("--val", type=int, default=96)
    ap.add_argument("--init", default="v1", choices=["v1", "scratch"])
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--name", default="run")
    ap.add_argument("--json", default="/tmp/rc/run.json")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--te-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--noop", type=float, default=train_data.NOOP_FRACTION)
    ap.add_argument("--mask-weight", type=float, default=0.0)
    ap.add_argument("--task-weights", default="", help="e.g. recolor=2,add=2 (train.py's --task-weights)")
    ap.add_argument("--sigmas", default="mixed", choices=list(train_dit.SIGMA_MODES))
    ap.add_argument("--ema", type=float, default=0.0, help="validate the success of EMA weights of this decay")
    ap.add_argument("--decay", action="store_true", help="train.py's lr decay over the last 30 %% of the steps")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-first", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"prep": prep, "diag": diag, "train": run}[args.what](args)


if __name__ == "__main__":
    main()
