// The vectorised inner loops of the CPU kernels as the op code (joint.cpp, boundary.cpp, edge.cpp)
// sees them: plain arrays in and out, behind one table of function pointers per instruction set
// (CpuKernels). The loops are written once, in simd/, and compiled three times: for the baseline
// ISA (kernels_generic.cpp), for AVX2+FMA (kernels_avx2.cpp) and for AVX-512F+VL on 32-byte vectors
// (kernels_avx512.cpp); selected_kernels() picks a build at run time (csrc/README.md). The op code loads the tiles (dtype conversion, mask).
//
// Tile layout. A tile is `rows` consecutive image rows of one plane of one sample. Its first map
// is read with a row and a channel stride: a copy stored row by row, each row as K channels of
// `row_length` values (the image width rounded up to a multiple of 2 vectors, zero past the
// width), or the map itself when no conversion, mask or padding is needed. The band of the second
// map holds, for each distinct row shift (dz, dy) of the offsets, the rows y + dy of plane z + dz
// the tile needs, each row as K channels of `band_channel_stride` values: `pad_left` zeros, the
// row, zeros. Columns outside the image are zero, so a pair with its second pixel left or right of
// the image contributes nothing and the loops need no bounds along x; rows outside the image are
// never read (each offset's plan names the tile rows whose partner row is inside). The forward
// reads the second map itself as its band (row stride W, channel stride the voxels per channel)
// when no offset moves along x and no conversion, mask or padding is needed.
#pragma once

#include <cstdint>

