"""Time and profile the Triton joint-count and boundary kernels on a GPU, against the roofline.

    python scripts/triton_profile.py --out OUTDIR            # timings, roofline, kernel table
    python scripts/triton_profile.py --out OUTDIR --sweep    # a sweep of launch settings
    python scripts/triton_profile.py --ncu-target            # each kernel once (for ncu)

For each case (B=16 K=10 256x256 at radius 0, 1, 3; K=40 radius 1; the authors' setting) it
measures, with CUDA events (triton.testing.do_bench, median, inputs rotated over two sets so
the 84 MB of maps are not served from the 60 MB L2):
  - the joint counts forward, backward, forward + backward; for offset 0 also torch.einsum and
    torch.bmm on the same data (the design goal: at least as fast); the forward of the same maps
    in float16 (native tensor-core products), its error held to the low-precision rule;
  - the boundary term forward + backward of one view and its peak extra memory against the
    reference's (autograd through `reference.boundary_cc`);
  - the relative error of each output against a float64 reference on the same inputs (an
    ACCURACY line for a joint-count row above its bound);
  - bytes and FLOP lower bounds, the measured copy bandwidth and matrix rates of this GPU
    (float32, and float16 for the float16 row), and the achieved fraction of the roofline;
  - per-kernel times from torch.profiler.
Writes profile.csv, profile.md, kernels.md (sweep.csv with --sweep) under --out; prints the
markdown table last.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

CASES = [
    # name, B, K, (H, W), radius
    ("B16-K10-256-r0", 16, 10, (256, 256), 0),
    ("B16-K10-256-r1", 16, 10, (256, 256), 1),
    ("B16-K10-256-r3", 16, 10, (256, 256), 3),
    ("B16-K40-256-r1", 16, 40, (256, 256), 1),
    ("authors-B8-K40-224-r0", 8, 40, (224, 224), 0),
]


def offsets_of(radius: int):
    steps = range(-radius, radius + 1)
    return tuple(itertools.product(steps, repeat=2))


def maps(batch, k, size, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, k) + tuple(size)
    p1 = torch.randn(shape, device="cuda", generator=g).softmax(1).to(dtype)
    p2 = torch.randn(shape, device="cuda", generator=g).softmax(1).to(dtype)
    return p1, p2


def bench(fn, inputs, warmup=25, rep=200):
    """Median ms of fn(*inputs[i]) over the repeats, i rotating over the input sets."""
    import triton.testing

    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(inputs)
        fn(*inputs[state["i"]])

    return triton.testing.do_bench(call, warmup=warmup, rep=rep, return_mode="median")


def device_ceilings():
    """Measured copy bandwidth (bytes read + written per s) and FP32 / TF32 / FP16 matrix rates."""
    import triton.testing

    x = torch.empty(2**30 // 4 * 2, device="cuda")  # 2 GiB
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=5, rep=50,
                                      return_mode="median")
    bandwidth = 2 * x.numel() * 4 / (copy_ms * 1e-3)
    del x, y
    a = torch.randn(8192, 8192, device="cuda")
    b = torch.randn(8192, 8192, device="cuda")
    rates = {}
    for name, tf32 in (("fp32", False), ("tf32", True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        ms = triton.testing.do_bench(lambda: a @ b, warmup=5, rep=50, return_mode="median")
        rates[name] = 2 * 8192**3 / (ms * 1e-3)
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = a.half(), b.half()
    ms = triton.testing.do_bench(lambda: a @ b, warmup=5, rep=50, return_mode="median")
    rates["fp16"] = 2 * 8192**3 / (ms * 1e-3)
    return bandwidth, rates


FLOAT32_RTOL = 1e-5  # docs/contract.md §8, relative to the largest magnitude


def relative_error(ours, truth):
    ours, truth = ours.double(), truth.double()
    return ((ours - truth).abs().max() / truth.abs().max().clamp_min(1e-300)).item()


def joint_case(name, batch, k, size, radius, ceilings, rows):
    from bimi_kernels import reference
    from bimi_kernels.offsets import flatten
    from bimi_kernels.triton import joint

    offsets = offsets_of(radius)
    flat = flatten(offsets)
    sets = [maps(batch, k, size, seed=s) for s in range(2)]
    grad_j = torch.randn((len(offsets), k, k), device="cuda")
    n_pixels = batch * size[0] * size[1]
    map_bytes = n_pixels * k * 4
    flops = 2 * len(offsets) * k * k * n_pixels
    bandwidth, rates = ceilings

    def add(op, ms, bytes_, flops_, error=None, provider="triton", error_bound=FLOAT32_RTOL,
            rate="fp32"):
        floor_ms = max(bytes_ / bandwidth, flops_ / rates[rate]) * 1e3
        rows.append({
            "case": name, "op": op, "provider": provider, "median_ms": round(ms, 4),
            "bytes_lower_bound": bytes_, "flops": flops_,
            "achieved_GBps": round(bytes_ / (ms * 1e-3) / 1e9, 1),
            "achieved_TFLOPs": round(flops_ / (ms * 1e-3) / 1e12, 2),
            "roofline_floor_ms": round(floor_ms, 4),
            "roofline_fraction": round(floor_ms / ms, 3),
            "rel_error_vs_fp64": error,
            "error_bound": error_bound,
        })

    forward = lambda p1, p2: joint.joint_counts(p1, p2, flat)  # noqa: E731
    backward = lambda p1, p2: joint.joint_counts_backward(grad_j, p1, p2, flat)  # noqa: E731

    def both(p1, p2):
        joint.joint_counts(p1, p2, flat)
        joint.joint_counts_backward(grad_j, p1, p2, flat)

    p1, p2 = sets[0]
    exact = [t.double() for t in (p1, p2)]
    j_error = relative_error(forward(p1, p2), reference.joint_counts(*exact, offsets))
    g_ref = reference.joint_counts_backward(grad_j.double(), *exact, offsets)
    g_ours = backward(p1, p2)
    g_error = max(relative_error(g_ours[i], g_ref[i]) for i in range(2))
    add("joint fwd", bench(forward, sets), 2 * map_bytes, flops, j_error)
    add("joint bwd", bench(backward, sets), 4 * map_bytes, 2 * flops, g_error)
    add("joint fwd+bwd", bench(both, sets), 6 * map_bytes, 3 * flops)
    # float16 maps (a network under autocast): the forward multiplies them natively on tensor
    # cores, which carry the float32 sum across every tile a program walks (reported to round by
    # truncation: a bias that grows with the tiles, unseen at the tests' small sizes); held to
    # the low-precision rule of docs/contract.md §8 at this size
    half_sets = [tuple(t.half() for t in pair) for pair in sets]
    h1, h2 = half_sets[0]
    truth = reference.joint_counts(h1.double(), h2.double(), offsets)
    own_error = relative_error(reference.joint_counts(h1, h2, offsets), truth)
    add("joint fwd (float16 maps)", bench(forward, half_sets), map_bytes, flops,
        relative_error(forward(h1, h2), truth), error_bound=2 * own_error + FLOAT32_RTOL,
        rate="fp16")
    if radius == 0:
        einsum = lambda p1, p2: torch.einsum("bin,bjn->ij", p1.flatten(2), p2.flatten(2))  # noqa
        bmm = lambda p1, p2: torch.bmm(p1.flatten(2), p2.flatten(2).transpose(1, 2)).sum(0)  # noqa
        add("joint fwd", bench(einsum, sets), 2 * map_bytes, flops, provider="torch.einsum")
        add("joint fwd", bench(bmm, sets), 2 * map_bytes, flops, provider="torch.bmm+sum")
    return sets


def boundary_case(name, batch, k, size, ceilings, rows, sets):
    from bimi_kernels import reference
    from bimi_kernels.triton import boundary

    bandwidth, _ = ceilings
    window = 5
    g = torch.Generator(device="cuda").manual_seed(5)
    image = torch.rand((batch, 1) + tuple(size), device="cuda", generator=g)
    edge = reference.edge_map(image).contiguous()
    grad_cc = torch.tensor(1.0, device="cuda")

    def both(p, _):
        cc, u_range = boundary.boundary_cc(p, edge, window)
        boundary.boundary_cc_backward(grad_cc, p, edge, u_range, window)

    p = sets[0][0]
    cc, u_range = boundary.boundary_cc(p, edge, window)
    grad = boundary.boundary_cc_backward(grad_cc, p, edge, u_range, window)
    x = p.double().requires_grad_(True)
    cc_ref = reference.boundary_cc(x, edge.double(), window)
    (grad_ref,) = torch.autograd.grad(cc_ref, x)
    error = max(relative_error(cc, cc_ref.detach()), relative_error(grad, grad_ref))
    ms = bench(both, sets)
    n_pixels = batch * size[0] * size[1]
    bytes_ = 4 * n_pixels * k * 4 + 8 * n_pixels * 4  # p read 3x, grad written, (B,*S) maps
    floor_ms = bytes_ / bandwidth * 1e3

    # peak extra memory of one view's forward + backward, against the reference's
    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def reference_call():
        q = p.detach().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(reference.boundary_cc(q, edge, window), q)
        return g_ref

    ours = peak(lambda: both(p, None)) - p.numel() * 4  # minus the gradient itself
    theirs = peak(reference_call) - p.numel() * 4
    rows.append({
        "case": name, "op": "boundary fwd+bwd (one view)", "provider": "triton",
        "median_ms": round(ms, 4), "bytes_lower_bound": bytes_, "flops": 0,
        "achieved_GBps": round(bytes_ / (ms * 1e-3) / 1e9, 1), "achieved_TFLOPs": 0,
        "roofline_floor_ms": round(floor_ms, 4), "roofline_fraction": round(floor_ms / ms, 3),
        "rel_error_vs_fp64": error,
        "peak_extra_MiB": round(ours / 2**20, 2), "reference_peak_extra_MiB":
            round(theirs / 2**20, 2), "peak_ratio": round(ours / max(theirs, 1), 3),
    })


def kernel_table(cases, out):
    """Per-kernel CUDA time (torch.profiler) of one forward+backward per case."""
    from torch.profiler import ProfilerActivity, profile

    from bimi_kernels import reference
    from bimi_kernels.offsets import flatten
    from bimi_kernels.triton import boundary, joint

    lines = ["| case | kernel | calls | total us | mean us |", "|---|---|---|---|---|"]
    for name, batch, k, size, radius in cases:
        flat = flatten(offsets_of(radius))
        p1, p2 = maps(batch, k, size)
        grad_j = torch.randn((len(flat) // 2, k, k), device="cuda")
        image = torch.rand((batch, 1) + tuple(size), device="cuda")
        edge = reference.edge_map(image).contiguous()
        one = torch.tensor(1.0, device="cuda")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                joint.joint_counts(p1, p2, flat)
                joint.joint_counts_backward(grad_j, p1, p2, flat)
                cc, u_range = boundary.boundary_cc(p1, edge, 5)
                boundary.boundary_cc_backward(one, p1, edge, u_range, 5)
            torch.cuda.synchronize()
        for event in prof.key_averages():
            total = (getattr(event, "device_time_total", None)
                     or getattr(event, "cuda_time_total", 0))
            if total and event.count:
                lines.append(f"| {name} | {event.key[:60]} | {event.count} | {total:.0f} | "
                             f"{total / event.count:.1f} |")
    with open(os.path.join(out, "kernels.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


def sweep(out):
    """Time the joint kernels under several launch settings (the defaults come from register
    reports only): the data to choose the GPU defaults from."""
    from bimi_kernels.offsets import flatten
    from bimi_kernels.triton import joint

    configs = [joint.JointConfig(r, t, w, s) for r, t, w, s in [
        (16, 64, 4, False), (32, 64, 4, False), (64, 64, 4, False), (32, 128, 4, False),
        (32, 32, 4, False), (64, 32, 4, False), (32, 64, 8, False), (64, 128, 8, False),
        (32, 64, 4, True), (16, 128, 4, False),
    ]]
    results = []
    # the targets first (each setting compiles anew: a sweep cut at its limit keeps those rows)
    for k, radius in ((10, 1), (10, 3), (40, 1), (10, 0)):
        flat = flatten(offsets_of(radius))
        sets = [maps(16, k, (256, 256), seed=s) for s in range(2)]
        grad_j = torch.randn((len(flat) // 2, k, k), device="cuda")
        for config in configs:
            if k > 16 and config.tile_pixels * config.rows > 4096:
                continue
            try:
                fwd = bench(lambda a, b: joint.joint_counts(a, b, flat, config=config), sets,
                            rep=100)
                bwd = bench(lambda a, b: joint.joint_counts_backward(grad_j, a, b, flat,
                                                                     config=config), sets,
                            rep=100)
            except Exception as exc:  # a setting that does not compile or fit: record it
                fwd = bwd = float("nan")
                print(f"sweep K={k} r={radius} {tuple(config)}: {type(exc).__name__}: {exc}")
            results.append({"K": k, "radius": radius, "rows": config.rows,
                            "tile_pixels": config.tile_pixels, "num_warps": config.num_warps,
                            "split_backward": config.split_backward,
                            "fwd_ms": round(fwd, 4), "bwd_ms": round(bwd, 4)})
            print(results[-1], flush=True)
            with open(os.path.join(out, "sweep.csv"), "w", newline="") as handle:  # every row
                writer = csv.DictWriter(handle, fieldnames=list(results[0]))
                writer.writeheader()
                writer.writerows(results)


def ncu_target():
    """Each kernel launched a few times on the target config, for `ncu --launch-count`."""
    from bimi_kernels import reference
    from bimi_kernels.offsets import flatten
    from bimi_kernels.triton import boundary, joint

    for radius in (1, 3):
        p1, p2 = maps(16, 10, (256, 256))
        flat = flatten(offsets_of(radius))
        grad_j = torch.randn((len(flat) // 2, 10, 10), device="cuda")
        joint.joint_counts(p1, p2, flat)
        joint.joint_counts_backward(grad_j, p1, p2, flat)
    edge = reference.edge_map(torch.rand((16, 1, 256, 256), device="cuda")).contiguous()
    cc, u_range = boundary.boundary_cc(p1, edge, 5)
    boundary.boundary_cc_backward(torch.tensor(1.0, device="cuda"), p1, edge, u_range, 5)
    torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_results/profile")
    parser.add_argument("--sweep", action="store_true",
                        help="only the sweep of launch settings (sweep.csv)")
    parser.add_argument("--ncu-target", action="store_true")
    parser.add_argument("--cases", nargs="+", default=[c[0] for c in CASES])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to profile")
        return 2
    if args.ncu_target:
        ncu_target()
        return 0
    os.makedirs(args.out, exist_ok=True)
    if args.sweep:
        sweep(args.out)
        return 0
    start = time.time()
    ceilings = device_ceilings()
    bandwidth, rates = ceilings
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s, "
          f"fp32 mm {rates['fp32'] / 1e12:.1f} TFLOP/s, tf32 mm {rates['tf32'] / 1e12:.1f}, "
          f"fp16 mm {rates['fp16'] / 1e12:.1f}", flush=True)
    rows = []
    cases = [case for case in CASES if case[0] in args.cases]
    for name, batch, k, size, radius in cases:
        sets = joint_case(name, batch, k, size, radius, ceilings, rows)
        if radius == 1 and k == 10:
            boundary_case(name, batch, k, size, ceilings, rows, sets)
        del sets
        write_profile(rows, args.out, ceilings)  # after every case: a time limit keeps what was measured
        print(f"{name} done ({time.time() - start:.0f} s)", flush=True)
    kernel_table([case for case in cases if case[2] == 10], args.out)
    text, too_far = write_profile(rows, args.out, ceilings)
    print(text)
    return 1 if too_far else 0


def write_profile(rows, out, ceilings):
    """profile.csv and profile.md of the rows so far; (the markdown, the rows whose joint counts
    miss the float32 tolerance)."""
    bandwidth, rates = ceilings
    if not rows:
        return "", []
    fields = sorted({key for row in rows for key in row}, key=lambda f: list(rows[0]).index(f)
                    if f in rows[0] else 100)
    with open(os.path.join(out, "profile.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    header = ("| case | op | provider | ms | floor ms | roofline | GB/s | TFLOP/s | err vs fp64 "
              "| peak extra (ratio to reference) |")
    from benchmarks.run import git_commit, triton_version

    lines = [f"device {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA "
             f"{torch.version.cuda}), triton {triton_version()}, commit {git_commit()}, copy "
             f"{bandwidth / 1e12:.2f} TB/s, fp32 mm {rates['fp32'] / 1e12:.1f} TFLOP/s, fp16 mm "
             f"{rates['fp16'] / 1e12:.1f} TFLOP/s (the float16 row's roofline)", "",
             header, "|" + "---|" * 10]
    for row in rows:
        peak = (f"{row['peak_extra_MiB']} MiB ({row['peak_ratio']})"
                if "peak_extra_MiB" in row else "")
        error = row["rel_error_vs_fp64"]
        lines.append(
            f"| {row['case']} | {row['op']} | {row['provider']} | {row['median_ms']} | "
            f"{row['roofline_floor_ms']} | {row['roofline_fraction']:.1%} | "
            f"{row['achieved_GBps']} | {row['achieved_TFLOPs']} | "
            f"{'' if error is None else f'{error:.2e}'} | {peak} |")
    text = "\n".join(lines) + "\n"
    # the joint counts' float32 tolerance of docs/contract.md §8, held at these realistic sizes
    # too: the GPU tests use small maps, where a biased tensor-core accumulation over long sums
    # would not show. (The boundary term's float32 error is bounded by the reference's own, in
    # the conformance tests; its box sums cancel, so no fixed bound applies here.)
    too_far = [row for row in rows if row["provider"] in ("triton", "cuda") and row["op"].startswith("joint")
               and row["rel_error_vs_fp64"] is not None and row["rel_error_vs_fp64"] > row["error_bound"]]
    for row in too_far:
        text += (f"ACCURACY: {row['case']} {row['op']} {row['provider']}: relative error "
                 f"{row['rel_error_vs_fp64']:.2e} > {row['error_bound']:.3g}\n")
    with open(os.path.join(out, "profile.md"), "w") as handle:
        handle.write(text)
    return text, too_far


if __name__ == "__main__":
    sys.exit(main())
