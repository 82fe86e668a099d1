// Flash attention forward for Hopper (sm_90a): warpgroup MMA (wgmma) with both operands of Q·Kᵀ and the V operand
// of P·V in 128-byte-swizzled shared memory, P kept in registers between the two products (FlashAttention-3
// style, without warp specialization). Head dim 128, bf16, f32 softmax statistics.
//
// One CTA = 2 warpgroups = 128 queries (64 per warpgroup) of one (batch, head). Keys stream in tiles of 128
// through a two-stage cp.async pipeline: the next tile loads while this one is computed. K is read in place from
// its segments (a logical key is mapped to its segment row by row, so tiles may straddle segments); V is read
// from a transposed copy Vt[b, kv_head, d, key] (`flash_vt_transpose`, keys padded to a multiple of 128 with
// zeros) so that both products take K-major shared-memory operands. Same FlashParams as the mma.sync kernel
// (`flash_attention.cu`); masking, GQA and causality behave identically. No variable-length blocks here.

// `KvSeg`, `FlashParams` and `MAX_SEGS` come from `flash_params.cuh`, the wgmma helpers from `wgmma.cuh`, both
// prepended by `kernels/mod.rs`.

__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::); }

// Byte offset of 16-byte chunk `ch` (0..15) of row `r` in a [rows][128 elements] tile stored as two 128-byte-swizzled
// halves of [rows][64] (`rows` rows each).
__device__ __forceinline__ u32 sw128_offset(int r, int ch, int rows) {
    return (u32)((ch >> 3) * rows * 128 + r * 128 + (((ch & 7) ^ (r & 7)) << 4));
}

namespace wg {
constexpr int BM = 128, BN = 128, D = 128, NT = 256;
constexpr int TILE = 128 * 256;                     // bytes of a 128 x 128 bf16 tile
}  // namespace wg

__device__ __forceinline__ void wg_load_k(u32 dst, const FlashParams& p, int b, int hk, int j0, int kv_end) {
    for (int c = threadIdx.x; c < wg::BN * 16; c += wg::NT) {
        const int r = c >> 4, ch = c & 15;
        const int j = j0 + r;
        const bf16_t* src = p.q;
        int bytes = 0;
        if (j < kv_end) {
#pragma unroll
            for (int s = 0; s < MAX_SEGS; ++s) {
                if (s < p.n_segs) {
                    const KvSeg& g = p.seg[s];
                    const int t = j - g.start;
                    if (t >= 0 && t < g.len) {
                        src = g.k + b * g.k_sb + t * g.k_st + hk * g.k_sh + ch * 8;
                        bytes = 16;
                    }
                }
            }
        }
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst + sw128_offset(r, ch, wg::BN)),
                     "l"(src), "r"(bytes));
    }
}

// Vt tile: rows = head-dim index d (128), columns = keys j0 .. j0 + 127 (always inside the padded buffer).
__device__ __forceinline__ void wg_load_vt(u32 dst, const bf16_t* vt, i64 kpad, int j0) {
    for (int c = threadIdx.x; c < wg::D * 16; c += wg::NT) {
        const int d = c >> 4, ch = c & 15;
        const bf16_t* src = vt + d * kpad + j0 + ch * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst + sw128_offset(d, ch, wg::D)), "l"(src));
    }
}

struct VtParams {
    const bf16_t* vt;  // [batch, kv_heads, 128, kpad]
    i64 kpad;
    int kv_heads;
    int pad_;
};
QI_ASSERT_LAYOUT(VtParams, 24, 8);
QI_ASSERT_OFFSET(VtParams, vt, 0);
QI_ASSERT_OFFSET(VtParams, kpad, 8);
QI_ASSERT_OFFSET(VtParams, kv_heads, 16);
QI_ASSERT_OFFSET(VtParams, pad_, 20);

extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_wgmma_d128(const FlashParams p, const VtParams vp) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const u32 sQ = base;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wgi = warp >> 2, wq = warp & 3;  // warpgroup, warp within it
    const int g = lane >> 2, c4 = lane & 3;
    const int h = blockIdx.y, hk = h / p.kv_group, b = blockIdx.z;
    const int q0 = blockIdx.x * wg::BM;
    const int q_len = p.q_len, kv_end = p.total_keys;
    if (q0 >= q_len) return;
    const int kv_need = p.causal ? min(kv_end, q0 + wg::BM) : kv_end;
    const int n_tiles = (kv_need + wg::BN - 1) / wg::BN;
    const bf16_t* vt = vp.vt + ((i64)b * vp.kv_heads + hk) * wg::D * vp.kpad;

    // Prologue: Q and tile 0.
    for (int c = tid; c < wg::BM * 16; c += wg::NT) {
        const int r = c >> 4, ch = c & 15;
        const int qi = q0 + r;
        const bf16_t* src = p.q;
        int bytes = 0;
        if (qi < q_len) {
            src = p.q + b * p.q_sb + (i64)qi * p.q_st + h * p.q_sh + ch * 8;
            bytes = 16;
        }
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sQ + sw128_offset(r, ch, wg::BM)),
                     "l"(src), "r"(bytes));
    }
    if (n_tiles > 0) {
        wg_load_k(base + wg::TILE, p, b, hk, 0, kv_end);
        wg_load_vt(base + 2 * wg::TILE, vt, vp.kpad, 0);
    }
    cp_async_commit();

    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    float m_run[2] = {-QI_INF, -QI_INF};
    float l_run[2] = {0.f, 0.f};
    const int row0 = q0 + wgi * 64 + wq * 16 + g;
    // Q rows of this warpgroup: 64 rows = 8 KB into each half of the Q tile.
    const u32 qa = sQ + wgi * 64 * 128;

    for (int it = 0; it < n_tiles; ++it) {
        const int st = it & 1;
        const u32 sK = base + (1 + 2 * st) * wg::TILE, sV = sK + wg::TILE;
        const int j0 = it * wg::BN;
        __syncthreads();  // every warp is done with the other stage (tile it - 1)
        if (it + 1 < n_tiles) {
            const u32 nK = base + (1 + 2 * (st ^ 1)) * wg::TILE;
            wg_load_k(nK, p, b, hk, j0 + wg::BN, kv_end);
            wg_load_vt(nK + wg::TILE, vt, vp.kpad, j0 + wg::BN);
        }
        cp_async_commit();
        cp_async_wait_1();
        fence_proxy_async();
        __syncthreads();  // tile it is in shared memory for everyone

        // S = Q Kᵀ: 8 k-steps of 16 over the head dim.
        float s[64];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
            const u32 off = (kk >> 2) * (wg::BM * 128) + (kk & 3) * 32;
            const u32 koff = (kk >> 2) * (wg::BN * 128) + (kk & 3) * 32;
            wgmma_ss_m64n128k16(s, sw128_desc(qa + off), sw128_desc(sK + koff), kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();

        // Masking: keys past the end, the key mask, causality. Accumulator element 4n + e: row g (+8 for e >= 2),
        // key column 8n + 2c + (e & 1).
        const bool masked = p.mask != nullptr && p.mask_tile_full[b * p.n_mask_tiles + it] == 0;
        const bool need = (j0 + wg::BN > kv_end) || masked || (p.causal && (j0 + wg::BN - 1 > row0 - g));
#pragma unroll
        for (int n = 0; n < 16; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int j = j0 + n * 8 + 2 * c4 + e;
                const bool ok = !need || (j < kv_end && (!masked || p.mask[b * p.mask_sb + j] != 0));
                const bool ok0 = ok && !(need && p.causal && j > row0);
                const bool ok1 = ok && !(need && p.causal && j > row0 + 8);
                s[4 * n + e] = ok0 ? s[4 * n + e] : -QI_INF;
                s[4 * n + 2 + e] = ok1 ? s[4 * n + 2 + e] : -QI_INF;
            }
        }

        float alpha[2];
        wg_softmax(s, m_run, l_run, alpha, p.scale_log2);
        wg_scale_o(o, alpha);

        // O += P V: 8 k-steps of 16 keys, P from registers (accumulator layout = A-fragment layout). All fragments
        // are packed before the first wgmma so no register changes between the asynchronous instructions.
        u32 pa[8][4];
        wg_pack_p(pa, s);
        wgmma_fence();
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            const u32 voff = (t >> 2) * (wg::D * 128) + (t & 3) * 32;
            wgmma_rs_m64n128k16<0>(o, pa[t], sw128_desc(sV + voff));
        }
        wgmma_commit();
        wgmma_wait<0>();
    }
    cp_async_wait_all();
    wg_store_o(p, o, l_run, row0, b, h, c4);
}

// Vt[b, hk, d, j] = V[b, j, hk, d] for the keys of all segments (logical order), zeros for j in [total, kpad).
// Grid (kpad / 64, kv_heads, batch), 256 threads; a 64-key x 128-d tile goes through shared memory.
extern "C" __global__ void __launch_bounds__(256) flash_vt_transpose(const FlashParams p, const VtParams vp) {
    __shared__ bf16_t tile[64][128 + 8];
    const int j0 = blockIdx.x * 64, hk = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    // Load 64 key rows (16 chunks of 8 each).
    for (int c = tid; c < 64 * 16; c += 256) {
        const int r = c >> 4, ch = c & 15, j = j0 + r;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (j < p.total_keys) {
#pragma unroll
            for (int s = 0; s < MAX_SEGS; ++s) {
                if (s < p.n_segs) {
                    const KvSeg& g = p.seg[s];
                    const int t = j - g.start;
                    if (t >= 0 && t < g.len)
                        v = *reinterpret_cast<const uint4*>(g.v + b * g.v_sb + t * g.v_st + hk * g.v_sh + ch * 8);
                }
            }
        }
        *reinterpret_cast<uint4*>(&tile[r][ch * 8]) = v;
    }
    __syncthreads();
    // Write 128 rows (d) of 64 keys: 8 chunks of 8 keys per row.
    bf16_t* out = const_cast<bf16_t*>(vp.vt) + ((i64)b * vp.kv_heads + hk) * 128 * vp.kpad;
    for (int c = tid; c < 128 * 8; c += 256) {
        const int d = c >> 3, ch = c & 7;
        u32 w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            w[e] = (u32)tile[ch * 8 + 2 * e][d] | ((u32)tile[ch * 8 + 2 * e + 1][d] << 16);
        }
        *reinterpret_cast<uint4*>(out + d * vp.kpad + j0 + ch * 8) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}
