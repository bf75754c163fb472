/* The linear layer of `torch.ops.bamba.linear_rows`: y = x W^T (+ bias) for a few rows, in bf16
 * or float32, streaming the weights once (see dot_rows.h). Output features are split
 * between `threads` OpenMP threads. bf16 output is rounded to nearest even, as torch's bf16
 * linear does.
 * Returns 0, or -1 when this build or shape is not supported (callers fall back to torch).
 */
#include <stdint.h>

#include "dot_rows.h"

static int linear(int bf16, const void *x, const void *W, const void *bias, void *y, int64_t M,
                  int64_t N, int64_t K, int threads) {
    if (M < 1 || !linear_supported(bf16, K)) return -1;
    const LinearWeights L = {W, bias, N, K};
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        my_share(N, &begin, &end);
        linear_features(&L, bf16, x, M, y, N, bf16, 0, begin, end);
    }
    return 0;
}

int bamba_linear_f32(const float *x, const float *W, const float *bias, float *y, int64_t M,
                     int64_t N, int64_t K, int threads) {
    return linear(0, x, W, bias, y, M, N, K, threads);
}

int bamba_linear_bf16(const uint16_t *x, const uint16_t *W, const uint16_t *bias, uint16_t *y,
                      int64_t M, int64_t N, int64_t K, int threads) {
    return linear(1, x, W, bias, y, M, N, K, threads);
}

/* Bit 0: the bf16 kernel is built; bit 1: the float32 kernel is. */
int bamba_linear_supported(void) {
    return (linear_supported(1, 32) ? 1 : 0) | (linear_supported(0, 16) ? 2 : 0);
}

/* y [M, N] = x W^T (+ bias) for a few rows over quantized weights (quant_rows.h), x, bias and
 * y bf16 when x_bf16, else float32. Returns 0, or -1 when this build or shape is not
 * supported. */
int bamba_quant_linear(const void *x, int x_bf16, const void *W, int format, const void *scales,
                       int scale_kind, int64_t group, int64_t scale_stride, const void *bias,
                       void *y, int64_t M, int64_t N, int64_t K, int threads) {
    if (M < 1 || !quant_supported(format, K, group)) return -1;
    const LinearWeights L = {W, bias, N, K, format, scales, scale_kind, group, scale_stride};
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        my_share(N, &begin, &end);
        quant_features(&L, x_bf16, x, M, y, N, x_bf16, 0, begin, end);
    }
    return 0;
}

int bamba_int8_activations = 1;

/* Choose int8 activations against int8 weights at a few rows (1, where the build has AVX-512
 * VNNI) or bf16 ones (0); returns whether int8 activations are now in use. */
int bamba_quant_set_int8_activations(int on) {
    bamba_int8_activations = on != 0;
#ifdef HAVE_INT8_DOT
    return bamba_int8_activations;
#else
    return 0;
#endif
}

#ifdef HAVE_INT8_DOT
enum { GEMM_MAX_ROWS = 512 }; /* rows of x packed at a time (the weights packed once for each) */
#endif

/* y [M, N] = x W^T (+ bias) for many rows over quantized weights (quant_gemm.h): int8 or int4
 * against int8 activations, fp8 or dense bf16 (format 0, no scales) against bf16 x; x, bias
 * and y bf16 when x_bf16, else float32.
 * Returns 0; -1 when this build, shape or format is not taken or, for int8 and int4, int8
 * activations are off (the caller dequantizes tiles instead); -2 when memory for the packed
 * activations or weights is not available. */
int bamba_quant_gemm(const void *x, int x_bf16, const void *W, int format, const void *scales,
                     int scale_kind, int64_t group, int64_t scale_stride, const void *bias,
                     void *y, int64_t M, int64_t N, int64_t K, int threads) {
#ifdef HAVE_INT8_DOT
    if ((!bamba_int8_activations && !bf16_products(format)) || M < 1 || N < 1 ||
        N % GEMM_WEIGHT_ROWS ||
        !quant_gemm_supported(format, K, group, has_offsets(scale_kind), x_bf16) ||
        threads < 1)
        return -1;
    const LinearWeights L = {W, bias, N, K, format, scales, scale_kind, group, scale_stride};
    const int64_t offset = stored_offset(format), most = GEMM_MAX_ROWS / 16;
    const int64_t G = offset_groups(&L);
    const size_t panel_bytes = (size_t)gemm_panel_bytes(format, K),
                 panel_scales = (size_t)gemm_panel_scales(&L);
    const size_t per_thread = (panel_bytes + panel_scales + 63) / 64 * 64;
    const size_t packed_bytes = (size_t)(most * gemm_rows_bytes(format, K, gemm_halves(&L)));
    char *work = thread_buffer(GEMM_BUFFER, threads * per_thread + packed_bytes +
                                              (size_t)(most * G * 16) * sizeof(float));
    if (work == NULL) return -2;
    char *packed = work + threads * per_thread;
    float *sums = G ? (float *)(packed + packed_bytes) : NULL; /* packed_group_sums */
    for (int64_t m0 = 0; m0 < M; m0 += GEMM_MAX_ROWS) { /* bounded memory for long inputs */
        const int64_t rows = M - m0 < GEMM_MAX_ROWS ? M - m0 : GEMM_MAX_ROWS;
        const char *xs = (const char *)x + m0 * K * (x_bf16 ? 2 : 4);
        char *ys = (char *)y + m0 * N * (x_bf16 ? 2 : 4);
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(static)
            for (int64_t b = 0; b < (rows + 15) / 16; b++) {
                if (bf16_products(format))
                    pack_bf16_activations((const uint16_t *)xs, rows, K, packed, b);
                else
                    pack_activations(xs, x_bf16, rows, K, (int)offset, gemm_halves(&L), packed,
                                     b);
                if (sums) packed_group_sums(packed, b, K, G, (int)offset, sums + b * G * 16);
            }
            int64_t begin, end;
            my_share(N / GEMM_WEIGHT_ROWS, &begin, &end);
            char *mine = work + omp_get_thread_num() * per_thread;
            const TileStore to = {ys, N, begin * GEMM_WEIGHT_ROWS, end * GEMM_WEIGHT_ROWS,
                                  x_bf16, 0, x_bf16, sums};
            quant_gemm_features(&L, packed, rows, &to, mine, (float *)(mine + panel_bytes));
        }
    }
    return 0;
#else
    (void)x, (void)x_bf16, (void)W, (void)format, (void)scales, (void)scale_kind, (void)group;
    (void)scale_stride, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)threads;
    return -1;
#endif
}

/* Whether bamba_quant_linear takes this format, width and group size on this build. */
int bamba_quant_supported(int format, int64_t K, int64_t group) {
    return quant_supported(format, K, group);
}

/* Weight rows [n_begin, n_end) of quantized weights (as bamba_quant_linear's) dequantized into
 * out [n_end - n_begin, K], bf16 when out_bf16, else float32 (a prefill's weight tile). */
enum { STREAM_TILE_BYTES = 4 << 20 };

void bamba_quant_dequantize(const void *W, int format, const void *scales, int scale_kind,
                            int64_t group, int64_t scale_stride, int64_t n_begin, int64_t n_end,
                            int64_t K, void *out, int out_bf16, int threads) {
    const LinearWeights L = {W, NULL, n_end - n_begin, K, format, scales, scale_kind, group,
                             scale_stride};
    /* A tile of STREAM_TILE_BYTES or more is written past the caches (the ~1.1B shape's
     * 12.6 MB MLP and in_proj tiles: its prefill 0.97x bf16 against 0.92x with cached
     * stores in slow-memory spells, the same in fast ones); smaller ones stay cached, where
     * the matmul finds them (the bench shape's 2.4 MB tiles: 2% faster cached). */
    const int stream = (n_end - n_begin) * K * (out_bf16 ? 2 : 4) >= STREAM_TILE_BYTES;
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        my_share(n_end - n_begin, &begin, &end);
        dequantize_rows(&L, n_begin + begin, n_begin + end,
                        (char *)out + begin * K * (out_bf16 ? 2 : 4), out_bf16, stream);
    }
#if defined(HAVE_BF16_DOT) && defined(__AVX512VL__)
    if (stream) _mm_sfence(); /* the streaming stores (dequantize_rows) done before the matmul */
#endif
}

/* An embedding lookup in quantized weights [n, K] (as bamba_quant_linear's): rows ids[0..count)
 * dequantized into out [count, K], bf16 when out_bf16, else float32, as bamba_quant_dequantize
 * dequantizes a tile. Returns 0, or -1 (nothing written) when an id lies outside 0..n-1. */
int bamba_quant_gather(const void *W, int format, const void *scales, int scale_kind,
                       int64_t group, int64_t scale_stride, int64_t n, const int64_t *ids,
                       int64_t count, int64_t K, void *out, int out_bf16) {
    const LinearWeights L = {W, NULL, n, K, format, scales, scale_kind, group, scale_stride};
    for (int64_t i = 0; i < count; i++)
        if (ids[i] < 0 || ids[i] >= n) return -1;
    for (int64_t i = 0; i < count; i++)
        dequantize_rows(&L, ids[i], ids[i] + 1, (char *)out + i * K * (out_bf16 ? 2 : 4),
                        out_bf16, 0);
    return 0;
}
