// Launchers for kernels/moe.cuh: the top-1 MoE dispatch in one block (decode path; no host synchronisation), and
// the row gather / scatter-back of expert parallelism (moe_permute_rows, moe_unpermute_rows and its backward).
//
// Every output is preallocated by the caller (zaya_kernels/ops/moe.py) and contiguous on the inputs' device; the
// launchers check devices, dtypes and shapes, then launch on the current stream (empty work launches nothing). The
// values of expert_index (0..E) and of sorted_token_ids (a permutation of 0..T-1) are checked by the caller.
// This file is hipified by torch on ROCm builds: keep to APIs hipify maps.
// Deliberately not <torch/extension.h> (the whole C++ frontend: slow under nvcc): ATen + torch's pybind casters.
//
// Wiring (csrc/launchers.h and csrc/gpu_bindings.cu are shared): `void bind_moe(pybind11::module_& m);` in
// launchers.h and `bind_moe(m);` in bind_gpu_launchers. zaya_kernels/ops/moe.py registers the "hip" backend of
// zaya::moe_dispatch only when zaya_kernels._C has `moe_dispatch`, and of the row ops only when it has
// `moe_permute_rows`.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <initializer_list>
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

// ---- row gather / scatter-back -------------------------------------------------------------------------------

template <typename T>
struct RowTag {
  using type = T;
};

// Calls f(RowTag<T>{}) for the element type of `st`: float, half, bf16 (and int32 when kAllowInt; only then is f
// instantiated for int32).
template <bool kAllowInt, typename F>
void row_dispatch(const char* op, at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat:
      f(RowTag<float>{});
      break;
    case at::kHalf:
      f(RowTag<zaya::dev::half_t>{});
      break;
    case at::kBFloat16:
      f(RowTag<zaya::dev::bf16_t>{});
      break;
    case at::kInt:
      if constexpr (kAllowInt) {
        f(RowTag<int32_t>{});
        break;
      }
      [[fallthrough]];
    default:
      TORCH_CHECK(false, op, ": expected dtype float32, float16, bfloat16", kAllowInt ? " or int32" : "", ", got ",
                  st);
  }
}

void row_check(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref, at::ScalarType dtype,
               at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, ": expected a GPU tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, ": expected a tensor on ", ref.device(), ", got one on ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, ": expected a contiguous tensor");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, ": expected shape ", shape, ", got ", t.sizes());
}

// 16-byte packs when the row length and every base pointer allow them (then every row start is aligned too).
template <typename T>
constexpr int row_vec() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T>
bool rows_vectorizable(int64_t H, std::initializer_list<const void*> ptrs) {
  if (H % row_vec<T>() != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// log2 of the threads per row for the copy kernels: a power of two covering the row's packs, at most the block.
int row_lanes_log2(int64_t packs) {
  int lg = 0;
  while ((int64_t{1} << lg) < packs && (1 << lg) < zk::kMoeRowThreads) ++lg;
  return lg;
}

unsigned row_grid(const char* op, int64_t rows, int lanes_log2) {
  const int64_t per_block = zk::kMoeRowThreads >> lanes_log2;
  const int64_t blocks = (rows + per_block - 1) / per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": too many rows (", rows, ")");
  return static_cast<unsigned>(blocks);
}

void check_row_width(const char* op, int64_t H) {
  TORCH_CHECK(H <= std::numeric_limits<int32_t>::max(), op, ": rows of ", H, " elements are too wide (< 2^31)");
}

void check_token_ids(const char* op, const at::Tensor& sorted_token_ids, const at::Tensor& ref) {
  TORCH_CHECK(sorted_token_ids.dim() == 1, op, ": sorted_token_ids: expected [T], got shape ",
              sorted_token_ids.sizes());
  const int64_t T = sorted_token_ids.size(0);
  TORCH_CHECK(T <= std::numeric_limits<int32_t>::max(), op, ": too many tokens (", T, ")");
  row_check(op, sorted_token_ids, "sorted_token_ids", ref, at::kInt, {T});
}

}  // namespace

