/* The Mamba2 mixer's prefill between in_proj and out_proj, for inference (no autograd):
 *
 *   bamba_prefill_conv       in_proj output -> x, B, C (causal conv + silu), dt (softplus +
 *                            clamp), and the new conv state, in one pass;
 *   bamba_prefill_scan       the chunked SSD scan (same math as bamba.ops.ssd.ssd_chunked);
 *   bamba_prefill_gate_norm  D skip, silu(z) gate, grouped RMSNorm, weight, cast.
 *
 * Scan, per head, chunk by chunk (Q steps; a[s] = dt[s]·A, cumulative sums within the chunk):
 *   y[l]  = exp(acum[l]) · C[l]·S  +  sum_{s<=l} (C[l]·B[s]) exp(a[s+1]+..+a[l]) dt[s] x[s]
 *   S    <- exp(acum[Q-1]) · S  +  sum_s exp(a[s+1]+..+a[Q-1]) dt[s] x[s] ⊗ B[s]
 * The state S is kept float32 (transposed, [N, P], while scanning). With `bf16` the three
 * products take bfloat16 operands with float32 accumulation (AVX-512 BF16 dot products), as
 * mamba_ssm's kernels do; otherwise they are float32 FMAs. Decays, dt and the state stay float32.
 * Work items are split over `threads` OpenMP threads. Functions return 0, or -1 when this build
 * (no AVX-512 BF16) or the shapes (head_dim and d_state multiples of 16) are not supported, or
 * scratch memory could not be allocated (then outputs are incomplete: callers raise).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "vmath.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__)
#include <immintrin.h>
#define PREFILL_SIMD 1
#endif

int bamba_prefill_supported(void) {
#ifdef PREFILL_SIMD
    return 1;
#else
    return 0;
#endif
}

#ifdef PREFILL_SIMD
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* log(1 + u) for u in [0, 1]: log(w) by its atanh series on w's mantissa in [0.75, 1.5),
 * times u / (w - 1), which undoes the rounding of w = 1 + u (u when w rounds to 1). */
ALWAYS_INLINE __m512 vlog1p(__m512 u) {
    const __m512 one = _mm512_set1_ps(1.0f), w = _mm512_add_ps(one, u);
    const __m512 m = _mm512_getmant_ps(w, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
    const __m512 e = _mm512_getexp_ps(_mm512_mul_ps(w, _mm512_set1_ps(1.0f / 0.75f)));
    const __m512 s = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one));
    const __m512 s2 = _mm512_mul_ps(s, s);
    __m512 p = _mm512_set1_ps(1.0f / 9.0f);
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 7.0f));
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 5.0f));
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 3.0f));
    p = _mm512_fmadd_ps(p, s2, one);
    const __m512 log_w = _mm512_fmadd_ps(e, _mm512_set1_ps(0.693147180559945309f),
                                         _mm512_mul_ps(_mm512_add_ps(s, s), p));
    const __m512 dw = _mm512_sub_ps(w, one);
    const __mmask16 exact = _mm512_cmp_ps_mask(dw, _mm512_setzero_ps(), _CMP_EQ_OQ);
    return _mm512_mask_blend_ps(exact, _mm512_mul_ps(log_w, _mm512_div_ps(u, dw)), u);
}

/* torch's softplus (threshold 20): log(1 + exp(v)) = max(v, 0) + log1p(exp(-|v|)). */
ALWAYS_INLINE __m512 vsoftplus(__m512 v) {
    const __m512 a = _mm512_abs_ps(v);
    const __m512 sp = _mm512_add_ps(_mm512_max_ps(v, _mm512_setzero_ps()),
                                    vlog1p(vexp(_mm512_sub_ps(_mm512_setzero_ps(), a))));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_set1_ps(20.0f), _CMP_GT_OQ), sp, v);
}

/* The lanes of `m` of a float32 or bfloat16 array as float32 (others zero). */
ALWAYS_INLINE __m512 vload_masked(const void *base, int bf16, int64_t i, __mmask16 m) {
    if (!bf16) return _mm512_maskz_loadu_ps(m, (const float *)base + i);
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)base + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

