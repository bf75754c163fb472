/* Integer weights (int8, int6, int5, int4, iq4) against int8 activations: integer dot
 * products (AVX-512 VNNI `vpdpbusd`, 64 unsigned-by-signed byte products an instruction) for
 * the few-row kernel at every row count it takes (1 to FEW_ROWS), as the prefill's product
 * (quant_gemm.h) takes more: a row's numbers do not depend on how many rows its call carries
 * (at 1 to FEW_ROWS rows bit for bit, past them up to float32 summation order), so a
 * request's tokens do not depend on the batch it shares a decode step with. fp8 keeps
 * quant_rows.h's bf16 path.
 *
 * The activations are quantized per call, as llama.cpp quantizes them for its Q8_0 dot
 * products: each block of 32 inputs of a row gets the scale s = max |x| / 127 and the values
 * q = round-half-even(x / s) in [-127, 127] (bamba.quant.formats.int8_activations is the
 * torch reference). The weights are read as stored (quant_rows.h), unsigned, which is what
 * `vpdpbusd` multiplies, a chunk of DOT_CHUNK inputs as two vectors of bytes: int4's low and
 * high nibbles (q_w + 8: a chunk's even inputs, its odd ones) masked apart, iq4's nibbles then
 * looked up as their levels + 128 (one `vpshufb` each), int8's bytes (q_w + 128) and int6's
 * and int5's u = q + 32 or q + 16 (held_chunk) in input order parted by `part_bytes`. The
 * offset's products (128, 32, 16 or 8, times the sum of a lane's activations) are subtracted
 * by starting each lane's integer sum at minus them. A chunk gives 16 int32 lanes, lane i the
 * exact dot product over 8 inputs of one group of 16 (lanes 4b..4b+3: block b of 32), turned
 * to float32 and multiplied by its block's scale, then by the weights' (`chunk_scales` serves
 * groups smaller than a chunk). Lanes of 8 inputs, not the 4 of a byte chunk as stored: half
 * the conversions and scalings a weight (int8 weights at 4 and 8 rows a step took 1.23x and
 * 1.3x bf16 activations' time with lanes of 4; benchmarks/README.md#batch-invariant-decode).
 *
 * Each input row is prepared once per call and thread (`prepare_int8_rows`): its k quantized
 * bytes in the chunks' order, then per chunk 16 lane scales (float32) and 16 lane offsets
 * (int32).
 */
#ifndef BAMBA_QUANT_INT8_DOT_H
#define BAMBA_QUANT_INT8_DOT_H

#if defined(HAVE_BF16_DOT) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define HAVE_INT8_DOT 1

/* DOT_CHUNK: inputs a chunk of the integer products. A call of 2 to 8 rows goes
 * INT8_DOT_MAX_ROWS input rows at most by INT8_TILE_PAIR weight rows a tile, one row
 * INT8_TILE_WEIGHT_ROWS weight rows or one. */
enum { ACT_BLOCK = 32, DOT_CHUNK = 128, INT8_DOT_MAX_ROWS = 4, INT8_TILE_PAIR = 2,
       INT8_TILE_WEIGHT_ROWS = 4 };

/* Bytes of one prepared row of width k: the quantized values, then per chunk 16 float32 lane
 * scales and 16 int32 lane offsets. */
static inline int64_t int8_row_bytes(int64_t k) { return 2 * k; }

/* Whether the integer products take a weight's groups: whole chunks, or whole lanes of one
 * (else bf16 activations take it at every row count). */
static inline int int8_dot_groups(const LinearWeights *L) {
    return two_level(L->scale_kind) || L->group % DOT_CHUNK == 0 ||
           (DOT_CHUNK % L->group == 0 && L->group % (DOT_CHUNK / 16) == 0);
}

