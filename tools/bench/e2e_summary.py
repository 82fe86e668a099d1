"""One short block per `qwen-edit --compare --report FILE` report: the edits' totals and stage times, the DiT steps,
the pruning cache's peak (GiB) and the memory (plan, after loading, after each edit, the driver's peak from
gpu_run.sh's `NAME.peak` beside it).
Short enough to read several modes in one device call's output.

    python tools/bench/e2e_summary.py gpu_out/e2e_fp8.json gpu_out/e2e_lowmem.json …
"""
import json
import os
import sys

GIB = 2**30
SHORT = {"preprocess": "pre", "encode_prompt": "prompt", "encode_image": "enc", "modulation_table": "table",
         "denoise": "dit", "decode": "dec"}


def gib(v):
    return "–" if v is None else f"{v / GIB:.2f}"


def memory(m):
    """used / in use / reserved, GiB."""
    if not m:
        return "–"
    return f"{gib(m.get('device_used_bytes'))}/{gib(m.get('pool_in_use_bytes'))}/{gib(m.get('pool_reserved_bytes'))}"


def summarize(path):
    r = json.load(open(path))
    name = os.path.basename(path).removesuffix(".json")
    peak_file = path.removesuffix(".json") + ".peak"
    peak = open(peak_file).read().strip() if os.path.exists(peak_file) else "–"
    plan = r.get("memory_plan") or {}
    print(f"## {name}: driver peak {peak} MiB; plan peak {gib(plan.get('peak_bytes'))} GiB; "
          f"after load {memory(r.get('memory_after_load'))} (used/in use/reserved GiB); load {r.get('load_seconds', 0):.1f} s; "
          f"failed {len(r.get('failed') or [])}")
    for edit in r.get("edits", []):
        for kind, rep in (edit.get("runs") or {}).items():
            # `*`: only queued (its device time falls into the next stage)
            stages = " ".join(f"{SHORT.get(s['stage'], s['stage'])}{'*' if s.get('queued') else ''} "
                              f"{1e3 * s['seconds']:.1f}" for s in rep["stages"])
            steps = " ".join(f"{1e3 * s['seconds']:.0f}" for s in rep["steps"])
            print(f"  run {edit.get('run')} {rep['schedule']:<5} {rep['total_seconds']:.3f} s | {stages} | steps {steps}"
                  f" | cache {gib(rep.get('cache_peak_bytes'))} | mem {memory(rep.get('memory'))}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        try:
            summarize(p)
        except (OSError, ValueError, KeyError) as e:
            print(f"## {p}: unreadable ({e})")
