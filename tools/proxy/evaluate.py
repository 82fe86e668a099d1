"""Evaluates the proxy snapshots on the held-out set with diffusers' pipelines (4 Lightning steps) and reports, per
variant and task: edit success (docs/quality.md), PSNR / SSIM vs the ground truth on the whole image, PSNR inside
and outside the object mask, the core colour error, the VAE's reconstruction PSNR on the held-out sources, and the
VAE's ceiling: the success rate of the ground truth itself after a VAE round trip (the most a DiT can reach).

    python3 tools/proxy/evaluate.py                       # both snapshots, every held-out edit, diffusers pipeline
    python3 tools/proxy/evaluate.py --fast                # the same edits through the batched sampler of train.py
    python3 tools/proxy/evaluate.py --limit 24 --save /tmp/proxy_eval   # a subset, writing the outputs and a grid

Noise: edit number i of the manifest (0-based line) uses `torch.Generator().manual_seed(i)` in the pipeline (noise
[1, 1, 16, h, w] from torch's CPU generator, then packed). `--fast` reproduces the same noise and the pipeline's
arithmetic in batches (train.py's `pipeline_check` asserts the two agree to ~1e-6 on the final latents).
Results: JSON (`--json`, default tests/fixtures/proxy/eval_baseline.json) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_model as pm  # noqa: E402
import scenes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOTS = {"edit": ROOT / "crates/qwen-image-proxy/snapshots/qwen-image-edit-proxy",
             "plus": ROOT / "crates/qwen-image-proxy/snapshots/qwen-image-edit-plus-proxy"}


def ssim(a, b):
    """scikit-image SSIM with the settings of the Rust metrics (Gaussian window σ 1.5, population covariance)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                       data_range=255, channel_axis=-1))


def load_manifest(folder: Path):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines() if line.strip()]


def read(folder, rel):
    return np.asarray(Image.open(folder / rel).convert("RGB") if not rel.endswith("_mask.png")
                      else Image.open(folder / rel))


def noise_for(seed, lat_hw=(16, 16), z=16):
    g = torch.Generator().manual_seed(seed)
    n = torch.randn((1, 1, z, *lat_hw), generator=g)
    return pm.pack(n.view(1, z, 1, *lat_hw))


