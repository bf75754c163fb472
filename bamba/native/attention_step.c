/* Softmax attention for one query token per row (decode), over keys and values in place.
 *
 * For row b, query head h (KV head g = h / (H / Hkv)) and the keys t the mask allows:
 *   s_t = scale * q[b, h] . k[b, t, g];  p = softmax(s);  out[b, h] = sum_t p_t v[b, t, g]
 * in float32 from bf16 or float32 tensors. Keys and values are read where they lie (any row,
 * time and head strides; head_dim contiguous): the contiguous cache of `generate` and the
 * engine's head-major pages alike. torch's bf16 matmul builds a new oneDNN primitive for every
 * new key length, ~0.6 ms a call here, which made attention a fifth of a decode step.
 * Work items (b, h) are split over `threads` OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include <omp.h>

#include "bf16.h"

typedef struct {
    const void *q, *k, *v;
    const uint8_t *mask;        /* [B, T]: 1 where row b sees key t */
    void *out;                  /* [B, H, D], q's dtype */
    int64_t B, H, Hkv, D, T;
    int64_t kb, kt, kh, vb, vt, vh; /* strides in elements */
    int bf16;
    float scale;
} Job;

static float dot(const Job *j, const void *a, const void *b) {
    float acc = 0.0f;
    if (j->bf16) {
        const uint16_t *x = a, *y = b;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < j->D; d++) acc += bf16_to_float(x[d]) * bf16_to_float(y[d]);
    } else {
        const float *x = a, *y = b;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < j->D; d++) acc += x[d] * y[d];
    }
    return acc;
}

static void head(const Job *j, int64_t item, float *scores, float *acc) {
    const int64_t b = item / j->H, h = item % j->H, g = h / (j->H / j->Hkv);
    const int64_t size = j->bf16 ? 2 : 4;
    const char *q = (const char *)j->q + (b * j->H + h) * j->D * size;
    const char *k = (const char *)j->k + (b * j->kb + g * j->kh) * size;
    const char *v = (const char *)j->v + (b * j->vb + g * j->vh) * size;
    const uint8_t *mask = j->mask + b * j->T;
    float top = -INFINITY;
    for (int64_t t = 0; t < j->T; t++) {
        scores[t] = mask[t] ? j->scale * dot(j, q, k + t * j->kt * size) : -INFINITY;
        top = scores[t] > top ? scores[t] : top;
    }
    for (int64_t d = 0; d < j->D; d++) acc[d] = 0.0f;
    float total = 0.0f;
    if (top > -INFINITY) {
        for (int64_t t = 0; t < j->T; t++) {
            if (!mask[t]) continue;
            const float p = expf(scores[t] - top);
            const char *vt = v + t * j->vt * size;
            total += p;
            if (j->bf16) {
#pragma omp simd
                for (int64_t d = 0; d < j->D; d++)
                    acc[d] += p * bf16_to_float(((const uint16_t *)vt)[d]);
            } else {
#pragma omp simd
                for (int64_t d = 0; d < j->D; d++) acc[d] += p * ((const float *)vt)[d];
            }
        }
    }
    const float norm = total > 0.0f ? 1.0f / total : 0.0f; /* a row that sees nothing: zeros */
    void *out = (char *)j->out + (b * j->H + h) * j->D * size;
    for (int64_t d = 0; d < j->D; d++) {
        if (j->bf16)
            ((uint16_t *)out)[d] = float_to_bf16(acc[d] * norm);
        else
            ((float *)out)[d] = acc[d] * norm;
    }
}

/* Returns 0, or -2 when out of memory. */
int bamba_decode_attention(const void *q, const void *k, const void *v, const uint8_t *mask,
                           void *out, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t T,
                           const int64_t *k_strides, const int64_t *v_strides, int bf16,
                           float scale, int threads) {
    const Job j = {q, k, v, mask, out, B, H, Hkv, D, T, k_strides[0], k_strides[1],
                   k_strides[2], v_strides[0], v_strides[1], v_strides[2], bf16, scale};
    float *buf = malloc(sizeof(float) * (size_t)threads * (T + D));
    if (buf == NULL) return -2;
#pragma omp parallel num_threads(threads)
    {
        float *scores = buf + (size_t)omp_get_thread_num() * (T + D);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < B * H; item++) head(&j, item, scores, scores + T);
    }
    free(buf);
    return 0;
}
