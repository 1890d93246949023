// The elementwise pieces of a decoder layer on CPU: RMSNorm (with the residual add before
// it), SwiGLU, rotary embedding (into the KV cache at decode) and one-token attention over
// the cache. A decode step of a 2:4 TinyLlama spent ~110 us per layer in the torch versions
// of these (about a dozen ops, each a dispatch and a pass over memory): these are one call
// each. They round where the torch references round (every op of the reference rounds to
// the model dtype), so fp32 results match them to a few ulps and bf16 to the reference's
// own rounding. T is float or c10::BFloat16; rows are contiguous in their last dimension.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace slimstack::cpu {

// out[r] = w * round(t * rsqrt(mean(t^2) + eps)), t = round(x[r] + delta[r]) (delta may be
// null: t = x[r]); with delta, t is also written to sum_out[r]. x, delta: row strides ldx,
// ldd; sum_out and out: contiguous [rows, H].
template <typename T>
void rms_norm_rows(const T* x, int64_t ldx, const T* delta, int64_t ldd, const T* weight,
                   T* sum_out, T* out, int64_t rows, int64_t H, float eps);

// out[r] = round(round(silu(gate[r])) * up[r]); out contiguous [rows, I].
template <typename T>
void swiglu_rows(const T* gate, int64_t ldg, const T* up, int64_t ldu, T* out, int64_t rows,
                 int64_t I);

// Element strides of the three leading dimensions of a 4-D tensor whose last dimension is
// contiguous ([B, S, H, D]: s0 = batch, s1 = position, s2 = head); cos/sin [B, S, D] use
// s0, s1 and s2 = 0.
struct Strides3 {
  int64_t s0, s1, s2;
};

// out[b, s, h] = x[b, s, h] * cos[b, s] + rotate_half(x[b, s, h]) * sin[b, s], rounding
// each product and the sum (HF's half-split layout); D even. out may be any strided view
// (the KV cache's slot), but must not overlap x.
template <typename T>
void rope(const T* x, Strides3 xs, const T* cos, const T* sin, Strides3 cs, T* out,
          Strides3 os, int64_t B, int64_t S, int64_t H, int64_t D);

// out[b, s, h] = x[b, s, h] for [B, S, H, D] strided views (v into the KV cache's slot).
template <typename T>
void copy_heads(const T* x, Strides3 xs, T* out, Strides3 os, int64_t B, int64_t S, int64_t H,
                int64_t D);

// One query token per row: q [B, Hkv, G, D] (the G query heads of each key/value head),
// k, v [B, Hkv, T, D], mask [B, T] (true: attend; strides mb, mt), out contiguous
// [B, Hkv, G, D] = softmax(q k^T * scale) v over the unmasked slots, which alone are read.
// A row with no unmasked slot gets zeros.
template <typename T>
void decode_attention(const T* q, Strides3 qs, const T* k, Strides3 ks, const T* v, Strides3 vs,
                      const bool* mask, int64_t mb, int64_t mt, T* out, int64_t B, int64_t Hkv,
                      int64_t G, int64_t T_len, int64_t D, float scale);

}  // namespace slimstack::cpu
