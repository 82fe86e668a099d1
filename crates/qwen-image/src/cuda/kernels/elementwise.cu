// Fused memory-bound glue of the DiT block. Every kernel rounds its intermediates to bf16 where the portable burn
// composition does (a bf16 tensor op rounds its result), so both paths agree to the last bit in most elements.
//
// Token rows pick their modulation row through "runs": run k covers tokens [run_end[k-1], run_end[k]) of every
// batch item and uses modulation row run_row[k] (0 = real timestep, 1 = zero timestep for condition images).

#define MAX_RUNS 8
#define ROW_THREADS 128
#define MAX_VEC 8  // 16-byte vectors per thread: rows up to 128 * 8 * 8 = 8192 wide

struct Runs {
    int n;
    int end[MAX_RUNS];
    int row[MAX_RUNS];
};
QI_ASSERT_LAYOUT(Runs, 68, 4);
QI_ASSERT_OFFSET(Runs, n, 0);
QI_ASSERT_OFFSET(Runs, end, 4);
QI_ASSERT_OFFSET(Runs, row, 36);

__device__ __forceinline__ int run_row(const Runs& r, int s) {
    int row = r.row[0];
#pragma unroll
    for (int k = MAX_RUNS - 1; k >= 0; --k) {
        if (k < r.n && s < r.end[k]) row = r.row[k];
    }
    return row;
}

__device__ __forceinline__ void unpack8(const uint4 w, float (&v)[8]) {
    v[0] = lo_f32(w.x); v[1] = hi_f32(w.x);
    v[2] = lo_f32(w.y); v[3] = hi_f32(w.y);
    v[4] = lo_f32(w.z); v[5] = hi_f32(w.z);
    v[6] = lo_f32(w.w); v[7] = hi_f32(w.w);
}

__device__ __forceinline__ uint4 pack8(const float (&v)[8]) {
    uint4 w;
    w.x = pack_bf16x2(v[0], v[1]);
    w.y = pack_bf16x2(v[2], v[3]);
    w.z = pack_bf16x2(v[4], v[5]);
    w.w = pack_bf16x2(v[6], v[7]);
    return w;
}

struct LnModParams {
    const bf16_t* x;      // [B, S, D], D contiguous
    bf16_t* y;            // [B, S, D] contiguous
    const bf16_t* shift;  // [rows, B, D], D contiguous
    const bf16_t* scale;
    i64 x_sb, x_st;
    i64 sh_sr, sh_sb;
    i64 sc_sr, sc_sb;
    int S, D;
    float eps;
    int pad_;
    Runs runs;
};
QI_ASSERT_LAYOUT(LnModParams, 168, 8);
QI_ASSERT_OFFSET(LnModParams, x, 0);
QI_ASSERT_OFFSET(LnModParams, y, 8);
QI_ASSERT_OFFSET(LnModParams, shift, 16);
QI_ASSERT_OFFSET(LnModParams, scale, 24);
QI_ASSERT_OFFSET(LnModParams, x_sb, 32);
QI_ASSERT_OFFSET(LnModParams, x_st, 40);
QI_ASSERT_OFFSET(LnModParams, sh_sr, 48);
QI_ASSERT_OFFSET(LnModParams, sh_sb, 56);
QI_ASSERT_OFFSET(LnModParams, sc_sr, 64);
QI_ASSERT_OFFSET(LnModParams, sc_sb, 72);
QI_ASSERT_OFFSET(LnModParams, S, 80);
QI_ASSERT_OFFSET(LnModParams, D, 84);
QI_ASSERT_OFFSET(LnModParams, eps, 88);
QI_ASSERT_OFFSET(LnModParams, pad_, 92);
QI_ASSERT_OFFSET(LnModParams, runs, 96);

