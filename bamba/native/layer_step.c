/* One decode token through a whole decoder layer, for a few rows, in one OpenMP region.
 *
 * At batch 1-8 a decode step is a string of small operations: a Mamba layer is ~20 torch ops,
 * each paying dispatch and thread start-up, around 5 linear layers that stream their weights.
 * Here the layer runs as stages separated by barriers inside one parallel region:
 *
 *   Mamba layer (bamba_mamba_layer_step), per row m of x [M, hidden]:
 *     h = rmsnorm(x) * input_norm;  zxbcdt = in_proj(h) = [z | xBC | dt]
 *     xBC = silu(conv1d over (conv state, xBC));  the conv state shifts by one
 *     dt = clamp(softplus(dt + dt_bias));  S = exp(dt A) S + dt x B^T;  y = S C + D x
 *     y = grouped_rmsnorm(y * silu(z)) * norm;  x = x + out_proj(y)
 *   then the feed-forward block:
 *     h = rmsnorm(x) * pre_ff_norm;  x = x + down(silu(gate(h)) * up(h))
 *   (each sublayer output times residual_scale before its sum where a model asks: Granite)
 *   and, with experts (Granite's MoE), their mixture added to the MLP's output before the sum:
 *     w, e = softmax over the top k of router(h);  moe = sum over e, in expert order, of
 *     w_e * down_e(silu(gate_e(h)) * up_e(h)), gate_e and up_e the halves of one [2F, D] weight
 *   An attention layer runs in two calls around the attention itself (rope, KV cache and
 *   softmax stay in torch, whatever the cache layout):
 *     bamba_attention_in_step:  qkv = [q | k | v](rmsnorm(x) * input_norm)
 *     bamba_attention_out_step: x = x + o_proj(attn), then the feed-forward block
 *   bamba_decode_layers runs every layer of a model in one call, attention layers with rope,
 *   the cache write and attention_head.h's attention in between (caches addressed by token
 *   rows, so a contiguous cache and paged blocks alike).
 *
 * Values are rounded to the model dtype where the torch modules round them (each linear
 * output, each norm output, each residual sum), so a bf16 model gives what its torch path
 * gives up to the order of float32 sums. The small tensors (norm weights, conv, dt_bias, A_log,
 * D) may be float32 in a bf16 layer (checkpoints keep A_log, D and dt_bias so). States: conv
 * pool rows [K-1, conv_dim] and SSM pool rows [H, P, N], float32 or bf16 each, selected by
 * `rows` (the SSM update is ssd_head.h's). Weights are bf16 or float32 (all of one dtype,
 * the model's), contiguous, or quantized (fp8, int8, int4 with their scales: quant_rows.h),
 * each linear in its own format.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention_head.h"
#include "dot_rows.h"
#include "ssd_head.h"
#include "vmath.h"

/* The tensors of one layer, in the order the Python side passes them (absent = NULL). */
enum {
    IN_NORM, IN_PROJ, IN_PROJ_BIAS, IN_PROJ_SCALES, CONV_W, CONV_B, DT_BIAS, A_LOG, D_SKIP,
    GATE_NORM, OUT_PROJ, OUT_PROJ_BIAS, OUT_PROJ_SCALES, FF_NORM, GATE, GATE_BIAS, GATE_SCALES,
    UP, UP_BIAS, UP_SCALES, DOWN, DOWN_BIAS, DOWN_SCALES,
    ROUTER, EXPERTS_GATE_UP, EXPERTS_GATE_UP_SCALES, EXPERTS_DOWN, EXPERTS_DOWN_SCALES,
    /* a mixture of experts beside the MLP, or NULL; its weights dense, or quantized as one
       [experts * rows] weight with scales (formats in EXPERT_FORMATS) */
    /* (the above: a Mamba layer) */
    Q, Q_BIAS, Q_SCALES, K_PROJ, K_BIAS, K_SCALES, V_PROJ, V_BIAS, V_SCALES, O_PROJ, O_BIAS,
    O_SCALES, /* an attention layer's */
    N_TENSORS
};
/* A linear's field in a layer's `formats` word: the MLP's three, then a Mamba layer's two or
 * an attention layer's four (a layer has one or the other). */
static int linear_slot(int which) {
    switch (which) {
    case GATE: return 0;
    case UP: return 1;
    case DOWN: return 2;
    case IN_PROJ: case Q: return 3;
    case OUT_PROJ: case K_PROJ: return 4;
    case V_PROJ: return 5;
    default: return 6; /* O_PROJ */
    }
}
enum { FORMAT_BITS = 9 }; /* 7 linears a 64-bit word */
/* Its sizes (an attention layer: HEADS query heads, GROUPS KV heads of HEAD_DIM, mixer 0s). */
enum { HIDDEN, D_INNER, CONV_DIM, CONV_K, HEADS, HEAD_DIM, GROUPS, D_STATE, FFN,
       EXPERTS, TOP_K, EXPERT_FFN, EXPERT_FORMATS, /* 0 without experts; EXPERT_FORMATS: the
                                                     gate-up and down weights' codes (as a
                                                     formats field), 9 bits each, 0 dense */
       N_DIMS };

typedef struct {
    const void *const *t; /* N_TENSORS pointers */
    const int64_t *d;     /* N_DIMS sizes */
    int bf16;             /* weights and activations (x) in bf16, else float32 */
    int64_t f32_mask;     /* bit i: tensor i is float32 in a bf16 layer (norms, conv, A_log...) */
    int64_t formats;      /* FORMAT_BITS per linear (linear_slot order): format | scale dtype
                             (SCALE_*) << 3 | scale kind << 6 (0: one scale, 1: per row, g > 1:
                             groups of 8 << (g - 1) inputs: 16 to 512) */
    int64_t expert_formats; /* the experts' gate-up | down codes << FORMAT_BITS (as formats
                               fields; 0 dense): dims' EXPERT_FORMATS, or the layer's own in a
                               whole-model step (layers of one shape may differ in formats) */
    float eps, dt_min, dt_max;
    float residual_scale; /* each sublayer's output times this before the residual sum (Granite's
                             residual_multiplier; 1: added as it is) */
} Layer;

/* A linear [n, k] of `weight`, `bias` and `scales` in the layout a formats field
 * `code` names: format | scale dtype << 3 | scale kind << 6 (0: one scale, 1: per row,
 * g > 1: groups of 8 << (g - 1) inputs, 16 to 512: GGUF's Q6_K has 16). */
static LinearWeights coded_weights(int64_t code, const void *weight, const void *bias,
                                   const void *scales, int64_t n, int64_t k) {
    const int64_t kind = code >> 6, group = kind < 2 ? k : (int64_t)8 << (kind - 1);
    const int scale_kind = (int)((code >> 3) & 7);
    const int64_t per_row = kind == 0 ? 0 : group_scale_stride(scale_kind, k, group);
    const LinearWeights w = {weight, bias, n, k, (int)(code & 7), scales, scale_kind, group,
                             per_row};
    return w;
}

/* The linear layer whose weight is tensor `which` (bias and scales follow it), [n, k]. */
static LinearWeights linear_of(const Layer *L, int which, int64_t n, int64_t k) {
    const int64_t code =
        (L->formats >> (FORMAT_BITS * linear_slot(which))) & ((1 << FORMAT_BITS) - 1);
    return coded_weights(code, L->t[which], L->t[which + 1], L->t[which + 2], n, k);
}

