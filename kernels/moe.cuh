// ZAYA top-1 MoE dispatch kernel (DESIGN.md 1.4; the same contract as zaya_kernels/reference/moe.py). Device code.
//
// Input: expert_index int32 [T], values 0..E (E = the skip class). Outputs (int32, preallocated):
//   counts [E+1], offsets [E+2] (exclusive prefix sum, offsets[E+1] = T), sorted [T] (stable sort by class, skipped
//   tokens last), inverse [T] (sorted[inverse[t]] = t), tile_expert / tile_start [num_tiles = cdiv(T, block_m) + E]
//   (class and first sorted row of each tile of block_m rows of one class; -1 / 0 for unused tiles).
//
// Launch: one block of kMoeDispatchThreads threads (the decode path: one launch, no host synchronisation, so it can
// sit in a CUDA/HIP graph). No atomics: tokens go through shared memory one chunk of blockDim tokens at a time;
// a token's rank among its class in the chunk is the number of earlier chunk tokens of that class, and per-class
// chunk counts are summed by one thread per class, so the result is deterministic. Work is O(T * blockDim) lane
// operations: meant for small T (the Triton chunked dispatch serves large T). E + 2 <= kMoeMaxClasses (checked by
// the launcher). Control flow around __syncthreads is block-uniform, as the host emulation of compat.cuh requires.
#pragma once

#include "compat.cuh"

