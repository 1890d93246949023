// sparse24_gemv: y[M, N] = x[M, K] @ W^T for decode (M = 1..16), W in the sparse24
// layout (values [N, Kp/2], meta uint8 [N, Kp/8]), read directly: no second copy of the weight.
//
// Why tensor cores for a GEMV: each kept weight multiplies M activations. On CUDA cores that is
// M shared-memory gathers per weight, which caps M = 16 far below HBM speed; mma.sp does the 2:4
// selection in hardware and feeds x from registers, so the kernel stays memory bound for every M.
//
// Work split
//   block  = 4 warps (8 for the prefetch kernel at M > 8: block_warps); a warp owns kRT tiles
//            of 16 rows; grid = (row blocks, K slices).
//   K slice: blockIdx.y covers `slice_chunks` 16-column chunks. With more than one slice the
//            fp32 partials are summed in slice order (deterministic), on Hopper inside the
//            kernel: the slices of a row block are one thread-block cluster that adds them up
//            through distributed shared memory (cluster_reduce_store); elsewhere each slice
//            writes a workspace that a second kernel sums (splitk_reduce_kernel). At decode
//            sizes that second launch is a visible share of the call (a 4096x4096 layer
//            streams its 18.9 MB in about 4.4 us at 4.3 TB/s).
//   x slice: staged once per block in shared memory (zero beyond K), in a permuted layout that
//            gives each lane its B fragment with two 16-byte loads.
//
// Reading the weight with 16-byte loads. A warp's "quad iteration" covers 16 chunks (256
// columns) of 16 rows: lane (g, t) (g = lane / 4, t = lane % 4) loads, for u = 0..3, chunk
// c = base + 4u + t of rows g and g + 8 (one uint4 each = 8 stored values = 4 groups). Since
// the dot product may visit K in any order, each mma.sp's 32-column "virtual k" is built from
// what the lanes hold: for step s (0, 1) of chunk row u,
//   virtual group q (0..3)  <- real group 4*c_q + 2s       (c_q = base + 4u + q)
//   virtual group q + 4     <- real group 4*c_q + 2s + 1
// so a lane's A fragment is words (2s, 2s+1) of its own uint4s (no shuffles for values), and
// B (x) and the metadata follow the same mapping:
//   * x: a lane needs, from chunks c_{t/2} and c_{t/2 + 2}, the column pairs of parity t % 2;
//     shared memory stores each chunk as two 16-byte pieces (even pairs, odd pairs).
//   * meta: a lane with p = t % 2 needs nibble (2s + p) of the 16-bit meta word of each c_q;
//     the four words of a chunk row are 8 contiguous bytes that lane u of the quad loaded,
//     fetched with 4 shuffles per chunk row (both rows, both steps).
//
// Loads in flight (plan.prefetch). A warp's quad iteration is 4.6 KB of weights. Without
// prefetch a warp requests one, waits, multiplies, requests the next: a split block that runs
// 2 iterations pays two loaded latencies back to back. The prefetch kernel holds two in
// registers (both requested before x is staged; each reloaded right after its last use), which
// needs ~36 more registers: one row tile per warp, 128 registers, 16 warps per SM.
#include "cuda/common.cuh"

#include <cooperative_groups.h>

