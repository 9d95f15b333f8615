/* int8 and int4 matrix products for decode on x86 CPUs with AVX-512 (F, BW, VL, VNNI).

   Built at first use by qwen15/quantize/kernels.py with the system C compiler (-O3 -fopenmp), loaded with ctypes:
   no Python or torch headers. -fopenmp makes the library need libgomp.so.1, which resolves to the one torch has
   already loaded, so these kernels share torch's thread pool and follow torch.set_num_threads.

   Decode multiplies a few rows of activations by a large weight matrix: it is bound by reading the weights, as long
   as the arithmetic per weight byte stays small. So the products run as VNNI int8 dot products (vpdpbusd, 64
   multiply-adds per instruction, int32 sums): each row of activations is quantized on the fly to int8 in blocks
   (int8: 64 columns; int4: its group; scale = max |x| / 127 per block), as llama.cpp does for its Q8_0 and Q4_0
   products (blocks of 32). Up to 8 activation rows share each weight load (batched decode).

   int8:  w[n, k] = q[n, k] * scale[n]           q int8 [N, K] row-major, scale fp32 [N]; K a multiple of 64.
          y[n] = scale[n] * sum_b xs_b * sum_{k in b} q[n, k] * xq[k]; vpdpbusd multiplies unsigned by signed bytes,
          so the weights enter as q + 128 (a xor of the sign bit) and 128 * sum xs_b * sum xq is taken off per row.
   int4:  w[n, k] = q[n, k] * scale[n, g] + min[n, g], g = k / G   q in 0..15; scale, min bf16 [N, K / G];
          G 32, 64 or 128; K a multiple of G. Packed uint8 [N, K / 2], groups interleaved 16 at a time (see the
          int4 section); the activations are quantized per group of G columns (one scale xs_g each):
          y[n] = sum_g scale_g * xs_g * sum_{k in g} q[n, k] xq[k] + sum_g min_g * xs_g * sum_{k in g} xq[k].
   bf16, fp32: y = x @ w.T + bias for dense weights (vdpbf16ps / fma), for decode at up to 64 rows (dot products
   below 24 rows, broadcasts of each weight against 16 rows at a time from there).
   x and y are bf16 or fp32 (flags), [M, K] and [M, N], row-major; bias fp32 [N] or NULL. */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define XB 64 /* columns per activation scale */

static void store_row(void *y, int y_bf16, int64_t idx, float v) {
    if (y_bf16)
        ((uint16_t *)y)[idx] = f32_to_bf16(v);
    else
        ((float *)y)[idx] = v;
}

/* Rows [n0, n1) of N for thread t of nt, in multiples of `align` rows. */
static void split_rows(int64_t N, int64_t align, int t, int nt, int64_t *n0, int64_t *n1) {
    int64_t blocks = (N + align - 1) / align;
    int64_t per = blocks / nt, extra = blocks % nt;
    int64_t b0 = t * per + (t < extra ? t : extra);
    int64_t b1 = b0 + per + (t < extra ? 1 : 0);
    *n0 = b0 * align < N ? b0 * align : N;
    *n1 = b1 * align < N ? b1 * align : N;
}

/* ------------------------------------------------------------------------------------------------ activations */

/* Activations in int8: xq [M, K], scales xs [M, K / XB]; and, with G > 0, the sums of xs * xq over groups of G
   columns (xsum [M, K / G], for the int4 minimums) and, for int8, per row sum_b xs_b * 128 * sum_{k in b} xq[k] (corr [M]). */
typedef struct {
    int8_t *xq;
    float *xs, *xsum, *corr;
} quantized_x;

static void free_x(quantized_x *a) {
    free(a->xq);
    free(a->xs);
    free(a->xsum);
    free(a->corr);
}

static int quantize_x(const void *x, int x_bf16, int64_t M, int64_t K, int64_t G, quantized_x *a) {
    a->xq = aligned_alloc(64, (size_t)(M * K + 64));
    a->xs = malloc(sizeof(float) * (size_t)(M * (K / XB) + 1));
    a->xsum = G ? malloc(sizeof(float) * (size_t)(M * (K / G) + 1)) : NULL;
    a->corr = malloc(sizeof(float) * (size_t)(M + 1));
    if (!a->xq || !a->xs || (G && !a->xsum) || !a->corr) return -1;
    for (int64_t m = 0; m < M; m++) {
        float corr = 0.0f;
        for (int64_t b = 0; b < K / XB; b++) {
            int64_t at = m * K + b * XB;
            __m512 v[4];
            __m512 mx = _mm512_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = load16(x, x_bf16, at + 16 * i);
                mx = _mm512_max_ps(mx, _mm512_abs_ps(v[i]));
            }
            float amax = _mm512_reduce_max_ps(mx), s = amax / 127.0f;
            __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            __m512i total = _mm512_setzero_si512();
            for (int i = 0; i < 4; i++) {
                __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv)); /* round to nearest even */
                total = _mm512_add_epi32(total, qi);
                _mm_storeu_si128((__m128i *)(a->xq + at + 16 * i), _mm512_cvtsepi32_epi8(qi));
            }
            a->xs[m * (K / XB) + b] = s;
            corr += s * 128.0f * (float)_mm512_reduce_add_epi32(total);
        }
        a->corr[m] = corr;
        /* sums of the quantized activations: the minimums then multiply what the products see, so that the result
           is exactly w . dequant(xq) (with the exact sums of x the error would scale with q, not with w) */
        for (int64_t g = 0; G && g < K / G; g++) {
            float total = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
                int32_t part = 0;
                for (int64_t i = 0; i < 32; i++) part += a->xq[m * K + k + i];
                total += a->xs[m * (K / XB) + k / XB] * (float)part;
            }
            a->xsum[m * (K / G) + g] = total;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ int8 */

/* out[i][j] = sum_b xs[j][b] * sum_{k in b} (q[i, k] + 128) * xq[j, k], NR weight rows, MT activation rows. The rows
   of a tile are contiguous; the next tile's bytes are prefetched as this one's are read (short row streams read side
   by side are too short for the hardware prefetcher to follow on its own). */
ALWAYS_INLINE void int8_tile(const quantized_x *a, int64_t m0, int64_t K, const int8_t *q, int NR, int MT,
                             float out[4][4]) {
    const char *next = (const char *)(q + NR * K);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[4][4];
    _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += XB) {
        __m512i w[4];
        _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) {
            _mm_prefetch(next + i * K + k, _MM_HINT_T0);
            w[i] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(q + i * K + k)), flip);
        }
        _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) {
            __m512i xv = _mm512_loadu_si512((const void *)(a->xq + (m0 + j) * K + k));
            __m512 s = _mm512_set1_ps(a->xs[(m0 + j) * (K / XB) + k / XB]);
            _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) {
                __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[i], xv);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[i][j]);
            }
        }
    }
    _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}

static void int8_rows(const quantized_x *a, int64_t M, int64_t K, const int8_t *q, const float *scale,
                      const float *bias, void *y, int y_bf16, int64_t N, int64_t n0, int64_t n1) {
    float out[4][4];
    for (int64_t n = n0; n < n1; n += 4) {
        int nr = n1 - n >= 4 ? 4 : (int)(n1 - n);
        const int8_t *qn = q + n * K;
        for (int64_t m = 0; m < M; m += 4) {
            int mt = M - m >= 4 ? 4 : (int)(M - m);
            /* constant tile shapes, so that each call is fully unrolled */
            if (nr == 4 && mt == 1) int8_tile(a, m, K, qn, 4, 1, out);
            else if (nr == 4 && mt == 4) int8_tile(a, m, K, qn, 4, 4, out);
            else if (nr == 4 && mt == 2) int8_tile(a, m, K, qn, 4, 2, out);
            else if (nr == 4 && mt == 3) int8_tile(a, m, K, qn, 4, 3, out);
            else
                for (int i = 0; i < nr; i++)
                    for (int j = 0; j < mt; j++) {
                        float one[4][4];
                        int8_tile(a, m + j, K, qn + i * K, 1, 1, one);
                        out[i][j] = one[0][0];
                    }
            for (int i = 0; i < nr; i++)
                for (int j = 0; j < mt; j++) {
                    float v = (out[i][j] - a->corr[m + j]) * scale[n + i] + (bias ? bias[n + i] : 0.0f);
                    store_row(y, y_bf16, (m + j) * N + n + i, v);
                }
        }
    }
}

/* y [M, N] = x [M, K] @ (q * scale).T + bias. Returns 0, or -1 if out of memory. */
int q15_int8_linear(const void *x, int x_bf16, const int8_t *q, const float *scale, const float *bias, void *y,
                    int y_bf16, int64_t M, int64_t N, int64_t K) {
    quantized_x a;
    if (quantize_x(x, x_bf16, M, K, 0, &a) != 0) {
        free_x(&a);
        return -1;
    }
#pragma omp parallel
    {
        int64_t n0, n1;
        split_rows(N, 16, omp_get_thread_num(), omp_get_num_threads(), &n0, &n1);
        int8_rows(&a, M, K, q, scale, bias, y, y_bf16, N, n0, n1);
    }
    free_x(&a);
    return 0;
}

/* ------------------------------------------------------------------------------------------------ int4 */

/* The int4 layout (int4.py's pack): a row's groups in "super-blocks" of 16 groups (the last may hold R < 16); a
   group's G columns in S = G / 4 steps of 4 columns. Within a super-block, S / 2 runs of 4R bytes: in run t, bytes
   4l..4l+3 hold group l's step t in their low nibbles and its step t + S/2 in their high nibbles. So one 64-byte
   load gives two vpdpbusd operands whose 16 lanes are 16 groups: each lane's int32 sum is one group's dot product,
   and a super-block needs one conversion and one fma per activation row, with 16 group scales at once. The
   activations are quantized per group (G columns, one scale each) and laid out the same way. */

ALWAYS_INLINE int64_t int4_offset(int64_t G, int64_t ng, int64_t g, int64_t step) { /* weight byte of a run */
    int64_t sb = g / 16, l = g % 16, R = ng - sb * 16 < 16 ? ng - sb * 16 : 16;
    return sb * 8 * G + step * 4 * R + 4 * l; /* step < S / 2: the low nibbles' step */
}

/* Activations for int4: xq [M, K] in the layout above (run t of a super-block: the low-nibble step t, then from
   S / 2 * 4R on, the high-nibble steps), xs [M, ng] scales, xsum [M, ng] = xs * sum of the group's xq. */
static int quantize_x4(const void *x, int x_bf16, int64_t M, int64_t K, int64_t G, quantized_x *a) {
    int64_t ng = K / G;
    a->xq = aligned_alloc(64, (size_t)(M * K + 64));
    a->xs = malloc(sizeof(float) * (size_t)(M * ng + 1));
    a->xsum = malloc(sizeof(float) * (size_t)(M * ng + 1));
    a->corr = NULL;
    if (!a->xq || !a->xs || !a->xsum) return -1;
    int8_t tmp[128];
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < ng; g++) {
            int64_t at = m * K + g * G, n16 = G / 16;
            __m512 v[8];
            __m512 mx = _mm512_setzero_ps();
            for (int i = 0; i < n16; i++) {
                v[i] = load16(x, x_bf16, at + 16 * i);
                mx = _mm512_max_ps(mx, _mm512_abs_ps(v[i]));
            }
            float amax = _mm512_reduce_max_ps(mx), sc = amax / 127.0f;
            __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            __m512i total = _mm512_setzero_si512();
            for (int i = 0; i < n16; i++) {
                __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv)); /* round to nearest even */
                total = _mm512_add_epi32(total, qi);
                _mm_storeu_si128((__m128i *)(tmp + 16 * i), _mm512_cvtsepi32_epi8(qi));
            }
            a->xs[m * ng + g] = sc;
            /* the minimums then multiply what the products see, so that the result is exactly w . dequant(xq) */
            a->xsum[m * ng + g] = sc * (float)_mm512_reduce_add_epi32(total);
            int64_t S = G / 4, R = ng - g / 16 * 16 < 16 ? ng - g / 16 * 16 : 16;
            for (int64_t st = 0; st < S; st++) /* step st of group g: super-block g / 16, run st, lane g % 16 */
                memcpy(a->xq + m * K + g / 16 * 16 * G + st * 4 * R + 4 * (g % 16), tmp + 4 * st, 4);
        }
    return 0;
}

/* out[i][j] = sum over super-blocks of sum_l c[i][j][l] * dot_l + min[i][l] * xsum[j][l]; sf, mf: the tile rows'
   scales and minimums in fp32 (ng per row). */
