// Launcher for kernels/router.cuh: the ZAYA router decode kernel (one block per token, one launch).
//
// Every output is preallocated by the caller (zaya_kernels/ops/router.py) and contiguous; the launcher checks
// devices, dtypes, shapes and contiguity, then launches on the current stream. T = 0 launches nothing.
// x, r_prev, r_out and the four weight matrices share one dtype (float32, float16 or bfloat16); gamma, down_b,
// norm_w, fc1_b and fc2_b are each float32, float16 or bfloat16, read in their own dtype by the kernel (no conversion
// launches: the decode router stays one launch in a bf16 model); balance_bias fp32; index_out int32 [T], weight_out
// fp32 [T], logits_out fp32 [T, C] or None. Sizes: H <= 8192, R <= 512, C = E + 1 <= 256 (kernels/router.cuh).
// This file is hipified by torch on ROCm builds: keep to APIs hipify maps.
// Deliberately not <torch/extension.h> (the whole C++ frontend: slow under nvcc): ATen + torch's pybind casters.
//
// Wiring (csrc/launchers.h and csrc/gpu_bindings.cu are shared): declare `void bind_router(pybind11::module_& m);`
// in launchers.h and call `bind_router(m);` from bind_gpu_launchers. zaya_kernels/ops/router.py registers the "hip"
// backend of zaya::zaya_router only when zaya_kernels._C has `zaya_router_decode`.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/utils/pybind.h>

#include <limits>

#include "launchers.h"
#include "router.cuh"

namespace zaya {

void bind_router(pybind11::module_& m);

namespace {

namespace zk = ::zaya::kernels;

template <typename T>
struct RouterTag {
  using type = T;
};

template <typename F>
void router_dispatch(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat:
      f(RouterTag<float>{});
      break;
    case at::kHalf:
      f(RouterTag<zk::half_t>{});
      break;
    case at::kBFloat16:
      f(RouterTag<zk::bf16_t>{});
      break;
    default:
      TORCH_CHECK(false, "zaya_router_decode: x: expected dtype float32, float16 or bfloat16, got ", st);
  }
}

void router_check(const at::Tensor& t, const char* name, const at::Tensor& x, at::ScalarType dtype,
                  at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cuda(), "zaya_router_decode: ", name, ": expected a GPU tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), "zaya_router_decode: ", name, ": expected a tensor on ", x.device(),
              " (the device of x), got one on ", t.device());
  TORCH_CHECK(t.is_contiguous(), "zaya_router_decode: ", name, ": expected a contiguous tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "zaya_router_decode: ", name, ": expected dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "zaya_router_decode: ", name, ": expected shape ", shape, ", got ", t.sizes());
}

