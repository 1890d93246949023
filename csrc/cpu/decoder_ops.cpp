// The decoder layer's elementwise pieces on CPU (decoder_ops.h). Each kernel is written once
// over GCC vectors of V fp32 lanes and compiled three times: 16 lanes for AVX-512, 8 for
// AVX2, 4 portable; the extension has no -march flags (block_mm.cpp), so the per-chunk
// functions carry target attributes and the threading stays outside them. The build is ISO
// C++ (no FP contraction): the products and sums round exactly as written, whatever the ISA.
#include "cpu/decoder_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/block_mm.h"

// Wide vectors pass through always-inline helpers; that never reaches an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace slimstack::cpu {
namespace {

#define SLIMSTACK_INLINE __attribute__((always_inline)) inline

template <int V>
struct Vec {
  typedef float f __attribute__((vector_size(V * sizeof(float))));
  typedef int32_t i __attribute__((vector_size(V * sizeof(int32_t))));
  typedef uint32_t u __attribute__((vector_size(V * sizeof(uint32_t))));
  typedef uint16_t h __attribute__((vector_size(V * sizeof(uint16_t))));
};

template <int V>
SLIMSTACK_INLINE void load(typename Vec<V>::f& v, const float* p) {
  std::memcpy(&v, p, sizeof(v));
}

template <int V>
SLIMSTACK_INLINE void load(typename Vec<V>::f& v, const c10::BFloat16* p) {
  typename Vec<V>::h bits;
  std::memcpy(&bits, p, sizeof(bits));
  const typename Vec<V>::u wide = __builtin_convertvector(bits, typename Vec<V>::u) << 16;
  std::memcpy(&v, &wide, sizeof(v));  // bf16 is fp32's top half
}

// Round each lane to T, kept as fp32 (round to nearest even; NaN stays a quiet NaN).
template <int V, typename T>
SLIMSTACK_INLINE typename Vec<V>::f quantize(typename Vec<V>::f v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    using U = typename Vec<V>::u;
    U u;
    std::memcpy(&u, &v, sizeof(u));
    U rounded = ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16) << 16;
    const U nan = (U)(v != v);  // all ones in NaN lanes
    rounded = (rounded & ~nan) | (0x7FC00000u & nan);
    typename Vec<V>::f out;
    std::memcpy(&out, &rounded, sizeof(out));
    return out;
  }
}

template <int V>
SLIMSTACK_INLINE void store(float* p, typename Vec<V>::f v) {
  std::memcpy(p, &v, sizeof(v));
}

template <int V>
SLIMSTACK_INLINE void store(c10::BFloat16* p, typename Vec<V>::f v) {
  using U = typename Vec<V>::u;
  const typename Vec<V>::f q = quantize<V, c10::BFloat16>(v);
  U u;
  std::memcpy(&u, &q, sizeof(u));
  const typename Vec<V>::h bits = __builtin_convertvector(u >> 16, typename Vec<V>::h);
  std::memcpy(p, &bits, sizeof(bits));
}

// n <= V lanes from p (the rest zero) / to p: the tails of rows that are not a multiple of V.
template <int V, typename T>
SLIMSTACK_INLINE void load_n(typename Vec<V>::f& v, const T* p, int64_t n) {
  if (n == V) return load<V>(v, p);
  T tmp[V];
  std::memset(static_cast<void*>(tmp), 0, sizeof(tmp));
  for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
  load<V>(v, tmp);
}

template <int V, typename T>
SLIMSTACK_INLINE void store_n(T* p, typename Vec<V>::f v, int64_t n) {
  if (n == V) return store<V>(p, v);
  T tmp[V];
  store<V>(tmp, v);
  for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
}

// Sum of the lanes, halving the vector each step (a serial sum is a V-long add chain).
template <int V>
SLIMSTACK_INLINE float hsum(typename Vec<V>::f v) {
  if constexpr (V == 1) {
    return v[0];
  } else {
    using Half = typename Vec<V / 2>::f;
    Half lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return hsum<V / 2>(lo + hi);
  }
}

