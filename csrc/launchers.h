// Declarations of the GPU launchers (csrc/*.cu), bound into zaya_kernels._C by csrc/zaya_ops.cpp.
#pragma once
#include <torch/extension.h>

namespace zaya {
#if defined(ZAYA_WITH_GPU)
// Adds every GPU launcher to the Python module; each .cu file contributes through its own bind_* function.
void bind_gpu_launchers(pybind11::module_& m);
#endif
}  // namespace zaya
