/* Quantized weights for many rows (prefill) as a matrix product that reads the weights as
 * stored, a panel at a time, never as a dense copy:
 *
 *   int8 and int4 against int8 activations in integer dot products (AVX-512 VNNI `vpdpbusd`,
 *   64 byte products an instruction, twice the products of bf16's `vdpbf16ps`). The
 *   activations are quantized as the few-row kernel quantizes them (quant_int8_dot.h's
 *   `quantize_block`: per row, blocks of 32 inputs, s = max |x| / 127), so a row's outputs are
 *   the same numbers up to float32 summation order whichever kernel takes it; the torch
 *   reference is bamba.quant.formats.int8_activations against the dequantized weight.
 *   fp8 against bf16 x in bf16 products (`vdpbf16ps`), each panel dequantized to the very
 *   bf16 weights the torch reference multiplies; dense bf16 weights read in place, eight rows
 *   side by side (at 9 to a few hundred rows torch's matmul, cold weights and all, runs well
 *   below both its own peak and the memory's: benchmarks/README.md#dense-prefill-products).
 *
 * Layout: 16 rows of x at a time, each vector's 16 lanes one row (`pack_activations`: for every
 * 4 inputs a 64-byte vector of the 16 rows' 4 bytes each, then per block of 32 inputs the rows'
 * scales and their offset terms; `pack_bf16_activations`: for every 2 inputs the 16 rows' bf16
 * pairs). The weights go 4 rows at a time into a panel (`pack_int_weights`: for every 4 inputs
 * the 4 rows' 4 bytes, unsigned as stored, int4's nibbles widened to bytes; `pack_fp8_weights`:
 * for every 2 inputs the 4 rows' bf16 pairs), and each 4-byte group is broadcast against the
 * activation vectors. An integer tile of 3 x 16 rows by 4 weight rows holds 12 int32 sums that
 * restart every block (each starts at minus the offset's products, as quant_int8_dot.h's lanes
 * do) and 12 float32 ones: sum += int32 dot x row scale (x weight scale where a row has several
 * groups; one scale a row is applied once at the end). A bf16 tile takes 8 weight rows (two
 * packs of 4), 24 float32 sums: with 12, `vdpbf16ps`' latency held it near 80% of its peak on
 * a full-width AVX-512 core (Zen 5). Tiles store each row's outputs straight from registers.
 * Each thread takes its share of weight rows, 64 at a time packed (L2), and walks every 48
 * rows of x over them.
 *
 * All linears of the quantization benchmark's shapes at 512 rows (benchmarks/README.md
 * #quantized-prefill), on two hosts of one machine kind (torch's bf16 matmul 0.42 and 0.9
 * TFLOP/s): int8 1.35-1.64x and int4 (groups of 128) 1.23-1.48x torch's bf16 matmul; fp8
 * 0.92-0.96x.
 */
#ifndef BAMBA_QUANT_GEMM_H
#define BAMBA_QUANT_GEMM_H

#ifdef HAVE_INT8_DOT
enum { GEMM_ROW_BLOCKS = 3, GEMM_WEIGHT_ROWS = 4, GEMM_WIDE_ROWS = 8, GEMM_PANEL_ROWS = 64,
       GEMM_K_MULTIPLE = 64 };

/* Whether the format's tiles are bf16 products (fp8 dequantized, dense bf16 as stored). */
static inline int bf16_products(int format) {
    return format == FORMAT_FP8 || format == FORMAT_DENSE;
}

/* Whether the product takes weights of this format and width k with `group` inputs a scale
 * (one scale a row or a matrix, whole blocks of 32, or for symmetric weights half blocks:
 * GGUF's Q6_K groups of 16): int8 and int4 against int8 activations, fp8 and dense bf16
 * against bf16 ones (x_bf16). */
static inline int quant_gemm_supported(int format, int64_t k, int64_t group, int offsets,
                                       int x_bf16) {
    return (int_format(format) || (bf16_products(format) && x_bf16)) &&
           k > 0 && k % GEMM_K_MULTIPLE == 0 && group > 0 && k % group == 0 &&
           (group % ACT_BLOCK == 0 || (group == ACT_BLOCK / 2 && !offsets));
}

