// Residual scaling + RMSNorm (DESIGN.md 1.2) and the plain RMSNorm, forward and backward. Device code only.
//
// Types: A (the activation dtype: float, half_t, bf16_t) for branch / normed / grad_normed / grad_branch; everything
// else is fp32 (residual, new residual, the [H] parameters, grad of the residual, the parameter partials).
// All arithmetic is fp32.
//
// Forward, per row (x = branch, r = residual):
//   R      = (x + hb) * hs + (r + rb) * rs            (r absent: (x + hb) * hs; rs absent: 1; rb absent: 0)
//   xr     = float(A(R));  rstd = 1 / sqrt(mean(xr^2) + eps)
//   nhat   = float(A(xr * rstd));  normed = A(w * nhat)
// Backward (roundings are straight-through), dy = grad_normed, dR = grad_new_residual (absent: 0):
//   nh = xr * rstd, dn = dy * w, c = mean(dn * nh), g = dR + rstd * (dn - nh * c)
//   grad_branch = A(g * hs), grad_residual = g * rs
//   partials[p] over the rows of group p: [0] sum g, [1] sum g * x, [2] sum g * r, [3] sum dy * nhat
// Plain RMSNorm: the same with R = x (x in TI, output / rounding type TO).
//
// Launch: one block per row (forward) or per row group (backward: group p owns rows [p*rpg, min(N, (p+1)*rpg))
// and writes partials[p] alone: deterministic, no atomics). blockDim.x: a multiple of 64 from rms_block_size(H)
// (forward, at most 1024) or rms_block_size(H, kRmsBwdMaxThreads) (backward, at most 512). Each thread handles the
// columns tid + k * blockDim.x; the first kRmsCache of them stay in registers between the two passes over the row,
// the rest (H > kRmsCache * blockDim.x) are re-read (backward: their partials accumulate in place in global memory).
#pragma once

#include "compat.cuh"