/* Element i of one of the layer's small tensors (norm weights, conv, dt_bias, A_log, D). */
static inline float param(const Layer *L, int which, int64_t i) {
    return load_value(L->t[which], i, L->bf16 && !((L->f32_mask >> which) & 1));
}

enum { SILU_PIECE = 256 }; /* elements per work item of the vector silu passes */
static inline float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }
static inline float round_to(float v, int bf16) {
    return bf16 ? bf16_to_float(float_to_bf16(v)) : v;
}

/* mean(v^2) over n values, summed in float64 (16 squares an iteration where AVX-512 is). */
static float mean_square(const float *v, int64_t n) {
    double acc = 0.0;
    int64_t i = 0;
#ifdef HAVE_AVX512
    __m512d low = _mm512_setzero_pd(), high = _mm512_setzero_pd();
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(v + i);
        const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
        const __m512d b = _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1));
        low = _mm512_fmadd_pd(a, a, low);
        high = _mm512_fmadd_pd(b, b, high);
    }
    acc = _mm512_reduce_add_pd(_mm512_add_pd(low, high));
#endif
    for (; i < n; i++) acc += (double)v[i] * v[i];
    return (float)(acc / n);
}

/* out[i] = w[w0 + i] * r(x[i] * scale) for i < n, stored in the layer dtype, where w is the
 * small tensor `weight` and r rounds to the layer dtype when `round_first` (rms_norm's
 * normalised x), else nothing (the gated norm's). Sixteen at a time where AVX-512 BF16 is. */
static void scaled_by_weight(const Layer *L, const float *x, float scale, int weight,
                             int64_t w0, int round_first, void *out, int64_t n) {
    int64_t i = 0;
#ifdef HAVE_BF16_DOT
    const int w_bf16 = L->bf16 && !((L->f32_mask >> weight) & 1);
    const __m512 factor = _mm512_set1_ps(scale);
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), factor);
        if (round_first && L->bf16)
            v = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
        v = _mm512_mul_ps(v, vload(L->t[weight], w_bf16, w0 + i));
        if (L->bf16)
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), (__m256i)_mm512_cvtneps_pbh(v));
        else
            _mm512_storeu_ps((float *)out + i, v);
    }
#endif
    for (; i < n; i++) {
        const float v = x[i] * scale;
        store_value(out, i, (round_first ? round_to(v, L->bf16) : v) * param(L, weight, w0 + i),
                    L->bf16);
    }
}

/* out = weight * round(x * rsqrt(mean(x^2) + eps)) for one row x of n values, stored in the
 * layer dtype (as rms_norm). */
static void rms_norm_row(const Layer *L, const float *x, int weight, void *out, int64_t n) {
    scaled_by_weight(L, x, 1.0f / sqrtf(mean_square(x, n) + L->eps), weight, 0, 1, out, n);
}

/* Linear layers on one input x [M, k], outputs side by side in y [M, sum of n] (layer dtype
 * when y_bf16 matches it, else float32 rounded like the layer dtype), all their features split
 * between the threads in one share each. No barrier. */
static void linears_shared(const Layer *L, const LinearWeights *ws, int count, const void *x,
                           int64_t M, void *y, int y_bf16) {
    int64_t total = 0, begin, end, offset = 0;
    for (int i = 0; i < count; i++) total += ws[i].n;
    my_share(total, &begin, &end);
    for (int i = 0; i < count; offset += ws[i].n, i++) {
        const int64_t lo = begin > offset ? begin : offset;
        const int64_t hi = end < offset + ws[i].n ? end : offset + ws[i].n;
        if (lo < hi)
            linear_features(&ws[i], L->bf16, x, M, (char *)y + offset * (y_bf16 ? 2 : 4), total,
                            y_bf16, L->bf16, lo - offset, hi - offset);
    }
}

static void linear_shared(const Layer *L, const LinearWeights *W, const void *x, int64_t M,
                          float *y) {
    linears_shared(L, W, 1, x, M, y, 0);
}

/* Inside a layer's parallel region every thread norms whole rows into a buffer of its own and
 * feeds its share of the next linear layer from there: a norm costs no barrier, and no thread
 * idles while another norms a decode's one row (one barrier ~0.4 us here; the norms and their
 * barriers took ~12% of an int4 decode step). The residual stream goes between two buffers,
 * each thread writing its share of the sum while all read the last one whole. */
typedef struct { /* per-call buffers, float32 unless noted */
    float *resid[2]; /* [M, hidden] each: the residual stream, before and after a sublayer */
    void *normed;    /* [M, ffn] layer dtype: the down projection's input */
    char *own;       /* per thread [M, max(hidden, d_inner)] layer dtype, then [hidden] float32:
                        its normed rows, and a row of the residual stream */
    int64_t own_bytes;
    float *proj;     /* [M, in_proj width] */
    float *y;        /* [M, d_inner] */
    float *gate_up;  /* [M, 2 ffn] */
    float *taps;     /* [conv_k + 1, conv_dim]: conv weights tap-major, then the bias (or 0) */
    int64_t *runs;   /* [n_runs + 1]: first row of each run of rows on one state slot, then M */
    int64_t n_runs;
    /* experts, P = M * top_k picks (NULL without); the picks' rows below go by expert, then
     * row (each group of rows on one expert streams its weights once): */
    float *router;   /* [M, experts] router logits */
    int64_t *pick;   /* [P] each row's experts, ascending */
    float *pick_w;   /* [P] their weights */
    int64_t *order;  /* [P] the pick at each place of the grouped order */
    int64_t *place;  /* [P] each pick's place in it */
    int64_t *first;  /* [groups + 1] each expert group's first place, then P */
    int64_t n_groups;
    char *gathered;  /* per thread [P, hidden] layer dtype: the picks' normed rows, grouped */
    int64_t gathered_bytes;
    float *egu;      /* [P, 2 expert_ffn] each pick's gate and up */
    void *eact;      /* [P, expert_ffn] layer dtype: silu(gate) * up */
    float *ey;       /* [P, hidden] each pick's down projection */
    float *moe;      /* [M, hidden] the mixture */
} Scratch;

/* The runs of rows on one state slot (``Scratch.runs``); -1 when a slot's rows are apart. */
static int64_t slot_runs(const int64_t *rows, int64_t M, int64_t *runs) {
    int64_t n = 0;
    for (int64_t m = 0; m < M; m++) {
        if (m > 0 && rows[m] == rows[m - 1]) continue;
        for (int64_t j = 0; j < n; j++)
            if (rows[runs[j]] == rows[m]) return -1;
        runs[n++] = m;
    }
    runs[n] = M;
    return n;
}

/* This thread's own buffer of normed rows, and its float32 row. */
static void *own_rows(const Scratch *s) { return s->own + omp_get_thread_num() * s->own_bytes; }
static float *own_row(const Layer *L, const Scratch *s, int64_t M) {
    const int64_t D = L->d[HIDDEN], Din = L->d[D_INNER];
    return (float *)((char *)own_rows(s) + M * (D > Din ? D : Din) * (L->bf16 ? 2 : 4));
}

