// Flash attention forward (FlashAttention-2 scheme) for bf16 on sm_80+ tensor cores (mma.sync m16n8k16).
//
// One CTA = 8 warps = 128 queries of one (batch or block, head); each warp owns 16 query rows. Keys and values
// stream through shared memory in tiles of 64 (cp.async, K of the next tile loads while P·V runs, V loads while
// Q·Kᵀ runs). Softmax statistics are f32 in registers (online softmax in base 2).
//
// Keys/values come as up to MAX_SEGS segments (text, image, cached condition K/V…) addressed in place: a logical
// key index is mapped to its segment while the tile is loaded, so nothing is ever concatenated. GQA: query head
// h reads key/value head h / kv_group. Optional key mask (u8, nonzero = attend), causal masking (query i sees
// logical keys 0..=i), and variable-length blocks (cu_seqlens: block j's queries see block j's keys only).

// `KvSeg`, `FlashParams` and `MAX_SEGS` come from `flash_params.cuh`, prepended by `kernels/mod.rs`.

template <int D>
struct FlashCfg {
    static constexpr int BM = 128;         // queries per CTA
    static constexpr int BN = 64;          // keys per tile
    static constexpr int NT = 256;         // threads
    static constexpr int LD = D + 8;       // padded shared-memory row (elements): conflict-free ldmatrix
    static constexpr int CPR = D / 8;      // 16-byte chunks per row
    static constexpr int KD = D / 16;      // k-steps over the head dim
    static constexpr int ND = D / 8;       // n-tiles over the head dim
    static constexpr int SMEM = (BM + 2 * BN) * LD * 2;
};

// Loads keys (or values) [j0, j0 + BN) of the logical key axis into `dst` (BN x LD), zero-filling rows >= kv_end.
template <int D, bool VALUES>
__device__ __forceinline__ void load_kv_tile(bf16_t* dst, const FlashParams& p, int b, int hk, int j0, int kv_end) {
    typedef FlashCfg<D> C;
    for (int c = threadIdx.x; c < C::BN * C::CPR; c += C::NT) {
        const int r = c / C::CPR, ch = c - r * C::CPR;
        const int j = j0 + r;
        const bf16_t* src = p.q;  // any valid address for zero fill
        int bytes = 0;
        if (j < kv_end) {
#pragma unroll
            for (int s = 0; s < MAX_SEGS; ++s) {
                if (s < p.n_segs) {
                    const KvSeg& g = p.seg[s];
                    const int t = j - g.start;
                    if (t >= 0 && t < g.len) {
                        src = VALUES ? g.v + b * g.v_sb + t * g.v_st + hk * g.v_sh
                                     : g.k + b * g.k_sb + t * g.k_st + hk * g.k_sh;
                        src += ch * 8;
                        bytes = 16;
                    }
                }
            }
        }
        cp_async_16(dst + r * C::LD + ch * 8, src, bytes);
    }
}

template <int D>
__device__ __forceinline__ void flash_fwd(const FlashParams& p) {
    typedef FlashCfg<D> C;
    constexpr int BM = C::BM, BN = C::BN, LD = C::LD, KD = C::KD, ND = C::ND;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16_t* sQ = reinterpret_cast<bf16_t*>(smem_raw);
    bf16_t* sK = sQ + BM * LD;
    bf16_t* sV = sK + BN * LD;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, c4 = lane & 3;
    const int h = blockIdx.y;
    const int hk = h / p.kv_group;
    int b = blockIdx.z;
    const int q0 = blockIdx.x * BM;
    int q_len = p.q_len, q_base = 0, kv_lo = 0, kv_len = p.total_keys;
    if (p.cu_seqlens != nullptr) {
        const int s = p.cu_seqlens[b], e = p.cu_seqlens[b + 1];
        q_base = s;
        q_len = e - s;
        kv_lo = s;
        kv_len = e - s;
        b = 0;
    }
    if (q0 >= q_len) return;
    const int kv_end = kv_lo + kv_len;
    const int kv_need = p.causal ? min(kv_len, q0 + BM) : kv_len;
    const int n_tiles = (kv_need + BN - 1) / BN;

    // Q tile (rows past q_len are zeros) and the first K tile.
    for (int c = tid; c < BM * C::CPR; c += C::NT) {
        const int r = c / C::CPR, ch = c - r * C::CPR;
        const int qi = q0 + r;
        const bf16_t* src = p.q;
        int bytes = 0;
        if (qi < q_len) {
            src = p.q + b * p.q_sb + (i64)(q_base + qi) * p.q_st + h * p.q_sh + ch * 8;
            bytes = 16;
        }
        cp_async_16(sQ + r * LD + ch * 8, src, bytes);
    }
    cp_async_commit();
    if (n_tiles > 0) load_kv_tile<D, false>(sK, p, b, hk, kv_lo, kv_end);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    u32 qf[KD][4];
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
        const int row = warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
        ldmatrix_x4(qf[kk], sQ + row * LD + kk * 16 + 8 * (lane >> 4));
    }

    float o[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_run[2] = {-QI_INF, -QI_INF};
    float l_run[2] = {0.f, 0.f};
    const int row0 = q0 + warp * 16 + g;  // this thread's rows: row0 and row0 + 8 (relative query index)

    for (int it = 0; it < n_tiles; ++it) {
        const int j0 = kv_lo + it * BN;
        if (it > 0) {
            cp_async_wait_all();
            __syncthreads();
        }
        load_kv_tile<D, true>(sV, p, b, hk, j0, kv_end);
        cp_async_commit();

        // S = Q Kᵀ (16 x 64 per warp).
        float s[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
            for (int nt = 0; nt < BN / 16; ++nt) {
                u32 kf[4];
                const int key = nt * 16 + (lane & 7) + 8 * (lane >> 4);
                ldmatrix_x4(kf, sK + key * LD + kk * 16 + 8 * ((lane >> 3) & 1));
                mma_bf16_16816(s[2 * nt], qf[kk], kf[0], kf[1]);
                mma_bf16_16816(s[2 * nt + 1], qf[kk], kf[2], kf[3]);
            }
        }

        // Masking: keys past the end, the key mask, causality.
        const bool tail = j0 + BN > kv_end;
        const bool causal_cut = p.causal && (j0 - kv_lo + BN - 1 > q0 + warp * 16);
        const bool masked = p.mask != nullptr && p.mask_tile_full[b * p.n_mask_tiles + it] == 0;
        if (tail || masked || causal_cut) {
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = j0 + n * 8 + 2 * c4 + e;
                    bool ok = j < kv_end;
                    if (ok && masked) ok = p.mask[b * p.mask_sb + j] != 0;
                    const int kj = j - kv_lo;
                    const bool ok0 = ok && !(p.causal && kj > row0);
                    const bool ok1 = ok && !(p.causal && kj > row0 + 8);
                    if (!ok0) s[n][e] = -QI_INF;
                    if (!ok1) s[n][2 + e] = -QI_INF;
                }
            }
        }

        // Online softmax (base 2). Rows r = 0 (row0) and r = 1 (row0 + 8).
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = -QI_INF;
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m_run[r], mx * p.scale_log2);
            const float m_use = m_new == -QI_INF ? 0.f : m_new;
            alpha[r] = m_run[r] == -QI_INF ? 0.f : fast_exp2(m_run[r] - m_use);
            m_run[r] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) {
                const float p0 = fast_exp2(fmaf(s[n][2 * r], p.scale_log2, -m_use));
                const float p1 = fast_exp2(fmaf(s[n][2 * r + 1], p.scale_log2, -m_use));
                s[n][2 * r] = p0;
                s[n][2 * r + 1] = p1;
                sum += p0 + p1;
            }
            l_run[r] = l_run[r] * alpha[r] + sum;
        }
