// Host emulation of the CUDA boundary kernels (csrc/cuda/boundary.cu), for machines without a GPU.
//
// Runs the kernels' per-voxel steps (boundary_voxels.h) over the same launch geometry, with the
// block reductions in the kernels' tree order, and compares CC, the per-sample range of U and
// dCC/dp with a direct double-precision evaluation of docs/contract.md §5 (box sums over the
// zero-padded window, clamps at eps, gradient through the detached min-max), and that a NaN in a
// map reaches its sample's range and CC. Outputs and temporaries are poisoned with NaN first, so a
// voxel no thread writes fails the comparison.
//
// Build and run (tests/test_cuda.py does this):
//   g++ -std=c++17 -O1 -g -fsanitize=address,undefined -I csrc csrc/cuda/tests/emulate_boundary.cpp -o emulate_boundary
//   ./emulate_boundary     -> one line per case and "emulate_boundary: OK" last, exit code 0
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/boundary_voxels.h"

using namespace bimi;
using namespace bimi::cuda;

namespace {

// common.cuh's block_sum: a tree over kThreads values, stride 128 down to 1.
template <typename acc_t>
acc_t block_sum(std::vector<acc_t> s) {
  for (int stride = kThreads / 2; stride > 0; stride /= 2)
    for (int t = 0; t < stride; ++t) s[t] += s[t + stride];
  return s[0];
}

int failures = 0;
void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("  FAILED: %s\n", what.c_str());
  }
}

struct Result {
  double cc;
  std::vector<double> u_range, grad;
};

template <typename acc_t>
Result emulate(const std::vector<acc_t>& p, const std::vector<acc_t>& edge, const Volume& v, const BoxWindow& w,
               acc_t grad_cc) {
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t voxels = v.voxels(), total = v.batch * voxels;
  const int64_t parts = range_parts(v);
  std::vector<acc_t> u(total, nan), part_lo(v.batch * parts, nan), part_hi(v.batch * parts, nan);
  // uncertainty_kernel: block (b, part), thread t takes voxels begin + t, begin + t + kThreads, ...
  for (int64_t block = 0; block < v.batch * parts; ++block) {
    const int64_t b = block / parts, part = block % parts, base = b * voxels;
    const int64_t end = base + range_part_begin(v, parts, part + 1);
    expect(range_part_begin(v, parts, part + 1) > range_part_begin(v, parts, part), "every range part holds a voxel");
    acc_t lo = std::numeric_limits<acc_t>::infinity(), hi = -lo;
    for (int t = 0; t < kThreads; ++t)
      for (int64_t index = base + range_part_begin(v, parts, part) + t; index < end; index += kThreads) {
        const acc_t value = uncertainty_at<acc_t, acc_t>(p.data(), v, index);
        u[index] = value;
        lo = lower_of(lo, value);
        hi = higher_of(hi, value);
      }
    part_lo[block] = lo;  // min and max are exact and NaN-sticky: any tree gives these
    part_hi[block] = hi;
  }
  std::vector<acc_t> u_range(2 * v.batch, nan);
  for (int64_t b = 0; b < v.batch; ++b)  // range_kernel, thread b
    sample_range_of_parts(part_lo.data(), part_hi.data(), b, parts, u_range.data());
  for (int64_t index = 0; index < total; ++index) u[index] = normalized(u[index], u_range.data(), index / voxels);
  // ncc_partials_kernel + ncc_total_kernel
  const int64_t blocks = ceil_div(total, kThreads);
  std::vector<acc_t> partials(blocks, nan);
  for (int64_t block = 0; block < blocks; ++block) {
    std::vector<acc_t> values(kThreads, acc_t(0));
    for (int t = 0; t < kThreads; ++t) {
      const int64_t index = block * kThreads + t;
      if (index < total) values[t] = ncc_at(u.data(), edge.data(), v, w, index);
    }
    partials[block] = block_sum(values);
  }
  std::vector<acc_t> lanes(kThreads, acc_t(0));
  for (int t = 0; t < kThreads; ++t)
    for (int64_t c = t; c < blocks; c += kThreads) lanes[t] += partials[c];
  const acc_t cc = -(block_sum(lanes) / static_cast<acc_t>(total));

  // backward: U again (the forward's normalised u is what the backward rebuilds), coefficients,
  // gradient
  std::vector<acc_t> u2(total, nan), coefficients(3 * total, nan), grad(v.batch * v.channels * voxels, nan);
  for (int64_t index = 0; index < total; ++index)
    u2[index] = normalized(uncertainty_at<acc_t, acc_t>(p.data(), v, index), u_range.data(), index / voxels);
  const acc_t scale = -grad_cc / static_cast<acc_t>(total);
  for (int64_t index = 0; index < total; ++index) coefficients_at(u2.data(), edge.data(), v, w, scale, index, coefficients.data());
  for (int64_t index = 0; index < total; ++index)
    gradient_at(p.data(), u2.data(), edge.data(), u_range.data(), coefficients.data(), v, w, index, grad.data());
  return {static_cast<double>(cc), std::vector<double>(u_range.begin(), u_range.end()),
          std::vector<double>(grad.begin(), grad.end())};
}

