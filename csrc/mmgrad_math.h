// Element math of mmgrad (SPEC.md §3), shared by the C++ CPU kernels and the CUDA kernels.
//
// Every function takes and returns values (no out-parameters): OpenMP lowers a simd loop
// before inlining, and any local whose address is taken becomes a per-lane array that
// stops GCC from vectorising the CPU loops.
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
template <typename T>
MMGRAD_HD T max0(T x) {
  return x > T(0) ? x : T(0);
}

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
template <typename T>
struct EmaResult {
  T m, v, var;  // updated moments (stored as T) and the bias-corrected variance
};

template <typename T, typename W = double>
MMGRAD_HD EmaResult<T> ema_update(T g, T m0, T v0, W beta, W one_minus_beta, W inv_bias_correction) {
  const W gw = static_cast<W>(g);
  const W mw = beta * static_cast<W>(m0) + one_minus_beta * gw;
  const W vw = beta * static_cast<W>(v0) + one_minus_beta * (gw * gw);
  const W m_hat = mw * inv_bias_correction;
  const W d = vw * inv_bias_correction - m_hat * m_hat;
  return {static_cast<T>(mw), static_cast<T>(vw), static_cast<T>(max0(d))};
}

// SPEC §3.2: 0 where the objective does not reach the coordinate (mu = var = 0 exactly).
// Written without branches (| not ||, selects) so that the CPU loops vectorise.
template <typename T>
MMGRAD_HD T precision(T mu, T var, T eps) {
  const T lam = T(1) / (var + eps);
  return ((mu != T(0)) | (var != T(0))) ? lam : T(0);
}

