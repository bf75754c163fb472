/* Linear layers for a few rows over quantized weights, read in the compressed-tensors layout
 * and dequantized in registers (no dense copy of the weights anywhere):
 *
 *   fp8:  float8_e4m3fn bytes [n, k];
 *   int8: bytes [n, k] holding q + 128 (the int32 words of `weight_packed`, little-endian);
 *   int4: bytes [n, k / 2], byte i holding element 2i (q + 8) in its low nibble and 2i + 1 in
 *         its high one;
 *   iq4:  int4's bytes, each nibble an index into IQ4's 16 levels (nibble_values[1]: q = level);
 *   int6: q in [-32, 31] as u = q + 32 in 6 bits, 96 bytes per 128 inputs: 64 bytes of low
 *         nibbles (byte i: input i, and input i + 64 in its high nibble), then 32 of high bit
 *         pairs (byte l: inputs l, l + 32, l + 64, l + 96 in bits 0-1, 2-3, 4-5, 6-7), GGUF's
 *         Q6_K's own bytes; read as int8's chunks of 64 inputs (int6_chunk);
 *   int5: q in [-16, 15] as u = q + 16 in 5 bits, 160 bytes per 256 inputs: 128 bytes of
 *         nibbles (byte 32c + l: input 64c + l, and 64c + 32 + l in its high nibble), then 32
 *         of fifth bits (byte l, bit j: input 32j + l), GGUF's Q5_K's own bytes (int5_chunk);
 *
 * w = q * scale, one float32 or bf16 scale per `group` inputs of a row (`scale_stride` scales
 * a row; 0: one scale for the whole matrix). Asymmetric ints (SCALE_F32_OFFSETS) add an
 * offset per group, w = q * scale + offset (a zero point's -zp * scale, or a GGUF block's
 * minimum): the kernels compute q * scale as for any int weights, and each output adds
 * sum_g offset_g * (the sum of the row's inputs in group g), the inputs as the kernel sees them
 * (`group_sums`, `prepared_group_sums`, once per call), float32.
 *
 * Each thread walks its weight rows in chunks of CHUNK(format) inputs, turns a chunk into bf16
 * vectors with a few integer instructions (int4: a `vpermw` table lookup per nibble; fp8 and
 * int8: two `vpermi2b` lookups of a magnitude's bf16 high and low bytes, exact for every e4m3
 * value, subnormals included, and every q, then the sign bit put back) and multiplies them
 * with `vdpbf16ps` against every input row, then adds the chunk's dot products times its
 * scales (one scale per group of lanes) to float32 accumulators. The dequantized vectors come
 * out in an order of the chunk's inputs that is cheap to produce, so the input rows are first
 * copied, in bf16, into that order (`prepare_rows`, once per call and thread: k values a row
 * against n x k weights). Float32 inputs are rounded to bf16 there; the weights' quantization
 * error is far larger. A bf16 model's rows over the usual layouts (int4 groups of whole chunks,
 * fp8 and int8 scaled per row) take `paired_tile` instead, where int8 activations
 * (quant_int8_dot.h) do not take them: two weight rows at a time, one float32 sum per pair,
 * int4's group scales folded into its table.
 */
#ifndef BAMBA_QUANT_ROWS_H
#define BAMBA_QUANT_ROWS_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vmath.h"

/* Inputs a row's width must be a multiple of (every format's chunk divides it). */
enum { QUANT_K_MULTIPLE = 128 };

/* Whether the format's weights are nibbles (int4, iq4): chunks of 128 inputs in 64 bytes. */
static inline int nibbles(int format) { return format == FORMAT_INT4 || format == FORMAT_IQ4; }

/* What a stored unsigned value adds to its q, as the integer products read it: int4's nibble
 * q + 8, int6's u = q + 32; an int8 byte q + 128, and an iq4 nibble's level looked up as the
 * byte level + 128. */
static inline int stored_offset(int format) {
    return format == FORMAT_INT4 ? 8 : format == FORMAT_INT5 ? 16 : format == FORMAT_INT6 ? 32 : 128;
}

/* Whether the format is int8 values held in fewer bits (int6, int5). */
static inline int held_bits(int format) {
    return format == FORMAT_INT6 || format == FORMAT_INT5;
}

/* Whether the format is an integer one (integer products take it). */
static inline int int_format(int format) {
    return format == FORMAT_INT8 || held_bits(format) || nibbles(format);
}

/* A nibble's value: [int4] q = u - 8, [iq4] IQ4_NL's and IQ4_XS's levels (llama.cpp's
 * kvalues_iq4nl). */
static const float nibble_values[2][16] = {
    {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7},
    {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113}};

static inline int64_t quant_chunk(int format) {
    return nibbles(format) ? 128 : 64;
}

static inline int64_t quant_row_bytes(int format, int64_t k) {
    return nibbles(format)              ? k / 2
           : format == FORMAT_INT6 ? k / 4 * 3
           : format == FORMAT_INT5 ? k / 8 * 5
                                   : k;
}

/* Bytes of a pair of int6 chunks (128 inputs), of four int5 chunks (256 inputs). */
enum { INT6_PAIR_BYTES = 96, INT5_BLOCK_BYTES = 160 };

/* Input e of an int6 row as q (int6_chunk's, one at a time). */
static inline int int6_value(const uint8_t *row, int64_t e) {
    const uint8_t *pair = row + e / 128 * INT6_PAIR_BYTES;
    const int64_t i = e % 128;
    const int nibble = (pair[i % 64] >> (i < 64 ? 0 : 4)) & 15;
    return (nibble | ((pair[64 + i % 32] >> (2 * (i / 32))) & 3) << 4) - 32;
}

/* Input e of an int5 row as q (int5_chunk's, one at a time). */
static inline int int5_value(const uint8_t *row, int64_t e) {
    const uint8_t *block = row + e / 256 * INT5_BLOCK_BYTES;
    const int64_t i = e % 256, c = i / 64, l = i % 32;
    const int nibble = (block[32 * c + l] >> (i % 64 < 32 ? 0 : 4)) & 15;
    return (nibble | ((block[128 + l] >> (i / 32)) & 1) << 4) - 16;
}


/* Whether the kernels take this format at width k with `group` inputs per scale: a chunk's 16
 * float32 lanes each cover chunk / 16 inputs, so a group spans whole lanes or whole chunks. */
static inline int quant_supported(int format, int64_t k, int64_t group) {
#if defined(HAVE_BF16_DOT) && defined(__AVX512VL__)
    const int64_t chunk = quant_chunk(format);
#ifndef __AVX512VBMI__
    if (!nibbles(format)) return 0; /* byte tables need vpermi2b */
#endif
    if (format < FORMAT_FP8 || format > FORMAT_INT5 || group < 1 || k % QUANT_K_MULTIPLE != 0 ||
        k % group != 0 || (format == FORMAT_INT5 && k % 256 != 0))
        return 0;
    return group % chunk == 0 || (chunk % group == 0 && group % (chunk / 16) == 0);
#else
    (void)format, (void)k, (void)group;
    return 0;
#endif
}

/* K tables (SCALE_K_OFFSETS): a row's scales and offsets in two levels, as GGUF's Q4_K and
 * Q5_K hold them: per super-block of K_SUPER inputs a float32 d, per group of 32 a byte sc,
 * scale = d * sc, laid out [d x S][sc x G] (S = k / K_SUPER super-blocks, G groups), then a
 * second half of the same shape, [dmin x S][m x G]: w = d sc u - dmin m for the block's value
 * u, which int4's nibbles hold as q = u - 8 (offset = 8 * scale - dmin * m, `centre` 8) and
 * int8's bytes as q = u (centre 0). scale_stride counts the row's bytes. Q4_K's 4.5 bits a
 * weight stream as 4.75 (float32 d), where a float32 scale and offset a group made it 6.
 * SCALE_K: the first half alone with signed sc bytes, groups of 16, int8 (Q6_K's q = u - 32,
 * |q| <= 32): 8.625 bits a weight, where a float32 scale a group made it 10; or groups of 32,
 * iq4 (IQ4_XS's d and 6-bit ls - 32): 4.375 bits a weight, where a float32 scale made it 5. */
enum { K_SUPER = 256 };

static inline int two_level(int scale_kind) {
    return scale_kind == SCALE_K_OFFSETS || scale_kind == SCALE_K;
}

/* A K table's sc byte at p: signed for SCALE_K. */
static inline float k_sc(int scale_kind, const char *p) {
    return scale_kind == SCALE_K ? (float)*(const int8_t *)p : (float)*(const uint8_t *)p;
}

static inline int has_offsets(int scale_kind) {
    return scale_kind == SCALE_F32_OFFSETS || scale_kind == SCALE_K_OFFSETS;
}

/* Bytes of one scale of this kind (a K table's: 1, its stride counting bytes). */
static inline int64_t scale_bytes(int scale_kind) {
    return two_level(scale_kind) ? 1 : scale_kind == SCALE_BF16 || scale_kind == SCALE_F16 ? 2 : 4;
}

