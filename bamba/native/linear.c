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
