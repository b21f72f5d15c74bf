"""The brain MRI demo: its data (tissue and lobes), the lobe grouping, the validation-based
choice of the fine-tuning checkpoint, the command line's usage errors (exit code 2, nothing
written), the up-front dependency check, no silent overwrite, atomic checkpoints, and a tiny
end-to-end run (a few steps at 32x32; the real runs' numbers live in results/demo/)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from bimi_kernels.demo import cli
from bimi_kernels.demo import data as demo_data
from bimi_kernels.demo import lobes, packages
from bimi_kernels.demo.finetune import (FinetuneConfig, choose_labelled, evaluation_steps, finetune_and_evaluate,
                                        validation_choice)
from bimi_kernels.demo.pretrain import ModelConfig
from bimi_kernels.demo.training import atomic_save, warmup_cosine
from bimi_kernels.demo.unet import ClusterHeads, Segmenter, UNet

have_extras = not packages.missing_packages()
needs_extras = pytest.mark.skipif(not have_extras, reason=f"needs the demo extras ({packages.INSTALL_HINT})")
have_mricron = all((lobes.DEFAULT_FOLDER / name).is_file() for name in lobes.FILES)
needs_mricron = pytest.mark.skipif(not (have_mricron and have_extras),
                                   reason=f"needs mricron-data ({lobes.INSTALL_COMMAND}) and nibabel")

TINY = ["--resolution", "32", "--width", "8", "--depth", "2", "--clusters", "5", "--heads", "2",
        "--epochs", "1", "--batch-size", "2", "--batches-per-epoch", "1", "--finetune-steps", "4",
        "--eval-every", "2", "--seeds", "1", "--labels", "1", "--settings", "random", "bimi", "--no-progress"]

# AAL region names without the hemisphere suffix, with the first digit of the atlas's own code
# (2 frontal, 3 insula, 4 limbic, 5 occipital, 6 parietal, 7 deep grey, 8 temporal, 9 cerebellum).
AAL_REGIONS = """
Precentral:2 Frontal_Sup:2 Frontal_Sup_Orb:2 Frontal_Mid:2 Frontal_Mid_Orb:2 Frontal_Inf_Oper:2
Frontal_Inf_Tri:2 Frontal_Inf_Orb:2 Rolandic_Oper:2 Supp_Motor_Area:2 Olfactory:2 Frontal_Sup_Medial:2
Frontal_Med_Orb:2 Rectus:2 Insula:3 Cingulum_Ant:4 Cingulum_Mid:4 Cingulum_Post:4 Hippocampus:4
ParaHippocampal:4 Amygdala:4 Calcarine:5 Cuneus:5 Lingual:5 Occipital_Sup:5 Occipital_Mid:5 Occipital_Inf:5
Fusiform:5 Postcentral:6 Parietal_Sup:6 Parietal_Inf:6 SupraMarginal:6 Angular:6 Precuneus:6
Paracentral_Lobule:6 Caudate:7 Putamen:7 Pallidum:7 Thalamus:7 Heschl:8 Temporal_Sup:8 Temporal_Pole_Sup:8
Temporal_Mid:8 Temporal_Pole_Mid:8 Temporal_Inf:8 Cerebelum_Crus1:9 Cerebelum_Crus2:9 Cerebelum_3:9
Cerebelum_4_5:9 Cerebelum_6:9 Cerebelum_7b:9 Cerebelum_8:9 Cerebelum_9:9 Cerebelum_10:9 Vermis_1_2:9
Vermis_3:9 Vermis_4_5:9 Vermis_6:9 Vermis_7:9 Vermis_8:9 Vermis_9:9 Vermis_10:9
"""
CODE_LOBES = {2: "frontal", 3: "insula / limbic", 4: "insula / limbic", 5: "occipital", 6: "parietal",
              7: "deep grey", 8: "temporal", 9: "cerebellum"}


# ---------------------------------------------------------------------------- model and data


def test_unet_and_heads_shapes():
    unet = UNet(1, width=8, depth=3)
    x = torch.rand(2, 1, 32, 32)
    features = unet.features(x)
    assert features.shape == (2, 8, 32, 32)
    maps = ClusterHeads(8, clusters=6, heads=3)(features)
    assert len(maps) == 3 and maps[0].shape == (2, 6, 32, 32)
    assert torch.allclose(maps[0].sum(1), torch.ones(2, 32, 32))
    assert Segmenter(unet, 4)(x).shape == (2, 4, 32, 32)
    with pytest.raises(ValueError, match="divisible"):
        unet.features(torch.rand(1, 1, 30, 30))


def test_lobe_grouping_by_name_matches_the_atlas_codes():
    regions = [item.split(":") for item in AAL_REGIONS.split()]
    assert len(regions) == 62  # 116 regions: 54 in each hemisphere, 8 vermis parts
    for name, code in regions:
        for full_name in ([name] if name.startswith("Vermis") else [name + "_L", name + "_R"]):
            assert lobes.LOBE_CLASSES[lobes.lobe_of(full_name)] == CODE_LOBES[int(code)], full_name
    names = {1: "Frontal_Sup_L", 2: "Parietal_Inf_R", 5: "ParaHippocampal_L", 7: "Vermis_3"}
    table = lobes.lobe_lookup(names)
    assert table[0] == 1  # in the brain, no AAL region: "unlabelled brain"
    assert [lobes.LOBE_CLASSES[table[v]] for v in (1, 2, 5, 7)] == ["frontal", "parietal", "insula / limbic", "cerebellum"]
    with pytest.raises(ValueError, match="Corpus_Callosum"):
        lobes.lobe_of("Corpus_Callosum_L")


def test_lobe_blocks_split_by_hemisphere():
    area = torch.ones(181).numpy()
    positions = lobes.left_right_positions(area)
    left = set(positions["pretrain"]) | set(positions["finetune"]) | set(positions["validation"])
    assert max(left) < lobes.MIDLINE_X < min(positions["test"])
    assert set(positions["finetune"]) <= set(positions["pretrain"])
    assert not set(positions["validation"]) & set(positions["pretrain"])
    for x in positions["validation"]:  # no pre-training or labelled slice next to a validation slice
        assert not {x - 1, x + 1} & (set(positions["pretrain"]) | set(positions["finetune"]))
    assert [2 * lobes.MIDLINE_X - x for x in positions["mirror"]] == positions["test"]


def test_missing_lobe_data_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("BIMI_MRICRON_DIR", str(tmp_path))
    with pytest.raises(demo_data.MissingDemoData, match="apt-get install mricron-data"):
        lobes.data_folder()


@needs_mricron
def test_lobes_task_on_the_real_atlas():
    task = demo_data.load_task("lobes", 32)
    assert task.class_names == lobes.LOBE_CLASSES and task.scored == tuple(range(2, 9))
    for block in (task.pretrain, task.finetune, task.validation):
        assert (block.position < lobes.MIDLINE_X).all()
    assert (task.test.position > lobes.MIDLINE_X).all()
    assert set(task.test.labels.unique().tolist()) == set(range(9))
    for block in (task.pretrain, task.finetune, task.validation, task.test):
        assert block.images.shape[1:] == (1, 32, 32) and 0 <= block.images.min() and block.images.max() <= 1
        assert (block.images[:, 0][block.labels == 0] == 0).all()
    from bimi_kernels.demo.finetune import dice_per_class, mean_dice

    mirror = mean_dice(dice_per_class(task.mirror_test, task.test.labels, 9), task.scored)
    assert mirror > 0.6  # the hemispheres are nearly symmetric


@needs_extras
def test_tissue_blocks_are_disjoint_and_contiguous():
    task = demo_data.load_task("tissue", 32)
    blocks = [task.finetune, task.validation, task.test]
    for block in blocks:
        assert block.images.shape[1:] == (1, 32, 32) and block.labels.shape[1:] == (32, 32)
        assert torch.equal(block.position, torch.arange(int(block.position[0]), int(block.position[-1]) + 1))
        assert set(block.labels.unique().tolist()) == {0, 1, 2, 3}
        assert (block.images[:, 0][block.labels == 0] == 0).all()  # background is outside the brain
    for below, above in zip(blocks, blocks[1:]):
        assert int(above.position[0]) - int(below.position[-1]) > 3  # the gap keeps neighbours apart
    seen = set(task.pretrain.position.tolist())
    assert set(task.finetune.position.tolist()) <= seen  # pre-training sees the labelled block's images
    assert not seen & (set(task.validation.position.tolist()) | set(task.test.position.tolist()))


# ---------------------------------------------------------------------------- protocol


def test_warmup_cosine_schedule():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps=80, warmup_fraction=0.125, start_factor=0.01)
    rates = []
    for _ in range(80):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.01) and rates[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(rates[:10], rates[1:11]))  # warm-up rises
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and rates[-1] < 0.01  # cosine falls


def test_validation_choice_is_the_best_earliest_step():
    assert evaluation_steps(100, 25) == [25, 50, 75, 100]
    assert evaluation_steps(90, 25) == [25, 50, 75, 90]
    assert validation_choice([25, 50, 75], [0.2, 0.5, 0.4]) == 1
    assert validation_choice([25, 50, 75], [0.5, 0.3, 0.5]) == 0


@pytest.mark.parametrize("block,count,seeds", [(8, 1, 3), (8, 2, 4), (17, 4, 3), (17, 4, 5), (8, 4, 3), (8, 4, 5),
                                               (8, 5, 5), (5, 5, 2)])
def test_seeds_label_different_slices_while_the_block_has_room(block, count, seeds):
    draws = [choose_labelled(block, count, seed) for seed in range(seeds)]
    assert draws == [choose_labelled(block, count, seed) for seed in range(seeds)]  # from the arguments only
    assert all(len(set(d)) == count and all(0 <= i < block for i in d) for d in draws)
    uses = [sum(i in d for d in draws) for i in range(block)]
    if seeds * count <= block:
        assert max(uses) == 1  # disjoint
    else:
        assert min(uses) >= seeds * count // block and max(uses) <= -(-seeds * count // block)  # balanced
        if count < block:  # and, in the demo's settings, no two seeds label the same slices
            assert len({tuple(d) for d in draws}) == seeds
    with pytest.raises(ValueError):
        choose_labelled(block, block + 1, 0)


def _synthetic_task(classes=3, size=16):
    generator = torch.Generator().manual_seed(0)

    def block(n):
        labels = torch.randint(0, classes, (n, 4, 4), generator=generator)
        labels = torch.nn.functional.interpolate(labels[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
        images = labels[:, None].float() / (classes - 1) + 0.05 * torch.rand(n, 1, size, size, generator=generator)
        return demo_data.SliceBlock(images, labels, torch.arange(n))

    return demo_data.TaskData(task="synthetic", source="blocks", class_names=("a", "b", "c"), scored=(1, 2),
                              score_title="mean Dice", pretrain=block(4), finetune=block(4), validation=block(3),
                              test=block(5), resolution=size, position_unit="i")


def test_finetuning_chooses_on_validation_and_reads_the_test_block_last(monkeypatch):
    from bimi_kernels.demo import finetune

    task = _synthetic_task()
    reads = []
    real_predict = finetune.predict

    def recording_predict(model, images, device, batch_size=16):
        reads.append("test" if images is task.test.images else "validation" if images is task.validation.images else "?")
        return real_predict(model, images, device, batch_size)

    monkeypatch.setattr(finetune, "predict", recording_predict)
    config = FinetuneConfig(steps=12, lr=3e-3, eval_every=3)
    result = finetune_and_evaluate(None, ModelConfig(width=4, depth=2), config, task, labelled=2, seed=0,
                                   device=torch.device("cpu"))
    assert reads == ["validation"] * 4 + ["test"] * 4  # every validation score before any test score
    scores = [p["mean"] for p in result["validation_curve"]]
    assert [p["step"] for p in result["validation_curve"]] == [3, 6, 9, 12]
    assert result["chosen_step"] == [3, 6, 9, 12][validation_choice([3, 6, 9, 12], scores)]
    chosen = [3, 6, 9, 12].index(result["chosen_step"])
    assert result["test_mean"] == result["test_curve"][chosen]["mean"]
    assert result["test_last_mean"] == result["test_curve"][-1]["mean"]
    reads.clear()
    no_test = finetune_and_evaluate(None, ModelConfig(width=4, depth=2), config, task, labelled=2, seed=0,
                                    device=torch.device("cpu"), score_test=False)
    assert "test" not in reads and "test_mean" not in no_test
    assert no_test["validation_curve"] == result["validation_curve"]  # seeded: the same run


def test_criterion_is_evaluated_as_stated():
    def run(setting, labelled, value):
        return {"setting": setting, "labelled": labelled, "test_mean": value}

    runs = [run("random", 1, v) for v in (0.30, 0.32, 0.34)] + [run("bimi", 1, v) for v in (0.50, 0.52, 0.54)]
    runs += [run("rmi", 1, 0.45), run("iic", 1, 0.40)]
    summary = {"finetune": runs, "options": {"labels": [1], "no_test": False}, "settings": ["random", "iic", "rmi", "bimi"]}
    lines = cli.evaluate_criterion(summary)
    assert "**met**" in lines[0] and "**met**" in lines[1]
    runs[3:6] = [run("bimi", 1, v) for v in (0.30, 0.36, 0.42)]  # mean 0.36: +0.04, less than 2 x 0.049
    assert "**not met**" in cli.evaluate_criterion(summary)[0]


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "pretrain_bimi.pt"
    atomic_save({"epoch": 1}, path)
    real_save = torch.save

    def killed_mid_write(state, target):
        with open(target, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path)["epoch"] == 1  # the last good checkpoint is whole
    assert list(tmp_path.iterdir()) == [path]  # and no temporary file is left behind


# ---------------------------------------------------------------------------- command line

BAD_ARGUMENTS = [
    (["--device", "gpu"], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--backend", "foo"], "--backend"),
    (["--clusters", "1"], "--clusters"),
    (["--resolution", "50"], "--resolution"),
    (["--resolution", "8", "--depth", "2"], "--resolution"),
    (["--depth", "1"], "--depth"),
    (["--epochs", "0"], "--epochs"),
    (["--labels", "0"], "--labels"),
    (["--labels", "2", "2"], "--labels"),
    (["--seeds", "0"], "--seeds"),
    (["--finetune-steps", "0"], "--finetune-steps"),
    (["--lr", "0"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--finetune-lr", "nan"], "--finetune-lr"),
    (["--finetune-lr", "-1"], "--finetune-lr"),
    (["--lr", "1e30"], "--lr"),
    (["--clusters", "100000"], "--clusters"),
    (["--batch-size", "0"], "--batch-size"),
    (["--eval-every", "0"], "--eval-every"),
    (["--threads", "0"], "--threads"),
    (["--offsets", "-1"], "--offsets"),
    (["--picture-every", "0"], "--picture-every"),
    (["--task", "organs"], "--task"),
    (["--views", "strong"], "--views"),
    (["--resume", "--overwrite"], "--overwrite"),
    (["--resolution", "1024"], "--resolution"),
    (["--offsets", "64"], "--offsets"),  # no pixel pair left in a 64x64 slice
    (["--resolution", "32", "--offsets", "40"], "--offsets"),
]


def _usage_error(argv, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--out", str(out)])
    assert exit_info.value.code == 2
    assert not out.exists()  # nothing written
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, named", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_argument_is_a_usage_error(argv, named, tmp_path, capsys):
    err = _usage_error(argv, tmp_path, capsys)
    assert "usage: bimi demo" in err and f"argument {named}" in err  # the usage line names every flag


@pytest.mark.parametrize("flag", ["--out", "--checkpoint-dir"])
def test_an_output_folder_that_cannot_be_made_is_a_usage_error(flag, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for folder, why in ((a_file, "is not a folder"), (a_file / "below", "is not a folder")):
        argv = [flag, str(folder)] if flag == "--out" else [flag, str(folder), "--out", str(tmp_path / "out")]
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and why in err
    assert a_file.read_text() == "not a folder" and not (tmp_path / "out").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc to try")
def test_a_folder_whose_permission_bits_allow_writing_is_tried(tmp_path, capsys):
    """/proc says writable to root, but nothing can be made there: the demo tries, up front."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--out", "/proc/bimi_demo_out"])
    assert exit_info.value.code == 2 and "/proc is not writable" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_device_on_a_cpu_only_torch_is_a_usage_error(tmp_path, capsys):
    err = _usage_error(["--device", "cuda"], tmp_path, capsys)
    assert "--device" in err and "use --device cpu" in err


