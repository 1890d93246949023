// bitmap_gemv: y[M, N] = x[M, K] @ W^T for decode (M = 1..16), W unstructured-sparse in the
// bitmap layout (python/slimstack/formats/bitmap.py): bitmask uint8 [N, Kp/8] (bit j of byte b <=> column 8b + j kept),
// values 1-D with each row's kept values in column order starting at row_offsets[n] (a multiple
// of 8 elements, so every row starts 16-byte aligned), row_offsets int64 [N + 1].
//
// Work split
//   A warp owns kRowsPerWarp rows at a time and walks K in 1024-column sub-tiles: lane L takes
//   the 32 columns [32L, 32L + 32) of the sub-tile (one 32-bit mask word, coalesced across the
//   warp). popc + a warp scan give each lane where its kept values start in the row's value
//   list; the lane reads them as the aligned 8-element chunks that cover them and pairs each
//   value with its column by popping set bits of its mask word.
//   x lives in shared memory with a column's M tokens together (XLayout: units of up to 8
//   tokens, arranged so that the 32 lanes' loads never share a bank) so one kept value needs
//   one or two vector loads for all M tokens; it is staged per "window" of columns that fits
//   the budget (all of K for small M, so one staging per block), zero at and beyond K.
//   When one window holds all of K, a block makes several passes over row groups so the staging
//   is amortised over more rows.
//
// Weight stream (what keeps enough bytes in flight without registers)
//   A sub-tile's values of a row are one contiguous run of ~65 chunks: the warp copies the run
//   into a per-row shared-memory ring with cp.async (512 coalesced bytes per instruction, no
//   register held while in flight), and the lanes read their chunks from the ring. Each row has
//   kDepth ring slots, sub-tile s in slot s % kDepth. Order per warp: row offsets and masks
//   first, then the first kDepth sub-tiles' copies for both rows, then x staged (its round trip
//   overlaps theirs); masks are loaded one sub-tile ahead of their placement, and a row's
//   copies for sub-tile s + kDepth go out as soon as its sub-tile s is consumed, while the warp
//   works on its other row and its next sub-tile. kDepth = 2 at M = 1 (the default): on the
//   H200 (2026-12-04) one sub-tile in flight per row (~2 KB per warp) moved 1.6-2.2 TB/s,
//   against 3.0 for the 2:4 GEMV with ~4.6 KB per warp; each step waited a loaded round trip
//   less one row's accumulation. Each lane accumulates its values in column order,
//   sub-tile after sub-tile, then the xor butterfly: the same fmaf sequence per output as a
//   plain loop over the lane's columns.
//
// M = 1 (column order, accumulate_cols)
//   One token needs no [column][token] vector, so the lane instead walks its 32 columns in order
//   (fully unrolled, predicated on the mask bit): x for them sits in 16 registers, loaded per
//   sub-tile with 4 LDS.128 and shared by the warp's two rows (the x window is staged with its
//   16-byte chunks permuted, x_slot, so those loads are free of bank conflicts), and each kept
//   value is one 2-byte read from the ring at a pointer that advances per set bit. About 206
//   instructions per 32 columns in the sm_90a SASS, against ~528 for the chunk loop; the fmaf
//   sequence per output is unchanged. A lane whose values reach past the ring takes a rolled
//   loop reading those from global memory and x from shared memory.
#include <type_traits>

#include "cuda/common.cuh"