/* The M rows of x [M, hidden] normed by `weight`, whole, into this thread's own buffer. */
static void *norm_own(const Layer *L, const float *x, int weight, int64_t M, const Scratch *s) {
    const int64_t D = L->d[HIDDEN], size = L->bf16 ? 2 : 4;
    char *out = own_rows(s);
    for (int64_t m = 0; m < M; m++) rms_norm_row(L, x + m * D, weight, out + m * D * size, D);
    return out;
}

/* A sublayer's output `add` [M, hidden] onto the residual stream: to = round(from + add), `add`
 * first rounded times L->residual_scale when that is not 1 (as torch's two ops round), this
 * thread's share of it stored, then (weight >= 0) the next sublayer's input norm of the whole
 * rows into this thread's own buffer, which it returns (each thread sums every row). */
static void *residual(const Layer *L, int64_t M, const Scratch *s, const float *from,
                      float *to, int weight) {
    const int64_t D = L->d[HIDDEN], size = L->bf16 ? 2 : 4;
    const float *add = s->proj, r = L->residual_scale;
    int64_t begin, end;
    my_share(D, &begin, &end);
    char *out = own_rows(s);
    float *row = own_row(L, s, M);
    for (int64_t m = 0; m < M; m++) {
        const int64_t lo = weight >= 0 ? 0 : begin, hi = weight >= 0 ? D : end;
        for (int64_t i = lo; i < hi; i++)
            row[i] = round_to(from[m * D + i] + (r == 1.0f ? add[m * D + i]
                                                 : round_to(add[m * D + i] * r, L->bf16)), L->bf16);
        memcpy(to + m * D + begin, row + begin, (end - begin) * sizeof(float));
        if (weight >= 0) rms_norm_row(L, row, weight, out + m * D * size, D);
    }
    return out;
}

/* Linear layers of n features each, layer i on rows [first[i], first[i + 1]) of the grouped
 * inputs x [rows, k] (layer dtype), into the same rows of float32 y [rows, n] (rounded like
 * the layer dtype); all their features split between the threads. No barrier. */
static void linears_grouped(const Layer *L, const LinearWeights *ws, const int64_t *first,
                            int64_t count, const char *x, float *y) {
    const int64_t n = ws[0].n, k = ws[0].k, size = L->bf16 ? 2 : 4;
    int64_t begin, end;
    my_share(count * n, &begin, &end);
    for (int64_t i = 0; i < count; i++) {
        const int64_t lo = begin > i * n ? begin : i * n;
        const int64_t hi = end < (i + 1) * n ? end : (i + 1) * n;
        if (lo < hi)
            linear_features(&ws[i], L->bf16, x + first[i] * k * size, first[i + 1] - first[i],
                            y + first[i] * n, n, 0, L->bf16, lo - i * n, hi - i * n);
    }
}

/* out [rows, F] (layer dtype) = silu(gate) * up of gate_up [rows, 2F] (its gates silu'd in
 * place), rounded like the torch ops; a worksharing loop of the parallel region (its implicit
 * barrier ends it). */
static void swiglu_rows(const Layer *L, float *gate_up, int64_t rows, int64_t F, void *out) {
    const int64_t pieces = (F + SILU_PIECE - 1) / SILU_PIECE;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows * pieces; i++) {
        const int64_t m = i / pieces, f0 = (i % pieces) * SILU_PIECE;
        const int64_t n = F - f0 < SILU_PIECE ? F - f0 : SILU_PIECE;
        float *gate = gate_up + m * 2 * F + f0;
        silu_vec(gate, gate, n);
        for (int64_t f = 0; f < n; f++)
            store_value(out, m * F + f0 + f, round_to(gate[f], L->bf16) * gate[F + f], L->bf16);
    }
}

/* Expert e's [n, k] slice of the stacked weight `which` (its scales the next tensor), dense
 * in the layer dtype or quantized as `code` says. */
static LinearWeights expert_weights(const Layer *L, int which, int64_t code, int64_t e,
                                    int64_t n, int64_t k) {
    if (code == 0)
        return coded_weights(FORMAT_DENSE, (const char *)L->t[which] + e * n * k *
                             (L->bf16 ? 2 : 4), NULL, NULL, n, k);
    const LinearWeights all = coded_weights(code, L->t[which], NULL, L->t[which + 1], n, k);
    return coded_weights(code, (const char *)all.weight + e * n * quant_row_bytes(all.format, k),
                         NULL, (const char *)all.scales +
                                   e * n * all.scale_stride * scale_bytes(all.scale_kind),
                         n, k);
}

/* Each row's top-k experts by router logit (float32 of the layer dtype's logits), weighted by
 * the float32 softmax of those logits rounded to the layer dtype; stored ascending by expert,
 * the order the mixture is summed in. One thread. */
static void pick_experts(const Layer *L, int64_t M, Scratch *s) {
    const int64_t E = L->d[EXPERTS], K = L->d[TOP_K];
    char taken[E];
    for (int64_t m = 0; m < M; m++) {
        const float *logits = s->router + m * E;
        int64_t *pick = s->pick + m * K;
        float *w = s->pick_w + m * K;
        memset(taken, 0, (size_t)E);
        for (int64_t j = 0; j < K; j++) { /* the j-th largest, the lower index on a tie */
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (!taken[e] && (best < 0 || logits[e] > logits[best])) best = e;
            taken[best] = 1;
            pick[j] = best;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < K; j++) sum += (w[j] = expf(logits[pick[j]] - logits[pick[0]]));
        for (int64_t j = 0; j < K; j++) w[j] = round_to(w[j] / sum, L->bf16);
        for (int64_t j = 1; j < K; j++) /* ascending by expert: insertion sort of k */
            for (int64_t i = j; i > 0 && pick[i - 1] > pick[i]; i--) {
                const int64_t e = pick[i]; pick[i] = pick[i - 1]; pick[i - 1] = e;
                const float v = w[i]; w[i] = w[i - 1]; w[i - 1] = v;
            }
    }
    const int64_t P = M * K; /* the grouped order: by expert, then row (a counting sort) */
    int64_t count[E];
    memset(count, 0, sizeof(count));
    for (int64_t j = 0; j < P; j++) count[s->pick[j]]++;
    s->n_groups = 0;
    for (int64_t e = 0, at = 0; e < E; e++) {
        const int64_t rows = count[e];
        if (rows) s->first[s->n_groups++] = at;
        count[e] = at; /* now the next free place of expert e */
        at += rows;
    }
    s->first[s->n_groups] = P;
    for (int64_t j = 0; j < P; j++) {
        s->place[j] = count[s->pick[j]]++;
        s->order[s->place[j]] = j;
    }
}

/* The mixture of experts for M rows of this thread's normed rows `h`, into s->moe (this
 * thread's share of the hidden features; each expert streamed once for the rows it serves),
 * rounded as transformers' GraniteMoeHybridMoE rounds it (each expert's weighted output, then
 * each sum). Inside a parallel region; its last barrier is before the sums. */
