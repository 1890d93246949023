// bitmap matmul on CPU: scatter each row's compacted values to the columns its bitmask
// names (fp32), then the shared register-tiled micro-kernel (block_mm.h).
#include "cpu/block_mm.h"
#include "cpu/sparse_mm.h"

namespace slimstack::cpu {
namespace {

// Returns false when the row's set bits need more values than [start, end) holds or
// the offsets themselves are out of range: a corrupt weight must not read past `values`.
template <typename T>
bool decompress_bitmap_row(const T* values, int64_t values_numel, int64_t start, int64_t end,
                           const uint8_t* bitmask, int64_t Kp, float* dst) {
  if (start < 0 || start > end || end > values_numel) return false;
  int64_t p = start;
  for (int64_t b = 0; b < Kp / 8; ++b) {
    unsigned bits = bitmask[b];
    while (bits != 0) {
      if (p >= end) return false;
      dst[8 * b + __builtin_ctz(bits)] = to_float(values[p++]);
      bits &= bits - 1;
    }
  }
  return true;
}

}  // namespace

template <typename T>
int64_t bitmap_mm(const T* x, const T* values, int64_t values_numel, const uint8_t* bitmask,
                  const int64_t* row_offsets, T* out, int64_t M, int64_t N, int64_t K) {
  const int64_t Kp = padded_k(K);
  return block_sparse_mm(x, out, M, N, K, [&](int64_t n, float* dst) {
    return decompress_bitmap_row(values, values_numel, row_offsets[n], row_offsets[n + 1],
                                 bitmask + n * (Kp / 8), Kp, dst);
  });
}

template int64_t bitmap_mm<float>(const float*, const float*, int64_t, const uint8_t*,
                                  const int64_t*, float*, int64_t, int64_t, int64_t);
template int64_t bitmap_mm<c10::Half>(const c10::Half*, const c10::Half*, int64_t,
                                      const uint8_t*, const int64_t*, c10::Half*, int64_t,
                                      int64_t, int64_t);
template int64_t bitmap_mm<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*, int64_t,
                                          const uint8_t*, const int64_t*, c10::BFloat16*,
                                          int64_t, int64_t, int64_t);

}  // namespace slimstack::cpu