/* A row's scale_stride for weights of width k in groups of `group` (a group a row: 1). */
static inline int64_t group_scale_stride(int scale_kind, int64_t k, int64_t group) {
    const int64_t halves = has_offsets(scale_kind) ? 2 : 1;
    return halves * (two_level(scale_kind) ? 4 * (k / K_SUPER) + k / group : k / group);
}

static inline float k_centre(int format) {
    return format == FORMAT_INT4 ? 8.0f : format == FORMAT_INT5 ? 16.0f : 0.0f;
}

/* Float32 i of a K table's bytes at p (any alignment). */
static inline float table_float(const char *p, int64_t i) {
    float v;
    memcpy(&v, p + 4 * i, sizeof v);
    return v;
}

/* A K table's super-blocks S, groups G and log2 of groups a super-block (groups of 16 or 32:
 * shifts, where divisions would cost more than a chunk's products). */
typedef struct { int64_t S, G, shift; } KShape;

static inline KShape k_shape(const LinearWeights *L) {
    const int64_t log_group = __builtin_ctzll((unsigned long long)L->group);
    const KShape shape = {L->k / K_SUPER, L->k >> log_group, 8 - log_group}; /* 2^8 = K_SUPER */
    return shape;
}

/* A K table's scale (index < G) or offset (G + g) of row n. */
static inline float k_scale(const LinearWeights *L, int64_t n, int64_t index) {
    const KShape K = k_shape(L);
    const char *row = (const char *)L->scales + n * L->scale_stride;
    const int64_t g = index < K.G ? index : index - K.G;
    const float scale = table_float(row, g >> K.shift) * k_sc(L->scale_kind, row + 4 * K.S + g);
    if (index < K.G) return scale;
    const char *half = row + 4 * K.S + K.G; /* exact products, one rounding of their difference */
    return fmaf(k_centre(L->format), scale,
                -(table_float(half, g >> K.shift) * (float)((const uint8_t *)half)[4 * K.S + g]));
}

/* Scale `group_index` of row n (past the row's G scales, its offsets). */
static inline float quant_scale(const LinearWeights *L, int64_t n, int64_t group_index) {
    if (two_level(L->scale_kind)) return k_scale(L, n, group_index);
    const int64_t i = n * L->scale_stride + group_index;
    if (L->scale_kind == SCALE_F16) return half_to_float(((const uint16_t *)L->scales)[i]);
    return load_value(L->scales, i, L->scale_kind == SCALE_BF16);
}

/* Input position (within its chunk) of element e of a chunk's dequantized vectors. */
static inline int64_t chunk_position(int format, int64_t e) {
    if (nibbles(format)) return 4 * (e % 32) + e / 32; /* vector q lane j: 4j + q */
    return 16 * (e % 32 / 8) + 8 * (e / 32) + e % 8; /* bytes unpacked per 128 bits */
}

/* The value of an e4m3 byte (s eeee mmm, bias 7, subnormals at e = 0). */
static inline float e4m3_value(int b) {
    const int e = (b >> 3) & 15, m = b & 7;
    const float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
    return b & 128 ? -v : v;
}

/* x [M, k] (bf16 or float32) as bf16 rows in the chunk order of `format`, into xp [M, k]. */
static void prepare_rows(int format, const void *x, int x_bf16, int64_t M, int64_t k,
                         uint16_t *xp) {
    const int64_t chunk = quant_chunk(format);
    int16_t position[128]; /* once a call, not once an input */
    for (int64_t e = 0; e < chunk; e++) position[e] = (int16_t)chunk_position(format, e);
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < k; c += chunk) {
            const int64_t at = m * k + c;
            if (x_bf16)
                for (int64_t e = 0; e < chunk; e++)
                    xp[at + e] = ((const uint16_t *)x)[at + position[e]];
            else
                for (int64_t e = 0; e < chunk; e++)
                    xp[at + e] = float_to_bf16(((const float *)x)[at + position[e]]);
        }
}

/* A thread's work buffers: the few-row kernels' prepared input rows, the products' packed rows
 * and panels (quant_gemm.h), the group sums of asymmetric weights' inputs. */
enum { ROWS_BUFFER, GEMM_BUFFER, SUMS_BUFFER, THREAD_BUFFERS };

/* This thread's buffer `which` of at least `bytes` (kept for its next calls: a fresh one each
 * call would fault its pages in again), or NULL. */
static void *thread_buffer(int which, size_t bytes) {
    static __thread void *buffers[THREAD_BUFFERS];
    static __thread size_t capacity[THREAD_BUFFERS];
    if (bytes > capacity[which]) {
        free(buffers[which]);
        buffers[which] = aligned_alloc(64, (bytes + 63) / 64 * 64);
        capacity[which] = buffers[which] ? bytes : 0;
    }
    return buffers[which];
}

/* An asymmetric weight's groups a row (SCALE_F32_OFFSETS, SCALE_K_OFFSETS), else 0. */
static inline int64_t offset_groups(const LinearWeights *L) {
    return L->scale_kind == SCALE_K_OFFSETS ? k_shape(L).G
           : L->scale_kind == SCALE_F32_OFFSETS ? L->scale_stride / 2 : 0;
}

#if defined(HAVE_BF16_DOT) && defined(__AVX512VL__)
/* The lanes of groups [g, g + 16) of G (the rest masked off). */
static inline __mmask16 group_mask(int64_t G, int64_t g) {
    return G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
}

typedef struct { /* what a call's chunk loop needs of the format, set up once */
    __m512i low;       /* vpermw table: a nibble -> bf16 value (int4's q, iq4's level) */
    __m512 codes;      /* a nibble's value as float32 (lane i: nibble i) */
    __m512i code_bytes; /* vpshufb table: an iq4 nibble -> its level + 128 (each 128 bits) */
    __m512i byte_high[2], byte_low[2]; /* vpermi2b tables: magnitude -> bf16 bytes */
    __m512i six_high, six_low; /* vpermb tables: int6's u -> bf16 bytes of q = u - 32, int5's
                                  q = u - 16 */
    __m512i lanes;     /* float32 lane -> scale index within a chunk (groups smaller than it) */
    int64_t chunk, groups_per_chunk; /* groups_per_chunk 0: a chunk lies inside one group */
} QuantTables;

/* The formats' lookup tables, filled once when the library loads (a call's set-up only loads
 * them): int4's nibble q + 8 -> bf16 q, and per byte format a magnitude's bf16 high and low
 * bytes: e4m3's 7 magnitude bits, int8's |q| <= 127 (every e4m3 value and every integer up to
 * 256 is a bf16 one). */
static uint16_t nibble_bf16[2][32]; /* [int4, iq4] */
static uint8_t iq4_bytes[64];
static uint8_t magnitude_bf16[2][2][128]; /* [fp8, int8][high, low][magnitude] */
static uint8_t six_bf16[2][2][64];         /* [int6, int5][high, low][u] */

__attribute__((constructor)) static void fill_quant_tables(void) {
    for (int f = 0; f < 2; f++)
        for (int i = 0; i < 32; i++) nibble_bf16[f][i] = float_to_bf16(nibble_values[f][i & 15]);
    for (int i = 0; i < 64; i++) {
        iq4_bytes[i] = (uint8_t)((int)nibble_values[1][i & 15] + 128);
        for (int f = 0; f < 2; f++) {
            const uint16_t bits = float_to_bf16((float)(i - (f ? 16 : 32)));
            six_bf16[f][0][i] = (uint8_t)(bits >> 8);
            six_bf16[f][1][i] = (uint8_t)bits;
        }
    }
    for (int b = 0; b < 128; b++)
        for (int f = 0; f < 2; f++) {
            const uint16_t bits = float_to_bf16(f == 0 ? e4m3_value(b) : (float)b);
            magnitude_bf16[f][0][b] = (uint8_t)(bits >> 8);
            magnitude_bf16[f][1][b] = (uint8_t)bits;
        }
}

/* The tables of a chunk loop over `chunk` inputs at a time (quant_chunk's, or the integer
 * products' DOT_CHUNK). */
static QuantTables tables_for_chunk(const LinearWeights *L, int64_t chunk) {
    QuantTables t;
    t.chunk = chunk;
    const int iq4 = L->format == FORMAT_IQ4;
    t.low = _mm512_loadu_si512(nibble_bf16[iq4]);
    t.codes = _mm512_loadu_ps(nibble_values[iq4]);
    t.code_bytes = _mm512_loadu_si512(iq4_bytes);
    t.six_high = _mm512_loadu_si512(six_bf16[L->format == FORMAT_INT5][0]);
    t.six_low = _mm512_loadu_si512(six_bf16[L->format == FORMAT_INT5][1]);
    const int f = L->format == FORMAT_INT8;
    for (int i = 0; i < 2; i++) {
        t.byte_high[i] = _mm512_loadu_si512(magnitude_bf16[f][0] + 64 * i);
        t.byte_low[i] = _mm512_loadu_si512(magnitude_bf16[f][1] + 64 * i);
    }
    t.groups_per_chunk = L->group % t.chunk == 0 ? 0 : t.chunk / L->group;
    int32_t lanes[16];
    for (int i = 0; i < 16; i++)
        lanes[i] = t.groups_per_chunk ? (int32_t)(i * t.groups_per_chunk / 16) : 0;
    t.lanes = _mm512_loadu_si512(lanes);
    return t;
}

