// BOGC on the CPU (docs/spec.md §3): the fused step over the flat M x N buffer in one pass,
// plus the element-wise pieces the pure functions of mmgrad.ops expose.
#include "bogc.h"

#include "common.h"

namespace mmgrad {
namespace cpu {
namespace {

using math::BogcParams;

// Where a chunk's per-objective mean and variance come from.
enum class Source { kEma, kSamples, kMoments };

template <typename scalar_t, typename acc_t>
struct BogcArgs {
  int M = 0;
  int64_t N = 0, S = 0;
  const scalar_t* g = nullptr;     // kEma: M x N; kSamples: S x M x N; kMoments: mu (M x N)
  const acc_t* var_in = nullptr;   // kMoments: var (M x N)
  const void* state_mean_in = nullptr;  // kEma state in ...
  const void* state_var_in = nullptr;
  void* state_mean_out = nullptr;  // ... and out (may alias the inputs): acc_t, or
  void* state_var_out = nullptr;   // bfloat16 when bf16_state (state_dtype=torch.bfloat16)
  bool bf16_state = false;
  acc_t alpha = 0, one_minus_alpha = 0;  // the EMA's weight of this step (mmgrad_math.h)
  acc_t* out = nullptr;            // N, before norm matching: float32 for half gradients, so
                                   // it neither underflows nor is rounded twice (bogc.h)
  acc_t* fused_u = nullptr;        // optional N-long diagnostics
  acc_t* fused_b_pos = nullptr;
  acc_t* fused_b_neg = nullptr;
  BogcParams<acc_t> prm{};
};

// The fold's running state over a chunk, one scratch row per field (structure of arrays).
template <typename acc_t>
struct FoldRows {
  acc_t *b_pos, *b_neg, *mant_pos, *mant_neg, *w_sum, *n_reach;
  int32_t *exp_pos, *exp_neg;
};

// Objective k joins the fold at coordinate t (mmgrad_math.h: fold_objective); its raw
// weight goes to share[t].
template <typename acc_t>
inline __attribute__((always_inline)) void fold_at(const FoldRows<acc_t>& f, int64_t t, acc_t mu, acc_t var,
                                                   const BogcParams<acc_t>& prm, acc_t* share) {
  const math::FoldStep<acc_t> r = math::fold_objective(
      math::FoldState<acc_t>{f.b_pos[t], f.b_neg[t], {f.mant_pos[t], f.exp_pos[t]}, {f.mant_neg[t], f.exp_neg[t]},
                             f.w_sum[t], f.n_reach[t]},
      mu, var, prm);
  share[t] = r.weight;
  f.b_pos[t] = r.state.b_pos;
  f.b_neg[t] = r.state.b_neg;
  f.mant_pos[t] = r.state.u_pos.mant;
  f.exp_pos[t] = r.state.u_pos.exp;
  f.mant_neg[t] = r.state.u_neg.mant;
  f.exp_neg[t] = r.state.u_neg.exp;
  f.w_sum[t] = r.state.w_sum;
  f.n_reach[t] = r.state.n_reach;
}

// Objective k of one chunk with the EMA estimator, in one loop that streams its gradient
// and state from memory: the EMA update (in acc_t; the state, in state_t, rounded once;
// the step uses the unrounded variance) and the fold. One loop rather than a loading
// phase and a compute phase, so the memory traffic overlaps the element math.
template <typename state_t, typename scalar_t, typename acc_t>
void ema_fold_row(const BogcArgs<scalar_t, acc_t>& a, int k, int64_t lo, int64_t len, const FoldRows<acc_t>& f,
                  acc_t* mu, acc_t* share) {
  using IO = StateIO<state_t, acc_t>;
  using storage = typename IO::storage;
  const int64_t base = k * a.N + lo;
  const scalar_t* g = a.g + base;
  const storage* mean_in = static_cast<const storage*>(a.state_mean_in) + base;
  const storage* var_in = static_cast<const storage*>(a.state_var_in) + base;
  storage* mean_out = static_cast<storage*>(a.state_mean_out) + base;
  storage* var_out = static_cast<storage*>(a.state_var_out) + base;
  const acc_t alpha = a.alpha, oma = a.one_minus_alpha;
  const BogcParams<acc_t> prm = a.prm;
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) {
    const acc_t x = static_cast<acc_t>(g[t]);
    const math::EmaResult<acc_t> e = math::ema_update(x, IO::load(mean_in[t]), IO::load(var_in[t]), alpha, oma);
    mean_out[t] = IO::store(e.mean);
    var_out[t] = IO::store(e.var);
    mu[t] = x;
    fold_at(f, t, x, e.var, prm, share);
  }
}

// Fill mu/var scratch (M x kChunk each) for one chunk of the sample estimator or of given
// moments; returns its non-finite count. (The EMA's rows stream through ema_fold_row.)
template <Source src, typename scalar_t, typename acc_t>
double chunk_moments(const BogcArgs<scalar_t, acc_t>& a, int64_t lo, int64_t len, acc_t* mu, acc_t* var,
                     acc_t* scratch) {
  const int M = a.M;
  if (src == Source::kMoments) {
    const double bad = load_rows(M, a.g + lo, a.N, len, mu);
    for (int k = 0; k < M; ++k) std::copy(a.var_in + k * a.N + lo, a.var_in + k * a.N + lo + len, var + k * kChunk);
    return bad;
  }
  // Samples: two passes over the chunk's S rows (the second from cache) for an exact
  // mean and an unbiased variance, as the reference computes them.
  double bad = 0.0;
  const acc_t inv_s = acc_t(1) / static_cast<acc_t>(a.S);
  const acc_t inv_s1 = acc_t(1) / static_cast<acc_t>(a.S - 1);
  for (int k = 0; k < M; ++k) {
    acc_t* mk = mu + k * kChunk;
    acc_t* vk = var + k * kChunk;
    std::fill(mk, mk + len, acc_t(0));
    std::fill(vk, vk + len, acc_t(0));
    for (int64_t s = 0; s < a.S; ++s) {
      bad += load_rows(1, a.g + (s * M + k) * a.N + lo, a.N, len, scratch);
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) mk[t] += scratch[t];
    }
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) mk[t] *= inv_s;
    for (int64_t s = 0; s < a.S; ++s) {
      load_rows(1, a.g + (s * M + k) * a.N + lo, a.N, len, scratch);
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) {
        const acc_t d = scratch[t] - mk[t];
        vk[t] += d * d;
      }
    }
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) vk[t] *= inv_s1;
  }
  return bad;
}

// The per-coordinate math of mmgrad_math.h, objective by objective over a chunk: each
// loop below is element-wise over t (structure of arrays), so it vectorises; everything
// per coordinate is in acc_t (float32 for float32/half gradients), the fold's products
// in extended range (mmgrad_math.h), only the chunk's sums in double.
template <Source src, typename scalar_t, typename acc_t, int MT>
at::Tensor bogc_pass(const BogcArgs<scalar_t, acc_t>& a, const ChunkPlan& plan) {
  const int M = MT > 0 ? MT : a.M;  // a compile-time trip count where possible
  const StatsLayout L{M, plan.num_groups()};
  // acc_t rows: mu, var, share (M each); w_sum, n_reach, weighted mu, one for loading
  // samples, b_pos, b_neg, mant_pos, mant_neg, share scale and reciprocal, the sum over
  // m; two int32 rows (exp_pos, exp_neg; each fits in an acc_t row).
  constexpr int64_t kRows = 13;
  const int64_t elems = (3 * M + kRows) * kChunk;
  return run_chunks<acc_t>(plan, L, elems, [&](int64_t c, double* st, acc_t* buf) {
    int64_t grp, lo, len;
    plan.locate(c, grp, lo, len);
    acc_t* mu = buf;
    acc_t* var = mu + M * kChunk;
    acc_t* share = var + M * kChunk;
    acc_t *w_sum = share + M * kChunk, *n_reach = w_sum + kChunk, *wmu = n_reach + kChunk, *load = wmu + kChunk;
    acc_t *bp = load + kChunk, *bn = bp + kChunk, *mp = bn + kChunk, *mn = mp + kChunk;
    acc_t *sc_scale = mn + kChunk, *sc_inv = sc_scale + kChunk, *total = sc_inv + kChunk;
    int32_t* ep = reinterpret_cast<int32_t*>(total + kChunk);
    int32_t* en = reinterpret_cast<int32_t*>(total + 2 * kChunk);
    const BogcParams<acc_t> prm = a.prm;
    const math::FoldState<acc_t> start = math::fold_start<acc_t>();
    std::fill(bp, bp + len, start.b_pos);
    std::fill(bn, bn + len, start.b_neg);
    std::fill(mp, mp + len, start.u_pos.mant);
    std::fill(mn, mn + len, start.u_neg.mant);
    std::fill(ep, ep + len, start.u_pos.exp);
    std::fill(en, en + len, start.u_neg.exp);
    std::fill(w_sum, w_sum + len, start.w_sum);
    std::fill(n_reach, n_reach + len, start.n_reach);
    const FoldRows<acc_t> fold{bp, bn, mp, mn, w_sum, n_reach, ep, en};
    if constexpr (src == Source::kEma) {
      int64_t bad = 0;
      for (int k = 0; k < M; ++k) {
        acc_t *mk = mu + k * kChunk, *sk = share + k * kChunk;
        bool bf16 = false;
        if constexpr (std::is_same_v<acc_t, float>) bf16 = a.bf16_state;  // float32/half gradients only
        if (bf16)
          ema_fold_row<c10::BFloat16>(a, k, lo, len, fold, mk, sk);
        else
          ema_fold_row<acc_t>(a, k, lo, len, fold, mk, sk);
#pragma omp simd reduction(+ : bad)
        for (int64_t t = 0; t < len; ++t) bad += (mk[t] - mk[t] == mk[t] - mk[t]) ? 0 : 1;  // inf or NaN
      }
      st[L.nonfinite()] += static_cast<double>(bad);
    } else {
      st[L.nonfinite()] += chunk_moments<src>(a, lo, len, mu, var, load);
      for (int k = 0; k < M; ++k) {
        const acc_t *mk = mu + k * kChunk, *vk = var + k * kChunk;
        acc_t* sk = share + k * kChunk;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) fold_at(fold, t, mk[t], vk[t], prm, sk);
      }
    }
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const math::ShareScale<acc_t> sc = math::share_scale(w_sum[t]);
      sc_scale[t] = sc.scale;
      sc_inv[t] = sc.inv;
      wmu[t] = acc_t(0);
      total[t] = acc_t(0);
    }
    for (int k = 0; k < M; ++k) {
      const acc_t* mk = mu + k * kChunk;
      acc_t* sk = share + k * kChunk;
      acc_t share_sum = 0;  // a diagnostic (the mean share): the chunk's sum in acc_t, then double
#pragma omp simd reduction(+ : share_sum)
      for (int64_t t = 0; t < len; ++t) {
        sk[t] = math::share_of(sk[t], math::ShareScale<acc_t>{sc_scale[t], sc_inv[t]});
        wmu[t] += sk[t] * mk[t];
        total[t] += mk[t];  // sum_m g_m, for ||sum_m g_m||^2
        share_sum += sk[t];
      }
      st[L.share_sum() + k] += static_cast<double>(share_sum);
    }
    acc_t* const out = a.out + lo;
    acc_t *fu = load, *conflict = sc_scale;  // both free again: the fused u and conflict per coordinate
    const math::ConfidenceMix<acc_t> mix = math::confidence_mix<acc_t>(prm.confidence);
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const math::Fused<acc_t> f = math::fused_opinion(
          math::FoldState<acc_t>{bp[t], bn[t], {mp[t], ep[t]}, {mn[t], en[t]}, w_sum[t], n_reach[t]});
      out[t] = math::calibrated(f.op.b_pos, f.op.b_neg, n_reach[t], wmu[t], mix);
      fu[t] = f.op.u;
      conflict[t] = f.conflict;
      if constexpr (src == Source::kMoments) {  // the pure function's full diagnostics
        a.fused_u[lo + t] = f.op.u;
        a.fused_b_pos[lo + t] = f.op.b_pos;
        a.fused_b_neg[lo + t] = f.op.b_neg;
      }
    }
    // the chunk's sums in double (a loop of their own: reductions beside the element math
    // above keep GCC from vectorising it)
    double out_sq = 0, u_sum = 0, conflict_sum = 0, share_count = 0, sum_sq = 0;
