// sparse24_gemm_sm90: prefill GEMM y[M, N] = x[M, K] @ W^T on Hopper sparse tensor cores
// (sparse WGMMA) through CUTLASS 3.x's sm90 sparse GEMM collective.
//
// Operand mapping. y = x W^T, i.e. D = y^T = W x^T with W [N, Kp] as the sparse A operand:
//   GEMM (M', N', K') = (N, M, Kp); A = W (row-major, K-major), B = x read as a K x M
//   column-major matrix (x row-major [M, Kp], K-major), D = y^T column-major (= y row-major).
//
// One copy of the values. CUTLASS's compressed A for a K-major 16-bit A is row-major
// [M', K'/2] with the two kept values of each group of 4 in column order, which is byte for
// byte our sparse24 `values` (Kp is a multiple of 64, so no extra K alignment). Only the
// metadata differs: CUTLASS wants the same nibbles permuted into its "E" layout (64-row x
// 128-column atoms, interleaved for vectorised shared-memory loads). sparse24_sm90_reorder_meta
// builds that once at pack time from our meta, using CUTLASS's own layout function, so the
// permutation cannot drift from the kernel that reads it. Cost: a second metadata copy
// (1/16 of the dense bytes: 0.5 + 0.0625 + 0.0625 = 0.625x dense in all), held only by layers
// that run prefill on Hopper; the decode GEMV keeps reading the sparse24 meta.
//
// Everything CUTLASS-sm90 is compiled only where CUTLASS says the sparse sm90 MMA is available
// (CUDA >= 12.2); the device code itself is only real in the sm_90a cubin (CUTLASS guards it),
// so this file also compiles for sm_80, where the launchers answer cudaErrorNotSupported.
//
// No device asserts: one `assert` CUTLASS's stream-K path reaches (named-barrier index,
// cutlass/barrier.h) is a call to __assertfail, and ptxas serialises every wgmma of a kernel
// that contains a call (warning C7510: each HGMMA waited on before the next is issued).
// tools/compile_cuda.sh fails on that warning. The host pass keeps its asserts (a failed TMA
// descriptor encode aborts instead of launching with a zeroed one); no CUTLASS type's layout
// depends on NDEBUG, so the two passes still agree on every struct.
#if defined(__CUDA_ARCH__) && !defined(NDEBUG)
#define NDEBUG
#endif
#include "cuda/common.cuh"

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"

#include <string>
#include <type_traits>

