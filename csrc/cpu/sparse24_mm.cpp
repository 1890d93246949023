// sparse24 matmul on CPU: decompress 2:4 rows (values + 4-bit position nibbles) to fp32,
// then the shared register-tiled micro-kernel (block_mm.h).
#include "cpu/block_mm.h"
#include "cpu/simd_x86.h"
#include "cpu/sparse_mm.h"

namespace slimstack::cpu {
namespace {

// Portable path. One meta byte covers two groups = 8 dense columns and 4 stored values.
template <typename T>
void decompress_sparse24_row(const T* values, const uint8_t* meta, int64_t Kp, float* dst) {
  std::memset(dst, 0, sizeof(float) * Kp);
  for (int64_t b = 0; b < Kp / 8; ++b) {
    const unsigned byte = meta[b];
    const T* v = values + 4 * b;
    float* d = dst + 8 * b;
    d[byte & 3] = to_float(v[0]);
    d[(byte >> 2) & 3] = to_float(v[1]);
    d[4 + ((byte >> 4) & 3)] = to_float(v[2]);
    d[4 + (byte >> 6)] = to_float(v[3]);
  }
}

#ifdef SLIMSTACK_X86
// nibble (i0 | i1 << 2) -> the group's 4-bit keep mask (1 << i0) | (1 << i1)
constexpr uint16_t group_mask(unsigned nibble) {
  return static_cast<uint16_t>((1u << (nibble & 3)) | (1u << (nibble >> 2)));
}

// 16 columns at a time: two meta bytes give a 16-bit keep mask, and vexpandps places the
// 8 stored values (in column order, since i0 < i1) at the kept columns, zeros elsewhere.
template <typename T>
SLIMSTACK_AVX512 void decompress_sparse24_row_avx512(const T* values, const uint8_t* meta,
                                                     int64_t Kp, float* dst) {
  static constexpr uint16_t kMask[16] = {
      group_mask(0), group_mask(1), group_mask(2),  group_mask(3),  group_mask(4),  group_mask(5),
      group_mask(6), group_mask(7), group_mask(8),  group_mask(9),  group_mask(10), group_mask(11),
      group_mask(12), group_mask(13), group_mask(14), group_mask(15)};
  for (int64_t c = 0; c < Kp; c += 16) {
    const unsigned b0 = meta[c / 8], b1 = meta[c / 8 + 1];
    const auto keep = static_cast<__mmask16>(kMask[b0 & 15] | kMask[b0 >> 4] << 4 |
                                             kMask[b1 & 15] << 8 | kMask[b1 >> 4] << 12);
    const __m512 kept = load_as_float(values + c / 2, 8);
    _mm512_storeu_ps(dst + c, _mm512_maskz_expand_ps(keep, kept));
  }
}
#endif

}  // namespace

template <typename T>
void sparse24_mm(const T* x, const T* values, const uint8_t* meta, T* out, int64_t M, int64_t N,
                 int64_t K) {
  const int64_t Kp = padded_k(K);
#ifdef SLIMSTACK_X86
  if (avx512_active()) {
    block_sparse_mm(x, out, M, N, K, [&](int64_t n, float* dst) {
      decompress_sparse24_row_avx512(values + n * (Kp / 2), meta + n * (Kp / 8), Kp, dst);
      return true;
    });
    return;
  }
#endif
  block_sparse_mm(x, out, M, N, K, [&](int64_t n, float* dst) {
    decompress_sparse24_row(values + n * (Kp / 2), meta + n * (Kp / 8), Kp, dst);
    return true;
  });
}

template void sparse24_mm<float>(const float*, const float*, const uint8_t*, float*, int64_t,
                                 int64_t, int64_t);
template void sparse24_mm<c10::Half>(const c10::Half*, const c10::Half*, const uint8_t*,
                                     c10::Half*, int64_t, int64_t, int64_t);
template void sparse24_mm<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*,
                                         const uint8_t*, c10::BFloat16*, int64_t, int64_t,
                                         int64_t);

}  // namespace slimstack::cpu
