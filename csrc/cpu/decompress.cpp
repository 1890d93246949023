// Packed rows -> dense rows (the large-M strategy's first half). AVX-512 (VBMI2's expand):
// a mask of the kept columns places a block's stored values in order, zeros elsewhere,
// 32 columns of a 16-bit type or 16 of fp32 per instruction. Portable: one value at a time.
#include "cpu/decompress.h"

#include <cstring>
#include <type_traits>

#include "cpu/avx512_expand.h"
#include "cpu/block_mm.h"

namespace slimstack::cpu {
namespace {

#ifdef SLIMSTACK_X86
SLIMSTACK_AVX512 void sparse24_row_avx512(const uint16_t* v, const uint8_t* meta, int64_t Kp,
                                          uint16_t* d) {
  for (int64_t c = 0; c < Kp; c += 64) {
    const __mmask64 kept = sparse24_kept64(meta + c / 8);
    for (int h = 0; h < 2; ++h)
      _mm512_storeu_si512(d + c + 32 * h,
                          sparse24_expand32(v + c / 2 + 16 * h, mask_half(kept, h)));
  }
}

SLIMSTACK_AVX512 void sparse24_row_avx512(const float* v, const uint8_t* meta, int64_t Kp,
                                          float* d) {
  for (int64_t c = 0; c < Kp; c += 64) {
    const __mmask64 kept = sparse24_kept64(meta + c / 8);
    for (int q = 0; q < 4; ++q)
      _mm512_storeu_ps(d + c + 16 * q,
                       sparse24_expand16(v + c / 2 + 8 * q, mask_quarter(kept, q)));
  }
}

// A row that fits its slot (row_fits); Checked: nothing past its values is read.
template <bool Checked>
SLIMSTACK_AVX512 void bitmap_row_avx512(const uint16_t* v, const uint8_t* bitmask, int64_t Kp,
                                        uint16_t* d) {
  for (int64_t c = 0; c < Kp; c += 32)
    _mm512_storeu_si512(d + c, bitmap_expand32<Checked>(v, bitmask + c / 8));
}

template <bool Checked>
SLIMSTACK_AVX512 void bitmap_row_avx512(const float* v, const uint8_t* bitmask, int64_t Kp,
                                        float* d) {
  for (int64_t c = 0; c < Kp; c += 16)
    _mm512_storeu_ps(d + c, bitmap_expand16<Checked>(v, bitmask + c / 8));
}

// The 16-bit types go through the expand as raw bits.
template <typename T>
using Lanes = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;

template <typename T>
const Lanes<T>* lanes(const T* p) {
  return reinterpret_cast<const Lanes<T>*>(p);
}

template <typename T>
Lanes<T>* lanes(T* p) {
  return reinterpret_cast<Lanes<T>*>(p);
}
#endif

}  // namespace

template <typename T>
void sparse24_rows_to_dense(const T* values, const uint8_t* meta, int64_t Kp, int64_t n0,
                            int64_t n1, T* dst) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* v = values + n * (Kp / 2);
    const uint8_t* mt = meta + n * (Kp / 8);
    T* d = dst + (n - n0) * Kp;
#ifdef SLIMSTACK_X86
    if (avx512_active()) {
      sparse24_row_avx512(lanes(v), mt, Kp, lanes(d));
      continue;
    }
#endif
    sparse24_row_scalar(v, mt, Kp, d);
  }
}

template <typename T>
int64_t bitmap_rows_to_dense(const T* values, int64_t values_numel, const uint8_t* bitmask,
                             const int64_t* row_offsets, int64_t Kp, int64_t n0, int64_t n1,
                             T* dst) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* bits = bitmask + n * (Kp / 8);
    T* d = dst + (n - n0) * Kp;
    if (!row_fits(bits, Kp, row_offsets[n], row_offsets[n + 1], values_numel)) {
      std::memset(static_cast<void*>(d), 0, sizeof(T) * Kp);
      return n;
    }
    const T* v = values + row_offsets[n];
#ifdef SLIMSTACK_X86
    if (avx512_active()) {
      if (near_values_end(row_offsets[n + 1], values_numel))
        bitmap_row_avx512<true>(lanes(v), bits, Kp, lanes(d));
      else
        bitmap_row_avx512<false>(lanes(v), bits, Kp, lanes(d));
      continue;
    }
#endif
    bitmap_row_scalar(v, bits, Kp, d);
  }
  return -1;
}

#define SLIMSTACK_INSTANTIATE(T)                                                              \
  template void sparse24_rows_to_dense<T>(const T*, const uint8_t*, int64_t, int64_t, int64_t, \
                                          T*);                                                 \
  template int64_t bitmap_rows_to_dense<T>(const T*, int64_t, const uint8_t*, const int64_t*, \
                                           int64_t, int64_t, int64_t, T*);
SLIMSTACK_INSTANTIATE(float)
SLIMSTACK_INSTANTIATE(c10::Half)
SLIMSTACK_INSTANTIATE(c10::BFloat16)
#undef SLIMSTACK_INSTANTIATE

}  // namespace slimstack::cpu
