// CUDA kernels of mmgrad: the fused BOGC step, the per-group Gram matrix and the weighted
// combination, over the flat M x N buffer (SPEC.md §3-4).
//
// The element math is csrc/mmgrad_math.h, the same __host__ __device__ functions the CPU
// kernels call, so the CPU tests exercise this arithmetic. This file needs no torch
// headers: `make cuda-check` compiles it with nvcc for sm_80 and sm_90 and fails on any
// local-memory spill; the torch binding is built only where torch has CUDA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../mmgrad_math.h"

namespace mmgrad {
namespace cuda {

using math::BogcParams;
using math::FoldState;

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}

// Sum of v over the block, valid in thread 0; `scratch` holds one double per warp.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < (blockDim.x + 31) / 32; ++w) s += scratch[w];
  return s;
}

// Statistics layout per block (as StatsLayout of the CPU kernels, Gram of one group):
// [sum_sq, out_sq, nonfinite, u_sum, conflict_sum, share_count, share_sum[M], gram[M*M]]
constexpr int kScalarStats = 6;

struct BogcStepArgs {
  int64_t n;
  double beta, one_minus_beta, inv_bias_correction;
  BogcParams<float> prm;
};

// One BOGC step (EMA estimator) for coordinates [lo, hi) of one parameter group; grid-stride.
// The fold state is double (mmgrad_math.h), as on the CPU.
// Each block writes its partial statistics to partials[blockIdx.x * stride ...].
template <typename scalar_t, int M>
__global__ void bogc_step_kernel(const scalar_t* __restrict__ g, const float* __restrict__ m_in,
                                 const float* __restrict__ v_in, float* __restrict__ m_out, float* __restrict__ v_out,
                                 float* __restrict__ out, int64_t lo, int64_t hi, BogcStepArgs a,
                                 double* __restrict__ partials) {
  __shared__ double scratch[32];
  double sum_sq = 0, out_sq = 0, nonfinite = 0, u_sum = 0, conflict_sum = 0, share_count = 0;
  double share_sum[M], gram[M * (M + 1) / 2];
#pragma unroll
  for (int k = 0; k < M; ++k) share_sum[k] = 0;
#pragma unroll
  for (int p = 0; p < M * (M + 1) / 2; ++p) gram[p] = 0;

  for (int64_t d = lo + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; d < hi; d += int64_t(gridDim.x) * blockDim.x) {
    float mu[M], var[M], w[M];
    double total = 0;
#pragma unroll
    for (int k = 0; k < M; ++k) {
      const int64_t i = k * a.n + d;
      mu[k] = to_float(g[i]);
      nonfinite += isfinite(mu[k]) ? 0.0 : 1.0;
      const math::EmaResult<float> e = math::ema_update(mu[k], m_in[i], v_in[i], a.beta, a.one_minus_beta, a.inv_bias_correction);
      m_out[i] = e.m;
      v_out[i] = e.v;
      var[k] = e.var;
      total += static_cast<double>(mu[k]);
    }
    const math::CoordinateResult<float> r = math::bogc_coordinate<float, M>(
        M, [&](int k) { return mu[k]; }, [&](int k) { return var[k]; }, a.prm, [&](int k) -> float& { return w[k]; });
    const FoldState<float>& s = r.state;
    const float res = r.out;
#pragma unroll
    for (int k = 0; k < M; ++k) share_sum[k] += w[k];
    out[d] = res;  // unscaled, float32: norm matching rounds to a half dtype once (README note 11)
    sum_sq += total * total;
    out_sq += double(res) * double(res);
    u_sum += s.fused.u;
    conflict_sum += 1.0 - s.kept;
    share_count += s.w_sum > 0.f ? 1.0 : 0.0;
    int p = 0;
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
      for (int j = i; j < M; ++j) gram[p++] += double(mu[i]) * double(mu[j]);
  }

  constexpr int stride = kScalarStats + M + M * M;
  double* part = partials + blockIdx.x * int64_t(stride);
  const double scalars[kScalarStats] = {sum_sq, out_sq, nonfinite, u_sum, conflict_sum, share_count};
#pragma unroll
  for (int q = 0; q < kScalarStats; ++q) {
    const double v = block_sum(scalars[q], scratch);
    if (threadIdx.x == 0) part[q] = v;
  }
#pragma unroll
  for (int k = 0; k < M; ++k) {
    const double v = block_sum(share_sum[k], scratch);
    if (threadIdx.x == 0) part[kScalarStats + k] = v;
  }
  int p = 0;
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int j = i; j < M; ++j) {
      const double v = block_sum(gram[p++], scratch);
      if (threadIdx.x == 0) part[kScalarStats + M + i * M + j] = part[kScalarStats + M + j * M + i] = v;
    }
}

