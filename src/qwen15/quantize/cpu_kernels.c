/* Weight-only int8 and int4 matrix products for x86 CPUs with AVX-512 (F, BW, VL, BF16).

   Built at first use by qwen15/quantize/kernels.py with the system C compiler (gcc -O3 -fopenmp), loaded with
   ctypes: no Python or torch headers. -fopenmp makes the library need libgomp.so.1, which resolves to the one torch
   has already loaded, so these kernels share torch's thread pool and follow torch.set_num_threads.

   Decode multiplies a few rows of activations by a large weight matrix, so it is bound by reading the weights:
   these kernels read each weight byte once per call and dequantize in registers.

   int8:  w[n, k] = q[n, k] * scale[n]            q int8 [N, K] row-major, scale fp32 [N]
          y = x @ w.T, computed as scale[n] * sum_k q[n, k] * x[k] with fp32 products and sums.
   int4:  w[n, k] = q[n, k] * scale[n, g] + min[n, g], g = k / G     q in 0..15, scale and min bf16 [N, K / G]
          Packed as uint8 [N, K / 2]: in each chunk of 64 columns (32 bytes) byte j holds column j in its low
          nibble and column j + 32 in its high nibble; a last chunk of 32 columns (16 bytes) holds j and j + 16.
          A nibble q or'ed into 0x4300 is the bf16 number 128 + q, so the products run as bf16 dot products
          (vdpbf16ps, fp32 accumulation) of (128 + q) with bf16 activations; the 128 * sum(x) this adds is taken
          off with the group sums of x: y = sum_g scale_g * D_g + (min_g - 128 * scale_g) * sum_{k in g} x_k.
   x and y are bf16 or fp32 (flags), [M, K] and [M, N], row-major; bias fp32 [N] or NULL. */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

static float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

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

static void *aligned_buffer(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
    return p;
}

/* ------------------------------------------------------------------------------------------------ int8 */

/* acc[i][j] = dot(q row i, x row j) over K for NR weight rows and MT activation rows (fp32). The rows of a tile
   are contiguous; the next tile's bytes are prefetched as this one's are read (four rows read side by side are too
   short streams for the hardware prefetcher to follow on its own). */
