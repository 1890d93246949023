// bitmap matmul on CPU: scatter each row's compacted values to the columns its bitmask
// names (fp32), then the shared register-tiled micro-kernel (block_mm.h).
#include "cpu/block_mm.h"
#include "cpu/simd_x86.h"
#include "cpu/sparse_mm.h"

namespace slimstack::cpu {
namespace {

// Whether the row's offsets lie inside `values` and its slot holds all its set bits: a
// corrupt weight must not read past `values`.
bool row_fits(const uint8_t* bitmask, int64_t Kp, int64_t start, int64_t end,
              int64_t values_numel) {
  if (start < 0 || start > end || end > values_numel) return false;
  int64_t kept = 0;
  for (int64_t b = 0; b < Kp / 8; b += 8) {  // Kp / 8 is a multiple of 8 bytes
    uint64_t word;
    std::memcpy(&word, bitmask + b, sizeof(word));
    kept += __builtin_popcountll(word);
  }
  return kept <= end - start;
}

// Portable path: one set bit at a time.
template <typename T>
void decompress_bitmap_row(const T* values, const uint8_t* bitmask, int64_t Kp, float* dst) {
  std::memset(dst, 0, sizeof(float) * Kp);
  for (int64_t b = 0; b < Kp / 8; ++b) {
    for (unsigned bits = bitmask[b]; bits != 0; bits &= bits - 1)
      dst[8 * b + __builtin_ctz(bits)] = to_float(*values++);
  }
}

#ifdef SLIMSTACK_X86
// 16 columns at a time: load as many values as the 16 mask bits have set, and vexpandps
// places them at the set columns, zeros elsewhere.
template <typename T>
SLIMSTACK_AVX512 void decompress_bitmap_row_avx512(const T* values, const uint8_t* bitmask,
                                                   int64_t Kp, float* dst) {
  for (int64_t c = 0; c < Kp; c += 16) {
    const auto keep = static_cast<__mmask16>(bitmask[c / 8] | bitmask[c / 8 + 1] << 8);
    const unsigned count = __builtin_popcount(keep);
    _mm512_storeu_ps(dst + c, _mm512_maskz_expand_ps(keep, load_as_float(values, count)));
    values += count;
  }
}
#endif

template <typename T, typename Decompress>
int64_t run(const T* x, const T* values, int64_t values_numel, const uint8_t* bitmask,
            const int64_t* row_offsets, T* out, int64_t M, int64_t N, int64_t K,
            const Decompress& decompress) {
  const int64_t Kp = padded_k(K);
  return block_sparse_mm(x, out, M, N, K, [&](int64_t n, float* dst) {
    const uint8_t* row_bits = bitmask + n * (Kp / 8);
    if (!row_fits(row_bits, Kp, row_offsets[n], row_offsets[n + 1], values_numel)) {
      std::memset(dst, 0, sizeof(float) * Kp);
      return false;
    }
    decompress(values + row_offsets[n], row_bits, Kp, dst);
    return true;
  });
}

}  // namespace

template <typename T>
int64_t bitmap_mm(const T* x, const T* values, int64_t values_numel, const uint8_t* bitmask,
                  const int64_t* row_offsets, T* out, int64_t M, int64_t N, int64_t K) {
#ifdef SLIMSTACK_X86
  if (avx512_active())
    return run(x, values, values_numel, bitmask, row_offsets, out, M, N, K,
               decompress_bitmap_row_avx512<T>);
#endif
  return run(x, values, values_numel, bitmask, row_offsets, out, M, N, K,
             decompress_bitmap_row<T>);
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