static QuantTables quant_tables(const LinearWeights *L) {
    return tables_for_chunk(L, quant_chunk(L->format));
}

/* A K table's sc bytes of 16 groups as every chunk's float32 / int32 lanes take them: for
 * chunks of 4 groups (chunks of 128 inputs in groups of 32, of 64 in groups of 16), of 2 (64
 * in groups of 32) and of 8 (128 in groups of 16) ([k_lane_table]) and the chunk's place among
 * the 16 groups' chunks (4, 8 or 2), the vpermb index putting group g's byte in the low byte
 * of each of its lanes (a chunk's lanes cover 16 / groups lanes a group, in a run, as
 * QuantTables' `lanes` has them). */
static uint8_t k_lane_bytes[3][8][64];

static inline int k_lane_table(int64_t groups) { return groups == 2 ? 1 : groups == 8 ? 2 : 0; }

__attribute__((constructor)) static void fill_k_lane_bytes(void) {
    for (int f = 0; f < 3; f++) {
        const int groups = f == 1 ? 2 : f == 2 ? 8 : 4; /* a chunk's groups */
        for (int c = 0; c < 16 / groups; c++)
            for (int lane = 0; lane < 16; lane++)
                k_lane_bytes[f][c][4 * lane] = (uint8_t)(groups * c + lane / (16 / groups));
    }
}

/* A walk along one row's K table (K_GROUPS): the next 16 groups' sc bytes and the current
 * super-block's d, loaded as the chunks reach them. */
typedef struct {
    const char *table;
    int64_t sc_at, G;  /* the sc bytes' offset in the row, groups a row */
    int64_t per_chunk; /* groups a chunk: 2, 4 or 8 */
    int sign;          /* signed sc bytes (SCALE_K) */
    __m512i sc;
    __m512 d;
} KWalk;

static inline KWalk k_walk(const LinearWeights *L, int64_t n, int64_t chunk) {
    const KShape K = k_shape(L);
    const KWalk walk = {(const char *)L->scales + n * L->scale_stride, 4 * K.S, K.G,
                        chunk / L->group, L->scale_kind == SCALE_K,
                        _mm512_setzero_si512(), _mm512_setzero_ps()};
    return walk;
}

/* Chunk c's int32 lanes of sc (each lane its group's sc in its low 16 bits, the high ones
 * zero: what `vpmaddwd` multiplies), c in order from 0 in chunks of `chunk` inputs (the
 * walk's); walk->d is its d. */
static inline __attribute__((always_inline)) __m512i k_chunk_sc(KWalk *walk, const int format,
                                                                const int64_t chunk, int64_t c) {
    const int64_t per_chunk = nibbles(format) ? 4 : walk->per_chunk; /* (Q4_K's, IQ4_XS's) */
    const int64_t place = c & (16 / per_chunk - 1); /* among the 16 groups' chunks */
    if (place == 0)
        walk->sc = _mm512_zextsi128_si512(_mm_maskz_loadu_epi8(
            group_mask(walk->G, c * per_chunk), walk->table + walk->sc_at + c * per_chunk));
    if (c % (K_SUPER / chunk) == 0)
        walk->d = _mm512_set1_ps(table_float(walk->table, c / (K_SUPER / chunk)));
    const __m512i lanes = _mm512_maskz_permutexvar_epi8(
        (__mmask64)0x1111111111111111ULL,
        _mm512_loadu_si512(k_lane_bytes[k_lane_table(per_chunk)][place]), walk->sc);
    if (format == FORMAT_INT4 || !walk->sign) return lanes;
    return _mm512_srai_epi16(_mm512_slli_epi16(lanes, 8), 8); /* the low 16 bits signed */
}

/* k_chunk_sc's lanes as float32 sc. */
static inline __m512 k_sc_floats(const KWalk *walk, __m512i lanes) {
    if (walk->sign) lanes = _mm512_srai_epi32(_mm512_slli_epi32(lanes, 16), 16);
    return _mm512_cvtepi32_ps(lanes);
}

/* Rows ahead whose scales a weight row's dot products prefetch when groups are smaller than a
 * chunk (llama.cpp's Q4_0 and Q8_0 files: an fp16 scale a 32 inputs). The scales lie apart
 * from the weights, a stream the hardware prefetcher left to miss: batch-1 decode of the ~1.1B
 * shape's Q4_0 file 26.9 -> 15.2 ms, its Q8_0 file 32.6 -> 28.4 (old and new build in one
 * process, alternating turns, benchmarks/ab_kernels.py); 4 and 8 rows ahead alike, 16 and 32
 * slower. */
enum { SCALE_PREFETCH_ROWS = 8 };

/* (always inlined: GCC takes a function of prefetches alone for a pure one and drops its
 * calls) */
static inline __attribute__((always_inline)) void prefetch_scales(const LinearWeights *L,
                                                                   int64_t n) {
    const int64_t bytes = L->scale_stride * scale_bytes(L->scale_kind);
    const char *s = (const char *)L->scales + (n + SCALE_PREFETCH_ROWS) * bytes;
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(s + b, _MM_HINT_T1);
    _mm_prefetch(s + bytes - 1, _MM_HINT_T1); /* the last line, when a row's scales straddle */
}

/* The scales of chunk c of row n (groups smaller than a chunk), one per float32 lane of the
 * chunk's dot products. */
static inline __m512 chunk_scales(const LinearWeights *L, const QuantTables *t, int64_t n,
                                  int64_t c) {
    const int64_t first = c * t->groups_per_chunk;
    const __mmask16 mask = (__mmask16)((1u << t->groups_per_chunk) - 1);
    const char *at = (const char *)L->scales +
                     (n * L->scale_stride + first) * scale_bytes(L->scale_kind);
    const __m512 s = L->scale_kind == SCALE_BF16
        ? _mm512_castsi512_ps(_mm512_slli_epi32(
              _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, at)), 16))
        : L->scale_kind == SCALE_F16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, at))
                                     : _mm512_maskz_loadu_ps(mask, at);
    return _mm512_permutexvar_ps(t->lanes, s);
}

/* Sixteen e4m3 bytes as fp16 bits: each byte sign-extended, shifted so its exponent and
 * mantissa land in fp16's (fp16's bias is 8 more: values 2^-8 of e4m3's, subnormals too). */
static inline __m256i fp8_as_halves(const void *w) {
    return _mm256_and_si256(
        _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w)), 7),
        _mm256_set1_epi16((short)0xBF80));
}

/* int4 words (word j holds inputs 4j..4j+3 in its nibbles) as bf16 vectors v[0..3], vector q
 * holding nibble q of every word: `table`'s entry for each nibble (vpermw reads 5 index bits,
 * so a table holds its 16 entries twice). */
static inline void nibble_lookup(__m512i words, __m512i table, __m512i v[4]) {
    for (int q = 0; q < 4; q++)
        v[q] = _mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4 * q), table);
}

/* Chunk c (64 inputs) of an int6 row as 64 bytes u = q + 32, in input order (int8's): the
 * pair's low nibbles (c even) or high ones (c odd), under each input's bit pair from the 32
 * bytes after them, moved to bits 4-5 of its byte (its quarter q of the pair holds it at bits
 * 2q, 2q + 1: shifted left by 4 - 2q or right by 2q - 4, one variable shift per half). */
static inline __m512i int6_chunk(const char *row, int64_t c) {
    const char *pair = row + (c >> 1) * INT6_PAIR_BYTES;
    const __m512i low = _mm512_loadu_si512(pair);
    const __m512i high = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(pair + 64)));
    const __mmask32 second = (__mmask32)0xFFFF0000u; /* words of inputs 32-63 */
    const __m512i nibble = (c & 1) ? _mm512_srli_epi16(low, 4) : low;
    const __m512i bits = (c & 1)
        ? _mm512_srlv_epi16(high, _mm512_maskz_set1_epi16(second, 2))               /* 0, 2 */
        : _mm512_sllv_epi16(high, _mm512_mask_set1_epi16(_mm512_set1_epi16(4), second, 2));
    return _mm512_and_si512( /* bits 0-3 the nibble's, 4-5 the pair's */
        _mm512_ternarylogic_epi32(nibble, bits, _mm512_set1_epi8(0x0F), 0xE4),
        _mm512_set1_epi8(0x3F));
}

