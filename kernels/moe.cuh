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
      tiles += (n + block_m - 1) / block_m;
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

}  // namespace kernels
}  // namespace zaya

#if defined(ZAYA_INSTANTIATE_MOE)
namespace zaya {
namespace kernels {
template __global__ void moe_dispatch_kernel<kMoeDispatchThreads>(const int32_t*, int, int, int, int, int32_t*,
                                                                  int32_t*, int32_t*, int32_t*, int32_t*, int32_t*);
}  // namespace kernels
}  // namespace zaya
#endif