def test_backend_that_cannot_run_on_the_device_is_a_usage_error(tmp_path, capsys):
    err = _usage_error(["--device", "cpu", "--backend", "cuda"], tmp_path, capsys)
    assert "--backend" in err and "cannot run on cpu" in err


def test_an_unknown_cpu_isa_request_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """Before the data is prepared, not as a traceback at the first loss."""
    monkeypatch.setenv("BIMI_CPU_ISA", "avx9")
    err = _usage_error(["--device", "cpu"], tmp_path, capsys)
    assert "BIMI_CPU_ISA" in err and "got 'avx9'" in err


@needs_extras
@pytest.mark.parametrize("value, named", [("cuda", "'cuda'"), ("fast", "unknown backend 'fast'")])
def test_a_bimi_backend_environment_that_cannot_serve_is_a_usage_error(value, named, tmp_path, capsys, monkeypatch):
    """BIMI_BACKEND overrides --backend auto: one that cannot run on the device is refused before
    any work, not as a traceback at the first loss."""
    monkeypatch.setenv("BIMI_BACKEND", value)
    err = _usage_error(["--device", "cpu"], tmp_path, capsys)
    assert "BIMI_BACKEND" in err and named in err


def test_the_pictures_edge_map_uses_the_reference_whatever_the_backend(tmp_path, monkeypatch):
    """The pictures' edge map is computed on CPU tensors whatever --device is: with --device cuda
    and BIMI_BACKEND=triton (or cuda), backend auto would ask a GPU backend for CPU tensors."""
    import bimi_kernels.functional

    class Stop(Exception):
        pass

    asked = []

    def edge_map(image, *args, backend="auto", **kwargs):
        asked.append((image.device.type, backend))
        raise Stop

    monkeypatch.setattr(bimi_kernels.functional, "edge_map", edge_map)
    with pytest.raises(Stop):
        cli.main(TINY + ["--out", str(tmp_path / "out")])
    assert asked == [("cpu", "reference")]