ALWAYS_INLINE void int4_tile(const quantized_x *a, int64_t m0, int64_t K, int64_t G, const uint8_t *q,
                             int64_t ldq, const float *sf, const float *mf, int NR, int MT, float out[8][8]) {
    const char *next = (const char *)(q + NR * ldq);
    const __m512i nib = _mm512_set1_epi8(0x0f);
    int64_t ng = K / G, half = G / 8; /* runs per super-block */
    __m512 acc[4][8];
    _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < ng; g0 += 16) {
        int64_t R = ng - g0 < 16 ? ng - g0 : 16, base = g0 * G / 2;
        __mmask16 live = (__mmask16)((1u << R) - 1);
        __m512i dot[4][8];
        _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)
            _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) dot[i][j] = _mm512_setzero_si512();
        for (int64_t t = 0; t < half; t++) {
            __m512i lo[4], hi[4];
            _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) {
                _mm_prefetch(next + i * ldq + base + t * 4 * R, _MM_HINT_T0);
                __m512i v = _mm512_maskz_loadu_epi32(live, q + i * ldq + base + t * 4 * R);
                lo[i] = _mm512_and_si512(v, nib);
                hi[i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
            }
            _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) {
                const int8_t *xq = a->xq + (m0 + j) * K + 2 * base;
                __m512i x0 = _mm512_maskz_loadu_epi32(live, xq + t * 4 * R);
                __m512i x1 = _mm512_maskz_loadu_epi32(live, xq + (half + t) * 4 * R);
                _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) {
                    dot[i][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot[i][j], lo[i], x0), hi[i], x1);
                }
            }
        }
        _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) {
            __m512 xs = _mm512_maskz_loadu_ps(live, a->xs + (m0 + j) * ng + g0);
            __m512 xsum = _mm512_maskz_loadu_ps(live, a->xsum + (m0 + j) * ng + g0);
            _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) {
                __m512 c = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, sf + i * ng + g0), xs);
                __m512 d = _mm512_cvtepi32_ps(dot[i][j]);
                acc[i][j] = _mm512_fmadd_ps(d, c, acc[i][j]);
                acc[i][j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, mf + i * ng + g0), xsum, acc[i][j]);
            }
        }
    }
    _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}

/* dst[0..n) = the bf16 values src[0..n) as fp32 (vectorised: per weight row, off the hot loop). */
static void bf16_row_to_f32(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src, 1, i));
    for (; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

#define INT4_TILE(NR_, MT_) int4_tile(a, m, K, G, qn, ldq, sf, mf, NR_, MT_, out)

/* Tiles of NR weight rows by MT activation rows with NR * MT <= 8 (an int32 and an fp32 sum per pair). */
static void int4_rows(const quantized_x *a, int64_t M, int64_t K, const uint8_t *q, const uint16_t *scale,
                      const uint16_t *mins, int64_t G, const float *bias, void *y, int y_bf16, int64_t N, int64_t n0,
                      int64_t n1, float *sf) {
    int64_t ng = K / G, ldq = K / 2;
    float *mf = sf + 4 * ng, out[8][8];
    for (int64_t m = 0; m < M; m += 8) {
        int mt = M - m >= 8 ? 8 : (int)(M - m);
        int nr_full = mt <= 2 ? 4 : mt <= 4 ? 2 : 1;
        for (int64_t n = n0; n < n1; n += nr_full) {
            int nr = n1 - n >= nr_full ? nr_full : (int)(n1 - n);
            const uint8_t *qn = q + n * ldq;
            bf16_row_to_f32(scale + n * ng, sf, nr * ng); /* the tile's rows are contiguous */
            bf16_row_to_f32(mins + n * ng, mf, nr * ng);
            if (nr == nr_full) {
                switch (nr_full * 8 + mt) {
                case 4 * 8 + 1: INT4_TILE(4, 1); break;
                case 4 * 8 + 2: INT4_TILE(4, 2); break;
                case 2 * 8 + 3: INT4_TILE(2, 3); break;
                case 2 * 8 + 4: INT4_TILE(2, 4); break;
                case 1 * 8 + 5: INT4_TILE(1, 5); break;
                case 1 * 8 + 6: INT4_TILE(1, 6); break;
                case 1 * 8 + 7: INT4_TILE(1, 7); break;
                default: INT4_TILE(1, 8); break;
                }
            } else
                for (int i = 0; i < nr; i++)
                    for (int j = 0; j < mt; j++) {
                        float one[8][8];
                        int4_tile(a, m + j, K, G, qn + i * ldq, ldq, sf + i * ng, mf + i * ng, 1, 1, one);
                        out[i][j] = one[0][0];
                    }
            for (int i = 0; i < nr; i++)
                for (int j = 0; j < mt; j++)
                    store_row(y, y_bf16, (m + j) * N + n + i, out[i][j] + (bias ? bias[n + i] : 0.0f));
        }
    }
}

/* y [M, N] = x [M, K] @ dequant(q).T + bias. Returns 0, or -1 if out of memory. */
int q15_int4_linear(const void *x, int x_bf16, const uint8_t *q, const uint16_t *scale, const uint16_t *mins,
                    int64_t G, const float *bias, void *y, int y_bf16, int64_t M, int64_t N, int64_t K) {
    quantized_x a;
    if (quantize_x4(x, x_bf16, M, K, G, &a) != 0) {
        free_x(&a);
        return -1;
    }
    int failed = 0;
#pragma omp parallel
    {
        float *sf = malloc(sizeof(float) * 8 * (size_t)(K / G)); /* 4 rows of scales, 4 of minimums */
        if (!sf) {
#pragma omp atomic write
            failed = 1;
        } else {
            int64_t n0, n1;
            split_rows(N, 16, omp_get_thread_num(), omp_get_num_threads(), &n0, &n1);
            int4_rows(&a, M, K, q, scale, mins, G, bias, y, y_bf16, N, n0, n1, sf);
            free(sf);
        }
    }
    free_x(&a);
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------ bf16, fp32 */

/* Dense weights, for decode at batch 1-23: out[i][j] = sum_k w[i, k] x[j, k], NR weight rows by MT activation rows,
   fp32 sums in 16 lanes. bf16 uses vdpbf16ps (32 products per instruction, each exact in fp32, summed in fp32);
   fp32 uses fma. One weight load feeds MT activation rows. The next tile's rows are prefetched. */
__attribute__((target("avx512bf16"))) ALWAYS_INLINE void bf16_tile(const uint16_t *x, int64_t ldx,
                                                                    const uint16_t *w, int64_t K, int NR, int MT,
                                                                    float out[8][8]) {
    const char *next = (const char *)(w + NR * K);
    __m512 acc[4][8];
    _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512i wv[4];
        _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) {
            _mm_prefetch(next + 2 * (i * K + k), _MM_HINT_T0);
            wv[i] = _mm512_loadu_si512((const void *)(w + i * K + k));
        }
        _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + j * ldx + k));
            _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)wv[i], xv);
        }
    }
    if (k < K) {
        __mmask32 live = (__mmask32)((1ull << (K - k)) - 1);
        _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(live, x + j * ldx + k);
            _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)_mm512_maskz_loadu_epi16(live, w + i * K + k), xv);
        }
    }
    _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}

