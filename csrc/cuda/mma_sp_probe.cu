// mma_sp_probe: one warp, one mma.sp m16n8k32 (sparsity selector 0 or 1) on fragments given
// lane by lane.
//
// The sparse kernels (sparse24_gemv.cu, sparse24_gemm_sm80.cu) rest on the fragment and
// metadata layout written down in common.cuh. This probe checks that layout alone on the
// hardware: the test builds each lane's A / B / metadata registers from a logical 16x32 2:4
// matrix and a 32x8 matrix following common.cuh, runs the instruction, and compares the lanes'
// C registers with the product. If the kernels fail while the probe passes, the bug is in
// their indexing; if the probe fails, the documented layout is wrong.
#include "cuda/common.cuh"

namespace slimstack {
namespace cuda {
namespace {

template <typename T, int kSelector>
__global__ void __launch_bounds__(32) mma_sp_probe_kernel(const uint32_t* __restrict__ a,
                                                          const uint32_t* __restrict__ b,
                                                          const uint32_t* __restrict__ e,
                                                          float* __restrict__ c) {
#ifdef SLIMSTACK_NEEDS_SM80
  __trap();
#else
  const int lane = threadIdx.x;
  uint32_t a_frag[4], b_frag[4];
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    a_frag[i] = a[lane * 4 + i];
    b_frag[i] = b[lane * 4 + i];
  }
  detail::mma_sp_16832<T, kSelector>(acc, a_frag, b_frag, e[lane]);
#pragma unroll
  for (int i = 0; i < 4; ++i) c[lane * 4 + i] = acc[i];
#endif
}

}  // namespace

cudaError_t mma_sp_probe(const uint32_t* a, const uint32_t* b, const uint32_t* e, float* c,
                         int selector, DType dtype, cudaStream_t stream) {
  SLIMSTACK_REQUIRE(a != nullptr && b != nullptr && e != nullptr && c != nullptr);
  SLIMSTACK_REQUIRE(selector == 0 || selector == 1);
  const bool half = dtype == DType::kFloat16;
  if (selector == 0 && half) {
    mma_sp_probe_kernel<__half, 0><<<1, 32, 0, stream>>>(a, b, e, c);
  } else if (selector == 0) {
    mma_sp_probe_kernel<__nv_bfloat16, 0><<<1, 32, 0, stream>>>(a, b, e, c);
  } else if (half) {
    mma_sp_probe_kernel<__half, 1><<<1, 32, 0, stream>>>(a, b, e, c);
  } else {
    mma_sp_probe_kernel<__nv_bfloat16, 1><<<1, 32, 0, stream>>>(a, b, e, c);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace slimstack