ALWAYS_INLINE __m256i vbf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

/* Two rows of 16 values -> 16 bf16 pairs (lo = even row), the layout dpbf16 reads. */
ALWAYS_INLINE __m512i vpairs(__m512 even, __m512 odd) {
    return _mm512_or_si512(_mm512_cvtepu16_epi32(vbf16(even)),
                           _mm512_slli_epi32(_mm512_cvtepu16_epi32(vbf16(odd)), 16));
}

static void *scratch(size_t bytes) {
    return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

/* ---------------- conv + silu + dt ---------------- */

#define MAX_KERNEL 16

typedef struct {
    const void *zx;
    int zx_bf16;
    int64_t len, width, d_inner, conv_dim, heads, kernel;
    const float *wt, *bias, *state, *dt_bias;
    float dt_min, dt_max;
    float *xbc, *dt;
} ConvJob;

/* Input channel block c of the conv window at time t (t < 0 reads the carried state). */
ALWAYS_INLINE __m512 conv_input(const ConvJob *j, int64_t b, int64_t t, int64_t c) {
    if (t >= 0) return vload(j->zx, j->zx_bf16, (b * j->len + t) * j->width + j->d_inner + c);
    if (j->state == NULL) return _mm512_setzero_ps();
    return _mm512_loadu_ps(j->state + (b * (j->kernel - 1) + j->kernel - 1 + t) * j->conv_dim + c);
}

/* One block of 16 channels through the whole sequence: each input is loaded once and slides
 * through `win`; taps are summed current first, as the torch path does. */
ALWAYS_INLINE void conv_channels(const ConvJob *j, int64_t b, int64_t c, const int64_t K) {
    const int64_t D = j->conv_dim;
    __m512 win[MAX_KERNEL], w[MAX_KERNEL];
    for (int64_t i = 0; i < K; i++) w[i] = _mm512_loadu_ps(j->wt + i * D + c);
    for (int64_t i = 0; i < K - 1; i++) win[i] = conv_input(j, b, i - (K - 1), c);
    const __m512 bias = j->bias ? _mm512_loadu_ps(j->bias + c) : _mm512_setzero_ps();
    float *out = j->xbc + b * j->len * D + c;
    for (int64_t t = 0; t < j->len; t++) {
        win[K - 1] = conv_input(j, b, t, c);
        __m512 acc = bias;
        for (int64_t i = K - 1; i >= 0; i--) acc = _mm512_fmadd_ps(win[i], w[i], acc);
        _mm512_storeu_ps(out + t * D, vsilu(acc));
        for (int64_t i = 0; i < K - 1; i++) win[i] = win[i + 1];
    }
}

static void conv_block(const ConvJob *j, int64_t b, int64_t c) {
    if (j->kernel == 4)  /* Mamba2's d_conv: unrolled, the window in registers */
        conv_channels(j, b, c, 4);
    else
        conv_channels(j, b, c, j->kernel);
}

/* dt = clamp(softplus(dt + dt_bias)) for one row. */
static void time_steps_row(const ConvJob *j, int64_t b, int64_t t) {
    const int64_t row = (b * j->len + t) * j->width + j->d_inner + j->conv_dim, H = j->heads;
    for (int64_t h = 0; h < H; h += 16) {
        const __mmask16 m = (__mmask16)(H - h >= 16 ? 0xffff : (1u << (H - h)) - 1u);
        const __m512 v = _mm512_add_ps(vload_masked(j->zx, j->zx_bf16, row + h, m),
                                       _mm512_maskz_loadu_ps(m, j->dt_bias + h));
        const __m512 sp = _mm512_min_ps(_mm512_max_ps(vsoftplus(v), _mm512_set1_ps(j->dt_min)),
                                        _mm512_set1_ps(j->dt_max));
        _mm512_mask_storeu_ps(j->dt + (b * j->len + t) * H + h, m, sp);
    }
}

/* The last K-1 conv inputs (state then sequence), as float32. */
static void conv_state_out(const ConvJob *j, int64_t batch, float *out) {
    const int64_t K = j->kernel, D = j->conv_dim;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t i = 0; i < K - 1; i++)
            for (int64_t c = 0; c < D; c += 16)
                _mm512_storeu_ps(out + (b * (K - 1) + i) * D + c,
                                 conv_input(j, b, j->len - (K - 1) + i, c));
}
#endif