namespace slimstack {
namespace cuda {

#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)

namespace {

using namespace cute;

using ProblemShape = Shape<int, int, int, int>;  // (M', N', K', L) = (N, M, Kp, 1)

// Kernel configurations per element type. The tile K (128) fixes the metadata layout: every
// configuration that reads a reordered meta buffer must use the same min(tile K, 128); the
// tile's M' (weight rows) and N' (tokens) do not enter it.
// - data-parallel (the default scheduler): one output tile per CTA, clusters of 2 along the
//   tokens sharing the weight tile by multicast; for prefill with many tiles.
// - stream-K (StreamKScheduler, no cluster): where the output tiles cannot fill the SMs (small
//   M: M = 64 on N = 4096 is 32 tiles of 128 x 128 for 132 SMs, 0.45x dense on the H200 with
//   the data-parallel kernel), the tiles' K loops are split across the SMs and the partial
//   sums reduced in a workspace, in a fixed order (deterministic).
// - larger data-parallel tiles (Sparse24Sm90Tile in launchers.h), for the bench to weigh
//   against 128 x 128. A sparse wgmma m64nNk32 reads 64 B of x from shared memory per
//   1024 dense-equivalent FLOPs whatever N is, twice the dense instruction's rate, so at the
//   sparse peak x alone wants the SM's 128 B/clk: shared-memory bandwidth, not the tensor
//   cores, bounds the kernel. Per FLOP at 128 x 128 the two consumer warpgroups read
//   x + W + E ~160 B/clk and TMA writes ~98 B/clk into the stages; 256 x 128 (W tile shared by
//   more tokens' work per stage) writes ~66, 128 x 256 reads ~144 and writes ~80: both ~13%
//   less traffic. Their stages are 68 KB and 82 KB (3 and 2 in 227 KB) against 50 KB (4).
template <typename Element, class TileShape_ = Shape<_128, _128, _128>,
          class ClusterShape_ = Shape<_1, _2, _1>, class TileScheduler = void>
struct Sm90Sparse24 {
  using LayoutTagA = cutlass::layout::RowMajor;     // W [N, Kp]
  using LayoutTagB = cutlass::layout::ColumnMajor;  // x as K x M, K contiguous
  using LayoutTagD = cutlass::layout::ColumnMajor;  // y^T as N x M, N contiguous
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16 bytes
  using Accumulator = float;
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator,
      void, LayoutTagD, kAlignment,  // no C operand: D = acc
      Element, LayoutTagD, kAlignment,
      cutlass::epilogue::collective::EpilogueScheduleAuto>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, Element, LayoutTagA, kAlignment,
      Element, LayoutTagB, kAlignment, Accumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::collective::KernelScheduleAuto>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop,
                                                      CollectiveEpilogue, TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using LayoutA = typename CollectiveMainloop::LayoutA;
  using LayoutE = typename CollectiveMainloop::LayoutE;
  using ElementE = typename CollectiveMainloop::ElementE;
  using ElementEMma = typename CollectiveMainloop::ElementEMma;
  using SparseConfig = typename CollectiveMainloop::SparseConfig;
  using StrideB = typename Kernel::StrideB;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;
};

using HalfCfg = Sm90Sparse24<cutlass::half_t>;
static_assert(std::is_same_v<decltype(get<1>(HalfCfg::StrideB{})), cute::_1>,
              "B (x) must be K-major");
static_assert(std::is_same_v<decltype(get<0>(HalfCfg::StrideD{})), cute::_1>,
              "D (y^T) must be column-major");
using Bf16Cfg = Sm90Sparse24<cutlass::bfloat16_t>;
using StreamKTile = Shape<_128, _128, _128>;
using NoCluster = Shape<_1, _1, _1>;
template <typename Element>
using StreamK = Sm90Sparse24<Element, StreamKTile, NoCluster, cutlass::gemm::StreamKScheduler>;
template <typename Element>
using Rows256 = Sm90Sparse24<Element, Shape<_256, _128, _128>>;  // 256 weight rows x 128 tokens
template <typename Element>
using Tokens256 = Sm90Sparse24<Element, Shape<_128, _256, _128>>;  // 128 weight rows x 256 tokens

template <class... Cfgs>
constexpr bool same_metadata_layout() {
  return (std::is_same_v<typename Cfgs::LayoutE, HalfCfg::LayoutE> && ...);
}
static_assert(same_metadata_layout<Bf16Cfg, StreamK<cutlass::half_t>, StreamK<cutlass::bfloat16_t>,
                                   Rows256<cutlass::half_t>, Rows256<cutlass::bfloat16_t>,
                                   Tokens256<cutlass::half_t>, Tokens256<cutlass::bfloat16_t>>(),
              "every configuration must read the same reordered metadata");

// Stream-K where the data-parallel grid would leave SMs idle: fewer output tiles than two per
// SM (M <= 512 on N = 4096 at 132 SMs). The same tile shape either way.
bool use_stream_k(int64_t M, int64_t N, int sms) {
  const int64_t tiles = detail::ceil_div(N, 128) * detail::ceil_div(M, 128);
  return tiles < 2 * static_cast<int64_t>(sms);
}

bool valid_tile(int tile) {
  return tile >= static_cast<int>(Sparse24Sm90Tile::kAuto) &&
         tile <= static_cast<int>(Sparse24Sm90Tile::k128x256);
}

// Calls fn with a value of the configuration that runs (dtype, tile) at this M: `auto` is
// stream-K below two tiles per SM and 128 x 128 data-parallel above; a named tile is that
// tile, data-parallel, at any M. Returns fn's result.
template <class Fn>
auto with_config(DType dtype, int tile, int64_t M, int64_t N, int sms, Fn&& fn) {
  const auto pick = [&](auto element) {
    using Element = decltype(element);
    switch (static_cast<Sparse24Sm90Tile>(tile)) {
      case Sparse24Sm90Tile::k256x128:
        return fn(Rows256<Element>{});
      case Sparse24Sm90Tile::k128x256:
        return fn(Tokens256<Element>{});
      case Sparse24Sm90Tile::k128x128:
        return fn(Sm90Sparse24<Element>{});
      case Sparse24Sm90Tile::kAuto:
        break;
    }
    return use_stream_k(M, N, sms) ? fn(StreamK<Element>{}) : fn(Sm90Sparse24<Element>{});
  };
  return dtype == DType::kBFloat16 ? pick(cutlass::bfloat16_t{}) : pick(cutlass::half_t{});
}

// The reordered metadata is shared by both element types.
static_assert(std::is_same_v<HalfCfg::SparseConfig::TensorEAtom,
                             Bf16Cfg::SparseConfig::TensorEAtom>,
              "fp16 and bf16 must share the sm90 metadata atom");
static_assert(HalfCfg::SparseConfig::TensorEAtomK::value == 128 &&
                  HalfCfg::SparseConfig::TensorEAtomM::value == 64,
              "metadata atom is 64 rows x 128 columns (python/slimstack/formats/cutlass_sm90.py)");
static_assert(HalfCfg::ElementEMma::sparsity == 8, "one metadata byte covers 8 logical columns");
// tools/cutlass_sm90_meta_probe.cu (and the python reference it checks) use exactly this type.
static_assert(std::is_same_v<HalfCfg::SparseConfig,
                             cutlass::Sm90GemmSparseConfig<cute::sparse_elem<2, cutlass::half_t>,
                                                           cute::GMMA::Major::K,
                                                           cute::sparse_elem<8, uint8_t>, _128>>,
              "metadata config differs from the one the layout probe documents");

ProblemShape problem_of(int64_t M, int64_t N, int64_t Kp) {
  return ProblemShape{static_cast<int>(N), static_cast<int>(M), static_cast<int>(Kp), 1};
}

// The metadata tensor in bytes: logical (row, byte column) -> physical byte, as CUTLASS's
// compressor builds it (fill_layoutE in logical elements, recast to the raw uint8 storage).
template <class Ptr>
CUTE_HOST_DEVICE auto meta_byte_tensor(Ptr ptr, int N, int Kp) {
  using Cfg = HalfCfg;
  auto layout_e = Cfg::SparseConfig::fill_layoutE(ProblemShape{N, 1, Kp, 1});
  auto logical = make_tensor(make_gmem_ptr(recast_ptr<Cfg::ElementEMma>(ptr)), layout_e);
  return recast<Cfg::ElementE>(logical);
}

__global__ void reorder_meta_kernel(const uint8_t* __restrict__ meta, uint8_t* __restrict__ out,
                                    int N, int Kp, int rows_aligned, int byte_cols_aligned) {
  auto gE = meta_byte_tensor(out, N, Kp);
  const int meta_cols = Kp / 8;
  const int64_t total = static_cast<int64_t>(rows_aligned) * byte_cols_aligned;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int row = static_cast<int>(i / byte_cols_aligned);
    const int col = static_cast<int>(i - static_cast<int64_t>(row) * byte_cols_aligned);
    // Padding rows/columns: 0x44 = indices {0, 1} for both groups (valid; values are zero).
    const uint8_t v = (row < N && col < meta_cols)
                          ? meta[static_cast<int64_t>(row) * meta_cols + col]
                          : static_cast<uint8_t>(0x44);
    gE(row, col, 0) = v;
  }
}

// Why the last CUTLASS call of this host thread failed (sparse24_sm90_last_error()).
std::string& last_error() {
  thread_local std::string message;
  return message;
}

cudaError_t status_to_error(cutlass::Status s) {
  switch (s) {
    case cutlass::Status::kSuccess:
      return cudaSuccess;
    case cutlass::Status::kErrorMisalignedOperand:
    case cutlass::Status::kErrorInvalidProblem:
    case cutlass::Status::kErrorNotSupported:
    case cutlass::Status::kErrorInvalidLayout:
      return cudaErrorNotSupported;
    case cutlass::Status::kErrorWorkspaceNull:
      return cudaErrorInvalidValue;
    default: {
      // CUTLASS clears the CUDA error it met (e.g. a failed cudaFuncSetAttribute) before
      // returning kErrorInternal: not a launch failure, and the context is fine.
      const cudaError_t e = cudaGetLastError();
      return e != cudaSuccess ? e : cudaErrorUnknown;
    }
  }
}

// Records which CUTLASS step refused and why, for the glue's error message.
cudaError_t cutlass_failure(const char* what, const char* step, cutlass::Status s, int64_t M,
                            int64_t N, int64_t Kp) {
  last_error() = std::string("CUTLASS ") + what + " " + step + " returned '" +
                 cutlass::cutlassGetStatusString(s) + "' for GEMM (M', N', K') = (" +
                 std::to_string(N) + ", " + std::to_string(M) + ", " + std::to_string(Kp) + ")";
  return status_to_error(s);
}

template <class Cfg>
typename Cfg::Gemm::Arguments make_arguments(const void* x, int64_t ldx, const void* values,
                                             const uint8_t* meta_sm90, void* y, int64_t ldy,
                                             int64_t M, int64_t N, int64_t Kp, int device,
                                             int sms, int swizzle) {
  using Element = typename Cfg::Gemm::ElementA;
  const ProblemShape problem = problem_of(M, N, Kp);
  auto layout_a = Cfg::SparseConfig::fill_layoutA(problem);
  auto layout_e = Cfg::SparseConfig::fill_layoutE(problem);
  // Strides are (N', K', L) for B and (M', N', L) for D; the unit strides are static.
  // (cutlass/util/packed_stride.hpp lives outside the wheel's include/, so set them here.)
  typename Cfg::StrideB stride_b{};
  get<0>(stride_b) = ldx;  // distance between tokens in x
  get<2>(stride_b) = M * ldx;
  typename Cfg::StrideD stride_d{};
  get<1>(stride_d) = ldy;  // distance between tokens in y
  get<2>(stride_d) = M * ldy;
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sms;
  typename Cfg::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      problem,
      {static_cast<const Element*>(values), layout_a, static_cast<const Element*>(x), stride_b,
       reinterpret_cast<const typename Cfg::ElementE*>(meta_sm90), layout_e},
      {{1.0f, 0.0f}, nullptr, typename Cfg::StrideC{}, static_cast<Element*>(y), stride_d},
      hw};
  // Tile order: CUTLASS's default (swizzle 1) walks whole rows of output tiles, so on
  // 14336x4096 at M = 8192 (112 x 64 tiles, rastered along the tokens) every wave of 132 CTAs
  // re-reads all of x (67 MB, more than L2) for two weight tile rows: 744 TFLOP/s on the H200
  // where 4096x4096 (rastered along the weight rows, W in L2) ran 892. Swizzled groups of
  // `swizzle` tiles keep a wave on a few tile rows and columns of both operands.
  args.scheduler.max_swizzle_size = swizzle;
  return args;
}

template <class Cfg>
cudaError_t run_gemm(const void* x, int64_t ldx, const void* values, const uint8_t* meta_sm90,
                     void* y, int64_t ldy, void* workspace, int64_t M, int64_t N, int64_t Kp,
                     int swizzle, cudaStream_t stream) {
  int device = 0;
  SLIMSTACK_CUDA_TRY(cudaGetDevice(&device));
  int sms = 0;
  SLIMSTACK_CUDA_TRY(detail::sm_count(device, &sms));
  auto args =
      make_arguments<Cfg>(x, ldx, values, meta_sm90, y, ldy, M, N, Kp, device, sms, swizzle);
  typename Cfg::Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) {
    return cutlass_failure("sparse GEMM", "can_implement", status, M, N, Kp);
  }
  if (Cfg::Gemm::get_workspace_size(args) > 0 && workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  status = gemm.initialize(args, workspace, stream);
  if (status != cutlass::Status::kSuccess) {
    return cutlass_failure("sparse GEMM", "initialize", status, M, N, Kp);
  }
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) {
    return cutlass_failure("sparse GEMM", "run", status, M, N, Kp);
  }
  return cudaGetLastError();
}

template <class Cfg>
cudaError_t run_compressor(const void* W, void* values_out, uint8_t* meta_out, int64_t N,
                           int64_t Kp, cudaStream_t stream) {
  using Element = typename Cfg::Gemm::ElementA;
  using StrideA = cutlass::gemm::TagToStrideA_t<typename Cfg::LayoutTagA>;
  using CompressorKernel = cutlass::transform::kernel::StructuredSparseCompressor<
      ProblemShape, Element, typename Cfg::LayoutTagA, typename Cfg::SparseConfig,
      cutlass::arch::Sm90>;
  using Compressor = cutlass::transform::device::TransformUniversalAdapter<CompressorKernel>;
  int device = 0;
  SLIMSTACK_CUDA_TRY(cudaGetDevice(&device));
  int sms = 0;
  SLIMSTACK_CUDA_TRY(detail::sm_count(device, &sms));
  const ProblemShape problem = problem_of(1, N, Kp);
  StrideA stride_a{};  // (M', K', L) = (Kp, 1, N * Kp): row-major W
  get<0>(stride_a) = Kp;
  get<2>(stride_a) = N * Kp;
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sms;
  typename Compressor::Arguments args{problem, {W, stride_a, values_out, meta_out}, {hw}};
  Compressor op;
  cutlass::Status status = op.can_implement(args);
  if (status != cutlass::Status::kSuccess) {
    return cutlass_failure("compressor", "can_implement", status, 1, N, Kp);
  }
  // The compressor's "workspace" is unused (it exists for host-compressor compatibility).
  status = op.initialize(args, nullptr, stream);
  if (status != cutlass::Status::kSuccess) {
    return cutlass_failure("compressor", "initialize", status, 1, N, Kp);
  }
  status = op.run(stream);
  if (status != cutlass::Status::kSuccess) {
    return cutlass_failure("compressor", "run", status, 1, N, Kp);
  }
  return cudaGetLastError();
}

bool device_is_sm90(int device) {
  int major = 0;
  int minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();  // do not leave an error behind for the next launch check
    return false;
  }
  return major == 9 && minor == 0;
}

// 1 in the sm_90a image of this file, 0 in any other (sm_80 cubin, JIT from PTX, plain sm_90).
// A build without sm_90a (e.g. TORCH_CUDA_ARCH_LIST=8.0 or 9.0) would run CUTLASS's guarded stub,
// which prints an error and computes nothing; reading this flag from the image the runtime
// actually picked for the device tells the two apart.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SLIMSTACK_SM90A_IMAGE 1
#else
#define SLIMSTACK_SM90A_IMAGE 0
#endif
__device__ int g_sm90a_image = SLIMSTACK_SM90A_IMAGE;

// Cached per device: the first call does a small synchronous copy (keep it out of graph
// capture; the glue's first availability check does it).
bool loaded_image_is_sm90a(int device) {
  static signed char cache[detail::kMaxDevices] = {0};
  return detail::cached_device_flag(device, cache, [] {
    int flag = 0;
    const bool ok = cudaMemcpyFromSymbol(&flag, g_sm90a_image, sizeof(int)) == cudaSuccess;
    if (!ok) cudaGetLastError();
    return ok && flag == 1;
  });
}

cudaError_t require_sm90a() {
  int device = 0;
  SLIMSTACK_CUDA_TRY(cudaGetDevice(&device));
  return device_is_sm90(device) && loaded_image_is_sm90a(device) ? cudaSuccess
                                                                  : cudaErrorNotSupported;
}

// Logical size of the reordered metadata: rows padded to the atom's 64, bytes per row to the
// atom's 128 columns / 8. int64: sparse24_sm90_meta_bytes takes any size the glue passes.
void meta_dims(int64_t N, int64_t Kp, int64_t* rows, int64_t* byte_cols) {
  *rows = detail::round_up(N, HalfCfg::SparseConfig::TensorEAtomM::value);
  *byte_cols = detail::round_up(Kp, HalfCfg::SparseConfig::TensorEAtomK::value) /
               HalfCfg::ElementEMma::sparsity;
}

}  // namespace

const char* sparse24_sm90_last_error() { return last_error().c_str(); }

size_t sparse24_sm90_meta_bytes(int64_t N, int64_t Kp) {
  if (N < 1 || Kp < 64 || Kp % 64 != 0 || N > INT32_MAX || Kp > INT32_MAX) return 0;
  int64_t rows = 0;
  int64_t byte_cols = 0;
  meta_dims(N, Kp, &rows, &byte_cols);
  return static_cast<size_t>(rows) * static_cast<size_t>(byte_cols);
}

