// Torch glue for the CUDA kernels: checks tensors with messages a user can act on, sets the
// device guard and current stream, allocates outputs and scratch, calls the launchers in
// csrc/cuda/*.cu (which know nothing about torch) and turns their cudaError_t into errors.
//
// Naming follows csrc/bindings.cpp: <op>_cuda, arguments (x, <packed tensors>, N, K) with the
// packed layouts of python/slimstack/formats/. Built only against a CUDA torch
// (SLIMSTACK_WITH_CUDA); setup.py picks this file up with the csrc/cuda/*.cpp glob.
#ifdef SLIMSTACK_WITH_CUDA

#include "cuda/glue.h"

#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "cuda/launchers.h"
#include "torch_checks.h"

namespace slimstack {
namespace {

namespace sc = slimstack::cuda;

using checks::aligned;
using checks::check_packed;
using checks::make_output;
using checks::padded_k;

sc::DType kernel_dtype(const std::string& op, const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf:
      return sc::DType::kFloat16;
    case at::kBFloat16:
      return sc::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": x must be float16 or bfloat16, got ", x.scalar_type(),
                       " (the CUDA kernels have no fp32 path; use the Triton or CPU backend)");
  }
  return sc::DType::kFloat16;  // unreachable
}

// N and K positive and within what the kernels index with int.
void check_sizes(const std::string& op, int64_t N, int64_t K) {
  TORCH_CHECK_VALUE(N > 0 && K > 0, op, ": N and K must be positive, got N=", N, ", K=", K);
  TORCH_CHECK_VALUE(N <= sc::kMaxRowsN && K <= sc::kMaxColsK, op, ": N must be at most ",
                    sc::kMaxRowsN, " and K at most ", sc::kMaxColsK,
                    " (the kernels index rows and columns with 32-bit ints), got N=", N, ", K=", K);
}

// The Hopper GEMM's metadata reorder indexes bytes of [N, Kp / 8] tiles with int.
void check_sm90_sizes(const std::string& op, int64_t N, int64_t K) {
  constexpr int64_t kMax = INT32_MAX / 2;
  TORCH_CHECK_VALUE(N <= kMax && padded_k(K) <= kMax, op, ": the Hopper GEMM takes N and padded K ",
                    "up to ", kMax, ", got N=", N, ", K=", K, "; use sparse24_gemm_sm80_cuda");
}

// x: [M, K], CUDA, fp16/bf16, contiguous; N and K positive.
void check_x(const std::string& op, const at::Tensor& x, int64_t N, int64_t K) {
  check_sizes(op, N, K);
  TORCH_CHECK_VALUE(x.defined() && x.is_cuda(), op, ": x must be a CUDA tensor, got ",
                    x.defined() ? x.device().str() : std::string("an undefined tensor"));
  kernel_dtype(op, x);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == K, op, ": x must be [M, K=", K, "], got ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous (call .contiguous())");
}

void check_launch(const std::string& op, cudaError_t err) {
  if (err == cudaSuccess) return;
  // A runtime call that failed (a launch, cudaFuncSetAttribute, ...) also left its error as the
  // thread's "last error": clear it, or the next unrelated launch check (torch's included)
  // would report it again. Sticky errors (a kernel fault) stay whatever we do.
  (void)cudaGetLastError();
  if (err == cudaErrorNotSupported) {
    TORCH_CHECK(false, op, ": not supported on this device or build (",
                cudaGetErrorString(err), ")");
  }
  if (err == cudaErrorInvalidValue) {
    TORCH_CHECK(false, op, ": the launcher rejected its arguments after the glue checks passed "
                "(a slimstack bug; please report the shapes): ", cudaGetErrorString(err));
  }
  TORCH_CHECK(false, op, ": CUDA error: ", cudaGetErrorString(err));
}

