// The CUDA/HIP common subset used by every kernel in kernels/: one header so the same device code builds with
// nvcc (sm_90), hipcc / torch's hipified build (gfx942, gfx950) and plain `clang -x hip`.
//
// - kWarpSize: 64 on AMD CDNA (wave64), 32 on NVIDIA (and on RDNA wave32 device passes).
// - warp_reduce_sum / block_reduce_sum / block_reduce_sum2: deterministic sums (fixed order, no atomics).
// - bf16_t: a uint16_t storage struct with bit-level round-to-nearest-even conversion (no hip_bf16.h needed: the
//   HIP 5.2 headers lack it), bit-identical to c10::BFloat16 (NaN -> 0x7FC0). The same struct is used on CUDA.
// - half_t: IEEE binary16 storage: __half on CUDA, the clang builtin _Float16 on HIP (so torch's
//   __HIP_NO_HALF_CONVERSIONS__ does not matter).
// - to_float / from_float<T> / round_to<T>: conversions for float, half_t, bf16_t.
// - fadd_rn / fmul_rn: fp32 add / multiply that are never contracted into an FMA, for elementwise results that must
//   match PyTorch bit for bit.
//
// No torch dependency. Block-level helpers require blockDim.x to be a multiple of kWarpSize (use multiples of 64).
#pragma once

#include <stdint.h>

#if defined(ZAYA_HOST_EMULATION)
// Test-only: runs the kernels on CPU threads (one std::thread per GPU thread, blocks one after another, warps of
// ZAYA_EMU_WARP_SIZE threads emulated through shared memory: 32 as on NVIDIA, the default, or 64 as AMD's wave64 on
// gfx942 / gfx950). Plain C++20 host compilers; see zaya_kernels/tools/gpu_compile_check.py.
#include <barrier>
#include <bit>
#include <cmath>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(n)
struct zaya_emu_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local zaya_emu_dim3 threadIdx;
inline zaya_emu_dim3 blockIdx, blockDim, gridDim;
inline std::barrier<>* zaya_emu_barrier = nullptr;
inline void __syncthreads() { zaya_emu_barrier->arrive_and_wait(); }
// Runs kernel(args...) on a 1-D grid of `grid` blocks of `block` threads.
template <typename F>
void zaya_emu_launch(unsigned grid, unsigned block, F&& kernel) {
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b;
    std::barrier<> bar(block);
    zaya_emu_barrier = &bar;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&kernel, t] {
        threadIdx.x = t;
        kernel();
      });
    }
    for (auto& th : threads) th.join();
    zaya_emu_barrier = nullptr;
  }
}
#elif defined(__HIP__) || defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__) || defined(__HIP_PLATFORM_HCC__)
#define ZAYA_HIP 1
#include <hip/hip_runtime.h>
#else
#define ZAYA_CUDA 1
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#endif

#define ZAYA_DEVICE __device__ __forceinline__
#define ZAYA_HOST_DEVICE __host__ __device__ __forceinline__