#pragma omp simd reduction(+ : out_sq, u_sum, conflict_sum, share_count, sum_sq)
    for (int64_t t = 0; t < len; ++t) {
      out_sq += static_cast<double>(out[t]) * static_cast<double>(out[t]);
      sum_sq += static_cast<double>(total[t]) * static_cast<double>(total[t]);
      u_sum += static_cast<double>(fu[t]);
      conflict_sum += static_cast<double>(conflict[t]);
      share_count += w_sum[t] > acc_t(0) ? 1.0 : 0.0;
    }
    add_chunk_gram(M, mu, len, st + L.gram() + grp * M * M);
    st[L.sum_sq()] += sum_sq;
    st[L.out_sq()] += out_sq;
    st[L.u_sum()] += u_sum;
    st[L.conflict_sum()] += conflict_sum;
    st[L.share_count()] += share_count;
  });
}

template <Source src, typename scalar_t, typename acc_t>
at::Tensor bogc_dispatch_m(const BogcArgs<scalar_t, acc_t>& a, const ChunkPlan& plan) {
  switch (a.M) {
    case 1: return bogc_pass<src, scalar_t, acc_t, 1>(a, plan);
    case 2: return bogc_pass<src, scalar_t, acc_t, 2>(a, plan);
    case 3: return bogc_pass<src, scalar_t, acc_t, 3>(a, plan);
    case 4: return bogc_pass<src, scalar_t, acc_t, 4>(a, plan);
    case 5: return bogc_pass<src, scalar_t, acc_t, 5>(a, plan);
    case 6: return bogc_pass<src, scalar_t, acc_t, 6>(a, plan);
    case 7: return bogc_pass<src, scalar_t, acc_t, 7>(a, plan);
    case 8: return bogc_pass<src, scalar_t, acc_t, 8>(a, plan);
    default: return bogc_pass<src, scalar_t, acc_t, 0>(a, plan);
  }
}

