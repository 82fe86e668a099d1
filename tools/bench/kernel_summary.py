"""Where a program's GPU time goes, kernel by kernel, from Nsight Compute's CSV of kernel durations.

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base --log-file k.csv PROGRAM ...
    python3 tools/bench/kernel_summary.py k.csv [--json k.json] [--top 25] [--exclude REGEX] [--list FROM:TO]

Prints the total GPU time per kernel name (launches, total and mean µs, share) and per category: convolutions
(cuDNN / CUTLASS / implicit-GEMM kernels), GEMMs, normalizations and reductions, copies and layout changes,
other elementwise kernels. `gpu_run.sh vaeprof` runs it on our VAE (`pipeline_bench`) and on PyTorch's
(`torch_stage_bench.py --sections vae`): the two tables side by side say what ours spends outside the convolutions
(docs/performance.md, "What is left"). ncu serializes the kernels, so the sum is GPU time without launch gaps;
compare it with the benchmark's wall time for the host/launch share.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# First match wins; names are matched lower-cased. A kernel that fits none is "other elementwise".
CATEGORIES = [
    ("convolution", r"conv|cudnn|fprop|dgrad|wgrad|implicit|xmma|nchwtonhwc|nhwctonchw|winograd|fft"),
    ("gemm", r"gemm|cublas|matmul|sm90_|wgmma|flash"),
    ("normalization / reduction", r"norm|reduce|reduction|sum|mean|softmax"),
    ("copy / layout",
     r"copy|concat|cat_|pad|transpose|permute|slice|gather|scatter|index|interpolate|upsample|contiguous"),
]
UNIT_TO_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
              "second": 1e6, "s": 1e6}


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other elementwise"


def read_durations(text: str) -> list[tuple[str, float]]:
    """(kernel name, duration µs) per launch from ncu's CSV (lines before its header, such as `==PROF==` lines
    and the program's own output, are skipped)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError("no ncu CSV header (a line starting with \"ID\") in the input")
    rows = []
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = (row.get("Metric Unit") or "nsecond").strip()
        if unit not in UNIT_TO_US:
            raise ValueError(f"unknown duration unit {unit!r}")
        value = float(row["Metric Value"].replace(",", ""))
        rows.append((row["Kernel Name"], value * UNIT_TO_US[unit]))
    return rows


def summarize(durations: list[tuple[str, float]]) -> dict:
    by_kernel = defaultdict(lambda: [0, 0.0])
    for name, us in durations:
        by_kernel[name][0] += 1
        by_kernel[name][1] += us
    total = sum(us for _, us in durations)
    kernels = sorted(({"kernel": k, "launches": n, "total_us": t, "category": category(k)}
                      for k, (n, t) in by_kernel.items()), key=lambda r: -r["total_us"])
    cats = defaultdict(lambda: [0, 0.0])
    for r in kernels:
        cats[r["category"]][0] += r["launches"]
        cats[r["category"]][1] += r["total_us"]
    categories = sorted(({"category": c, "launches": n, "total_us": t} for c, (n, t) in cats.items()),
                        key=lambda r: -r["total_us"])
    return {"launches": len(durations), "total_us": total, "categories": categories, "kernels": kernels}


def table(summary: dict, top: int) -> str:
    total = summary["total_us"] or 1.0
    out = [f"{summary['launches']} launches, {summary['total_us'] / 1e3:.2f} ms of GPU time", "",
           "| category | launches | ms | share |", "|---|---|---|---|"]
    out += [f"| {c['category']} | {c['launches']} | {c['total_us'] / 1e3:.2f} | {100 * c['total_us'] / total:.1f} % |"
            for c in summary["categories"]]
    out += ["", "| kernel | category | launches | ms | mean µs | share |", "|---|---|---|---|---|---|"]
    for k in summary["kernels"][:top]:
        name = k["kernel"] if len(k["kernel"]) <= 70 else k["kernel"][:67] + "..."
        out.append(f"| `{name}` | {k['category']} | {k['launches']} | {k['total_us'] / 1e3:.2f} | "
                   f"{k['total_us'] / k['launches']:.1f} | {100 * k['total_us'] / total:.1f} % |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", type=Path, help="ncu's CSV output (--csv --metrics gpu__time_duration.sum)")
    ap.add_argument("--json", type=Path, help="also write the summary as JSON")
    ap.add_argument("--top", type=int, default=25, help="kernels listed")
    ap.add_argument("--exclude", help="leave out the launches whose kernel name matches this regex (e.g. `prng`: "
                    "the random weights' generator of a benchmark's load)")
    ap.add_argument("--list", metavar="FROM:TO",
                    help="also list the launches FROM..TO (after --exclude) one by one, in order: one layer's kernels")
    args = ap.parse_args()
    durations = read_durations(args.csv.read_text(errors="replace"))
    if args.exclude:
        durations = [(k, us) for k, us in durations if not re.search(args.exclude, k)]
    summary = summarize(durations)
    print(table(summary, args.top))
    if args.list:
        first, last = (int(v) for v in args.list.split(":"))
        print("\n| launch | kernel | µs |\n|---|---|---|")
        for i, (k, us) in enumerate(durations[first:last], start=first):
            print(f"| {i} | `{k[:90]}` | {us:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
