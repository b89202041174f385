// ZAYA CCA decode kernel (DESIGN.md 1.1 steps 3-8; the contract of zaya_kernels/reference/cca.py
// cca_prepare_decode): one new token for each of B rows, the whole projection step in one launch. Device code only.
//
// Names: n_q query heads, n_kv kv heads (g = n_q / n_kv), head dim D, C = (n_q + n_kv) D channels, depthwise kernel
// k0, grouped kernel k1 (both 1..4, runtime), K = k0 + k1 - 2 conv-state columns, Vh = n_kv D / 2 value channels.
// Per row b with slot s = state_indices[b] (s < 0 or s >= slots: a padded row, zero outputs, states untouched),
// X_t = qk[b] = [Q0 | K0] and X_{t-m} = conv_state[s, :, K - m] (m = 1..K, the raw X columns, oldest first):
//   Y_{t-j} = round_A(b0 + sum_{j0<k0} w0[:, j0] X_{t-j-(k0-1-j0)})                 j = 0 .. k1-1 (depthwise)
//     (a fresh sequence's zero state gives Y_{t-j} = b0 for t-j < 0, not 0: the b0 subtlety of DESIGN.md 1.1)
//   Z_t = b1 + sum_{j1<k1} round_A(W1[:, :, j1]) Y_{t-(k1-1-j1)}                    per head, D x D (grouped)
//   Q[h] = Z[h] + (Q0[h] + K0[h / g]) / 2;  K[j] = Z[n_q + j] + mean_m (Q0[g j + m] + K0[j]) / 2
//   Qhat = sqrt(D) Q / max(|Q|, eps);  Khat_j = temp_j sqrt(D) K_j / max(|K_j|, eps)      eps = finfo(A).eps
//   NeoX RoPE on the first R = rotary_dim dims: angle_i = pos * inv_freq[i] (i < R/2, inv_freq fp32 from the host),
//     out[i] = x[i] cos - x[i + R/2] sin,  out[i + R/2] = x[i + R/2] cos + x[i] sin;  dims >= R untouched
//   V[b] = concat(v_current[b], value_state[s]) viewed [n_kv, D]  (value shift)
// then the states move one token on: conv_state[s, :, :] = (X_{t-K+1} .. X_t), value_state[s] = v_delayed[b].
// All arithmetic is fp32; Y and the grouped-conv weights are rounded to A like the reference; outputs rounded to A.
//
// Types: TA (activations: qk, v_current, v_delayed, q, k, v), TW (every weight: w0, b0, w1, b1, temperature; TA or
// float), TS (conv_state and value_state, one dtype: float or TA). Index tensors (positions, state_indices) are int32
// or int64 (runtime flags). Offsets are 32-bit: every tensor (a row-strided input: its span) has < 2^31 elements
// (checked by the launcher).
// Layouts: qk [B, C], v_current, v_delayed [B, Vh] row-strided (last dim contiguous, rows qk_stride / vc_stride /
// vd_stride elements apart: column slices of one stacked projection output; read element by element, so any stride
// works), all others contiguous: w0 [C, k0]; b0, b1 [C]; w1 [C, D, k1];
// temperature [n_kv]; inv_freq fp32 [R/2]; conv_state [slots, C, K]; value_state [slots, Vh]; q [B, n_q, D];
// k, v [B, n_kv, D].
//
// Launch: 1-D grid of (n_q + n_kv) * cdiv(B, kCcaRows) blocks, block b = head b % heads of the row tile b / heads
// (kCcaRows rows), blockDim.x = kCcaThreads (any multiple of 64 works). Each head is one conv group, so a block owns
// its head's channels of its rows' slots: the conv-state shift and the value-state update are done in place by the
// thread that read the element, with no other block touching it (rows must not share a slot).
//   phase 1 (thread per (row, channel)): Y taps into shared ys [rows, D * k1] (laid out like a W1 row: i * k1 + j1),
//     the conv-state shift, b1 + coupling residual into shared zs [rows, D];
//   phase 2 (warp per output channel, kCcaOutUnroll channels per warp at once): Z += W1 row . ys for all rows, W1
//     read once per block with 16-byte loads (coalesced along the row), the kCcaOutUnroll * kCcaRows partial sums
//     reduced across the warp by recursive halving (31 shuffles for 32 sums);
//   phase 3 (warp per row): the norm (warp sum), temperature, RoPE and the q / k store;
//   phase 4 (kv heads, thread per (row, channel)): V and the value-state update (last, so that its pointers are not
//     live across phases 1-2).
// Registers (gpu_compile_check): no spills on gfx942 or sm_90 (the 32-byte sm_90 stack frame is sinf/cosf's
// large-argument reduction, not a spill), the kWriteCache variants included (gfx942: the same 106 SGPRs and VGPRs
// as without). gfx942 uses all 106 SGPRs: 64-bit offsets or more live uniform values in phase 1 made it spill SGPRs,
// hence the 32-bit offsets and the phase order.
// Sizes: D <= kCcaMaxHeadDim, D * k1 <= kCcaMaxConvLen (checked by the launcher). Shared memory ~40 KB. No atomics,
// no host synchronisation. Control flow around __syncthreads and the warp shuffles is block-uniform, as the host
// emulation of compat.cuh requires.
// Paged KV cache (template flag kWriteCache; with false the `cache` argument is unused and the kernel is the one
// without the feature): kv-head blocks also store k (phase 3) and v (phase 4) into k_cache / v_cache
// [num_blocks, block_size, n_kv, D] (TA, last dim contiguous, 64-bit element strides) at slot c = slot_mapping[b]:
// block c / block_size, offset c % block_size. Rows without a state slot, negative slots and slots >= num_blocks *
// block_size write nothing. The setup step turns each row's slot into the row's k / v cache pointers in shared
// memory, so that phases 3-4 need no further scalar registers (gfx942's SGPR file is full). Likewise it turns the
// row strides of qk, v_current, v_delayed into each row's pointers (64-bit arithmetic, shared memory) for phases 1
// and 4: kept as scalars, the three strides made gfx942 spill SGPRs.
#pragma once