// Where the FP8 variants put the output quantized per row (the `y` rows as bf16, then e4m3 as `fp8_quantize_rows`
// would make them from the bf16 output: bit-identical).
struct Fp8Rows {
    unsigned char* q;  // [B, S, D] e4m3, dense
    float* scale;      // [B, S]
};
QI_ASSERT_LAYOUT(Fp8Rows, 16, 8);
QI_ASSERT_OFFSET(Fp8Rows, q, 0);
QI_ASSERT_OFFSET(Fp8Rows, scale, 8);

// y = bf16(LayerNorm(x)) · (1 + scale[row]) + shift[row]; LayerNorm without affine, statistics in f32.
// Grid (S, B), ROW_THREADS threads; rows up to ROW_THREADS · VEC · 8 wide (the row stays in registers).
// With FP8, the bf16 row is also quantized to `o` (and `y` may be null: the bf16 row is then not written).
template <int VEC, bool FP8>
__device__ __forceinline__ void ln_modulate_row(const LnModParams& p, const Fp8Rows& o) {
    __shared__ float red[ROW_THREADS / 32];
    const int s = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
    const int row = run_row(p.runs, s);
    const uint4* xr = reinterpret_cast<const uint4*>(p.x + b * p.x_sb + (i64)s * p.x_st);
    const uint4* sh = reinterpret_cast<const uint4*>(p.shift + row * p.sh_sr + b * p.sh_sb);
    const uint4* sc = reinterpret_cast<const uint4*>(p.scale + row * p.sc_sr + b * p.sc_sb);
    const i64 out_row = (i64)b * p.S + s;
    uint4* yr = reinterpret_cast<uint4*>(p.y + out_row * p.D);
    const int nv = p.D / 8;
    float v[VEC][8];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
        const int idx = tid + i * ROW_THREADS;
        if (idx < nv) {
            unpack8(xr[idx], v[i]);
#pragma unroll
            for (int e = 0; e < 8; ++e) sum += v[i][e];
        }
    }
    const float mean = block_sum<ROW_THREADS>(sum, red) / p.D;
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
        const int idx = tid + i * ROW_THREADS;
        if (idx < nv) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float d = v[i][e] - mean;
                sq += d * d;
            }
        }
    }
    const float var = block_sum<ROW_THREADS>(sq, red) / p.D;
    const float rstd = 1.f / sqrtf(var + p.eps);
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
        const int idx = tid + i * ROW_THREADS;
        if (idx < nv) {
            float a[8], c[8], out[8];
            unpack8(sc[idx], c);
            unpack8(sh[idx], a);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float xn = round_bf16((v[i][e] - mean) * rstd);
                const float t = round_bf16(c[e] + 1.f);
                out[e] = round_bf16(xn * t) + a[e];
            }
            if (!FP8 || p.y) yr[idx] = pack8(out);
            if (FP8) {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    v[i][e] = round_bf16(out[e]);  // what the bf16 output holds
                    amax = fmaxf(amax, fabsf(v[i][e]));
                }
            }
        }
    }
    if (FP8) {
        const float qs = e4m3_row_scale(block_max<ROW_THREADS>(amax, red));
        if (tid == 0) o.scale[out_row] = qs;
        uint2* q = reinterpret_cast<uint2*>(o.q + out_row * p.D);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const int idx = tid + i * ROW_THREADS;
            if (idx < nv) q[idx] = e4m3x8(v[i], qs);
        }
    }
}

// Rows up to 8192 wide.
extern "C" __global__ void __launch_bounds__(ROW_THREADS) ln_modulate(const LnModParams p) {
    ln_modulate_row<MAX_VEC, false>(p, Fp8Rows{});
}

// Rows up to 3072 wide (the DiT): a third of the registers, so three times the blocks in flight per SM.
extern "C" __global__ void __launch_bounds__(ROW_THREADS) ln_modulate_3072(const LnModParams p) {
    ln_modulate_row<3, false>(p, Fp8Rows{});
}

