"""Training data and metrics of the proxy (train.py): edit parameters generated on the CPU (a worker pool), images
rendered on the device per batch, the DiT batcher with its pool cache of VAE latents, and the success rule
(`scenes.score`) on device tensors."""

from __future__ import annotations

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


# What a loop keeps for its last validation (and the VAE's ceiling) between its last step and --stop-by.
STOP_BY_RESERVE_S = 20.0


def time_left(budget, t_start, stop_by):
    """Seconds a training loop has left: its own budget (0: none) since t_start, and at most until stop_by (a Unix
    time; 0: none) less STOP_BY_RESERVE_S, so that a call's step count is fitted to whichever ends first and the
    learning-rate decay completes instead of being cut off by --stop-by."""
    now = time.time()
    left = [budget - (now - t_start)] if budget else []
    if stop_by:
        left.append(stop_by - now - STOP_BY_RESERVE_S)
    return max(0.0, min(left)) if left else float("inf")


def fitted_steps(name, steps, done, per, left, floor):
    """The step count of a loop that has run `done` steps at `per` seconds per step and has `left` seconds: `steps`
    if they fit, else what fits (in hundreds, at least `floor`), logged."""
    fit = int(done + left / per) // 100 * 100
    if fit >= steps:
        return steps
    log(f"{name}: {per * 1000:.0f} ms/step: {steps} steps would take {per * steps:.0f}s > {left:.0f}s left; "
        f"training {max(fit, floor)} steps")
    return max(fit, floor)


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