// e^x to ~2 ulp: Cephes' expf (range reduction by ln 2 in two parts, a degree-5 polynomial,
// 2^n in the exponent field). Inputs are clamped to where 2^n is a normal float.
template <int V>
SLIMSTACK_INLINE typename Vec<V>::f exp_approx(typename Vec<V>::f x) {
  using F = typename Vec<V>::f;
  const F lo = F{} - 87.33654f, hi = F{} + 88.37626f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  F n = x * 1.44269504088896341f;
  n = (n + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 pushes out the fraction
  const F r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const typename Vec<V>::i e = (__builtin_convertvector(n, typename Vec<V>::i) + 127) << 23;
  F scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// ------------------------------------------------------------------------------ kernels
template <typename T>
struct NormArgs {
  const T* x;
  int64_t ldx;
  const T* delta;
  int64_t ldd;
  const T* weight;
  T* sum_out;
  T* out;
  int64_t H;
  float eps;
};

template <int V, typename T>
SLIMSTACK_INLINE void rms_norm_impl(const NormArgs<T>& a, int64_t begin, int64_t end) {
  using F = typename Vec<V>::f;
  for (int64_t row = begin; row < end; ++row) {
    const T* x = a.x + row * a.ldx;
    T* sum = a.sum_out + row * a.H;
    F acc = F{};
    for (int64_t j = 0; j < a.H; j += V) {
      const int64_t n = std::min<int64_t>(V, a.H - j);
      F t;
      load_n<V>(t, x + j, n);
      if (a.delta != nullptr) {
        F d;
        load_n<V>(d, a.delta + row * a.ldd + j, n);
        t = quantize<V, T>(t + d);
        store_n<V>(sum + j, t, n);
      }
      acc += t * t;
    }
    // the reference: statistics in fp32, mean = sum / H, then 1 / sqrt
    const float inv = 1.0f / std::sqrt(hsum<V>(acc) / static_cast<float>(a.H) + a.eps);
    const T* src = a.delta != nullptr ? sum : x;
    T* out = a.out + row * a.H;
    for (int64_t j = 0; j < a.H; j += V) {
      const int64_t n = std::min<int64_t>(V, a.H - j);
      F t, w;
      load_n<V>(t, src + j, n);
      load_n<V>(w, a.weight + j, n);
      store_n<V>(out + j, w * quantize<V, T>(t * inv), n);
    }
  }
}

template <typename T>
struct SwigluArgs {
  const T* gate;
  int64_t ldg;
  const T* up;
  int64_t ldu;
  T* out;
  int64_t I;
};

template <int V, typename T>
SLIMSTACK_INLINE void swiglu_impl(const SwigluArgs<T>& a, int64_t begin, int64_t end) {
  using F = typename Vec<V>::f;
  for (int64_t row = begin; row < end; ++row) {
    for (int64_t j = 0; j < a.I; j += V) {
      const int64_t n = std::min<int64_t>(V, a.I - j);
      F g, u;
      load_n<V>(g, a.gate + row * a.ldg + j, n);
      load_n<V>(u, a.up + row * a.ldu + j, n);
      const F silu = quantize<V, T>(g / (1.0f + exp_approx<V>(F{} - g)));
      store_n<V>(a.out + row * a.I + j, silu * u, n);
    }
  }
}

template <typename T>
struct RopeArgs {
  const T* x;
  Strides3 xs;
  const T* cos;
  const T* sin;
  Strides3 cs;
  T* out;
  Strides3 os;
  int64_t S, H, D;
};

// rows are (b, s, h) flattened
template <int V, typename T>
SLIMSTACK_INLINE void rope_impl(const RopeArgs<T>& a, int64_t begin, int64_t end) {
  using F = typename Vec<V>::f;
  const int64_t half = a.D / 2;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t h = row % a.H, s = (row / a.H) % a.S, b = row / (a.H * a.S);
    const T* x = a.x + b * a.xs.s0 + s * a.xs.s1 + h * a.xs.s2;
    const T* cos = a.cos + b * a.cs.s0 + s * a.cs.s1;
    const T* sin = a.sin + b * a.cs.s0 + s * a.cs.s1;
    T* out = a.out + b * a.os.s0 + s * a.os.s1 + h * a.os.s2;
    for (int64_t i = 0; i < half; i += V) {
      const int64_t n = std::min<int64_t>(V, half - i);
      F x1, x2, c1, c2, s1, s2;
      load_n<V>(x1, x + i, n);
      load_n<V>(x2, x + half + i, n);
      load_n<V>(c1, cos + i, n);
      load_n<V>(c2, cos + half + i, n);
      load_n<V>(s1, sin + i, n);
      load_n<V>(s2, sin + half + i, n);
      // rotate_half(x) = [-x2, x1]; each product rounds, then their sum
      store_n<V>(out + i, quantize<V, T>(x1 * c1) + quantize<V, T>((F{} - x2) * s1), n);
      store_n<V>(out + half + i, quantize<V, T>(x2 * c2) + quantize<V, T>(x1 * s2), n);
    }
  }
}

template <typename T>
struct AttentionArgs {
  const T* q;
  Strides3 qs;
  const T* k;
  Strides3 ks;
  const T* v;
  Strides3 vs;
  const bool* mask;
  int64_t mb, mt;
  T* out;
  int64_t Hkv, G, T_len, D;
  float scale;
};

constexpr int kGroup = 8;  // query heads whose value sums share one pass over the value rows

// items are (b, kv head) flattened; each reads its unmasked key/value rows once for all G
// query heads: scores, then a softmax per head, then the weighted sum of value rows.
template <int V, typename T>
SLIMSTACK_INLINE void attention_impl(const AttentionArgs<T>& a, int64_t begin, int64_t end) {
  using F = typename Vec<V>::f;
  const int64_t G = a.G, D = a.D, Dp = (D + V - 1) / V * V, chunks = Dp / V;
  std::vector<int64_t> slots(a.T_len);
  std::vector<float> scores, qf(G * Dp), row(Dp), inv_total(G);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / a.Hkv, h = item % a.Hkv;
    int64_t visible = 0;
    for (int64_t t = 0; t < a.T_len; ++t)
      if (a.mask[b * a.mb + t * a.mt]) slots[visible++] = t;
    T* out = a.out + item * G * D;
    if (visible == 0) {
      std::fill(out, out + G * D, T(0.0f));
      continue;
    }
    scores.resize(G * visible);
    for (int64_t g = 0; g < G; ++g) {
      const T* q = a.q + b * a.qs.s0 + h * a.qs.s1 + g * a.qs.s2;
      for (int64_t c = 0; c < chunks; ++c) {
        F x;
        load_n<V>(x, q + c * V, std::min<int64_t>(V, D - c * V));
        std::memcpy(&qf[g * Dp + c * V], &x, sizeof(x));
      }
    }
    const T* k_head = a.k + b * a.ks.s0 + h * a.ks.s1;
    for (int64_t j = 0; j < visible; ++j) {
      const T* k = k_head + slots[j] * a.ks.s2;
      for (int64_t c = 0; c < chunks; ++c) {
        F x;
        load_n<V>(x, k + c * V, std::min<int64_t>(V, D - c * V));
        std::memcpy(&row[c * V], &x, sizeof(x));
      }
      for (int64_t g = 0; g < G; ++g) {
        F dot = F{};
        for (int64_t c = 0; c < chunks; ++c) {
          F qv, kv;
          load<V>(qv, &qf[g * Dp + c * V]);
          load<V>(kv, &row[c * V]);
          dot += qv * kv;
        }
        scores[g * visible + j] = hsum<V>(dot) * a.scale;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float* s = &scores[g * visible];
      const float top = *std::max_element(s, s + visible);
      F sum = F{};
      for (int64_t j = 0; j < visible; j += V) {
        const int64_t n = std::min<int64_t>(V, visible - j);
        F x;
        load_n<V>(x, s + j, n);
        F p = exp_approx<V>(x - top);
        if (n < V)
          for (int64_t lane = n; lane < V; ++lane) p[lane] = 0.0f;
        store_n<V>(s + j, p, n);
        sum += p;
      }
      inv_total[g] = 1.0f / hsum<V>(sum);
    }
    // out[g, chunk c] = sum_j p[g, j] v[j, c] / sum_j p[g, j]: one pass over the value rows
    // per chunk of D (and per kGroup query heads), the accumulators in registers
    const T* v_head = a.v + b * a.vs.s0 + h * a.vs.s1;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n = std::min<int64_t>(V, D - c * V);
      for (int64_t g0 = 0; g0 < G; g0 += kGroup) {
        const int64_t gn = std::min<int64_t>(kGroup, G - g0);
        F sums[kGroup];
        for (int g = 0; g < kGroup; ++g) sums[g] = F{};
        for (int64_t j = 0; j < visible; ++j) {
          F x;
          load_n<V>(x, v_head + slots[j] * a.vs.s2 + c * V, n);
          for (int g = 0; g < kGroup; ++g)
            if (g < gn) sums[g] += scores[(g0 + g) * visible + j] * x;
        }
        for (int64_t g = 0; g < gn; ++g)
          store_n<V>(out + (g0 + g) * D + c * V, sums[g] * inv_total[g0 + g], n);
      }
    }
  }
}

// ------------------------------------------------------------------- ISA variants, threads
template <typename Args>
using ChunkFn = void (*)(const Args&, int64_t, int64_t);

#ifdef SLIMSTACK_X86
#define SLIMSTACK_DECODER_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define SLIMSTACK_DECODER_AVX2 __attribute__((target("avx2,fma")))
#endif

// NAME_chunk<T>(args, begin, end) for 16, 8 and 4 lanes, and the pick for this CPU
#define SLIMSTACK_VARIANTS(NAME, ARGS)                                          \
  template <typename T>                                                         \
  void NAME##_base(const ARGS<T>& a, int64_t begin, int64_t end) {             \
    NAME##_impl<4, T>(a, begin, end);                                           \
  }                                                                             \
  SLIMSTACK_X86_VARIANTS(NAME, ARGS)                                            \
  template <typename T>                                                         \
  ChunkFn<ARGS<T>> NAME##_chunk() {                                             \
    SLIMSTACK_X86_PICK(NAME)                                                    \
    return &NAME##_base<T>;                                                     \
  }

#ifdef SLIMSTACK_X86
#define SLIMSTACK_X86_VARIANTS(NAME, ARGS)                                       \
  template <typename T>                                                          \
  SLIMSTACK_DECODER_AVX512 void NAME##_avx512(const ARGS<T>& a, int64_t begin,   \
                                              int64_t end) {                     \
    NAME##_impl<16, T>(a, begin, end);                                           \
  }                                                                              \
  template <typename T>                                                          \
  SLIMSTACK_DECODER_AVX2 void NAME##_avx2(const ARGS<T>& a, int64_t begin, int64_t end) { \
    NAME##_impl<8, T>(a, begin, end);                                            \
  }
