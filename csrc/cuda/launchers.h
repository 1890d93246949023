// Host-side declarations of every CUDA launcher in csrc/cuda/*.cu.
//
// This header is included both by the .cu files (nvcc) and by the torch glue (glue.cpp,
// a plain C++ compiler), so it contains nothing but the CUDA runtime API types: raw pointers,
// sizes, a dtype tag and a cudaStream_t in; a cudaError_t out. No torch, no CUTLASS.
//
// Conventions shared by all launchers (packed layouts: python/slimstack/formats/):
//   * W is [N, K] (nn.Linear layout), y = x @ W^T, x is [M, K] with row stride ldx (elements),
//     y is [M, N] with row stride ldy. Kp = ceil(K / 64) * 64 is the packed (padded) K.
//   * Launchers never allocate; where scratch memory is needed a *_workspace_bytes() or plan
//     function says how much, and the caller passes it in.
//   * Errors: cudaErrorInvalidValue for bad sizes/pointers/alignment, cudaErrorNotSupported for
//     a device or problem the kernel cannot run, otherwise the launch error (cudaGetLastError()).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace slimstack {
namespace cuda {

// Element type of x, the packed values and y. Accumulation is always fp32.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Sizes every launcher takes: rows and (padded) columns are indexed with int in the kernels.
constexpr int64_t kMaxRowsN = int64_t{INT32_MAX} - 256;    // N, with the last block's padding
constexpr int64_t kMaxColsK = int64_t{INT32_MAX} - 63;     // K, so that Kp fits an int

// ---------------------------------------------------------------------------------------------
// sparse24_gemv: decode GEMV for M = 1..16 on the sparse24 layout
// (values [N, Kp/2], meta uint8 [N, Kp/8]), through mma.sp (sm_80+).
// ---------------------------------------------------------------------------------------------
constexpr int kSparse24GemvMaxM = 16;

// How the fp32 partials of a K split are added up (always in slice order, so both give the
// same bits):
//   kKernel:  written to a workspace and summed by a second kernel (any GPU, any split);
//   kCluster: the slices of a row block form a thread-block cluster and sum through
//             distributed shared memory in the GEMV kernel itself: no workspace, no second
//             launch (sm_90 with this file's sm_90 image, split <= kMaxClusterSplit).
// A plan request may say kAuto (kCluster where it can run, else kKernel); a plan holds kNone
// when K is not split.
enum class SplitKReduce : int { kAuto = 0, kNone = 1, kKernel = 2, kCluster = 3 };
constexpr int kMaxClusterSplit = 8;  // the portable cluster size
constexpr int kSparse24GemvMaxSplit = 65535;  // K slices are grid.y

// A feature the plan may use: kAuto lets it decide, kOn forces it (cudaErrorNotSupported where
// it cannot run), kOff keeps it out.
enum class Choice : int { kAuto = 0, kOff = 1, kOn = 2 };

// What a caller asks of the plan (the defaults: everything automatic).
//   split_k:  > 0 forces that many K slices (clamped to what the problem allows); 0 picks one
//             from the SM count.
//   reduce:   kKernel or kCluster forces that reduction of a split K; kCluster where it cannot
//             run (not sm_90, no sm_90 image, split > kMaxClusterSplit) is cudaErrorNotSupported.
//   prefetch: each warp keeps the weights of two quad iterations (256 columns of its 16 rows)
//             in flight instead of one: twice the bytes in flight per warp for ~36 more
//             registers, so one 16-row tile per warp (and 8 warps per block at M > 8). Auto: on.
//   pdl:      programmatic dependent launch (sm_90): the GEMV may start while the kernel before
//             it in the stream finishes, issuing its first weight loads (they depend on nothing)
//             and waiting (griddepcontrol.wait) only before it reads x. Auto: on where the
//             kernel's sm_90 image runs; on elsewhere is cudaErrorNotSupported.
struct Sparse24GemvRequest {
  int split_k = 0;
  SplitKReduce reduce = SplitKReduce::kAuto;
  Choice prefetch = Choice::kAuto;
  Choice pdl = Choice::kAuto;
};

struct Sparse24GemvPlan {
  int split_k = 1;             // number of K slices (grid.y)
  int slice_chunks = 0;        // 16-column chunks per K slice (a multiple of 16)
  int row_tiles_per_warp = 1;  // 16-row tiles per warp (1 or 2)
  bool prefetch = false;       // two quad iterations in flight (row_tiles_per_warp == 1 only)
  int warps_per_block = 4;     // 8 for the prefetch kernel at M > 8, else 4
  bool pdl = false;            // launched as a programmatic dependent of the previous kernel
  SplitKReduce reduce = SplitKReduce::kNone;  // kNone iff split_k == 1
  size_t workspace_bytes = 0;  // split_k * M * N * sizeof(float) for kKernel, else 0
};

// Whether the GEMV can be launched as a programmatic dependent on the current device (compute
// capability 9.x running this extension's sm_90 image, which holds griddepcontrol.wait).
bool sparse24_gemv_pdl_available();

// Chooses the split-K factor and tile config for `request` on `device`.
cudaError_t sparse24_gemv_plan(int64_t M, int64_t N, int64_t Kp, int device,
                               const Sparse24GemvRequest& request, Sparse24GemvPlan* plan);

// x: [M, K] (ldx >= K), values/meta: packed, y: [M, N] (ldy >= N), workspace: plan.workspace_bytes
// of device memory (may be null when the plan needs none).
cudaError_t sparse24_gemv(const void* x, int64_t ldx, const void* values, const uint8_t* meta,
                          void* y, int64_t ldy, float* workspace, int64_t M, int64_t N, int64_t K,
                          int64_t Kp, const Sparse24GemvPlan& plan, DType dtype,
                          cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// bitmap_gemv: unstructured GEMV for M = 1..16 on the bitmap layout
// (bitmask uint8 [N, Kp/8], values 1-D with int64 row_offsets [N+1], rows 8-element aligned).
// ---------------------------------------------------------------------------------------------
constexpr int kBitmapGemvMaxM = 16;

// ring_depth: sub-tiles of each row's values in flight, 0 = automatic (2 at M = 1, else 1);
// 1 forces one, 2 (M = 1 only) two.
cudaError_t bitmap_gemv(const void* x, int64_t ldx, const void* values, const uint8_t* bitmask,
                        const int64_t* row_offsets, void* y, int64_t ldy, int64_t M, int64_t N,
                        int64_t K, int64_t Kp, DType dtype, int ring_depth,
                        cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// sparse24_gemm_sm80: prefill GEMM (any M) with hand-written mma.sp on the sparse24
// layout (no second copy of the weight). Runs on sm_80 and later (also on Hopper).
// Requires x rows 16-byte aligned: ldx % 8 == 0, K % 8 == 0, x 16-byte aligned.
// One launch takes at most kSparse24GemmSm80MaxM rows of x (grid.y of 128-row tiles).
// ---------------------------------------------------------------------------------------------
constexpr int64_t kSparse24GemmSm80MaxM = int64_t{65535} * 128;
cudaError_t sparse24_gemm_sm80(const void* x, int64_t ldx, const void* values, const uint8_t* meta,
                               void* y, int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t Kp,
                               DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// sparse24_gemm_sm90: prefill GEMM on Hopper sparse tensor cores via CUTLASS 3.x.
// CUTLASS reads our `values` as its compressed A unchanged (row-major [N, Kp/2]), but needs the
// metadata in its own reordered layout ("E"): build it once at pack time with
// sparse24_sm90_reorder_meta (sparse24_sm90_meta_bytes() bytes).
// The GEMM computes D^T = W x^T with W as the sparse A operand; it requires
//   N % 8 == 0 (TMA store of y), x with exactly Kp columns (pad x when K != Kp),
//   ldx % 8 == 0, ldy % 8 == 0, all pointers 16-byte aligned.
// ---------------------------------------------------------------------------------------------
// Bytes of the CUTLASS-layout metadata for an [N, Kp] weight (rows padded to 64, K to 128).
size_t sparse24_sm90_meta_bytes(int64_t N, int64_t Kp);

// meta: sparse24 uint8 [N, Kp/8]; meta_sm90: sparse24_sm90_meta_bytes(N, Kp) bytes. Padding
// rows/columns get the valid "indices 0,1" nibble 0x4 (their values are zero).
cudaError_t sparse24_sm90_reorder_meta(const uint8_t* meta, uint8_t* meta_sm90, int64_t N,
                                       int64_t Kp, cudaStream_t stream);

// The output tiles are visited in swizzled groups of `swizzle` tiles (CUTLASS's
// max_swizzle_size: 1, 2, 4 or 8; 0 = kSparse24GemmSm90DefaultSwizzle), so that a wave of CTAs
// shares tile rows and columns of both operands in L2. 1 is CUTLASS's default order.
constexpr int kSparse24GemmSm90DefaultSwizzle = 8;

// Output tile (weight rows x tokens) of the sm90 GEMM. kAuto: 128 x 128, stream-K where the
// tiles are fewer than two per SM. A named tile runs data-parallel at any M (bench variants).
enum class Sparse24Sm90Tile : int { kAuto = 0, k128x128 = 1, k256x128 = 2, k128x256 = 3 };

// Workspace CUTLASS asks for (tile scheduler); usually 0. tile: a Sparse24Sm90Tile value.
size_t sparse24_gemm_sm90_workspace_bytes(int64_t M, int64_t N, int64_t Kp, DType dtype,
                                          int swizzle, int tile);

// True when this build contains the sm_90a kernel and `device` is compute capability 9.0.
bool sparse24_gemm_sm90_available(int device);

cudaError_t sparse24_gemm_sm90(const void* x, int64_t ldx, const void* values,
                               const uint8_t* meta_sm90, void* y, int64_t ldy, void* workspace,
                               int64_t M, int64_t N, int64_t Kp, DType dtype, int swizzle,
                               int tile, cudaStream_t stream);

// Why the last sparse24_gemm_sm90 / sparse24_sm90_compress_dense call of this host thread
// failed inside CUTLASS: the step (can_implement, initialize, run), CUTLASS's status string and
// the problem. Empty when that call succeeded or failed before reaching CUTLASS.
const char* sparse24_sm90_last_error();

// Test hook: CUTLASS's own compressor applied to a dense 2:4 weight W [N, Kp] (row-major).
// Writes values_out [N, Kp/2] and meta_sm90_out (sparse24_sm90_meta_bytes bytes). Lets the GPU
// tests prove that our values are CUTLASS's compressed A and that the reordered meta matches.
cudaError_t sparse24_sm90_compress_dense(const void* W, void* values_out, uint8_t* meta_sm90_out,
                                         int64_t N, int64_t Kp, DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// mma_sp_probe: test hook. One warp runs one mma.sp m16n8k32 (fp32 accumulate from zero) with
// sparsity selector 0 or 1 on per-lane registers: a, b [32 lanes][4] uint32, e [32] uint32 in,
// c [32][4] float out, all device memory. Checks common.cuh's fragment / metadata layout apart
// from any kernel (the sm80 GEMM uses both selectors, the GEMV selector 0).
// ---------------------------------------------------------------------------------------------
cudaError_t mma_sp_probe(const uint32_t* a, const uint32_t* b, const uint32_t* e, float* c,
                         int selector, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace slimstack