// SPEC §3.3, clamped to kEvidenceMax (an overflow to inf clamps too).
// Formed as (lambda mu) mu: mu^2 alone overflows float32 for |mu| > 1.8e19 even where the
// evidence itself (with a large variance) is moderate.
template <typename T>
MMGRAD_HD T evidence(T mu, T lam, T gamma) {
  const T e = gamma * ((lam * mu) * mu);
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
// masses are divided by their sum kept = 1 - C (never formed as a difference). Two
// dogmatic opposite opinions (sum 0) give a vacuous result.
template <typename T>
struct Combined {
  Opinion<T> fused;
  T kept;
};

template <typename T>
MMGRAD_HD Combined<T> ds_combine2(Opinion<T> a, Opinion<T> b) {
  const T p = a.b_pos * b.b_pos + a.b_pos * b.u + b.b_pos * a.u;
  const T n = a.b_neg * b.b_neg + a.b_neg * b.u + b.b_neg * a.u;
  const T w = a.u * b.u;
  const T kept = p + n + w;
  const bool total_conflict = kept == T(0);
  const T inv = total_conflict ? T(0) : T(1) / kept;
  // u = a.u * (b.u / kept), not (a.u * b.u) / kept: for confident opinions (u ~ 2e-30) the
  // product underflows float32 while the normalised uncertainty (~1e-30) does not, and a
  // fused u of 0 would make every later fold forget how confident each side was.
  return {{p * inv, n * inv, total_conflict ? T(1) : a.u * (b.u * inv)}, kept};
}

template <typename T>
MMGRAD_HD T confidence_scale(Opinion<T> fused, int mode) {
  const T d = fused.b_pos - fused.b_neg;
  const T belief = d < T(0) ? -d : d;
  // certainty 1 - u formed as b_pos + b_neg (the opinion sums to 1): no cancellation when u ~ 1
  return mode == kConfidenceBelief ? belief : (mode == kConfidenceCertainty ? fused.b_pos + fused.b_neg : T(1));
}

// The Dempster-Shafer fold and the weight sums of one coordinate, objective by objective.
// The fold runs in double whatever T is: the fused uncertainty of a few confident
// objectives is a product of u ~ 2e-30 each (1e-60 for two), below float32's range, and
// once it flushes to 0 a later opposite opinion meets a dogmatic one and the fold
// forgets how confident each side was (found by the fuzz tests; README, "Spec notes").
using FoldT = double;

template <typename T>
struct FoldState {
  Opinion<FoldT> fused;  // fused opinion of the objectives folded so far
  FoldT kept;            // prod over the folds of (1 - C)
  T w_sum;               // sum of the weights
  T n_reach;             // objectives that reach the coordinate
};

template <typename T>
struct FoldStep {
  FoldState<T> state;  // the fold with this objective joined
  T weight;            // its raw weight: belief 1 - u (formed without cancellation) or lambda
};

// SPEC §3.2-3.5 for objective k of one coordinate: its opinion joins the fold (the first
// one starts it; `state` is then ignored).
template <typename T>
MMGRAD_HD FoldStep<T> fold_objective(FoldState<T> state, T mu, T var, BogcParams<T> prm, bool first) {
  const T lam = precision(mu, var, prm.eps);
  const Opinion<T> op = opinion(mu, evidence(mu, lam, prm.gamma));
  const T w = prm.weights == kWeightsBelief ? op.b_pos + op.b_neg : lam;
  const Opinion<FoldT> op_w{static_cast<FoldT>(op.b_pos), static_cast<FoldT>(op.b_neg), static_cast<FoldT>(op.u)};
  const Combined<FoldT> c = ds_combine2(state.fused, op_w);
  const T reach = lam > T(0) ? T(1) : T(0);
  FoldStep<T> r;
  r.state.fused.b_pos = first ? op_w.b_pos : c.fused.b_pos;
  r.state.fused.b_neg = first ? op_w.b_neg : c.fused.b_neg;
  r.state.fused.u = first ? op_w.u : c.fused.u;
  r.state.kept = first ? FoldT(1) : state.kept * c.kept;
  r.state.w_sum = first ? w : state.w_sum + w;
  r.state.n_reach = first ? reach : state.n_reach + reach;
  r.weight = w;
  return r;
}

// share_m = w_m / sum(w), a division each: 1/sum(w) overflows when the sum is subnormal
// (belief weights of tiny gradients), and inf * 0 would put NaN into the gradient.
template <typename T>
MMGRAD_HD T share_of(T w, T w_sum) {
  return w_sum > T(0) ? w / w_sum : T(0);
}

// SPEC §3.6: ghat = confidence * n * sum_m share_m mu_m (weighted_mu is that sum).
template <typename T>
MMGRAD_HD T calibrated(FoldState<T> s, T weighted_mu, int confidence) {
  return static_cast<T>(confidence_scale(s.fused, confidence)) * (s.n_reach * weighted_mu);
}

// SPEC §3.2-3.6 for one coordinate, as a GPU thread runs it: mu_at(k), var_at(k) give
// objective k's mean and variance, weight_at(k) is storage (T&) that ends holding its
// share. The CPU kernel makes the same calls objective by objective over a block of
// coordinates (structure of arrays, so its loops vectorise).
template <typename T>
struct CoordinateResult {
  T out;
  FoldState<T> state;
};

template <typename T, int MT, typename MuAt, typename VarAt, typename WeightAt>
MMGRAD_HD CoordinateResult<T> bogc_coordinate(int m_count, const MuAt& mu_at, const VarAt& var_at,
                                             BogcParams<T> prm, const WeightAt& weight_at) {
  const int M = MT > 0 ? MT : m_count;
  FoldState<T> s{{FoldT(0), FoldT(0), FoldT(1)}, FoldT(1), T(0), T(0)};
MMGRAD_UNROLL
  for (int k = 0; k < M; ++k) {
    const FoldStep<T> step = fold_objective(s, mu_at(k), var_at(k), prm, k == 0);
    s = step.state;
    weight_at(k) = step.weight;
  }
  T weighted_mu = T(0);
MMGRAD_UNROLL
  for (int k = 0; k < M; ++k) {
    T& w = weight_at(k);
    w = share_of(w, s.w_sum);
    weighted_mu += w * mu_at(k);
  }
  return {calibrated(s, weighted_mu, prm.confidence), s};
}

}  // namespace math
}  // namespace mmgrad
