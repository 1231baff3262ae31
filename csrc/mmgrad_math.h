// Element math of mmgrad (docs/spec.md §3), shared by the C++ CPU kernels and the CUDA kernels.
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
#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <bit>
#endif

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
// Dempster-Shafer fold never meets 0/0 (docs/spec.md, §9).
constexpr double kEvidenceMax = 1e30;

// Runtime-M kernels keep per-objective values in registers/stack arrays of this size.
constexpr int kMaxObjectives = 64;

// The float64 statistics vector of the fused BOGC step, defined here once for every
// backend: [sum_sq, out_sq, nonfinite, u_sum, conflict_sum, share_count | share_sum (M) |
// Gram (groups x M x M)]. The CPU kernels return one for the call; the GPU kernels one
// per block, of one group (groups = 1). Python reads it in mmgrad/kernels/stats.py, which
// a test holds against this struct (the CPU extension exports its offsets).
struct StatsLayout {
  int64_t m, groups;
  static constexpr int64_t kScalars = 6;
  static constexpr MMGRAD_HD int64_t sum_sq() { return 0; }
  static constexpr MMGRAD_HD int64_t out_sq() { return 1; }
  static constexpr MMGRAD_HD int64_t nonfinite() { return 2; }
  static constexpr MMGRAD_HD int64_t u_sum() { return 3; }
  static constexpr MMGRAD_HD int64_t conflict_sum() { return 4; }
  static constexpr MMGRAD_HD int64_t share_count() { return 5; }
  static constexpr MMGRAD_HD int64_t share_sum() { return kScalars; }
  constexpr MMGRAD_HD int64_t gram() const { return kScalars + m; }
  constexpr MMGRAD_HD int64_t size() const { return gram() + groups * m * m; }
};

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

// docs/spec.md §3.1's EMA, kept as the bias-corrected mean and the variance themselves
// (decision 3): with alpha = (1-beta)/(1-beta^t), m_hat' = m_hat + alpha*d and
// var' = (1-alpha)(var + alpha*d^2) for d = g - m_hat, which equals v_hat - m_hat^2 of
// the (m, v) moments but sums only non-negative terms: no cancellation, so it runs in the
// gradient's precision. alpha and 1-alpha (formed apart, in double) come from the host.
template <typename T>
struct EmaResult {
  T mean, var;  // the updated state; var is also the step's variance
};

template <typename T>
MMGRAD_HD EmaResult<T> ema_update(T g, T mean0, T var0, T alpha, T one_minus_alpha) {
  const T d = g - mean0;
  const T ad = alpha * d;
  // (1-alpha)*alpha*d first: on step 1 (alpha = 1) it is 0 even where d*d overflows
  return {mean0 + ad, one_minus_alpha * var0 + (one_minus_alpha * ad) * d};
}

// docs/spec.md §3.2: 0 where the objective does not reach the coordinate (mu = var = 0 exactly).
// Written without branches (| not ||, selects) so that the CPU loops vectorise.
template <typename T>
MMGRAD_HD T precision(T mu, T var, T eps) {
  const T lam = T(1) / (var + eps);
  return ((mu != T(0)) | (var != T(0))) ? lam : T(0);
}

// docs/spec.md §3.3, clamped to kEvidenceMax (an overflow to inf clamps too).
// Formed as (lambda mu) mu: mu^2 alone overflows float32 for |mu| > 1.8e19 even where the
// evidence itself (with a large variance) is moderate.
template <typename T>
MMGRAD_HD T evidence(T mu, T lam, T gamma) {
  const T e = gamma * ((lam * mu) * mu);
  return e < T(kEvidenceMax) ? e : T(kEvidenceMax);
}

// docs/spec.md §3.4: all evidence supports sign(mu); u = 2/(e+2).
template <typename T>
MMGRAD_HD Opinion<T> opinion(T mu, T e) {
  const T strength = e + T(2);
  const T b = e / strength;
  return {mu > T(0) ? b : T(0), mu < T(0) ? b : T(0), T(2) / strength};
}

// docs/spec.md §3.5: reduced Dempster-Shafer rule for two opinions. The three unnormalised
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

