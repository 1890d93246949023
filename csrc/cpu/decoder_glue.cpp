// pybind11 boundary of the CPU decoder ops: checks and calls. Each output is the caller's
// (checked; tests poison it) or allocated here, and N-D inputs are flattened to rows here:
// the Python-side reshapes and allocations cost more than these kernels at decode. Every
// tensor is on the CPU, in the op's one dtype (float32 or bfloat16), with a contiguous last
// dimension.
#include "cpu/decoder_glue.h"

#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "cpu/decoder_ops.h"

namespace slimstack {
namespace {

using cpu::Strides3;

void check_tensor(const std::string& op, const char* name, const at::Tensor& t, int64_t dim,
                  at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.defined() && t.device().is_cpu(), op, ": ", name,
                    " must be a CPU tensor, got ",
                    t.defined() ? t.device().str() : std::string("an undefined tensor"));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype,
                   " like the first input, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
                    " must be contiguous in its last dimension, got strides ", t.strides());
}

void check_dtype(const std::string& op, const at::Tensor& first) {
  TORCH_CHECK_TYPE(first.scalar_type() == at::kFloat || first.scalar_type() == at::kBFloat16, op,
                   ": the CPU decoder ops take float32 or bfloat16, got ", first.scalar_type());
}

void check_shape(const std::string& op, const char* name, const at::Tensor& t,
                 at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must be ", shape, ", got ", t.sizes());
}

// Whether the bytes that a and b span intersect (inputs here are strided views, for which
// at::get_overlap_status only answers "too hard").
bool spans_intersect(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto* start = static_cast<const char*>(t.data_ptr());
    return std::pair{start, start + (last + 1) * t.element_size()};
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

void check_apart(const std::string& op, const char* out_name, const at::Tensor& out,
                 const char* in_name, const at::Tensor& in) {
  TORCH_CHECK_VALUE(!spans_intersect(out, in), op, ": ", out_name, " must not share memory with ",
                    in_name);
}

void check_out(const std::string& op, const char* name, const at::Tensor& out,
               const at::Tensor& like, at::IntArrayRef shape) {
  check_tensor(op, name, out, static_cast<int64_t>(shape.size()), like.scalar_type());
  check_shape(op, name, out, shape);
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": ", name, " must be contiguous");
}

// An input whose last dimension is strided, copied so that it is not (outputs and the KV
// cache are written in place, so they are checked instead).
at::Tensor contiguous_last(const at::Tensor& t) {
  return t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// The caller's out (checked: contiguous, shaped like `like`) or a fresh one.
at::Tensor output(const std::string& op, const char* name, const std::optional<at::Tensor>& out,
                  const at::Tensor& like) {
  if (!out.has_value() || !out->defined()) return at::empty(like.sizes(), like.options());
  check_out(op, name, *out, like, like.sizes());
  return *out;
}

// t [..., H] as [rows, H] (a view where the strides allow, else a copy).
at::Tensor as_rows(const std::string& op, const char* name, const at::Tensor& t,
                   at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.defined() && t.dim() >= 1, op, ": ", name, " must have a last dimension");
  const at::Tensor rows = contiguous_last(t).reshape({-1, t.size(-1)});
  check_tensor(op, name, rows, 2, dtype);
  return rows;
}

Strides3 lead(const at::Tensor& t) {
  return t.dim() == 4 ? Strides3{t.stride(0), t.stride(1), t.stride(2)}
                      : Strides3{t.stride(0), t.stride(1), 0};
}

template <typename Fn>
void with_decoder_type(at::ScalarType t, Fn&& fn) {
  if (t == at::kFloat) return fn(float{});
  return fn(c10::BFloat16{});
}

