/* Linear layers for a few rows: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), bf16 or float32.
 *
 * A decode step's linear layers stream their weights from memory for a handful of dot products
 * per weight, so their speed is that of the stream. Each thread walks its share of weight rows
 * front to back (one sequential stream, which the hardware prefetcher follows best), and each
 * weight vector loaded is multiplied against every input row (up to 8, held in L1) with float32
 * accumulation: 32 bf16 pairs per instruction (AVX-512 BF16 `vdpbf16ps`) or 16 float32 FMAs.
 * At 1 and 2 rows the loop prefetches 2 KiB ahead, non-temporal: the hardware prefetcher alone
 * left a batch-1 step 9-15% slower (the measurements: benchmarks/README.md#native-decode-step).
 * From 3 rows on the arithmetic per byte outruns the hardware prefetcher, so the loop
 * prefetches 8 KiB ahead into L2. From 5 rows the work goes in tiles of 4 weight rows x 4 input
 * rows (each vector loaded serves 4 products), prefetching 8 tiles ahead into L2: with the
 * weights streaming from DRAM, prefetching less far left the cores waiting on memory. The
 * measurements behind these distances are in benchmarks/README.md#native-decode-step.
 */
#ifndef BAMBA_DOT_ROWS_H
#define BAMBA_DOT_ROWS_H
#include <omp.h>
#include <stdint.h>

#include "bf16.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_AVX512 1
#endif
#if defined(HAVE_AVX512) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_BF16_DOT 1
#endif

enum { ROW_GROUP = 8, NTA_BYTES = 2048, PREFETCH_BYTES = 8192, TILE = 4, TILE_FROM_ROWS = 5,
       TILE_PREFETCH_TILES = 8 };

/* How a weight matrix is stored: dense in the activations' dtype, or quantized (quant_rows.h;
 * FORMAT_IQ4: int4's nibbles indexing IQ4's 16 non-linear levels, GGUF's IQ4_NL / IQ4_XS;
 * FORMAT_INT6, FORMAT_INT5: int8 values of 6 or 5 bits held in as many, GGUF's Q6_K's and
 * Q5_K's bytes). */
enum { FORMAT_DENSE, FORMAT_FP8, FORMAT_INT8, FORMAT_INT4, FORMAT_IQ4, FORMAT_INT6, FORMAT_INT5 };
/* A quantized format's scale dtype; SCALE_F32_OFFSETS: asymmetric ints, float32 [n, 2G], a
 * row's G scales, then its G offsets (w = q * scale + offset, quant_rows.h); SCALE_K_OFFSETS:
 * scales and offsets in two levels as GGUF's Q4_K and Q5_K hold them, bytes (quant_rows.h's K
 * tables); SCALE_K: scales alone in two levels, Q6_K's (signed sc bytes). */
enum { SCALE_F32, SCALE_BF16, SCALE_F16, SCALE_F32_OFFSETS, SCALE_K_OFFSETS, SCALE_K };

/* A weight matrix [n, k] (row-major, contiguous) and its optional bias [n] in the activations'
 * dtype. Quantized formats add their scales [n, scale_stride] (SCALE_* `scale_kind`; K tables:
 * scale_stride bytes a row), one per `group` inputs; {weight, bias, n, k} alone is a dense
 * matrix. */
typedef struct {
    const void *weight, *bias;
    int64_t n, k;
    int format;
    const void *scales;
    int scale_kind;
    int64_t group, scale_stride;
} LinearWeights;

/* Whether this build's kernels take rows of width k in this dtype. */
static inline int linear_supported(int bf16, int64_t k) {
#if defined(HAVE_BF16_DOT)
    if (bf16) return k % 32 == 0;
#endif
#if defined(HAVE_AVX512)
    if (!bf16) return k % 16 == 0;
#endif
    return 0;
}

/* This thread's contiguous share [*begin, *end) of [0, total) inside a parallel region (each
 * thread streams one run of weight rows). */
static inline void my_share(int64_t total, int64_t *begin, int64_t *end) {
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t per = total / threads, extra = total % threads;
    *begin = me * per + (me < extra ? me : extra);
    *end = *begin + per + (me < extra);
}

