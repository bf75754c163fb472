/* Softmax attention of one query token for one row and KV head (its group of query heads):
 * shared by decode attention (attention_step.c) and the whole-model decode step (layer_step.c).
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
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "vmath.h"

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

static inline int attention_sees(const AttentionJob *j, int64_t b, int64_t t) {
    return j->mask ? j->mask[b * j->T + t] : t < j->lengths[b];
}

/* Element offset of token t of row b's keys (stride kt, row stride kb) or values. */
static inline int64_t attention_token(const AttentionJob *j, int64_t b, int64_t t, int64_t kt,
                                      int64_t kb) {
    return j->pages ? j->pages[b * j->T + t] * kt : b * kb + t * kt;
}

/* n values at p (bf16 or float32) as float32. */
static inline void attention_load(const void *p, int64_t n, int bf16, float *out) {
    if (bf16) {
        const uint16_t *v = p;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) out[i] = bf16_to_float(v[i]);
    } else {
        const float *v = p;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) out[i] = v[i];
    }
}

/* p[i] = exp(p[i]) for i < n. */
static inline void attention_exp(float *p, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(p + i, vexp(_mm512_loadu_ps(p + i)));
#endif
    for (; i < n; i++) p[i] = expf(p[i]);
}

enum { KEY_BLOCK = 16 }; /* keys scored (and values summed) together */

/* Ask for the cache lines of `bytes` at p. */
static inline void attention_prefetch(const char *p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

/* Floats of scratch one work item needs: scores [G, T], q and acc [G, D], keys [16, D]. */
static inline int64_t attention_scratch(const AttentionJob *j) {
    const int64_t G = j->H / j->Hkv;
    return G * j->T + 2 * G * j->D + KEY_BLOCK * j->D;
}

#if defined(__AVX512F__)
/* The lane sums of v[0..15] as one vector (lane i = sum of v[i]): 31 shuffles and adds instead
 * of 16 separate reductions. */
static inline __m512 sum16(const __m512 *v) {
    __m512 a[8], b[4];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit block: partial sums of v[4i..4i+3] */
        b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88),
                                     _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88),
                                     _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88),
                         _mm512_shuffle_f32x4(s01, s23, 0xDD));
}
#endif

/* scores[h, t] = scale * q[h] . k_t for the G heads, -inf where row b does not see key t;
 * keys go through `block` [16, D] as float32, 16 at a time. */
static void attention_scores(const AttentionJob *j, int64_t b, const char *k, const float *q,
                             int64_t G, float *scores, float *block) {
    const int64_t D = j->D, T = j->T, size = j->bf16 ? 2 : 4;
    for (int64_t t0 = 0; t0 < T; t0 += KEY_BLOCK) {
        const int64_t n = T - t0 < KEY_BLOCK ? T - t0 : KEY_BLOCK;
        for (int64_t i = 0; i < KEY_BLOCK; i++) {
            if (t0 + KEY_BLOCK + i < T) /* the next block's keys */
                attention_prefetch(
                    k + attention_token(j, b, t0 + KEY_BLOCK + i, j->kt, j->kb) * size, D * size);
            if (i < n && attention_sees(j, b, t0 + i))
                attention_load(k + attention_token(j, b, t0 + i, j->kt, j->kb) * size, D, j->bf16,
                               block + i * D);
            else
                for (int64_t d = 0; d < D; d++) block[i * D + d] = 0.0f;
        }
        for (int64_t h = 0; h < G; h++) {
            const float *qh = q + h * D;
            float *out = scores + h * T + t0;
#if defined(__AVX512F__)
            if (D % 16 == 0) {
                __m512 acc[KEY_BLOCK];
                for (int i = 0; i < KEY_BLOCK; i++) acc[i] = _mm512_setzero_ps();
                for (int64_t d = 0; d < D; d += 16) {
                    const __m512 qv = _mm512_loadu_ps(qh + d);
                    for (int i = 0; i < KEY_BLOCK; i++)
                        acc[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(block + i * D + d), acc[i]);
                }
                float sums[KEY_BLOCK];
                _mm512_storeu_ps(sums, sum16(acc));
                for (int64_t i = 0; i < n; i++) out[i] = j->scale * sums[i];
            } else
#endif
            {
                for (int64_t i = 0; i < n; i++) {
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < D; d++) dot += qh[d] * block[i * D + d];
                    out[i] = j->scale * dot;
                }
            }
            for (int64_t i = 0; i < n; i++)
                if (!attention_sees(j, b, t0 + i)) out[i] = -INFINITY;
        }
    }
}

/* Work item = b * Hkv + g: the G = H / Hkv query heads of row b that share KV head g, so each
 * key and value is read and converted once for all of them. `scratch`: attention_scratch(j)
 * floats of the caller's. */
