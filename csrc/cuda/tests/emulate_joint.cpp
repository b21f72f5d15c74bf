// Host emulation of the CUDA joint-count kernels (csrc/cuda/joint.cu), for machines without a GPU.
//
// Runs the kernels' own per-thread steps (joint_tiles.h) and launch plan (joint_plan.h) block by
// block on the CPU, in the order a block executes them between its barriers, and compares J and
// both gradients with direct loops over the formulas of docs/contract.md §3 in double precision.
// It checks the index arithmetic, the tiling, the halo windows, the offset clusters and tables,
// the channel groups and the fixed-order lane sums; shared memory is poisoned with NaN before every
// load step and each output before the run, so a voxel that no thread loads or an output that no
// thread writes shows up as NaN. Built with -fsanitize=address it also catches any access past
// the shared-memory size the launcher asks for. What it cannot check: the CUDA-only parts (barrier
// placement between the steps, the shuffles, launch limits, streams), which the GPU tests cover.
//
// Build and run (tests/test_cuda.py does this):
//   g++ -std=c++17 -O1 -g -fsanitize=address,undefined -I csrc csrc/cuda/tests/emulate_joint.cpp -o emulate_joint
//   ./emulate_joint        -> prints one line per case and "emulate_joint: OK" last, exit code 0
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/joint_plan.h"

using namespace bimi;
using namespace bimi::cuda;

namespace {

// The device's warp_sum: lane l adds lane l ^ mask, masks 16, 8, 4, 2, 1; lane 0's total.
template <typename acc_t>
acc_t lane_sum(std::array<acc_t, kWarp> v) {
  for (int mask = 16; mask >= 1; mask /= 2) {
    std::array<acc_t, kWarp> next;
    for (int l = 0; l < kWarp; ++l) next[l] = v[l] + v[l ^ mask];
    v = next;
  }
  return v[0];
}

template <typename acc_t>
bool all_finite(const std::vector<acc_t>& v, int64_t count) {
  for (int64_t e = 0; e < count; ++e)
    if (!std::isfinite(v[e])) return false;
  return true;
}

int failures = 0;
int backward_cuts = 0;  // backward plans cut below the full window (only under 64 KB)

// Shared memory per block (the opt-in maximum) of the smallest and the largest supported GPUs:
// sm_75 (T4) and sm_90 (H100, H200), which must give the same bits; and 32 KB, below every
// supported GPU, where the backward's clusters are cut too (right values, not the same bits:
// joint_plan.h).
constexpr int64_t kDeviceSharedBytes[] = {64 * 1024, 227 * 1024};
constexpr int64_t kBelowSupportedSharedBytes = 32 * 1024;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("  FAILED: %s\n", what.c_str());
  }
}

