/* One Mamba2 decode step over a pool of SSM states, in one pass over each state.
 *
 * For every sequence b (pool row rows[b]) and head h, with g = h / (H/G):
 *   S[p, n] <- exp(dt[b,h] * A[h]) * S[p, n] + dt[b,h] * x[b,h,p] * B[b,g,n]
 *   y[b,h,p] = sum_n S[p, n] * C[b,g,n]          (with the updated S)
 * The state is read once and written once (float32 or bfloat16 storage; float32 arithmetic),
 * which is what bounds a batched decode step on a CPU. Work items (b, h) are split over
 * `threads` POSIX threads. Inputs other than the state are contiguous float32.
 */
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    void *state;
    int bf16;
    const int64_t *rows;
    int64_t batch, heads, head_dim, d_state, groups;
    const float *x, *dt, *A, *B, *C;
    float *y;
    int64_t begin, end; /* work items [begin, end) of b * heads + h */
} Job;

static inline float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16; /* round to nearest even */
    uint32_t quiet_nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded); /* branch-free */
}

__attribute__((noinline)) static void head_f32(float *S, int64_t P, int64_t N, float decay, float dt, const float *x,
                     const float *B, const float *C, float *y) {
    for (int64_t p = 0; p < P; p++) {
        float *row = S + p * N, xdt = dt * x[p], acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t n = 0; n < N; n++) {
            float s = row[n] * decay + xdt * B[n];
            row[n] = s;
            acc += s * C[n];
        }
        y[p] = acc;
    }
}

__attribute__((noinline)) static void head_bf16(uint16_t *S, int64_t P, int64_t N, float decay, float dt, const float *x,
                      const float *B, const float *C, float *y) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    if (N % 16 == 0) { /* 16 states per instruction, hardware rounding to bf16 */
        const __m512 vdecay = _mm512_set1_ps(decay);
        for (int64_t p = 0; p < P; p++) {
            uint16_t *row = S + p * N;
            const __m512 xdt = _mm512_set1_ps(dt * x[p]);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t n = 0; n < N; n += 16) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(row + n));
                __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
                s = _mm512_fmadd_ps(xdt, _mm512_loadu_ps(B + n), _mm512_mul_ps(s, vdecay));
                _mm256_storeu_si256((__m256i *)(row + n), (__m256i)_mm512_cvtneps_pbh(s));
                acc = _mm512_fmadd_ps(s, _mm512_loadu_ps(C + n), acc);
            }
            y[p] = _mm512_reduce_add_ps(acc);
        }
        return;
    }
#endif
    for (int64_t p = 0; p < P; p++) {
        uint16_t *row = S + p * N;
        float xdt = dt * x[p], acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t n = 0; n < N; n++) {
            float s = bf16_to_float(row[n]) * decay + xdt * B[n];
            row[n] = float_to_bf16(s);
            acc += s * C[n];
        }
        y[p] = acc;
    }
}

static void *run(void *arg) {
    const Job *j = (const Job *)arg;
    const int64_t P = j->head_dim, N = j->d_state, per_group = j->heads / j->groups;
    const int64_t head_size = P * N;
    for (int64_t item = j->begin; item < j->end; item++) {
        const int64_t b = item / j->heads, h = item % j->heads, g = h / per_group;
        const int64_t offset = (j->rows[b] * j->heads + h) * head_size;
        const float dt = j->dt[b * j->heads + h], decay = expf(dt * j->A[h]);
        const float *x = j->x + (b * j->heads + h) * P;
        const float *B = j->B + (b * j->groups + g) * N, *C = j->C + (b * j->groups + g) * N;
        float *y = j->y + (b * j->heads + h) * P;
        if (j->bf16)
            head_bf16((uint16_t *)j->state + offset, P, N, decay, dt, x, B, C, y);
        else
            head_f32((float *)j->state + offset, P, N, decay, dt, x, B, C, y);
    }
    return NULL;
}

int bamba_ssd_step_pool(void *state, int bf16, const int64_t *rows, int64_t batch,
                        int64_t heads, int64_t head_dim, int64_t d_state, int64_t groups,
                        const float *x, const float *dt, const float *A, const float *B,
                        const float *C, float *y, int threads) {
    enum { MAX_THREADS = 64 };
    const int64_t items = batch * heads;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > items) threads = (int)items;
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        Job j = {state, bf16, rows, batch, heads, head_dim, d_state, groups, x, dt, A, B, C, y,
                 items * t / threads, items * (t + 1) / threads};
        jobs[t] = j;
    }
    int started = 1; /* job 0 runs on the calling thread */
    for (int t = 1; t < threads; t++, started++)
        if (pthread_create(&ids[t], NULL, run, &jobs[t]) != 0) break;
    for (int t = started; t < threads; t++) run(&jobs[t]); /* threads that failed to start */
    run(&jobs[0]);
    for (int t = 1; t < started; t++) pthread_join(ids[t], NULL);
    return 0;
}
