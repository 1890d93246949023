// sparse24_gemm_sm80: prefill GEMM y[M, N] = x[M, K] @ W^T on Ampere sparse tensor cores
// (mma.sp m16n8k32), reading the sparse24 layout directly.
//
// Why no CUTLASS 2.x here: its SparseGemm wants the metadata in a reordered, interleaved
// layout, i.e. a second copy of every weight's metadata. Our layout already is what mma.sp
// wants per register: the 16-bit little-endian meta word w of row r holds the nibbles of groups
// 4w..4w+3 in order, which is exactly one half of a thread's metadata register. So the sparse
// A operand (W) is loaded with ldmatrix like a dense 16x16 tile and the metadata with two
// 16-bit shared loads per register. The kernel also runs on Hopper (mma.sp is valid on sm_90),
// where it is the fallback for shapes the CUTLASS sm90 kernel cannot take.
//
// Tiling: block = 128 weight rows x 128 tokens, 64 logical K per stage (32 stored values =
// 64 B per row, 8 B of meta per row, 128 B of x per token), 3-stage cp.async pipeline,
// 8 warps as 2 (rows) x 4 (tokens), warp tile 64 x 32 = 4 x 4 mma.sp per k32 step.
// Shared tiles are XOR-swizzled in 16-byte units so ldmatrix and cp.async are conflict free.
#include "cuda/common.cuh"

namespace slimstack {
namespace cuda {
namespace {

constexpr int kBM = 128;            // weight rows per block
constexpr int kBN = 128;            // tokens per block
static_assert(kSparse24GemmSm80MaxM == int64_t{65535} * kBN, "launchers.h: grid.y x kBN");
constexpr int kBK = 64;             // logical K per stage
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 4;
constexpr int kThreads = kWarpsM * kWarpsN * 32;
constexpr int kStages = 3;
constexpr int kWarpM = kBM / kWarpsM;  // 64 rows -> 4 m16 tiles
constexpr int kWarpN = kBN / kWarpsN;  // 32 tokens -> 4 n8 tiles
constexpr int kMTiles = kWarpM / 16;
constexpr int kNTiles = kWarpN / 8;

constexpr int kABytes = kBM * (kBK / 2) * 2;  // 128 rows x 64 B
constexpr int kBBytes = kBN * kBK * 2;        // 128 tokens x 128 B
constexpr int kEBytes = kBM * (kBK / 8);      // 128 rows x 8 B
constexpr int kStageBytes = kABytes + kBBytes + kEBytes;
constexpr int kSmemBytes = kStages * kStageBytes;

static_assert(kMTiles % 2 == 0, "metadata registers are shared by pairs of m16 tiles");

struct GemmParams {
  const void* x;
  int64_t ldx;
  const void* values;
  const uint8_t* meta;
  void* y;
  int64_t ldy;
  int M, N, K, Kp;
};

// Byte offset of 16-byte piece c of row r in the A tile (4 pieces per row).
__device__ __forceinline__ int a_offset(int r, int c) { return r * 64 + ((c ^ ((r >> 1) & 3)) << 4); }
// Byte offset of 16-byte piece c of token row r in the B tile (8 pieces per row).
__device__ __forceinline__ int b_offset(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

template <typename T>
__device__ __forceinline__ void load_stage(const GemmParams& p, unsigned char* stage, int kt,
                                           int n0, int m0) {
  const int tid = threadIdx.x;
  unsigned char* sA = stage;
  unsigned char* sB = stage + kABytes;
  unsigned char* sE = stage + kABytes + kBBytes;
  const T* values = static_cast<const T*>(p.values);
  const T* x = static_cast<const T*>(p.x);

  // A: 128 rows x 4 pieces; rows beyond N are zero-filled.
#pragma unroll
  for (int i = 0; i < (kBM * 4) / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int r = idx >> 2;
    const int c = idx & 3;
    const int row = n0 + r;
    const bool ok = row < p.N;
    const T* src = ok ? values + static_cast<int64_t>(row) * (p.Kp / 2) + kt * (kBK / 2) + c * 8
                      : values;
    detail::cp_async_16(detail::smem_addr(sA + a_offset(r, c)), src, ok ? 16 : 0);
  }
  // B: 128 tokens x 8 pieces; tokens beyond M and columns beyond K are zero-filled
  // (K % 8 == 0, so a piece is entirely inside or outside).
#pragma unroll
  for (int i = 0; i < (kBN * 8) / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int r = idx >> 3;
    const int c = idx & 7;
    const int token = m0 + r;
    const int col = kt * kBK + c * 8;
    const bool ok = token < p.M && col < p.K;
    const T* src = ok ? x + static_cast<int64_t>(token) * p.ldx + col : x;
    detail::cp_async_16(detail::smem_addr(sB + b_offset(r, c)), src, ok ? 16 : 0);
  }
  // E: 128 rows x 8 bytes. Rows beyond N get the valid pattern 0x4 per group, not zeros.
  if (tid < kBM) {
    const int row = n0 + tid;
    unsigned char* dst = sE + tid * 8;
    if (row < p.N) {
      detail::cp_async_8(detail::smem_addr(dst),
                         p.meta + static_cast<int64_t>(row) * (p.Kp / 8) + kt * (kBK / 8), 8);
    } else {
      *reinterpret_cast<uint2*>(dst) = make_uint2(detail::kPadMeta32, detail::kPadMeta32);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sparse24_gemm_sm80_kernel(const GemmParams p) {
#ifdef SLIMSTACK_NEEDS_SM80
  __trap();
#else
  extern __shared__ __align__(128) unsigned char smem[];
  const int n0 = blockIdx.x * kBM;
  const int m0 = blockIdx.y * kBN;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int wm0 = (warp % kWarpsM) * kWarpM;
  const int wn0 = (warp / kWarpsM) * kWarpN;
  const int k_tiles = p.Kp / kBK;

  float acc[kMTiles][kNTiles][4];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
    for (int ni = 0; ni < kNTiles; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;

  // Prologue: fill kStages - 1 stages (one commit group each, empty groups included, so that
  // wait_group<kStages - 2> always means "the oldest stage has landed").
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage<T>(p, smem + s * kStageBytes, s, n0, m0);
    detail::cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    detail::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt visible to all; stage kt - 1 fully consumed
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage<T>(p, smem + (next % kStages) * kStageBytes, next, n0, m0);
    detail::cp_async_commit();

    const unsigned char* stage = smem + (kt % kStages) * kStageBytes;
    const uint32_t sA = detail::smem_addr(stage);
    const uint32_t sB = detail::smem_addr(stage + kABytes);
    const unsigned char* sE = stage + kABytes + kBBytes;

#pragma unroll
    for (int s = 0; s < 2; ++s) {  // two k32 steps per stage
      uint32_t a[kMTiles][4];
      uint32_t b[kNTiles][4];
      uint32_t e[kMTiles / 2];
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
        // matrices: rows 0-7 / 8-15 of stored columns 16s..16s+7, then of 16s+8..16s+15
        const int r = wm0 + 16 * mi + (lane & 15);
        detail::ldmatrix_x4(a[mi], sA + a_offset(r, 2 * s + (lane >> 4)));
      }
#pragma unroll
      for (int ni = 0; ni < kNTiles; ++ni) {
        // matrices: k 32s + 8i .. 32s + 8i + 7 (i = 0..3) of 8 tokens
        const int r = wn0 + 8 * ni + (lane & 7);
        detail::ldmatrix_x4(b[ni], sB + b_offset(r, 4 * s + (lane >> 3)));
      }
#pragma unroll
      for (int mp = 0; mp < kMTiles / 2; ++mp) {
        // Lanes t = 0, 1 serve m-tile 2mp (selector 0), lanes t = 2, 3 m-tile 2mp + 1
        // (selector 1); lane parity picks groups 0-3 or 4-7 of the k32 step: meta word 2s + p.
        const int r = wm0 + 16 * (2 * mp + (t >> 1)) + g;
        const int word = 2 * s + (t & 1);
        const uint32_t lo = *reinterpret_cast<const uint16_t*>(sE + r * 8 + word * 2);
        const uint32_t hi = *reinterpret_cast<const uint16_t*>(sE + (r + 8) * 8 + word * 2);
        e[mp] = lo | (hi << 16);
      }
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kNTiles; ++ni) {
          if (mi % 2 == 0) {
            detail::mma_sp_16832<T, 0>(acc[mi][ni], a[mi], b[ni], e[mi / 2]);
          } else {
            detail::mma_sp_16832<T, 1>(acc[mi][ni], a[mi], b[ni], e[mi / 2]);
          }
        }
      }
    }
  }
  detail::cp_async_wait<0>();

  // Epilogue: acc[mi][ni] = D(rows g, g+8 of m-tile mi; tokens 2t, 2t+1 of n-tile ni).
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kNTiles; ++ni) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = n0 + wm0 + 16 * mi + g + 8 * (i >> 1);
        const int token = m0 + wn0 + 8 * ni + 2 * t + (i & 1);
        if (row < p.N && token < p.M) {
          y[static_cast<int64_t>(token) * p.ldy + row] =
              detail::ElemTraits<T>::from_float(acc[mi][ni][i]);
        }
      }
    }
  }
#endif
}

