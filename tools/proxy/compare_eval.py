#!/usr/bin/env python3
"""Compares two `qwen-edit eval` reports of the same edits (e.g. without and with `--quantize fp8`): per schedule,
edit success and PSNR against the ground truth in each, the per-edit PSNR change (mean / mean absolute / largest
absolute) and how many edits changed their success. The rows of docs/fp8.md's proxy tables.

    python3 tools/proxy/compare_eval.py BASE/eval_report.json OTHER/eval_report.json [--names bf16,fp8]
"""
import argparse
import json
import sys


def records(path):
    with open(path) as f:
        report = json.load(f)
    return {(r["id"], r["schedule"]): r for r in report["records"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("other")
    ap.add_argument("--names", default="base,other")
    args = ap.parse_args()
    base, other = records(args.base), records(args.other)
    shared = sorted(set(base) & set(other))
    if not shared or len(shared) != len(base) or len(shared) != len(other):
        sys.exit(f"the reports hold different edits: {len(base)} / {len(other)} records, {len(shared)} shared")
    a, b = args.names.split(",")
    print(f"| schedule | edits | success {a} → {b} | PSNR vs truth {a} → {b} | per-edit ΔPSNR: mean / mean abs. / "
          f"max abs. | success changes |")
    print("|---|---|---|---|---|---|")
    for schedule in dict.fromkeys(s for _, s in base):  # the report's order (`none` first)
        keys = [k for k in shared if k[1] == schedule]
        n = len(keys)
        sa = sum(base[k]["truth"]["success"] for k in keys) / n
        sb = sum(other[k]["truth"]["success"] for k in keys) / n
        pa = sum(base[k]["truth"]["psnr_db"] for k in keys) / n
        pb = sum(other[k]["truth"]["psnr_db"] for k in keys) / n
        d = [other[k]["truth"]["psnr_db"] - base[k]["truth"]["psnr_db"] for k in keys]
        changed = sum(base[k]["truth"]["success"] != other[k]["truth"]["success"] for k in keys)
        print(f"| {schedule} | {n} | {100 * sa:.1f} % → {100 * sb:.1f} % | {pa:.2f} → {pb:.2f} dB | "
              f"{sum(d) / n:+.2f} / {sum(map(abs, d)) / n:.2f} / {max(map(abs, d)):.2f} dB | {changed} of {n} |")


if __name__ == "__main__":
    main()
