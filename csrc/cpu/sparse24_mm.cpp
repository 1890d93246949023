// sparse24 matmul on CPU (values + 4-bit position nibbles). AVX2: each 16 columns of a
// packed row (8 values, 2 meta bytes) are expanded to two dense fp32 vectors in registers
// and meet every x row; a packed byte is read once, so decode moves 0.56x of the dense fp32
// bytes. Portable: decompress rows to fp32, then the register-tiled micro-kernel.
#include <array>

#include "cpu/bf16_dot.h"
#include "cpu/block_mm.h"
#include "cpu/decompress.h"
#include "cpu/simd_avx2.h"
#include "cpu/sparse_mm.h"

namespace slimstack::cpu {
namespace {

#ifdef SLIMSTACK_X86
// Meta byte -> for each of its 8 columns, the lane of its value in a vector holding the
// byte's 4 stored values in lanes 0..3 and zeros in lanes 4..7 (a pruned column reads 4).
const std::array<std::array<uint8_t, 8>, 256> kLanes = [] {
  std::array<std::array<uint8_t, 8>, 256> table{};
  for (int b = 0; b < 256; ++b) {
    table[b].fill(4);
    const int columns[4] = {b & 3, (b >> 2) & 3, 4 + ((b >> 4) & 3), 4 + (b >> 6)};
    for (int s = 0; s < 4; ++s) table[b][columns[s]] = static_cast<uint8_t>(s);
  }
  return table;
}();

// The 8 dense columns of meta byte `byte` as fp32 lanes, from its 4 values and 4 zeros.
SLIMSTACK_AVX2 inline __m256 expand8(__m256 values_and_zeros, unsigned byte) {
  return _mm256_permutevar8x32_ps(values_and_zeros, load8_u8(kLanes[byte].data()));
}

// out[m, n] for MB rows of x and weight row n: each 16 columns (8 stored values) are
// expanded once in registers to two dense vectors, a permute each, and meet the MB x rows.
template <typename T, int MB>
SLIMSTACK_AVX2 void sparse24_row_avx2(const float* x, int64_t Kp, const T* v, const uint8_t* meta,
                                      T* out, int64_t N) {
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < Kp; c += 16) {
    const __m256 w = load8_as_float(v + c / 2);
    const __m256 first = _mm256_blend_ps(w, _mm256_setzero_ps(), 0xF0);  // v0..v3, zeros
    const __m256 second = _mm256_permute2f128_ps(w, w, 0x81);            // v4..v7, zeros
    fma16<MB>(acc, expand8(first, meta[c / 8]), expand8(second, meta[c / 8 + 1]), x + c, Kp);
  }
  store_sums<T, MB>(acc, out, N);
}

template <typename T>
void sparse24_avx2(const T* x, const T* values, const uint8_t* meta, T* out, int64_t M,
                   int64_t N, int64_t K) {
  const int64_t Kp = padded_k(K);
  rowwise_mm(x, out, M, N, K, [&](const float* xb, int64_t mb, T* ob, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {  // a packed row stays in L1 while the x rows meet it
      const T* v = values + n * (Kp / 2);
      const uint8_t* mt = meta + n * (Kp / 8);
      in_steps_of<4>(mb, [&](auto rows, int64_t m) {
        sparse24_row_avx2<T, decltype(rows)::value>(xb + m * Kp, Kp, v, mt, ob + m * N + n, N);
      });
    }
    return int64_t{-1};
  });
}
#endif

}  // namespace

template <typename T>
void sparse24_mm(const T* x, const T* values, const uint8_t* meta, T* out, int64_t M, int64_t N,
                 int64_t K) {
  const int64_t Kp = padded_k(K);
#ifdef SLIMSTACK_X86
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16_dot_active()) {
      sparse24_mm_bf16_dot(x, values, meta, out, M, N, K);
      return;
    }
  }
  if (avx2_active()) {
    sparse24_avx2(x, values, meta, out, M, N, K);
    return;
  }
#endif
  block_sparse_mm(x, out, M, N, K, [&](int64_t n, float* dst) {
    sparse24_row_scalar(values + n * (Kp / 2), meta + n * (Kp / 8), Kp, dst);
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
