// bitmap_gemv: y[M, N] = x[M, K] @ W^T for decode (M = 1..16), W unstructured-sparse in the
// bitmap layout (python/slimstack/formats/bitmap.py): bitmask uint8 [N, Kp/8] (bit j of byte b <=> column 8b + j kept),
// values 1-D with each row's kept values in column order starting at row_offsets[n] (a multiple
// of 8 elements, so every row starts 16-byte aligned), row_offsets int64 [N + 1].
//
// Work split
//   A warp owns kRowsPerWarp rows at a time and walks K in 1024-column sub-tiles: lane L takes
//   the 32 columns [32L, 32L + 32) of the sub-tile (one 32-bit mask word, coalesced across the
//   warp). popc + a warp scan give each lane where its kept values start in the row's value
//   list; the lane reads them with 16-byte loads of the aligned 8-element chunks that cover
//   them (neighbouring lanes share at most one chunk, served by L1) and pairs each value with
//   its column by popping set bits of its mask word.
//   x lives in shared memory as [column][token] so one kept value needs one vector load for all
//   M tokens; it is staged per "window" of columns that fits the budget (all of K for small M,
//   so one staging per block), zero at and beyond K.
//   When one window holds all of K, a block makes several passes over row groups so the staging
//   is amortised over more rows.
#include "cuda/common.cuh"

namespace slimstack {
namespace cuda {
namespace {

using detail::ElemTraits;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 2;                       // rows in flight per warp
constexpr int kRowsPerPass = kWarps * kRowsPerWarp;   // rows a block handles per pass
constexpr int kSubTileCols = 1024;                    // 32 lanes x 32 columns
constexpr int kSmemBudget = 48 * 1024;
constexpr int kBlocksPerSmTarget = 4;

struct BitmapParams {
  const void* x;
  int64_t ldx;
  const uint4* values;         // 8 elements per uint4
  const uint32_t* bitmask;     // row stride Kp / 32 words
  const int64_t* row_offsets;  // [N + 1]
  void* y;
  int64_t ldy;
  int M, N, K, Kp;
  int window_cols;  // columns of x staged at a time (multiple of kSubTileCols)
  int passes;       // row groups of kRowsPerPass per block (only when one window covers K)
  bool x_vec_ok;
};

// Load the kMaxM token values of one column from shared memory as floats.
template <typename T, int kMaxM>
__device__ __forceinline__ void load_tokens(const T* src, float (&out)[kMaxM]) {
  if constexpr (kMaxM == 1) {
    out[0] = ElemTraits<T>::to_float(src[0]);
  } else {
    // kMaxM * 2 bytes, aligned to that size (the column stride is kMaxM elements).
    constexpr int kWords = kMaxM / 2;
    uint32_t w[kWords];
    if constexpr (kWords == 1) {
      w[0] = *reinterpret_cast<const uint32_t*>(src);
    } else if constexpr (kWords == 2) {
      const uint2 v = *reinterpret_cast<const uint2*>(src);
      w[0] = v.x; w[1] = v.y;
    } else {
#pragma unroll
      for (int i = 0; i < kWords / 4; ++i) {
        const uint4 v = reinterpret_cast<const uint4*>(src)[i];
        w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
      }
    }
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      out[2 * i] = ElemTraits<T>::to_float(ElemTraits<T>::from_bits(static_cast<uint16_t>(w[i] & 0xFFFFu)));
      out[2 * i + 1] = ElemTraits<T>::to_float(ElemTraits<T>::from_bits(static_cast<uint16_t>(w[i] >> 16)));
    }
  }
}

// Stage x[:, col0 : col0 + ncols] into xs[col][token] (kMaxM tokens, zero beyond M and K).
template <typename T, int kMaxM>
__device__ void stage_window(const BitmapParams& p, T* xs, int col0, int ncols) {
  const T zero = ElemTraits<T>::zero();
  if (p.x_vec_ok) {
    const int groups = ncols / 8;  // ncols is a multiple of 64
    const int total = kMaxM * groups;
    for (int i = threadIdx.x; i < total; i += kThreads) {
      const int m = i / groups;
      const int c = (i - m * groups) * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (m < p.M && col0 + c < p.K) {  // K % 8 == 0 on this path
        v = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + m * p.ldx + col0 + c));
      }
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const uint16_t bits = static_cast<uint16_t>((w[e >> 1] >> (16 * (e & 1))) & 0xFFFFu);
        xs[(c + e) * kMaxM + m] = ElemTraits<T>::from_bits(bits);
      }
    }
  } else {
    const T* x = static_cast<const T*>(p.x);
    const int total = kMaxM * ncols;
    for (int i = threadIdx.x; i < total; i += kThreads) {
      const int m = i / ncols;
      const int c = i - m * ncols;
      const int col = col0 + c;
      xs[c * kMaxM + m] = (m < p.M && col < p.K) ? x[m * p.ldx + col] : zero;
    }
  }
}