#include "compat.cuh"

namespace zaya {
namespace kernels {

using dev::bf16_t;
using dev::half_t;

constexpr int kCcaThreads = 256;
constexpr int kCcaRows = 8;         // token rows per block: each W1 element read feeds this many rows
constexpr int kCcaOutUnroll = 4;    // output channels per warp per step (independent weight loads in flight)
constexpr int kCcaMaxKernel = 4;    // k0, k1 <= 4
constexpr int kCcaMaxHeadDim = 256;
constexpr int kCcaMaxConvLen = 1024;  // D * k1

// At least one block per SM: without the minimum, ptxas caps the fp32 variant at 64 registers and spills.
#if defined(ZAYA_HOST_EMULATION)
#define ZAYA_CCA_LAUNCH_BOUNDS
#else
#define ZAYA_CCA_LAUNCH_BOUNDS __launch_bounds__(kCcaThreads, 1)
#endif

namespace cca_detail {

// finfo(A).eps: the norm's clamp
template <typename T>
struct Eps;
template <>
struct Eps<float> {
  static constexpr float value = 1.1920928955078125e-07f;  // 2^-23
};
template <>
struct Eps<half_t> {
  static constexpr float value = 9.765625e-04f;  // 2^-10
};
template <>
struct Eps<bf16_t> {
  static constexpr float value = 7.8125e-03f;  // 2^-7
};

// A grouped-conv weight (loaded from TW as float) as the reference uses it: rounded to the activation dtype (the
// identity when TW is TA).
template <typename TA, typename TW>
struct ConvWeight {
  static ZAYA_DEVICE float apply(float w) { return dev::round_to<TA>(w); }
};
template <typename T>
struct ConvWeight<T, T> {
  static ZAYA_DEVICE float apply(float w) { return w; }
};

ZAYA_DEVICE int64_t load_index(const void* p, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// Sums each of the N values of v over the warp (N a power of two <= kWarpSize) by recursive halving: at every level a
// lane keeps half of its values, sends the other half to its partner and adds what it receives, so N - 1 shuffles
// (plus log2(kWarpSize / N) for the rest of the butterfly) instead of N log2(kWarpSize). Afterwards v[0] of lane l
// holds the total of value l / (kWarpSize / N). Every lane must call it (block-uniform: it shuffles). Templates, not
// loops, so every array index is a compile-time constant (the values stay in registers).
template <int N, int Count, int Offset>
struct HalvingReduce {
  static ZAYA_DEVICE void run(float (&v)[N], int lane) {
    constexpr int kHalf = Count / 2;
    const bool upper = (lane & Offset) != 0;
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const float send = upper ? v[i] : v[i + kHalf];
      const float keep = upper ? v[i + kHalf] : v[i];
      v[i] = keep + dev::shfl_xor(send, Offset);
    }
    HalvingReduce<N, kHalf, Offset / 2>::run(v, lane);
  }
};
template <int N, int Offset>
struct HalvingReduce<N, 1, Offset> {
  static ZAYA_DEVICE void run(float (&v)[N], int) {
#pragma unroll
    for (int offset = Offset; offset > 0; offset /= 2) v[0] += dev::shfl_xor(v[0], offset);
  }
};

template <int N>
ZAYA_DEVICE void warp_reduce_transpose(float (&v)[N]) {
  static_assert(N >= 1 && (N & (N - 1)) == 0 && N <= 32, "N must be a power of two <= 32");
  HalvingReduce<N, N, dev::kWarpSize / 2>::run(v, threadIdx.x % dev::kWarpSize);
}

// zs[r, o] += sum_l W1h[o, l] ys[r, l] for o < D, r < kCcaRows, l < L = D k1 (W1h: the head's rows of W1, [D, L]).
// Warp w handles the channels o = o0 + u * num_warps + w (u < kCcaOutUnroll) of every step o0; the step count is the
// same in every warp (block-uniform).
template <typename TA, typename TW>
ZAYA_DEVICE void grouped_conv(const TW* __restrict__ w1_head, const float* ys, int D, int L, bool vec, float* zs) {
  constexpr int kU = kCcaOutUnroll;
  constexpr int kR = kCcaRows;
  constexpr int kN = dev::Vec16<TW>::kN;
  constexpr int kSums = kU * kR;
  const int lane = threadIdx.x % dev::kWarpSize;
  const int warp = threadIdx.x / dev::kWarpSize;
  const int num_warps = blockDim.x / dev::kWarpSize;
  for (int o0 = 0; o0 < D; o0 += num_warps * kU) {
    float acc[kSums];
#pragma unroll
    for (int i = 0; i < kSums; ++i) acc[i] = 0.0f;
    if (vec) {
      for (int l = lane * kN; l < L; l += dev::kWarpSize * kN) {
        float w[kU][kN];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int o = o0 + u * num_warps + warp;
          if (o < D) {
            dev::load16<TW>(w1_head + o * L + l, w[u]);
#pragma unroll
            for (int i = 0; i < kN; ++i) w[u][i] = ConvWeight<TA, TW>::apply(w[u][i]);
          } else {
#pragma unroll
            for (int i = 0; i < kN; ++i) w[u][i] = 0.0f;
          }
        }
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          float y[kN];
#pragma unroll
          for (int i = 0; i < kN; ++i) y[i] = ys[r * L + l + i];
#pragma unroll
          for (int u = 0; u < kU; ++u) {
#pragma unroll
            for (int i = 0; i < kN; ++i) acc[u * kR + r] += w[u][i] * y[i];
          }
        }
      }
    } else {
      for (int l = lane; l < L; l += dev::kWarpSize) {
        float w[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int o = o0 + u * num_warps + warp;
          w[u] = o < D ? ConvWeight<TA, TW>::apply(dev::to_float(w1_head[o * L + l])) : 0.0f;
        }
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          const float y = ys[r * L + l];
#pragma unroll
          for (int u = 0; u < kU; ++u) acc[u * kR + r] += w[u] * y;
        }
      }
    }
    warp_reduce_transpose<kSums>(acc);
    constexpr int kGroup = dev::kWarpSize / kSums;  // lanes holding the same total
    const int idx = lane / kGroup;
    const int u = idx / kR, r = idx % kR;
    const int o = o0 + u * num_warps + warp;
    if (lane % kGroup == 0 && o < D) zs[r * D + o] += acc[0];
  }
}

}  // namespace cca_detail

