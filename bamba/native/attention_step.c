/* Softmax attention for one query token per row (decode), over keys and values in place.
 *
 * The math is attention_head.h's, in float32 from bf16 or float32 tensors. Keys and values are
 * read where they lie (any row, time and head strides; head_dim contiguous): the contiguous
 * cache of `generate` and the engine's head-major pages alike (torch's bf16 matmul builds a new
 * oneDNN primitive for every new key length, a cost paid at every decode token). Work items (row, KV head) are split over `threads` OpenMP threads.
 */
#include <stdint.h>

#include "attention_head.h"

/* q [B, H, D] contiguous, mask [B, T]. Returns 0, or -2 when out of memory. */
int bamba_decode_attention(const void *q, const void *k, const void *v, const uint8_t *mask,
                           void *out, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t T,
                           const int64_t *k_strides, const int64_t *v_strides, int bf16,
                           float scale, int threads) {
    const AttentionJob j = {q, k, v, mask, NULL, NULL, out, B, H, Hkv, D, T, H * D,
                            k_strides[0], k_strides[1], k_strides[2],
                            v_strides[0], v_strides[1], v_strides[2], bf16, scale};
    return attention_all(&j, threads);
}