template <typename T>
cudaError_t launch_typed(const GemmParams& p, cudaStream_t stream) {
  // > 48 KB of dynamic shared memory needs the opt-in (per kernel; cheap next to a GEMM).
  SLIMSTACK_CUDA_TRY(cudaFuncSetAttribute(sparse24_gemm_sm80_kernel<T>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          kSmemBytes));
  const dim3 grid(static_cast<unsigned>(detail::ceil_div(p.N, kBM)),
                  static_cast<unsigned>(detail::ceil_div(p.M, kBN)));
  sparse24_gemm_sm80_kernel<T><<<grid, kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sparse24_gemm_sm80(const void* x, int64_t ldx, const void* values, const uint8_t* meta,
                               void* y, int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t Kp,
                               DType dtype, cudaStream_t stream) {
  SLIMSTACK_REQUIRE(x != nullptr && values != nullptr && meta != nullptr && y != nullptr);
  // Row indices are int in the kernel: the last block's rows (up to N - 1 + kBM) must fit.
  SLIMSTACK_REQUIRE(M >= 1 && M <= int64_t{65535} * kBN && N >= 1 && N <= INT32_MAX - kBM);
  SLIMSTACK_REQUIRE(Kp >= 64 && Kp % 64 == 0 && Kp <= INT32_MAX && K >= 1 && K <= Kp &&
                    K > Kp - 64);
  // 16-byte cp.async of x rows: every row start and every 8-column piece must be aligned.
  SLIMSTACK_REQUIRE(K % 8 == 0 && ldx % 8 == 0 && ldx >= K && detail::is_aligned(x, 16));
  SLIMSTACK_REQUIRE(ldy >= N && detail::is_aligned(y, 2));
  SLIMSTACK_REQUIRE(detail::is_aligned(values, 16) && detail::is_aligned(meta, 8));

  GemmParams p;
  p.x = x;
  p.ldx = ldx;
  p.values = values;
  p.meta = meta;
  p.y = y;
  p.ldy = ldy;
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.Kp = static_cast<int>(Kp);
  switch (dtype) {
    case DType::kFloat16:
      return launch_typed<__half>(p, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace slimstack