// The confidence mode as three 0/1 factors, formed once outside the coordinate loops:
// selecting on an int mode inside them keeps GCC from vectorising the loop.
template <typename T>
struct ConfidenceMix {
  T belief, certainty, none;
};
template <typename T>
MMGRAD_HD ConfidenceMix<T> confidence_mix(int mode) {
  return {mode == kConfidenceBelief ? T(1) : T(0), mode == kConfidenceCertainty ? T(1) : T(0),
          mode == kConfidenceNone ? T(1) : T(0)};
}
// certainty 1 - u is formed as b_pos + b_neg (the opinion sums to 1): no cancellation when u ~ 1
template <typename T>
MMGRAD_HD T confidence_scale(T b_pos, T b_neg, ConfidenceMix<T> c) {
  const T d = b_pos - b_neg;
  return c.belief * (d < T(0) ? -d : d) + c.certainty * (b_pos + b_neg) + c.none;
}

// ---- The fused step's Dempster-Shafer fold, in the gradient's own precision ----------
// Each BOGC opinion supports one sign only: (b, 0, u) for mu > 0, (0, b, u) for mu < 0,
// vacuous for mu = 0. Dempster's rule is associative, so the left-to-right fold of
// docs/spec.md §3.5 equals, exactly, combining the positive opinions into (1 - U+, 0, U+), the
// negative ones into (0, 1 - U-, U-) with U = prod u, and then the two:
//   kept = U+ + U- - U+ U-,  b+ = (1 - U+) U- / kept,  b- = (1 - U-) U+ / kept,
//   u = U+ U- / kept,  conflict = 1 - kept = (1 - U+)(1 - U-).
// U of a few confident objectives is a product of u ~ 2e-30 each, below float32's range,
// so it is kept as mantissa * 2^exponent (an int): it cannot flush to zero, and the
// division by kept happens once, after normalising by the larger U. B = 1 - U is kept
// directly (B' = b + B u), so no belief is formed as a difference of near-1 numbers.
// Float32 gradients then need no float64 per coordinate (docs/spec.md, decision 12).

template <typename T>
struct FloatBits;
template <>
struct FloatBits<float> {
  using U = uint32_t;
  static constexpr int kMant = 23, kBias = 127;
};
template <>
struct FloatBits<double> {
  using U = uint64_t;
  static constexpr int kMant = 52, kBias = 1023;
};

MMGRAD_HD uint32_t to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return std::bit_cast<uint32_t>(x);
#endif
}
MMGRAD_HD uint64_t to_bits(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  return std::bit_cast<uint64_t>(x);
#endif
}
template <typename T>
MMGRAD_HD T from_bits(typename FloatBits<T>::U u) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return __uint_as_float(u); else return __longlong_as_double(static_cast<long long>(u));
#else
  return std::bit_cast<T>(u);
#endif
}

// x = mant * 2^exp with mant in [1, 2): a float with an int exponent.
template <typename T>
struct Wide {
  T mant;
  int32_t exp;
};

// w * x for x in [2^-100, 1] (an opinion's u, or 1): the product of mant in [1, 2) and x
// is a normal number, whose exponent bits move into exp.
template <typename T>
MMGRAD_HD Wide<T> wide_mul(Wide<T> w, T x) {
  using B = FloatBits<T>;
  using U = typename B::U;
  const U bits = to_bits(w.mant * x);
  const int32_t e = static_cast<int32_t>(bits >> B::kMant) - B::kBias;
  return {from_bits<T>((bits & ((U(1) << B::kMant) - 1)) | (U(B::kBias) << B::kMant)), w.exp + e};
}

// 2^k for k <= 0; 0 below the normal range.
template <typename T>
MMGRAD_HD T pow2(int32_t k) {
  using B = FloatBits<T>;
  using U = typename B::U;
  return k <= -B::kBias ? T(0) : from_bits<T>(U(k + B::kBias) << B::kMant);
}

template <typename T>
struct FoldState {
  T b_pos, b_neg;        // 1 - U+, 1 - U-: belief of the positive / negative objectives combined
  Wide<T> u_pos, u_neg;  // U+, U-
  T w_sum;               // sum of the weights
  T n_reach;             // objectives that reach the coordinate
};

