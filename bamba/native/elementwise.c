/* Two elementwise passes of a prefill, each one pass over memory instead of torch's two to four:
 *
 *   bamba_silu_mul  out = silu(g) * u                        (the SwiGLU glue)
 *   bamba_rms_norm  out = w * (x / sqrt(mean(x^2) + eps))    per row (the RMS norm)
 *
 * Values round to bf16 where the torch expressions they replace round them (silu's result and
 * the product; the normalised x and the product with w), so a bf16 model gives the same
 * numbers up to the order of float32 sums. Tensors are contiguous, bf16 or float32 (one dtype
 * per call). Work is split over `threads` OpenMP threads.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "vmath.h"

enum { BLOCK = 256 };

static inline float round_to(float v, int bf16) {
    return bf16 ? bf16_to_float(float_to_bf16(v)) : v;
}

static void load_block(const void *p, int64_t start, int64_t n, int bf16, float *out) {
    if (bf16) {
        const uint16_t *q = (const uint16_t *)p + start;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) out[i] = bf16_to_float(q[i]);
    } else {
        const float *q = (const float *)p + start;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) out[i] = q[i];
    }
}

static void store_block(void *p, int64_t start, int64_t n, int bf16, const float *in) {
    if (bf16) {
        uint16_t *q = (uint16_t *)p + start;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) q[i] = float_to_bf16(in[i]);
    } else {
        float *q = (float *)p + start;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) q[i] = in[i];
    }
}

void bamba_silu_mul(const void *g, const void *u, void *out, int64_t n, int bf16, int threads) {
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t start = b * BLOCK, len = n - start < BLOCK ? n - start : BLOCK;
        float gate[BLOCK], up[BLOCK];
        load_block(g, start, len, bf16, gate);
        load_block(u, start, len, bf16, up);
        silu_vec(gate, gate, len);
        for (int64_t i = 0; i < len; i++) gate[i] = round_to(gate[i], bf16) * up[i];
        store_block(out, start, len, bf16, gate);
    }
}

/* Rows of d values. Returns 0, or -2 when out of memory. */
int bamba_rms_norm(const void *x, const void *w, void *out, int64_t rows, int64_t d, float eps,
                   int bf16, int threads) {
    float *weight = malloc(sizeof(float) * (size_t)d * (threads + 1));
    if (weight == NULL) return -2;
    load_block(w, 0, d, bf16, weight);
#pragma omp parallel num_threads(threads)
    {
        float *row = weight + (size_t)d * (1 + omp_get_thread_num());
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            load_block(x, r * d, d, bf16, row);
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t i = 0; i < d; i++) sum += row[i] * row[i];
            const float scale = 1.0f / sqrtf(sum / (float)d + eps);
            for (int64_t i = 0; i < d; i++)
                row[i] = round_to(round_to(row[i] * scale, bf16) * weight[i], bf16);
            store_block(out, r * d, d, bf16, row);
        }
    }
    free(weight);
    return 0;
}
