// The bf16 rows kernels on AVX512-BF16 (bf16_dot.h). Per 64 columns of a weight row: two
// 32-column expansions (avx512_expand.h), then per x row two vdpbf16ps into fp32 lanes (two
// accumulators hide the dot's latency at M = 1); one rounding to bf16 per output. A bf16
// product is exact in fp32, so this differs from the AVX2 kernels' FMAs only in summation
// order (and in flushing bf16 subnormal inputs, as vdpbf16ps does).
#include "cpu/bf16_dot.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "cpu/avx512_expand.h"
#include "cpu/block_mm.h"

namespace slimstack::cpu {

#ifdef SLIMSTACK_X86
#define SLIMSTACK_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vbmi2,avx512bf16")))

namespace {

constexpr int kMaxRows = 8;  // x rows per pass over a weight row: 16 accumulators

// The values 2 KB ahead: a bitmap row's loads advance by each block's popcount, a stride
// the hardware prefetcher does not follow (Zen 4: 12 GB/s from memory without this, 40 GB/s
// with it, on a 26 MB gate_up weight at M = 1).
SLIMSTACK_AVX512BF16 inline void prefetch_values(const uint16_t* v) {
  _mm_prefetch(reinterpret_cast<const char*>(v + 1024), _MM_HINT_T0);
}

template <int MB>
struct Sums {
  __m512 acc[MB][2];
};

template <int MB>
SLIMSTACK_AVX512BF16 inline void zero(Sums<MB>& s) {
  for (int m = 0; m < MB; ++m) s.acc[m][0] = s.acc[m][1] = _mm512_setzero_ps();
}

SLIMSTACK_AVX512BF16 inline __m512bh as_bf16(__m512i v) {
  __m512bh lanes;
  std::memcpy(&lanes, &v, sizeof(lanes));  // a register move, not a copy through memory
  return lanes;
}

// s += the 64 expanded columns (w0, w1) against MB x rows at column c.
template <int MB>
SLIMSTACK_AVX512BF16 inline void dot64(Sums<MB>& s, __m512i w0, __m512i w1, const uint16_t* x,
                                       int64_t ldx) {
  for (int m = 0; m < MB; ++m) {
    const uint16_t* xm = x + m * ldx;
    s.acc[m][0] = _mm512_dpbf16_ps(s.acc[m][0], as_bf16(w0), as_bf16(_mm512_loadu_si512(xm)));
    s.acc[m][1] =
        _mm512_dpbf16_ps(s.acc[m][1], as_bf16(w1), as_bf16(_mm512_loadu_si512(xm + 32)));
  }
}

template <int MB>
SLIMSTACK_AVX512BF16 inline void store(const Sums<MB>& s, c10::BFloat16* out, int64_t ldo) {
  for (int m = 0; m < MB; ++m)
    out[m * ldo] = c10::BFloat16(_mm512_reduce_add_ps(_mm512_add_ps(s.acc[m][0], s.acc[m][1])));
}

template <int MB>
SLIMSTACK_AVX512BF16 void sparse24_row(const uint16_t* x, int64_t Kp, const uint16_t* v,
                                       const uint8_t* meta, c10::BFloat16* out, int64_t ldo) {
  Sums<MB> s;
  zero(s);
  for (int64_t c = 0; c < Kp; c += 64) {
    const __m512i w0 = sparse24_expand32(v + c / 2, meta + c / 8);
    const __m512i w1 = sparse24_expand32(v + c / 2 + 16, meta + c / 8 + 4);
    dot64(s, w0, w1, x + c, Kp);
  }
  store(s, out, ldo);
}

// A row that fits its slot (row_fits); Checked: nothing past its values is read.
template <int MB, bool Checked>
SLIMSTACK_AVX512BF16 void bitmap_row(const uint16_t* x, int64_t Kp, const uint16_t* v,
                                     const uint8_t* bits, c10::BFloat16* out, int64_t ldo) {
  Sums<MB> s;
  zero(s);
  for (int64_t c = 0; c < Kp; c += 64) {
    prefetch_values(v);
    const __m512i w0 = bitmap_expand32<Checked>(v, bits + c / 8);
    const __m512i w1 = bitmap_expand32<Checked>(v, bits + c / 8 + 4);
    dot64(s, w0, w1, x + c, Kp);
  }
  store(s, out, ldo);
}

// x as raw bf16 [M, Kp], zero past K (padding weights meet zeros): x itself when K == Kp.
const uint16_t* padded_x(const c10::BFloat16* x, int64_t M, int64_t K, int64_t Kp,
                         std::vector<uint16_t>& buf) {
  if (K == Kp) return reinterpret_cast<const uint16_t*>(x);
  buf.assign(static_cast<size_t>(M * Kp), 0);
  for (int64_t m = 0; m < M; ++m) std::memcpy(buf.data() + m * Kp, x + m * K, 2 * K);
  return buf.data();
}

// row(n, x_rows, out_rows) multiplies weight row n with all M rows of x; it returns false
// for a malformed row. Returns -1 or the smallest malformed row.
template <typename Row>
int64_t over_rows(int64_t M, int64_t N, int64_t Kp, const Row& row) {
  std::atomic<int64_t> first_bad{N};
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / (Kp * std::max<int64_t>(M, 1)));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (row(n)) continue;
      keep_smallest(first_bad, n);
      return;
    }
  });
  const int64_t bad = first_bad.load();
  return bad == N ? -1 : bad;
}

}  // namespace

