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

constexpr int kMaxRows = 8;  // x rows per pass over a group of weight rows

// Weight rows per pass over x, by x rows, once the pass's x rows pass kOneRowXBytes (one
// row per pass below): each 64-column step loads x once for the group, so x traffic per
// weight byte falls with the group. Measured on Zen 4 (32 KB L1), min of 40 calls, bf16:
// 2:4 at M = 4, K = 4096 went from 17 to 30-36 GB/s with four rows (the x rows are 32 KB);
// at K = 2048 (16 KB of x) one row stays faster for all three formats (2:4 11264 x 2048:
// 561 vs 658 us; bitmap 862 vs 1405; dense 900 vs 1106); at M = 8 two rows win at every K
// (2:4 2048 x 5632: 389 vs 696 us). At M <= 2 one row is fastest (M = 1, 2:4: 45-58 GB/s;
// four rows: 32). Registers: NR * MB accumulators plus 2 NR weight and 2 x vectors, at most
// 26 of the 32.
constexpr int group_rows(int MB) { return MB <= 2 ? 1 : MB <= 4 ? 4 : 2; }
constexpr int64_t kOneRowXBytes = 16 * 1024;
constexpr int64_t kTaskRows = 4;  // weight rows per thread task: a multiple of each group_rows
constexpr int64_t kDenseRowsMaxM = 4;  // dense_bf16_rows_max_m: ATen is as fast at M = 8 (Zen 4)

// The values 2 KB ahead: a bitmap row's loads advance by each block's popcount, a stride
// the hardware prefetcher does not follow (Zen 4: 12 GB/s from memory without this, 40 GB/s
// with it, on a 26 MB gate_up weight at M = 1).
SLIMSTACK_AVX512BF16 inline void prefetch_values(const uint16_t* v) {
  _mm_prefetch(reinterpret_cast<const char*>(v + 1024), _MM_HINT_T0);
}

SLIMSTACK_AVX512BF16 inline __m512bh as_bf16(__m512i v) {
  __m512bh lanes;
  std::memcpy(&lanes, &v, sizeof(lanes));  // a register move, not a copy through memory
  return lanes;
}

// Both 32-column halves of a 64-column step, limited to the columns left before K.
struct StepMasks {
  __mmask32 lo, hi;
};
inline StepMasks step_masks(int64_t left) {
  const auto first = [](int64_t n) {
    return n >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << n) - 1);
  };
  return {first(left), first(std::max<int64_t>(left - 32, 0))};
}

// 32 bf16 at p; masked only in a dense row's last, partial step (masked loads stream from
// memory at about half the rate on Zen 4).
template <bool Tail>
SLIMSTACK_AVX512BF16 inline __m512i load32(const uint16_t* p, __mmask32 mask) {
  return Tail ? _mm512_maskz_loadu_epi16(mask, p) : _mm512_loadu_si512(p);
}

// A weight row as a stream of 64-column steps: two 32-column bf16 vectors, zeros where the
// format pruned. Only a dense row has a partial (Tail) step: packed rows span Kp, a multiple
// of 64.
struct DenseRow {
  const uint16_t* w;
  template <bool Tail>
  SLIMSTACK_AVX512BF16 void step(int64_t c, StepMasks mask, __m512i& a, __m512i& b) {
    _mm_prefetch(reinterpret_cast<const char*>(w + c + 512), _MM_HINT_T0);
    a = load32<Tail>(w + c, mask.lo);
    b = load32<Tail>(w + c + 32, mask.hi);
  }
};

struct Sparse24Row {
  const uint16_t* v;
  const uint8_t* meta;
  template <bool Tail>
  SLIMSTACK_AVX512BF16 void step(int64_t c, StepMasks, __m512i& a, __m512i& b) {
    // 2 KB of values and 256 B of meta ahead: +10-30% at every M <= 8 on Zen 4, whose
    // prefetchers lose track of several interleaved row streams (2 KB against 1 KB: ~10% at
    // M = 1 in one comparison, within this machine's noise; 4 KB no better)
    _mm_prefetch(reinterpret_cast<const char*>(v + c / 2 + 1024), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(meta + c / 8 + 256), _MM_HINT_T0);
    const __mmask64 kept = sparse24_kept64(meta + c / 8);
    a = sparse24_expand32(v + c / 2, mask_half(kept, 0));
    b = sparse24_expand32(v + c / 2 + 16, mask_half(kept, 1));
  }
};