namespace slimstack {
namespace cuda {
namespace {

using detail::ElemTraits;

constexpr int kWarps = 4;  // warps per block, except the prefetch kernel at M > 8 (8)
constexpr int kThreads = kWarps * 32;
constexpr int kChunkCols = 16;        // logical columns per 16-byte chunk of stored values
constexpr int kChunksPerIter = 16;    // chunks per quad iteration (4 u-steps x 4 lanes)
constexpr int kTokenPadWords = 16;    // 64 B pad per token row keeps the B loads conflict free
constexpr int kSmemBudget = 48 * 1024;  // default dynamic smem limit: no opt-in, 4+ blocks/SM
// The 8-warp prefetch kernel (2 blocks per SM) opts in to twice that: a 16-token x slice of
// 2816 columns, so K = 14336 at M = 16 needs 6 slices (one cluster) instead of 12 (and a
// second launch to add them).
constexpr int kSmemBudgetWide = 96 * 1024;
constexpr int kBlocksPerSmTarget = 4;   // enough resident warps to keep ~32 KB/SM in flight
constexpr int64_t kMaxGridY = kSparse24GemvMaxSplit;  // K slices are grid.y
constexpr int64_t kMaxN = INT32_MAX - 2 * kWarps * 16;  // rows of the last block (<= 128) fit

static_assert(kMaxRowsN <= kMaxN, "the glue's N limit must be one this kernel takes");

// Warps per block. At M > 8 every block re-reads its x slice from L2 (M x 2 bytes per column
// against 1.125 per column and row of weight: M / 36 of the weight bytes with 64-row blocks,
// 0.44 at M = 16), so the prefetch kernel there runs 8 warps, 128 rows per block (2 blocks of
// 128 registers per SM: the same 16 warps). The other kernels keep 4.
template <int kNT, bool kPrefetch>
constexpr int block_warps() {
  return kPrefetch && kNT == 2 ? 8 : 4;
}

struct GemvParams {
  const void* x;
  int64_t ldx;
  const uint4* values;  // row stride Kp / 16 uint4
  const uint2* meta;    // row stride Kp / 64 uint2
  void* y;
  int64_t ldy;
  float* partial;  // [split, M, N] fp32 when gridDim.y > 1
  int M, N, K, Kp;
  int num_chunks;          // Kp / 16
  int slice_chunks;        // chunks per K slice (multiple of 16)
  int token_stride_words;  // shared-memory words per token: slice_chunks * 8 + pad
  bool x_vec_ok;           // x rows allow aligned 16-byte loads
};

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// From lo = w0 | w1 << 16, hi = w2 | w3 << 16 (four 16-bit meta words), nibble k of each word,
// packed as w0.k | w1.k << 4 | w2.k << 8 | w3.k << 12.
__device__ __forceinline__ uint32_t gather_nibbles(uint32_t lo, uint32_t hi, int k) {
  const uint32_t a = (lo >> (4 * k)) & 0x000F000Fu;
  const uint32_t b = (hi >> (4 * k)) & 0x000F000Fu;
  return ((a | (a >> 12)) & 0xFFu) | (((b | (b >> 12)) & 0xFFu) << 8);
}

// Stage x[:, chunk_begin*16 : (chunk_begin + chunk_count)*16] into shared memory, zero at and
// beyond K. Per token, chunk lc occupies words [lc*8, lc*8 + 8): words 0..3 hold the column
// pairs {0,1},{4,5},{8,9},{12,13}, words 4..7 the pairs {2,3},{6,7},{10,11},{14,15}.
// kCoherent: x through the coherent path (a programmatic dependent reads what the kernel before
// it wrote; ptxas may hoist .nc loads above griddepcontrol.wait).
template <typename T, int kBlockThreads, bool kCoherent>
__device__ void stage_x(const GemvParams& p, uint32_t* xs, int chunk_begin, int chunk_count) {
  const int tsw = p.token_stride_words;
  if (p.x_vec_ok) {
    const T* x = static_cast<const T*>(p.x);
    const int halves = chunk_count * 2;  // 8-column halves per token
    const int total = p.M * halves;
    for (int i = threadIdx.x; i < total; i += kBlockThreads) {
      const int m = i / halves;
      const int hc = i - m * halves;
      const int lc = hc >> 1;
      const int hh = hc & 1;
      const int col = (chunk_begin + lc) * kChunkCols + hh * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (col < p.K) {  // K % 8 == 0 on this path, so the 8 columns are all in range
        const auto* src = reinterpret_cast<const uint4*>(x + m * p.ldx + col);
        if constexpr (kCoherent) {
          v = detail::ld_coherent_v4(src);
        } else {
          v = __ldg(src);
        }
      }
      // v.x..v.w are pairs 4hh..4hh+3: even pairs to piece 0, odd pairs to piece 1.
      uint32_t* dst = xs + m * tsw + lc * 8 + 2 * hh;
      *reinterpret_cast<uint2*>(dst) = make_uint2(v.x, v.z);
      *reinterpret_cast<uint2*>(dst + 4) = make_uint2(v.y, v.w);
    }
  } else {
    // Unaligned rows or K % 8 != 0: element loads with a bound check per column.
    const uint16_t* x = static_cast<const uint16_t*>(p.x);
    const int pairs = chunk_count * 8;
    const int total = p.M * pairs;
    for (int i = threadIdx.x; i < total; i += kBlockThreads) {
      const int m = i / pairs;
      const int pr = i - m * pairs;
      const int lc = pr >> 3;
      const int pair = pr & 7;
      const int col = (chunk_begin + lc) * kChunkCols + 2 * pair;
      const uint16_t* row = x + m * p.ldx;
      const uint32_t lo = col < p.K ? row[col] : 0u;
      const uint32_t hi = col + 1 < p.K ? row[col + 1] : 0u;
      xs[m * tsw + lc * 8 + (pair & 1) * 4 + (pair >> 1)] = lo | (hi << 16);
    }
  }
}

// Calls f(local_row, token, value) for every accumulator of this thread. The mma.sp C
// fragment: c[0..1] = (row g, tokens 2t, 2t+1), c[2..3] = (row g + 8, the same tokens); rows
// counted from the block's first row.
template <int kNT, int kRT, typename F>
__device__ __forceinline__ void for_each_accumulator(const float (&acc)[kRT][kNT][4], F&& f) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int r = 0; r < kRT; ++r) {
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        f((warp * kRT + r) * 16 + g + 8 * (i >> 1), 8 * j + 2 * t + (i & 1), acc[r][j][i]);
      }
    }
  }
}

// Hopper split-K epilogue: grid.y == cluster size, so the K slices of this row block are the
// blocks of one cluster. Each parks its fp32 partials [M][rows] in its own shared memory (the x
// slice is no longer needed), then every block sums a 1/split share of the block's outputs over
// all slices' shared memory, in slice order (the additions splitk_reduce_kernel makes).
template <typename T, int kNT, int kRT, int kBlockWarps>
__device__ __forceinline__ void cluster_reduce_store(const GemvParams& p,
                                                     const float (&acc)[kRT][kNT][4],
                                                     uint32_t* xs) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  namespace cg = cooperative_groups;
  constexpr int kRows = kBlockWarps * kRT * 16;  // rows of this block
  const cg::cluster_group cluster = cg::this_cluster();
  float* parked = reinterpret_cast<float*>(xs);  // [M][kRows]; fits: see launch_typed
  __syncthreads();  // every warp has read its last x
  for_each_accumulator<kNT, kRT>(acc, [&](int local_row, int token, float value) {
    if (token < p.M) parked[token * kRows + local_row] = value;
  });
  cluster.sync();  // release / acquire: every slice's partials are visible cluster-wide

  const int split = static_cast<int>(cluster.num_blocks());
  const int total = p.M * kRows;
  const int share = (total + split - 1) / split;
  const int begin = static_cast<int>(cluster.block_rank()) * share;
  const int end = min(total, begin + share);
  const int first_row = blockIdx.x * kRows;
  for (int e = begin + threadIdx.x; e < end; e += kBlockWarps * 32) {
    const int token = e / kRows;
    const int row = first_row + (e - token * kRows);
    float sum = 0.f;
    for (int s = 0; s < split; ++s) sum += cluster.map_shared_rank(parked, s)[e];
    if (row < p.N) {
      static_cast<T*>(p.y)[static_cast<int64_t>(token) * p.ldy + row] =
          ElemTraits<T>::from_float(sum);
    }
  }
  // No block may exit while another still reads its shared memory. Nothing is published
  // here, so a relaxed arrive (no release fence) is enough: every remote load above has
  // returned before it, since its value feeds the sum stored to y (a load whose value is
  // unused is dead code and never issued). A full cluster.sync() would add a second
  // MEMBAR.ALL.GPU, waiting on the y stores, to every call.
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
#else
  __trap();  // the launcher picks this path only for an sm_90 image
#endif
}

// The prefetch variants are held to 128 registers: 4 blocks (16 warps, 2 x 4.6 KB of weights
// in flight each) per SM, the occupancy the split plan is built for.
template <typename T, int kNT, int kRT, bool kClusterReduce, bool kPrefetch, bool kPdl>
__global__ void __launch_bounds__(block_warps<kNT, kPrefetch>() * 32,
                                  kPrefetch ? 16 / block_warps<kNT, kPrefetch>() : 0)
    sparse24_gemv_kernel(const GemvParams p) {
#ifdef SLIMSTACK_NEEDS_SM80
  __trap();
#else
  extern __shared__ __align__(16) uint32_t xs[];

  const int split = blockIdx.y;
  const int chunk_begin = split * p.slice_chunks;
  const int chunk_end = min(p.num_chunks, chunk_begin + p.slice_chunks);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int tsw = p.token_stride_words;
  const int64_t values_row = p.Kp / 16;  // uint4 per values row
  const int64_t meta_row = p.Kp / 64;    // uint2 per meta row
  constexpr int kBlockWarps = block_warps<kNT, kPrefetch>();
  constexpr int kBlockThreads = kBlockWarps * 32;
  const int first_tile = (blockIdx.x * kBlockWarps + warp) * kRT;

  using WeightRegs = uint4[kRT][4][2];  // one quad iteration's values: 8 x 16 B per row tile
  using MetaRegs = uint2[kRT][2];       // and its meta: 2 x 8 B per row tile

  // Weight loads: streamed (.nc) without PDL; with it through the coherent path, which ptxas
  // keeps below griddepcontrol.wait (it hoisted .nc loads above the wait in one build).
  auto load_v4 = [](const uint4* ptr) {
    if constexpr (kPdl) return detail::ld_coherent_v4(ptr);
    else return detail::ld_stream_v4(ptr);
  };
  auto load_v2 = [](const uint2* ptr) {
    if constexpr (kPdl) return detail::ld_coherent_v2(ptr);
    else return detail::ld_stream_v2(ptr);
  };

  // Issue every weight load of the quad iteration at chunk `base` into w, mw.
  auto load_weights = [&](WeightRegs& w, MetaRegs& mw, int base) {
    // Chunk rows u with base + 4u < chunk_end (warp-uniform; chunk counts are multiples of 4).
    const int n_u = min(4, (chunk_end - base) >> 2);
#pragma unroll
    for (int r = 0; r < kRT; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = (first_tile + r) * 16 + g + 8 * h;
        const bool row_ok = row < p.N;
        const uint4* vrow = p.values + static_cast<int64_t>(row) * values_row;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          w[r][u][h] = (row_ok && u < n_u) ? load_v4(vrow + base + 4 * u + t)
                                           : make_uint4(0u, 0u, 0u, 0u);
        }
        // Lane t loads the meta of chunk row u = t: chunks base + 4t .. base + 4t + 3.
        mw[r][h] = (row_ok && t < n_u)
                       ? load_v2(p.meta + static_cast<int64_t>(row) * meta_row + (base >> 2) + t)
                       : make_uint2(detail::kPadMeta32, detail::kPadMeta32);
      }
    }
  };

  // Launched as a programmatic dependent (kPdl), the kernel may run while the previous kernel
  // in the stream finishes. Before griddepcontrol.wait it touches nothing that kernel could
  // write, x and y, and not even the weights through the load path (a weight written by a
  // kernel just before, a GPU pack or an in-place update, would be read stale): it only asks
  // L2 for the first quad iterations' weight lines, which the loads after the wait then hit.
  auto prefetch_weights = [&](int base) {
    const int n_u = min(4, (chunk_end - base) >> 2);
#pragma unroll
    for (int r = 0; r < kRT; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = (first_tile + r) * 16 + g + 8 * h;
        if (row >= p.N) continue;
        const uint4* vrow = p.values + static_cast<int64_t>(row) * values_row;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          if (u < n_u) detail::prefetch_l2(vrow + base + 4 * u + t);
        }
        if (t < n_u) detail::prefetch_l2(p.meta + static_cast<int64_t>(row) * meta_row + (base >> 2) + t);
      }
    }
  };

  float acc[kRT][kNT][4];
#pragma unroll
  for (int r = 0; r < kRT; ++r)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][j][i] = 0.f;

  // The mma.sp of the quad iteration at chunk `base`, from w, mw and the staged x.
  auto compute = [&](const WeightRegs& w, const MetaRegs& mw, int base) {
    const int n_u = min(4, (chunk_end - base) >> 2);  // as in load_weights
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (u >= n_u) break;  // warp-uniform
      // B fragments for both k32 steps of this chunk row, every n8 token tile.
      uint32_t b[kNT][2][4];
      const int lc = base - chunk_begin + 4 * u + (t >> 1);  // local chunk of c_{t/2}
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const int token = 8 * j + g;
        uint4 q0 = make_uint4(0u, 0u, 0u, 0u);
        uint4 q1 = q0;
        if (token < p.M) {
          const uint32_t* xrow = xs + token * tsw + (t & 1) * 4;
          q0 = *reinterpret_cast<const uint4*>(xrow + lc * 8);
          q1 = *reinterpret_cast<const uint4*>(xrow + (lc + 2) * 8);
        }
        b[j][0][0] = q0.x; b[j][0][1] = q1.x; b[j][0][2] = q0.y; b[j][0][3] = q1.y;
        b[j][1][0] = q0.z; b[j][1][1] = q1.z; b[j][1][2] = q0.w; b[j][1][3] = q1.w;
      }
      const int src_lane = (lane & ~3) | u;
#pragma unroll
      for (int r = 0; r < kRT; ++r) {
        const uint32_t lo_a = __shfl_sync(0xffffffffu, mw[r][0].x, src_lane);
        const uint32_t hi_a = __shfl_sync(0xffffffffu, mw[r][0].y, src_lane);
        const uint32_t lo_b = __shfl_sync(0xffffffffu, mw[r][1].x, src_lane);
        const uint32_t hi_b = __shfl_sync(0xffffffffu, mw[r][1].y, src_lane);
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const int k = 2 * s + (t & 1);
          const uint32_t e = gather_nibbles(lo_a, hi_a, k) | (gather_nibbles(lo_b, hi_b, k) << 16);
          const uint32_t a[4] = {word_of(w[r][u][0], 2 * s), word_of(w[r][u][1], 2 * s),
                                 word_of(w[r][u][0], 2 * s + 1), word_of(w[r][u][1], 2 * s + 1)};
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
            detail::mma_sp_16832<T, 0>(acc[r][j], a, b[j][s], e);
          }
        }
      }
    }
  };

  WeightRegs w0;
  MetaRegs mw0;
  if constexpr (kPrefetch) {
    // Two quad iterations in flight: w1 streams in while w0 is multiplied, and each buffer
    // is reloaded right after its last use (so neither is live across a load of itself).
    // A split block often runs 2 iterations: both are requested before x is staged.
    WeightRegs w1;
    MetaRegs mw1;
    const bool two = chunk_begin + kChunksPerIter < chunk_end;
    if constexpr (kPdl) {
      prefetch_weights(chunk_begin);
      if (two) prefetch_weights(chunk_begin + kChunksPerIter);
      detail::wait_for_previous_grid();  // x (and anything else) is safe to read from here
    }
    load_weights(w0, mw0, chunk_begin);
    if (two) load_weights(w1, mw1, chunk_begin + kChunksPerIter);
    stage_x<T, kBlockThreads, kPdl>(p, xs, chunk_begin, chunk_end - chunk_begin);
    __syncthreads();
    for (int base = chunk_begin;; base += 2 * kChunksPerIter) {
      // Here w0 holds `base` and w1 (if it exists) `base + kChunksPerIter`.
      compute(w0, mw0, base);
      if (base + 2 * kChunksPerIter < chunk_end) {
        load_weights(w0, mw0, base + 2 * kChunksPerIter);
      }
      if (base + kChunksPerIter >= chunk_end) break;
      compute(w1, mw1, base + kChunksPerIter);
      if (base + 3 * kChunksPerIter < chunk_end) {
        load_weights(w1, mw1, base + 3 * kChunksPerIter);
      }
      if (base + 2 * kChunksPerIter >= chunk_end) break;
    }
  } else {
    // One quad iteration in flight (the two-row-tile variants have no registers for two).
    // The first weights are requested before x is staged: their latency hides the x round
    // trip. The next iteration's loads follow the last use of w0, mw0, so they are never live
    // across the back edge (a load guarded at the top of the loop cost up to 25 registers).
    if constexpr (kPdl) {
      prefetch_weights(chunk_begin);
      detail::wait_for_previous_grid();
    }
    load_weights(w0, mw0, chunk_begin);
    stage_x<T, kBlockThreads, kPdl>(p, xs, chunk_begin, chunk_end - chunk_begin);
    __syncthreads();
    for (int base = chunk_begin;;) {
      compute(w0, mw0, base);
      base += kChunksPerIter;
      if (base >= chunk_end) break;
      load_weights(w0, mw0, base);
    }
  }

  if constexpr (kClusterReduce) {
    cluster_reduce_store<T, kNT, kRT, kBlockWarps>(p, acc, xs);
    return;
  }
  // ---- epilogue: the output, or this slice's fp32 partials for splitk_reduce_kernel ----
  const bool final_output = gridDim.y == 1;
  const int first_row = blockIdx.x * kBlockWarps * kRT * 16;
  for_each_accumulator<kNT, kRT>(acc, [&](int local_row, int token, float value) {
    const int row = first_row + local_row;
    if (row >= p.N || token >= p.M) return;
    if (final_output) {
      static_cast<T*>(p.y)[static_cast<int64_t>(token) * p.ldy + row] =
          ElemTraits<T>::from_float(value);
    } else {
      p.partial[(static_cast<int64_t>(split) * p.M + token) * p.N + row] = value;
    }
  });