ALWAYS_INLINE void int8_tile(const float *x, int64_t K, const int8_t *q, int64_t ldq, int NR, int MT,
                             float out[4][4]) {
    const char *next = (const char *)(q + NR * ldq);
    __m512 acc[4][4];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MT; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m512 w[4];
        if ((k * NR) % 64 == 0) _mm_prefetch(next + k * NR, _MM_HINT_T0);
        for (int i = 0; i < NR; i++)
            w[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i * ldq + k))));
        for (int j = 0; j < MT; j++) {
            __m512 xv = _mm512_loadu_ps(x + j * K + k);
            for (int i = 0; i < NR; i++) acc[i][j] = _mm512_fmadd_ps(w[i], xv, acc[i][j]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MT; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}

static void int8_rows(const float *x, int64_t M, int64_t K, const int8_t *q, const float *scale,
                      const float *bias, void *y, int y_bf16, int64_t N, int64_t n0, int64_t n1) {
    float out[4][4];
    for (int64_t n = n0; n < n1; n += 4) {
        int nr = n1 - n >= 4 ? 4 : (int)(n1 - n);
        for (int64_t m = 0; m < M; m += 4) {
            int mt = M - m >= 4 ? 4 : (int)(M - m);
            const float *xm = x + m * K;
            const int8_t *qn = q + n * K;
            /* constant tile shapes, so that each call below is fully unrolled */
            if (nr == 4 && mt == 1) int8_tile(xm, K, qn, K, 4, 1, out);
            else if (nr == 4 && mt == 4) int8_tile(xm, K, qn, K, 4, 4, out);
            else if (nr == 4 && mt == 2) int8_tile(xm, K, qn, K, 4, 2, out);
            else if (nr == 4 && mt == 3) int8_tile(xm, K, qn, K, 4, 3, out);
            else {
                for (int i = 0; i < nr; i++) {
                    float one[4][4];
                    for (int j = 0; j < mt; j++) {
                        int8_tile(xm + j * K, K, qn + i * K, K, 1, 1, one);
                        out[i][j] = one[0][0];
                    }
                }
            }
            for (int i = 0; i < nr; i++)
                for (int j = 0; j < mt; j++) {
                    float v = out[i][j] * scale[n + i] + (bias ? bias[n + i] : 0.0f);
                    store_row(y, y_bf16, (m + j) * N + n + i, v);
                }
        }
    }
}

/* y [M, N] = x [M, K] @ (q * scale).T + bias. K must be a multiple of 16. Returns 0, or -1 if out of memory. */
int q15_int8_linear(const void *x, int x_bf16, const int8_t *q, const float *scale, const float *bias, void *y,
                    int y_bf16, int64_t M, int64_t N, int64_t K) {
    float *xf = aligned_buffer(sizeof(float) * M * K);
    if (!xf) return -1;
    for (int64_t i = 0; i < M * K; i++) xf[i] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
#pragma omp parallel
    {
        int64_t n0, n1;
        split_rows(N, 16, omp_get_thread_num(), omp_get_num_threads(), &n0, &n1);
        int8_rows(xf, M, K, q, scale, bias, y, y_bf16, N, n0, n1);
    }
    free(xf);
    return 0;
}

/* ------------------------------------------------------------------------------------------------ int4 */

/* The 64 columns of a full chunk (32 bytes) as bf16 128 + q: columns 0..31 in *lo, 32..63 in *hi. */
ALWAYS_INLINE void int4_chunk(const uint8_t *chunk, __m512i *lo, __m512i *hi) {
    const __m512i magic = _mm512_set1_epi16(0x4300);
    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)chunk));
    *lo = _mm512_ternarylogic_epi32(v, _mm512_set1_epi16(0x000f), magic, 0xea); /* (v & 0xf) | magic */
    *hi = _mm512_or_si512(_mm512_srli_epi16(v, 4), magic);
}

/* The 32 columns of a tail chunk (16 bytes) as bf16 128 + q. */
ALWAYS_INLINE __m512i int4_tail(const uint8_t *chunk) {
    __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)chunk));
    __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1);
    return _mm512_ternarylogic_epi32(v, _mm512_set1_epi16(0x000f), _mm512_set1_epi16(0x4300), 0xea);
}

#define DP(acc, w, x) _mm512_dpbf16_ps((acc), (__m512bh)(w), (__m512bh)(x))
#define XV(j, k) _mm512_loadu_si512((const void *)(x + (j) * K + (k)))

/* out[i][j] = sum_g scale[i][g] * D_g(row i, x row j), D_g = dot of bf16 (128 + q) with x over group g.
   Groups of 32 columns, or of a multiple of 64 (then K is a multiple of 64 and every chunk is full). */
