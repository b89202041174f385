// ZAYA router decode kernel (DESIGN.md 1.3): the whole router of one token per block, one launch. Device code only.
//
// Types: TA (activations: x, r_prev, r) and TW (the router weights), each float, half_t or bf16_t. The [R] vectors
// (gamma, down_b, norm_w, fc1_b, fc2_b) are read in their own dtype, each float, half_t or bf16_t, chosen at run
// time by `vec_dtypes` (router_vec_dtypes below: 2 bits per vector), so a bf16 model's vectors need no conversion
// launch before this one; they are read once per token, so the uniform switch costs nothing. The balancing bias is
// fp32. All arithmetic is fp32. Same precision model as zaya_kernels/reference/router.py: every GEMM input is rounded
// to TW, r is rounded to TA and the norm reads that rounded value.
//
// Per token t (block t):
//   d = Wd x + bd;  r = d (+ gamma * r_prev);  u = norm_w * r * rstd(r)
//   a1 = GELU(W1 u + b1);  a2 = GELU(W2 a1 + b2);  logits = W3 a2;  p = softmax(logits)
//   e* = argmax(p + beta) (ties: lowest index);  w = p[e*]
// Outputs: index int32 [T], weight fp32 [T], r TA [T, R], logits fp32 [T, C] (optional: nullptr skips it).
//
// Launch: grid T (decode: T <= 64), blockDim.x = kRouterThreads. Matrix-vector products run one warp per output row
// (lanes stride over the row with 16-byte loads when the row length and the pointer allow it, then a warp sum), so
// every weight is read once per token, coalesced. Sizes: H <= kRouterMaxH, R <= kRouterMaxR, C <= kRouterMaxC
// (checked by the launcher). Control flow is block-uniform (every thread reaches every warp reduction), as the
// host emulation of compat.cuh requires.
#pragma once

#include "compat.cuh"

namespace zaya {
namespace kernels {

using dev::bf16_t;
using dev::half_t;

constexpr int kRouterThreads = 256;
constexpr int kRouterMaxH = 8192;
constexpr int kRouterMaxR = 512;
constexpr int kRouterMaxC = 256;

// dtype codes of the [R] vectors (the codes of the tests' host emulation drivers: 0 fp32, 1 fp16, 2 bf16)
constexpr int kRouterVecF32 = 0;
constexpr int kRouterVecF16 = 1;
constexpr int kRouterVecBF16 = 2;

// The kernel's vec_dtypes argument: one 2-bit code per vector, gamma in bits 0-1, then down_b, norm_w, fc1_b, fc2_b.
ZAYA_HOST_DEVICE constexpr int router_vec_dtypes(int gamma, int down_b, int norm_w, int fc1_b, int fc2_b) {
  return gamma | (down_b << 2) | (norm_w << 4) | (fc1_b << 6) | (fc2_b << 8);
}

namespace router_detail {

ZAYA_DEVICE float gelu_erf(float z) { return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f)); }

// Element j of an [R] vector stored with dtype `code` (kRouterVec*), as fp32.
ZAYA_DEVICE float load_vec(const void* __restrict__ p, int code, int j) {
  if (code == kRouterVecBF16) return dev::to_float(static_cast<const bf16_t*>(p)[j]);
  if (code == kRouterVecF16) return dev::to_float(static_cast<const half_t*>(p)[j]);
  return static_cast<const float*>(p)[j];
}

// out[j] = sum_k W[j, k] * v[k] for j < rows, W row-major [rows, K] in TW, v in shared memory (fp32).
// One warp per row; the row loop has the same trip count in every warp (block-uniform).
template <typename TW>
ZAYA_DEVICE void matvec(const TW* __restrict__ W, const float* v, int rows, int K, float* out) {
  constexpr int kN = dev::Vec16<TW>::kN;
  const int lane = threadIdx.x % dev::kWarpSize;
  const int warp = threadIdx.x / dev::kWarpSize;
  const int num_warps = blockDim.x / dev::kWarpSize;
  const bool vec = (K % kN == 0) && ((reinterpret_cast<uintptr_t>(W) & 15u) == 0);
  for (int row0 = 0; row0 < rows; row0 += num_warps) {
    const int row = row0 + warp;
    float acc = 0.0f;
    if (row < rows) {
      const TW* w_row = W + static_cast<int64_t>(row) * K;
      if (vec) {
        for (int k = lane * kN; k < K; k += dev::kWarpSize * kN) {
          float w[kN];
          dev::load16<TW>(w_row + k, w);
#pragma unroll
          for (int i = 0; i < kN; ++i) acc += w[i] * v[k + i];
        }
      } else {
        for (int k = lane; k < K; k += dev::kWarpSize) acc += dev::to_float(w_row[k]) * v[k];
      }
    }
    acc = dev::warp_reduce_sum(acc);
    if (row < rows && lane == 0) out[row] = acc;
  }
}

}  // namespace router_detail