#endif
}

// Sum the split-K partials in slice order (deterministic) and convert to the output dtype.
template <typename T>
__global__ void __launch_bounds__(256) splitk_reduce_kernel(const float* __restrict__ partial,
                                                            T* __restrict__ y, int64_t ldy,
                                                            int M, int N, int split) {
  const int64_t total = static_cast<int64_t>(M) * N;
  const int64_t plane = total;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.f;
    for (int s = 0; s < split; ++s) sum += partial[s * plane + i];
    const int64_t token = i / N;
    const int64_t row = i - token * N;
    y[token * ldy + row] = ElemTraits<T>::from_float(sum);
  }
}

int smem_bytes(int M, int slice_chunks) {
  return M * (slice_chunks * 8 + kTokenPadWords) * static_cast<int>(sizeof(uint32_t));
}

// The x slice's shared-memory budget of the kernel a plan runs.
int smem_budget(int64_t M, bool prefetch) {
  return prefetch && M > 8 ? kSmemBudgetWide : kSmemBudget;
}

// Whether the current device is compute capability 9.x and the image the runtime loaded for
// these kernels was compiled for sm_90 (an sm_80 cubin or a JIT of compute_80 PTX holds only
// the __trap() stubs of the cluster epilogue and no griddepcontrol.wait). Cached per device.
bool sm90_image_runs() {
  static signed char cache[detail::kMaxDevices] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return detail::cached_device_flag(device, cache, [device] {
    int major = 0;
    cudaFuncAttributes attr{};
    const bool ok =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
            cudaSuccess &&
        cudaFuncGetAttributes(&attr, sparse24_gemv_kernel<__half, 1, 1, true, false, true>) ==
            cudaSuccess &&
        major >= 9 && attr.ptxVersion >= 90;
    cudaGetLastError();
    return ok;
  });
}

// Whether the cluster epilogue can run on the current device: the sm_90 image runs, and a
// cluster of kMaxClusterSplit blocks fits. Cached per device.
bool cluster_reduce_available() {
  static signed char cache[detail::kMaxDevices] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return detail::cached_device_flag(device, cache, [] {
    bool ok = sm90_image_runs();
    if (ok) {
      // And a cluster of the largest split, with the heaviest variant (most registers) and the
      // whole shared-memory budget, can be resident here (a partitioned or shared GPU may say
      // no): otherwise every split-K call would fail at launch instead of using the reduce
      // kernel.
      cudaLaunchAttribute cluster_attr[1];
      cluster_attr[0].id = cudaLaunchAttributeClusterDimension;
      cluster_attr[0].val.clusterDim.x = 1;
      cluster_attr[0].val.clusterDim.y = kMaxClusterSplit;
      cluster_attr[0].val.clusterDim.z = 1;
      cudaLaunchConfig_t config = {};
      config.gridDim = dim3(1, kMaxClusterSplit);
      config.blockDim = dim3(kThreads);
      config.dynamicSmemBytes = kSmemBudget;
      config.attrs = cluster_attr;
      config.numAttrs = 1;
      int clusters = 0;
      ok = cudaOccupancyMaxActiveClusters(&clusters, sparse24_gemv_kernel<__half, 2, 2, true, false, false>,
                                          &config) == cudaSuccess &&
           clusters > 0;
      // and the 8-warp prefetch kernel's clusters (two blocks per SM at most)
      config.blockDim = dim3(block_warps<2, true>() * 32);
      config.dynamicSmemBytes = kSmemBudgetWide;
      ok = ok && cudaFuncSetAttribute(sparse24_gemv_kernel<__half, 2, 1, true, true, false>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      kSmemBudgetWide) == cudaSuccess;
      clusters = 0;
      ok = ok &&
           cudaOccupancyMaxActiveClusters(&clusters, sparse24_gemv_kernel<__half, 2, 1, true, true, false>,
                                          &config) == cudaSuccess &&
           clusters > 0;
    }
    cudaGetLastError();  // leave no error behind for the next launch check
    return ok;
  });
}

// Raise a kernel's dynamic shared-memory limit to kSmemBudgetWide, once per kernel and device
// (the engine's eager warm-up does it before a CUDA graph captures the launch). The kernel is
// a template argument: every instantiation has its own flags.
template <auto kernel>
cudaError_t opt_in_wide_smem() {
  static signed char done[detail::kMaxDevices] = {0};
  int device = 0;
  SLIMSTACK_CUDA_TRY(cudaGetDevice(&device));
  const bool cached = device >= 0 && device < detail::kMaxDevices;
  if (cached && done[device]) return cudaSuccess;
  SLIMSTACK_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          kSmemBudgetWide));
  if (cached) done[device] = 1;
  return cudaSuccess;
}

