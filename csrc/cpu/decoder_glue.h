// The pybind11 entry points of the CPU decoder ops (decoder_glue.cpp), added to slimstack._C
// by bindings.cpp.
#pragma once

#include <torch/extension.h>

namespace slimstack {

void register_decoder_ops(pybind11::module_& m);

}  // namespace slimstack
