// Python bindings of the CPU kernels (module mmgrad._C). The Python wrappers in
// mmgrad/kernels/cpu.py check arguments and give the user-facing errors; the checks
// here only keep a direct caller from reading out of bounds.
#include <torch/extension.h>

#include "../mmgrad_math.h"
#include "bogc.h"
#include "common.h"

namespace {

using mmgrad::cpu::BogcOptions;

void require_cpu_contiguous(std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  for (const auto& nt : tensors) {
    TORCH_CHECK_VALUE(nt.second->device().is_cpu(), nt.first, " must be a CPU tensor");
    TORCH_CHECK_VALUE(nt.second->is_contiguous(), nt.first, " must be contiguous");
  }
}

BogcOptions options(double gamma, double eps, int64_t confidence, int64_t weights) {
  TORCH_CHECK_VALUE(confidence >= 0 && confidence <= 2, "confidence code must be 0, 1 or 2");
  TORCH_CHECK_VALUE(weights >= 0 && weights <= 1, "weights code must be 0 or 1");
  return BogcOptions{gamma, eps, static_cast<int>(confidence), static_cast<int>(weights)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "mmgrad CPU kernels (C++/OpenMP); call them through mmgrad.ops";
  mod.attr("EVIDENCE_MAX") = mmgrad::math::kEvidenceMax;
  mod.attr("MAX_OBJECTIVES") = mmgrad::math::kMaxObjectives;
  mod.attr("CHUNK") = mmgrad::cpu::kChunk;
  mod.attr("MOO_GAP_TOL") = mmgrad::math::kMooGapTol;
  // the option codes of the header's enums, held against mmgrad/_constants.py by a test
  {
    namespace m = mmgrad::math;
    pybind11::dict confidence, weights, normalize;
    confidence["belief"] = static_cast<int>(m::kConfidenceBelief);
    confidence["certainty"] = static_cast<int>(m::kConfidenceCertainty);
    confidence["none"] = static_cast<int>(m::kConfidenceNone);
    weights["belief"] = static_cast<int>(m::kWeightsBelief);
    weights["precision"] = static_cast<int>(m::kWeightsPrecision);
    normalize["none"] = static_cast<int>(m::kNormalizeNone);
    normalize["l2"] = static_cast<int>(m::kNormalizeL2);
    normalize["loss"] = static_cast<int>(m::kNormalizeLoss);
    mod.attr("CONFIDENCE_CODES") = confidence, mod.attr("WEIGHT_CODES") = weights;
    mod.attr("NORMALIZE_CODES") = normalize;
  }

  mod.def("bogc_step",
          [](const at::Tensor& g, const at::Tensor& mean_in, const at::Tensor& var_in, const at::Tensor& mean_out,
             const at::Tensor& var_out, const at::Tensor& out, const at::Tensor& group_offsets, double alpha,
             double one_minus_alpha, double gamma, double eps, int64_t confidence, int64_t weights) {
            require_cpu_contiguous({{"g", &g}, {"mean_in", &mean_in}, {"var_in", &var_in}, {"mean_out", &mean_out},
                                    {"var_out", &var_out}, {"out", &out}});
            return mmgrad::cpu::bogc_step(g, mean_in, var_in, mean_out, var_out, out, group_offsets, alpha,
                                          one_minus_alpha, options(gamma, eps, confidence, weights));
          });
  mod.def("bogc_sample_step", [](const at::Tensor& samples, const at::Tensor& out, const at::Tensor& group_offsets,
                                 double gamma, double eps, int64_t confidence, int64_t weights) {
    require_cpu_contiguous({{"samples", &samples}, {"out", &out}});
    return mmgrad::cpu::bogc_sample_step(samples, out, group_offsets, options(gamma, eps, confidence, weights));
  });
  mod.def("bogc_from_moments",
          [](const at::Tensor& mu, const at::Tensor& var, const at::Tensor& out, const at::Tensor& fused_u,
             const at::Tensor& fused_b_pos, const at::Tensor& fused_b_neg, double gamma, double eps,
             int64_t confidence, int64_t weights) {
            require_cpu_contiguous({{"mu", &mu}, {"var", &var}, {"out", &out}});
            return mmgrad::cpu::bogc_from_moments(mu, var, out, fused_u, fused_b_pos, fused_b_neg,
                                                  options(gamma, eps, confidence, weights));
          });
  mod.def("ema_moments", &mmgrad::cpu::ema_moments);
  mod.def("opinions", &mmgrad::cpu::opinions);
  mod.def("ds_combine", &mmgrad::cpu::ds_combine);
  mod.def("gram", [](const at::Tensor& g, const at::Tensor& group_offsets) {
    require_cpu_contiguous({{"g", &g}});
    return mmgrad::cpu::gram(g, group_offsets);
  });
  // The step kernels' statistics vector (mmgrad_math.h), which mmgrad/kernels/stats.py reads
  mod.def("stats_layout", [](int64_t m, int64_t groups) {
    const mmgrad::math::StatsLayout L{m, groups};
    pybind11::dict d;
    d["sum_sq"] = L.sum_sq(), d["out_sq"] = L.out_sq(), d["nonfinite"] = L.nonfinite(), d["u_sum"] = L.u_sum();
    d["conflict_sum"] = L.conflict_sum(), d["share_count"] = L.share_count(), d["share_sum"] = L.share_sum();
    d["gram"] = L.gram(), d["size"] = L.size();
    return d;
  });
  // The GPU backends' MOO solver (mmgrad_math.h's interior-point method), compiled for the
  // CPU so that the tests can hold it against the reference; the cpu backend solves with Wolfe.
  mod.attr("MOO_MAX_OBJECTIVES") = mmgrad::math::kMooMaxObjectives;
  // the solver's constants, which the Triton mirror must share (tests/test_device_solver.py)
  mod.attr("MOO_ITERATIONS") = mmgrad::math::kMooIterations;
  mod.attr("MOO_BISECTIONS") = mmgrad::math::kMooBisections;
  mod.attr("MOO_GAP_TARGET") = mmgrad::math::kMooGapTarget;
  // the method codes, in mmgrad.reference.moo.MOO_METHODS's order (a test checks it)
  mod.attr("MOO_METHOD_CODES") =
      pybind11::make_tuple(static_cast<int>(mmgrad::math::kMooMgda), static_cast<int>(mmgrad::math::kMooMmpareto));
  mod.def("moo_weights_device", [](const at::Tensor& grams, int64_t method, int64_t normalize, const at::Tensor& losses,
                                   double magnitude) {
    require_cpu_contiguous({{"grams", &grams}, {"losses", &losses}});
    TORCH_CHECK_TYPE(grams.scalar_type() == at::kDouble && losses.scalar_type() == at::kDouble,
                     "grams and losses must be float64");
    TORCH_CHECK_VALUE(grams.dim() == 3 && grams.size(1) == grams.size(2), "grams must be G x M x M");
    const int64_t m = grams.size(1);
    TORCH_CHECK_VALUE(m >= 1 && m <= mmgrad::math::kMooMaxObjectives, "M must be in [1, 16]");
    TORCH_CHECK_VALUE(losses.numel() == m, "losses must hold M values");
    TORCH_CHECK_VALUE(mmgrad::math::moo_method_known(static_cast<int>(method)), "method code ", method,
                      " is no MOO method this solver knows (0: mgda, 1: mmpareto)");
    TORCH_CHECK_VALUE(mmgrad::math::moo_normalize_known(static_cast<int>(normalize)), "normalize code ", normalize,
                      " is unknown (0: none, 1: l2, 2: loss)");
    at::Tensor w = at::empty({grams.size(0), m}, grams.options());
    for (int64_t grp = 0; grp < grams.size(0); ++grp) {
      const mmgrad::math::MooVector r = mmgrad::math::moo_weights(
          grams.data_ptr<double>() + grp * m * m, static_cast<int>(m), static_cast<int>(method),
          static_cast<int>(normalize), losses.data_ptr<double>(), magnitude);
      for (int64_t i = 0; i < m; ++i) w.data_ptr<double>()[grp * m + i] = r.v[i];
    }
    return w;
  });
  mod.def("combine", [](const at::Tensor& g, const at::Tensor& alpha, const at::Tensor& group_offsets,
                        const at::Tensor& out, bool with_gram) {
    require_cpu_contiguous({{"g", &g}, {"alpha", &alpha}, {"out", &out}});
    TORCH_CHECK_TYPE(alpha.scalar_type() == at::kDouble, "alpha must be float64");
    return mmgrad::cpu::combine(g, alpha, group_offsets, out, with_gram);
  });
}
