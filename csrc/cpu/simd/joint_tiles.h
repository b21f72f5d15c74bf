// The joint counts' tile kernels (JointTileKernels of kernels.h): every offset's K x K block of
// J from one tile, and the gradient of the map in the first role from one tile, with the channel
// blocks held in vector registers.
#pragma once

#include "external_headers.h"
#include "vector_types.h"

namespace bimi::cpu::BIMI_CPU_ISA {
namespace {

// A KI x KJ block of J for one offset: KI*KJ vector accumulators over all tile pixels, in
// registers only if every loop over the block is unrolled (clang 14 leaves them to itself and
// keeps the accumulators on the stack, storing one after every FMA: twice the time).
template <typename acc_t, int KI, int KJ>
void forward_block(const JointTile<acc_t>& tile, const OffsetPlan& plan, int64_t i0, int64_t j0,
                   acc_t* joint) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = vector_lanes<acc_t>();
  // the vectors that hold the offset's columns (x_end <= width <= row_length, a multiple of L)
  const int64_t x_begin = plan.col_begin - plan.col_begin % L, x_end = plan.col_end;
  const int64_t first_channel = tile.first_channel_stride;
  V acc[KI][KJ];
  BIMI_UNROLL for (int i = 0; i < KI; ++i)
    BIMI_UNROLL for (int j = 0; j < KJ; ++j) acc[i][j] = broadcast<acc_t>(0);
  for (int64_t y = plan.row_begin; y < plan.row_end; ++y) {
    const acc_t* a = tile.first + y * tile.first_row_stride + i0 * first_channel;
    const acc_t* b = tile.band + (plan.band_start + y * tile.band_row_stride + j0 * tile.band_channel_stride);
    for (int64_t x = x_begin; x < x_end; x += L) {
      V bv[KJ];
      BIMI_UNROLL for (int j = 0; j < KJ; ++j) bv[j] = load(b + j * tile.band_channel_stride + x);
      BIMI_UNROLL for (int i = 0; i < KI; ++i) {
        const V av = load(a + i * first_channel + x);
        BIMI_UNROLL for (int j = 0; j < KJ; ++j) acc[i][j] += av * bv[j];
      }
    }
  }
  const int64_t k = tile.channels;
  BIMI_UNROLL for (int i = 0; i < KI; ++i)
    BIMI_UNROLL for (int j = 0; j < KJ; ++j) joint[(i0 + i) * k + (j0 + j)] += horizontal_sum<acc_t>(acc[i][j]);
}

// The largest block: KI x KJ accumulators, KJ band vectors and one vector of the first map fill
// the registers (16: 4 x 3, 7 loads per 12 FMAs; 32: 5 x 5, 10 loads per 25 FMAs, which leaves the
// forward bound by the FMAs rather than by the loads from L2: a tile's rows do not fit L1).
constexpr int kForwardBlockI = kVectorRegisters >= 32 ? 5 : 4;
constexpr int kForwardBlockJ = kVectorRegisters >= 32 ? 5 : 3;
static_assert(kForwardBlockI * kForwardBlockJ + kForwardBlockJ + 1 <= kVectorRegisters);

template <typename acc_t>
using ForwardBlockFn = void (*)(const JointTile<acc_t>&, const OffsetPlan&, int64_t, int64_t, acc_t*);

template <typename acc_t, int... Index>
constexpr std::array<ForwardBlockFn<acc_t>, sizeof...(Index)> forward_block_table(std::integer_sequence<int, Index...>) {
  return {&forward_block<acc_t, Index / kForwardBlockJ + 1, Index % kForwardBlockJ + 1>...};
}

// forward_block for every block size, at [(KI - 1) * kForwardBlockJ + KJ - 1] (a table, not a
// dispatch through a lambda, which GCC would compile without the target of the build).
template <typename acc_t>
constexpr std::array<ForwardBlockFn<acc_t>, kForwardBlockI * kForwardBlockJ> kForwardBlocks =
    forward_block_table<acc_t>(std::make_integer_sequence<int, kForwardBlockI * kForwardBlockJ>());

template <typename acc_t>
void forward_tile(const JointTile<acc_t>& tile, acc_t* joint) {
  const int64_t k = tile.channels;
  for (int64_t o = 0; o < tile.num_offsets; ++o) {
    const OffsetPlan& plan = tile.plans[o];
    if (plan.row_begin >= plan.row_end) continue;
    acc_t* joint_o = joint + o * k * k;
    for (int64_t i0 = 0; i0 < k; i0 += kForwardBlockI) {
      const int64_t ki = k - i0 < kForwardBlockI ? k - i0 : kForwardBlockI;
      for (int64_t j0 = 0; j0 < k; j0 += kForwardBlockJ) {
        const int64_t kj = k - j0 < kForwardBlockJ ? k - j0 : kForwardBlockJ;
        kForwardBlocks<acc_t>[(ki - 1) * kForwardBlockJ + kj - 1](tile, plan, i0, j0, joint_o);
      }
    }
  }
}

// Output channels [i0, i0 + KI) x pixels [x, x + 2 vectors) of one tile row: the sum over the
// row's active offsets a (band row b_rows[a], gradient block g_blocks[a], columns
// [cols[2a], cols[2a + 1])) that reach these pixels, and the channels j, of
// g[a][i][j] * band[a][j][x ...], stored at dst[(i0 + i) * n + x ...]. The KI x 2 accumulators
// stay in registers: the unroll pragmas keep GCC from storing the array to the stack each step.
template <typename acc_t, int KI>
inline void backward_block(const acc_t* const* b_rows, const acc_t* const* g_blocks, const int64_t* cols,
                           int64_t active, int64_t k, int64_t band_channel_stride, int64_t i0, int64_t x,
                           acc_t* dst, int64_t n) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = vector_lanes<acc_t>();
  V acc[KI][2];
  BIMI_UNROLL for (int i = 0; i < KI; ++i) acc[i][0] = acc[i][1] = broadcast<acc_t>(0);
  for (int64_t a = 0; a < active; ++a) {
    if (x >= cols[2 * a + 1] || x + 2 * L <= cols[2 * a]) continue;  // only zero padding here
    const acc_t* b = b_rows[a] + x;
    const acc_t* go = g_blocks[a] + i0 * k;
    for (int64_t j = 0; j < k; ++j) {
      const V b0 = load(b + j * band_channel_stride);
      const V b1 = load(b + j * band_channel_stride + L);
      BIMI_UNROLL for (int i = 0; i < KI; ++i) {
        const V gv = broadcast_load(go + i * k + j);
        acc[i][0] += gv * b0;
        acc[i][1] += gv * b1;
      }
    }
  }
  BIMI_UNROLL for (int i = 0; i < KI; ++i) {
    store(dst + (i0 + i) * n + x, acc[i][0]);
    store(dst + (i0 + i) * n + x + L, acc[i][1]);
  }
}