/* A chunk of bytes in input order (first: inputs 0-63, second: 64-127) as the two vectors
 * the products take, each 32 bits of both from one group of 16 inputs: *low holds inputs
 * 0-7 and 16-23 of each block of 32 (its 128 bits), *high inputs 8-15 and 24-31. Four
 * shuffles of AVX-512F, as fast as two `vpermt2b` into even and odd inputs (int8 weights at 8
 * rows, alternating turns: 0.98x). */
static inline void part_bytes(__m512i first, __m512i second, __m512i *low, __m512i *high) {
    const __m512i a = _mm512_shuffle_i64x2(first, second, 0x88); /* blocks' first halves */
    const __m512i b = _mm512_shuffle_i64x2(first, second, 0xDD); /* their second halves */
    *low = _mm512_unpacklo_epi64(a, b);
    *high = _mm512_unpackhi_epi64(a, b);
}

/* One block of 32 inputs from x[i] on quantized: the bytes q = round-half-even(x / s) into
 * q[0..31], s = max |x| / 127 returned (q = 0 where s is 0). Division, not a reciprocal's
 * product, and the default rounding mode: the torch reference's numbers exactly. */
static inline float quantize_block(const void *x, int64_t i, int x_bf16, int8_t *q) {
    const __m512 a = vload(x, x_bf16, i), b = vload(x, x_bf16, i + 16);
    const float most = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float s = most / 127.0f;
    if (!(s > 0.0f)) {
        memset(q, 0, ACT_BLOCK);
        return s;
    }
    const __m512 sv = _mm512_set1_ps(s);
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(a, sv))));
    _mm_storeu_si128((__m128i *)(q + 16),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(b, sv))));
    return s;
}

/* x [M, k] (bf16 or float32) quantized per block of 32 into xq [M, int8_row_bytes(k)], each
 * chunk as two vectors of bytes in the order of the weights of `format` (an integer format):
 * nibbles' even inputs, then their odd ones; bytes' part_bytes halves. Each lane's offset term
 * for the format's stored_offset. */
static void prepare_int8_rows(int format, const void *x, int x_bf16, int64_t M, int64_t k,
                              char *xq) {
    const int64_t per_lane = DOT_CHUNK / 16;
    const __m512i ones = _mm512_set1_epi8(1);
    const __m512i offset = _mm512_set1_epi32(-stored_offset(format));
    for (int64_t m = 0; m < M; m++) {
        int8_t *values = (int8_t *)(xq + m * int8_row_bytes(k));
        char *lanes = (char *)values + k;
        for (int64_t c = 0; c < k; c += DOT_CHUNK) {
            float *scales = (float *)(lanes + c / DOT_CHUNK * 128);
            int8_t q[DOT_CHUNK] __attribute__((aligned(64))); /* the chunk's inputs in order */
            float block_scale[DOT_CHUNK / ACT_BLOCK];
            for (int64_t b = 0; b < DOT_CHUNK; b += ACT_BLOCK)
                block_scale[b / ACT_BLOCK] = quantize_block(x, m * k + c + b, x_bf16, q + b);
            for (int lane = 0; lane < 16; lane++)
                scales[lane] = block_scale[lane * per_lane / ACT_BLOCK];
            const __m512i first = _mm512_load_si512(q), second = _mm512_load_si512(q + 64);
            __m512i low, high;
            if (nibbles(format)) {
                low = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(first)),
                                         _mm512_cvtepi16_epi8(second), 1);
                high = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm512_cvtepi16_epi8(_mm512_srai_epi16(first, 8))),
                    _mm512_cvtepi16_epi8(_mm512_srai_epi16(second, 8)), 1);
            } else {
                part_bytes(first, second, &low, &high);
            }
            _mm512_storeu_si512(values + c, low);
            _mm512_storeu_si512(values + c + 64, high);
            /* each lane's inputs summed, as the kernel's dot products pair them */
            const __m512i sums = _mm512_dpbusd_epi32(
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, low), ones, high);
            _mm512_storeu_si512(scales + 16, _mm512_mullo_epi32(offset, sums));
        }
    }
}