template <typename TA, typename TW>
__global__ void __launch_bounds__(kRouterThreads) zaya_router_decode_kernel(
    const TA* __restrict__ x, const TA* __restrict__ r_prev, const void* __restrict__ gamma,
    const TW* __restrict__ down_w, const void* __restrict__ down_b, const void* __restrict__ norm_w,
    const TW* __restrict__ fc1_w, const void* __restrict__ fc1_b, const TW* __restrict__ fc2_w,
    const void* __restrict__ fc2_b, const TW* __restrict__ out_w, const float* __restrict__ balance_bias,
    int32_t* __restrict__ index_out, float* __restrict__ weight_out, TA* __restrict__ r_out,
    float* __restrict__ logits_out, int H, int R, int C, float eps, int vec_dtypes) {
  using router_detail::load_vec;
  __shared__ float xs[kRouterMaxH];
  __shared__ float va[kRouterMaxR];
  __shared__ float vb[kRouterMaxR];
  __shared__ float lg[kRouterMaxC];
  __shared__ float scratch[dev::kMaxWarps];
  const int64_t t = blockIdx.x;
  const int tid = threadIdx.x;
  const int dt_gamma = vec_dtypes & 3, dt_down_b = (vec_dtypes >> 2) & 3, dt_norm_w = (vec_dtypes >> 4) & 3;
  const int dt_fc1_b = (vec_dtypes >> 6) & 3, dt_fc2_b = (vec_dtypes >> 8) & 3;

  // x rounded to the weight dtype (the GEMM input)
  for (int k = tid; k < H; k += blockDim.x) xs[k] = dev::round_to<TW>(dev::to_float(x[t * H + k]));
  __syncthreads();
  router_detail::matvec<TW>(down_w, xs, R, H, va);
  __syncthreads();

  // r = d + bd (+ gamma * r_prev), rounded to TA; the norm statistics of the rounded value
  float sum_sq = 0.0f;
  for (int j = tid; j < R; j += blockDim.x) {
    float r = va[j] + load_vec(down_b, dt_down_b, j);
    if (r_prev != nullptr) r += load_vec(gamma, dt_gamma, j) * dev::to_float(r_prev[t * R + j]);
    const TA ra = dev::from_float<TA>(r);
    r_out[t * R + j] = ra;
    const float rf = dev::to_float(ra);
    va[j] = rf;
    sum_sq += rf * rf;
  }
  sum_sq = dev::block_reduce_sum(sum_sq, scratch);  // synchronises: va is complete
  const float rstd = 1.0f / sqrtf(sum_sq / static_cast<float>(R) + eps);
  for (int j = tid; j < R; j += blockDim.x) vb[j] = dev::round_to<TW>(va[j] * rstd * load_vec(norm_w, dt_norm_w, j));
  __syncthreads();

  router_detail::matvec<TW>(fc1_w, vb, R, R, va);
  __syncthreads();
  for (int j = tid; j < R; j += blockDim.x) va[j] = dev::round_to<TW>(router_detail::gelu_erf(va[j] + load_vec(fc1_b, dt_fc1_b, j)));
  __syncthreads();
  router_detail::matvec<TW>(fc2_w, va, R, R, vb);
  __syncthreads();
  for (int j = tid; j < R; j += blockDim.x) vb[j] = dev::round_to<TW>(router_detail::gelu_erf(vb[j] + load_vec(fc2_b, dt_fc2_b, j)));
  __syncthreads();
  router_detail::matvec<TW>(out_w, vb, C, R, lg);
  __syncthreads();

  // softmax, biased top-1 (ties to the lowest index), unbiased weight: C is small, one thread
  if (tid == 0) {
    float m = lg[0];
    for (int c = 1; c < C; ++c) m = fmaxf(m, lg[c]);
    float s = 0.0f;
    for (int c = 0; c < C; ++c) s += expf(lg[c] - m);
    const float inv = 1.0f / s;
    int best = 0;
    float best_v = expf(lg[0] - m) * inv + balance_bias[0];
    bool has_nan = best_v != best_v;
    for (int c = 1; c < C; ++c) {
      const float v = expf(lg[c] - m) * inv + balance_bias[c];
      has_nan |= v != v;
      if (v > best_v) {  // strict: the lowest index wins ties
        best_v = v;
        best = c;
      }
    }
    if (has_nan) best = C - 1;  // a NaN score: the skip class, as the reference and the Triton kernel choose
    index_out[t] = best;
    weight_out[t] = expf(lg[best] - m) * inv;
    if (logits_out != nullptr) {
      for (int c = 0; c < C; ++c) logits_out[t * C + c] = lg[c];
    }
  }
}

}  // namespace kernels
}  // namespace zaya

#if defined(ZAYA_INSTANTIATE_ROUTER)
namespace zaya {
namespace kernels {
#define ZAYA_ROUTER_INST(TA, TW)                                                                                   \
  template __global__ void zaya_router_decode_kernel<TA, TW>(                                                      \
      const TA*, const TA*, const void*, const TW*, const void*, const void*, const TW*, const void*, const TW*,   \
      const void*, const TW*, const float*, int32_t*, float*, TA*, float*, int, int, int, float, int);
ZAYA_ROUTER_INST(float, float)
ZAYA_ROUTER_INST(half_t, half_t)
ZAYA_ROUTER_INST(bf16_t, bf16_t)
#undef ZAYA_ROUTER_INST
}  // namespace kernels
}  // namespace zaya
#endif
