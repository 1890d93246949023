// Shared machinery of the CPU sparse kernels' small-M strategy, two variants picked by
// instruction set:
// - avx2 (rowwise_mm): each packed row is expanded in registers, 8 columns at a time, and
//   meets every x row there; the packed bytes are read once and nothing else is written.
// - generic, the portable baseline (block_sparse_mm): each task decompresses a block of
//   weight rows to fp32 and multiplies it with x by a register-tiled dense micro-kernel.
// The sparse formats only differ in how a row is expanded or decompressed. Large M (prefill)
// takes the dense-tile strategy instead (dense_tiles.h): ATen's GEMM on decompressed tiles.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SLIMSTACK_X86 1
#endif

namespace slimstack::cpu {

constexpr int64_t kKTile = 64;     // formats: K is padded to a multiple of this
constexpr int64_t kRowQuantum = 4;  // weight rows per micro-kernel call
// Below this many multiply-adds a task is not worth waking another thread for.
constexpr int64_t kMinTaskWork = 1 << 18;

inline int64_t padded_k(int64_t k) { return (k + kKTile - 1) / kKTile * kKTile; }

inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
inline T from_float(float v) {
  return static_cast<T>(v);
}

// acc[m, j] = sum_k x[m, k] * w[j, k] for m < M, j < rows (rows a multiple of kRowQuantum);
// x has leading dimension ldx, w and k span Kp (a multiple of kKTile), acc is [M, rows].
void dense_block_mm(const float* x, int64_t ldx, const float* w, int64_t rows, int64_t M,
                    int64_t Kp, float* acc);

// Whether the AVX2 kernels are selected (the default where the CPU has AVX2 and FMA,
// unless a test chose the portable baseline).
bool avx2_active();

// Whether the AVX-512 row decompression of the large-M strategy is selected (isa "avx512":
// the AVX2 kernels plus AVX-512 F/BW/VBMI2 expands).
bool avx512_active();

// Whether this CPU has AVX512-BF16's dot product (vdpbf16ps), and whether the bf16 rows
// kernels use it now (isa "avx512" on such a CPU).
bool cpu_has_bf16_dot();
bool bf16_dot_active();

// Whether the row's offsets lie inside `values` and its slot holds all its set bits: a
// corrupt weight must not read past `values`.
inline bool row_fits(const uint8_t* bitmask, int64_t Kp, int64_t start, int64_t end,
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

// first_bad = min(first_bad, row), from any thread: the kernels report the smallest
// malformed row whichever task found it.
inline void keep_smallest(std::atomic<int64_t>& first_bad, int64_t row) {
  int64_t seen = first_bad.load();
  while (row < seen && !first_bad.compare_exchange_weak(seen, row)) {
  }
}

// Weight rows per task: large blocks amortize the x traffic, but keep every thread busy.
inline int64_t rows_per_task(int64_t N) {
  const int64_t threads = at::get_num_threads();
  int64_t rows = 64;
  while (rows > kRowQuantum && (N + rows - 1) / rows < 2 * threads) rows /= 2;
  return rows;
}

// x [M, K] in T -> fp32 [M, Kp] with zero columns K..Kp (this is where reads of x are
// masked to K: padding weights meet zeros, never memory past x).
template <typename T>
std::vector<float> padded_fp32_rows(const T* x, int64_t M, int64_t K, int64_t Kp) {
  std::vector<float> buf(static_cast<size_t>(M * Kp), 0.0f);
  at::parallel_for(0, M, std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(K, 1)),
                   [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* src = x + m * K;
      float* dst = buf.data() + m * Kp;
      for (int64_t k = 0; k < K; ++k) dst[k] = to_float(src[k]);
    }
  });
  return buf;
}

// x as fp32 [M, Kp]: x itself when it already is (fp32, K tile-aligned), else a padded
// copy in `buf`.
template <typename T>
const float* fp32_rows(const T* x, int64_t M, int64_t K, int64_t Kp, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (K == Kp) return x;
  }
  buf = padded_fp32_rows(x, M, K, Kp);
  return buf.data();
}

