// Declarations of the CPU BOGC kernels (bogc.cpp). Arguments are checked in Python
// (mmgrad/kernels/cpu.py) and again, briefly, in bindings.cpp.
#pragma once

#include <torch/extension.h>

namespace mmgrad {
namespace cpu {

struct BogcOptions {
  double gamma = 1.0, eps = 1e-8;
  int confidence = 0, weights = 0;  // math::Confidence, math::Weights
};

// Each returns the float64 statistics vector of StatsLayout (common.h). `out` receives the
// calibrated gradient before norm matching in the compute dtype (float32 for fp32/bf16/fp16
// gradients, float64 for float64): norm matching then rounds to a half dtype once.
// The EMA state (mean_*, var_*) is docs/spec.md §3.1's bias-corrected mean and variance, updated
// with this step's weight alpha = (1-beta)/(1-beta^t) (mmgrad_math.h: ema_update).
at::Tensor bogc_step(const at::Tensor& g, const at::Tensor& mean_in, const at::Tensor& var_in, const at::Tensor& mean_out,
                     const at::Tensor& var_out, const at::Tensor& out, const at::Tensor& group_offsets, double alpha,
                     double one_minus_alpha, const BogcOptions& o);
at::Tensor bogc_sample_step(const at::Tensor& samples, const at::Tensor& out, const at::Tensor& group_offsets,
                            const BogcOptions& o);
at::Tensor bogc_from_moments(const at::Tensor& mu, const at::Tensor& var, const at::Tensor& out,
                             const at::Tensor& fused_u, const at::Tensor& fused_b_pos, const at::Tensor& fused_b_neg,
                             const BogcOptions& o);

void ema_moments(const at::Tensor& g, const at::Tensor& mean_in, const at::Tensor& var_in, const at::Tensor& mean_out,
                 const at::Tensor& var_out, double alpha, double one_minus_alpha);
void opinions(const at::Tensor& mu, const at::Tensor& var, const at::Tensor& lam, const at::Tensor& b_pos,
              const at::Tensor& b_neg, const at::Tensor& u, double gamma, double eps);
void ds_combine(const at::Tensor& b_pos, const at::Tensor& b_neg, const at::Tensor& u, const at::Tensor& out_b_pos,
                const at::Tensor& out_b_neg, const at::Tensor& out_u);

// MOO kernels (moo.cpp): gram returns [G*M*M Gram | non-finite count]; combine writes
// out = sum_m alpha[group, m] g_m and, with with_gram, returns the same statistics from
// the same read (the lagged mode of docs/spec.md §4).
at::Tensor gram(const at::Tensor& g, const at::Tensor& group_offsets);
at::Tensor combine(const at::Tensor& g, const at::Tensor& alpha, const at::Tensor& group_offsets, const at::Tensor& out,
                   bool with_gram);

}  // namespace cpu
}  // namespace mmgrad
