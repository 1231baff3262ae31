// CUDA kernels of mmgrad: the fused BOGC step, the per-group Gram matrix and the weighted
// combination, over the flat M x N buffer (docs/spec.md §3-4).
//
// The element math is csrc/mmgrad_math.h, the same __host__ __device__ functions the CPU
// kernels call, so the CPU tests exercise this arithmetic. This file needs no torch
// headers: `make cuda-check` compiles it with nvcc for sm_80 and sm_90 and fails on any
// local-memory spill; the torch binding is built only where torch has CUDA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "launch.h"

namespace mmgrad {
namespace cuda {

using math::BogcParams;

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


// Objective k's variance at coordinate d (its mean into mu): the EMA update (writing the
// new state), or the sample mean and unbiased variance in the CPU kernel's order of
// operations (sum, times 1/S; squared deviations, times 1/(S-1)).
template <typename scalar_t>
__device__ __forceinline__ float coordinate_moments(const scalar_t* __restrict__ g, const float* mean_in,
                                                    const float* var_in, float* mean_out, float* var_out, int mm,
                                                    int k, int64_t d, const BogcStepArgs& a, float& mu,
                                                    double& nonfinite) {
  if (a.samples == 0) {
    const int64_t i = k * a.n + d;
    mu = to_float(g[i]);
    nonfinite += isfinite(mu) ? 0.0 : 1.0;
    const math::EmaResult<float> e = math::ema_update(mu, mean_in[i], var_in[i], a.alpha, a.one_minus_alpha);
    mean_out[i] = e.mean;
    var_out[i] = e.var;
    return e.var;
  }
  float sum = 0.f, sq = 0.f;
  for (int64_t s = 0; s < a.samples; ++s) {
    const float x = to_float(g[(s * mm + k) * a.n + d]);
    nonfinite += isfinite(x) ? 0.0 : 1.0;
    sum += x;
  }
  mu = sum * (1.f / static_cast<float>(a.samples));
  for (int64_t s = 0; s < a.samples; ++s) {
    const float dev = to_float(g[(s * mm + k) * a.n + d]) - mu;
    sq += dev * dev;
  }
  return sq * (1.f / static_cast<float>(a.samples - 1));
}

// A block's running statistics of the BOGC step, and one coordinate's fold into them.
template <int M, int kCap, int kPairs>
struct BogcBlockStats {
  double sum_sq = 0, out_sq = 0, nonfinite = 0, u_sum = 0, conflict_sum = 0, share_count = 0;
  double share_sum[kCap] = {}, gram[kPairs] = {};

