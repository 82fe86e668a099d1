"""PyTorch reference for `benches/dit_bench.rs`: diffusers' QwenImageTransformer2DModel (eager, SDPA), random bf16
weights created on the GPU, batch 1, the same shapes: full step, full step that caches the condition image's
post-norm post-RoPE K/V at every block, and the reuse step where the condition tokens compute nothing and the
other tokens attend to the cached K/V (written here as an attention processor).

    python tools/bench/torch_dit_bench.py --json torch.json [--cases v1,plus] [--layers 60] [--reps 5] [--compile]

Needs torch with CUDA and diffusers 0.42.1 (pure Python; carry the wheel to a host that lacks it).
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    QwenImageTransformer2DModel,
    apply_rotary_emb_qwen,
)

D = 3072
# text tokens and condition images per case (plus2: Edit-Plus with two condition images, the text tokens of our
# `gpu_run.sh modes plus2` edit; --plus2-text overrides them)
CASES = {"v1": (1399, 1), "plus": (236, 1), "plus2": (436, 2)}


class CachingProcessor(QwenDoubleStreamAttnProcessor2_0):
    """The diffusers processor plus condition-K/V caching and reuse (state["mode"]: plain, cache, reuse)."""

    def __init__(self, layer, state):
        super().__init__()
        self.layer = layer
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        mode = self.state["mode"]
        if mode == "plain":
            return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                    attention_mask, image_rotary_emb)
        seq_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        img_q = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
        img_k = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        img_v = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        txt_q = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_k = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        img_q, img_k = attn.norm_q(img_q), attn.norm_k(img_k)
        txt_q, txt_k = attn.norm_added_q(txt_q), attn.norm_added_k(txt_k)
        img_freqs, txt_freqs = image_rotary_emb
        img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
        img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
        txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
        txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)
        keys, values = [txt_k, img_k], [txt_v, img_v]
        if mode == "cache":
            n = self.state["target_tokens"]
            self.state["kv"][self.layer] = (img_k[:, n:].contiguous(), img_v[:, n:].contiguous())
        else:  # reuse: the image stream holds the target only; the condition image's K/V come from the cache
            ck, cv = self.state["kv"][self.layer]
            keys.append(ck)
            values.append(cv)
        q = torch.cat([txt_q, img_q], dim=1).transpose(1, 2)
        k = torch.cat(keys, dim=1).transpose(1, 2)
        v = torch.cat(values, dim=1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2, 3).to(q.dtype)
        txt_out, img_out = out[:, :seq_txt], out[:, seq_txt:]
        return attn.to_out[0](img_out.contiguous()), attn.to_add_out(txt_out.contiguous())


def time_ms(fn, reps, inner=1):
    if not torch.cuda.is_available():  # CPU smoke test of this script
        fn()
        t = time.time()
        for _ in range(inner):
            fn()
        return (time.time() - t) * 1e3 / inner
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def step_flop(layers, text, computed, keys):
    q = text + computed
    return 2 * 12 * D * D * layers * q + 4 * D * layers * q * keys


def kernels(reps):
    out = {}
    dev = "cuda"
    for what, nq, nk in [("joint 9591", 9591, 9591), ("reuse 5495/9591", 5495, 9591), ("joint 8428", 8428, 8428)]:
        q = torch.randn(1, 24, nq, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, 24, nk, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, 24, nk, 128, device=dev, dtype=torch.bfloat16)
        ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), reps, 10)
        out[f"sdpa {what}"] = {"ms": ms, "tflops": 4 * nq * nk * 24 * 128 / ms / 1e9}
    for m, kk, n in [(9591, D, D), (9591, D, 4 * D), (9591, 4 * D, D), (5495, D, 4 * D)]:
        x = torch.randn(m, kk, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, kk, device=dev, dtype=torch.bfloat16) / kk ** 0.5
        b = torch.randn(n, device=dev, dtype=torch.bfloat16)
        ms = time_ms(lambda: F.linear(x, w, b), reps, 20)
        out[f"linear {m}x{kk}->{n}"] = {"ms": ms, "tflops": 2 * m * n * kk / ms / 1e9}
    for name, r in out.items():
        print(f"torch {name:28}: {r['ms']:7.3f} ms  {r['tflops']:6.1f} TFLOP/s")
    return out


def case_inputs(case, side, dev):
    """A case's random inputs (target and condition tokens, text, timestep) and a forward pass of a model on them:
    run(m, hidden, shapes)."""
    text, conditions = CASES[case]
    x = torch.randn(1, (1 + conditions) * side * side, 64, device=dev, dtype=torch.bfloat16)
    txt = torch.randn(1, text, 3584, device=dev, dtype=torch.bfloat16)
    t = torch.tensor([0.5], device=dev, dtype=torch.bfloat16)

    def run(m, hidden, shapes):
        with torch.no_grad():
            return m(hidden_states=hidden, encoder_hidden_states=txt, timestep=t, img_shapes=shapes,
                     return_dict=False)[0]

    return x, run


def compiled_full_step(model, state, args, dev):
    """torch.compile (default mode) of the full step of the first case: the first call's time (tracing and
    compilation) apart from the steady state's, and its output against eager's."""
    case = args.cases.split(",")[0]
    side = args.side
    x, run = case_inputs(case, side, dev)
    both = [[(1, side, side)] * (1 + CASES[case][1])]
    state["mode"] = "plain"
    compiled = torch.compile(model)
    start = time.time()
    got = run(compiled, x, both)
    if dev == "cuda":
        torch.cuda.synchronize()
    compile_s = time.time() - start
    want = run(model, x, both).float()
    err = ((got.float() - want).norm() / want.norm()).item()
    full = time_ms(lambda: run(compiled, x, both), args.reps)
    eager = time_ms(lambda: run(model, x, both), args.reps)
    print(f"torch.compile DiT {case}: full {full:.1f} ms (eager {eager:.1f} ms in the same section), first call "
          f"(compilation) {compile_s:.0f} s, rel L2 vs eager {err:.1e}")
    return {"case": case, "full_step_ms": full, "eager_full_step_ms": eager, "compile_s": compile_s,
            "rel_l2_vs_eager": err}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="torch_dit_bench.json")
    ap.add_argument("--cases", default="v1,plus")
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--side", type=int, default=64, help="token grid side of the target and condition images")
    ap.add_argument("--plus2-text", type=int, default=CASES["plus2"][0],
                    help="text tokens of the two-image Edit-Plus case (our report's text_tokens)")
    ap.add_argument("--compile", action="store_true",
                    help="also torch.compile (default mode) the full step of the first case; compile time reported "
                         "separately (minutes)")
    args = ap.parse_args()
    CASES["plus2"] = (args.plus2_text, 2)
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    if not args.skip_kernels:
        result["kernels"] = kernels(args.reps)

    t0 = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=args.layers, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
    torch.set_default_dtype(torch.float32)
    model.eval().requires_grad_(False)
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"torch model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
          f"{time.time() - t0:.1f} s")
    side = args.side
    state = {"mode": "plain", "kv": {}, "target_tokens": side * side}
    for i, block in enumerate(model.transformer_blocks):
        block.attn.set_processor(CachingProcessor(i, state))

    cases = {}
    for case in args.cases.split(","):
        text, conditions = CASES[case]
        target = side * side
        cond = conditions * target
        x, forward = case_inputs(case, side, dev)
        both = [[(1, side, side)] * (1 + conditions)]
        only_target = [[(1, side, side)]]

        def run(hidden, shapes):
            return forward(model, hidden, shapes)

        state["mode"] = "plain"
        full = time_ms(lambda: run(x, both), args.reps)
        state["mode"] = "cache"
        cache = time_ms(lambda: run(x, both), max(2, args.reps // 2))
        cache_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                          for k, v in state["kv"].values())
        state["mode"] = "reuse"
        reuse = time_ms(lambda: run(x[:, :target], only_target), args.reps)
        # With K/V cached from the same inputs, the reuse step's target prediction equals the full step's.
        state["mode"] = "cache"
        want = run(x, both)[:, :target].float()
        state["mode"] = "reuse"
        got = run(x[:, :target], only_target).float()
        reuse_err = ((got - want).norm() / want.norm()).item()
        state["mode"] = "plain"
        keys = text + target + cond
        ff, rf = step_flop(args.layers, text, target + cond, keys), step_flop(args.layers, text, target, keys)
        totals = {"none": 4 * full, "cat": 2 * cache + 2 * reuse, "reuse:2,3,4": cache + 3 * reuse}
        cases[case] = {
            "text_tokens": text, "full_step_ms": full, "caching_step_ms": cache, "reuse_step_ms": reuse,
            "full_step_tflops": ff / full / 1e9, "reuse_step_tflops": rf / reuse / 1e9, "cache_bytes": cache_bytes,
            "four_step_totals_ms": totals, "reuse_vs_full_rel_l2": reuse_err,
        }
        print(f"torch DiT {case}: full {full:.1f} ms ({ff / full / 1e9:.0f} TFLOP/s), caching {cache:.1f} ms, "
              f"reuse {reuse:.1f} ms ({rf / reuse / 1e9:.0f} TFLOP/s, rel L2 vs full {reuse_err:.1e}); 4-step totals "
              + ", ".join(f"{k} {v:.0f} ms" for k, v in totals.items()))
        state["kv"].clear()
    result["dit"] = cases
    if args.compile:
        result["compiled"] = compiled_full_step(model, state, args, dev)
    result["peak_bytes"] = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
    result["weights_bytes"] = weights_bytes
    print(f"torch peak GPU memory {result['peak_bytes'] / 2**30:.1f} GiB")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
