// sparse24 matmul on CPU: decompress 2:4 rows (values + 4-bit position nibbles) to fp32,
// then the shared register-tiled micro-kernel (block_mm.h).
#include "cpu/block_mm.h"
#include "cpu/sparse_mm.h"

namespace slimstack::cpu {
namespace {

// One meta byte covers two groups = 8 dense columns and 4 stored values.
template <typename T>
void decompress_sparse24_row(const T* values, const uint8_t* meta, int64_t Kp, float* dst) {
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

}  // namespace

template <typename T>
void sparse24_mm(const T* x, const T* values, const uint8_t* meta, T* out, int64_t M, int64_t N,
                 int64_t K) {
  const int64_t Kp = padded_k(K);
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