template <typename T, int kNT, int kRT, bool kPrefetch, bool kPdl>
cudaError_t launch_typed(const GemvParams& p, const Sparse24GemvPlan& plan, cudaStream_t stream) {
  constexpr int kBlockThreads = block_warps<kNT, kPrefetch>() * 32;
  const int rows_per_block = block_warps<kNT, kPrefetch>() * kRT * 16;
  const int smem = smem_bytes(p.M, p.slice_chunks);
  const bool cluster = plan.reduce == SplitKReduce::kCluster;
  if (smem > kSmemBudget) {  // only the 8-warp prefetch kernel's plans (smem_budget)
    SLIMSTACK_CUDA_TRY(
        (opt_in_wide_smem<sparse24_gemv_kernel<T, kNT, kRT, true, kPrefetch, kPdl>>()));
    SLIMSTACK_CUDA_TRY(
        (opt_in_wide_smem<sparse24_gemv_kernel<T, kNT, kRT, false, kPrefetch, kPdl>>()));
  }
  // The parked partials [M][rows_per_block] fp32 reuse the x slice (>= 16 chunks per token).
  if (cluster) SLIMSTACK_REQUIRE(p.M * rows_per_block * static_cast<int>(sizeof(float)) <= smem);

  cudaLaunchAttribute attrs[2];
  int num_attrs = 0;
  if (cluster) {
    attrs[num_attrs].id = cudaLaunchAttributeClusterDimension;
    attrs[num_attrs].val.clusterDim.x = 1;
    attrs[num_attrs].val.clusterDim.y = static_cast<unsigned>(plan.split_k);
    attrs[num_attrs].val.clusterDim.z = 1;
    ++num_attrs;
  }
  if constexpr (kPdl) {
    attrs[num_attrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[num_attrs].val.programmaticStreamSerializationAllowed = 1;
    ++num_attrs;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(detail::ceil_div(p.N, rows_per_block)),
                        static_cast<unsigned>(plan.split_k));
  config.blockDim = dim3(kBlockThreads);
  config.dynamicSmemBytes = static_cast<size_t>(smem);
  config.stream = stream;
  config.attrs = num_attrs > 0 ? attrs : nullptr;
  config.numAttrs = static_cast<unsigned>(num_attrs);
  if (cluster) {
    SLIMSTACK_CUDA_TRY(
        cudaLaunchKernelEx(&config, sparse24_gemv_kernel<T, kNT, kRT, true, kPrefetch, kPdl>, p));
    return cudaGetLastError();
  }
  SLIMSTACK_CUDA_TRY(
      cudaLaunchKernelEx(&config, sparse24_gemv_kernel<T, kNT, kRT, false, kPrefetch, kPdl>, p));
  SLIMSTACK_CUDA_TRY(cudaGetLastError());
  if (plan.reduce == SplitKReduce::kKernel) {
    const int64_t total = static_cast<int64_t>(p.M) * p.N;
    const int blocks = static_cast<int>(std::min<int64_t>(detail::ceil_div(total, 256), 4096));
    splitk_reduce_kernel<T><<<blocks, 256, 0, stream>>>(p.partial, static_cast<T*>(p.y), p.ldy,
                                                        p.M, p.N, plan.split_k);
    SLIMSTACK_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

template <typename T, bool kPdl>
cudaError_t launch_variant(const GemvParams& p, const Sparse24GemvPlan& plan,
                           cudaStream_t stream) {
  const bool two_token_tiles = p.M > 8;
  if (plan.row_tiles_per_warp == 2) {
    return two_token_tiles ? launch_typed<T, 2, 2, false, kPdl>(p, plan, stream)
                           : launch_typed<T, 1, 2, false, kPdl>(p, plan, stream);
  }
  if (plan.prefetch) {
    return two_token_tiles ? launch_typed<T, 2, 1, true, kPdl>(p, plan, stream)
                           : launch_typed<T, 1, 1, true, kPdl>(p, plan, stream);
  }
  return two_token_tiles ? launch_typed<T, 2, 1, false, kPdl>(p, plan, stream)
                         : launch_typed<T, 1, 1, false, kPdl>(p, plan, stream);
}

template <typename T>
cudaError_t launch_for_type(const GemvParams& p, const Sparse24GemvPlan& plan,
                            cudaStream_t stream) {
  return plan.pdl ? launch_variant<T, true>(p, plan, stream)
                  : launch_variant<T, false>(p, plan, stream);
}

// Blocks of the prefetch kernel (one row tile per warp) that fit an SM by registers alone;
// the x slice's shared memory is checked against the plan afterwards. Asks the current device
// (the occupancy API has no device argument); cached per device and token-tile count (the two
// variants differ by a few registers).
int prefetch_blocks_per_sm(int device, bool two_token_tiles) {
  static signed char cache[2][detail::kMaxDevices] = {{0}};
  // What the register budget (__launch_bounds__: 16 warps of <= 128 registers) promises.
  const int promised = 16 / (two_token_tiles ? block_warps<2, true>() : block_warps<1, true>());
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess || current != device || device < 0 ||
      device >= detail::kMaxDevices) {
    cudaGetLastError();
    return promised;
  }
  signed char& slot = cache[two_token_tiles ? 1 : 0][device];
  if (slot > 0) return slot;
  int blocks = 0;
  const cudaError_t err =
      two_token_tiles
          ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                &blocks, sparse24_gemv_kernel<__nv_bfloat16, 2, 1, false, true, false>,
                block_warps<2, true>() * 32, 0)
          : cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                &blocks, sparse24_gemv_kernel<__nv_bfloat16, 1, 1, false, true, false>,
                block_warps<1, true>() * 32, 0);
  if (err != cudaSuccess || blocks <= 0) {
    cudaGetLastError();
    return promised;
  }
  slot = static_cast<signed char>(std::min(blocks, 64));
  return slot;
}

