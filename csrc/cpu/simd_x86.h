// AVX-512 helpers for the row decompressors. Functions carry their own target attribute
// (the extension is built without -march), so callers must check avx512_active() first.
#pragma once

#include "cpu/block_mm.h"

#ifdef SLIMSTACK_X86
// GCC 12 flags the deliberately undefined pass-through operand of its own AVX-512
// intrinsics (_mm512_undefined_*) as maybe-uninitialized: a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#define SLIMSTACK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

namespace slimstack::cpu {

SLIMSTACK_AVX512 inline __mmask16 low_lanes(unsigned n) {
  return static_cast<__mmask16>((1u << n) - 1u);
}

// The first n (<= 16) values at p as fp32 lanes 0..n-1, other lanes zero. Masked loads
// read only those n values, so a row's last chunk never touches memory past its slot.
SLIMSTACK_AVX512 inline __m512 load_as_float(const float* p, unsigned n) {
  return _mm512_maskz_loadu_ps(low_lanes(n), p);
}

SLIMSTACK_AVX512 inline __m512 load_as_float(const c10::Half* p, unsigned n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(low_lanes(n), p));
}

SLIMSTACK_AVX512 inline __m512 load_as_float(const c10::BFloat16* p, unsigned n) {
  const __m512i widened = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(low_lanes(n), p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(widened, 16));  // bf16 is fp32's top half
}

}  // namespace slimstack::cpu

#pragma GCC diagnostic pop
#endif  // SLIMSTACK_X86