// ---- the kernels, block by block ------------------------------------------------------------
template <typename acc_t>
std::vector<acc_t> emulate_forward(const std::vector<acc_t>& p1, const std::vector<acc_t>& p2,
                                   const std::vector<acc_t>* mask, const Volume& v,
                                   const std::vector<Offset3>& offsets, int64_t shared_bytes, std::string* notes) {
  using Config = JointConfig<acc_t>;
  constexpr int kRun = Config::kRun;
  const int64_t k = v.channels, num_offsets = static_cast<int64_t>(offsets.size());
  std::vector<JointLaunch> launches = plan_joint_launches(
      offsets, +1, forward_window_cap(k, Config::kGroupBlocks, sizeof(acc_t), shared_bytes));
  const ForwardShape shape = forward_shape(launches, k, kRun, Config::kGroupBlocks);
  const int64_t largest = set_forward_blocks(launches, shape, kRun);
  expect(largest <= std::numeric_limits<int32_t>::max(), "forward blocks of a launch fit int32");
  const int64_t tiles = tile_count(v);
  const int64_t chunks = forward_chunks_for(offsets, k, kRun, Config::kGroupBlocks, tiles);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  std::vector<acc_t> partials(chunks * num_offsets * k * k, nan);
  std::vector<int> writes(partials.size(), 0);

  const JointForwardArgs<acc_t, acc_t> args = forward_args(
      p1.data(), p2.data(), mask != nullptr ? mask->data() : nullptr, v, shape, num_offsets, tiles, chunks,
      partials.data());
  const int warps = shape.warps();
  expect(warps >= 1 && warps <= kMaxWarps, "forward warps per block within 1..kMaxWarps");
  int32_t clusters = 0;
  for (const JointLaunch& launch : launches) clusters += launch.table.clusters;
  *notes += " launches=" + std::to_string(launches.size()) + " clusters=" + std::to_string(clusters) +
            " warps=" + std::to_string(warps) +
            " chunks=" + std::to_string(chunks);

  for (const JointLaunch& launch : launches) {
    const OffsetTable& table = launch.table;
    const int64_t shared_size = forward_shared_elements(shape, launch);
    expect(shared_size * static_cast<int64_t>(sizeof(acc_t)) <= shared_bytes, "forward shared memory fits the device");
    const int64_t tasks = table.block_begin[table.clusters];
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      for (int64_t task = 0; task < tasks; ++task) {
        const ForwardBlock block = forward_block(args, table, task, chunk);
        std::vector<ForwardWarp<kRun>> w;
        for (int warp = 0; warp < warps; ++warp) w.push_back(forward_warp<kRun>(args, table, block, warp));
        struct Lane {
          acc_t v[kRun][kMicro][kMicro] = {};
        };
        std::vector<Lane> acc(warps * kWarp);
        // exactly the shared memory the launcher asks for: ASan reports any access past it
        std::vector<acc_t> shared(shared_size);
        const int64_t used = forward_tile_elements(args) +
                             static_cast<int64_t>(shape.jb_per_block) * kMicro * window_voxels(table, block.cluster);
        for (int64_t t = block.tile_begin; t < block.tile_end; ++t) {
          std::fill(shared.begin(), shared.end(), nan);
          const Tile tile = tile_at(v, t);
          for (int warp = 0; warp < warps; ++warp)
            for (int lane = 0; lane < kWarp; ++lane)
              forward_load(args, table, block, tile, warp, warps, lane, shared.data());
          // __syncthreads()
          if (!all_finite(shared, used)) {
            expect(false, "forward: every voxel of the tile and window is loaded");
            return {};
          }
          for (int warp = 0; warp < warps; ++warp)
            if (w[warp].active)
              for (int lane = 0; lane < kWarp; ++lane)
                forward_accumulate<kRun>(w[warp], shared.data(), shared.data() + forward_tile_elements(args), lane,
                                         acc[warp * kWarp + lane].v);
          // __syncthreads()
        }
        for (int warp = 0; warp < warps; ++warp) {
          if (!w[warp].active) continue;
          for (int m = 0; m < kRun; ++m)
            for (int i = 0; i < kMicro; ++i)
              for (int j = 0; j < kMicro; ++j) {
                std::array<acc_t, kWarp> lanes;
                for (int lane = 0; lane < kWarp; ++lane) lanes[lane] = acc[warp * kWarp + lane].v[m][i][j];
                const acc_t total = lane_sum(lanes);
                const ForwardWarp<kRun>& fw = w[warp];
                if (m < fw.count && fw.i0 + i < k && fw.j0 + j < k)
                  ++writes[((chunk * num_offsets + fw.index[m]) * k + fw.i0 + i) * k + fw.j0 + j];
                forward_store(args, fw, chunk, m, i, j, total);
              }
        }
      }
    }
  }
  for (int count : writes)
    if (count != 1) {
      expect(false, "forward: every partial J element written exactly once");
      break;
    }
  // sum_partials_kernel: chunk order
  std::vector<acc_t> joint(num_offsets * k * k, acc_t(0));
  for (int64_t c = 0; c < chunks; ++c)
    for (size_t e = 0; e < joint.size(); ++e) joint[e] += partials[c * joint.size() + e];
  return joint;
}

