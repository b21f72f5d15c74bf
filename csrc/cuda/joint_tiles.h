// The per-thread steps of the CUDA joint-count kernels (docs/contract.md §3), written as plain
// __host__ __device__ functions of (warp, lane) so that the same code runs in the kernels
// (joint.cu) and in a host emulation of a thread block (tests/emulate_joint.cpp), which checks
// the index arithmetic, the tiling and the halo windows against direct loops on a CPU.
//
// Geometry. A tile is kTileRows rows x kTileWidth columns of one plane (b, z): lane l of a warp
// owns column x0 + l. The offsets of one launch come in an OffsetTable (a kernel parameter, so a
// launch needs no host-to-device copy and can be captured in a CUDA graph), sorted and cut into
// clusters whose shifts span a small box. For a tile and a cluster, the "window" is the block of
// the second map that the cluster's offsets reach from the tile: planes z + wz0 .., rows y0 + wy0
// .., columns x0 + wx0 .. of wplanes x wrows x wcols voxels, zeros outside the image. Maps are
// held in shared memory in the accumulation dtype, already multiplied by the mask.
#pragma once

#include <cstdint>

#include "../common/geometry.h"

namespace bimi {
namespace cuda {

constexpr int kWarp = 32;
constexpr int kTileWidth = kWarp;  // one column per lane
constexpr int kTileRows = 8;
constexpr int kMicro = 4;            // channels per side of one lane's micro-tile
constexpr int kMaxWindow = 1024;     // voxels per channel of a cluster's window (shared memory)
constexpr int kTableOffsets = 128;   // offsets per launch (the table stays under 4 KB of parameters)
constexpr int kTableClusters = 32;
constexpr int kMaxWarps = 16;        // per block, forward
constexpr int kBackwardWarps = 4;    // per block, backward: one per kMicro output channels

// Per accumulation dtype: offsets one forward warp accumulates at once (kRun x 4 x 4 registers
// per lane), channel blocks of kMicro per block side, and channels of one backward window.
template <typename acc_t>
struct JointConfig {
  static constexpr int kRun = 3;  // 48 accumulators: 122 registers of the 128 that 512 threads allow, no spills (sm_90)
  static constexpr int kGroupBlocks = 4;
  static constexpr int kWindowChannels = 16;
};
template <>
struct JointConfig<double> {
  static constexpr int kRun = 2;
  static constexpr int kGroupBlocks = 2;
  static constexpr int kWindowChannels = 8;
};

// The offsets of one launch, passed by value as a kernel parameter.
struct OffsetTable {
  int32_t count;
  int32_t clusters;
  int32_t dz[kTableOffsets], dy[kTableOffsets], dx[kTableOffsets];
  int32_t index[kTableOffsets];  // position of the offset in the op's offset list (J's first dim)
  int32_t cluster_begin[kTableClusters + 1];  // cluster c holds table offsets [begin[c], begin[c+1])
  int32_t wz0[kTableClusters], wy0[kTableClusters], wx0[kTableClusters];
  int32_t wplanes[kTableClusters], wrows[kTableClusters], wcols[kTableClusters];
  int32_t block_begin[kTableClusters + 1];  // forward: the first block of cluster c
};
static_assert(sizeof(OffsetTable) <= 3200, "the table must leave room in 4 KB of kernel parameters");

struct Tile {
  int64_t b;
  int64_t z, y0, x0;
};

BIMI_HD int64_t tile_count(const Volume& v) {
  return v.batch * v.depth * ceil_div(v.height, kTileRows) * ceil_div(v.width, kTileWidth);
}

// Tiles in (b, z, row band, column band) order, the column band fastest.
BIMI_HD Tile tile_at(const Volume& v, int64_t t) {
  const int64_t across = ceil_div(v.width, kTileWidth);
  const int64_t down = ceil_div(v.height, kTileRows);
  Tile tile;
  tile.x0 = (t % across) * kTileWidth;
  t /= across;
  tile.y0 = (t % down) * kTileRows;
  t /= down;
  tile.z = t % v.depth;
  tile.b = t / v.depth;
  return tile;
}

BIMI_HD int32_t window_voxels(const OffsetTable& table, int32_t c) {
  return table.wplanes[c] * table.wrows[c] * table.wcols[c];
}

// Where offset o of cluster c puts the partner of tile voxel (row 0, column 0) in the window.
BIMI_HD int32_t window_shift(const OffsetTable& table, int32_t c, int32_t o) {
  return ((table.dz[o] - table.wz0[c]) * table.wrows[c] + (table.dy[o] - table.wy0[c])) * table.wcols[c] +
         (table.dx[o] - table.wx0[c]);
}

// Loads channels c0 .. c0 + channels - 1 of map p (B, K, D, H, W) over planes z0 .., rows y0 ..,
// columns x0 .. of sample b, times the mask, into dst[((c * planes + plane) * rows + row) * cols +
// col] in the accumulation dtype; zeros outside the image and for channels >= K. Warp `warp` of
// `warps` takes every warps-th row, its lanes the columns: the loads of a warp are consecutive.
template <typename scalar_t, typename acc_t>
BIMI_HD void load_window(const scalar_t* p, const scalar_t* mask, const Volume& v, int64_t b,
                         int64_t z0, int64_t y0, int64_t x0, int32_t planes, int32_t rows,
                         int32_t cols, int64_t c0, int32_t channels, int warp, int warps, int lane,
                         acc_t* dst) {
  const int64_t voxels = v.voxels();
  const int32_t total_rows = channels * planes * rows;
  for (int32_t row_id = warp; row_id < total_rows; row_id += warps) {
    const int32_t row = row_id % rows;
    const int32_t plane = (row_id / rows) % planes;
    const int64_t k = c0 + row_id / (rows * planes);
    const int64_t z = z0 + plane, y = y0 + row;
    acc_t* out = dst + static_cast<int64_t>(row_id) * cols;
    const bool row_inside = k < v.channels && z >= 0 && z < v.depth && y >= 0 && y < v.height;
    if (!row_inside) {
      for (int32_t col = lane; col < cols; col += kWarp) out[col] = acc_t(0);
      continue;
    }
    const int64_t pixel0 = v.voxel_index(z, y, 0);
    const scalar_t* src = p + (b * v.channels + k) * voxels + pixel0;
    const scalar_t* m = mask != nullptr ? mask + b * voxels + pixel0 : nullptr;
    for (int32_t col = lane; col < cols; col += kWarp) {
      const int64_t x = x0 + col;
      acc_t value = acc_t(0);
      if (x >= 0 && x < v.width) {
        value = static_cast<acc_t>(src[x]);
        if (m != nullptr) value *= static_cast<acc_t>(m[x]);
      }
      out[col] = value;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Forward: block (task, chunk) walks tiles [tile_begin, tile_end) of its chunk; each of its warps
// accumulates, per lane (one column), a kMicro x kMicro block of J for up to kRun offsets of one
// cluster over all the rows it sees; at the end the lanes are summed (warp_sum) and lane 0 writes
// the block's partial J. Shared memory: the p1 tile (the block's i channels) then the cluster's
// p2 window (its j channels).
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
struct JointForwardArgs {
  const scalar_t* p1;
  const scalar_t* p2;
  const scalar_t* mask;  // (B, D, H, W) in the maps' dtype, or null
  Volume v;
  int32_t ib_per_block, jb_per_block, runs_per_block;  // warps = their product
  int32_t i_groups, j_groups;  // ceil(ceil(K / kMicro) / ib_per_block), likewise for j
  int64_t num_offsets;         // |O| of the op: the layout of `out`
  int64_t tiles, chunks;
  acc_t* out;  // (chunks, |O|, K, K): each block's partial J
};

struct ForwardBlock {
  int32_t cluster, run_group, i_group, j_group;
  int64_t chunk, tile_begin, tile_end;
};

template <typename scalar_t, typename acc_t>
BIMI_HD ForwardBlock forward_block(const JointForwardArgs<scalar_t, acc_t>& args,
                                   const OffsetTable& table, int64_t task, int64_t chunk) {
  ForwardBlock block;
  int32_t c = 0;
  while (c + 1 < table.clusters && table.block_begin[c + 1] <= task) ++c;
  int64_t local = task - table.block_begin[c];
  block.cluster = c;
  block.j_group = static_cast<int32_t>(local % args.j_groups);
  local /= args.j_groups;
  block.i_group = static_cast<int32_t>(local % args.i_groups);
  block.run_group = static_cast<int32_t>(local / args.i_groups);
  block.chunk = chunk;
  block.tile_begin = chunk_begin(args.tiles, args.chunks, chunk);
  block.tile_end = chunk_begin(args.tiles, args.chunks, chunk + 1);
  return block;
}

// Runs of offsets of a cluster of n: ceil(n / run) runs of sizes that differ by at most one.
BIMI_HD int32_t run_count(int32_t n, int32_t run) { return (n + run - 1) / run; }

// Forward blocks of one cluster of n offsets.
BIMI_HD int64_t forward_blocks_of_cluster(int32_t n, int32_t run, int32_t runs_per_block,
                                          int32_t i_groups, int32_t j_groups) {
  const int32_t groups = (run_count(n, run) + runs_per_block - 1) / runs_per_block;
  return static_cast<int64_t>(groups) * i_groups * j_groups;
}

template <int kRun>
struct ForwardWarp {
  bool active;
  int32_t count;              // offsets in this warp's run
  int32_t index[kRun];        // their positions in J
  int32_t shift[kRun];        // window_shift of each
  int64_t i0, j0;             // first channel of the micro-tile in J
  int32_t a_base, b_base;     // micro-tile's first channel in the shared p1 tile / p2 window
  int32_t cols, channel_stride;  // of the window
};

template <int kRun, typename scalar_t, typename acc_t>
BIMI_HD ForwardWarp<kRun> forward_warp(const JointForwardArgs<scalar_t, acc_t>& args,
                                       const OffsetTable& table, const ForwardBlock& block,
                                       int warp) {
  ForwardWarp<kRun> w;
  const int32_t per_run = args.ib_per_block * args.jb_per_block;
  const int32_t ib_local = (warp / args.jb_per_block) % args.ib_per_block;
  const int32_t jb_local = warp % args.jb_per_block;
  const int32_t c = block.cluster;
  const int32_t first = table.cluster_begin[c];
  const int32_t n = table.cluster_begin[c + 1] - first;
  const int32_t runs = run_count(n, kRun);
  const int32_t r = block.run_group * args.runs_per_block + warp / per_run;
  w.i0 = (static_cast<int64_t>(block.i_group) * args.ib_per_block + ib_local) * kMicro;
  w.j0 = (static_cast<int64_t>(block.j_group) * args.jb_per_block + jb_local) * kMicro;
  // idle: past the cluster's last run, or a micro-tile wholly past channel K - 1
  w.active = r < runs && w.i0 < args.v.channels && w.j0 < args.v.channels;
  const int32_t begin = w.active ? first + n * r / runs : first;
  const int32_t end = w.active ? first + n * (r + 1) / runs : first;
  w.count = end - begin;
  for (int m = 0; m < kRun; ++m) {
    w.index[m] = m < w.count ? table.index[begin + m] : 0;
    w.shift[m] = m < w.count ? window_shift(table, c, begin + m) : 0;
  }
  w.cols = table.wcols[c];
  w.channel_stride = window_voxels(table, c);
  w.a_base = ib_local * kMicro * kTileRows * kTileWidth;
  w.b_base = jb_local * kMicro * w.channel_stride;
  return w;
}

// Shared-memory layout of a forward block: the p1 tile, then the window.
template <typename scalar_t, typename acc_t>
BIMI_HD int32_t forward_tile_elements(const JointForwardArgs<scalar_t, acc_t>& args) {
  return args.ib_per_block * kMicro * kTileRows * kTileWidth;
}

// Every thread of the block: the p1 tile and the cluster's p2 window of `tile`.
template <typename scalar_t, typename acc_t>
BIMI_HD void forward_load(const JointForwardArgs<scalar_t, acc_t>& args, const OffsetTable& table,
                          const ForwardBlock& block, const Tile& tile, int warp, int warps, int lane,
                          acc_t* shared) {
  const int32_t c = block.cluster;
  load_window(args.p1, args.mask, args.v, tile.b, tile.z, tile.y0, tile.x0, 1, kTileRows,
              kTileWidth, static_cast<int64_t>(block.i_group) * args.ib_per_block * kMicro,
              args.ib_per_block * kMicro, warp, warps, lane, shared);
  load_window(args.p2, args.mask, args.v, tile.b, tile.z + table.wz0[c], tile.y0 + table.wy0[c],
              tile.x0 + table.wx0[c], table.wplanes[c], table.wrows[c], table.wcols[c],
              static_cast<int64_t>(block.j_group) * args.jb_per_block * kMicro,
              args.jb_per_block * kMicro, warp, warps, lane, shared + forward_tile_elements(args));
}

// One active warp's lane: acc[m][i][j] += p1[i0 + i, s] p2[j0 + j, s + d_m] over the tile's
// column of this lane. Voxels outside the image are zeros in shared memory, so no test here.
template <int kRun, typename acc_t>
BIMI_HD void forward_accumulate(const ForwardWarp<kRun>& w, const acc_t* tile, const acc_t* window,
                                int lane, acc_t (&acc)[kRun][kMicro][kMicro]) {
  const acc_t* a = tile + w.a_base + lane;
  const acc_t* b = window + w.b_base + lane;
  for (int row = 0; row < kTileRows; ++row) {
    acc_t av[kMicro];
#pragma unroll
    for (int i = 0; i < kMicro; ++i) av[i] = a[(i * kTileRows + row) * kTileWidth];
#pragma unroll
    for (int m = 0; m < kRun; ++m) {
      if (m < w.count) {
        const acc_t* bm = b + w.shift[m] + row * w.cols;
#pragma unroll
        for (int j = 0; j < kMicro; ++j) {
          const acc_t bv = bm[j * w.channel_stride];
#pragma unroll
          for (int i = 0; i < kMicro; ++i) acc[m][i][j] += av[i] * bv;
        }
      }
    }
  }
}

// Lane 0 of an active warp, with the lane sums: the block's partial J for its micro-tile.
template <int kRun, typename scalar_t, typename acc_t>
BIMI_HD void forward_store(const JointForwardArgs<scalar_t, acc_t>& args, const ForwardWarp<kRun>& w,
                           int64_t chunk, int m, int i, int j, acc_t value) {
  const int64_t k = args.v.channels;
  if (m < w.count && w.i0 + i < k && w.j0 + j < k)
    args.out[((chunk * args.num_offsets + w.index[m]) * k + w.i0 + i) * k + w.j0 + j] = value;
}

// ------------------------------------------------------------------------------------------------
// Backward: the gradient of the map in the first role,
//   out[b, i, s] = m[s] sum_o sum_j G[o, i, j] m[s + d_o] second[b, j, s + d_o],
// (the second map's gradient: the same with the maps swapped, the offsets negated and G
// transposed). Block (tile, i group); warp w owns kMicro output channels, each lane its column's
// kTileRows voxels: kTileRows x kMicro accumulators. For each cluster and each run of
// kWindowChannels channels of `second`, the block loads the window once and every warp reads it.
// With more than one table (more than kTableOffsets offsets) the launches add up their sums in
// an accumulation-dtype buffer (carry) and the last one writes the gradient.
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
struct JointBackwardArgs {
  const scalar_t* second;
  const scalar_t* mask;
  Volume v;
  const acc_t* g;    // (|O|, K, K) contiguous
  bool transpose_g;  // read G[o, j, i] for G[o, i, j]
  int32_t warps;     // i blocks per block
  const acc_t* carry_in;  // sums of earlier launches (B, K, D, H, W) or null
  acc_t* carry_out;       // where to leave the raw sums for a later launch, or null: write `out`
  scalar_t* out;
};

struct BackwardWarp {
  Tile tile;
  int64_t i0;
};

template <typename scalar_t, typename acc_t>
BIMI_HD BackwardWarp backward_warp(const JointBackwardArgs<scalar_t, acc_t>& args, int64_t tile,
                                   int64_t i_group, int warp) {
  BackwardWarp w;
  w.tile = tile_at(args.v, tile);
  w.i0 = (i_group * args.warps + warp) * kMicro;
  return w;
}

// Channels of `second` in window run j0 of cluster c.
template <typename scalar_t, typename acc_t>
BIMI_HD int32_t backward_run_channels(const JointBackwardArgs<scalar_t, acc_t>& args, int64_t j0) {
  const int64_t left = args.v.channels - j0;
  return static_cast<int32_t>(left < JointConfig<acc_t>::kWindowChannels ? left
                                                                          : JointConfig<acc_t>::kWindowChannels);
}

template <typename scalar_t, typename acc_t>
BIMI_HD void backward_load(const JointBackwardArgs<scalar_t, acc_t>& args, const OffsetTable& table,
                           const Tile& tile, int32_t c, int64_t j0, int warp, int warps, int lane,
                           acc_t* shared) {
  load_window(args.second, args.mask, args.v, tile.b, tile.z + table.wz0[c], tile.y0 + table.wy0[c],
              tile.x0 + table.wx0[c], table.wplanes[c], table.wrows[c], table.wcols[c], j0,
              backward_run_channels(args, j0), warp, warps, lane, shared);
}

template <typename scalar_t, typename acc_t>
BIMI_HD void backward_accumulate(const JointBackwardArgs<scalar_t, acc_t>& args,
                                 const OffsetTable& table, const BackwardWarp& w, int32_t c,
                                 int64_t j0, int lane, const acc_t* window,
                                 acc_t (&acc)[kTileRows][kMicro]) {
  const int64_t k = args.v.channels;
  if (w.i0 >= k) return;  // a warp wholly past channel K - 1
  const int32_t channels = backward_run_channels(args, j0);
  const int32_t cols = table.wcols[c];
  const int32_t channel_stride = window_voxels(table, c);
  // G[o, i, j] at g[o * K * K + i * i_stride + j * j_stride]
  const int64_t i_stride = args.transpose_g ? 1 : k;
  const int64_t j_stride = args.transpose_g ? k : 1;
  for (int32_t o = table.cluster_begin[c]; o < table.cluster_begin[c + 1]; ++o) {
    const acc_t* wo = window + window_shift(table, c, o) + lane;
    const int64_t go = static_cast<int64_t>(table.index[o]) * k * k;
    for (int32_t jl = 0; jl < channels; ++jl) {
      const int64_t gj = go + (j0 + jl) * j_stride;
      acc_t gv[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) gv[i] = w.i0 + i < k ? args.g[gj + (w.i0 + i) * i_stride] : acc_t(0);
      const acc_t* wj = wo + jl * channel_stride;
#pragma unroll
      for (int row = 0; row < kTileRows; ++row) {
        const acc_t value = wj[row * cols];
#pragma unroll
        for (int i = 0; i < kMicro; ++i) acc[row][i] += gv[i] * value;
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
BIMI_HD void backward_store(const JointBackwardArgs<scalar_t, acc_t>& args, const BackwardWarp& w,
                            int lane, const acc_t (&acc)[kTileRows][kMicro]) {
  const Volume& v = args.v;
  const int64_t x = w.tile.x0 + lane;
  if (x >= v.width) return;
  const int64_t voxels = v.voxels();
  for (int row = 0; row < kTileRows; ++row) {
    const int64_t y = w.tile.y0 + row;
    if (y >= v.height) break;
    const int64_t s = v.voxel_index(w.tile.z, y, x);
    const acc_t m = args.mask != nullptr ? static_cast<acc_t>(args.mask[w.tile.b * voxels + s]) : acc_t(1);
    for (int i = 0; i < kMicro; ++i) {
      if (w.i0 + i >= v.channels) break;
      const int64_t e = (w.tile.b * v.channels + w.i0 + i) * voxels + s;
      acc_t value = acc[row][i];
      if (args.carry_in != nullptr) value += args.carry_in[e];
      if (args.carry_out != nullptr) {
        args.carry_out[e] = value;
      } else {
        args.out[e] = static_cast<scalar_t>(args.mask != nullptr ? value * m : value);
      }
    }
  }
}

}  // namespace cuda
}  // namespace bimi