namespace zaya {
namespace dev {

// ---------------------------------------------------------------------------------------------------------------
// Warp size
// ---------------------------------------------------------------------------------------------------------------
#if defined(ZAYA_HOST_EMULATION)
#if !defined(ZAYA_EMU_WARP_SIZE)
#define ZAYA_EMU_WARP_SIZE 32
#endif
static_assert(ZAYA_EMU_WARP_SIZE == 32 || ZAYA_EMU_WARP_SIZE == 64, "the emulated warp is 32 or 64 threads");
constexpr int kWarpSize = ZAYA_EMU_WARP_SIZE;
#elif defined(ZAYA_HIP)
#if defined(__AMDGCN_WAVEFRONT_SIZE__)
constexpr int kWarpSize = __AMDGCN_WAVEFRONT_SIZE__;
#elif defined(__AMDGCN_WAVEFRONT_SIZE)
constexpr int kWarpSize = __AMDGCN_WAVEFRONT_SIZE;
#else
constexpr int kWarpSize = 64;  // host pass: the CDNA targets this package builds for (gfx942, gfx950) are wave64
#endif
#else
constexpr int kWarpSize = 32;
#endif
// Upper bound of warps per block for a 1024-thread block (32 on NVIDIA, 16 on wave64): size of reduction scratch.
constexpr int kMaxWarps = 32;
// Every block-level helper needs blockDim.x % kBlockMultiple == 0 (valid for both warp sizes).
constexpr int kBlockMultiple = 64;

// ---------------------------------------------------------------------------------------------------------------
// Non-contracted fp32 arithmetic (PyTorch's elementwise ops round after every operation)
// ---------------------------------------------------------------------------------------------------------------
#if defined(ZAYA_HOST_EMULATION)
ZAYA_DEVICE float fadd_rn(float a, float b) { return a + b; }  // build with -ffp-contract=off
ZAYA_DEVICE float fmul_rn(float a, float b) { return a * b; }
#elif defined(ZAYA_HIP)
ZAYA_DEVICE float fadd_rn(float a, float b) {
#pragma clang fp contract(off)
  return a + b;
}
ZAYA_DEVICE float fmul_rn(float a, float b) {
#pragma clang fp contract(off)
  return a * b;
}
#else
ZAYA_DEVICE float fadd_rn(float a, float b) { return __fadd_rn(a, b); }
ZAYA_DEVICE float fmul_rn(float a, float b) { return __fmul_rn(a, b); }
#endif

// ---------------------------------------------------------------------------------------------------------------
// 16-bit floating point storage types and conversions
// ---------------------------------------------------------------------------------------------------------------
struct alignas(2) bf16_t {
  uint16_t bits;
};

#if defined(ZAYA_HIP) || defined(ZAYA_HOST_EMULATION)
typedef _Float16 half_t;
#else
typedef __half half_t;
#endif

static_assert(sizeof(bf16_t) == 2, "bf16_t must be 2 bytes");
static_assert(sizeof(half_t) == 2, "half_t must be 2 bytes");

ZAYA_DEVICE uint32_t float_as_bits(float f) {
#if defined(ZAYA_HIP) || defined(ZAYA_HOST_EMULATION)
  return __builtin_bit_cast(uint32_t, f);
#else
  return __float_as_uint(f);
#endif
}

ZAYA_DEVICE float bits_as_float(uint32_t u) {
#if defined(ZAYA_HIP) || defined(ZAYA_HOST_EMULATION)
  return __builtin_bit_cast(float, u);
#else
  return __uint_as_float(u);
#endif
}

ZAYA_DEVICE float bf16_to_float(bf16_t v) { return bits_as_float(static_cast<uint32_t>(v.bits) << 16); }

// Round to nearest even, exactly as c10::BFloat16 (round_to_nearest_even) does; NaN becomes the canonical 0x7FC0.
ZAYA_DEVICE bf16_t float_to_bf16(float f) {
  const uint32_t u = float_as_bits(f);
  bf16_t out;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out.bits = 0x7fc0u;
  } else {
    out.bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return out;
}

ZAYA_DEVICE float half_to_float(half_t h) {
#if defined(ZAYA_HIP) || defined(ZAYA_HOST_EMULATION)
  return static_cast<float>(h);
#else
  return __half2float(h);
#endif
}

ZAYA_DEVICE half_t float_to_half(float f) {
#if defined(ZAYA_HIP) || defined(ZAYA_HOST_EMULATION)
  return static_cast<_Float16>(f);  // IEEE round to nearest even
#else
  return __float2half_rn(f);
#endif
}

ZAYA_DEVICE float to_float(float v) { return v; }
ZAYA_DEVICE float to_float(half_t v) { return half_to_float(v); }
ZAYA_DEVICE float to_float(bf16_t v) { return bf16_to_float(v); }

// 16 bytes of T (kN = 16 / sizeof(T) elements, 16-byte aligned) loaded in one access, as floats.
template <typename T>
struct Vec16 {
  static constexpr int kN = 16 / sizeof(T);
};

template <typename T>
ZAYA_DEVICE void load16(const T* __restrict__ p, float* out) {
  struct alignas(16) Chunk {
    T v[Vec16<T>::kN];
  };
  const Chunk c = *reinterpret_cast<const Chunk*>(p);
#pragma unroll
  for (int i = 0; i < Vec16<T>::kN; ++i) out[i] = to_float(c.v[i]);
}

template <typename T>
struct FromFloat;
template <>
struct FromFloat<float> {
  static ZAYA_DEVICE float apply(float v) { return v; }
};
template <>
struct FromFloat<half_t> {
  static ZAYA_DEVICE half_t apply(float v) { return float_to_half(v); }
};
template <>
struct FromFloat<bf16_t> {
  static ZAYA_DEVICE bf16_t apply(float v) { return float_to_bf16(v); }
};

// float -> T with round to nearest even.
template <typename T>
ZAYA_DEVICE T from_float(float v) {
  return FromFloat<T>::apply(v);
}

// float(T(v)): v rounded to T's precision, returned as float (identity for T = float).
template <typename T>
ZAYA_DEVICE float round_to(float v) {
  return to_float(from_float<T>(v));
}

// ---------------------------------------------------------------------------------------------------------------
// Warp and block reductions
// ---------------------------------------------------------------------------------------------------------------
ZAYA_DEVICE float shfl_xor(float v, int lane_mask) {
#if defined(ZAYA_HOST_EMULATION)
  static float exchange[1024];  // every thread of the block calls this together (block-uniform control flow)
  exchange[threadIdx.x] = v;
  __syncthreads();
  const float other = exchange[threadIdx.x ^ lane_mask];
  __syncthreads();
  return other;
#elif defined(ZAYA_HIP)
  return __shfl_xor(v, lane_mask, kWarpSize);
#else
  return __shfl_xor_sync(0xffffffffu, v, lane_mask, kWarpSize);
#endif
}

// Butterfly sum over the warp: every lane ends with the same (bitwise identical) total.
ZAYA_DEVICE float warp_reduce_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += shfl_xor(v, offset);
  }
  return v;
}