namespace zaya {
namespace kernels {

constexpr int kMoeDispatchThreads = 256;
constexpr int kMoeMaxClasses = 1024;

template <int kThreads>
__global__ __launch_bounds__(kThreads) void moe_dispatch_kernel(const int32_t* __restrict__ expert_index, int T,
                                                                int E, int block_m, int num_tiles,
                                                                int32_t* __restrict__ counts,
                                                                int32_t* __restrict__ offsets,
                                                                int32_t* __restrict__ sorted,
                                                                int32_t* __restrict__ inverse,
                                                                int32_t* __restrict__ tile_expert,
                                                                int32_t* __restrict__ tile_start) {
  __shared__ int s_base[kMoeMaxClasses];       // per class: count, then the next free sorted position
  __shared__ int s_tiles_end[kMoeMaxClasses];  // per class: inclusive prefix sum of its tile count
  __shared__ int s_cls[kThreads];              // the chunk's classes (-1 past T)
  const int tid = threadIdx.x;
  const int classes = E + 1;
  for (int c = tid; c < classes; c += kThreads) s_base[c] = 0;
  __syncthreads();
  // Pass 1: counts, one thread per class summing each chunk (fixed order).
  for (int start = 0; start < T; start += kThreads) {
    s_cls[tid] = start + tid < T ? expert_index[start + tid] : -1;
    __syncthreads();
    for (int c = tid; c < classes; c += kThreads) {
      int n = 0;
      for (int k = 0; k < kThreads; ++k) n += s_cls[k] == c;
      s_base[c] += n;
    }
    __syncthreads();
  }
  // Offsets and per-class tile counts: a serial scan by one thread (classes <= kMoeMaxClasses).
  if (tid == 0) {
    int position = 0, tiles = 0;
    for (int c = 0; c < classes; ++c) {
      const int n = s_base[c];
      counts[c] = n;
      offsets[c] = position;
      s_base[c] = position;
      position += n;
      tiles += n / block_m + (n % block_m != 0);  // ceil without n + block_m - 1 (no int32 overflow)
      s_tiles_end[c] = tiles;
    }
    offsets[classes] = position;
  }
  __syncthreads();
  // Tile map: tile j belongs to the first class whose tiles end after j (binary search).
  const int used_tiles = s_tiles_end[classes - 1];
  for (int j = tid; j < num_tiles; j += kThreads) {
    if (j >= used_tiles) {
      tile_expert[j] = -1;
      tile_start[j] = 0;
      continue;
    }
    int lo = 0, hi = classes - 1;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (s_tiles_end[mid] > j) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const int first_tile = lo == 0 ? 0 : s_tiles_end[lo - 1];
    tile_expert[j] = lo;
    tile_start[j] = s_base[lo] + (j - first_tile) * block_m;
  }
  __syncthreads();
  // Pass 2: stable positions, chunk by chunk.
  for (int start = 0; start < T; start += kThreads) {
    const int t = start + tid;
    const int cls = t < T ? expert_index[t] : -1;
    s_cls[tid] = cls;
    __syncthreads();
    if (cls >= 0) {
      int rank = 0;
      for (int k = 0; k < tid; ++k) rank += s_cls[k] == cls;
      const int position = s_base[cls] + rank;
      sorted[position] = t;
      inverse[t] = position;
    }
    __syncthreads();
    for (int c = tid; c < classes; c += kThreads) {
      int n = 0;
      for (int k = 0; k < kThreads; ++k) n += s_cls[k] == c;
      s_base[c] += n;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Expert parallelism: the row gather before the all-to-all and the scatter-back after it
// (zaya::moe_permute_rows / moe_unpermute_rows / moe_unpermute_rows_backward; reference in
// zaya_kernels/reference/moe.py). sorted_token_ids [T] is the dispatch's permutation of 0..T-1 (routed tokens first,
// skipped last); the first N sorted positions travel. Top-1: every token sits at one sorted position, so each output
// row has exactly one writer (no atomics, deterministic).
//
// Row copies move kVec elements per access (MoeRowPack, 16 bytes when kVec = 16 / sizeof(T); the launcher picks it
// when H % kVec == 0 and every base pointer is 16-byte aligned, else kVec = 1). The two copy kernels put
// kMoeRowThreads / 2^lanes_log2 rows in a block, 2^lanes_log2 threads per row (the launcher sizes it to the row's
// packs, so narrow rows such as the routing weight [T, 1] still fill the block); the backward runs one block per sorted
// position because its skipped rows need a block reduction. Row offsets (token * H) are 64-bit; H < 2^31.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kMoeRowThreads = 256;

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) MoeRowPack {
  T v[kVec];
};

// out[i, :] = x[sorted[i], :] for i < num_rows. Grid: cdiv(num_rows, kMoeRowThreads >> lanes_log2) blocks.
template <typename T, int kVec>
__global__ __launch_bounds__(kMoeRowThreads) void moe_permute_rows_kernel(const T* __restrict__ x,
                                                                         const int32_t* __restrict__ sorted,
                                                                         int64_t num_rows, int64_t H, int lanes_log2,
                                                                         T* __restrict__ out) {
  using Pack = MoeRowPack<T, kVec>;
  const int lane = threadIdx.x & ((1 << lanes_log2) - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kMoeRowThreads >> lanes_log2) + (threadIdx.x >> lanes_log2);
  if (row >= num_rows) return;
  const int64_t token = sorted[row];
  const int packs = static_cast<int>(H / kVec);  // H < 2^31 (checked by the launcher)
  const Pack* src = reinterpret_cast<const Pack*>(x + token * H);
  Pack* dst = reinterpret_cast<Pack*>(out + row * H);
  for (int j = lane; j < packs; j += (1 << lanes_log2)) dst[j] = src[j];
}

// y[sorted[i], :] = rows[i, :] for i < num_rows; for num_rows <= i < T, token t = sorted[i]: y[t, :] = 0
// (skip_mode 0) or from_float<T>(w[t] * float(x[t, :])) (skip_mode 1; w fp32). Every row of y is written.
// Grid: cdiv(T, kMoeRowThreads >> lanes_log2) blocks.
template <typename T, int kVec>
__global__ __launch_bounds__(kMoeRowThreads) void moe_unpermute_rows_kernel(
    const T* __restrict__ rows, const int32_t* __restrict__ sorted, const T* __restrict__ x,
    const float* __restrict__ weight, int64_t T_tokens, int64_t num_rows, int64_t H, int skip_mode, int lanes_log2,
    T* __restrict__ y) {
  using Pack = MoeRowPack<T, kVec>;
  const int lane = threadIdx.x & ((1 << lanes_log2) - 1);
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * (kMoeRowThreads >> lanes_log2) + (threadIdx.x >> lanes_log2);
  if (pos >= T_tokens) return;
  const int64_t token = sorted[pos];
  const int packs = static_cast<int>(H / kVec);  // H < 2^31 (checked by the launcher)
  const int stride = 1 << lanes_log2;
  Pack* dst = reinterpret_cast<Pack*>(y + token * H);
  if (pos < num_rows) {
    const Pack* src = reinterpret_cast<const Pack*>(rows + pos * H);
    for (int j = lane; j < packs; j += stride) dst[j] = src[j];
  } else if (skip_mode == 1) {
    const float w = weight[token];
    const Pack* src = reinterpret_cast<const Pack*>(x + token * H);
    for (int j = lane; j < packs; j += stride) {
      const Pack in = src[j];
      Pack o;
#pragma unroll
      for (int k = 0; k < kVec; ++k) o.v[k] = dev::from_float<T>(dev::fmul_rn(w, dev::to_float(in.v[k])));
      dst[j] = o;
    }
  } else {
    Pack zero;
#pragma unroll
    for (int k = 0; k < kVec; ++k) zero.v[k] = dev::from_float<T>(0.0f);
    for (int j = lane; j < packs; j += stride) dst[j] = zero;
  }
}

// Backward of moe_unpermute_rows, one block (kMoeRowThreads threads) per sorted position i:
//   i < num_rows: grad_rows[i, :] = dy[t, :] (t = sorted[i]); with skip_mode 1 also grad_x[t, :] = 0, grad_w[t] = 0;
//   i >= num_rows (skip_mode 1 only): grad_x[t, :] = from_float<T>(w[t] * float(dy[t, :])),
//                                      grad_w[t] = sum_h float(dy[t, h]) * float(x[t, h]) (fixed-order block sum).
// Grid: num_rows blocks (skip_mode 0) or T blocks (skip_mode 1; grad_x and grad_w are then fully written).
// The branch on i is block-uniform, as block_reduce_sum (and the host emulation) requires.
template <typename T, int kVec>
__global__ __launch_bounds__(kMoeRowThreads) void moe_unpermute_rows_bwd_kernel(
    const T* __restrict__ dy, const int32_t* __restrict__ sorted, const T* __restrict__ x,
    const float* __restrict__ weight, int64_t num_rows, int64_t H, int skip_mode, T* __restrict__ grad_rows,
    T* __restrict__ grad_x, float* __restrict__ grad_w) {
  using Pack = MoeRowPack<T, kVec>;
  __shared__ float scratch[dev::kMaxWarps];
  const int64_t pos = blockIdx.x;
  const int64_t token = sorted[pos];
  const int packs = static_cast<int>(H / kVec);  // H < 2^31 (checked by the launcher)
  const Pack* dy_row = reinterpret_cast<const Pack*>(dy + token * H);
  Pack* gx_row = skip_mode == 1 ? reinterpret_cast<Pack*>(grad_x + token * H) : nullptr;
  if (pos < num_rows) {
    Pack* dst = reinterpret_cast<Pack*>(grad_rows + pos * H);
    for (int j = threadIdx.x; j < packs; j += kMoeRowThreads) dst[j] = dy_row[j];
    if (skip_mode == 1) {
      Pack zero;
#pragma unroll
      for (int k = 0; k < kVec; ++k) zero.v[k] = dev::from_float<T>(0.0f);
      for (int j = threadIdx.x; j < packs; j += kMoeRowThreads) gx_row[j] = zero;
      if (threadIdx.x == 0) grad_w[token] = 0.0f;
    }
    return;
  }
  if (skip_mode != 1) return;  // not launched for these rows with skip_mode 0
  const float w = weight[token];
  const Pack* x_row = reinterpret_cast<const Pack*>(x + token * H);
  float dot = 0.0f;
  for (int j = threadIdx.x; j < packs; j += kMoeRowThreads) {
    const Pack d = dy_row[j];
    const Pack xv = x_row[j];
    Pack g;  // two loops and a 32-bit j: a fused loop or a 64-bit j made nvcc spill for 16-bit types x 8
#pragma unroll
    for (int k = 0; k < kVec; ++k) g.v[k] = dev::from_float<T>(dev::fmul_rn(w, dev::to_float(d.v[k])));
    gx_row[j] = g;
#pragma unroll
    for (int k = 0; k < kVec; ++k) dot += dev::to_float(d.v[k]) * dev::to_float(xv.v[k]);
  }
  dot = dev::block_reduce_sum(dot, scratch);
  if (threadIdx.x == 0) grad_w[token] = dot;
}

}  // namespace kernels
}  // namespace zaya

#if defined(ZAYA_INSTANTIATE_MOE)
namespace zaya {
namespace kernels {
template __global__ void moe_dispatch_kernel<kMoeDispatchThreads>(const int32_t*, int, int, int, int, int32_t*,
                                                                  int32_t*, int32_t*, int32_t*, int32_t*, int32_t*);
// Row gather / scatter-back: float, half, bf16 (and int32 for the gather: expert ids), scalar and 16-byte rows.
#define ZAYA_MOE_PERMUTE(T, V) \
  template __global__ void moe_permute_rows_kernel<T, V>(const T*, const int32_t*, int64_t, int64_t, int, T*);
#define ZAYA_MOE_UNPERMUTE(T, V)                                                                                   \
  template __global__ void moe_unpermute_rows_kernel<T, V>(const T*, const int32_t*, const T*, const float*,       \
                                                           int64_t, int64_t, int64_t, int, int, T*);               \
  template __global__ void moe_unpermute_rows_bwd_kernel<T, V>(const T*, const int32_t*, const T*, const float*,   \
                                                               int64_t, int64_t, int, T*, T*, float*);
ZAYA_MOE_PERMUTE(float, 1)
ZAYA_MOE_PERMUTE(float, 4)
ZAYA_MOE_PERMUTE(dev::half_t, 1)
ZAYA_MOE_PERMUTE(dev::half_t, 8)
ZAYA_MOE_PERMUTE(dev::bf16_t, 1)
ZAYA_MOE_PERMUTE(dev::bf16_t, 8)
ZAYA_MOE_PERMUTE(int32_t, 1)
ZAYA_MOE_PERMUTE(int32_t, 4)
ZAYA_MOE_UNPERMUTE(float, 1)
ZAYA_MOE_UNPERMUTE(float, 4)
ZAYA_MOE_UNPERMUTE(dev::half_t, 1)
ZAYA_MOE_UNPERMUTE(dev::half_t, 8)
ZAYA_MOE_UNPERMUTE(dev::bf16_t, 1)
ZAYA_MOE_UNPERMUTE(dev::bf16_t, 8)
#undef ZAYA_MOE_PERMUTE
#undef ZAYA_MOE_UNPERMUTE
}  // namespace kernels
}  // namespace zaya
#endif
