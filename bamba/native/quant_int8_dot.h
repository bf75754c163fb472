/* int8 weights against int8 activations: integer dot products (AVX-512 VNNI `vpdpbusd`, 64
 * unsigned-by-signed byte products an instruction) for the few-row kernel at 1 to
 * INT8_DOT_MAX_ROWS rows, where dequantizing int8 weights to bf16 costs more than streaming
 * them (benchmarks/README.md#quantization); int4, fp8 and more rows keep quant_rows.h's path.
 *
 * The activations are quantized per call, as llama.cpp quantizes them for its Q8_0 dot
 * products: each block of 32 inputs of a row gets the scale s = max |x| / 127 and the values
 * q = round-half-even(x / s) in [-127, 127] (bamba.quant.formats.int8_activations is the
 * torch reference). The weights are read as stored (quant_rows.h): bytes holding q_w + 128,
 * unsigned, which is what `vpdpbusd` multiplies; the offset's products (128 times the sum of a
 * lane's activations) are subtracted by starting each lane's integer sum at minus them. A
 * chunk of 64 inputs gives 16 int32 lanes, lane i the exact dot product over inputs
 * 4i..4i+3, turned to float32 and multiplied by its block's scale, then by the weights'
 * (quant_rows.h's chunk and lanes, so `chunk_scales` serves groups of 32).
 *
 * Each input row is prepared once per call and thread (`prepare_int8_rows`): its k quantized
 * bytes, then per chunk 16 lane scales (float32) and 16 lane offsets (int32).
 */
#ifndef BAMBA_QUANT_INT8_DOT_H
#define BAMBA_QUANT_INT8_DOT_H

#if defined(HAVE_BF16_DOT) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define HAVE_INT8_DOT 1

enum { ACT_BLOCK = 32, INT8_CHUNK = 64, INT8_DOT_MAX_ROWS = 3 };

/* Bytes of one prepared row of width k: the quantized values, then per chunk 16 float32 lane
 * scales and 16 int32 lane offsets. */
static inline int64_t int8_row_bytes(int64_t k) {
    return k + k / INT8_CHUNK * 128;
}

/* x [M, k] (bf16 or float32) quantized per block of 32 into xq [M, int8_row_bytes(k)]. */
static void prepare_int8_rows(const void *x, int x_bf16, int64_t M, int64_t k, char *xq) {
    for (int64_t m = 0; m < M; m++) {
        int8_t *values = (int8_t *)(xq + m * int8_row_bytes(k));
        char *lanes = (char *)values + k;
        for (int64_t c = 0; c < k; c += INT8_CHUNK) {
            float *scales = (float *)(lanes + c / INT8_CHUNK * 128);
            int32_t *offsets = (int32_t *)(scales + 16);
            for (int64_t b = 0; b < INT8_CHUNK; b += ACT_BLOCK) {
                float v[ACT_BLOCK], most = 0.0f;
                for (int i = 0; i < ACT_BLOCK; i++) {
                    v[i] = load_value(x, m * k + c + b + i, x_bf16);
                    most = fmaxf(most, fabsf(v[i]));
                }
                const float s = most / 127.0f;
                for (int i = 0; i < ACT_BLOCK; i++)
                    values[c + b + i] = (int8_t)(s > 0.0f ? nearbyintf(v[i] / s) : 0.0f);
                for (int64_t lane = b / 4; lane < (b + ACT_BLOCK) / 4; lane++) scales[lane] = s;
            }
            for (int lane = 0; lane < 16; lane++) {
                const int8_t *q = values + c + 4 * lane;
                offsets[lane] = -128 * (q[0] + q[1] + q[2] + q[3]);
            }
        }
    }
}

/* out[r] = x_r . w_n for R prepared rows (compile-time after inlining), row_bytes apart. */
static inline __attribute__((always_inline)) void int8_row_dots(const LinearWeights *L,
                                                                 const QuantTables *t,
                                                                 const char *xq, int64_t n,
                                                                 const int R, float *out) {
    const int64_t k = L->k, chunks = k / INT8_CHUNK, row_bytes = int8_row_bytes(k);
    const int64_t per_group = t->groups_per_chunk ? 1 : L->group / INT8_CHUNK; /* chunks */
    const char *w = (const char *)L->weight + n * k;
    __m512 acc[INT8_DOT_MAX_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0, g = 0; c < chunks; g++) {
        __m512 sums[INT8_DOT_MAX_ROWS];
        for (int r = 0; r < R; r++) sums[r] = _mm512_setzero_ps();
        for (const int64_t end = c + per_group; c < end; c++) {
            _mm_prefetch(w + c * INT8_CHUNK + PREFETCH_BYTES, _MM_HINT_T1);
            const __m512i bytes = _mm512_loadu_si512(w + c * INT8_CHUNK);
            const __m512 wscale = t->groups_per_chunk ? chunk_scales(L, t, n, c)
                                                      : _mm512_set1_ps(1.0f);
            for (int r = 0; r < R; r++) {
                const char *row = xq + r * row_bytes, *lanes = row + k + c * 128;
                const __m512i dot = _mm512_dpbusd_epi32(
                    _mm512_loadu_si512(lanes + 64), bytes,
                    _mm512_loadu_si512(row + c * INT8_CHUNK));
                __m512 scale = _mm512_loadu_ps((const float *)lanes);
                if (t->groups_per_chunk) scale = _mm512_mul_ps(scale, wscale);
                sums[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, sums[r]);
            }
        }
        if (t->groups_per_chunk)
            for (int r = 0; r < R; r++) acc[r] = _mm512_add_ps(acc[r], sums[r]);
        else {
            const __m512 s = _mm512_set1_ps(quant_scale(L, n, g));
            for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(sums[r], s, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

/* One unrolled body per row count. */
__attribute__((noinline)) static void int8_dots(const LinearWeights *L, const QuantTables *t,
                                                const char *xq, int64_t n, int R, float *out) {
    switch (R) {
    case 1: int8_row_dots(L, t, xq, n, 1, out); break;
    case 2: int8_row_dots(L, t, xq, n, 2, out); break;
    default: int8_row_dots(L, t, xq, n, 3, out); break;
    }
}
#endif
#endif
