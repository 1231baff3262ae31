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

#ifdef __AVX__
#include <immintrin.h>
#endif

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

// Four float64 lanes: the tiles below are written in GCC's vector extension, so they
// are vectorised whatever GCC decides when it inlines them (an `omp simd` 2 x 2 tile,
// inlined into the M = 8 Gram, stayed scalar: a quarter of that pass's time). Without
// AVX (MMGRAD_PORTABLE=1) GCC lowers the lanes to SSE2 pairs; its ABI note on 32-byte
// vectors concerns passing them between builds, and they pass only within the tiles
// (GCC reports the note at the end of the unit, so it is off for the whole unit).
#pragma GCC diagnostic ignored "-Wpsabi"
typedef double f64x4 __attribute__((vector_size(32)));

// Four elements of a row from p (any alignment), widened to float64 lanes. GCC 12 splits
// __builtin_convertvector into 128-bit halves, so with AVX the widening load is the
// one instruction it should be.
inline f64x4 load_f64x4(const float* p) {
#ifdef __AVX__
  return _mm256_cvtps_pd(_mm_loadu_ps(p));
#else
  typedef float f32x4 __attribute__((vector_size(16)));
  f32x4 v;
  __builtin_memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, f64x4);
#endif
}
inline f64x4 load_f64x4(const double* p) {
  f64x4 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline double lanes_sum(const f64x4& v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// R rows of a chunk against C (R x C <= 8): the products' sums over the chunk, in float64
// (each product of two floats is exact in double). One pass loads R + C rows for R x C
// products, four elements at a time into R x C float64x4 accumulators (at most 8 of
// AVX2's 16 registers, with the 6 loaded rows: no spill), so the Gram runs at the loads'
// rate. s[r * C + c] receives row r against column c. Out of line: inlined into a pass's
// loop, GCC kept the accumulators on the stack.
template <int R, int C, typename acc_t>
__attribute__((noinline)) void gram_tile(const acc_t* const* a, const acc_t* const* b, int64_t len, double* s) {
  static_assert(R * C <= 8, "at most 8 accumulators: AVX2 has 16 registers");
  f64x4 acc[R][C] = {};
  int64_t t = 0;
  for (; t + 4 <= len; t += 4) {
    f64x4 x[R], y[C];
    for (int r = 0; r < R; ++r) x[r] = load_f64x4(a[r] + t);
    for (int c = 0; c < C; ++c) y[c] = load_f64x4(b[c] + t);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] += x[r] * y[c];
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      double tail = 0.0;
      for (int64_t u = t; u < len; ++u) tail += static_cast<double>(a[r][u]) * static_cast<double>(b[c][u]);
      s[r * C + c] = lanes_sum(acc[r][c]) + tail;
    }
}

// Adds an R x C tile's sums s (rows ri[r], columns cj[c]) to the upper triangle of
// gram[M x M] and its mirror; rows or columns past M, and products below the diagonal,
// are dropped.
template <int R, int C>
inline void add_tile(int M, const int* ri, const int* cj, const double* s, double* gram) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const int ii = ri[r], jj = cj[c];
      if (ii >= M || jj >= M || jj < ii) continue;
      gram[ii * M + jj] += s[r * C + c];
      if (jj != ii) gram[jj * M + ii] += s[r * C + c];
    }
}

// Upper triangle of the chunk's Gram matrix, added (symmetrically) to gram[M x M], in
// 2 x 4 tiles of rows; row(k) is the chunk's row k, a tile's rows past M read a zero row.
// The row pairs left with the last one or two columns share those columns (one class of
// row pairs, i = 0 or 2 mod 4, has them at a given M), and are taken two at a time as a
// 4 x 2 tile: a 2 x 2 tile's 4 accumulators cannot cover the FMA's latency on two pipes
// (it ran at half rate), 8 can.
template <typename acc_t, typename RowOf>
inline void add_chunk_gram(int M, const RowOf& row_of, int64_t len, double* gram) {
  static const acc_t zeros[kChunk] = {};
  auto row = [&](int k) -> const acc_t* { return k < M ? row_of(k) : zeros; };
  int left[math::kMaxObjectives], n_left = 0, j_left = 0;  // row pairs left with columns j_left, j_left + 1
  for (int i = 0; i < M; i += 2) {
    for (int j = i; j < M; j += 4) {
      if (M - j <= 2) {
        left[n_left++] = i;
        j_left = j;
        continue;
      }
      const int ri[2] = {i, i + 1}, cj[4] = {j, j + 1, j + 2, j + 3};
      const acc_t* const a[2] = {row(i), row(i + 1)};
      const acc_t* const b[4] = {row(j), row(j + 1), row(j + 2), row(j + 3)};
      double s[8];
      gram_tile<2, 4>(a, b, len, s);
      add_tile<2, 4>(M, ri, cj, s, gram);
    }
  }
  const int cj[2] = {j_left, j_left + 1};
  const acc_t* const b[2] = {row(j_left), row(j_left + 1)};
  int q = 0;
  for (; q + 2 <= n_left; q += 2) {
    const int ri[4] = {left[q], left[q] + 1, left[q + 1], left[q + 1] + 1};
    const acc_t* const a[4] = {row(ri[0]), row(ri[1]), row(ri[2]), row(ri[3])};
    double s[8];
    gram_tile<4, 2>(a, b, len, s);
    add_tile<4, 2>(M, ri, cj, s, gram);
  }
  if (q < n_left) {
    const int ri[2] = {left[q], left[q] + 1};
    const acc_t* const a[2] = {row(ri[0]), row(ri[1])};
    double s[4];
    gram_tile<2, 2>(a, b, len, s);
    add_tile<2, 2>(M, ri, cj, s, gram);
  }
}

// The same for M rows kChunk apart in a scratch buffer.
template <typename acc_t>
inline void add_chunk_gram(int M, const acc_t* rows, int64_t len, double* gram) {
  add_chunk_gram<acc_t>(M, [rows](int k) { return rows + k * kChunk; }, len, gram);
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