// The paged KV cache of cca_prepare_decode_kernel<..., kWriteCache = true> (ignored with false).
template <typename TA>
struct CcaPagedCache {
  const void* slot_mapping = nullptr;  // [B] int32 or int64 (slot_int64): block * block_size + offset; < 0: skip
  TA* k_cache = nullptr;               // [num_blocks, block_size, n_kv, D], last dim contiguous
  TA* v_cache = nullptr;
  int64_t k_stride_block = 0, k_stride_slot = 0, k_stride_head = 0;  // element strides of dims 0, 1, 2
  int64_t v_stride_block = 0, v_stride_slot = 0, v_stride_head = 0;
  int64_t num_cache_slots = 0;  // num_blocks * block_size
  int block_size = 1;
  int slot_int64 = 0;
};

template <typename TA, typename TW, typename TS, bool kWriteCache = false>
__global__ void ZAYA_CCA_LAUNCH_BOUNDS cca_prepare_decode_kernel(
    const TA* __restrict__ qk, const TA* __restrict__ v_current, const TA* __restrict__ v_delayed,
    const TW* __restrict__ conv0_w, const TW* __restrict__ conv0_b, const TW* __restrict__ conv1_w,
    const TW* __restrict__ conv1_b, const TW* __restrict__ temperature, const void* __restrict__ positions,
    const float* __restrict__ inv_freq, TS* __restrict__ conv_state, TS* __restrict__ value_state,
    const void* __restrict__ state_indices, TA* __restrict__ q_out, TA* __restrict__ k_out, TA* __restrict__ v_out,
    int B, int num_slots, int num_q, int num_kv, int D, int k0, int k1, int rotary_dim, int positions_int64,
    int indices_int64, int qk_stride, int vc_stride, int vd_stride, CcaPagedCache<TA> cache) {
  __shared__ float ys[kCcaRows * kCcaMaxConvLen];  // [rows, D * k1]: Y taps, input-major like a W1 row
  __shared__ float zs[kCcaRows * kCcaMaxHeadDim];  // [rows, D]: Z + b1 + coupling residual
  __shared__ int s_slot[kCcaRows];                 // the row's slot; -1: padded row; -2: past the batch
  __shared__ TA* s_k_cache[kCcaRows];  // kWriteCache: the row's k / v cache row of this kv head, or null (no write)
  __shared__ TA* s_v_cache[kCcaRows];
  // The row's qk / v_current / v_delayed rows (row-strided inputs), set up once: phases 1 and 4 then need neither
  // the strides nor the base pointers in scalar registers (with them gfx942 spilled SGPRs to VGPR lanes)
  __shared__ const TA* s_x[kCcaRows];
  __shared__ const TA* s_vc[kCcaRows];
  __shared__ const TA* s_vd[kCcaRows];
  constexpr int kR = kCcaRows;
  const int heads = num_q + num_kv;
  const int head = blockIdx.x % heads;
  const int row0 = (blockIdx.x / heads) * kR;
  const bool is_q = head < num_q;
  const int tid = threadIdx.x;
  const int C = heads * D;
  const int K = k0 + k1 - 2;
  const int L = D * k1;
  const int group = num_q / num_kv;
  const int value_dim = num_kv * D / 2;

  if (tid < kR) {
    const int row = row0 + tid;
    int slot = -2;
    if (row < B) {
      const int64_t index = cca_detail::load_index(state_indices, indices_int64 != 0, row);
      // padded row; an index >= slots (only rejected on CPU, where values are checked for free) counts as padding
      slot = index < 0 || index >= num_slots ? -1 : static_cast<int>(index);
    }
    s_slot[tid] = slot;
    const bool in_batch = row < B;
    s_x[tid] = in_batch ? qk + static_cast<int64_t>(row) * qk_stride : nullptr;
    s_vc[tid] = in_batch ? v_current + static_cast<int64_t>(row) * vc_stride : nullptr;
    s_vd[tid] = in_batch ? v_delayed + static_cast<int64_t>(row) * vd_stride : nullptr;
    if constexpr (kWriteCache) {
      TA* k_row = nullptr;
      TA* v_row = nullptr;
      if (slot >= 0 && !is_q) {
        const int64_t c = cca_detail::load_index(cache.slot_mapping, cache.slot_int64 != 0, row);
        if (c >= 0 && c < cache.num_cache_slots) {  // negative: vLLM's padding; >= the pool: skipped (unchecked)
          const int64_t block = c / cache.block_size;
          const int64_t offset = c - block * cache.block_size;
          const int64_t j = head - num_q;
          k_row = cache.k_cache + block * cache.k_stride_block + offset * cache.k_stride_slot + j * cache.k_stride_head;
          v_row = cache.v_cache + block * cache.v_stride_block + offset * cache.v_stride_slot + j * cache.v_stride_head;
        }
      }
      s_k_cache[tid] = k_row;
      s_v_cache[tid] = v_row;
    }
  }
  __syncthreads();

  // Phase 1, thread per (row r, channel i of the head):
  // - the Y taps of input channel i, then the conv-state shift of that channel (the (slot, channel) state elements
  //   are read and then written by this one thread, all reads first);
  // - Z starts as b1 + the mean-coupling residual of output channel i (a q head is a group of one).
  {
    const int kv_head = is_q ? head / group : head - num_q;
    const int first_q = is_q ? head : kv_head * group;
    const int count = is_q ? 1 : group;
    const float inv_count = 1.0f / static_cast<float>(count);
    for (int e = tid; e < kR * D; e += blockDim.x) {
      const int r = e / D;
      const int i = e - r * D;
      const int slot = s_slot[r];
      float* y_row = ys + r * L + i * k1;
      if (slot < 0) {  // padded row or past the batch: zero Y and Z (phase 3 then stores zeros or nothing)
        for (int j1 = 0; j1 < k1; ++j1) y_row[j1] = 0.0f;
        zs[e] = 0.0f;
        continue;
      }
      const TA* x = s_x[r];
      const int c = head * D + i;
      const float x_now = dev::to_float(x[c]);
      TS* state = conv_state + (slot * C + c) * K;
      const float b0 = dev::to_float(conv0_b[c]);
      for (int j1 = 0; j1 < k1; ++j1) {  // Y_{t - (k1 - 1 - j1)} = b0 + sum_j0 w0[c, j0] X_{t - m}
        float y = b0;
        for (int j0 = 0; j0 < k0; ++j0) {
          const int m = K - j0 - j1;
          y += dev::to_float(conv0_w[c * k0 + j0]) * (m == 0 ? x_now : dev::to_float(state[K - m]));
        }
        y_row[j1] = dev::round_to<TA>(y);
      }
      for (int col = 0; col + 1 < K; ++col) state[col] = state[col + 1];  // column col + 1 read before written
      if (K > 0) state[K - 1] = dev::from_float<TS>(x_now);

      const float k_part = dev::to_float(x[(num_q + kv_head) * D + i]);
      float total = 0.0f;
      for (int m = 0; m < count; ++m) total += (dev::to_float(x[(first_q + m) * D + i]) + k_part) * 0.5f;
      zs[e] = dev::to_float(conv1_b[c]) + total * inv_count;
    }
  }
  __syncthreads();

  // Phase 2: the grouped conv, W1 read once for all rows of the tile.
  {
    constexpr int kN = dev::Vec16<TW>::kN;
    const bool vec = (L % kN == 0) && ((reinterpret_cast<uintptr_t>(conv1_w) & 15u) == 0);
    cca_detail::grouped_conv<TA, TW>(conv1_w + head * D * L, ys, D, L, vec, zs);
  }
  __syncthreads();

  // Phase 3: warp per row: norm, temperature, RoPE, store (zeros for padded rows).
  {
    const int lane = tid % dev::kWarpSize;
    const int warp = tid / dev::kWarpSize;
    const int num_warps = blockDim.x / dev::kWarpSize;
    const float head_scale = sqrtf(static_cast<float>(D));
    const float temp = is_q ? 1.0f : dev::to_float(temperature[head - num_q]);
    const int half = rotary_dim / 2;
    for (int r0 = 0; r0 < kR; r0 += num_warps) {
      const int r = r0 + warp;
      float sum_sq = 0.0f;
      if (r < kR) {
        for (int o = lane; o < D; o += dev::kWarpSize) {
          const float z = zs[r * D + o];
          sum_sq += z * z;
        }
      }
      sum_sq = dev::warp_reduce_sum(sum_sq);
      const int slot = r < kR ? s_slot[r] : -2;
      if (slot == -2) continue;
      const int row = row0 + r;
      TA* out = is_q ? q_out + (row * num_q + head) * D : k_out + (row * num_kv + (head - num_q)) * D;
      if (slot < 0) {
        for (int o = lane; o < D; o += dev::kWarpSize) out[o] = dev::from_float<TA>(0.0f);
        continue;
      }
      const float scale = head_scale / fmaxf(sqrtf(sum_sq), cca_detail::Eps<TA>::value);
      const float pos = static_cast<float>(cca_detail::load_index(positions, positions_int64 != 0, row));
      const float* z = zs + r * D;
      if constexpr (kWriteCache) {  // the same values, also into the k cache row (null: q head or no write)
        TA* const cache_out = s_k_cache[r];
        for (int i = lane; i < half; i += dev::kWarpSize) {
          const float lo = z[i] * scale * temp;
          const float hi = z[i + half] * scale * temp;
          const float angle = pos * inv_freq[i];
          const float cs = cosf(angle), sn = sinf(angle);
          const TA a = dev::from_float<TA>(lo * cs - hi * sn);
          const TA b = dev::from_float<TA>(hi * cs + lo * sn);
          out[i] = a;
          out[i + half] = b;
          if (cache_out != nullptr) {
            cache_out[i] = a;
            cache_out[i + half] = b;
          }
        }
        for (int o = rotary_dim + lane; o < D; o += dev::kWarpSize) {
          const TA a = dev::from_float<TA>(z[o] * scale * temp);
          out[o] = a;
          if (cache_out != nullptr) cache_out[o] = a;
        }
      } else {
        for (int i = lane; i < half; i += dev::kWarpSize) {
          const float lo = z[i] * scale * temp;
          const float hi = z[i + half] * scale * temp;
          const float angle = pos * inv_freq[i];
          const float cs = cosf(angle), sn = sinf(angle);
          out[i] = dev::from_float<TA>(lo * cs - hi * sn);
          out[i + half] = dev::from_float<TA>(hi * cs + lo * sn);
        }
        for (int o = rotary_dim + lane; o < D; o += dev::kWarpSize) out[o] = dev::from_float<TA>(z[o] * scale * temp);
      }
    }
  }

  // Phase 4 (kv head j), thread per (row, channel d): V = concat(Vc_t, Vd_{t-1}) at flat value channel f = j D + d,
  // and the value-state update of the delayed channel it read (f >= Vh), by the reading thread (no other block
  // touches it). After the conv so that its pointers are not live across phases 1-2 (scalar registers).
  if (!is_q) {
    const int j = head - num_q;
    for (int e = tid; e < kR * D; e += blockDim.x) {
      const int r = e / D;
      const int d = e - r * D;
      const int slot = s_slot[r];
      if (slot == -2) continue;
      const int row = row0 + r;
      const int f = j * D + d;
      float val = 0.0f;
      if (slot >= 0) {
        if (f < value_dim) {
          val = dev::to_float(s_vc[r][f]);
        } else {
          TS* vs = value_state + slot * value_dim + (f - value_dim);
          val = dev::to_float(*vs);
          *vs = dev::from_float<TS>(dev::to_float(s_vd[r][f - value_dim]));
        }
      }
      v_out[(row * num_kv + j) * D + d] = dev::from_float<TA>(val);
      if constexpr (kWriteCache) {
        TA* const cache_row = s_v_cache[r];  // null: padded row or no write
        if (cache_row != nullptr) cache_row[d] = dev::from_float<TA>(val);
      }
    }
  }
}

}  // namespace kernels
}  // namespace zaya

