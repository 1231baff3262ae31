// Python bindings of the CUDA kernels (module mmgrad._C_cuda), built only where torch has
// CUDA (setup.py). The Python wrappers in mmgrad/kernels/cuda.py check arguments and give
// the user-facing errors; the checks here keep a direct caller from reading out of bounds.
// Every launch goes to torch's current stream, and nothing here synchronises.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "launch.h"

namespace {

using mmgrad::cuda::DType;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "the cuda backend takes float32, bfloat16 or float16 gradients; got ", t.scalar_type());
  }
}

void require_cuda_contiguous(std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  for (const auto& nt : tensors) {
    TORCH_CHECK_VALUE(nt.second->is_cuda(), nt.first, " must be a CUDA tensor");
    TORCH_CHECK_VALUE(nt.second->is_contiguous(), nt.first, " must be contiguous");
  }
}

void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "mmgrad CUDA launch failed: ", cudaGetErrorString(err)); }

int blocks_for(int64_t len, int threads) {
  int device = 0, sms = 0;
  check(cudaGetDevice(&device));
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));  // a host query, no sync
  const int64_t want = (len + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, int64_t(sms) * 8)));  // grid-stride beyond
}

constexpr int kThreads = 256;

// Calls launch(grp, lo, hi, part, blocks, width, stream) for every non-empty parameter group, with
// part the group's slice of partials (G x blocks x width) and blocks its grid size.
template <typename Launch>
void for_each_group(const at::Tensor& group_offsets, const at::Tensor& partials, const Launch& launch) {
  const auto off = group_offsets.accessor<int64_t, 1>();  // host metadata
  const int64_t groups = group_offsets.numel() - 1, width = partials.size(2);
  const int blocks = static_cast<int>(partials.size(1));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t grp = 0; grp < groups; ++grp)
    if (off[grp + 1] > off[grp])
      launch(grp, off[grp], off[grp + 1], partials.data_ptr<double>() + grp * blocks * width, blocks, width, stream);
}

// One BOGC step over every group (alpha, one_minus_alpha: the EMA's weight of this step).
// partials: G x blocks x (6 + M + M*M) float64, zeroed by the caller.
void bogc_step(const at::Tensor& g, const at::Tensor& mean_in, const at::Tensor& var_in, const at::Tensor& mean_out,
                  const at::Tensor& var_out, const at::Tensor& out, const at::Tensor& group_offsets,
                  int64_t samples, double alpha, double one_minus_alpha, double gamma, double eps, int64_t confidence, int64_t weights,
                  const at::Tensor& partials) {
  require_cuda_contiguous({{"g", &g}, {"mean_in", &mean_in}, {"var_in", &var_in}, {"mean_out", &mean_out}, {"var_out", &var_out},
                           {"out", &out}, {"partials", &partials}});
  const c10::cuda::CUDAGuard guard(g.device());
  TORCH_CHECK_VALUE(g.dim() == (samples > 0 ? 3 : 2), "g must be M x N (S x M x N for samples)");
  const int m = static_cast<int>(g.size(-2));
  const int64_t n = g.size(-1);
  TORCH_CHECK_VALUE(m >= 1 && m <= mmgrad::math::kMaxObjectives, "M must be in [1, 64]");
  TORCH_CHECK_VALUE(out.numel() == n && out.scalar_type() == at::kFloat, "out must be a float32 vector of length N");
  if (samples == 0)
    for (const at::Tensor* t : {&mean_in, &var_in, &mean_out, &var_out})
      TORCH_CHECK_VALUE(t->numel() == g.numel() && t->scalar_type() == at::kFloat, "mean and var must be float32 M x N");
  const mmgrad::math::StatsLayout block_stats{m, 1};  // one block's statistics (a braced init splits a macro's arguments)
  TORCH_CHECK_VALUE(partials.dim() == 3 && partials.size(0) == group_offsets.numel() - 1 &&
                        partials.size(2) == block_stats.size() && partials.scalar_type() == at::kDouble,
                    "partials must be float64 G x blocks x (6 + M + M*M), the statistics layout of mmgrad_math.h");
  mmgrad::cuda::BogcStepArgs a{};
  a.n = n;
  a.samples = samples;
  a.alpha = static_cast<float>(alpha);
  a.one_minus_alpha = static_cast<float>(one_minus_alpha);
  a.prm = {static_cast<float>(gamma), static_cast<float>(eps), static_cast<int>(confidence), static_cast<int>(weights)};
  for_each_group(group_offsets, partials, [&](int64_t, int64_t lo, int64_t hi, double* part, int blocks, int64_t width,
                                               cudaStream_t stream) {
    check(mmgrad::cuda::launch_bogc_step(dtype_of(g), g.data_ptr(), mean_in.data_ptr<float>(), var_in.data_ptr<float>(),
                                         mean_out.data_ptr<float>(), var_out.data_ptr<float>(), out.data_ptr<float>(), lo, hi,
                                         m, a, part, blocks, kThreads, stream));
    if (m > 8)  // the runtime-M kernel leaves the Gram to the pairs kernel
      check(mmgrad::cuda::launch_gram_pairs(dtype_of(g), g.data_ptr(), n, lo, hi, m, width,
                                            block_stats.gram(), part, blocks, kThreads, stream));
  });
}

