// FP8 flash attention for Hopper (sm_90a), head dim 128: what qwen_image::quant::attention defines (Q·Kᵀ on 8-bit
// integers with smoothed keys, P·V in e4m3), on the structure of `flash_attention_tma.cu` (one producer thread
// issuing TMA copies, two consumer warpgroups of 64 queries, S(t) = Q·K(t)ᵀ issued together with
// O += P(t-1)·V(t-1)), with 8-bit operands on both warpgroup MMAs (k = 32 per instruction, twice the bf16 rate).
//
// The operands are made first by five passes over the call's bf16 tensors (`fp8_attn_*` below):
//   - Q per (batch, query, head) row: int8 values and a scale (`quant_q`);
//   - per (batch, key head, column): partial sums of K over blocks of 64 keys, and the largest |V| by atomic maxima
//     on f32 bits (non-negative floats order as their bits) (`kv_stats`); the keys' mean from the partial sums in
//     block order, deterministic (`k_mean`);
//   - K minus its mean as int8 per key row, with the row's scale, the segments concatenated (`quant_k`);
//   - V in e4m3 with its column's scale, transposed to [batch, kv_heads, 128, kpad] so that P·V reads it K-major
//     (the only layout 8-bit warpgroup MMAs take for B), keys padded with zeros to whole tiles of 128 and permuted
//     within each group of 32 so that P goes from S's accumulator registers to the A operand of P·V without
//     shuffles: A-operand column a of a 32-key step holds key `fp8_key_of_slot(a)` (`quant_vt`).
// The main kernel converts the exact integer logits to f32 times the key's scale, scales each row by sq·log2(e)/√d,
// keeps probabilities in [0, 256] (2^(x − m + 8), FlashAttention-3's Max_offset) so that small ones stay normal in
// e4m3, and multiplies the output by 1/l and the column's V scale at the end.

#ifndef FP8_STAGES
#define FP8_STAGES 2
#endif
// Every FP8_POLY_EXP-th group of 8 columns computes its exp2 on the FMA units (`exp2_fma`, `wgmma.cuh`); 0 = none.
// Not measured yet: `tools/bench/kernel_variants.py` writes the variants that try it.
#ifndef FP8_POLY_EXP
#define FP8_POLY_EXP 0
#endif

namespace fp8a {
constexpr int STAGES = FP8_STAGES;
constexpr u32 TILE = 128 * 128;  // bytes of a [128 rows][128 bytes] e4m3 tile (one 128-byte swizzled box)
constexpr int CONSUMER_WARPS = 8;
constexpr int D = 128;
}  // namespace fp8a

// The buffers of one call (`cuda/attention/fp8.rs` fills the Rust mirror).
struct Fp8AttnParams {
    signed char* q8;     // [batch, q_len, heads, 128]
    float* q_scale;      // [batch, q_len, heads]
    signed char* k8;     // [batch, total_keys, kv_heads, 128]: K minus its mean
    float* k_scale;      // [batch, kv_heads, kpad]: per key row (past total_keys: unwritten, masked)
    float* k_mean;       // [batch, kv_heads, 128]
    float* k_partial;    // [batch, kv_heads, mean_blocks, 128]: sums of K over blocks of 64 keys
    unsigned char* vt;   // [batch, kv_heads, 128, kpad]
    u32* v_amax;         // [batch, kv_heads, 128]: f32 bits of max |V| per column, zeroed before the passes
    i64 kpad;            // keys rounded up to a multiple of 128
    int heads, kv_heads;
    int mean_blocks;     // ceil(total_keys / 64)
    int pad;
};
QI_ASSERT_LAYOUT(Fp8AttnParams, 88, 8);
QI_ASSERT_OFFSET(Fp8AttnParams, q8, 0);
QI_ASSERT_OFFSET(Fp8AttnParams, q_scale, 8);
QI_ASSERT_OFFSET(Fp8AttnParams, k8, 16);
QI_ASSERT_OFFSET(Fp8AttnParams, k_scale, 24);
QI_ASSERT_OFFSET(Fp8AttnParams, k_mean, 32);
QI_ASSERT_OFFSET(Fp8AttnParams, k_partial, 40);
QI_ASSERT_OFFSET(Fp8AttnParams, vt, 48);
QI_ASSERT_OFFSET(Fp8AttnParams, v_amax, 56);
QI_ASSERT_OFFSET(Fp8AttnParams, kpad, 64);
QI_ASSERT_OFFSET(Fp8AttnParams, heads, 72);
QI_ASSERT_OFFSET(Fp8AttnParams, kv_heads, 76);
QI_ASSERT_OFFSET(Fp8AttnParams, mean_blocks, 80);
QI_ASSERT_OFFSET(Fp8AttnParams, pad, 84);