/* Bytes of one packed block of 16 activation rows of width k: int8 and int4 weights' the
 * values, then per block of 32 inputs 16 float32 scales and 16 int32 offset terms, and with
 * `halves` (weights in groups of 16) 16 offset terms of the block's first half alone; fp8's
 * the bf16 values in pairs. */
static inline int64_t gemm_rows_bytes(int format, int64_t k, int halves) {
    return bf16_products(format) ? 32 * k : 16 * k + k / ACT_BLOCK * (halves ? 192 : 128);
}

/* Whether a weight's groups are half blocks (16 inputs): the packed rows then carry halves. */
static inline int gemm_halves(const LinearWeights *L) {
    return L->scale_stride != 0 && L->group == ACT_BLOCK / 2;
}

/* Bytes of a panel's GEMM_PANEL_ROWS weight rows as the tiles read them (fp8, dense: bf16). */
static inline int64_t gemm_panel_bytes(int format, int64_t k) {
    return GEMM_PANEL_ROWS * k * (bf16_products(format) ? 2 : 1);
}

/* Bytes of a panel's scales (and offsets) as the integer tiles read them: float32, a row's
 * groups. */
static inline int64_t gemm_panel_scales(const LinearWeights *L) {
    const int64_t groups = L->scale_stride == 0 ? 1 : L->k / L->group;
    return GEMM_PANEL_ROWS * groups * (has_offsets(L->scale_kind) ? 2 : 1) * 4;
}

/* Rows [16 b, 16 b + 16) of x [M, k] quantized into block b of xp (rows past M: zeros), with
 * each block's first-half offset terms when `halves`. */
static void pack_activations(const void *x, int x_bf16, int64_t M, int64_t k, int offset,
                             int halves, char *xp, int64_t b) {
    char *base = xp + b * gemm_rows_bytes(FORMAT_INT8, k, halves);
    float *scales = (float *)(base + 16 * k);
    int32_t *starts = (int32_t *)(base + 16 * k + k / ACT_BLOCK * 64);
    int32_t *first_halves = starts + k / ACT_BLOCK * 16; /* offset terms of inputs 0..15 */
    const __m512i ones = _mm512_set1_epi8(1);
    for (int i = 0; i < 16; i++) {
        const int64_t m = b * 16 + i;
        for (int64_t block = 0; block < k / ACT_BLOCK; block++) {
            int8_t q[ACT_BLOCK] __attribute__((aligned(64)));
            float s = 0.0f;
            if (m < M)
                s = quantize_block(x, m * k + block * ACT_BLOCK, x_bf16, q);
            else
                memset(q, 0, sizeof q);
            const __m512i sum = _mm512_dpbusd_epi32(
                _mm512_setzero_si512(), ones,
                _mm512_zextsi256_si512(_mm256_load_si256((const __m256i *)q)));
            for (int step = 0; step < ACT_BLOCK / 4; step++) /* 4 inputs: one lane's bytes */
                memcpy(base + ((block * 8 + step) * 16 + i) * 4, q + 4 * step, 4);
            scales[block * 16 + i] = s;
            starts[block * 16 + i] = -offset * _mm512_reduce_add_epi32(sum);
            if (halves)
                first_halves[block * 16 + i] = -offset * _mm512_reduce_add_epi32(
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones,
                                        _mm512_zextsi128_si512(
                                            _mm_load_si128((const __m128i *)q))));
        }
    }
}

/* The group sums of block b of packed activations (pack_activations: `offset` 8 or 128) as
 * group_sums lays them out, [G][16], from the rows' block scales and offset terms: over a
 * group's blocks, s * sum(q), sum(q) = term / -offset exactly. Groups of whole blocks. */
static void packed_group_sums(const char *xp, int64_t b, int64_t k, int64_t G, int offset,
                              float *sums) {
    const char *base = xp + b * gemm_rows_bytes(FORMAT_INT8, k, 0);
    const float *scales = (const float *)(base + 16 * k);
    const int32_t *starts = (const int32_t *)(base + 16 * k + k / ACT_BLOCK * 64);
    const int64_t per_group = k / G / ACT_BLOCK;
    const __m512 back = _mm512_set1_ps(-1.0f / (float)offset);
    for (int64_t g = 0, block = 0; g < G; g++) {
        __m512 total = _mm512_setzero_ps();
        for (int64_t i = 0; i < per_group; i++, block++)
            total = _mm512_fmadd_ps(_mm512_loadu_ps(scales + block * 16),
                                    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(
                                                      starts + block * 16)), back),
                                    total);
        _mm512_storeu_ps(sums + g * 16, total);
    }
}

