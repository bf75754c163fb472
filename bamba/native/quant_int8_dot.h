/* int8, int4 and iq4 weights against int8 activations: integer dot products (AVX-512 VNNI
 * `vpdpbusd`, 64 unsigned-by-signed byte products an instruction) for the few-row kernel at 1
 * to `int8_dot_rows` rows, where turning the weights into bf16 costs more than streaming them
 * (benchmarks/README.md#quantization); fp8 and more rows keep quant_rows.h's path.
 *
 * The activations are quantized per call, as llama.cpp quantizes them for its Q8_0 dot
 * products: each block of 32 inputs of a row gets the scale s = max |x| / 127 and the values
 * q = round-half-even(x / s) in [-127, 127] (bamba.quant.formats.int8_activations is the
 * torch reference). The weights are read as stored (quant_rows.h), unsigned, which is what
 * `vpdpbusd` multiplies: int8 bytes hold q_w + 128, int4 nibbles q_w + 8 (a byte's low and
 * high nibbles are masked into two vectors of bytes), iq4's nibbles become their levels +
 * 128 in one `vpshufb` each, as int8's bytes, and int6's and int5's chunks their u = q + 32
 * or q + 16 (held_chunk). The offset's products (128, 32, 16 or 8, times
 * the sum of a lane's activations) are subtracted by starting each lane's integer sum at minus
 * them. A chunk of 64 weight bytes (64 int8 inputs, 128 int4 ones) gives 16 int32 lanes, lane
 * i the exact dot product over its inputs (int8: 4i..4i+3; int4: 8i..8i+7, the even ones
 * against the low nibbles, the odd ones against the high), turned to float32 and multiplied by
 * its block's scale, then by the weights' (quant_rows.h's chunk and lanes, so `chunk_scales`
 * serves groups smaller than a chunk).
 *
 * Each input row is prepared once per call and thread (`prepare_int8_rows`): its k quantized
 * bytes in the chunks' order (int4, iq4: a chunk's even inputs, then its odd ones), then per chunk
 * 16 lane scales (float32) and 16 lane offsets (int32).
 */
#ifndef BAMBA_QUANT_INT8_DOT_H
#define BAMBA_QUANT_INT8_DOT_H

#if defined(HAVE_BF16_DOT) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define HAVE_INT8_DOT 1

enum { ACT_BLOCK = 32, INT8_DOT_MAX_ROWS = 3, INT8_TILE_WEIGHT_ROWS = 4, MAX_CHUNK = 128 };

/* Bytes of one prepared row of width k: the quantized values, then per chunk 16 float32 lane
 * scales and 16 int32 lane offsets. */
static inline int64_t int8_row_bytes(int format, int64_t k) {
    return k + k / quant_chunk(format) * 128;
}

/* Input rows up to which a format's weights meet int8 activations: int4 INT8_DOT_MAX_ROWS, int8
 * two. A prepared int8 row takes 3k bytes (int4's 2k): three of them for the ~1.1B shape's
 * 4096-wide down projection outgrow L1, and all of its linears at 3 rows took 41 ms where bf16
 * activations take 33 (benchmarks/README.md#linears-alone). */
static inline int int8_dot_rows(int format) {
    return nibbles(format) ? INT8_DOT_MAX_ROWS : 2;
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

/* x [M, k] (bf16 or float32) quantized per block of 32 into xq [M, int8_row_bytes(format,
 * k)], in the chunk order of `format` (an integer format), each lane's offset term for its
 * stored_offset. */
static void prepare_int8_rows(int format, const void *x, int x_bf16, int64_t M, int64_t k,
                              char *xq) {
    const int64_t chunk = quant_chunk(format), per_lane = chunk / 16;
    const __m512i ones = _mm512_set1_epi8(1);
    const __m512i offset = _mm512_set1_epi32(-stored_offset(format));
    for (int64_t m = 0; m < M; m++) {
        int8_t *values = (int8_t *)(xq + m * int8_row_bytes(format, k));
        char *lanes = (char *)values + k;
        for (int64_t c = 0; c < k; c += chunk) {
            float *scales = (float *)(lanes + c / chunk * 128);
            int8_t q[MAX_CHUNK] __attribute__((aligned(64))); /* the chunk's inputs in order */
            float block_scale[MAX_CHUNK / ACT_BLOCK];
            for (int64_t b = 0; b < chunk; b += ACT_BLOCK)
                block_scale[b / ACT_BLOCK] = quantize_block(x, m * k + c + b, x_bf16, q + b);
            for (int lane = 0; lane < 16; lane++)
                scales[lane] = block_scale[lane * per_lane / ACT_BLOCK];
            __m512i sums; /* each lane's inputs summed, as the kernel's dot products pair them */
            if (nibbles(format)) { /* a chunk's even inputs, then its odd ones */
                const __m512i first = _mm512_load_si512(q), second = _mm512_load_si512(q + 64);
                const __m512i even = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm512_cvtepi16_epi8(first)),
                    _mm512_cvtepi16_epi8(second), 1);
                const __m512i odd = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm512_cvtepi16_epi8(_mm512_srai_epi16(first, 8))),
                    _mm512_cvtepi16_epi8(_mm512_srai_epi16(second, 8)), 1);
                _mm512_storeu_si512(values + c, even);
                _mm512_storeu_si512(values + c + 64, odd);
                sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones,
                                                               even), ones, odd);
            } else {
                const __m512i all = _mm512_load_si512(q);
                _mm512_storeu_si512(values + c, all);
                sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, all);
            }
            _mm512_storeu_si512(scales + 16, _mm512_mullo_epi32(offset, sums));
        }
    }
}

/* int4 weight rows of at most this many inputs (8 chunks) go four at a time against one input
 * row (int4_dots_four), longer ones one at a time. Both builds in one process, alternating
 * decode turns (benchmarks/ab_kernels.py): with the tile for every row the ~1.1B shape's steps
 * (k 1536 and more) took 20.2 ms against 17.4 with this bound (its Q4_0 file 21.4 against 18.6);
 * with no tile at all the bench shape's (k 512 to 1792) took 4.17 against 3.66 with it, and with
 * this bound it is as fast as with the tile everywhere (1.01x). K tables take the tile at every
 * width: their rows do more arithmetic a byte, which four chains hide (a [2048, 1536] Q4_K
 * linear from memory at one row: 80 us one row at a time, 70 four); so do int6's, whose
 * 6 bits are unpacked (int6_chunk): the h-1b shape's Q6_K file at batch 1 0.73x the int8
 * layout's speed one row at a time, 0.86x four (benchmarks/README.md#q6_k-in-6-bits). */
enum { FOUR_ROW_MAX_K = 1024 };

/* out[r * J + j] = x_r . w_{n+j} for R prepared rows (row_bytes apart) and J weight rows,
 * all of format, span, R and J compile-time after inlining: each weight chunk loaded serves R
 * rows, each row's activations J weight rows, in one flat loop over the chunks. One input row
 * against four weight rows is int4's batch-1 decode of short rows: four independent chains and
 * one call for four outputs (a short row, 4-8 chunks, otherwise spends a good part of its time
 * starting and reducing; a longer one reads four interleaved weight streams slower than one).
 * int8 weights at one row stay one weight row at a time: their four-row tile, four
 * interleaved streams of weight bytes, read 37 GB/s from memory where one row's stream reads 45
 * (all linears of the ~1.1B shape, benchmarks/README.md#linears-alone); int4's streams are half
 * as long, and its tile is as fast from memory and ~5% faster from cache. Each output's
 * arithmetic is the same whatever R and J. */
