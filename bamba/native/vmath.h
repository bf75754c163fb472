/* Loads, exp, reciprocal and silu on 16 float32 lanes (AVX-512), shared by the prefill and
 * decode kernels: silu over long vectors costs as much as the matmuls when done with scalar expf.
 * exp(x) = 2^n e^r with n = round(x / ln 2), |r| <= ln2 / 2, e^r by a degree-7 Taylor
 * polynomial (~1 ulp), 2^n by scalef. ``silu_vec`` falls back to scalar expf without AVX-512.
 */
#ifndef BAMBA_VMATH_H
#define BAMBA_VMATH_H
#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>

/* 16 values of a float32 or bfloat16 array as float32. */
static inline __attribute__((always_inline)) __m512 vload(const void *base, int bf16,
                                                          int64_t i) {
    if (!bf16) return _mm512_loadu_ps((const float *)base + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __attribute__((always_inline)) __m512 vexp(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);   /* ln 2, high */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);     /* ln 2, low */
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* 1 / d for d >= 1: 14-bit estimate and one Newton step (cheaper than a division). */
static inline __attribute__((always_inline)) __m512 vrecip(__m512 d) {
    const __m512 r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

static inline __attribute__((always_inline)) __m512 vsilu(__m512 v) {
    const __m512 e = vexp(_mm512_sub_ps(_mm512_setzero_ps(), v));
    return _mm512_mul_ps(v, vrecip(_mm512_add_ps(_mm512_set1_ps(1.0f), e)));
}
#endif

/* out[i] = silu(in[i]) for i < n (out may be in). */
static inline void silu_vec(const float *in, float *out, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, vsilu(_mm512_loadu_ps(in + i)));
    if (i < n) {
        const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(out + i, tail, vsilu(_mm512_maskz_loadu_ps(tail, in + i)));
    }
#else
    for (; i < n; i++) out[i] = in[i] / (1.0f + expf(-in[i]));
#endif
}
#endif
