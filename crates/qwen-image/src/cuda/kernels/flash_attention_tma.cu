// Flash attention forward for Hopper (sm_90a), FlashAttention-3 style: warp-specialized, tiles moved by the
// tensor-memory accelerator (TMA), warpgroup MMA, head dim 128, bf16, f32 softmax statistics.
//
// One CTA = 3 warpgroups over 128 queries of one (batch, head):
//   - warpgroup 0 is the producer: one thread issues every copy (`cp.async.bulk.tensor`, one tensor map per
//     tensor: Q and each key/value segment), completing on mbarriers; the rest of the warpgroup gives its
//     registers back (`setmaxnreg.dec`) and exits;
//   - warpgroups 1 and 2 are consumers of 64 queries each: S = Q·Kᵀ from shared memory, softmax in registers,
//     O += P·V with P from registers and V read in place as an MN-major (transposed) operand.
// Keys stream through `STAGES`-deep rings of K tiles and V tiles with separate full/empty barriers. Tiles never
// straddle segments: each segment is cut into tiles of 128 keys from its own start, rows past its end are zero
// filled by the copy engine and masked; only such edge tiles, causal diagonal tiles and key-masked calls pay for
// masking. With `OVERLAP`, a consumer issues S(t) = Q·K(t)ᵀ and O += P(t-1)·V(t-1) together and computes the
// softmax of S(t) while the tensor cores finish P·V (FlashAttention-3's intra-warpgroup pipelining).
//
// `KvSeg`, `FlashParams` and `MAX_SEGS` come from `flash_params.cuh` (shared with the other kernels; the `k`/`v`
// pointers and strides are not read here: the tensor maps carry them), the wgmma helpers from `wgmma.cuh`, the
// tensor maps, barriers, copies, tile walk and masking from `tma.cuh`.

// Tuning switches (the defaults are the measured best; `QWEN_CUDA_KERNEL_DIR` lets a benchmark try others).
#ifndef TMA_STAGES
#define TMA_STAGES 2
#endif
// Ping-pong: the two consumer warpgroups take turns issuing their matrix products (named barriers), so that one
// warpgroup's softmax runs under the other's products.
#ifndef TMA_PINGPONG
#define TMA_PINGPONG 0
#endif

namespace tma {
constexpr int STAGES = TMA_STAGES;
constexpr u32 HALF = 128 * 128;        // bytes of one [128 rows][64 columns] swizzled half tile
constexpr u32 TILE = 2 * HALF;         // bytes of a [128][128] bf16 tile
constexpr int CONSUMER_WARPS = 8;
}  // namespace tma

// Tensor maps of one call: Q and the key/value segments, each over a [batch, tokens, heads, 128] tensor (dims
// innermost first: head dim, head, token, batch), box = 64 head-dim columns x 1 head x 128 tokens x 1 batch with
// 128-byte swizzle.
struct TmaMaps {
    TensorMap q;
    TensorMap k[MAX_SEGS];
    TensorMap v[MAX_SEGS];
};
QI_ASSERT_LAYOUT(TmaMaps, 1152, 64);
QI_ASSERT_OFFSET(TmaMaps, q, 0);
QI_ASSERT_OFFSET(TmaMaps, k, 128);
QI_ASSERT_OFFSET(TmaMaps, v, 640);

// Both 64-column halves of a 128 x 128 tile.
__device__ __forceinline__ void tma_load_tile(u32 dst, const TensorMap* map, int head, int row, int batch, u32 bar) {
    tma_load(dst, map, 0, head, row, batch, bar);
    tma_load(dst + tma::HALF, map, 64, head, row, batch, bar);
}

// Ping-pong turn of consumer warpgroup `wgi` (0 or 1): wait for it before issuing products, pass it on after.
__device__ __forceinline__ void turn_begin(int wgi) {
    if (TMA_PINGPONG) named_sync(1 + wgi);
}
__device__ __forceinline__ void turn_end(int wgi) {
    if (TMA_PINGPONG) named_arrive(1 + (wgi ^ 1));
}

// MN-major shared-memory descriptor (V), 128-byte swizzle: 64-column halves `HALF` bytes apart (leading byte
// offset), 8-key groups 1024 bytes apart (stride byte offset). K-major operands use `sw128_desc` (`wgmma.cuh`).
__device__ __forceinline__ u64 desc_mnmajor(u32 saddr) {
    return (u64)((saddr & 0x3FFFF) >> 4) | ((u64)(tma::HALF >> 4) << 16) | ((u64)(1024 >> 4) << 32) |
           ((u64)1 << 62);
}