template <typename scalar_t, typename acc_t>
BogcArgs<scalar_t, acc_t> make_args(const at::Tensor& g, const at::Tensor& out, const BogcOptions& o, int M,
                                    int64_t N) {
  BogcArgs<scalar_t, acc_t> a;
  a.M = M;
  a.N = N;
  a.g = g.data_ptr<scalar_t>();
  a.out = out.data_ptr<acc_t>();
  a.prm = {static_cast<acc_t>(o.gamma), static_cast<acc_t>(o.eps), o.confidence, o.weights};
  return a;
}

}  // namespace

at::Tensor bogc_step(const at::Tensor& g, const at::Tensor& mean_in, const at::Tensor& var_in, const at::Tensor& mean_out,
                     const at::Tensor& var_out, const at::Tensor& out, const at::Tensor& group_offsets, double alpha,
                     double one_minus_alpha, const BogcOptions& o) {
  const ChunkPlan plan(group_offsets);
  const int M = static_cast<int>(g.size(0));
  const int64_t N = g.size(1);
  at::Tensor stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "mmgrad_bogc_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, acc_t>(g, out, o, M, N);
    a.bf16_state = mean_in.scalar_type() == at::kBFloat16;
    TORCH_CHECK(a.bf16_state || mean_in.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "bogc_step: the state must be bfloat16 or the gradient's compute dtype");
    for (const at::Tensor* t : {&var_in, &mean_out, &var_out})
      TORCH_CHECK(t->scalar_type() == mean_in.scalar_type(), "bogc_step: mean and var (in and out) must share one dtype");
    a.state_mean_in = mean_in.data_ptr();
    a.state_var_in = var_in.data_ptr();
    a.state_mean_out = mean_out.data_ptr();
    a.state_var_out = var_out.data_ptr();
    a.alpha = static_cast<acc_t>(alpha);
    a.one_minus_alpha = static_cast<acc_t>(one_minus_alpha);
    stats = bogc_dispatch_m<Source::kEma>(a, plan);
  });
  return stats;
}

at::Tensor bogc_sample_step(const at::Tensor& samples, const at::Tensor& out, const at::Tensor& group_offsets,
                            const BogcOptions& o) {
  const ChunkPlan plan(group_offsets);
  const int M = static_cast<int>(samples.size(1));
  const int64_t N = samples.size(2);
  at::Tensor stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, samples.scalar_type(), "mmgrad_bogc_sample_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, acc_t>(samples, out, o, M, N);
    a.S = samples.size(0);
    stats = bogc_dispatch_m<Source::kSamples>(a, plan);
  });
  return stats;
}

at::Tensor bogc_from_moments(const at::Tensor& mu, const at::Tensor& var, const at::Tensor& out,
                             const at::Tensor& fused_u, const at::Tensor& fused_b_pos, const at::Tensor& fused_b_neg,
                             const BogcOptions& o) {
  const at::Tensor whole = at::tensor({int64_t(0), mu.size(1)}, at::TensorOptions().dtype(at::kLong));
  const ChunkPlan plan(whole);
  at::Tensor stats;
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "mmgrad_bogc_from_moments", [&] {
    auto a = make_args<scalar_t, scalar_t>(mu, out, o, static_cast<int>(mu.size(0)), mu.size(1));
    a.var_in = var.data_ptr<scalar_t>();
    a.fused_u = fused_u.data_ptr<scalar_t>();
    a.fused_b_pos = fused_b_pos.data_ptr<scalar_t>();
    a.fused_b_neg = fused_b_neg.data_ptr<scalar_t>();
    stats = bogc_dispatch_m<Source::kMoments>(a, plan);
  });
  return stats;
}

