// Declarations of the GPU launchers (csrc/*.cu), bound into zaya_kernels._C by csrc/zaya_ops.cpp.
#pragma once
#include <pybind11/pybind11.h>  // declarations only: keeps the .cu files off the heavy torch/extension.h

namespace zaya {
#if defined(ZAYA_WITH_GPU)
// Adds every GPU launcher to the Python module; each .cu file contributes through its own bind_* function.
void bind_gpu_launchers(pybind11::module_& m);

// csrc/residual_rmsnorm.cu: residual_scale_rmsnorm_fwd/_bwd, rmsnorm_fwd/_bwd, residual_rmsnorm_bwd_num_partials.
void bind_residual_rmsnorm(pybind11::module_& m);
// csrc/router.cu: zaya_router_decode (one block per token, the whole router in one launch).
void bind_router(pybind11::module_& m);
// csrc/moe.cu: moe_dispatch (top-1 MoE dispatch in one block), moe_permute_rows / moe_unpermute_rows(_bwd) (the
// row gather and scatter-back around expert parallelism's all-to-all).
void bind_moe(pybind11::module_& m);
// csrc/cca.cu: cca_prepare_decode (the CCA decode step in one launch).
void bind_cca(pybind11::module_& m);
#endif
}  // namespace zaya
