"""Stage 1 of train.py: the VAE (`AutoencoderKLQwenImage`, VAE_CONFIG in proxy_model.py) as a deterministic
autoencoder on rendered scenes."""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_model as pm  # noqa: E402
import scenes  # noqa: E402
from train_data import (  # noqa: E402
    TASK_ID, fitted_steps, generate_pool, log, render_u8, score_t, time_left, val_set,
)


def vae_stage(args, device, tokenizer):
    work = Path(args.work)
    final = work / "vae_final.pt"
    if final.exists():
        log("vae: done earlier")
        return
    if args.vae_init:
        vae_from_snapshot(args, device, final)
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
    val_img, val_obj = val_sources(val, device)
    log(f"vae: {len(obj)} scenes in {time.time() - t0:.1f}s")
    logf = open(Path(args.out) / "logs" / "vae.csv", "a", newline="")
    writer = csv.writer(logf)
    if step == 0:
        writer.writerow(["step", "time_s", "lr", "loss", "mse", "kl", "val_psnr", "anchor", "val_psnr_objects"])
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
        img, shares = scenes.render(obj[idx], bg[idx], weights=True)
        x = pm.images_to_vae_input(img.to(torch.uint8))
        # per-pixel loss weight 1 + W on the objects (their coverage, dilated by 2 px to take in their edges)
        w = 1.0 + args.vae_object_weight * F.max_pool2d(1.0 - shares[:, -1:].float(), 5, 1, 2)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            # A deterministic autoencoder on the posterior mean (the pipeline only ever uses the mode): sampling
            # with the initial unit variance drowns the latents in noise and nothing is learnt.
            mean = pm.vae_encode_mean(vae, x)
            rec = vae.decoder(vae.post_quant_conv(mean))[:, :, 0]
        rec = rec.float()
        mse = (w * (rec - x) ** 2).mean() / w.mean()
        l1 = (w * (rec - x).abs()).mean() / w.mean()
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
        if args.stop_by and time.time() > args.stop_by and step < steps:
            log(f"vae: --stop-by reached at step {step}: stopping here")
            steps = step
        if step == 50:
            t_50 = time.time()
        if step == 150 and (args.vae_time or args.stop_by) and not args.smoke:
            # the speed of steps 50-150: the first steps also pay for cuDNN's algorithm search (run 2 fitted 1600
            # steps from a 265 ms/step start, then ran at ~100 ms/step and used 163 of its 430 s)
            per = (time.time() - t_50) / 100
            steps = fitted_steps("vae", steps, step, per, time_left(args.vae_time, t_start, args.stop_by), floor=200)
        if step % args.log_every == 0 or step == steps:
            vp = vo = ""
            if step % (args.log_every * 5) == 0 or step == steps:
                vp, vo = vae_psnr(vae, val_img, val_obj)
                vp, vo = f"{vp:.2f}", f"{vo:.2f}"
                vae.train()
            writer.writerow([step, f"{time.time() - t_start:.1f}", f"{lr:.2e}", f"{loss.item():.5f}",
                             f"{mse.item():.6f}", f"{kl.item():.3f}", vp, f"{anchor.item():.5f}", vo if vp else ""])
            logf.flush()
            if vp:
                log(f"vae {step}/{steps} loss {loss.item():.5f} mse {mse.item():.6f} val psnr {vp} dB, on the "
                    f"objects {vo} dB ({time.time() - clock:.0f}s)")
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
    psnr, psnr_obj = vae_psnr(vae, val_img, val_obj)
    train_s = time.time() - t_start
    ceiling = vae_ceiling(vae, val)
    log(f"vae: final val PSNR {psnr:.2f} dB (objects {psnr_obj:.2f} dB) after {step} steps, {train_s:.0f}s; "
        f"ceiling (targets after a VAE round trip, success rule) "
        + ", ".join(f"{t} {100 * r:.1f} %" for t, r in ceiling.items()))
    torch.save({"vae": vae.state_dict(), "config": dict(vae.config), "steps": step, "val_psnr": psnr,
                "val_psnr_objects": psnr_obj, "ceiling": ceiling, "train_s": train_s}, final)
    logf.close()