template <typename acc_t>
std::vector<acc_t> emulate_backward_role(const std::vector<acc_t>& second, const std::vector<acc_t>* mask,
                                         const Volume& v, const std::vector<Offset3>& offsets, int sign,
                                         const std::vector<acc_t>& g, int64_t shared_bytes, std::string* notes) {
  using Config = JointConfig<acc_t>;
  const int64_t k = v.channels;
  const std::vector<JointLaunch> launches = plan_joint_launches(
      offsets, sign, backward_window_cap(k, Config::kWindowChannels, sizeof(acc_t), shared_bytes));
  const int warps = backward_warps(k);
  const int64_t i_groups = backward_i_groups(k);
  const int64_t tiles = tile_count(v);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  std::vector<acc_t> out(second.size(), nan);
  std::vector<acc_t> carry;
  if (launches.size() > 1) carry.assign(second.size(), nan);
  int64_t clusters = 0, uncut = 0;
  for (const JointLaunch& launch : launches) clusters += launch.table.clusters;
  for (const JointLaunch& launch : plan_joint_launches(offsets, sign, kMaxWindow)) uncut += launch.table.clusters;
  if (clusters > uncut) ++backward_cuts;
  if (sign > 0)
    *notes += " backward_launches=" + std::to_string(launches.size()) + " backward_clusters=" + std::to_string(clusters);

  JointBackwardArgs<acc_t, acc_t> args;
  args.second = second.data();
  args.mask = mask != nullptr ? mask->data() : nullptr;
  args.v = v;
  args.g = g.data();
  args.transpose_g = sign < 0;
  args.warps = warps;
  args.out = out.data();
  for (size_t l = 0; l < launches.size(); ++l) {
    const OffsetTable& table = launches[l].table;
    args.carry_in = l > 0 ? carry.data() : nullptr;
    args.carry_out = l + 1 < launches.size() ? carry.data() : nullptr;
    const int64_t shared_size = backward_shared_elements(k, Config::kWindowChannels, launches[l]);
    expect(shared_size * static_cast<int64_t>(sizeof(acc_t)) <= shared_bytes, "backward shared memory fits the device");
    for (int64_t tile = 0; tile < tiles; ++tile)
      for (int64_t ig = 0; ig < i_groups; ++ig) {
        std::vector<BackwardWarp> w;
        for (int warp = 0; warp < warps; ++warp) w.push_back(backward_warp(args, tile, ig, warp));
        struct Lane {
          acc_t v[kTileRows][kMicro] = {};
        };
        std::vector<Lane> acc(warps * kWarp);
        std::vector<acc_t> shared(shared_size);
        for (int32_t c = 0; c < table.clusters; ++c)
          for (int64_t j0 = 0; j0 < k; j0 += Config::kWindowChannels) {
            std::fill(shared.begin(), shared.end(), nan);
            for (int warp = 0; warp < warps; ++warp)
              for (int lane = 0; lane < kWarp; ++lane)
                backward_load(args, table, w[0].tile, c, j0, warp, warps, lane, shared.data());
            const int64_t used = static_cast<int64_t>(backward_run_channels(args, j0)) * window_voxels(table, c);
            if (!all_finite(shared, used)) {
              expect(false, "backward: every voxel of the window is loaded");
              return out;
            }
            for (int warp = 0; warp < warps; ++warp)
              for (int lane = 0; lane < kWarp; ++lane)
                backward_accumulate(args, table, w[warp], c, j0, lane, shared.data(), acc[warp * kWarp + lane].v);
          }
        for (int warp = 0; warp < warps; ++warp)
          for (int lane = 0; lane < kWarp; ++lane) backward_store(args, w[warp], lane, acc[warp * kWarp + lane].v);
      }
  }
  return out;
}

// ---- direct loops (docs/contract.md §3), double precision ----------------------------------------
struct Case {
  std::string name;
  int64_t b, k, d, h, w;
  std::vector<Offset3> offsets;
  bool masked;
};

std::vector<Offset3> window(int64_t radius, int ndim, int64_t dilation = 1) {
  std::vector<Offset3> out;
  const int64_t rz = ndim == 3 ? radius : 0;
  for (int64_t z = -rz; z <= rz; ++z)
    for (int64_t y = -radius; y <= radius; ++y)
      for (int64_t x = -radius; x <= radius; ++x) out.push_back({z * dilation, y * dilation, x * dilation});
  return out;
}