// The same, the output also quantized to e4m3 per row (the input of the FP8 projections after it); sm_89+.
extern "C" __global__ void __launch_bounds__(ROW_THREADS) ln_modulate_fp8(const LnModParams p, const Fp8Rows o) {
    ln_modulate_row<MAX_VEC, true>(p, o);
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS) ln_modulate_fp8_3072(const LnModParams p, const Fp8Rows o) {
    ln_modulate_row<3, true>(p, o);
}

struct GatedParams {
    const bf16_t* res;   // [B, S, D], D contiguous
    const bf16_t* y;     // [B, S, D], D contiguous
    const bf16_t* gate;  // [rows, B, D], D contiguous
    bf16_t* out;         // [B, S, D] contiguous
    i64 r_sb, r_st;
    i64 y_sb, y_st;
    i64 g_sr, g_sb;
    int S, D;
    Runs runs;
};
QI_ASSERT_LAYOUT(GatedParams, 160, 8);
QI_ASSERT_OFFSET(GatedParams, res, 0);
QI_ASSERT_OFFSET(GatedParams, y, 8);
QI_ASSERT_OFFSET(GatedParams, gate, 16);
QI_ASSERT_OFFSET(GatedParams, out, 24);
QI_ASSERT_OFFSET(GatedParams, r_sb, 32);
QI_ASSERT_OFFSET(GatedParams, r_st, 40);
QI_ASSERT_OFFSET(GatedParams, y_sb, 48);
QI_ASSERT_OFFSET(GatedParams, y_st, 56);
QI_ASSERT_OFFSET(GatedParams, g_sr, 64);
QI_ASSERT_OFFSET(GatedParams, g_sb, 72);
QI_ASSERT_OFFSET(GatedParams, S, 80);
QI_ASSERT_OFFSET(GatedParams, D, 84);
QI_ASSERT_OFFSET(GatedParams, runs, 88);

// out = res + gate[row] · y. Grid (S, B), ROW_THREADS threads.
extern "C" __global__ void __launch_bounds__(ROW_THREADS) gated_residual(const GatedParams p) {
    const int s = blockIdx.x, b = blockIdx.y;
    const int row = run_row(p.runs, s);
    const uint4* rr = reinterpret_cast<const uint4*>(p.res + b * p.r_sb + (i64)s * p.r_st);
    const uint4* yr = reinterpret_cast<const uint4*>(p.y + b * p.y_sb + (i64)s * p.y_st);
    const uint4* gr = reinterpret_cast<const uint4*>(p.gate + row * p.g_sr + b * p.g_sb);
    uint4* outr = reinterpret_cast<uint4*>(p.out + ((i64)b * p.S + s) * p.D);
    for (int idx = threadIdx.x; idx < p.D / 8; idx += ROW_THREADS) {
        float r[8], y[8], g[8], o[8];
        unpack8(rr[idx], r);
        unpack8(yr[idx], y);
        unpack8(gr[idx], g);
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] = r[e] + round_bf16(g[e] * y[e]);
        outr[idx] = pack8(o);
    }
}

struct RmsRopeParams {
    const bf16_t* x;     // [B, S, H, Dh], Dh contiguous
    bf16_t* y;           // [B, S, H, Dh] with its own strides
    const bf16_t* w;     // [Dh]
    const float* cos;    // [S, Dh / 2] (null: no rotation)
    const float* sin;
    i64 x_sb, x_st, x_sh;
    i64 y_sb, y_st, y_sh;
    int S, H, Dh;
    float eps;
    int batch;
    int pad_;
};
QI_ASSERT_LAYOUT(RmsRopeParams, 112, 8);
QI_ASSERT_OFFSET(RmsRopeParams, x, 0);
QI_ASSERT_OFFSET(RmsRopeParams, y, 8);
QI_ASSERT_OFFSET(RmsRopeParams, w, 16);
QI_ASSERT_OFFSET(RmsRopeParams, cos, 24);
QI_ASSERT_OFFSET(RmsRopeParams, sin, 32);
QI_ASSERT_OFFSET(RmsRopeParams, x_sb, 40);
QI_ASSERT_OFFSET(RmsRopeParams, x_st, 48);
QI_ASSERT_OFFSET(RmsRopeParams, x_sh, 56);
QI_ASSERT_OFFSET(RmsRopeParams, y_sb, 64);
QI_ASSERT_OFFSET(RmsRopeParams, y_st, 72);
QI_ASSERT_OFFSET(RmsRopeParams, y_sh, 80);
QI_ASSERT_OFFSET(RmsRopeParams, S, 88);
QI_ASSERT_OFFSET(RmsRopeParams, H, 92);
QI_ASSERT_OFFSET(RmsRopeParams, Dh, 96);
QI_ASSERT_OFFSET(RmsRopeParams, eps, 100);
QI_ASSERT_OFFSET(RmsRopeParams, batch, 104);
QI_ASSERT_OFFSET(RmsRopeParams, pad_, 108);