// Shared memory: Q, then the K ring, the V ring, and the barriers.
struct Smem {
    u32 q, k, v, bar;
    __device__ __forceinline__ u32 k_tile(int s) const { return k + s * tma::TILE; }
    __device__ __forceinline__ u32 v_tile(int s) const { return v + s * tma::TILE; }
    __device__ __forceinline__ u32 q_full() const { return bar; }
    __device__ __forceinline__ u32 k_full(int s) const { return bar + 8 * (1 + s); }
    __device__ __forceinline__ u32 k_empty(int s) const { return bar + 8 * (1 + tma::STAGES + s); }
    __device__ __forceinline__ u32 v_full(int s) const { return bar + 8 * (1 + 2 * tma::STAGES + s); }
    __device__ __forceinline__ u32 v_empty(int s) const { return bar + 8 * (1 + 3 * tma::STAGES + s); }
};

// Issues S = Q·Kᵀ for one warpgroup (its 64 rows of Q at `qa`) over the K tile at `sk`.
__device__ __forceinline__ void tma_issue_qk(float (&s)[64], u32 qa, u32 sk) {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        const u32 qoff = (kk >> 2) * tma::HALF + (kk & 3) * 32;
        const u32 koff = (kk >> 2) * tma::HALF + (kk & 3) * 32;
        wgmma_ss_m64n128k16(s, sw128_desc(qa + qoff), sw128_desc(sk + koff), kk > 0);
    }
}

// Issues O += P·V over the V tile at `sv` (16 keys per k-step: 2048 bytes of the [key][64] halves).
__device__ __forceinline__ void tma_issue_pv(float (&o)[64], const u32 (&pa)[8][4], u32 sv) {
#pragma unroll
    for (int t = 0; t < 8; ++t) wgmma_rs_m64n128k16<1>(o, pa[t], desc_mnmajor(sv + t * 2048));
}