namespace slimstack {
namespace cuda {
namespace {

using detail::ElemTraits;

constexpr int kWarps = 8;                             // warps per block (most)
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 2;                       // rows in flight per warp
// M = 1 with small N: blocks of kW = 4 or 2 warps (launch_warps), so that more SMs share the
// rows (each row stays with one warp, in the same order: outputs unchanged). The kernel is
// compiled for kThreads either way (same register allocation).
constexpr int kSubTileCols = 1024;                    // 32 lanes x 32 columns
constexpr int kXBudget = 32 * 1024;                  // x window: 1024 columns of 16 tokens
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
  int num_windows;  // ceil(Kp / window_cols)
  int num_subs;     // ceil(Kp / kSubTileCols), over all windows
  int passes;       // row groups of kW * kRowsPerWarp per block (only when one window covers K)
  int ring_offset;  // bytes of shared memory before the value rings (the x window's)
  bool x_vec_ok;
};

// M > 1: x's window in shared memory, tokens of a column in "units" of kUnit elements (4, 8 or
// 16 bytes; a column of 16 tokens is two units). A lane reads one column of its 32 at a time,
// the one of its next kept value, so the columns the 32 lanes read at once are 32L + b_L with an
// arbitrary b_L each. Stored column after column ([column][token]), the unit of lane L would sit
// at bank (8 b_L) mod 32 for 16 tokens: 8 lanes of a quarter-warp phase in 4 bank groups, 3 to 4
// wavefronts per 16-byte load where 1 suffices. So within each 1024-column sub-tile, unit j of
// column 32L + b is unit (b * kUnitsPerCol + j) * 32 + L: the 32 lanes' units are consecutive,
// whatever their columns, and every load is conflict-free.
template <int kMaxM>
struct XLayout {
  static constexpr int kUnit = kMaxM < 8 ? kMaxM : 8;        // elements per unit
  static constexpr int kUnitsPerCol = kMaxM / kUnit;         // 1, or 2 for 16 tokens
  static constexpr int kSubTileElems = 1024 * kMaxM;
  // Element of token m of window-local column c.
  static __device__ __forceinline__ int elem(int c, int m) {
    const int lane = (c >> 5) & 31, b = c & 31;
    return (c >> 10) * kSubTileElems +
           ((b * kUnitsPerCol + m / kUnit) * 32 + lane) * kUnit + m % kUnit;
  }
  // The lane's unit 0 of its column 0 in the sub-tile holding window-local column col_base.
  static __device__ __forceinline__ int lane_base(int col_base) {
    return (col_base >> 10) * kSubTileElems + ((col_base >> 5) & 31) * kUnit;
  }
};

// Load the kMaxM token values of column b of the lane's 32 (lane_x: XLayout::lane_base) as
// floats.
template <typename T, int kMaxM>
__device__ __forceinline__ void load_tokens(const T* lane_x, int b, float (&out)[kMaxM]) {
  using L = XLayout<kMaxM>;
  uint32_t w[kMaxM / 2];
#pragma unroll
  for (int j = 0; j < L::kUnitsPerCol; ++j) {
    const T* src = lane_x + (b * L::kUnitsPerCol + j) * 32 * L::kUnit;
    uint32_t* dst = w + j * (L::kUnit / 2);
    if constexpr (L::kUnit == 2) {
      dst[0] = *reinterpret_cast<const uint32_t*>(src);
    } else if constexpr (L::kUnit == 4) {
      const uint2 v = *reinterpret_cast<const uint2*>(src);
      dst[0] = v.x; dst[1] = v.y;
    } else {
      const uint4 v = *reinterpret_cast<const uint4*>(src);
      dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxM / 2; ++i) {
    out[2 * i] = ElemTraits<T>::to_float(ElemTraits<T>::from_bits(static_cast<uint16_t>(w[i] & 0xFFFFu)));
    out[2 * i + 1] = ElemTraits<T>::to_float(ElemTraits<T>::from_bits(static_cast<uint16_t>(w[i] >> 16)));
  }
}

// M = 1: where window-local column c of x lives in xs. The 16-byte chunks (8 columns) of each
// lane's 32 columns are permuted within the lane's 64 bytes, chunk g at g ^ ((g >> 3) & 3), so
// that the 4 LDS.128 with which a lane loads its columns (lanes 64 bytes apart) are free of bank
// conflicts (window and sub-tile starts are multiples of 1024 columns, so the permutation is the
// same in every sub-tile: lane L's chunk q is at 4L + (q ^ ((L >> 1) & 3)) past the sub-tile's).
__device__ __forceinline__ int x_slot(int c) {
  return (((c >> 6) & 3) << 3) ^ c;
}

// Stage x[:, col0 : col0 + ncols] into xs[col][token] (kMaxM tokens, zero beyond M and K).
template <typename T, int kMaxM, int kW>
__device__ void stage_window(const BitmapParams& p, T* xs, int col0, int ncols) {
  const T zero = ElemTraits<T>::zero();
  if constexpr (kMaxM == 1) {
    // One token: xs is x's row itself, copied 16 bytes at a time without passing through
    // registers (zero-filled at and beyond K); waits for every copy of the thread, the value
    // rings' included.
    if (p.x_vec_ok) {
      const T* x = static_cast<const T*>(p.x);
      for (int c = 8 * threadIdx.x; c < ncols; c += 8 * kW * 32) {
        const bool in = col0 + c < p.K;  // K % 8 == 0 on this path
        detail::cp_async_16(detail::smem_addr(xs + x_slot(c)), in ? x + col0 + c : x, in ? 16 : 0);
      }
      detail::cp_async_commit();
      detail::cp_async_wait<0>();
      return;
    }
  }
  if (p.x_vec_ok) {
    // Thread i takes token i % kMaxM of 8 columns: the threads of a warp write the tokens of
    // the same columns, next to each other in a unit (a 2-to-4-way conflict per store, where
    // token-major threads all hit one bank).
    const int groups = ncols / 8;  // ncols is a multiple of 64
    const int total = kMaxM * groups;
    for (int i = threadIdx.x; i < total; i += kW * 32) {
      const int m = i % kMaxM;
      const int c = (i / kMaxM) * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (m < p.M && col0 + c < p.K) {  // K % 8 == 0 on this path
        v = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + m * p.ldx + col0 + c));
      }
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const uint16_t bits = static_cast<uint16_t>((w[e >> 1] >> (16 * (e & 1))) & 0xFFFFu);
        xs[XLayout<kMaxM>::elem(c + e, m)] = ElemTraits<T>::from_bits(bits);
      }
    }
  } else {
    const T* x = static_cast<const T*>(p.x);
    const int total = kMaxM * ncols;
    for (int i = threadIdx.x; i < total; i += kW * 32) {
      const int m = i / ncols;
      const int c = i - m * ncols;
      const int col = col0 + c;
      if constexpr (kMaxM == 1) {
        xs[x_slot(c)] = (m < p.M && col < p.K) ? x[m * p.ldx + col] : zero;
      } else {
        xs[XLayout<kMaxM>::elem(c, m)] = (m < p.M && col < p.K) ? x[m * p.ldx + col] : zero;
      }
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
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    // bf16 -> fp32 is the bits in the high half (what __bfloat162float does): one instruction
    return __uint_as_float((j & 1) ? (w & 0xFFFF0000u) : (w << 16));
  }
  const uint16_t bits = static_cast<uint16_t>((j & 1) ? (w >> 16) : (w & 0xFFFFu));
  return ElemTraits<T>::to_float(ElemTraits<T>::from_bits(bits));
}

// Value rings: per warp and row, a shared-memory buffer that one sub-tile's values of the row
// (the chunks from the one holding its first value to the one holding its last) are copied
// into with cp.async, 16 bytes per lane and instruction, coalesced, holding no register while
// in flight; a lane then reads its chunks from there (neighbouring lanes share at most one
// chunk). At 50% density a sub-tile's row spans 64-72 chunks (512 +- 16 values); 80 cover up
// to 632 values (62%), chunks past the ring (dense stretches) are read from global memory when
// reached.
constexpr int kRingChunks = 80;
// 20 KB per slot depth at 8 warps
template <int kW, int kDepth>
constexpr int ring_bytes() { return kW * kRowsPerWarp * kDepth * kRingChunks * 16; }
// 52 KB at depth 1 (4 blocks per SM on sm_90), 72 KB at depth 2 (3); an M = 1 window of
// K = 4096 and the depth-2 rings are 48 KB (4 blocks).
template <int kW, int kDepth>
constexpr int smem_max() { return kXBudget + ring_bytes<kW, kDepth>(); }
constexpr int kSmemDefault = 48 * 1024;          // more needs the opt-in

// One lane's share of one row in one sub-tile: its kept values are [start, start + popc(mask))
// of `chunks` (the row's value list from the warp's first chunk of the sub-tile on, which is
// ring entry 0), their columns the set bits of mask.
struct LaneTile {
  const uint4* chunks;
  uint32_t mask;
  int start;
};

// Warp-collective: places the row's next sub-tile after the one t holds (before the first: mask
// 0, start 0, chunks at the row's first chunk). The previous sub-tile's values end where lane
// 31's do; popc + a warp scan place each lane's values after that. Returns the sub-tile's chunk
// count.
__device__ __forceinline__ int place_tile(uint32_t mask, int lane, LaneTile& t) {
  const int prev_end = __shfl_sync(0xffffffffu, t.start + __popc(t.mask), 31);
  t.chunks += prev_end >> 3;
  const int phase = prev_end & 7;  // values of earlier sub-tiles in the first chunk
  const int count = __popc(mask);
  const int inclusive = warp_inclusive_scan(count, lane);
  const int total = __shfl_sync(0xffffffffu, inclusive, 31);
  t.mask = mask;
  t.start = phase + (inclusive - count);
  return total > 0 ? ((phase + total - 1) >> 3) + 1 : 0;
}

// The warp copies a placed sub-tile's chunks into the row's ring (one commit group, empty when
// it has none).
__device__ __forceinline__ void copy_tile(int chunks, int lane, uint4* ring, const LaneTile& t) {
  const int copies = min(chunks, kRingChunks);
#pragma unroll
  for (int k = 0; k < (kRingChunks + 31) / 32; ++k) {
    const int i = lane + 32 * k;
    if (i < copies) detail::cp_async_16(detail::smem_addr(ring + i), t.chunks + i, 16);
  }
  detail::cp_async_commit();
}

// The lane's values of one sub-tile, in column order (the order of the value list), each times
// x at its column: the lowest set bit of mask left, offset by col_base in the window.
template <typename T, int kMaxM>
__device__ __forceinline__ void accumulate_tile(const uint4* ring, const T* xs, int col_base,
                                                const LaneTile& t, float (&acc)[kMaxM]) {
  if (t.mask == 0) return;
  uint32_t mask = t.mask;
  const int start = t.start;
  const int end = start + __popc(mask);
  static_assert(kMaxM > 1, "M = 1 reads x in column order (accumulate_cols)");
  const T* xl = xs + XLayout<kMaxM>::lane_base(col_base);  // the lane's 32 columns
  for (int chunk = start >> 3; chunk <= (end - 1) >> 3; ++chunk) {
    const uint4 v = chunk < kRingChunks ? ring[chunk] : __ldg(t.chunks + chunk);
    // Elements [lo, hi) of the chunk are the lane's (0 <= lo < hi <= 8 here).
    const int lo = max(start - (chunk << 3), 0);
    const int hi = min(end - (chunk << 3), 8);
    const uint32_t kept = (0xFFu << lo) & (0xFFu >> (8 - hi));
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (!((kept >> j) & 1u)) continue;
      const int bit = __ffs(mask) - 1;
      mask &= mask - 1;
      float xv[kMaxM];
      load_tokens<T, kMaxM>(xl, bit, xv);
      const float w = value_at<T>(v, j);
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) acc[m] = fmaf(w, xv[m], acc[m]);
    }
  }
}