/* Four vectors of 16 four-byte lanes as their 4 x 16 transpose: t[q] holds lanes 4q..4q+3 of
 * v[0], v[1], v[2], v[3], each lane's four in turn. */
static inline void transpose_4x16(const __m512i v[4], __m512i t[4]) {
    const __m512i a = _mm512_unpacklo_epi32(v[0], v[1]), b = _mm512_unpacklo_epi32(v[2], v[3]);
    const __m512i c = _mm512_unpackhi_epi32(v[0], v[1]), d = _mm512_unpackhi_epi32(v[2], v[3]);
    const __m512i g0 = _mm512_unpacklo_epi64(a, b), g1 = _mm512_unpackhi_epi64(a, b);
    const __m512i g2 = _mm512_unpacklo_epi64(c, d), g3 = _mm512_unpackhi_epi64(c, d);
    const __m512i h0 = _mm512_shuffle_i32x4(g0, g1, 0x44), h1 = _mm512_shuffle_i32x4(g2, g3, 0x44);
    const __m512i h2 = _mm512_shuffle_i32x4(g0, g1, 0xEE), h3 = _mm512_shuffle_i32x4(g2, g3, 0xEE);
    t[0] = _mm512_shuffle_i32x4(h0, h1, 0x88);
    t[1] = _mm512_shuffle_i32x4(h0, h1, 0xDD);
    t[2] = _mm512_shuffle_i32x4(h2, h3, 0x88);
    t[3] = _mm512_shuffle_i32x4(h2, h3, 0xDD);
}

/* int8 or int4 weight rows n..n+3 as bytes [k / 4][4 rows][4 inputs] into `out` (4k bytes). */
static void pack_int_weights(const LinearWeights *L, int64_t n, uint8_t *out) {
    const int64_t k = L->k, row_bytes = quant_row_bytes(L->format, k);
    for (int64_t c = 0; c < k; c += 64) { /* 64 inputs of each row: 16 groups of 4 */
        __m512i v[GEMM_WEIGHT_ROWS];
        for (int j = 0; j < GEMM_WEIGHT_ROWS; j++) {
            const uint8_t *w = (const uint8_t *)L->weight + (n + j) * row_bytes;
            if (nibbles(L->format)) { /* byte i: inputs 2i (low nibble), 2i + 1 */
                const __m512i words =
                    _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(w + c / 2)));
                v[j] = _mm512_or_si512(
                    _mm512_and_si512(words, _mm512_set1_epi16(0x000f)),
                    _mm512_and_si512(_mm512_slli_epi16(words, 4), _mm512_set1_epi16(0x0f00)));
                if (L->format == FORMAT_IQ4) /* levels + 128, as int8's bytes */
                    v[j] = _mm512_shuffle_epi8(_mm512_loadu_si512(iq4_bytes), v[j]);
            } else {
                v[j] = held_bits(L->format) ? held_chunk(L->format, (const char *)w, c / 64)
                                            : _mm512_loadu_si512(w + c);
            }
        }
        __m512i t[4];
        transpose_4x16(v, t);
        for (int q = 0; q < 4; q++)
            _mm512_storeu_si512(out + c * GEMM_WEIGHT_ROWS + 64 * q, t[q]);
    }
}

/* Rows [16 b, 16 b + 16) of bf16 x [M, k] into block b of xp as bf16 pairs: for every 2
 * inputs a 64-byte vector of the 16 rows' pairs (rows past M: zeros); 4 rows at a time. */