/* At one row, int4 and iq4 weight rows of at most this many inputs (8 chunks) go four at a
 * time (INT8_TILE_WEIGHT_ROWS), longer ones one at a time. Both builds in one process,
 * alternating decode turns (benchmarks/ab_kernels.py): with the tile for every row the ~1.1B
 * shape's steps (k 1536 and more) took 20.2 ms against 17.4 with this bound (its Q4_0 file
 * 21.4 against 18.6); with no tile at all the bench shape's (k 512 to 1792) took 4.17 against
 * 3.66 with it, and with this bound it is as fast as with the tile everywhere (1.01x). K
 * tables take the tile at every width: their rows do more arithmetic a byte, which four chains
 * hide (a [2048, 1536] Q4_K linear from memory at one row: 80 us one row at a time, 70 four);
 * int6's and int5's, whose bits are unpacked (held_chunk), go two at a time
 * (HELD_WEIGHT_ROWS) at every width: four unpacked chunks of 128 outgrow the registers (the
 * ~1.1B shape's Q6_K file at batch 1, against the chunks of 64 before: 0.76-0.83x four at a
 * time, 1.08-1.24x two). */
enum { FOUR_ROW_MAX_K = 1024, HELD_WEIGHT_ROWS = 2 };

/* out[r * J + j] = x_r . w_{n+j} for R prepared rows (row_bytes apart) and J weight rows,
 * all of format, span, R and J compile-time after inlining: each weight chunk loaded serves R
 * rows, each row's activations J weight rows, in one flat loop over the chunks. One input row
 * against four weight rows is the batch-1 decode of short int4 rows and of K tables (above):
 * four independent chains and one call for four outputs (a short row, 4-8 chunks, otherwise
 * spends a good part of its time starting and reducing; a longer one reads four interleaved
 * weight streams slower than one). int8 weights at one row stay one weight row at a time:
 * their four-row tile, four interleaved streams of weight bytes, read 37 GB/s from memory
 * where one row's stream reads 45 (all linears of the ~1.1B shape,
 * benchmarks/README.md#linears-alone). 2 to 8 rows go up to INT8_DOT_MAX_ROWS at a time
 * against pairs of weight rows (int8_features). Each output's arithmetic is the same whatever
 * R and J. */