// The sm90 launchers: a refusal inside CUTLASS (can_implement / initialize / run) names the step
// and CUTLASS's status; everything else as check_launch.
void check_sm90_launch(const std::string& op, cudaError_t err) {
  if (err == cudaSuccess) return;
  const std::string detail = sc::sparse24_sm90_last_error();
  if (!detail.empty()) {
    (void)cudaGetLastError();
    TORCH_CHECK(false, op, ": ", detail, " (", cudaGetErrorString(err),
                "); sparse24_gemm_sm80_cuda takes any shape");
  }
  check_launch(op, err);
}

cudaStream_t current_stream(const at::Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}

// x as the GEMMs need it: Kp columns (zero padded) or a K that is a multiple of 8, with
// 16-byte aligned rows. Copies only when x does not already qualify.
at::Tensor x_for_gemm(const at::Tensor& x, int64_t K, int64_t want_cols) {
  if (x.size(1) == want_cols && aligned(x, 16)) return x;
  at::Tensor padded = at::zeros({x.size(0), want_cols}, x.options());
  padded.narrow(1, 0, K).copy_(x);
  return padded;
}

// ---------------------------------------------------------------------------------------------

sc::SplitKReduce parse_reduce(const std::string& op, const std::string& reduce) {
  if (reduce == "auto") return sc::SplitKReduce::kAuto;
  if (reduce == "kernel") return sc::SplitKReduce::kKernel;
  TORCH_CHECK_VALUE(reduce == "cluster", op,
                    ": reduce must be 'auto', 'kernel' or 'cluster', got '", reduce, "'");
  return sc::SplitKReduce::kCluster;
}

const char* reduce_name(sc::SplitKReduce reduce) {
  switch (reduce) {
    case sc::SplitKReduce::kKernel: return "kernel";
    case sc::SplitKReduce::kCluster: return "cluster";
    default: return "none";
  }
}

sc::Choice parse_choice(const std::string& op, const char* name, const std::string& value) {
  if (value == "auto") return sc::Choice::kAuto;
  if (value == "on") return sc::Choice::kOn;
  TORCH_CHECK_VALUE(value == "off", op, ": ", name, " must be 'auto', 'on' or 'off', got '",
                    value, "'");
  return sc::Choice::kOff;
}

// The GEMV's options as given to the Python entry points.
struct GemvOptions {
  int64_t split_k = 0;
  std::string reduce = "auto";
  std::string prefetch = "auto";
  std::string pdl = "auto";
};

// A plan for this problem on `device`; a forced feature that cannot run there says why.
sc::Sparse24GemvPlan gemv_plan(const std::string& op, int64_t M, int64_t N, int64_t Kp,
                               int device, const GemvOptions& options) {
  sc::Sparse24GemvRequest request;
  request.split_k = static_cast<int>(options.split_k);
  request.reduce = parse_reduce(op, options.reduce);
  request.prefetch = parse_choice(op, "prefetch", options.prefetch);
  request.pdl = parse_choice(op, "pdl", options.pdl);
  // The callers hold a device guard for `device`, so "current" is the planned device.
  TORCH_CHECK(request.pdl != sc::Choice::kOn || sc::sparse24_gemv_pdl_available(), op,
              ": pdl='on' needs an sm_90 GPU and this extension's sm_90 image (use pdl='auto' "
              "or 'off')");
  sc::Sparse24GemvPlan plan;
  const cudaError_t err = sc::sparse24_gemv_plan(M, N, Kp, device, request, &plan);
  TORCH_CHECK(err != cudaErrorNotSupported || request.reduce != sc::SplitKReduce::kCluster, op,
              ": reduce='cluster' needs an sm_90 GPU, this extension's sm_90 image and a split of "
              "at most ", sc::kMaxClusterSplit, " K slices (use reduce='auto' or 'kernel')");
  TORCH_CHECK_VALUE(err != cudaErrorNotSupported, op, ": K=", Kp, " (padded) is too long for the ",
                    "decode GEMV at M=", M, ": even ", sc::kSparse24GemvMaxSplit,
                    " K slices leave x larger than shared memory; use the GEMM");
  check_launch(op, err);
  return plan;
}

at::Tensor sparse24_gemv_cuda(const at::Tensor& x, const at::Tensor& values,
                              const at::Tensor& meta, int64_t N, int64_t K, int64_t split_k,
                              const std::optional<at::Tensor>& out, const std::string& reduce,
                              const std::string& prefetch, const std::string& pdl) {
  const std::string op = "sparse24_gemv_cuda";
  check_x(op, x, N, K);
  const int64_t M = x.size(0);
  TORCH_CHECK_VALUE(M <= sc::kSparse24GemvMaxM, op, ": decode GEMV takes M <= ",
                    sc::kSparse24GemvMaxM, " rows of x, got M=", M,
                    " (use sparse24_gemm_sm80_cuda / sparse24_gemm_sm90_cuda for prefill)");
  TORCH_CHECK_VALUE(split_k >= 0 && split_k <= sc::kSparse24GemvMaxSplit, op,
                    ": split_k must be in 0..", sc::kSparse24GemvMaxSplit,
                    " (0 = automatic; K slices are grid.y), got ", split_k);
  const int64_t Kp = padded_k(K);
  check_packed(op, "values", values, x.scalar_type(), {N, Kp / 2}, x, 16);
  check_packed(op, "meta", meta, at::kByte, {N, Kp / 8}, x, 8);
  at::Tensor y = make_output(op, x, M, N, out, 2);
  if (M == 0) return y;

  c10::cuda::CUDAGuard guard(x.device());
  const sc::Sparse24GemvPlan plan =
      gemv_plan(op, M, N, Kp, x.device().index(), {split_k, reduce, prefetch, pdl});
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes / sizeof(float))},
                          x.options().dtype(at::kFloat));
  }
  check_launch(op, sc::sparse24_gemv(x.data_ptr(), K, values.data_ptr(),
                                     meta.data_ptr<uint8_t>(), y.data_ptr(), N,
                                     workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                                     M, N, K, Kp, plan, kernel_dtype(op, x), current_stream(x)));
  return y;
}

pybind11::dict sparse24_gemv_plan_cuda(int64_t M, int64_t N, int64_t K, int64_t device,
                                       int64_t split_k, const std::string& reduce,
                                       const std::string& prefetch, const std::string& pdl) {
  const std::string op = "sparse24_gemv_plan_cuda";
  TORCH_CHECK_VALUE(M >= 1 && M <= sc::kSparse24GemvMaxM && N > 0 && K > 0, op,
                    ": need 1 <= M <= ", sc::kSparse24GemvMaxM, ", N > 0, K > 0; got M=", M,
                    ", N=", N, ", K=", K);
  check_sizes(op, N, K);
  TORCH_CHECK_VALUE(split_k >= 0 && split_k <= sc::kSparse24GemvMaxSplit, op,
                    ": split_k must be in 0..", sc::kSparse24GemvMaxSplit, " (0 = automatic), got ",
                    split_k);
  TORCH_CHECK_VALUE(device >= 0 && device < c10::cuda::device_count(), op, ": device ", device,
                    " is not one of the ", static_cast<int>(c10::cuda::device_count()),
                    " CUDA devices");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const sc::Sparse24GemvPlan plan =
      gemv_plan(op, M, N, padded_k(K), static_cast<int>(device), {split_k, reduce, prefetch, pdl});
  pybind11::dict d;
  d["split_k"] = plan.split_k;
  d["slice_chunks"] = plan.slice_chunks;
  d["row_tiles_per_warp"] = plan.row_tiles_per_warp;
  d["prefetch"] = plan.prefetch;
  d["warps_per_block"] = plan.warps_per_block;
  d["pdl"] = plan.pdl;
  d["reduce"] = reduce_name(plan.reduce);
  d["workspace_bytes"] = plan.workspace_bytes;
  return d;
}

at::Tensor bitmap_gemv_cuda(const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& bitmask, const at::Tensor& row_offsets, int64_t N,
                            int64_t K, const std::optional<at::Tensor>& out,
                            int64_t ring_depth) {
  const std::string op = "bitmap_gemv_cuda";
  check_x(op, x, N, K);
  const int64_t M = x.size(0);
  TORCH_CHECK_VALUE(M <= sc::kBitmapGemvMaxM, op, ": decode GEMV takes M <= ",
                    sc::kBitmapGemvMaxM, " rows of x, got M=", M);
  TORCH_CHECK_VALUE(ring_depth == 0 || ring_depth == 1 || ring_depth == 2, op,
                    ": ring_depth must be 0 (automatic), 1 or 2, got ", ring_depth);
  TORCH_CHECK_VALUE(ring_depth != 2 || M <= 1, op,
                    ": ring_depth=2 is the M = 1 kernel's, got M=", M, " (use 0 or 1)");
  const int64_t Kp = padded_k(K);
  check_packed(op, "values", values, x.scalar_type(), {}, x, 16);
  check_packed(op, "bitmask", bitmask, at::kByte, {N, Kp / 8}, x, 4);
  check_packed(op, "row_offsets", row_offsets, at::kLong, {N + 1}, x, 8);
  at::Tensor y = make_output(op, x, M, N, out, 2);
  if (M == 0) return y;
  c10::cuda::CUDAGuard guard(x.device());
  // An all-zero weight packs to an empty values tensor, whose data pointer is null: the
  // launcher refuses null pointers, and the product is zero anyway.
  if (values.numel() == 0) return y.zero_();
  check_launch(op, sc::bitmap_gemv(x.data_ptr(), K, values.data_ptr(),
                                   bitmask.data_ptr<uint8_t>(), row_offsets.data_ptr<int64_t>(),
                                   y.data_ptr(), N, M, N, K, Kp, kernel_dtype(op, x),
                                   static_cast<int>(ring_depth), current_stream(x)));
  return y;
}

at::Tensor sparse24_gemm_sm80_cuda(const at::Tensor& x, const at::Tensor& values,
                                   const at::Tensor& meta, int64_t N, int64_t K,
                                   const std::optional<at::Tensor>& out) {
  const std::string op = "sparse24_gemm_sm80_cuda";
  check_x(op, x, N, K);
  const int64_t M = x.size(0);
  const int64_t Kp = padded_k(K);
  check_packed(op, "values", values, x.scalar_type(), {N, Kp / 2}, x, 16);
  check_packed(op, "meta", meta, at::kByte, {N, Kp / 8}, x, 8);
  at::Tensor y = make_output(op, x, M, N, out, 2);
  if (M == 0) return y;
  c10::cuda::CUDAGuard guard(x.device());
  // 16-byte cp.async of x rows needs K % 8 == 0; otherwise run on a zero-padded copy.
  const at::Tensor xg = x_for_gemm(x, K, K % 8 == 0 ? K : Kp);
  const int64_t Kx = xg.size(1);
  // One launch covers kSparse24GemmSm80MaxM rows (grid.y); longer inputs take several, each
  // on a row slice of x and y (row offsets keep the 16-byte alignment: Kx % 8 == 0).
  for (int64_t m0 = 0; m0 < M; m0 += sc::kSparse24GemmSm80MaxM) {
    const int64_t rows = std::min(M - m0, sc::kSparse24GemmSm80MaxM);
    check_launch(op, sc::sparse24_gemm_sm80(xg[m0].data_ptr(), Kx, values.data_ptr(),
                                            meta.data_ptr<uint8_t>(), y[m0].data_ptr(), N, rows,
                                            N, Kx, Kp, kernel_dtype(op, x), current_stream(x)));
  }
  return y;
}