// Combination (alpha: G x M float64 on the device, or undefined for the Gram only) and/or
// the per-group Gram; partials: G x blocks x (M*M + 1).
void combine_and_gram(const at::Tensor& g, const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& out,
                      const at::Tensor& group_offsets, bool with_gram, const at::Tensor& partials) {
  require_cuda_contiguous({{"g", &g}, {"partials", &partials}});
  TORCH_CHECK_VALUE(g.dim() == 2, "g must be M x N");
  const int m = static_cast<int>(g.size(0));
  const int64_t n = g.size(1);
  const int64_t groups = group_offsets.numel() - 1;
  TORCH_CHECK_VALUE(alpha.has_value() == out.has_value(), "alpha and out come together (or neither, for the Gram alone)");
  if (alpha.has_value()) {
    require_cuda_contiguous({{"alpha", &*alpha}, {"out", &*out}});
    TORCH_CHECK_VALUE(alpha->scalar_type() == at::kDouble && alpha->numel() == groups * m, "alpha must be float64 G x M");
    TORCH_CHECK_VALUE(out->numel() == n && out->scalar_type() == g.scalar_type(), "out must be a vector of length N in g's dtype");
  }
  TORCH_CHECK_VALUE(partials.dim() == 3 && partials.size(0) == groups && partials.size(2) == m * m + 1 &&
                        partials.scalar_type() == at::kDouble,
                    "partials must be float64 G x blocks x (M*M + 1)");
  const c10::cuda::CUDAGuard guard(g.device());
  for_each_group(group_offsets, partials, [&](int64_t grp, int64_t lo, int64_t hi, double* part, int blocks,
                                               int64_t width, cudaStream_t stream) {
    const double* a = alpha.has_value() ? alpha->data_ptr<double>() + grp * m : nullptr;
    check(mmgrad::cuda::launch_combine(dtype_of(g), g.data_ptr(), a, out.has_value() ? out->data_ptr() : nullptr, n,
                                       lo, hi, m, with_gram && m <= 8, part, blocks, kThreads, stream));
    if (with_gram && m > 8)
      check(mmgrad::cuda::launch_gram_pairs(dtype_of(g), g.data_ptr(), n, lo, hi, m, width, 0, part, blocks, kThreads,
                                            stream));
  });
}

at::Tensor moo_weights(const at::Tensor& grams, int64_t method, int64_t normalize, const at::Tensor& losses,
                       double magnitude) {
  require_cuda_contiguous({{"grams", &grams}, {"losses", &losses}});
  TORCH_CHECK_TYPE(grams.scalar_type() == at::kDouble && losses.scalar_type() == at::kDouble,
                   "grams and losses must be float64");
  const int m = static_cast<int>(grams.size(1));
  TORCH_CHECK_VALUE(m >= 1 && m <= mmgrad::math::kMooMaxObjectives, "M must be in [1, 16]");
  TORCH_CHECK_VALUE(mmgrad::math::moo_method_known(static_cast<int>(method)), "method code ", method,
                    " is no MOO method this solver knows (0: mgda, 1: mmpareto)");
  TORCH_CHECK_VALUE(mmgrad::math::moo_normalize_known(static_cast<int>(normalize)), "normalize code ", normalize,
                    " is unknown (0: none, 1: l2, 2: loss)");
  const c10::cuda::CUDAGuard guard(grams.device());
  at::Tensor w = at::empty({grams.size(0), m}, grams.options());
  check(mmgrad::cuda::launch_moo_weights(grams.data_ptr<double>(), static_cast<int>(grams.size(0)), m,
                                         static_cast<int>(method), static_cast<int>(normalize),
                                         losses.data_ptr<double>(), magnitude, w.data_ptr<double>(),
                                         c10::cuda::getCurrentCUDAStream()));
  return w;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "mmgrad CUDA kernels; call them through mmgrad.ops (backend='cuda')";
  mod.attr("THREADS") = kThreads;
  mod.def("blocks_for", &blocks_for);
  mod.def("bogc_step", &bogc_step);
  mod.def("combine_and_gram", &combine_and_gram);
  mod.def("moo_weights", &moo_weights);
}