/* Chunk c (64 inputs) of an int5 row as 64 bytes u = q + 16, in input order: its 32 bytes of
 * nibbles (low: inputs 0-31, high: 32-63) under each input's fifth bit, bit 2c' (inputs 0-31)
 * or 2c' + 1 (32-63) of the block's 32 bytes after them (c' = c mod 4), moved to bit 4. */
static inline __m512i int5_chunk(const char *row, int64_t c) {
    const char *block = row + (c >> 2) * INT5_BLOCK_BYTES;
    const int first = 2 * (int)(c & 3); /* the fifth bits' bit of inputs 0-31 */
    const __m256i packed = _mm256_loadu_si256((const __m256i *)(block + 32 * (c & 3)));
    const __m512i nibble = _mm512_inserti64x4(_mm512_castsi256_si512(packed),
                                              _mm256_srli_epi16(packed, 4), 1);
    const __m512i high = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(block + 128)));
    const __m512i bits = _mm512_slli_epi16(
        _mm512_srlv_epi16(high, _mm512_mask_set1_epi16(_mm512_set1_epi16((short)first),
                                                       (__mmask32)0xFFFF0000u, (short)(first + 1))),
        4);
    return _mm512_and_si512( /* bits 0-3 the nibble's, 4 the fifth */
        _mm512_ternarylogic_epi32(nibble, bits, _mm512_set1_epi8(0x0F), 0xE4),
        _mm512_set1_epi8(0x1F));
}

/* Chunk c of an int6 or int5 row as 64 bytes u. */
static inline __m512i held_chunk(int format, const char *row, int64_t c) {
    return format == FORMAT_INT5 ? int5_chunk(row, c) : int6_chunk(row, c);
}

/* Chunk c of a row at w as bf16 vectors v[0..3] (fp8 and int8: v[0] and v[1]). */
static inline __attribute__((always_inline)) void dequantize_chunk(int format, const char *w,
                                                                    int64_t c,
                                                                    const QuantTables *t,
                                                                    __m512i v[4]) {
#ifdef __AVX512VBMI__
    if (held_bits(format)) { /* u's bf16 bytes looked up, paired as int8's below */
        const __m512i u = held_chunk(format, w, c);
        const __m512i high = _mm512_permutexvar_epi8(u, t->six_high);
        const __m512i low = _mm512_permutexvar_epi8(u, t->six_low);
        v[0] = _mm512_unpacklo_epi8(low, high);
        v[1] = _mm512_unpackhi_epi8(low, high);
        return;
    }
#endif
    const __m512i words = _mm512_loadu_si512(w + c * 64);
    if (nibbles(format)) {
        nibble_lookup(words, t->low, v);
        return;
    }
#ifdef __AVX512VBMI__ /* a magnitude's bf16 bytes looked up (index bit 7 is ignored), the sign
                         bit put back, the bytes paired per 128 bits */
    const __m512i sign_bit = _mm512_set1_epi8((char)0x80);
    __m512i magnitude = words, sign = words; /* fp8: s eeee mmm */
    if (format == FORMAT_INT8) { /* q + 128: |q| <= 128, its sign */
        sign = _mm512_xor_si512(words, sign_bit);
        magnitude = _mm512_abs_epi8(sign);
    }
    __m512i high = _mm512_permutex2var_epi8(t->byte_high[0], magnitude, t->byte_high[1]);
    if (format == FORMAT_INT8) /* |q| = 128 (bit 7) read entry 0: bf16 128 is 0x4300 */
        high = _mm512_mask_mov_epi8(high, _mm512_movepi8_mask(magnitude), _mm512_set1_epi8(0x43));
    high = _mm512_ternarylogic_epi32(high, sign, sign_bit, 0xF8); /* a | (b & c) */
    const __m512i low = _mm512_permutex2var_epi8(t->byte_low[0], magnitude, t->byte_low[1]);
    v[0] = _mm512_unpacklo_epi8(low, high);
    v[1] = _mm512_unpackhi_epi8(low, high);
#endif
}

/* One input row's dot products with a dequantized chunk added to a and b (two chains): 16
 * float32 lanes, each over chunk / 16 inputs. xp: the row's chunk in chunk order. */
static inline __attribute__((always_inline)) void chunk_dot(int format, const uint16_t *xp,
                                                            const __m512i v[4], __m512 *a,
                                                            __m512 *b) {
    const __m512i x0 = _mm512_loadu_si512(xp), x1 = _mm512_loadu_si512(xp + 32);
    if (!nibbles(format)) { /* fp8, int8: 64 inputs */
        *a = _mm512_dpbf16_ps(*a, (__m512bh)x0, (__m512bh)v[0]);
        *b = _mm512_dpbf16_ps(*b, (__m512bh)x1, (__m512bh)v[1]);
        return;
    }
    const __m512i x2 = _mm512_loadu_si512(xp + 64), x3 = _mm512_loadu_si512(xp + 96);
    *a = _mm512_dpbf16_ps(_mm512_dpbf16_ps(*a, (__m512bh)x0, (__m512bh)v[0]), (__m512bh)x2,
                          (__m512bh)v[2]);
    *b = _mm512_dpbf16_ps(_mm512_dpbf16_ps(*b, (__m512bh)x1, (__m512bh)v[1]), (__m512bh)x3,
                          (__m512bh)v[3]);
}

/* How a row's scales fall on its chunks, a compile-time parameter of the chunk loops: several
 * groups in a chunk (per-lane scales), a group per chunk, or a group of several chunks. */
enum { GROUPS_IN_CHUNK, GROUP_IS_CHUNK, GROUP_OF_CHUNKS,
       K_GROUPS /* a K table's groups in a chunk, in integer products (quant_int8_dot.h) */ };

static inline int group_span(const LinearWeights *L, const QuantTables *t) {
    return t->groups_per_chunk ? GROUPS_IN_CHUNK
                               : L->group == t->chunk ? GROUP_IS_CHUNK : GROUP_OF_CHUNKS;
}

/* x_r . w_n for R input rows of xp, k apart, left unsummed at out[r * OUTPUT_BLOCK]; R, format
 * and span compile-time after inlining, in one flat loop over the chunks. Chunks of one group
 * accumulate unscaled, then add to acc times their scale; groups smaller than a chunk scale
 * each chunk's lanes. */
static inline __attribute__((always_inline)) void quant_row_dots(const LinearWeights *L,
                                                                  const QuantTables *t,
                                                                  const int format,
                                                                  const int span,
                                                                  const uint16_t *xp, int64_t n,
                                                                  const int R, __m512 *out) {
    const int64_t k = L->k, chunk = quant_chunk(format), chunks = k / chunk;
    const int64_t bytes = quant_row_bytes(format, chunk);
    const int64_t per_group = span == GROUP_OF_CHUNKS ? L->group / chunk : 1; /* chunks */
    const char *w = (const char *)L->weight + n * quant_row_bytes(format, k);
    __m512 acc[ROW_GROUP], a[ROW_GROUP], b[ROW_GROUP];
    for (int r = 0; r < R; r++) acc[r] = a[r] = b[r] = _mm512_setzero_ps();
    if (span == GROUPS_IN_CHUNK || span == K_GROUPS) prefetch_scales(L, n);
    KWalk walk; /* K_GROUPS' */
    if (span == K_GROUPS) walk = k_walk(L, n, chunk);
    for (int64_t c = 0, left = per_group; c < chunks; c++) {
        _mm_prefetch(w + c * bytes + PREFETCH_BYTES, _MM_HINT_T1);
        __m512i v[4];
        dequantize_chunk(format, w, c, t, v);
        for (int r = 0; r < R; r++) chunk_dot(format, xp + r * k + c * chunk, v, &a[r], &b[r]);
        if (--left) continue; /* the group goes on */
        left = per_group;
        __m512 s;
        if (span == K_GROUPS) { /* (k_chunk_sc sets walk.d) */
            const __m512 sc = k_sc_floats(&walk, k_chunk_sc(&walk, format, chunk, c));
            s = _mm512_mul_ps(sc, walk.d);
        } else {
            s = span == GROUPS_IN_CHUNK ? chunk_scales(L, t, n, c)
                                        : _mm512_set1_ps(quant_scale(L, n, c / per_group));
        }
        for (int r = 0; r < R; r++) {
            acc[r] = _mm512_fmadd_ps(_mm512_add_ps(a[r], b[r]), s, acc[r]);
            a[r] = b[r] = _mm512_setzero_ps();
        }
    }
    for (int r = 0; r < R; r++) out[r * OUTPUT_BLOCK] = acc[r];
}

#define QUANT_SPANS(F, R)                                                             \
    switch (two_level(L->scale_kind) ? K_GROUPS : group_span(L, t)) {                 \
    case K_GROUPS: quant_row_dots(L, t, F, K_GROUPS, xp, n, R, out); break;           \
    case GROUPS_IN_CHUNK: quant_row_dots(L, t, F, GROUPS_IN_CHUNK, xp, n, R, out); break; \
    case GROUP_IS_CHUNK: quant_row_dots(L, t, F, GROUP_IS_CHUNK, xp, n, R, out); break;   \
    default: quant_row_dots(L, t, F, GROUP_OF_CHUNKS, xp, n, R, out); break;              \
    }