__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += n;
  }
  return v;
}

template <typename T>
__device__ __forceinline__ float value_at(const uint4& v, int j) {
  const uint32_t w = j < 2 ? v.x : (j < 4 ? v.y : (j < 6 ? v.z : v.w));
  const uint16_t bits = static_cast<uint16_t>((j & 1) ? (w >> 16) : (w & 0xFFFFu));
  return ElemTraits<T>::to_float(ElemTraits<T>::from_bits(bits));
}

// One lane's share of one row in one sub-tile: the kept values [start, start + count) of the
// value array, whose columns are the set bits of `mask` (offset by col_base in the window).
template <typename T, int kMaxM>
__device__ __forceinline__ void accumulate_lane(const BitmapParams& p, const T* xs, int64_t start,
                                                int count, uint32_t mask, int col_base,
                                                float (&acc)[kMaxM]) {
  if (count == 0) return;
  const int64_t end = start + count;
  for (int64_t chunk = start >> 3; chunk <= (end - 1) >> 3; ++chunk) {
    const uint4 v = __ldg(p.values + chunk);
    const int64_t first = chunk << 3;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t e = first + j;
      if (e < start || e >= end) continue;
      const int bit = __ffs(mask) - 1;
      mask &= mask - 1;
      float xv[kMaxM];
      load_tokens<T, kMaxM>(xs + (col_base + bit) * kMaxM, xv);
      const float w = value_at<T>(v, j);
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) acc[m] = fmaf(w, xv[m], acc[m]);
    }
  }
}

template <typename T, int kMaxM>
__global__ void __launch_bounds__(kThreads) bitmap_gemv_kernel(const BitmapParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int words_per_row = p.Kp / 32;
  const int num_windows = (p.Kp + p.window_cols - 1) / p.window_cols;

  for (int pass = 0; pass < p.passes; ++pass) {
    const int row0 = (blockIdx.x * p.passes + pass) * kRowsPerPass + warp * kRowsPerWarp;
    if ((blockIdx.x * p.passes + pass) * kRowsPerPass >= p.N) break;  // block-uniform

    int64_t cursor[kRowsPerWarp];
    float acc[kRowsPerWarp][kMaxM];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = row0 + r;
      cursor[r] = row < p.N ? p.row_offsets[row] : 0;
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) acc[r][m] = 0.f;
    }

    for (int win = 0; win < num_windows; ++win) {
      const int col0 = win * p.window_cols;
      const int ncols = min(p.window_cols, p.Kp - col0);
      // With one window the staging is done once, on the first pass, for all passes.
      if (num_windows > 1 || pass == 0) {
        __syncthreads();  // previous window fully consumed
        stage_window<T, kMaxM>(p, xs, col0, ncols);
        __syncthreads();
      }
      for (int sub = 0; sub < ncols; sub += kSubTileCols) {
        const int lane_col = sub + 32 * lane;  // window-local first column of this lane
        const bool lane_ok = lane_col < ncols;
        uint32_t mask[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const int row = row0 + r;
          mask[r] = (lane_ok && row < p.N)
                        ? __ldg(p.bitmask + static_cast<int64_t>(row) * words_per_row +
                                (col0 + lane_col) / 32)
                        : 0u;
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const int count = __popc(mask[r]);
          const int inclusive = warp_inclusive_scan(count, lane);
          const int total = __shfl_sync(0xffffffffu, inclusive, 31);
          accumulate_lane<T, kMaxM>(p, xs, cursor[r] + (inclusive - count), count, mask[r],
                                    lane_col, acc[r]);
          cursor[r] += total;
        }
      }
    }

    // Reduce the lanes' partial sums; lane 0 writes the row.
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        float v = acc[r][m];
#pragma unroll
        for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
        acc[r][m] = v;
      }
      const int row = row0 + r;
      if (lane == 0 && row < p.N) {
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) {
          if (m < p.M) {
            static_cast<T*>(p.y)[static_cast<int64_t>(m) * p.ldy + row] =
                ElemTraits<T>::from_float(acc[r][m]);
          }
        }
      }
    }
  }
}

