// Chunked, threaded traversal of the flat M x N buffer and the per-thread statistics
// the fused CPU kernels accumulate (Gram per parameter group, norms, diagnostics).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <vector>

#include "../mmgrad_math.h"

namespace mmgrad {
namespace cpu {

// Coordinates processed together: the chunk's M rows (and state) stay in L1/L2 while
// the element math, the norms and the Gram matrix all read them, so memory is read once.
constexpr int64_t kChunk = 512;

// Chunks never straddle a parameter-group boundary, so each chunk adds to one group's Gram.
struct ChunkPlan {
  std::vector<int64_t> offsets;      // group offsets [0, ..., N]
  std::vector<int64_t> chunk_begin;  // first chunk index of each group, plus the total

  explicit ChunkPlan(const at::Tensor& group_offsets) {
    const int64_t* p = group_offsets.data_ptr<int64_t>();
    offsets.assign(p, p + group_offsets.numel());
    chunk_begin.push_back(0);
    for (size_t g = 0; g + 1 < offsets.size(); ++g) {
      const int64_t len = offsets[g + 1] - offsets[g];
      chunk_begin.push_back(chunk_begin.back() + (len + kChunk - 1) / kChunk);
    }
  }
  int64_t num_groups() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t num_chunks() const { return chunk_begin.back(); }
  // Chunk c -> (group, first coordinate, length).
  void locate(int64_t c, int64_t& group, int64_t& lo, int64_t& len) const {
    group = std::upper_bound(chunk_begin.begin(), chunk_begin.end(), c) - chunk_begin.begin() - 1;
    lo = offsets[group] + (c - chunk_begin[group]) * kChunk;
    len = std::min(kChunk, offsets[group + 1] - lo);
  }
};

using math::StatsLayout;  // the step kernels' statistics (mmgrad_math.h)

// Chunks per block of the reduction: the statistics are summed chunk by chunk within a
// block, and the blocks' sums in block order, so the result does not depend on how many
// threads ran or in which order they finished (bit for bit, at any thread count).
constexpr int64_t kChunksPerBlock = 16;

// Run body(chunk, stats, scratch) over all chunks in torch's thread pool, a block of
// kChunksPerBlock chunks per task; each block sums into its own float64 vector, and the
// blocks are added in order at the end. Scratch of scratch_elems acc_t per task.
template <typename acc_t, typename Layout, typename Body>
at::Tensor run_chunks(const ChunkPlan& plan, const Layout& layout, int64_t scratch_elems, const Body& body) {
  const int64_t width = layout.size();
  const int64_t blocks = (plan.num_chunks() + kChunksPerBlock - 1) / kChunksPerBlock;
  std::vector<double> partial(static_cast<size_t>(blocks * width), 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(static_cast<size_t>(scratch_elems));
    for (int64_t b = begin; b < end; ++b) {
      const int64_t last = std::min(plan.num_chunks(), (b + 1) * kChunksPerBlock);
      for (int64_t c = b * kChunksPerBlock; c < last; ++c) body(c, partial.data() + b * width, scratch.data());
    }
  });
  at::Tensor stats = at::zeros({width}, at::TensorOptions().dtype(at::kDouble));
  double* total = stats.data_ptr<double>();
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < width; ++i) total[i] += partial[b * width + i];
  return stats;
}

// Two rows of a chunk against four: the 2 x 4 products' sums over the chunk, widened to
// float64 (each product of two floats is exact in double). One pass loads six rows for
// eight products, where a pass per pair loads two for one: register blocking, eight
// float64 accumulators, so the Gram runs at the loads' rate rather than at half of it.
template <typename acc_t>
inline void gram_tile_2x4(const acc_t* const a[2], const acc_t* const b[4], int64_t len, double s[8]) {
  double s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
  const acc_t *a0 = a[0], *a1 = a[1], *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13)
  for (int64_t t = 0; t < len; ++t) {
    const double x0 = a0[t], x1 = a1[t], y0 = b0[t], y1 = b1[t], y2 = b2[t], y3 = b3[t];
    s00 += x0 * y0; s01 += x0 * y1; s02 += x0 * y2; s03 += x0 * y3;
    s10 += x1 * y0; s11 += x1 * y1; s12 += x1 * y2; s13 += x1 * y3;
  }
  s[0] = s00; s[1] = s01; s[2] = s02; s[3] = s03; s[4] = s10; s[5] = s11; s[6] = s12; s[7] = s13;
}