#pragma unroll
        for (int n = 0; n < ND; ++n) {
            o[n][0] *= alpha[0];
            o[n][1] *= alpha[0];
            o[n][2] *= alpha[1];
            o[n][3] *= alpha[1];
        }
        u32 pf[BN / 16][4];
#pragma unroll
        for (int t = 0; t < BN / 16; ++t) {
            pf[t][0] = pack_bf16x2(s[2 * t][0], s[2 * t][1]);
            pf[t][1] = pack_bf16x2(s[2 * t][2], s[2 * t][3]);
            pf[t][2] = pack_bf16x2(s[2 * t + 1][0], s[2 * t + 1][1]);
            pf[t][3] = pack_bf16x2(s[2 * t + 1][2], s[2 * t + 1][3]);
        }

        cp_async_wait_all();
        __syncthreads();  // V tile visible; every warp is done with this K tile
        if (it + 1 < n_tiles) load_kv_tile<D, false>(sK, p, b, hk, j0 + BN, kv_end);
        cp_async_commit();

        // O += P V.
#pragma unroll
        for (int t = 0; t < BN / 16; ++t) {
#pragma unroll
            for (int dn = 0; dn < ND / 2; ++dn) {
                u32 vf[4];
                const int key = t * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
                ldmatrix_x4_trans(vf, sV + key * LD + dn * 16 + 8 * (lane >> 4));
                mma_bf16_16816(o[2 * dn], pf[t], vf[0], vf[1]);
                mma_bf16_16816(o[2 * dn + 1], pf[t], vf[2], vf[3]);
            }
        }
    }
    cp_async_wait_all();

    // Normalize and store.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float l = quad_sum(l_run[r]);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int qi = row0 + 8 * r;
        if (qi < q_len) {
            bf16_t* dst = p.o + b * p.o_sb + (i64)(q_base + qi) * p.o_st + h * p.o_sh + 2 * c4;
#pragma unroll
            for (int n = 0; n < ND; ++n) {
                *reinterpret_cast<u32*>(dst + n * 8) = pack_bf16x2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_d128(const FlashParams p) { flash_fwd<128>(p); }
extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_d80(const FlashParams p) { flash_fwd<80>(p); }
extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_d64(const FlashParams p) { flash_fwd<64>(p); }
extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_d32(const FlashParams p) { flash_fwd<32>(p); }
extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_d16(const FlashParams p) { flash_fwd<16>(p); }

// mask_tile_full[b, t] = 1 when every key of tile t (`tile` keys) of batch row b attends. One warp per (b, t).
extern "C" __global__ void flash_mask_tiles(const unsigned char* mask, i64 mask_sb, int total_keys, int n_tiles,
                                            int batch, int tile, unsigned char* out) {
    const int w = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (w >= batch * n_tiles) return;
    const int b = w / n_tiles, t = w - b * n_tiles;
    bool ok = true;
    for (int i = lane; i < tile; i += 32) {
        const int j = t * tile + i;
        if (j < total_keys) ok = ok && mask[b * mask_sb + j] != 0;
    }
    ok = __all_sync(0xffffffffu, ok);
    if (lane == 0) out[w] = ok ? 1 : 0;
}