int bamba_prefill_conv(const void *zx, int zx_bf16, int64_t batch, int64_t len, int64_t width,
                       int64_t d_inner, int64_t conv_dim, int64_t heads, int64_t kernel,
                       const float *wt, const float *bias, const float *state,
                       const float *dt_bias, float dt_min, float dt_max, float *xbc, float *dt,
                       float *state_out, int threads) {
#ifdef PREFILL_SIMD
    if (conv_dim % 16 || kernel < 1 || kernel > MAX_KERNEL || width != d_inner + conv_dim + heads)
        return -1;
    const ConvJob j = {zx, zx_bf16, len, width, d_inner, conv_dim, heads, kernel, wt, bias, state,
                       dt_bias, dt_min, dt_max, xbc, dt};
    const int64_t blocks = conv_dim / 16;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < batch * blocks; i++) conv_block(&j, i / blocks, i % blocks * 16);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < batch * len; r++) time_steps_row(&j, r / len, r % len);
    }
    conv_state_out(&j, batch, state_out);
    return 0;
#else
    return -1;
#endif
}

#ifdef PREFILL_SIMD
/* ---------------- small matmuls: C[i, j] += sum_k A[i, k] B[k, j] (cols % 16 == 0) ------------ */

ALWAYS_INLINE void block_f32(int mr, int nv, int64_t K, const float *A, int64_t lda,
                             const float *B, int64_t ldb, float *C, int64_t ldc) {
    __m512 acc[4][4];
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) acc[i][v] = _mm512_loadu_ps(C + i * ldc + 16 * v);
    for (int64_t k = 0; k < K; k++) {
        __m512 b[4];
        for (int v = 0; v < nv; v++) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
        for (int i = 0; i < mr; i++) {
            const __m512 a = _mm512_set1_ps(A[i * lda + k]);
            for (int v = 0; v < nv; v++) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(C + i * ldc + 16 * v, acc[i][v]);
}

/* A: bf16 rows, K even; Bp: bf16 pairs [K/2][cols][2] (k even in the low half). */
ALWAYS_INLINE void block_bf16(int mr, int nv, int64_t K, const uint16_t *A, int64_t lda,
                              const uint16_t *Bp, int64_t cols, float *C, int64_t ldc) {
    __m512 acc[4][4];
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) acc[i][v] = _mm512_loadu_ps(C + i * ldc + 16 * v);
    for (int64_t kk = 0; kk < K / 2; kk++) {
        __m512bh b[4];
        for (int v = 0; v < nv; v++)
            b[v] = (__m512bh)_mm512_loadu_si512(Bp + (kk * cols + 16 * v) * 2);
        for (int i = 0; i < mr; i++) {
            int32_t pair;
            memcpy(&pair, A + i * lda + 2 * kk, sizeof pair);
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
            for (int v = 0; v < nv; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, b[v]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(C + i * ldc + 16 * v, acc[i][v]);
}

/* With `causal`, A[i, k] is zero for k > i: row block i stops at k = i + 3 (K even for bf16). */
static int64_t depth(int64_t K, int64_t i, int mr, int causal, int64_t multiple) {
    const int64_t k = causal ? (i + mr + multiple - 1) / multiple * multiple : K;
    return k < K ? k : K;
}

static void gemm_f32(int64_t M, int64_t K, int64_t cols, const float *A, int64_t lda,
                     const float *B, int64_t ldb, float *C, int64_t ldc, int causal) {
    for (int64_t i = 0; i < M; i += 4)
        for (int64_t j = 0; j < cols; j += 64) {
            const int mr = M - i < 4 ? (int)(M - i) : 4;
            const int nv = cols - j < 64 ? (int)((cols - j) / 16) : 4;
            const int64_t k = depth(K, i, mr, causal, 1);
            if (mr == 4 && nv == 4)
                block_f32(4, 4, k, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc);
            else
                block_f32(mr, nv, k, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc);
        }
}

static void gemm_bf16(int64_t M, int64_t K, int64_t cols, const uint16_t *A, int64_t lda,
                      const uint16_t *Bp, float *C, int64_t ldc, int causal) {
    for (int64_t i = 0; i < M; i += 4)
        for (int64_t j = 0; j < cols; j += 64) {
            const int mr = M - i < 4 ? (int)(M - i) : 4;
            const int nv = cols - j < 64 ? (int)((cols - j) / 16) : 4;
            const int64_t k = depth(K, i, mr, causal, 2);
            if (mr == 4 && nv == 4)
                block_bf16(4, 4, k, A + i * lda, lda, Bp + 2 * j, cols, C + i * ldc + j, ldc);
            else
                block_bf16(mr, nv, k, A + i * lda, lda, Bp + 2 * j, cols, C + i * ldc + j, ldc);
        }
}

/* Rows 2kk and 2kk+1 (scaled by `scale`, rows >= rows_used are zero) -> pairs [K/2][cols][2]. */
static void pack_pairs(const float *src, int64_t ld, int64_t rows_used, int64_t K, int64_t cols,
                       const float *scale, uint16_t *out) {
    for (int64_t kk = 0; kk < K / 2; kk++)
        for (int64_t c = 0; c < cols; c += 16) {
            __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
            if (2 * kk < rows_used)
                even = _mm512_mul_ps(_mm512_loadu_ps(src + 2 * kk * ld + c),
                                     _mm512_set1_ps(scale ? scale[2 * kk] : 1.0f));
            if (2 * kk + 1 < rows_used)
                odd = _mm512_mul_ps(_mm512_loadu_ps(src + (2 * kk + 1) * ld + c),
                                    _mm512_set1_ps(scale ? scale[2 * kk + 1] : 1.0f));
            _mm512_storeu_si512(out + (kk * cols + c) * 2, vpairs(even, odd));
        }
}

static float dot(const float *a, const float *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
}

/* ---------------- the chunked scan ---------------- */

typedef struct {
    const float *xbc, *dt, *A;
    float *state, *y;
    int64_t len, conv_dim, heads, P, groups, N, Q, Qv, chunks;
    int bf16, has_state;
    float *cb;      /* [B·G·chunks][Qv][Qv]: C[l]·B[s] for s <= l within the chunk, else 0 */
    void *bt;       /* [B·G·chunks][N][Qv]: B transposed (float32 or bf16), zero past the chunk */
    uint16_t *cbf;  /* bf16 only, [B·G·chunks][Qv][N]: C rows */
} ScanJob;

typedef struct {
    float *st, *w, *xs, *a, *acum, *suf, *dts;  /* state [N][P], W [Qv][Qv], x scaled [Qv][P] */
    uint16_t *spk, *xpk;                        /* bf16 pairs of the state and of x */
} Scratch;

static const float *row_x(const ScanJob *j, int64_t b, int64_t t) {
    return j->xbc + (b * j->len + t) * j->conv_dim;  /* x, then B (G·N), then C (G·N) */
}

static void prepare(const ScanJob *j, int64_t item) {
    const int64_t c = item % j->chunks, b = item / j->chunks / j->groups;
    const int64_t g = item / j->chunks % j->groups, N = j->N, Qv = j->Qv, t0 = c * j->Q;
    const int64_t q = j->len - t0 < j->Q ? j->len - t0 : j->Q;
    const int64_t b_off = j->heads * j->P + g * N, c_off = b_off + j->groups * N;
    float *cb = j->cb + item * Qv * Qv;
    for (int64_t l = 0; l < Qv; l++)
        for (int64_t s = 0; s < Qv; s++)
            cb[l * Qv + s] = l < q && s <= l ?
                dot(row_x(j, b, t0 + l) + c_off, row_x(j, b, t0 + s) + b_off, N) : 0.0f;
    for (int64_t n = 0; n < N; n++)
        for (int64_t s = 0; s < Qv; s++) {
            const float v = s < q ? row_x(j, b, t0 + s)[b_off + n] : 0.0f;
            if (j->bf16)
                ((uint16_t *)j->bt)[(item * N + n) * Qv + s] = float_to_bf16(v);
            else
                ((float *)j->bt)[(item * N + n) * Qv + s] = v;
        }
    if (j->bf16)
        for (int64_t l = 0; l < q; l++)
            for (int64_t n = 0; n < N; n += 16)
                _mm256_storeu_si256((__m256i *)(j->cbf + (item * Qv + l) * N + n),
                                    vbf16(_mm512_loadu_ps(row_x(j, b, t0 + l) + c_off + n)));
}

/* Log-decays of one head over steps [t0, t0+q): a, inclusive cumulative sums, sums after s. */
static void decays(const ScanJob *j, const Scratch *w, int64_t b, int64_t h, int64_t t0,
                   int64_t q) {
    float run = 0.0f;
    for (int64_t s = 0; s < j->Qv; s++) {
        const float dt = s < q ? j->dt[(b * j->len + t0 + s) * j->heads + h] : 0.0f;
        w->dts[s] = dt;
        w->a[s] = dt * j->A[h];
        run += w->a[s];
        w->acum[s] = run;
    }
    w->suf[q - 1] = 0.0f;  /* summed backwards, not acum[q-1] - acum[s]: no cancellation */
    for (int64_t s = q - 2; s >= 0; s--) w->suf[s] = w->suf[s + 1] + w->a[s + 1];
}

/* W[l, s] = C[l]·B[s] exp(a[s+1] + ... + a[l]) dt[s] for s <= l, else 0. The segment sums run
 * down the rows, 16 columns at a time (not acum[l] - acum[s]: no cancellation in long chunks). */
static void diagonal_weights(const ScanJob *j, const Scratch *w, const float *cb, int64_t q) {
    const int64_t Qv = j->Qv;
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t s = 0; s < Qv; s += 16) {
        const __m512i column = _mm512_add_epi32(_mm512_set1_epi32((int)s), iota);
        __m512 seg = _mm512_setzero_ps();  /* lane i: a[s+i+1] + ... + a[l] once l >= s+i */
        for (int64_t l = 0; l < q; l++) {
            __m512 v = _mm512_setzero_ps();
            if (l >= s) {
                const __m512i row = _mm512_set1_epi32((int)l);
                seg = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(column, row),
                                           _mm512_add_ps(seg, _mm512_set1_ps(w->a[l])),
                                           _mm512_setzero_ps());
                v = _mm512_maskz_mul_ps(_mm512_cmple_epi32_mask(column, row), _mm512_mul_ps(
                    _mm512_loadu_ps(cb + l * Qv + s), vexp(seg)), _mm512_loadu_ps(w->dts + s));
            }
            if (j->bf16)
                _mm256_storeu_si256((__m256i *)((uint16_t *)w->w + l * Qv + s), vbf16(v));
            else
                _mm512_storeu_ps(w->w + l * Qv + s, v);
        }
    }
}

static void scan_chunk(const ScanJob *j, const Scratch *w, int64_t b, int64_t h, int64_t c) {
    const int64_t P = j->P, N = j->N, Qv = j->Qv, t0 = c * j->Q, ldy = j->heads * P;
    const int64_t q = j->len - t0 < j->Q ? j->len - t0 : j->Q, kq = (q + 1) & ~(int64_t)1;
    const int64_t g = h / (j->heads / j->groups), item = (b * j->groups + g) * j->chunks + c;
    const int64_t c_off = j->heads * P + (j->groups + g) * N;
    float *y = j->y + ((b * j->len + t0) * j->heads + h) * P;
    const float *x = row_x(j, b, t0) + h * P;
    decays(j, w, b, h, t0, q);
    for (int64_t l = 0; l < q; l++) memset(y + l * ldy, 0, (size_t)P * sizeof(float));
    if (c > 0 || j->has_state) {  /* the entering state, read out with C, decayed to step l */
        if (j->bf16) {
            pack_pairs(w->st, P, N, N, P, NULL, w->spk);
            gemm_bf16(q, N, P, j->cbf + item * Qv * N, N, w->spk, y, ldy, 0);
        } else {
            gemm_f32(q, N, P, row_x(j, b, t0) + c_off, j->conv_dim, w->st, P, y, ldy, 0);
        }
        for (int64_t l = 0; l < q; l++) {
            const __m512 e = _mm512_set1_ps(expf(w->acum[l]));
            for (int64_t p = 0; p < P; p += 16)
                _mm512_storeu_ps(y + l * ldy + p,
                                 _mm512_mul_ps(_mm512_loadu_ps(y + l * ldy + p), e));
        }
    }
    diagonal_weights(j, w, j->cb + item * Qv * Qv, q);
    const float chunk_decay = expf(w->acum[q - 1]);
    for (int64_t s = 0; s < q; s++) w->suf[s] = expf(w->suf[s]) * w->dts[s];  /* to the end */
    if (j->bf16) {
        pack_pairs(x, j->conv_dim, q, kq, P, NULL, w->xpk);
        gemm_bf16(q, kq, P, (const uint16_t *)w->w, Qv, w->xpk, y, ldy, 1);
        pack_pairs(x, j->conv_dim, q, kq, P, w->suf, w->xpk);
    } else {
        gemm_f32(q, q, P, w->w, Qv, x, j->conv_dim, y, ldy, 1);
        for (int64_t s = 0; s < q; s++)
            for (int64_t p = 0; p < P; p += 16)
                _mm512_storeu_ps(w->xs + s * P + p, _mm512_mul_ps(
                    _mm512_loadu_ps(x + s * j->conv_dim + p), _mm512_set1_ps(w->suf[s])));
    }
    const __m512 d = _mm512_set1_ps(chunk_decay);
    for (int64_t i = 0; i < N * P; i += 16)
        _mm512_storeu_ps(w->st + i, _mm512_mul_ps(_mm512_loadu_ps(w->st + i), d));
    if (j->bf16)
        gemm_bf16(N, kq, P, (const uint16_t *)j->bt + item * N * Qv, Qv, w->xpk, w->st, P, 0);
    else
        gemm_f32(N, q, P, (const float *)j->bt + item * N * Qv, Qv, w->xs, P, w->st, P, 0);
}

static void scan_head(const ScanJob *j, const Scratch *w, int64_t item) {
    const int64_t P = j->P, N = j->N, b = item / j->heads, h = item % j->heads;
    float *pool = j->state + item * P * N;  /* [P][N] outside, [N][P] while scanning */
    if (!j->has_state)
        memset(w->st, 0, (size_t)(N * P) * sizeof(float));
    else
        for (int64_t p = 0; p < P; p++)
            for (int64_t n = 0; n < N; n++) w->st[n * P + p] = pool[p * N + n];
    for (int64_t c = 0; c < j->chunks; c++) scan_chunk(j, w, b, h, c);
    for (int64_t p = 0; p < P; p++)
        for (int64_t n = 0; n < N; n++) pool[p * N + n] = w->st[n * P + p];
}

static Scratch scratch_for(const ScanJob *j) {
    const int64_t Qv = j->Qv, P = j->P, N = j->N;
    Scratch w;
    w.st = scratch((size_t)(N * P) * sizeof(float));
    w.w = scratch((size_t)(Qv * Qv) * sizeof(float));
    w.xs = scratch((size_t)(Qv * P) * sizeof(float));
    w.a = scratch((size_t)(4 * Qv) * sizeof(float));
    w.acum = w.a + Qv;
    w.suf = w.a + 2 * Qv;
    w.dts = w.a + 3 * Qv;
    w.spk = scratch((size_t)(N * P) * sizeof(uint16_t));
    w.xpk = scratch((size_t)(Qv * P) * sizeof(uint16_t));
    return w;
}

static void free_scratch(Scratch *w) {
    free(w->st), free(w->w), free(w->xs), free(w->a), free(w->spk), free(w->xpk);
}
#endif

int bamba_prefill_scan(const float *xbc, int64_t batch, int64_t len, int64_t conv_dim,
                       int64_t heads, int64_t head_dim, int64_t groups, int64_t d_state,
                       const float *dt, const float *A, float *state, int has_state, float *y,
                       int64_t chunk, int bf16, int threads) {
#ifdef PREFILL_SIMD
    if (head_dim % 16 || d_state % 16 || heads % groups || chunk < 1 || len < 1 ||
        conv_dim != heads * head_dim + 2 * groups * d_state)
        return -1;
    const int64_t chunks = (len + chunk - 1) / chunk, Qv = (chunk + 15) / 16 * 16;
    const int64_t items = batch * groups * chunks;
    ScanJob j = {xbc, dt, A, state, y, len, conv_dim, heads, head_dim, groups, d_state, chunk, Qv,
                 chunks, bf16, has_state, NULL, NULL, NULL};
    j.cb = scratch((size_t)(items * Qv * Qv) * sizeof(float));
    j.bt = scratch((size_t)(items * d_state * Qv) * (bf16 ? 2 : 4));
    j.cbf = bf16 ? scratch((size_t)(items * Qv * d_state) * sizeof(uint16_t)) : NULL;
    if (!j.cb || !j.bt || (bf16 && !j.cbf)) {
        free(j.cb), free(j.bt), free(j.cbf);
        return -1;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < items; i++) prepare(&j, i);
        Scratch w = scratch_for(&j);
        const int ok = w.st && w.w && w.xs && w.a && w.spk && w.xpk;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < batch * heads; i++)
            if (ok) scan_head(&j, &w, i);
        free_scratch(&w);
    }
    free(j.cb), free(j.bt), free(j.cbf);
    return failed ? -1 : 0;
