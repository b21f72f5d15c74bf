// Host-side plan of the CUDA joint-count launches (docs/contract.md §3): the offsets sorted and
// cut into clusters whose window fits the shared memory (at most kMaxWindow voxels per channel),
// the clusters packed into OffsetTables of at most kTableOffsets offsets (one launch each), and
// the forward block shape.
// Plain C++ (no torch, no CUDA) so that tests/emulate_joint.cpp can use it on a CPU.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "joint_tiles.h"

namespace bimi {
namespace cuda {

struct JointLaunch {
  OffsetTable table{};  // every field zero until filled
  int32_t max_window = 0;  // voxels per channel of its largest cluster window
};

// Voxels per channel of the window of shifts [z0, z1] x [y0, y1] x [x0, x1].
struct ShiftBox {
  int64_t z0, z1, y0, y1, x0, x1;

  static ShiftBox of(int64_t dz, int64_t dy, int64_t dx) { return {dz, dz, dy, dy, dx, dx}; }
  ShiftBox grown(int64_t dz, int64_t dy, int64_t dx) const {
    return {std::min(z0, dz), std::max(z1, dz), std::min(y0, dy), std::max(y1, dy),
            std::min(x0, dx), std::max(x1, dx)};
  }
  int64_t planes() const { return z1 - z0 + 1; }
  int64_t rows() const { return kTileRows + y1 - y0; }
  int64_t cols() const { return kTileWidth + x1 - x0; }
  int64_t voxels() const { return planes() * rows() * cols(); }
};

// The forward block's channel blocks of kMicro per side (ib = jb): all of K's, up to group_blocks.
inline int32_t forward_channel_blocks(int64_t k, int32_t group_blocks) {
  return static_cast<int32_t>(std::min<int64_t>(ceil_div(k, kMicro), group_blocks));
}

// The largest cluster window (voxels per channel) whose block fits `shared_bytes`, the device's
// per-block shared memory: kMaxWindow on every GPU from sm_80 on, less on sm_75 (64 KB). Never
// below one offset's window: a cluster of one offset is always formed (and would be refused at
// launch if even that did not fit). The forward's cut changes no sum's order, so not the result.
// The backward's cap is kMaxWindow from 64 KB on, so on every supported GPU (sm_75 on); below
// that it would cut, and for K above kWindowChannels a cut reorders the backward's sums
// (cluster, channel block, offset): the same values to rounding, not the same bits.
inline int64_t forward_window_cap(int64_t k, int32_t group_blocks, int64_t acc_bytes, int64_t shared_bytes) {
  const int64_t blocks = forward_channel_blocks(k, group_blocks);
  const int64_t window_elements = shared_bytes / acc_bytes - blocks * kMicro * kTileRows * kTileWidth;
  return std::clamp<int64_t>(window_elements / (blocks * kMicro), kTileRows * kTileWidth, kMaxWindow);
}

inline int64_t backward_window_cap(int64_t k, int64_t window_channels, int64_t acc_bytes, int64_t shared_bytes) {
  return std::clamp<int64_t>(shared_bytes / acc_bytes / std::min(k, window_channels), kTileRows * kTileWidth,
                             kMaxWindow);
}

// `sign` = -1 plans the negated offsets (the p2 gradient reads p1 at t - d); `max_window` caps a
// cluster's window (forward_window_cap, backward_window_cap).
inline std::vector<JointLaunch> plan_joint_launches(const std::vector<Offset3>& offsets, int sign,
                                                    int64_t max_window) {
  struct Item {
    int64_t dz, dy, dx;
    int32_t index;
  };
  std::vector<Item> items;
  items.reserve(offsets.size());
  for (size_t o = 0; o < offsets.size(); ++o)
    items.push_back({sign * offsets[o].dz, sign * offsets[o].dy, sign * offsets[o].dx, static_cast<int32_t>(o)});
  // nearby shifts next to each other, so that a greedy cut gives compact clusters
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    if (a.dz != b.dz) return a.dz < b.dz;
    if (a.dy != b.dy) return a.dy < b.dy;
    return a.dx < b.dx;
  });