int64_t sparse24_sm90_meta_nbytes(int64_t N, int64_t K) {
  TORCH_CHECK_VALUE(N > 0 && K > 0, "sparse24_sm90_meta_nbytes: N and K must be positive, got N=",
                    N, ", K=", K);
  check_sizes("sparse24_sm90_meta_nbytes", N, K);
  return static_cast<int64_t>(sc::sparse24_sm90_meta_bytes(N, padded_k(K)));
}

at::Tensor sparse24_sm90_reorder_meta_cuda(const at::Tensor& meta, int64_t N, int64_t K) {
  const std::string op = "sparse24_sm90_reorder_meta_cuda";
  check_sizes(op, N, K);
  check_sm90_sizes(op, N, K);
  TORCH_CHECK_VALUE(meta.defined() && meta.is_cuda(), op, ": meta must be a CUDA tensor");
  const int64_t Kp = padded_k(K);
  check_packed(op, "meta", meta, at::kByte, {N, Kp / 8}, meta, 1);
  const int64_t nbytes = static_cast<int64_t>(sc::sparse24_sm90_meta_bytes(N, Kp));
  TORCH_CHECK(nbytes > 0, op, ": this build has no sm90 sparse GEMM (CUDA < 12.2)");
  at::Tensor out = at::empty({nbytes}, meta.options());
  c10::cuda::CUDAGuard guard(meta.device());
  check_launch(op, sc::sparse24_sm90_reorder_meta(meta.data_ptr<uint8_t>(),
                                                  out.data_ptr<uint8_t>(), N, Kp,
                                                  current_stream(meta)));
  return out;
}

bool sparse24_gemm_sm90_available(int64_t device) {
  return sc::sparse24_gemm_sm90_available(static_cast<int>(device));
}

// "auto" | "128x128" | "256x128" | "128x256" (weight rows x tokens) -> sc::Sparse24Sm90Tile.
int sm90_tile(const std::string& op, const std::string& tile) {
  static constexpr std::pair<const char*, sc::Sparse24Sm90Tile> kTiles[] = {
      {"auto", sc::Sparse24Sm90Tile::kAuto},
      {"128x128", sc::Sparse24Sm90Tile::k128x128},
      {"256x128", sc::Sparse24Sm90Tile::k256x128},
      {"128x256", sc::Sparse24Sm90Tile::k128x256},
  };
  for (const auto& [name, value] : kTiles) {
    if (tile == name) return static_cast<int>(value);
  }
  TORCH_CHECK_VALUE(false, op, ": tile must be 'auto', '128x128', '256x128' or '128x256' "
                    "(weight rows x tokens), got '", tile, "'");
  return 0;  // not reached
}

at::Tensor sparse24_gemm_sm90_cuda(const at::Tensor& x, const at::Tensor& values,
                                   const at::Tensor& meta_sm90, int64_t N, int64_t K,
                                   const std::optional<at::Tensor>& out, int64_t swizzle,
                                   const std::string& tile) {
  const std::string op = "sparse24_gemm_sm90_cuda";
  check_x(op, x, N, K);
  TORCH_CHECK_VALUE(swizzle == 0 || swizzle == 1 || swizzle == 2 || swizzle == 4 || swizzle == 8,
                    op, ": swizzle must be 0 (automatic), 1, 2, 4 or 8, got ", swizzle);
  const int tile_shape = sm90_tile(op, tile);
  const int64_t M = x.size(0);
  const int64_t Kp = padded_k(K);
  TORCH_CHECK_VALUE(N % 8 == 0, op, ": N must be a multiple of 8 (TMA stores y^T columns), got N=",
                    N, "; use sparse24_gemm_sm80_cuda for this layer");
  check_sm90_sizes(op, N, K);
  TORCH_CHECK_VALUE(M <= INT32_MAX, op, ": at most ", INT32_MAX, " rows of x per call, got ", M);
  check_packed(op, "values", values, x.scalar_type(), {N, Kp / 2}, x, 16);
  const int64_t nbytes = static_cast<int64_t>(sc::sparse24_sm90_meta_bytes(N, Kp));
  check_packed(op, "meta_sm90", meta_sm90, at::kByte, {nbytes}, x, 16);
  at::Tensor y = make_output(op, x, M, N, out, 16);
  if (M == 0) return y;
  c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(sc::sparse24_gemm_sm90_available(x.device().index()), op,
              ": needs a compute capability 9.0 GPU and a build with sm_90a "
              "(TORCH_CUDA_ARCH_LIST containing 9.0a); use sparse24_gemm_sm80_cuda instead");
  // CUTLASS reads exactly Kp columns of x through TMA: pad when K != Kp.
  const at::Tensor xg = x_for_gemm(x, K, Kp);
  const sc::DType dtype = kernel_dtype(op, x);
  const int tile_swizzle = static_cast<int>(swizzle);
  const size_t ws_bytes =
      sc::sparse24_gemm_sm90_workspace_bytes(M, N, Kp, dtype, tile_swizzle, tile_shape);
  at::Tensor workspace;
  if (ws_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  }
  check_sm90_launch(op, sc::sparse24_gemm_sm90(xg.data_ptr(), Kp, values.data_ptr(),
                                               meta_sm90.data_ptr<uint8_t>(), y.data_ptr(), N,
                                               workspace.defined() ? workspace.data_ptr() : nullptr,
                                               M, N, Kp, dtype, tile_swizzle, tile_shape,
                                               current_stream(x)));
  return y;
}

std::tuple<at::Tensor, at::Tensor> sparse24_sm90_compress_dense_cuda(const at::Tensor& w) {
  const std::string op = "sparse24_sm90_compress_dense_cuda";
  TORCH_CHECK_VALUE(w.defined() && w.is_cuda(), op, ": w must be a CUDA tensor");
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) > 0 && w.size(1) > 0, op,
                    ": w must be a non-empty [N, K] matrix, got ", w.sizes());
  const sc::DType dtype = kernel_dtype(op, w);
  const int64_t N = w.size(0);
  const int64_t K = w.size(1);
  const int64_t Kp = padded_k(K);
  c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor wp = x_for_gemm(w.contiguous(), K, Kp);
  at::Tensor values = at::empty({N, Kp / 2}, w.options());
  at::Tensor meta_sm90 =
      at::empty({static_cast<int64_t>(sc::sparse24_sm90_meta_bytes(N, Kp))},
                w.options().dtype(at::kByte));
  check_sm90_launch(op, sc::sparse24_sm90_compress_dense(wp.data_ptr(), values.data_ptr(),
                                                         meta_sm90.data_ptr<uint8_t>(), N, Kp,
                                                         dtype, current_stream(w)));
  return {values, meta_sm90};
}

// Test hook: one mma.sp on per-lane fragments (see mma_sp_probe.cu).
at::Tensor mma_sp_probe_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& e,
                             const std::string& dtype, int64_t selector) {
  const std::string op = "mma_sp_probe_cuda";
  TORCH_CHECK_VALUE(dtype == "float16" || dtype == "bfloat16", op,
                    ": dtype must be 'float16' or 'bfloat16', got '", dtype, "'");
  TORCH_CHECK_VALUE(selector == 0 || selector == 1, op,
                    ": the m16n8k32 sparsity selector is 0 or 1, got ", selector);
  TORCH_CHECK_VALUE(a.defined() && a.is_cuda(), op, ": a must be a CUDA tensor");
  check_packed(op, "a", a, at::kInt, {32, 4}, a, 16);
  check_packed(op, "b", b, at::kInt, {32, 4}, a, 16);
  check_packed(op, "e", e, at::kInt, {32}, a, 16);
  at::Tensor c = at::empty({32, 4}, a.options().dtype(at::kFloat));
  c10::cuda::CUDAGuard guard(a.device());
  auto words = [](const at::Tensor& t) {
    return reinterpret_cast<const uint32_t*>(t.data_ptr<int32_t>());
  };
  check_launch(op, sc::mma_sp_probe(words(a), words(b), words(e), c.data_ptr<float>(),
                                    static_cast<int>(selector),
                                    dtype == "float16" ? sc::DType::kFloat16
                                                       : sc::DType::kBFloat16,
                                    current_stream(a)));
  return c;
}

}  // namespace

void register_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("sparse24_gemv_cuda", &sparse24_gemv_cuda,
        "decode y[M, N] = x[M, K] @ W^T (M <= 16), W packed sparse24, mma.sp", py::arg("x"),
        py::arg("values"), py::arg("meta"), py::arg("N"), py::arg("K"), py::arg("split_k") = 0,
        py::arg("out") = py::none(), py::arg("reduce") = "auto", py::arg("prefetch") = "auto",
        py::arg("pdl") = "auto");
  m.def("sparse24_gemv_plan_cuda", &sparse24_gemv_plan_cuda,
        "the split-K / tile plan sparse24_gemv_cuda would use (dict)", py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("device") = 0, py::arg("split_k") = 0,
        py::arg("reduce") = "auto", py::arg("prefetch") = "auto", py::arg("pdl") = "auto");
  m.def("bitmap_gemv_cuda", &bitmap_gemv_cuda,
        "decode y[M, N] = x[M, K] @ W^T (M <= 16), W packed bitmap", py::arg("x"),
        py::arg("values"), py::arg("bitmask"), py::arg("row_offsets"), py::arg("N"),
        py::arg("K"), py::arg("out") = py::none(), py::arg("ring_depth") = 0);
  m.def("sparse24_gemm_sm80_cuda", &sparse24_gemm_sm80_cuda,
        "prefill y = x @ W^T, W packed sparse24, mma.sp (sm_80 and later)", py::arg("x"),
        py::arg("values"), py::arg("meta"), py::arg("N"), py::arg("K"),
        py::arg("out") = py::none());
  m.def("sparse24_sm90_meta_nbytes", &sparse24_sm90_meta_nbytes,
        "bytes of the CUTLASS sm90 metadata for an [N, K] weight", py::arg("N"), py::arg("K"));
  m.def("sparse24_sm90_reorder_meta_cuda", &sparse24_sm90_reorder_meta_cuda,
        "sparse24 meta [N, Kp/8] -> CUTLASS sm90 metadata (uint8 1-D), once at pack time",
        py::arg("meta"), py::arg("N"), py::arg("K"));
  m.def("sparse24_gemm_sm90_available", &sparse24_gemm_sm90_available,
        "whether sparse24_gemm_sm90_cuda can run on this device with this build",
        py::arg("device") = 0);
  m.def("sparse24_gemm_sm90_cuda", &sparse24_gemm_sm90_cuda,
        "prefill y = x @ W^T on Hopper sparse tensor cores (CUTLASS), W = (values, meta_sm90)",
        py::arg("x"), py::arg("values"), py::arg("meta_sm90"), py::arg("N"), py::arg("K"),
        py::arg("out") = py::none(), py::arg("swizzle") = 0, py::arg("tile") = "auto");
  m.def("mma_sp_probe_cuda", &mma_sp_probe_cuda,
        "test hook: one mma.sp m16n8k32 on per-lane fragments a, b [32, 4], e [32] (int32)",
        py::arg("a"), py::arg("b"), py::arg("e"), py::arg("dtype"), py::arg("selector") = 0);
  m.def("sparse24_sm90_compress_dense_cuda", &sparse24_sm90_compress_dense_cuda,
        "test hook: CUTLASS's own compressor on a dense 2:4 W -> (values, meta_sm90)",
        py::arg("w"));
}

}  // namespace slimstack

#endif  // SLIMSTACK_WITH_CUDA
