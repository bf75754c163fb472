/* The SSM update of one head for one token, shared by ssd_step.c and layer_step.c:
 *   S[p, n] <- decay * S[p, n] + dt * x[p] * B[n];   y[p] = sum_n S[p, n] * C[n]
 * with S [P, N] read once and written once, float32 or bf16 storage, float32 arithmetic.
 */
#ifndef BAMBA_SSD_HEAD_H
#define BAMBA_SSD_HEAD_H
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include <stdint.h>

#include "bf16.h"

__attribute__((noinline)) static void head_f32(float *S, int64_t P, int64_t N, float decay,
                                               float dt, const float *x, const float *B,
                                               const float *C, float *y) {
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

__attribute__((noinline)) static void head_bf16(uint16_t *S, int64_t P, int64_t N, float decay,
                                                float dt, const float *x, const float *B,
                                                const float *C, float *y) {
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
#endif