// Sum of v over the whole block, returned to every thread (all threads get the same bits: the per-warp totals are
// added in warp order by every thread). scratch: __shared__ float[kMaxWarps]. Must be called by every thread of the
// block; it synchronises before reusing scratch, so consecutive calls with the same scratch are safe.
ZAYA_DEVICE float block_reduce_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_reduce_sum(v);
  __syncthreads();  // previous readers of scratch are done
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < num_warps; ++w) total += scratch[w];
  return total;
}

// Two independent block sums with one pair of barriers. scratch: __shared__ float[2 * kMaxWarps].
ZAYA_DEVICE void block_reduce_sum2(float& a, float& b, float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  a = warp_reduce_sum(a);
  b = warp_reduce_sum(b);
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = a;
    scratch[kMaxWarps + warp] = b;
  }
  __syncthreads();
  float ta = 0.0f, tb = 0.0f;
  for (int w = 0; w < num_warps; ++w) {
    ta += scratch[w];
    tb += scratch[kMaxWarps + w];
  }
  a = ta;
  b = tb;
}

}  // namespace dev
}  // namespace zaya

// ---------------------------------------------------------------------------------------------------------------
// Self-test kernel for the compile check (zaya_kernels.tools.gpu_compile_check): forces codegen of every helper.
// ---------------------------------------------------------------------------------------------------------------
#if defined(ZAYA_INSTANTIATE_COMPAT)
namespace zaya {
namespace dev {
template <typename T>
__global__ void compat_selftest_kernel(const T* in, T* out, float* sums, int n) {
  __shared__ float scratch[2 * kMaxWarps];
  float a = 0.0f, b = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = to_float(in[i]);
    out[i] = from_float<T>(fmul_rn(fadd_rn(v, 1.0f), 2.0f));
    a += v;
    b += round_to<T>(v * v);
  }
  const float s = block_reduce_sum(a, scratch);
  block_reduce_sum2(a, b, scratch);
  if (threadIdx.x == 0) {
    sums[0] = s;
    sums[1] = a;
    sums[2] = b;
  }
}
template __global__ void compat_selftest_kernel<float>(const float*, float*, float*, int);
template __global__ void compat_selftest_kernel<half_t>(const half_t*, half_t*, float*, int);
template __global__ void compat_selftest_kernel<bf16_t>(const bf16_t*, bf16_t*, float*, int);
}  // namespace dev
}  // namespace zaya
#endif
