// e4m3 quantization of rows: the weights per output channel at load time, the activations per token before an FP8
// GEMM whose input no fused kernel quantized. The rounding is the prelude's (`e4m3_row_scale`, `e4m3x2`: IEEE
// division, round to nearest even, saturating; sm_89+): bit-identical to qwen_image::quant::e4m3::quantize_rows.

#define FP8_THREADS 128

struct Fp8RowsParams {
    const bf16_t* x;   // [rows, K], K contiguous, rows x_sr elements apart
    unsigned char* q;  // [rows, K], dense
    float* scale;      // [rows]
    i64 x_sr;
    int rows, k;       // K even
};
QI_ASSERT_LAYOUT(Fp8RowsParams, 40, 8);
QI_ASSERT_OFFSET(Fp8RowsParams, x, 0);
QI_ASSERT_OFFSET(Fp8RowsParams, q, 8);
QI_ASSERT_OFFSET(Fp8RowsParams, scale, 16);
QI_ASSERT_OFFSET(Fp8RowsParams, x_sr, 24);
QI_ASSERT_OFFSET(Fp8RowsParams, rows, 32);
QI_ASSERT_OFFSET(Fp8RowsParams, k, 36);

// One block per row.
extern "C" __global__ void __launch_bounds__(FP8_THREADS) fp8_quantize_rows(const Fp8RowsParams p) {
    __shared__ float red[FP8_THREADS / 32];
    const int row = blockIdx.x;
    const bf16_t* x = p.x + (i64)row * p.x_sr;
    float m = 0.f;
    for (int i = threadIdx.x; i < p.k; i += FP8_THREADS) m = fmaxf(m, fabsf(bf16_to_f32(x[i])));
    const float s = e4m3_row_scale(block_max<FP8_THREADS>(m, red));
    if (threadIdx.x == 0) p.scale[row] = s;
    unsigned short* q = reinterpret_cast<unsigned short*>(p.q + (i64)row * p.k);
    for (int i = threadIdx.x; 2 * i < p.k; i += FP8_THREADS) {
        q[i] = e4m3x2(__fdiv_rn(bf16_to_f32(x[2 * i]), s), __fdiv_rn(bf16_to_f32(x[2 * i + 1]), s));
    }
}

// The same with 16-byte loads and 8-byte stores: K a multiple of 8, rows 16-byte aligned (x_sr a multiple of 8),
// `q` 8-byte aligned. The row is read twice (the second time mostly from L1/L2).
extern "C" __global__ void __launch_bounds__(FP8_THREADS) fp8_quantize_rows_v8(const Fp8RowsParams p) {
    __shared__ float red[FP8_THREADS / 32];
    const int row = blockIdx.x, nv = p.k / 8;
    const uint4* x = reinterpret_cast<const uint4*>(p.x + (i64)row * p.x_sr);
    float m = 0.f;
    for (int i = threadIdx.x; i < nv; i += FP8_THREADS) {
        const uint4 w = x[i];
        const u32 h[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) m = fmaxf(m, fmaxf(fabsf(lo_f32(h[e])), fabsf(hi_f32(h[e]))));
    }
    const float s = e4m3_row_scale(block_max<FP8_THREADS>(m, red));
    if (threadIdx.x == 0) p.scale[row] = s;
    uint2* q = reinterpret_cast<uint2*>(p.q + (i64)row * p.k);
    for (int i = threadIdx.x; i < nv; i += FP8_THREADS) {
        const uint4 w = x[i];
        const float v[8] = {lo_f32(w.x), hi_f32(w.x), lo_f32(w.y), hi_f32(w.y),
                            lo_f32(w.z), hi_f32(w.z), lo_f32(w.w), hi_f32(w.w)};
        q[i] = e4m3x8(v, s);
    }
}

// e4m3 bits as the f32 they stand for (exact: e4m3fn's normals and subnormals are f32 normals; no NaN is ever
// written by the quantizers, which saturate).
__device__ __forceinline__ float e4m3_to_f32(u32 b) {
    const u32 e = (b >> 3) & 15u, m = b & 7u;
    const float v = e == 0 ? (float)m * 0.001953125f : __uint_as_float(((e + 120u) << 23) | (m << 20));
    return (b & 0x80u) ? -v : v;
}

struct Fp8DequantParams {
    const unsigned char* q;  // [rows, K], dense, 8-byte aligned
    const float* scale;      // [rows]
    bf16_t* y;               // [rows, K], dense, 16-byte aligned
    i64 n8;                  // rows·K / 8
    int k;                   // K, a multiple of 8
    int pad;
};
QI_ASSERT_LAYOUT(Fp8DequantParams, 40, 8);
QI_ASSERT_OFFSET(Fp8DequantParams, q, 0);
QI_ASSERT_OFFSET(Fp8DequantParams, scale, 8);
QI_ASSERT_OFFSET(Fp8DequantParams, y, 16);
QI_ASSERT_OFFSET(Fp8DequantParams, n8, 24);
QI_ASSERT_OFFSET(Fp8DequantParams, k, 32);

// y = bf16(e4m3(q) · scale[row]), one rounding of the f32 product (qwen_image::quant::activation::dequantize): eight
// values per thread, 8-byte loads and 16-byte stores.
extern "C" __global__ void __launch_bounds__(FP8_THREADS) fp8_dequantize_rows(const Fp8DequantParams p) {
    const i64 i = (i64)blockIdx.x * FP8_THREADS + threadIdx.x;
    if (i >= p.n8) return;
    const float s = p.scale[(i * 8) / p.k];
    const uint2 w = reinterpret_cast<const uint2*>(p.q)[i];
    float v[8];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        v[e] = e4m3_to_f32((w.x >> (8 * e)) & 0xffu) * s;
        v[4 + e] = e4m3_to_f32((w.y >> (8 * e)) & 0xffu) * s;
    }
    reinterpret_cast<uint4*>(p.y)[i] =
        make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7]));
}