// backward_block over a whole tile row (x = 0, 2 vectors, ... below row_length).
template <typename acc_t, int KI>
void backward_block_row(const acc_t* const* b_rows, const acc_t* const* g_blocks, const int64_t* cols,
                        int64_t active, int64_t k, int64_t band_channel_stride, int64_t row_length, int64_t i0,
                        acc_t* dst, int64_t n) {
  constexpr int64_t L = vector_lanes<acc_t>();
  for (int64_t x = 0; x < row_length; x += 2 * L)
    backward_block<acc_t, KI>(b_rows, g_blocks, cols, active, k, band_channel_stride, i0, x, dst, n);
}

constexpr int kBackwardBlockI = 5;

template <typename acc_t>
using BackwardBlockRowFn = void (*)(const acc_t* const*, const acc_t* const*, const int64_t*, int64_t,
                                    int64_t, int64_t, int64_t, int64_t, acc_t*, int64_t);

// backward_block_row for every block size: [KI - 1].
template <typename acc_t>
constexpr BackwardBlockRowFn<acc_t> kBackwardBlockRows[kBackwardBlockI] = {
    &backward_block_row<acc_t, 1>, &backward_block_row<acc_t, 2>, &backward_block_row<acc_t, 3>,
    &backward_block_row<acc_t, 4>, &backward_block_row<acc_t, 5>,
};

template <typename acc_t>
void backward_tile(const JointTile<acc_t>& tile, const acc_t* g, acc_t* out, int64_t row_stride,
                   int64_t channel_stride) {
  const int64_t k = tile.channels;
  // the offsets whose second pixel is inside the image for this row, as band rows and g blocks
  const acc_t** b_rows = tile.scratch;
  const acc_t** g_blocks = tile.scratch + tile.num_offsets;
  for (int64_t y = 0; y < tile.rows; ++y) {
    int64_t active = 0;
    for (int64_t o = 0; o < tile.num_offsets; ++o) {
      const OffsetPlan& plan = tile.plans[o];
      if (y < plan.row_begin || y >= plan.row_end) continue;
      b_rows[active] = tile.band + (plan.band_start + y * tile.band_row_stride);
      g_blocks[active] = g + o * k * k;
      tile.column_scratch[2 * active] = plan.col_begin;
      tile.column_scratch[2 * active + 1] = plan.col_end;
      ++active;
    }
    acc_t* dst = out + y * row_stride;
    for (int64_t i0 = 0; i0 < k; i0 += kBackwardBlockI) {
      const int64_t ki = k - i0 < kBackwardBlockI ? k - i0 : kBackwardBlockI;
      kBackwardBlockRows<acc_t>[ki - 1](b_rows, g_blocks, tile.column_scratch, active, k,
                                        tile.band_channel_stride, tile.row_length, i0, dst, channel_stride);
    }
  }
}

template <typename acc_t>
JointTileKernels<acc_t> joint_tile_kernels() {
  return {&forward_tile<acc_t>, &backward_tile<acc_t>};
}

}  // namespace
}  // namespace bimi::cpu::BIMI_CPU_ISA
