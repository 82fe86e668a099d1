"""Compiles the fast-path CUDA kernels with NVRTC for sm_90a on a machine without a GPU and prints the log
(errors, and ptxas' register/shared-memory/spill report).

    LD_LIBRARY_PATH=<nvrtc lib dir> python tools/bench/nvrtc_check.py [--nvrtc /path/libnvrtc.so.13]

NVRTC needs no GPU: `pip download nvidia-cuda-nvrtc==13.0.*` and unpack the wheel to get libnvrtc.so.13.
"""
import argparse
import ctypes
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
KDIR = ROOT / "crates/qwen-image/src/cuda/kernels"
SOURCES = ["flash_attention.cu", "flash_attention_wgmma.cu", "flash_attention_tma.cu", "flash_attention_fp8.cu",
           "elementwise.cu", "fp8.cu"]
# Prepended to the flash-attention sources, as `kernels/mod.rs` does.
FLASH_PARAMS = "flash_params.cuh"
# Prepended (after the parameters) to the Hopper kernels, as `kernels/mod.rs` does.
WGMMA_USERS = {"flash_attention_wgmma.cu", "flash_attention_tma.cu", "flash_attention_fp8.cu"}
TMA_USERS = {"flash_attention_tma.cu", "flash_attention_fp8.cu"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvrtc", default="libnvrtc.so.13")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--ptx", help="write the PTX of each source here")
    ap.add_argument("files", nargs="*", default=SOURCES)
    args = ap.parse_args()
    lib = ctypes.CDLL(args.nvrtc)
    prelude = (KDIR / "prelude.cuh").read_text()
    ok = True
    for name in args.files:
        params = (KDIR / FLASH_PARAMS).read_text() if name.startswith("flash_") else ""
        if name in WGMMA_USERS:
            params += (KDIR / "wgmma.cuh").read_text()
        if name in TMA_USERS:
            params += (KDIR / "tma.cuh").read_text()
        src = (prelude + "\n" + params + (KDIR / name).read_text()).encode()
        prog = ctypes.c_void_p()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, name.encode(), 0, None, None) == 0
        opts = [f"--gpu-architecture={args.arch}", "-std=c++17", "-lineinfo", "--ptxas-options=-v"]
        copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        rc = lib.nvrtcCompileProgram(prog, len(opts), copts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        print(f"== {name}: {'OK' if rc == 0 else f'FAILED ({rc})'}")
        print(log.value.decode(errors="replace"))
        if rc == 0 and args.ptx:
            lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            ptx = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetPTX(prog, ptx)
            pathlib.Path(args.ptx).mkdir(parents=True, exist_ok=True)
            (pathlib.Path(args.ptx) / (name + ".ptx")).write_bytes(ptx.value)
        ok &= rc == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