  struct Cluster {
    size_t begin, end;
    ShiftBox box;
  };
  std::vector<Cluster> clusters;
  if (!items.empty()) {
    Cluster current{0, 1, ShiftBox::of(items[0].dz, items[0].dy, items[0].dx)};
    for (size_t e = 1; e < items.size(); ++e) {
      const ShiftBox grown = current.box.grown(items[e].dz, items[e].dy, items[e].dx);
      if (grown.voxels() <= max_window && current.end - current.begin < static_cast<size_t>(kTableOffsets)) {
        current.box = grown;
        current.end = e + 1;
      } else {
        clusters.push_back(current);
        current = Cluster{e, e + 1, ShiftBox::of(items[e].dz, items[e].dy, items[e].dx)};
      }
    }
    clusters.push_back(current);
  }

  std::vector<JointLaunch> launches;
  for (const Cluster& cluster : clusters) {
    const int32_t n = static_cast<int32_t>(cluster.end - cluster.begin);
    if (launches.empty() || launches.back().table.count + n > kTableOffsets ||
        launches.back().table.clusters == kTableClusters) {
      launches.emplace_back();
    }
    JointLaunch& launch = launches.back();
    OffsetTable& t = launch.table;
    const int32_t c = t.clusters;
    t.cluster_begin[c] = t.count;
    for (size_t e = cluster.begin; e < cluster.end; ++e) {
      t.dz[t.count] = static_cast<int32_t>(items[e].dz);
      t.dy[t.count] = static_cast<int32_t>(items[e].dy);
      t.dx[t.count] = static_cast<int32_t>(items[e].dx);
      t.index[t.count] = items[e].index;
      ++t.count;
    }
    t.cluster_begin[c + 1] = t.count;
    t.wz0[c] = static_cast<int32_t>(cluster.box.z0);
    t.wy0[c] = static_cast<int32_t>(cluster.box.y0);
    t.wx0[c] = static_cast<int32_t>(cluster.box.x0);
    t.wplanes[c] = static_cast<int32_t>(cluster.box.planes());
    t.wrows[c] = static_cast<int32_t>(cluster.box.rows());
    t.wcols[c] = static_cast<int32_t>(cluster.box.cols());
    t.clusters = c + 1;
    launch.max_window = std::max(launch.max_window, static_cast<int32_t>(cluster.box.voxels()));
  }
  return launches;
}

// The forward block: ib x jb channel blocks of kMicro per side and `runs` runs of offsets, one
// warp each; at most kMaxWarps warps.
struct ForwardShape {
  int32_t ib_per_block, jb_per_block, runs_per_block, i_groups, j_groups;
  int32_t warps() const { return ib_per_block * jb_per_block * runs_per_block; }
};

inline ForwardShape forward_shape(const std::vector<JointLaunch>& launches, int64_t k, int32_t run,
                                  int32_t group_blocks) {
  const int64_t channel_blocks = ceil_div(k, kMicro);
  ForwardShape shape;
  shape.ib_per_block = forward_channel_blocks(k, group_blocks);
  shape.jb_per_block = shape.ib_per_block;
  shape.i_groups = static_cast<int32_t>(ceil_div(channel_blocks, shape.ib_per_block));
  shape.j_groups = shape.i_groups;
  int32_t max_runs = 1;
  for (const JointLaunch& launch : launches)
    for (int32_t c = 0; c < launch.table.clusters; ++c)
      max_runs = std::max(max_runs, run_count(launch.table.cluster_begin[c + 1] - launch.table.cluster_begin[c], run));
  const int32_t fit = kMaxWarps / (shape.ib_per_block * shape.jb_per_block);
  shape.runs_per_block = std::max(1, std::min(fit, max_runs));
  return shape;
}

// The forward kernel's arguments, from the maps, the plan's shape and the partial-sum buffer.
template <typename scalar_t, typename acc_t>
JointForwardArgs<scalar_t, acc_t> forward_args(const scalar_t* p1, const scalar_t* p2, const scalar_t* mask,
                                               const Volume& v, const ForwardShape& shape, int64_t num_offsets,
                                               int64_t tiles, int64_t chunks, acc_t* out) {
  JointForwardArgs<scalar_t, acc_t> args;
  args.p1 = p1;
  args.p2 = p2;
  args.mask = mask;
  args.v = v;
  args.ib_per_block = shape.ib_per_block;
  args.jb_per_block = shape.jb_per_block;
  args.runs_per_block = shape.runs_per_block;
  args.i_groups = shape.i_groups;
  args.j_groups = shape.j_groups;
  args.num_offsets = num_offsets;
  args.tiles = tiles;
  args.chunks = chunks;
  args.out = out;
  return args;
}