// out (and, with delta, sum_out = x + delta) for x [..., H]
void rms_norm_into(const std::string& op, const at::Tensor& x, const at::Tensor* delta,
                   const at::Tensor& weight, double eps, at::Tensor* sum_out, at::Tensor& out) {
  const at::Tensor xr = as_rows(op, "x", x, x.scalar_type());
  const int64_t rows = xr.size(0), H = xr.size(1);
  check_tensor(op, "weight", weight, 1, x.scalar_type());
  check_shape(op, "weight", weight, {H});
  check_apart(op, "out", out, "x", x);
  at::Tensor dr;
  if (delta != nullptr) {
    check_shape(op, "delta", *delta, x.sizes());
    dr = as_rows(op, "delta", *delta, x.scalar_type());
    check_apart(op, "sum_out", *sum_out, "x", x);
    check_apart(op, "sum_out", *sum_out, "delta", *delta);
    check_apart(op, "out", out, "delta", *delta);
    check_apart(op, "out", out, "sum_out", *sum_out);
  }
  if (rows == 0 || H == 0) return;
  with_decoder_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    cpu::rms_norm_rows<T>(xr.data_ptr<T>(), xr.stride(0), delta ? dr.data_ptr<T>() : nullptr,
                          delta ? dr.stride(0) : 0, weight.data_ptr<T>(),
                          delta ? sum_out->data_ptr<T>() : nullptr, out.data_ptr<T>(), rows, H,
                          static_cast<float>(eps));
  });
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps,
                        const std::optional<at::Tensor>& out_arg) {
  const std::string op = "rms_norm_cpu";
  check_dtype(op, x);
  at::Tensor out = output(op, "out", out_arg, x);
  rms_norm_into(op, x, nullptr, weight, eps, nullptr, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& delta,
                                                    const at::Tensor& weight, double eps,
                                                    const std::optional<at::Tensor>& sum_arg,
                                                    const std::optional<at::Tensor>& out_arg) {
  const std::string op = "add_rms_norm_cpu";
  check_dtype(op, x);
  at::Tensor sum_out = output(op, "sum_out", sum_arg, x);
  at::Tensor out = output(op, "out", out_arg, x);
  rms_norm_into(op, x, &delta, weight, eps, &sum_out, out);
  return {sum_out, out};
}

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up,
                      const std::optional<at::Tensor>& out_arg) {
  const std::string op = "swiglu_cpu";
  check_dtype(op, gate);
  check_shape(op, "up", up, gate.sizes());
  const at::Tensor g = as_rows(op, "gate", gate, gate.scalar_type());
  const at::Tensor u = as_rows(op, "up", up, gate.scalar_type());
  at::Tensor out = output(op, "out", out_arg, gate);
  check_apart(op, "out", out, "gate", gate);
  check_apart(op, "out", out, "up", up);
  if (gate.numel() == 0) return out;
  with_decoder_type(gate.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    cpu::swiglu_rows<T>(g.data_ptr<T>(), g.stride(0), u.data_ptr<T>(), u.stride(0),
                        out.data_ptr<T>(), g.size(0), g.size(1));
  });
  return out;
}

// cos and sin with one set of strides (the kernel indexes both alike), last dims contiguous
std::pair<at::Tensor, at::Tensor> same_strides(const at::Tensor& cos, const at::Tensor& sin) {
  at::Tensor c = contiguous_last(cos), s = contiguous_last(sin);
  if (c.strides() != s.strides()) return {c.contiguous(), s.contiguous()};
  return {c, s};
}

// x [B, S, H, D], cos/sin [B, S, D]
void check_rope_inputs(const std::string& op, const char* name, const at::Tensor& x,
                       const at::Tensor& cos, const at::Tensor& sin) {
  check_tensor(op, name, x, 4, x.scalar_type());
  TORCH_CHECK_VALUE(x.size(3) % 2 == 0, op, ": the head size must be even, got ", x.size(3));
  check_tensor(op, "cos", cos, 3, x.scalar_type());
  check_tensor(op, "sin", sin, 3, x.scalar_type());
  check_shape(op, "cos", cos, {x.size(0), x.size(1), x.size(3)});
  check_shape(op, "sin", sin, {x.size(0), x.size(1), x.size(3)});
}