template <bool OVERLAP>
__device__ __forceinline__ void flash_tma_body(const FlashParams& p, const TmaMaps& maps) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    Smem sm;
    sm.q = base;
    sm.k = base + tma::TILE;
    sm.v = sm.k + tma::STAGES * tma::TILE;
    sm.bar = sm.v + tma::STAGES * tma::TILE;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int h = blockIdx.y, hk = h / p.kv_group, b = blockIdx.z;
    const int q0 = blockIdx.x * tma::BM;
    const int kv_need = p.causal ? min(p.total_keys, q0 + tma::BM) : p.total_keys;
    const int n_tiles = tile_count(p, kv_need);

    if (tid == 0) {
        mbar_init(sm.q_full(), 1);
        for (int s = 0; s < tma::STAGES; ++s) {
            mbar_init(sm.k_full(s), 1);
            mbar_init(sm.v_full(s), 1);
            mbar_init(sm.k_empty(s), tma::CONSUMER_WARPS);
            mbar_init(sm.v_empty(s), tma::CONSUMER_WARPS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (warp < 4) {
        // Producer warpgroup.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
        if (tid == 0) {
            mbar_expect_tx(sm.q_full(), tma::TILE);
            tma_load_tile(sm.q, &maps.q, h, q0, b, sm.q_full());
            TileWalk w = TileWalk::first(p);
            for (int t = 0; t < n_tiles; ++t) {
                const int st = t % tma::STAGES, use = t / tma::STAGES;
                if (use > 0) mbar_wait(sm.k_empty(st), (use - 1) & 1);
                mbar_expect_tx(sm.k_full(st), tma::TILE);
                tma_load_tile(sm.k_tile(st), &maps.k[w.seg], hk, w.row, b, sm.k_full(st));
                if (use > 0) mbar_wait(sm.v_empty(st), (use - 1) & 1);
                mbar_expect_tx(sm.v_full(st), tma::TILE);
                tma_load_tile(sm.v_tile(st), &maps.v[w.seg], hk, w.row, b, sm.v_full(st));
                w.next(p);
            }
        }
    } else {
        // Consumer warpgroups: 64 query rows each.
        asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
        const int wgi = (warp >> 2) - 1, wq = warp & 3;
        const int g = lane >> 2, c4 = lane & 3;
        const int row0 = q0 + wgi * 64 + wq * 16 + g;  // this thread's rows: row0 and row0 + 8
        const u32 qa = sm.q + wgi * 64 * 128;
        float o[64];
#pragma unroll
        for (int i = 0; i < 64; ++i) o[i] = 0.f;
        float m_run[2] = {-QI_INF, -QI_INF}, l_run[2] = {0.f, 0.f}, alpha[2];
        float s[64];
        u32 pa[8][4];
        TileWalk w = TileWalk::first(p);
        mbar_wait(sm.q_full(), 0);

        // Masking is needed on a partial tile, with a key mask, and on tiles crossing this thread's diagonal.
        auto masked = [&](int j0, int count) {
            return count < tma::BN || p.mask != nullptr || (p.causal && j0 + tma::BN - 1 > row0 - g);
        };

        if (OVERLAP) {
            // Tile 0: S only.
            if (TMA_PINGPONG && wgi == 1) named_arrive(1);  // warpgroup 0 goes first
            mbar_wait(sm.k_full(0), 0);
            turn_begin(wgi);
            wgmma_fence();
            tma_issue_qk(s, qa, sm.k_tile(0));
            wgmma_commit();
            turn_end(wgi);
            wgmma_wait<0>();
            keep_f32(s);
            tma_release(sm.k_empty(0), lane);
            {
                const int j0 = w.j0(p), count = w.count(p);
                if (masked(j0, count)) tma_mask(s, p, b, j0, count, row0, c4);
            }
            wg_softmax(s, m_run, l_run, alpha, p.scale_log2);
            wg_pack_p(pa, s);
            w.next(p);
            for (int t = 1; t < n_tiles; ++t) {
                const int st = t % tma::STAGES, sp = (t - 1) % tma::STAGES;
                mbar_wait(sm.k_full(st), (t / tma::STAGES) & 1);
                mbar_wait(sm.v_full(sp), ((t - 1) / tma::STAGES) & 1);
                keep_f32(o);
                turn_begin(wgi);
                wgmma_fence();
                tma_issue_qk(s, qa, sm.k_tile(st));
                wgmma_commit();
                tma_issue_pv(o, pa, sm.v_tile(sp));
                wgmma_commit();
                turn_end(wgi);
                wgmma_wait<1>();
                keep_f32(s);
                tma_release(sm.k_empty(st), lane);
                const int j0 = w.j0(p), count = w.count(p);
                if (masked(j0, count)) tma_mask(s, p, b, j0, count, row0, c4);
                wg_softmax(s, m_run, l_run, alpha, p.scale_log2);
                wgmma_wait<0>();
                keep_f32(o);
                keep_frag(pa);
                tma_release(sm.v_empty(sp), lane);
                wg_scale_o(o, alpha);
                wg_pack_p(pa, s);
                w.next(p);
            }
            const int sl = (n_tiles - 1) % tma::STAGES;
            mbar_wait(sm.v_full(sl), ((n_tiles - 1) / tma::STAGES) & 1);
            keep_f32(o);
            turn_begin(wgi);
            wgmma_fence();
            tma_issue_pv(o, pa, sm.v_tile(sl));
            wgmma_commit();
            turn_end(wgi);
            wgmma_wait<0>();
            keep_f32(o);
            keep_frag(pa);
            if (TMA_PINGPONG && wgi == 0) named_sync(1);  // the turn warpgroup 1 passed last
        } else {
            for (int t = 0; t < n_tiles; ++t) {
                const int st = t % tma::STAGES, ph = (t / tma::STAGES) & 1;
                mbar_wait(sm.k_full(st), ph);
                wgmma_fence();
                tma_issue_qk(s, qa, sm.k_tile(st));
                wgmma_commit();
                wgmma_wait<0>();
                keep_f32(s);
                tma_release(sm.k_empty(st), lane);
                const int j0 = w.j0(p), count = w.count(p);
                if (masked(j0, count)) tma_mask(s, p, b, j0, count, row0, c4);
                wg_softmax(s, m_run, l_run, alpha, p.scale_log2);
                wg_scale_o(o, alpha);
                wg_pack_p(pa, s);
                mbar_wait(sm.v_full(st), ph);
                keep_f32(o);
                wgmma_fence();
                tma_issue_pv(o, pa, sm.v_tile(st));
                wgmma_commit();
                wgmma_wait<0>();
                keep_f32(o);
                keep_frag(pa);
                tma_release(sm.v_empty(st), lane);
                w.next(p);
            }
        }

        wg_store_o(p, o, l_run, row0, b, h, c4);
    }
}

// Dynamic shared memory: 1024 (alignment) + Q + STAGES x (K + V) + barriers.
extern "C" __global__ void __launch_bounds__(384, 1)
    flash_fwd_tma_d128(const __grid_constant__ FlashParams p, const __grid_constant__ TmaMaps maps) {
    flash_tma_body<true>(p, maps);
}

// The same without intra-warpgroup overlap (S, softmax, P·V in sequence), for comparison.
extern "C" __global__ void __launch_bounds__(384, 1)
    flash_fwd_tma_d128_serial(const __grid_constant__ FlashParams p, const __grid_constant__ TmaMaps maps) {
    flash_tma_body<false>(p, maps);
}
