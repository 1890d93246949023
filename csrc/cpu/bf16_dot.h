// bf16 rows kernels on AVX512-BF16 (the small-M strategy where bf16_dot_active()): a packed
// row is expanded to 32 bf16 columns per instruction and meets each x row, itself bf16, in
// one vdpbf16ps (16 fp32 lanes, two products each): a quarter of the AVX2 kernels'
// instructions per x row, and no fp32 copy of x. Raw pointers, no tensor checks.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace slimstack::cpu {

// A dense bf16 weight [N, K], any K. Decode-sized M only: ATen's bf16 GEMV reads about
// 20-30 GB/s on this Zen 4 (2 cores), these rows up to ~2x that; ATen's GEMM wins past
// dense_bf16_rows_max_m() rows, which is 0 where bf16_dot_active() is false.
int64_t dense_bf16_rows_max_m();
void dense_mm_bf16_dot(const c10::BFloat16* x, const c10::BFloat16* weight, c10::BFloat16* out,
                       int64_t M, int64_t N, int64_t K);

void sparse24_mm_bf16_dot(const c10::BFloat16* x, const c10::BFloat16* values,
                          const uint8_t* meta, c10::BFloat16* out, int64_t M, int64_t N,
                          int64_t K);

// Returns -1, or the smallest row whose offsets or bit count do not fit `values`.
int64_t bitmap_mm_bf16_dot(const c10::BFloat16* x, const c10::BFloat16* values,
                           int64_t values_numel, const uint8_t* bitmask,
                           const int64_t* row_offsets, c10::BFloat16* out, int64_t M, int64_t N,
                           int64_t K);

}  // namespace slimstack::cpu
