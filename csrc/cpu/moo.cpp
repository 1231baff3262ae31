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

// Rows whose stride is a multiple of this many bytes (64 sets of 64-byte lines) share
// their L1 sets: at M = 8 the rows and out are 9 lines in Zen 3's 8-way set, and the
// combination at N = 2^24 took 1.75x as long as at N = 2^24 + 10485 (any N a multiple of
// 1024 floats aligns so). There it reads at most kRowsAPass rows a pass over a chunk (M =
// 5-8: two passes, the partial sums in L1, their order unchanged): 1.27x faster at M = 8,
// N = 2^24; at unaligned N two passes were no faster, at most 14 % slower, so they keep one.
// The runtime-M path (M > 8) keeps one pass.
constexpr int64_t kL1SetSpan = 4096;
constexpr int kRowsAPass = 4;

// s = (kFirst ? 0 : partial) + sum_{k in [K0, K1)} a_k row_k over a chunk, into out (kLast)
// or partial; K1 = 0: every row up to the runtime m. Returns the non-finite entries read
// (kCount: rows read in place; half rows were counted as they were widened).
template <bool kFirst, bool kLast, int K0, int K1, bool kCount, typename scalar_t, typename acc_t>
int64_t weighted_rows(const acc_t* rows, int64_t stride, const acc_t* a, int m, int64_t len, acc_t* partial,
                      scalar_t* out) {
  const int k1 = K1 > 0 ? K1 : m;
  int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t t = 0; t < len; ++t) {
    acc_t s = kFirst ? acc_t(0) : partial[t];
    for (int k = K0; k < k1; ++k) {
      const acc_t x = rows[k * stride + t];
      s += a[k] * x;
      if constexpr (kCount) bad += (x - x == x - x) ? 0 : 1;  // x - x is NaN exactly when x is inf or NaN
    }
    if constexpr (kLast)
      out[t] = static_cast<scalar_t>(s);
    else
      partial[t] = s;
  }
  return bad;
}

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
      int64_t bad = -1;
      if constexpr (MT > kRowsAPass) {
        if (stride * int64_t(sizeof(acc_t)) % kL1SetSpan == 0) {
          alignas(64) acc_t partial[kChunk];
          bad = weighted_rows<true, false, 0, MT / 2, kInPlace>(rows, stride, a, M, len, partial, out + lo);
          bad += weighted_rows<false, true, MT / 2, MT, kInPlace>(rows, stride, a, M, len, partial, out + lo);
        }
      }
      if (bad < 0)
        bad = weighted_rows<true, true, 0, MT, kInPlace>(rows, stride, a, M, len, static_cast<acc_t*>(nullptr), out + lo);
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
