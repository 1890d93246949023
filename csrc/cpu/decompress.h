// Packed weight rows -> dense rows in the weight's own dtype, for the large-M strategy
// (dense_tiles.cpp), which hands them to ATen's GEMM. Raw pointers, no tensor checks.
#pragma once

#include <cstdint>

namespace slimstack::cpu {

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