// docs/contract.md §5 directly, in double precision.
Result direct(const std::vector<double>& p, const std::vector<double>& e, const Volume& v, const BoxWindow& w,
              double grad_cc) {
  const int64_t voxels = v.voxels(), total = v.batch * voxels;
  std::vector<double> u(total), u_range(2 * v.batch);
  for (int64_t b = 0; b < v.batch; ++b)
    for (int64_t s = 0; s < voxels; ++s) {
      double value = 0;
      for (int64_t k = 0; k < v.channels; ++k) {
        const double q = p[(b * v.channels + k) * voxels + s];
        value -= q * std::log(q + 1e-16);
      }
      u[b * voxels + s] = value;
    }
  for (int64_t b = 0; b < v.batch; ++b) {
    u_range[2 * b] = *std::min_element(u.begin() + b * voxels, u.begin() + (b + 1) * voxels);
    u_range[2 * b + 1] = *std::max_element(u.begin() + b * voxels, u.begin() + (b + 1) * voxels);
  }
  std::vector<double> un(total);
  for (int64_t i = 0; i < total; ++i) {
    const int64_t b = i / voxels;
    un[i] = (u[i] - u_range[2 * b]) / (u_range[2 * b + 1] - u_range[2 * b] + 1e-6);
  }
  const double n = w.count, eps = 1e-5;
  // box sums of a map over the zero-padded window
  auto box = [&](const std::vector<double>& m) {
    std::vector<double> out(total, 0.0);
    for (int64_t i = 0; i < total; ++i) {
      const VoxelAt a = voxel_at(v, i);
      for (int64_t tz = -w.rz; tz <= w.rz; ++tz)
        for (int64_t ty = -w.r; ty <= w.r; ++ty)
          for (int64_t tx = -w.r; tx <= w.r; ++tx)
            if (v.inside(a.z + tz, a.y + ty, a.x + tx)) out[i] += m[a.b * voxels + v.voxel_index(a.z + tz, a.y + ty, a.x + tx)];
    }
    return out;
  };
  std::vector<double> uu(total), ee(total), ue(total);
  for (int64_t i = 0; i < total; ++i) {
    uu[i] = un[i] * un[i];
    ee[i] = e[i] * e[i];
    ue[i] = un[i] * e[i];
  }
  const auto s_u = box(un), s_e = box(e), s_uu = box(uu), s_ee = box(ee), s_ue = box(ue);
  double sum = 0;
  std::vector<double> d_cross(total), d_var(total), coef_u(total);
  for (int64_t i = 0; i < total; ++i) {
    const double mu_u = s_u[i] / n, mu_e = s_e[i] / n;
    const double cross_raw = s_ue[i] - mu_e * s_u[i] - mu_u * s_e[i] + mu_u * mu_e * n;
    const double var_u_raw = s_uu[i] - 2 * mu_u * s_u[i] + mu_u * mu_u * n;
    const double var_e = std::max(s_ee[i] - 2 * mu_e * s_e[i] + mu_e * mu_e * n, eps);
    const double cross = std::max(cross_raw, eps), var_u = std::max(var_u_raw, eps);
    sum += cross * cross / (var_u * var_e);
    const double g = grad_cc / total;
    d_cross[i] = cross_raw >= eps ? -g * 2 * cross / (var_u * var_e) : 0.0;
    d_var[i] = var_u_raw >= eps ? g * cross * cross / (var_u * var_u * var_e) : 0.0;
    coef_u[i] = -mu_e * d_cross[i] - 2 * mu_u * d_var[i];
  }
  const auto b_coef = box(coef_u), b_var = box(d_var), b_cross = box(d_cross);
  std::vector<double> grad(p.size());
  for (int64_t i = 0; i < total; ++i) {
    const int64_t b = i / voxels, s = i % voxels;
    const double grad_u = (b_coef[i] + 2 * un[i] * b_var[i] + e[i] * b_cross[i]) /
                          (u_range[2 * b + 1] - u_range[2 * b] + 1e-6);
    for (int64_t k = 0; k < v.channels; ++k) {
      const double q = p[(b * v.channels + k) * voxels + s];
      grad[(b * v.channels + k) * voxels + s] = -grad_u * (std::log(q + 1e-16) + q / (q + 1e-16));
    }
  }
  return {-sum / total, u_range, grad};
}

double relative_error(const std::vector<double>& got, const std::vector<double>& want) {
  double diff = 0, scale = 1e-30;
  for (size_t e = 0; e < want.size(); ++e) {
    const double d = std::fabs(got[e] - want[e]);
    if (!(d <= diff)) diff = d;  // NaN propagates
    scale = std::max(scale, std::fabs(want[e]));
  }
  return diff / scale;
}