ALWAYS_INLINE void int4_tile(const uint16_t *x, int64_t K, const uint8_t *q, int64_t ldq, const float *sc,
                             int64_t ng, int64_t G, int NR, int MT, float out[4][4]) {
    const char *next = (const char *)(q + NR * ldq); /* prefetched as in int8_tile */
    __m512 acc[4][4];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MT; j++) acc[i][j] = _mm512_setzero_ps();
    if (G == 32) {
        int64_t full = K / 64 * 64;
        for (int64_t k = 0; k < full; k += 64) {
            __m512i lo[4], hi[4];
            for (int b = 0; b < NR * 32; b += 64) _mm_prefetch(next + k / 2 * NR + b, _MM_HINT_T0);
            for (int i = 0; i < NR; i++) int4_chunk(q + i * ldq + k / 2, &lo[i], &hi[i]);
            for (int j = 0; j < MT; j++) {
                __m512i x0 = XV(j, k), x1 = XV(j, k + 32);
                for (int i = 0; i < NR; i++) {
                    __m512 d0 = DP(_mm512_setzero_ps(), lo[i], x0), d1 = DP(_mm512_setzero_ps(), hi[i], x1);
                    acc[i][j] = _mm512_fmadd_ps(d0, _mm512_set1_ps(sc[i * ng + k / 32]), acc[i][j]);
                    acc[i][j] = _mm512_fmadd_ps(d1, _mm512_set1_ps(sc[i * ng + k / 32 + 1]), acc[i][j]);
                }
            }
        }
        if (full < K) {
            __m512i w[4];
            for (int i = 0; i < NR; i++) w[i] = int4_tail(q + i * ldq + full / 2);
            for (int j = 0; j < MT; j++) {
                __m512i x0 = XV(j, full);
                for (int i = 0; i < NR; i++) {
                    __m512 d = DP(_mm512_setzero_ps(), w[i], x0);
                    acc[i][j] = _mm512_fmadd_ps(d, _mm512_set1_ps(sc[i * ng + full / 32]), acc[i][j]);
                }
            }
        }
    } else {
        for (int64_t g = 0; g < ng; g++) {
            __m512 d[4][4];
            for (int i = 0; i < NR; i++)
                for (int j = 0; j < MT; j++) d[i][j] = _mm512_setzero_ps();
            for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
                __m512i lo[4], hi[4];
                for (int b = 0; b < NR * 32; b += 64) _mm_prefetch(next + k / 2 * NR + b, _MM_HINT_T0);
                for (int i = 0; i < NR; i++) int4_chunk(q + i * ldq + k / 2, &lo[i], &hi[i]);
                for (int j = 0; j < MT; j++) {
                    __m512i x0 = XV(j, k), x1 = XV(j, k + 32);
                    for (int i = 0; i < NR; i++) d[i][j] = DP(DP(d[i][j], lo[i], x0), hi[i], x1);
                }
            }
            for (int i = 0; i < NR; i++)
                for (int j = 0; j < MT; j++)
                    acc[i][j] = _mm512_fmadd_ps(d[i][j], _mm512_set1_ps(sc[i * ng + g]), acc[i][j]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MT; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}

static void int4_rows(const uint16_t *x, const float *xsum, int64_t M, int64_t K, const uint8_t *q,
                      const uint16_t *scale, const uint16_t *mins, int64_t G, const float *bias, void *y,
                      int y_bf16, int64_t N, int64_t n0, int64_t n1, float *sc) {
    int64_t ng = K / G, ldq = K / 2;
    int block = M == 1 ? 4 : 2; /* weight rows per tile: 4 x 1 or 2 x 4 tiles keep every accumulator in a register */
    float out[4][4];
    for (int64_t n = n0; n < n1; n += block) {
        int nr = n1 - n >= block ? block : (int)(n1 - n);
        const uint8_t *qn = q + n * ldq;
        for (int i = 0; i < nr; i++)
            for (int64_t g = 0; g < ng; g++) sc[i * ng + g] = bf16_to_f32(scale[(n + i) * ng + g]);
        for (int64_t m = 0; m < M; m += 4) {
            int mt = M - m >= 4 ? 4 : (int)(M - m);
            const uint16_t *xm = x + m * K;
            if (nr == 4 && mt == 1) int4_tile(xm, K, qn, ldq, sc, ng, G, 4, 1, out);
            else if (nr == 2 && mt == 4) int4_tile(xm, K, qn, ldq, sc, ng, G, 2, 4, out);
            else if (nr == 2 && mt == 3) int4_tile(xm, K, qn, ldq, sc, ng, G, 2, 3, out);
            else if (nr == 2 && mt == 2) int4_tile(xm, K, qn, ldq, sc, ng, G, 2, 2, out);
            else if (nr == 2 && mt == 1) int4_tile(xm, K, qn, ldq, sc, ng, G, 2, 1, out);
            else {
                for (int i = 0; i < nr; i++)
                    for (int j = 0; j < mt; j++) {
                        float one[4][4];
                        int4_tile(xm + j * K, K, qn + i * ldq, ldq, sc + i * ng, ng, G, 1, 1, one);
                        out[i][j] = one[0][0];
                    }
            }
            for (int i = 0; i < nr; i++)
                for (int j = 0; j < mt; j++) {
                    float v = out[i][j];
                    const float *xs = xsum + (m + j) * ng;
                    for (int64_t g = 0; g < ng; g++)
                        v += (bf16_to_f32(mins[(n + i) * ng + g]) - 128.0f * sc[i * ng + g]) * xs[g];
                    store_row(y, y_bf16, (m + j) * N + n + i, v + (bias ? bias[n + i] : 0.0f));
                }
        }
    }
}

/* y [M, N] = x [M, K] @ dequant(q).T + bias with group size G (a multiple of 32 dividing K; K a multiple of 32).
   fp32 activations are rounded to bf16 first. Returns 0, or -1 if out of memory. */
int q15_int4_linear(const void *x, int x_bf16, const uint8_t *q, const uint16_t *scale, const uint16_t *mins,
                    int64_t G, const float *bias, void *y, int y_bf16, int64_t M, int64_t N, int64_t K) {
    int64_t ng = K / G;
    uint16_t *xb = aligned_buffer(sizeof(uint16_t) * M * K);
    float *xsum = aligned_buffer(sizeof(float) * M * ng);
    if (!xb || !xsum) {
        free(xb);
        free(xsum);
        return -1;
    }
    for (int64_t i = 0; i < M * K; i++) xb[i] = x_bf16 ? ((const uint16_t *)x)[i] : f32_to_bf16(((const float *)x)[i]);
    for (int64_t i = 0; i < M * ng; i++) {
        float s = 0.0f;
        for (int64_t k = 0; k < G; k++) s += bf16_to_f32(xb[i * G + k]);
        xsum[i] = s;
    }
    int failed = 0;
#pragma omp parallel
    {
        float *sc = aligned_buffer(sizeof(float) * 4 * ng);
        if (!sc) {
#pragma omp atomic write
            failed = 1;
        } else {
            int64_t n0, n1;
            split_rows(N, 16, omp_get_thread_num(), omp_get_num_threads(), &n0, &n1);
            int4_rows(xb, xsum, M, K, q, scale, mins, G, bias, y, y_bf16, N, n0, n1, sc);
            free(sc);
        }
    }
    free(xb);
    free(xsum);
    return failed ? -1 : 0;
}

/* 16 weights v * s + mn stored as bf16 or fp32. */
ALWAYS_INLINE void store16(void *w, int w_bf16, int64_t idx, __m512 v) {
    if (w_bf16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)w + idx), (__m256i)_mm512_cvtneps_pbh(v));
    else
        _mm512_storeu_ps((float *)w + idx, v);
}

