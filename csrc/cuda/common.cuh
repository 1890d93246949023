// Shared helpers for the slimstack CUDA kernels: error macros, dtype mapping, and the few
// PTX wrappers (streaming loads, cp.async, ldmatrix, mma.sp) that more than one kernel uses.
// Device-only code; include from .cu files (never from the torch glue).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/launchers.h"

// Return the error of a CUDA runtime call from the enclosing function (which returns
// cudaError_t) instead of carrying on with a broken state.
#define SLIMSTACK_CUDA_TRY(expr)             \
  do {                                       \
    const cudaError_t slimstack_err_ = (expr); \
    if (slimstack_err_ != cudaSuccess) {     \
      return slimstack_err_;                 \
    }                                        \
  } while (0)

// Reject a launcher argument: the caller (glue) turns this into a readable TORCH_CHECK
// before calling, so reaching it means a bug in the caller; never launch on bad input.
#define SLIMSTACK_REQUIRE(cond)          \
  do {                                   \
    if (!(cond)) {                       \
      return cudaErrorInvalidValue;      \
    }                                    \
  } while (0)

// mma.sp / ldmatrix / cp.async need sm_80. Every target we build (sm_80, sm_90a) has them; the
// guard only keeps an accidental older -arch from compiling silently wrong code.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 800)
#define SLIMSTACK_NEEDS_SM80 1
#endif

namespace slimstack {
namespace cuda {
namespace detail {

inline bool is_aligned(const void* p, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

constexpr int kMaxDevices = 64;  // devices with cached facts; others are probed every call

// A yes/no fact about `device`, probed once and remembered in the caller's static `cache`
// (0 unknown, 1 yes, 2 no). A probe may be synchronous: keep the first call out of capture.
template <typename Probe>
bool cached_device_flag(int device, signed char (&cache)[kMaxDevices], Probe&& probe) {
  if (device < 0 || device >= kMaxDevices) return probe();
  if (cache[device] == 0) cache[device] = probe() ? 1 : 2;
  return cache[device] == 1;
}

// A positive device attribute of `device`, cached per attribute and device
// (cudaDeviceGetAttribute is cheap, but not free on the decode path).
template <cudaDeviceAttr kAttr>
cudaError_t cached_device_attribute(int device, int* out) {
  static int cache[kMaxDevices] = {0};
  if (device >= 0 && device < kMaxDevices && cache[device] > 0) {
    *out = cache[device];
    return cudaSuccess;
  }
  int value = 0;
  SLIMSTACK_CUDA_TRY(cudaDeviceGetAttribute(&value, kAttr, device));
  if (device >= 0 && device < kMaxDevices) cache[device] = value;
  *out = value;
  return cudaSuccess;
}

// Number of SMs of `device`.
inline cudaError_t sm_count(int device, int* out) {
  return cached_device_attribute<cudaDevAttrMultiProcessorCount>(device, out);
}

// ---- element types ------------------------------------------------------------------------

template <typename T>
struct ElemTraits;

template <>
struct ElemTraits<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ __half zero() { return __ushort_as_half(0); }
  static __device__ __forceinline__ __half from_bits(uint16_t b) { return __ushort_as_half(b); }
};

template <>
struct ElemTraits<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ __nv_bfloat16 zero() { return __ushort_as_bfloat16(0); }
  static __device__ __forceinline__ __nv_bfloat16 from_bits(uint16_t b) {
    return __ushort_as_bfloat16(b);
  }
};

// ---- loads ----------------------------------------------------------------------------------

// Weights are streamed exactly once: read-only path, no L1 allocation, so they do not evict the
// activations that every warp re-reads.
__device__ __forceinline__ uint4 ld_stream_v4(const void* ptr) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(ptr));
  return r;
}

// The same loads through the coherent path (no .nc). ptxas treats .nc data as constant for the
// whole kernel and may hoist .nc loads above a griddepcontrol.wait (seen in the sm_90a SASS of
// the GEMV); a kernel launched as a programmatic dependent must read anything a previous
// kernel may have written, its weights included, with these.
__device__ __forceinline__ uint4 ld_coherent_v4(const void* ptr) {
  uint4 r;
  asm volatile("ld.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(ptr)
               : "memory");
  return r;
}

