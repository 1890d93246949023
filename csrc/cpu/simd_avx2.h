// AVX2 helpers for the small-M kernels, which multiply packed rows without decompressing
// them. Functions carry their own target attribute (the extension is built without -march),
// so callers must check small_m_path() first.
#pragma once

#include "cpu/block_mm.h"

#ifdef SLIMSTACK_X86
#include <immintrin.h>

#define SLIMSTACK_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace slimstack::cpu {

// Eight values at p as fp32 lanes.
SLIMSTACK_AVX2 inline __m256 load8_as_float(const float* p) { return _mm256_loadu_ps(p); }

SLIMSTACK_AVX2 inline __m256 load8_as_float(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

SLIMSTACK_AVX2 inline __m256 load8_as_float(const c10::BFloat16* p) {
  const __m256i widened =
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(widened, 16));  // bf16 is fp32's top half
}

// Eight bytes at p as int32 lanes, zero- or sign-extended: the lookup tables of the
// kernels are bytes (a 256-entry table of 8 lanes is 2 KiB, not 8, and L1 is 32 KiB).
SLIMSTACK_AVX2 inline __m256i load8_u8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

SLIMSTACK_AVX2 inline __m256i load8_i8(const int8_t* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

SLIMSTACK_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Two accumulators per x row (they hide the FMA latency): acc[m] += lo * x[m, 0:8] and
// hi * x[m, 8:16] for the MB rows of x at stride ldx, given 16 expanded weight columns.
template <int MB>
SLIMSTACK_AVX2 inline void fma16(__m256 (&acc)[MB][2], __m256 lo, __m256 hi, const float* x,
                                 int64_t ldx) {
  for (int m = 0; m < MB; ++m) {
    acc[m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * ldx), acc[m][0]);
    acc[m][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * ldx + 8), acc[m][1]);
  }
}

// out[m * ldo] = the sum of x row m's accumulators, rounded once to T.
template <typename T, int MB>
SLIMSTACK_AVX2 inline void store_sums(const __m256 (&acc)[MB][2], T* out, int64_t ldo) {
  for (int m = 0; m < MB; ++m)
    out[m * ldo] = from_float<T>(hsum(_mm256_add_ps(acc[m][0], acc[m][1])));
}

}  // namespace slimstack::cpu
#endif  // SLIMSTACK_X86