// x of column c of the lane's 32 (bits in xw: two columns per word, the lower one low).
template <typename T>
__device__ __forceinline__ float x_col(const uint32_t (&xw)[16], int c) {
  const uint32_t w = xw[c >> 1];
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __uint_as_float((c & 1) ? (w & 0xFFFF0000u) : (w << 16));
  }
  const uint16_t bits = static_cast<uint16_t>((c & 1) ? (w >> 16) : (w & 0xFFFFu));
  return ElemTraits<T>::to_float(ElemTraits<T>::from_bits(bits));
}

template <typename T>
__device__ __forceinline__ float value_bits_to_float(uint16_t bits) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  }
  return ElemTraits<T>::to_float(ElemTraits<T>::from_bits(bits));
}

// M = 1: the lane's 32 columns of the sub-tile in order, x from registers (xf, loaded and
// converted once per sub-tile for both rows: converting per column under each row's bit
// predicate issued the conversion twice), one value per set bit read from the ring (value index t.start on,
// ring entry 0 holding the sub-tile's first chunk). Lanes whose values reach past the ring
// (dense stretches) take a rolled loop that reads those from global memory and x from shared.
// The same fmaf sequence as accumulate_tile<T, 1>.
template <typename T>
__device__ __forceinline__ void accumulate_cols(const uint4* ring, const T* xs, int col_base,
                                                const float (&xf)[32], const LaneTile& t,
                                                float& acc) {
  const uint16_t* ring16 = reinterpret_cast<const uint16_t*>(ring);
  uint32_t mask = t.mask;
  int idx = t.start;
  if (idx + __popc(mask) <= kRingChunks * 8) {
    const uint16_t* w = ring16 + idx;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      if ((mask >> c) & 1u) {
        const float wv = value_bits_to_float<T>(*w++);
        acc = fmaf(wv, xf[c], acc);
      }
    }
  } else {
    const uint16_t* g16 = reinterpret_cast<const uint16_t*>(t.chunks);
    const uint16_t* xs16 = reinterpret_cast<const uint16_t*>(xs);
    while (mask != 0u) {
      const int c = __ffs(mask) - 1;
      mask &= mask - 1;
      const uint16_t bits = idx < kRingChunks * 8 ? ring16[idx] : __ldg(g16 + idx);
      ++idx;
      const float xv = ElemTraits<T>::to_float(ElemTraits<T>::from_bits(xs16[x_slot(col_base + c)]));
      acc = fmaf(value_bits_to_float<T>(bits), xv, acc);
    }
  }
}

