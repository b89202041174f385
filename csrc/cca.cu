// Launcher for kernels/cca.cuh: the ZAYA CCA decode step (zaya::cca_prepare_decode, backend "hip") in one launch.
//
// The outputs q [B, n_q, D], k [B, n_kv, D] and v [B, n_kv, D] are preallocated by the caller
// (zaya_kernels/ops/cca.py) in qk's dtype; conv_state [slots, C, k0 + k1 - 2] and value_state [slots, n_kv D / 2]
// are updated in place. qk, v_current and v_delayed may be row-strided (last dim contiguous, row stride >= the row
// width: column slices of one stacked projection output; the kernel reads them element by element, so no stride
// needs vector alignment); everything else is contiguous. The launcher checks devices, dtypes, shapes and
// layouts, then launches on the current
// stream (no host synchronisation: graph-capturable). B = 0 launches nothing.
// Dtypes: qk, v_current, v_delayed, q, k, v share A (float32, float16 or bfloat16); the five weights share one dtype,
// float32 or A (the caller converts other mixes); the two states share one dtype, float32 or A; positions and
// state_indices int32 or int64; inv_freq float32 [max(1, rotary_dim / 2)] (the RoPE table, computed by the caller
// exactly as the reference does). Sizes: k0, k1 in 1..4, D <= 256, D * k1 <= 1024, every tensor < 2^31 elements.
// Optional paged KV cache: slot_mapping [B] int32 / int64 with k_cache and v_cache [num_blocks, block_size, n_kv, D]
// (qk's dtype, last dim contiguous, any other strides): row b's k and v also go to slot slot_mapping[b] (negative, or
// a padded row: no write); that launch uses the kernel's kWriteCache instantiation.
// This file is hipified by torch on ROCm builds: keep to APIs hipify maps.
// Deliberately not <torch/extension.h> (the whole C++ frontend: slow under nvcc): ATen + torch's pybind casters.
//
// Wiring (csrc/launchers.h and csrc/gpu_bindings.cu are shared): `void bind_cca(pybind11::module_& m);` in
// launchers.h and `bind_cca(m);` in bind_gpu_launchers. zaya_kernels/ops/cca.py registers the "hip" backend of
// zaya::cca_prepare_decode only when zaya_kernels._C has `cca_prepare_decode`.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "cca.cuh"
#include "launchers.h"

namespace zaya {

void bind_cca(pybind11::module_& m);

namespace {

namespace zk = ::zaya::kernels;

template <typename T>
struct CcaTag {
  using type = T;
};

// Calls f(CcaTag<T>{}) with T the kernel type of dtype st (float32, float16, bfloat16).
template <typename F>
void cca_dispatch(at::ScalarType st, const char* name, F&& f) {
  switch (st) {
    case at::kFloat:
      f(CcaTag<float>{});
      break;
    case at::kHalf:
      f(CcaTag<zk::half_t>{});
      break;
    case at::kBFloat16:
      f(CcaTag<zk::bf16_t>{});
      break;
    default:
      TORCH_CHECK(false, "cca_prepare_decode: ", name, ": expected dtype float32, float16 or bfloat16, got ", st);
  }
}

void cca_check(const at::Tensor& t, const char* name, const at::Tensor& qk, at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cuda(), "cca_prepare_decode: ", name, ": expected a GPU tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == qk.device(), "cca_prepare_decode: ", name, ": expected a tensor on ", qk.device(),
              " (the device of qk), got one on ", t.device());
  TORCH_CHECK(t.is_contiguous(), "cca_prepare_decode: ", name, ": expected a contiguous tensor");
  TORCH_CHECK(t.sizes() == shape, "cca_prepare_decode: ", name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.numel() <= std::numeric_limits<int32_t>::max(), "cca_prepare_decode: ", name, " has ", t.numel(),
              " elements; the kernel indexes with 32 bits (< 2^31)");
}

// A [rows, width] input read with its row stride: last dim contiguous, rows not overlapping, every element it reads
// within 32-bit offsets of the data pointer (the kernel's index arithmetic).
void cca_check_rows(const at::Tensor& t, const char* name, const at::Tensor& qk, int64_t rows, int64_t width) {
  TORCH_CHECK(t.is_cuda(), "cca_prepare_decode: ", name, ": expected a GPU tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == qk.device(), "cca_prepare_decode: ", name, ": expected a tensor on ", qk.device(),
              " (the device of qk), got one on ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == width, "cca_prepare_decode: ", name,
              ": expected shape [", rows, ", ", width, "], got ", t.sizes());
  TORCH_CHECK((width <= 1 || t.stride(1) == 1) && (rows <= 1 || width == 0 || t.stride(0) >= width),
              "cca_prepare_decode: ", name, ": expected a contiguous last dim and a row stride >= ", width,
              ", got strides ", t.strides());
  const int64_t extent = rows > 0 ? (rows - 1) * t.stride(0) + width : 0;
  TORCH_CHECK(extent <= std::numeric_limits<int32_t>::max(), "cca_prepare_decode: ", name, " spans ", extent,
              " elements; the kernel indexes with 32 bits (< 2^31)");
}

void cca_check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.scalar_type() == dtype, "cca_prepare_decode: ", name, ": expected dtype ", dtype, " (", what,
              "), got ", t.scalar_type());
}

