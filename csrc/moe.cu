// Launcher for kernels/moe.cuh: the top-1 MoE dispatch in one block (decode path; no host synchronisation).
//
// Every output is preallocated by the caller (zaya_kernels/ops/moe.py), int32 and contiguous on expert_index's
// device; the launcher checks devices, dtypes and shapes, then launches on the current stream. The values of
// expert_index (0..E) are checked by the caller before the launch.
// This file is hipified by torch on ROCm builds: keep to APIs hipify maps.
// Deliberately not <torch/extension.h> (the whole C++ frontend: slow under nvcc): ATen + torch's pybind casters.
//
// Wiring (csrc/launchers.h and csrc/gpu_bindings.cu are shared): `void bind_moe(pybind11::module_& m);` in
// launchers.h and `bind_moe(m);` in bind_gpu_launchers. zaya_kernels/ops/moe.py registers the "hip" backend of
// zaya::moe_dispatch only when zaya_kernels._C has `moe_dispatch`.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/utils/pybind.h>

#include <limits>

#include "launchers.h"
#include "moe.cuh"

namespace zaya {

void bind_moe(pybind11::module_& m);

namespace {

namespace zk = ::zaya::kernels;

void moe_check(const at::Tensor& t, const char* name, const at::Tensor& index, int64_t size) {
  TORCH_CHECK(t.is_cuda(), "moe_dispatch: ", name, ": expected a GPU tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == index.device(), "moe_dispatch: ", name, ": expected a tensor on ", index.device(),
              " (the device of expert_index), got one on ", t.device());
  TORCH_CHECK(t.is_contiguous(), "moe_dispatch: ", name, ": expected a contiguous tensor");
  TORCH_CHECK(t.scalar_type() == at::kInt, "moe_dispatch: ", name, ": expected dtype int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, "moe_dispatch: ", name, ": expected shape [", size, "], got ",
              t.sizes());
}

}  // namespace

void moe_dispatch(const at::Tensor& expert_index, int64_t num_experts, int64_t block_m, const at::Tensor& counts,
                  const at::Tensor& offsets, const at::Tensor& sorted_token_ids, const at::Tensor& inverse,
                  const at::Tensor& tile_expert, const at::Tensor& tile_start) {
  TORCH_CHECK(expert_index.dim() == 1, "moe_dispatch: expert_index: expected [T], got shape ", expert_index.sizes());
  const int64_t T = expert_index.size(0);
  TORCH_CHECK(T <= std::numeric_limits<int32_t>::max(), "moe_dispatch: too many tokens (", T, ")");
  TORCH_CHECK(num_experts >= 1 && num_experts + 2 <= zk::kMoeMaxClasses, "moe_dispatch: num_experts = ",
              num_experts, " outside [1, ", zk::kMoeMaxClasses - 2, "]");
  TORCH_CHECK(block_m >= 1, "moe_dispatch: block_m must be positive, got ", block_m);
  const int64_t num_tiles = (T + block_m - 1) / block_m + num_experts;
  moe_check(expert_index, "expert_index", expert_index, T);
  moe_check(counts, "counts", expert_index, num_experts + 1);
  moe_check(offsets, "offsets", expert_index, num_experts + 2);
  moe_check(sorted_token_ids, "sorted_token_ids", expert_index, T);
  moe_check(inverse, "inverse", expert_index, T);
  moe_check(tile_expert, "tile_expert", expert_index, num_tiles);
  moe_check(tile_start, "tile_start", expert_index, num_tiles);

  const c10::cuda::CUDAGuard guard(expert_index.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  zk::moe_dispatch_kernel<zk::kMoeDispatchThreads><<<1, zk::kMoeDispatchThreads, 0, stream>>>(
      expert_index.data_ptr<int32_t>(), static_cast<int>(T), static_cast<int>(num_experts),
      static_cast<int>(block_m), static_cast<int>(num_tiles), counts.data_ptr<int32_t>(),
      offsets.data_ptr<int32_t>(), sorted_token_ids.data_ptr<int32_t>(), inverse.data_ptr<int32_t>(),
      tile_expert.data_ptr<int32_t>(), tile_start.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void bind_moe(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("moe_dispatch", &moe_dispatch, py::arg("expert_index"), py::arg("num_experts"), py::arg("block_m"),
        py::arg("counts"), py::arg("offsets"), py::arg("sorted_token_ids"), py::arg("inverse"),
        py::arg("tile_expert"), py::arg("tile_start"),
        "Top-1 MoE dispatch in one block (kernels/moe.cuh) into preallocated int32 outputs: counts [E+1], offsets "
        "[E+2], sorted_token_ids [T], inverse [T], tile_expert and tile_start [cdiv(T, block_m) + E].");
}

}  // namespace zaya