static void attention_group(const AttentionJob *j, int64_t item, float *scratch) {
    const int64_t b = item / j->Hkv, g = item % j->Hkv, G = j->H / j->Hkv, D = j->D, T = j->T;
    const int64_t size = j->bf16 ? 2 : 4;
    float *scores = scratch, *q = scores + G * T, *acc = q + G * D, *row = acc + G * D;
    /* row: one key or value as float32, or (attention_scores) a block of 16 keys */
    const char *k = (const char *)j->k + g * j->kh * size;
    const char *v = (const char *)j->v + g * j->vh * size;
    for (int64_t h = 0; h < G; h++)
        attention_load((const char *)j->q + (b * j->qb + (g * G + h) * D) * size, D, j->bf16,
                       q + h * D);
    float top[G];
    for (int64_t h = 0; h < G; h++) top[h] = -INFINITY;
    attention_scores(j, b, k, q, G, scores, row);
    for (int64_t h = 0; h < G; h++)
        for (int64_t t = 0; t < T; t++)
            top[h] = scores[h * T + t] > top[h] ? scores[h * T + t] : top[h];
    float total[G];
    for (int64_t h = 0; h < G; h++) { /* p = exp(s - max); unseen keys exactly 0 */
        float *sh = scores + h * T;
        const float m = top[h] > -INFINITY ? top[h] : 0.0f;
        for (int64_t t = 0; t < T; t++) sh[t] = sh[t] > -INFINITY ? sh[t] - m : -200.0f;
        attention_exp(sh, T);
        total[h] = 0.0f;
        for (int64_t t = 0; t < T; t++) {
            if (sh[t] < 1e-37f) sh[t] = 0.0f; /* exp(-200) and below: an unseen key */
            total[h] += sh[t];
        }
    }
    for (int64_t i = 0; i < G * D; i++) acc[i] = 0.0f;
    for (int64_t t0 = 0; t0 < T; t0 += KEY_BLOCK) { /* values as float32, 16 keys at a time */
        const int64_t n = T - t0 < KEY_BLOCK ? T - t0 : KEY_BLOCK;
        for (int64_t i = 0; i < n; i++) {
            if (t0 + KEY_BLOCK + i < T)
                attention_prefetch(
                    v + attention_token(j, b, t0 + KEY_BLOCK + i, j->vt, j->vb) * size, D * size);
            if (attention_sees(j, b, t0 + i))
                attention_load(v + attention_token(j, b, t0 + i, j->vt, j->vb) * size, D,
                               j->bf16, row + i * D);
            else
                for (int64_t d = 0; d < D; d++) row[i * D + d] = 0.0f; /* weight 0 anyway */
        }
        for (int64_t h = 0; h < G; h++) { /* acc[h] += sum_i p[h, t0 + i] v_i, 16 lanes a go */
            const float *p = scores + h * T + t0;
#if defined(__AVX512F__)
            if (D % 16 == 0) {
                for (int64_t d0 = 0; d0 < D; d0 += 16) {
                    __m512 a = _mm512_loadu_ps(acc + h * D + d0);
                    for (int64_t i = 0; i < n; i++)
                        a = _mm512_fmadd_ps(_mm512_set1_ps(p[i]),
                                            _mm512_loadu_ps(row + i * D + d0), a);
                    _mm512_storeu_ps(acc + h * D + d0, a);
                }
                continue;
            }
#endif
            for (int64_t i = 0; i < n; i++) {
                float *ah = acc + h * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) ah[d] += p[i] * row[i * D + d];
            }
        }
    }
    for (int64_t h = 0; h < G; h++) { /* a row that sees nothing: zeros */
        const float norm = total[h] > 0.0f ? 1.0f / total[h] : 0.0f;
        void *out = (char *)j->out + (b * j->H + g * G + h) * D * size;
        for (int64_t d = 0; d < D; d++) {
            if (j->bf16)
                ((uint16_t *)out)[d] = float_to_bf16(acc[h * D + d] * norm);
            else
                ((float *)out)[d] = acc[h * D + d] * norm;
        }
    }
}
/* attention_group over every (row, KV head) of the job, split over `threads` OpenMP threads,
 * each with its own scratch. Returns 0, or -2 when out of memory. */
static int attention_all(const AttentionJob *j, int threads) {
    const int64_t per_thread = attention_scratch(j);
    float *buf = malloc(sizeof(float) * (size_t)threads * per_thread);
    if (buf == NULL) return -2;
#pragma omp parallel num_threads(threads)
    {
        float *scratch = buf + (size_t)omp_get_thread_num() * per_thread;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < j->B * j->Hkv; item++) attention_group(j, item, scratch);
    }
    free(buf);
    return 0;
}
#endif