#define QUANT_ROWS(F)                                                                 \
    switch (R) {                                                                      \
    case 1: QUANT_SPANS(F, 1) break;                                                  \
    case 2: QUANT_SPANS(F, 2) break;                                                  \
    case 3: QUANT_SPANS(F, 3) break;                                                  \
    case 4: QUANT_SPANS(F, 4) break;                                                  \
    case 5: QUANT_SPANS(F, 5) break;                                                  \
    case 6: QUANT_SPANS(F, 6) break;                                                  \
    case 7: QUANT_SPANS(F, 7) break;                                                  \
    default: QUANT_SPANS(F, 8) break;                                                 \
    }

/* One unrolled body per format and row count. */
__attribute__((noinline)) static void quant_dots(const LinearWeights *L, const QuantTables *t,
                                                 const uint16_t *xp, int64_t n, int R,
                                                 __m512 *out) {
    if (L->format == FORMAT_INT4) {
        QUANT_ROWS(FORMAT_INT4)
    } else if (L->format == FORMAT_IQ4) {
        QUANT_ROWS(FORMAT_IQ4)
    } else if (L->format == FORMAT_INT8) {
        QUANT_ROWS(FORMAT_INT8)
    } else if (L->format == FORMAT_INT6) {
        QUANT_ROWS(FORMAT_INT6)
    } else if (L->format == FORMAT_INT5) {
        QUANT_ROWS(FORMAT_INT5)
    } else {
        QUANT_ROWS(FORMAT_FP8)
    }
}
#undef QUANT_ROWS
#undef QUANT_SPANS

/* Two weight rows at a time against R bf16 input rows (a bf16 model's rows that int8
 * activations do not take), for the usual layouts: int4 groups of whole chunks, fp8 and int8
 * one scale per row. Each input vector loaded serves both weight rows (quant_row_dots loads one
 * per product, which bound it at 8 rows), and the products add straight into one float32 sum
 * per input row and weight row with no scaling step per chunk: int4 and iq4 fold each group's
 * scale into their nibble table, bf16(q * s) -- the very weights the torch reference
 * dequantizes to -- and fp8 and int8 scale the row's sum once at the end (quant_features,
 * row_scaled_after). x_r . w_{n+j} left unsummed at out[r * OUTPUT_BLOCK + j]; format, R and J
 * compile-time after inlining. */
static inline __attribute__((always_inline)) void paired_tile(const LinearWeights *L,
                                                               const QuantTables *t,
                                                               const int format,
                                                               const uint16_t *xp, int64_t n,
                                                               const int R, const int J,
                                                               __m512 *out) {
    enum { MAX_J = 2 };
    const int int4 = nibbles(format), vectors = int4 ? 4 : 2;
    const int64_t k = L->k, chunk = quant_chunk(format), chunks = k / chunk;
    const int64_t per_group = int4 ? L->group / chunk : chunks, wrow = quant_row_bytes(format, k);
    const char *w = (const char *)L->weight + n * wrow;
    __m512 acc[ROW_GROUP][MAX_J];
    __m512i table[MAX_J];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < J; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t c = 0, left = 0; c < chunks; c++, left--) {
        if (int4 && left == 0) { /* a group starts: its tables (vpermw reads 5 index bits) */
            left = per_group;
            for (int j = 0; j < J; j++) {
                const __m512 scaled =
                    _mm512_mul_ps(t->codes, _mm512_set1_ps(quant_scale(L, n + j, c / per_group)));
                table[j] = _mm512_broadcast_i64x4((__m256i)_mm512_cvtneps_pbh(scaled));
            }
        }
        __m512i v[MAX_J][4];
        for (int j = 0; j < J; j++) {
            const char *wc = w + j * wrow + c * 64;
            _mm_prefetch(wc + PREFETCH_BYTES, _MM_HINT_T1);
            if (!int4) {
                dequantize_chunk(format, w + j * wrow, c, t, v[j]);
                continue;
            }
            nibble_lookup(_mm512_loadu_si512(wc), table[j], v[j]);
        }
        for (int r = 0; r < R; r++)
            for (int q = 0; q < vectors; q++) {
                const __m512bh x = (__m512bh)_mm512_loadu_si512(xp + r * k + c * chunk + 32 * q);
                for (int j = 0; j < J; j++)
                    acc[r][j] = _mm512_dpbf16_ps(acc[r][j], x, (__m512bh)v[j][q]);
            }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < J; j++) out[r * OUTPUT_BLOCK + j] = acc[r][j];
}

/* Whether paired_tile takes this layout. */
static inline int paired_layout(const LinearWeights *L, const QuantTables *t) {
    return nibbles(L->format) ? !t->groups_per_chunk
                              : L->group == L->k && !held_bits(L->format);
}

/* Whether paired_tile leaves the weight row's one scale to its caller (fp8, int8). */
static inline int row_scaled_after(const LinearWeights *L) { return !nibbles(L->format); }

#define PAIRED_ROWS(F, J)                                          \
    switch (R) {                                                   \
    case 1: paired_tile(L, t, F, xp, n, 1, J, out); break;         \
    case 2: paired_tile(L, t, F, xp, n, 2, J, out); break;         \
    case 3: paired_tile(L, t, F, xp, n, 3, J, out); break;         \
    case 4: paired_tile(L, t, F, xp, n, 4, J, out); break;         \
    case 5: paired_tile(L, t, F, xp, n, 5, J, out); break;         \
    case 6: paired_tile(L, t, F, xp, n, 6, J, out); break;         \
    case 7: paired_tile(L, t, F, xp, n, 7, J, out); break;         \
    default: paired_tile(L, t, F, xp, n, 8, J, out); break;        \
    }
#define PAIRED_WEIGHT_ROWS(F)                                      \
    if (J == 2) {                                                  \
        PAIRED_ROWS(F, 2)                                          \
    } else {                                                       \
        PAIRED_ROWS(F, 1)                                          \
    }

/* One unrolled body per format, row count, and two weight rows or one (an odd share's last). */
__attribute__((noinline)) static void paired_dots(const LinearWeights *L, const QuantTables *t,
                                                  const uint16_t *xp, int64_t n, int R, int J,
                                                  __m512 *out) {
    if (L->format == FORMAT_INT4) {
        PAIRED_WEIGHT_ROWS(FORMAT_INT4)
    } else if (L->format == FORMAT_IQ4) {
        PAIRED_WEIGHT_ROWS(FORMAT_IQ4)
    } else if (L->format == FORMAT_INT8) {
        PAIRED_WEIGHT_ROWS(FORMAT_INT8)
    } else {
        PAIRED_WEIGHT_ROWS(FORMAT_FP8)
    }
}
#undef PAIRED_WEIGHT_ROWS
#undef PAIRED_ROWS
#endif

#if defined(HAVE_BF16_DOT) && defined(__AVX512VL__)
/* Sixteen stored weights of a row from element e0 on as float32, not yet scaled: ints as q
 * (iq4 as its level), fp8 as 2^-8 of its value (fp8_as_halves; the caller scales by 256
 * more). */
static inline __m512 sixteen_values(int format, const uint8_t *w, int64_t e0) {
    if (nibbles(format)) { /* 8 bytes: low nibble first */
        const __m128i bytes = _mm_loadl_epi64((const __m128i *)(w + e0 / 2));
        const __m128i nibble = _mm_set1_epi8(15);
        const __m128i low = _mm_and_si128(bytes, nibble);
        const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
        const __m512i q = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(low, high));
        return _mm512_permutexvar_ps(q, _mm512_loadu_ps(nibble_values[format == FORMAT_IQ4]));
    }
    if (format == FORMAT_INT5) { /* (e0 a multiple of 16) */
        const uint8_t *block = w + e0 / 256 * INT5_BLOCK_BYTES;
        const int64_t i = e0 % 256;
        const __m128i nibble = _mm_and_si128(
            _mm_srli_epi16(_mm_loadu_si128((const __m128i *)(block + 32 * (i / 64) + i % 32)),
                           i % 64 < 32 ? 0 : 4),
            _mm_set1_epi8(15));
        const __m128i bits = _mm_and_si128(
            _mm_srli_epi16(_mm_loadu_si128((const __m128i *)(block + 128 + i % 32)), (int)(i / 32)),
            _mm_set1_epi8(1));
        return _mm512_cvtepi32_ps(_mm512_sub_epi32(
            _mm512_cvtepu8_epi32(_mm_or_si128(nibble, _mm_slli_epi16(bits, 4))),
            _mm512_set1_epi32(16)));
    }
    if (format == FORMAT_INT6) { /* (e0 a multiple of 16) */
        const uint8_t *pair = w + e0 / 128 * INT6_PAIR_BYTES;
        const int64_t i = e0 % 128;
        const __m128i nibble = _mm_and_si128(
            _mm_srli_epi16(_mm_loadu_si128((const __m128i *)(pair + i % 64)), i < 64 ? 0 : 4),
            _mm_set1_epi8(15));
        const __m128i bits = _mm_and_si128(
            _mm_srli_epi16(_mm_loadu_si128((const __m128i *)(pair + 64 + i % 32)),
                           (int)(2 * (i / 32))), _mm_set1_epi8(3));
        return _mm512_cvtepi32_ps(_mm512_sub_epi32(
            _mm512_cvtepu8_epi32(_mm_or_si128(nibble, _mm_slli_epi16(bits, 4))),
            _mm512_set1_epi32(32)));
    }
    if (format == FORMAT_INT8)
        return _mm512_cvtepi32_ps(_mm512_sub_epi32(
            _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + e0))),
            _mm512_set1_epi32(128)));
    return _mm512_cvtph_ps(fp8_as_halves(w + e0));
}
#endif