template <typename T, int kMaxM, int kW, int kDepth>
__global__ void __launch_bounds__(kThreads) bitmap_gemv_kernel(const BitmapParams p) {
  constexpr int kRowsPerPass = kW * kRowsPerWarp;  // rows a block handles per pass
  static_assert(kDepth == 1 || kDepth == 2, "ring slots per row");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  uint4* rings = reinterpret_cast<uint4*>(smem_raw + p.ring_offset) +
                 warp * kRowsPerWarp * kDepth * kRingChunks;  // this warp's
  // Row r's ring slot for sub-tile s.
  auto ring = [&](int r, int s) -> uint4* {
    return rings + (r * kDepth + s % kDepth) * kRingChunks;
  };
  const int words_per_row = p.Kp / 32;
  const int num_subs = p.num_subs;

  // The lane's 32 mask bits of sub-tile `sub` (global columns 1024 sub + 32 lane ...). A row
  // past N (the last warp's second row when N is odd) works on row N - 1 and is not stored.
  auto load_mask = [&](int row, int sub) -> uint32_t {
    const int col = sub * kSubTileCols + 32 * lane;
    return col < p.Kp ? __ldg(p.bitmask + static_cast<int64_t>(min(row, p.N - 1)) * words_per_row +
                              col / 32)
                      : 0u;
  };

  for (int pass = 0; pass < p.passes; ++pass) {
    const int row0 = (blockIdx.x * p.passes + pass) * kRowsPerPass + warp * kRowsPerWarp;
    if ((blockIdx.x * p.passes + pass) * kRowsPerPass >= p.N) break;  // block-uniform

    // The weight stream in dependency order, ahead of x: row offsets and the first kDepth + 1
    // sub-tiles' masks (independent loads), then, after the scans, the copies of the first
    // kDepth sub-tiles' values, all before x is staged. A row's copies for sub-tile s + kDepth
    // go out right after its sub-tile s is consumed (and its masks for s + kDepth + 1), so
    // they are in flight while the warp works on its other row and next sub-tiles.
    // tile[r][d]: row r's sub-tile s + d while sub-tile s is the next to consume.
    uint32_t next_mask[kRowsPerWarp];
    LaneTile tile[kRowsPerWarp][kDepth];
    float acc[kRowsPerWarp][kMaxM];
    uint32_t first_masks[kRowsPerWarp][kDepth];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = row0 + r;
#pragma unroll
      for (int d = 0; d < kDepth; ++d) first_masks[r][d] = d < num_subs ? load_mask(row, d) : 0u;
      next_mask[r] = kDepth < num_subs ? load_mask(row, kDepth) : 0u;
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) acc[r][m] = 0.f;
    }
    // Copies committed in (sub-tile, row) order, one group each (empty past the last
    // sub-tile), as the loop below commits them.
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        LaneTile t;
        if (d == 0) {
          t.chunks = p.values + (p.row_offsets[min(row0 + r, p.N - 1)] >> 3);  // 8-aligned
          t.mask = 0u;  // "the sub-tile before the first": no values
          t.start = 0;
        } else {
          t = tile[r][d - 1];
        }
        const int n = place_tile(first_masks[r][d], lane, t);
        tile[r][d] = t;
        copy_tile(n, lane, ring(r, d), t);
      }
    }

    int local = p.window_cols;  // window-local first column of the sub-tile
    for (int sub = 0; sub < num_subs; ++sub) {
      if (local == p.window_cols) local = 0;
      // With one window the staging is done once, on the first pass, for all passes.
      if (local == 0 && (p.num_windows > 1 || pass == 0)) {
        const int col0 = sub * kSubTileCols;  // the window's first column
        const int ncols = min(p.window_cols, p.Kp - col0);
        __syncthreads();  // previous window fully consumed
        stage_window<T, kMaxM, kW>(p, xs, col0, ncols);
        __syncthreads();
      }
      const int col_base = local + 32 * lane;  // the lane's window-local first column
      // M = 1: x of the lane's 32 columns, for both rows (none past Kp: the lane's mask bits
      // there are 0, and its columns would lie past the staged window).
      float xf[32];
      if constexpr (kMaxM == 1) {
        const bool in_k = sub * kSubTileCols + 32 * lane < p.Kp;
        const uint4* xs4 = reinterpret_cast<const uint4*>(xs) + (local >> 3) + 4 * lane;
        const int swz = (lane >> 1) & 3;
        uint32_t xw[16];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const uint4 v = in_k ? xs4[q ^ swz] : make_uint4(0u, 0u, 0u, 0u);
          xw[4 * q] = v.x; xw[4 * q + 1] = v.y; xw[4 * q + 2] = v.z; xw[4 * q + 3] = v.w;
        }
#pragma unroll
        for (int c = 0; c < 32; ++c) xf[c] = x_col<T>(xw, c);
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        // Groups committed after this row's sub-tile: one per (sub-tile, row) up to this row's
        // sub-tile + kDepth - 1 and the other rows' in between (empty ones past the last).
        detail::cp_async_wait<kDepth * kRowsPerWarp - 1>();
        __syncwarp();  // every lane's copies of this sub-tile landed
        uint4* slot = ring(r, sub);
        if constexpr (kMaxM == 1) {
          accumulate_cols<T>(slot, xs, col_base, xf, tile[r][0], acc[r][0]);
        } else {
          accumulate_tile<T, kMaxM>(slot, xs, col_base, tile[r][0], acc[r]);
        }
        __syncwarp();  // slot read by every lane before it is refilled
        // Sub-tile sub + kDepth goes into the slot just read, placed after sub + kDepth - 1.
        LaneTile t = tile[r][kDepth - 1];
        if (sub + kDepth < num_subs) {  // warp-uniform
          const int n = place_tile(next_mask[r], lane, t);
          copy_tile(n, lane, slot, t);
          next_mask[r] = sub + kDepth + 1 < num_subs ? load_mask(row0 + r, sub + kDepth + 1) : 0u;
        } else {
          detail::cp_async_commit();  // keeps the wait count above uniform
        }
#pragma unroll
        for (int d = 0; d + 1 < kDepth; ++d) tile[r][d] = tile[r][d + 1];
        tile[r][kDepth - 1] = t;
      }
      local += kSubTileCols;
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