__device__ __forceinline__ uint2 ld_coherent_v2(const void* ptr) {
  uint2 r;
  asm volatile("ld.global.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n"
               : "=r"(r.x), "=r"(r.y)
               : "l"(ptr)
               : "memory");
  return r;
}

// Ask L2 to fetch the line holding ptr; nothing comes back to the thread and nothing lands in
// L1, so it is safe even while another kernel may still be writing that line (L2 is where
// global memory is coherent).
__device__ __forceinline__ void prefetch_l2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(ptr));
}

__device__ __forceinline__ uint2 ld_stream_v2(const void* ptr) {
  uint2 r;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n"
               : "=r"(r.x), "=r"(r.y)
               : "l"(ptr));
  return r;
}

// Programmatic dependent launch (sm_90): wait until the kernel before this one in the stream
// has finished and its writes are visible. Returns at once for a kernel launched without the
// programmatic-serialization attribute; compiled out before sm_90, where no launch sets it
// (a launcher must only set it for a kernel whose sm_90 image runs).
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async global->shared copy; src_bytes < 16 zero-fills the rest (0 = pure zero fill).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

// 8-byte async copy (cp.async.cg only supports 16 bytes; .ca allows 4/8/16).
__device__ __forceinline__ void cp_async_8(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// ---- sparse tensor core MMA ----------------------------------------------------------------
//
// mma.sp m16n8k32, A 2:4 sparse (16 x 32 logical, 16 x 16 stored), B 32 x 8, fp32 accumulate.
// Fragments (PTX ISA "sparse mma m16n8k32 .f16/.bf16"; g = lane / 4, t = lane % 4):
//   a[0] = A(g,   2t..2t+1)   a[1] = A(g+8, 2t..2t+1)   (stored columns)
//   a[2] = A(g,   2t+8..+9)   a[3] = A(g+8, 2t+8..+9)
//   b[i] = B(2t + 8i .. 2t + 8i + 1, g)                     (logical k rows, column g)
//   c[0..1] = C(g, 2t..2t+1)  c[2..3] = C(g+8, 2t..2t+1)
//   e: with selector s, lanes 4g + 2s + p (p = 0, 1) supply the metadata: bits 0..15 hold the
//      nibbles of row g for groups 4p..4p+3 (group j at bits 4j), bits 16..31 those of row g+8.
//      A nibble is i0 | (i1 << 2), i0 < i1: exactly the sparse24 meta nibble.
// ::ordered_metadata is what PTX 8.5+ asks for on sm_80+ (our nibbles are always ordered).
template <typename T, int kSelector>
__device__ __forceinline__ void mma_sp_16832(float (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[4], uint32_t e);

template <>
__device__ __forceinline__ void mma_sp_16832<__half, 0>(float (&c)[4], const uint32_t (&a)[4],
                                                        const uint32_t (&b)[4], uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
        "r"(e));
}

template <>
__device__ __forceinline__ void mma_sp_16832<__half, 1>(float (&c)[4], const uint32_t (&a)[4],
                                                        const uint32_t (&b)[4], uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x1;\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
        "r"(e));
}

template <>
__device__ __forceinline__ void mma_sp_16832<__nv_bfloat16, 0>(float (&c)[4],
                                                               const uint32_t (&a)[4],
                                                               const uint32_t (&b)[4],
                                                               uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
        "r"(e));
}

template <>
__device__ __forceinline__ void mma_sp_16832<__nv_bfloat16, 1>(float (&c)[4],
                                                               const uint32_t (&a)[4],
                                                               const uint32_t (&b)[4],
                                                               uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x1;\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
        "r"(e));
}

// Metadata for rows that do not exist (beyond N): nibble 0x4 = indices {0, 1}, a valid pattern
// (0x0 is "undefined behaviour" for mma.sp), paired with zero values.
constexpr uint32_t kPadMeta32 = 0x44444444u;

}  // namespace detail
}  // namespace cuda
}  // namespace slimstack
