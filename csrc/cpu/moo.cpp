// Gram matrix and weighted combination for the multi-objective methods (docs/spec.md §4).
// The M x M solve itself is tiny and runs on the host (mmgrad/reference/moo.py).
#include "bogc.h"
#include "common.h"

#include <type_traits>

namespace mmgrad {
namespace cpu {
namespace {

struct GramLayout {
  int64_t m, groups;
  int64_t nonfinite() const { return groups * m * m; }
  int64_t size() const { return nonfinite() + 1; }
};

// out = sum_k alpha[group, k] g_k and/or the per-group Gram, one chunk at a time, with the
// count of non-finite entries of g when out is written. float32/float64 rows are read
// where they are (the Gram's tiles then find them in L1/L2, just read by the combination);
// half rows are widened into scratch first, which counts them. A Gram alone counts
// nothing (the kernels' `gram` returns only the Gram; a non-finite row makes it so).
template <typename scalar_t, typename acc_t, int MT>
at::Tensor combine_pass(const at::Tensor& g, const double* alpha, const ChunkPlan& plan, scalar_t* out,
                        bool with_gram) {
  constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;
  const int M = MT > 0 ? MT : static_cast<int>(g.size(0));
  const int64_t N = g.size(1);
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const GramLayout L{M, plan.num_groups()};
  return run_chunks<acc_t>(plan, L, kInPlace ? 0 : M * kChunk, [&](int64_t c, double* st, acc_t* scratch) {
    int64_t grp, lo, len;
    plan.locate(c, grp, lo, len);
    const acc_t* rows;
    int64_t stride;
    if constexpr (kInPlace) {
      rows = gp + lo;
      stride = N;
    } else {
      st[L.nonfinite()] += load_rows(M, gp + lo, N, len, scratch);
      rows = scratch;
      stride = kChunk;
    }
    if (out != nullptr) {
      acc_t a[MT > 0 ? MT : math::kMaxObjectives];
      for (int k = 0; k < M; ++k) a[k] = static_cast<acc_t>(alpha[grp * M + k]);
      int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
      for (int64_t t = 0; t < len; ++t) {
        acc_t s = acc_t(0);
        for (int k = 0; k < M; ++k) {
          const acc_t x = rows[k * stride + t];
          s += a[k] * x;
          if constexpr (kInPlace) bad += (x - x == x - x) ? 0 : 1;  // x - x is NaN exactly when x is inf or NaN
        }
        out[lo + t] = static_cast<scalar_t>(s);
      }
      st[L.nonfinite()] += static_cast<double>(bad);
    }
    if (with_gram) add_chunk_gram<acc_t>(M, [&](int k) { return rows + k * stride; }, len, st + grp * M * M);
  });
}

template <typename scalar_t, typename acc_t>
at::Tensor combine_dispatch_m(const at::Tensor& g, const double* alpha, const ChunkPlan& plan, scalar_t* out,
                              bool with_gram) {
  switch (g.size(0)) {
    case 1: return combine_pass<scalar_t, acc_t, 1>(g, alpha, plan, out, with_gram);
    case 2: return combine_pass<scalar_t, acc_t, 2>(g, alpha, plan, out, with_gram);
    case 3: return combine_pass<scalar_t, acc_t, 3>(g, alpha, plan, out, with_gram);
    case 4: return combine_pass<scalar_t, acc_t, 4>(g, alpha, plan, out, with_gram);
    case 5: return combine_pass<scalar_t, acc_t, 5>(g, alpha, plan, out, with_gram);
    case 6: return combine_pass<scalar_t, acc_t, 6>(g, alpha, plan, out, with_gram);
    case 7: return combine_pass<scalar_t, acc_t, 7>(g, alpha, plan, out, with_gram);
    case 8: return combine_pass<scalar_t, acc_t, 8>(g, alpha, plan, out, with_gram);
    default: return combine_pass<scalar_t, acc_t, 0>(g, alpha, plan, out, with_gram);
  }
}

}  // namespace

at::Tensor gram(const at::Tensor& g, const at::Tensor& group_offsets) {
  const ChunkPlan plan(group_offsets);
  at::Tensor stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "mmgrad_gram", [&] {
    stats = combine_dispatch_m<scalar_t, at::opmath_type<scalar_t>>(g, nullptr, plan, nullptr, true);
  });
  return stats;
}

at::Tensor combine(const at::Tensor& g, const at::Tensor& alpha, const at::Tensor& group_offsets, const at::Tensor& out,
                   bool with_gram) {
  const ChunkPlan plan(group_offsets);
  at::Tensor stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "mmgrad_combine", [&] {
    stats = combine_dispatch_m<scalar_t, at::opmath_type<scalar_t>>(g, alpha.data_ptr<double>(), plan,
                                                                   out.data_ptr<scalar_t>(), with_gram);
  });
  return stats;
}

}  // namespace cpu
}  // namespace mmgrad