// Shared memory per SM of `device` (bytes; 0 when the runtime does not say).
int64_t smem_per_sm(int device) {
  int bytes = 0;
  if (detail::cached_device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(
          device, &bytes) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return bytes;
}

bool valid_choice(Choice c) {
  return c == Choice::kAuto || c == Choice::kOff || c == Choice::kOn;
}

}  // namespace

bool sparse24_gemv_pdl_available() { return sm90_image_runs(); }

cudaError_t sparse24_gemv_plan(int64_t M, int64_t N, int64_t Kp, int device,
                               const Sparse24GemvRequest& request, Sparse24GemvPlan* plan) {
  const int split_k_request = request.split_k;
  const SplitKReduce reduce_request = request.reduce;
  SLIMSTACK_REQUIRE(plan != nullptr);
  SLIMSTACK_REQUIRE(valid_choice(request.prefetch) && valid_choice(request.pdl));
  SLIMSTACK_REQUIRE(reduce_request == SplitKReduce::kAuto ||
                    reduce_request == SplitKReduce::kKernel ||
                    reduce_request == SplitKReduce::kCluster);
  SLIMSTACK_REQUIRE(M >= 1 && M <= kSparse24GemvMaxM);
  // Row indices are int in the kernel: the last block's rows must fit.
  SLIMSTACK_REQUIRE(N >= 1 && N <= kMaxN && Kp >= 64 && Kp % 64 == 0 && Kp <= INT32_MAX);
  SLIMSTACK_REQUIRE(split_k_request >= 0);

  int sms = 0;
  SLIMSTACK_CUDA_TRY(detail::sm_count(device, &sms));

  // Prefetch (auto, on): one 16-row tile per warp, which leaves the registers for the next quad
  // iteration (two in flight per warp), in blocks of 4 warps, or 8 at M > 8 (block_warps: the
  // x re-reads). Off, the plan measured on the H200 on 2026-12-04: one iteration in flight, two
  // row tiles per warp once there are plenty of rows (halving the x re-reads per byte of
  // weight), one with few rows to keep more blocks in the grid.
  const bool prefetch = request.prefetch != Choice::kOff;
  const int row_tiles = !prefetch && N >= 8192 ? 2 : 1;
  const int block_warps_here = prefetch && M > 8 ? block_warps<2, true>() : kWarps;
  const int64_t rows_per_block = block_warps_here * 16 * row_tiles;
  const int64_t row_blocks = detail::ceil_div(N, rows_per_block);
  const int64_t num_chunks = Kp / kChunkCols;
  const int64_t max_split = detail::ceil_div(num_chunks, kChunksPerIter);

  // Largest slice whose x fits the shared-memory budget (a multiple of 16 chunks, >= 16).
  const int budget = smem_budget(M, prefetch);
  int64_t max_slice = (budget / (static_cast<int64_t>(M) * 4) - kTokenPadWords) / 8;
  max_slice = std::max<int64_t>(kChunksPerIter, max_slice / kChunksPerIter * kChunksPerIter);
  const int64_t min_split = detail::ceil_div(num_chunks, max_slice);

  int current = -1;
  SLIMSTACK_CUDA_TRY(cudaGetDevice(&current));
  const bool clusters = current == device && cluster_reduce_available();
  const bool pdl_runs = current == device && sm90_image_runs();
  if (request.pdl == Choice::kOn && !pdl_runs) return cudaErrorNotSupported;

  // Few rows (1024x4096 wants 16 slices): on Hopper stay within one cluster when x allows it.
  // The second launch a larger split needs costs more than its weight traffic at that size;
  // reduce='kernel' keeps the larger split (the benchmark's comparison).
  const bool cap_at_cluster = split_k_request == 0 && reduce_request != SplitKReduce::kKernel &&
                              clusters && min_split <= kMaxClusterSplit;
  // The split a wanted one becomes, and its slice: within the cluster cap, at least what x's
  // shared memory needs, at most one slice per quad iteration, whole quad iterations per slice.
  int64_t slice = 0;
  auto settle = [&](int64_t wanted) {
    int64_t s = cap_at_cluster ? std::min<int64_t>(wanted, kMaxClusterSplit) : wanted;
    s = std::min({std::max(s, min_split), max_split, kMaxGridY});
    slice = detail::round_up(detail::ceil_div(num_chunks, s), kChunksPerIter);
    return detail::ceil_div(num_chunks, slice);
  };
  int64_t split = 0;
  if (prefetch && split_k_request == 0) {
    // The prefetch kernel's occupancy comes from the device: the largest split whose grid
    // fits one wave (a tail wave of a few blocks would cost a whole extra latency). Registers
    // decide it on Hopper; where the x slice's shared memory allows fewer blocks per SM (an
    // A100's 164 KB, 100 KB on sm_86 / 89), the wave shrinks to that.
    const int64_t by_registers = prefetch_blocks_per_sm(device, M > 8);
    split = settle(std::max<int64_t>(1, by_registers * sms / row_blocks));
    const int64_t by_smem = smem_per_sm(device) /
                            (smem_bytes(static_cast<int>(M), static_cast<int>(slice)) + 1024);
    if (by_smem >= 1 && by_smem < by_registers) {
      split = settle(std::max<int64_t>(1, by_smem * sms / row_blocks));
    }
  } else {
    // Without prefetch (the 2026-12-04 plan), or a requested split.
    // About kBlocksPerSmTarget blocks per SM. The two-row-tile variants take 122-128 registers:
    // exactly that many fit an SM, so a grid past it runs a tail wave, and clusters of an odd
    // size fill the slots worse still (H200 2026-12-04: 13824x5120 at M = 1 made 108 x 5 = 540
    // blocks for 528 slots, 1.13x dense, the worst shape); round the split down there. The
    // one-tile variants (80-84 registers) fit more blocks per SM than the target.
    const int64_t wave = static_cast<int64_t>(kBlocksPerSmTarget) * sms;
    split = settle(split_k_request > 0 ? split_k_request
                   : row_tiles == 2    ? std::max<int64_t>(1, wave / row_blocks)
                                       : detail::ceil_div(wave, row_blocks));
  }
  // Only for K in the tens of millions: grid.y caps the split, and x no longer fits.
  if (smem_bytes(static_cast<int>(M), static_cast<int>(slice)) > budget) {
    return cudaErrorNotSupported;
  }

  SplitKReduce reduce = SplitKReduce::kNone;
  if (split > 1) {
    const bool cluster_ok = split <= kMaxClusterSplit && clusters;
    if (reduce_request == SplitKReduce::kCluster && !cluster_ok) return cudaErrorNotSupported;
    reduce = reduce_request != SplitKReduce::kKernel && cluster_ok ? SplitKReduce::kCluster
                                                                   : SplitKReduce::kKernel;
  }

  plan->split_k = static_cast<int>(split);
  plan->slice_chunks = static_cast<int>(slice);
  plan->row_tiles_per_warp = row_tiles;
  plan->prefetch = prefetch;
  plan->warps_per_block = block_warps_here;
  plan->pdl = request.pdl != Choice::kOff && pdl_runs;
  plan->reduce = reduce;
  plan->workspace_bytes =
      reduce == SplitKReduce::kKernel ? static_cast<size_t>(split * M * N) * sizeof(float) : 0;
  return cudaSuccess;
}