void cca_check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "cca_prepare_decode: ", name,
              ": expected dtype int32 or int64, got ", t.scalar_type());
}

// A paged cache [num_blocks, block_size, n_kv, D] in qk's dtype with a contiguous last dim (other strides free).
void cca_check_cache(const at::Tensor& t, const char* name, const at::Tensor& qk, int64_t num_kv, int64_t D) {
  TORCH_CHECK(t.is_cuda() && t.device() == qk.device(), "cca_prepare_decode: ", name, ": expected a tensor on ",
              qk.device(), " (the device of qk), got one on ", t.device());
  TORCH_CHECK(t.dim() == 4 && t.size(2) == num_kv && t.size(3) == D && t.size(1) >= 1, "cca_prepare_decode: ", name,
              ": expected shape [num_blocks, block_size >= 1, ", num_kv, ", ", D, "], got ", t.sizes());
  TORCH_CHECK(D == 1 || t.stride(3) == 1, "cca_prepare_decode: ", name,
              ": expected a contiguous last dim, got strides ", t.strides());
  cca_check_dtype(t, name, qk.scalar_type(), "qk's dtype");
}

}  // namespace

void cca_prepare_decode(const at::Tensor& qk, const at::Tensor& v_current, const at::Tensor& v_delayed,
                        const at::Tensor& conv0_weight, const at::Tensor& conv0_bias, const at::Tensor& conv1_weight,
                        const at::Tensor& conv1_bias, const at::Tensor& temperature, const at::Tensor& positions,
                        const at::Tensor& inv_freq, const at::Tensor& conv_state, const at::Tensor& value_state,
                        const at::Tensor& state_indices, int64_t num_q_heads, int64_t num_kv_heads,
                        int64_t rotary_dim, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const c10::optional<at::Tensor>& slot_mapping, const c10::optional<at::Tensor>& k_cache,
                        const c10::optional<at::Tensor>& v_cache) {
  TORCH_CHECK(qk.dim() == 2, "cca_prepare_decode: qk: expected [B, C], got shape ", qk.sizes());
  TORCH_CHECK(conv1_weight.dim() == 3, "cca_prepare_decode: conv1_weight: expected [C, D, k1], got shape ",
              conv1_weight.sizes());
  TORCH_CHECK(conv0_weight.dim() == 2, "cca_prepare_decode: conv0_weight: expected [C, k0], got shape ",
              conv0_weight.sizes());
  TORCH_CHECK(conv_state.dim() == 3, "cca_prepare_decode: conv_state: expected [slots, C, k0 + k1 - 2], got shape ",
              conv_state.sizes());
  TORCH_CHECK(num_q_heads >= 1 && num_kv_heads >= 1 && num_q_heads % num_kv_heads == 0,
              "cca_prepare_decode: num_q_heads (", num_q_heads, ") must be a positive multiple of num_kv_heads (",
              num_kv_heads, ")");
  TORCH_CHECK(num_q_heads + num_kv_heads <= std::numeric_limits<int32_t>::max() / zk::kCcaRows,
              "cca_prepare_decode: too many heads");
  const int64_t B = qk.size(0), C = qk.size(1), D = conv1_weight.size(1), k1 = conv1_weight.size(2);
  const int64_t k0 = conv0_weight.size(1), slots = conv_state.size(0);
  const int64_t heads = num_q_heads + num_kv_heads;
  TORCH_CHECK(C == heads * D, "cca_prepare_decode: qk has C = ", C, " channels but (num_q_heads + num_kv_heads) * D = ",
              heads * D, " (D = conv1_weight.size(1))");
  TORCH_CHECK(D >= 1 && D <= zk::kCcaMaxHeadDim, "cca_prepare_decode: head_dim D = ", D, " outside [1, ",
              zk::kCcaMaxHeadDim, "]");
  TORCH_CHECK(k0 >= 1 && k0 <= zk::kCcaMaxKernel && k1 >= 1 && k1 <= zk::kCcaMaxKernel,
              "cca_prepare_decode: kernel sizes k0 = ", k0, ", k1 = ", k1, " must be in 1..", zk::kCcaMaxKernel);
  TORCH_CHECK(D * k1 <= zk::kCcaMaxConvLen, "cca_prepare_decode: D * k1 = ", D * k1, " exceeds ",
              zk::kCcaMaxConvLen);
  TORCH_CHECK((num_kv_heads * D) % 2 == 0, "cca_prepare_decode: num_kv_heads * D must be even");
  TORCH_CHECK(rotary_dim >= 0 && rotary_dim <= D && rotary_dim % 2 == 0, "cca_prepare_decode: rotary_dim = ",
              rotary_dim, " must be even and in 0..D = ", D);
  const int64_t value_dim = num_kv_heads * D / 2;
  const int64_t state_len = k0 + k1 - 2;

  cca_check_rows(qk, "qk", qk, B, C);
  cca_check_rows(v_current, "v_current", qk, B, value_dim);
  cca_check_rows(v_delayed, "v_delayed", qk, B, value_dim);
  cca_check(conv0_weight, "conv0_weight", qk, {C, k0});
  cca_check(conv0_bias, "conv0_bias", qk, {C});
  cca_check(conv1_weight, "conv1_weight", qk, {C, D, k1});
  cca_check(conv1_bias, "conv1_bias", qk, {C});
  cca_check(temperature, "temperature", qk, {num_kv_heads});
  cca_check(positions, "positions", qk, {B});
  cca_check(inv_freq, "inv_freq", qk, {std::max<int64_t>(1, rotary_dim / 2)});
  cca_check(conv_state, "conv_state", qk, {slots, C, state_len});
  cca_check(value_state, "value_state", qk, {slots, value_dim});
  cca_check(state_indices, "state_indices", qk, {B});
  cca_check(q, "q", qk, {B, num_q_heads, D});
  cca_check(k, "k", qk, {B, num_kv_heads, D});
  cca_check(v, "v", qk, {B, num_kv_heads, D});

  const auto act = qk.scalar_type();
  for (const auto& p : {std::make_pair(&v_current, "v_current"), std::make_pair(&v_delayed, "v_delayed"),
                        std::make_pair(&q, "q"), std::make_pair(&k, "k"), std::make_pair(&v, "v")}) {
    cca_check_dtype(*p.first, p.second, act, "qk's dtype");
  }
  const auto wdt = conv1_weight.scalar_type();
  TORCH_CHECK(wdt == at::kFloat || wdt == act, "cca_prepare_decode: conv1_weight: expected dtype float32 or ", act,
              " (qk's dtype), got ", wdt);
  for (const auto& p : {std::make_pair(&conv0_weight, "conv0_weight"), std::make_pair(&conv0_bias, "conv0_bias"),
                        std::make_pair(&conv1_bias, "conv1_bias"), std::make_pair(&temperature, "temperature")}) {
    cca_check_dtype(*p.first, p.second, wdt, "conv1_weight's dtype");
  }
  const auto sdt = conv_state.scalar_type();
  TORCH_CHECK(sdt == at::kFloat || sdt == act, "cca_prepare_decode: conv_state: expected dtype float32 or ", act,
              " (qk's dtype), got ", sdt);
  cca_check_dtype(value_state, "value_state", sdt, "conv_state's dtype");
  cca_check_dtype(inv_freq, "inv_freq", at::kFloat, "the fp32 RoPE table");
  cca_check_index(positions, "positions");
  cca_check_index(state_indices, "state_indices");
  const bool write_cache = k_cache.has_value();
  TORCH_CHECK(write_cache == v_cache.has_value() && write_cache == slot_mapping.has_value(),
              "cca_prepare_decode: slot_mapping, k_cache and v_cache are given together or not at all");
  if (write_cache) {
    cca_check(*slot_mapping, "slot_mapping", qk, {B});
    cca_check_index(*slot_mapping, "slot_mapping");
    cca_check_cache(*k_cache, "k_cache", qk, num_kv_heads, D);
    cca_check_cache(*v_cache, "v_cache", qk, num_kv_heads, D);
    TORCH_CHECK(v_cache->sizes() == k_cache->sizes(), "cca_prepare_decode: v_cache: expected the shape of k_cache ",
                k_cache->sizes(), ", got ", v_cache->sizes());
  }
  if (B == 0) return;

  const int64_t grid = heads * ((B + zk::kCcaRows - 1) / zk::kCcaRows);
  TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max(), "cca_prepare_decode: too many rows (", B, ")");
  const c10::cuda::CUDAGuard guard(qk.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  cca_dispatch(act, "qk", [&](auto act_tag) {
    using A = typename decltype(act_tag)::type;
    zk::CcaPagedCache<A> cache;  // unused by the kWriteCache = false kernel
    if (write_cache) {
      cache.slot_mapping = slot_mapping->data_ptr();
      cache.k_cache = reinterpret_cast<A*>(k_cache->data_ptr());
      cache.v_cache = reinterpret_cast<A*>(v_cache->data_ptr());
      cache.k_stride_block = k_cache->stride(0);
      cache.k_stride_slot = k_cache->stride(1);
      cache.k_stride_head = k_cache->stride(2);
      cache.v_stride_block = v_cache->stride(0);
      cache.v_stride_slot = v_cache->stride(1);
      cache.v_stride_head = v_cache->stride(2);
      cache.num_cache_slots = k_cache->size(0) * k_cache->size(1);
      TORCH_CHECK(k_cache->size(1) <= std::numeric_limits<int32_t>::max(), "cca_prepare_decode: block_size too large");
      cache.block_size = static_cast<int>(k_cache->size(1));
      cache.slot_int64 = slot_mapping->scalar_type() == at::kLong ? 1 : 0;
    }
    auto launch_paged = [&](auto weight_tag, auto state_tag, auto paged_tag) {
      using W = typename decltype(weight_tag)::type;
      using S = typename decltype(state_tag)::type;
      constexpr bool kPaged = decltype(paged_tag)::value;
      zk::cca_prepare_decode_kernel<A, W, S, kPaged><<<static_cast<unsigned>(grid), zk::kCcaThreads, 0, stream>>>(
          reinterpret_cast<const A*>(qk.data_ptr()), reinterpret_cast<const A*>(v_current.data_ptr()),
          reinterpret_cast<const A*>(v_delayed.data_ptr()), reinterpret_cast<const W*>(conv0_weight.data_ptr()),
          reinterpret_cast<const W*>(conv0_bias.data_ptr()), reinterpret_cast<const W*>(conv1_weight.data_ptr()),
          reinterpret_cast<const W*>(conv1_bias.data_ptr()), reinterpret_cast<const W*>(temperature.data_ptr()),
          positions.data_ptr(), inv_freq.data_ptr<float>(), reinterpret_cast<S*>(conv_state.data_ptr()),
          reinterpret_cast<S*>(value_state.data_ptr()), state_indices.data_ptr(), reinterpret_cast<A*>(q.data_ptr()),
          reinterpret_cast<A*>(k.data_ptr()), reinterpret_cast<A*>(v.data_ptr()), static_cast<int>(B),
          static_cast<int>(slots), static_cast<int>(num_q_heads), static_cast<int>(num_kv_heads),
          static_cast<int>(D), static_cast<int>(k0), static_cast<int>(k1), static_cast<int>(rotary_dim),
          positions.scalar_type() == at::kLong ? 1 : 0, state_indices.scalar_type() == at::kLong ? 1 : 0,
          static_cast<int>(qk.stride(0)), static_cast<int>(v_current.stride(0)), static_cast<int>(v_delayed.stride(0)),
          cache);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto launch = [&](auto weight_tag, auto state_tag) {
      if (write_cache) {
        launch_paged(weight_tag, state_tag, std::true_type{});
      } else {
        launch_paged(weight_tag, state_tag, std::false_type{});
      }
    };
    // Weights and states are float32 or A: the four combinations (one when A is float32).
    const bool w32 = wdt == at::kFloat, s32 = sdt == at::kFloat;
    if (w32 && s32) {
      launch(CcaTag<float>{}, CcaTag<float>{});
    } else if (w32) {
      launch(CcaTag<float>{}, CcaTag<A>{});
    } else if (s32) {
      launch(CcaTag<A>{}, CcaTag<float>{});
    } else {
      launch(CcaTag<A>{}, CcaTag<A>{});
    }
  });
}

void bind_cca(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("cca_prepare_decode", &cca_prepare_decode, py::arg("qk"), py::arg("v_current"), py::arg("v_delayed"),
        py::arg("conv0_weight"), py::arg("conv0_bias"), py::arg("conv1_weight"), py::arg("conv1_bias"),
        py::arg("temperature"), py::arg("positions"), py::arg("inv_freq"), py::arg("conv_state"),
        py::arg("value_state"), py::arg("state_indices"), py::arg("num_q_heads"), py::arg("num_kv_heads"),
        py::arg("rotary_dim"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("slot_mapping") = py::none(),
        py::arg("k_cache") = py::none(), py::arg("v_cache") = py::none(),
        "The CCA decode step in one launch (kernels/cca.cuh): writes q [B, n_q, D], k and v [B, n_kv, D] (qk's "
        "dtype, preallocated) and updates conv_state / value_state in place at the slots state_indices (negative: "
        "padded row). Weights share one dtype (float32 or qk's), states too; inv_freq fp32 [max(1, rotary_dim/2)]. "
        "Optionally also writes k and v into the paged caches k_cache / v_cache [num_blocks, block_size, n_kv, D] "
        "at slot_mapping [B] (int32 / int64; negative: no write).");
}

}  // namespace zaya
