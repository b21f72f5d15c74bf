"""The three builds of the C++ CPU inner loops (csrc/cpu/kernels.h, csrc/cpu/simd/): AVX-512F+VL
on 32-byte vectors and AVX2+FMA, picked at run time in that order where the processor has them,
and the baseline x86-64 build (`BIMI_CPU_ISA=generic`, `=avx2`, `=avx512` ask for one).

All add the same terms in the same order (32-byte vectors on every ISA). The AVX-512 build is the
AVX2 build's code with 32 vector registers (larger register blocks in the joint counts' forward,
which do not change what each accumulator adds, nor its order): the two agree bit for bit. The
AVX2 build fuses each multiply and add into one FMA (one rounding where the baseline rounds
twice). So it and the baseline are not bitwise equal in general, and these tests state what holds
instead:

- accumulation in float64: every output within 1e-14 of the other build, relative to its
  largest magnitude, except the boundary term's gradient, within 1e-13 (its windows' variances
  S(U^2) - S(U)^2 / n cancel, which magnifies one rounding);
- accumulation in float32: within 2e-6, the boundary term's gradient within 5e-5;
- float16/bfloat16 outputs (the gradients): within one unit in the last place of the output
  dtype at the largest magnitude (a float32 difference can move a rounding to the half dtype);
- bit for bit: the joint counts forward of float16/bfloat16 maps without a mask or with a 0/1
  mask, whose products are exact in float32 (8 + 8 or 11 + 11 significant bits), so fusing
  changes nothing.

Each build's agreement with the reference is checked in tests/test_cpp.py.
"""

import pytest
import torch

from helpers import random_image, random_mask, random_maps

import bimi_kernels._C  # noqa: F401  (registers torch.ops.bimi_C)
from bimi_kernels import reference
from bimi_kernels.offsets import flatten, make_offsets

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ops = torch.ops.bimi_C


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


HAS_AVX2 = {"avx2", "fma"} <= _cpu_flags()
HAS_AVX512 = HAS_AVX2 and {"avx512f", "avx512vl"} <= _cpu_flags()
BEST_BUILD = "avx512" if HAS_AVX512 else "avx2" if HAS_AVX2 else "generic"

pytestmark = pytest.mark.skipif(not HAS_AVX2, reason="the processor lacks AVX2 or FMA: only the baseline build runs")
needs_avx512 = pytest.mark.skipif(not HAS_AVX512, reason="the processor lacks AVX-512F or AVX-512VL")


def tolerance(dtype, output_dtype, what):
    """The largest difference between the builds allowed for an output, relative to its largest
    magnitude."""
    if output_dtype in (F16, BF16):
        return torch.finfo(output_dtype).eps
    if dtype == F64:
        return 1e-13 if what == "boundary gradient" else 1e-14
    return 5e-5 if what == "boundary gradient" else 2e-6


def builds(monkeypatch, compute, *names):
    """compute() with each named build of the loops."""
    results = []
    for name in names:
        monkeypatch.setenv("BIMI_CPU_ISA", name)
        results.append(compute())
    monkeypatch.delenv("BIMI_CPU_ISA")
    return results


def both_builds(monkeypatch, compute):
    """compute() with the AVX2 loops and with the baseline loops; with the AVX-512 loops too where
    the processor has them, which must equal the AVX2 ones bit for bit."""
    if not HAS_AVX512:
        return builds(monkeypatch, compute, "avx2", "generic")
    fast, baseline, wide = builds(monkeypatch, compute, "avx2", "generic", "avx512")
    for a, b in zip(fast, wide):
        assert a.dtype == b.dtype and torch.equal(a, b), "the AVX-512 and AVX2 builds must agree bit for bit"
    return fast, baseline


def assert_builds_agree(fast, baseline, dtype, names):
    for a, b, what in zip(fast, baseline, names):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = a.double().abs().max().clamp_min(1e-300)
        error = ((a.double() - b.double()).abs().max() / scale).item()
        bound = tolerance(dtype, a.dtype, what)
        assert error <= bound, f"{what}: AVX2 and baseline builds differ by {error:.3g} > {bound:.3g}"


JOINT_CASES = [
    # shape, offsets, masked (K = 10, 17, 3: whole and partial register blocks of every build)
    ((2, 10, 20, 37), 3, True),
    ((2, 10, 20, 32), 1, False),  # rows of whole vectors: p1 read and the gradient written in place
    ((1, 17, 19, 23), [(0, 0), (5, -3), (-18, 22)], False),
    ((2, 3, 5, 6, 7), 1, True),
    ((1, 40, 9, 16), [(0, 0)], False),  # the authors' setting: offset 0, K = 40
]
DTYPES = [F64, F32, BF16, F16]