static inline float load_value(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_value(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = float_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* A layer's output value into y[i]: rounded to bf16 first when `round_bf16` (a float32 buffer
 * then holds what a bf16 layer would output), stored in bf16 when y_bf16, else float32. */
static inline void store_output(void *y, int64_t i, float v, int y_bf16, int round_bf16) {
    if (round_bf16) v = bf16_to_float(float_to_bf16(v));
    store_value(y, i, v, y_bf16);
}

#ifdef HAVE_AVX512
/* Outputs whose sums are reduced together: the few-row kernels leave each output's accumulator
 * (16 lanes, not yet summed) at out[r * OUTPUT_BLOCK + j], then sum a block of them at once
 * (lane_sums) and store it as one vector (store_outputs). */
enum { OUTPUT_BLOCK = 16 };

/* Lane i of the result is _mm512_reduce_add_ps(v[i]), bit for bit: each vector's lanes summed
 * in the same pairs and tree (lane + lane 8 on, + lane 4 on, + lane 2 on, + lane 1 on), sixteen
 * vectors at a time in shuffles of two. Against one output reduced and stored (rounded to bf16
 * in scalar code) at a time, the bench shape's int4 checkpoint decodes one row 1.08-1.13x
 * faster (benchmarks/README.md#output-blocks). */
static inline __m512 lane_sums(const __m512 v[OUTPUT_BLOCK]) {
    __m512 in[16], s[8], u[4], w[2];
    for (int i = 0; i < 16; i++) in[i] = v[(i % 4) * 4 + i / 4]; /* lane 4q + c sums in[4c + q] */
    for (int a = 0; a < 8; a++)
        s[a] = _mm512_add_ps(_mm512_shuffle_f32x4(in[2 * a], in[2 * a + 1], 0x44),
                             _mm512_shuffle_f32x4(in[2 * a], in[2 * a + 1], 0xEE));
    for (int b = 0; b < 4; b++)
        u[b] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * b], s[2 * b + 1], 0x88),
                             _mm512_shuffle_f32x4(s[2 * b], s[2 * b + 1], 0xDD));
    for (int c = 0; c < 2; c++) {
        const __m512d x = _mm512_castps_pd(u[2 * c]), y = _mm512_castps_pd(u[2 * c + 1]);
        w[c] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
}

/* A block's bias values (zero past `block`, or all zero without a bias). The NULL test is a
 * branch before any load: written as one conditional expression, the compiler made it a masked
 * load from bias + n0 with an empty mask, an address in no page when there is no bias, and the
 * instruction after it held a third of quant_features' own samples in a one-row int8 decode
 * (with the branch int8 and int4 decode 1.01-1.05x faster, benchmarks/README.md#output-blocks). */
static inline void block_bias(const void *bias, int64_t n0, int64_t block, int bf16,
                              float out[OUTPUT_BLOCK]) {
    if (bias == NULL) {
        for (int j = 0; j < OUTPUT_BLOCK; j++) out[j] = 0.0f;
        return;
    }
    for (int64_t j = 0; j < OUTPUT_BLOCK; j++)
        out[j] = j < block ? load_value(bias, n0 + j, bf16) : 0.0f;
}

/* The mask of a block's first `block` (1 to OUTPUT_BLOCK) features. */
static inline __mmask16 block_mask(int64_t block) { return (__mmask16)((1u << block) - 1); }

/* One row's features of a block from its unsummed accumulators lanes[0..OUTPUT_BLOCK) (those
 * past `block` set to zero here): their sums, times `scales` (NULL: none), plus `bias`, plus
 * `terms` (NULL: none; read for the first `block` features only). */
static inline __m512 block_outputs(__m512 *lanes, int64_t block, const float *scales,
                                   const float *bias, const float *terms) {
    for (int64_t j = block; j < OUTPUT_BLOCK; j++) lanes[j] = _mm512_setzero_ps();
    __m512 v = lane_sums(lanes);
    if (scales != NULL) v = _mm512_mul_ps(v, _mm512_loadu_ps(scales));
    v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
    if (terms != NULL) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(block_mask(block), terms));
    return v;
}

/* The lanes of `mask` of v into y[i..i+15] as store_output stores each: float_to_bf16's
 * rounding (nearest even on the bits, subnormals included, NaN kept quiet) in integer lanes. */