template <typename acc_t>
double run_case(const Case& c, std::mt19937_64& rng) {
  const Volume v{c.b, c.k, c.d, c.h, c.w};
  const int64_t voxels = v.voxels(), n = v.batch * v.channels * voxels;
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<acc_t> p1(n), p2(n), mask(v.batch * voxels);
  for (auto& x : p1) x = static_cast<acc_t>(uniform(rng));
  for (auto& x : p2) x = static_cast<acc_t>(uniform(rng));
  for (auto& x : mask) x = uniform(rng) < 0.7 ? acc_t(1) : acc_t(0);
  const std::vector<acc_t>* m = c.masked ? &mask : nullptr;
  const int64_t num_offsets = static_cast<int64_t>(c.offsets.size());
  std::vector<acc_t> g(num_offsets * c.k * c.k);
  for (auto& x : g) x = static_cast<acc_t>(uniform(rng) - 0.5);

  // direct loops
  auto at = [&](const std::vector<acc_t>& p, int64_t b, int64_t ch, int64_t z, int64_t y, int64_t x) {
    return static_cast<double>(p[(b * c.k + ch) * voxels + v.voxel_index(z, y, x)]);
  };
  auto weight = [&](int64_t b, int64_t z, int64_t y, int64_t x) {
    return c.masked ? static_cast<double>(mask[b * voxels + v.voxel_index(z, y, x)]) : 1.0;
  };
  std::vector<double> joint(num_offsets * c.k * c.k, 0.0), grad1(n, 0.0), grad2(n, 0.0);
  for (int64_t o = 0; o < num_offsets; ++o) {
    const Offset3 d = c.offsets[o];
    for (int64_t b = 0; b < c.b; ++b)
      for (int64_t z = 0; z < c.d; ++z)
        for (int64_t y = 0; y < c.h; ++y)
          for (int64_t x = 0; x < c.w; ++x) {
            if (!v.inside(z + d.dz, y + d.dy, x + d.dx)) continue;
            const double mm = weight(b, z, y, x) * weight(b, z + d.dz, y + d.dy, x + d.dx);
            for (int64_t i = 0; i < c.k; ++i)
              for (int64_t j = 0; j < c.k; ++j) {
                const double a = at(p1, b, i, z, y, x), s = at(p2, b, j, z + d.dz, y + d.dy, x + d.dx);
                const double gij = static_cast<double>(g[(o * c.k + i) * c.k + j]);
                joint[(o * c.k + i) * c.k + j] += mm * a * s;
                grad1[(b * c.k + i) * voxels + v.voxel_index(z, y, x)] += mm * gij * s;
                grad2[(b * c.k + j) * voxels + v.voxel_index(z + d.dz, y + d.dy, x + d.dx)] += mm * gij * a;
              }
          }
  }

  auto error = [](const std::vector<acc_t>& got, const std::vector<double>& want) {
    if (got.size() != want.size()) return std::numeric_limits<double>::infinity();
    double diff = 0, scale = 1e-30;
    for (size_t e = 0; e < want.size(); ++e) {
      const double d = std::fabs(static_cast<double>(got[e]) - want[e]);
      if (!(d <= diff)) diff = d;  // NaN propagates: an unwritten output fails
      scale = std::max(scale, std::fabs(want[e]));
    }
    return diff / scale;
  };
  // Every device's shared memory per block: the clusters are cut to fit it, which must change
  // no result (every sum keeps its order).
  std::string notes;
  double worst = 0;
  std::vector<std::vector<acc_t>> first;
  for (const int64_t shared_bytes : kDeviceSharedBytes) {
    notes += " | " + std::to_string(shared_bytes / 1024) + " KB:";
    const std::vector<std::vector<acc_t>> got = {
        emulate_forward(p1, p2, m, v, c.offsets, shared_bytes, &notes),
        emulate_backward_role(p2, m, v, c.offsets, +1, g, shared_bytes, &notes),
        emulate_backward_role(p1, m, v, c.offsets, -1, g, shared_bytes, &notes)};
    worst = std::max({worst, error(got[0], joint), error(got[1], grad1), error(got[2], grad2)});
    if (first.empty()) {
      first = got;
    } else {
      bool same = true;  // bitwise: memcmp, so that two NaN outputs do not compare equal
      for (size_t o = 0; o < got.size(); ++o)
        same = same && got[o].size() == first[o].size() &&
               std::memcmp(got[o].data(), first[o].data(), got[o].size() * sizeof(acc_t)) == 0;
      expect(same, c.name + ": the same bits at every shared-memory size");
    }
  }
  {  // below every supported GPU: the backward's cut path, checked for its values
    notes += " | " + std::to_string(kBelowSupportedSharedBytes / 1024) + " KB:";
    const int64_t small = kBelowSupportedSharedBytes;
    worst = std::max({worst, error(emulate_forward(p1, p2, m, v, c.offsets, small, &notes), joint),
                      error(emulate_backward_role(p2, m, v, c.offsets, +1, g, small, &notes), grad1),
                      error(emulate_backward_role(p1, m, v, c.offsets, -1, g, small, &notes), grad2)});
  }
  std::printf("%-8s %-44s rel.err %.2e%s\n", sizeof(acc_t) == 8 ? "float64" : "float32", c.name.c_str(),
              worst, notes.c_str());
  return worst;
}

}  // namespace