template <bool Checked>
struct BitmapRow {
  const uint16_t* v;  // advances by each block's kept count
  const uint8_t* bits;
  template <bool Tail>
  SLIMSTACK_AVX512BF16 void step(int64_t c, StepMasks, __m512i& a, __m512i& b) {
    prefetch_values(v);
    a = bitmap_expand32<Checked>(v, bits + c / 8);
    b = bitmap_expand32<Checked>(v, bits + c / 8 + 4);
  }
};

// acc[i][m] += weight row i . x row m over the 64 columns at c.
template <bool Tail, int NR, int MB, int A, typename Row>
SLIMSTACK_AVX512BF16 inline void dot_step(Row* rows, const uint16_t* x, int64_t ldx, int64_t c,
                                          StepMasks mask, __m512 (&acc)[NR][MB][A]) {
  __m512i w[NR][2];
  for (int i = 0; i < NR; ++i) rows[i].template step<Tail>(c, mask, w[i][0], w[i][1]);
  for (int m = 0; m < MB; ++m) {
    const uint16_t* xm = x + m * ldx + c;
    const __m512bh x0 = as_bf16(load32<Tail>(xm, mask.lo));
    const __m512bh x1 = as_bf16(load32<Tail>(xm + 32, mask.hi));
    for (int i = 0; i < NR; ++i) {
      acc[i][m][0] = _mm512_dpbf16_ps(acc[i][m][0], as_bf16(w[i][0]), x0);
      acc[i][m][A - 1] = _mm512_dpbf16_ps(acc[i][m][A - 1], as_bf16(w[i][1]), x1);
    }
  }
}

// out[m, i] (stride ldo per x row) = weight row i of `rows` . x row m, for NR weight rows and
// MB x rows (x stride ldx, columns 0..K; the packed formats pass K = Kp). Up to eight
// (row, x row) pairs each pair keeps two accumulators, so the dot's latency stays hidden.
template <int NR, int MB, typename Row>
SLIMSTACK_AVX512BF16 void dot_rows(const Row* row_streams, const uint16_t* x, int64_t ldx,
                                   int64_t K, c10::BFloat16* out, int64_t ldo) {
  // local copies: a bitmap row's value pointer advances every step, and through the
  // caller's array it was stored and reloaded each time (a store-forwarding round trip in
  // the loop-carried chain); locals stay in registers
  Row rows[NR];
  for (int i = 0; i < NR; ++i) rows[i] = row_streams[i];
  constexpr int A = NR * MB <= 8 ? 2 : 1;
  __m512 acc[NR][MB][A];
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < A; ++a) acc[i][m][a] = _mm512_setzero_ps();
  const int64_t full = K / 64 * 64;
  for (int64_t c = 0; c < full; c += 64) dot_step<false>(rows, x, ldx, c, StepMasks{}, acc);
  if (full < K) dot_step<true>(rows, x, ldx, full, step_masks(K - full), acc);
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MB; ++m) {
      const __m512 sum = A == 2 ? _mm512_add_ps(acc[i][m][0], acc[i][m][1]) : acc[i][m][0];
      out[m * ldo + i] = c10::BFloat16(_mm512_reduce_add_ps(sum));
    }
}

// All M x rows against weight rows n0..n0+count (count <= kTaskRows): make_row(n)
// gives row n's stream. The x rows go in passes of up to kMaxRows, each pass over the
// group's rows from their start.
template <typename MakeRow>
void dot_group(const uint16_t* x, int64_t M, int64_t ldx, int64_t K, int64_t n0, int64_t count,
               const MakeRow& make_row, c10::BFloat16* out, int64_t N) {
  in_steps_of<kMaxRows>(M, [&](auto x_rows, int64_t m) {
    constexpr int MB = decltype(x_rows)::value;
    using Row = decltype(make_row(n0));
    const auto pass = [&](auto group) {
      constexpr int NR = decltype(group)::value;
      int64_t n = n0;
      for (; n + NR <= n0 + count; n += NR) {
        Row rows[NR];
        for (int i = 0; i < NR; ++i) rows[i] = make_row(n + i);
        dot_rows<NR, MB>(rows, x + m * ldx, ldx, K, out + m * N + n, N);
      }
      for (; n < n0 + count; ++n) {  // the group's tail, one row a pass
        Row row = make_row(n);
        dot_rows<1, MB>(&row, x + m * ldx, ldx, K, out + m * N + n, N);
      }
    };
    if (MB * K * 2 > kOneRowXBytes)
      pass(std::integral_constant<int, group_rows(MB)>{});
    else
      pass(std::integral_constant<int, 1>{});
  });
}