static inline __attribute__((always_inline)) void int8_tile(const LinearWeights *L,
                                                             const QuantTables *t,
                                                             const int format, const int span,
                                                             const char *xq, int64_t n,
                                                             const int R, const int J,
                                                             float *out) {
    const int64_t k = L->k, chunk = quant_chunk(format), chunks = k / chunk;
    const int64_t row_bytes = int8_row_bytes(format, k), wrow = quant_row_bytes(format, k);
    const int64_t per_group = span == GROUP_OF_CHUNKS ? L->group / chunk : 1; /* chunks */
    const char *w = (const char *)L->weight + n * wrow;
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512 acc[INT8_DOT_MAX_ROWS][INT8_TILE_WEIGHT_ROWS];
    __m512 sums[INT8_DOT_MAX_ROWS][INT8_TILE_WEIGHT_ROWS];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < J; j++) acc[r][j] = sums[r][j] = _mm512_setzero_ps();
    if (span == GROUPS_IN_CHUNK || span == K_GROUPS)
        for (int j = 0; j < J; j++) prefetch_scales(L, n + j);
    /* K_GROUPS: each chunk's int32 lanes times their group's sc in `vpmaddwd` (a lane's low 16
     * bits times sc: |lane| <= 8 * 15 * 127 for int4's u, 4 * 31 * 127 for Q5_K's, both int16;
     * iq4's levels reach 8 * 127 * 127, so its lanes go to float32 and take d * sc there;
     * with `vpmulld` a [1024, 768] Q4_K linear at one row took 35 us, 32 so), the sums times the
     * super-block's d; int4's nibbles multiply as stored, u (the offsets' centre 0) */
    KWalk walk[INT8_TILE_WEIGHT_ROWS];
    for (int j = 0; j < J && span == K_GROUPS; j++) walk[j] = k_walk(L, n + j);
    for (int64_t c = 0, left = per_group; c < chunks; c++) {
        __m512i low[INT8_TILE_WEIGHT_ROWS], high[INT8_TILE_WEIGHT_ROWS];
        __m512 wscale[INT8_TILE_WEIGHT_ROWS];
        __m512i wsc[INT8_TILE_WEIGHT_ROWS];
        for (int j = 0; j < J; j++) { /* a chunk's weights: bytes, or two nibble halves */
            const char *wc = w + j * wrow + c * 64;
            _mm_prefetch(wc + PREFETCH_BYTES, _MM_HINT_T1);
            const __m512i bytes = held_bits(format) ? held_chunk(format, w + j * wrow, c)
                                                    : _mm512_loadu_si512(wc);
            low[j] = nibbles(format) ? _mm512_and_si512(bytes, nibble) : bytes;
            high[j] = nibbles(format)
                ? _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble) : bytes;
            if (format == FORMAT_IQ4) { /* levels + 128, as int8's bytes */
                low[j] = _mm512_shuffle_epi8(t->code_bytes, low[j]);
                high[j] = _mm512_shuffle_epi8(t->code_bytes, high[j]);
            }
            if (span == GROUPS_IN_CHUNK) wscale[j] = chunk_scales(L, t, n + j, c);
            if (span == GROUP_IS_CHUNK) wscale[j] = _mm512_set1_ps(quant_scale(L, n + j, c));
            if (span == K_GROUPS) wsc[j] = k_chunk_sc(&walk[j], format, c);
            if (span == K_GROUPS && format == FORMAT_IQ4) /* d * sc: levels reach 127 */
                wscale[j] = _mm512_mul_ps(k_sc_floats(&walk[j], wsc[j]), walk[j].d);
        }
        for (int r = 0; r < R; r++) {
            const char *row = xq + r * row_bytes, *lanes = row + k + c * 128;
            const __m512i x_low = _mm512_loadu_si512(row + c * chunk);
            const __m512i x_high = nibbles(format)
                ? _mm512_loadu_si512(row + c * chunk + 64) : x_low;
            const __m512i start = span == K_GROUPS && format == FORMAT_INT4
                ? _mm512_setzero_si512() : _mm512_loadu_si512(lanes + 64);
            const __m512 x_scale = _mm512_loadu_ps((const float *)lanes);
            for (int j = 0; j < J; j++) {
                __m512i dot = _mm512_dpbusd_epi32(start, low[j], x_low);
                if (nibbles(format)) dot = _mm512_dpbusd_epi32(dot, high[j], x_high);
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
        for (int j = 0; j < J; j++) out[r * J + j] = _mm512_reduce_add_ps(acc[r][j]);
}

#define INT8_SPANS(F, R, J)                                                           \
    switch (two_level(L->scale_kind) ? K_GROUPS : group_span(L, t)) {                 \
    case K_GROUPS: int8_tile(L, t, F, K_GROUPS, xq, n, R, J, out); break;             \
    case GROUPS_IN_CHUNK: int8_tile(L, t, F, GROUPS_IN_CHUNK, xq, n, R, J, out); break; \
    case GROUP_IS_CHUNK: int8_tile(L, t, F, GROUP_IS_CHUNK, xq, n, R, J, out); break;   \
    default: int8_tile(L, t, F, GROUP_OF_CHUNKS, xq, n, R, J, out); break;              \
    }

/* One body per span and format: four int4, iq4, int6 or int5 weight rows against one prepared
 * row. */
__attribute__((noinline)) static void int4_dots_four(const LinearWeights *L, const QuantTables *t,
                                                     const char *xq, int64_t n, float *out) {
    if (L->format == FORMAT_IQ4) {
        INT8_SPANS(FORMAT_IQ4, 1, INT8_TILE_WEIGHT_ROWS)
    } else if (L->format == FORMAT_INT6) {
        INT8_SPANS(FORMAT_INT6, 1, INT8_TILE_WEIGHT_ROWS)
    } else if (L->format == FORMAT_INT5) {
        INT8_SPANS(FORMAT_INT5, 1, INT8_TILE_WEIGHT_ROWS)
    } else {
        INT8_SPANS(FORMAT_INT4, 1, INT8_TILE_WEIGHT_ROWS)
    }
}

/* Bodies of 1 to R_MAX (2 or 3) rows of format F (both compile-time: no 3-row body where
 * R_MAX is 2). */
#define INT8_ROWS(F, R_MAX)                                                           \
    if (R == 1) {                                                                     \
        INT8_SPANS(F, 1, 1)                                                           \
    } else if (R == 2 || R_MAX == 2) {                                                \
        INT8_SPANS(F, 2, 1)                                                           \
    } else {                                                                          \
        INT8_SPANS(F, 3, 1)                                                           \
    }

/* One unrolled body per format, span and row count (int8, int6, int5: 1 or 2; int4, iq4: 1 to
 * 3). */
__attribute__((noinline)) static void int8_dots(const LinearWeights *L, const QuantTables *t,
                                                const char *xq, int64_t n, int R, float *out) {
    switch (L->format) {
    case FORMAT_INT8: INT8_ROWS(FORMAT_INT8, 2) break;
    case FORMAT_INT6: INT8_ROWS(FORMAT_INT6, 2) break;
    case FORMAT_INT5: INT8_ROWS(FORMAT_INT5, 2) break;
    case FORMAT_IQ4: INT8_ROWS(FORMAT_IQ4, 3) break;
    default: INT8_ROWS(FORMAT_INT4, 3) break;
    }
}
#undef INT8_ROWS
#undef INT8_SPANS
#endif
#endif