// Tensor maps of the quantized operands, 128-byte swizzle, boxes of 128 x 128 bytes: Q8 and K8 as
// (128 columns, head, token, batch), Vt as (key, column, key head, batch).
struct Fp8Maps {
    TensorMap q;
    TensorMap k;
    TensorMap vt;
};
QI_ASSERT_LAYOUT(Fp8Maps, 384, 64);
QI_ASSERT_OFFSET(Fp8Maps, q, 0);
QI_ASSERT_OFFSET(Fp8Maps, k, 128);
QI_ASSERT_OFFSET(Fp8Maps, vt, 256);

// The key held by A-operand column `a` (0..31) of a 32-key step of P·V. A thread's S accumulators of one step are
// keys 2c, 2c+1 (row g and g+8), 8+2c, 9+2c, 16+2c, 17+2c, 24+2c, 25+2c; the 8-bit A fragment wants columns
// 4c..4c+3 and 16+4c..19+4c. Packing the accumulators in that order defines the permutation.
__device__ __forceinline__ int fp8_key_of_slot(int a) {
    return 16 * (a >> 4) + 8 * ((a & 3) >> 1) + 2 * ((a >> 2) & 3) + (a & 1);
}

// The segment holding logical key `j` and the key's row in it.
__device__ __forceinline__ int fp8_seg_of(const FlashParams& p, int j, int& row) {
    int s = 0;
#pragma unroll
    for (int i = 1; i < MAX_SEGS; ++i) {
        if (i < p.n_segs && j >= p.seg[i].start) s = i;
    }
    row = j - p.seg[s].start;
    return s;
}

// Four bf16 as f32 (an 8-byte load).
__device__ __forceinline__ void load4(const bf16_t* src, float (&v)[4]) {
    const uint2 w = *reinterpret_cast<const uint2*>(src);
    v[0] = lo_f32(w.x);
    v[1] = hi_f32(w.x);
    v[2] = lo_f32(w.y);
    v[3] = hi_f32(w.y);
}

// Four f32 divided by `s` (IEEE) as e4m3 bytes, the first in the lowest byte.
__device__ __forceinline__ u32 e4m3x4(const float (&v)[4], float s) {
    return (u32)e4m3x2(__fdiv_rn(v[0], s), __fdiv_rn(v[1], s)) |
           ((u32)e4m3x2(__fdiv_rn(v[2], s), __fdiv_rn(v[3], s)) << 16);
}

// The scale of an int8 row whose largest magnitude is `amax` (qwen_image::quant::attention::int8_row_scale).
__device__ __forceinline__ float int8_row_scale(float amax) {
    const float s = __fdiv_rn(amax, 127.f);
    return s >= 1.17549435e-38f ? s : 1.f;
}

// Four f32 divided by `s` (IEEE), rounded to nearest even and clamped to ±127, as int8 bytes (the first lowest).
__device__ __forceinline__ u32 int8x4(const float (&v)[4], float s) {
    u32 r = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int q = max(-127, min(127, __float2int_rn(__fdiv_rn(v[e], s))));
        r |= ((u32)q & 0xffu) << (8 * e);
    }
    return r;
}