#include "quant_int8_dot.h"

#if defined(HAVE_BF16_DOT) && defined(__AVX512VL__)
/* Rows [16 block, 16 block + 16) of x [M, k] (bf16 when x_bf16, else float32) as the
 * bf16-activation kernels see them (rounded to bf16): each row's sums over G groups of k / G
 * inputs, float32, into sums [G][16] (a row per lane, lanes past M zero). */
static void group_sums(const void *x, int x_bf16, int64_t M, int64_t k, int64_t G,
                       int64_t block, float *sums) {
    const int64_t group = k / G, m_end = 16 * block + 16 < M ? 16 * block + 16 : M;
    memset(sums, 0, (size_t)(G * 16) * sizeof(float));
    for (int64_t m = 16 * block; m < m_end; m++) {
        float *row = sums + m % 16;
        const int64_t step = 16; /* between a row's groups */
        for (int64_t b = 0; b < k; b += 32) { /* k is a multiple of 128 */
            __m512 v[2];
            for (int h = 0; h < 2; h++) { /* bf16's values (bf16 x as it is) */
                const __m512 f = vload(x, x_bf16, m * k + b + 16 * h);
                v[h] = x_bf16 ? f : _mm512_castsi512_ps(_mm512_slli_epi32(
                                        _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(f)),
                                        16));
            }
            if (group % 32 == 0) {
                row[b / group * step] += _mm512_reduce_add_ps(_mm512_add_ps(v[0], v[1]));
                continue;
            }
            float each[32];
            _mm512_storeu_ps(each, v[0]);
            _mm512_storeu_ps(each + 16, v[1]);
            for (int i = 0; i < 32; i++) row[(b + i) / group * step] += each[i];
        }
    }
}

#ifdef HAVE_INT8_DOT
/* group_sums of M rows prepared for the int8 dot products (prepare_int8_rows), as those
 * kernels see them, from each lane's scale and offset term (its inputs' sum times -8 or -128):
 * no second quantization of x. Every lane's inputs lie in one group. */
static void prepared_group_sums(int format, const char *xq, int64_t M, int64_t k, int64_t G,
                                float *sums) {
    const int64_t per_group = k / G / (DOT_CHUNK / 16); /* lanes a group */
    const float back = -1.0f / (float)stored_offset(format);
    memset(sums, 0, (size_t)((M + 15) / 16 * G * 16) * sizeof(float));
    for (int64_t m = 0; m < M; m++) {
        const char *lanes = xq + m * int8_row_bytes(k) + k; /* 16 a chunk */
        float *row = sums + m / 16 * G * 16 + m % 16;
        for (int64_t g = 0, i = 0; g < G; g++) {
            float total = 0.0f;
            for (const int64_t end = i + per_group; i < end; i++) {
                const char *chunk = lanes + i / 16 * 128;
                total += ((const float *)chunk)[i % 16] *
                         ((float)((const int32_t *)(chunk + 64))[i % 16] * back);
            }
            row[g * 16] = total;
        }
    }
}
#endif

/* One half of a K table's row at `half` ([d x S][sc x G]) for groups g .. g + 15 (lanes
 * outside `mask` zero; g a multiple of 16): d * sc, sc signed bytes when `sign`. */
static inline __m512 k_level(const KShape K, const char *half, int64_t g, __mmask16 mask,
                             int sign) {
    const __m512i super = _mm512_srli_epi32( /* each lane's super-block, from g's on */
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), (int)K.shift);
    const int64_t first = g >> K.shift;
    const __mmask16 firsts = (__mmask16)(K.S - first >= 2 ? 3 : 1);
    const __m512 d = _mm512_permutexvar_ps(
        super, _mm512_maskz_loadu_ps(firsts, (const float *)half + first));
    const __m128i bytes = _mm_maskz_loadu_epi8(mask, half + 4 * K.S + g);
    return _mm512_mul_ps(d, _mm512_cvtepi32_ps(sign ? _mm512_cvtepi8_epi32(bytes)
                                                    : _mm512_cvtepu8_epi32(bytes)));
}

/* A K table's offsets g .. g + 15 of row n (lanes outside `mask` zero; g a multiple of 16) as
 * centre * scale - dmin * m (k_scale's numbers for k_centre; centre 0: -dmin * m alone), and
 * with `scale` its scales d * sc there (SCALE_K: the scales alone, offsets zero). */
static inline __m512 k_values(const LinearWeights *L, int64_t n, int64_t g, __mmask16 mask,
                              float centre, __m512 *scale) {
    const KShape K = k_shape(L);
    const char *row = (const char *)L->scales + n * L->scale_stride;
    if (L->scale_kind == SCALE_K) {
        if (scale != NULL) *scale = k_level(K, row, g, mask, 1);
        return _mm512_setzero_ps();
    }
    const __m512 mins = k_level(K, row + 4 * K.S + K.G, g, mask, 0);
    if (centre == 0.0f && scale == NULL) return _mm512_sub_ps(_mm512_setzero_ps(), mins);
    const __m512 scales = k_level(K, row, g, mask, 0);
    if (scale != NULL) *scale = scales;
    return _mm512_fmsub_ps(_mm512_set1_ps(centre), scales, mins);
}

/* Offsets g .. g + 15 of row n (lanes outside `mask` zero; g a multiple of 16); a K table's
 * for `centre`. */
static inline __m512 group_offsets(const LinearWeights *L, int64_t n, int64_t g, __mmask16 mask,
                                   float centre) {
    if (!two_level(L->scale_kind))
        return _mm512_maskz_loadu_ps(mask, (const float *)L->scales + n * L->scale_stride +
                                               offset_groups(L) + g);
    return k_values(L, n, g, mask, centre, NULL);
}

/* Row n's G scales and offsets (NULL for SCALE_K: none) of a K table as float32, 16 groups a
 * vector (k_scale's numbers): the products' panels (quant_gemm.h). */
static inline void k_row_values(const LinearWeights *L, int64_t n, float *scales,
                                float *offsets) {
    const int64_t G = k_shape(L).G;
    for (int64_t g = 0; g < G; g += 16) {
        const __mmask16 mask = group_mask(G, g);
        __m512 scale;
        const __m512 offset = k_values(L, n, g, mask, k_centre(L->format), &scale);
        if (offsets != NULL) _mm512_mask_storeu_ps(offsets + g, mask, offset);
        _mm512_mask_storeu_ps(scales + g, mask, scale);
    }
}

/* What the offsets add to output n of each of R <= ROW_GROUP rows whose G group sums lie in
 * `rows` (a row's in a run, G apart): terms[r] = sum_g offset[n][g] * rows[r][g], 16 groups a
 * vector, each vector of offsets made once for all R rows (a K table's offsets for `centre`:
 * the convention of the products they add to). Few rows take this, not offset_terms, whose
 * lanes, a row each, would mostly idle: at 8 rows of a Q4_K_M file's linears the offsets took
 * ~27% of the products' time that way. */
static inline __attribute__((always_inline)) void offset_terms_of_rows(
    const LinearWeights *L, const float *rows, int R, int64_t n, float centre, float *terms) {
    const int64_t G = offset_groups(L);
    __m512 total[ROW_GROUP];
    for (int r = 0; r < R; r++) total[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 16) {
        const __mmask16 mask = group_mask(G, g);
        const __m512 offsets = group_offsets(L, n, g, mask, centre);
        for (int r = 0; r < R; r++)
            total[r] = _mm512_fmadd_ps(offsets, _mm512_maskz_loadu_ps(mask, rows + r * G + g),
                                       total[r]);
    }
    for (int r = 0; r < R; r++) terms[r] = _mm512_reduce_add_ps(total[r]);
}

/* What the offsets add to output n of the 16 rows whose group sums (group_sums) are `sums`:
 * sum_g offset[n][g] * sums[g], a row per lane. */