static void pack_bf16_activations(const uint16_t *x, int64_t M, int64_t k, char *xp, int64_t b) {
    char *base = xp + b * gemm_rows_bytes(FORMAT_FP8, k, 0);
    for (int r0 = 0; r0 < 16; r0 += 4)
        for (int64_t c = 0; c < k; c += 32) { /* 32 inputs: 16 pairs of each of 4 rows */
            __m512i v[4], t[4];
            for (int r = 0; r < 4; r++) {
                const int64_t m = b * 16 + r0 + r;
                v[r] = m < M ? _mm512_loadu_si512(x + m * k + c) : _mm512_setzero_si512();
            }
            transpose_4x16(v, t); /* t[q]: pairs 4q..4q+3 of the 4 rows */
            for (int q = 0; q < 4; q++)
                for (int p = 0; p < 4; p++) /* pair c / 2 + 4q + p: its 4 rows' 16 bytes */
                    _mm_storeu_si128((__m128i *)(base + (c / 2 + 4 * q + p) * 64 + r0 * 4),
                                     _mm512_extracti32x4_epi32(t[q], p));
        }
}

/* fp8 weight rows n..n+3 dequantized to bf16 (q x scale rounded once, the tiles' and the torch
 * reference's weights) as pairs [k / 2][4 rows][2] into `out` (8k bytes). */
static void pack_fp8_weights(const LinearWeights *L, int64_t n, uint16_t *out) {
    const int64_t k = L->k;
    for (int64_t c = 0; c < k; c += 32) { /* 32 inputs of each row, in one scale's group */
        __m512i v[GEMM_WEIGHT_ROWS], t[4];
        for (int j = 0; j < GEMM_WEIGHT_ROWS; j++) {
            const uint8_t *w = (const uint8_t *)L->weight + (n + j) * k;
            const __m512 factor = _mm512_set1_ps(quant_scale(L, n + j, c / L->group) * 256.0f);
            const __m256i low = (__m256i)_mm512_cvtneps_pbh(
                _mm512_mul_ps(sixteen_values(FORMAT_FP8, w, c), factor));
            const __m256i high = (__m256i)_mm512_cvtneps_pbh(
                _mm512_mul_ps(sixteen_values(FORMAT_FP8, w, c + 16), factor));
            v[j] = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
        }
        transpose_4x16(v, t); /* t[q]: pairs 4q..4q+3 of the 4 rows, as the tiles read them */
        for (int q = 0; q < 4; q++)
            _mm512_storeu_si512(out + (c / 2 + 4 * q) * 2 * GEMM_WEIGHT_ROWS, t[q]);
    }
}

/* Where a bf16 tile finds weight row j's input pair p (uint16 steps from `w`): in a panel
 * (pack_fp8_weights' layout) (j / 4) 4k + 8p + 2 (j % 4); in dense weights read in place
 * (eight rows streamed side by side, no copy) j k + 2p. */
static inline int64_t pair_at(int dense, int64_t k, int j, int64_t p) {
    return dense ? j * k + 2 * p
                 : (j / GEMM_WEIGHT_ROWS) * GEMM_WEIGHT_ROWS * k +
                       (p * GEMM_WEIGHT_ROWS + j % GEMM_WEIGHT_ROWS) * 2;
}

/* out[i][j][l] = row 16 i + l of the R packed bf16 blocks at xb . weight row j at `w` (a
 * panel, or dense rows of k) (float32 sums of `vdpbf16ps` pairs) for J = 4 or 8 rows; R, J
 * and dense compile-time after inlining. */
static inline __attribute__((always_inline)) void gemm_bf16_tile(
    const uint16_t *w, const char *xb, int64_t k, const int R, const int J, const int dense,
    float out[][GEMM_WIDE_ROWS][16]) {
    const int64_t rows_bytes = gemm_rows_bytes(FORMAT_FP8, k, 0);
    __m512 acc[GEMM_ROW_BLOCKS][GEMM_WIDE_ROWS];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < J; j++) acc[i][j] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int64_t p = 0; p < k / 2; p++) {
        __m512i xv[GEMM_ROW_BLOCKS];
        for (int i = 0; i < R; i++) {
            xv[i] = _mm512_loadu_si512(xb + i * rows_bytes + p * 64);
            __asm__("" : "+v"(xv[i])); /* in a register, as gemm_tile's */
        }
        for (int j = 0; j < J; j++) {
            const __m512i wv = _mm512_set1_epi32(*(const int32_t *)(w + pair_at(dense, k, j, p)));
            for (int i = 0; i < R; i++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)wv, (__m512bh)xv[i]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < J; j++) _mm512_storeu_ps(out[i][j], acc[i][j]);
}