// step(std::integral_constant<int, R>{}, m) with R = rows, for 1 <= rows <= Max.
template <int Max, typename Step>
inline void with_row_count(int64_t rows, int64_t m, const Step& step) {
  if constexpr (Max > 1) {
    if (rows < Max) return with_row_count<Max - 1>(rows, m, step);
  }
  step(std::integral_constant<int, Max>{}, m);
}

// step(rows, m) for x rows m.. of 0..mb in steps of up to Max, `rows` the step's row count
// as a compile-time constant (the row kernels keep registers per x row).
template <int Max, typename Step>
inline void in_steps_of(int64_t mb, const Step& step) {
  for (int64_t m = 0; m < mb; m += Max)
    with_row_count<Max>(std::min<int64_t>(Max, mb - m), m, step);
}

// The AVX2 strategy's driver: x as fp32 [M, Kp] (zero past K), weight rows split over
// threads and walked in tiles of kTileRows; each tile meets x kTileM rows at a time, so the
// tile's packed rows and those x rows stay in L2 (a long prefill would otherwise stream all
// of x from memory once per weight row). rows(x_block, m_count, out_block, n0, n1) writes
// out_block[0:m_count, n0:n1] and returns -1, or its smallest malformed row. Returns -1, or
// the smallest malformed row.
constexpr int64_t kTileRows = 32;
constexpr int64_t kTileM = 32;

template <typename T, typename Rows>
int64_t rowwise_mm(const T* x, T* out, int64_t M, int64_t N, int64_t K, const Rows& rows) {
  const int64_t Kp = padded_k(K);
  std::vector<float> x_buf;
  const float* x32 = fp32_rows(x, M, K, Kp, x_buf);
  std::atomic<int64_t> first_bad{N};
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / (Kp * std::max<int64_t>(M, 1)));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = n0; t0 < n1; t0 += kTileRows) {
      const int64_t t1 = std::min(n1, t0 + kTileRows);
      for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
        const int64_t bad = rows(x32 + m0 * Kp, std::min(kTileM, M - m0), out + m0 * N, t0, t1);
        if (bad < 0) continue;
        keep_smallest(first_bad, bad);
        return;
      }
    }
  });
  const int64_t bad = first_bad.load();
  return bad == N ? -1 : bad;
}

// out[M, N] = x @ W^T where decompress_row(n, dst) writes row n of W (all Kp fp32 values,
// zeros included) and returns false if the packed row is malformed. Returns -1, or the
// smallest malformed row.
template <typename T, typename DecompressRow>
int64_t block_sparse_mm(const T* x, T* out, int64_t M, int64_t N, int64_t K,
                        const DecompressRow& decompress_row) {
  const int64_t Kp = padded_k(K);
  std::vector<float> x_buf;
  const float* x32 = fp32_rows(x, M, K, Kp, x_buf);
  const int64_t block = rows_per_task(N);
  const int64_t num_blocks = (N + block - 1) / block;
  std::atomic<int64_t> first_bad{N};
  const int64_t block_work = block * Kp * std::max<int64_t>(M, 1);
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / block_work);

  at::parallel_for(0, num_blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> w(static_cast<size_t>(block * Kp));
    std::vector<float> acc(static_cast<size_t>(M * block));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * block;
      const int64_t rows = std::min(block, N - n0);
      const int64_t rows_padded = (rows + kRowQuantum - 1) / kRowQuantum * kRowQuantum;
      // rows past N (up to the micro-kernel's row quantum) multiply as zeros
      std::memset(w.data() + rows * Kp, 0, sizeof(float) * (rows_padded - rows) * Kp);
      for (int64_t r = 0; r < rows; ++r) {
        if (!decompress_row(n0 + r, w.data() + r * Kp)) keep_smallest(first_bad, n0 + r);
      }
      dense_block_mm(x32, Kp, w.data(), rows_padded, M, Kp, acc.data());
      for (int64_t m = 0; m < M; ++m) {
        const float* a = acc.data() + m * rows_padded;
        T* y = out + m * N + n0;
        for (int64_t r = 0; r < rows; ++r) y[r] = from_float<T>(a[r]);
      }
    }
  });
  const int64_t bad = first_bad.load();
  return bad == N ? -1 : bad;
}

}  // namespace slimstack::cpu