static inline __attribute__((always_inline)) void int8_tile(const LinearWeights *L,
                                                             const QuantTables *t,
                                                             const int format, const int span,
                                                             const char *xq, int64_t n,
                                                             const int R, const int J,
                                                             __m512 *out) {
    const int64_t k = L->k, chunks = k / DOT_CHUNK;
    const int64_t row_bytes = int8_row_bytes(k), wrow = quant_row_bytes(format, k);
    const int64_t chunk_bytes = quant_row_bytes(format, DOT_CHUNK);
    const int64_t per_group = span == GROUP_OF_CHUNKS ? L->group / DOT_CHUNK : 1; /* chunks */
    const char *w = (const char *)L->weight + n * wrow;
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512 acc[INT8_DOT_MAX_ROWS][INT8_TILE_WEIGHT_ROWS];
    __m512 sums[INT8_DOT_MAX_ROWS][INT8_TILE_WEIGHT_ROWS];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < J; j++) acc[r][j] = sums[r][j] = _mm512_setzero_ps();
    if (span == GROUPS_IN_CHUNK || span == K_GROUPS)
        for (int j = 0; j < J; j++) prefetch_scales(L, n + j);
    /* K_GROUPS: each chunk's int32 lanes times their group's sc in `vpmaddwd` (a lane's low 16
     * bits times sc: |lane| <= 8 * 15 * 127 for int4's u, 8 * 32 * 127 for Q6_K's q, both
     * int16; iq4's levels reach 8 * 127 * 127, so its lanes go to float32 and take d * sc
     * there; with `vpmulld` a [1024, 768] Q4_K linear at one row took 35 us, 32 so), the sums
     * times the super-block's d; int4's nibbles multiply as stored, u (the offsets' centre 0) */
    KWalk walk[INT8_TILE_WEIGHT_ROWS];
    for (int j = 0; j < J && span == K_GROUPS; j++) walk[j] = k_walk(L, n + j, DOT_CHUNK);
    for (int64_t c = 0, left = per_group; c < chunks; c++) {
        __m512i low[INT8_TILE_WEIGHT_ROWS], high[INT8_TILE_WEIGHT_ROWS]; /* even, odd inputs */
        __m512 wscale[INT8_TILE_WEIGHT_ROWS];
        __m512i wsc[INT8_TILE_WEIGHT_ROWS];
        for (int j = 0; j < J; j++) {
            const char *wr = w + j * wrow, *wc = wr + c * chunk_bytes;
            _mm_prefetch(wc + PREFETCH_BYTES, _MM_HINT_T1);
            if (nibbles(format)) {
                const __m512i bytes = _mm512_loadu_si512(wc);
                low[j] = _mm512_and_si512(bytes, nibble);
                high[j] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
            } else { /* two vectors of bytes in input order, parted */
                if (chunk_bytes > 64) _mm_prefetch(wc + 64 + PREFETCH_BYTES, _MM_HINT_T1);
                const __m512i first = held_bits(format) ? held_chunk(format, wr, 2 * c)
                                                        : _mm512_loadu_si512(wc);
                const __m512i second = held_bits(format) ? held_chunk(format, wr, 2 * c + 1)
                                                         : _mm512_loadu_si512(wc + 64);
                part_bytes(first, second, &low[j], &high[j]);
            }
            if (format == FORMAT_IQ4) { /* levels + 128, as int8's bytes */
                low[j] = _mm512_shuffle_epi8(t->code_bytes, low[j]);
                high[j] = _mm512_shuffle_epi8(t->code_bytes, high[j]);
            }
            if (span == GROUPS_IN_CHUNK) wscale[j] = chunk_scales(L, t, n + j, c);
            if (span == GROUP_IS_CHUNK) wscale[j] = _mm512_set1_ps(quant_scale(L, n + j, c));
            if (span == K_GROUPS) wsc[j] = k_chunk_sc(&walk[j], format, DOT_CHUNK, c);
            if (span == K_GROUPS && format == FORMAT_IQ4) /* d * sc: levels reach 127 */
                wscale[j] = _mm512_mul_ps(k_sc_floats(&walk[j], wsc[j]), walk[j].d);
        }
        for (int r = 0; r < R; r++) {
            const char *row = xq + r * row_bytes, *lanes = row + k + c * 128;
            const __m512i x_low = _mm512_loadu_si512(row + c * DOT_CHUNK);
            const __m512i x_high = _mm512_loadu_si512(row + c * DOT_CHUNK + 64);
            const __m512i start = span == K_GROUPS && format == FORMAT_INT4
                ? _mm512_setzero_si512() : _mm512_loadu_si512(lanes + 64);
            const __m512 x_scale = _mm512_loadu_ps((const float *)lanes);
            for (int j = 0; j < J; j++) {
                const __m512i dot = _mm512_dpbusd_epi32(
                    _mm512_dpbusd_epi32(start, low[j], x_low), high[j], x_high);
                if (span == GROUP_OF_CHUNKS)
                    sums[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), x_scale, sums[r][j]);
                else if (span == K_GROUPS && format == FORMAT_IQ4) /* (lanes past int16) */
                    acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                                _mm512_mul_ps(x_scale, wscale[j]), acc[r][j]);
                else if (span == K_GROUPS)
                    acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(dot, wsc[j])),
                                                _mm512_mul_ps(x_scale, walk[j].d), acc[r][j]);
                else
                    acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                                _mm512_mul_ps(x_scale, wscale[j]), acc[r][j]);
            }
        }
        if (span != GROUP_OF_CHUNKS || --left) continue; /* no group ends here */
        left = per_group;
        for (int j = 0; j < J; j++) {
            const __m512 s = _mm512_set1_ps(quant_scale(L, n + j, c / per_group));
            for (int r = 0; r < R; r++) {
                acc[r][j] = _mm512_fmadd_ps(sums[r][j], s, acc[r][j]);
                sums[r][j] = _mm512_setzero_ps();
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < J; j++) out[r * OUTPUT_BLOCK + j] = acc[r][j];
}