/* One body per row count, width and weight layout. */
#define GEMM_BF16_ROWS(J, DENSE)                                                           \
    do {                                                                                   \
        if (R == 3) gemm_bf16_tile(w, xb, k, 3, J, DENSE, out);                            \
        else if (R == 2) gemm_bf16_tile(w, xb, k, 2, J, DENSE, out);                       \
        else gemm_bf16_tile(w, xb, k, 1, J, DENSE, out);                                   \
    } while (0)
__attribute__((noinline)) static void gemm_bf16_tiles(const uint16_t *w, const char *xb,
                                                      int64_t k, int R, int J, int dense,
                                                      float out[][GEMM_WIDE_ROWS][16]) {
    if (dense) {
        if (J == GEMM_WIDE_ROWS) GEMM_BF16_ROWS(GEMM_WIDE_ROWS, 1);
        else GEMM_BF16_ROWS(GEMM_WEIGHT_ROWS, 1);
    } else {
        if (J == GEMM_WIDE_ROWS) GEMM_BF16_ROWS(GEMM_WIDE_ROWS, 0);
        else GEMM_BF16_ROWS(GEMM_WEIGHT_ROWS, 0);
    }
}
#undef GEMM_BF16_ROWS

/* dot[i][j] += the byte products of steps first..first + count - 1 (4 inputs a step) of a block
 * of 32 inputs: row block i of the R packed at xk against weight row j of the panel at wk. R
 * and count compile-time after inlining. */
static inline __attribute__((always_inline)) void block_dots(
    __m512i dot[][GEMM_WEIGHT_ROWS], const char *xk, const uint8_t *wk, int64_t rows_bytes,
    int first, const int count, const int R) {
#pragma GCC unroll 8
    for (int step = first; step < first + count; step++) {
        __m512i xv[GEMM_ROW_BLOCKS];
        for (int i = 0; i < R; i++) {
            xv[i] = _mm512_loadu_si512(xk + i * rows_bytes + step * 64);
            /* in a register: folded into each product it is loaded 4 times (~25%) */
            __asm__("" : "+v"(xv[i]));
        }
        for (int j = 0; j < GEMM_WEIGHT_ROWS; j++) {
            const __m512i w = _mm512_set1_epi32(
                *(const int32_t *)(wk + (step * GEMM_WEIGHT_ROWS + j) * 4));
            for (int i = 0; i < R; i++) dot[i][j] = _mm512_dpbusd_epi32(dot[i][j], w, xv[i]);
        }
    }
}

/* acc[i][j] += dot[i][j] (float) x row block i's scales of activation block `block` x weight row
 * j's scale w[j * stride] (w NULL: none here, one scale a row is applied at the end). */
static inline __attribute__((always_inline)) void scaled_sums(
    __m512 acc[][GEMM_WEIGHT_ROWS], __m512i dot[][GEMM_WEIGHT_ROWS], const char *x_scales,
    int64_t rows_bytes, int64_t block, const float *w, int64_t stride, const int R) {
    for (int i = 0; i < R; i++) {
        const __m512 s = _mm512_loadu_ps((const float *)(x_scales + i * rows_bytes) + block * 16);
        for (int j = 0; j < GEMM_WEIGHT_ROWS; j++)
            acc[i][j] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(dot[i][j]),
                w == NULL ? s : _mm512_mul_ps(s, _mm512_set1_ps(w[j * stride])), acc[i][j]);
    }
}

/* out[i][j][l] = row 16 i + l of the R packed blocks at xb . weight row j of the panel `wp`,
 * `scales` [4][groups] the rows' float32 scales; an asymmetric weight's `offsets` [4][groups]
 * (NULL otherwise) add offset x the rows' group sums `sums` [R][groups][16] at each group's
 * end. R and PER_ROW (one scale a row) compile-time after inlining. */