int main() {
  std::mt19937_64 rng(1234);
  const std::vector<Case> cases = {
      {"2d K=3 9x11 r=1", 2, 3, 1, 9, 11, window(1, 2), false},
      {"2d K=3 9x11 r=1 masked", 2, 3, 1, 9, 11, window(1, 2), true},
      {"2d K=2 3x4 r=1 masked (under one tile)", 1, 2, 1, 3, 4, window(1, 2), true},
      {"2d K=10 20x37 r=3 masked", 2, 10, 1, 20, 37, window(3, 2), true},
      {"2d K=17 19x23 r=2 dilation 2", 1, 17, 1, 19, 23, window(2, 2, 2), false},
      {"2d K=40 12x21 r=0 masked", 1, 40, 1, 12, 21, window(0, 2), true},
      {"2d K=10 18x30 sparse far", 1, 10, 1, 18, 30, {{0, 0, 0}, {0, 2, -5}, {0, -7, 3}, {0, 0, 29}}, true},
      {"2d K=3 40x50 shifts past one window", 1, 3, 1, 40, 50, {{0, 30, 0}, {0, -30, 45}, {0, 0, -49}, {0, 1, 1}}, false},
      {"2d K=3 20x40 r=7 (225 offsets, 2 tables)", 1, 3, 1, 20, 40, window(7, 2), true},
      {"2d K=128 9x5 r=1 masked", 1, 128, 1, 9, 5, window(1, 2), true},
      {"2d K=5 1x1 r=0 (one pixel)", 2, 5, 1, 1, 1, window(0, 2), false},
      {"2d K=4 1x40 row offsets", 2, 4, 1, 1, 40, {{0, 0, 3}, {0, 0, -3}, {0, 0, 0}}, true},
      {"2d K=5 20x70 r=1 (tiles across and down)", 2, 5, 1, 20, 70, window(1, 2), false},
      {"3d K=3 5x6x7 r=1 masked", 2, 3, 5, 6, 7, window(1, 3), true},
      {"3d K=10 4x9x10 explicit", 1, 10, 4, 9, 10, {{0, 0, 0}, {1, -2, 3}, {-3, 0, -1}}, false},
      {"3d K=2 6x11x9 r=1 dilation 2 masked", 1, 2, 6, 11, 9, window(1, 3, 2), true},
      {"3d K=3 5x9x9 r=2 (125 offsets)", 1, 3, 5, 9, 9, window(2, 3), false},
      // windows past 64 KB of shared memory (float32 K >= 13, float64 K >= 5): cut into more
      // clusters on sm_75 only
      {"3d K=16 3x9x33 r=1 masked (cut on 64 KB)", 1, 16, 3, 9, 33, window(1, 3), true},
      {"2d K=14 17x40 r=1 dilation 6 (cut on 64 KB)", 1, 14, 1, 17, 40, window(1, 2, 6), false},
      // 32 tiles: the 64 KB plan alone would give 26 chunks, the full-window plan 29
      {"2d K=17 32x256 r=2 dilation 5 (chunks of every device)", 1, 17, 1, 32, 256, window(2, 2, 5), true},
  };
  for (const Case& c : cases) {
    const double e64 = run_case<double>(c, rng);
    expect(e64 <= 1e-12, c.name + " float64 within 1e-12");
    const double e32 = run_case<float>(c, rng);
    expect(e32 <= 2e-5, c.name + " float32 within 2e-5");
  }
  expect(backward_cuts > 0, "some case cuts the backward's clusters at 32 KB (the path is run)");
  if (failures != 0) {
    std::printf("emulate_joint: %d FAILED\n", failures);
    return 1;
  }
  std::printf("emulate_joint: OK\n");
  return 0;
}