def val_sources(val, device):
    """The validation edits' first source images (uint8 [B, 3, H, W]) and their object pixels ([B, 1, H, W] bool:
    the pixels an object covers at least half of)."""
    obj, bg = torch.from_numpy(val["src_obj"][:, 0]).to(device), torch.from_numpy(val["src_bg"][:, 0]).to(device)
    img, shares = scenes.render(obj, bg, weights=True)
    return img.to(torch.uint8), shares[:, -1:] < 0.5


def vae_from_snapshot(args, device, final):
    """`--vae-init`: the VAE of a written snapshot (a train.py --out folder or a snapshot folder: the previous call's
    output) becomes this run's VAE stage result, measured as a trained one is, instead of training a new one."""
    from diffusers import AutoencoderKLQwenImage

    folder = Path(args.vae_init)
    if not (folder / "vae").is_dir():
        folder = folder / "qwen-image-edit-proxy"
    pm.patch_causal_conv()
    vae = AutoencoderKLQwenImage.from_pretrained(folder / "vae").float().to(device)
    val = val_set("edit", 32 if args.smoke else args.vae_val_size, device)
    psnr, psnr_obj = vae_psnr(vae, *val_sources(val, device))
    ceiling = vae_ceiling(vae, val)
    log(f"vae: from {folder / 'vae'}: val PSNR {psnr:.2f} dB (objects {psnr_obj:.2f} dB); ceiling "
        + ", ".join(f"{t} {100 * r:.1f} %" for t, r in ceiling.items()))
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}  # `_name_or_path` is a Path: not
    # loadable by torch.load's weights_only default
    torch.save({"vae": vae.state_dict(), "config": config, "steps": 0, "val_psnr": psnr,
                "val_psnr_objects": psnr_obj, "ceiling": ceiling, "train_s": 0.0, "init": str(folder)}, final)


@torch.no_grad()
def round_trip(vae, img_u8):
    """uint8 [B, 3, H, W] images encoded (posterior mean) and decoded, as the pipeline's uint8 output."""
    vae.eval()
    out = []
    for i in range(0, len(img_u8), 128):
        x = pm.images_to_vae_input(img_u8[i:i + 128])
        rec = pm.vae_decode(vae, pm.vae_encode_mean(vae, x))
        out.append(((rec + 1) * 127.5).round().clamp(0, 255))
    return torch.cat(out).to(torch.uint8)


def vae_psnr(vae, img_u8, objects):
    """Mean PSNR of the round trip over whole images and over the `objects` pixels (dB)."""
    err = (round_trip(vae, img_u8).float() - img_u8.float()) ** 2
    sel = objects.expand_as(err).float()
    mse = err.mean((1, 2, 3))
    mse_obj = (err * sel).sum((1, 2, 3)) / sel.sum((1, 2, 3)).clamp_min(1)
    psnr = lambda m: float((10 * torch.log10(255.0 ** 2 / m.clamp_min(1e-10))).mean())  # noqa: E731
    return psnr(mse), psnr(mse_obj)


def vae_ceiling(vae, val):
    """Per task (and "all"), the success rate of the validation targets themselves after a VAE round trip: what a
    DiT that predicted the target's latents exactly would score under the success rule, so the most any DiT on this
    VAE can reach (the v2 snapshots' VAE allowed 79.7 % on the held-out Edit set: background 35 %)."""
    device = next(vae.parameters()).device
    tgt = render_u8(torch.from_numpy(val["tgt_obj"]).to(device), torch.from_numpy(val["tgt_bg"]).to(device))
    ok = score_t(round_trip(vae, tgt), tgt, torch.from_numpy(val["mask"]).to(device))["success"].cpu()
    tasks = torch.from_numpy(val["task"])
    out = {name: float(ok[tasks == i].mean()) for name, i in TASK_ID.items() if (tasks == i).any()}
    out["all"] = float(ok.mean())
    return out


def load_vae(work, device):
    from diffusers import AutoencoderKLQwenImage

    ck = torch.load(Path(work) / "vae_final.pt", map_location="cpu")
    cfg = {k: v for k, v in ck["config"].items() if not k.startswith("_")}
    vae = AutoencoderKLQwenImage(**cfg)
    vae.load_state_dict(ck["vae"])
    return vae.to(device).eval(), ck