#else
    return -1;
#endif
}

#ifdef PREFILL_SIMD
typedef struct {
    const float *y, *xbc, *D, *w;
    const void *zx;
    int zx_bf16, out_bf16;
    int64_t conv_dim, width, d_inner, head_dim, groups;
    float eps;
    void *out;
} NormJob;

/* One row: v = (y + D x) silu(z), then v / rms(v) per group, times the weight. */
static void gate_norm_row(const NormJob *j, int64_t r, float *v) {
    const int64_t size = j->d_inner / j->groups;
    for (int64_t g = 0; g < j->groups; g++) {
        __m512 sq = _mm512_setzero_ps();
        for (int64_t c = g * size; c < (g + 1) * size; c += 16) {
            const __m512 skip = _mm512_fmadd_ps(_mm512_set1_ps(j->D[c / j->head_dim]),
                                                _mm512_loadu_ps(j->xbc + r * j->conv_dim + c),
                                                _mm512_loadu_ps(j->y + r * j->d_inner + c));
            const __m512 gate = vsilu(vload(j->zx, j->zx_bf16, r * j->width + c));
            const __m512 val = _mm512_mul_ps(skip, gate);
            _mm512_storeu_ps(v + c, val);
            sq = _mm512_fmadd_ps(val, val, sq);
        }
        const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sq) / (float)size +
                                                         j->eps));
        for (int64_t c = g * size; c < (g + 1) * size; c += 16) {
            const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(j->w + c),
                                           _mm512_mul_ps(_mm512_loadu_ps(v + c), scale));
            if (j->out_bf16)
                _mm256_storeu_si256((__m256i *)((uint16_t *)j->out + r * j->d_inner + c), vbf16(o));
            else
                _mm512_storeu_ps((float *)j->out + r * j->d_inner + c, o);
        }
    }
}
#endif

int bamba_prefill_gate_norm(const float *y, const float *xbc, int64_t conv_dim, const void *zx,
                            int zx_bf16, int64_t width, int64_t rows, int64_t d_inner,
                            int64_t head_dim, int64_t groups, const float *D, const float *w,
                            float eps, void *out, int out_bf16, int threads) {
#ifdef PREFILL_SIMD
    if (head_dim % 16 || groups < 1 || d_inner % groups || (d_inner / groups) % 16) return -1;
    const NormJob j = {y, xbc, D, w, zx, zx_bf16, out_bf16, conv_dim, width, d_inner, head_dim,
                       groups, eps, out};
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *v = scratch((size_t)d_inner * sizeof(float));
        if (!v) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            if (v) gate_norm_row(&j, r, v);
        free(v);
    }
    return failed ? -1 : 0;
#else
    return -1;
#endif
}
