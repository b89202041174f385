// Launchers for kernels/residual_rmsnorm.cuh: residual scaling + RMSNorm and the plain RMSNorm, forward and backward.
//
// Every output is preallocated by the caller (zaya_kernels/ops/residual_rmsnorm.py) and contiguous; the launchers
// check devices, dtypes, shapes and contiguity, then launch on the current stream. Rows N = numel / H, H = last dim;
// N = 0 launches nothing. The [H] parameters (hidden_scale, hidden_bias, residual_scale, residual_bias,
// norm_weight / weight) must be fp32 (the caller converts them), as must residual, new_residual and their grads.
// The backward launchers write per-row-group parameter partials (deterministic: no atomics): the caller allocates
// them zero-filled with P = residual_rmsnorm_bwd_num_partials(N, H) rows (any P >= 1 works) and sums over dim 0.
// This file is hipified by torch on ROCm builds: keep to APIs hipify maps.
// Deliberately not <torch/extension.h> (the whole C++ frontend: slow under nvcc): ATen + torch's pybind casters.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/utils/pybind.h>

#include <limits>

#include "launchers.h"
#include "residual_rmsnorm.cuh"

namespace zaya {
namespace {

namespace zk = ::zaya::kernels;

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the kernel storage type of a float32 / float16 / bfloat16 tensor.
template <typename F>
void dispatch_float_type(at::ScalarType st, const char* name, F&& f) {
  switch (st) {
    case at::kFloat:
      f(Tag<float>{});
      break;
    case at::kHalf:
      f(Tag<zk::half_t>{});
      break;
    case at::kBFloat16:
      f(Tag<zk::bf16_t>{});
      break;
    default:
      TORCH_CHECK(false, name, ": expected dtype float32, float16 or bfloat16, got ", st);
  }
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a GPU tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " (the device of ", ref_name,
              "), got one on ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                at::ScalarType dtype) {
  check_device(t, name, ref, ref_name);
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (the shape of ", ref_name,
              "), got ", t.sizes());
}

void check_param(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name, int64_t H) {
  check_device(t, name, ref, ref_name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected dtype float32 (convert [H] parameters before the call), got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == H, name, ": expected shape [", H, "], got ", t.sizes());
}

void check_partials(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name, int64_t q,
                    int64_t H) {
  check_device(t, name, ref, ref_name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected dtype float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(0) >= 1 && t.size(1) == q && t.size(2) == H, name, ": expected shape [P >= 1, ", q,
              ", ", H, "], got ", t.sizes());
}

// H (last dim, >= 1) and N (rows) of a [..., H] activation.
std::pair<int64_t, int64_t> rows_and_width(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 1, name, ": expected at least 1 dimension, got a scalar");
  const int64_t H = t.size(-1);
  TORCH_CHECK(H >= 1, name, ": expected a last dimension >= 1, got shape ", t.sizes());
  const int64_t N = t.numel() / H;
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), name, ": too many rows (", N, ")");
  return {N, H};
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mut_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}
template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int64_t residual_rmsnorm_bwd_num_partials(int64_t N, int64_t H) {
  TORCH_CHECK(N >= 0 && H >= 1, "residual_rmsnorm_bwd_num_partials: expected N >= 0 and H >= 1, got N=", N, ", H=", H);
  return zk::rms_bwd_num_partials(N, H);
}

