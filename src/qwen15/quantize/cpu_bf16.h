/* bf16 <-> fp32 for the CPU kernels (cpu_kernels.c, cpu_decode_ops.c, cpu_amx.c): one copy of the conversions and
   of the 16-lane loads and stores in either dtype. Rounding is to nearest even, as torch's. */

#ifndef QWEN15_CPU_BF16_H
#define QWEN15_CPU_BF16_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* element i of a bf16 (bf16 = 1) or fp32 array, as fp32 */
static inline float load1(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* 16 elements from element i, as fp32 */
static inline __attribute__((always_inline)) __m512 load16(const void *p, int bf16, int64_t i) {
    if (bf16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
    return _mm512_loadu_ps((const float *)p + i);
}

/* each lane rounded to bf16, in the high half of its 32 bits (finite values) */
static inline __attribute__((always_inline)) __m512i bf16_bits16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u));
}

/* 16 fp32 -> 16 bf16 (finite values) */
static inline __attribute__((always_inline)) __m256i f32x16_to_bf16(__m512 v) {
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits16(v), 16));
}

/* 16 lanes stored from element i in the array's dtype */
static inline __attribute__((always_inline)) void store16(void *p, int bf16, int64_t i, __m512 v) {
    if (bf16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), f32x16_to_bf16(v));
    else
        _mm512_storeu_ps((float *)p + i, v);
}

#endif