static void experts_stage(const Layer *L, int64_t M, Scratch *s, const void *h) {
    const int64_t D = L->d[HIDDEN], E = L->d[EXPERTS], K = L->d[TOP_K], Fe = L->d[EXPERT_FFN];
    const int64_t size = L->bf16 ? 2 : 4, P = M * K;
    const int64_t codes = L->expert_formats, mask = (1 << FORMAT_BITS) - 1;
    const LinearWeights router = coded_weights(FORMAT_DENSE, L->t[ROUTER], NULL, NULL, E, D);
    linear_shared(L, &router, h, M, s->router);
#pragma omp barrier
#pragma omp single
    pick_experts(L, M, s);
    const int64_t G = s->n_groups;
    char *x = s->gathered + omp_get_thread_num() * s->gathered_bytes;
    for (int64_t q = 0; q < P; q++) /* this thread's copy of the picks' rows, grouped */
        memcpy(x + q * D * size, (const char *)h + (s->order[q] / K) * D * size, D * size);
    LinearWeights ws[G];
    for (int64_t g = 0; g < G; g++)
        ws[g] = expert_weights(L, EXPERTS_GATE_UP, codes & mask, s->pick[s->order[s->first[g]]],
                               2 * Fe, D);
    linears_grouped(L, ws, s->first, G, x, s->egu);
#pragma omp barrier
    swiglu_rows(L, s->egu, P, Fe, s->eact);
    for (int64_t g = 0; g < G; g++)
        ws[g] = expert_weights(L, EXPERTS_DOWN, codes >> FORMAT_BITS & mask,
                               s->pick[s->order[s->first[g]]], D, Fe);
    linears_grouped(L, ws, s->first, G, s->eact, s->ey);
#pragma omp barrier
    int64_t begin, end;
    my_share(D, &begin, &end);
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = begin; i < end; i++) {
            float sum = 0.0f;
            for (int64_t j = m * K; j < (m + 1) * K; j++)
                sum = round_to(sum + round_to(s->ey[s->place[j] * D + i] * s->pick_w[j],
                                              L->bf16), L->bf16);
            s->moe[m * D + i] = sum;
        }
}

/* The feed-forward half, inside a parallel region, from this thread's normed rows `h`: the
 * residual stream from s->resid[1] into s->resid[0]. */
static void ffn_stage(const Layer *L, int64_t M, Scratch *s, const void *h) {
    const int64_t D = L->d[HIDDEN], F = L->d[FFN];
    if (L->d[EXPERTS]) experts_stage(L, M, s, h);
    const LinearWeights gate_up[2] = {linear_of(L, GATE, F, D), linear_of(L, UP, F, D)};
    linears_shared(L, gate_up, 2, h, M, s->gate_up, 0);
#pragma omp barrier
    swiglu_rows(L, s->gate_up, M, F, s->normed);
    const LinearWeights down = linear_of(L, DOWN, D, F);
    linear_shared(L, &down, s->normed, M, s->proj);
#pragma omp barrier
    if (L->d[EXPERTS]) { /* the mixture plus the MLP, this thread's share (as experts_stage's) */
        int64_t begin, end;
        my_share(D, &begin, &end);
        for (int64_t m = 0; m < M; m++)
            for (int64_t i = begin; i < end; i++)
                s->proj[m * D + i] = round_to(s->moe[m * D + i] + s->proj[m * D + i], L->bf16);
    }
    residual(L, M, s, s->resid[1], s->resid[0], -1);
}

/* The conv weights [C, K] as float32 taps [K, C] (contiguous per tap), then the bias [C]:
 * this thread's share of the channels, inside a parallel region. */
static void conv_taps(const Layer *L, float *taps) {
    const int64_t K = L->d[CONV_K], C = L->d[CONV_DIM];
    int64_t begin, end;
    my_share(C, &begin, &end);
    for (int64_t c = begin; c < end; c++) {
        for (int64_t k = 0; k < K; k++) taps[k * C + c] = param(L, CONV_W, c * K + k);
        taps[K * C + c] = L->t[CONV_B] ? param(L, CONV_B, c) : 0.0f;
    }
}

/* The conv step (before silu) for channels [c0, c0 + n) of row m, in place in xbc (the row's
 * [conv_dim] inputs); shifts that row's conv state by one token. */
static void conv_piece(const Layer *L, const float *taps, int64_t m, int64_t c0, int64_t n,
                       void *conv_pool, int conv_bf16, const int64_t *rows, float *xbc) {
    const int64_t K = L->d[CONV_K], C = L->d[CONV_DIM], size = conv_bf16 ? 2 : 4;
    char *state = (char *)conv_pool + (rows[m] * (K - 1) * C + c0) * size; /* tap 0 */
    float acc[SILU_PIECE];
    for (int64_t c = 0; c < n; c++) /* bias, then the current input's tap */
        acc[c] = taps[K * C + c0 + c] + xbc[c0 + c] * taps[(K - 1) * C + c0 + c];
    for (int64_t k = 0; k < K - 1; k++) {
        const float *w = taps + k * C + c0;
        const char *row = state + k * C * size;
        if (conv_bf16) {
            for (int64_t c = 0; c < n; c++)
                acc[c] += bf16_to_float(((const uint16_t *)row)[c]) * w[c];
        } else {
            for (int64_t c = 0; c < n; c++) acc[c] += ((const float *)row)[c] * w[c];
        }
    }
    for (int64_t k = 0; k + 1 < K - 1; k++)
        memcpy(state + k * C * size, state + (k + 1) * C * size, n * size);
    if (K > 1)
        for (int64_t c = 0; c < n; c++)
            store_value(state + (K - 2) * C * size, c, xbc[c0 + c], conv_bf16);
    for (int64_t c = 0; c < n; c++) xbc[c0 + c] = acc[c];
}

/* Copy a run's state from slot `from` into its own slot `to` just before its first row reads
 * it (a pass that must leave the sequence's state where it was), a work item's part at a time:
 * conv channels c0..c0+n-1 of every tap (conv_copy), SSM head h (ssm_copy). The copy rides
 * the row's own read of the state, in the thread that then updates it. */
static void conv_copy(const Layer *L, int64_t c0, int64_t n, void *conv_pool, int conv_bf16,
                      int64_t from, int64_t to) {
    const int64_t K = L->d[CONV_K], C = L->d[CONV_DIM], size = conv_bf16 ? 2 : 4;
    for (int64_t k = 0; k < K - 1; k++)
        memcpy((char *)conv_pool + ((to * (K - 1) + k) * C + c0) * size,
               (const char *)conv_pool + ((from * (K - 1) + k) * C + c0) * size, n * size);
}

static void ssm_copy(const Layer *L, int64_t h, void *ssm_pool, int ssm_bf16, int64_t from,
                     int64_t to) {
    const int64_t H = L->d[HEADS], PN = L->d[HEAD_DIM] * L->d[D_STATE], size = ssm_bf16 ? 2 : 4;
    memcpy((char *)ssm_pool + (to * H + h) * PN * size,
           (const char *)ssm_pool + (from * H + h) * PN * size, PN * size);
}

