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
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMGRAD_HD __host__ __device__ __forceinline__
// The MOO solver's steps: a call each on the GPU, so their 16-double vectors do not all
// compete for one function's registers (that spilled at sm_90).
#define MMGRAD_HD_CALL __host__ __device__ __noinline__
#define MMGRAD_UNROLL _Pragma("unroll")
#else
#define MMGRAD_HD inline
#define MMGRAD_HD_CALL inline
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


// ------------------------------------------------------------------------------------
// SPEC §4: MGDA / MMPareto weights from one group's M x M Gram matrix (M <= 16), in a
// fixed budget of iterations and without host help, so a GPU can solve them in one block
// with no synchronisation. The same algorithm as mmgrad/kernels/triton_kernels.py's
// solver (Triton cannot include this header): pairwise Frank-Wolfe with exact line
// search, each round ending with a conjugate-gradient polish on the support's face.
// The CPU extension binds it too (moo_weights_device), so the CPU tests cover it.
constexpr int kMooMaxObjectives = 16;
constexpr int kMooIterations = 256;  // per round
constexpr int kMooRounds = 3;
constexpr double kMooGapTol = 1e-7;  // SPEC §4's certificate, relative to max_m K_mm
enum MooMethod : int { kMooMgda = 0, kMooMmpareto = 1 };
enum MooNormalize : int { kNormalizeNone = 0, kNormalizeL2 = 1, kNormalizeLoss = 2 };

struct MooVector {
  double v[kMooMaxObjectives];
};

MMGRAD_HD double moo_dot(const MooVector& a, const MooVector& b, int m) {
  double s = 0;
  for (int i = 0; i < m; ++i) s += a.v[i] * b.v[i];
  return s;
}
MMGRAD_HD MooVector moo_matvec(const double* K, const MooVector& x, int m) {
  MooVector y;
  for (int i = 0; i < m; ++i) {
    double s = 0;
    for (int j = 0; j < m; ++j) s += K[i * m + j] * x.v[j];
    y.v[i] = s;
  }
  return y;
}

// Pairwise Frank-Wolfe from a (on the simplex over `act`), until the duality gap
// a^T K a - min_{i active} (K a)_i <= kMooGapTol or kMooIterations.
MMGRAD_HD_CALL MooVector moo_pairwise_fw(const double* K, MooVector a, const bool* act, int m) {
  for (int it = 0; it < kMooIterations; ++it) {
    const MooVector g = moo_matvec(K, a, m);
    int s = -1, v = -1;
    for (int i = 0; i < m; ++i) {
      if (act[i] && (s < 0 || g.v[i] < g.v[s])) s = i;
      if (a.v[i] > 0 && (v < 0 || g.v[i] > g.v[v])) v = i;
    }
    if (s < 0 || v < 0 || moo_dot(a, g, m) - g.v[s] <= kMooGapTol) break;
    // direction e_s - e_v: d^T K d = K_ss + K_vv - 2 K_sv, g^T d = g_s - g_v
    const double dkd = K[s * m + s] + K[v * m + v] - 2 * K[s * m + v];
    double t = dkd > 0 ? -(g.v[s] - g.v[v]) / dkd : 0.0;
    t = t < 0 ? 0.0 : (t > a.v[v] ? a.v[v] : t);
    a.v[s] += t;
    a.v[v] -= t;
  }
  double sum = 0;
  for (int i = 0; i < m; ++i) {
    a.v[i] = act[i] && a.v[i] > 0 ? a.v[i] : 0.0;
    sum += a.v[i];
  }
  for (int i = 0; i < m; ++i) a.v[i] /= (sum > 1e-300 ? sum : 1e-300);
  return a;
}

// min x^T K x on the affine hull of a's support by conjugate gradients (exact in
// <= |support| steps); kept if it stays on the simplex and does not raise the objective.
MMGRAD_HD_CALL MooVector moo_face_polish(const double* K, const MooVector& a, int m) {
  int n_face = 0;
  for (int i = 0; i < m; ++i) n_face += a.v[i] > 0 ? 1 : 0;
  const double inv_face = 1.0 / (n_face > 0 ? n_face : 1);
  auto project = [&](MooVector y) {  // onto {sum = 0} within the face
    double mean = 0;
    for (int i = 0; i < m; ++i) mean += a.v[i] > 0 ? y.v[i] : 0.0;
    mean *= inv_face;
    for (int i = 0; i < m; ++i) y.v[i] = a.v[i] > 0 ? y.v[i] - mean : 0.0;
    return y;
  };
  MooVector x = a, r = moo_matvec(K, a, m);
  for (int i = 0; i < m; ++i) r.v[i] = -r.v[i];
  r = project(r);
  MooVector p = r;
  double rs = moo_dot(r, r, m);
  for (int step = 0; step < m; ++step) {
    const MooVector kp_raw = moo_matvec(K, p, m);
    const double pkp = moo_dot(p, kp_raw, m);
    const double alpha = pkp > 1e-300 ? rs / pkp : 0.0;
    const MooVector kp = project(kp_raw);
    for (int i = 0; i < m; ++i) {
      x.v[i] += alpha * p.v[i];
      r.v[i] -= alpha * kp.v[i];
    }
    const double rs_new = moo_dot(r, r, m);
    const double beta = rs > 1e-300 ? rs_new / rs : 0.0;
    for (int i = 0; i < m; ++i) p.v[i] = r.v[i] + beta * p.v[i];
    rs = rs_new;
  }
  bool feasible = true;
  for (int i = 0; i < m; ++i) feasible = feasible && (a.v[i] <= 0 || x.v[i] >= 0);
  const double f_a = moo_dot(a, moo_matvec(K, a, m), m), f_x = moo_dot(x, moo_matvec(K, x, m), m);
  if (!(feasible && f_x <= f_a)) return a;
  for (int i = 0; i < m; ++i) x.v[i] = a.v[i] > 0 ? x.v[i] : 0.0;
  return x;
}