#define INT8_SPANS(F, R, J)                                                           \
    switch (two_level(L->scale_kind) ? K_GROUPS : group_span(L, t)) {                 \
    case K_GROUPS: int8_tile(L, t, F, K_GROUPS, xq, n, R, J, out); break;             \
    case GROUPS_IN_CHUNK: int8_tile(L, t, F, GROUPS_IN_CHUNK, xq, n, R, J, out); break; \
    case GROUP_IS_CHUNK: int8_tile(L, t, F, GROUP_IS_CHUNK, xq, n, R, J, out); break;   \
    default: int8_tile(L, t, F, GROUP_OF_CHUNKS, xq, n, R, J, out); break;              \
    }

#define INT8_FORMATS(TILE)                                                            \
    switch (L->format) {                                                              \
    case FORMAT_INT8: TILE(FORMAT_INT8) break;                                        \
    case FORMAT_INT6: TILE(FORMAT_INT6) break;                                        \
    case FORMAT_INT5: TILE(FORMAT_INT5) break;                                        \
    case FORMAT_IQ4: TILE(FORMAT_IQ4) break;                                          \
    default: TILE(FORMAT_INT4) break;                                                 \
    }

/* out[0] = x . w_n for one prepared row. */
#define ONE_BY_ONE(F) INT8_SPANS(F, 1, 1)
__attribute__((noinline)) static void int8_dot_one(const LinearWeights *L, const QuantTables *t,
                                                   const char *xq, int64_t n, __m512 *out) {
    INT8_FORMATS(ONE_BY_ONE)
}

/* out[j] = x . w_{n+j} for one prepared row and INT8_TILE_WEIGHT_ROWS int4 or iq4 weight
 * rows, or HELD_WEIGHT_ROWS int6 or int5 ones. */
__attribute__((noinline)) static void int8_dots_one_row(const LinearWeights *L,
                                                        const QuantTables *t, const char *xq,
                                                        int64_t n, __m512 *out) {
    switch (L->format) {
    case FORMAT_INT6: INT8_SPANS(FORMAT_INT6, 1, HELD_WEIGHT_ROWS) break;
    case FORMAT_INT5: INT8_SPANS(FORMAT_INT5, 1, HELD_WEIGHT_ROWS) break;
    case FORMAT_IQ4: INT8_SPANS(FORMAT_IQ4, 1, INT8_TILE_WEIGHT_ROWS) break;
    default: INT8_SPANS(FORMAT_INT4, 1, INT8_TILE_WEIGHT_ROWS) break;
    }
}

/* out[r * INT8_TILE_PAIR + j] = x_r . w_{n+j} for R (2 to INT8_DOT_MAX_ROWS) prepared rows
 * and a pair of weight rows. */
#define ROWS_BY_PAIR(F)                                                               \
    if (R == 2) {                                                                     \
        INT8_SPANS(F, 2, INT8_TILE_PAIR)                                              \
    } else if (R == 3) {                                                              \
        INT8_SPANS(F, 3, INT8_TILE_PAIR)                                              \
    } else {                                                                          \
        INT8_SPANS(F, 4, INT8_TILE_PAIR)                                              \
    }
__attribute__((noinline)) static void int8_dots_rows(const LinearWeights *L,
                                                     const QuantTables *t, const char *xq,
                                                     int64_t n, int R, __m512 *out) {
    INT8_FORMATS(ROWS_BY_PAIR)
}
#undef ONE_BY_ONE
#undef ROWS_BY_PAIR
#undef INT8_FORMATS
#undef INT8_SPANS
#endif
#endif