void residual_scale_rmsnorm_fwd(const at::Tensor& branch, const c10::optional<at::Tensor>& residual,
                                const at::Tensor& hidden_scale, const at::Tensor& hidden_bias,
                                const c10::optional<at::Tensor>& residual_scale,
                                const c10::optional<at::Tensor>& residual_bias, const at::Tensor& norm_weight,
                                double eps, const at::Tensor& new_residual_out, const at::Tensor& normed_out) {
  const auto nh = rows_and_width(branch, "branch");
  const int64_t N = nh.first, H = nh.second;
  check_device(branch, "branch", branch, "branch");
  if (residual.has_value()) check_like(*residual, "residual", branch, "branch", at::kFloat);
  check_param(hidden_scale, "hidden_scale", branch, "branch", H);
  check_param(hidden_bias, "hidden_bias", branch, "branch", H);
  if (residual_scale.has_value()) check_param(*residual_scale, "residual_scale", branch, "branch", H);
  if (residual_bias.has_value()) check_param(*residual_bias, "residual_bias", branch, "branch", H);
  check_param(norm_weight, "norm_weight", branch, "branch", H);
  check_like(new_residual_out, "new_residual_out", branch, "branch", at::kFloat);
  check_like(normed_out, "normed_out", branch, "branch", branch.scalar_type());
  dispatch_float_type(branch.scalar_type(), "branch", [&](auto tag) {
    using A = typename decltype(tag)::type;
    if (N == 0) return;
    const c10::cuda::CUDAGuard guard(branch.device());
    const auto stream = at::cuda::getCurrentCUDAStream();
    zk::residual_scale_rmsnorm_fwd_kernel<A><<<static_cast<unsigned>(N), zk::rms_block_size(H), 0, stream>>>(
        ptr<A>(branch), opt_ptr<float>(residual), ptr<float>(hidden_scale), ptr<float>(hidden_bias),
        opt_ptr<float>(residual_scale), opt_ptr<float>(residual_bias), ptr<float>(norm_weight),
        static_cast<float>(eps), H, mut_ptr<float>(new_residual_out), mut_ptr<A>(normed_out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void residual_scale_rmsnorm_bwd(const at::Tensor& grad_normed, const c10::optional<at::Tensor>& grad_new_residual,
                                const at::Tensor& branch, const c10::optional<at::Tensor>& residual,
                                const at::Tensor& hidden_scale, const at::Tensor& hidden_bias,
                                const c10::optional<at::Tensor>& residual_scale,
                                const c10::optional<at::Tensor>& residual_bias, const at::Tensor& norm_weight,
                                const at::Tensor& new_residual, double eps, const at::Tensor& grad_branch_out,
                                const c10::optional<at::Tensor>& grad_residual_out,
                                const at::Tensor& param_partials_out) {
  const auto nh = rows_and_width(branch, "branch");
  const int64_t N = nh.first, H = nh.second;
  check_device(branch, "branch", branch, "branch");
  check_like(grad_normed, "grad_normed", branch, "branch", branch.scalar_type());
  if (grad_new_residual.has_value()) check_like(*grad_new_residual, "grad_new_residual", branch, "branch", at::kFloat);
  if (residual.has_value()) check_like(*residual, "residual", branch, "branch", at::kFloat);
  check_param(hidden_scale, "hidden_scale", branch, "branch", H);
  check_param(hidden_bias, "hidden_bias", branch, "branch", H);
  if (residual_scale.has_value()) check_param(*residual_scale, "residual_scale", branch, "branch", H);
  if (residual_bias.has_value()) check_param(*residual_bias, "residual_bias", branch, "branch", H);
  check_param(norm_weight, "norm_weight", branch, "branch", H);
  check_like(new_residual, "new_residual", branch, "branch", at::kFloat);
  check_like(grad_branch_out, "grad_branch_out", branch, "branch", branch.scalar_type());
  if (grad_residual_out.has_value()) check_like(*grad_residual_out, "grad_residual_out", branch, "branch", at::kFloat);
  check_partials(param_partials_out, "param_partials_out", branch, "branch", 4, H);
  const int64_t P = param_partials_out.size(0);
  TORCH_CHECK(P <= std::numeric_limits<int32_t>::max(), "param_partials_out: too many row groups (", P, ")");
  dispatch_float_type(branch.scalar_type(), "branch", [&](auto tag) {
    using A = typename decltype(tag)::type;
    if (N == 0) return;
    const c10::cuda::CUDAGuard guard(branch.device());
    const auto stream = at::cuda::getCurrentCUDAStream();
    zk::residual_scale_rmsnorm_bwd_kernel<A>
        <<<static_cast<unsigned>(P), zk::rms_block_size(H, zk::kRmsBwdMaxThreads), 0, stream>>>(
            ptr<A>(grad_normed), opt_ptr<float>(grad_new_residual), ptr<A>(branch), opt_ptr<float>(residual),
            ptr<float>(hidden_scale), opt_ptr<float>(residual_scale), ptr<float>(norm_weight),
            ptr<float>(new_residual), static_cast<float>(eps), N, H, ceil_div(N, P), mut_ptr<A>(grad_branch_out),
            grad_residual_out.has_value() ? mut_ptr<float>(*grad_residual_out) : nullptr,
            mut_ptr<float>(param_partials_out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

namespace {
// Calls f(Tag<TI>{}, Tag<TO>{}) for the supported (input, output) dtype pairs of rmsnorm: TI == TO, or TI = float32.
template <typename F>
void dispatch_rms_types(at::ScalarType in, const char* in_name, at::ScalarType out, const char* out_name, F&& f) {
  if (in == out) {
    dispatch_float_type(in, in_name, [&](auto t) { f(t, t); });
  } else {
    TORCH_CHECK(in == at::kFloat, in_name, " and ", out_name, ": expected equal dtypes or a float32 ", in_name,
                ", got ", in, " and ", out);
    dispatch_float_type(out, out_name, [&](auto t) { f(Tag<float>{}, t); });
  }
}
}  // namespace

void rmsnorm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& out) {
  const auto nh = rows_and_width(x, "x");
  const int64_t N = nh.first, H = nh.second;
  check_device(x, "x", x, "x");
  check_param(weight, "weight", x, "x", H);
  check_device(out, "out", x, "x");
  TORCH_CHECK(out.sizes() == x.sizes(), "out: expected shape ", x.sizes(), " (the shape of x), got ", out.sizes());
  dispatch_rms_types(x.scalar_type(), "x", out.scalar_type(), "out", [&](auto ti, auto to) {
    using TI = typename decltype(ti)::type;
    using TO = typename decltype(to)::type;
    if (N == 0) return;
    const c10::cuda::CUDAGuard guard(x.device());
    const auto stream = at::cuda::getCurrentCUDAStream();
    zk::rmsnorm_fwd_kernel<TI, TO><<<static_cast<unsigned>(N), zk::rms_block_size(H), 0, stream>>>(
        ptr<TI>(x), ptr<float>(weight), static_cast<float>(eps), H, mut_ptr<TO>(out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void rmsnorm_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, double eps,
                 const at::Tensor& grad_x_out, const at::Tensor& param_partials_out) {
  const auto nh = rows_and_width(x, "x");
  const int64_t N = nh.first, H = nh.second;
  check_device(x, "x", x, "x");
  check_device(grad_out, "grad_out", x, "x");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out: expected shape ", x.sizes(), " (the shape of x), got ",
              grad_out.sizes());
  check_param(weight, "weight", x, "x", H);
  check_like(grad_x_out, "grad_x_out", x, "x", x.scalar_type());
  check_partials(param_partials_out, "param_partials_out", x, "x", 1, H);
  const int64_t P = param_partials_out.size(0);
  TORCH_CHECK(P <= std::numeric_limits<int32_t>::max(), "param_partials_out: too many row groups (", P, ")");
  dispatch_rms_types(x.scalar_type(), "x", grad_out.scalar_type(), "grad_out", [&](auto ti, auto to) {
    using TI = typename decltype(ti)::type;
    using TO = typename decltype(to)::type;
    if (N == 0) return;
    const c10::cuda::CUDAGuard guard(x.device());
    const auto stream = at::cuda::getCurrentCUDAStream();
    zk::rmsnorm_bwd_kernel<TI, TO>
        <<<static_cast<unsigned>(P), zk::rms_block_size(H, zk::kRmsBwdMaxThreads), 0, stream>>>(
            ptr<TO>(grad_out), ptr<TI>(x), ptr<float>(weight), static_cast<float>(eps), N, H, ceil_div(N, P),
            mut_ptr<TI>(grad_x_out), mut_ptr<float>(param_partials_out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bind_residual_rmsnorm(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("residual_rmsnorm_bwd_num_partials", &residual_rmsnorm_bwd_num_partials, py::arg("N"), py::arg("H"),
        "Rows P of the zero-filled fp32 param_partials_out the backward launchers expect ([P, 4, H] / [P, 1, H]).");
  m.def("rmsnorm_bwd_num_partials", &residual_rmsnorm_bwd_num_partials, py::arg("N"), py::arg("H"),
        "Same as residual_rmsnorm_bwd_num_partials (rmsnorm_bwd partials are [P, 1, H]).");
  m.def("residual_scale_rmsnorm_fwd", &residual_scale_rmsnorm_fwd, py::arg("branch"), py::arg("residual"),
        py::arg("hidden_scale"), py::arg("hidden_bias"), py::arg("residual_scale"), py::arg("residual_bias"),
        py::arg("norm_weight"), py::arg("eps"), py::arg("new_residual_out"), py::arg("normed_out"),
        "new_residual_out = (branch + hb) * hs + (residual + rb) * rs (fp32); normed_out = w * rmsnorm(new_residual "
        "rounded to branch.dtype), in branch.dtype. [H] parameters fp32.");
  m.def("residual_scale_rmsnorm_bwd", &residual_scale_rmsnorm_bwd, py::arg("grad_normed"),
        py::arg("grad_new_residual"), py::arg("branch"), py::arg("residual"), py::arg("hidden_scale"),
        py::arg("hidden_bias"), py::arg("residual_scale"), py::arg("residual_bias"), py::arg("norm_weight"),
        py::arg("new_residual"), py::arg("eps"), py::arg("grad_branch_out"), py::arg("grad_residual_out"),
        py::arg("param_partials_out"),
        "Writes grad_branch_out, grad_residual_out (if given) and param_partials_out [P, 4, H] (zero-filled by the "
        "caller; sum over dim 0 gives sum g, sum g*branch, sum g*residual, grad of norm_weight).");
  m.def("rmsnorm_fwd", &rmsnorm_fwd, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"),
        "out = weight * rmsnorm(x rounded to out.dtype), in out.dtype (x.dtype == out.dtype or x float32).");
  m.def("rmsnorm_bwd", &rmsnorm_bwd, py::arg("grad_out"), py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("grad_x_out"), py::arg("param_partials_out"),
        "Writes grad_x_out (x.dtype) and param_partials_out [P, 1, H] (zero-filled; sum over dim 0 = grad of weight).");
}

}  // namespace zaya
