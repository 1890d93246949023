// Tensor checks shared by the pybind11 boundary (bindings.cpp) and the CUDA glue
// (cuda/glue.cpp): readable TORCH_CHECK messages naming the op, the argument and what is
// allowed. Torch C++ files only; the .cu kernels never include this.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace slimstack {
namespace checks {

constexpr int64_t kKTile = 64;  // formats version 1 pads K to a multiple of 64

inline int64_t padded_k(int64_t k) { return (k + kKTile - 1) / kKTile * kKTile; }

inline bool aligned(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % static_cast<uintptr_t>(bytes) == 0;
}

// A packed tensor: on x's device, exact dtype and shape (empty shape: 1-D of any length),
// contiguous and aligned to `align` bytes.
inline void check_packed(const std::string& op, const char* name, const at::Tensor& t,
                         at::ScalarType dtype, const std::vector<int64_t>& shape,
                         const at::Tensor& x, int64_t align = 1) {
  TORCH_CHECK_VALUE(t.defined() && t.device() == x.device(), op, ": ", name, " must be on ",
                    x.device(), " like x, got ",
                    t.defined() ? t.device().str() : std::string("an undefined tensor"));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  if (shape.empty()) {
    TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got ", t.sizes());
  } else {
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), op, ": ", name, " must be ",
                      at::IntArrayRef(shape), ", got ", t.sizes());
  }
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK_VALUE(aligned(t, align), op, ": ", name, " must be ", align,
                    "-byte aligned (it is a view at an odd offset; pass a .clone())");
}

// y [M, N] in x's dtype on x's device: the caller's `out` (checked; lets tests poison it and
// CUDA graphs keep a static buffer) or a fresh tensor. `align`: byte alignment the kernel needs.
inline at::Tensor make_output(const std::string& op, const at::Tensor& x, int64_t M, int64_t N,
                              const std::optional<at::Tensor>& out, int64_t align = 1) {
  if (!out.has_value() || !out->defined()) return at::empty({M, N}, x.options());
  const at::Tensor& y = *out;
  TORCH_CHECK_VALUE(y.device() == x.device(), op, ": out must be on ", x.device(), ", got ",
                    y.device());
  TORCH_CHECK_TYPE(y.scalar_type() == x.scalar_type(), op, ": out must be ", x.scalar_type(),
                   " like x, got ", y.scalar_type());
  TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == M && y.size(1) == N, op, ": out must be [", M,
                    ", ", N, "], got ", y.sizes());
  TORCH_CHECK_VALUE(y.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK_VALUE(aligned(y, align), op, ": out must be ", align, "-byte aligned");
  // the kernels read x while they write y: an out that is (part of) x gives wrong results
  const auto overlap = at::get_overlap_status(y, x);
  TORCH_CHECK_VALUE(overlap == at::MemOverlapStatus::No || x.numel() == 0 || y.numel() == 0,
                    op, ": out must not share memory with x (pass a separate buffer)");
  return y;
}

}  // namespace checks
}  // namespace slimstack
