#!/usr/bin/env python3
"""After the GPU run (issue 11): everything from the run's output folder to the numbers to paste, in a fixed order,
stopping at the first failure with a message that names the step.

    python3 tools/proxy/finish.py OUT                     # into the repository (see "Modes")
    python3 tools/proxy/finish.py OUT --scratch /tmp/fin  # writes nowhere in the repository (a rehearsal)
    python3 tools/proxy/finish.py OUT --from schedules    # resume at a step (the earlier steps' files must exist)

OUT is the folder the GPU run wrote (`gpu_run.sh`: `snapshots.tar.gz.part-*`, `train.log`, `gpu.txt`, ...).

Steps (in this order; `--from NAME` / `--only NAME`):
  unpack     cat the parts | tar -xz; both snapshot folders complete, each <= 32 MB
  commit     repository mode: commits the two snapshot folders at once (git commit -- those paths only) when the
             Edit snapshot's validation success in OUT/train.log is at least --commit-min-success (0.5; v1 had 0.12,
             v2 0.76): 24 MB files left uncommitted do not survive a session that is cut off (the v2 snapshots were
             lost that way), while a model that barely edits stays out of the history
  evaluate   tools/proxy/evaluate.py (held-out set, diffusers arithmetic; `--fast` unless --pipeline)
  fixtures   tools/proxy/fixtures.py (parity fixtures from these snapshots)
  unignore   repository mode: drops the `#[ignore = ...]` lines of tests/proxy_parity.rs and tests/proxy_quality.rs
             (scratch mode: nothing; the tests run with --include-ignored either way)
  build      cargo build --release -p qwen-edit-cli with these snapshots embedded
  floors     `qwen-edit eval --limit 24 --schedules none,cat` (the CI subset: same selection, seeds and options as
             tests/proxy_quality.rs) and the floors suggested from it (rule below); edits no test constant
  parity     cargo test --test proxy_parity -- --include-ignored (our pipeline vs diffusers on these snapshots)
  quality    cargo test --test proxy_quality -- --include-ignored (the floors as they are in the file)
  schedules  qwen-edit eval --schedules none,cat,reuse:2,3,4,cat/recompute,cat@1-4 (docs/quality.md table)
  tradeoff   qwen-edit eval over region thresholds and adaptive budgets (issue 12: speed vs quality)
  demo       qwen-edit --demo: the README's before/after picture
  readme     the snapshot folder's README.md (how made, sizes, measured numbers)

Modes. Repository mode writes: the snapshots into crates/qwen-image-proxy/snapshots/, the fixtures into
tests/fixtures/proxy/, the un-ignored tests, docs/images/proxy_demo.png and the snapshots' README.md; the eval
outputs and summary go to --work (default /tmp/proxy_finish), not into the repository. `--scratch DIR` writes all of
it under DIR (snapshots embedded with QWEN_IMAGE_PROXY_SNAPSHOTS, fixtures found by the parity test through
QWEN_IMAGE_PROXY_FIXTURES); it still rebuilds target/ (with the scratch snapshots embedded: a later normal build
rebuilds qwen-image-proxy and its dependants).

Floors (tests/proxy_quality.rs keeps its constants in one marked block at its top; this script only prints them):
success floor = (k - 2.5) / 24 for k successes of `none` on the 24 edits, rounded down to 0.01 (two edits may flip);
PSNR floors = measured - 1.0 dB, rounded down to 0.1 dB; the `cat` margins stay as documented (3 of 24 edits, 1 dB)
unless the measured gap is within one edit / 0.5 dB of them, which the summary flags.

`--limit-eval N` / `--limit-sweep N` limit the schedule table and the trade-off to N edits (spread over the groups)
for a rehearsal; the default is the whole set (520) for the table and 90 for the sweep. `--limit-python N` does the
same for evaluate.py (N per variant).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("qwen-image-edit-proxy", "qwen-image-edit-plus-proxy")
SNAPSHOT_PARTS = ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler")
MAX_SNAPSHOT_BYTES = 32_000_000
TESTS = ("tests/proxy_parity.rs", "tests/proxy_quality.rs")
CI_SUBSET = 24
SCHEDULE_TABLE = "none,cat,reuse:2,3,4,cat/recompute,cat@1-4"
SWEEP = ("none,cat,reuse:2,3,4,region:0.02,region:0.05,region:0.1,region:0.2,region:0.3,region:0.1,0,"
         "region:0.1,1,3,region:0.2,1,3,region:0.3,1,3,region:0.2,0,3,region:0.2,2,3,"
         "adaptive:0.01,adaptive:0.02,adaptive:0.03,adaptive:0.05,adaptive:0.1,adaptive:0.2")
STEPS = ("unpack", "commit", "evaluate", "fixtures", "unignore", "build", "floors", "parity", "quality", "schedules",
         "tradeoff", "demo", "readme")


class StepFailed(Exception):
    pass


class Finish:
    def __init__(self, args):
        self.a = args
        self.out = args.out.resolve()
        self.scratch = args.scratch.resolve() if args.scratch else None
        self.work = self.scratch or args.work.resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        base = self.scratch or ROOT
        self.snapshots = (self.scratch / "snapshots") if self.scratch else ROOT / "crates/qwen-image-proxy/snapshots"
        self.fixture_dir = (self.scratch / "fixtures") if self.scratch else ROOT / "tests/fixtures/proxy"
        self.demo_png = (self.scratch / "proxy_demo.png") if self.scratch else ROOT / "docs/images/proxy_demo.png"
        self.readme_path = (base / "snapshots_README.md") if self.scratch else self.snapshots / "README.md"
        self.env = dict(os.environ)
        for var in ("QWEN_IMAGE_PROXY_SNAPSHOTS", "QWEN_IMAGE_PROXY_FIXTURES"):  # only what this run sets counts
            self.env.pop(var, None)
        if self.scratch:
            self.env["QWEN_IMAGE_PROXY_SNAPSHOTS"] = str(self.snapshots)
            self.env["QWEN_IMAGE_PROXY_FIXTURES"] = str(self.fixture_dir)
        self.summary_path = self.work / "summary.md"
        self.state_path = self.work / "finish_state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.summary: list[str] = []

    # ---- helpers -------------------------------------------------------------------------------------------
    def sh(self, cmd, log, **kw):
        """Runs `cmd` from the repository root, its output into WORK/logs/LOG; raises StepFailed with its tail."""
        (self.work / "logs").mkdir(exist_ok=True)
        path = self.work / "logs" / log
        print(f"    $ {' '.join(map(str, cmd))}  (> {path})", flush=True)
        with open(path, "w") as f:
            rc = subprocess.call([str(c) for c in cmd], cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                 **kw)
        text = path.read_text(errors="replace")
        if rc != 0:
            lines = text.splitlines()
            panics = [f"{l}\n{n}" for l, n in zip(lines, lines[1:] + [""]) if "panicked at" in l]
            tail = "\n".join(panics + ["..."] + lines[-12:])
            raise StepFailed(f"`{' '.join(map(str, cmd))}` exited {rc}; last lines of {path}:\n{tail}")
        return text

    def qwen_edit(self, *args, log):
        return self.sh([ROOT / "target/release/qwen-edit", *args], log)

    def eval_report(self, name):
        return json.loads((self.work / name / "eval_report.json").read_text())

    def head(self, *columns):
        """A Markdown table's header and separator (a leading newline of the first column starts a paragraph)."""
        first = columns[0].lstrip("\n")
        lead = columns[0][: len(columns[0]) - len(first)]
        self.say(f"{lead}| {' | '.join((first,) + columns[1:])} |")
        self.say("|" + "---|" * len(columns))

    def say(self, text=""):
        print(text, flush=True)
        self.summary.append(text)

    # ---- steps ---------------------------------------------------------------------------------------------
    def unpack(self):
        parts = sorted(self.out.glob("snapshots.tar.gz.part-*"))
        if not parts:
            raise StepFailed(f"no snapshots.tar.gz.part-* in {self.out} (gpu_run.sh writes them at its end: did the "
                             f"run finish? see {self.out}/train.log)")
        tmp = Path(tempfile.mkdtemp(prefix="proxy_unpack_", dir=self.work))
        cat = subprocess.Popen(["cat", *map(str, parts)], stdout=subprocess.PIPE)
        rc = subprocess.call(["tar", "-xz", "-C", str(tmp)], stdin=cat.stdout)
        cat.stdout.close()
        if cat.wait() != 0 or rc != 0:
            raise StepFailed(f"the {len(parts)} parts do not make a complete .tar.gz (a part missing or cut short?)")
        for folder in FOLDERS:
            snap = tmp / folder
            missing = [p for p in SNAPSHOT_PARTS if not (snap / p).exists()]
            if missing:
                raise StepFailed(f"{folder}: missing {missing} in the archive (train.py exports every part)")
            size = sum(f.stat().st_size for f in snap.rglob("*") if f.is_file())
            if size > MAX_SNAPSHOT_BYTES:
                raise StepFailed(f"{folder}: {size / 1e6:.1f} MB > 32 MB (issue 11's limit)")
            self.say(f"- {folder}: {size / 1e6:.1f} MB")
        self.snapshots.mkdir(parents=True, exist_ok=True)
        for folder in FOLDERS:
            shutil.rmtree(self.snapshots / folder, ignore_errors=True)
            shutil.move(str(tmp / folder), str(self.snapshots / folder))
        shutil.rmtree(tmp)

    def commit(self):
        if self.scratch:
            self.say("- scratch mode: nothing committed")
            return
        success = self.edit_val_success()
        if success is None or success < self.a.commit_min_success:
            self.say(f"- not committed: the Edit snapshot's validation success {success} (OUT/train.log) is under "
                     f"--commit-min-success {self.a.commit_min_success}; commit by hand if it should stay")
            return
        paths = [str(self.snapshots / folder) for folder in FOLDERS]
        self.sh(["git", "add", "--", *paths], "commit.log")
        if not self.sh(["git", "status", "--porcelain", "--", *paths], "commit.log").strip():
            self.say("- the snapshots are committed already")
            return
        message = (f"Proxy snapshots from {self.out.name} (tools/proxy/finish.py unpack + commit; the numbers follow "
                   f"in docs/quality.md)")
        text = self.sh(["git", "commit", "-m", message, "--", *paths], "commit.log")
        self.say(f"- {text.splitlines()[0] if text else 'committed'}")

    def edit_val_success(self):
        """The last `snapshot qwen-image-edit-proxy: val success X` of OUT/train.log (train.py's check of the
        exported bf16 weights), or None."""
        log = self.out / "train.log"
        found = re.findall(r"snapshot qwen-image-edit-proxy: val success ([0-9.]+)",
                           log.read_text(errors="replace") if log.exists() else "")
        return float(found[-1]) if found else None

    def snapshot(self, folder):
        return self.snapshots / folder

    def evaluate(self):
        cmd = [sys.executable, "tools/proxy/evaluate.py", "--edit-snapshot", self.snapshot(FOLDERS[0]),
               "--plus-snapshot", self.snapshot(FOLDERS[1]), "--json", self.work / "eval_python.json",
               "--save", self.work / "eval_python"]
        if not self.a.pipeline:
            cmd.append("--fast")
        if self.a.limit_python:
            cmd += ["--limit", str(self.a.limit_python)]
        self.sh(cmd, "evaluate.log")
        rep = json.loads((self.work / "eval_python.json").read_text())
        self.say(f"evaluate.py ({rep['mode']}, {rep['seconds']} s): VAE reconstruction " + ", ".join(
            f"{v} {d['mean']:.2f} dB (min {d['min']:.2f})" for v, d in rep["vae_reconstruction_psnr"].items()))
        self.head("\nvariant", "task", "n", "success", "PSNR", "SSIM", "PSNR inside", "PSNR outside", "ΔE core")
        for variant, tasks in rep["summary"].items():
            for task, d in tasks.items():
                self.say(f"| {variant} | {task} | {d['n']} | {100 * d['success']:.1f} % | {d['psnr']:.2f} | "
                         f"{d['ssim']:.3f} | {d['psnr_inside']:.2f} | {d['psnr_outside']:.2f} | {d['delta_e']:.1f} |")
        self.state["python"] = {v: t["all"] for v, t in rep["summary"].items()}
        self.state["vae"] = rep["vae_reconstruction_psnr"]

    def fixtures(self):
        self.fixture_dir.mkdir(parents=True, exist_ok=True)
        heldout = self.fixture_dir / "heldout"
        if self.scratch and not heldout.exists():
            heldout.symlink_to(ROOT / "tests/fixtures/proxy/heldout")
        self.sh([sys.executable, "tools/proxy/fixtures.py", "--edit-snapshot", self.snapshot(FOLDERS[0]),
                 "--plus-snapshot", self.snapshot(FOLDERS[1]), "--out", self.fixture_dir], "fixtures.log")
        if not self.scratch:  # edits.json names the snapshots relative to the repository root
            edits = self.fixture_dir / "edits.json"
            edits.write_text(edits.read_text().replace(str(ROOT) + "/", ""))

    def unignore(self):
        if self.scratch:
            print("    scratch mode: the tests stay as they are and run with --include-ignored")
            return
        for rel in TESTS:
            path = ROOT / rel
            lines = path.read_text().splitlines(keepends=True)
            kept = [l for l in lines if not l.strip().startswith("#[ignore")]
            path.write_text("".join(kept))
            print(f"    {rel}: {len(lines) - len(kept)} #[ignore] lines removed")
        self.say("- tests un-ignored: update their module docs, docs/quality.md (\"In CI\") and the README, which say "
                 "they are ignored until the snapshots are committed")

    def build(self):
        self.sh(["cargo", "build", "--release", "-p", "qwen-edit-cli"], "build.log")

    def floors(self):
        self.qwen_edit("eval", "--limit", str(CI_SUBSET), "--schedules", "none,cat", "-q",
                       "-o", self.work / "ci_subset", log="ci_subset.log")
        rep = self.eval_report("ci_subset")
        none, cat = (s["all"] for s in rep["schedules"])
        k = round(none["success_rate"] * CI_SUBSET)
        floor = lambda x, step: math.floor(x / step + 1e-9) * step  # noqa: E731
        suggested = {
            "NONE_MIN_SUCCESS": max(0.0, floor((k - 2.5) / CI_SUBSET, 0.01)),
            "NONE_MIN_PSNR_DB": floor(none["psnr_db"] - 1.0, 0.1),
            "NONE_MIN_PSNR_OUTSIDE_DB": floor(none["psnr_outside_db"] - 1.0, 0.1),
            "CAT_MAX_SUCCESS_DROP": 0.125,
            "CAT_MAX_PSNR_DROP_DB": 1.0,
        }
        drop_s, drop_p = none["success_rate"] - cat["success_rate"], none["psnr_db"] - cat["psnr_db"]
        self.say(f"\nCI subset ({CI_SUBSET} edits, release CLI, same selection/seeds as tests/proxy_quality.rs):")
        for name, g in (("none", none), ("cat", cat)):
            self.say(f"- {name}: success {100 * g['success_rate']:.1f} % ({round(g['success_rate'] * CI_SUBSET)}/"
                     f"{CI_SUBSET}), PSNR {g['psnr_db']:.2f} dB, outside {g['psnr_outside_db']:.2f} dB")
        self.say(f"- cat below none: success {drop_s:+.3f}, PSNR {drop_p:+.2f} dB")
        if drop_s > 0.125 - 1 / CI_SUBSET or drop_p > 0.5:
            self.say("- WARNING: cat's gap is within one edit / 0.5 dB of the documented margins (3 of 24, 1 dB): "
                     "look at the worst cases before widening them")
        self.say("\nSuggested floors (tests/proxy_quality.rs, the constants at the top; NOT edited by this script):")
        self.say("```rust")
        for name, value in suggested.items():
            self.say(f"const {name}: f64 = {value:.3f};")
        self.say("```")
        self.state["floors"] = suggested
        self.state["ci_subset"] = {"none": none, "cat": cat}

    def parity(self):
        text = self.sh(["cargo", "test", "--test", "proxy_parity", "--", "--include-ignored"], "parity.log")
        self.say("\nparity: " + next((l for l in text.splitlines() if l.startswith("test result")), "?"))

    def quality(self):
        try:
            text = self.sh(["cargo", "test", "--test", "proxy_quality", "--", "--include-ignored", "--nocapture"],
                           "quality.log")
        except StepFailed as e:
            raise StepFailed(f"{e}\nIf a floor failed: compare with the `floors` step's suggestion; set the constants "
                             "at the top of tests/proxy_quality.rs only from measured values, then resume with "
                             "`--from quality`.") from None
        self.say("\nquality (CI test): " + next((l for l in text.splitlines() if l.startswith("test result")), "?"))

    def schedules(self):
        args = ["eval", "--schedules", SCHEDULE_TABLE, "-q", "-o", self.work / "schedules"]
        if self.a.limit_eval:
            args += ["--limit", str(self.a.limit_eval)]
        self.qwen_edit(*args, log="schedules.log")
        rep = self.eval_report("schedules")
        self.say(f"\nSchedule table ({rep['edits']} edits, seed {rep['seed']}, CPU, f32; docs/quality.md "
                 "\"Results\"):\n")
        self.head("schedule", "success", "PSNR", "SSIM", "PSNR inside", "PSNR outside", "vs none PSNR", "SSIMULACRA2",
                  "DiT FLOPs/step", "speed-up")
        for s in rep["schedules"]:
            g, d = s["all"], s["all"].get("drift")
            drift = (f"{d['psnr_db']:.2f} | {d['ssimulacra2']:.1f}") if d else "– | –"
            self.say(f"| {s['schedule']} | {100 * g['success_rate']:.1f} % | {g['psnr_db']:.2f} | {g['ssim']:.3f} | "
                     f"{g['psnr_inside_db']:.2f} | {g['psnr_outside_db']:.2f} | {drift} | "
                     f"{s['dit_flops_per_step'] / 1e9:.3f} G ({s['flops_ratio']:.2f}) | {s['speedup']:.2f}× |")
        self.say("\n`none` per group:\n")
        self.head("variant", "task", "success", "PSNR", "SSIM", "PSNR inside", "PSNR outside")
        for g in rep["schedules"][0]["groups"]:
            self.say(f"| {g['variant']} | {g['task']} | {100 * g['success_rate']:.1f} % | {g['psnr_db']:.2f} | "
                     f"{g['ssim']:.3f} | {g['psnr_inside_db']:.2f} | {g['psnr_outside_db']:.2f} |")

    def tradeoff(self):
        self.qwen_edit("eval", "--schedules", SWEEP, "--limit", str(self.a.limit_sweep), "-q",
                       "-o", self.work / "tradeoff", log="tradeoff.log")
        rep = self.eval_report("tradeoff")
        none = rep["schedules"][0]["all"]
        self.say(f"\nTrade-off (issue 12; {rep['edits']} edits, CPU; targets: success within 2 points of none, PSNR "
                 "vs truth within 0.5 dB, vs none >= 35 dB):\n")
        self.head("schedule", "FLOPs ratio", "denoise speed-up (CPU)", "success", "Δ success", "PSNR vs truth",
                  "Δ PSNR", "vs none PSNR", "SSIMULACRA2", "targets")
        for s in rep["schedules"]:
            g, d = s["all"], s["all"].get("drift")
            ds, dp = 100 * (g["success_rate"] - none["success_rate"]), g["psnr_db"] - none["psnr_db"]
            vs = d["psnr_db"] if d else math.inf
            ok = "reference" if d is None else "met" if ds >= -2 and dp >= -0.5 and vs >= 35 else "missed"
            drift = f"{vs:.2f} | {d['ssimulacra2']:.1f}" if d else "– | –"
            self.say(f"| {s['schedule']} | {s['flops_ratio']:.2f} | {s['speedup_denoise']:.2f}× | "
                     f"{100 * g['success_rate']:.1f} % | {ds:+.1f} | {g['psnr_db']:.2f} | {dp:+.2f} | {drift} | "
                     f"{ok} |")

    def demo(self):
        self.qwen_edit("--demo", "-o", self.work / "demo", log="demo.log")
        self.demo_png.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.work / "demo" / "latest_demo.png", self.demo_png)
        self.say(f"\ndemo picture: {self.demo_png} (README: `![before | after | ground truth]"
                 f"(docs/images/proxy_demo.png)`)")
        log = (self.work / "logs" / "demo.log").read_text().splitlines()
        for line in log[-6:]:
            self.say(f"    {line}")

    def readme(self):
        gpu = (self.out / "gpu.txt").read_text().strip() if (self.out / "gpu.txt").exists() else "unknown"
        train = (self.out / "train.log").read_text(errors="replace").splitlines() if (
            self.out / "train.log").exists() else []
        keep = [l for l in train if any(k in l for k in ("ms/step", "val", "done", "snapshot", "check"))][-12:]
        sizes = {f: sum(p.stat().st_size for p in (self.snapshots / f).rglob("*") if p.is_file()) for f in FOLDERS}
        py, vae, ci = self.state.get("python", {}), self.state.get("vae", {}), self.state.get("ci_subset", {})
        lines = [
            "# The proxy snapshots embedded in `qwen-image-proxy`", "",
            "`build.rs` embeds two diffusers snapshot folders written by `tools/proxy/train.py` (tools/proxy/README.md):",
            "", "- `qwen-image-edit-proxy/` (`QwenImageEditPipeline`, the demo's default model),",
            "- `qwen-image-edit-plus-proxy/` (`QwenImageEditPlusPipeline`, `zero_cond_t`),", "",
            "from this folder, or from `$QWEN_IMAGE_PROXY_SNAPSHOTS` at build time.", "",
            f"**How they were made**: `tools/proxy/gpu_run.sh` on {gpu}; unpacked and measured by "
            "`tools/proxy/finish.py` (tools/proxy/README.md, \"After the run\").", "",
            "Sizes: " + ", ".join(f"`{f}` {s / 1e6:.1f} MB" for f, s in sizes.items()) + " (bf16).", "",
            "**What they can do** (held-out set, 4 Lightning steps, no CFG; docs/quality.md has every table):", "",
        ]
        for v, d in py.items():
            lines.append(f"- {v} (evaluate.py, {d['n']} edits): success {100 * d['success']:.1f} %, PSNR "
                         f"{d['psnr']:.2f} dB, outside the mask {d['psnr_outside']:.2f} dB, VAE reconstruction "
                         f"{vae.get(v, {}).get('mean', float('nan')):.2f} dB")
        if ci:
            n = ci["none"]
            lines.append(f"- CI subset (24 edits, Rust, `none`): success {100 * n['success_rate']:.1f} %, PSNR "
                         f"{n['psnr_db']:.2f} dB, outside {n['psnr_outside_db']:.2f} dB")
        if keep:
            lines += ["", "Last lines of the training log:", "", "```", *keep, "```"]
        self.readme_path.write_text("\n".join(lines) + "\n")
        self.say(f"\nsnapshot README: {self.readme_path}")

    # ---- driver --------------------------------------------------------------------------------------------
    def run(self):
        start = STEPS.index(self.a.from_step) if self.a.from_step else 0
        steps = [self.a.only] if self.a.only else STEPS[start:]
        timings = self.state.setdefault("seconds", {})
        mode = f"scratch {self.scratch}" if self.scratch else "repository"
        if not self.a.from_step and not self.a.only:
            self.summary_path.write_text(f"# proxy finish: {self.out}\n")
        print(f"finish: {self.out} -> {mode}; work {self.work}; steps {', '.join(steps)}", flush=True)
        for name in steps:
            print(f"[{name}]", flush=True)
            self.say(f"\n## {name}")
            t0 = time.time()
            try:
                getattr(self, name)()
            except StepFailed as e:
                timings[name] = f"failed after {time.time() - t0:.1f}"
                print(f"\nFAILED at step `{name}` after {time.time() - t0:.0f} s:\n{e}", file=sys.stderr)
                self.save()
                sys.exit(1)
            timings[name] = round(time.time() - t0, 1)
            print(f"    {name}: {timings[name]} s", flush=True)
            self.save()
        self.say("\n## step times (s)\n\n" + "\n".join(f"- {k}: {v}" for k, v in timings.items()))
        self.save()
        print(f"\nsummary (numbers to paste): {self.summary_path}")

    def save(self):
        self.state_path.write_text(json.dumps(self.state, indent=1))
        with open(self.summary_path, "a") as f:
            f.write("\n".join(self.summary) + "\n")
        self.summary = []


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the GPU run's output folder (snapshots.tar.gz.part-*, train.log, ...)")
    ap.add_argument("--scratch", type=Path, help="write everything under this folder, nothing in the repository")
    ap.add_argument("--work", type=Path, default=Path("/tmp/proxy_finish"), help="eval outputs, logs, summary")
    ap.add_argument("--from", dest="from_step", choices=STEPS, help="resume at this step")
    ap.add_argument("--only", choices=STEPS, help="run only this step")
    ap.add_argument("--pipeline", action="store_true", help="evaluate.py through diffusers' pipeline per edit")
    ap.add_argument("--limit-python", type=int, default=0, help="evaluate.py: N edits per variant (0: all)")
    ap.add_argument("--limit-eval", type=int, default=0, help="schedule table: N edits (0: all 520)")
    ap.add_argument("--limit-sweep", type=int, default=90, help="trade-off sweep: N edits")
    ap.add_argument("--commit-min-success", type=float, default=0.5,
                    help="commit step: the Edit snapshot's validation success (train.log) needed to commit it")
    args = ap.parse_args()
    if not args.out.is_dir():
        sys.exit(f"{args.out}: not a folder (the GPU run's output folder)")
    if args.scratch and args.scratch.resolve().is_relative_to(ROOT):
        sys.exit("--scratch must be outside the repository")
    Finish(args).run()


if __name__ == "__main__":
    main()