// Q: one warp per (batch, query, head) row of 128; 8 warps per block.
extern "C" __global__ void __launch_bounds__(256) fp8_attn_quant_q(const FlashParams p, const Fp8AttnParams f) {
    const i64 row = (i64)blockIdx.x * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= (i64)p.n_blocks * p.q_len * f.heads) return;
    const int h = (int)(row % f.heads), i = (int)((row / f.heads) % p.q_len), b = (int)(row / ((i64)f.heads * p.q_len));
    float v[4];
    load4(p.q + b * p.q_sb + (i64)i * p.q_st + h * p.q_sh + 4 * lane, v);
    const float s = int8_row_scale(warp_max(fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])))));
    reinterpret_cast<u32*>(f.q8 + row * fp8a::D)[lane] = int8x4(v, s);
    if (lane == 0) f.q_scale[row] = s;
}

// Partial sums of K per (batch, key head, column) over each block of 64 keys (in key order), and the largest |V| per
// column: grid (mean_blocks, kv_heads, batch), 128 threads, thread = column.
extern "C" __global__ void __launch_bounds__(128) fp8_attn_kv_stats(const FlashParams p, const Fp8AttnParams f) {
    const int d = threadIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const int j0 = blockIdx.x * 64, j1 = min(j0 + 64, p.total_keys);
    float sum = 0.f, mv = 0.f;
    // Unrolled so that several keys' loads are in flight at once (the sum's order stays the keys').
#pragma unroll 8
    for (int j = j0; j < j1; ++j) {
        int r;
        const KvSeg& sg = p.seg[fp8_seg_of(p, j, r)];
        sum += bf16_to_f32(sg.k[b * sg.k_sb + (i64)r * sg.k_st + hk * sg.k_sh + d]);
        mv = fmaxf(mv, fabsf(bf16_to_f32(sg.v[b * sg.v_sb + (i64)r * sg.v_st + hk * sg.v_sh + d])));
    }
    f.k_partial[(((i64)b * f.kv_heads + hk) * f.mean_blocks + blockIdx.x) * fp8a::D + d] = sum;
    atomicMax(f.v_amax + (b * f.kv_heads + hk) * fp8a::D + d, __float_as_uint(mv));
}

// The keys' mean per (batch, key head, column): the partial sums added in block order. Grid (kv_heads, batch).
extern "C" __global__ void __launch_bounds__(128) fp8_attn_k_mean(const FlashParams p, const Fp8AttnParams f) {
    const int d = threadIdx.x, hk = blockIdx.x, b = blockIdx.y;
    const float* part = f.k_partial + ((i64)b * f.kv_heads + hk) * f.mean_blocks * fp8a::D + d;
    float total = 0.f;
    for (int i = 0; i < f.mean_blocks; ++i) total += part[(i64)i * fp8a::D];
    f.k_mean[(b * f.kv_heads + hk) * fp8a::D + d] = __fdiv_rn(total, (float)p.total_keys);
}

// K minus its mean as int8 with the row's scale, segments concatenated: one warp per (batch, key, key head) row.
extern "C" __global__ void __launch_bounds__(256) fp8_attn_quant_k(const FlashParams p, const Fp8AttnParams f) {
    const i64 row = (i64)blockIdx.x * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= (i64)p.n_blocks * p.total_keys * f.kv_heads) return;
    const int hk = (int)(row % f.kv_heads), j = (int)((row / f.kv_heads) % p.total_keys);
    const int b = (int)(row / ((i64)f.kv_heads * p.total_keys));
    int r;
    const KvSeg& sg = p.seg[fp8_seg_of(p, j, r)];
    float v[4];
    load4(sg.k + b * sg.k_sb + (i64)r * sg.k_st + hk * sg.k_sh + 4 * lane, v);
    const float4 mean = reinterpret_cast<const float4*>(f.k_mean + (b * f.kv_heads + hk) * fp8a::D)[lane];
    v[0] -= mean.x;
    v[1] -= mean.y;
    v[2] -= mean.z;
    v[3] -= mean.w;
    const float s = int8_row_scale(warp_max(fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])))));
    reinterpret_cast<u32*>(f.k8 + row * fp8a::D)[lane] = int8x4(v, s);
    if (lane == 0) f.k_scale[((i64)b * f.kv_heads + hk) * f.kpad + j] = s;
}

