// Host-side entry points of the CUDA kernels (csrc/cuda/bogc_kernels.cu): raw pointers and
// a stream, no torch types, so the kernels compile and are checked without torch; the
// torch binding (bindings.cpp) is built only where torch has CUDA.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../mmgrad_math.h"

namespace mmgrad {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Each block of the BOGC step writes one math::StatsLayout{m, 1} vector of partials.

struct BogcStepArgs {
  int64_t n;
  int64_t samples;  // S > 0: the sample estimator over g = S x M x N; 0: EMA
  float alpha, one_minus_alpha;  // the EMA's weight of this step (mmgrad_math.h: ema_update)
  math::BogcParams<float> prm;
};

cudaError_t launch_bogc_step(DType dtype, const void* g, const float* mean_in, const float* var_in, float* mean_out,
                             float* var_out, float* out, int64_t lo, int64_t hi, int m, const BogcStepArgs& a,
                             double* partials, int blocks, int threads, cudaStream_t stream);
cudaError_t launch_combine(DType dtype, const void* g, const double* alpha, void* out, int64_t n, int64_t lo,
                           int64_t hi, int m, bool with_gram, double* partials, int blocks, int threads,
                           cudaStream_t stream);
cudaError_t launch_gram_pairs(DType dtype, const void* g, int64_t n, int64_t lo, int64_t hi, int m, int64_t stride,
                              int64_t offset, double* partials, int blocks, int threads, cudaStream_t stream);
cudaError_t launch_moo_weights(const double* grams, int groups, int m, int method, int normalize, const double* losses,
                               double magnitude, double* weights, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmgrad
