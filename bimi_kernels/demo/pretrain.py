"""Self-supervised pre-training of the demo U-Net with the BIMI loss (or its IIC / MI-only
ablations) on the task's pre-training slices.

Each step: two views of a batch (`bimi_kernels.views.TwoViewTransform`, the authors' setting by
default), one U-Net pass over both, the view-1 decoder features warped into view 2's frame
(nearest), `heads` cluster heads on both, and `BIMILoss(p1, p2, image=view 2, mask=warp mask)`
averaged over the heads. The optimiser follows the authors: RAdam, no weight decay, linear
warm-up then cosine (`training.warmup_cosine`). A checkpoint after every epoch (written
atomically) makes the run resumable (`resume=True`).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .. import BIMILoss
from ..views import TwoViewTransform
from .training import atomic_save, warmup_cosine
from .unet import ClusterHeads, UNet

# The pre-training settings compared by the demo. `random` has no pre-training.
SETTINGS: Dict[str, Optional[dict]] = {
    "random": None,
    "iic": dict(alpha=0.0, boundary_weight=0.0),  # IIC: plain mutual information
    "rmi": dict(alpha=0.5, boundary_weight=0.0),  # regularised MI, no boundary term
    "bimi": dict(),  # the full BIMI loss at its defaults (docs/contract.md §6: alpha=0.5, boundary_weight=1)
}
SETTING_TITLES = {
    "random": "random init (no pre-training)",
    "iic": "IIC only (alpha=0, boundary_weight=0)",
    "rmi": "regularised MI only (alpha=0.5, boundary_weight=0)",
    "bimi": "full BIMI (alpha=0.5, boundary_weight=1)",
}


@dataclass
class ModelConfig:
    width: int = 16
    depth: int = 3
    clusters: int = 16
    heads: int = 3


@dataclass
class PretrainConfig:
    epochs: int = 6
    batch_size: int = 8
    lr: float = 2e-4  # peak; the authors' value
    weight_decay: float = 0.0
    warmup_fraction: float = 0.125
    seed: int = 0
    backend: str = "auto"
    views: str = "authors"  # a name in bimi_kernels.views.VIEW_SETTINGS
    loss_overrides: dict = field(default_factory=dict)  # extra BIMILoss arguments for every setting


@dataclass
class PretrainResult:
    setting: str
    unet_state: dict
    heads_state: dict
    history: dict  # step_loss, epoch_loss, epoch_purity, epoch_seconds
    resumed_from_epoch: int


def build_loss(setting: str, config: PretrainConfig) -> BIMILoss:
    arguments = dict(SETTINGS[setting])
    arguments.update(config.loss_overrides)
    return BIMILoss(backend=config.backend, **arguments)


def two_view_cluster_maps(unet: UNet, heads: ClusterHeads, views):
    """p1 (view 1's features warped into view 2's frame) and p2, one pair per head."""
    features = unet.features(torch.cat([views.original, views.transformed]))
    f1, f2 = features.chunk(2)
    return heads(views.align(f1)), heads(f2)


def pretrain_step_loss(loss_fn, unet, heads, views) -> torch.Tensor:
    p1s, p2s = two_view_cluster_maps(unet, heads, views)
    mask = views.mask_like(p2s[0])
    losses = [loss_fn(p1, p2, image=views.transformed, mask=mask) for p1, p2 in zip(p1s, p2s)]
    return torch.stack(losses).mean()


@torch.no_grad()
def cluster_purity(unet: UNet, heads: ClusterHeads, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Pixel accuracy of head 0's clusters when each cluster is mapped to its majority label,
    on the given (validation) slices: how well the clusters separate the classes."""
    clusters = heads(unet.features(images))[0].argmax(1).flatten()
    truth = labels.flatten().to(clusters.device)
    k, c = heads.heads[0].out_channels, int(labels.max()) + 1
    table = torch.zeros(k * c, device=clusters.device).index_add_(0, clusters * c + truth, torch.ones_like(truth, dtype=torch.float32))
    return float(table.reshape(k, c).max(1).values.sum() / truth.numel())


def checkpoint_path(checkpoint_dir: Path, setting: str) -> Path:
    return Path(checkpoint_dir) / f"pretrain_{setting}.pt"