template <typename acc_t>
double run_case(const char* name, bool is_3d, int64_t b, int64_t k, int64_t d, int64_t h, int64_t wd,
                int64_t window, std::mt19937_64& rng) {
  const Volume v{b, k, d, h, wd};
  BoxWindow w;
  w.r = window / 2;
  w.rz = is_3d ? window / 2 : 0;
  w.count = is_3d ? double(window) * window * window : double(window) * window;
  const int64_t voxels = v.voxels();
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<double> p(b * k * voxels), e(b * voxels);
  for (int64_t bi = 0; bi < b; ++bi)  // softmax over channels
    for (int64_t s = 0; s < voxels; ++s) {
      double z = 0;
      for (int64_t c = 0; c < k; ++c) z += (p[(bi * k + c) * voxels + s] = std::exp(2 * normal(rng)));
      for (int64_t c = 0; c < k; ++c) p[(bi * k + c) * voxels + s] /= z;
    }
  for (auto& x : e) x = uniform(rng);
  std::vector<acc_t> pa(p.begin(), p.end()), ea(e.begin(), e.end());
  std::vector<double> p_rounded(pa.begin(), pa.end()), e_rounded(ea.begin(), ea.end());
  const Result got = emulate<acc_t>(pa, ea, v, w, acc_t(0.5));
  const Result want = direct(p_rounded, e_rounded, v, w, 0.5);
  const double error = std::max({relative_error({got.cc}, {want.cc}), relative_error(got.u_range, want.u_range),
                                 relative_error(got.grad, want.grad)});
  std::printf("%-8s %-36s rel.err %.2e\n", sizeof(acc_t) == 8 ? "float64" : "float32", name, error);
  return error;
}

// docs/contract.md §8: a NaN in one sample's map makes that sample's range NaN (the device's
// min and max keep it, as torch's amin/amax do) and so CC; the other samples keep their range.
template <typename acc_t>
void check_nan_propagates(std::mt19937_64& rng) {
  const Volume v{2, 3, 1, 40, 70};  // several range parts per sample
  BoxWindow w;
  w.r = 2;
  w.rz = 0;
  w.count = 25;
  std::uniform_real_distribution<double> uniform(0.05, 1.0);
  std::vector<acc_t> p(v.batch * v.channels * v.voxels()), e(v.batch * v.voxels());
  for (auto& x : p) x = static_cast<acc_t>(uniform(rng) / 3);
  for (auto& x : e) x = static_cast<acc_t>(uniform(rng));
  const Result clean = emulate<acc_t>(p, e, v, w, acc_t(0.5));
  for (const int64_t at : {int64_t(0), v.voxels() / 2, v.voxels() - 1}) {  // first, middle, last part
    std::vector<acc_t> bad = p;
    bad[1 * v.voxels() + at] = std::numeric_limits<acc_t>::quiet_NaN();  // sample 0, channel 1
    const Result got = emulate<acc_t>(bad, e, v, w, acc_t(0.5));
    const bool ok = std::isnan(got.u_range[0]) && std::isnan(got.u_range[1]) && std::isnan(got.cc) &&
                    got.u_range[2] == clean.u_range[2] && got.u_range[3] == clean.u_range[3];
    std::printf("%-8s NaN at voxel %-24lld range %g %g | %g %g, cc %g\n", sizeof(acc_t) == 8 ? "float64" : "float32",
                static_cast<long long>(at), got.u_range[0], got.u_range[1], got.u_range[2], got.u_range[3], got.cc);
    expect(ok, "a NaN in sample 0 at voxel " + std::to_string(at) + " makes its range and CC NaN, not sample 1's");
  }
}

}  // namespace

int main() {
  std::mt19937_64 rng(99);
  struct Case {
    const char* name;
    bool is_3d;
    int64_t b, k, d, h, w, window;
  };
  const Case cases[] = {
      {"2d K=3 9x11 window 3", false, 2, 3, 1, 9, 11, 3},
      {"2d K=10 37x41 window 5", false, 2, 10, 1, 37, 41, 5},
      {"2d K=4 6x5 window 7 (wider than map)", false, 1, 4, 1, 6, 5, 7},
      {"2d K=3 8x8 window 1", false, 1, 3, 1, 8, 8, 1},
      {"2d K=3 70x65 window 5 (several parts)", false, 2, 3, 1, 70, 65, 5},
      {"2d K=2 1x1 window 5 (one voxel)", false, 2, 2, 1, 1, 1, 5},
      {"3d K=3 5x6x7 window 3", true, 2, 3, 5, 6, 7, 3},
      {"3d K=2 1x9x10 window 3 (one plane)", true, 1, 2, 1, 9, 10, 3},
  };
  for (const Case& c : cases) {
    // float64: a different summation order than the direct loops only
    expect(run_case<double>(c.name, c.is_3d, c.b, c.k, c.d, c.h, c.w, c.window, rng) <= 1e-9, std::string(c.name) + " float64");
    // float32: box sums cancel (S(U^2) - S(U)^2 / n); the GPU tests hold the kernels to twice
    // the reference's own float32 error
    expect(run_case<float>(c.name, c.is_3d, c.b, c.k, c.d, c.h, c.w, c.window, rng) <= 1e-4, std::string(c.name) + " float32");
  }
  check_nan_propagates<double>(rng);
  check_nan_propagates<float>(rng);
  if (failures != 0) {
    std::printf("emulate_boundary: %d FAILED\n", failures);
    return 1;
  }
  std::printf("emulate_boundary: OK\n");
  return 0;
}