#define SLIMSTACK_X86_PICK(NAME)                    \
  if (avx512_active()) return &NAME##_avx512<T>;    \
  if (avx2_active()) return &NAME##_avx2<T>;
#else
#define SLIMSTACK_X86_VARIANTS(NAME, ARGS)
#define SLIMSTACK_X86_PICK(NAME)
#endif

SLIMSTACK_VARIANTS(rms_norm, NormArgs)
SLIMSTACK_VARIANTS(swiglu, SwigluArgs)
SLIMSTACK_VARIANTS(rope, RopeArgs)
SLIMSTACK_VARIANTS(attention, AttentionArgs)

// Work below ~64K elements runs on the calling thread: waking the pool costs more than a
// decode step's norm or rotary (a few microseconds).
constexpr int64_t kInlineWork = 1 << 16;

template <typename Args>
void run(ChunkFn<Args> fn, const Args& args, int64_t items, int64_t work_per_item) {
  if (items <= 0) return;
  if (items * work_per_item <= kInlineWork || items == 1) return fn(args, 0, items);
  const int64_t grain = std::max<int64_t>(1, kInlineWork / std::max<int64_t>(work_per_item, 1));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
}

}  // namespace

template <typename T>
void rms_norm_rows(const T* x, int64_t ldx, const T* delta, int64_t ldd, const T* weight,
                   T* sum_out, T* out, int64_t rows, int64_t H, float eps) {
  const NormArgs<T> args{x, ldx, delta, ldd, weight, sum_out, out, H, eps};
  run(rms_norm_chunk<T>(), args, rows, H);
}