// The 2 x 2 tile, for the last one or two columns (small M).
template <typename acc_t>
inline void gram_tile_2x2(const acc_t* const a[2], const acc_t* const b[4], int64_t len, double s[8]) {
  double s00 = 0, s01 = 0, s10 = 0, s11 = 0;
  const acc_t *a0 = a[0], *a1 = a[1], *b0 = b[0], *b1 = b[1];
#pragma omp simd reduction(+ : s00, s01, s10, s11)
  for (int64_t t = 0; t < len; ++t) {
    const double x0 = a0[t], x1 = a1[t], y0 = b0[t], y1 = b1[t];
    s00 += x0 * y0; s01 += x0 * y1; s10 += x1 * y0; s11 += x1 * y1;
  }
  s[0] = s00; s[1] = s01; s[2] = 0; s[3] = 0; s[4] = s10; s[5] = s11; s[6] = 0; s[7] = 0;
}

// Upper triangle of the chunk's Gram matrix, added (symmetrically) to gram[M x M], in
// 2 x 4 tiles of rows (2 x 2 for the last two columns or fewer); a tile's rows past M
// read a zero row, and its products below the diagonal are dropped.
template <typename acc_t>
inline void add_chunk_gram(int M, const acc_t* rows, int64_t len, double* gram) {
  static const acc_t zeros[kChunk] = {};
  auto row = [&](int k) { return k < M ? rows + k * kChunk : zeros; };
  for (int i = 0; i < M; i += 2) {
    for (int j = i; j < M; j += 4) {
      const acc_t* const a[2] = {row(i), row(i + 1)};
      const acc_t* const b[4] = {row(j), row(j + 1), row(j + 2), row(j + 3)};
      double s[8];
      if (M - j <= 2)
        gram_tile_2x2(a, b, len, s);
      else
        gram_tile_2x4(a, b, len, s);
      for (int r = 0; r < 2; ++r) {
        for (int c = 0; c < 4; ++c) {
          const int ii = i + r, jj = j + c;
          if (ii >= M || jj >= M || jj < ii) continue;
          gram[ii * M + jj] += s[r * 4 + c];
          if (jj != ii) gram[jj * M + ii] += s[r * 4 + c];
        }
      }
    }
  }
}

// Copy M rows of a chunk into the float scratch (converting bf16/fp16), counting non-finite.
template <typename scalar_t, typename acc_t>
inline double load_rows(int M, const scalar_t* src, int64_t row_stride, int64_t len, acc_t* dst) {
  int64_t bad = 0;
  for (int k = 0; k < M; ++k) {
    const scalar_t* s = src + k * row_stride;
    acc_t* d = dst + k * kChunk;
#pragma omp simd reduction(+ : bad)
    for (int64_t t = 0; t < len; ++t) {
      const acc_t x = static_cast<acc_t>(s[t]);
      d[t] = x;
      bad += (x - x == x - x) ? 0 : 1;  // x - x is NaN exactly when x is inf or NaN
    }
  }
  return static_cast<double>(bad);
}

// bfloat16 <-> float by bit operations GCC vectorises (c10::BFloat16's conversions do not
// vectorise in the state loops). Round to nearest even; the state is finite when stored
// (a non-finite step writes no state), so no NaN case is needed.
inline float bf16_bits_to_float(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// How a state dtype is stored and converted: the compute type as is, bfloat16 as its bits.
template <typename state_t, typename acc_t>
struct StateIO {
  using storage = state_t;
  static acc_t load(storage x) { return static_cast<acc_t>(x); }
  static storage store(acc_t x) { return static_cast<storage>(x); }
};
template <>
struct StateIO<c10::BFloat16, float> {
  using storage = uint16_t;
  static float load(storage x) { return bf16_bits_to_float(x); }
  static storage store(float x) { return float_to_bf16_bits(x); }
};

}  // namespace cpu
}  // namespace mmgrad
