/* Mamba2's short causal conv + silu for training: forward and backward, with document resets.
 *
 *   bamba_conv_silu_fwd  y[t] = silu(bias + sum_i w[i] x[t-(K-1)+i])   (taps summed current first)
 *   bamba_conv_silu_bwd  from dy: dx, dw, dbias (the pre-activation recomputed, not stored)
 *
 * x [B, L, D] float32 with any row strides (a slice of in_proj's output), channels contiguous;
 * weights transposed, wt [K, D]; seq [B, L] int64 document ids or NULL: a tap never reaches an
 * earlier document (nor before t = 0: training starts from a zero conv state). dy, y, dx are
 * contiguous [B, L, D]; dw [K, D], dbias [D] (written, not accumulated).
 *
 * Both are specialised for Mamba2's d_conv of 4 (the window unrolled in registers).
 * Work is split by blocks of 16 channels: each block walks the whole sequence with its window
 * (and, backward, its pending input gradients) in registers, so every input is read once and
 * the weight gradients accumulate in registers with no reduction across threads.
 * Functions return 0, or -1 without AVX-512 or when D is not a multiple of 16 or K > 8.
 */
#include <stdint.h>

#include "vmath.h"

#define CONV_MAX_K 8

int bamba_conv_train_supported(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__)
typedef struct {
    const float *x;
    int64_t sxb, sxt, len, dim, kernel;
    const float *wt, *bias;
    const int64_t *seq;
} ConvIn;

/* Whether time s of row b feeds time t: inside the sequence and in t's document. */
static inline __attribute__((always_inline)) int feeds(const ConvIn *in, int64_t b, int64_t t,
                                                       int64_t s) {
    return s >= 0 && (!in->seq || in->seq[b * in->len + s] == in->seq[b * in->len + t]);
}

/* Input block c at time s of row b, or zero where it does not feed time t. */
static inline __attribute__((always_inline)) __m512 tap(const ConvIn *in, int64_t b, int64_t t,
                                                        int64_t s, int64_t c) {
    return feeds(in, b, t, s) ? _mm512_loadu_ps(in->x + b * in->sxb + s * in->sxt + c)
                              : _mm512_setzero_ps();
}

/* The pre-activation of channels c..c+15 at time t. */
static inline __attribute__((always_inline)) __m512 pre_act(const ConvIn *in, const int64_t K,
                                                            const __m512 *w, __m512 bias,
                                                            int64_t b, int64_t t, int64_t c) {
    __m512 acc = bias;
    for (int64_t i = K - 1; i >= 0; i--)
        acc = _mm512_fmadd_ps(tap(in, b, t, t - (K - 1) + i, c), w[i], acc);
    return acc;
}

static void load_weights(const ConvIn *in, int64_t c, __m512 *w, __m512 *bias) {
    for (int64_t i = 0; i < in->kernel; i++) w[i] = _mm512_loadu_ps(in->wt + i * in->dim + c);
    *bias = in->bias ? _mm512_loadu_ps(in->bias + c) : _mm512_setzero_ps();
}

static inline __attribute__((always_inline)) void forward_block(const ConvIn *in, const int64_t K,
                                                                int64_t b, int64_t c, float *y) {
    __m512 w[CONV_MAX_K], bias;
    load_weights(in, c, w, &bias);
    for (int64_t t = 0; t < in->len; t++)
        _mm512_storeu_ps(y + (b * in->len + t) * in->dim + c, vsilu(pre_act(in, K, w, bias, b, t, c)));
}

/* silu'(p) = s (1 + p (1 - s)), s = sigmoid(p). */
static inline __attribute__((always_inline)) __m512 silu_grad(__m512 p) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, vexp(_mm512_sub_ps(_mm512_setzero_ps(), p))));
    return _mm512_mul_ps(s, _mm512_fmadd_ps(p, _mm512_sub_ps(one, s), one));
}

/* Channels c..c+15 over every row: g[t] = dy[t] silu'(pre[t]) feeds dbias, dw[i] (with the
 * input it multiplied) and dx[t-(K-1)+i], which is complete once g[t+K-1] is in. */
