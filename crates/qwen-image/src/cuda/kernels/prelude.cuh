// Shared helpers of the fast-path kernels. Header-free on purpose: NVRTC compiles these without any CUDA include
// directory (bf16 values are handled as raw 16-bit patterns and converted with PTX instructions).
typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define QI_INF __int_as_float(0x7f800000)

// Layout checks of the parameter structs the host fills: `assert_layout!` on each Rust mirror (`cuda/glue.rs`,
// `cuda/attention/params.rs`) asserts the same size, alignment and field offsets, so a struct changed on one side
// only fails to compile (here with NVRTC, at the module's first use or in `tools/bench/nvrtc_check.py`). Header-free
// NVRTC has neither `offsetof` nor `__builtin_offsetof`; `__INTADDR__` is its front end's constant-address builtin
// (what its own `offsetof` expands to).
#define QI_ASSERT_LAYOUT(T, size, align) \
    static_assert(sizeof(T) == (size) && alignof(T) == (align), #T ": size or alignment differs from the Rust mirror")
#define QI_ASSERT_OFFSET(T, field, offset)                                      \
    static_assert((unsigned long long)__INTADDR__(&(((T*)0)->field)) == (offset), \
                  #T "." #field ": offset differs from the Rust mirror")

__device__ __forceinline__ float bf16_to_f32(bf16_t v) { return __uint_as_float(((u32)v) << 16); }

// Round-to-nearest-even f32 -> bf16.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// Packs two f32 into a bf16x2 word (`lo` in the low half).
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float lo_f32(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_f32(u32 w) { return __uint_as_float(w & 0xffff0000u); }

// Rounds an f32 to bf16 precision (and back), as a bf16 tensor op followed by a read would.
__device__ __forceinline__ float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ u32 smem_u32(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// 16-byte asynchronous global -> shared copy; `src_bytes` < 16 zero-fills the rest (0 = pure zero fill).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

// D = A(16x16, row) * B(16x8, col) + D, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Sum over the four lanes of a quad (the threads that share a row of an MMA accumulator).
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Reduction over a block of `NT` threads (NT a multiple of 32, at most 1024) with the warp reduction `WARP`, 0 for
// the missing lanes (the identity of a sum, and of a maximum of magnitudes); `red` holds NT/32 floats.
template <int NT, float (*WARP)(float)>
__device__ __forceinline__ float block_reduce(float v, float* red) {
    v = WARP(v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < NT / 32 ? red[lane] : 0.f;
    return WARP(t);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

template <int NT>
__device__ __forceinline__ float block_sum(float v, float* red) {
    return block_reduce<NT, warp_sum>(v, red);
}

// Of magnitudes (non-negative values).
template <int NT>
__device__ __forceinline__ float block_max(float v, float* red) {
    return block_reduce<NT, warp_max>(v, red);
}

// e4m3 quantization of a row (qwen_image::quant::e4m3): scale = max|x| / 448 (1 when that is below the smallest
// normal f32), q = e4m3(x / scale) with the division in IEEE f32 and the conversion rounding to nearest even and
// saturating.
__device__ __forceinline__ float e4m3_row_scale(float amax) {
    const float s = __fdiv_rn(amax, 448.f);
    return s >= 1.17549435e-38f ? s : 1.f;
}

// Two f32 as e4m3 bytes, `lo` in the low byte (cvt.rn.satfinite.e4m3x2.f32). The instruction exists from sm_89 on;
// the host launches no e4m3 kernel on older GPUs, where this traps (so that every module still compiles there).
__device__ __forceinline__ unsigned short e4m3x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    __trap();
    return 0;
#endif
}

// Eight f32 divided by `s` (IEEE) as eight e4m3 bytes, the first in the lowest byte.
__device__ __forceinline__ uint2 e4m3x8(const float (&v)[8], float s) {
    uint2 r;
    r.x = (u32)e4m3x2(__fdiv_rn(v[0], s), __fdiv_rn(v[1], s)) | ((u32)e4m3x2(__fdiv_rn(v[2], s), __fdiv_rn(v[3], s)) << 16);
    r.y = (u32)e4m3x2(__fdiv_rn(v[4], s), __fdiv_rn(v[5], s)) | ((u32)e4m3x2(__fdiv_rn(v[6], s), __fdiv_rn(v[7], s)) << 16);
    return r;
}