// y = RoPE(bf16(bf16(x · rsqrt(mean(x²) + eps)) · w)), interleaved pairs (x[2k], x[2k+1]) rotated by
// (cos, sin)[s, k]. One warp per token (b, s): its weights and rotation are read once, then each of its H heads
// is normalized and rotated in turn. Each lane holds `per` consecutive elements of a head (4 for Dh = 128, else 2;
// Dh in {16, 32, 64, 128}); lanes past Dh / per hold zeros. Grid ceil(B·S / 4), 128 threads.
extern "C" __global__ void __launch_bounds__(128) rms_norm_rope(const RmsRopeParams p) {
    const int lane = threadIdx.x & 31;
    const int tok = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (tok >= p.batch * p.S) return;
    const int s = tok % p.S, b = tok / p.S;
    const int per = p.Dh == 128 ? 4 : 2;
    const bool active = lane * per < p.Dh;
    float w[4] = {0.f, 0.f, 0.f, 0.f}, c[2] = {1.f, 1.f}, sn[2] = {0.f, 0.f};
    if (active) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if (e < per) w[e] = bf16_to_f32(p.w[lane * per + e]);
        }
        if (p.cos != nullptr) {
            const int half = p.Dh / 2;
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                if (2 * k < per) {
                    const int pair = (lane * per) / 2 + k;
                    c[k] = p.cos[(i64)s * half + pair];
                    sn[k] = p.sin[(i64)s * half + pair];
                }
            }
        }
    }
    const bf16_t* xt = p.x + b * p.x_sb + (i64)s * p.x_st;
    bf16_t* yt = p.y + b * p.y_sb + (i64)s * p.y_st;
#pragma unroll 4
    for (int h = 0; h < p.H; ++h) {
        const bf16_t* xr = xt + h * p.x_sh;
        float v[4] = {0.f, 0.f, 0.f, 0.f};
        if (active) {
            if (per == 4) {
                const uint2 q = reinterpret_cast<const uint2*>(xr)[lane];
                v[0] = lo_f32(q.x); v[1] = hi_f32(q.x); v[2] = lo_f32(q.y); v[3] = hi_f32(q.y);
            } else {
                const u32 q = reinterpret_cast<const u32*>(xr)[lane];
                v[0] = lo_f32(q); v[1] = hi_f32(q);
            }
        }
        float ss = v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + v[3] * v[3];
        ss = warp_sum(ss);
        if (!active) continue;
        const float inv = 1.f / sqrtf(ss / p.Dh + p.eps);
        float n[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) n[e] = round_bf16(round_bf16(v[e] * inv) * w[e]);
        float out[4] = {n[0], n[1], n[2], n[3]};
        if (p.cos != nullptr) {
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                if (2 * k < per) {
                    const float re = n[2 * k], im = n[2 * k + 1];
                    out[2 * k] = __fsub_rn(__fmul_rn(re, c[k]), __fmul_rn(im, sn[k]));
                    out[2 * k + 1] = __fadd_rn(__fmul_rn(re, sn[k]), __fmul_rn(im, c[k]));
                }
            }
        }
        bf16_t* yr = yt + h * p.y_sh;
        if (per == 4) {
            uint2 q;
            q.x = pack_bf16x2(out[0], out[1]);
            q.y = pack_bf16x2(out[2], out[3]);
            reinterpret_cast<uint2*>(yr)[lane] = q;
        } else {
            reinterpret_cast<u32*>(yr)[lane] = pack_bf16x2(out[0], out[1]);
        }
    }
}

