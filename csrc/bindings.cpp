// slimstack._C: the pybind11 boundary. It checks tensors and calls kernels, nothing else:
// every policy decision (backend, tile config, padding) lives in Python.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "slimstack native kernels";
#ifdef SLIMSTACK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