// V transposed and quantized with its columns' scales: grid (kpad / 128, kv_heads, batch), 256 threads. The tile of
// 128 keys x 128 columns goes through shared memory; thread (column d, half) writes 64 bytes of Vt's row d.
extern "C" __global__ void __launch_bounds__(256) fp8_attn_quant_vt(const FlashParams p, const Fp8AttnParams f) {
    __shared__ __align__(16) bf16_t tile[128][fp8a::D];  // written and read as 16-byte vectors
    const int hk = blockIdx.y, b = blockIdx.z, j0 = blockIdx.x * 128;
    for (int e = threadIdx.x; e < 128 * 16; e += 256) {
        const int jr = e >> 4, c8 = (e & 15) * 8, j = j0 + jr;
        uint4 w = make_uint4(0, 0, 0, 0);
        if (j < p.total_keys) {
            int r;
            const KvSeg& sg = p.seg[fp8_seg_of(p, j, r)];
            w = *reinterpret_cast<const uint4*>(sg.v + b * sg.v_sb + (i64)r * sg.v_st + hk * sg.v_sh + c8);
        }
        *reinterpret_cast<uint4*>(&tile[jr][c8]) = w;
    }
    __syncthreads();
    const int d = threadIdx.x & 127, half = threadIdx.x >> 7;
    const float s = e4m3_row_scale(__uint_as_float(f.v_amax[(b * f.kv_heads + hk) * fp8a::D + d]));
    unsigned char* dst = f.vt + (((i64)b * f.kv_heads + hk) * fp8a::D + d) * f.kpad + j0 + 64 * half;
#pragma unroll
    for (int w4 = 0; w4 < 4; ++w4) {
        u32 word[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int a0 = 64 * half + 16 * w4 + 4 * q;  // the tile's slots a0 .. a0 + 3
            float v[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int a = a0 + e;
                v[e] = bf16_to_f32(tile[32 * (a >> 5) + fp8_key_of_slot(a & 31)][d]);
            }
            word[q] = e4m3x4(v, s);
        }
        *reinterpret_cast<uint4*>(dst + 16 * w4) = make_uint4(word[0], word[1], word[2], word[3]);
    }
}

// D(64 x 128) (+)= A(64 x 32, shared, K-major) · B(128 x 32, shared, K-major)ᵀ, int8 with int32 sums (exact);
// `acc` = 0 overwrites D.
__device__ __forceinline__ void wgmma_ss_m64n128k32_s8(int (&d)[64], u64 desc_a, u64 desc_b, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(acc));
}

// D(64 x 128) += A(64 x 32, registers: the 8-bit fragment) · B(128 x 32, shared, K-major)ᵀ, e4m3.
__device__ __forceinline__ void wgmma_rs_m64n128k32_e4m3(float (&d)[64], const u32 (&a)[4], u64 desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// P (accumulator layout) -> the 8-bit A fragments of the 4 k-steps of P·V, in the key order `fp8_key_of_slot`.
__device__ __forceinline__ void fp8_pack_p(u32 (&pa)[4][4], const float (&s)[64]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        const float* t = s + 16 * kk;
        pa[kk][0] = (u32)e4m3x2(t[0], t[1]) | ((u32)e4m3x2(t[4], t[5]) << 16);
        pa[kk][1] = (u32)e4m3x2(t[2], t[3]) | ((u32)e4m3x2(t[6], t[7]) << 16);
        pa[kk][2] = (u32)e4m3x2(t[8], t[9]) | ((u32)e4m3x2(t[12], t[13]) << 16);
        pa[kk][3] = (u32)e4m3x2(t[10], t[11]) | ((u32)e4m3x2(t[14], t[15]) << 16);
    }
}

__device__ __forceinline__ void fp8_issue_qk(int (&s)[64], u32 qa, u32 sk) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_ss_m64n128k32_s8(s, sw128_desc(qa + 32 * kk), sw128_desc(sk + 32 * kk), kk > 0);
}