// Gram matrix (with_out = false) or combination out = sum_m alpha_m g_m plus, optionally,
// the Gram from the same read (the lagged MOO mode), for one group [lo, hi).
template <typename scalar_t, int M>
__global__ void combine_gram_kernel(const scalar_t* __restrict__ g, const double* __restrict__ alpha,
                                    scalar_t* __restrict__ out, int64_t n, int64_t lo, int64_t hi, bool with_gram,
                                    double* __restrict__ partials) {
  __shared__ double scratch[32];
  float a[M];
#pragma unroll
  for (int k = 0; k < M; ++k) a[k] = alpha != nullptr ? static_cast<float>(alpha[k]) : 0.f;
  double gram[M * (M + 1) / 2], nonfinite = 0;
#pragma unroll
  for (int p = 0; p < M * (M + 1) / 2; ++p) gram[p] = 0;
  for (int64_t d = lo + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; d < hi; d += int64_t(gridDim.x) * blockDim.x) {
    float x[M], acc = 0.f;
#pragma unroll
    for (int k = 0; k < M; ++k) {
      x[k] = to_float(g[k * n + d]);
      nonfinite += isfinite(x[k]) ? 0.0 : 1.0;
      acc += a[k] * x[k];
    }
    if (out != nullptr) out[d] = from_float<scalar_t>(acc);
    if (with_gram) {
      int p = 0;
#pragma unroll
      for (int i = 0; i < M; ++i)
#pragma unroll
        for (int j = i; j < M; ++j) gram[p++] += double(x[i]) * double(x[j]);
    }
  }
  constexpr int stride = M * M + 1;
  double* part = partials + blockIdx.x * int64_t(stride);
  const double nf = block_sum(nonfinite, scratch);
  if (threadIdx.x == 0) part[M * M] = nf;
  int p = 0;
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int j = i; j < M; ++j) {
      const double v = block_sum(gram[p++], scratch);
      if (threadIdx.x == 0) part[i * M + j] = part[j * M + i] = v;
    }
}

// Sum `blocks` partial vectors of length `len` into total (one block; no host sync).
__global__ void reduce_partials_kernel(const double* __restrict__ partials, int blocks, int len, double* __restrict__ total) {
  for (int q = threadIdx.x; q < len; q += blockDim.x) {
    double s = 0;
    for (int b = 0; b < blocks; ++b) s += partials[b * int64_t(len) + q];
    total[q] += s;
  }
}

// Explicit instantiations: fp32/bf16/fp16 gradients, M = 1..8 (the runtime-M fallback
// of the CPU build is not ported yet).
#define MMGRAD_INSTANTIATE(T, M)                                                                                  \
  template __global__ void bogc_step_kernel<T, M>(const T*, const float*, const float*, float*, float*, float*,   \
                                                  int64_t, int64_t, BogcStepArgs, double*);                        \
  template __global__ void combine_gram_kernel<T, M>(const T*, const double*, T*, int64_t, int64_t, int64_t, bool, \
                                                     double*);
#define MMGRAD_INSTANTIATE_M(T) \
  MMGRAD_INSTANTIATE(T, 1)      \
  MMGRAD_INSTANTIATE(T, 2)      \
  MMGRAD_INSTANTIATE(T, 3)      \
  MMGRAD_INSTANTIATE(T, 4)      \
  MMGRAD_INSTANTIATE(T, 5)      \
  MMGRAD_INSTANTIATE(T, 6)      \
  MMGRAD_INSTANTIATE(T, 7)      \
  MMGRAD_INSTANTIATE(T, 8)
MMGRAD_INSTANTIATE_M(float)
MMGRAD_INSTANTIATE_M(__nv_bfloat16)
MMGRAD_INSTANTIATE_M(__half)

}  // namespace cuda
}  // namespace mmgrad
