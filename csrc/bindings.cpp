// slimstack._C: the pybind11 boundary. It checks tensors and calls kernels, nothing else:
// every policy decision (backend, tile config, padding) lives in Python.
//
// Naming: <op>_<device> (sparse24_mm_cpu, bitmap_mm_cpu, ...). CUDA entry points go in the
// SLIMSTACK_WITH_CUDA block of the module below, reusing the check helpers.
#include <torch/extension.h>

#include <optional>
#include <string>

#include "cpu/bf16_dot.h"
#include "cpu/decoder_glue.h"
#include "cpu/dense_tiles.h"
#include "cpu/sparse_mm.h"
#include "torch_checks.h"
#ifdef SLIMSTACK_WITH_CUDA
#include "cuda/glue.h"  // register_cuda: the *_cuda entry points (csrc/cuda/glue.cpp)
#endif

namespace {

using slimstack::checks::check_packed;
using slimstack::checks::make_output;
using slimstack::checks::padded_k;

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// x [M, K] with M >= 0, a kernel dtype, contiguous, on `device`.
void check_x(const std::string& op, const at::Tensor& x, int64_t N, int64_t K,
             c10::DeviceType device) {
  TORCH_CHECK_VALUE(N > 0 && K > 0, op, ": N and K must be positive, got N=", N, ", K=", K);
  TORCH_CHECK_VALUE(x.device().type() == device, op, ": x is on ", x.device(), ", expected ",
                    c10::DeviceTypeName(device));
  TORCH_CHECK_TYPE(is_kernel_dtype(x.scalar_type()), op,
                   ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == K, op, ": x must be [M, K=", K, "], got ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous");
}

template <typename Fn>
void with_kernel_type(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: return fn(float{});
    case at::kHalf: return fn(c10::Half{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t);
  }
}

at::Tensor sparse24_mm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                           int64_t N, int64_t K, const std::optional<at::Tensor>& out_arg) {
  const std::string op = "sparse24_mm_cpu";
  check_x(op, x, N, K, c10::DeviceType::CPU);
  const int64_t Kp = padded_k(K);
  check_packed(op, "values", values, x.scalar_type(), {N, Kp / 2}, x);
  check_packed(op, "meta", meta, at::kByte, {N, Kp / 8}, x);
  at::Tensor out = make_output(op, x, x.size(0), N, out_arg);
  if (x.size(0) == 0) return out;
  const bool dense_tiles = slimstack::cpu::use_dense_tiles(x.scalar_type(), x.size(0));
  with_kernel_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (dense_tiles) {
      slimstack::cpu::sparse24_mm_dense_tiles<T>(x, values, meta, N, K, out);
      return;
    }
    slimstack::cpu::sparse24_mm<T>(x.data_ptr<T>(), values.data_ptr<T>(), meta.data_ptr<uint8_t>(),
                                   out.data_ptr<T>(), x.size(0), N, K);
  });
  return out;
}

at::Tensor bitmap_mm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                         const at::Tensor& row_offsets, int64_t N, int64_t K,
                         const std::optional<at::Tensor>& out_arg) {
  const std::string op = "bitmap_mm_cpu";
  check_x(op, x, N, K, c10::DeviceType::CPU);
  check_packed(op, "values", values, x.scalar_type(), {}, x);
  check_packed(op, "bitmask", bitmask, at::kByte, {N, padded_k(K) / 8}, x);
  check_packed(op, "row_offsets", row_offsets, at::kLong, {N + 1}, x);
  at::Tensor out = make_output(op, x, x.size(0), N, out_arg);
  if (x.size(0) == 0) return out;
  int64_t bad_row = -1;
  const bool dense_tiles = slimstack::cpu::use_dense_tiles(x.scalar_type(), x.size(0));
  with_kernel_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (dense_tiles) {
      bad_row = slimstack::cpu::bitmap_mm_dense_tiles<T>(x, values, bitmask, row_offsets, N, K,
                                                         out);
      return;
    }
    bad_row = slimstack::cpu::bitmap_mm<T>(
        x.data_ptr<T>(), values.data_ptr<T>(), values.numel(), bitmask.data_ptr<uint8_t>(),
        row_offsets.data_ptr<int64_t>(), out.data_ptr<T>(), x.size(0), N, K);
  });
  TORCH_CHECK_VALUE(bad_row < 0, op, ": corrupt bitmap weight: row ", bad_row,
                    " has offsets outside values or more set bits than its values slot");
  return out;
}