def run_pipeline(pipe, images, prompt, seed, cfg, negative):
    plus = type(pipe).__name__ == "QwenImageEditPlusPipeline"
    out = pipe(image=images if plus else images[0], prompt=prompt, negative_prompt=negative, true_cfg_scale=cfg,
               num_inference_steps=4, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    return (out.astype(np.float32) * 255).round().astype(np.uint8)


@torch.no_grad()
def run_fast(pipe, batch, cfg, negative):
    """The pipeline's computation for a batch of edits with the same number of input images."""
    plus = type(pipe).__name__ == "QwenImageEditPlusPipeline"
    tok, proc = pipe.processor.tokenizer, pipe.processor
    n_img = len(batch[0]["images"])
    imgs = torch.stack([torch.from_numpy(im).permute(2, 0, 1) for e in batch for im in e["images"]])
    b = len(batch)
    lat = pm.encode_latents(pipe.vae, imgs)  # [b*n, 64, 64] in sample-major order
    cond = lat.view(b, n_img * lat.shape[1], lat.shape[2])
    pix, grid = pm.pixel_values(proc, imgs)

    def embeds(prompts):
        ids = pm.token_ids_batch(tok, proc, prompts, [n_img] * b, plus)
        t = max(map(len, ids))
        arr = torch.full((b, t), tok.pad_token_id, dtype=torch.long)
        for i, x in enumerate(ids):
            arr[i, : len(x)] = torch.tensor(x)
        attn = (torch.arange(t)[None] < torch.tensor([len(x) for x in ids])[:, None]).long()
        return pm.encode_prompts(pipe.text_encoder, arr, attn, pix, grid)

    emb, mask = embeds([e["instruction"] for e in batch])
    noise = torch.cat([noise_for(e["seed"]) for e in batch])
    if cfg > 1:
        nemb, nmask = embeds([negative] * b)
        x = noise
        shapes = pm.img_shapes_for(n_img, 16, 16, b)
        for i in range(4):
            s, s1 = pm.LIGHTNING_SIGMAS[i], pm.LIGHTNING_SIGMAS[i + 1]
            t = torch.full((b,), s)
            inp = torch.cat([x, cond], 1)
            vc = pipe.transformer(hidden_states=inp, timestep=t, encoder_hidden_states=emb,
                                  encoder_hidden_states_mask=mask, img_shapes=shapes, return_dict=False)[0][:, :64]
            vn = pipe.transformer(hidden_states=inp, timestep=t, encoder_hidden_states=nemb,
                                  encoder_hidden_states_mask=nmask, img_shapes=shapes, return_dict=False)[0][:, :64]
            comb = vn + cfg * (vc - vn)
            v = comb * (vc.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
            x = x + (s1 - s) * v
    else:
        x = pm.sample(pipe.transformer, cond, n_img, emb, mask, noise)
    meanv, std = pm.latent_stats(pipe.vae, x.device)
    img = pm.vae_decode(pipe.vae, pm.unpack(x, 16, 16) * std + meanv)
    return [((im.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1) for im in img]


def to_u8(x):
    """The pipeline's postprocess: (x/2 + 0.5).clamp(0, 1), then (x * 255).round()."""
    return (x.astype(np.float32) * 255).round().astype(np.uint8)


@torch.no_grad()
def vae_round_trip(pipe, images):
    """The images encoded (posterior mean) and decoded by the snapshot's VAE, as the pipeline's uint8 output."""
    out = []
    for i in range(0, len(images), 32):
        t = torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im in images[i:i + 32]])
        rec = pm.vae_decode(pipe.vae, pm.vae_encode_mean(pipe.vae, pm.images_to_vae_input(t)))
        out += list(to_u8(((rec.permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)))
    return out


def vae_ceiling(pipe, heldout, edits):
    """Per task, the success rate of the ground truth after a VAE round trip: what a DiT that predicted the target's
    latents exactly would score, so the most the model can reach under the success rule with this VAE."""
    targets = [read(heldout, e["target"]) for e in edits]
    by_task = defaultdict(list)
    for e, tgt, rec in zip(edits, targets, vae_round_trip(pipe, targets)):
        ok = scenes.score(rec, tgt, read(heldout, e["mask"]), e["core_rgb"])["success"]
        by_task[e["task"]].append(ok)
        by_task["all"].append(ok)
    return {task: float(np.mean(v)) for task, v in by_task.items()}


def summarize(rows):
    keys = ["success", "psnr", "ssim", "psnr_inside", "psnr_outside", "delta_e"]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["variant"], r["task"])].append(r)
        groups[(r["variant"], "all")].append(r)
    out = {}
    for (variant, task), rs in sorted(groups.items()):
        d = {"n": len(rs)}
        for k in keys:
            v = np.array([r[k] for r in rs], np.float64)
            v = v[np.isfinite(v)]
            d[k] = float(v.mean()) if len(v) else float("nan")
        out.setdefault(variant, {})[task] = d
    return out