cudaError_t sparse24_gemv(const void* x, int64_t ldx, const void* values, const uint8_t* meta,
                          void* y, int64_t ldy, float* workspace, int64_t M, int64_t N, int64_t K,
                          int64_t Kp, const Sparse24GemvPlan& plan, DType dtype,
                          cudaStream_t stream) {
  SLIMSTACK_REQUIRE(x != nullptr && values != nullptr && meta != nullptr && y != nullptr);
  SLIMSTACK_REQUIRE(M >= 1 && M <= kSparse24GemvMaxM);
  SLIMSTACK_REQUIRE(N >= 1 && N <= kMaxN);
  SLIMSTACK_REQUIRE(Kp >= 64 && Kp % 64 == 0 && Kp <= INT32_MAX && K >= 1 && K <= Kp &&
                    K > Kp - 64);
  SLIMSTACK_REQUIRE(ldx >= K && ldy >= N);
  SLIMSTACK_REQUIRE(detail::is_aligned(values, 16) && detail::is_aligned(meta, 8));
  SLIMSTACK_REQUIRE(detail::is_aligned(x, 2) && detail::is_aligned(y, 2));
  // The plan must be one sparse24_gemv_plan() could have produced for this problem.
  const int64_t num_chunks = Kp / kChunkCols;
  SLIMSTACK_REQUIRE(plan.slice_chunks >= kChunksPerIter && plan.slice_chunks % kChunksPerIter == 0);
  SLIMSTACK_REQUIRE(plan.split_k == detail::ceil_div(num_chunks, plan.slice_chunks));
  SLIMSTACK_REQUIRE(plan.split_k <= kMaxGridY);
  SLIMSTACK_REQUIRE(smem_bytes(static_cast<int>(M), plan.slice_chunks) <=
                    smem_budget(M, plan.prefetch));
  SLIMSTACK_REQUIRE(plan.row_tiles_per_warp == 1 || plan.row_tiles_per_warp == 2);
  SLIMSTACK_REQUIRE(!plan.prefetch || plan.row_tiles_per_warp == 1);
  SLIMSTACK_REQUIRE(plan.warps_per_block == (plan.prefetch && M > 8 ? 8 : 4));
  // PDL only where the kernel waits for its input (griddepcontrol.wait is in the sm_90 image).
  if (plan.pdl && !sm90_image_runs()) return cudaErrorNotSupported;
  SLIMSTACK_REQUIRE((plan.split_k == 1) == (plan.reduce == SplitKReduce::kNone));
  SLIMSTACK_REQUIRE(plan.reduce != SplitKReduce::kKernel || workspace != nullptr);
  if (plan.reduce == SplitKReduce::kCluster &&
      (plan.split_k > kMaxClusterSplit || !cluster_reduce_available())) {
    return cudaErrorNotSupported;
  }

  GemvParams p;
  p.x = x;
  p.ldx = ldx;
  p.values = static_cast<const uint4*>(values);
  p.meta = reinterpret_cast<const uint2*>(meta);
  p.y = y;
  p.ldy = ldy;
  p.partial = workspace;
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.Kp = static_cast<int>(Kp);
  p.num_chunks = static_cast<int>(num_chunks);
  p.slice_chunks = plan.slice_chunks;
  p.token_stride_words = plan.slice_chunks * 8 + kTokenPadWords;
  p.x_vec_ok = detail::is_aligned(x, 16) && ldx % 8 == 0 && K % 8 == 0;

  switch (dtype) {
    case DType::kFloat16:
      return launch_for_type<__half>(p, plan, stream);
    case DType::kBFloat16:
      return launch_for_type<__nv_bfloat16>(p, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace slimstack