ALWAYS_INLINE void f32_tile(const float *x, int64_t ldx, const float *w, int64_t K, int NR, int MT,
                            float out[8][8]) {
    const char *next = (const char *)(w + NR * K);
    __m512 acc[4][8];
    _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv[4];
        _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) {
            _mm_prefetch(next + 4 * (i * K + k), _MM_HINT_T0);
            wv[i] = _mm512_loadu_ps(w + i * K + k);
        }
        _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) {
            __m512 xv = _mm512_loadu_ps(x + j * ldx + k);
            _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);
        }
    }
    if (k < K) {
        __mmask16 live = (__mmask16)((1u << (K - k)) - 1);
        _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) {
            __m512 xv = _mm512_maskz_loadu_ps(live, x + j * ldx + k);
            _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)
                acc[i][j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, w + i * K + k), xv, acc[i][j]);
        }
    }
    _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < MT; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}

/* 16 rows: at most 180 KB of fp32 weight (K 2816), which stays in L2 while the activation rows pass over it. */
#define DENSE_BLOCK 16
#define DENSE_CHUNK 128 /* weight rows per unit of work handed to a thread */

/* Tiles of 4 weight rows by up to 4 activation rows, or 2 by up to 8 (registers: NR * MT sums + NR weights). */
#define DENSE_TILE(fn, T, NR_)                                                                                     \
    switch (mt) {                                                                                                  \
    case 1: fn((const T *)x + m * K, K, (const T *)w + n * K, K, NR_, 1, out); break;                             \
    case 2: fn((const T *)x + m * K, K, (const T *)w + n * K, K, NR_, 2, out); break;                             \
    case 3: fn((const T *)x + m * K, K, (const T *)w + n * K, K, NR_, 3, out); break;                             \
    case 4: fn((const T *)x + m * K, K, (const T *)w + n * K, K, NR_, 4, out); break;                             \
    case 5: fn((const T *)x + m * K, K, (const T *)w + n * K, K, 2, 5, out); break;                               \
    case 6: fn((const T *)x + m * K, K, (const T *)w + n * K, K, 2, 6, out); break;                               \
    case 7: fn((const T *)x + m * K, K, (const T *)w + n * K, K, 2, 7, out); break;                               \
    default: fn((const T *)x + m * K, K, (const T *)w + n * K, K, 2, 8, out); break;                              \
    }

