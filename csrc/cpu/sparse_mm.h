// CPU sparse matmul kernels: y[M, N] = x[M, K] @ W^T for a packed W (formats version 1).
// Raw pointers in, no tensor checks here: csrc/bindings.cpp validates shapes and dtypes.
// T is float, c10::Half or c10::BFloat16; accumulation is always fp32.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace slimstack::cpu {

// sparse24: values [N, Kp/2], meta uint8 [N, Kp/8], Kp = K rounded up to 64.
template <typename T>
void sparse24_mm(const T* x, const T* values, const uint8_t* meta, T* out, int64_t M, int64_t N,
                 int64_t K);

// bitmap: values [values_numel], bitmask uint8 [N, Kp/8], row_offsets int64 [N + 1].
// Returns -1 on success, else the first row whose offsets or bit count do not fit `values`
// (out is then unspecified).
template <typename T>
int64_t bitmap_mm(const T* x, const T* values, int64_t values_numel, const uint8_t* bitmask,
                  const int64_t* row_offsets, T* out, int64_t M, int64_t N, int64_t K);

// The dense micro-kernel is compiled per instruction set and picked at load time (best
// supported). select_isa switches it (for tests and benchmarks; not thread-safe against
// running kernels) and returns false for a name that this CPU does not support.
std::vector<std::string> supported_isas();
std::string current_isa();
bool select_isa(const std::string& name);

}  // namespace slimstack::cpu