namespace bimi::cpu {

// Lanes of one vector of the inner loops: 32 bytes on every ISA, so every build adds the same terms
// in the same order. The AVX2 and AVX-512 builds agree bit for bit; the baseline differs from them
// by rounding: they fuse each multiply and add into one FMA (-ffp-contract=fast; one rounding
// where the baseline x86-64 build, which has no FMA, rounds twice). The baseline agrees with them
// bit for bit only where every product is exact in the accumulation dtype: the joint counts
// forward of float16/bfloat16 maps (no mask or a 0/1 mask). tests/test_cpp_isa.py states the
// bounds.
template <typename acc_t>
constexpr int64_t vector_lanes() {
  return 32 / static_cast<int64_t>(sizeof(acc_t));
}

// Where offset o reads the band for tile row 0, channel 0, pixel 0, which tile rows and which
// columns have their second pixel inside the image (the kernels skip the vectors of the others,
// which would only add the band's zero padding: the cost follows the overlap, also for a far dx).
struct OffsetPlan {
  int64_t band_start;  // may be negative for the map itself (a row above the tile): add it to a row index first
  int64_t row_begin, row_end;
  int64_t col_begin, col_end;  // 0 <= x + dx < width for x in [col_begin, col_end)
};

template <typename acc_t>
struct JointTile {
  int64_t channels;         // K
  int64_t rows;             // tile rows
  int64_t row_length;       // padded width of a tile row (multiple of 2 vectors)
  const acc_t* first;       // forward only: channel i of tile row y at
  int64_t first_row_stride;      // first + y * first_row_stride + i * first_channel_stride
  int64_t first_channel_stride;
  const acc_t* band;        // channel j of band row r at band + r * band_row_stride + j * band_channel_stride
  int64_t band_row_stride;  // K * band_channel_stride, or W where the band is the map itself
  int64_t band_channel_stride;
  const OffsetPlan* plans;  // one per offset
  int64_t num_offsets;
  const acc_t** scratch;    // 2 * num_offsets pointers of work space (backward only)
  int64_t* column_scratch;  // 2 * num_offsets columns of work space (backward only)
};

// The joint counts' tile kernels (docs/contract.md §3, cpu/joint.cpp; simd/joint_tiles.h).
template <typename acc_t>
struct JointTileKernels {
  // J[o, i, j] += sum over tile pixels s of first[i, s] * second[j, s + d_o].
  void (*forward)(const JointTile<acc_t>& tile, acc_t* joint);
  // out[i, s] = sum_o sum_j g[o, i, j] * second[j, s + d_o] for the tile's pixels s = (y, x), x
  // below row_length, written at out[y * row_stride + i * channel_stride + x].
  void (*backward)(const JointTile<acc_t>& tile, const acc_t* g, acc_t* out, int64_t row_stride,
                   int64_t channel_stride);
};

// Row kernels of the boundary term (docs/contract.md §5, cpu/boundary.cpp; simd/boundary_rows.h),
// each over the n pixels x of one image row. Multi-channel rows are `channels` rows `stride` apart.
template <typename acc_t>
struct BoundaryRowKernels {
  // u[x] = -sum_k q[k][x] log(q[k][x] + 1e-16) (channels added in order); *lo, *hi: min and max
  // of u over the row.
  void (*uncertainty)(const acc_t* q, int64_t stride, int64_t channels, int64_t n, acc_t* u,
                      acc_t* lo, acc_t* hi);
  // U as `uncertainty` (no min and max) and d[k][x] = dU/dq = -(log(q + 1e-16) + q / (q + 1e-16)),
  // the channels of d `d_stride` apart: one log per value for the whole backward.
  void (*uncertainty_with_derivative)(const acc_t* q, int64_t stride, int64_t channels, int64_t n,
                                      acc_t* u, acc_t* d, int64_t d_stride);
  // out[k][x] = grad_u[x] * d[k][x] (out may be d).
  void (*scale_channels)(const acc_t* d, int64_t d_stride, int64_t channels, int64_t n,
                         const acc_t* grad_u, acc_t* out, int64_t out_stride);
  // out[x] = sum_{t=0}^{2r} in[x + t]: window sums along x of a row zero-padded by r each side.
  void (*window_sums)(const acc_t* in, int64_t n, int64_t r, acc_t* out);
  // The window sums along x of U, E, U^2, E^2, U E (out[0..4]) from zero-padded U and E rows.
  void (*window_stats)(const acc_t* u, const acc_t* e, int64_t n, int64_t r, acc_t* const* out);
  // out[x] = rows[0][x] + rows[1][x] + ... in this order.
  void (*add_rows)(const acc_t* const* rows, int64_t count, int64_t n, acc_t* out);
  // Sum over the row of the windows' cross^2 / (var_U var_E) from their five box sums
  // (common/boundary_math.h; count = the window's pixel count n). scratch: n values.
  acc_t (*ncc_sum)(const acc_t* const* sums, int64_t n, acc_t count, acc_t* scratch);
  // The three coefficient maps (d/dS(UE), d/dS(U), d/dS(U^2), times scale) of every window.
  void (*coefficients)(const acc_t* const* sums, int64_t n, acc_t count, acc_t scale,
                       acc_t* const* out);
  // grad_u[x] = dL/dU at each pixel from its edge, normalised U and the coefficients' box sums,
  // divided by the min-max denominator.
  void (*uncertainty_gradient)(const acc_t* edge, const acc_t* u_normalized,
                               const acc_t* const* coefficient_sums, acc_t denominator, int64_t n,
                               acc_t* grad_u);
};

// Row kernels of the edge map (docs/contract.md §5, cpu/edge.cpp; simd/edge_rows.h).
template <typename acc_t>
struct EdgeRowKernels {
  // magnitude[x] += sqrt(dz^2 + dy^2 + dx^2) of one image row with its wrap-around neighbours
  // above and before (nullptr in 2-D).
  void (*magnitude)(const acc_t* row, const acc_t* above, const acc_t* before, int64_t n,
                    acc_t* magnitude);
  // m /= C (the mean over the image's channels), with the min and max of the result.
  void (*channel_mean_range)(acc_t* m, int64_t n, acc_t channels, acc_t* lo, acc_t* hi);
  // out = ((m - lo) / denominator)^gamma.
  void (*normalized_power)(const acc_t* m, int64_t n, acc_t lo, acc_t denominator, acc_t gamma,
                           acc_t* out);
};

// Every inner loop of one build, for acc_t = float or double.
template <typename acc_t>
struct CpuKernels {
  const char* isa;  // the build these loops come from: "generic", "avx2" or "avx512"
  JointTileKernels<acc_t> joint;
  BoundaryRowKernels<acc_t> boundary;
  EdgeRowKernels<acc_t> edge;
};

// The build that runs here: the best the processor runs (AVX-512F+VL, then AVX2+FMA, then the
// baseline), unless the environment variable BIMI_CPU_ISA names one (generic, avx2 or avx512; the
// tests compare them); read at every call. isa_dispatch.cpp.
template <typename acc_t>
CpuKernels<acc_t> selected_kernels();

// The name of that build, "avx512", "avx2" or "generic" (the op bimi_C::cpu_isa, shown by
// `bimi info` and recorded by the benchmarks).
const char* selected_isa_name();

// Each build's table (simd/isa_kernels.h, compiled by kernels_generic.cpp, kernels_avx2.cpp and
// kernels_avx512.cpp).
namespace generic {
template <typename acc_t>
CpuKernels<acc_t> isa_kernels();
}
#if defined(__x86_64__) && defined(__GNUC__)
#define BIMI_HAVE_AVX2_KERNELS 1
#define BIMI_HAVE_AVX512_KERNELS 1
namespace avx2 {
template <typename acc_t>
CpuKernels<acc_t> isa_kernels();
}
namespace avx512 {
template <typename acc_t>
CpuKernels<acc_t> isa_kernels();
}
#endif

}  // namespace bimi::cpu
