"""Stage 2 of train.py: the DiTs (Edit, Edit-Plus, the frozen-text-encoder ablation) by flow matching on the VAE's
latents, validated with the 4-step Lightning sampler."""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_model as pm  # noqa: E402
from train_data import (  # noqa: E402
    NOOP_FRACTION, TASK_ID, Batcher, check_batch_cache, fitted_steps, generate_pool, log, score_t, time_left,
    to_device, tokenize_pool, val_set,
)
from train_vae import load_vae  # noqa: E402


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
    init = None
    if args.dit_init and spec["te"] != "frozen":
        init = snapshot_folder(args.dit_init, plus)
        load_snapshot_weights(init, te, dit)
        log(f"{run}: DiT and text encoder start from {init}")
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
        if step == 100 and (budget or args.stop_by) and not args.smoke:
            per = (time.time() - t_20) / 80
            steps = fitted_steps(run, steps, step, per, time_left(budget, t_start, args.stop_by), floor=300)
        if budget and not args.smoke and time.time() - t_start > 1.15 * budget and step < steps:
            log(f"{run}: over 115 % of its time budget at step {step}: stopping here")
            steps = step
        if args.stop_by and time.time() > args.stop_by and step < steps:
            log(f"{run}: --stop-by reached at step {step}: stopping here (the export still runs)")
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
                "train_s": time.time() - t_start, "te": spec["te"], "init": str(init) if init else None}, final)
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
    """The Edit or Edit-Plus snapshot under `root` (a train.py --out folder, or the snapshot folder itself). For
    Edit-Plus, the Edit snapshot when `root` has no Edit-Plus one: the two DiTs have the same weights (`zero_cond_t`
    only changes the timestep the condition tokens are modulated with), so a trained Edit DiT starts the Edit-Plus
    run with copying, recolouring and the rest already learnt."""
    root = Path(root)
    if (root / "model_index.json").exists():
        return root
    if plus and (root / "qwen-image-edit-plus-proxy").is_dir():
        return root / "qwen-image-edit-plus-proxy"
    return root / "qwen-image-edit-proxy"


def load_snapshot_weights(folder, te, dit):
    """Loads a written snapshot's text encoder and DiT weights (bf16 on disk) into this script's models (an Edit DiT
    into an Edit-Plus run too: see `snapshot_folder`)."""
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    device = next(dit.parameters()).device
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(Path(folder) / "text_encoder", dtype=torch.float32)
    te.load_state_dict(ref.state_dict())
    ref = QwenImageTransformer2DModel.from_pretrained(Path(folder) / "transformer").float()
    if ref.config.zero_cond_t and not dit.config.zero_cond_t:
        raise ValueError(f"{folder}: an Edit-Plus DiT (zero_cond_t) cannot start an Edit run")
    dit.load_state_dict(ref.state_dict())
    te.to(device)
    dit.to(device)


def decode_u8(vae, packed, hw=(16, 16)):
    mean, std = pm.latent_stats(vae, packed.device)
    z = pm.unpack(packed, *hw) * std + mean
    img = pm.vae_decode(vae, z.to(next(vae.parameters()).dtype))
    return ((img.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
