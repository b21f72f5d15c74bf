"""The benchmark harness: its peers compute what the reference computes, the row schema round-trips
through its CSV, repeats stay interleaved to the end, CPU runs default to one thread, the roofline
arithmetic matches a hand count, the report renders the derived columns and targets, and a tiny
run writes the CSV, the markdown summary and the plots. No timing is asserted."""
import csv
import os

import pytest
import torch

from benchmarks import configs, measure, providers, report, roofline, run, schema, workloads
from benchmarks.configs import BenchConfig, TimingPolicy
from bimi_kernels import reference
from bimi_kernels.offsets import make_offsets


def _maps(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    p1 = torch.softmax(torch.randn(shape, generator=generator, dtype=torch.float64), dim=1)
    p2 = torch.softmax(torch.randn(shape, generator=generator, dtype=torch.float64), dim=1)
    return p1, p2


# ------------------------------------------------------------------------------------------------
# the peers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,radius", [((2, 3, 9, 7), 0), ((2, 3, 9, 7), 2), ((1, 4, 5, 6, 4), 1)])
def test_iic_conv2d_joint_counts_match_reference(shape, radius):
    p1, p2 = _maps(shape)
    expected = reference.joint_counts(p1, p2, make_offsets(radius, len(shape) - 2))
    torch.testing.assert_close(providers.iic_conv2d_joint_counts(p1, p2, radius), expected)


@pytest.mark.parametrize("radius,dilation", [(0, 1), (1, 1), (3, 1), (1, 3)])
def test_unfold_joint_counts_match_reference(radius, dilation):
    p1, p2 = _maps((2, 3, 11, 9))
    expected = reference.joint_counts(p1, p2, make_offsets(radius, 2, dilation))
    torch.testing.assert_close(providers.unfold_joint_counts(p1, p2, radius, dilation), expected)


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


def test_heads_run_once_per_head_and_combine():
    """A 3-head config: the counts of each head concatenated, the losses averaged."""
    config = BenchConfig("authors", 2, 4, (6, 5), 1, heads=3)
    inputs = workloads.make_inputs(config, "cpu")
    autograd = providers.PROVIDERS["reference-autograd"]
    heads = inputs.heads(requires_grad=False)
    counts = workloads.op_function(autograd, "joint_counts", inputs, *heads)()
    offsets = make_offsets(1, 2)
    expected = torch.cat([reference.joint_counts(a, b, offsets)
                          for a, b in zip(inputs.p1.chunk(3), inputs.p2.chunk(3))])
    torch.testing.assert_close(counts, expected)
    loss = workloads.op_function(autograd, "mi", inputs, *heads)()
    expected = torch.stack([reference.regularized_mi(a, b, offsets)
                            for a, b in zip(inputs.p1.chunk(3), inputs.p2.chunk(3))]).mean()
    torch.testing.assert_close(loss, expected)
    # backward: one gradient per head and map, each its own tensor
    grads = workloads.mode_callable(autograd, "mi", "forward+backward", inputs)()
    assert len(grads) == 6 and all(g.shape == (2, 4, 6, 5) for g in grads)


def test_every_provider_entry_is_consistent():
    for name, provider in providers.PROVIDERS.items():
        assert provider.name == name and provider.ops
        assert set(provider.ops) <= set(workloads.OPS), name
    for suite, devices in configs.SUITES.items():
        for device in devices:
            # a name stands for one shape: rows of the same (name, op, mode) are compared
            keys = [(c.name, op, mode) for c in configs.configs_for(suite, device)
                    for op in c.ops for mode in c.modes]
            assert len(set(keys)) == len(keys), f"{suite} {device}: (config, op, mode) repeated"
            for config in configs.configs_for(suite, device):
                assert set(config.ops) <= set(workloads.OPS), config
                assert set(config.providers or ()) <= set(providers.PROVIDERS), config
                roofline.offset_set(config)  # the offsets are valid
                assert BenchConfig.from_dict(config.to_dict()) == config


def test_providers_say_why_they_cannot_run_a_config():
    why = {name: p.why_not("joint_counts", c) for name, p in providers.PROVIDERS.items()
           for c in [BenchConfig("sparse", 1, 3, (40, 12), ((0, 0), (30, 0)))]}
    assert "full window" in why["iic-conv2d"] and "explicit offset list" in why["unfold"]
    assert "zero-offset" in why["gemm"] and why["cpp"] is None and why["reference-autograd"] is None
    volume = BenchConfig("volume", 1, 3, (6, 6, 6), 0)
    assert "2-D" in providers.PROVIDERS["unfold"].why_not("joint_counts", volume)
    assert "2-D" in providers.PROVIDERS["unet-only"].why_not("train_step", volume)
    assert providers.PROVIDERS["gemm"].why_not("joint_counts", volume) is None


def test_sparse_dilated_offsets_are_benchmarked():
    for suite in ("full", "quick"):
        for device in ("cpu", "cuda"):
            sparse = [c for c in configs.configs_for(suite, device) if c.group == "sparse"]
            sets = {c.offsets_text for c in sparse}
            assert {"(0,0);(1000,0)", "(-1000,0);(1000,0)", "r1d8"} <= sets
            assert all(c.batch == 1 and c.clusters == 10 and c.spatial == (1024, 512) for c in sparse)


def test_authors_setting_and_training_step_configs():
    for device in ("cpu", "cuda"):
        for suite in ("full", "quick"):
            groups = {c.group: c for c in configs.configs_for(suite, device)}
            authors, training = groups["authors"], groups["training"]
            for c in (authors, training):
                assert (c.offsets, c.clusters, c.window, c.heads) == (0, 40, 5, 3)
            assert training.ops == ("bimi", "train_step") and training.unet == (32, 4)
            if device == "cuda":
                assert (authors.batch, authors.spatial) == (8, (224, 224)) == (training.batch, training.spatial)


# ------------------------------------------------------------------------------------------------
# the schema
# ------------------------------------------------------------------------------------------------
def _row(provider="cpp", op="joint_counts", mode="forward+backward", config=None, device="cpu",
         device_name="test CPU", **measured):
    config = config or BenchConfig("target", 4, 10, (128, 128), 1, label="CPU target")
    info = schema.RunInfo("abc", device, device_name, "2.x", "3.x", 1, "quick", "cmd", "", "")
    row = schema.new_row(info, "2026-01-01T00:00:00+00:00", config, providers.PROVIDERS[provider], op,
                         mode, len(roofline.offset_set(config)))
    for key, value in measured.items():
        setattr(row, key, value)
    return row


def test_row_csv_round_trip(tmp_path):
    sparse = BenchConfig("sparse", 1, 10, (1024, 512), ((0, 0), (1000, 0)))
    rows = [_row(time_median_s=0.0123456789, time_p20_s=0.01, time_p80_s=0.02, repeats=7,
                 load_avg_1m_start=1.5, peak_extra_bytes=4096, note="a, b"),
            _row("reference", config=sparse, skipped_reason="too slow: x | y")]
    schema.write_csv(rows, tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as handle:
        assert tuple(next(csv.reader(handle))) == schema.COLUMNS
    back = schema.read_csv(tmp_path / "r.csv")
    assert back[0].time_median_s == pytest.approx(0.0123457) and isinstance(back[0].repeats, int)
    assert back[0].note == "a, b" and back[0].load_avg_1m_end is None and back[0].measured
    assert back[1].offsets == "(0,0);(1000,0)" and not back[1].measured and back[1].radius is None
    assert back[1].bench_config().offsets == ((0, 0), (1000, 0))
    for text in ("r0", "r3", "r1d8", "(-1000,0);(1000,0)", "(1,2,3)"):
        offsets, dilation = schema.parse_offsets(text)
        assert BenchConfig("g", 1, 1, (9,) * (3 if text == "(1,2,3)" else 2), offsets,
                           dilation).offsets_text == text
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a results CSV"):
        schema.read_csv(tmp_path / "other.csv")


# ------------------------------------------------------------------------------------------------
# interleaving
# ------------------------------------------------------------------------------------------------
class FakeClock:
    """A timer that calls the function and charges a fixed duration per provider, logging the
    order of the calls."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, fn):
        name = fn()
        self.calls.append(name)
        return self.seconds[name]


def _no_solo_repeats(calls):
    return all(a != b for a, b in zip(calls, calls[1:]))


def test_repeats_stay_interleaved_when_the_slower_provider_hits_its_cap():
    policy = TimingPolicy(1, 5, 30, 0.5, 3.0, 8.0)
    clock = FakeClock({"slow": 1.0, "fast": 0.01})
    samples = measure.time_interleaved({"slow": lambda: "slow", "fast": lambda: "fast"}, clock, policy)
    # the slow one reaches max_seconds after 3 rounds: the fast one stops with it, never alone
    assert clock.calls == ["slow", "fast"] * 3
    assert len(samples["slow"]) == len(samples["fast"]) == 3


def test_repeats_continue_while_two_providers_need_more():
    policy = TimingPolicy(1, 3, 30, 0.5, 3.0, 8.0)
    clock = FakeClock({"slow": 1.0, "a": 0.125, "b": 0.0625})
    samples = measure.time_interleaved({"slow": lambda: "slow", "a": lambda: "a", "b": lambda: "b"},
                                       clock, policy)
    # slow leaves after 3 rounds (3 s); a has 0.5 s after 4 rounds and leaves; b would be alone
    assert clock.calls == ["slow", "a", "b"] * 3 + ["a", "b"]
    assert [len(samples[n]) for n in ("slow", "a", "b")] == [3, 4, 4]
    assert _no_solo_repeats(clock.calls)
    clock = FakeClock({"a": 0.001})
    measure.time_interleaved({"a": lambda: "a"}, clock, policy)
    assert len(clock.calls) == 30  # alone from the start: max_repeats


def test_measure_group_interleaves_fake_providers_to_the_end(monkeypatch):
    """Through the harness: two registered fake providers, each call logged in order."""
    log = []
    fake = {name: providers.Provider(name, "peer", name, ("joint_counts",),
                                     lambda op, maps, name=name: log.append(name) or maps.p1.sum(), copies=1)
            for name in ("reference", "fast")}
    monkeypatch.setattr(run, "PROVIDERS", fake)
    config = BenchConfig("target", 1, 2, (4, 4), 0)
    inputs = workloads.make_inputs(config, "cpu")
    rows = {name: _row("reference", config=config) for name in fake}
    seconds = {"reference": 1.0, "fast": 0.01}

    def timer(fn):
        fn()
        return seconds[log[-1]]

    policy = TimingPolicy(1, 5, 30, 0.5, 3.0, 8.0)
    run.measure_group(rows, config, inputs, "joint_counts", "forward", "cpu", policy, 1,
                      run.CostModel(), None, timer)
    timed = log[2:]  # after one warm-up call of each
    assert log[:2] == ["reference", "fast"] and timed == ["reference", "fast"] * 3
    assert rows["fast"].repeats == rows["reference"].repeats == 3
    assert rows["fast"].load_avg_1m_start is not None and rows["fast"].check_max_rel_diff == 0.0


# ------------------------------------------------------------------------------------------------
# threads
# ------------------------------------------------------------------------------------------------
def test_cpu_runs_default_to_one_thread():
    assert run.resolve_threads(None, "cpu") == 1
    assert run.resolve_threads("3", "cpu") == 3
    assert run.resolve_threads("all", "cpu") == (os.cpu_count() or 1)
    assert run.parse_args(["--quick"]).threads is None
    with pytest.raises(SystemExit):
        run.parse_args(["--threads", "0"])


def test_bad_selections_are_usage_errors_before_anything_runs():
    for argv in (["--group", "tagret"], ["--max-call-seconds", "-1"], ["--max-call-seconds", "nan"]):
        with pytest.raises(SystemExit):
            run.parse_args(argv)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BIMI_CPU_ISA", "avx9")
        with pytest.raises(SystemExit):
            run.parse_args([])
    assert set(run.parse_args(["--group"] + list(configs.GROUPS)).group) == set(configs.GROUPS)
    # every config's group is one of GROUPS (the --group choices)
    assert {c.group for s in ("full", "quick", "smoke") for c in configs.configs_for(s, "cpu")} <= set(configs.GROUPS)
    # a valid group that the suite lacks: an error, not an empty report over the committed one
    with pytest.raises(SystemExit, match="has no config in the groups clusters"):
        run.run(run.parse_args(["--suite", "quick", "--group", "clusters", "--no-memory"]))


def test_a_limited_run_never_writes_over_a_whole_suites_results():
    assert run.default_out("cpu", "full") == run.RESULTS_DIR / "cpu"
    assert run.default_out("cpu", "quick") == run.RESULTS_DIR / "cpu-quick"
    assert run.default_out("cpu", "full", filtered=True) == run.RESULTS_DIR / "cpu-partial"
    assert run.default_out("cpu", "smoke", filtered=True) == run.RESULTS_DIR / "cpu-smoke-partial"


# ------------------------------------------------------------------------------------------------
# the roofline
# ------------------------------------------------------------------------------------------------
def _bounds(op, config, mode):
    return workloads.OP_SPECS[op].bounds(config, mode)


def test_roofline_arithmetic_by_hand():
    config = BenchConfig("sparse", 2, 3, (4, 5), ((0, 0), (1, -2)))
    # pairs: offset (0,0) 4*5 = 20, offset (1,-2) (4-1)*(5-2) = 9; two samples
    assert roofline.valid_pairs(config) == 2 * (20 + 9)
    # forward+backward: read p1, p2 twice, write two gradients: 6 maps of 2*3*20*4 B = 480 B;
    # the counts (2 offsets x 3 x 3 x 4 B = 72 B) written forward and their gradient read backward
    nbytes, flops = _bounds("joint_counts", config, "forward+backward")
    assert nbytes == 6 * 480 + 2 * 72
    assert flops == 3 * 2 * 9 * 58  # 2 K^2 per pair forward, 4 K^2 backward
    assert _bounds("joint_counts", config, "forward") == (2 * 480 + 72, 2 * 9 * 58)
    # boundary forward: both maps, the image (2*20*4 B); per pixel and map 3K + 10n + 20 = 49 ops
    assert _bounds("boundary", config, "forward") == (2 * 480 + 160, 2 * 40 * 49)
    bimi = _bounds("bimi", config, "forward")
    assert bimi == (2 * 480 + 72 + 160, 2 * 9 * 58 + 2 * 40 * 49)  # the maps read once for both
    assert workloads.OP_SPECS["train_step"].bounds is None
    h200 = roofline.device_peaks("cuda", "NVIDIA H200")
    line = roofline.roofline(_bounds("joint_counts", config, "forward+backward"), config, 1e-6, h200)
    assert line.bound_s == pytest.approx(max(3024 / 4.3e12, 3132 / 67e12))
    assert line.fraction == pytest.approx(line.bound_s / 1e-6)
    assert line.bound_tensor_s == pytest.approx(max(3024 / 4.3e12, 3132 / 494.7e12))
    assert roofline.roofline(_bounds("joint_counts", config, "forward"), config, 1.0, None).fraction is None
    assert roofline.device_peaks("cpu", "NVIDIA H200") is None
    assert roofline.device_peaks("cuda", "NVIDIA H100 PCIe").bandwidth == 2.0e12


def test_roofline_of_the_gpu_target_config_by_hand():
    """B=16 K=10 256x256 r=1 fwd+bwd: ~250 MB of traffic and ~5.7 GFLOP."""
    config = configs.target("cuda", 1)
    nbytes, flops = _bounds("joint_counts", config, "forward+backward")
    assert nbytes == 6 * 16 * 10 * 256 * 256 * 4 + 2 * 9 * 100 * 4
    # valid pairs of the 3x3 window: (256 + 2 * 255)^2 per sample (the border loses partners)
    assert flops == 6 * 100 * 16 * (256 + 2 * 255) ** 2
    assert nbytes == pytest.approx(250e6, rel=0.01) and flops == pytest.approx(5.7e9, rel=0.02)


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
def _gpu_rows():
    gpu_target = configs.target("cuda", 1)
    training = configs.training(8, 224, "training step")
    kw = dict(device="cuda", device_name="NVIDIA H200", load_avg_1m_start=0.5, load_avg_1m_end=0.7,
              repeats=10, time_p20_s=1e-3, time_p80_s=1e-3)
    return [
        _row("reference", config=gpu_target, time_median_s=5.6e-3, peak_extra_bytes=100 * 2**20, **kw),
        _row("unfold", config=gpu_target, time_median_s=3.5e-3, **kw),
        _row("iic-conv2d", config=gpu_target, time_median_s=158e-3, **kw),
        _row("triton", config=gpu_target, time_median_s=2.8e-4, peak_extra_bytes=10 * 2**20,
             grad_bytes=8 * 2**20, peak_extra_minus_grads_bytes=2 * 2**20, **kw),
        _row("cuda", config=gpu_target, time_median_s=5.0e-4, **kw),
        _row("reference", "bimi", config=training, time_median_s=20e-3, **kw),
        _row("reference", "train_step", config=training, time_median_s=100e-3, **kw),
        _row("triton", "bimi", config=training, time_median_s=2e-3, **kw),
        _row("triton", "train_step", config=training, time_median_s=80e-3, **kw),
    ]


def test_report_derives_ratios_roofline_and_share():
    rows = _gpu_rows()
    report.add_derived(rows)
    triton = rows[3]
    assert triton.speedup_vs_reference == pytest.approx(20.0)
    assert triton.speedup_vs_unfold == pytest.approx(12.5)
    assert triton.speedup_vs_iic_conv2d == pytest.approx(158e-3 / 2.8e-4)
    assert triton.memory_ratio_vs_reference == pytest.approx(0.1)
    nbytes, flops = _bounds("joint_counts", configs.target("cuda", 1), "forward+backward")
    assert (triton.min_bytes, triton.min_flops) == (nbytes, flops)
    assert triton.roofline_fraction == pytest.approx(max(nbytes / 4.3e12, flops / 67e12) / 2.8e-4)
    assert triton.achieved_bytes_per_s == pytest.approx(nbytes / 2.8e-4)
    assert rows[7].share_of_train_step == pytest.approx(0.025)
    assert rows[5].share_of_train_step == pytest.approx(0.2)
    assert rows[8].share_of_train_step is None  # only the loss row carries it


def test_report_renders_targets_tables_and_load(tmp_path):
    rows = _gpu_rows()
    report.add_derived(rows)
    report.write_markdown(rows, tmp_path / "summary.md")
    text = (tmp_path / "summary.md").read_text()
    assert "## Headline" in text and "## Targets" in text and "## The loss's share" in text
    assert "## Roofline" in text and "% FP32" in text and "H200" in text
    lines = {line.split(" | ")[0].lstrip("| ") + " " + line.split(" | ")[1]: line
             for line in text.splitlines() if line.startswith("| joint_counts") or line.startswith("| training")}
    assert "| 0.28 ms | <= 0.3 ms | yes | 0.50–0.70 |" in lines["joint_counts fwd+bwd r=1: median time triton"]
    assert "| 0.5 ms | <= 0.3 ms | no |" in lines["joint_counts fwd+bwd r=1: median time cuda"]
    assert "| 1.79x | <= 2x | yes |" in lines["joint_counts fwd+bwd r=1: time / Triton's cuda"]
    share = [line for line in text.splitlines() if "whole loss" in line]
    assert len(share) == 1 and "| triton | 2.5% | < 5% | yes |" in share[0]
    # the training table: loss, step, share per provider
    assert "| **triton** | 2 | 80 | 2.5% | 1.25x | 0.50–0.70 |" in text


def test_report_rerenders_a_results_folder(tmp_path):
    sweep = [_row("triton", config=BenchConfig("size", 16, 10, (s, s), 1), device="cuda",
                  device_name="NVIDIA H200", time_median_s=s * 1e-5, time_p20_s=s * 1e-5,
                  time_p80_s=s * 1e-5, peak_extra_bytes=s) for s in (64, 128)]
    rows = _gpu_rows() + sweep
    schema.write_csv(rows, tmp_path / "results.csv")
    assert report.main([str(tmp_path)]) == 0
    back = schema.read_csv(tmp_path / "results.csv")
    assert [r.time_median_s for r in back] == pytest.approx([r.time_median_s for r in rows])
    assert back[3].speedup_vs_reference == pytest.approx(20.0)
    assert (tmp_path / "summary.md").exists() and (tmp_path / "plots" / "targets.png").exists()
    assert (tmp_path / "plots" / "sweep_size.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------
# a tiny run, end to end
# ------------------------------------------------------------------------------------------------
def test_smoke_run_writes_csv_markdown_and_plots(tmp_path):
    out = tmp_path / "bench"
    code = run.main(["--suite", "smoke", "--out", str(out), "--group", "target", "training", "sparse",
                     "--op", "joint_counts", "boundary", "bimi", "train_step", "--mode", "forward+backward",
                     "--providers", "reference", "iic-conv2d", "unfold", "cpp", "unet-only"])
    assert code == 0
    rows = schema.read_csv(out / "results.csv")
    assert {r.op for r in rows} == {"joint_counts", "boundary", "bimi", "train_step"}
    assert {r.group for r in rows} == {"target", "training", "sparse"}
    measured = [r for r in rows if r.measured]
    assert measured, "nothing was measured"
    assert all(r.num_threads == 1 for r in rows)  # the default
    for r in measured:
        assert r.time_p20_s <= r.time_median_s <= r.time_p80_s and r.repeats >= 1
        assert r.peak_extra_bytes is not None, f"memory not measured: {r.note}"
        assert r.device_name and r.torch_version and r.git_commit and r.timestamp
        assert r.load_avg_1m_start is not None
        if r.op != "train_step":
            assert r.min_bytes > 0 and r.min_flops > 0 and r.achieved_bytes_per_s > 0
    # the smoke policy's 2 repeats: every provider of a group gets both, interleaved
    assert all(r.repeats == 2 for r in measured)
    # a peer checked against the reference of the same run, and the ratios filled in
    conv = [r for r in measured if r.provider == "iic-conv2d" and r.op == "joint_counts"]
    assert conv and conv[0].check_max_rel_diff < 1e-4 and conv[0].speedup_vs_iic_conv2d == 1.0
    # unfold computes windows, dilated or not, but no explicit offset list
    assert any(r.provider == "unfold" and r.offsets == "r1d8" and r.measured for r in rows)
    assert all("explicit offset" in r.skipped_reason for r in rows if r.provider == "unfold" and r.radius is None)
    # the training step: the loss's share for this package and the reference, the step's floor
    shares = {r.provider: r.share_of_train_step for r in rows if r.group == "training" and r.op == "bimi"}
    assert shares["cpp"] is not None and shares["reference"] is not None
    step = {r.provider: r for r in rows if r.op == "train_step"}
    assert step["unet-only"].measured and step["unet-only"].check_max_rel_diff is None
    assert step["cpp"].check_max_rel_diff < 1e-4  # the same first step as the reference's
    summary = (out / "summary.md").read_text()
    assert "| config | op | mode | provider | median ms |" in summary
    assert "## Headline" in summary and "## Targets" in summary and "## The loss's share" in summary
    assert "### sparse: smoke sparse offsets" in summary and "GB/s" in summary
    assert (out / "plots" / "targets.png").stat().st_size > 0
    assert report.main([str(out)]) == 0  # the report can be rebuilt from the CSV alone


def test_an_interrupted_run_writes_and_renders_what_it_measured(tmp_path, monkeypatch, capsys):
    """A run stopped by SIGINT (a time limit on a borrowed GPU) keeps the groups measured before
    the signal: results.csv, summary.md and the plots, and exit status 130."""
    calls = []
    real_measure_group = run.measure_group

    def stopped_at_the_second_group(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_measure_group(*args, **kwargs)

    monkeypatch.setattr(run, "measure_group", stopped_at_the_second_group)
    out = tmp_path / "bench"
    code = run.main(["--suite", "smoke", "--out", str(out), "--group", "target", "--op", "joint_counts",
                     "--providers", "reference", "cpp", "--no-memory"])
    assert code == 130 and len(calls) == 2
    rows = schema.read_csv(out / "results.csv")
    assert rows and all(r.measured for r in rows) and len({(r.config, r.mode) for r in rows}) == 1
    assert "| config | op | mode | provider | median ms |" in (out / "summary.md").read_text()
    assert "interrupted" in capsys.readouterr().out


def test_spread_table_of_repeated_runs():
    from benchmarks import spread

    assert spread.speed_targets("cpu") == [("joint_counts", 1, "iic-conv2d"), ("joint_counts", 3, "iic-conv2d"),
                                           ("boundary", 1, "reference")]
    arguments = spread.run_arguments("cpu", None)
    assert arguments[arguments.index("--providers") + 1:] == ["iic-conv2d", "reference", "cpp"]
    r1 = configs.target("cpu", 1)
    runs = [[_row("iic-conv2d", config=r1, time_median_s=base), _row("cpp", config=r1, time_median_s=native,
                                                                      load_avg_1m_start=1.0)]
            for base, native in ((50e-3, 10e-3), (60e-3, 10e-3), (40e-3, 10e-3))]
    table = spread.spread_table(runs, "cpu")
    assert len(table) == 3
    assert table[2] == ("| target-B4-K10-128x128-r1-w5 | joint_counts | cpp | iic-conv2d | 50, 60, 40 | "
                        "10, 10, 10 | 5.0x, 6.0x, 4.0x | 5.0x | 1.00, 1.00, 1.00 |")


def test_host_overhead_writes_a_table(tmp_path):
    from benchmarks import host_overhead

    assert host_overhead.main(["--device", "cpu", "--calls", "2", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "host_overhead.md").read_text()
    assert "| cpp | 1 |" in table and "torch" in table
    assert (tmp_path / "host_overhead.csv").read_text().startswith("backend,offsets,eager_us")


def test_kernels_alone_writes_a_table(tmp_path):
    from benchmarks import kernels_alone

    out = tmp_path / "kernels_alone.md"
    assert kernels_alone.main(["--rounds", "1", "--out", str(out)]) == 0
    table = out.read_text()
    assert "| joint counts r=1, backward (op) |" in table and "| torch.mm 1024^3" in table
    assert kernels_alone.radius_offsets(1)[:4] == [-1, -1, -1, 0]