/* SSM step for head h of row m: updates the state, writes y = S C + D x gated by silu(z). */
static void ssm_head(const Layer *L, int64_t m, int64_t h, void *ssm_pool, int ssm_bf16,
                     const int64_t *rows, const float *zx, float *y) {
    const int64_t Din = L->d[D_INNER], H = L->d[HEADS], P = L->d[HEAD_DIM], N = L->d[D_STATE],
                  G = L->d[GROUPS], g = h / (H / G), conv_dim = L->d[CONV_DIM];
    const float *z = zx, *xbc = zx + Din, *x = xbc + h * P, *B = xbc + Din + g * N,
                *Cv = xbc + Din + G * N + g * N;
    float dt = softplus(xbc[conv_dim + h] + param(L, DT_BIAS, h));
    dt = fminf(fmaxf(dt, L->dt_min), L->dt_max);
    const float decay = expf(-dt * expf(param(L, A_LOG, h)));
    const float D = param(L, D_SKIP, h);
    const int64_t state = (rows[m] * H + h) * P * N;
    float *yh = y + h * P;
    if (ssm_bf16)
        head_bf16((uint16_t *)ssm_pool + state, P, N, decay, dt, x, B, Cv, yh);
    else
        head_f32((float *)ssm_pool + state, P, N, decay, dt, x, B, Cv, yh);
    for (int64_t p0 = 0; p0 < P; p0 += 64) { /* D skip, then the silu(z) gate */
        const int64_t n = P - p0 < 64 ? P - p0 : 64;
        float gate[64];
        silu_vec(z + h * P + p0, gate, n);
        for (int64_t p = 0; p < n; p++) yh[p0 + p] = (yh[p0 + p] + D * x[p0 + p]) * gate[p];
    }
}

/* The mixer half, inside a parallel region: the residual stream from s->resid[0] into
 * s->resid[1]; returns this thread's rows of it normed for the feed-forward half. Rows on one state
 * slot (a run) are one sequence's successive tokens: the conv and SSM steps take a run's rows
 * in order, the state staying in cache between them; work items go piece- and head-major so
 * that each thread gets a share of every run. */
static void *mixer_stage(const Layer *L, int64_t M, Scratch *s, void *conv_pool, int conv_bf16,
                         void *ssm_pool, int ssm_bf16, const int64_t *rows,
                         const int64_t *sources) {
    const int64_t D = L->d[HIDDEN], Din = L->d[D_INNER], C = L->d[CONV_DIM], H = L->d[HEADS],
                  G = L->d[GROUPS], width = Din + C + H;
    const int64_t n_runs = s->n_runs, *runs = s->runs;
    conv_taps(L, s->taps); /* read by the conv, after in_proj's barrier */
    const LinearWeights in_proj = linear_of(L, IN_PROJ, width, D);
    linear_shared(L, &in_proj, norm_own(L, s->resid[0], IN_NORM, M, s), M, s->proj);
#pragma omp barrier
    const int64_t pieces = (C + SILU_PIECE - 1) / SILU_PIECE;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n_runs * pieces; i++) { /* conv, then silu, a piece of a run each */
        const int64_t r = i % n_runs, c0 = (i / n_runs) * SILU_PIECE;
        const int64_t n = C - c0 < SILU_PIECE ? C - c0 : SILU_PIECE, first = runs[r];
        if (sources != NULL && sources[first] != rows[first])
            conv_copy(L, c0, n, conv_pool, conv_bf16, sources[first], rows[first]);
        for (int64_t m = runs[r]; m < runs[r + 1]; m++) {
            float *xbc = s->proj + m * width + Din;
            conv_piece(L, s->taps, m, c0, n, conv_pool, conv_bf16, rows, xbc);
            silu_vec(xbc + c0, xbc + c0, n);
        }
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n_runs * H; i++) {
        const int64_t r = i % n_runs, h = i / n_runs, first = runs[r];
        if (sources != NULL && sources[first] != rows[first])
            ssm_copy(L, h, ssm_pool, ssm_bf16, sources[first], rows[first]);
        for (int64_t m = runs[r]; m < runs[r + 1]; m++)
            ssm_head(L, m, h, ssm_pool, ssm_bf16, rows, s->proj + m * width, s->y + m * Din);
    }
    const int64_t group = Din / G;
    void *y = own_rows(s);
    for (int64_t i = 0; i < M * G; i++) { /* grouped RMS norm, then the norm weight, whole */
        const int64_t m = i / G, g = i % G;
        const float *v = s->y + m * Din + g * group;
        const float scale = 1.0f / sqrtf(mean_square(v, group) + L->eps);
        scaled_by_weight(L, v, scale, GATE_NORM, g * group, 0,
                         (char *)y + (m * Din + g * group) * (L->bf16 ? 2 : 4), group);
    }
    const LinearWeights out_proj = linear_of(L, OUT_PROJ, D, Din);
    linear_shared(L, &out_proj, y, M, s->proj);
#pragma omp barrier
    return residual(L, M, s, s->resid[0], s->resid[1], FF_NORM);
}

/* The residual stream plus an attention layer's output projection, inside a parallel region:
 * s->resid[1] = s->resid[0] + o_proj(attn), attn [M, HEADS * HEAD_DIM] in the layer dtype;
 * returns this thread's rows of it normed for the feed-forward half. */
static void *attention_out_stage(const Layer *L, int64_t M, Scratch *s, const void *attn) {
    const int64_t D = L->d[HIDDEN];
    const LinearWeights o = linear_of(L, O_PROJ, D, L->d[HEADS] * L->d[HEAD_DIM]);
    linear_shared(L, &o, attn, M, s->proj);
#pragma omp barrier
    return residual(L, M, s, s->resid[0], s->resid[1], FF_NORM);
}

/* rmsnorm(x) then the q, k and v projections, into qkv [M, (HEADS + 2 GROUPS) HEAD_DIM]. */
static void attention_in_stage(const Layer *L, int64_t M, Scratch *s, void *qkv) {
    const int64_t D = L->d[HIDDEN], Dh = L->d[HEAD_DIM];
    const LinearWeights qkv_w[3] = {linear_of(L, Q, L->d[HEADS] * Dh, D),
                                    linear_of(L, K_PROJ, L->d[GROUPS] * Dh, D),
                                    linear_of(L, V_PROJ, L->d[GROUPS] * Dh, D)};
    linears_shared(L, qkv_w, 3, norm_own(L, s->resid[0], IN_NORM, M, s), M, qkv, L->bf16);
}

typedef enum { MAMBA_LAYER, ATTENTION_IN, ATTENTION_OUT } Part;

/* Whether the part's quantized linears (input widths k) are ones the kernels take. */
static int quant_linears_ok(const Layer *L, Part part) {
    const int64_t *d = L->d;
    const int mamba[] = {IN_PROJ, OUT_PROJ}, in[] = {Q, K_PROJ, V_PROJ}, out[] = {O_PROJ};
    const int64_t mamba_k[] = {d[HIDDEN], d[D_INNER]}, in_k[] = {d[HIDDEN], d[HIDDEN], d[HIDDEN]},
                  out_k[] = {d[HEADS] * d[HEAD_DIM]};
    const int ffn[] = {GATE, UP, DOWN};
    const int64_t ffn_k[] = {d[HIDDEN], d[HIDDEN], d[FFN]};
    const int *slots = part == MAMBA_LAYER ? mamba : part == ATTENTION_IN ? in : out;
    const int64_t *ks = part == MAMBA_LAYER ? mamba_k : part == ATTENTION_IN ? in_k : out_k;
    const int count = part == MAMBA_LAYER ? 2 : part == ATTENTION_IN ? 3 : 1;
    for (int i = 0; i < count + (part == ATTENTION_IN ? 0 : 3); i++) {
        const int which = i < count ? slots[i] : ffn[i - count];
        const LinearWeights w = linear_of(L, which, 1, i < count ? ks[i] : ffn_k[i - count]);
        if (w.format != FORMAT_DENSE && !quant_supported(w.format, w.k, w.group)) return 0;
    }
    return 1;
}

