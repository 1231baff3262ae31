// Element math of mmgrad (SPEC.md §3), shared by the C++ CPU kernels and the CUDA kernels.
//
// Everything here is a __host__ __device__ inline function of one coordinate d, so the
// CPU build (and its tests against the float64 reference) exercises exactly the
// arithmetic the GPU runs. The order of operations mirrors mmgrad/reference/bogc.py so
// that float32 results agree with the reference to rounding.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMGRAD_HD __host__ __device__ __forceinline__
#define MMGRAD_UNROLL _Pragma("unroll")
#else
#define MMGRAD_HD inline
#define MMGRAD_UNROLL  // M is a template constant: the host compiler unrolls at -O3
#endif

namespace mmgrad {
namespace math {

// Largest evidence an opinion may carry: keeps u = 2/(e+2) > 0 in float32, so the
// Dempster-Shafer fold never meets 0/0 (README, "Spec notes").
constexpr double kEvidenceMax = 1e30;
// Runtime-M kernels keep per-objective values in registers/stack arrays of this size.
constexpr int kMaxObjectives = 64;

enum Confidence : int { kConfidenceBelief = 0, kConfidenceCertainty = 1, kConfidenceNone = 2 };
enum Weights : int { kWeightsBelief = 0, kWeightsPrecision = 1 };

template <typename T>
struct Opinion {
  T b_pos, b_neg, u;
};

template <typename T>
struct BogcParams {
  T gamma, eps;
  int confidence, weights;
};

// SPEC §3.1: one EMA update and the bias-corrected variance. The update runs in double
// (W): the state is stored as T, but v_hat - m_hat^2 cancels badly when sigma^2 << m^2,
// so the variance is formed from the unrounded moments, as the float64 oracle does.
// one_minus_beta and inv_bias_correction = 1/(1-beta^t) are formed on the host.
template <typename T, typename W = double>
MMGRAD_HD void ema_update(T g, T m0, T v0, W beta, W one_minus_beta, W inv_bias_correction, T& m1, T& v1,
                          T& var) {
  const W gw = static_cast<W>(g);
  const W mw = beta * static_cast<W>(m0) + one_minus_beta * gw;
  const W vw = beta * static_cast<W>(v0) + one_minus_beta * (gw * gw);
  m1 = static_cast<T>(mw);
  v1 = static_cast<T>(vw);
  const W m_hat = mw * inv_bias_correction;
  const W d = vw * inv_bias_correction - m_hat * m_hat;
  var = static_cast<T>(d > W(0) ? d : W(0));
}

// SPEC §3.2: 0 where the objective does not reach the coordinate (mu = var = 0 exactly).
template <typename T>
MMGRAD_HD T precision(T mu, T var, T eps) {
  return (mu == T(0) && var == T(0)) ? T(0) : T(1) / (var + eps);
}

// SPEC §3.3, clamped to kEvidenceMax (an overflow to inf clamps too).
template <typename T>
MMGRAD_HD T evidence(T mu, T lam, T gamma) {
  const T e = gamma * lam * (mu * mu);
  return e < T(kEvidenceMax) ? e : T(kEvidenceMax);
}

// SPEC §3.4: all evidence supports sign(mu); u = 2/(e+2).
template <typename T>
MMGRAD_HD Opinion<T> opinion(T mu, T e) {
  const T strength = e + T(2);
  const T b = e / strength;
  return {mu > T(0) ? b : T(0), mu < T(0) ? b : T(0), T(2) / strength};
}

// SPEC §3.5: reduced Dempster-Shafer rule for two opinions. The three unnormalised
// masses are divided by their sum (= 1 - C, never formed as a difference). `kept`
// receives that sum. Two dogmatic opposite opinions (sum 0) give a vacuous result.
template <typename T>
MMGRAD_HD Opinion<T> ds_combine2(const Opinion<T>& a, const Opinion<T>& b, T& kept) {
  const T p = a.b_pos * b.b_pos + a.b_pos * b.u + b.b_pos * a.u;
  const T n = a.b_neg * b.b_neg + a.b_neg * b.u + b.b_neg * a.u;
  const T w = a.u * b.u;
  kept = p + n + w;
  if (kept == T(0)) return {T(0), T(0), T(1)};
  const T inv = T(1) / kept;
  return {p * inv, n * inv, w * inv};
}

template <typename T>
MMGRAD_HD T confidence_scale(const Opinion<T>& fused, int mode) {
  if (mode == kConfidenceBelief) {
    const T d = fused.b_pos - fused.b_neg;
    return d < T(0) ? -d : d;
  }
  if (mode == kConfidenceCertainty) return T(1) - fused.u;
  return T(1);
}

// What one coordinate contributes to a step's diagnostics and norms.
template <typename T>
struct CoordinateResult {
  T out;            // calibrated gradient before norm matching
  Opinion<T> fused; // fused opinion
  T conflict;       // 1 - prod(kept) over the fold
  bool any_weight;  // sum(w) > 0; then weight[m] holds the share w_m / sum(w)
};

// SPEC §3.2-3.6 for one coordinate: mu[m], var[m] for m < M in; weight[m] out (the share
// of objective m in the direction, 0 for all m where no weight is positive).
// MT > 0 fixes M at compile time (unrolled); MT == 0 uses the runtime m_count.
template <typename T, int MT>
MMGRAD_HD CoordinateResult<T> bogc_coordinate(int m_count, const T* mu, const T* var,
                                             const BogcParams<T>& prm, T* weight) {
  const int M = MT > 0 ? MT : m_count;
  CoordinateResult<T> r;
  T n_reach = T(0);
  T w_sum = T(0);
  T kept_all = T(1);
MMGRAD_UNROLL
  for (int k = 0; k < M; ++k) {
    const T lam = precision(mu[k], var[k], prm.eps);
    const Opinion<T> op = opinion(mu[k], evidence(mu[k], lam, prm.gamma));
    n_reach += lam > T(0) ? T(1) : T(0);
    weight[k] = prm.weights == kWeightsBelief ? op.b_pos + op.b_neg : lam;
    w_sum += weight[k];
    if (k == 0) {
      r.fused = op;
    } else {
      T kept;
      r.fused = ds_combine2(r.fused, op, kept);
      kept_all *= kept;
    }
  }
  // share_m = w_m / sum(w), a division each: 1/sum(w) overflows when the sum is subnormal
  // (belief weights of tiny gradients), and inf * 0 would put NaN into the gradient.
  const bool any = w_sum > T(0);
  r.any_weight = any;
  T acc = T(0);
MMGRAD_UNROLL
  for (int k = 0; k < M; ++k) {
    weight[k] = any ? weight[k] / w_sum : T(0);
    acc += weight[k] * mu[k];
  }
  r.out = confidence_scale(r.fused, prm.confidence) * (n_reach * acc);
  r.conflict = T(1) - kept_all;
  return r;
}

}  // namespace math
}  // namespace mmgrad