def joint_inputs(shape, offsets, masked, dtype, seed=0):
    p1, p2 = random_maps(shape, seed=seed)
    mask = random_mask(shape, seed=seed + 2, keep=0.7)[:, 0].to(dtype).contiguous() if masked else None
    flat = list(flatten(make_offsets(offsets, len(shape) - 2)))
    acc = F64 if dtype == F64 else F32
    grad_j = torch.randn((len(flat) // (len(shape) - 2), shape[1], shape[1]),
                         generator=torch.Generator().manual_seed(seed + 3), dtype=F64).to(acc)
    return p1.to(dtype), p2.to(dtype), flat, mask, grad_j


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,offsets,masked", JOINT_CASES)
def test_joint_counts_builds_agree(monkeypatch, shape, offsets, masked, dtype):
    p1, p2, flat, mask, grad_j = joint_inputs(shape, offsets, masked, dtype)

    def compute():
        counts = ops.joint_counts(p1, p2, flat, mask)
        return (counts, *ops.joint_counts_backward(grad_j, p1, p2, flat, mask))

    fast, baseline = both_builds(monkeypatch, compute)
    assert_builds_agree(fast, baseline, dtype, ("joint counts", "dL/dp1", "dL/dp2"))
    if dtype in (F16, BF16):
        assert torch.equal(fast[0], baseline[0]), "half-precision products are exact in float32"


BOUNDARY_CASES = [((2, 10, 37, 41), 5), ((2, 3, 70, 65), 5), ((1, 4, 6, 5), 7), ((1, 2, 9, 30, 20), 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,window", BOUNDARY_CASES)
def test_boundary_builds_agree(monkeypatch, shape, window, dtype):
    p, _ = random_maps(shape, seed=4)
    p = p.to(dtype)
    acc = F64 if dtype == F64 else F32
    edge = reference.edge_map(random_image(shape, channels=2, seed=1)).to(acc)

    def compute():
        cc, u_range = ops.boundary_cc(p, edge, window)
        grad = ops.boundary_cc_backward(torch.tensor(0.5, dtype=acc), p, edge, u_range, window)
        return cc, u_range, grad

    fast, baseline = both_builds(monkeypatch, compute)
    assert_builds_agree(fast, baseline, dtype, ("CC", "U range", "boundary gradient"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,gamma", [((4, 1, 32, 40), 0.75), ((2, 3, 9, 17), 0.75), ((2, 2, 5, 9, 11), 1.5)])
def test_edge_map_builds_agree(monkeypatch, shape, gamma, dtype):
    image = random_image(shape, channels=shape[1], seed=3).to(dtype)
    fast, baseline = both_builds(monkeypatch, lambda: (ops.edge_map(image, gamma),))
    assert_builds_agree(fast, baseline, dtype, ("edge map",))


def test_the_generic_request_selects_the_baseline_build(monkeypatch):
    """BIMI_CPU_ISA=generic does switch the loops (else the tests above compare a build with
    itself): some float32 output differs between the builds."""
    p1, p2, flat, mask, grad_j = joint_inputs(*JOINT_CASES[0], F32)
    fast, baseline = both_builds(monkeypatch, lambda: (ops.joint_counts(p1, p2, flat, mask),))
    assert not torch.equal(fast[0], baseline[0])


@needs_avx512
def test_the_avx512_request_selects_its_build(monkeypatch):
    """BIMI_CPU_ISA=avx512 and =avx2 do switch the loops (else the bitwise comparison above would
    compare a build with itself). Their results are equal by design, so the switch is seen in the
    name the dispatched table of loops carries (set where each build is compiled)."""
    from bimi_kernels.native import cpu_isa

    for name in ("avx512", "avx2", "generic"):
        monkeypatch.setenv("BIMI_CPU_ISA", name)
        assert cpu_isa() == name


@pytest.mark.skipif(HAS_AVX512, reason="this processor runs the AVX-512 build")
def test_a_build_the_processor_cannot_run_is_refused(monkeypatch):
    """BIMI_CPU_ISA=avx512 on a processor without AVX-512F/VL: a clear error from every op and from
    cpu_isa(), not an illegal instruction or a silent fallback."""
    from bimi_kernels.native import cpu_isa

    p1, p2, flat, mask, _ = joint_inputs(*JOINT_CASES[0], F32)
    monkeypatch.setenv("BIMI_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match="BIMI_CPU_ISA=avx512: this processor .*cannot run that build"):
        ops.joint_counts(p1, p2, flat, mask)
    with pytest.raises(ValueError, match="cannot run that build"):
        cpu_isa()


def test_the_build_in_use_is_named(monkeypatch):
    """native.cpu_isa() (shown by `bimi info`, recorded by the benchmarks) names the build that
    runs: the one asked for, else the best this processor runs."""
    from bimi_kernels.native import cpu_isa

    monkeypatch.delenv("BIMI_CPU_ISA", raising=False)
    assert cpu_isa() == BEST_BUILD
    monkeypatch.setenv("BIMI_CPU_ISA", "generic")
    assert cpu_isa() == "generic"
    monkeypatch.setenv("BIMI_CPU_ISA", "avx2")
    assert cpu_isa() == "avx2"


def test_an_unknown_isa_request_is_an_error(monkeypatch):
    """A typo (BIMI_CPU_ISA=avx521, =genric) must not measure the default build in silence; the
    names are accepted in any case, and an empty value means unset."""
    from bimi_kernels.native import cpu_isa

    p1, p2, flat, mask, _ = joint_inputs(*JOINT_CASES[0], F32)
    for value in ("avx521", "genric"):
        monkeypatch.setenv("BIMI_CPU_ISA", value)
        with pytest.raises(ValueError, match=f"BIMI_CPU_ISA: expected 'generic' .*got '{value}'"):
            ops.joint_counts(p1, p2, flat, mask)
        with pytest.raises(ValueError, match="BIMI_CPU_ISA"):
            cpu_isa()
    monkeypatch.setenv("BIMI_CPU_ISA", "GENERIC")
    assert cpu_isa() == "generic"
    monkeypatch.setenv("BIMI_CPU_ISA", "AVX2")
    assert cpu_isa() == "avx2"
    monkeypatch.setenv("BIMI_CPU_ISA", "")
    assert cpu_isa() == BEST_BUILD