// out = bf16(silu(g)) · u over n elements (n a multiple of 8, 16-byte aligned contiguous buffers).
extern "C" __global__ void silu_mul(const bf16_t* g, const bf16_t* u, bf16_t* out, i64 n) {
    const i64 nv = n / 8;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < nv; idx += (i64)gridDim.x * blockDim.x) {
        float a[8], c[8], o[8];
        unpack8(reinterpret_cast<const uint4*>(g)[idx], a);
        unpack8(reinterpret_cast<const uint4*>(u)[idx], c);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float sl = round_bf16(a[e] / (1.f + __expf(-a[e])));
            o[e] = sl * c[e];
        }
        reinterpret_cast<uint4*>(out)[idx] = pack8(o);
    }
}

// y = bf16(x · 1/√(mean(x²) + eps)) · w over rows of D values (Qwen2.5-VL's RMSNorm, `nn::rms_norm`), statistics
// in f32. One block of ROW_THREADS per row; rows up to ROW_THREADS · MAX_VEC · 8 wide (the row stays in registers).
extern "C" __global__ void __launch_bounds__(ROW_THREADS)
    rms_norm_rows(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w, bf16_t* __restrict__ y, int D,
                  float eps) {
    __shared__ float red[ROW_THREADS / 32];
    const int tid = threadIdx.x, nv = D / 8;
    const uint4* xr = reinterpret_cast<const uint4*>(x + (i64)blockIdx.x * D);
    uint4* yr = reinterpret_cast<uint4*>(y + (i64)blockIdx.x * D);
    const uint4* wr = reinterpret_cast<const uint4*>(w);
    float v[MAX_VEC][8];
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < MAX_VEC; ++i) {
        const int idx = tid + i * ROW_THREADS;
        if (idx < nv) {
            unpack8(xr[idx], v[i]);
#pragma unroll
            for (int e = 0; e < 8; ++e) sq = fmaf(v[i][e], v[i][e], sq);
        }
    }
    const float inv = 1.f / sqrtf(block_sum<ROW_THREADS>(sq, red) / D + eps);
#pragma unroll
    for (int i = 0; i < MAX_VEC; ++i) {
        const int idx = tid + i * ROW_THREADS;
        if (idx < nv) {
            float g[8], out[8];
            unpack8(wr[idx], g);
#pragma unroll
            for (int e = 0; e < 8; ++e) out[e] = round_bf16(v[i][e] * inv) * g[e];
            yr[idx] = pack8(out);
        }
    }
}