static int check(const Layer *L, Part part) {
    const int64_t *d = L->d;
    if (!quant_linears_ok(L, part)) return -1;
    if (!linear_supported(L->bf16, d[HIDDEN]) || !linear_supported(L->bf16, d[FFN])) return -1;
    if (part == MAMBA_LAYER &&
        (!linear_supported(L->bf16, d[D_INNER]) || d[HEADS] % d[GROUPS] != 0 ||
         d[D_INNER] != d[HEADS] * d[HEAD_DIM] || d[D_INNER] % d[GROUPS] != 0 ||
         d[CONV_DIM] != d[D_INNER] + 2 * d[GROUPS] * d[D_STATE] || d[CONV_K] < 1))
        return -1;
    if (part == ATTENTION_OUT && !linear_supported(L->bf16, d[HEADS] * d[HEAD_DIM])) return -1;
    if (part != ATTENTION_IN && d[EXPERTS]) {
        const int64_t mask = (1 << FORMAT_BITS) - 1;
        const LinearWeights gate_up = expert_weights(L, EXPERTS_GATE_UP,
                                                     L->expert_formats & mask, 0,
                                                     2 * d[EXPERT_FFN], d[HIDDEN]);
        const LinearWeights down = expert_weights(L, EXPERTS_DOWN,
                                                  L->expert_formats >> FORMAT_BITS & mask, 0,
                                                  d[HIDDEN], d[EXPERT_FFN]);
        if (d[TOP_K] < 1 || d[TOP_K] > d[EXPERTS] || !linear_supported(L->bf16, d[EXPERT_FFN]) ||
            L->t[ROUTER] == NULL || L->t[EXPERTS_GATE_UP] == NULL || L->t[EXPERTS_DOWN] == NULL)
            return -1;
        for (int i = 0; i < 2; i++) {
            const LinearWeights *w = i ? &down : &gate_up;
            if (w->format != FORMAT_DENSE &&
                (w->scales == NULL || !quant_supported(w->format, w->k, w->group)))
                return -1;
        }
    }
    return 0;
}

typedef struct { /* what one call works on besides the layer */
    const void *x;     /* [M, hidden] the layer's input (the residual stream) */
    const void *attn;  /* ATTENTION_OUT: [M, heads * head_dim] attention output */
    void *out;         /* [M, hidden], or ATTENTION_IN: [M, (heads + 2 kv heads) head_dim] */
    int64_t M;
    void *conv_pool, *ssm_pool;  /* MAMBA_LAYER: state pools and their dtypes */
    int conv_bf16, ssm_bf16;
    const int64_t *rows;
    const int64_t *sources; /* [M] or NULL: the slot each run's first row reads its state from */
} Call;

static int run(const Layer *L, Part part, const Call *c, int threads) {
    const int64_t *d = L->d, M = c->M, size = L->bf16 ? 2 : 4;
    if (M < 1 || threads < 1 || check(L, part) != 0) return -1;
    const int64_t widest = d[D_INNER] + d[CONV_DIM] + d[HEADS];
    const int64_t proj = (part == MAMBA_LAYER && widest > d[HIDDEN]) ? widest : d[HIDDEN];
    const int64_t taps = (d[CONV_K] + 1) * d[CONV_DIM];
    int64_t floats = M * (2 * d[HIDDEN] + d[FFN] + proj + d[D_INNER] + 2 * d[FFN]) + taps;
    floats += floats & 1; /* the runs after them 8-byte aligned */
    const int64_t normed = M * (d[HIDDEN] > d[D_INNER] ? d[HIDDEN] : d[D_INNER]) * size;
    const int64_t own_bytes = (normed + d[HIDDEN] * 4 + 63) / 64 * 64;
    const int64_t runs_bytes = (M + 1) * (int64_t)sizeof(int64_t);
    float *buf = malloc(sizeof(float) * floats + runs_bytes + threads * own_bytes);
    if (buf == NULL) return -2;
    Scratch s = {{buf, buf + M * d[HIDDEN]}, buf + 2 * M * d[HIDDEN], NULL, own_bytes,
                 buf + M * (2 * d[HIDDEN] + d[FFN]), NULL, NULL, NULL, NULL, 0,
                 NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL, 0, NULL, NULL, NULL, NULL};
    float *experts = NULL;
    if (part != ATTENTION_IN && d[EXPERTS]) {
        const int64_t P = M * d[TOP_K], Fe = d[EXPERT_FFN];
        const int64_t gathered = (P * d[HIDDEN] * size + 63) / 64 * 64;
        const int64_t ints = (4 * P + 1 + 15) / 16 * 16; /* pick, order, place, first */
        const int64_t floats = M * d[EXPERTS] + P * (1 + 3 * Fe + d[HIDDEN]) + M * d[HIDDEN];
        experts = malloc(sizeof(int64_t) * ints + sizeof(float) * (floats + 16) +
                         threads * gathered);
        if (experts == NULL) {
            free(buf);
            return -2;
        }
        s.pick = (int64_t *)experts;
        s.order = s.pick + P;
        s.place = s.order + P;
        s.first = s.place + P;
        s.gathered = (char *)(s.pick + ints);
        s.gathered_bytes = gathered;
        s.router = (float *)(s.gathered + threads * gathered);
        s.pick_w = s.router + M * d[EXPERTS];
        s.egu = s.pick_w + P;
        s.eact = s.egu + P * 2 * Fe;  /* P Fe floats: room for either dtype */
        s.ey = (float *)s.eact + P * Fe;
        s.moe = s.ey + P * d[HIDDEN];
    }
    s.y = s.proj + M * proj;
    s.gate_up = s.y + M * d[D_INNER];
    s.taps = s.gate_up + M * 2 * d[FFN];
    s.runs = (int64_t *)(buf + floats);
    s.own = (char *)s.runs + runs_bytes;
    if (part == MAMBA_LAYER) {
        s.n_runs = slot_runs(c->rows, M, s.runs);
        if (s.n_runs < 0) {
            free(buf);
            return -3;
        }
    }
    for (int64_t i = 0; i < M * d[HIDDEN]; i++) s.resid[0][i] = load_value(c->x, i, L->bf16);
#pragma omp parallel num_threads(threads)
    {
        if (part == ATTENTION_IN) {
            attention_in_stage(L, M, &s, c->out);
        } else {
            const void *h = part == MAMBA_LAYER
                ? mixer_stage(L, M, &s, c->conv_pool, c->conv_bf16, c->ssm_pool, c->ssm_bf16,
                              c->rows, c->sources)
                : attention_out_stage(L, M, &s, c->attn);
            ffn_stage(L, M, &s, h);
        }
    }
    if (part != ATTENTION_IN)
        for (int64_t i = 0; i < M * d[HIDDEN]; i++) store_value(c->out, i, s.resid[0][i], L->bf16);
    free(experts);
    free(buf);
    return 0;
}