// The kernel's dtype code (kRouterVec*) of an [R] vector: float32, float16 or bfloat16, [R], contiguous, on x's
// device.
int router_vec_code(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t R) {
  int code = zk::kRouterVecF32;
  switch (t.scalar_type()) {
    case at::kFloat:
      break;
    case at::kHalf:
      code = zk::kRouterVecF16;
      break;
    case at::kBFloat16:
      code = zk::kRouterVecBF16;
      break;
    default:
      TORCH_CHECK(false, "zaya_router_decode: ", name, ": expected dtype float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  router_check(t, name, x, t.scalar_type(), {R});
  return code;
}

}  // namespace

void zaya_router_decode(const at::Tensor& x, const c10::optional<at::Tensor>& r_prev,
                        const c10::optional<at::Tensor>& gamma, const at::Tensor& down_w, const at::Tensor& down_b,
                        const at::Tensor& norm_w, const at::Tensor& fc1_w, const at::Tensor& fc1_b,
                        const at::Tensor& fc2_w, const at::Tensor& fc2_b, const at::Tensor& out_w,
                        const at::Tensor& balance_bias, double eps, const at::Tensor& index_out,
                        const at::Tensor& weight_out, const at::Tensor& r_out,
                        const c10::optional<at::Tensor>& logits_out) {
  TORCH_CHECK(x.dim() == 2, "zaya_router_decode: x: expected [T, H], got shape ", x.sizes());
  TORCH_CHECK(down_w.dim() == 2 && out_w.dim() == 2, "zaya_router_decode: down_w and out_w must be 2-D");
  const int64_t T = x.size(0), H = x.size(1), R = down_w.size(0), C = out_w.size(0);
  TORCH_CHECK(H >= 1 && H <= zk::kRouterMaxH, "zaya_router_decode: H = ", H, " outside [1, ", zk::kRouterMaxH, "]");
  TORCH_CHECK(R >= 1 && R <= zk::kRouterMaxR, "zaya_router_decode: R = ", R, " outside [1, ", zk::kRouterMaxR, "]");
  TORCH_CHECK(C >= 2 && C <= zk::kRouterMaxC, "zaya_router_decode: C = E + 1 = ", C, " outside [2, ",
              zk::kRouterMaxC, "]");
  TORCH_CHECK(T <= std::numeric_limits<int32_t>::max(), "zaya_router_decode: too many tokens (", T, ")");
  const auto dt = x.scalar_type();
  router_check(x, "x", x, dt, {T, H});
  router_check(down_w, "down_w", x, dt, {R, H});
  router_check(fc1_w, "fc1_w", x, dt, {R, R});
  router_check(fc2_w, "fc2_w", x, dt, {R, R});
  router_check(out_w, "out_w", x, dt, {C, R});
  const int dt_down_b = router_vec_code(down_b, "down_b", x, R);
  const int dt_norm_w = router_vec_code(norm_w, "norm_w", x, R);
  const int dt_fc1_b = router_vec_code(fc1_b, "fc1_b", x, R);
  const int dt_fc2_b = router_vec_code(fc2_b, "fc2_b", x, R);
  router_check(balance_bias, "balance_bias", x, at::kFloat, {C});
  TORCH_CHECK(r_prev.has_value() == gamma.has_value(), "zaya_router_decode: r_prev and gamma go together");
  int dt_gamma = zk::kRouterVecF32;
  if (r_prev.has_value()) {
    router_check(*r_prev, "r_prev", x, dt, {T, R});
    dt_gamma = router_vec_code(*gamma, "gamma", x, R);
  }
  const int vec_dtypes = zk::router_vec_dtypes(dt_gamma, dt_down_b, dt_norm_w, dt_fc1_b, dt_fc2_b);
  router_check(index_out, "index_out", x, at::kInt, {T});
  router_check(weight_out, "weight_out", x, at::kFloat, {T});
  router_check(r_out, "r_out", x, dt, {T, R});
  if (logits_out.has_value()) router_check(*logits_out, "logits_out", x, at::kFloat, {T, C});
  if (T == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  router_dispatch(dt, [&](auto tag) {
    using A = typename decltype(tag)::type;
    zk::zaya_router_decode_kernel<A, A><<<static_cast<unsigned>(T), zk::kRouterThreads, 0, stream>>>(
        reinterpret_cast<const A*>(x.data_ptr()),
        r_prev.has_value() ? reinterpret_cast<const A*>(r_prev->data_ptr()) : nullptr,
        gamma.has_value() ? gamma->data_ptr() : nullptr, reinterpret_cast<const A*>(down_w.data_ptr()),
        down_b.data_ptr(), norm_w.data_ptr(), reinterpret_cast<const A*>(fc1_w.data_ptr()), fc1_b.data_ptr(),
        reinterpret_cast<const A*>(fc2_w.data_ptr()), fc2_b.data_ptr(),
        reinterpret_cast<const A*>(out_w.data_ptr()), balance_bias.data_ptr<float>(), index_out.data_ptr<int32_t>(),
        weight_out.data_ptr<float>(), reinterpret_cast<A*>(r_out.data_ptr()),
        logits_out.has_value() ? logits_out->data_ptr<float>() : nullptr, static_cast<int>(H), static_cast<int>(R),
        static_cast<int>(C), static_cast<float>(eps), vec_dtypes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bind_router(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("zaya_router_decode", &zaya_router_decode, py::arg("x"), py::arg("r_prev"), py::arg("gamma"),
        py::arg("down_w"), py::arg("down_b"), py::arg("norm_w"), py::arg("fc1_w"), py::arg("fc1_b"), py::arg("fc2_w"),
        py::arg("fc2_b"), py::arg("out_w"), py::arg("balance_bias"), py::arg("eps"), py::arg("index_out"),
        py::arg("weight_out"), py::arg("r_out"), py::arg("logits_out"),
        "The ZAYA router, one block per token (kernels/router.cuh): writes index_out int32 [T], weight_out fp32 "
        "[T], r_out [T, R] x.dtype and logits_out fp32 [T, E+1] if given. Weights share x's dtype; the [R] vectors "
        "are each fp32, fp16 or bf16 (read in their own dtype); balance_bias fp32.");
}

}  // namespace zaya