// x as raw bf16 [M, Kp], zero past K (padding weights meet zeros): x itself when K == Kp.
const uint16_t* padded_x(const c10::BFloat16* x, int64_t M, int64_t K, int64_t Kp,
                         std::vector<uint16_t>& buf) {
  if (K == Kp) return reinterpret_cast<const uint16_t*>(x);
  buf.assign(static_cast<size_t>(M * Kp), 0);
  for (int64_t m = 0; m < M; ++m) std::memcpy(buf.data() + m * Kp, x + m * K, 2 * K);
  return buf.data();
}

// group(n0, count) multiplies weight rows n0..n0+count with all M rows of x and returns -1,
// or the smallest malformed row among them. Groups of kTaskRows rows go to threads. Returns
// -1 or the smallest malformed row.
template <typename Group>
int64_t over_groups(int64_t M, int64_t N, int64_t K, const Group& group) {
  std::atomic<int64_t> first_bad{N};
  const int64_t groups = (N + kTaskRows - 1) / kTaskRows;
  const int64_t work = kTaskRows * K * std::max<int64_t>(M, 1);
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / work);
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * kTaskRows;
      const int64_t bad = group(n0, std::min(kTaskRows, N - n0));
      if (bad < 0) continue;
      keep_smallest(first_bad, bad);
      return;
    }
  });
  const int64_t bad = first_bad.load();
  return bad == N ? -1 : bad;
}

}  // namespace

int64_t dense_bf16_rows_max_m() { return bf16_dot_active() ? kDenseRowsMaxM : 0; }

void dense_mm_bf16_dot(const c10::BFloat16* x, const c10::BFloat16* weight, c10::BFloat16* out,
                       int64_t M, int64_t N, int64_t K) {
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x);
  const uint16_t* w16 = reinterpret_cast<const uint16_t*>(weight);
  over_groups(M, N, K, [&](int64_t n0, int64_t count) {
    dot_group(x16, M, K, K, n0, count, [&](int64_t n) { return DenseRow{w16 + n * K}; }, out,
              N);
    return int64_t{-1};
  });
}

void sparse24_mm_bf16_dot(const c10::BFloat16* x, const c10::BFloat16* values,
                          const uint8_t* meta, c10::BFloat16* out, int64_t M, int64_t N,
                          int64_t K) {
  const int64_t Kp = padded_k(K);
  std::vector<uint16_t> buf;
  const uint16_t* x16 = padded_x(x, M, K, Kp, buf);
  const uint16_t* v16 = reinterpret_cast<const uint16_t*>(values);
  over_groups(M, N, Kp, [&](int64_t n0, int64_t count) {
    const auto row = [&](int64_t n) {
      return Sparse24Row{v16 + n * (Kp / 2), meta + n * (Kp / 8)};
    };
    dot_group(x16, M, Kp, Kp, n0, count, row, out, N);
    return int64_t{-1};
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
  return over_groups(M, N, Kp, [&](int64_t n0, int64_t count) {
    // full loads read up to 31 values past a row's end: checked loads for the whole group
    // when one of its rows ends that near the end of `values`
    int64_t last_end = 0;
    for (int64_t n = n0; n < n0 + count; ++n) {
      if (!row_fits(bitmask + n * (Kp / 8), Kp, row_offsets[n], row_offsets[n + 1],
                    values_numel))
        return n;
      last_end = std::max(last_end, row_offsets[n + 1]);
    }
    const auto run = [&](auto checked) {
      const auto row = [&](int64_t n) {
        return BitmapRow<decltype(checked)::value>{v16 + row_offsets[n], bitmask + n * (Kp / 8)};
      };
      dot_group(x16, M, Kp, Kp, n0, count, row, out, N);
    };
    if (near_values_end(last_end, values_numel))
      run(std::true_type{});
    else
      run(std::false_type{});
    return int64_t{-1};
  });
}

#else  // not x86: bf16_dot_active() is false, so these are never called

int64_t dense_bf16_rows_max_m() { return 0; }

void dense_mm_bf16_dot(const c10::BFloat16*, const c10::BFloat16*, c10::BFloat16*, int64_t,
                       int64_t, int64_t) {}

void sparse24_mm_bf16_dot(const c10::BFloat16*, const c10::BFloat16*, const uint8_t*,
                          c10::BFloat16*, int64_t, int64_t, int64_t) {}

int64_t bitmap_mm_bf16_dot(const c10::BFloat16*, const c10::BFloat16*, int64_t, const uint8_t*,
                           const int64_t*, c10::BFloat16*, int64_t, int64_t, int64_t) {
  return -1;
}

#endif

}  // namespace slimstack::cpu
