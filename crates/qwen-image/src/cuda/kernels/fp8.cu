// e4m3 quantization of rows: the weights per output channel at load time, the activations per token in every FP8
// GEMM. scale = max|x| / 448 over the row (1 when that is below the smallest normal f32), q = e4m3(x / scale) with
// the division in IEEE f32 and the conversion rounding to nearest even and saturating (cvt.rn.satfinite, sm_89+):
// bit-identical to qwen_image::quant::e4m3::quantize_rows.

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

// Two f32 as e4m3 bytes: `lo` in the low byte.
__device__ __forceinline__ unsigned short e4m3x2(float lo, float hi) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// One block per row.
extern "C" __global__ void __launch_bounds__(FP8_THREADS) fp8_quantize_rows(const Fp8RowsParams p) {
    __shared__ float red[FP8_THREADS / 32];
    const int row = blockIdx.x;
    const bf16_t* x = p.x + (i64)row * p.x_sr;
    float m = 0.f;
    for (int i = threadIdx.x; i < p.k; i += FP8_THREADS) m = fmaxf(m, fabsf(bf16_to_f32(x[i])));
    m = warp_max(m);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = warp_max(lane < FP8_THREADS / 32 ? red[lane] : 0.f);
    float s = __fdiv_rn(m, 448.f);
    if (!(s >= 1.17549435e-38f)) s = 1.f;
    if (threadIdx.x == 0) p.scale[row] = s;
    unsigned short* q = reinterpret_cast<unsigned short*>(p.q + (i64)row * p.k);
    for (int i = threadIdx.x; 2 * i < p.k; i += FP8_THREADS) {
        q[i] = e4m3x2(__fdiv_rn(bf16_to_f32(x[2 * i]), s), __fdiv_rn(bf16_to_f32(x[2 * i + 1]), s));
    }
}
