/* bfloat16 <-> float32 conversions shared by the kernels (bf16 = the top half of a float32),
 * and float16 -> float32 for scales stored in half precision. */
#ifndef BAMBA_BF16_H
#define BAMBA_BF16_H
#include <stdint.h>
#include <string.h>

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

/* An IEEE half's value, exactly (subnormals, infinities and NaNs included). */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 31u,
                   mantissa = h & 1023u;
    uint32_t u;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24 */
        const float f = (float)mantissa * 0x1p-24f;
        memcpy(&u, &f, sizeof u);
        u |= sign;
    } else if (exponent == 31) {
        u = sign | 0x7f800000u | mantissa << 13;
    } else {
        u = sign | (exponent + 112) << 23 | mantissa << 13;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#endif