/* 32 nibble values (16-bit lanes) times s plus mn, to columns k..k+31 of row n. */
ALWAYS_INLINE void int4_store32(void *w, int w_bf16, int64_t at, __m512i v, __m512 s, __m512 mn) {
    __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)));
    __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)));
    store16(w, w_bf16, at, _mm512_fmadd_ps(f0, s, mn));
    store16(w, w_bf16, at + 16, _mm512_fmadd_ps(f1, s, mn));
}

/* w [N, K] (bf16 or fp32) = q * scale + min (for long prompts, which then run one dense matrix product). */
void q15_int4_dequantize(const uint8_t *q, const uint16_t *scale, const uint16_t *mins, int64_t G, void *w,
                         int w_bf16, int64_t N, int64_t K) {
    int64_t ng = K / G, full = K / 64 * 64;
    const __m512i mask = _mm512_set1_epi16(0x000f);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = q + n * (K / 2);
        for (int64_t k = 0; k < K; k += 32) {
            int64_t g = k / G;
            __m512 s = _mm512_set1_ps(bf16_to_f32(scale[n * ng + g])), mn = _mm512_set1_ps(bf16_to_f32(mins[n * ng + g]));
            __m512i v;
            if (k < full) {
                __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + (k & ~(int64_t)63) / 2)));
                v = (k & 32) ? _mm512_srli_epi16(b, 4) : _mm512_and_si512(b, mask);
            } else {
                __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(row + full / 2)));
                v = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1), mask);
            }
            int4_store32(w, w_bf16, n * K + k, v, s, mn);
        }
    }
}

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

/* Bytes read per second by all threads summing a buffer (a read-only memory bandwidth probe). */
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