namespace {

// The loops live outside AT_DISPATCH_*: a #pragma cannot stand inside a macro argument.
template <typename scalar_t, typename acc_t>
void ema_moments_impl(const at::Tensor& g, const at::Tensor& mean_in, const at::Tensor& var_in,
                      const at::Tensor& mean_out, const at::Tensor& var_out, double alpha, double one_minus_alpha) {
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const acc_t* m0 = mean_in.data_ptr<acc_t>();
  const acc_t* v0 = var_in.data_ptr<acc_t>();
  acc_t* m1 = mean_out.data_ptr<acc_t>();
  acc_t* v1 = var_out.data_ptr<acc_t>();
  const acc_t al = static_cast<acc_t>(alpha), oma = static_cast<acc_t>(one_minus_alpha);
  at::parallel_for(0, g.numel(), 1 << 14, [&](int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const math::EmaResult<acc_t> e = math::ema_update(static_cast<acc_t>(gp[i]), m0[i], v0[i], al, oma);
      m1[i] = e.mean;
      v1[i] = e.var;
    }
  });
}

template <typename scalar_t>
void opinions_impl(const at::Tensor& mu, const at::Tensor& var, const at::Tensor& lam, const at::Tensor& b_pos,
                   const at::Tensor& b_neg, const at::Tensor& u, double gamma, double eps) {
  const scalar_t *mp = mu.data_ptr<scalar_t>(), *vp = var.data_ptr<scalar_t>();
  scalar_t *lp = lam.data_ptr<scalar_t>(), *bp = b_pos.data_ptr<scalar_t>(), *bn = b_neg.data_ptr<scalar_t>(),
           *up = u.data_ptr<scalar_t>();
  const scalar_t gm = static_cast<scalar_t>(gamma), ep = static_cast<scalar_t>(eps);
  at::parallel_for(0, mu.numel(), 1 << 14, [&](int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      lp[i] = math::precision(mp[i], vp[i], ep);
      const math::Opinion<scalar_t> op = math::opinion(mp[i], math::evidence(mp[i], lp[i], gm));
      bp[i] = op.b_pos;
      bn[i] = op.b_neg;
      up[i] = op.u;
    }
  });
}

template <typename scalar_t>
void ds_combine_impl(const at::Tensor& b_pos, const at::Tensor& b_neg, const at::Tensor& u, const at::Tensor& out_b_pos,
                     const at::Tensor& out_b_neg, const at::Tensor& out_u) {
  const int64_t M = b_pos.size(0), N = b_pos.size(1);
  const scalar_t *bp = b_pos.data_ptr<scalar_t>(), *bn = b_neg.data_ptr<scalar_t>(), *up = u.data_ptr<scalar_t>();
  scalar_t *obp = out_b_pos.data_ptr<scalar_t>(), *obn = out_b_neg.data_ptr<scalar_t>(), *ou = out_u.data_ptr<scalar_t>();
  at::parallel_for(0, N, 1 << 12, [&](int64_t lo, int64_t hi) {
    for (int64_t d = lo; d < hi; ++d) {
      math::Opinion<scalar_t> f{bp[d], bn[d], up[d]};
      for (int64_t k = 1; k < M; ++k)
        f = math::ds_combine2(f, math::Opinion<scalar_t>{bp[k * N + d], bn[k * N + d], up[k * N + d]}).fused;
      obp[d] = f.b_pos;
      obn[d] = f.b_neg;
      ou[d] = f.u;
    }
  });
}

}  // namespace

void ema_moments(const at::Tensor& g, const at::Tensor& mean_in, const at::Tensor& var_in, const at::Tensor& mean_out,
                 const at::Tensor& var_out, double alpha, double one_minus_alpha) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "mmgrad_ema_moments", [&] {
    ema_moments_impl<scalar_t, at::opmath_type<scalar_t>>(g, mean_in, var_in, mean_out, var_out, alpha,
                                                          one_minus_alpha);
  });
}

void opinions(const at::Tensor& mu, const at::Tensor& var, const at::Tensor& lam, const at::Tensor& b_pos,
              const at::Tensor& b_neg, const at::Tensor& u, double gamma, double eps) {
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "mmgrad_opinions",
                             [&] { opinions_impl<scalar_t>(mu, var, lam, b_pos, b_neg, u, gamma, eps); });
}

void ds_combine(const at::Tensor& b_pos, const at::Tensor& b_neg, const at::Tensor& u, const at::Tensor& out_b_pos,
                const at::Tensor& out_b_neg, const at::Tensor& out_u) {
  AT_DISPATCH_FLOATING_TYPES(b_pos.scalar_type(), "mmgrad_ds_combine",
                             [&] { ds_combine_impl<scalar_t>(b_pos, b_neg, u, out_b_pos, out_b_neg, out_u); });
}

}  // namespace cpu
}  // namespace mmgrad