static inline __attribute__((always_inline)) void gemm_tile(const uint8_t *wp, const char *xb,
                                                            int64_t k, int64_t group,
                                                            const float *scales,
                                                            const float *offsets,
                                                            const float *sums, const int R,
                                                            const int PER_ROW,
                                                            float out[][GEMM_WIDE_ROWS][16]) {
    const int64_t rows_bytes = gemm_rows_bytes(FORMAT_INT8, k, 0), groups = k / group;
    const int64_t blocks_per_group = group / ACT_BLOCK;
    const char *x_scales = xb + 16 * k, *x_starts = xb + 16 * k + k / ACT_BLOCK * 64;
    __m512 acc[GEMM_ROW_BLOCKS][GEMM_WEIGHT_ROWS];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < GEMM_WEIGHT_ROWS; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t block = 0;
    for (int64_t g = 0; g < groups; g++)
        for (int64_t left = blocks_per_group; left > 0; left--, block++) {
            __m512i dot[GEMM_ROW_BLOCKS][GEMM_WEIGHT_ROWS];
            for (int i = 0; i < R; i++) {
                const __m512i start = _mm512_loadu_si512(x_starts + i * rows_bytes + block * 64);
                for (int j = 0; j < GEMM_WEIGHT_ROWS; j++) dot[i][j] = start;
            }
            block_dots(dot, xb + block * 512, wp + block * 8 * GEMM_WEIGHT_ROWS * 4, rows_bytes,
                       0, ACT_BLOCK / 4, R);
            scaled_sums(acc, dot, x_scales, rows_bytes, block,
                        PER_ROW ? NULL : scales + g, groups, R);
            if (offsets == NULL || PER_ROW || left > 1) continue; /* no group ends here */
            for (int i = 0; i < R; i++) {
                const __m512 xs = _mm512_loadu_ps(sums + (i * groups + g) * 16);
                for (int j = 0; j < GEMM_WEIGHT_ROWS; j++)
                    acc[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(offsets[j * groups + g]), xs,
                                                acc[i][j]);
            }
        }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < GEMM_WEIGHT_ROWS; j++) {
            __m512 v = acc[i][j];
            if (PER_ROW) v = _mm512_mul_ps(v, _mm512_set1_ps(scales[j]));
            if (PER_ROW && offsets != NULL)
                v = _mm512_fmadd_ps(_mm512_set1_ps(offsets[j]), _mm512_loadu_ps(sums + i * 16), v);
            _mm512_storeu_ps(out[i][j], v);
        }
}

/* gemm_tile for symmetric weights with a scale per 16 inputs (GGUF's Q6_K): each block of 32
 * inputs is two int32 sums, each started at its half's offset term (pack_activations' halves;
 * the second's is the block's less the first's) and scaled by its own group's scale. */
static inline __attribute__((always_inline)) void gemm_tile_halves(
    const uint8_t *wp, const char *xb, int64_t k, const float *scales, const int R,
    float out[][GEMM_WIDE_ROWS][16]) {
    const int64_t rows_bytes = gemm_rows_bytes(FORMAT_INT8, k, 1), blocks = k / ACT_BLOCK;
    const int64_t groups = 2 * blocks;
    const char *x_scales = xb + 16 * k, *x_starts = x_scales + blocks * 64;
    const char *x_halves = x_starts + blocks * 64;
    __m512 acc[GEMM_ROW_BLOCKS][GEMM_WEIGHT_ROWS];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < GEMM_WEIGHT_ROWS; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t block = 0; block < blocks; block++) {
        const char *xk = xb + block * 512;
        const uint8_t *wk = wp + block * 8 * GEMM_WEIGHT_ROWS * 4;
        for (int half = 0; half < 2; half++) {
            __m512i dot[GEMM_ROW_BLOCKS][GEMM_WEIGHT_ROWS];
            for (int i = 0; i < R; i++) {
                const __m512i first = _mm512_loadu_si512(x_halves + i * rows_bytes + block * 64);
                const __m512i start = half ? _mm512_sub_epi32(_mm512_loadu_si512(
                                                 x_starts + i * rows_bytes + block * 64), first)
                                           : first;
                for (int j = 0; j < GEMM_WEIGHT_ROWS; j++) dot[i][j] = start;
            }
            block_dots(dot, xk, wk, rows_bytes, 4 * half, ACT_BLOCK / 8, R);
            scaled_sums(acc, dot, x_scales, rows_bytes, block, scales + 2 * block + half,
                        groups, R);
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < GEMM_WEIGHT_ROWS; j++) _mm512_storeu_ps(out[i][j], acc[i][j]);
}

