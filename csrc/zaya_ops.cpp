// The single list of every zaya op schema, and the Python module that exposes the GPU launchers.
//
// Implementations are registered from Python (zaya_kernels/ops/): the reference, the Triton kernels and the
// HIP/CUDA launchers below all sit behind one backend selector there, so the schemas here are the contract.
#include <torch/extension.h>
#include <torch/library.h>

#include "launchers.h"

TORCH_LIBRARY(zaya, m) {
  // ---- residual scaling + RMSNorm family (zaya_kernels/ops/residual_rmsnorm.py) ----
  // new_residual = (branch + hidden_bias) * hidden_scale + (residual + residual_bias) * residual_scale  (fp32)
  // normed = norm_weight * rmsnorm(new_residual rounded to branch.dtype)                      (branch.dtype)
  // With residual = None: the model-input form, new_residual = (branch + hidden_bias) * hidden_scale.
  m.def(
      "residual_scale_rmsnorm(Tensor branch, Tensor? residual, Tensor hidden_scale, Tensor hidden_bias, "
      "Tensor? residual_scale, Tensor? residual_bias, Tensor norm_weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "residual_scale_rmsnorm_backward(Tensor grad_normed, Tensor? grad_new_residual, Tensor branch, "
      "Tensor? residual, Tensor hidden_scale, Tensor hidden_bias, Tensor? residual_scale, Tensor? residual_bias, "
      "Tensor norm_weight, Tensor new_residual, float eps) -> (Tensor, Tensor?, Tensor, Tensor, Tensor?, Tensor?, Tensor)");
  // out = weight * rmsnorm(x rounded to out_dtype), in out_dtype (default x.dtype): the final norm.
  m.def("rmsnorm(Tensor x, Tensor weight, float eps, ScalarType? out_dtype=None) -> Tensor");
  m.def("rmsnorm_backward(Tensor grad_out, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "zaya_kernels compiled extension: op schemas (torch.ops.zaya) and GPU launchers";
#if defined(ZAYA_WITH_GPU)
#if defined(USE_ROCM)
  m.attr("gpu_build") = "rocm";
#else
  m.attr("gpu_build") = "cuda";
#endif
  zaya::bind_gpu_launchers(m);
#else
  m.attr("gpu_build") = "none";
#endif
}