template <typename T>
void swiglu_rows(const T* gate, int64_t ldg, const T* up, int64_t ldu, T* out, int64_t rows,
                 int64_t I) {
  const SwigluArgs<T> args{gate, ldg, up, ldu, out, I};
  run(swiglu_chunk<T>(), args, rows, I);
}

template <typename T>
void rope(const T* x, Strides3 xs, const T* cos, const T* sin, Strides3 cs, T* out, Strides3 os,
          int64_t B, int64_t S, int64_t H, int64_t D) {
  const RopeArgs<T> args{x, xs, cos, sin, cs, out, os, S, H, D};
  run(rope_chunk<T>(), args, B * S * H, D);
}

template <typename T>
void copy_heads(const T* x, Strides3 xs, T* out, Strides3 os, int64_t B, int64_t S, int64_t H,
                int64_t D) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(out + b * os.s0 + s * os.s1 + h * os.s2, x + b * xs.s0 + s * xs.s1 + h * xs.s2,
                    D * sizeof(T));
}

template <typename T>
void decode_attention(const T* q, Strides3 qs, const T* k, Strides3 ks, const T* v, Strides3 vs,
                      const bool* mask, int64_t mb, int64_t mt, T* out, int64_t B, int64_t Hkv,
                      int64_t G, int64_t T_len, int64_t D, float scale) {
  const AttentionArgs<T> args{q, qs, k, ks, v, vs, mask, mb, mt, out, Hkv, G, T_len, D, scale};
  run(attention_chunk<T>(), args, B * Hkv, 2 * G * T_len * D);
}

#define SLIMSTACK_INSTANTIATE(T)                                                              \
  template void rms_norm_rows<T>(const T*, int64_t, const T*, int64_t, const T*, T*, T*,      \
                                 int64_t, int64_t, float);                                   \
  template void swiglu_rows<T>(const T*, int64_t, const T*, int64_t, T*, int64_t, int64_t);  \
  template void rope<T>(const T*, Strides3, const T*, const T*, Strides3, T*, Strides3,      \
                        int64_t, int64_t, int64_t, int64_t);                                 \
  template void copy_heads<T>(const T*, Strides3, T*, Strides3, int64_t, int64_t, int64_t,   \
                              int64_t);                                                      \
  template void decode_attention<T>(const T*, Strides3, const T*, Strides3, const T*,         \
                                    Strides3, const bool*, int64_t, int64_t, T*, int64_t,     \
                                    int64_t, int64_t, int64_t, int64_t, float);

SLIMSTACK_INSTANTIATE(float)
SLIMSTACK_INSTANTIATE(c10::BFloat16)

}  // namespace slimstack::cpu
