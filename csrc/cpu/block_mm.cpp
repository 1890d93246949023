// The portable dense fp32 micro-kernel behind the generic CPU strategy, and the choice of
// strategy at run time: the extension is built without -march flags so that one wheel runs
// everywhere, and the AVX2 kernels carry their own target attributes.
#include "cpu/block_mm.h"

#include <stdexcept>
#include <string>

namespace slimstack::cpu {
namespace {

// K columns per pass. Long passes amortize the horizontal sums that end each micro-tile
// (at 256 they cost about half the FMA time); at 2048 an x micro-panel (4 x 8 KiB) still
// sits in L1 while the w panel streams from L2.
constexpr int64_t kKChunk = 2048;

template <int V>
struct Lanes {
  typedef float type __attribute__((vector_size(V * sizeof(float))));
};

// Unaligned vector load (through a reference: returning wide vectors by value from a
// function without the target ISA would trip -Wpsabi, although it is always inlined).
template <typename Vec>
__attribute__((always_inline)) inline void load(Vec& v, const float* p) {
  __builtin_memcpy(&v, p, sizeof(v));
}

// acc[i, j] (+)= x[i, 0:kc] . w[j, 0:kc] for i < MB, j < kRowQuantum; MB x 4 vector
// accumulators live in registers, each x and w vector is loaded once per step.
template <int MB, int V>
__attribute__((always_inline)) inline void micro(const float* x, int64_t ldx, const float* w,
                                                 int64_t ldw, int64_t kc, float* acc,
                                                 int64_t ldacc, bool first) {
  using vec = typename Lanes<V>::type;
  constexpr int NB = static_cast<int>(kRowQuantum);
  vec sum[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) sum[i][j] = vec{};
  for (int64_t k = 0; k < kc; k += V) {
    vec wv[NB];
    for (int j = 0; j < NB; ++j) load(wv[j], w + j * ldw + k);
    for (int i = 0; i < MB; ++i) {
      vec xv;
      load(xv, x + i * ldx + k);
      for (int j = 0; j < NB; ++j) sum[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < NB; ++j) {
      float s = 0.0f;
      for (int v = 0; v < V; ++v) s += sum[i][j][v];
      float& out = acc[i * ldacc + j];
      out = first ? s : out + s;
    }
  }
}

template <int MB, int V>
__attribute__((always_inline)) inline void block_impl(const float* x, int64_t ldx, const float* w,
                                                      int64_t rows, int64_t M, int64_t Kp,
                                                      float* acc) {
  for (int64_t k0 = 0; k0 < Kp; k0 += kKChunk) {
    const int64_t kc = std::min(kKChunk, Kp - k0);
    const bool first = k0 == 0;
    int64_t m = 0;
    for (; m + MB <= M; m += MB)
      for (int64_t j = 0; j < rows; j += kRowQuantum)
        micro<MB, V>(x + m * ldx + k0, ldx, w + j * Kp + k0, Kp, kc, acc + m * rows + j, rows,
                     first);
    for (; m < M; ++m)
      for (int64_t j = 0; j < rows; j += kRowQuantum)
        micro<1, V>(x + m * ldx + k0, ldx, w + j * Kp + k0, Kp, kc, acc + m * rows + j, rows,
                    first);
  }
}

struct Isa {
  const char* name;
  bool supported;
};

std::vector<Isa> known_isas() {
  std::vector<Isa> isas;
#ifdef SLIMSTACK_X86
  __builtin_cpu_init();
  // F16C (the fp16 loads) comes with every AVX2 CPU, and older compilers cannot name it here
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  isas.push_back({"avx512", avx2 && __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vbmi2")});
  isas.push_back({"avx2", avx2});
#endif
  isas.push_back({"generic", true});
  return isas;
}

Isa& active_isa() {
  static Isa active = [] {
    for (const Isa& isa : known_isas())
      if (isa.supported) return isa;
    return known_isas().back();
  }();
  return active;
}

}  // namespace

// SSE-width vectors: what every x86-64 (and most other) CPU has without -march flags.
void dense_block_mm(const float* x, int64_t ldx, const float* w, int64_t rows, int64_t M,
                    int64_t Kp, float* acc) {
  block_impl<2, 4>(x, ldx, w, rows, M, Kp, acc);
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Isa& isa : known_isas())
    if (isa.supported) names.emplace_back(isa.name);
  return names;
}

std::string current_isa() { return active_isa().name; }

bool avx2_active() { return avx512_active() || std::strcmp(active_isa().name, "avx2") == 0; }

bool avx512_active() { return std::strcmp(active_isa().name, "avx512") == 0; }

bool cpu_has_bf16_dot() {
#ifdef SLIMSTACK_X86
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return supported;
#else
  return false;
#endif
}

bool bf16_dot_active() { return avx512_active() && cpu_has_bf16_dot(); }

bool select_isa(const std::string& name) {
  for (const Isa& isa : known_isas()) {
    if (isa.supported && name == isa.name) {
      active_isa() = isa;
      return true;
    }
  }
  return false;
}

}  // namespace slimstack::cpu