template <typename T>
void rope_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, T* out,
               Strides3 os) {
  cpu::rope<T>(x.data_ptr<T>(), lead(x), cos.data_ptr<T>(), sin.data_ptr<T>(), lead(cos), out, os,
               x.size(0), x.size(1), x.size(2), x.size(3));
}

at::Tensor rope_cpu(const at::Tensor& x_arg, const at::Tensor& cos_arg, const at::Tensor& sin_arg,
                    const std::optional<at::Tensor>& out_arg) {
  const std::string op = "rope_cpu";
  const at::Tensor x = contiguous_last(x_arg);
  const std::pair<at::Tensor, at::Tensor> cos_sin = same_strides(cos_arg, sin_arg);
  const at::Tensor &cos = cos_sin.first, &sin = cos_sin.second;
  check_dtype(op, x);
  check_rope_inputs(op, "x", x, cos, sin);
  at::Tensor out = output(op, "out", out_arg, x);
  check_apart(op, "out", out, "x", x);
  if (x.numel() == 0) return out;
  with_decoder_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rope_into<T>(x, cos, sin, out.data_ptr<T>(), lead(out));
  });
  return out;
}

// Decode: q, k, v [B, 1, H(kv), D]; k rotated and v written into the caches [B, Hkv, T, D]
// at `slot`, q rotated into q_out.
at::Tensor rope_to_cache_cpu(const at::Tensor& q_arg, const at::Tensor& k_arg,
                             const at::Tensor& v_arg, const at::Tensor& cos_arg,
                             const at::Tensor& sin_arg, at::Tensor& k_cache, at::Tensor& v_cache,
                             const at::Tensor& slot, const std::optional<at::Tensor>& q_out_arg) {
  const std::string op = "rope_to_cache_cpu";
  const at::Tensor q = contiguous_last(q_arg), k = contiguous_last(k_arg),
                   v = contiguous_last(v_arg);
  const std::pair<at::Tensor, at::Tensor> cos_sin = same_strides(cos_arg, sin_arg);
  const at::Tensor &cos = cos_sin.first, &sin = cos_sin.second;
  check_dtype(op, q);
  check_rope_inputs(op, "q", q, cos, sin);
  check_rope_inputs(op, "k", k, cos, sin);
  const int64_t B = q.size(0), Hkv = k.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(q.size(1) == 1, op, ": decode takes one token per row, q is ", q.sizes());
  check_tensor(op, "v", v, 4, q.scalar_type());
  check_shape(op, "v", v, k.sizes());
  check_tensor(op, "k_cache", k_cache, 4, q.scalar_type());
  TORCH_CHECK_VALUE(k_cache.size(0) == B && k_cache.size(1) == Hkv && k_cache.size(3) == D, op,
                    ": k_cache must be [", B, ", ", Hkv, ", T, ", D, "], got ", k_cache.sizes());
  check_tensor(op, "v_cache", v_cache, 4, q.scalar_type());
  check_shape(op, "v_cache", v_cache, k_cache.sizes());
  TORCH_CHECK_VALUE(slot.device().is_cpu() && slot.scalar_type() == at::kLong && slot.numel() == 1,
                    op, ": slot must be a CPU int64 tensor of one element, got ",
                    slot.scalar_type(), " ", slot.sizes(), " on ", slot.device());
  const int64_t at_slot = slot.item<int64_t>();
  TORCH_CHECK_VALUE(at_slot >= 0 && at_slot < k_cache.size(2), op, ": slot ", at_slot,
                    " is outside the cache's ", k_cache.size(2), " slots");
  at::Tensor q_out = output(op, "q_out", q_out_arg, q);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    check_apart(op, "q_out", q_out, name, t);
    check_apart(op, "k_cache", k_cache, name, t);
    check_apart(op, "v_cache", v_cache, name, t);
  }
  if (B == 0) return q_out;
  with_decoder_type(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rope_into<T>(q, cos, sin, q_out.data_ptr<T>(), lead(q_out));
    // the cache's slot as a [B, 1, Hkv, D] view: batch, (one position), head strides
    const Strides3 k_slot{k_cache.stride(0), 0, k_cache.stride(1)};
    rope_into<T>(k, cos, sin, k_cache.data_ptr<T>() + at_slot * k_cache.stride(2), k_slot);
    const Strides3 v_slot{v_cache.stride(0), 0, v_cache.stride(1)};
    cpu::copy_heads<T>(v.data_ptr<T>(), lead(v), v_cache.data_ptr<T>() + at_slot * v_cache.stride(2),
                       v_slot, B, 1, Hkv, D);
  });
  return q_out;
}