template <typename T, int kMaxM>
cudaError_t launch_typed(BitmapParams p, int device, cudaStream_t stream) {
  // Window: as many 1024-column sub-tiles as fit the budget.
  const int bytes_per_col = kMaxM * static_cast<int>(sizeof(T));
  const int max_cols = (kSmemBudget / bytes_per_col) / kSubTileCols * kSubTileCols;
  p.window_cols = std::min<int>(max_cols, static_cast<int>(detail::round_up(p.Kp, kSubTileCols)));
  const int num_windows = static_cast<int>(detail::ceil_div(p.Kp, p.window_cols));
  const int64_t row_groups = detail::ceil_div(p.N, kRowsPerPass);
  p.passes = 1;
  if (num_windows == 1) {
    int sms = 0;
    SLIMSTACK_CUDA_TRY(detail::sm_count(device, &sms));
    const int64_t target_blocks = static_cast<int64_t>(kBlocksPerSmTarget) * sms;
    p.passes = static_cast<int>(std::max<int64_t>(1, row_groups / target_blocks));
  }
  const int64_t blocks = detail::ceil_div(row_groups, p.passes);
  const int smem = std::min<int>(p.window_cols, static_cast<int>(detail::round_up(p.Kp, 64))) *
                   bytes_per_col;
  bitmap_gemv_kernel<T, kMaxM><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_type(const BitmapParams& p, int device, cudaStream_t stream) {
  if (p.M <= 1) return launch_typed<T, 1>(p, device, stream);
  if (p.M <= 2) return launch_typed<T, 2>(p, device, stream);
  if (p.M <= 4) return launch_typed<T, 4>(p, device, stream);
  if (p.M <= 8) return launch_typed<T, 8>(p, device, stream);
  return launch_typed<T, 16>(p, device, stream);
}

}  // namespace

cudaError_t bitmap_gemv(const void* x, int64_t ldx, const void* values, const uint8_t* bitmask,
                        const int64_t* row_offsets, void* y, int64_t ldy, int64_t M, int64_t N,
                        int64_t K, int64_t Kp, DType dtype, cudaStream_t stream) {
  SLIMSTACK_REQUIRE(x != nullptr && values != nullptr && bitmask != nullptr &&
                    row_offsets != nullptr && y != nullptr);
  SLIMSTACK_REQUIRE(M >= 1 && M <= kBitmapGemvMaxM);
  SLIMSTACK_REQUIRE(N >= 1 && N <= INT32_MAX);
  SLIMSTACK_REQUIRE(Kp >= 64 && Kp % 64 == 0 && Kp <= INT32_MAX && K >= 1 && K <= Kp &&
                    K > Kp - 64);
  SLIMSTACK_REQUIRE(ldx >= K && ldy >= N);
  SLIMSTACK_REQUIRE(detail::is_aligned(values, 16) && detail::is_aligned(bitmask, 4) &&
                    detail::is_aligned(row_offsets, 8));
  SLIMSTACK_REQUIRE(detail::is_aligned(x, 2) && detail::is_aligned(y, 2));
  int device = 0;
  SLIMSTACK_CUDA_TRY(cudaGetDevice(&device));

  BitmapParams p;
  p.x = x;
  p.ldx = ldx;
  p.values = static_cast<const uint4*>(values);
  p.bitmask = reinterpret_cast<const uint32_t*>(bitmask);
  p.row_offsets = row_offsets;
  p.y = y;
  p.ldy = ldy;
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.Kp = static_cast<int>(Kp);
  p.window_cols = 0;
  p.passes = 1;
  p.x_vec_ok = detail::is_aligned(x, 16) && ldx % 8 == 0 && K % 8 == 0;

  switch (dtype) {
    case DType::kFloat16:
      return launch_for_type<__half>(p, device, stream);
    case DType::kBFloat16:
      return launch_for_type<__nv_bfloat16>(p, device, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace slimstack