template <typename T, int kMaxM, int kW, int kDepth>
cudaError_t launch_typed(BitmapParams p, int sms, cudaStream_t stream, int device) {
  constexpr int kRowsPerPass = kW * kRowsPerWarp;
  // Window: as many 1024-column sub-tiles as fit the x budget.
  const int bytes_per_col = kMaxM * static_cast<int>(sizeof(T));
  const int max_cols = (kXBudget / bytes_per_col) / kSubTileCols * kSubTileCols;
  static_assert(kXBudget / (kMaxM * 2) >= kSubTileCols, "a window must hold one sub-tile");
  p.window_cols = std::min<int>(max_cols, static_cast<int>(detail::round_up(p.Kp, kSubTileCols)));
  const int num_windows = static_cast<int>(detail::ceil_div(p.Kp, p.window_cols));
  p.num_windows = num_windows;
  p.num_subs = static_cast<int>(detail::ceil_div(p.Kp, kSubTileCols));
  const int64_t row_groups = detail::ceil_div(p.N, kRowsPerPass);
  p.passes = 1;
  if (num_windows == 1) {
    const int64_t target_blocks = static_cast<int64_t>(kBlocksPerSmTarget) * sms;
    p.passes = static_cast<int>(std::max<int64_t>(1, row_groups / target_blocks));
  }
  const int64_t blocks = detail::ceil_div(row_groups, p.passes);
  // x window (a multiple of 128 bytes, so the rings start 16-byte aligned), then the rings.
  // M > 1 lays x out in whole 1024-column sub-tiles (XLayout): a window of a short K
  // still spans one.
  const int staged_cols = std::min<int>(
      p.window_cols, static_cast<int>(detail::round_up(p.Kp, kMaxM == 1 ? 64 : kSubTileCols)));
  p.ring_offset = staged_cols * bytes_per_col;
  const int smem = p.ring_offset + ring_bytes<kW, kDepth>();
  if (smem > kSmemDefault) {
    // The opt-in (x windows of 32 KB: 16 tokens, or K > 14336 with fewer), once per device,
    // for the most this kernel can ask for.
    static signed char cache[detail::kMaxDevices] = {0};
    cudaError_t err = cudaSuccess;
    if (!detail::cached_device_flag(device, cache, [&err] {
          err = cudaFuncSetAttribute(bitmap_gemv_kernel<T, kMaxM, kW, kDepth>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     smem_max<kW, kDepth>());
          return err == cudaSuccess;
        })) {
      return err != cudaSuccess ? err : cudaErrorInvalidValue;
    }
  }
  bitmap_gemv_kernel<T, kMaxM, kW, kDepth>
      <<<static_cast<unsigned>(blocks), kW * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

// Warps per block. M > 1: always kWarps. M = 1: the size with the least work on the busiest
// SM (blocks dealt round-robin), counting what each block moves: its rows' values and masks
// (~1.1 Kp bytes a row at 50%) and the x row it stages (2 Kp bytes, read from L2: weighed at
// half). Smaller blocks cover the SMs when N is small (fewer than 16 rows per SM leave SMs
// idle with 8-warp blocks) but stage x more often: counting rows alone chose 2-warp blocks for
// 13824x5120 (108 rows on the busiest SM instead of 112, for 4x the x staging; 0.60x dense on
// the H200, the worst shape). Ties go to the larger block. Each row stays with one warp,
// walked in the same order, so outputs do not depend on the choice.
template <typename T, int kMaxM, int kDepth = 1>
cudaError_t launch_warps(const BitmapParams& p, int device, cudaStream_t stream) {
  int sms = 0;
  SLIMSTACK_CUDA_TRY(detail::sm_count(device, &sms));
  if constexpr (kMaxM == 1) {
    const int64_t row_bytes = p.Kp + p.Kp / 8;  // values (2 bytes, ~half kept) + mask bits
    const int64_t x_bytes = 2 * static_cast<int64_t>(p.Kp);
    auto busiest = [&](int warps) {  // bytes-equivalent of the busiest SM's blocks
      const int64_t rows = static_cast<int64_t>(warps) * kRowsPerWarp;
      const int64_t blocks = detail::ceil_div(detail::ceil_div(p.N, rows), sms);
      return blocks * (x_bytes / 2 + rows * row_bytes);
    };
    const int64_t b8 = busiest(kWarps), b4 = busiest(4), b2 = busiest(2);
    if (b2 < b4 && b2 < b8) return launch_typed<T, kMaxM, 2, kDepth>(p, sms, stream, device);
    if (b4 < b8) return launch_typed<T, kMaxM, 4, kDepth>(p, sms, stream, device);
  }
  return launch_typed<T, kMaxM, kWarps, kDepth>(p, sms, stream, device);
}

template <typename T>
cudaError_t launch_for_type(const BitmapParams& p, int ring_depth, int device,
                            cudaStream_t stream) {
  if (p.M <= 1) {
    return ring_depth == 1 ? launch_warps<T, 1, 1>(p, device, stream)
                           : launch_warps<T, 1, 2>(p, device, stream);
  }
  if (p.M <= 2) return launch_warps<T, 2>(p, device, stream);
  if (p.M <= 4) return launch_warps<T, 4>(p, device, stream);
  if (p.M <= 8) return launch_warps<T, 8>(p, device, stream);
  return launch_warps<T, 16>(p, device, stream);
}

}  // namespace

cudaError_t bitmap_gemv(const void* x, int64_t ldx, const void* values, const uint8_t* bitmask,
                        const int64_t* row_offsets, void* y, int64_t ldy, int64_t M, int64_t N,
                        int64_t K, int64_t Kp, DType dtype, int ring_depth,
                        cudaStream_t stream) {
  SLIMSTACK_REQUIRE(x != nullptr && values != nullptr && bitmask != nullptr &&
                    row_offsets != nullptr && y != nullptr);
  SLIMSTACK_REQUIRE(M >= 1 && M <= kBitmapGemvMaxM);
  SLIMSTACK_REQUIRE(ring_depth == 0 || ring_depth == 1 || (ring_depth == 2 && M == 1));
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
  p.num_windows = 1;
  p.num_subs = 1;
  p.passes = 1;
  p.ring_offset = 0;
  p.x_vec_ok = detail::is_aligned(x, 16) && ldx % 8 == 0 && K % 8 == 0;

  switch (dtype) {
    case DType::kFloat16:
      return launch_for_type<__half>(p, ring_depth, device, stream);
    case DType::kBFloat16:
      return launch_for_type<__nv_bfloat16>(p, ring_depth, device, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace slimstack