static inline void store_outputs(void *y, int64_t i, __m512 v, __mmask16 mask, int y_bf16,
                                 int round_bf16) {
    if (y_bf16 || round_bf16) {
        const __m512i u = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        const __m512i rounded = _mm512_srli_epi32(
            _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(
            _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
        const __m512i bits = _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(u, 16),
                                                  _mm512_set1_epi32(0x40));
        if (y_bf16) {
#ifdef __AVX512BW__
            _mm256_mask_storeu_epi16((uint16_t *)y + i, mask, _mm512_cvtepi32_epi16(bits));
#else
            uint16_t halves[16];
            _mm256_storeu_si256((__m256i *)halves, _mm512_cvtepi32_epi16(bits));
            for (int j = 0; j < 16; j++)
                if (mask >> j & 1) ((uint16_t *)y)[i + j] = halves[j];
#endif
            return;
        }
        v = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
    }
    _mm512_mask_storeu_ps((float *)y + i, mask, v);
}

/* One multiply-accumulate step of 32 bf16 pairs or 16 float32 ones. */
static inline __m512 dot_step(__m512 acc, const void *x, const void *w, int bf16) {
#ifdef HAVE_BF16_DOT
    if (bf16)
        return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x),
                                (__m512bh)_mm512_loadu_si512(w));
#endif
    return _mm512_fmadd_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(w), acc);
}

/* x[r] . w for R rows (a compile-time constant after inlining), K values each, left unsummed
 * at out[r * OUTPUT_BLOCK]. */
static inline __attribute__((always_inline)) void row_dots(const char *const *x, const char *w,
                                                            int64_t K, int bf16, const int R,
                                                            __m512 *out) {
    const int64_t step = 64; /* bytes per vector */
    const int64_t bytes = K * (bf16 ? 2 : 4);
    __m512 even[ROW_GROUP], odd[ROW_GROUP]; /* two chains per row hide the FMA latency */
    for (int r = 0; r < R; r++) even[r] = odd[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 * step <= bytes; b += 2 * step) {
        if (R >= 3) {
            _mm_prefetch(w + b + PREFETCH_BYTES, _MM_HINT_T1);
            _mm_prefetch(w + b + PREFETCH_BYTES + step, _MM_HINT_T1);
        } else {
            _mm_prefetch(w + b + NTA_BYTES, _MM_HINT_NTA);
            _mm_prefetch(w + b + NTA_BYTES + step, _MM_HINT_NTA);
        }
        for (int r = 0; r < R; r++) {
            even[r] = dot_step(even[r], x[r] + b, w + b, bf16);
            odd[r] = dot_step(odd[r], x[r] + b + step, w + b + step, bf16);
        }
    }
    if (b < bytes)
        for (int r = 0; r < R; r++) even[r] = dot_step(even[r], x[r] + b, w + b, bf16);
    for (int r = 0; r < R; r++) out[r * OUTPUT_BLOCK] = _mm512_add_ps(even[r], odd[r]);
}

/* acc + x . w over one vector of 32 bf16 pairs or 16 float32s, both already loaded. */
static inline __m512 dot_vec(__m512 acc, __m512i x, __m512i w, int bf16) {
#ifdef HAVE_BF16_DOT
    if (bf16) return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
#endif
    return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc);
}

/* The sums of the 16 lanes of a, b, c, d as one 4-lane vector. */
static inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    /* lanes of ab: a0+a2 b0+b2 a1+a3 b1+b3 per 128-bit block; likewise cd */
    const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44),
                                      _mm512_shuffle_ps(ab, cd, 0xEE));
    /* per block: a b c d partial sums; add the four 128-bit blocks */
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), high);
    return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

/* out[r][j] = x[r] . w_j for R rows (compile-time after inlining) and the TILE weight rows
 * starting at w, row_bytes apart: each weight vector loaded serves R rows and each input vector
 * TILE features. Prefetches the next tile's rows as it goes. */
static inline __attribute__((always_inline)) void tile_dots(const char *const *x, const char *w,
                                                             int64_t row_bytes, int bf16,
                                                             const int R,
                                                             float out[TILE][TILE]) {
    __m512 acc[TILE][TILE];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < TILE; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < row_bytes; b += 64) {
        __m512i wv[TILE];
        for (int j = 0; j < TILE; j++) {
            wv[j] = _mm512_loadu_si512(w + j * row_bytes + b);
            _mm_prefetch(w + (j + TILE * TILE_PREFETCH_TILES) * row_bytes + b, _MM_HINT_T1);
        }
        for (int r = 0; r < R; r++) {
            const __m512i xv = _mm512_loadu_si512(x[r] + b);
            for (int j = 0; j < TILE; j++) acc[r][j] = dot_vec(acc[r][j], xv, wv[j], bf16);
        }
    }
    for (int r = 0; r < R; r++)
        _mm_storeu_ps(out[r], sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
}