template <typename T>
MMGRAD_HD FoldState<T> fold_start() {
  return {T(0), T(0), {T(1), 0}, {T(1), 0}, T(0), T(0)};
}

template <typename T>
struct FoldStep {
  FoldState<T> state;  // the fold with this objective joined
  T weight;            // its raw weight: belief b = 1 - u (formed without cancellation) or lambda
};

// docs/spec.md §3.2-3.4 for objective k of one coordinate, joined to the fold: two divisions
// (the precision, and 1/(e + 2) for both b and u).
template <typename T>
MMGRAD_HD FoldStep<T> fold_objective(FoldState<T> s, T mu, T var, BogcParams<T> prm) {
  const T lam = precision(mu, var, prm.eps);
  const T e = evidence(mu, lam, prm.gamma);
  const T inv_strength = T(1) / (e + T(2));
  const T b = e * inv_strength, u = T(2) * inv_strength;
  const bool pos = mu > T(0), neg = mu < T(0);
  FoldStep<T> r;
  r.state.b_pos = pos ? b + s.b_pos * u : s.b_pos;
  r.state.b_neg = neg ? b + s.b_neg * u : s.b_neg;
  r.state.u_pos = wide_mul(s.u_pos, pos ? u : T(1));
  r.state.u_neg = wide_mul(s.u_neg, neg ? u : T(1));
  const T w = prm.weights == kWeightsBelief ? b : lam;
  r.state.w_sum = s.w_sum + w;
  r.state.n_reach = s.n_reach + (lam > T(0) ? T(1) : T(0));
  r.weight = w;
  return r;
}

template <typename T>
struct Fused {
  Opinion<T> op;
  T conflict;
};

// The fused opinion of a finished fold (one division). With lo, hi the smaller and the
// larger of U+, U- and everything divided by 2^exp(hi): kept' = C + A (1 - hi), where
// A = lo / 2^exp(hi) and C = mant(hi) >= 1, so kept' never vanishes.
template <typename T>
MMGRAD_HD Fused<T> fused_opinion(FoldState<T> s) {
  // | and &, not || and &&: a branch here would keep the CPU loop from vectorising
  const bool pos_lo = (s.u_pos.exp < s.u_neg.exp) | ((s.u_pos.exp == s.u_neg.exp) & (s.u_pos.mant <= s.u_neg.mant));
  const T lo_mant = pos_lo ? s.u_pos.mant : s.u_neg.mant, hi_mant = pos_lo ? s.u_neg.mant : s.u_pos.mant;
  const int32_t lo_exp = pos_lo ? s.u_pos.exp : s.u_neg.exp, hi_exp = pos_lo ? s.u_neg.exp : s.u_pos.exp;
  const T b_lo = pos_lo ? s.b_pos : s.b_neg, b_hi = pos_lo ? s.b_neg : s.b_pos;
  const T A = lo_mant * pow2<T>(lo_exp - hi_exp);
  const T C = hi_mant;
  const T inv = T(1) / (C + A * b_hi);
  const T f_lo = (b_lo * C) * inv, f_hi = (b_hi * A) * inv;
  const T u = ((A * C) * pow2<T>(hi_exp)) * inv;
  return {{pos_lo ? f_lo : f_hi, pos_lo ? f_hi : f_lo, u}, s.b_pos * s.b_neg};
}

// share_m = w_m / sum(w) as w_m * (1/sum(w)): one reciprocal per coordinate. A sum below
// 2^-64 (belief weights of tiny gradients; a subnormal's reciprocal overflows, and inf * 0
// would put NaN into the gradient) is scaled by 2^64 first, exactly.
template <typename T>
struct ShareScale {
  T scale, inv;
};
template <typename T>
MMGRAD_HD ShareScale<T> share_scale(T w_sum) {
  const T scale = w_sum < T(5.421010862427522e-20) ? T(18446744073709551616.0) : T(1);
  const T scaled = w_sum * scale;
  return {scale, scaled > T(0) ? T(1) / scaled : T(0)};
}
template <typename T>
MMGRAD_HD T share_of(T w, ShareScale<T> sc) {
  return (w * sc.scale) * sc.inv;
}