/* Copy a call's tensor list (in the order of `slots`) into a full N_TENSORS array. */
static void place(const void **all, const void *const *tensors, const int *slots, int count) {
    for (int i = 0; i < N_TENSORS; i++) all[i] = NULL;
    for (int i = 0; i < count; i++) all[slots[i]] = tensors[i];
}

static int64_t place_mask(int64_t mask, const int *slots, int count) {
    int64_t out = 0;
    for (int i = 0; i < count; i++) out |= ((mask >> i) & 1) << slots[i];
    return out;
}

/* A Mamba decoder layer for M rows: x [M, hidden] -> out [M, hidden]; the conv and SSM states
 * of pool rows `rows` advance in place (adjacent rows on one pool row in order). Tensors in
 * enum order IN_NORM..EXPERTS_DOWN_SCALES (the last five NULL without experts). Returns 0, -1 if unsupported here, -2 out of memory, -3
 * when rows on one pool row are apart. */
int bamba_mamba_layer_step(const void *const *tensors, const int64_t *dims, int bf16,
                           int64_t f32_mask, int64_t formats, float eps, float dt_min, float dt_max,
                           float residual_scale, const void *x, void *out, int64_t M, void *conv_pool, int conv_bf16,
                           void *ssm_pool, int ssm_bf16, const int64_t *rows, int threads) {
    const void *all[N_TENSORS];
    int slots[EXPERTS_DOWN_SCALES + 1];
    for (int i = 0; i <= EXPERTS_DOWN_SCALES; i++) slots[i] = i;
    place(all, tensors, slots, EXPERTS_DOWN_SCALES + 1);
    const Layer L = {all, dims, bf16, f32_mask, formats, dims[EXPERT_FORMATS], eps, dt_min,
                     dt_max, residual_scale};
    const Call c = {x, NULL, out, M, conv_pool, ssm_pool, conv_bf16, ssm_bf16, rows};
    return run(&L, MAMBA_LAYER, &c, threads);
}

/* An attention layer's first half: qkv [M, (heads + 2 kv heads) head_dim] = the q, k and v
 * projections of rmsnorm(x). Tensors: input norm, then weight, bias and scales of q, k, v. */
int bamba_attention_in_step(const void *const *tensors, const int64_t *dims, int bf16,
                            int64_t f32_mask, int64_t formats, float eps, const void *x,
                            void *qkv, int64_t M, int threads) {
    static const int slots[] = {IN_NORM, Q, Q_BIAS, Q_SCALES, K_PROJ, K_BIAS, K_SCALES,
                                V_PROJ, V_BIAS, V_SCALES};
    const void *all[N_TENSORS];
    place(all, tensors, slots, 10);
    const Layer L = {all, dims, bf16, place_mask(f32_mask, slots, 10), formats, 0, eps, 0.0f, 0.0f,
                     1.0f};
    const Call c = {x, NULL, qkv, M, NULL, NULL, 0, 0, NULL};
    return run(&L, ATTENTION_IN, &c, threads);
}

/* An attention layer's second half: h = x + o_proj(attn), out = h + mlp(rmsnorm(h)).
 * Tensors: o's weight, bias and scales, pre-ff norm, then gate's, up's and down's, then the
 * router and the experts' weights (NULL without experts). */
int bamba_attention_out_step(const void *const *tensors, const int64_t *dims, int bf16,
                             int64_t f32_mask, int64_t formats, float eps, float residual_scale,
                             const void *x,
                             const void *attn, void *out, int64_t M, int threads) {
    static const int slots[] = {O_PROJ, O_BIAS, O_SCALES, FF_NORM, GATE, GATE_BIAS, GATE_SCALES,
                                UP, UP_BIAS, UP_SCALES, DOWN, DOWN_BIAS, DOWN_SCALES, ROUTER,
                                EXPERTS_GATE_UP, EXPERTS_GATE_UP_SCALES, EXPERTS_DOWN,
                                EXPERTS_DOWN_SCALES};
    const void *all[N_TENSORS];
    place(all, tensors, slots, 18);
    const Layer L = {all, dims, bf16, place_mask(f32_mask, slots, 18), formats,
                     dims[EXPERT_FORMATS], eps, 0.0f, 0.0f,
                     residual_scale};
    const Call c = {x, attn, out, M, NULL, NULL, 0, 0, NULL};
    return run(&L, ATTENTION_OUT, &c, threads);
}

/* ---- every layer of a model for one decode token (bamba_decode_layers) ---------------------
 * What the Python side sets once per model and cache: per layer its tensors (N_TENSORS slots in
 * enum order) and float32 mask, and its storage: the conv and SSM pools of a Mamba layer, the
 * keys and values of an attention layer, token rows kv_token_stride elements apart and heads
 * kv_head_stride apart (so both a contiguous [rows, T, Hkv, D] cache and [Hkv, pages, D]
 * pages fit). Field order and types mirror decode_ops.DecodeModel. */
typedef struct {
    int64_t n_layers;
    const int64_t *attention;    /* [n_layers]: 1 for an attention layer */
    const void *const *tensors;  /* [n_layers * N_TENSORS] */
    const int64_t *f32_masks;    /* [n_layers] */
    const int64_t *formats;      /* [n_layers]: Layer.formats */
    const int64_t *expert_formats; /* [n_layers]: Layer.expert_formats (dims' unused here) */
    const int64_t *mamba_dims, *attention_dims; /* N_DIMS each */
    void *const *pool_a;         /* [n_layers]: conv pool, or keys */
    void *const *pool_b;         /* [n_layers]: SSM pool, or values */
    int64_t conv_bf16, ssm_bf16, bf16, kv_head_stride, kv_token_stride;
    float eps, dt_min, dt_max, attention_scale;
    const void *final_norm;      /* [hidden], layer dtype: the model's final RMS norm, or NULL */
    float final_eps;
    float residual_scale;        /* Layer.residual_scale of every layer */
} DecodeModel;

/* elementwise.c's RMS norm: the final norm rounds as it does outside this call. */
int bamba_rms_norm(const void *x, const void *w, void *out, int64_t rows, int64_t d, float eps,
                   int bf16, int threads);

typedef struct { /* one call's rows */
    int64_t M, T, rotary_dim;
    int64_t slot_limit;        /* slots lie in 0..slot_limit-1 (the state pools' rows) */
    int64_t row_limit;         /* token rows lie in 0..row_limit (the keys' and values' storage) */
    const int64_t *slots;      /* [M] state pool rows */
    const int64_t *lengths;    /* [M] keys each row sees after this token (position + 1) */
    const void *cos, *sin;     /* [M, rotary_dim], layer dtype */
    const int64_t *write_rows; /* [M] token rows this token's keys and values go to */
    const int64_t *read_rows;  /* [M, T] token rows of positions 0..T-1 */
    const int64_t *sources;    /* [M] or NULL: the slot a run's first row reads its state from
                                * (copied into its own slot first; that slot left as it was) */
} DecodeRows;

/* Rotate the first rotary_dim channels of a head ("rotate half"), rounded as apply_rope's
 * torch ops round: each product and the sum in the layer dtype. */