__attribute__((noinline)) static void tiles(const char *const *x, const char *w, int64_t row_bytes,
                                            int bf16, int R, float out[TILE][TILE]) {
    switch (R) {
    case 1: tile_dots(x, w, row_bytes, bf16, 1, out); break;
    case 2: tile_dots(x, w, row_bytes, bf16, 2, out); break;
    case 3: tile_dots(x, w, row_bytes, bf16, 3, out); break;
    default: tile_dots(x, w, row_bytes, bf16, 4, out); break;
    }
}

__attribute__((noinline)) static void dots(const char *const *x, const char *w, int64_t K,
                                           int bf16, int R, __m512 *out) {
    switch (R) { /* one unrolled body per row count */
    case 1: row_dots(x, w, K, bf16, 1, out); break;
    case 2: row_dots(x, w, K, bf16, 2, out); break;
    case 3: row_dots(x, w, K, bf16, 3, out); break;
    case 4: row_dots(x, w, K, bf16, 4, out); break;
    case 5: row_dots(x, w, K, bf16, 5, out); break;
    case 6: row_dots(x, w, K, bf16, 6, out); break;
    case 7: row_dots(x, w, K, bf16, 7, out); break;
    default: row_dots(x, w, K, bf16, 8, out); break;
    }
}
#endif

#include "quant_rows.h"

/* Features [n_begin, n_end) of y = x W^T + bias for M rows of x ([M, k], the weight's dtype).
 * y [M, ldy] is stored in bf16 when y_bf16, else in float32 (rounded to bf16 first when
 * `round_bf16`, so a float32 buffer holds what a bf16 layer would output). Quantized weights
 * (L->format) go to quant_rows.h's kernel; `bf16` is then x's dtype. */
static void linear_features(const LinearWeights *L, int bf16, const void *x, int64_t M, void *y,
                            int64_t ldy, int y_bf16, int round_bf16, int64_t n_begin,
                            int64_t n_end) {
    if (L->format != FORMAT_DENSE) {
        quant_features(L, bf16, x, M, y, ldy, y_bf16, round_bf16, n_begin, n_end);
        return;
    }
#ifdef HAVE_AVX512
    const int64_t K = L->k, row_bytes = K * (bf16 ? 2 : 4);
    int64_t n = n_begin;
    for (; M >= TILE_FROM_ROWS && n + TILE <= n_end; n += TILE) {
        const char *w = (const char *)L->weight + n * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += TILE) {
            const int R = M - m0 < TILE ? (int)(M - m0) : TILE;
            const char *xr[TILE];
            float out[TILE][TILE];
            for (int r = 0; r < R; r++) xr[r] = (const char *)x + (m0 + r) * row_bytes;
            tiles(xr, w, row_bytes, bf16, R, out);
            for (int r = 0; r < R; r++)
                for (int j = 0; j < TILE; j++)
                    store_output(y, (m0 + r) * ldy + n + j,
                                 out[r][j] + (L->bias ? load_value(L->bias, n + j, bf16) : 0.0f),
                                 y_bf16, round_bf16);
        }
    }
    for (int64_t n0 = n; n0 < n_end; n0 += OUTPUT_BLOCK) { /* OUTPUT_BLOCK features at once */
        const int64_t block = n_end - n0 < OUTPUT_BLOCK ? n_end - n0 : OUTPUT_BLOCK;
        float bias[OUTPUT_BLOCK];
        block_bias(L->bias, n0, block, bf16, bias);
        for (int64_t m0 = 0; m0 < M; m0 += ROW_GROUP) {
            const int R = M - m0 < ROW_GROUP ? (int)(M - m0) : ROW_GROUP;
            const char *xr[ROW_GROUP];
            __m512 lanes[ROW_GROUP * OUTPUT_BLOCK]; /* [row][feature of the block] */
            for (int r = 0; r < R; r++) xr[r] = (const char *)x + (m0 + r) * row_bytes;
            for (int64_t j = 0; j < block; j++)
                dots(xr, (const char *)L->weight + (n0 + j) * row_bytes, K, bf16, R, lanes + j);
            for (int r = 0; r < R; r++)
                store_outputs(y, (m0 + r) * ldy + n0,
                              block_outputs(lanes + r * OUTPUT_BLOCK, block, NULL, bias, NULL),
                              block_mask(block), y_bf16, round_bf16);
        }
    }
#else
    (void)L, (void)bf16, (void)x, (void)M, (void)y, (void)ldy, (void)y_bf16, (void)round_bf16;
    (void)n_begin, (void)n_end;
#endif
}
#endif