def images_fingerprint(images: torch.Tensor) -> str:
    """A digest of the pre-training images (shape, dtype and values): a checkpoint continues only
    on the data it was made on (another task or resolution has other images)."""
    data = images.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)} {data.dtype}".encode())
    digest.update(data.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def resume_mismatch(path: Path, model_config: ModelConfig, config: PretrainConfig,
                    batches_per_epoch: int, images: torch.Tensor,
                    state: Optional[dict] = None) -> Optional[str]:
    """Why the checkpoint at `path` cannot be continued with these settings and these
    pre-training images, or None."""
    if state is None:
        state = torch.load(path, map_location="cpu", weights_only=False)
    made_with = (state["model_config"], state["pretrain_config"], state["batches_per_epoch"])
    asked_for = (asdict(model_config), asdict(config), batches_per_epoch)
    if made_with != asked_for:
        return (f"checkpoint {path} was made with (model, pre-training, batches per epoch) {made_with}, "
                f"not {asked_for}; use the same settings, another --checkpoint-dir, or --overwrite")
    made_on, asked_on = state.get("images"), images_fingerprint(images)
    if made_on != asked_on:
        return (f"checkpoint {path} was made on other pre-training images (another --task, --resolution "
                f"or data: fingerprint {made_on}, not {asked_on}); use another --checkpoint-dir, or --overwrite")
    return None


def pretrain(
    setting: str,
    images: torch.Tensor,
    model_config: ModelConfig,
    config: PretrainConfig,
    checkpoint_dir: Path,
    device: torch.device,
    resume: bool = False,
    probe: Optional[tuple] = None,
    on_epoch_end: Optional[Callable] = None,
    progress: bool = True,
    batches_per_epoch: Optional[int] = None,
) -> PretrainResult:
    """Pre-train a fresh U-Net + cluster heads on `images` (N, 1, H, W) with the loss of `setting`.

    probe           : (images, labels) of labelled slices outside the test block (the
                      validation block), to log the clusters' purity per epoch as a diagnostic
    on_epoch_end    : called as on_epoch_end(epoch, unet, heads, history) after each checkpoint
    resume          : continue from the setting's checkpoint in `checkpoint_dir` if there is one
    batches_per_epoch : batches in an epoch, drawn from reshuffled passes over `images` (the
                      authors' fixed-length epochs); default: one pass
    """
    from tqdm.auto import tqdm

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    unet = UNet(images.shape[1], model_config.width, model_config.depth).to(device)
    heads = ClusterHeads(model_config.width, model_config.clusters, model_config.heads).to(device)
    parameters = list(unet.parameters()) + list(heads.parameters())
    optimizer = torch.optim.RAdam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if not batches_per_epoch:
        batches_per_epoch = math.ceil(images.shape[0] / config.batch_size)
    scheduler = warmup_cosine(optimizer, config.epochs * batches_per_epoch, config.warmup_fraction)
    generator = torch.Generator().manual_seed(config.seed)
    history = {"step_loss": [], "epoch_loss": [], "epoch_purity": [], "epoch_seconds": []}
    start_epoch = 0

    path = checkpoint_path(checkpoint_dir, setting)
    fingerprint = images_fingerprint(images)
    if resume and path.is_file():
        # loaded on the CPU: load_state_dict moves the weights and the optimiser's moments to the
        # model's device but keeps each step count on the CPU (on a GPU, RAdam would otherwise
        # read them back from the device several times per parameter per step)
        state = torch.load(path, map_location="cpu", weights_only=False)
        problem = resume_mismatch(path, model_config, config, batches_per_epoch, images, state)
        if problem:
            raise ValueError(f"--resume: {problem}")
        unet.load_state_dict(state["unet"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        history = state["history"]
        start_epoch = state["epoch"]

    loss_fn = build_loss(setting, config)
    transform = TwoViewTransform.named(config.views)
    images = images.to(device)
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        unet.train()
        heads.train()
        passes = math.ceil(batches_per_epoch * config.batch_size / images.shape[0])
        order = torch.cat([torch.randperm(images.shape[0], generator=generator) for _ in range(passes)])
        batches = order.split(config.batch_size)[:batches_per_epoch]
        bar = tqdm(batches, desc=f"pre-train {setting} epoch {epoch + 1}/{config.epochs}", leave=False, disable=not progress)
        # the step losses stay on the device until the epoch is over (a read every step would make
        # the host wait for the device every step); the progress bar reads one every 10 steps
        step_losses = torch.empty(len(batches), dtype=torch.float64, device=device)
        for index, batch in enumerate(bar):
            views = transform(images[batch.to(device)], generator=generator)
            loss = pretrain_step_loss(loss_fn, unet, heads, views)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 5.0)
            optimizer.step()
            scheduler.step()
            step_losses[index] = loss.detach()
            if progress and index % 10 == 0:
                bar.set_postfix(loss=f"{float(step_losses[index]):.4f}")
        epoch_losses: List[float] = step_losses.tolist()
        history["step_loss"].extend(epoch_losses)
        history["epoch_loss"].append(sum(epoch_losses) / len(epoch_losses))
        unet.eval()
        heads.eval()
        if probe is not None:
            history["epoch_purity"].append(cluster_purity(unet, heads, probe[0].to(device), probe[1]))
        history["epoch_seconds"].append(time.perf_counter() - started)
        atomic_save(
            {
                "setting": setting,
                "epoch": epoch + 1,
                "model_config": asdict(model_config),
                "pretrain_config": asdict(config),
                "batches_per_epoch": batches_per_epoch,
                "images": fingerprint,
                "unet": unet.state_dict(),
                "heads": heads.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "history": history,
            },
            path,
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, unet, heads, history)
    return PretrainResult(
        setting=setting,
        unet_state={k: v.detach().cpu().clone() for k, v in unet.state_dict().items()},
        heads_state={k: v.detach().cpu().clone() for k, v in heads.state_dict().items()},
        history=history,
        resumed_from_epoch=start_epoch,
    )
