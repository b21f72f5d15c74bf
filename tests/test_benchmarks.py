"""The benchmark harness: its peers compute what the reference computes, and a tiny run writes the
CSV, the markdown summary and the plots with the expected columns. No timing is asserted."""
import csv

import pytest
import torch

from benchmarks import providers, report, run  # noqa: E402
from bimi_kernels import reference  # noqa: E402
from bimi_kernels.offsets import make_offsets  # noqa: E402


def _maps(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    p1 = torch.softmax(torch.randn(shape, generator=generator, dtype=torch.float64), dim=1)
    p2 = torch.softmax(torch.randn(shape, generator=generator, dtype=torch.float64), dim=1)
    return p1, p2


@pytest.mark.parametrize("shape,radius", [((2, 3, 9, 7), 0), ((2, 3, 9, 7), 2), ((1, 4, 5, 6, 4), 1)])
def test_iic_conv2d_joint_counts_match_reference(shape, radius):
    p1, p2 = _maps(shape)
    expected = reference.joint_counts(p1, p2, make_offsets(radius, len(shape) - 2))
    torch.testing.assert_close(providers.iic_conv2d_joint_counts(p1, p2, radius), expected)


@pytest.mark.parametrize("radius", [0, 1, 3])
def test_unfold_joint_counts_match_reference(radius):
    p1, p2 = _maps((2, 3, 9, 8))
    expected = reference.joint_counts(p1, p2, make_offsets(radius, 2))
    torch.testing.assert_close(providers.unfold_joint_counts(p1, p2, radius), expected)


def test_gemm_joint_counts_match_reference():
    p1, p2 = _maps((3, 5, 6, 7))
    expected = reference.joint_counts(p1, p2, make_offsets(0, 2))
    torch.testing.assert_close(providers.gemm_joint_counts(p1, p2), expected)


@pytest.mark.parametrize("shape,window", [((2, 4, 12, 10), 5), ((1, 3, 6, 7, 5), 3)])
def test_voxelmorph_boundary_matches_reference(shape, window):
    p1, p2 = _maps(shape)
    image = torch.rand((shape[0], 1) + shape[2:], generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    expected = reference.boundary_cc_loss(p1, p2, image, window)
    torch.testing.assert_close(providers.voxelmorph_boundary_loss(p1, p2, image, window), expected)


def test_smoke_run_writes_csv_markdown_and_plots(tmp_path):
    out = tmp_path / "bench"
    code = run.main(["--suite", "smoke", "--threads", "1", "--out", str(out),
                     "--group", "size", "target", "--op", "joint_counts", "boundary",
                     "--mode", "forward+backward",
                     "--providers", "reference", "iic-conv2d", "gemm", "voxelmorph-cc", "cpp"])
    assert code == 0
    with open(out / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == run.COLUMNS
        rows = list(reader)
    assert {r["op"] for r in rows} == {"joint_counts", "boundary"}
    assert {r["provider"] for r in rows} >= {"reference", "iic-conv2d", "gemm", "voxelmorph-cc"}
    measured = [r for r in rows if not r["skipped_reason"]]
    assert measured, "nothing was measured"
    for r in measured:
        assert float(r["time_p20_s"]) <= float(r["time_median_s"]) <= float(r["time_p80_s"])
        assert int(r["repeats"]) >= 1
        assert r["peak_extra_bytes"] != "", f"memory not measured: {r['note']}"
        assert r["device_name"] and r["torch_version"] and r["git_commit"] and r["timestamp"]
    # a peer checked against the reference of the same run, and the ratios filled in
    conv = [r for r in measured if r["provider"] == "iic-conv2d"]
    assert conv and float(conv[0]["check_max_rel_diff"]) < 1e-4
    assert float(conv[0]["speedup_vs_iic_conv2d"]) == 1.0
    # gemm only has the zero offset: skipped with a reason at radius 1
    gemm_r1 = [r for r in rows if r["provider"] == "gemm" and r["radius"] == "1"]
    assert gemm_r1 and all("zero-offset" in r["skipped_reason"] for r in gemm_r1)
    summary = (out / "summary.md").read_text()
    assert "| config | op | mode | provider | median ms |" in summary
    assert "## Headline" in summary and "## Issue targets" in summary
    assert "AMD" in summary or rows[0]["device_name"] in summary
    assert (out / "plots" / "sweep_size.png").stat().st_size > 0
    assert (out / "plots" / "targets.png").stat().st_size > 0
    # the report can be rebuilt from the CSV alone
    assert report.main([str(out)]) == 0