// The VAE's channel RMS norm (`ChannelRmsNorm`, NCHW), optionally followed by SiLU, rounded as the portable
// composition rounds it: y = bf16(bf16(bf16(x / max(‖x‖₂ over C, 1e-12)) · scale) · γ_c), then bf16(silu(y)) when
// `silu`. Each lane owns 8 adjacent pixels (one 16-byte vector per channel); the block's 8 warps split the channels
// (warp w takes c ≡ w mod 8) and add their partial sums of squares in shared memory. Grid (⌈hw / 256⌉, batch).
#define CNORM_WARPS 8
extern "C" __global__ void __launch_bounds__(CNORM_WARPS * 32)
    channel_rms_norm(const bf16_t* __restrict__ x, const bf16_t* __restrict__ gamma, bf16_t* __restrict__ y, int C,
                     i64 hw, float scale, int silu) {
    __shared__ float part[CNORM_WARPS][8][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 groups = hw / 8;
    const i64 g = (i64)blockIdx.x * 32 + lane;
    const bool live = g < groups;
    const i64 base = (i64)blockIdx.y * C * hw;
    const uint4* px = reinterpret_cast<const uint4*>(x + base) + g;
    uint4* py = reinterpret_cast<uint4*>(y + base) + g;
    float ss[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (live) {
        for (int c = warp; c < C; c += CNORM_WARPS) {
            float v[8];
            unpack8(px[(i64)c * groups], v);
#pragma unroll
            for (int e = 0; e < 8; ++e) ss[e] = fmaf(v[e], v[e], ss[e]);
        }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) part[warp][e][lane] = ss[e];
    __syncthreads();
    if (!live) return;
    float norm[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < CNORM_WARPS; ++w) s += part[w][e][lane];
        norm[e] = fmaxf(sqrtf(s), 1e-12f);
    }
    for (int c = warp; c < C; c += CNORM_WARPS) {
        float v[8], o[8];
        unpack8(px[(i64)c * groups], v);
        const float gm = bf16_to_f32(gamma[c]);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            o[e] = round_bf16(round_bf16(round_bf16(v[e] / norm[e]) * scale) * gm);
            if (silu) o[e] = o[e] / (1.f + __expf(-o[e]));
        }
        py[(i64)c * groups] = pack8(o);
    }
}

// y[n, c, p] = bf16(y[n, c, p] + b[c]) in place over an NCHW tensor of `total` values with `hw` (a multiple of 8)
// pixels per channel: the bias of a convolution, added after its output was rounded to bf16 (as PyTorch adds it
// after cuDNN). 8 values per thread, all of one channel.
extern "C" __global__ void bias_add_nchw(bf16_t* y, const bf16_t* __restrict__ b, int C, i64 hw, i64 total) {
    const i64 nv = total / 8;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < nv; idx += (i64)gridDim.x * blockDim.x) {
        const float bias = bf16_to_f32(b[(idx * 8 / hw) % C]);
        float v[8];
        unpack8(reinterpret_cast<const uint4*>(y)[idx], v);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] += bias;
        reinterpret_cast<uint4*>(y)[idx] = pack8(v);
    }
}

