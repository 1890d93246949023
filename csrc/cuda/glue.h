// Torch-facing entry points of the CUDA kernels (csrc/cuda/glue.cpp). Built only with a CUDA
// build of torch: csrc/bindings.cpp calls register_cuda(m) under #ifdef SLIMSTACK_WITH_CUDA.
#pragma once

#ifdef SLIMSTACK_WITH_CUDA
#include <torch/extension.h>

namespace slimstack {

// Adds the *_cuda functions to the slimstack._C module.
void register_cuda(pybind11::module_& m);

}  // namespace slimstack
#endif