// docs/spec.md §3.6: ghat = confidence * n * sum_m share_m mu_m (weighted_mu is that sum).
// (Scalars, not the Fused struct: GCC does not vectorise a loop passing that by value.)
template <typename T>
MMGRAD_HD T calibrated(T b_pos, T b_neg, T n_reach, T weighted_mu, ConfidenceMix<T> confidence) {
  return confidence_scale(b_pos, b_neg, confidence) * (n_reach * weighted_mu);
}

// docs/spec.md §3.2-3.6 for one coordinate, as a GPU thread runs it: mu_at(k), var_at(k) give
// objective k's mean and variance, weight_at(k) is storage (T&) that ends holding its
// share. The CPU kernel makes the same calls objective by objective over a block of
// coordinates (structure of arrays, so its loops vectorise).
template <typename T>
struct CoordinateResult {
  T out;
  FoldState<T> state;
  Fused<T> fused;
};

template <typename T, int MT, typename MuAt, typename VarAt, typename WeightAt>
MMGRAD_HD CoordinateResult<T> bogc_coordinate(int m_count, const MuAt& mu_at, const VarAt& var_at,
                                             BogcParams<T> prm, const WeightAt& weight_at) {
  const int M = MT > 0 ? MT : m_count;
  FoldState<T> s = fold_start<T>();
MMGRAD_UNROLL
  for (int k = 0; k < M; ++k) {
    const FoldStep<T> step = fold_objective(s, mu_at(k), var_at(k), prm);
    s = step.state;
    weight_at(k) = step.weight;
  }
  const ShareScale<T> sc = share_scale(s.w_sum);
  T weighted_mu = T(0);
MMGRAD_UNROLL
  for (int k = 0; k < M; ++k) {
    T& w = weight_at(k);
    w = share_of(w, sc);
    weighted_mu += w * mu_at(k);
  }
  const Fused<T> f = fused_opinion(s);
  return {calibrated(f.op.b_pos, f.op.b_neg, s.n_reach, weighted_mu, confidence_mix<T>(prm.confidence)), s, f};
}


// ------------------------------------------------------------------------------------
// docs/spec.md §4: MGDA / MMPareto weights from one group's M x M Gram matrix (M <= 16), without
// host help, so a GPU solves them in one block with no synchronisation.
//
// The min-norm problem  min a^T K a  over the simplex is a convex QP. It is solved by the
// Mizuno-Todd-Ye predictor-corrector interior-point method (docs/solver.md has the proof
// of the bound below): with s = K a - lambda 1 and mu = a^T s / n over the n objectives
// that reach the group, every iterate keeps 1^T a = 1 and a, s > 0; the duality gap
// a^T K a - min_i (K a)_i is at most n mu, and each iteration multiplies mu by at most
// (1 - t + t^2/4)(1 + 1/(8n)) with t = 0.59/sqrt(n) (0.86 at n = 16), whatever K is:
// singular, rank-deficient, with gradient norms spread over many decades. Each iteration is two Newton solves of
// (K + diag(s/a)), a symmetric positive definite matrix even where K is singular, by
// Gauss-Jordan elimination without pivoting. The same algorithm, step for step, as
// mmgrad/kernels/triton_kernels.py's solver (Triton cannot include this header). The CPU
// extension binds it too (moo_weights_device), so the CPU tests cover it.
constexpr int kMooMaxObjectives = 16;
constexpr double kMooGapTol = 1e-7;             // docs/spec.md §4's certificate, relative to max_m K_mm
constexpr double kMooGapTarget = kMooGapTol / 8;  // where the solver stops: margin for the caller's rounding
constexpr int kMooIterations = 150;  // the proof's bound at n = 16 is 149 (docs/solver.md); runs stop far sooner
constexpr int kMooBisections = 30;   // the predictor's step length, to 2^-30
constexpr double kMooCentral = 0.25;  // the corrector returns into ||a s - mu|| <= 0.25 mu ...
constexpr double kMooWide = 0.5;      // ... from the predictor's ||a s - mu|| <= 0.5 mu
enum MooMethod : int { kMooMgda = 0, kMooMmpareto = 1 };
enum MooNormalize : int { kNormalizeNone = 0, kNormalizeL2 = 1, kNormalizeLoss = 2 };
// The codes the solver knows; the bindings refuse any other before a launch, and the
// solver itself answers an unknown one with NaN weights, never another method's weights.
MMGRAD_HD bool moo_method_known(int method) { return method == kMooMgda || method == kMooMmpareto; }
MMGRAD_HD bool moo_normalize_known(int normalize) { return normalize >= kNormalizeNone && normalize <= kNormalizeLoss; }

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

