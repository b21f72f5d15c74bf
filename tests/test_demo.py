"""Smoke test of the brain MRI demo: the data, the model, and a tiny end-to-end run that writes
its table, pictures and checkpoints (a few steps at 32x32; the real run's numbers live in
results/demo/)."""
import importlib.util
import json

import pytest
import torch

pytest.importorskip("matplotlib", reason="the demo's pictures need matplotlib (pip install 'bimi_kernels[demo]')")
pytest.importorskip("tqdm", reason="the demo's progress bars need tqdm (pip install 'bimi_kernels[demo]')")

from bimi_kernels.demo import data as demo_data  # noqa: E402
from bimi_kernels.demo.cli import main  # noqa: E402
from bimi_kernels.demo.unet import ClusterHeads, Segmenter, UNet  # noqa: E402

have_data = importlib.util.find_spec("nibabel") is not None and importlib.util.find_spec("nilearn") is not None
needs_data = pytest.mark.skipif(not have_data, reason="needs nibabel and nilearn (pip install 'bimi_kernels[demo]')")

TINY = ["--resolution", "32", "--width", "8", "--depth", "2", "--clusters", "5", "--heads", "2",
        "--epochs", "1", "--batch-size", "2", "--pretrain-steps", "1", "--finetune-steps", "2",
        "--seeds", "1", "--labels", "1", "--settings", "random", "bimi", "--no-progress"]


def test_missing_data_package_names_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real_find_spec(name, *a))
    with pytest.raises(demo_data.MissingDemoData, match="pip install"):
        demo_data.template_folder()


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


@needs_data
def test_slices_are_labelled_and_split_into_contiguous_blocks():
    slices = demo_data.load_brain_slices(resolution=32, gap=3)
    blocks = [slices.pretrain, slices.finetune, slices.test]
    for block in blocks:
        assert block.images.shape[1:] == (1, 32, 32) and block.labels.shape[1:] == (32, 32)
        assert torch.equal(block.z, torch.arange(int(block.z[0]), int(block.z[-1]) + 1))  # contiguous
        assert 0 <= block.images.min() and block.images.max() <= 1
        assert set(block.labels.unique().tolist()) == {0, 1, 2, 3}
        assert (block.images[:, 0][block.labels == 0] == 0).all()  # background is outside the brain
    for below, above in zip(blocks, blocks[1:]):
        assert int(above.z[0]) - int(below.z[-1]) > 3  # the gap keeps neighbours apart


@needs_data
def test_tiny_demo_run_writes_table_pictures_and_checkpoints(tmp_path):
    out = tmp_path / "demo"
    threads_before = torch.get_num_threads()
    assert main(TINY + ["--out", str(out)]) == 0
    assert torch.get_num_threads() == threads_before  # the quick preset's 1 thread does not leak
    for name in ("results.md", "results.json", "loss_curves.png", "dice.png",
                 "pictures/bimi_epoch001.png", "checkpoints/pretrain_bimi.pt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "results.json").read_text())
    assert summary["settings"] == ["random", "bimi"]
    assert {(r["setting"], r["labelled"]) for r in summary["finetune"]} == {("random", 1), ("bimi", 1)}
    for run in summary["finetune"]:
        assert len(run["test_dice"]) == 4 and all(0 <= d <= 1 for d in run["test_dice"])
    markdown = (out / "results.md").read_text()
    assert "full BIMI" in markdown and "random init" in markdown and "bimi demo" in markdown

    # --resume finds the finished pre-training and does not train again
    assert main(TINY + ["--out", str(out), "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["pretrain"]["bimi"]["resumed_from_epoch"] == 1
    assert again["pretrain"]["bimi"]["epoch_loss"] == summary["pretrain"]["bimi"]["epoch_loss"]