__attribute__((target("avx512bf16"))) static void dense_rows(const void *x, const void *w, int bf16,
                                                              const float *bias, void *y, int64_t M, int64_t N,
                                                              int64_t K, int64_t n0, int64_t n1) {
    float out[8][8];
    /* Blocks of DENSE_BLOCK weight rows, each read from memory once and then from cache for every 8 activation
       rows: at 9-64 rows the weights stream once, not once per 8 rows. */
    for (int64_t b = n0; b < n1; b += DENSE_BLOCK)
    for (int64_t m = 0; m < M; m += 8) {
        int mt = M - m >= 8 ? 8 : (int)(M - m);
        int nr_full = mt <= 4 ? 4 : 2;
        int64_t b1 = b + DENSE_BLOCK < n1 ? b + DENSE_BLOCK : n1;
        for (int64_t n = b; n < b1; n += nr_full) {
            int nr = b1 - n >= nr_full ? nr_full : (int)(b1 - n);
            if (nr == nr_full) {
                if (bf16) {
                    DENSE_TILE(bf16_tile, uint16_t, 4)
                } else {
                    DENSE_TILE(f32_tile, float, 4)
                }
            } else
                for (int i = 0; i < nr; i++) {
                    float one[8][8];
                    for (int j = 0; j < mt; j++) {
                        if (bf16)
                            bf16_tile((const uint16_t *)x + (m + j) * K, K, (const uint16_t *)w + (n + i) * K, K, 1, 1, one);
                        else
                            f32_tile((const float *)x + (m + j) * K, K, (const float *)w + (n + i) * K, K, 1, 1, one);
                        out[i][j] = one[0][0];
                    }
                }
            for (int i = 0; i < nr; i++)
                for (int j = 0; j < mt; j++)
                    store_row(y, bf16, (m + j) * N + n + i, out[i][j] + (bias ? bias[n + i] : 0.0f));
        }
    }
}

/* y [M, N] = x [M, K] @ w [N, K].T + bias, all bf16 (bf16 = 1) or all fp32; bias fp32 [N] or NULL. */
void q15_dense_linear(const void *x, const void *w, int bf16, const float *bias, void *y, int64_t M, int64_t N,
                      int64_t K) {
    /* chunks of DENSE_CHUNK rows to whichever thread is free: a thread that the OS preempts (a server's other
       threads share the cores) delays only its chunk, not half of the matrix */
    const int64_t chunks = (N + DENSE_CHUNK - 1) / DENSE_CHUNK;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t n0 = c * DENSE_CHUNK, n1 = n0 + DENSE_CHUNK < N ? n0 + DENSE_CHUNK : N;
        dense_rows(x, w, bf16, bias, y, M, N, K, n0, n1);
    }
}

/* ------------------------------------------------------------------------------------ bf16, fp32 at 24-64 rows */

/* From ~24 rows on the dot products above spend their time on loads and horizontal sums. Here the activations are
   transposed once per call (xt: 16 rows per vector, zero-padded to MV vectors; bf16 as pairs of columns, the
   layout vdpbf16ps takes) and each weight element (bf16: pair), read in place, is broadcast against the MV
   vectors: NR x MV fp32 sums stay in registers over the whole K, and the weights stream from memory once. The sum
   of each output runs over k in order, in fp32 (bf16: each pair's two products exact, added, then summed). */
#define WIDE_MV 4 /* vectors of 16 rows: 64 rows at most */

ALWAYS_INLINE void wide_f32_tile(const float *xt, int64_t K, const float *w, int NR, int MV, float *buf) {
    __m512 acc[16][WIDE_MV];
    _Pragma("GCC unroll 16") for (int i = 0; i < NR; i++)
        _Pragma("GCC unroll 4") for (int v = 0; v < MV; v++) acc[i][v] = _mm512_setzero_ps();
    const int64_t step = 16 * MV;
    for (int64_t k = 0; k < K; k++) {
        if ((k & 15) == 0)
            _Pragma("GCC unroll 16") for (int i = 0; i < NR; i++) _mm_prefetch((const char *)(w + i * K + k) + 512, _MM_HINT_T0);
        __m512 xv[WIDE_MV];
        _Pragma("GCC unroll 4") for (int v = 0; v < MV; v++) xv[v] = _mm512_loadu_ps(xt + k * step + 16 * v);
        _Pragma("GCC unroll 16") for (int i = 0; i < NR; i++) {
            __m512 wb = _mm512_set1_ps(w[i * K + k]);
            _Pragma("GCC unroll 4") for (int v = 0; v < MV; v++) acc[i][v] = _mm512_fmadd_ps(wb, xv[v], acc[i][v]);
        }
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < NR; i++)
        _Pragma("GCC unroll 4") for (int v = 0; v < MV; v++) _mm512_storeu_ps(buf + i * 64 + 16 * v, acc[i][v]);
}