// min_{i active} g_i (some objective is active wherever this is called).
MMGRAD_HD double moo_active_min(const MooVector& g, const bool* act, int m) {
  double lowest = 0;
  bool any = false;
  for (int i = 0; i < m; ++i)
    if (act[i] && (!any || g.v[i] < lowest)) {
      lowest = g.v[i];
      any = true;
    }
  return lowest;
}

// a^T K a - min_{i active} (K a)_i: docs/spec.md §4's duality gap (Frank-Wolfe's certificate).
MMGRAD_HD double moo_gap(const double* K, const MooVector& a, const bool* act, int m) {
  const MooVector g = moo_matvec(K, a, m);
  return moo_dot(a, g, m) - moo_active_min(g, act, m);
}

// A Newton step towards a_i s_i = target on the simplex: (K + diag(s/a)) da - dl 1 = target/a - s,
// 1^T da = 0. Solved as u = H^-1 r, v = H^-1 1, dl = -1^T u / 1^T v, da = u + dl v.
struct MooStep {
  MooVector da, ds;  // ds = K da - dl 1
  double dl;
};
MMGRAD_HD_CALL MooStep moo_newton(const double* K, const bool* act, int m, const MooVector& a, const MooVector& s,
                                  double target) {
  double h[kMooMaxObjectives * kMooMaxObjectives];
  MooVector u, v;
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < m; ++j) h[i * m + j] = act[i] && act[j] ? K[i * m + j] : 0.0;
    h[i * m + i] += act[i] ? s.v[i] / a.v[i] : 1.0;  // an objective outside the group: da_i = 0
    u.v[i] = act[i] ? target / a.v[i] - s.v[i] : 0.0;
    v.v[i] = act[i] ? 1.0 : 0.0;
  }
  for (int k = 0; k < m; ++k) {  // Gauss-Jordan; positive pivots, as H is SPD
    const double inv = 1.0 / h[k * m + k];
    for (int j = 0; j < m; ++j) h[k * m + j] *= inv;
    u.v[k] *= inv;
    v.v[k] *= inv;
    for (int i = 0; i < m; ++i) {
      if (i == k) continue;
      const double f = h[i * m + k];
      for (int j = 0; j < m; ++j) h[i * m + j] -= f * h[k * m + j];
      u.v[i] -= f * u.v[k];
      v.v[i] -= f * v.v[k];
    }
  }
  double su = 0, sv = 0;
  for (int i = 0; i < m; ++i) {
    su += u.v[i];
    sv += v.v[i];
  }
  MooStep step;
  step.dl = -su / sv;
  for (int i = 0; i < m; ++i) step.da.v[i] = u.v[i] + step.dl * v.v[i];
  step.ds = moo_matvec(K, step.da, m);
  for (int i = 0; i < m; ++i) step.ds.v[i] = act[i] ? step.ds.v[i] - step.dl : 0.0;
  return step;
}

// Whether a + t da, s + t ds stays positive and inside ||a s - mu|| <= kMooWide mu.
MMGRAD_HD bool moo_in_wide(const MooVector& a, const MooVector& s, const MooStep& st, double t, const bool* act, int m,
                           int n) {
  double p[kMooMaxObjectives], mu = 0;
  bool positive = true;
  for (int i = 0; i < m; ++i) {
    const double ai = a.v[i] + t * st.da.v[i], si = s.v[i] + t * st.ds.v[i];
    positive = positive && (!act[i] || (ai > 0 && si > 0));
    p[i] = act[i] ? ai * si : 0.0;
    mu += p[i];
  }
  mu /= n;
  double dev = 0;
  for (int i = 0; i < m; ++i) dev += act[i] ? (p[i] - mu) * (p[i] - mu) : 0.0;
  return positive && dev <= kMooWide * kMooWide * mu * mu;
}

