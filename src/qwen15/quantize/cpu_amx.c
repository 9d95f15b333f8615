/* bf16 matrix products for decode on Intel AMX tiles (Sapphire Rapids and later): y = x @ w.T + bias, a few rows.

   Why: at 8 rows and more, AVX-512's vdpbf16ps (32 multiply-adds per instruction) cannot keep up with the weights
   that memory delivers, so batched decode becomes compute-bound (bench/RESULTS.md). One AMX tdpbf16ps multiplies a
   16 x 32 block of weights by up to 16 activation rows (16 x 32 x 16 multiply-adds), so the product stays bound by
   reading the weights (to ~32 rows here; at 64 rows still faster than oneDNN's product).

   Layout: the weight block is the A tile, read in place from the row-major weight [N, K] (16 rows of 64 bytes, a
   stride of 2K bytes), so the model keeps one plain copy for prompts (oneDNN) and decode alike. The activations are
   the B tile: x's column pairs (k, k + 1) as 32-bit words, transposed once per call into [K / 32][16][rows]. The
   C tile holds y.T for 16 weight rows (fp32 sums: each pair's products exact, summed in fp32, as vdpbf16ps does).
   A thread takes 16 weight rows at a time (one A tile per 32 columns) against up to four B tiles of 16
   activation rows (four C tiles); more rows run in further panels over the same, now cached, weight rows. Weights
   are prefetched four 32-column steps ahead.

   Linux gives a process the AMX state only on request (arch_prctl ARCH_REQ_XCOMP_PERM): q15_amx_init asks once.
   Compilers without AMX intrinsics (gcc < 11, clang < 12) build q15_amx_init returning -1, and kernels.py then
   keeps the AVX-512 kernel. */

#define _GNU_SOURCE
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu_bf16.h"

#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))
#define AHEAD 4 /* 32-column steps of weights prefetched ahead */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int q15_amx_init(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1; }

typedef struct { /* the LDTILECFG operand, palette 1 */
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* c: a stored C tile, [16 weight rows][ld] fp32 -> y[m, 0..16) in bf16 (round to nearest even) + bias, m < mt. */
AMX_TARGET static inline void store_tile(const float *c, int64_t ld, int64_t mt, const float *bias, uint16_t *y,
                                         int64_t ldy) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32((int)ld));
    const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int64_t m = 0; m < mt; m++) {
        __m512 v = _mm512_add_ps(_mm512_i32gather_ps(rows, c + m, 4), b);
        _mm256_storeu_si256((__m256i *)(y + m * ldy), f32x16_to_bf16(v));
    }
}

/* One weight block (16 rows) times a panel of NB activation blocks. Tiles: 0-3 C (one per activation block),
   4 A (the weights, loaded once per 32 columns for the whole panel), 5-7 B (the fourth block reuses 5). The
   weights are prefetched on the panel's first pass; later panels find them in the cache. */
#define PANEL(NB)                                                                                              \
    for (int64_t c = 0; c < nc; c++) {                                                                         \
        if (first && c + AHEAD < nc)                                                                           \
            for (int r = 0; r < 16; r++) _mm_prefetch((const char *)(wn + r * K + 32 * (c + AHEAD)), _MM_HINT_T0); \
        const uint32_t *xc = xp + c * 16 * mb;                                                                 \
        _tile_loadd(4, wn + 32 * c, K * 2);                                                                    \
        _tile_loadd(5, xc, mb * 4);                                                                            \
        _tile_dpbf16ps(0, 4, 5);                                                                               \
        if (NB > 1) {                                                                                          \
            _tile_loadd(6, xc + block, mb * 4);                                                                \
            _tile_dpbf16ps(1, 4, 6);                                                                           \
        }                                                                                                      \
        if (NB > 2) {                                                                                          \
            _tile_loadd(7, xc + 2 * block, mb * 4);                                                            \
            _tile_dpbf16ps(2, 4, 7);                                                                           \
        }                                                                                                      \
        if (NB > 3) {                                                                                          \
            _tile_loadd(5, xc + 3 * block, mb * 4);                                                            \
            _tile_dpbf16ps(3, 4, 5);                                                                           \
        }                                                                                                      \
    }

/* y [M, N] = x [M, K] @ w [N, K].T + bias, x, w, y bf16, bias fp32 [N] or NULL; M >= 1, N a multiple of 16, K of
   32. Returns 0, or -1 if out of memory. */
AMX_TARGET int q15_amx_bf16_linear(const uint16_t *x, const uint16_t *w, const float *bias, uint16_t *y, int64_t M,
                                   int64_t N, int64_t K) {
    /* activation blocks of mb rows (M itself up to 16, else 16: the last one padded with zeros) */
    int64_t nc = K / 32, mb = M < 16 ? M : 16, blocks = (M + mb - 1) / mb, block = nc * 16 * mb;
    uint32_t *xt = aligned_alloc(64, (size_t)(blocks * block * 4 + 64));
    if (!xt) return -1;
    const uint32_t *x32 = (const uint32_t *)x;
#pragma omp parallel
    {
        /* xt[b][c][p][j] = the pair x[b * mb + j, 32c + 2p], x[.., 32c + 2p + 1] as one word (0 past M) */
#pragma omp for schedule(static)
        for (int64_t bc = 0; bc < blocks * nc; bc++) {
            int64_t b = bc / nc, c = bc % nc;
            uint32_t *dst = xt + b * block + c * 16 * mb;
            for (int64_t j = 0; j < mb; j++) {
                int64_t m = b * mb + j;
                for (int p = 0; p < 16; p++) dst[p * mb + j] = m < M ? x32[m * (K / 2) + c * 16 + p] : 0;
            }
        }
        tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = (uint16_t)(mb * 4);
        cfg.colsb[4] = 64;
        _tile_loadconfig(&cfg);
        float out[4][16 * 16];
        /* taken in chunks of 8 blocks as threads come free, so that a thread the OS has preempted (the HTTP
           server's threads share these cores) delays only its chunk; 8 x 16 rows keep the weight streams long */
#pragma omp for schedule(dynamic, 8) nowait
        for (int64_t n = 0; n < N; n += 16) {
            const uint16_t *wn = w + n * K;
            for (int64_t b0 = 0; b0 < blocks; b0 += 4) { /* panels of up to 4 activation blocks */
                int nb = blocks - b0 < 4 ? (int)(blocks - b0) : 4, first = b0 == 0;
                const uint32_t *xp = xt + b0 * block;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                switch (nb) {
                case 1: PANEL(1) break;
                case 2: PANEL(2) break;
                case 3: PANEL(3) break;
                default: PANEL(4) break;
                }
                _tile_stored(0, out[0], mb * 4);
                if (nb > 1) _tile_stored(1, out[1], mb * 4);
                if (nb > 2) _tile_stored(2, out[2], mb * 4);
                if (nb > 3) _tile_stored(3, out[3], mb * 4);
                for (int i = 0; i < nb; i++) {
                    int64_t m = (b0 + i) * mb;
                    store_tile(out[i], mb, M - m < mb ? M - m : mb, bias ? bias + n : NULL, y + m * N + n, N);
                }
            }
        }
        _tile_release();
    }
    free(xt);
    return 0;
}

#else

int q15_amx_init(void) { return -1; }

int q15_amx_bf16_linear(const uint16_t *x, const uint16_t *w, const float *bias, uint16_t *y, int64_t M, int64_t N,
                        int64_t K) {
    (void)x, (void)w, (void)bias, (void)y, (void)M, (void)N, (void)K;
    return -1;
}

#endif
