/* The small operations of a decode step on CPU, each one call instead of the 5-10 eager torch operations it
   replaces (qwen15/cpu_decode.py): RMSNorm (with the residual add before it), the rotary embedding of q and k with
   the new keys and values written to the cache, attention of one query per row over the cache, SiLU(gate) * up.

   At batch 1 the matrix products of the 0.5B shape take ~26 ms per step (int8) and these operations took ~7-13 ms
   more as ~40 eager torch calls per layer, each a few microseconds of dispatch for a few hundred values.

   Rounding follows the eager model: each torch operation of the reference computes in fp32 and rounds its result
   to the tensor's dtype, so the same steps round here at the same places (RMSNorm, rotary, SiLU * up equal the
   eager ones up to the order of the norm's sum); attention computes its scores, softmax and weighted sum in fp32
   and rounds once (SDPA's own order differs). Built into the same library as cpu_kernels.c (kernels.py). */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"

/* v rounded to the dtype (what an eager operation's result holds) */
static inline __m512 vrnd(int bf16, __m512 v) { return bf16 ? _mm512_castsi512_ps(bf16_bits16(v)) : v; }

/* e^x per lane, within ~2 units in the last place of fp32 for |x| < 87 (x = n ln2 + r, |r| <= ln2 / 2, a degree-6
   polynomial for e^r, times 2^n); below -87.3 the result is 0, as expf's underflows to 0 or a denormal. */
static inline __m512 vexp(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.3f), hi = _mm512_set1_ps(88.7f);
    __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* ln2 in two parts (Cody-Waite) */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512 e = _mm512_scalef_ps(p, n);
    return _mm512_mask_mov_ps(e, tiny, _mm512_setzero_ps());
}

/* ------------------------------------------------------------------------------------------------ RMSNorm */

/* With r: s = x + r (rounded, written to s), then y = w * rnd(s * rsqrt(mean(s^2) + eps)); without r (NULL): the
   norm of x. x, r, s, y [M, D]; w [D]; all of one dtype; D a multiple of 16. The second pass reads the rounded
   sum back from s (or x), so no buffer is needed. */
void q15_rms_norm(const void *x, const void *r, void *s, const void *w, void *y, int bf16, int64_t M, int64_t D,
                  float eps) {
    const void *src = r ? s : x;
    for (int64_t m = 0; m < M; m++) {
        int64_t at = m * D;
        __m512 sq = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            __m512 v = load16(x, bf16, at + d);
            if (r) {
                v = vrnd(bf16, _mm512_add_ps(v, load16(r, bf16, at + d)));
                store16(s, bf16, at + d, v);
            }
            sq = _mm512_fmadd_ps(v, v, sq);
        }
        __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sq) / (float)D + eps));
        for (int64_t d = 0; d < D; d += 16)
            store16(y, bf16, at + d,
                   _mm512_mul_ps(load16(w, bf16, d), vrnd(bf16, _mm512_mul_ps(load16(src, bf16, at + d), inv))));
    }
}

/* ------------------------------------------------------------------------------------------------ rotary */

/* qkv [B, (H + 2 KVH) * hd] (queries, keys, values of one new token per row); cos, sin [B, hd]. Writes the rotated
   queries to q [B, H, hd], the rotated keys and the values to the caches at [b, head, slots[b], :] (cache element
   offset b * crow + head * chead + slot * hd); hd a multiple of 32. Rotation as the reference: x * cos +
   rotate_half(x) * sin, each product and the sum rounded (rotate_half's negation is exact). */
void q15_rope_store(const void *qkv, const void *cos, const void *sin, void *q, void *kc, void *vc,
                    const int64_t *slots, int bf16, int64_t B, int64_t H, int64_t KVH, int64_t hd, int64_t crow,
                    int64_t chead) {
    int64_t width = (H + 2 * KVH) * hd, half = hd / 2;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H + KVH; h++) {
            int64_t at = b * width + h * hd;
            void *dst = h < H ? q : kc;
            int64_t out = h < H ? (b * H + h) * hd : b * crow + (h - H) * chead + slots[b] * hd;
            for (int64_t d = 0; d < half; d += 16) {
                __m512 x1 = load16(qkv, bf16, at + d), x2 = load16(qkv, bf16, at + d + half);
                __m512 c1 = load16(cos, bf16, b * hd + d), c2 = load16(cos, bf16, b * hd + d + half);
                __m512 s1 = load16(sin, bf16, b * hd + d), s2 = load16(sin, bf16, b * hd + d + half);
                __m512 lo = _mm512_sub_ps(vrnd(bf16, _mm512_mul_ps(x1, c1)), vrnd(bf16, _mm512_mul_ps(x2, s1)));
                __m512 up = _mm512_add_ps(vrnd(bf16, _mm512_mul_ps(x2, c2)), vrnd(bf16, _mm512_mul_ps(x1, s2)));
                store16(dst, bf16, out + d, lo);
                store16(dst, bf16, out + d + half, up);
            }
        }
        for (int64_t h = 0; h < KVH; h++) {
            int64_t at = b * width + (H + KVH + h) * hd, out = b * crow + h * chead + slots[b] * hd;
            if (bf16)
                memcpy((uint16_t *)vc + out, (const uint16_t *)qkv + at, 2 * (size_t)hd);
            else
                memcpy((float *)vc + out, (const float *)qkv + at, 4 * (size_t)hd);
        }
    }
}

/* ------------------------------------------------------------------------------------------------ attention */

/* One query per row: out [B, H * hd] = softmax(scale * q k^T) v over the keys j < L with mask[b * mstride + j]
   (mstride 0: one mask row for the batch); q [B, H, hd], caches as in q15_rope_store; query head h reads key/value
   head h / (H / KVH); hd a multiple of 32 (as for q15_rope_store). fp32 throughout, rounded once. Returns -1 if
   out of memory. */