// The predictor's step: 1 if it stays in the wide neighbourhood, else bisection; every
// t <= 0.59/sqrt(n) stays there, so the result is at least that (docs/solver.md).
MMGRAD_HD_CALL double moo_predictor_length(const MooVector& a, const MooVector& s, const MooStep& st, const bool* act,
                                           int m, int n) {
  if (moo_in_wide(a, s, st, 1.0, act, m, n)) return 1.0;
  double lo = 0, hi = 1;
  for (int b = 0; b < kMooBisections; ++b) {
    const double mid = 0.5 * (lo + hi);
    if (moo_in_wide(a, s, st, mid, act, m, n)) lo = mid;
    else hi = mid;
  }
  return lo;
}

// s = K a - lambda 1 over the active objectives.
MMGRAD_HD MooVector moo_slack(const double* K, const MooVector& a, double lambda, const bool* act, int m) {
  MooVector s = moo_matvec(K, a, m);
  for (int i = 0; i < m; ++i) s.v[i] = act[i] ? s.v[i] - lambda : 0.0;
  return s;
}

// argmin_{a in simplex over act} a^T K a for K already scaled so that max K_mm = 1.
MMGRAD_HD_CALL MooVector moo_min_norm(const double* K, const bool* act, int m) {
  int n = 0, first = -1, second = -1;
  for (int i = 0; i < m; ++i)
    if (act[i]) {
      second = first < 0 ? second : (second < 0 ? i : second);
      first = first < 0 ? i : first;
      ++n;
    }
  MooVector a;
  for (int i = 0; i < m; ++i) a.v[i] = act[i] ? 1.0 / n : 0.0;
  if (n == 2) {  // the closed form of two objectives, as the host's
    const double kii = K[first * m + first], kij = K[first * m + second], kjj = K[second * m + second];
    const double denom = kii + kjj - 2 * kij;
    double t = denom > 0 ? (kjj - kij) / denom : 0.5;
    t = t < 0 ? 0.0 : (t > 1 ? 1.0 : t);
    a.v[first] = t;
    a.v[second] = 1.0 - t;
    return a;
  }
  // Start on the central path's neighbourhood: a uniform, lambda below min (K a) by
  // 8 sqrt(n), so that |a_i s_i - mu| <= 2/n <= kMooCentral mu (|K_ij| <= 1).
  double lambda = moo_active_min(moo_matvec(K, a, m), act, m) - 8.0 * sqrt(static_cast<double>(n));
  for (int it = 0; it < kMooIterations && moo_gap(K, a, act, m) > kMooGapTarget; ++it) {
    MooVector s = moo_slack(K, a, lambda, act, m);
    const MooStep pred = moo_newton(K, act, m, a, s, 0.0);
    const double t = moo_predictor_length(a, s, pred, act, m, n);
    for (int i = 0; i < m; ++i) a.v[i] += t * pred.da.v[i];
    lambda += t * pred.dl;
    s = moo_slack(K, a, lambda, act, m);
    const MooStep corr = moo_newton(K, act, m, a, s, moo_dot(a, s, m) / n);
    for (int i = 0; i < m; ++i) a.v[i] += corr.da.v[i];
    lambda += corr.dl;
  }
  double sum = 0;  // 1^T a = 1 holds to rounding
  for (int i = 0; i < m; ++i) {
    a.v[i] = act[i] && a.v[i] > 0 ? a.v[i] : 0.0;
    sum += a.v[i];
  }
  for (int i = 0; i < m; ++i) a.v[i] /= sum;
  return a;
}

// docs/spec.md §4 weights of one group: K is its m x m Gram (row-major), losses the M losses
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
  if (!moo_method_known(method) || !moo_normalize_known(normalize)) {
    for (int i = 0; i < m; ++i) w.v[i] = NAN;
    return w;
  }
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