  // docs/spec.md §3.2-3.6 at one coordinate from its M means and variances; returns the output.
  __device__ __forceinline__ float add(const float* mu, const float* var, int mm, const math::BogcParams<float>& prm) {
    float w[kCap];
    double total = 0;
#pragma unroll
    for (int k = 0; k < mm; ++k) total += static_cast<double>(mu[k]);
    const math::CoordinateResult<float> r = math::bogc_coordinate<float, M>(
        mm, [&](int k) { return mu[k]; }, [&](int k) { return var[k]; }, prm, [&](int k) -> float& { return w[k]; });
#pragma unroll
    for (int k = 0; k < mm; ++k) share_sum[k] += w[k];
    sum_sq += total * total;
    out_sq += double(r.out) * double(r.out);
    u_sum += r.fused.op.u;
    conflict_sum += r.fused.conflict;
    share_count += r.state.w_sum > 0.f ? 1.0 : 0.0;
    if (M > 0) {
      int p = 0;
#pragma unroll
      for (int i = 0; i < M; ++i)
#pragma unroll
        for (int j = i; j < M; ++j) gram[p++] += double(mu[i]) * double(mu[j]);
    }
    return r.out;  // unscaled, float32: norm matching rounds to a half dtype once (docs/spec.md, decision 11)
  }
};

__device__ __forceinline__ void unpack4(float4 q, float* x) { x[0] = q.x, x[1] = q.y, x[2] = q.z, x[3] = q.w; }

// One BOGC step for coordinates [lo, hi) of one parameter group; grid-stride. M is a
// template constant (1-8); M = 0 is the runtime-M fallback (m_count <= kMaxObjectives;
// per-objective values in local memory, and the Gram left to gram_pairs_kernel).
// Vec = 4 (fp32 gradients, EMA, M <= 4, rows 16-byte aligned): g, m and v are read and
// the state and the output written as float4, four coordinates per thread and iteration.
// The fold runs in float32 (mmgrad_math.h: extended-range products), as on the CPU.
// Each block writes its partial statistics to partials[blockIdx.x * stride ...].
template <typename scalar_t, int M, int Vec>
// mean_out, var_out may alias mean_in, var_in (the calibrator's one slot, updated in
// place): each coordinate's state is read once, then written, by one thread, so no
// __restrict__ on them.
__global__ void bogc_step_kernel(const scalar_t* __restrict__ g, const float* mean_in,
                                 const float* var_in, float* mean_out, float* var_out,
                                 float* __restrict__ out, int64_t lo, int64_t hi, int m_count, BogcStepArgs a,
                                 double* __restrict__ partials) {
  static_assert(Vec == 1 || (Vec == 4 && sizeof(scalar_t) == 4 && M > 0), "float4 path: fp32 rows, M a constant");
  __shared__ double scratch[32];
  constexpr int kCap = M > 0 ? M : math::kMaxObjectives;
  constexpr int kPairs = M > 0 ? M * (M + 1) / 2 : 1;
  const int mm = M > 0 ? M : m_count;
  BogcBlockStats<M, kCap, kPairs> st;

  if constexpr (Vec == 4) {
    for (int64_t d0 = lo + (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * 4; d0 < hi;
         d0 += int64_t(gridDim.x) * blockDim.x * 4) {
      float mu[4][kCap], var[4][kCap];
#pragma unroll
      for (int k = 0; k < M; ++k) {
        const int64_t i = k * a.n + d0;
        float gv[4], mv[4], vv[4], mo[4], vo[4];
        unpack4(*reinterpret_cast<const float4*>(g + i), gv);
        unpack4(*reinterpret_cast<const float4*>(mean_in + i), mv);
        unpack4(*reinterpret_cast<const float4*>(var_in + i), vv);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          st.nonfinite += isfinite(gv[c]) ? 0.0 : 1.0;
          const math::EmaResult<float> e = math::ema_update(gv[c], mv[c], vv[c], a.alpha, a.one_minus_alpha);
          mo[c] = e.mean;
          vo[c] = e.var;
          mu[c][k] = gv[c];
          var[c][k] = e.var;
        }
        *reinterpret_cast<float4*>(mean_out + i) = make_float4(mo[0], mo[1], mo[2], mo[3]);
        *reinterpret_cast<float4*>(var_out + i) = make_float4(vo[0], vo[1], vo[2], vo[3]);
      }
      float res[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) res[c] = st.add(mu[c], var[c], M, a.prm);
      *reinterpret_cast<float4*>(out + d0) = make_float4(res[0], res[1], res[2], res[3]);
    }
  } else {
    for (int64_t d = lo + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; d < hi; d += int64_t(gridDim.x) * blockDim.x) {
      float mu[kCap], var[kCap];
#pragma unroll
      for (int k = 0; k < mm; ++k)
        var[k] = coordinate_moments(g, mean_in, var_in, mean_out, var_out, mm, k, d, a, mu[k], st.nonfinite);
      out[d] = st.add(mu, var, mm, a.prm);
    }
  }
  double sum_sq = st.sum_sq, out_sq = st.out_sq, nonfinite = st.nonfinite, u_sum = st.u_sum,
         conflict_sum = st.conflict_sum, share_count = st.share_count;
  double* share_sum = st.share_sum;
  double* gram = st.gram;

  const math::StatsLayout L{mm, 1};
  double* part = partials + blockIdx.x * L.size();
  using SL = math::StatsLayout;
  const double scalars[SL::kScalars] = {sum_sq, out_sq, nonfinite, u_sum, conflict_sum, share_count};
  static_assert(SL::sum_sq() == 0 && SL::out_sq() == 1 && SL::nonfinite() == 2 && SL::u_sum() == 3 &&
                    SL::conflict_sum() == 4 && SL::share_count() == 5,
                "scalars[] is in StatsLayout's order");
#pragma unroll
  for (int q = 0; q < SL::kScalars; ++q) {
    const double v = block_sum(scalars[q], scratch);
    if (threadIdx.x == 0) part[q] = v;
  }
  for (int k = 0; k < mm; ++k) {
    const double v = block_sum(share_sum[k], scratch);
    if (threadIdx.x == 0) part[SL::share_sum() + k] = v;
  }
  if (M > 0) {
    int p = 0;
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
      for (int j = i; j < M; ++j) {
        const double v = block_sum(gram[p++], scratch);
        if (threadIdx.x == 0) part[L.gram() + i * M + j] = part[L.gram() + j * M + i] = v;
      }
  }
}

// Runtime-M Gram: block (x, y) sums pair y = (i, j), i <= j, over its share of [lo, hi).
// M+1 reads of G instead of one: the fallback for M > 8 (and the Gram of bogc_step's M = 0).
// partials[blockIdx.x * stride + offset + i*M + j] (and j*M + i) receive the block sums.
template <typename scalar_t>
__global__ void gram_pairs_kernel(const scalar_t* __restrict__ g, int64_t n, int64_t lo, int64_t hi, int m_count,
                                  int64_t stride, int64_t offset, double* __restrict__ partials) {
  __shared__ double scratch[32];
  int i = 0, rest = blockIdx.y;
  while (rest >= m_count - i) rest -= m_count - i++;
  const int j = i + rest;
  double acc = 0;
  for (int64_t d = lo + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; d < hi; d += int64_t(gridDim.x) * blockDim.x)
    acc += double(to_float(g[i * n + d])) * double(to_float(g[j * n + d]));
  const double v = block_sum(acc, scratch);
  if (threadIdx.x == 0) {
    double* part = partials + blockIdx.x * stride + offset;
    part[i * m_count + j] = part[j * m_count + i] = v;
  }
}

// Gram matrix (with_out = false) or combination out = sum_m alpha_m g_m plus, optionally,
// the Gram from the same read (the lagged MOO mode), for one group [lo, hi).
// Runtime M (template M = 0): alpha read per objective, and with_gram must be false (the
// Gram then comes from gram_pairs_kernel). Vec = 4 (fp32, rows 16-byte aligned: n, lo and
// hi multiples of 4) loads and stores float4: one 16-byte transaction per 4 coordinates.
template <typename scalar_t, int M, int Vec>
__global__ void combine_gram_kernel(const scalar_t* __restrict__ g, const double* __restrict__ alpha,
                                    scalar_t* __restrict__ out, int64_t n, int64_t lo, int64_t hi, int m_count,
                                    bool with_gram, double* __restrict__ partials) {
  static_assert(Vec == 1 || (Vec == 4 && sizeof(scalar_t) == 4), "float4 loads are for fp32 rows");
  __shared__ double scratch[32];
  constexpr int kCap = M > 0 ? M : 1;
  constexpr int kPairs = M > 0 ? M * (M + 1) / 2 : 1;
  const int mm = M > 0 ? M : m_count;
  float a[kCap];
#pragma unroll
  for (int k = 0; k < kCap; ++k) a[k] = alpha != nullptr ? static_cast<float>(alpha[k]) : 0.f;
  double gram[kPairs], nonfinite = 0;
#pragma unroll
  for (int p = 0; p < kPairs; ++p) gram[p] = 0;
  for (int64_t d0 = lo + (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * Vec; d0 < hi;
       d0 += int64_t(gridDim.x) * blockDim.x * Vec) {
    float x[kCap][Vec], acc[Vec];
#pragma unroll
    for (int v = 0; v < Vec; ++v) acc[v] = 0.f;
#pragma unroll
    for (int k = 0; k < mm; ++k) {
      float xv[Vec];
      if constexpr (Vec == 4) {
        const float4 q = *reinterpret_cast<const float4*>(g + k * n + d0);
        xv[0] = q.x, xv[1] = q.y, xv[2] = q.z, xv[3] = q.w;
      } else {
        xv[0] = to_float(g[k * n + d0]);
      }
      const float ak = M > 0 ? a[k] : (alpha != nullptr ? static_cast<float>(alpha[k]) : 0.f);
#pragma unroll
      for (int v = 0; v < Vec; ++v) {
        nonfinite += isfinite(xv[v]) ? 0.0 : 1.0;
        acc[v] += ak * xv[v];
        if (M > 0) x[k < kCap ? k : 0][v] = xv[v];
      }
    }
    if (out != nullptr) {
      if constexpr (Vec == 4) {
        *reinterpret_cast<float4*>(out + d0) = make_float4(acc[0], acc[1], acc[2], acc[3]);
      } else {
        out[d0] = from_float<scalar_t>(acc[0]);
      }
    }
    if (M > 0 && with_gram) {
#pragma unroll
      for (int v = 0; v < Vec; ++v) {
        int p = 0;
#pragma unroll
        for (int i = 0; i < kCap; ++i)
#pragma unroll
          for (int j = i; j < kCap; ++j) gram[p++] += double(x[i][v]) * double(x[j][v]);
      }
    }
  }
  const int stride = mm * mm + 1;
  double* part = partials + blockIdx.x * int64_t(stride);
  const double nf = block_sum(nonfinite, scratch);
  if (threadIdx.x == 0) part[mm * mm] = nf;
  if (M > 0 && with_gram) {
    int p = 0;
#pragma unroll
    for (int i = 0; i < kCap; ++i)
#pragma unroll
      for (int j = i; j < kCap; ++j) {
        const double v = block_sum(gram[p++], scratch);
        if (threadIdx.x == 0) part[i * M + j] = part[j * M + i] = v;
      }
  }
}

// docs/spec.md §4's weights for every group on the device (one block per group; M <= 16): the
// fixed-iteration solver of mmgrad_math.h, which the CPU tests run through the CPU build.
// Thread 0 solves (a few microseconds of scalar work); no host synchronisation.
__global__ void moo_weights_kernel(const double* __restrict__ grams, int m_count, int method, int normalize,
                                   const double* __restrict__ losses, double magnitude, double* __restrict__ weights) {
  if (threadIdx.x != 0) return;
  const math::MooVector w =
      math::moo_weights(grams + blockIdx.x * int64_t(m_count) * m_count, m_count, method, normalize, losses, magnitude);
  for (int i = 0; i < m_count; ++i) weights[blockIdx.x * int64_t(m_count) + i] = w.v[i];
}

// Explicit instantiations: fp32/bf16/fp16 gradients, M = 1..8 and 0 (runtime M <= 64);
// float4 combination for fp32.
#define MMGRAD_INSTANTIATE(T, M)                                                                                      \
  template __global__ void bogc_step_kernel<T, M, 1>(const T*, const float*, const float*, float*, float*, float*,    \
                                                     int64_t, int64_t, int, BogcStepArgs, double*);                    \
  template __global__ void combine_gram_kernel<T, M, 1>(const T*, const double*, T*, int64_t, int64_t, int64_t, int, \
                                                        bool, double*);
#define MMGRAD_INSTANTIATE_M(T)                                                                                    \
  template __global__ void gram_pairs_kernel<T>(const T*, int64_t, int64_t, int64_t, int, int64_t, int64_t, double*); \
  MMGRAD_INSTANTIATE(T, 0)      \
  MMGRAD_INSTANTIATE(T, 1)      \
  MMGRAD_INSTANTIATE(T, 2)      \
  MMGRAD_INSTANTIATE(T, 3)      \
  MMGRAD_INSTANTIATE(T, 4)      \
  MMGRAD_INSTANTIATE(T, 5)      \
  MMGRAD_INSTANTIATE(T, 6)      \
  MMGRAD_INSTANTIATE(T, 7)      \
  MMGRAD_INSTANTIATE(T, 8)
MMGRAD_INSTANTIATE_M(float)
#define MMGRAD_INSTANTIATE_VEC4(M) \
  template __global__ void combine_gram_kernel<float, M, 4>(const float*, const double*, float*, int64_t, int64_t, int64_t, int, bool, double*);
#define MMGRAD_INSTANTIATE_BOGC_VEC4(M) \
  template __global__ void bogc_step_kernel<float, M, 4>(const float*, const float*, const float*, float*, float*, float*, int64_t, int64_t, int, BogcStepArgs, double*);
MMGRAD_INSTANTIATE_BOGC_VEC4(1)
MMGRAD_INSTANTIATE_BOGC_VEC4(2)
MMGRAD_INSTANTIATE_BOGC_VEC4(3)
MMGRAD_INSTANTIATE_BOGC_VEC4(4)
MMGRAD_INSTANTIATE_VEC4(0)
MMGRAD_INSTANTIATE_VEC4(1)
MMGRAD_INSTANTIATE_VEC4(2)
MMGRAD_INSTANTIATE_VEC4(3)
MMGRAD_INSTANTIATE_VEC4(4)
MMGRAD_INSTANTIATE_VEC4(5)
MMGRAD_INSTANTIATE_VEC4(6)
MMGRAD_INSTANTIATE_VEC4(7)
MMGRAD_INSTANTIATE_VEC4(8)
MMGRAD_INSTANTIATE_M(__nv_bfloat16)
MMGRAD_INSTANTIATE_M(__half)

// ----------------------------------------------------------------------------------------
// Launchers (declared in launch.h): raw pointers and a stream, no torch, so this file
// compiles in `make cuda-check` without torch's headers; bindings.cpp passes tensors in.

static bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
static cudaError_t launch_bogc_typed(const void* g, const float* mean_in, const float* var_in, float* mean_out, float* var_out,
                                     float* out, int64_t lo, int64_t hi, int m, const BogcStepArgs& a,
                                     double* partials, int blocks, int threads, cudaStream_t stream) {
  const T* gt = static_cast<const T*>(g);
  if constexpr (sizeof(T) == 4) {
    const bool vec = a.samples == 0 && m <= 4 && a.n % 4 == 0 && lo % 4 == 0 && hi % 4 == 0 && aligned16(g) &&
                     aligned16(mean_in) && aligned16(var_in) && aligned16(mean_out) && aligned16(var_out) && aligned16(out);
    if (vec) {
#define MMGRAD_CASE(MC) \
  case MC:              \
    bogc_step_kernel<float, MC, 4><<<blocks, threads, 0, stream>>>(gt, mean_in, var_in, mean_out, var_out, out, lo, hi, m, a, partials); \
    break;
      switch (m) { MMGRAD_CASE(1) MMGRAD_CASE(2) MMGRAD_CASE(3) default: MMGRAD_CASE(4) }
#undef MMGRAD_CASE
      return cudaGetLastError();
    }
  }
#define MMGRAD_CASE(MC) \
  case MC:              \
    bogc_step_kernel<T, MC, 1><<<blocks, threads, 0, stream>>>(gt, mean_in, var_in, mean_out, var_out, out, lo, hi, m, a, partials); \
    break;
  switch (m) {
    MMGRAD_CASE(1) MMGRAD_CASE(2) MMGRAD_CASE(3) MMGRAD_CASE(4) MMGRAD_CASE(5) MMGRAD_CASE(6) MMGRAD_CASE(7)
    MMGRAD_CASE(8)
    default:
      bogc_step_kernel<T, 0, 1><<<blocks, threads, 0, stream>>>(gt, mean_in, var_in, mean_out, var_out, out, lo, hi, m, a, partials);
  }
#undef MMGRAD_CASE
  return cudaGetLastError();
}

cudaError_t launch_bogc_step(DType dtype, const void* g, const float* mean_in, const float* var_in, float* mean_out,
                             float* var_out, float* out, int64_t lo, int64_t hi, int m, const BogcStepArgs& a,
                             double* partials, int blocks, int threads, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_bogc_typed<float>(g, mean_in, var_in, mean_out, var_out, out, lo, hi, m, a, partials, blocks, threads, stream);
    case DType::kBFloat16:
      return launch_bogc_typed<__nv_bfloat16>(g, mean_in, var_in, mean_out, var_out, out, lo, hi, m, a, partials, blocks, threads, stream);
    default:
      return launch_bogc_typed<__half>(g, mean_in, var_in, mean_out, var_out, out, lo, hi, m, a, partials, blocks, threads, stream);
  }
}

template <typename T, int Vec>
static void combine_case(const T* g, const double* alpha, T* out, int64_t n, int64_t lo, int64_t hi, int m,
                         bool with_gram, double* partials, int blocks, int threads, cudaStream_t stream) {
#define MMGRAD_CASE(MC)                                                                                         \
  case MC:                                                                                                      \
    combine_gram_kernel<T, MC, Vec><<<blocks, threads, 0, stream>>>(g, alpha, out, n, lo, hi, m, with_gram, partials); \
    break;
  switch (m) {
    MMGRAD_CASE(1) MMGRAD_CASE(2) MMGRAD_CASE(3) MMGRAD_CASE(4) MMGRAD_CASE(5) MMGRAD_CASE(6) MMGRAD_CASE(7)
    MMGRAD_CASE(8)
    default:
      combine_gram_kernel<T, 0, Vec><<<blocks, threads, 0, stream>>>(g, alpha, out, n, lo, hi, m, false, partials);
  }
#undef MMGRAD_CASE
}

template <typename T>
static cudaError_t launch_combine_typed(const void* g, const double* alpha, void* out, int64_t n, int64_t lo,
                                        int64_t hi, int m, bool with_gram, double* partials, int blocks, int threads,
                                        cudaStream_t stream) {
  const T* gt = static_cast<const T*>(g);
  T* ot = static_cast<T*>(out);
  const bool aligned = sizeof(T) == 4 && n % 4 == 0 && lo % 4 == 0 && hi % 4 == 0 && aligned16(g) && aligned16(out);
  if constexpr (sizeof(T) == 4) {
    if (aligned) {
      combine_case<T, 4>(gt, alpha, ot, n, lo, hi, m, with_gram, partials, blocks, threads, stream);
      return cudaGetLastError();
    }
  }
  combine_case<T, 1>(gt, alpha, ot, n, lo, hi, m, with_gram, partials, blocks, threads, stream);
  return cudaGetLastError();
}

cudaError_t launch_combine(DType dtype, const void* g, const double* alpha, void* out, int64_t n, int64_t lo,
                           int64_t hi, int m, bool with_gram, double* partials, int blocks, int threads,
                           cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_combine_typed<float>(g, alpha, out, n, lo, hi, m, with_gram, partials, blocks, threads, stream);
    case DType::kBFloat16:
      return launch_combine_typed<__nv_bfloat16>(g, alpha, out, n, lo, hi, m, with_gram, partials, blocks, threads, stream);
    default:
      return launch_combine_typed<__half>(g, alpha, out, n, lo, hi, m, with_gram, partials, blocks, threads, stream);
  }
}

cudaError_t launch_gram_pairs(DType dtype, const void* g, int64_t n, int64_t lo, int64_t hi, int m, int64_t stride,
                              int64_t offset, double* partials, int blocks, int threads, cudaStream_t stream) {
  const dim3 grid(blocks, m * (m + 1) / 2);
  switch (dtype) {
    case DType::kFloat32:
      gram_pairs_kernel<float><<<grid, threads, 0, stream>>>(static_cast<const float*>(g), n, lo, hi, m, stride, offset, partials);
      break;
    case DType::kBFloat16:
      gram_pairs_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(g), n, lo, hi, m, stride, offset, partials);
      break;
    default:
      gram_pairs_kernel<__half><<<grid, threads, 0, stream>>>(static_cast<const __half*>(g), n, lo, hi, m, stride, offset, partials);
  }
  return cudaGetLastError();
}

cudaError_t launch_moo_weights(const double* grams, int groups, int m, int method, int normalize, const double* losses,
                               double magnitude, double* weights, cudaStream_t stream) {
  moo_weights_kernel<<<groups, 32, 0, stream>>>(grams, m, method, normalize, losses, magnitude, weights);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmgrad
