// AVX-512 (F/BW/VBMI2) expansion of packed weight columns, shared by the dense-tile
// decompression (decompress.cpp) and the bf16 dot kernels (bf16_dot.cpp): a mask of a
// block's kept columns places its stored values in column order, zeros elsewhere. Callers
// check avx512_active() first; every function carries its own target attribute.
#pragma once

#include "cpu/block_mm.h"

#ifdef SLIMSTACK_X86
#include <immintrin.h>

#include <array>
#include <cstring>

#define SLIMSTACK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vbmi2")))

namespace slimstack::cpu {

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t word;
  std::memcpy(&word, p, sizeof(word));
  return word;
}

// A meta nibble (one group: i0 | i1 << 2) -> its 4 columns' kept bits.
inline constexpr std::array<uint8_t, 16> kSparse24NibbleBits = [] {
  std::array<uint8_t, 16> bits{};
  for (int n = 0; n < 16; ++n) bits[n] = static_cast<uint8_t>((1 << (n & 3)) | (1 << (n >> 2)));
  return bits;
}();

// The kept-column mask of 64 columns of a sparse24 row from their 8 meta bytes: two
// vpshufb nibble lookups in one xmm. Four scalar table loads per 32 columns (about 50
// integer instructions per 64 columns) bounded the M = 1 dot kernel at ~6 bytes per cycle.
SLIMSTACK_AVX512 inline __mmask64 sparse24_kept64(const uint8_t* meta) {
  __m128i low_bits;
  std::memcpy(&low_bits, kSparse24NibbleBits.data(), sizeof(low_bits));
  const __m128i high_bits = _mm_slli_epi16(low_bits, 4);  // values < 16: no carry across bytes
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m128i m = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(meta));
  const __m128i kept =
      _mm_or_si128(_mm_shuffle_epi8(low_bits, _mm_and_si128(m, nibble)),
                   _mm_shuffle_epi8(high_bits, _mm_and_si128(_mm_srli_epi16(m, 4), nibble)));
  return _cvtu64_mask64(static_cast<uint64_t>(_mm_cvtsi128_si64(kept)));
}

// Bits [32 h, 32 h + 32) or [16 q, 16 q + 16) of a 64-column mask.
SLIMSTACK_AVX512 inline __mmask32 mask_half(__mmask64 kept, int h) {
  return static_cast<__mmask32>(_cvtmask64_u64(kept) >> (32 * h));
}
SLIMSTACK_AVX512 inline __mmask16 mask_quarter(__mmask64 kept, int q) {
  return static_cast<__mmask16>(_cvtmask64_u64(kept) >> (16 * q));
}

// 32 columns of a sparse24 row of a 16-bit type: the 16 values at v in the kept columns.
SLIMSTACK_AVX512 inline __m512i sparse24_expand32(const uint16_t* v, __mmask32 kept) {
  const __m512i values =
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
  return _mm512_maskz_expand_epi16(kept, values);
}

// 16 fp32 columns of a sparse24 row: 8 values.
SLIMSTACK_AVX512 inline __m512 sparse24_expand16(const float* v, __mmask16 kept) {
  return _mm512_maskz_expand_ps(kept, _mm512_castps256_ps512(_mm256_loadu_ps(v)));
}

// 32 columns of a bitmap row of a 16-bit type; advances v past the block's values.
// Masked (Checked): only those values are loaded, so nothing past a row that fits its slot
// is read; else a full 32-value load, which reads up to 31 values past them (masked loads
// stream from memory at about half the rate on Zen 4, so only a weight's last rows use them).
template <bool Checked>
SLIMSTACK_AVX512 inline __m512i bitmap_expand32(const uint16_t*& v, const uint8_t* bits) {
  const uint32_t kept = load_u32(bits);
  const int count = __builtin_popcount(kept);
  const __m512i values =
      Checked ? _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t{1} << count) - 1), v)
              : _mm512_loadu_si512(v);
  v += count;
  return _mm512_maskz_expand_epi16(kept, values);
}

// 16 fp32 columns of a bitmap row; advances v (Checked as above).
template <bool Checked>
SLIMSTACK_AVX512 inline __m512 bitmap_expand16(const float*& v, const uint8_t* bits) {
  uint16_t kept;
  std::memcpy(&kept, bits, sizeof(kept));
  const int count = __builtin_popcount(kept);
  const __m512 values =
      Checked ? _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), v)
              : _mm512_loadu_ps(v);
  v += count;
  return _mm512_maskz_expand_ps(kept, values);
}

// Whether a row ending at value `end` needs the checked loads: a block's full load reads at
// most 31 values past the row's last one.
inline bool near_values_end(int64_t end, int64_t values_numel) { return end + 32 > values_numel; }

}  // namespace slimstack::cpu
#endif  // SLIMSTACK_X86
