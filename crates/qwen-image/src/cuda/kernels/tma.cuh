// The tensor-memory-accelerator (TMA) machinery shared by the warp-specialized Hopper flash-attention kernels
// (`flash_attention_tma.cu` in bf16, `flash_attention_fp8.cu` in e4m3): tensor maps, mbarriers, bulk tensor copies,
// the walk over key tiles and the masking of S. Prepended to both by `kernels/mod.rs`, after `flash_params.cuh`.

namespace tma {
constexpr int BM = 128, BN = 128;  // queries per CTA, keys per tile
}  // namespace tma

// The driver's opaque tensor map (`CUtensorMap`), encoded on the host by `cuTensorMapEncodeTiled`.
struct __align__(64) TensorMap {
    u64 opaque[16];
};
QI_ASSERT_LAYOUT(TensorMap, 128, 64);

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(u32 bar, u32 parity) {
    u32 ok;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(ok)
        : "r"(bar), "r"(parity)
        : "memory");
    return ok != 0;
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    while (!mbar_try_wait(bar, parity)) {
    }
}

// Copies box (c0 .. c0 + 63, head, row .. row + 127, batch) of `map` to `dst`, completing on `bar`.
__device__ __forceinline__ void tma_load(u32 dst, const TensorMap* map, int c0, int head, int row, int batch,
                                         u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(head), "r"(row), "r"(batch), "r"(bar)
        : "memory");
}

__device__ __forceinline__ void named_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void named_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }

template <int N>
__device__ __forceinline__ void keep_f32(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int A, int B>
__device__ __forceinline__ void keep_frag(u32 (&r)[A][B]) {
#pragma unroll
    for (int i = 0; i < A; ++i)
#pragma unroll
        for (int j = 0; j < B; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// Walks the key tiles of a call in order: segment by segment, 128 keys at a time from each segment's start,
// skipping empty segments.
struct TileWalk {
    int seg, row;  // segment and its first row of the current tile
    __device__ __forceinline__ static TileWalk first(const FlashParams& p) {
        TileWalk w{0, 0};
        w.skip_empty(p);
        return w;
    }
    __device__ __forceinline__ void next(const FlashParams& p) {
        row += tma::BN;
        if (row >= p.seg[seg].len) {
            ++seg;
            row = 0;
            skip_empty(p);
        }
    }
    __device__ __forceinline__ void skip_empty(const FlashParams& p) {
        while (seg < p.n_segs && p.seg[seg].len == 0) ++seg;
    }
    __device__ __forceinline__ int j0(const FlashParams& p) const { return p.seg[seg].start + row; }
    __device__ __forceinline__ int count(const FlashParams& p) const { return min(tma::BN, p.seg[seg].len - row); }
};

// Number of tiles holding keys below `kv_need` (every tile, without causality).
__device__ __forceinline__ int tile_count(const FlashParams& p, int kv_need) {
    int n = 0;
#pragma unroll
    for (int s = 0; s < MAX_SEGS; ++s) {
        if (s < p.n_segs) {
            const int len = min(p.seg[s].len, max(0, kv_need - p.seg[s].start));
            n += (len + tma::BN - 1) / tma::BN;
        }
    }
    return n;
}

// Masks S (one warp's 16 rows: `row` and `row` + 8) for the tile of keys j0 .. j0 + count - 1.
__device__ __forceinline__ void tma_mask(float (&s)[64], const FlashParams& p, int b, int j0, int count, int row,
                                         int c4) {
#pragma unroll
    for (int n = 0; n < 16; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int c = n * 8 + 2 * c4 + e, j = j0 + c;
            const bool ok = c < count && (p.mask == nullptr || p.mask[b * p.mask_sb + j] != 0);
            const bool ok0 = ok && !(p.causal && j > row);
            const bool ok1 = ok && !(p.causal && j > row + 8);
            s[4 * n + e] = ok0 ? s[4 * n + e] : -QI_INF;
            s[4 * n + 2 + e] = ok1 ? s[4 * n + 2 + e] : -QI_INF;
        }
    }
}

// Releases a stage: one arrival per consumer warp, after the warp's reads of it have completed.
__device__ __forceinline__ void tma_release(u32 bar, int lane) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
}