template <int N>
__device__ __forceinline__ void keep_s32(int (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// The key scales of the thread's columns of tile `t` (8n + 2c4 and + 1), loaded while the tensor cores work.
__device__ __forceinline__ void fp8_key_scales(float2 (&ks)[16], const Fp8AttnParams& f, int b, int hk, int t, int c4) {
    const float2* src = reinterpret_cast<const float2*>(f.k_scale + ((i64)b * f.kv_heads + hk) * f.kpad + t * tma::BN + 2 * c4);
#pragma unroll
    for (int n = 0; n < 16; ++n) ks[n] = __ldg(src + 4 * n);
}

// An integer of magnitude below 2^22 as f32, exactly, without the conversion unit (which the softmax's exp2 and the
// e4m3 packing already keep busy, at 16 results per clock and SM): its bits added to those of 1.5·2^23 give
// 1.5·2^23 + i, from which the subtraction is exact. The integer logits are at most 127·127·128 < 2^21.
__device__ __forceinline__ float small_int_to_f32(int i) {
    return __int_as_float(0x4B400000 + i) - 12582912.f;
}

// S = f32(integer logits) · the key's scale.
__device__ __forceinline__ void fp8_logits(float (&s)[64], const int (&si)[64], const float2 (&ks)[16]) {
#pragma unroll
    for (int n = 0; n < 16; ++n) {
        s[4 * n] = small_int_to_f32(si[4 * n]) * ks[n].x;
        s[4 * n + 1] = small_int_to_f32(si[4 * n + 1]) * ks[n].y;
        s[4 * n + 2] = small_int_to_f32(si[4 * n + 2]) * ks[n].x;
        s[4 * n + 3] = small_int_to_f32(si[4 * n + 3]) * ks[n].y;
    }
}

__device__ __forceinline__ void fp8_issue_pv(float (&o)[64], const u32 (&pa)[4][4], u32 sv) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs_m64n128k32_e4m3(o, pa[kk], sw128_desc(sv + 32 * kk));
}

// Applies V's column scales to O, then normalizes it by the row sums and stores the thread's rows `row0` and
// `row0` + 8 (`wg_store_o`).
__device__ __forceinline__ void fp8_store_o(const FlashParams& p, const Fp8AttnParams& f, float (&o)[64],
                                            const float (&l_run)[2], int row0, int b, int h, int hk, int c4) {
    const u32* amax = f.v_amax + (b * f.kv_heads + hk) * fp8a::D;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const float sv = e4m3_row_scale(__uint_as_float(amax[8 * n + 2 * c4 + e]));
            o[4 * n + e] *= sv;
            o[4 * n + 2 + e] *= sv;
        }
    }
    wg_store_o(p, o, l_run, row0, b, h, c4);
}

