"""Puts `benches/dit_bench.rs` and `tools/bench/torch_dit_bench.py` results side by side: prints a Markdown table
and writes the merged JSON.

    python tools/bench/compare.py rust.json torch.json --out combined.json
"""
import argparse
import json


def fmt(v, nd=1):
    return "–" if v is None else f"{v:.{nd}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rust")
    ap.add_argument("torch")
    ap.add_argument("--out", default="combined.json")
    args = ap.parse_args()
    rust = json.load(open(args.rust))
    try:
        torch = json.load(open(args.torch))
    except (OSError, ValueError):
        torch = {}
    rows = []
    for case, r in rust.get("dit", {}).items():
        t = torch.get("dit", {}).get(case, {})
        tt = t.get("four_step_totals_ms", {})

        def row(name, ours, ref, unit="ms"):
            ratio = ref / ours if ours and ref else None
            rows.append(f"| {case} | {name} | {fmt(ours)} {unit} | {fmt(ref)} {unit} | {fmt(ratio, 2)}× |")

        row("full step", r["full_step_ms"], t.get("full_step_ms"))
        row("reuse step (condition K/V cached)", r["reuse_step_ms"], t.get("reuse_step_ms"))
        row("caching step", r["caching_step_ms"], t.get("caching_step_ms"))
        for spec, s in r["schedules"].items():
            row(f"4 steps `{spec}`", s["total_ms"], tt.get(spec))
        rows.append(f"| {case} | achieved, full / reuse | {fmt(r['full_step_tflops'], 0)} / "
                    f"{fmt(r['reuse_step_tflops'], 0)} TFLOP/s | {fmt(t.get('full_step_tflops'), 0)} / "
                    f"{fmt(t.get('reuse_step_tflops'), 0)} TFLOP/s | |")
        none = r["schedules"].get("none", {}).get("total_ms")
        for spec in ("cat", "reuse:2,3,4"):
            s = r["schedules"].get(spec)
            if s and none:
                rows.append(f"| {case} | `{spec}` speed-up over our `none` | {none / s['total_ms']:.2f}× | "
                            f"{fmt(tt['none'] / tt[spec], 2) + '×' if tt.get(spec) else '–'} | |")
    print("| case | measurement | ours (Rust, burn + fast path) | PyTorch eager (diffusers) | PyTorch / ours |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    kern = []
    for g in rust.get("gemm", []):
        kern.append(f"| GEMM {g['m']}×{g['k']}→{g['n']}{' +GELU' if g.get('gelu') else ''}"
                    f"{' (burn)' if g.get('burn') else ''} | {g['ms']:.3f} ms | {g['tflops']:.0f} |")
    for a in rust.get("attention", []):
        kern.append(f"| attention {a['case']} [{a.get('kernel', 'default')}] | {a['ms']:.3f} ms | {a['tflops']:.0f} |")
    for name, k in torch.get("kernels", {}).items():
        kern.append(f"| torch {name} | {k['ms']:.3f} ms | {k['tflops']:.0f} |")
    if kern:
        print("\n| kernel | time | TFLOP/s |\n|---|---|---|")
        print("\n".join(kern))
    for o in rust.get("ordering", []):
        print(f"ordering {o['mode']}: {o['us_per_op']:.1f} µs per op")
    json.dump({"rust": rust, "torch": torch}, open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
