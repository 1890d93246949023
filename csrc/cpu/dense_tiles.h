// The CPU kernels' large-M strategy: weight rows decompressed to dense tiles in the weight's
// dtype, each tile multiplied by ATen's GEMM (oneDNN on x86). At prefill sizes the sparse
// kernels' fp32 FMA loops (the small-M strategy, sparse24_mm.cpp / bitmap_mm.cpp) reach about
// a tenth of oneDNN's bf16 throughput; a dense tile costs one pass over the packed bytes and
// stays in cache for the GEMM. Tensors in (checked by csrc/bindings.cpp), results in `out`.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace slimstack::cpu {

// Whether a call with M rows of x in `dtype` takes this strategy: from the measured crossover
// per dtype (dense_tiles.cpp), or from the test override.
bool use_dense_tiles(at::ScalarType dtype, int64_t M);

// The smallest M that takes the strategy, per dtype (INT64_MAX: never).
int64_t dense_tiles_min_m(at::ScalarType dtype);

// Tests and benchmarks: every dtype takes the strategy from `min_m` on (0: always; a huge
// value: never); a negative value restores the measured defaults. Not thread-safe against
// running kernels.
void set_dense_tiles_min_m(int64_t min_m);

// out [M, N] = x [M, K] @ W^T for a sparse24 W (values, meta); T is x's dtype.
template <typename T>
void sparse24_mm_dense_tiles(const at::Tensor& x, const at::Tensor& values,
                             const at::Tensor& meta, int64_t N, int64_t K, at::Tensor& out);

// The same for a bitmap W. Returns -1, or the first malformed row (out is then unspecified).
template <typename T>
int64_t bitmap_mm_dense_tiles(const at::Tensor& x, const at::Tensor& values,
                              const at::Tensor& bitmask, const at::Tensor& row_offsets,
                              int64_t N, int64_t K, at::Tensor& out);

}  // namespace slimstack::cpu
