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

// Meta byte (two groups, i0 | i1 << 2 per nibble, i0 < i1) -> its 8 columns' kept bits.
inline constexpr std::array<uint8_t, 256> kSparse24KeptBits = [] {
  std::array<uint8_t, 256> bits{};
  for (int b = 0; b < 256; ++b) {
    bits[b] = static_cast<uint8_t>((1 << (b & 3)) | (1 << ((b >> 2) & 3)) |
                                   (1 << (4 + ((b >> 4) & 3))) | (1 << (4 + (b >> 6))));
  }
  return bits;
}();

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t word;
  std::memcpy(&word, p, sizeof(word));
  return word;
}

// 32 columns of a sparse24 row of a 16-bit type: 16 values at v, 4 meta bytes at meta.
SLIMSTACK_AVX512 inline __m512i sparse24_expand32(const uint16_t* v, const uint8_t* meta) {
  const uint32_t word = load_u32(meta);
  const __mmask32 kept = kSparse24KeptBits[word & 0xFF] |
                         kSparse24KeptBits[(word >> 8) & 0xFF] << 8 |
                         kSparse24KeptBits[(word >> 16) & 0xFF] << 16 |
                         static_cast<uint32_t>(kSparse24KeptBits[word >> 24]) << 24;
  const __m512i values =
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
  return _mm512_maskz_expand_epi16(kept, values);
}

// 16 fp32 columns of a sparse24 row: 8 values, 2 meta bytes.
SLIMSTACK_AVX512 inline __m512 sparse24_expand16(const float* v, const uint8_t* meta) {
  const __mmask16 kept = kSparse24KeptBits[meta[0]] | kSparse24KeptBits[meta[1]] << 8;
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