at::Tensor dense_mm_cpu(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& out_arg) {
  const std::string op = "dense_mm_cpu";
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [N, K], got ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  check_x(op, x, N, K, c10::DeviceType::CPU);
  check_packed(op, "weight", weight, x.scalar_type(), {N, K}, x);
  at::Tensor out = make_output(op, x, x.size(0), N, out_arg);
  TORCH_CHECK_VALUE(at::get_overlap_status(out, weight) == at::MemOverlapStatus::No, op,
                    ": out must not share memory with weight");
  const int64_t M = x.size(0);
  if (M == 0) return out;
  if (x.scalar_type() == at::kBFloat16 && M <= slimstack::cpu::dense_bf16_rows_max_m()) {
    slimstack::cpu::dense_mm_bf16_dot(x.data_ptr<c10::BFloat16>(),
                                      weight.data_ptr<c10::BFloat16>(),
                                      out.data_ptr<c10::BFloat16>(), M, N, K);
  } else {
    at::mm_out(out, x, weight.t());
  }
  return out;
}

void select_cpu_isa(const std::string& name) {
  TORCH_CHECK_VALUE(slimstack::cpu::select_isa(name), "CPU ISA '", name,
                    "' is not supported here; supported: ",
                    c10::Join(", ", slimstack::cpu::supported_isas()));
}

void set_cpu_dense_tiles_min_m(int64_t min_m) { slimstack::cpu::set_dense_tiles_min_m(min_m); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "slimstack native kernels";
  m.def("sparse24_mm_cpu", &sparse24_mm_cpu, "y[M, N] = x[M, K] @ W^T, W packed sparse24",
        py::arg("x"), py::arg("values"), py::arg("meta"), py::arg("N"), py::arg("K"),
        py::arg("out") = py::none());
  m.def("bitmap_mm_cpu", &bitmap_mm_cpu, "y[M, N] = x[M, K] @ W^T, W packed bitmap",
        py::arg("x"), py::arg("values"), py::arg("bitmask"), py::arg("row_offsets"),
        py::arg("N"), py::arg("K"), py::arg("out") = py::none());
  m.def("dense_mm_cpu", &dense_mm_cpu,
        "y[M, N] = x[M, K] @ W^T for a dense W: the bf16 dot kernel up to "
        "cpu_dense_rows_max_m() rows of bf16, else ATen's matmul",
        py::arg("x"), py::arg("weight"), py::arg("out") = py::none());
  m.def("cpu_dense_rows_max_m", &slimstack::cpu::dense_bf16_rows_max_m,
        "most rows of bf16 x that dense_mm_cpu runs with its own kernel (0: none here)");
  m.def("cpu_isas", &slimstack::cpu::supported_isas,
        "instruction sets the CPU kernels can use here, best first");
  m.def("cpu_isa", &slimstack::cpu::current_isa, "instruction set the CPU kernels use now");
  m.def("select_cpu_isa", &select_cpu_isa, "switch the CPU kernels' instruction set (tests)",
        py::arg("name"));
  m.def("cpu_dense_tiles_min_m", &slimstack::cpu::dense_tiles_min_m,
        "smallest M whose CPU matmul in this dtype decompresses dense tiles for ATen's GEMM "
        "(2**63 - 1: never)",
        py::arg("dtype"));
  m.def("set_cpu_dense_tiles_min_m", &set_cpu_dense_tiles_min_m,
        "every dtype takes the dense-tile strategy from this M on (0: always); negative "
        "restores the measured crossovers (tests, benchmarks)",
        py::arg("min_m"));
  slimstack::register_decoder_ops(m);
#ifdef SLIMSTACK_WITH_CUDA
  m.attr("with_cuda") = true;
  slimstack::register_cuda(m);
#else
  m.attr("with_cuda") = false;
#endif
}