__attribute__((target("avx512bf16"))) ALWAYS_INLINE void wide_bf16_tile(const uint32_t *xt, int64_t K,
                                                                         const uint16_t *w, int NR, int MV,
                                                                         float *buf) {
    __m512 acc[16][WIDE_MV];
    _Pragma("GCC unroll 16") for (int i = 0; i < NR; i++)
        _Pragma("GCC unroll 4") for (int v = 0; v < MV; v++) acc[i][v] = _mm512_setzero_ps();
    const int64_t step = 16 * MV;
    for (int64_t k = 0; k < K; k += 2) {
        if ((k & 31) == 0)
            _Pragma("GCC unroll 16") for (int i = 0; i < NR; i++) _mm_prefetch((const char *)(w + i * K + k) + 512, _MM_HINT_T0);
        __m512i xv[WIDE_MV];
        _Pragma("GCC unroll 4") for (int v = 0; v < MV; v++)
            xv[v] = _mm512_loadu_si512((const void *)(xt + (k / 2) * step + 16 * v));
        _Pragma("GCC unroll 16") for (int i = 0; i < NR; i++) {
            uint32_t pair;
            memcpy(&pair, w + i * K + k, 4);
            __m512i wb = _mm512_set1_epi32((int)pair);
            _Pragma("GCC unroll 4") for (int v = 0; v < MV; v++)
                acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)xv[v], (__m512bh)wb);
        }
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < NR; i++)
        _Pragma("GCC unroll 4") for (int v = 0; v < MV; v++) _mm512_storeu_ps(buf + i * 64 + 16 * v, acc[i][v]);
}

/* weight rows per tile for MV vectors of rows: NR x MV sums of 32 registers, the rest for rows and broadcasts */
#define WIDE_NR(MV) ((MV) == 1 ? 16 : (MV) == 2 ? 12 : (MV) == 3 ? 8 : 6)

/* one tile of WIDE_NR(MV) weight rows, or of one row (ONE = 1), with MV a constant in each case */
#define WIDE_TILE(fn, XT, W, ONE, OUT)                                                                             \
    switch (MV) {                                                                                                  \
    case 1: fn(XT, K, W, ONE ? 1 : WIDE_NR(1), 1, OUT); break;                                                    \
    case 2: fn(XT, K, W, ONE ? 1 : WIDE_NR(2), 2, OUT); break;                                                    \
    case 3: fn(XT, K, W, ONE ? 1 : WIDE_NR(3), 3, OUT); break;                                                    \
    default: fn(XT, K, W, ONE ? 1 : WIDE_NR(4), 4, OUT); break;                                                   \
    }

/* the NR weight rows from n (fewer at the end) against all M rows, into y */
__attribute__((target("avx512bf16"))) static void wide_tile_rows(const void *xt, const void *w, int bf16,
                                                                  const float *bias, void *y, int64_t M, int64_t N,
                                                                  int64_t K, int MV, int64_t n) {
    float buf[16 * 64];
    const int NR = WIDE_NR(MV);
    const int nr = N - n >= NR ? NR : (int)(N - n);
    if (nr == NR) {
        if (bf16) {
            WIDE_TILE(wide_bf16_tile, (const uint32_t *)xt, (const uint16_t *)w + n * K, 0, buf)
        } else {
            WIDE_TILE(wide_f32_tile, (const float *)xt, (const float *)w + n * K, 0, buf)
        }
    } else
        for (int i = 0; i < nr; i++) { /* the last rows, one at a time */
            if (bf16) {
                WIDE_TILE(wide_bf16_tile, (const uint32_t *)xt, (const uint16_t *)w + (n + i) * K, 1, buf + i * 64)
            } else {
                WIDE_TILE(wide_f32_tile, (const float *)xt, (const float *)w + (n + i) * K, 1, buf + i * 64)
            }
        }
    for (int64_t m = 0; m < M; m++)
        for (int i = 0; i < nr; i++) store_row(y, bf16, m * N + n + i, buf[i * 64 + m] + (bias ? bias[n + i] : 0.0f));
}