// argmin_{a in simplex over act} a^T K a for K already scaled so that max K_mm = 1.
MMGRAD_HD MooVector moo_min_norm(const double* K, const bool* act, int m) {
  int n_act = 0;
  for (int i = 0; i < m; ++i) n_act += act[i] ? 1 : 0;
  MooVector a;
  for (int i = 0; i < m; ++i) a.v[i] = act[i] ? 1.0 / n_act : 0.0;
  for (int round = 0; round < kMooRounds; ++round) a = moo_face_polish(K, moo_pairwise_fw(K, a, act, m), m);
  double sum = 0;  // the polish drifts off sum 1 by rounding
  for (int i = 0; i < m; ++i) sum += a.v[i];
  for (int i = 0; i < m; ++i) a.v[i] /= (sum > 1e-300 ? sum : 1e-300);
  return a;
}

// SPEC §4 weights of one group: K is its m x m Gram (row-major), losses the M losses
// (normalize = kNormalizeLoss only). Objectives with K_mm = 0 get weight 0.
MMGRAD_HD_CALL MooVector moo_weights(const double* K, int m, int method, int normalize, const double* losses, double magnitude) {
  bool act[kMooMaxObjectives];
  double scaled[kMooMaxObjectives * kMooMaxObjectives];
  int n_act = 0;
  for (int i = 0; i < m; ++i) {
    act[i] = K[i * m + i] > 0;
    n_act += act[i] ? 1 : 0;
  }
  MooVector w;
  if (method == kMooMgda) {
    if (n_act == 0) {
      for (int i = 0; i < m; ++i) w.v[i] = 1.0 / m;
      return w;
    }
    double s[kMooMaxObjectives], top = 0;
    for (int i = 0; i < m; ++i) {
      const double raw = normalize == kNormalizeL2 ? sqrt(K[i * m + i]) : (normalize == kNormalizeLoss ? losses[i] : 1.0);
      s[i] = act[i] ? raw : 1.0;
    }
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < m; ++j) scaled[i * m + j] = K[i * m + j] / (s[i] * s[j]);
    for (int i = 0; i < m; ++i) top = act[i] && scaled[i * m + i] > top ? scaled[i * m + i] : top;
    for (int i = 0; i < m * m; ++i) scaled[i] /= top;
    return moo_min_norm(scaled, act, m);
  }
  for (int i = 0; i < m; ++i) w.v[i] = 0.0;
  if (n_act == 0) return w;
  bool disagree = false;
  double top = 0, sum_sq = 0;
  for (int i = 0; i < m; ++i) {
    top = act[i] && K[i * m + i] > top ? K[i * m + i] : top;
    for (int j = 0; j < m; ++j)
      if (act[i] && act[j]) {
        disagree = disagree || K[i * m + j] / (sqrt(K[i * m + i]) * sqrt(K[j * m + j])) <= 0;
        sum_sq += K[i * m + j];
      }
  }
  MooVector alpha;
  if (disagree) {
    for (int i = 0; i < m * m; ++i) scaled[i] = K[i] / top;
    alpha = moo_min_norm(scaled, act, m);
  } else {
    for (int i = 0; i < m; ++i) alpha.v[i] = act[i] ? 1.0 / n_act : 0.0;
  }
  MooVector c;
  for (int i = 0; i < m; ++i) c.v[i] = n_act * alpha.v[i];
  const double c_sq = moo_dot(c, moo_matvec(K, c, m), m);
  double boost = c_sq > 0 ? sqrt(sum_sq / c_sq) : 1.0;
  boost = boost > 1.0 ? boost : 1.0;
  for (int i = 0; i < m; ++i) w.v[i] = c.v[i] * boost * magnitude;
  return w;
}

}  // namespace math
}  // namespace mmgrad