at::Tensor decode_attention_cpu(const at::Tensor& q_arg, const at::Tensor& k_arg,
                                const at::Tensor& v_arg, const at::Tensor& mask,
                                const std::optional<at::Tensor>& out_arg) {
  const std::string op = "decode_attention_cpu";
  const at::Tensor q = contiguous_last(q_arg), k = contiguous_last(k_arg),
                   v = contiguous_last(v_arg);
  check_dtype(op, q);
  check_tensor(op, "q", q, 4, q.scalar_type());
  check_tensor(op, "k", k, 4, q.scalar_type());
  check_tensor(op, "v", v, 4, q.scalar_type());
  const int64_t B = q.size(0), Hkv = q.size(1), G = q.size(2), D = q.size(3), T = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(1) == Hkv && k.size(3) == D, op, ": k must be [", B,
                    ", ", Hkv, ", T, ", D, "] like q, got ", k.sizes());
  check_shape(op, "v", v, k.sizes());
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.device().is_cpu() && mask.dim() == 4 && mask.size(0) == B &&
                        mask.size(1) == 1 && mask.size(2) == 1 && mask.size(3) == T,
                    op, ": mask must be a CPU [", B, ", 1, 1, ", T, "] tensor, got ", mask.sizes());
  at::Tensor out = output(op, "out", out_arg, q);
  check_apart(op, "out", out, "q", q);
  check_apart(op, "out", out, "k", k);
  check_apart(op, "out", out, "v", v);
  if (out.numel() == 0) return out;
  with_decoder_type(q.scalar_type(), [&](auto tag) {
    using Scalar = decltype(tag);
    cpu::decode_attention<Scalar>(q.data_ptr<Scalar>(), lead(q), k.data_ptr<Scalar>(), lead(k),
                                  v.data_ptr<Scalar>(), lead(v), mask.data_ptr<bool>(),
                                  mask.stride(0), mask.stride(3), out.data_ptr<Scalar>(), B, Hkv,
                                  G, T, D, static_cast<float>(1.0 / std::sqrt(double(D))));
  });
  return out;
}

}  // namespace

void register_decoder_ops(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("rms_norm_cpu", &rms_norm_cpu, "RMSNorm of x [..., H]; out given or allocated",
        py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out") = py::none());
  m.def("add_rms_norm_cpu", &add_rms_norm_cpu,
        "(x + delta, RMSNorm(x + delta)) for x, delta [..., H]; outputs given or allocated",
        py::arg("x"), py::arg("delta"), py::arg("weight"), py::arg("eps"),
        py::arg("sum_out") = py::none(), py::arg("out") = py::none());
  m.def("swiglu_cpu", &swiglu_cpu, "silu(gate) * up for [..., I]", py::arg("gate"),
        py::arg("up"), py::arg("out") = py::none());
  m.def("rope_cpu", &rope_cpu, "x rotated by cos/sin (half-split), x [B, S, H, D]",
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("out") = py::none());
  m.def("rope_to_cache_cpu", &rope_to_cache_cpu,
        "decode: returns q rotated; k rotated and v written into the caches at slot",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"), py::arg("sin"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("slot"), py::arg("q_out") = py::none());
  m.def("decode_attention_cpu", &decode_attention_cpu,
        "one-token attention of q [B, Hkv, G, D] over k, v [B, Hkv, T, D] where mask is true",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("out") = py::none());
}

}  // namespace slimstack
