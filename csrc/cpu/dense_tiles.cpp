// The large-M strategy (dense_tiles.h): decompress a tile of weight rows, in parallel over its
// rows, then one GEMM of x with the tile into out's columns of those rows.
#include "cpu/dense_tiles.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>

#include "cpu/block_mm.h"
#include "cpu/decompress.h"

namespace slimstack::cpu {
namespace {

constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
// A tile's dense bytes: large enough that the GEMM's per-call cost (~20 us) stays small
// against its work, small enough to stay in the last-level cache between the decompress
// that writes it and the GEMM that reads it.
constexpr int64_t kTileBytes = 4 << 20;
constexpr int64_t kTileRowQuantum = 16;

int64_t& override_min_m() {
  static int64_t value = -1;
  return value;
}

template <typename T>
int64_t tile_rows(int64_t N, int64_t Kp) {
  const int64_t rows = kTileBytes / (Kp * static_cast<int64_t>(sizeof(T)));
  return std::clamp<int64_t>(rows / kTileRowQuantum * kTileRowQuantum, kTileRowQuantum,
                             std::max<int64_t>(N, kTileRowQuantum));
}

// fill(n0, n1, dst) writes rows n0..n1 of W as dense T [n1 - n0, Kp] and returns -1 or the
// first malformed row.
template <typename T, typename Fill>
int64_t dense_tiles_mm(const at::Tensor& x, int64_t N, int64_t K, at::Tensor& out,
                       const Fill& fill) {
  const int64_t Kp = padded_k(K);
  const int64_t rows_per_tile = tile_rows<T>(N, Kp);
  at::Tensor tile = at::empty({std::min(rows_per_tile, N), Kp}, x.options());
  T* tile_data = tile.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / Kp);
  for (int64_t n0 = 0; n0 < N; n0 += rows_per_tile) {
    const int64_t rows = std::min(rows_per_tile, N - n0);
    std::atomic<int64_t> first_bad{N};
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      const int64_t bad = fill(n0 + r0, n0 + r1, tile_data + r0 * Kp);
      if (bad >= 0) keep_smallest(first_bad, bad);
    });
    if (first_bad.load() < N) return first_bad.load();
    // the tile's columns past K are the format's zero padding: the GEMM reads K of them
    const at::Tensor weight = tile.narrow(0, 0, rows).narrow(1, 0, K);
    at::Tensor columns = out.narrow(1, n0, rows);
    at::mm_out(columns, x, weight.t());
  }
  return -1;
}

}  // namespace

int64_t dense_tiles_min_m(at::ScalarType dtype) {
  if (override_min_m() >= 0) return override_min_m();
  // Crossovers against the small-M kernels on a 2-core AVX-512 (Zen 4) machine, 2026-12-07,
  // TinyLlama-1.1B's gate_up (11264 x 2048) and down (2048 x 5632) shapes. bf16 GEMMs run on
  // AVX512-BF16 (~0.9 TFLOP/s): tiles win from M = 16 against the bf16 dot rows kernels
  // (bf16_dot.cpp), from M = 8 against the AVX2 ones; fp32 from M = 64; fp16 has no fast CPU
  // GEMM in ATen (~50 GFLOP/s, below the fp32 FMA loops): never. Without AVX512-BF16, ATen's
  // bf16 GEMM computes in fp32: the fp32 crossover (unmeasured).
  switch (dtype) {
    case at::kBFloat16: return !cpu_has_bf16_dot() ? 64 : bf16_dot_active() ? 16 : 8;
    case at::kFloat: return 64;
    default: return kNever;
  }
}

bool use_dense_tiles(at::ScalarType dtype, int64_t M) { return M >= dense_tiles_min_m(dtype); }

void set_dense_tiles_min_m(int64_t min_m) { override_min_m() = min_m < 0 ? -1 : min_m; }

template <typename T>
void sparse24_mm_dense_tiles(const at::Tensor& x, const at::Tensor& values,
                             const at::Tensor& meta, int64_t N, int64_t K, at::Tensor& out) {
  const int64_t Kp = padded_k(K);
  const T* value_data = values.data_ptr<T>();
  const uint8_t* meta_data = meta.data_ptr<uint8_t>();
  dense_tiles_mm<T>(x, N, K, out, [&](int64_t n0, int64_t n1, T* dst) {
    sparse24_rows_to_dense(value_data, meta_data, Kp, n0, n1, dst);
    return int64_t{-1};
  });
}

template <typename T>
int64_t bitmap_mm_dense_tiles(const at::Tensor& x, const at::Tensor& values,
                              const at::Tensor& bitmask, const at::Tensor& row_offsets,
                              int64_t N, int64_t K, at::Tensor& out) {
  const int64_t Kp = padded_k(K);
  const T* value_data = values.data_ptr<T>();
  const int64_t numel = values.numel();
  const uint8_t* bits = bitmask.data_ptr<uint8_t>();
  const int64_t* offsets = row_offsets.data_ptr<int64_t>();
  return dense_tiles_mm<T>(x, N, K, out, [&](int64_t n0, int64_t n1, T* dst) {
    return bitmap_rows_to_dense(value_data, numel, bits, offsets, Kp, n0, n1, dst);
  });
}

#define SLIMSTACK_INSTANTIATE(T)                                                              \
  template void sparse24_mm_dense_tiles<T>(const at::Tensor&, const at::Tensor&,              \
                                           const at::Tensor&, int64_t, int64_t, at::Tensor&); \
  template int64_t bitmap_mm_dense_tiles<T>(const at::Tensor&, const at::Tensor&,             \
                                            const at::Tensor&, const at::Tensor&, int64_t,    \
                                            int64_t, at::Tensor&);
SLIMSTACK_INSTANTIATE(float)
SLIMSTACK_INSTANTIATE(c10::Half)
SLIMSTACK_INSTANTIATE(c10::BFloat16)
#undef SLIMSTACK_INSTANTIATE

}  // namespace slimstack::cpu
