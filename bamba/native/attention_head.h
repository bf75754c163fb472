/* Softmax attention of one query token for one (row, query head): shared by decode attention
 * (attention_step.c) and the whole-model decode step (layer_step.c).
 *
 * For row b, query head h (KV head g = h / (H / Hkv)) and the keys t the row sees:
 *   s_t = scale * q[b, h] . k[b, t, g];  p = softmax(s);  out[b, h] = sum_t p_t v[b, t, g]
 * in float32 from bf16 or float32 tensors. Keys and values are read where they lie: token t of
 * row b at b * kb + t * kt, or, with a page table, at pages[b, t] * kt; head g at g * kh
 * (strides in elements, head_dim contiguous). Row b sees key t where mask[b, t] is 1, or,
 * without a mask, for t < lengths[b].
 */
#ifndef BAMBA_ATTENTION_HEAD_H
#define BAMBA_ATTENTION_HEAD_H
#include <math.h>
#include <stdint.h>

#include "bf16.h"

typedef struct {
    const void *q, *k, *v;     /* q [B, H, D] with rows qb elements apart */
    const uint8_t *mask;       /* [B, T], or NULL: see lengths */
    const int64_t *lengths;    /* [B] keys each row sees (without a mask) */
    const int64_t *pages;      /* [B, T] token rows of the keys and values, or NULL */
    void *out;                 /* [B, H, D] contiguous, q's dtype */
    int64_t B, H, Hkv, D, T, qb;
    int64_t kb, kt, kh, vb, vt, vh; /* strides in elements */
    int bf16;
    float scale;
} AttentionJob;

static inline float attention_dot(const AttentionJob *j, const void *a, const void *b) {
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

static inline int attention_sees(const AttentionJob *j, int64_t b, int64_t t) {
    return j->mask ? j->mask[b * j->T + t] : t < j->lengths[b];
}

/* Element offset of token t of row b's keys (stride kt, row stride kb) or values. */
static inline int64_t attention_token(const AttentionJob *j, int64_t b, int64_t t, int64_t kt,
                                      int64_t kb) {
    return j->pages ? j->pages[b * j->T + t] * kt : b * kb + t * kt;
}

/* Work item = b * H + h; scores [T] and acc [D] are the caller's float32 scratch. */
static void attention_head(const AttentionJob *j, int64_t item, float *scores, float *acc) {
    const int64_t b = item / j->H, h = item % j->H, g = h / (j->H / j->Hkv);
    const int64_t size = j->bf16 ? 2 : 4;
    const char *q = (const char *)j->q + (b * j->qb + h * j->D) * size;
    const char *k = (const char *)j->k + g * j->kh * size;
    const char *v = (const char *)j->v + g * j->vh * size;
    float top = -INFINITY;
    for (int64_t t = 0; t < j->T; t++) {
        scores[t] = attention_sees(j, b, t) ?
            j->scale * attention_dot(j, q, k + attention_token(j, b, t, j->kt, j->kb) * size) :
            -INFINITY;
        top = scores[t] > top ? scores[t] : top;
    }
    for (int64_t d = 0; d < j->D; d++) acc[d] = 0.0f;
    float total = 0.0f;
    if (top > -INFINITY) {
        for (int64_t t = 0; t < j->T; t++) {
            if (!attention_sees(j, b, t)) continue;
            const float p = expf(scores[t] - top);
            const char *vt = v + attention_token(j, b, t, j->vt, j->vb) * size;
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
#endif
