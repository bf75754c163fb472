/* silu over float32 vectors with AVX-512 (16 lanes), for the large-batch decode stages where a
 * scalar expf per element costs as much as the matmuls. exp(x) = 2^n e^r with n = round(x /
 * ln 2), |r| <= ln2 / 2, e^r by a degree-6 polynomial (relative error ~2e-7), 2^n by scalef.
 * Falls back to scalar expf without AVX-512.
 */
#ifndef BAMBA_VMATH_H
#define BAMBA_VMATH_H
#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x); /* ln 2, high part */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);       /* ln 2, low part */
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 silu512(__m512 v) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(v, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}
#endif

/* out[i] = silu(in[i]) for i < n (out may be in). */
static inline void silu_vec(const float *in, float *out, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, silu512(_mm512_loadu_ps(in + i)));
    if (i < n) {
        const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(out + i, tail, silu512(_mm512_maskz_loadu_ps(tail, in + i)));
    }
#else
    for (; i < n; i++) out[i] = in[i] / (1.0f + expf(-in[i]));
#endif
}
#endif