void sparse24_mm_bf16_dot(const c10::BFloat16* x, const c10::BFloat16* values,
                          const uint8_t* meta, c10::BFloat16* out, int64_t M, int64_t N,
                          int64_t K) {
  const int64_t Kp = padded_k(K);
  std::vector<uint16_t> buf;
  const uint16_t* x16 = padded_x(x, M, K, Kp, buf);
  const uint16_t* v16 = reinterpret_cast<const uint16_t*>(values);
  over_rows(M, N, Kp, [&](int64_t n) {
    in_steps_of<kMaxRows>(M, [&](auto rows, int64_t m) {
      sparse24_row<decltype(rows)::value>(x16 + m * Kp, Kp, v16 + n * (Kp / 2),
                                          meta + n * (Kp / 8), out + m * N + n, N);
    });
    return true;
  });
}

int64_t bitmap_mm_bf16_dot(const c10::BFloat16* x, const c10::BFloat16* values,
                           int64_t values_numel, const uint8_t* bitmask,
                           const int64_t* row_offsets, c10::BFloat16* out, int64_t M, int64_t N,
                           int64_t K) {
  const int64_t Kp = padded_k(K);
  std::vector<uint16_t> buf;
  const uint16_t* x16 = padded_x(x, M, K, Kp, buf);
  const uint16_t* v16 = reinterpret_cast<const uint16_t*>(values);
  return over_rows(M, N, Kp, [&](int64_t n) {
    const uint8_t* bits = bitmask + n * (Kp / 8);
    if (!row_fits(bits, Kp, row_offsets[n], row_offsets[n + 1], values_numel)) return false;
    const bool checked = near_values_end(row_offsets[n + 1], values_numel);
    in_steps_of<kMaxRows>(M, [&](auto rows, int64_t m) {
      constexpr int R = decltype(rows)::value;
      const uint16_t* v = v16 + row_offsets[n];
      if (checked)
        bitmap_row<R, true>(x16 + m * Kp, Kp, v, bits, out + m * N + n, N);
      else
        bitmap_row<R, false>(x16 + m * Kp, Kp, v, bits, out + m * N + n, N);
    });
    return true;
  });
}

#else  // not x86: bf16_dot_active() is false, so these are never called

void sparse24_mm_bf16_dot(const c10::BFloat16*, const c10::BFloat16*, const uint8_t*,
                          c10::BFloat16*, int64_t, int64_t, int64_t) {}

int64_t bitmap_mm_bf16_dot(const c10::BFloat16*, const c10::BFloat16*, int64_t, const uint8_t*,
                           const int64_t*, c10::BFloat16*, int64_t, int64_t, int64_t) {
  return -1;
}

#endif

}  // namespace slimstack::cpu