// Dynamic shared memory: 1024 (alignment) + Q + STAGES x (K + Vt) + barriers. Not causal (the host checks).
extern "C" __global__ void __launch_bounds__(384, 1)
    flash_fwd_fp8_d128(const __grid_constant__ FlashParams p, const __grid_constant__ Fp8AttnParams f,
                       const __grid_constant__ Fp8Maps maps) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const u32 sq = base, sk = base + fp8a::TILE, sv = sk + fp8a::STAGES * fp8a::TILE;
    const u32 bar = sv + fp8a::STAGES * fp8a::TILE;
    auto q_full = [&]() { return bar; };
    auto k_full = [&](int s) { return bar + 8 * (1 + s); };
    auto k_empty = [&](int s) { return bar + 8 * (1 + fp8a::STAGES + s); };
    auto v_full = [&](int s) { return bar + 8 * (1 + 2 * fp8a::STAGES + s); };
    auto v_empty = [&](int s) { return bar + 8 * (1 + 3 * fp8a::STAGES + s); };
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int h = blockIdx.y, hk = h / p.kv_group, b = blockIdx.z;
    const int q0 = blockIdx.x * tma::BM;
    const int n_tiles = (p.total_keys + tma::BN - 1) / tma::BN;

    if (tid == 0) {
        mbar_init(q_full(), 1);
        for (int s = 0; s < fp8a::STAGES; ++s) {
            mbar_init(k_full(s), 1);
            mbar_init(v_full(s), 1);
            mbar_init(k_empty(s), fp8a::CONSUMER_WARPS);
            mbar_init(v_empty(s), fp8a::CONSUMER_WARPS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (warp < 4) {
        // Producer warpgroup.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
        if (tid == 0) {
            mbar_expect_tx(q_full(), fp8a::TILE);
            tma_load(sq, &maps.q, 0, h, q0, b, q_full());
            for (int t = 0; t < n_tiles; ++t) {
                const int st = t % fp8a::STAGES, use = t / fp8a::STAGES;
                if (use > 0) mbar_wait(k_empty(st), (use - 1) & 1);
                mbar_expect_tx(k_full(st), fp8a::TILE);
                tma_load(sk + st * fp8a::TILE, &maps.k, 0, hk, t * tma::BN, b, k_full(st));
                if (use > 0) mbar_wait(v_empty(st), (use - 1) & 1);
                mbar_expect_tx(v_full(st), fp8a::TILE);
                tma_load(sv + st * fp8a::TILE, &maps.vt, t * tma::BN, 0, hk, b, v_full(st));
            }
        }
        return;
    }

    // Consumer warpgroups: 64 query rows each.
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
    const int wgi = (warp >> 2) - 1, wq = warp & 3;
    const int g = lane >> 2, c4 = lane & 3;
    const int row0 = q0 + wgi * 64 + wq * 16 + g;  // this thread's rows: row0 and row0 + 8
    const u32 qa = sq + wgi * 64 * fp8a::D;
    float frow[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int qi = row0 + 8 * r;
        // Rows past the end read zeros (the copy engine's fill); any positive factor keeps them finite.
        frow[r] = qi < p.q_len ? f.q_scale[((i64)b * p.q_len + qi) * f.heads + h] * p.scale_log2 : 1.f;
    }
    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    float m_run[2] = {-QI_INF, -QI_INF}, l_run[2] = {0.f, 0.f}, alpha[2];
    float s[64];
    int si[64];
    float2 ks[16];
    u32 pa[4][4];
    mbar_wait(q_full(), 0);
    auto mask_tile = [&](int t) {
        const int j0 = t * tma::BN, count = min(tma::BN, p.total_keys - j0);
        if (count < tma::BN || p.mask != nullptr) tma_mask(s, p, b, j0, count, row0, c4);
    };

    // Tile 0: S only.
    mbar_wait(k_full(0), 0);
    wgmma_fence();
    fp8_issue_qk(si, qa, sk);
    wgmma_commit();
    fp8_key_scales(ks, f, b, hk, 0, c4);
    wgmma_wait<0>();
    keep_s32(si);
    tma_release(k_empty(0), lane);
    fp8_logits(s, si, ks);
    mask_tile(0);
    wg_softmax_rows<FP8_POLY_EXP>(s, m_run, l_run, alpha, frow, 8.f);
    fp8_pack_p(pa, s);
    for (int t = 1; t < n_tiles; ++t) {
        const int st = t % fp8a::STAGES, sp = (t - 1) % fp8a::STAGES;
        mbar_wait(k_full(st), (t / fp8a::STAGES) & 1);
        mbar_wait(v_full(sp), ((t - 1) / fp8a::STAGES) & 1);
        keep_f32(o);
        wgmma_fence();
        fp8_issue_qk(si, qa, sk + st * fp8a::TILE);
        wgmma_commit();
        fp8_issue_pv(o, pa, sv + sp * fp8a::TILE);
        wgmma_commit();
        fp8_key_scales(ks, f, b, hk, t, c4);
        wgmma_wait<1>();
        keep_s32(si);
        tma_release(k_empty(st), lane);
        fp8_logits(s, si, ks);
        mask_tile(t);
        wg_softmax_rows<FP8_POLY_EXP>(s, m_run, l_run, alpha, frow, 8.f);
        wgmma_wait<0>();
        keep_f32(o);
        keep_frag(pa);
        tma_release(v_empty(sp), lane);
        wg_scale_o(o, alpha);
        fp8_pack_p(pa, s);
    }
    const int sl = (n_tiles - 1) % fp8a::STAGES;
    mbar_wait(v_full(sl), ((n_tiles - 1) / fp8a::STAGES) & 1);
    keep_f32(o);
    wgmma_fence();
    fp8_issue_pv(o, pa, sv + sl * fp8a::TILE);
    wgmma_commit();
    wgmma_wait<0>();
    keep_f32(o);
    keep_frag(pa);
    fp8_store_o(p, f, o, l_run, row0, b, h, hk, c4);
}
