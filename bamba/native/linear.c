/* Linear layers for a few rows (decode): y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]),
 * in bf16 or float32.
 *
 * At batch 1-8 a linear layer streams its whole weight matrix from memory for a handful of dot
 * products per weight, so its speed is the speed of that stream. Each thread takes a block of
 * output features and reads their weight rows once, multiplying 32 bf16 pairs per instruction
 * (AVX-512 BF16 `vdpbf16ps`, float32 accumulation; or 16 float32 FMAs) against the few input
 * rows held in cache. bf16 output is rounded to nearest even, as torch's bf16 linear does.
 * Returns 0, or -1 when this build or shape is not supported (callers fall back to torch).
 */
#include <stdint.h>

#include "bf16.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_AVX512 1
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_BF16_DOT 1
#endif

enum { MAX_ROWS = 8 };

/* One feature-block function per element type, applied to blocks of 16 output features. */
typedef void (*Features)(const void *x, const void *W, const void *bias, void *y, int64_t M,
                         int64_t N, int64_t K, int64_t begin, int64_t end);


#ifdef HAVE_BF16_DOT
__attribute__((noinline)) static void features_bf16(const void *xv, const void *Wv,
                                                    const void *biasv, void *yv, int64_t M,
                                                    int64_t N, int64_t K, int64_t begin,
                                                    int64_t end) {
    const uint16_t *x = xv, *W = Wv, *bias = biasv;
    uint16_t *y = yv;
    for (int64_t n = begin; n < end; n++) {
        const uint16_t *w = W + n * K;
        __m512 acc[MAX_ROWS];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 32) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
            for (int64_t m = 0; m < M; m++)
                acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * K + k), wv);
        }
        const float b = bias ? bf16_to_float(bias[n]) : 0.0f;
        for (int64_t m = 0; m < M; m++) y[m * N + n] = float_to_bf16(_mm512_reduce_add_ps(acc[m]) + b);
    }
}
#endif

#ifdef HAVE_AVX512
__attribute__((noinline)) static void features_f32(const void *xv, const void *Wv,
                                                   const void *biasv, void *yv, int64_t M,
                                                   int64_t N, int64_t K, int64_t begin,
                                                   int64_t end) {
    const float *x = xv, *W = Wv, *bias = biasv;
    float *y = yv;
    for (int64_t n = begin; n < end; n++) {
        const float *w = W + n * K;
        __m512 acc[MAX_ROWS];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            __m512 wv = _mm512_loadu_ps(w + k);
            for (int64_t m = 0; m < M; m++)
                acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), wv, acc[m]);
        }
        const float b = bias ? bias[n] : 0.0f;
        for (int64_t m = 0; m < M; m++) y[m * N + n] = _mm512_reduce_add_ps(acc[m]) + b;
    }
}
#endif

static int over_blocks(Features features, int64_t width_multiple, const void *x, const void *W,
                       const void *bias, void *y, int64_t M, int64_t N, int64_t K,
                       int threads) {
    if (features == NULL || M < 1 || M > MAX_ROWS || K % width_multiple != 0) return -1;
    enum { BLOCK = 16 };
    const int64_t blocks = (N + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < blocks; i++) {
        const int64_t end = (i + 1) * BLOCK < N ? (i + 1) * BLOCK : N;
        features(x, W, bias, y, M, N, K, i * BLOCK, end);
    }
    return 0;
}

int bamba_linear_f32(const float *x, const float *W, const float *bias, float *y, int64_t M,
                     int64_t N, int64_t K, int threads) {
#ifdef HAVE_AVX512
    Features f = features_f32;
#else
    Features f = NULL;
#endif
    return over_blocks(f, 16, x, W, bias, y, M, N, K, threads);
}

int bamba_linear_bf16(const uint16_t *x, const uint16_t *W, const uint16_t *bias, uint16_t *y,
                      int64_t M, int64_t N, int64_t K, int threads) {
#ifdef HAVE_BF16_DOT
    Features f = features_bf16;
#else
    Features f = NULL;
#endif
    return over_blocks(f, 32, x, W, bias, y, M, N, K, threads);
}

/* Bit 0: the bf16 kernel is built; bit 1: the float32 kernel is. */
int bamba_linear_supported(void) {
    int bits = 0;
#ifdef HAVE_BF16_DOT
    bits |= 1;
#endif
#ifdef HAVE_AVX512
    bits |= 2;
#endif
    return bits;
}