// Fills each table's block_begin for `shape`; returns the blocks of the largest launch.
inline int64_t set_forward_blocks(std::vector<JointLaunch>& launches, const ForwardShape& shape, int32_t run) {
  int64_t largest = 0;
  for (JointLaunch& launch : launches) {
    OffsetTable& t = launch.table;
    t.block_begin[0] = 0;
    int64_t total = 0;
    for (int32_t c = 0; c < t.clusters; ++c) {
      const int64_t blocks = forward_blocks_of_cluster(t.cluster_begin[c + 1] - t.cluster_begin[c], run,
                                                       shape.runs_per_block, shape.i_groups, shape.j_groups);
      total += blocks;
      // past int32 only for absurd K; the caller refuses to launch then
      t.block_begin[c + 1] = static_cast<int32_t>(std::min<int64_t>(total, INT32_MAX));
    }
    largest = std::max<int64_t>(largest, total);
  }
  return largest;
}

// Shared memory of a forward block (elements of the accumulation dtype): the p1 tile of
// ib_per_block channel blocks, then the p2 window of jb_per_block channel blocks.
inline int64_t forward_shared_elements(const ForwardShape& shape, const JointLaunch& launch) {
  return static_cast<int64_t>(shape.ib_per_block) * kMicro * kTileRows * kTileWidth +
         static_cast<int64_t>(shape.jb_per_block) * kMicro * launch.max_window;
}

// The backward block: one warp per kMicro output channels, at most kBackwardWarps.
inline int32_t backward_warps(int64_t k) {
  return static_cast<int32_t>(std::min<int64_t>(ceil_div(k, kMicro), kBackwardWarps));
}

inline int64_t backward_i_groups(int64_t k) { return ceil_div(ceil_div(k, kMicro), backward_warps(k)); }

// Shared memory of a backward block: one window of up to window_channels channels.
inline int64_t backward_shared_elements(int64_t k, int64_t window_channels, const JointLaunch& launch) {
  return std::min(k, window_channels) * launch.max_window;
}

// Chunks of tiles (the second grid dimension of the forward): enough blocks to fill a large GPU,
// a fixed number (not the device's multiprocessor count; see forward_chunks_for) so that the
// sums, and so the result, are the same on every device; at most kMaxChunks, and partial J
// under kPartialBudget elements.
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMaxChunks = 1024;
constexpr int64_t kPartialBudget = int64_t(1) << 24;

inline int64_t forward_chunks(int64_t tiles, int64_t blocks_per_chunk, int64_t num_offsets, int64_t k) {
  const int64_t wanted = ceil_div(kTargetBlocks, std::max<int64_t>(blocks_per_chunk, 1));
  const int64_t affordable = kPartialBudget / std::max<int64_t>(num_offsets * k * k, 1);
  return std::max<int64_t>(1, std::min({wanted, tiles, kMaxChunks, affordable}));
}

// The forward's chunk count for these offsets, from the plan of a GPU with room for kMaxWindow
// windows (every GPU from sm_80 on) whatever the device: the chunks group J's sums, so they must
// not follow the device's cut into clusters (which changes no sum's order by itself).
inline int64_t forward_chunks_for(const std::vector<Offset3>& offsets, int64_t k, int32_t run,
                                  int32_t group_blocks, int64_t tiles) {
  std::vector<JointLaunch> launches = plan_joint_launches(offsets, +1, kMaxWindow);
  const ForwardShape shape = forward_shape(launches, k, run, group_blocks);
  const int64_t blocks = set_forward_blocks(launches, shape, run);
  return forward_chunks(tiles, blocks, static_cast<int64_t>(offsets.size()), k);
}

}  // namespace cuda
}  // namespace bimi
