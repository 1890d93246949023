// Packed weight rows -> dense rows in the weight's own dtype, for the large-M strategy
// (dense_tiles.cpp), which hands them to ATen's GEMM. Raw pointers, no tensor checks.
#pragma once

#include <cstdint>
#include <cstring>

namespace slimstack::cpu {

// One sparse24 row (Kp columns) as dense D, one value at a time: the portable path, to the
// weight's dtype for the tiles or to fp32 for the generic rows kernel. One meta byte covers
// two groups = 8 dense columns and 4 stored values.
template <typename T, typename D>
void sparse24_row_scalar(const T* v, const uint8_t* meta, int64_t Kp, D* d) {
  std::memset(static_cast<void*>(d), 0, sizeof(D) * Kp);
  for (int64_t b = 0; b < Kp / 8; ++b, v += 4) {
    const unsigned byte = meta[b];
    D* group = d + 8 * b;
    group[byte & 3] = static_cast<D>(v[0]);
    group[(byte >> 2) & 3] = static_cast<D>(v[1]);
    group[4 + ((byte >> 4) & 3)] = static_cast<D>(v[2]);
    group[4 + (byte >> 6)] = static_cast<D>(v[3]);
  }
}

// One bitmap row (Kp columns) as dense D, one set bit at a time.
template <typename T, typename D>
void bitmap_row_scalar(const T* v, const uint8_t* bitmask, int64_t Kp, D* d) {
  std::memset(static_cast<void*>(d), 0, sizeof(D) * Kp);
  for (int64_t b = 0; b < Kp / 8; ++b) {
    for (unsigned bits = bitmask[b]; bits != 0; bits &= bits - 1)
      d[8 * b + __builtin_ctz(bits)] = static_cast<D>(*v++);
  }
}

// Rows n0..n1 of a sparse24 weight (values [N, Kp/2], meta [N, Kp/8]) as dense T
// [n1 - n0, Kp] at dst (row stride Kp). The format's i0 < i1 per group is assumed
// (Sparse24Weight.validate checks it on load).
template <typename T>
void sparse24_rows_to_dense(const T* values, const uint8_t* meta, int64_t Kp, int64_t n0,
                            int64_t n1, T* dst);

// Rows n0..n1 of a bitmap weight as dense T [n1 - n0, Kp]. Returns -1, or the first row whose
// offsets or bit count do not fit `values` (nothing is read past `values`; that row's dense
// copy is then zeros).
template <typename T>
int64_t bitmap_rows_to_dense(const T* values, int64_t values_numel, const uint8_t* bitmask,
                             const int64_t* row_offsets, int64_t Kp, int64_t n0, int64_t n1,
                             T* dst);

}  // namespace slimstack::cpu
