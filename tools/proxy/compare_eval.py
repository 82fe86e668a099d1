#!/usr/bin/env python3
"""Compares two `qwen-edit eval` reports of the same edits (e.g. without and with `--quantize fp8`): per schedule,
edit success and PSNR against the ground truth in each, the per-edit PSNR change (mean / mean absolute / largest
absolute), how many edits changed their success, and the mean PSNR against the unpruned run in each. The rows of
docs/fp8.md's proxy tables.

    python3 tools/proxy/compare_eval.py BASE/eval_report.json OTHER/eval_report.json [--names bf16,fp8]
"""
import argparse
import json
import sys


def records(path):
    with open(path) as f:
        report = json.load(f)
    return {(r["id"], r["schedule"]): r for r in report["records"]}


def drift(report, keys):
    """Mean PSNR of a schedule's edits against the same edits unpruned (`drift`; `none` has none): "–" without."""
    values = [report[k]["drift"]["psnr_db"] for k in keys if report[k].get("drift")]
    return f"{sum(values) / len(values):.2f} dB" if values else "–"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("other")
    ap.add_argument("--names", default="base,other")
    args = ap.parse_args()
    base, other = records(args.base), records(args.other)
    # The schedules both ran, each over the same edits (a report may hold more schedules than the other).
    schedules = [s for s in dict.fromkeys(s for _, s in base) if any(k[1] == s for k in other)]
    for schedule in schedules:
        ids = [{i for i, s in r if s == schedule} for r in (base, other)]
        if ids[0] != ids[1]:
            sys.exit(f"{schedule}: the reports hold different edits ({len(ids[0])} / {len(ids[1])})")
    shared = [k for k in base if k[1] in schedules]
    if not shared:
        sys.exit("no schedule in both reports")
    a, b = args.names.split(",")
    print(f"| schedule | edits | success {a} → {b} | PSNR vs truth {a} → {b} | per-edit ΔPSNR: mean / mean abs. / "
          f"max abs. | success changes | PSNR vs the unpruned run {a} → {b} |")
    print("|---|---|---|---|---|---|---|")
    for schedule in schedules:  # the first report's order (`none` first)
        keys = [k for k in shared if k[1] == schedule]
        n = len(keys)
        sa = sum(base[k]["truth"]["success"] for k in keys) / n
        sb = sum(other[k]["truth"]["success"] for k in keys) / n
        pa = sum(base[k]["truth"]["psnr_db"] for k in keys) / n
        pb = sum(other[k]["truth"]["psnr_db"] for k in keys) / n
        d = [other[k]["truth"]["psnr_db"] - base[k]["truth"]["psnr_db"] for k in keys]
        changed = sum(base[k]["truth"]["success"] != other[k]["truth"]["success"] for k in keys)
        print(f"| {schedule} | {n} | {100 * sa:.1f} % → {100 * sb:.1f} % | {pa:.2f} → {pb:.2f} dB | "
              f"{sum(d) / n:+.2f} / {sum(map(abs, d)) / n:.2f} / {max(map(abs, d)):.2f} dB | {changed} of {n} | "
              f"{drift(base, keys)} → {drift(other, keys)} |")


if __name__ == "__main__":
    main()
