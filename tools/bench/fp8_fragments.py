"""Checks, on the host, that the FP8 attention kernel's P·V data flow computes P·V: `fp8_pack_p` (S's accumulator
registers packed into the 8-bit A fragments), `fp8_key_of_slot` and `fp8_attn_quant_vt`'s key order, under the 8-bit
A-fragment layout the kernel assumes for wgmma m64nNk32 (that of mma.m16n8k32). It checks their consistency, not the
layout itself, which only the GPU test (`tests/gpu_fp8.rs`) can.

    python3 tools/bench/fp8_fragments.py      # prints the largest difference to P·V (float rounding only)
"""
import numpy as np
rng = np.random.default_rng(0)
M, N, D = 64, 128, 128   # rows of the warpgroup, keys of the tile, head dim
P = rng.random((M, N)).astype(np.float32)   # probabilities (S accumulator layout)
V = rng.standard_normal((N, D)).astype(np.float32)

def key_of_slot(a):
    return 16 * (a >> 4) + 8 * ((a & 3) >> 1) + 2 * ((a >> 2) & 3) + (a & 1)

# Accumulator layout of m64n128: warp w rows 16w..16w+15; element 4n+e: row g (+8 for e>=2), col 8n + 2c + (e&1).
def s_regs(w, lane):
    g, c = lane >> 2, lane & 3
    s = np.zeros(64, np.float32)
    for n in range(16):
        for e in range(4):
            row = 16 * w + g + (8 if e >= 2 else 0)
            col = 8 * n + 2 * c + (e & 1)
            s[4 * n + e] = P[row, col]
    return s

# fp8_pack_p: pa[kk][0] = (t[0], t[1], t[4], t[5]) ... with t = s + 16kk; byte order lowest first.
def pack(s):
    pa = np.zeros((4, 4, 4), np.float32)  # [kk][reg][byte]
    for kk in range(4):
        t = s[16 * kk:16 * kk + 16]
        pa[kk][0] = [t[0], t[1], t[4], t[5]]
        pa[kk][1] = [t[2], t[3], t[6], t[7]]
        pa[kk][2] = [t[8], t[9], t[12], t[13]]
        pa[kk][3] = [t[10], t[11], t[14], t[15]]
    return pa

# The A matrix each k-step's wgmma sees (assumed 8-bit fragment layout), slots = A columns 0..31 of the step.
A = np.zeros((4, M, 32), np.float32)
for w in range(4):
    for lane in range(32):
        g, c = lane >> 2, lane & 3
        pa = pack(s_regs(w, lane))
        for kk in range(4):
            for reg in range(4):
                row = 16 * w + g + (8 if reg & 1 else 0)
                col0 = 4 * c + (16 if reg & 2 else 0)
                for byte in range(4):
                    A[kk, row, col0 + byte] = pa[kk][reg][byte]

# quant_vt: Vt[d][slot a of the tile] = V[32*(a>>5) + key_of_slot(a & 31)][d]; the k-step kk reads slots 32kk..32kk+31.
Vt = np.zeros((D, N), np.float32)
for a in range(N):
    Vt[:, a] = V[32 * (a >> 5) + key_of_slot(a & 31), :]
O = np.zeros((M, D), np.float32)
for kk in range(4):
    B = Vt[:, 32 * kk:32 * kk + 32]          # N_mma (= d) x K (slots), K-major
    O += A[kk] @ B.T
ref = P @ V
err = float(np.abs(O - ref).max())
bijective = sorted(key_of_slot(a) for a in range(32)) == list(range(32))
print(f"max abs difference to P·V: {err:.2e}; the key order is a permutation: {bijective}")
assert err < 1e-4 and bijective