// Qwen2.5-VL's rotate-half rotary (`text_encoder::rotary::apply_rotary`): y = x·cos + rotate_half(x)·sin over
// `rows` = batch·tokens·heads rows of D values. x's rows: token stride x_st, head stride D, inner axis contiguous;
// y dense. cos/sin are [tokens, D]. With `f32_tables` they are f32 and the arithmetic is f32, rounded once at the end
// (the vision tower casts x to f32, rotates, casts back); otherwise they are bf16 and each product and the sum are
// rounded to bf16 (the language model's bf16 composition). Each thread owns 8 elements of the first half and their
// 8 partners in the second half (D / 2 a multiple of 8).
extern "C" __global__ void rotary_half(const bf16_t* __restrict__ x, const void* __restrict__ cos_t,
                                       const void* __restrict__ sin_t, bf16_t* __restrict__ y, i64 rows, int heads,
                                       int tokens, int D, i64 x_st, int f32_tables) {
    const int half = D / 2, groups = half / 8;
    const i64 n = rows * groups;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (i64)gridDim.x * blockDim.x) {
        const i64 row = idx / groups;
        const int e0 = (int)(idx - row * groups) * 8;
        const i64 bt = row / heads;
        const int h = (int)(row - bt * heads);
        const i64 t = bt % tokens;
        const bf16_t* xr = x + bt * x_st + (i64)h * D;
        float a[8], b[8], c1[8], s1[8], c2[8], s2[8], o1[8], o2[8];
        unpack8(*reinterpret_cast<const uint4*>(xr + e0), a);
        unpack8(*reinterpret_cast<const uint4*>(xr + half + e0), b);
        if (f32_tables) {
            const float* cr = reinterpret_cast<const float*>(cos_t) + t * D;
            const float* sr = reinterpret_cast<const float*>(sin_t) + t * D;
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const float4 cv = reinterpret_cast<const float4*>(cr + e0)[q];
                const float4 sv = reinterpret_cast<const float4*>(sr + e0)[q];
                const float4 cw = reinterpret_cast<const float4*>(cr + half + e0)[q];
                const float4 sw = reinterpret_cast<const float4*>(sr + half + e0)[q];
                c1[4 * q] = cv.x, c1[4 * q + 1] = cv.y, c1[4 * q + 2] = cv.z, c1[4 * q + 3] = cv.w;
                s1[4 * q] = sv.x, s1[4 * q + 1] = sv.y, s1[4 * q + 2] = sv.z, s1[4 * q + 3] = sv.w;
                c2[4 * q] = cw.x, c2[4 * q + 1] = cw.y, c2[4 * q + 2] = cw.z, c2[4 * q + 3] = cw.w;
                s2[4 * q] = sw.x, s2[4 * q + 1] = sw.y, s2[4 * q + 2] = sw.z, s2[4 * q + 3] = sw.w;
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                // No contraction into FMAs: the f32 composition rounds each product, then the sum.
                o1[e] = __fadd_rn(__fmul_rn(a[e], c1[e]), __fmul_rn(-b[e], s1[e]));
                o2[e] = __fadd_rn(__fmul_rn(b[e], c2[e]), __fmul_rn(a[e], s2[e]));
            }
        } else {
            const bf16_t* cr = reinterpret_cast<const bf16_t*>(cos_t) + t * D;
            const bf16_t* sr = reinterpret_cast<const bf16_t*>(sin_t) + t * D;
            unpack8(*reinterpret_cast<const uint4*>(cr + e0), c1);
            unpack8(*reinterpret_cast<const uint4*>(sr + e0), s1);
            unpack8(*reinterpret_cast<const uint4*>(cr + half + e0), c2);
            unpack8(*reinterpret_cast<const uint4*>(sr + half + e0), s2);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                o1[e] = round_bf16(a[e] * c1[e]) + round_bf16(-b[e] * s1[e]);
                o2[e] = round_bf16(b[e] * c2[e]) + round_bf16(a[e] * s2[e]);
            }
        }
        bf16_t* yr = y + row * D;
        *reinterpret_cast<uint4*>(yr + e0) = pack8(o1);
        *reinterpret_cast<uint4*>(yr + half + e0) = pack8(o2);
    }
}

// The VAE's input from an interleaved 8-bit RGB image (`plane` = H·W pixels): out[c, p] = bf16(2·(v / 255) − 1) with
// v = rgb[3p + c], each f32 operation rounded once, as `crate::pixels::level_value` on the host.
extern "C" __global__ void rgb8_to_planes(const unsigned char* __restrict__ rgb, bf16_t* __restrict__ out,
                                          i64 plane) {
    for (i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x; p < plane; p += (i64)gridDim.x * blockDim.x) {
#pragma unroll
        for (int c = 0; c < 3; ++c) {
            const float q = __fdiv_rn((float)rgb[3 * p + c], 255.f);
            out[c * plane + p] = f32_to_bf16(__fsub_rn(__fmul_rn(2.f, q), 1.f));
        }
    }
}

// Interleaved 8-bit RGB from the VAE's output planes x [3, H, W] (bf16, `plane` = H·W pixels):
// rgb[3p + c] = round_half_even(clamp(x·0.5 + 0.5, 0, 1) · 255), as `crate::pixels::value_level` (NaN gives 0).
extern "C" __global__ void planes_to_rgb8(const bf16_t* __restrict__ x, unsigned char* __restrict__ rgb, i64 plane) {
    for (i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x; p < plane; p += (i64)gridDim.x * blockDim.x) {
#pragma unroll
        for (int c = 0; c < 3; ++c) {
            float y = __fadd_rn(__fmul_rn(bf16_to_f32(x[c * plane + p]), 0.5f), 0.5f);
            y = fminf(fmaxf(y, 0.f), 1.f);
            rgb[3 * p + c] = (unsigned char)__float2int_rn(__fmul_rn(y, 255.f));
        }
    }
}