cudaError_t sparse24_sm90_reorder_meta(const uint8_t* meta, uint8_t* meta_sm90, int64_t N,
                                       int64_t Kp, cudaStream_t stream) {
  SLIMSTACK_REQUIRE(meta != nullptr && meta_sm90 != nullptr);
  SLIMSTACK_REQUIRE(N >= 1 && N <= INT32_MAX / 2 && Kp >= 64 && Kp % 64 == 0 &&
                    Kp <= INT32_MAX / 2);
  int64_t rows = 0;
  int64_t byte_cols = 0;
  meta_dims(N, Kp, &rows, &byte_cols);  // both fit an int under the limits above
  const int64_t total = rows * byte_cols;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>(detail::ceil_div(total, threads), 65535));
  reorder_meta_kernel<<<blocks, threads, 0, stream>>>(meta, meta_sm90, static_cast<int>(N),
                                                      static_cast<int>(Kp), static_cast<int>(rows),
                                                      static_cast<int>(byte_cols));
  return cudaGetLastError();
}

size_t sparse24_gemm_sm90_workspace_bytes(int64_t M, int64_t N, int64_t Kp, DType dtype,
                                          int swizzle, int tile) {
  if (M < 1 || N < 1 || Kp < 64 || !valid_tile(tile)) return 0;
  if (swizzle != 0 && swizzle != 1 && swizzle != 2 && swizzle != 4 && swizzle != 8) return 0;
  swizzle = swizzle == 0 ? kSparse24GemmSm90DefaultSwizzle : swizzle;
  int device = 0;
  int sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess || detail::sm_count(device, &sms) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return with_config(dtype, tile, M, N, sms, [&](auto cfg) -> size_t {
    using Cfg = decltype(cfg);
    return Cfg::Gemm::get_workspace_size(
        make_arguments<Cfg>(nullptr, Kp, nullptr, nullptr, nullptr, N, M, N, Kp, device, sms,
                            swizzle));
  });
}