static inline __m512 offset_terms(const LinearWeights *L, const float *sums, int64_t n,
                                  float centre) {
    const int64_t G = offset_groups(L);
    __m512 terms = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
        float offsets[16];
        _mm512_storeu_ps(offsets, group_offsets(L, n, g0, group_mask(G, g0), centre));
        for (int64_t g = g0; g < G && g < g0 + 16; g++)
            terms = _mm512_fmadd_ps(_mm512_set1_ps(offsets[g - g0]),
                                    _mm512_loadu_ps(sums + g * 16), terms);
    }
    return terms;
}
#endif

#include "quant_gemm.h"

/* Whether int8 and int4 weights meet int8 activations at a few rows (quant_int8_dot.h) where
 * this build has the instructions; else they dequantize to bf16 against bf16 activations, as
 * fp8 does. One for the library (linear.c), set by bamba_quant_set_int8_activations. */
extern int bamba_int8_activations;

/* Input rows up to which fp8 and int8 weights against bf16 rows go one weight row at a time,
 * not two: a single stream of weight bytes a thread reads ~1.8x as fast from memory as two
 * interleaved ones on a full-width AVX-512 host (Zen 5: 30 against 16.5 GB/s a core in a
 * probe); fp8's batch-1 decode gained 6% (bench shape) and 12% (~1.1B) in a paired
 * measurement (benchmarks/README.md#quantization). More rows need the pairing: an input vector
 * loaded serves both weight rows. */
enum { ONE_STREAM_ROWS = 2 };

#ifdef HAVE_INT8_DOT
/* Input rows beyond which a decode step's int8 and int4 linears take quant_gemm.h's product
 * (int8 activations against panels of packed weights: each weight loaded once for every 16
 * rows) instead of the few-row kernels, which dequantize every weight again for each 8 rows
 * (dispatch.py's MAX_LINEAR_ROWS for the per-operation path alike). */
enum { FEW_ROWS = 8 };

/* Whether features of this linear at M rows take the product (gemm_features_alone). */
static inline int decode_gemm_fits(const LinearWeights *L, int64_t M, int x_bf16) {
    return M > FEW_ROWS && bamba_int8_activations &&
           int_format(L->format) && L->n % GEMM_WEIGHT_ROWS == 0 &&
           quant_gemm_supported(L->format, L->k, L->group, offset_groups(L) > 0, x_bf16);
}

/* quant_features by the product, inside a parallel region without a barrier: this thread
 * packs all M rows itself, then its share's panels.
 * Returns 0, or -1 when no memory is left for its buffers (nothing stored). */
static int gemm_features_alone(const LinearWeights *L, int x_bf16, const void *x, int64_t M,
                               const TileStore *to) {
    const int64_t k = L->k, blocks = (M + 15) / 16, G = offset_groups(L);
    const size_t panel_bytes = (size_t)gemm_panel_bytes(L->format, k),
                 panel_scales = (size_t)gemm_panel_scales(L),
                 rows_bytes = (size_t)(blocks * gemm_rows_bytes(L->format, k, gemm_halves(L))),
                 sums_bytes = (size_t)(blocks * G * 16) * sizeof(float);
    char *work = thread_buffer(GEMM_BUFFER, rows_bytes + panel_bytes + panel_scales + sums_bytes);
    if (work == NULL) return -1;
    float *sums = G ? (float *)(work + rows_bytes + panel_bytes + panel_scales) : NULL;
    const int offset = stored_offset(L->format);
    for (int64_t b = 0; b < blocks; b++) {
        pack_activations(x, x_bf16, M, k, offset, gemm_halves(L), work, b);
        if (sums) packed_group_sums(work, b, k, G, offset, sums + b * G * 16);
    }
    TileStore with_sums = *to;
    with_sums.sums = sums;
    quant_gemm_features(L, work, M, &with_sums, work + rows_bytes,
                        (float *)(work + rows_bytes + panel_bytes));
    return 0;
}
#endif

#ifdef HAVE_INT8_DOT
/* Features [n_begin, n_end) of M <= FEW_ROWS rows prepared for the integer products (xq), as
 * quant_features stores them: one row against two or four weight rows at a time where
 * FOUR_ROW_MAX_K's notes say so, else one; 2 to 8 rows in groups of at most INT8_DOT_MAX_ROWS
 * against pairs of weight rows (an odd last one a row at a time); OUTPUT_BLOCK outputs of a
 * row summed and stored together. `rows`: each row's group sums in a run
 * (offset_terms_of_rows), or NULL without offsets. */
static void int8_features(const LinearWeights *L, const QuantTables *t, const char *xq,
                          int64_t M, const float *rows, float centre, int x_bf16, void *y,
                          int64_t ldy, int y_bf16, int round_bf16, int64_t n_begin,
                          int64_t n_end) {
    const int64_t row_bytes = int8_row_bytes(L->k);
    const int four = M == 1 && (nibbles(L->format) || held_bits(L->format)) &&
                     (L->k <= FOUR_ROW_MAX_K || two_level(L->scale_kind));
    const int J = M > 1                  ? INT8_TILE_PAIR
                  : !four                ? 1
                  : held_bits(L->format) ? HELD_WEIGHT_ROWS
                                         : INT8_TILE_WEIGHT_ROWS;
    const int64_t groups = (M + INT8_DOT_MAX_ROWS - 1) / INT8_DOT_MAX_ROWS;
    __m512 lanes[FEW_ROWS * OUTPUT_BLOCK]; /* [row][output of the block] */
    for (int64_t n0 = n_begin; n0 < n_end; n0 += OUTPUT_BLOCK) {
        const int64_t block = n_end - n0 < OUTPUT_BLOCK ? n_end - n0 : OUTPUT_BLOCK;
        float terms[FEW_ROWS][OUTPUT_BLOCK], bias[OUTPUT_BLOCK];
        for (int64_t n = n0, Jn; n < n0 + block; n += Jn) {
            Jn = n + J <= n0 + block ? J : 1;
            __m512 *out = lanes + (n - n0);
            for (int64_t m0 = 0, g = 0; g < groups; g++) { /* groups as even as they go */
                const int R = (int)((M - m0) / (groups - g));
                if (Jn == 1)
                    for (int r = 0; r < R; r++)
                        int8_dot_one(L, t, xq + (m0 + r) * row_bytes, n,
                                     out + (m0 + r) * OUTPUT_BLOCK);
                else if (R == 1)
                    int8_dots_one_row(L, t, xq, n, out);
                else
                    int8_dots_rows(L, t, xq + m0 * row_bytes, n, R, out + m0 * OUTPUT_BLOCK);
                m0 += R;
            }
            /* the offsets after the products, whose walk brought the rows' K tables into
             * cache (before them, their loads took ~10% of a Q4_K file's batch-1 step) */
            for (int64_t j = n - n0; rows != NULL && j < n - n0 + Jn; j++) {
                float of_rows[FEW_ROWS]; /* (one row: its sums in registers) */
                if (M == 1) offset_terms_of_rows(L, rows, 1, n0 + j, centre, of_rows);
                else offset_terms_of_rows(L, rows, (int)M, n0 + j, centre, of_rows);
                for (int64_t m = 0; m < M; m++) terms[m][j] = of_rows[m];
            }
        }
        block_bias(L->bias, n0, block, x_bf16, bias);
        for (int64_t m = 0; m < M; m++)
            store_outputs(y, m * ldy + n0,
                          block_outputs(lanes + m * OUTPUT_BLOCK, block, NULL, bias,
                                        rows != NULL ? terms[m] : NULL),
                          block_mask(block), y_bf16, round_bf16);
    }
}
#endif

/* Features [n_begin, n_end) of y = x W^T + bias for M rows of x ([M, k], bf16 when x_bf16,
 * else float32), as linear_features (dot_rows.h) stores them. */