def table(summary, vae):
    lines = ["| variant | task | n | success | PSNR | SSIM | PSNR inside | PSNR outside | ΔE core |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant, tasks in summary.items():
        for task, d in tasks.items():
            lines.append(f"| {variant} | {task} | {d['n']} | {100 * d['success']:.1f} % | {d['psnr']:.2f} | "
                         f"{d['ssim']:.4f} | {d['psnr_inside']:.2f} | {d['psnr_outside']:.2f} | {d['delta_e']:.2f} |")
    lines.append("")
    for variant, v in vae.items():
        lines.append(f"VAE reconstruction of the {variant} held-out sources: PSNR {v['mean']:.2f} dB mean, "
                     f"{v['min']:.2f} dB min over {v['n']} images")
        ceiling = ", ".join(f"{task} {100 * r:.1f} %" for task, r in sorted(v["ceiling"].items()))
        lines.append(f"VAE ceiling of the {variant} success (ground truth after a VAE round trip): {ceiling}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout", type=Path, default=ROOT / "tests/fixtures/proxy/heldout")
    ap.add_argument("--edit-snapshot", type=Path, default=SNAPSHOTS["edit"])
    ap.add_argument("--plus-snapshot", type=Path, default=SNAPSHOTS["plus"])
    ap.add_argument("--variants", default="edit,plus")
    ap.add_argument("--limit", type=int, default=0, help="first N edits of each variant")
    ap.add_argument("--fast", action="store_true", help="batched sampler instead of the pipeline call per edit")
    ap.add_argument("--cfg", type=float, default=1.0, help="true-CFG scale (negative prompt ' ')")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--save", type=Path, default=None, help="write each output PNG and a worst-cases grid here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    pm.patch_areas()
    manifest = load_manifest(args.heldout)
    for i, e in enumerate(manifest):
        e["seed"] = i
    rows, vae = [], {}
    t0 = time.time()
    for variant in args.variants.split(","):
        edits = [e for e in manifest if e["variant"] == variant]
        if args.limit:
            edits = [e for t in dict.fromkeys(x["task"] for x in edits)
                     for e in [x for x in edits if x["task"] == t][: max(1, args.limit // 4)]]
        pipe = pm.load_pipeline(args.edit_snapshot if variant == "edit" else args.plus_snapshot)
        pipe.set_progress_bar_config(disable=True)
        for e in edits:
            e["images"] = [read(args.heldout, p) for p in e["sources"]]
        srcs = [e["images"][-1] for e in edits]
        ps = [scenes.psnr(r, im) for r, im in zip(vae_round_trip(pipe, srcs), srcs)]
        vae[variant] = {"mean": float(np.mean(ps)), "min": float(np.min(ps)), "n": len(ps),
                        "ceiling": vae_ceiling(pipe, args.heldout, edits)}
        negative = " " if args.cfg > 1 else None
        outputs = {}
        if args.fast:
            by_n = defaultdict(list)
            for e in edits:
                by_n[len(e["images"])].append(e)
            for group in by_n.values():
                for i in range(0, len(group), 16):
                    chunk = group[i:i + 16]
                    for e, o in zip(chunk, run_fast(pipe, chunk, args.cfg, negative or " ")):
                        outputs[e["id"]] = to_u8(o)
        else:
            for k, e in enumerate(edits):
                outputs[e["id"]] = run_pipeline(pipe, [Image.fromarray(im) for im in e["images"]], e["instruction"],
                                                e["seed"], args.cfg, negative)
                if k % 50 == 0:
                    print(f"  {variant} {k}/{len(edits)} ({time.time() - t0:.0f}s)", file=sys.stderr)
        for e in edits:
            out = outputs[e["id"]]
            tgt, mask = read(args.heldout, e["target"]), read(args.heldout, e["mask"])
            r = scenes.score(out, tgt, mask, e["core_rgb"])
            r.update(id=e["id"], variant=variant, task=e["task"], ssim=ssim(out, tgt))
            rows.append(r)
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                Image.fromarray(out).save(args.save / f"{e['id']}_out.png")
        if args.save:
            worst_grid(args, [r for r in rows if r["variant"] == variant], edits, outputs, variant)
    summary = summarize(rows)
    report = {"mode": "fast" if args.fast else "pipeline", "cfg": args.cfg, "steps": 4, "scheduler": "lightning",
              "vae_area": pm.VAE_AREA, "condition_area": pm.COND_AREA, "seconds": round(time.time() - t0, 1),
              "success_rule": {"delta_e76_max": scenes.DELTA_E_MAX, "psnr_outside_min_db": scenes.PSNR_OUTSIDE_MIN},
              "vae_reconstruction_psnr": vae, "summary": summary, "edits": rows}
    path = args.json or ROOT / "tests/fixtures/proxy/eval_baseline.json"
    if args.json or not args.limit:
        path.write_text(json.dumps(report, indent=1, default=float))
        print(f"wrote {path}", file=sys.stderr)
    print(table(summary, vae))


def worst_grid(args, rows, edits, outputs, variant, n=12):
    by_id = {e["id"]: e for e in edits}
    worst = sorted(rows, key=lambda r: (r["success"], r["psnr"]))[:n]
    w = scenes.SIZE
    grid = Image.new("RGB", (4 * (w + 4), len(worst) * (w + 4)), "white")
    for row, r in enumerate(worst):
        e = by_id[r["id"]]
        tiles = [e["images"][0], e["images"][-1], read(args.heldout, e["target"]), outputs[r["id"]]]
        for col, t in enumerate(tiles):
            grid.paste(Image.fromarray(t), (col * (w + 4), row * (w + 4)))
    grid.save(args.save / f"worst_{variant}.png")
    (args.save / f"worst_{variant}.txt").write_text("\n".join(
        f"{r['id']} {r['task']} success={r['success']} ΔE={r['delta_e']:.1f} psnr_out={r['psnr_outside']:.1f} | "
        f"{by_id[r['id']]['instruction']}" for r in worst))


if __name__ == "__main__":
    main()
