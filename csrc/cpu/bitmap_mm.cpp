// bitmap matmul on CPU (a bit per column, kept values compacted per row). AVX2: each 8
// columns of a packed row are expanded in registers (a permute by the mask byte) and meet
// every x row; the packed row is read once and no decompressed row is written. Portable:
// scatter each row's values to fp32, then the register-tiled micro-kernel (block_mm.h).
#include <array>

#include "cpu/bf16_dot.h"
#include "cpu/block_mm.h"
#include "cpu/decompress.h"
#include "cpu/simd_avx2.h"
#include "cpu/sparse_mm.h"

namespace slimstack::cpu {
namespace {

#ifdef SLIMSTACK_X86
// Mask byte -> for each of its 8 columns, the slot among the byte's compacted values that
// holds it, and an all-ones lane where the bit is set (a clear bit's lane is zeroed).
struct ExpandTable {
  std::array<std::array<uint8_t, 8>, 256> slots{};
  std::array<std::array<int8_t, 8>, 256> set{};
};
const ExpandTable kExpand = [] {
  ExpandTable table;
  for (int b = 0; b < 256; ++b) {
    for (int c = 0; c < 8; ++c) {
      table.slots[b][c] = static_cast<uint8_t>(__builtin_popcount(b & ((1 << c) - 1)));
      table.set[b][c] = (b >> c & 1) ? -1 : 0;
    }
  }
  return table;
}();

// Columns c..c+7 of a row as fp32 lanes: the byte's values (at v) moved to their set bits,
// zeros at clear bits. A full 8-value load reads up to 8 values past the byte's own; near
// the end of `values` (NearEnd: only `available` readable) the rest comes from a zeroed copy.
template <typename T, bool NearEnd>
SLIMSTACK_AVX2 inline __m256 expand8(const T* v, int64_t available, unsigned byte) {
  __m256 raw;
  if (!NearEnd || available >= 8) {
    raw = load8_as_float(v);
  } else {
    T tail[8] = {};
    for (int64_t i = 0; i < available; ++i) tail[i] = v[i];
    raw = load8_as_float(tail);
  }
  const __m256 placed = _mm256_permutevar8x32_ps(raw, load8_u8(kExpand.slots[byte].data()));
  return _mm256_and_ps(placed, _mm256_castsi256_ps(load8_i8(kExpand.set[byte].data())));
}

// out[m, n] for MB rows of x and one weight row (its values from v, `available` readable
// up to the end of `values`); 16 columns per step.
template <typename T, int MB, bool NearEnd>
SLIMSTACK_AVX2 void bitmap_row_avx2(const float* x, int64_t Kp, const T* v, int64_t available,
                                    const uint8_t* bits, T* out, int64_t N) {
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  int64_t used = 0;
  for (int64_t c = 0; c < Kp; c += 16) {
    // 2 KB ahead: loads advancing by popcounts are a stride the hardware prefetcher misses
    _mm_prefetch(reinterpret_cast<const char*>(v + used + 2048 / sizeof(T)), _MM_HINT_T0);
    const unsigned b0 = bits[c / 8], b1 = bits[c / 8 + 1];
    const __m256 w0 = expand8<T, NearEnd>(v + used, available - used, b0);
    used += __builtin_popcount(b0);
    const __m256 w1 = expand8<T, NearEnd>(v + used, available - used, b1);
    used += __builtin_popcount(b1);
    fma16<MB>(acc, w0, w1, x + c, Kp);
  }
  store_sums<T, MB>(acc, out, N);
}

template <typename T>
int64_t bitmap_avx2(const T* x, const T* values, int64_t values_numel, const uint8_t* bitmask,
                    const int64_t* row_offsets, T* out, int64_t M, int64_t N, int64_t K) {
  const int64_t Kp = padded_k(K);
  return rowwise_mm(x, out, M, N, K,
                    [&](const float* xb, int64_t mb, T* ob, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* bits = bitmask + n * (Kp / 8);
      const int64_t start = row_offsets[n];
      if (!row_fits(bits, Kp, start, row_offsets[n + 1], values_numel)) return n;
      const T* v = values + start;
      const int64_t available = values_numel - start;
      // a load reads at most 8 values past the row's last kept one: only the last rows of
      // `values` need the checked path
      const bool near_end = row_offsets[n + 1] + 8 > values_numel;
      in_steps_of<4>(mb, [&](auto rows, int64_t m) {
        constexpr int R = decltype(rows)::value;
        const float* xm = xb + m * Kp;
        T* y = ob + m * N + n;
        if (near_end)
          bitmap_row_avx2<T, R, true>(xm, Kp, v, available, bits, y, N);
        else
          bitmap_row_avx2<T, R, false>(xm, Kp, v, available, bits, y, N);
      });
    }
    return int64_t{-1};
  });
}
#endif

template <typename T>
int64_t bitmap_portable(const T* x, const T* values, int64_t values_numel, const uint8_t* bitmask,
                        const int64_t* row_offsets, T* out, int64_t M, int64_t N, int64_t K) {
  const int64_t Kp = padded_k(K);
  return block_sparse_mm(x, out, M, N, K, [&](int64_t n, float* dst) {
    const uint8_t* row_bits = bitmask + n * (Kp / 8);
    if (!row_fits(row_bits, Kp, row_offsets[n], row_offsets[n + 1], values_numel)) {
      std::memset(dst, 0, sizeof(float) * Kp);
      return false;
    }
    bitmap_row_scalar(values + row_offsets[n], row_bits, Kp, dst);
    return true;
  });
}

}  // namespace

template <typename T>
int64_t bitmap_mm(const T* x, const T* values, int64_t values_numel, const uint8_t* bitmask,
                  const int64_t* row_offsets, T* out, int64_t M, int64_t N, int64_t K) {
#ifdef SLIMSTACK_X86
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16_dot_active())
      return bitmap_mm_bf16_dot(x, values, values_numel, bitmask, row_offsets, out, M, N, K);
  }
  if (avx2_active())
    return bitmap_avx2(x, values, values_numel, bitmask, row_offsets, out, M, N, K);
#endif
  return bitmap_portable(x, values, values_numel, bitmask, row_offsets, out, M, N, K);
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