def test_more_labels_than_fine_tune_slices_is_a_usage_error(tmp_path, capsys):
    err = _usage_error(["--labels", "40"], tmp_path, capsys)
    assert "--labels" in err and "at most 17" in err


@needs_extras
def test_full_preset_on_a_cpu_asks_for_a_flag(tmp_path, capsys):
    err = _usage_error(["--preset", "full", "--device", "cpu"], tmp_path, capsys)
    assert "hours" in err and "--allow-long-cpu-run" in err


def test_a_wide_offset_window_on_a_cpu_asks_for_a_flag(capsys):
    """The joint counts grow with the offsets: radius 40 is 6,561 offsets per head, hours on a CPU.
    (The guard itself is called, not the whole demo: were it to pass, this test would not start
    a three-hour run.)"""
    parser = cli.build_parser()
    args = cli.resolve_options(parser.parse_args(["--offsets", "40"]))
    with pytest.raises(SystemExit):
        cli.check_cpu_time(parser, args, torch.device("cpu"), pretrain_images=70)
    err = capsys.readouterr().err
    assert "hours" in err and "--allow-long-cpu-run" in err
    # the quick preset's own radius 0 stays under the limit
    cli.check_cpu_time(parser, cli.resolve_options(parser.parse_args([])), torch.device("cpu"), 70)