bool sparse24_gemm_sm90_available(int device) {
  int current = 0;
  if (cudaGetDevice(&current) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  // The image flag is read from the current device's module.
  if (current != device && cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const bool ok = require_sm90a() == cudaSuccess;
  if (current != device) cudaSetDevice(current);
  return ok;
}

cudaError_t sparse24_gemm_sm90(const void* x, int64_t ldx, const void* values,
                               const uint8_t* meta_sm90, void* y, int64_t ldy, void* workspace,
                               int64_t M, int64_t N, int64_t Kp, DType dtype, int swizzle,
                               int tile, cudaStream_t stream) {
  last_error().clear();  // a refusal below must not show an earlier call's CUTLASS message
  SLIMSTACK_REQUIRE(x != nullptr && values != nullptr && meta_sm90 != nullptr && y != nullptr);
  SLIMSTACK_REQUIRE(swizzle == 0 || swizzle == 1 || swizzle == 2 || swizzle == 4 || swizzle == 8);
  SLIMSTACK_REQUIRE(valid_tile(tile));
  SLIMSTACK_REQUIRE(dtype == DType::kFloat16 || dtype == DType::kBFloat16);
  swizzle = swizzle == 0 ? kSparse24GemmSm90DefaultSwizzle : swizzle;
  SLIMSTACK_REQUIRE(M >= 1 && M <= INT32_MAX && N >= 1 && N <= INT32_MAX);
  SLIMSTACK_REQUIRE(Kp >= 64 && Kp % 64 == 0 && Kp <= INT32_MAX);
  // TMA: 16-byte aligned base addresses and strides.
  SLIMSTACK_REQUIRE(N % 8 == 0 && ldx % 8 == 0 && ldx >= Kp && ldy % 8 == 0 && ldy >= N);
  SLIMSTACK_REQUIRE(detail::is_aligned(x, 16) && detail::is_aligned(values, 16) &&
                    detail::is_aligned(meta_sm90, 16) && detail::is_aligned(y, 16));
  SLIMSTACK_CUDA_TRY(require_sm90a());
  int device = 0;
  SLIMSTACK_CUDA_TRY(cudaGetDevice(&device));
  int sms = 0;
  SLIMSTACK_CUDA_TRY(detail::sm_count(device, &sms));
  // The same configuration as sparse24_gemm_sm90_workspace_bytes picks.
  return with_config(dtype, tile, M, N, sms, [&](auto cfg) {
    return run_gemm<decltype(cfg)>(x, ldx, values, meta_sm90, y, ldy, workspace, M, N, Kp,
                                   swizzle, stream);
  });
}

cudaError_t sparse24_sm90_compress_dense(const void* W, void* values_out, uint8_t* meta_sm90_out,
                                         int64_t N, int64_t Kp, DType dtype,
                                         cudaStream_t stream) {
  last_error().clear();
  SLIMSTACK_REQUIRE(W != nullptr && values_out != nullptr && meta_sm90_out != nullptr);
  SLIMSTACK_REQUIRE(N >= 1 && N <= INT32_MAX && Kp >= 64 && Kp % 64 == 0 && Kp <= INT32_MAX);
  SLIMSTACK_REQUIRE(detail::is_aligned(W, 16) && detail::is_aligned(values_out, 16) &&
                    detail::is_aligned(meta_sm90_out, 16));
  // Same requirement as the GEMM: the test hook is only meaningful next to it.
  SLIMSTACK_CUDA_TRY(require_sm90a());
  switch (dtype) {
    case DType::kFloat16:
      return run_compressor<HalfCfg>(W, values_out, meta_sm90_out, N, Kp, stream);
    case DType::kBFloat16:
      return run_compressor<Bf16Cfg>(W, values_out, meta_sm90_out, N, Kp, stream);
  }
  return cudaErrorInvalidValue;
}

#else  // !CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED: toolkit too old for the sm90 sparse GEMM

const char* sparse24_sm90_last_error() { return ""; }
size_t sparse24_sm90_meta_bytes(int64_t, int64_t) { return 0; }
cudaError_t sparse24_sm90_reorder_meta(const uint8_t*, uint8_t*, int64_t, int64_t, cudaStream_t) {
  return cudaErrorNotSupported;
}
size_t sparse24_gemm_sm90_workspace_bytes(int64_t, int64_t, int64_t, DType, int, int) {
  return 0;
}
bool sparse24_gemm_sm90_available(int) { return false; }
cudaError_t sparse24_gemm_sm90(const void*, int64_t, const void*, const uint8_t*, void*, int64_t,
                               void*, int64_t, int64_t, int64_t, DType, int, int, cudaStream_t) {
  return cudaErrorNotSupported;
}
cudaError_t sparse24_sm90_compress_dense(const void*, void*, uint8_t*, int64_t, int64_t, DType,
                                         cudaStream_t) {
  return cudaErrorNotSupported;
}

#endif

}  // namespace cuda
}  // namespace slimstack