/* One body per row count and scale layout. */
__attribute__((noinline)) static void gemm_tiles(const uint8_t *wp, const char *xb, int64_t k,
                                                 int64_t group, const float *scales,
                                                 const float *offsets, const float *sums, int R,
                                                 float out[][GEMM_WIDE_ROWS][16]) {
    const int per_row = group == k;
    if (group == ACT_BLOCK / 2) { /* symmetric: offsets, sums NULL */
        if (R == 3) gemm_tile_halves(wp, xb, k, scales, 3, out);
        else if (R == 2) gemm_tile_halves(wp, xb, k, scales, 2, out);
        else gemm_tile_halves(wp, xb, k, scales, 1, out);
        return;
    }
    if (R == 3) {
        if (per_row) gemm_tile(wp, xb, k, group, scales, offsets, sums, 3, 1, out);
        else gemm_tile(wp, xb, k, group, scales, offsets, sums, 3, 0, out);
    } else if (R == 2) {
        if (per_row) gemm_tile(wp, xb, k, group, scales, offsets, sums, 2, 1, out);
        else gemm_tile(wp, xb, k, group, scales, offsets, sums, 2, 0, out);
    } else {
        if (per_row) gemm_tile(wp, xb, k, group, scales, offsets, sums, 1, 1, out);
        else gemm_tile(wp, xb, k, group, scales, offsets, sums, 1, 0, out);
    }
}

/* Where a tile's outputs go: y [M, ldy] from feature 0 on, bf16 when y_bf16, else float32
 * (rounded to bf16 first when round_bf16, as linear_features stores them); the bias in bf16
 * when bias_bf16; only features [lo, hi) are stored (a tile of 4 may straddle a share). An
 * asymmetric weight's tiles take the rows' group sums from `sums`, blocks of 16 rows
 * (packed_group_sums), NULL otherwise. */
typedef struct {
    void *y;
    int64_t ldy, lo, hi;
    int y_bf16, round_bf16, bias_bf16;
    const float *sums;
} TileStore;

/* y[m0 + l, n..n+3] = out[j][l] + bias[n + j] for the first `rows` of 16 rows: a row's four
 * outputs in one store, straight from registers, where all four lie in [lo, hi). */
static inline void store_tile(float out[GEMM_WIDE_ROWS][16], const LinearWeights *L, int64_t n,
                              const TileStore *to, int64_t m0, int64_t rows) {
    __m512i v[GEMM_WEIGHT_ROWS], t[4];
    for (int j = 0; j < GEMM_WEIGHT_ROWS; j++) {
        const __m512 b = _mm512_set1_ps(L->bias ? load_value(L->bias, n + j, to->bias_bf16)
                                                : 0.0f);
        __m512 sum = _mm512_add_ps(_mm512_loadu_ps(out[j]), b);
        if (to->round_bf16 && !to->y_bf16) /* bf16's value, kept in float32 */
            sum = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(sum)), 16));
        v[j] = _mm512_castps_si512(sum);
    }
    transpose_4x16(v, t); /* t[q]: rows 4q..4q+3, four outputs each */
    const int whole = n >= to->lo && n + GEMM_WEIGHT_ROWS <= to->hi;
    for (int q = 0; q < 4 && 4 * q < rows; q++) {
        const __m128i four[4] = {_mm512_castsi512_si128(t[q]), _mm512_extracti32x4_epi32(t[q], 1),
                                 _mm512_extracti32x4_epi32(t[q], 2),
                                 _mm512_extracti32x4_epi32(t[q], 3)};
        for (int64_t l = 4 * q; l < rows && l < 4 * q + 4; l++) {
            const int64_t at = (m0 + l) * to->ldy + n;
            const __m128 sums = _mm_castsi128_ps(four[l - 4 * q]);
            if (!whole) { /* a tile at a share's edge: its features in the share alone */
                float each[GEMM_WEIGHT_ROWS];
                _mm_storeu_ps(each, sums);
                for (int j = 0; j < GEMM_WEIGHT_ROWS; j++)
                    if (n + j >= to->lo && n + j < to->hi)
                        store_value(to->y, at + j, each[j], to->y_bf16);
            } else if (to->y_bf16) {
                _mm_storel_epi64((__m128i *)((uint16_t *)to->y + at),
                                 (__m128i)_mm_cvtneps_pbh(sums));
            } else {
                _mm_storeu_ps((float *)to->y + at, sums);
            }
        }
    }
}