def test_missing_dependencies_are_named_at_once_before_any_work(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tqdm", "matplotlib") else real_find_spec(name, *a))
    out = tmp_path / "out"
    assert cli.main(["--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "matplotlib, tqdm" in err and packages.INSTALL_HINT in err
    assert not out.exists()


def test_missing_numpy_is_named_too_not_a_traceback(tmp_path):
    # numpy is a demo extra (the kernels never import it): `bimi demo` must check for it before
    # importing the modules that need it. A fresh interpreter with numpy unimportable.
    out = tmp_path / "out"
    script = ("import sys; sys.modules['numpy'] = None\n"
              "from bimi_kernels.demo import cli\n"
              f"sys.exit(cli.main(['--no-progress', '--out', {str(out)!r}]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "the demo needs numpy" in result.stderr and "pip install numpy" in result.stderr
    assert not out.exists()


def test_missing_lobe_data_stops_the_demo_with_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("BIMI_MRICRON_DIR", str(tmp_path / "nowhere"))
    out = tmp_path / "out"
    assert cli.main(["--task", "lobes", "--out", str(out)]) == 2
    assert "apt-get install mricron-data" in capsys.readouterr().err and not out.exists()


def test_an_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("the first run")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(TINY + ["--out", str(out)])
    assert exit_info.value.code == 2
    assert "--resume" in capsys.readouterr().err and (out / "results.md").read_text() == "the first run"
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "pretrain_bimi.pt").write_bytes(b"old")
    with pytest.raises(SystemExit):
        cli.main(TINY + ["--out", str(tmp_path / "fresh"), "--checkpoint-dir", str(checkpoints)])
    assert not (tmp_path / "fresh").exists()


def test_overwrite_removes_only_the_demo_files(tmp_path):
    out = tmp_path / "out"
    (out / "pictures").mkdir(parents=True)
    (out / "results.md").write_text("old")
    (out / "pictures" / "bimi_epoch001.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    args = cli.resolve_options(cli.build_parser().parse_args(["--out", str(out), "--overwrite"]))
    cli.remove_previous_outputs(args)
    assert not (out / "results.md").exists() and not (out / "pictures" / "bimi_epoch001.png").exists()
    assert (out / "notes.txt").read_text() == "mine"


def test_command_line_has_no_trailing_space():
    assert cli.command_line([]) == "bimi demo"
    assert cli.command_line(["--task", "lobes"]) == "bimi demo --task lobes"


@needs_extras
def test_tiny_demo_run_writes_tables_pictures_and_checkpoints(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    threads_before = torch.get_num_threads()
    assert cli.main(TINY + ["--out", str(out)]) == 0
    assert torch.get_num_threads() == threads_before  # the quick preset's 1 thread does not leak
    for name in ("results.md", "results.json", "loss_curves.png", "dice.png", "finetune_curves.png",
                 "pictures/bimi_epoch001.png", "checkpoints/pretrain_bimi.pt", "log.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob("checkpoints/*.tmp"))
    summary = json.loads((out / "results.json").read_text())
    assert summary["settings"] == ["random", "bimi"]
    assert {(r["setting"], r["labelled"]) for r in summary["finetune"]} == {("random", 1), ("bimi", 1)}
    for run in summary["finetune"]:
        assert len(run["test_dice"]) == 4 and all(0 <= d <= 1 for d in run["test_dice"])
        assert run["chosen_step"] in (2, 4) and len(run["validation_curve"]) == 2
    assert {p["setting"] for p in summary["probes"]} == {"random", "bimi"}
    markdown = (out / "results.md").read_text()
    assert "full BIMI" in markdown and "random init" in markdown and "intensity lookup" in markdown
    assert ", 1 thread\n" in markdown and "1 threads" not in markdown and "Criterion" in markdown
    # the same code and seeds end elsewhere on another processor (results/demo/README.md)
    from bimi_kernels.native import processor_name

    assert f"- Device: cpu ({processor_name()}" in markdown
    assert "- Slices labelled by each seed (positions in the fine-tune block): 1 labelled slice: [0]\n" in markdown
    cli.draw_dice_bars(tmp_path / "redrawn.png", summary)  # the chart can be redrawn from results.json
    assert (tmp_path / "redrawn.png").stat().st_size > 0

    # --resume finds the finished pre-training and does not train again; the checkpoint is read
    # onto the CPU (load_state_dict moves the weights; the optimiser's step counts stay on the
    # CPU, where RAdam reads them every step)
    locations, real_load = [], torch.load

    def load(*args, **kwargs):
        locations.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    assert cli.main(TINY + ["--out", str(out), "--resume"]) == 0
    monkeypatch.setattr(torch, "load", real_load)
    assert locations and set(locations) == {"cpu"}
    again = json.loads((out / "results.json").read_text())
    assert again["pretrain"]["bimi"]["resumed_from_epoch"] == 1
    assert again["pretrain"]["bimi"]["epoch_loss"] == summary["pretrain"]["bimi"]["epoch_loss"]
    # --resume with other settings: a usage error before any work, the run left as it was
    before = (out / "results.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(TINY + ["--out", str(out), "--resume", "--epochs", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --resume" in err and "pretrain_bimi.pt was made with" in err
    assert (out / "results.json").read_text() == before
    # --resume on other pre-training images (another resolution here; another task alike): the
    # same settings, so only the images' fingerprint tells
    resolution = TINY[TINY.index("--resolution") + 1]
    other = [v if v != resolution else str(int(resolution) * 2) for v in TINY]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(other + ["--out", str(out), "--resume"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --resume" in err and "other pre-training images" in err
    assert (out / "results.json").read_text() == before
    # one seed: no "± 0.000" spread, and the criterion says why it is not evaluated
    markdown = (out / "results.md").read_text()
    assert "± 0.000" not in markdown and "one seed" in markdown and "1 epoch of" in markdown