int q15_decode_attention(const void *q, const void *kc, const void *vc, const uint8_t *mask, int64_t mstride,
                         void *out, int bf16, int64_t B, int64_t H, int64_t KVH, int64_t hd, int64_t L,
                         int64_t crow, int64_t chead, float scale) {
    int failed = 0;
    int64_t group = H / KVH;
#pragma omp parallel
    {
        float *p = malloc(sizeof(float) * (size_t)(L + 16));
        float *qf = malloc(sizeof(float) * (size_t)hd), *acc = malloc(sizeof(float) * (size_t)hd);
        if (!p || !qf || !acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (!p || !qf || !acc) continue;
            int64_t b = bh / H, h = bh % H;
            const uint8_t *keep = mask + b * mstride;
            int64_t base = b * crow + (h / group) * chead;
            for (int64_t d = 0; d < hd; d += 16) _mm512_storeu_ps(qf + d, load16(q, bf16, bh * hd + d));
            float top = -INFINITY;
            for (int64_t j = 0; j < L; j++) {
                if (!keep[j]) continue;
                __m512 dot = _mm512_setzero_ps();
                for (int64_t d = 0; d < hd; d += 16)
                    dot = _mm512_fmadd_ps(_mm512_loadu_ps(qf + d), load16(kc, bf16, base + j * hd + d), dot);
                p[j] = _mm512_reduce_add_ps(dot) * scale;
                if (p[j] > top) top = p[j];
            }
            __m512 vtop = _mm512_set1_ps(top);
            for (int64_t j = 0; j < L; j += 16) { /* (p has room for the last 16 lanes; masked keys are skipped) */
                __mmask16 live = (__mmask16)(L - j >= 16 ? 0xffff : (1u << (L - j)) - 1);
                _mm512_mask_storeu_ps(p + j, live, vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, p + j), vtop)));
            }
            float total = 0.0f;
            for (int64_t d = 0; d < hd; d++) acc[d] = 0.0f;
            for (int64_t j = 0; j < L; j++) {
                if (!keep[j]) continue;
                float e = p[j];
                total += e;
                __m512 ev = _mm512_set1_ps(e);
                for (int64_t d = 0; d < hd; d += 16)
                    _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(ev, load16(vc, bf16, base + j * hd + d),
                                                              _mm512_loadu_ps(acc + d)));
            }
            float inv = total > 0.0f ? 1.0f / total : 0.0f;
            for (int64_t d = 0; d < hd; d += 16)
                store16(out, bf16, bh * hd + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), _mm512_set1_ps(inv)));
        }
        free(p);
        free(qf);
        free(acc);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------ SiLU * up */

/* gu [M, 2F] (gate, then up, per row) -> y [M, F] = rnd(rnd(silu(gate)) * up), as F.silu(gate) * up; F a multiple
   of 16. */
void q15_silu_mul(const void *gu, void *y, int bf16, int64_t M, int64_t F) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t m = 0; m < M; m++)
        for (int64_t f = 0; f < F; f += 16) {
            __m512 g = load16(gu, bf16, m * 2 * F + f);
            __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, vexp(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            store16(y, bf16, m * F + f, _mm512_mul_ps(vrnd(bf16, silu), load16(gu, bf16, m * 2 * F + F + f)));
        }
}

/* ------------------------------------------------------------------------------------------------ argmax */

/* out[m] = the first index of the largest of x[m, 0..n) (row stride ld; bf16 or fp32), as torch.argmax: a NaN
   counts as the largest, so the first NaN wins. Each of 16 lanes keeps its first maximum (strict >), then the
   lanes' maxima are merged taking the lowest index among equal values; rows under 16 wide are scanned alone. */
void q15_argmax_rows(const void *x, int bf16, int64_t M, int64_t n, int64_t ld, int64_t *out) {
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const char *row = (const char *)x + (bf16 ? 2 : 4) * m * ld;
        if (n < 16) {
            int64_t pick = 0;
            for (int64_t k = 0; k < n; k++) {
                float v = load1(row, bf16, k), top = load1(row, bf16, pick);
                if (v != v) {
                    pick = k;
                    break;
                }
                if (v > top) pick = k;
            }
            out[m] = pick;
            continue;
        }
        __m512 best = load16(row, bf16, 0);
        __m512i at = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        __m512i idx = at;
        int64_t nan_at = -1;
        if (_mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q)) nan_at = 0;
        int64_t j = 16;
        for (; nan_at < 0 && j + 16 <= n; j += 16) {
            __m512 v = load16(row, bf16, j);
            idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
            __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            if (nan) nan_at = j;
            __mmask16 up = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
            best = _mm512_mask_mov_ps(best, up, v);
            at = _mm512_mask_mov_epi32(at, up, idx);
        }
        float vals[16];
        int32_t ids[16];
        _mm512_storeu_ps(vals, best);
        _mm512_storeu_si512(ids, at);
        float top = vals[0];
        int64_t pick = ids[0];
        for (int l = 1; l < 16; l++)
            if (vals[l] > top || (vals[l] == top && ids[l] < pick)) top = vals[l], pick = ids[l];
        for (int64_t k = nan_at < 0 ? j : n; k < n; k++) { /* the tail */
            float v = load1(row, bf16, k);
            if (v != v) {
                nan_at = k;
                break;
            }
            if (v > top) top = v, pick = k;
        }
        if (nan_at >= 0) /* the first NaN: scan from the block where one was seen */
            for (int64_t k = nan_at; k < n; k++) {
                float v = load1(row, bf16, k);
                if (v != v) {
                    pick = k;
                    break;
                }
            }
        out[m] = pick;
    }
}