static void quant_features(const LinearWeights *L, int x_bf16, const void *x, int64_t M,
                           void *y, int64_t ldy, int y_bf16, int round_bf16, int64_t n_begin,
                           int64_t n_end) {
#if defined(HAVE_BF16_DOT) && defined(__AVX512VL__)
#ifdef HAVE_INT8_DOT
    if (decode_gemm_fits(L, M, x_bf16)) {
        const TileStore to = {y, ldy, n_begin, n_end, y_bf16, round_bf16, x_bf16};
        if (gemm_features_alone(L, x_bf16, x, M, &to) == 0) return;
    }
    const int int8_dot = bamba_int8_activations && int_format(L->format) && M <= FEW_ROWS &&
                         int8_dot_groups(L);
    const int64_t row_bytes = int8_dot ? int8_row_bytes(L->k) : 2 * L->k;
    const QuantTables t = tables_for_chunk(L, int8_dot ? DOT_CHUNK : quant_chunk(L->format));
#else
    const int int8_dot = 0;
    const int64_t row_bytes = 2 * L->k;
    const QuantTables t = quant_tables(L);
#endif
    uint16_t *xp = thread_buffer(ROWS_BUFFER, (size_t)(M * row_bytes));
    /* a K table's offsets in the convention of the products: int4 against int8 activations
     * multiplies its nibbles as stored (u, int8_tile's K_GROUPS), the rest q = u - 8 */
    const float centre = int8_dot && L->format == FORMAT_INT4 ? 0.0f : k_centre(L->format);
    const int64_t G = offset_groups(L);
    const int64_t blocks = (M + 15) / 16;
    float *sums = G ? thread_buffer(SUMS_BUFFER,
                                    (size_t)((blocks * 16 + ROW_GROUP) * G) * sizeof(float))
                    : NULL;
    if (G && sums == NULL) xp = NULL; /* no memory: NaN outputs below */
    if (xp != NULL) {
#ifdef HAVE_INT8_DOT
        if (int8_dot) prepare_int8_rows(L->format, x, x_bf16, M, L->k, (char *)xp);
        if (int8_dot && sums) prepared_group_sums(L->format, (const char *)xp, M, L->k, G, sums);
#endif
        if (!int8_dot) prepare_rows(L->format, x, x_bf16, M, L->k, xp);
        for (int64_t b = 0; !int8_dot && sums != NULL && b < blocks; b++)
            group_sums(x, x_bf16, M, L->k, G, b, sums + b * G * 16);
    }
    /* few rows: each row's group sums in a run (offset_terms_of_rows) */
    float *rows = sums == NULL || xp == NULL || M > ROW_GROUP ? NULL : sums + blocks * G * 16;
    for (int64_t r = 0; rows != NULL && r < M; r++)
        for (int64_t g = 0; g < G; g++) rows[r * G + g] = sums[g * 16 + r];
#ifdef HAVE_INT8_DOT
    if (xp != NULL && int8_dot) {
        int8_features(L, &t, (const char *)xp, M, rows, centre, x_bf16, y, ldy, y_bf16,
                      round_bf16, n_begin, n_end);
        return;
    }
#endif
    /* bf16 activations: OUTPUT_BLOCK features at a time, each summed as every row count sums
     * it (a row's numbers do not depend on the rows beside it), two weight rows at a time
     * (paired_tile) or one */
    const int paired = xp != NULL && x_bf16 && paired_layout(L, &t);
    const int pair = paired && (M > ONE_STREAM_ROWS || nibbles(L->format));
    const int scaled = paired && row_scaled_after(L); /* the row's one scale after its sums */
    const float paired_centre = paired ? 0.0f : centre;
    for (int64_t n0 = n_begin; n0 < n_end; n0 += OUTPUT_BLOCK) {
        const int64_t block = n_end - n0 < OUTPUT_BLOCK ? n_end - n0 : OUTPUT_BLOCK;
        float bias[OUTPUT_BLOCK], scales[OUTPUT_BLOCK];
        block_bias(L->bias, n0, block, x_bf16, bias);
        for (int64_t j = 0; j < OUTPUT_BLOCK; j++)
            scales[j] = scaled && j < block ? quant_scale(L, n0 + j, 0) : 1.0f;
        for (int64_t m0 = 0; m0 < M; m0 += ROW_GROUP) {
            const int R = M - m0 < ROW_GROUP ? (int)(M - m0) : ROW_GROUP;
            __m512 lanes[ROW_GROUP * OUTPUT_BLOCK]; /* [row][feature of the block] */
            float terms[ROW_GROUP][OUTPUT_BLOCK];
            for (int64_t n = n0, J; n < n0 + block; n += J) {
                J = pair && n + 2 <= n0 + block ? 2 : 1;
                if (paired) paired_dots(L, &t, xp + m0 * L->k, n, R, J, lanes + (n - n0));
                else if (xp != NULL) quant_dots(L, &t, xp + m0 * L->k, n, R, lanes + (n - n0));
                for (int j = 0; sums != NULL && xp != NULL && j < J; j++) {
                    float of_rows[16]; /* rows m0.. (offset_terms: the 16 from m0 / 16 * 16) */
                    if (rows) offset_terms_of_rows(L, rows, R, n + j, paired_centre, of_rows);
                    else _mm512_storeu_ps(of_rows, offset_terms(L, sums + m0 / 16 * G * 16, n + j,
                                                                paired_centre));
                    for (int r = 0; r < R; r++)
                        terms[r][n - n0 + j] = of_rows[rows ? r : (m0 + r) % 16];
                }
            }
            for (int r = 0; r < R; r++) /* out of memory for k inputs: NaN, not a guess */
                store_outputs(y, (m0 + r) * ldy + n0,
                              xp == NULL ? _mm512_set1_ps(NAN)
                                         : block_outputs(lanes + r * OUTPUT_BLOCK, block,
                                                         scaled ? scales : NULL, bias,
                                                         sums != NULL ? terms[r] : NULL),
                              block_mask(block), y_bf16, round_bf16);
        }
    }
#else
    (void)L, (void)x_bf16, (void)x, (void)M, (void)y, (void)ldy, (void)y_bf16, (void)round_bf16;
    (void)n_begin, (void)n_end;
#endif
}


/* Weight rows [n_begin, n_end) dequantized into out [n_end - n_begin, k] (bf16, rounded to
 * nearest even, or float32), in input order: for a prefill's matmul, a tile at a time. Where
 * the build has AVX-512 BF16, sixteen weights at a time (~10x the scalar loop: the tiles'
 * cost beside torch's matmul falls from ~14% to ~2% at 512 tokens). With `stream`, bf16
 * vectors go out in non-temporal stores (the caller fences): a tile larger than the caches
 * then costs no read of its old lines before each write. */
static void dequantize_rows(const LinearWeights *L, int64_t n_begin, int64_t n_end, void *out,
                            int out_bf16, int stream) {
    const int64_t k = L->k, group = L->group;
    float values[256]; /* stored byte -> value: e4m3, q + 128, or a nibble's */
    for (int b = 0; b < 256; b++)
        values[b] = L->format == FORMAT_FP8  ? e4m3_value(b)
                    : nibbles(L->format) ? nibble_values[L->format == FORMAT_IQ4][b & 15]
                                         : (float)(b - 128);
    enum { MAX_PIECE = 1024, SMALL_PIECE = 32 }; /* inputs of one scale converted at a time */
    const int64_t piece = group <= MAX_PIECE ? group : SMALL_PIECE; /* divides the group */
    float row[MAX_PIECE];
    for (int64_t n = n_begin; n < n_end; n++) {
        const uint8_t *w = (const uint8_t *)L->weight + n * quant_row_bytes(L->format, k);
        for (int64_t g0 = 0; g0 < k; g0 += piece) {
            const float scale = quant_scale(L, n, g0 / group);
            const float offset = offset_groups(L) ? quant_scale(L, n, offset_groups(L) +
                                                                      g0 / group)
                                                  : 0.0f;
            const int64_t at = (n - n_begin) * k + g0;
            int64_t i = 0;
#if defined(HAVE_BF16_DOT) && defined(__AVX512VL__)
            const __m512 factor = _mm512_set1_ps(L->format == FORMAT_FP8 ? scale * 256.0f
                                                                         : scale);
            for (; i + 16 <= piece; i += 16) {
                const __m512 v = _mm512_fmadd_ps(sixteen_values(L->format, w, g0 + i), factor,
                                                 _mm512_set1_ps(offset));
                uint16_t *to = (uint16_t *)out + at + i;
                if (out_bf16 && stream && !((uintptr_t)to & 31))
                    _mm256_stream_si256((__m256i *)to, (__m256i)_mm512_cvtneps_pbh(v));
                else if (out_bf16)
                    _mm256_storeu_si256((__m256i *)to, (__m256i)_mm512_cvtneps_pbh(v));
                else
                    _mm512_storeu_ps((float *)out + at + i, v);
            }
#endif
            if (i == piece) continue;
            if (nibbles(L->format))
                for (int64_t j = i; j < piece; j += 2) {
                    const uint8_t b = w[(g0 + j) / 2];
                    row[j] = fmaf(values[b & 15], scale, offset);
                    row[j + 1] = fmaf(values[b >> 4], scale, offset);
                }
            else if (held_bits(L->format))
                for (int64_t j = i; j < piece; j++)
                    row[j] = fmaf((float)(L->format == FORMAT_INT5 ? int5_value(w, g0 + j)
                                                                   : int6_value(w, g0 + j)),
                                  scale, offset);
            else
                for (int64_t j = i; j < piece; j++) row[j] = fmaf(values[w[g0 + j]], scale, offset);
            if (out_bf16)
                for (int64_t j = i; j < piece; j++)
                    ((uint16_t *)out)[at + j] = float_to_bf16(row[j]);
            else
                memcpy((float *)out + at + i, row + i, (piece - i) * sizeof(float));
        }
    }
}
#endif