/* y [M, N] = x [M, K] @ w [N, K].T + bias for 1 <= M <= 64 (bf16: K even); returns -1 when out of memory. */
int q15_dense_wide_linear(const void *x, const void *w, int bf16, const float *bias, void *y, int64_t M, int64_t N,
                          int64_t K) {
    if (M < 1 || M > 16 * WIDE_MV || (bf16 && K % 2)) return -2;
    const int MV = (int)((M + 15) / 16);
    const int64_t step = 16 * MV;
    void *xt = aligned_alloc(64, (size_t)(((K * step * 4) + 63) / 64 * 64));
    if (!xt) return -1;
    if (bf16) {
        const uint16_t *xs = x;
        uint32_t *t = xt;
        for (int64_t kp = 0; kp < K / 2; kp++)
            for (int64_t m = 0; m < step; m++)
                t[kp * step + m] = m < M ? (uint32_t)xs[m * K + 2 * kp] | (uint32_t)xs[m * K + 2 * kp + 1] << 16 : 0u;
    } else {
        const float *xs = x;
        float *t = xt;
        for (int64_t k = 0; k < K; k++)
            for (int64_t m = 0; m < step; m++) t[k * step + m] = m < M ? xs[m * K + k] : 0.0f;
    }
    const int NR = WIDE_NR(MV);
    const int64_t tiles = (N + NR - 1) / NR;
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t tile = 0; tile < tiles; tile++) wide_tile_rows(xt, w, bf16, bias, y, M, N, K, MV, tile * NR);
    free(xt);
    return 0;
}

/* ------------------------------------------------------------------------------------------------ dequantize */

/* w [N, K] (bf16 or fp32) = q * scale (for long prompts, which then run one dense matrix product). */
void q15_int8_dequantize(const int8_t *q, const float *scale, void *w, int w_bf16, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        __m512 s = _mm512_set1_ps(scale[n]);
        for (int64_t k = 0; k < K; k += 16) {
            __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + n * K + k))));
            store16(w, w_bf16, n * K + k, _mm512_mul_ps(v, s));
        }
    }
}

/* w [N, K] (bf16 or fp32) = q * scale + min: each row's codes first put back in column order, then scaled. */
void q15_int4_dequantize(const uint8_t *q, const uint16_t *scale, const uint16_t *mins, int64_t G, void *w,
                         int w_bf16, int64_t N, int64_t K) {
    int64_t ng = K / G, S = G / 4;
#pragma omp parallel
    {
        uint8_t *codes = malloc((size_t)K + 64);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *row = q + n * (K / 2);
            for (int64_t g = 0; g < ng; g++)
                for (int64_t st = 0; st < S / 2; st++) {
                    uint32_t v;
                    memcpy(&v, row + int4_offset(G, ng, g, st), 4);
                    uint32_t lo = v & 0x0f0f0f0fu, hi = (v >> 4) & 0x0f0f0f0fu;
                    memcpy(codes + g * G + 4 * st, &lo, 4);
                    memcpy(codes + g * G + 4 * (st + S / 2), &hi, 4);
                }
            for (int64_t k = 0; k < K; k += 16) {
                __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + k))));
                __m512 s = _mm512_set1_ps(bf16_to_f32(scale[n * ng + k / G]));
                __m512 mn = _mm512_set1_ps(bf16_to_f32(mins[n * ng + k / G]));
                store16(w, w_bf16, n * K + k, _mm512_fmadd_ps(v, s, mn));
            }
        }
        free(codes);
    }
}

/* Bytes summed by all threads reading a buffer once (a read-only memory bandwidth probe; returns the sum). */
double q15_read_bytes(const uint8_t *buf, int64_t n) {
    double total = 0;
#pragma omp parallel reduction(+ : total)
    {
        int64_t n0, n1;
        split_rows(n, 4096, omp_get_thread_num(), omp_get_num_threads(), &n0, &n1);
        __m512i acc = _mm512_setzero_si512();
        for (int64_t i = n0; i + 64 <= n1; i += 64)
            acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_loadu_si512((const void *)(buf + i)), _mm512_setzero_si512()));
        total += (double)_mm512_reduce_add_epi64(acc);
    }
    return total;
}