static void rope_head(void *head, const void *cos, const void *sin, int64_t R, int bf16,
                      float *tmp) {
    const int64_t half = R / 2;
    for (int64_t j = 0; j < R; j++) {
        const float x = load_value(head, j, bf16);
        const float rotated = j < half ? -load_value(head, j + half, bf16)
                                       : load_value(head, j - half, bf16);
        tmp[j] = round_to(round_to(x * load_value(cos, j, bf16), bf16) +
                          round_to(rotated * load_value(sin, j, bf16), bf16), bf16);
    }
    for (int64_t j = 0; j < R; j++) store_value(head, j, tmp[j], bf16);
}

/* Rope on q and k, then this token's k and v into the layer's storage. */
static void place_keys(const DecodeModel *P, int64_t layer, const DecodeRows *r, void *qkv) {
    const int64_t *d = P->attention_dims, H = d[HEADS], G = d[GROUPS], Dh = d[HEAD_DIM];
    const int64_t size = P->bf16 ? 2 : 4, width = (H + 2 * G) * Dh;
    float tmp[r->rotary_dim > 0 ? r->rotary_dim : 1];
    for (int64_t m = 0; m < r->M; m++) {
        char *row = (char *)qkv + m * width * size;
        const char *cos = (const char *)r->cos + m * r->rotary_dim * size;
        const char *sin = (const char *)r->sin + m * r->rotary_dim * size;
        for (int64_t h = 0; h < H + G; h++)
            if (r->rotary_dim > 0) rope_head(row + h * Dh * size, cos, sin, r->rotary_dim,
                                             (int)P->bf16, tmp);
        for (int64_t g = 0; g < G; g++) {
            const int64_t at = (g * P->kv_head_stride + r->write_rows[m] * P->kv_token_stride);
            memcpy((char *)P->pool_a[layer] + at * size, row + (H + g) * Dh * size, Dh * size);
            memcpy((char *)P->pool_b[layer] + at * size, row + (H + G + g) * Dh * size,
                   Dh * size);
        }
    }
}

/* An attention layer for one token per row: src -> dst [M, hidden]. qkv and attn are
 * [M, (H + 2 G) Dh] and [M, H Dh] buffers of the layer dtype. */
static int attention_layer(const DecodeModel *P, int64_t layer, const DecodeRows *r,
                           const void *src, void *dst, void *qkv, void *attn, int threads) {
    const int64_t *d = P->attention_dims, H = d[HEADS], G = d[GROUPS], Dh = d[HEAD_DIM];
    const Layer L = {P->tensors + layer * N_TENSORS, d, (int)P->bf16, P->f32_masks[layer],
                     P->formats[layer], P->expert_formats[layer], P->eps, 0.0f, 0.0f,
                     P->residual_scale};
    const Call in = {src, NULL, qkv, r->M, NULL, NULL, 0, 0, NULL};
    int status = run(&L, ATTENTION_IN, &in, threads);
    if (status != 0) return status;
    place_keys(P, layer, r, qkv);
    const AttentionJob j = {qkv, P->pool_a[layer], P->pool_b[layer], NULL, r->lengths,
                            r->read_rows, attn, r->M, H, G, Dh, r->T, (H + 2 * G) * Dh,
                            0, P->kv_token_stride, P->kv_head_stride,
                            0, P->kv_token_stride, P->kv_head_stride, (int)P->bf16,
                            P->attention_scale};
    status = attention_all(&j, threads);
    if (status != 0) return status;
    const Call out = {src, attn, dst, r->M, NULL, NULL, 0, 0, NULL};
    return run(&L, ATTENTION_OUT, &out, threads);
}

/* Whether every index the call follows lies in its storage: 0, or -4 a slot, -5 a position
 * (lengths outside 1..T), -6 a token row. */
static int check_rows(const DecodeModel *P, const DecodeRows *r) {
    int mamba = 0, attention = 0;
    for (int64_t i = 0; i < P->n_layers; i++) {
        if (P->attention[i]) attention = 1;
        else mamba = 1;
    }
    for (int64_t m = 0; m < r->M; m++) {
        if (mamba && (r->slots[m] < 0 || r->slots[m] >= r->slot_limit)) return -4;
        if (mamba && r->sources != NULL && (r->sources[m] < 0 || r->sources[m] >= r->slot_limit))
            return -4;
        if (attention && (r->lengths[m] < 1 || r->lengths[m] > r->T)) return -5;
        if (attention && (r->write_rows[m] < 0 || r->write_rows[m] > r->row_limit)) return -6;
    }
    if (attention)
        for (int64_t i = 0; i < r->M * r->T; i++)
            if (r->read_rows[i] < 0 || r->read_rows[i] > r->row_limit) return -6;
    return 0;
}

/* Every layer for one token per row: x -> out [M, hidden] (layer dtype), then the final norm
 * when the model has one here; the states and caches advanced in place; equal to the
 * per-layer calls with rope and attention in between.
 * Adjacent rows on one state slot are one sequence's successive tokens (a prompt chunk beside
 * decoding rows; their keys are all written before any row attends). `spare` [M, hidden]
 * holds intermediate outputs (x, out and spare apart). Returns 0, -1 if unsupported here, -2
 * out of memory, -3 when a slot's rows are apart or not at successive positions, -4..-6 when
 * an index lies outside its storage (check_rows; nothing done). */
int bamba_decode_layers(const DecodeModel *P, const void *x, void *out, void *spare,
                        const DecodeRows *r, int threads) {
    const int64_t *a = P->attention_dims, size = P->bf16 ? 2 : 4;
    const int checked = check_rows(P, r);
    if (checked != 0) return checked;
    for (int64_t m = 1; m < r->M; m++) /* a slot's successive rows: successive positions */
        if (r->slots[m] == r->slots[m - 1] && r->lengths[m] != r->lengths[m - 1] + 1) return -3;
    void *qkv = malloc(size * r->M * (a[HEADS] + 2 * a[GROUPS] + a[HEADS]) * a[HEAD_DIM] + 1);
    if (qkv == NULL) return -2;
    void *attn = (char *)qkv + size * r->M * (a[HEADS] + 2 * a[GROUPS]) * a[HEAD_DIM];
    const void *src = x;
    int status = 0;
    for (int64_t i = 0; i < P->n_layers && status == 0; i++) {
        void *dst = (P->n_layers - 1 - i) % 2 == 0 ? out : spare; /* the last layer: out */
        if (P->attention[i]) {
            status = attention_layer(P, i, r, src, dst, qkv, attn, threads);
        } else {
            const Layer L = {P->tensors + i * N_TENSORS, P->mamba_dims, (int)P->bf16,
                             P->f32_masks[i], P->formats[i], P->expert_formats[i], P->eps,
                             P->dt_min, P->dt_max,
                             P->residual_scale};
            const Call c = {src, NULL, dst, r->M, P->pool_a[i], P->pool_b[i],
                            (int)P->conv_bf16, (int)P->ssm_bf16, r->slots, r->sources};
            status = run(&L, MAMBA_LAYER, &c, threads);
        }
        src = dst;
    }
    free(qkv);
    if (status == 0 && P->final_norm != NULL) {
        const int64_t hidden = P->mamba_dims[HIDDEN] ? P->mamba_dims[HIDDEN] : a[HIDDEN];
        status = bamba_rms_norm(out, P->final_norm, out, r->M, hidden, P->final_eps,
                                (int)P->bf16, 1);
    }
    return status;
}