void moe_permute_rows(const at::Tensor& x, const at::Tensor& sorted_token_ids, int64_t num_rows,
                      const at::Tensor& out) {
  constexpr const char* op = "moe_permute_rows";
  TORCH_CHECK(x.dim() == 2, op, ": x: expected [T, H], got shape ", x.sizes());
  const int64_t T = x.size(0), H = x.size(1);
  check_token_ids(op, sorted_token_ids, x);
  check_row_width(op, H);
  TORCH_CHECK(sorted_token_ids.size(0) == T, op, ": sorted_token_ids: expected shape [", T, "] (x has ", T,
              " rows), got ", sorted_token_ids.sizes());
  TORCH_CHECK(num_rows >= 0 && num_rows <= T, op, ": num_rows = ", num_rows, " outside [0, T = ", T, "]");
  row_check(op, x, "x", x, x.scalar_type(), {T, H});
  row_check(op, out, "out", x, x.scalar_type(), {num_rows, H});
  if (num_rows == 0 || H == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  row_dispatch</*kAllowInt=*/true>(op, x.scalar_type(), [&](auto tag) {
    using A = typename decltype(tag)::type;
    const auto* xp = reinterpret_cast<const A*>(x.data_ptr());
    auto* op_ = reinterpret_cast<A*>(out.data_ptr());
    const int32_t* ids = sorted_token_ids.data_ptr<int32_t>();
    if (rows_vectorizable<A>(H, {xp, op_})) {
      constexpr int V = row_vec<A>();
      const int lg = row_lanes_log2(H / V);
      zk::moe_permute_rows_kernel<A, V><<<row_grid(op, num_rows, lg), zk::kMoeRowThreads, 0, stream>>>(
          xp, ids, num_rows, H, lg, op_);
    } else {
      const int lg = row_lanes_log2(H);
      zk::moe_permute_rows_kernel<A, 1><<<row_grid(op, num_rows, lg), zk::kMoeRowThreads, 0, stream>>>(
          xp, ids, num_rows, H, lg, op_);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void moe_unpermute_rows(const at::Tensor& rows, const at::Tensor& sorted_token_ids,
                        const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& routing_weight,
                        int64_t skip_mode, const at::Tensor& y) {
  constexpr const char* op = "moe_unpermute_rows";
  TORCH_CHECK(rows.dim() == 2, op, ": rows: expected [N, H], got shape ", rows.sizes());
  const int64_t N = rows.size(0), H = rows.size(1);
  check_token_ids(op, sorted_token_ids, rows);
  check_row_width(op, H);
  const int64_t T = sorted_token_ids.size(0);
  TORCH_CHECK(N <= T, op, ": rows has ", N, " rows but there are only T = ", T, " tokens");
  TORCH_CHECK(skip_mode == 0 || skip_mode == 1, op, ": skip_mode must be 0 or 1, got ", skip_mode);
  const auto dt = rows.scalar_type();
  row_check(op, rows, "rows", rows, dt, {N, H});
  row_check(op, y, "y", rows, dt, {T, H});
  if (skip_mode == 1) {
    TORCH_CHECK(x.has_value() && routing_weight.has_value(), op, ": skip_mode 1 needs x and routing_weight");
    row_check(op, *x, "x", rows, dt, {T, H});
    row_check(op, *routing_weight, "routing_weight", rows, at::kFloat, {T});
  }
  if (T == 0 || H == 0) return;

  const c10::cuda::CUDAGuard guard(rows.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  row_dispatch</*kAllowInt=*/false>(op, dt, [&](auto tag) {
    using A = typename decltype(tag)::type;
    const auto* rp = reinterpret_cast<const A*>(rows.data_ptr());
    const auto* xp = skip_mode == 1 ? reinterpret_cast<const A*>(x->data_ptr()) : nullptr;
    const float* wp = skip_mode == 1 ? routing_weight->data_ptr<float>() : nullptr;
    auto* yp = reinterpret_cast<A*>(y.data_ptr());
    const int32_t* ids = sorted_token_ids.data_ptr<int32_t>();
    if (rows_vectorizable<A>(H, {rp, xp, yp})) {
      constexpr int V = row_vec<A>();
      const int lg = row_lanes_log2(H / V);
      zk::moe_unpermute_rows_kernel<A, V><<<row_grid(op, T, lg), zk::kMoeRowThreads, 0, stream>>>(
          rp, ids, xp, wp, T, N, H, static_cast<int>(skip_mode), lg, yp);
    } else {
      const int lg = row_lanes_log2(H);
      zk::moe_unpermute_rows_kernel<A, 1><<<row_grid(op, T, lg), zk::kMoeRowThreads, 0, stream>>>(
          rp, ids, xp, wp, T, N, H, static_cast<int>(skip_mode), lg, yp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void moe_unpermute_rows_backward(const at::Tensor& grad_y, const at::Tensor& sorted_token_ids,
                                 const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& routing_weight,
                                 int64_t num_rows, int64_t skip_mode, const at::Tensor& grad_rows,
                                 const c10::optional<at::Tensor>& grad_x, const c10::optional<at::Tensor>& grad_w) {
  constexpr const char* op = "moe_unpermute_rows_backward";
  TORCH_CHECK(grad_y.dim() == 2, op, ": grad_y: expected [T, H], got shape ", grad_y.sizes());
  const int64_t T = grad_y.size(0), H = grad_y.size(1);
  check_token_ids(op, sorted_token_ids, grad_y);
  check_row_width(op, H);
  TORCH_CHECK(sorted_token_ids.size(0) == T, op, ": sorted_token_ids: expected shape [", T, "], got ",
              sorted_token_ids.sizes());
  TORCH_CHECK(num_rows >= 0 && num_rows <= T, op, ": num_rows = ", num_rows, " outside [0, T = ", T, "]");
  TORCH_CHECK(skip_mode == 0 || skip_mode == 1, op, ": skip_mode must be 0 or 1, got ", skip_mode);
  const auto dt = grad_y.scalar_type();
  row_check(op, grad_y, "grad_y", grad_y, dt, {T, H});
  row_check(op, grad_rows, "grad_rows", grad_y, dt, {num_rows, H});
  if (skip_mode == 1) {
    TORCH_CHECK(x.has_value() && routing_weight.has_value() && grad_x.has_value() && grad_w.has_value(), op,
                ": skip_mode 1 needs x, routing_weight, grad_x and grad_w");
    row_check(op, *x, "x", grad_y, dt, {T, H});
    row_check(op, *routing_weight, "routing_weight", grad_y, at::kFloat, {T});
    row_check(op, *grad_x, "grad_x", grad_y, dt, {T, H});
    row_check(op, *grad_w, "grad_w", grad_y, at::kFloat, {T});
  }
  const int64_t blocks = skip_mode == 1 ? T : num_rows;
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": too many rows (", blocks, ")");

  const c10::cuda::CUDAGuard guard(grad_y.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  row_dispatch</*kAllowInt=*/false>(op, dt, [&](auto tag) {
    using A = typename decltype(tag)::type;
    const auto* dyp = reinterpret_cast<const A*>(grad_y.data_ptr());
    const auto* xp = skip_mode == 1 ? reinterpret_cast<const A*>(x->data_ptr()) : nullptr;
    const float* wp = skip_mode == 1 ? routing_weight->data_ptr<float>() : nullptr;
    auto* grp = reinterpret_cast<A*>(grad_rows.data_ptr());
    auto* gxp = skip_mode == 1 ? reinterpret_cast<A*>(grad_x->data_ptr()) : nullptr;
    float* gwp = skip_mode == 1 ? grad_w->data_ptr<float>() : nullptr;
    const int32_t* ids = sorted_token_ids.data_ptr<int32_t>();
    const auto grid = static_cast<unsigned>(blocks);
    if (rows_vectorizable<A>(H, {dyp, xp, grp, gxp})) {
      zk::moe_unpermute_rows_bwd_kernel<A, row_vec<A>()><<<grid, zk::kMoeRowThreads, 0, stream>>>(
          dyp, ids, xp, wp, num_rows, H, static_cast<int>(skip_mode), grp, gxp, gwp);
    } else {
      zk::moe_unpermute_rows_bwd_kernel<A, 1><<<grid, zk::kMoeRowThreads, 0, stream>>>(
          dyp, ids, xp, wp, num_rows, H, static_cast<int>(skip_mode), grp, gxp, gwp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void moe_dispatch(const at::Tensor& expert_index, int64_t num_experts, int64_t block_m, const at::Tensor& counts,
                  const at::Tensor& offsets, const at::Tensor& sorted_token_ids, const at::Tensor& inverse,
                  const at::Tensor& tile_expert, const at::Tensor& tile_start) {
  TORCH_CHECK(expert_index.dim() == 1, "moe_dispatch: expert_index: expected [T], got shape ", expert_index.sizes());
  const int64_t T = expert_index.size(0);
  TORCH_CHECK(T <= std::numeric_limits<int32_t>::max(), "moe_dispatch: too many tokens (", T, ")");
  TORCH_CHECK(num_experts >= 1 && num_experts + 2 <= zk::kMoeMaxClasses, "moe_dispatch: num_experts = ",
              num_experts, " outside [1, ", zk::kMoeMaxClasses - 2, "]");
  // int32 in the kernel (the op allows 16..256)
  TORCH_CHECK(block_m >= 1 && block_m <= std::numeric_limits<int32_t>::max(), "moe_dispatch: block_m must be in "
              "[1, 2^31 - 1], got ", block_m);
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
  m.def("moe_permute_rows", &moe_permute_rows, py::arg("x"), py::arg("sorted_token_ids"), py::arg("num_rows"),
        py::arg("out"),
        "Row gather (kernels/moe.cuh): out[i] = x[sorted_token_ids[i]] for i < num_rows. x [T, H] float32 / "
        "float16 / bfloat16 / int32, sorted_token_ids int32 [T], out [num_rows, H] x.dtype, preallocated.");
  m.def("moe_unpermute_rows", &moe_unpermute_rows, py::arg("rows"), py::arg("sorted_token_ids"), py::arg("x"),
        py::arg("routing_weight"), py::arg("skip_mode"), py::arg("y"),
        "Row scatter-back (kernels/moe.cuh): y[sorted_token_ids[i]] = rows[i] for i < N; the other tokens get 0 "
        "(skip_mode 0) or w * x (1). rows [N, H], sorted_token_ids int32 [T], x [T, H] and routing_weight fp32 [T] "
        "(skip_mode 1, else None), y [T, H] rows.dtype, preallocated.");
  m.def("moe_unpermute_rows_backward", &moe_unpermute_rows_backward, py::arg("grad_y"), py::arg("sorted_token_ids"),
        py::arg("x"), py::arg("routing_weight"), py::arg("num_rows"), py::arg("skip_mode"), py::arg("grad_rows"),
        py::arg("grad_x"), py::arg("grad_w"),
        "Backward of moe_unpermute_rows (kernels/moe.cuh): grad_rows [N, H] = grad_y gathered; with skip_mode 1 "
        "grad_x [T, H] (w dy on skipped tokens, 0 elsewhere) and fp32 grad_w [T] (<dy, x> on skipped tokens).");
}

}  // namespace zaya