namespace zaya {
namespace kernels {

using dev::bf16_t;
using dev::half_t;

constexpr int kRmsCache = 8;
constexpr int kRmsMaxThreads = 1024;     // forward kernels
constexpr int kRmsBwdMaxThreads = 512;   // backward kernels: more per-column state in registers

// Launch bounds of the backward kernels. On NVIDIA also "at least 1 block per SM" (the register limit stays
// 65536 / kRmsBwdMaxThreads = 128): without it ptxas may squeeze a backward kernel into 64 registers, for two
// 512-thread blocks per SM, and spill to the stack to get there (rmsnorm_bwd_kernel<half, half> did: 8-byte stack,
// 8 bytes of spill stores). The backward kernels keep too much per-column state for 64 registers.
#if defined(ZAYA_CUDA)
#define ZAYA_RMS_BWD_LAUNCH_BOUNDS __launch_bounds__(kRmsBwdMaxThreads, 1)
#else
#define ZAYA_RMS_BWD_LAUNCH_BOUNDS __launch_bounds__(kRmsBwdMaxThreads)
#endif

// Threads per block for a row of H elements: enough for kRmsCache columns per thread, rounded up to a multiple of
// 64, at most max_threads (kRmsMaxThreads for the forward kernels, kRmsBwdMaxThreads for the backward ones).
inline int rms_block_size(int64_t H, int max_threads = kRmsMaxThreads) {
  int64_t per = (H + kRmsCache - 1) / kRmsCache;
  per = ((per + dev::kBlockMultiple - 1) / dev::kBlockMultiple) * dev::kBlockMultiple;
  if (per < dev::kBlockMultiple) per = dev::kBlockMultiple;
  if (per > max_threads) per = max_threads;
  return static_cast<int>(per);
}

// Number of row groups (partials rows) for the backward kernels: enough blocks to fill a GPU, capped so the
// partials buffer stays at most 2^22 floats per quantity.
inline int64_t rms_bwd_num_partials(int64_t N, int64_t H) {
  int64_t p = N < 1024 ? N : 1024;
  const int64_t cap = (int64_t(1) << 22) / (H > 0 ? H : 1);
  if (p > cap) p = cap;
  return p < 1 ? 1 : p;
}

namespace detail {

// R = (x + hb) * hs + (r + rb) * rs, each operation rounded like PyTorch's (no FMA contraction).
ZAYA_DEVICE float residual_value(float x, const float* __restrict__ r, const float* __restrict__ hs,
                                 const float* __restrict__ hb, const float* __restrict__ rs,
                                 const float* __restrict__ rb, int64_t i) {
  float R = dev::fmul_rn(dev::fadd_rn(x, hb[i]), hs[i]);
  if (r != nullptr) {
    float t = r[i];
    if (rb != nullptr) t = dev::fadd_rn(t, rb[i]);
    if (rs != nullptr) t = dev::fmul_rn(t, rs[i]);
    R = dev::fadd_rn(R, t);
  }
  return R;
}

// Returns v unchanged, but opaque to the optimiser in device code (an empty asm statement that claims to modify it;
// on the host, including the host emulation, the identity). The backward kernels pass the column index through it in
// each of their loops, so that the compiler recomputes cheap per-lane values there instead of keeping many of them
// live across the row loop. Measured on gfx942 (clang-19), where residual_scale_rmsnorm_bwd_kernel had run out of
// SGPRs (106, 35-43 of them spilled to VGPR lanes):
//  - the predicates "cached column k < H" are loop-invariant, so they were hoisted out of the row loop, and AMDGPU
//    keeps a hoisted predicate as a 64-bit lane mask in SGPRs for the whole loop (kRmsCache of them: 16 SGPRs);
//  - loop strength reduction gave every stream of a tail loop (the columns beyond the register cache) its own 64-bit
//    scalar pointer, a copy of the row's base pointer stepped by blockDim.x per iteration (14 streams in the second
//    pass of the residual backward: 28 SGPRs on top of the base pointers).
// On sm_90 it lowers the backward kernels' registers too (residual 128 -> 118-120, rmsnorm 98-106 -> 80-82).
ZAYA_DEVICE int opaque(int v) {
#if defined(ZAYA_HIP) && defined(__HIP_DEVICE_COMPILE__)
  asm volatile("" : "+v"(v));
#elif defined(ZAYA_CUDA) && defined(__CUDA_ARCH__)
  asm volatile("" : "+r"(v));
#endif
  return v;
}

ZAYA_DEVICE int64_t opaque(int64_t v) {
#if defined(ZAYA_HIP) && defined(__HIP_DEVICE_COMPILE__)
  asm volatile("" : "+v"(v));
#elif defined(ZAYA_CUDA) && defined(__CUDA_ARCH__)
  asm volatile("" : "+l"(v));
#endif
  return v;
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------------------------
// residual_scale_rmsnorm forward: grid N, block rms_block_size(H).
// ---------------------------------------------------------------------------------------------------------------
template <typename A>
__global__ void __launch_bounds__(kRmsMaxThreads) residual_scale_rmsnorm_fwd_kernel(
    const A* __restrict__ branch, const float* __restrict__ residual, const float* __restrict__ hidden_scale,
    const float* __restrict__ hidden_bias, const float* __restrict__ residual_scale,
    const float* __restrict__ residual_bias, const float* __restrict__ norm_weight, float eps, int64_t H,
    float* __restrict__ new_residual, A* __restrict__ normed) {
  __shared__ float scratch[dev::kMaxWarps];
  const int64_t row = blockIdx.x;
  const int64_t tid = threadIdx.x;
  const int64_t bs = blockDim.x;
  const A* x = branch + row * H;
  const float* r = residual != nullptr ? residual + row * H : nullptr;
  float* R = new_residual + row * H;
  A* y = normed + row * H;

  float cache[kRmsCache];
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kRmsCache; ++k) {
    const int64_t i = tid + k * bs;
    float xr = 0.0f;
    if (i < H) {
      const float v = detail::residual_value(dev::to_float(x[i]), r, hidden_scale, hidden_bias, residual_scale,
                                             residual_bias, i);
      R[i] = v;
      xr = dev::round_to<A>(v);
    }
    cache[k] = xr;
    ss += xr * xr;
  }
  for (int64_t i = tid + kRmsCache * bs; i < H; i += bs) {
    const float v =
        detail::residual_value(dev::to_float(x[i]), r, hidden_scale, hidden_bias, residual_scale, residual_bias, i);
    R[i] = v;
    const float xr = dev::round_to<A>(v);
    ss += xr * xr;
  }
  ss = dev::block_reduce_sum(ss, scratch);
  const float rstd = 1.0f / sqrtf(ss / static_cast<float>(H) + eps);

#pragma unroll
  for (int k = 0; k < kRmsCache; ++k) {
    const int64_t i = tid + k * bs;
    if (i < H) {
      const float nhat = dev::round_to<A>(cache[k] * rstd);
      y[i] = dev::from_float<A>(norm_weight[i] * nhat);
    }
  }
  for (int64_t i = tid + kRmsCache * bs; i < H; i += bs) {
    const float xr = dev::round_to<A>(R[i]);  // this thread's own write above
    const float nhat = dev::round_to<A>(xr * rstd);
    y[i] = dev::from_float<A>(norm_weight[i] * nhat);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// residual_scale_rmsnorm backward: grid P (row groups of rows_per_group rows), block
// rms_block_size(H, kRmsBwdMaxThreads).
// partials: [P, 4, H] fp32, zero-initialised by the caller (columns beyond the register cache accumulate in place).
// ---------------------------------------------------------------------------------------------------------------
template <typename A>
__global__ void ZAYA_RMS_BWD_LAUNCH_BOUNDS residual_scale_rmsnorm_bwd_kernel(
    const A* __restrict__ grad_normed, const float* __restrict__ grad_new_residual, const A* __restrict__ branch,
    const float* __restrict__ residual, const float* __restrict__ hidden_scale,
    const float* __restrict__ residual_scale, const float* __restrict__ norm_weight,
    const float* __restrict__ new_residual, float eps, int64_t N, int64_t H, int64_t rows_per_group,
    A* __restrict__ grad_branch, float* __restrict__ grad_residual, float* __restrict__ partials) {
  __shared__ float scratch[2 * dev::kMaxWarps];
  // 32-bit indices where they fit: rows (the launcher checks N <= INT32_MAX) and the cached columns
  // (tid + k * bs < kRmsCache * kRmsBwdMaxThreads). Row offsets and the tail columns stay 64-bit.
  const int tid = threadIdx.x;
  const int bs = blockDim.x;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * rows_per_group;
  const int row_begin = static_cast<int>(first_row < N ? first_row : N);
  const int row_end = static_cast<int>(first_row + rows_per_group < N ? first_row + rows_per_group : N);
  // Cached column i = tid + k * bs is in the row iff i < hc (i < kRmsCache * bs always holds).
  const int hc = static_cast<int>(H < int64_t(kRmsCache) * bs ? H : int64_t(kRmsCache) * bs);
  const float inv_h = 1.0f / static_cast<float>(H);
  float* P = partials + static_cast<int64_t>(blockIdx.x) * 4 * H;

  // Per-column constants and accumulators of the cached columns.
  float w_c[kRmsCache], hs_c[kRmsCache], rs_c[kRmsCache];
  float acc_g[kRmsCache], acc_gx[kRmsCache], acc_gr[kRmsCache], acc_w[kRmsCache];
#pragma unroll
  for (int k = 0; k < kRmsCache; ++k) {
    const int i = tid + k * bs;
    const bool in = i < hc;
    w_c[k] = in ? norm_weight[i] : 0.0f;
    hs_c[k] = in ? hidden_scale[i] : 0.0f;
    rs_c[k] = (in && residual_scale != nullptr) ? residual_scale[i] : 1.0f;
    acc_g[k] = acc_gx[k] = acc_gr[k] = acc_w[k] = 0.0f;
  }

  for (int row = row_begin; row < row_end; ++row) {
    const int64_t off = static_cast<int64_t>(row) * H;
    const A* dy = grad_normed + off;
    const float* Rn = new_residual + off;

    // Pass 1: sum xr^2 and sum dn * xr.
    float xr_c[kRmsCache], dy_c[kRmsCache];
    float s_xx = 0.0f, s_dx = 0.0f;
    const int t1 = detail::opaque(tid);
#pragma unroll
    for (int k = 0; k < kRmsCache; ++k) {
      const int i = t1 + k * bs;
      float xr = 0.0f, d = 0.0f;
      if (i < hc) {
        xr = dev::round_to<A>(Rn[i]);
        d = dev::to_float(dy[i]);
      }
      xr_c[k] = xr;
      dy_c[k] = d;
      s_xx += xr * xr;
      s_dx += d * w_c[k] * xr;
    }
    for (int64_t j = tid + kRmsCache * bs; j < H; j += bs) {
      const int64_t i = detail::opaque(j);
      const float xr = dev::round_to<A>(Rn[i]);
      s_xx += xr * xr;
      s_dx += dev::to_float(dy[i]) * norm_weight[i] * xr;
    }
    dev::block_reduce_sum2(s_xx, s_dx, scratch);
    const float rstd = 1.0f / sqrtf(s_xx * inv_h + eps);
    const float c = s_dx * rstd * inv_h;  // mean(dn * nh)

    // Pass 2: gradients and partial sums.
    const float* dR = grad_new_residual != nullptr ? grad_new_residual + off : nullptr;
    const A* x = branch + off;
    const float* r = residual != nullptr ? residual + off : nullptr;
    A* gx = grad_branch + off;
    float* gr = grad_residual != nullptr ? grad_residual + off : nullptr;
    const int t2 = detail::opaque(tid);
#pragma unroll
    for (int k = 0; k < kRmsCache; ++k) {
      const int i = t2 + k * bs;
      if (i < hc) {
        const float nh = xr_c[k] * rstd;
        const float dn = dy_c[k] * w_c[k];
        float g = rstd * (dn - nh * c);
        if (dR != nullptr) g += dR[i];
        gx[i] = dev::from_float<A>(g * hs_c[k]);
        if (gr != nullptr) gr[i] = g * rs_c[k];
        acc_g[k] += g;
        acc_gx[k] += g * dev::to_float(x[i]);
        if (r != nullptr) acc_gr[k] += g * r[i];
        acc_w[k] += dy_c[k] * dev::round_to<A>(nh);
      }
    }
    for (int64_t j = tid + kRmsCache * bs; j < H; j += bs) {
      const int64_t i = detail::opaque(j);
      const float xr = dev::round_to<A>(Rn[i]);
      const float d = dev::to_float(dy[i]);
      const float nh = xr * rstd;
      const float dn = d * norm_weight[i];
      float g = rstd * (dn - nh * c);
      if (dR != nullptr) g += dR[i];
      gx[i] = dev::from_float<A>(g * hidden_scale[i]);
      if (gr != nullptr) gr[i] = g * (residual_scale != nullptr ? residual_scale[i] : 1.0f);
      float* p = P + i;  // the 4 partial sums of column i off one address (4 base pointers: 4 more SGPRs on AMD)
      p[0] += g;
      p[H] += g * dev::to_float(x[i]);
      if (r != nullptr) p[2 * H] += g * r[i];
      p[3 * H] += d * dev::round_to<A>(nh);
    }
  }

  const int t3 = detail::opaque(tid);
#pragma unroll
  for (int k = 0; k < kRmsCache; ++k) {
    const int i = t3 + k * bs;
    if (i < hc) {
      P[i] = acc_g[k];
      P[H + i] = acc_gx[k];
      P[2 * H + i] = acc_gr[k];
      P[3 * H + i] = acc_w[k];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// rmsnorm forward: out = TO(w * float(TO(float(TO(x)) * rstd))); grid N, block rms_block_size(H).
// ---------------------------------------------------------------------------------------------------------------
template <typename TI, typename TO>
__global__ void __launch_bounds__(kRmsMaxThreads) rmsnorm_fwd_kernel(const TI* __restrict__ x_all,
                                                                     const float* __restrict__ weight, float eps,
                                                                     int64_t H, TO* __restrict__ out) {
  __shared__ float scratch[dev::kMaxWarps];
  const int64_t row = blockIdx.x;
  const int64_t tid = threadIdx.x;
  const int64_t bs = blockDim.x;
  const TI* x = x_all + row * H;
  TO* y = out + row * H;

  float cache[kRmsCache];
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kRmsCache; ++k) {
    const int64_t i = tid + k * bs;
    const float xr = i < H ? dev::round_to<TO>(dev::to_float(x[i])) : 0.0f;
    cache[k] = xr;
    ss += xr * xr;
  }
  for (int64_t i = tid + kRmsCache * bs; i < H; i += bs) {
    const float xr = dev::round_to<TO>(dev::to_float(x[i]));
    ss += xr * xr;
  }
  ss = dev::block_reduce_sum(ss, scratch);
  const float rstd = 1.0f / sqrtf(ss / static_cast<float>(H) + eps);

#pragma unroll
  for (int k = 0; k < kRmsCache; ++k) {
    const int64_t i = tid + k * bs;
    if (i < H) y[i] = dev::from_float<TO>(weight[i] * dev::round_to<TO>(cache[k] * rstd));
  }
  for (int64_t i = tid + kRmsCache * bs; i < H; i += bs) {
    const float xr = dev::round_to<TO>(dev::to_float(x[i]));
    y[i] = dev::from_float<TO>(weight[i] * dev::round_to<TO>(xr * rstd));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// rmsnorm backward: grad_x = TI(rstd * (dn - nh * c)) with dn = grad_out * w; partials [P, 1, H]: sum dy * nhat.
// grid P (row groups), block rms_block_size(H, kRmsBwdMaxThreads). partials zero-initialised by the caller.
// ---------------------------------------------------------------------------------------------------------------
template <typename TI, typename TO>
__global__ void ZAYA_RMS_BWD_LAUNCH_BOUNDS rmsnorm_bwd_kernel(
    const TO* __restrict__ grad_out, const TI* __restrict__ x_all, const float* __restrict__ weight, float eps,
    int64_t N, int64_t H, int64_t rows_per_group, TI* __restrict__ grad_x, float* __restrict__ partials) {
  __shared__ float scratch[2 * dev::kMaxWarps];
  // Indexing as in residual_scale_rmsnorm_bwd_kernel.
  const int tid = threadIdx.x;
  const int bs = blockDim.x;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * rows_per_group;
  const int row_begin = static_cast<int>(first_row < N ? first_row : N);
  const int row_end = static_cast<int>(first_row + rows_per_group < N ? first_row + rows_per_group : N);
  const int hc = static_cast<int>(H < int64_t(kRmsCache) * bs ? H : int64_t(kRmsCache) * bs);
  const float inv_h = 1.0f / static_cast<float>(H);
  float* P = partials + static_cast<int64_t>(blockIdx.x) * H;

  float w_c[kRmsCache], acc_w[kRmsCache];
#pragma unroll
  for (int k = 0; k < kRmsCache; ++k) {
    const int i = tid + k * bs;
    w_c[k] = i < hc ? weight[i] : 0.0f;
    acc_w[k] = 0.0f;
  }

  for (int row = row_begin; row < row_end; ++row) {
    const int64_t off = static_cast<int64_t>(row) * H;
    const TO* dy = grad_out + off;
    const TI* x = x_all + off;
    TI* gx = grad_x + off;

    float xr_c[kRmsCache], dy_c[kRmsCache];
    float s_xx = 0.0f, s_dx = 0.0f;
    const int t1 = detail::opaque(tid);
#pragma unroll
    for (int k = 0; k < kRmsCache; ++k) {
      const int i = t1 + k * bs;
      float xr = 0.0f, d = 0.0f;
      if (i < hc) {
        xr = dev::round_to<TO>(dev::to_float(x[i]));
        d = dev::to_float(dy[i]);
      }
      xr_c[k] = xr;
      dy_c[k] = d;
      s_xx += xr * xr;
      s_dx += d * w_c[k] * xr;
    }
    for (int64_t j = tid + kRmsCache * bs; j < H; j += bs) {
      const int64_t i = detail::opaque(j);
      const float xr = dev::round_to<TO>(dev::to_float(x[i]));
      s_xx += xr * xr;
      s_dx += dev::to_float(dy[i]) * weight[i] * xr;
    }
    dev::block_reduce_sum2(s_xx, s_dx, scratch);
    const float rstd = 1.0f / sqrtf(s_xx * inv_h + eps);
    const float c = s_dx * rstd * inv_h;

    const int t2 = detail::opaque(tid);
#pragma unroll
    for (int k = 0; k < kRmsCache; ++k) {
      const int i = t2 + k * bs;
      if (i < hc) {
        const float nh = xr_c[k] * rstd;
        gx[i] = dev::from_float<TI>(rstd * (dy_c[k] * w_c[k] - nh * c));
        acc_w[k] += dy_c[k] * dev::round_to<TO>(nh);
      }
    }
    for (int64_t j = tid + kRmsCache * bs; j < H; j += bs) {
      const int64_t i = detail::opaque(j);
      const float xr = dev::round_to<TO>(dev::to_float(x[i]));
      const float d = dev::to_float(dy[i]);
      const float nh = xr * rstd;
      gx[i] = dev::from_float<TI>(rstd * (d * weight[i] - nh * c));
      P[i] += d * dev::round_to<TO>(nh);
    }
  }

  const int t3 = detail::opaque(tid);
#pragma unroll
  for (int k = 0; k < kRmsCache; ++k) {
    const int i = t3 + k * bs;
    if (i < hc) P[i] = acc_w[k];
  }
}

#undef ZAYA_RMS_BWD_LAUNCH_BOUNDS

}  // namespace kernels
}  // namespace zaya

// ---------------------------------------------------------------------------------------------------------------
// Explicit instantiations of every kernel the launchers use (the compile check defines the macro; so can a .cu file).
// rmsnorm (TI, TO): (float, float), (half, half), (bf16, bf16), (float, half), (float, bf16).
// ---------------------------------------------------------------------------------------------------------------
#if defined(ZAYA_INSTANTIATE_RESIDUAL_RMSNORM)
namespace zaya {
namespace kernels {
#define ZAYA_RRMS_INST_A(A)                                                                                        \
  template __global__ void residual_scale_rmsnorm_fwd_kernel<A>(const A*, const float*, const float*, const float*, \
                                                                const float*, const float*, const float*, float,   \
                                                                int64_t, float*, A*);                              \
  template __global__ void residual_scale_rmsnorm_bwd_kernel<A>(                                                   \
      const A*, const float*, const A*, const float*, const float*, const float*, const float*, const float*, float, \
      int64_t, int64_t, int64_t, A*, float*, float*);
#define ZAYA_RMS_INST(TI, TO)                                                                                \
  template __global__ void rmsnorm_fwd_kernel<TI, TO>(const TI*, const float*, float, int64_t, TO*);          \
  template __global__ void rmsnorm_bwd_kernel<TI, TO>(const TO*, const TI*, const float*, float, int64_t, int64_t, \
                                                      int64_t, TI*, float*);
ZAYA_RRMS_INST_A(float)
ZAYA_RRMS_INST_A(half_t)
ZAYA_RRMS_INST_A(bf16_t)
ZAYA_RMS_INST(float, float)
ZAYA_RMS_INST(half_t, half_t)
ZAYA_RMS_INST(bf16_t, bf16_t)
ZAYA_RMS_INST(float, half_t)
ZAYA_RMS_INST(float, bf16_t)
#undef ZAYA_RRMS_INST_A
#undef ZAYA_RMS_INST
}  // namespace kernels
}  // namespace zaya
#endif
