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
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_model as pm  # noqa: E402
import scenes  # noqa: E402
from train_data import Batcher, log, to_device, tokenize_pool, val_set  # noqa: E402
from train_dit import RUNS, SIGMA_MODES, dit_stage, validate  # noqa: E402
from train_vae import load_vae, vae_stage  # noqa: E402


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
    summary["vae"] = {"steps": vck["steps"], "train_s": round(vck["train_s"], 1), "val_psnr": round(vck["val_psnr"], 2),
                      "val_psnr_objects": round(vck.get("val_psnr_objects", float("nan")), 2),
                      "ceiling": vck.get("ceiling"), "init": vck.get("init")}
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
        summary[run] = {"steps": ck["steps"], "train_s": round(ck["train_s"], 1), "text_encoder": ck["te"],
                        "init": ck.get("init")}
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
        if not folder.exists() or "snapshot" not in summary.get(run, {}):
            continue  # not exported by this call (an earlier call's snapshot beside it)
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
            f"- VAE: {vae.get('steps')} steps in {vae.get('train_s')} s"
            + (f" (taken from {vae['init']})" if vae.get("init") else "")
            + f"; validation reconstruction PSNR {vae.get('val_psnr')} dB ({vae.get('val_psnr_objects')} dB on the "
            f"objects); success of the validation targets after a VAE round trip (the most the DiT can reach): "
            f"{vae.get('ceiling')}.",
            f"- DiT + text encoder ({info.get('text_encoder')}): {info.get('steps')} steps in {info.get('train_s')} s"
            + (f", starting from {info['init']}" if info.get("init") else ", from random weights") + ".",
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
    ap.add_argument("--vae-object-weight", type=float, default=3.0,
                    help="VAE loss weight 1 + W on the pixels of objects (0: the v1/v2 VAE's plain loss)")
    ap.add_argument("--vae-init", default="", help="take the VAE of the snapshot in this folder (a train.py --out, "
                    "e.g. the previous call's) instead of training one")
    ap.add_argument("--stop-by", type=float, default=0, help="a Unix time: the VAE and DiT loops stop there (their "
                    "results are written and exported as usual), so a device call with a hard limit keeps its output")
    ap.add_argument("--dit-steps", type=int, default=12000)
    ap.add_argument("--dit-time", type=float, default=0, help="seconds; fewer steps if they would not fit")
    ap.add_argument("--dit-batch", type=int, default=512)
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