#if defined(ZAYA_INSTANTIATE_CCA)
namespace zaya {
namespace kernels {
#define ZAYA_CCA_INST(TA, TW, TS, PAGED)                                                                           \
  template __global__ void cca_prepare_decode_kernel<TA, TW, TS, PAGED>(                                           \
      const TA*, const TA*, const TA*, const TW*, const TW*, const TW*, const TW*, const TW*, const void*,         \
      const float*, TS*, TS*, const void*, TA*, TA*, TA*, int, int, int, int, int, int, int, int, int, int, int,   \
      int, int, CcaPagedCache<TA>);
#define ZAYA_CCA_INST_BOTH(TA, TW, TS) ZAYA_CCA_INST(TA, TW, TS, false) ZAYA_CCA_INST(TA, TW, TS, true)
ZAYA_CCA_INST_BOTH(float, float, float)
ZAYA_CCA_INST_BOTH(half_t, half_t, half_t)
ZAYA_CCA_INST_BOTH(half_t, half_t, float)
ZAYA_CCA_INST_BOTH(half_t, float, half_t)
ZAYA_CCA_INST_BOTH(half_t, float, float)
ZAYA_CCA_INST_BOTH(bf16_t, bf16_t, bf16_t)
ZAYA_CCA_INST_BOTH(bf16_t, bf16_t, float)
ZAYA_CCA_INST_BOTH(bf16_t, float, bf16_t)
ZAYA_CCA_INST_BOTH(bf16_t, float, float)
#undef ZAYA_CCA_INST_BOTH
#undef ZAYA_CCA_INST
}  // namespace kernels
}  // namespace zaya
#endif
