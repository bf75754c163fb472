/* One Mamba2 decode step over a pool of SSM states, in one pass over each state.
 *
 * For every sequence b (pool row rows[b]) and head h, with g = h / (H/G):
 *   S[p, n] <- exp(dt[b,h] * A[h]) * S[p, n] + dt[b,h] * x[b,h,p] * B[b,g,n]
 *   y[b,h,p] = sum_n S[p, n] * C[b,g,n]          (with the updated S)
 * The state is read once and written once (float32 or bfloat16 storage; float32 arithmetic),
 * which is what bounds a batched decode step on a CPU. Work items (b, h) are split over
 * `threads` OpenMP threads (the process's libgomp: torch's own pool when torch loaded it).
 * Inputs other than the state are contiguous float32.
 */
#include <math.h>
#include <stdint.h>

#include "ssd_head.h"

typedef struct {
    void *state;
    int bf16;
    const int64_t *rows;
    int64_t batch, heads, head_dim, d_state, groups;
    const float *x, *dt, *A, *B, *C;
    float *y;
} Job;

static void head(const Job *j, int64_t item) {
    const int64_t P = j->head_dim, N = j->d_state, per_group = j->heads / j->groups;
    const int64_t b = item / j->heads, h = item % j->heads, g = h / per_group;
    const int64_t offset = (j->rows[b] * j->heads + h) * P * N;
    const float dt = j->dt[b * j->heads + h], decay = expf(dt * j->A[h]);
    const float *x = j->x + (b * j->heads + h) * P;
    const float *B = j->B + (b * j->groups + g) * N, *C = j->C + (b * j->groups + g) * N;
    float *y = j->y + (b * j->heads + h) * P;
    if (j->bf16)
        head_bf16((uint16_t *)j->state + offset, P, N, decay, dt, x, B, C, y);
    else
        head_f32((float *)j->state + offset, P, N, decay, dt, x, B, C, y);
}

int bamba_ssd_step_pool(void *state, int bf16, const int64_t *rows, int64_t batch,
                        int64_t heads, int64_t head_dim, int64_t d_state, int64_t groups,
                        const float *x, const float *dt, const float *A, const float *B,
                        const float *C, float *y, int threads) {
    const Job j = {state, bf16, rows, batch, heads, head_dim, d_state, groups, x, dt, A, B, C, y};
    const int64_t items = batch * heads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < items; item++) head(&j, item);
    return 0;
}
