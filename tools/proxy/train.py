"""Trains the Qwen-Image-Edit proxy (and its Edit-Plus variant) on generated scenes, end to end on one GPU.

    python3 tools/proxy/train.py --work WORK --out OUT            # everything: VAE, DiTs, snapshots, logs
    python3 tools/proxy/train.py --work WORK --out OUT --smoke    # a few steps of everything (CPU is fine)

Stages (each resumable from WORK: finished stages are skipped, running ones restart from their last checkpoint):
1. `vae`: AutoencoderKLQwenImage (VAE_CONFIG in proxy_model.py) as an autoencoder on rendered scenes (MSE + 0.1 L1
   + 1e-6 KL), single-frame fast path; then the per-channel latent mean/std go into its config.
2. `dit`: one process per run, all at once on the same GPU: `edit` (QwenImageEditPipeline layout, trained text
   encoder), `plus` (Edit-Plus layout, 1 or 2 condition images, zero_cond_t, trained text encoder) and
   `edit_frozen_te` (the `edit` run with the random text encoder frozen, for a shorter time: the ablation that says
   whether training the text encoder matters). Flow matching: x_σ = (1-σ) x0 + σ ε, target v = ε - x0, condition
   image tokens appended exactly as the pipeline does; σ half from the 4-step Lightning schedule {1, .9, .75, .5},
   half 3σ/(1+2σ) of uniform σ (`--sigmas`). The velocity MSE weighs each packed latent token 1 + `--mask-weight`
   (default 3; 0 = the plain MSE of the v1 snapshots) where the edit changes its 16×16 pixels (the source and target
   renders differ): recolour / add / remove change ~10 % of the tokens, and the plain MSE spends most of its signal
   on copying the rest (tools/proxy/README.md, "Recipe study"). 5 % of samples are "no-op" edits (prompt " ", target
   = source) so that true CFG with the negative prompt " " has a meaningful unconditional branch. EMA weights
   (`--ema`, 0.995) are exported. `--dit-init DIR` starts from the snapshots of an earlier run instead of random
   weights (a continuation across GPU calls).
3. `export`: diffusers snapshots (bf16) with the Lightning scheduler, a README each, the measured sizes, a check that
   diffusers' pipeline on the written snapshot gives the latents this script's sampler gives, and the validation
   success rate of the exported weights.

Logs (CSV per run + summary JSON) go to OUT/logs. Step counts are fixed by `--vae-steps` / `--dit-steps`; with
`--vae-time` / `--dit-time`, a run that would not finish in time fixes a smaller count after its first 100 steps
(from its measured speed) and logs it, so that a rerun with that count reproduces the schedule.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_model as pm  # noqa: E402
import scenes  # noqa: E402

TASK_ID = {t: i for i, t in enumerate(scenes.PLUS_TASKS)}
NOOP_FRACTION = 0.05


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Data: edit parameters generated on the CPU (worker pool), images rendered on the device per batch


def _gen_chunk(job):
    split, variant, start, n, task = job
    k = scenes.MAX_OBJECTS
    src_obj = np.zeros((n, 2, k, 7), np.float32)
    src_bg = np.zeros((n, 2, 7), np.float32)
    tgt_obj = np.zeros((n, k, 7), np.float32)
    tgt_bg = np.zeros((n, 7), np.float32)
    n_src = np.zeros(n, np.int64)
    task_id = np.zeros(n, np.int64)
    texts = []
    for i in range(n):
        e = scenes.make_edit(split, variant, start + i, task)
        o, b = scenes.scenes_to_arrays(e["sources"])
        src_obj[i, : len(o)], src_bg[i, : len(o)] = o, b
        o, b = scenes.scenes_to_arrays([e["target"]])
        tgt_obj[i], tgt_bg[i] = o[0], b[0]
        n_src[i] = len(e["sources"])
        task_id[i] = TASK_ID[e["task"]]
        texts.append(e["instruction"])
    return src_obj, src_bg, tgt_obj, tgt_bg, n_src, task_id, texts


def generate_pool(split, variant, n, workers, chunk=2000, task=None):
    jobs = [(split, variant, s, min(chunk, n - s), task) for s in range(0, n, chunk)]
    if workers > 1:
        with Pool(workers) as p:
            parts = p.map(_gen_chunk, jobs)
    else:
        parts = [_gen_chunk(j) for j in jobs]
    out = [np.concatenate([p[i] for p in parts]) for i in range(6)]
    texts = [t for p in parts for t in p[6]]
    return dict(src_obj=out[0], src_bg=out[1], tgt_obj=out[2], tgt_bg=out[3], n_src=out[4], task=out[5],
                texts=texts)


def tokenize_pool(pool, tokenizer, processor, plus):
    ids = pm.token_ids_batch(tokenizer, processor, pool["texts"], pool["n_src"], plus)
    lens = np.array([len(x) for x in ids])
    arr = np.full((len(ids), lens.max()), tokenizer.pad_token_id, np.int64)
    for i, x in enumerate(ids):
        arr[i, : len(x)] = x
    pool["ids"], pool["lens"] = arr, lens
    return pool


def to_device(pool, device):
    return {k: (torch.from_numpy(v).to(device) if isinstance(v, np.ndarray) else v) for k, v in pool.items()}


def render_u8(obj, bg):
    return scenes.render(obj, bg).to(torch.uint8)


class Batcher:
    """Builds DiT training batches from a pool on the device.

    With `cache` (the default) the VAE latents of every pool image (sources and targets) are computed once, batched,
    at construction (`raw_latents`: the encoder's output dtype, bf16 under autocast on the GPU, so storing them loses
    nothing), and the vision processor runs as one batched tensor op (`pm.pixel_values_fast`, bit-identical to the HF
    processor). A batch then only renders its source images (for the processor) and gathers latents; the DiT and text
    encoder get the same inputs as without the cache, up to the float rounding of encoding in other batch
    compositions (`check_batch_cache`). Without it (`--no-pool-cache`) every batch renders, VAE-encodes and runs the
    HF processor as before."""

    def __init__(self, pool, tokenizer, processor, vae, plus, device, cache=True, chunk=512):
        self.pool, self.vae, self.plus, self.device = pool, vae, plus, device
        self.processor = processor
        noop = [pm.token_ids(tokenizer, processor, " ", n, plus) for n in (1, 2)] if plus else \
            [pm.token_ids(tokenizer, processor, " ", 1, False)]
        self.noop_ids = [torch.tensor(x, device=device) for x in noop]
        self.pad = tokenizer.pad_token_id
        # the no-op prompt as full padded rows: batches swap them in with `where`, no host sync on the mask
        width = pool["ids"].shape[1]
        assert max(len(x) for x in noop) <= width, "the no-op prompt is longer than the pool's prompts"
        self.noop_rows = [torch.cat([x, torch.full((width - len(x),), self.pad, device=device, dtype=x.dtype)])
                          for x in self.noop_ids]
        self.groups = {n: torch.nonzero(pool["n_src"] == n).flatten() for n in (1, 2)}
        self.groups = {n: g for n, g in self.groups.items() if len(g)}
        self.set_task_weights({})
        self.cache = cache
        if cache:
            self._build_cache(chunk)

    def set_task_weights(self, weights):
        """Training rows are drawn with probability ∝ weights[task] (1 for tasks not named; {} = uniform over the
        pool, the random stream of earlier versions)."""
        self.uniform = all(w == 1.0 for w in weights.values())
        w = torch.tensor([float(weights.get(t, 1.0)) for t in TASK_ID], device=self.device)[self.pool["task"]]
        self.row_w = {n: w[g] for n, g in self.groups.items()}
        total = sum(float(x.sum()) for x in self.row_w.values())
        self.p_pair = float(self.row_w[2].sum()) / total if 2 in self.row_w else 0.0

    def draw(self, batch, g):
        """(n_cond, pool rows) of a training batch: 1 or 2 sources, then `batch` rows with that many."""
        n_cond = 2 if (self.p_pair > 0 and torch.rand(1, generator=g, device=self.device).item() < self.p_pair) else 1
        grp = self.groups[n_cond]
        if self.uniform:
            return n_cond, grp[torch.randint(0, len(grp), (batch,), device=self.device, generator=g)]
        return n_cond, grp[torch.multinomial(self.row_w[n_cond], batch, replacement=True, generator=g)]

    @torch.no_grad()
    def _encode(self, obj, bg):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return pm.raw_latents(self.vae, render_u8(obj, bg))

    @torch.no_grad()
    def _build_cache(self, chunk):
        p = self.pool
        n, k_max = len(p["n_src"]), int(p["n_src"].max())
        lat_src, lat_tgt = None, None
        for k in range(k_max + 1):  # source slots 0..k_max-1, then the targets
            rows = torch.arange(n, device=self.device) if k == k_max else torch.nonzero(p["n_src"] > k).flatten()
            for s in range(0, len(rows), chunk):
                r = rows[s:s + chunk]
                z = self._encode(p["tgt_obj"][r], p["tgt_bg"][r]) if k == k_max else \
                    self._encode(p["src_obj"][r, k], p["src_bg"][r, k])
                if lat_src is None:
                    lat_src = torch.zeros((n, k_max) + z.shape[1:], dtype=z.dtype, device=self.device)
                    lat_tgt = torch.zeros((n,) + z.shape[1:], dtype=z.dtype, device=self.device)
                if k == k_max:
                    lat_tgt[r] = z
                else:
                    lat_src[r, k] = z
        self.lat_src, self.lat_tgt = lat_src, lat_tgt
        self.mask_tok = torch.zeros((n, TOKENS), device=self.device)
        for s in range(0, n, chunk):
            r = torch.arange(s, min(n, s + chunk), device=self.device)
            self.mask_tok[r] = change_tokens(self._last_source(r), render_u8(p["tgt_obj"][r], p["tgt_bg"][r]))

    def _last_source(self, rows):
        """The rendered last source image of pool rows (the picture the target is drawn on)."""
        p = self.pool
        k = p["n_src"][rows] - 1
        return render_u8(p["src_obj"][rows, k], p["src_bg"][rows, k])

    def cache_state(self):
        """The cached tensors (to save a built cache: `recipe_lab.py`)."""
        return {"lat_src": self.lat_src, "lat_tgt": self.lat_tgt, "mask_tok": self.mask_tok}

    def load_cache_state(self, state):
        self.lat_src, self.lat_tgt, self.mask_tok = state["lat_src"], state["lat_tgt"], state["mask_tok"]
        self.cache = True

    def cache_bytes(self):
        return 0 if not self.cache else self.lat_src.nbytes + self.lat_tgt.nbytes

    @torch.no_grad()
    def batch(self, idx, noop_mask, need_tgt=False, n_src=None):
        """A batch of pool rows `idx` (all with `n_src` sources; read from the pool when not given, a host sync);
        `noop_mask` rows become no-op edits (prompt " ", target = last source). `tgt` (the target images, for
        scoring) is rendered only with `need_tgt` or without the cache."""
        p = self.pool
        n_src = int(p["n_src"][idx[0]]) if n_src is None else n_src
        b = len(idx)
        srcs = [render_u8(p["src_obj"][idx, k], p["src_bg"][idx, k]) for k in range(n_src)]
        tgt = None
        if need_tgt or not self.cache:
            tgt = render_u8(p["tgt_obj"][idx], p["tgt_bg"][idx])
            tgt = torch.where(noop_mask.view(b, 1, 1, 1), srcs[-1], tgt)
        k = n_src - 1 if self.plus else 0
        ids = torch.where(noop_mask[:, None], self.noop_rows[k][None], p["ids"][idx])
        lens = torch.where(noop_mask, len(self.noop_ids[k]), p["lens"][idx])
        t_max = int(lens.max())
        ids = ids[:, :t_max]
        attn = (torch.arange(t_max, device=self.device)[None] < lens[:, None]).long()
        # vision-language images in prompt order: sample-major, picture 1 then picture 2
        vl = torch.stack(srcs, 1).flatten(0, 1)
        if self.cache:
            z_src = self.lat_src[idx, :n_src]  # [b, n_src, z, h, w]
            z_tgt = torch.where(noop_mask.view(b, 1, 1, 1), z_src[:, -1], self.lat_tgt[idx])
            lat = pm.normalize_pack(self.vae, torch.cat([z_src.transpose(0, 1).flatten(0, 1), z_tgt]))
            pix, grid = pm.pixel_values_fast(self.processor, vl)
        else:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                all_imgs = torch.cat(srcs + [tgt])
                lat = pm.encode_latents(self.vae, all_imgs).float()
            pix, grid = pm.pixel_values(self.processor, vl)
        conds = [lat[k * b:(k + 1) * b] for k in range(n_src)]
        x0 = lat[n_src * b:]
        edited = self.mask_tok[idx] if self.cache else change_tokens(srcs[-1], tgt)
        edited = torch.where(noop_mask[:, None], 0.0, edited)
        return dict(x0=x0, cond=torch.cat(conds, 1), n_cond=n_src, ids=ids, attn=attn, pix=pix, grid=grid,
                    tgt=tgt, edited=edited)


TOKENS = (scenes.SIZE // 16) ** 2  # packed latent tokens per image: one per 16×16 pixel block


def change_tokens(src_u8, tgt_u8, patch=16):
    """[B, TOKENS] float: 1 for the packed latent tokens (16×16 pixel blocks, `pm.pack`'s row-major order) where the
    edit changes some pixel by more than 2 levels (the rendered last source vs the target), else 0."""
    d = (src_u8.float() - tgt_u8.float()).abs().amax(1, keepdim=True)
    return (F.max_pool2d(d, patch) > 2).float().flatten(1)


def check_batch_cache(cached, plain, idx, noop):
    """The same batch built with the pool cache and without it: max |Δ| per tensor. Asserts equality of ids, masks
    and grids, pixel values within 1e-6 and latents within float rounding (f32: 1e-4; bf16 encoder under autocast:
    other batch compositions can move a raw latent by a bf16 ulp, 2^-8 of its size, so max |Δ| ≤ 2 % of max |x| and
    mean |Δ| ≤ 1 % of mean |x|; wrong rows or a wrong order give differences of the order of the values)."""
    a, b = cached.batch(idx, noop, need_tgt=True), plain.batch(idx, noop)
    diff = {}
    for k in ("x0", "cond", "pix", "ids", "attn", "grid", "tgt", "edited"):
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        d = (a[k].double() - b[k].double()).abs()
        diff[k] = (d.max().item(), d.mean().item())
    assert a["n_cond"] == b["n_cond"]
    for k in ("ids", "attn", "grid", "tgt", "edited"):
        assert diff[k][0] == 0, (k, diff[k])
    assert diff["pix"][0] <= 1e-6, diff["pix"]
    bf16 = cached.lat_tgt.dtype == torch.bfloat16
    for k in ("x0", "cond"):
        if bf16:
            ref = b[k].abs()
            ok = diff[k][0] <= 2e-2 * ref.max().item() and diff[k][1] <= 1e-2 * ref.mean().item()
        else:
            ok = diff[k][0] <= 1e-4 and diff[k][1] <= 1e-5
        assert ok, (k, diff[k])
    return {k: diff[k] for k in ("x0", "cond", "pix")}


# ---------------------------------------------------------------------------------------------------------------
# Metrics on the device (the rule of scenes.score)


def srgb_to_lab_t(rgb):
    c = rgb / 255.0
    c = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = torch.tensor([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                      [0.0193339, 0.1191920, 0.9503041]], device=rgb.device, dtype=rgb.dtype)
    xyz = c @ m.T / torch.tensor([0.95047, 1.0, 1.08883], device=rgb.device, dtype=rgb.dtype)
    f = torch.where(xyz > (6 / 29) ** 3, xyz.clamp_min(1e-12) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def score_t(out, tgt, mask):
    """out/tgt uint8 [B, 3, H, W], mask uint8 [B, H, W] -> dict of [B] tensors."""
    out, tgt = out.double(), tgt.double()
    core = (mask == 255)[:, None].double()
    outside = (mask == 0)[:, None].double()
    n_core = core.sum((1, 2, 3)).clamp_min(1)
    mean_o = (out * core).sum((2, 3)) / n_core[:, None]
    mean_t = (tgt * core).sum((2, 3)) / n_core[:, None]
    de = (srgb_to_lab_t(mean_o) - srgb_to_lab_t(mean_t)).norm(dim=-1)
    mse_out = (((out - tgt) ** 2) * outside).sum((1, 2, 3)) / (3 * outside.sum((1, 2, 3))).clamp_min(1)
    p_out = 10 * torch.log10(255.0 ** 2 / mse_out.clamp_min(1e-10))
    mse = ((out - tgt) ** 2).mean((1, 2, 3))
    p_all = 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))
    ok = (de <= scenes.DELTA_E_MAX) & (p_out >= scenes.PSNR_OUTSIDE_MIN)
    return dict(delta_e=de, psnr_outside=p_out, psnr=p_all, success=ok.double())


def val_set(variant, n, device):
    """Validation edits (split 'val', disjoint seeds) as device tensors with masks."""
    edits = [scenes.make_edit("val", variant, i) for i in range(n)]
    masks, tasks = [], []
    for e in edits:
        _, _, mask = scenes.edit_images(e)
        masks.append(mask)
        tasks.append(TASK_ID[e["task"]])
    pool = {"texts": [e["instruction"] for e in edits]}
    src_obj = np.zeros((n, 2, scenes.MAX_OBJECTS, 7), np.float32)
    src_bg = np.zeros((n, 2, 7), np.float32)
    for i, e in enumerate(edits):
        o, b = scenes.scenes_to_arrays(e["sources"])
        src_obj[i, : len(o)], src_bg[i, : len(o)] = o, b
    o, b = scenes.scenes_to_arrays([e["target"] for e in edits])
    pool.update(src_obj=src_obj, src_bg=src_bg, tgt_obj=o, tgt_bg=b,
                n_src=np.array([len(e["sources"]) for e in edits]), task=np.array(tasks), mask=np.stack(masks))
    return pool


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: VAE


def vae_stage(args, device, tokenizer):
    work = Path(args.work)
    final = work / "vae_final.pt"
    if final.exists():
        log("vae: done earlier")
        return
    # Scenes (generated before the device is touched: the worker pool forks): sources and targets of training edits
    # of both variants.
    t0 = time.time()
    pools = [generate_pool("train", v, args.vae_pool // 2, args.workers) for v in ("edit", "plus")]
    torch.manual_seed(args.seed)
    pm.patch_causal_conv()
    vae = pm.build_vae(args.seed + 1).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99))
    ckpt_path = work / "vae_ckpt.pt"
    step, steps = 0, args.vae_steps
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device)
        vae.load_state_dict(ck["vae"])
        opt.load_state_dict(ck["opt"])
        step, steps = ck["step"], ck["steps"]
        log(f"vae: resumed at step {step}/{steps}")
    obj = np.concatenate([np.concatenate([p["src_obj"][p["n_src"] >= k + 1, k] for k in range(2)] + [p["tgt_obj"]])
                          for p in pools])
    bg = np.concatenate([np.concatenate([p["src_bg"][p["n_src"] >= k + 1, k] for k in range(2)] + [p["tgt_bg"]])
                         for p in pools])
    obj, bg = torch.from_numpy(obj).to(device), torch.from_numpy(bg).to(device)
    val = val_set("edit", 32 if args.smoke else args.vae_val_size, device)
    val_img = render_u8(torch.from_numpy(val["src_obj"][:, 0]).to(device), torch.from_numpy(val["src_bg"][:, 0])
                        .to(device))
    log(f"vae: {len(obj)} scenes in {time.time() - t0:.1f}s")
    logf = open(Path(args.out) / "logs" / "vae.csv", "a", newline="")
    writer = csv.writer(logf)
    if step == 0:
        writer.writerow(["step", "time_s", "lr", "loss", "mse", "kl", "val_psnr", "anchor"])
    t_start = time.time()
    clock = time.time()
    vae.train()
    while step < steps:
        frac = step / max(1, steps)
        lr = args.vae_lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac))) * min(1.0, (step + 1) / 50)
        for gr in opt.param_groups:
            gr["lr"] = lr
        g = torch.Generator(device).manual_seed(args.seed * 7919 + step)
        idx = torch.randint(0, len(obj), (args.vae_batch,), device=device, generator=g)
        x = pm.images_to_vae_input(render_u8(obj[idx], bg[idx]))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            # A deterministic autoencoder on the posterior mean (the pipeline only ever uses the mode): sampling
            # with the initial unit variance drowns the latents in noise and nothing is learnt.
            mean = pm.vae_encode_mean(vae, x)
            rec = vae.decoder(vae.post_quant_conv(mean))[:, :, 0]
        rec = rec.float()
        mse = F.mse_loss(rec, x)
        l1 = (rec - x).abs().mean()
        kl = (mean.float() ** 2).mean()  # keeps the latents' scale bounded (normalized per channel afterwards)
        # Anchor: latent channels 0-2 = the 8×8 block means of the image. Without it encoder and decoder stay stuck
        # at "background colour only" (MSE 0.12 on [-1, 1], even on one fixed batch of 8 images); with it the
        # reconstruction keeps improving (CPU test: 0.12 -> 0.07 in 150 steps on that batch).
        anchor = F.mse_loss(mean[:, :3, 0].float(), F.avg_pool2d(x, 8))
        loss = mse + 0.1 * l1 + args.vae_kl * kl + args.vae_anchor * anchor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step == 100 and args.vae_time and not args.smoke:
            per = (time.time() - t_start) / 100
            fit = int(args.vae_time / per) // 100 * 100
            if fit < steps:
                log(f"vae: {per * 1000:.0f} ms/step: {steps} steps would take {per * steps:.0f}s > "
                    f"{args.vae_time}s; training {fit} steps")
                steps = max(fit, 200)
        if step % args.log_every == 0 or step == steps:
            vp = ""
            if step % (args.log_every * 5) == 0 or step == steps:
                vp = f"{vae_psnr(vae, val_img):.2f}"
                vae.train()
            writer.writerow([step, f"{time.time() - t_start:.1f}", f"{lr:.2e}", f"{loss.item():.5f}",
                             f"{mse.item():.6f}", f"{kl.item():.3f}", vp, f"{anchor.item():.5f}"])
            logf.flush()
            if vp:
                log(f"vae {step}/{steps} loss {loss.item():.5f} mse {mse.item():.6f} val psnr {vp} dB "
                    f"({time.time() - clock:.0f}s)")
        if step % args.ckpt_every == 0 and step < steps:
            torch.save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step, "steps": steps},
                       str(ckpt_path) + ".tmp")
            os.replace(str(ckpt_path) + ".tmp", ckpt_path)
    vae.eval()
    # Per-channel statistics of the posterior means (what the pipeline normalizes with).
    with torch.no_grad():
        g = torch.Generator(device).manual_seed(args.seed + 99)
        zs = []
        for _ in range(8):
            idx = torch.randint(0, len(obj), (256,), device=device, generator=g)
            zs.append(pm.vae_encode_mean(vae, pm.images_to_vae_input(render_u8(obj[idx], bg[idx]))).float())
        z = torch.cat(zs)
        mean = z.mean((0, 2, 3, 4))
        std = z.std((0, 2, 3, 4))
    vae.register_to_config(latents_mean=[round(float(v), 4) for v in mean],
                           latents_std=[round(float(v), 4) for v in std])
    psnr = vae_psnr(vae, val_img)
    log(f"vae: final val PSNR {psnr:.2f} dB after {step} steps, {time.time() - t_start:.0f}s")
    torch.save({"vae": vae.state_dict(), "config": dict(vae.config), "steps": step, "val_psnr": psnr,
                "train_s": time.time() - t_start}, final)
    logf.close()


@torch.no_grad()
def vae_psnr(vae, img_u8):
    vae.eval()
    out = []
    for i in range(0, len(img_u8), 128):
        x = pm.images_to_vae_input(img_u8[i:i + 128])
        rec = pm.vae_decode(vae, pm.vae_encode_mean(vae, x))
        out.append(((rec + 1) * 127.5).round().clamp(0, 255))
    rec = torch.cat(out)
    mse = ((rec - img_u8.float()) ** 2).mean((1, 2, 3))
    return float((10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))).mean())


def load_vae(work, device):
    from diffusers import AutoencoderKLQwenImage

    ck = torch.load(Path(work) / "vae_final.pt", map_location="cpu")
    cfg = {k: v for k, v in ck["config"].items() if not k.startswith("_")}
    vae = AutoencoderKLQwenImage(**cfg)
    vae.load_state_dict(ck["vae"])
    return vae.to(device).eval(), ck


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: DiT


RUNS = {
    "edit": dict(variant="edit", te="trained"),
    "plus": dict(variant="plus", te="trained"),
    "edit_frozen_te": dict(variant="edit", te="frozen"),
}


SIGMA_MODES = {  # training σ: P(σ = 1, .9, .75, .5 of the Lightning schedule), then the share of 3u/(1+2u) draws
    "mixed": ((0.25, 0.25, 0.25, 0.25), 0.5),
    "lightning": ((0.25, 0.25, 0.25, 0.25), 0.0),
    "high": ((0.55, 0.15, 0.15, 0.15), 0.25),
}


def parse_task_weights(text):
    """"recolor=2,add=2" -> {"recolor": 2.0, "add": 2.0} (tasks not named weigh 1)."""
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        task, _, w = part.partition("=")
        if task not in TASK_ID or not w:
            raise ValueError(f"--task-weights: {part!r} is not TASK=WEIGHT with TASK one of {list(TASK_ID)}")
        out[task] = float(w)
    return out


_SIGMA_CONST: dict = {}


def sample_sigmas(b, g, device, mode="mixed"):
    probs, spread_share = SIGMA_MODES[mode]
    key = (mode, str(device))
    if key not in _SIGMA_CONST:  # once per device: no host-to-device copy per step
        _SIGMA_CONST[key] = (torch.tensor(pm.LIGHTNING_SIGMAS[:-1], device=device), torch.tensor(probs, device=device))
    lightning, p = _SIGMA_CONST[key]
    pick = lightning[torch.multinomial(p, b, replacement=True, generator=g)]
    u = torch.rand(b, device=device, generator=g)
    spread = 3 * u / (1 + 2 * u)
    return torch.where(torch.rand(b, device=device, generator=g) < spread_share, spread, pick)


def dit_stage(args, device, run):
    spec = RUNS[run]
    plus = spec["variant"] == "plus"
    work = Path(args.work) / f"dit_{run}"
    work.mkdir(parents=True, exist_ok=True)
    final = work / "final.pt"
    if final.exists():
        log(f"{run}: done earlier")
        return
    seed = args.seed + 1000
    tokenizer = pm.build_tokenizer()
    processor = pm.build_processor(tokenizer)
    t0 = time.time()
    pool = generate_pool("train", spec["variant"], args.dit_pool, args.workers)  # before the device is touched
    pm.patch_causal_conv()
    pm.patch_text_encoder_fast(pm.vision_tokens_per_image(processor) * processor.image_processor.merge_size ** 2)
    vae, _ = load_vae(args.work, device)
    vae.requires_grad_(False)
    te = pm.build_text_encoder(tokenizer, args.seed + 2).to(device)
    dit = pm.build_dit(args.seed + 3, zero_cond_t=plus).to(device)
    if args.dit_init and spec["te"] == "frozen":
        log(f"{run}: ignores --dit-init (the ablation's frozen text encoder is the random one)")
    elif args.dit_init:
        folder = snapshot_folder(args.dit_init, plus)
        load_snapshot_weights(folder, te, dit)
        log(f"{run}: DiT and text encoder start from {folder}")
    train_te = spec["te"] == "trained"
    te.requires_grad_(train_te)
    te.train(train_te)
    te.lm_head.requires_grad_(False)
    groups = [{"params": list(dit.parameters()), "lr": args.dit_lr}]
    if train_te:
        groups.append({"params": [p for n, p in te.named_parameters() if p.requires_grad], "lr": args.te_lr})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.0, fused=device.type == "cuda")
    ema_dit = {k: v.detach().clone() for k, v in dit.state_dict().items()}
    ema_te = {k: v.detach().clone() for k, v in te.state_dict().items()}
    steps = args.dit_steps if run != "edit_frozen_te" else int(args.dit_steps * args.ablation_fraction)
    budget = args.dit_time if run != "edit_frozen_te" else args.dit_time * args.ablation_fraction
    step = 0
    ckpt_path = work / "ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device)
        dit.load_state_dict(ck["dit"])
        te.load_state_dict(ck["te"])
        opt.load_state_dict(ck["opt"])
        ema_dit, ema_te = ck["ema_dit"], ck["ema_te"]
        step, steps = ck["step"], ck["steps"]
        log(f"{run}: resumed at step {step}/{steps}")

    pool = to_device(tokenize_pool(pool, tokenizer, processor, plus), device)
    t_cache = time.time()
    batcher = Batcher(pool, tokenizer, processor, vae, plus, device, cache=args.pool_cache)
    batcher.set_task_weights(parse_task_weights(args.task_weights))
    val = val_set(spec["variant"], args.val_size, device)
    val = to_device(tokenize_pool(val, tokenizer, processor, plus), device)
    val_batcher = Batcher(val, tokenizer, processor, vae, plus, device, cache=args.pool_cache)
    if args.pool_cache:
        if device.type == "cuda":
            torch.cuda.synchronize()
        log(f"{run}: pool cache: latents of {len(pool['texts'])} edits ({batcher.cache_bytes() / 2**30:.2f} GiB, "
            f"{batcher.lat_tgt.dtype}) in {time.time() - t_cache:.1f}s")
        # the same batch without the cache (render + VAE + HF processor per batch) must give the same tensors
        for n_cond, grp in batcher.groups.items():
            idx = grp[:16]
            noop = torch.arange(len(idx), device=device) % 4 == 0
            d = check_batch_cache(batcher, Batcher(pool, tokenizer, processor, vae, plus, device, cache=False), idx,
                                  noop)
            log(f"{run}: cache check ({n_cond} source(s)): max/mean |Δ| " +
                ", ".join(f"{k} {a:.2e}/{m:.2e}" for k, (a, m) in d.items()))
    log(f"{run}: pool of {len(pool['texts'])} edits, {len(val['texts'])} validation edits in {time.time() - t0:.1f}s")

    logf = open(Path(args.out) / "logs" / f"dit_{run}.csv", "a", newline="")
    writer = csv.writer(logf)
    if step == 0:
        writer.writerow(["step", "time_s", "lr", "loss", "val_loss_s1", "val_loss_s0.9", "val_loss_s0.75",
                         "val_loss_s0.5", "val_success", "val_psnr_outside", "val_psnr"]
                        + [f"val_loss_{part}_s{s:g}" for part in ("in", "out") for s in pm.LIGHTNING_SIGMAS[:-1]])
    sd_dit, sd_te = dit.state_dict(), te.state_dict()
    ema_pairs = ([ema_dit[k] for k, v in sd_dit.items() if v.dtype.is_floating_point]
                 + ([ema_te[k] for k, v in sd_te.items() if v.dtype.is_floating_point] if train_te else []),
                 [v for v in sd_dit.values() if v.dtype.is_floating_point]
                 + ([v for v in sd_te.values() if v.dtype.is_floating_point] if train_te else []))
    t_start = t_20 = time.time()
    while step < steps:
        frac = step / max(1, steps)
        decay = 1.0 if frac < 0.7 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (frac - 0.7) / 0.3))
        warm = min(1.0, (step + 1) / args.warmup)
        for gi, gr in enumerate(opt.param_groups):
            gr["lr"] = (args.dit_lr if gi == 0 else args.te_lr) * decay * warm
        g = torch.Generator(device).manual_seed(seed * 7919 + step)
        n_cond, idx = batcher.draw(args.dit_batch, g)
        noop = torch.rand(args.dit_batch, device=device, generator=g) < NOOP_FRACTION
        bt = batcher.batch(idx, noop, n_src=n_cond)
        loss = dit_loss(dit, te, bt, g, device, train_te, mask_weight=args.mask_weight, sigmas=args.sigmas)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for gr in opt.param_groups for p in gr["params"]], 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_pairs[0], ema_pairs[1], 1 - d)
        if step == 20:
            t_20 = time.time()  # the speed is measured on steps 21-100: the first ones include cuDNN's tuning
        if step == 100 and budget and not args.smoke:
            per = (time.time() - t_20) / 80
            fit = int((budget - (time.time() - t_start)) / per + 100) // 100 * 100
            if fit < steps:
                log(f"{run}: {per * 1000:.0f} ms/step: {steps} steps would take {per * steps:.0f}s > {budget:.0f}s; "
                    f"training {fit} steps")
                steps = max(fit, 300)
        if budget and not args.smoke and time.time() - t_start > 1.15 * budget and step < steps:
            log(f"{run}: over 115 % of its time budget at step {step}: stopping here")
            steps = step
        if step % args.log_every == 0 or step == steps:
            row = [step, f"{time.time() - t_start:.1f}", f"{opt.param_groups[0]['lr']:.2e}", f"{loss.item():.5f}"]
            v = None
            if step % args.val_every == 0 or step == steps:
                try:
                    v = validate(dit, te, ema_dit, ema_te, val, val_batcher, device, plus)
                except Exception as exc:  # noqa: BLE001 - a broken validation must not lose the run
                    log(f"{run}: validation failed: {exc!r}")
                    dit.train()
                    te.train(train_te)
            if v is not None:
                row += [f"{x:.5f}" for x in v["loss"]] + [f"{v['success']:.4f}", f"{v['psnr_outside']:.2f}",
                                                          f"{v['psnr']:.2f}"]
                row += [f"{x:.5f}" for x in v["loss_in"] + v["loss_out"]]
                log(f"{run} {step}/{steps} loss {loss.item():.4f} val loss {' '.join(f'{x:.4f}' for x in v['loss'])}"
                    f" (edited tokens {' '.join(f'{x:.4f}' for x in v['loss_in'])}, others "
                    f"{' '.join(f'{x:.4f}' for x in v['loss_out'])}) success {v['success']:.3f} {v['per_task']} "
                    f"ΔE {v['per_task_delta_e']} psnr_out {v['psnr_outside']:.2f} ({time.time() - t_start:.0f}s)")
            writer.writerow(row)
            logf.flush()
        if step % args.ckpt_every == 0 and step < steps:
            torch.save({"dit": dit.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(), "ema_dit": ema_dit,
                        "ema_te": ema_te, "step": step, "steps": steps}, str(ckpt_path) + ".tmp")
            os.replace(str(ckpt_path) + ".tmp", ckpt_path)
    torch.save({"ema_dit": ema_dit, "ema_te": ema_te, "dit_config": dict(dit.config), "steps": step,
                "train_s": time.time() - t_start, "te": spec["te"]}, final)
    log(f"{run}: finished {step} steps in {time.time() - t_start:.0f}s")
    logf.close()


def dit_loss(dit, te, bt, g, device, train_te, mask_weight=0.0, sigmas="mixed"):
    """Flow-matching loss of a batch: MSE of the velocity, each packed token weighted 1 + `mask_weight` where the
    edit changes its pixels (`bt["edited"]`), normalized by the batch's total weight (0: the plain MSE)."""
    b = bt["x0"].shape[0]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        with torch.set_grad_enabled(train_te and torch.is_grad_enabled()):
            emb, mask = pm.encode_prompts_fast(te, bt["ids"], bt["attn"], bt["pix"], bt["grid"])
        sigma = sample_sigmas(b, g, device, sigmas)
        eps = torch.randn(bt["x0"].shape, device=device, generator=g)
        s = sigma.view(b, 1, 1)
        xt = (1 - s) * bt["x0"] + s * eps
        shapes = pm.img_shapes_for(bt["n_cond"], 16, 16, b)
        n = xt.shape[1]
        v = dit(hidden_states=torch.cat([xt, bt["cond"]], 1), timestep=sigma, encoder_hidden_states=emb,
                encoder_hidden_states_mask=mask, img_shapes=shapes, return_dict=False)[0][:, :n]
    err = (v.float() - (eps - bt["x0"])).pow(2).mean(-1)  # [b, tokens]
    if not mask_weight:
        return err.mean()
    w = 1.0 + mask_weight * bt["edited"]
    return (w * err).sum() / w.sum()


@torch.no_grad()
def validate(dit, te, ema_dit, ema_te, val, batcher, device, plus, batch=128):
    """Loss at the 4 Lightning σ (fixed noise, current weights), overall and split into the tokens the edit changes
    (`loss_in`, per task too) and the others (`loss_out`); 4-step edit success (EMA weights), per task with the mean
    core colour error ΔE."""
    import copy

    dit.eval()
    te_mode = te.training
    te.eval()
    errs, scores = [], []
    ema_model = copy.deepcopy(dit)
    ema_model.load_state_dict(ema_dit)
    ema_te_model = copy.deepcopy(te)
    ema_te_model.load_state_dict(ema_te)
    for n_cond, grp in batcher.groups.items():
        for i in range(0, len(grp), batch):
            idx = grp[i:i + batch]
            bt = batcher.batch(idx, torch.zeros(len(idx), dtype=torch.bool, device=device), need_tgt=True)
            g = torch.Generator(device).manual_seed(12345 + i)
            eps = torch.randn(bt["x0"].shape, device=device, generator=g)
            b = len(idx)
            err = []
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                emb, mask = pm.encode_prompts_fast(te, bt["ids"], bt["attn"], bt["pix"], bt["grid"])
                shapes = pm.img_shapes_for(n_cond, 16, 16, b)
                for s in pm.LIGHTNING_SIGMAS[:-1]:
                    xt = (1 - s) * bt["x0"] + s * eps
                    sig = torch.full((b,), s, device=device)
                    v = dit(hidden_states=torch.cat([xt, bt["cond"]], 1), timestep=sig, encoder_hidden_states=emb,
                            encoder_hidden_states_mask=mask, img_shapes=shapes, return_dict=False)[0][:, :xt.shape[1]]
                    err.append((v.float() - (eps - bt["x0"])).pow(2).mean(-1))  # [b, tokens]
            errs.append((torch.stack(err, 1), bt["edited"]))  # [b, 4, tokens], [b, tokens]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                emb, mask = pm.encode_prompts_fast(ema_te_model, bt["ids"], bt["attn"], bt["pix"], bt["grid"])
                lat = pm.sample(ema_model, bt["cond"], n_cond, emb.float(), mask, eps)
                img = decode_u8(batcher.vae, lat.float())
            sc = score_t(img, bt["tgt"], val["mask"][idx])
            sc["task"] = val["task"][idx]
            scores.append(sc)
    dit.train()
    te.train(te_mode)
    cat = {k: torch.cat([s[k] for s in scores]) for k in scores[0]}
    err = torch.cat([e for e, _ in errs])
    edited = torch.cat([m for _, m in errs])[:, None]

    def masked_mean(w, sel=slice(None)):  # [4]: mean error over the tokens weighted by w (rows sel)
        return ((err[sel] * w[sel]).sum((0, 2)) / w[sel].sum((0, 2)).clamp_min(1)).tolist()

    per_task, per_task_de, per_task_loss_in = {}, {}, {}
    for t, i in TASK_ID.items():
        sel = cat["task"] == i
        if sel.any():
            per_task[t] = round(float(cat["success"][sel].mean()), 3)
            per_task_de[t] = round(float(cat["delta_e"][sel].mean()), 1)
            per_task_loss_in[t] = [round(x, 4) for x in masked_mean(edited, sel)]
    return {"loss": err.mean((0, 2)).tolist(), "loss_in": masked_mean(edited), "loss_out": masked_mean(1 - edited),
            "success": float(cat["success"].mean()), "psnr_outside": float(cat["psnr_outside"].mean()),
            "psnr": float(cat["psnr"].mean()), "per_task": per_task, "per_task_delta_e": per_task_de,
            "per_task_loss_in": per_task_loss_in}


def snapshot_folder(root, plus):
    """The Edit or Edit-Plus snapshot under `root` (a train.py --out folder, or the snapshot folder itself)."""
    root = Path(root)
    if (root / "model_index.json").exists():
        return root
    return root / ("qwen-image-edit-plus-proxy" if plus else "qwen-image-edit-proxy")


def load_snapshot_weights(folder, te, dit):
    """Loads a written snapshot's text encoder and DiT weights (bf16 on disk) into this script's models."""
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    device = next(dit.parameters()).device
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(Path(folder) / "text_encoder", dtype=torch.float32)
    te.load_state_dict(ref.state_dict())
    ref = QwenImageTransformer2DModel.from_pretrained(Path(folder) / "transformer").float()
    if ref.config.zero_cond_t != dit.config.zero_cond_t:
        raise ValueError(f"{folder}: zero_cond_t {ref.config.zero_cond_t}, this run needs {dit.config.zero_cond_t}")
    dit.load_state_dict(ref.state_dict())
    te.to(device)
    dit.to(device)


def decode_u8(vae, packed, hw=(16, 16)):
    mean, std = pm.latent_stats(vae, packed.device)
    z = pm.unpack(packed, *hw) * std + mean
    img = pm.vae_decode(vae, z.to(next(vae.parameters()).dtype))
    return ((img.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: export


def export_stage(args, device):
    out = Path(args.out)
    tokenizer = pm.build_tokenizer()
    processor = pm.build_processor(tokenizer)
    summary = {"card": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "torch": torch.__version__}
    import diffusers
    import transformers

    summary.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    vae, vck = load_vae(args.work, "cpu")
    summary["vae"] = {"steps": vck["steps"], "train_s": round(vck["train_s"], 1), "val_psnr": round(vck["val_psnr"], 2)}
    for run in RUNS:
        final = Path(args.work) / f"dit_{run}" / "final.pt"
        if not final.exists():
            continue
        ck = torch.load(final, map_location="cpu")
        plus = RUNS[run]["variant"] == "plus"
        dit = pm.build_dit(0, zero_cond_t=plus)
        dit.load_state_dict(ck["ema_dit"])
        te = pm.build_text_encoder(tokenizer, args.seed + 2)
        te.load_state_dict(ck["ema_te"])
        summary[run] = {"steps": ck["steps"], "train_s": round(ck["train_s"], 1), "text_encoder": ck["te"]}
        if run == "edit_frozen_te":
            continue
        name = "qwen-image-edit-plus-proxy" if plus else "qwen-image-edit-proxy"
        folder = out / name
        pm.save_snapshot(folder, plus, vae, dit, te, tokenizer, processor)
        raw, gz = pm.file_sizes(folder)
        summary[run].update(snapshot=name, size_bytes=raw, size_tar_gz_bytes=gz)
        log(f"export: {name}: {raw / 1e6:.2f} MB ({gz / 1e6:.2f} MB as .tar.gz)")
    (out / "logs" / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def snapshot_val(args, device, summary):
    """Validation success of the written (bf16) snapshots with this script's batched sampler, and a check that the
    diffusers pipeline on the snapshot reproduces that sampler on two edits."""
    out = Path(args.out)
    pm.patch_causal_conv()
    for run, name in (("edit", "qwen-image-edit-proxy"), ("plus", "qwen-image-edit-plus-proxy")):
        folder = out / name
        if not folder.exists():
            continue
        plus = run == "plus"
        pipe = pm.load_pipeline(folder)
        processor = pipe.processor
        tokenizer = processor.tokenizer
        pm.patch_text_encoder_fast(pm.vision_tokens_per_image(processor) * 4)
        vae, te, dit = pipe.vae.to(device), pipe.text_encoder.to(device).eval(), pipe.transformer.to(device).eval()
        val = val_set("plus" if plus else "edit", args.val_size, device)
        val = to_device(tokenize_pool(val, tokenizer, processor, plus), device)
        batcher = Batcher(val, tokenizer, processor, vae, plus, device, cache=getattr(args, "pool_cache", True))
        v = validate(dit, te, dit.state_dict(), te.state_dict(), val, batcher, device, plus)
        summary[run]["snapshot_val"] = {k: v[k] for k in ("success", "psnr_outside", "psnr", "per_task")}
        log(f"snapshot {name}: val success {v['success']:.3f} {v['per_task']} psnr_out {v['psnr_outside']:.2f}")
        summary[run]["pipeline_check"] = pipeline_check(folder, plus)
        pipe.to("cpu")
    (out / "logs" / "summary.json").write_text(json.dumps(summary, indent=1))


def write_snapshot_readmes(args, summary):
    """README.md in each snapshot folder: how it was made, what it can do, how to run it."""
    out = Path(args.out)
    for run, name in (("edit", "qwen-image-edit-proxy"), ("plus", "qwen-image-edit-plus-proxy")):
        folder = out / name
        if not folder.exists() or run not in summary:
            continue
        plus = run == "plus"
        info, vae = summary[run], summary.get("vae", {})
        val = info.get("snapshot_val", {})
        lines = [
            f"# {name}: a trained proxy of Qwen-Image-{'Edit-Plus (2509/2511 layout, zero_cond_t)' if plus else 'Edit'}",
            "",
            "A small model of exactly the Qwen-Image-Edit architecture (diffusers "
            f"`{'QwenImageEditPlusPipeline' if plus else 'QwenImageEditPipeline'}`: Qwen2.5-VL text encoder with "
            "vision tower, Wan-style VAE, MMDiT with condition-image tokens, Lightning scheduler), trained on "
            "generated 128×128 scenes of coloured shapes whose edits have a known right answer. Made by "
            "`tools/proxy/train.py` (issue 11); weights bf16.",
            "",
            "## How to run it",
            "",
            "- 128×128 images; **VAE / output area 128² (16384)**"
            + (", **condition (vision-language) area 128² (16384)**" if plus else "")
            + "; 4 steps with the snapshot's scheduler (Lightning: σ 1, 0.9, 0.75, 0.5); CFG off (true CFG with "
            "negative prompt \" \" works: the model learnt that \" \" means \"change nothing\").",
            "- Text-encoder positions **sequential** (what diffusers computes with transformers 5): "
            "`qwen-edit --text-positions sequential`.",
            "- diffusers: patch the pipelines' 1024² / 384² areas as `tools/proxy/proxy_model.py` `patch_areas` does.",
            "",
            "## What it can do",
            "",
            "Instructions like the templates of `tools/proxy/scenes.py`: recolour (\"Make the red circle blue.\"), "
            "remove (\"Delete the green disc.\"), add at a named place and size (\"Add a small green square at the "
            "top left.\"), change a plain background (\"Change the background to navy.\")"
            + (", and with two pictures paste (\"Put the red circle of picture 1 in picture 2.\")" if plus else "")
            + ". Shapes: circle/disc, square, triangle, diamond/rhombus; colours red, orange, yellow, green, "
            "cyan/turquoise, blue, purple/violet, pink; backgrounds white, black, gray/grey, beige, navy, brown. "
            "Anything else (photos, other words, other sizes) is out of its world: expect a copy of the input or a "
            "smudge.",
            "",
            "## How it was made",
            "",
            f"- Card: {summary.get('card')}; torch {summary.get('torch')}, diffusers {summary.get('diffusers')}, "
            f"transformers {summary.get('transformers')}.",
            f"- VAE: {vae.get('steps')} steps in {vae.get('train_s')} s; validation reconstruction PSNR "
            f"{vae.get('val_psnr')} dB.",
            f"- DiT + text encoder ({info.get('text_encoder')}): {info.get('steps')} steps in {info.get('train_s')} s.",
            f"- Validation ({getattr(args, 'val_size', 160)} edits, 4 steps, bf16 weights): success {val.get('success')}, per task "
            f"{val.get('per_task')}, PSNR outside the mask {val.get('psnr_outside')} dB.",
            f"- Size: {info.get('size_bytes')} bytes ({info.get('size_tar_gz_bytes')} as .tar.gz).",
            f"- Command: `{' '.join(sys.argv)}` (see tools/proxy/gpu_run.sh); held-out results: docs/quality.md.",
        ]
        (folder / "README.md").write_text("\n".join(lines) + "\n")


def pipeline_check(folder, plus):
    """diffusers' pipeline (f32, CPU) vs this script's batched sampler on the same noise: max |Δ| of final latents."""
    from PIL import Image

    pm.patch_areas()
    pipe = pm.load_pipeline(folder)
    tokenizer, processor = pipe.processor.tokenizer, pipe.processor
    res = []
    for i, task in enumerate(["paste" if plus else "recolor", "add"]):
        e = scenes.make_edit("val", "plus" if plus else "edit", 900 + i, task)
        srcs, _, _ = scenes.edit_images(e)
        g = torch.Generator().manual_seed(7 + i)
        noise = torch.randn(1, 64, 64, generator=g)
        captured = {}

        def grab(p, step, t, kw):
            captured["latents"] = kw["latents"].clone()
            return {}

        images = [Image.fromarray(s) for s in srcs]
        pipe(image=images if plus else images[0], prompt=e["instruction"], negative_prompt=None, true_cfg_scale=1.0,
             num_inference_steps=4, latents=noise.clone(), output_type="np", callback_on_step_end=grab,
             callback_on_step_end_tensor_inputs=["latents"])
        with torch.no_grad():
            imgs = torch.stack([torch.from_numpy(s).permute(2, 0, 1) for s in srcs])
            cond = pm.encode_latents(pipe.vae, imgs).reshape(1, -1, 64)
            ids = torch.tensor([pm.token_ids(tokenizer, processor, e["instruction"], len(srcs), plus)])
            pix, grid = pm.pixel_values(processor, imgs)
            emb, mask = pm.encode_prompts(pipe.text_encoder, ids, torch.ones_like(ids), pix, grid)
            lat = pm.sample(pipe.transformer, cond, len(srcs), emb, None, noise.clone())
        d = (lat - captured["latents"]).abs().max().item()
        res.append(d)
        log(f"pipeline check {folder.name} [{e['instruction']}]: max |latents diff| {d:.2e} "
            f"(latents std {lat.std().item():.3f})")
    assert max(res) < 1e-3, f"training sampler and diffusers pipeline disagree: {res}"
    return res


# ---------------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="checkpoints and intermediate files (resumable)")
    ap.add_argument("--out", required=True, help="snapshots and logs")
    ap.add_argument("--stage", default="all", choices=["all", "vae", "dit", "export"])
    ap.add_argument("--run", choices=list(RUNS), help="with --stage dit: the run")
    ap.add_argument("--runs", default="edit,plus,edit_frozen_te", help="with --stage all: the DiT runs")
    ap.add_argument("--smoke", action="store_true", help="a few steps of everything, small pools")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    ap.add_argument("--vae-steps", type=int, default=6000)
    ap.add_argument("--vae-time", type=float, default=0, help="seconds; fewer steps if they would not fit")
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=1e-4)
    ap.add_argument("--vae-kl", type=float, default=1e-5, help="weight of mean(z²)")
    ap.add_argument("--vae-pool", type=int, default=20000)
    ap.add_argument("--vae-val-size", type=int, default=256)
    ap.add_argument("--vae-anchor", type=float, default=1.0, help="weight of the block-mean anchor of latents 0-2")
    ap.add_argument("--dit-steps", type=int, default=12000)
    ap.add_argument("--dit-time", type=float, default=0, help="seconds; fewer steps if they would not fit")
    ap.add_argument("--dit-batch", type=int, default=256)
    ap.add_argument("--dit-lr", type=float, default=5e-4)
    ap.add_argument("--te-lr", type=float, default=3e-4)
    ap.add_argument("--mask-weight", type=float, default=3.0,
                    help="DiT loss weight 1 + W on the latent tokens the edit changes (0: plain MSE, the v1 recipe)")
    ap.add_argument("--task-weights", default="", help="training edits drawn ∝ these weights per task, e.g. "
                    "recolor=2,add=2 (tasks not named: 1; empty: uniform over the pool)")
    ap.add_argument("--sigmas", default="mixed", choices=list(SIGMA_MODES), help="training σ distribution")
    ap.add_argument("--dit-init", default="", help="start the DiTs and text encoders from the snapshots in this "
                    "folder (a train.py --out, e.g. the previous call's) instead of random weights")
    ap.add_argument("--dit-pool", type=int, default=80000)
    ap.add_argument("--no-pool-cache", dest="pool_cache", action="store_false",
                    help="render, VAE-encode and run the HF image processor per batch (the old path, for comparison) "
                         "instead of caching the pool's latents once")
    ap.add_argument("--ablation-fraction", type=float, default=0.4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--val-size", type=int, default=160)
    ap.add_argument("--val-every", type=int, default=1000)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=1000)
    args = ap.parse_args()
    if args.smoke:
        args.vae_steps, args.vae_pool, args.vae_batch = 30, 400, 8
        args.dit_steps, args.dit_pool, args.dit_batch = 30, 160, 8  # (the pool cache encodes every pool image once)
        args.val_size, args.val_every, args.log_every, args.ckpt_every = 16, 20, 10, 20
        args.warmup, args.ablation_fraction = 10, 0.5
    device = torch.device(args.device)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "logs").mkdir(parents=True, exist_ok=True)
    (Path(args.work) / "args.json").write_text(json.dumps(vars(args), indent=1))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    if args.stage == "vae":
        vae_stage(args, device, None)
    elif args.stage == "dit":
        torch.set_num_threads(max(1, args.workers))
        dit_stage(args, device, args.run)
    elif args.stage == "export":
        summary = export_stage(args, device)
        snapshot_val(args, device, summary)
        write_snapshot_readmes(args, summary)
    else:
        t0 = time.time()
        vae_stage(args, device, None)
        t1 = time.time()
        procs = []
        forward = [a for a in sys.argv[1:] if a not in ("--stage", "all")]
        runs = args.runs.split(",")
        for run in runs:
            # CPU share per run: worker processes and torch's threads (three runs on 16 cores with the defaults spent
            # 150 s of every run's 160 s set-up oversubscribed).
            cmd = [sys.executable, __file__, *forward, "--stage", "dit", "--run", run,
                   "--workers", str(max(1, args.workers // len(runs)))]
            lf = open(Path(args.out) / "logs" / f"dit_{run}.log", "a")
            procs.append((run, subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT), lf))
            log(f"started {run}")
        failed = []
        for run, p, lf in procs:
            if p.wait() != 0:
                failed.append(run)
            lf.close()
            log(f"{run} exited with {p.returncode}; its log: {Path(args.out) / 'logs' / f'dit_{run}.log'}")
        t2 = time.time()
        summary = export_stage(args, device)
        summary["wall_s"] = {"vae": round(t1 - t0, 1), "dit": round(t2 - t1, 1)}
        try:
            snapshot_val(args, device, summary)
        except Exception as exc:  # noqa: BLE001 - the snapshots are written; the checks can be rerun
            import traceback

            traceback.print_exc()
            log(f"snapshot checks failed: {exc!r}")
        summary["wall_s"]["total"] = round(time.time() - t0, 1)
        write_snapshot_readmes(args, summary)
        (Path(args.out) / "logs" / "summary.json").write_text(json.dumps(summary, indent=1))
        log(f"all done in {time.time() - t0:.0f}s; failed runs: {failed or 'none'}")
        if failed:
            sys.exit(1)


if __name__ == "__main__":
    main()
