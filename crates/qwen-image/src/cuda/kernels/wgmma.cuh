// Warpgroup MMA (sm_90a) and 64-row softmax/output helpers shared by the Hopper flash-attention kernels (`flash_attention_wgmma.cu`,
// `flash_attention_tma.cu`); prepended to both by `kernels/mod.rs`.

// D(64 x 128) (+)= A(64 x 16, shared, K-major) · B(128 x 16, shared, K-major)ᵀ; `acc` = 0 overwrites D.
__device__ __forceinline__ void wgmma_ss_m64n128k16(float (&d)[64], u64 desc_a, u64 desc_b, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(acc));
}

// D(64 x 128) += A(64 x 16, registers) · B; B is K-major (`TRANS_B` = 0: rows of B are its N index) or MN-major
// (`TRANS_B` = 1, transposed: e.g. V with keys as rows and head-dim columns contiguous).
template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs_m64n128k16(float (&d)[64], const u32 (&a)[4], u64 desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1), "n"(TRANS_B));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Shared-memory matrix descriptor, K-major, 128-byte swizzle, 8-row core groups 1024 bytes apart (the leading byte
// offset is unused).
__device__ __forceinline__ u64 sw128_desc(u32 saddr) {
    return (u64)((saddr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

// The softmax and output of a warpgroup owning 64 query rows: S/O accumulators of m64n128 (element 4n + e: row g
// (+8 for e >= 2), column 8n + 2c + (e & 1)).

// 2^x on the FMA units instead of the 16-per-clock unit `ex2` shares with the conversions (FlashAttention-4's trick),
// relative error 1.1e-4 (a degree-3 fit of 2^f on [-0.5, 0.5]; qwen_image::quant::attention's tests check the
// constants), for x ≤ 8; below 2^-125 it returns 2^-125.
__device__ __forceinline__ float exp2_fma(float x) {
    x = fmaxf(x, -125.f);
    const float t = x + 12582912.f;  // x rounded to an integer in t's low mantissa bits (|x| < 2^22)
    const float f = x - (t - 12582912.f);
    const float p = fmaf(fmaf(fmaf(0.05459283f, f, 0.24221784f), f, 0.6933686f), f, 1.f);
    return __int_as_float(__float_as_int(p) + (int)((u32)(__float_as_int(t) - 0x4B400000) << 23));
}

// Online softmax of one tile: updates the running max and sum of the thread's two rows, turns S into
// probabilities 2^(f[r]·s − m + offset) and returns the factor the previous O must be scaled by. `f[r]` is row r's
// logit factor (the softmax scale · log2(e); the FP8 kernel's also holds the query's scale), `offset` 0 keeps the
// probabilities in [0, 1] (the FP8 kernel's 8: [0, 256]). With `POLY` > 0, every POLY-th group of 8 columns takes
// `exp2_fma` instead of `ex2` (a tuning switch of the FP8 kernel; off everywhere by default).
template <int POLY = 0>
__device__ __forceinline__ void wg_softmax_rows(float (&s)[64], float (&m_run)[2], float (&l_run)[2],
                                                float (&alpha)[2], const float (&f)[2], float offset) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = -QI_INF;
#pragma unroll
        for (int n = 0; n < 16; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[r], mx * f[r]);
        const float m_use = m_new == -QI_INF ? 0.f : m_new;
        alpha[r] = m_run[r] == -QI_INF ? 0.f : fast_exp2(m_run[r] - m_use);
        m_run[r] = m_new;
        const float bias = offset - m_use;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < 16; ++n) {
            const float x0 = fmaf(s[4 * n + 2 * r], f[r], bias), x1 = fmaf(s[4 * n + 2 * r + 1], f[r], bias);
            const bool poly = POLY > 0 && n % (POLY > 0 ? POLY : 1) == 0;
            const float p0 = poly ? exp2_fma(x0) : fast_exp2(x0);
            const float p1 = poly ? exp2_fma(x1) : fast_exp2(x1);
            s[4 * n + 2 * r] = p0;
            s[4 * n + 2 * r + 1] = p1;
            sum += p0 + p1;
        }
        l_run[r] = l_run[r] * alpha[r] + sum;
    }
}

// `wg_softmax_rows` with one factor for both rows and probabilities in [0, 1].
__device__ __forceinline__ void wg_softmax(float (&s)[64], float (&m_run)[2], float (&l_run)[2], float (&alpha)[2],
                                            float scale_log2) {
    const float f[2] = {scale_log2, scale_log2};
    wg_softmax_rows(s, m_run, l_run, alpha, f, 0.f);
}

// P (accumulator layout) -> A fragments of the 8 k-steps of P·V.
__device__ __forceinline__ void wg_pack_p(u32 (&pa)[8][4], const float (&s)[64]) {
#pragma unroll
    for (int t = 0; t < 8; ++t) {
        pa[t][0] = pack_bf16x2(s[8 * t + 0], s[8 * t + 1]);
        pa[t][1] = pack_bf16x2(s[8 * t + 2], s[8 * t + 3]);
        pa[t][2] = pack_bf16x2(s[8 * t + 4], s[8 * t + 5]);
        pa[t][3] = pack_bf16x2(s[8 * t + 6], s[8 * t + 7]);
    }
}

__device__ __forceinline__ void wg_scale_o(float (&o)[64], const float (&alpha)[2]) {
#pragma unroll
    for (int n = 0; n < 16; ++n) {
        o[4 * n] *= alpha[0];
        o[4 * n + 1] *= alpha[0];
        o[4 * n + 2] *= alpha[1];
        o[4 * n + 3] *= alpha[1];
    }
}

// Normalizes O by the row sums and stores the thread's two rows (`row0`, `row0` + 8) of query head `h`.
__device__ __forceinline__ void wg_store_o(const FlashParams& p, const float (&o)[64], const float (&l_run)[2],
                                           int row0, int b, int h, int c4) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float l = quad_sum(l_run[r]);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int qi = row0 + 8 * r;
        if (qi < p.q_len) {
            bf16_t* dst = p.o + b * p.o_sb + (i64)qi * p.o_st + h * p.o_sh + 2 * c4;
#pragma unroll
            for (int n = 0; n < 16; ++n) {
                *reinterpret_cast<u32*>(dst + n * 8) = pack_bf16x2(o[4 * n + 2 * r] * inv, o[4 * n + 2 * r + 1] * inv);
            }
        }
    }
}
