"""Writes flash-attention kernel variants for `gpu_run.sh variants`: each a full module source (as
`crates/qwen-image/src/cuda/kernels/mod.rs` concatenates it, after the prelude) with tuning switches defined first,
in `.dev/kvar/<name>/<module>.cu`, which `QWEN_CUDA_KERNEL_DIR=.dev/kvar/<name>` loads instead of the built-in source.

    python3 tools/bench/kernel_variants.py                  # FP8 attention: 3 and 4 stages, exp2 on the FMA units for
                                                            # 1/2 or 1/4 of the columns; bf16 TMA ping-pong
    python3 tools/bench/kernel_variants.py --out .dev/kvar --only fp8_stages3

The built-in defaults are the measured best (docs/performance.md); a variant is worth keeping only when `dit_bench`
times it faster at the DiT's shapes.
"""
import argparse
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
KDIR = ROOT / "crates/qwen-image/src/cuda/kernels"
# Module name -> the files `kernels/mod.rs` concatenates after the prelude.
MODULES = {
    "flash_attention_tma": ["flash_params.cuh", "wgmma.cuh", "tma.cuh", "flash_attention_tma.cu"],
    "flash_attention_fp8": ["flash_params.cuh", "wgmma.cuh", "tma.cuh", "flash_attention_fp8.cu"],
}
# Variant name -> (module, switches).
VARIANTS = {
    "fp8_stages3": ("flash_attention_fp8", {"FP8_STAGES": 3}),
    "fp8_stages4": ("flash_attention_fp8", {"FP8_STAGES": 4}),
    "fp8_polyexp2": ("flash_attention_fp8", {"FP8_POLY_EXP": 2}),
    "fp8_polyexp4": ("flash_attention_fp8", {"FP8_POLY_EXP": 4}),
    "tma_pingpong": ("flash_attention_tma", {"TMA_PINGPONG": 1}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / ".dev/kvar"))
    ap.add_argument("--only", nargs="*", default=list(VARIANTS))
    args = ap.parse_args()
    for name in args.only:
        module, switches = VARIANTS[name]
        defines = "".join(f"#define {k} {v}\n" for k, v in switches.items())
        body = "".join((KDIR / f).read_text() for f in MODULES[module])
        # The loader prepends the prelude to a kernel-dir source as to the built-in one: write the module body only.
        dest = pathlib.Path(args.out) / name / f"{module}.cu"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(defines + body)
        print(f"{dest} ({module}: {switches})")


if __name__ == "__main__":
    main()