/* Features [to->lo, to->hi) of y = x W^T + bias (L->n a multiple of 4) from the packed
 * activations xp (all ceil(M / 16) blocks of M rows); `panel` gemm_panel_bytes and
 * `panel_scales` gemm_panel_scales of this thread's (int8, int4). The tiles start at the
 * multiple of 4 at or below to->lo. */
static void quant_gemm_features(const LinearWeights *L, const char *xp, int64_t M,
                                const TileStore *to, char *panel, float *panel_scales) {
    const int64_t k = L->k, group = L->scale_stride == 0 ? k : L->group, groups = k / group;
    const int64_t G = offset_groups(L); /* groups, or 0 without offsets */
    const int64_t blocks = (M + 15) / 16,
                  rows_bytes = gemm_rows_bytes(L->format, k, gemm_halves(L));
    const int fp8 = L->format == FORMAT_FP8, bf16 = bf16_products(L->format);
    const int64_t weight_row_bytes = bf16 ? 2 * k : k;
    const int64_t n_begin = to->lo / GEMM_WEIGHT_ROWS * GEMM_WEIGHT_ROWS;
    const int64_t n_end = (to->hi + GEMM_WEIGHT_ROWS - 1) / GEMM_WEIGHT_ROWS * GEMM_WEIGHT_ROWS;
    for (int64_t n0 = n_begin; n0 < n_end; n0 += GEMM_PANEL_ROWS) {
        const int64_t rows = n_end - n0 < GEMM_PANEL_ROWS ? n_end - n0 : GEMM_PANEL_ROWS;
        for (int64_t j = 0; j < rows && L->format != FORMAT_DENSE; j += GEMM_WEIGHT_ROWS) {
            if (fp8) pack_fp8_weights(L, n0 + j, (uint16_t *)(panel + j * weight_row_bytes));
            else pack_int_weights(L, n0 + j, (uint8_t *)panel + j * k);
        }
        float *panel_offsets = G ? panel_scales + GEMM_PANEL_ROWS * groups : NULL;
        for (int64_t j = 0; j < rows && !bf16 && two_level(L->scale_kind); j++)
            k_row_values(L, n0 + j, panel_scales + j * groups,
                         G ? panel_offsets + j * groups : NULL);
        /* fp8's scales are in its panel; dense weights have none */
        for (int64_t j = 0; j < rows && !bf16 && !two_level(L->scale_kind); j++)
            for (int64_t g = 0; g < groups; g++) {
                panel_scales[j * groups + g] = quant_scale(L, n0 + j, g);
                if (G) panel_offsets[j * groups + g] = quant_scale(L, n0 + j, G + g);
            }
        for (int64_t b = 0; b < blocks; b += GEMM_ROW_BLOCKS) {
            const int R = blocks - b < GEMM_ROW_BLOCKS ? (int)(blocks - b) : GEMM_ROW_BLOCKS;
            for (int64_t j = 0; j < rows;) {
                float out[GEMM_ROW_BLOCKS][GEMM_WIDE_ROWS][16];
                const int J =
                    bf16 && rows - j >= GEMM_WIDE_ROWS ? GEMM_WIDE_ROWS : GEMM_WEIGHT_ROWS;
                if (bf16) {
                    const uint16_t *w = fp8 ? (const uint16_t *)(panel + j * weight_row_bytes)
                                            : (const uint16_t *)L->weight + (n0 + j) * k;
                    gemm_bf16_tiles(w, xp + b * rows_bytes, k, R, J, !fp8, out);
                } else {
                    gemm_tiles((const uint8_t *)panel + j * k, xp + b * rows_bytes, k, group,
                               panel_scales + j * groups, G ? panel_offsets + j * groups : NULL,
                               G ? to->sums + b * G * 16 : NULL, R, out);
                }
                for (int i = 0; i < R; i++)
                    for (int h = 0; h < J; h += GEMM_WEIGHT_ROWS)
                        store_tile(out[i] + h, L, n0 + j + h, to, (b + i) * 16,
                                   M - (b + i) * 16 < 16 ? M - (b + i) * 16 : 16);
                j += J;
            }
        }
    }
}
#endif
#endif