static inline __attribute__((always_inline)) void backward_block(
        const ConvIn *in, const int64_t K, int64_t batch, int64_t c, const float *dy, float *dx,
        float *dw, float *dbias) {
    const int64_t L = in->len, D = in->dim;
    __m512 w[CONV_MAX_K], bias, gw[CONV_MAX_K], gb = _mm512_setzero_ps();
    load_weights(in, c, w, &bias);
    for (int64_t i = 0; i < K; i++) gw[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < batch; b++) {
        __m512 pending[CONV_MAX_K];  /* pending[i]: dx at t-(K-1)+i, accumulating */
        for (int64_t i = 0; i < K; i++) pending[i] = _mm512_setzero_ps();
        for (int64_t t = 0; t < L + K - 1; t++) {
            if (t < L) {
                const __m512 g = _mm512_mul_ps(_mm512_loadu_ps(dy + (b * L + t) * D + c),
                                               silu_grad(pre_act(in, K, w, bias, b, t, c)));
                gb = _mm512_add_ps(gb, g);
                for (int64_t i = 0; i < K; i++) {
                    const int64_t s = t - (K - 1) + i;
                    if (!feeds(in, b, t, s)) continue;
                    gw[i] = _mm512_fmadd_ps(g, _mm512_loadu_ps(in->x + b * in->sxb + s * in->sxt + c),
                                            gw[i]);
                    pending[i] = _mm512_fmadd_ps(g, w[i], pending[i]);
                }
            }
            const int64_t done = t - (K - 1);
            if (done >= 0) _mm512_storeu_ps(dx + (b * L + done) * D + c, pending[0]);
            for (int64_t i = 0; i < K - 1; i++) pending[i] = pending[i + 1];
            pending[K - 1] = _mm512_setzero_ps();
        }
    }
    for (int64_t i = 0; i < K; i++) _mm512_storeu_ps(dw + i * D + c, gw[i]);
    _mm512_storeu_ps(dbias + c, gb);
}
#endif

int bamba_conv_silu_fwd(const float *x, int64_t sxb, int64_t sxt, int64_t batch, int64_t len,
                        int64_t dim, int64_t kernel, const float *wt, const float *bias,
                        const int64_t *seq, float *y, int threads) {
#if defined(__AVX512F__)
    if (dim % 16 || kernel < 1 || kernel > CONV_MAX_K) return -1;
    const ConvIn in = {x, sxb, sxt, len, dim, kernel, wt, bias, seq};
    const int64_t blocks = dim / 16;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t b = 0; b < batch; b++)
        for (int64_t k = 0; k < blocks; k++) {
            if (kernel == 4)
                forward_block(&in, 4, b, k * 16, y);
            else
                forward_block(&in, kernel, b, k * 16, y);
        }
    return 0;
#else
    (void)x; (void)sxb; (void)sxt; (void)batch; (void)len; (void)dim; (void)kernel; (void)wt;
    (void)bias; (void)seq; (void)y; (void)threads;
    return -1;
#endif
}

int bamba_conv_silu_bwd(const float *x, int64_t sxb, int64_t sxt, int64_t batch, int64_t len,
                        int64_t dim, int64_t kernel, const float *wt, const float *bias,
                        const int64_t *seq, const float *dy, float *dx, float *dw, float *dbias,
                        int threads) {
#if defined(__AVX512F__)
    if (dim % 16 || kernel < 1 || kernel > CONV_MAX_K) return -1;
    const ConvIn in = {x, sxb, sxt, len, dim, kernel, wt, bias, seq};
    const int64_t blocks = dim / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < blocks; k++) {
        if (kernel == 4)  /* Mamba2's d_conv: unrolled, the window in registers */
            backward_block(&in, 4, batch, k * 16, dy, dx, dw, dbias);
        else
            backward_block(&in, kernel, batch, k * 16, dy, dx, dw, dbias);
    }
    return 0;
#else
    (void)x; (void)sxb; (void)sxt; (void)batch; (void)len; (void)dim; (void)kernel; (void)wt;
    (void)bias; (void)seq; (void)dy; (void)dx; (void)dw; (void)dbias; (void)threads;
    return -1;
#endif
}
