"""BIMI pre-training under DistributedDataParallel: 2 CPU processes, gloo, a tiny model.

    python examples/ddp_pretrain.py [--world-size 2] [--steps 40] [--backend auto]

Each process is one rank with its own shard of synthetic images (bright discs on a noisy
background). The loss is `BIMILoss(sync=True)`: the joint counts of every rank are all-reduced
before the mutual information is computed, so the MI term is that of the global batch, and
DDP's gradient averaging gives the same parameter gradients as one process on the whole batch
(see bimi_kernels/distributed.py). The boundary term stays per rank.

It prints, from rank 0, the global loss (the mean over ranks of each rank's loss), the MI term
(the same on every rank) and, at the end, a check that the replicas' weights are still equal.
Runs in well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import bimi_kernels
import bimi_kernels.functional as BF
from bimi_kernels.views import TwoViewTransform

NUM_CLUSTERS = 6
IMAGE_SIZE = 32
PER_RANK_BATCH = 4


class TinySegmenter(nn.Module):
    """Two 3x3 conv layers and a 1x1 head to K soft clusters (stands in for a U-Net decoder)."""

    def __init__(self, num_clusters: int = NUM_CLUSTERS, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Conv2d(width, num_clusters, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).softmax(1)


def synthetic_images(batch: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, 1, S, S) images: 1-3 discs of random brightness on a noisy dark background."""
    coords = torch.linspace(-1, 1, IMAGE_SIZE)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    images = 0.05 * torch.randn(batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    for b in range(batch):
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            cy, cx = (torch.rand(2, generator=generator) * 1.2 - 0.6).tolist()
            radius = float(torch.rand(1, generator=generator)) * 0.3 + 0.15
            brightness = float(torch.rand(1, generator=generator)) * 0.7 + 0.3
            images[b, 0][(y - cy) ** 2 + (x - cx) ** 2 < radius ** 2] += brightness
    return images


def train(rank: int, world_size: int, port: int, steps: int, backend: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)  # the ranks share the machine's cores
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = nn.parallel.DistributedDataParallel(TinySegmenter())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    criterion = bimi_kernels.BIMILoss(offsets=1, backend=backend, sync=True)
    make_views = TwoViewTransform()
    data_generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard

    start = time.perf_counter()
    for step in range(1, steps + 1):
        images = synthetic_images(PER_RANK_BATCH, data_generator)
        views = make_views(images, generator=data_generator)
        # both views in one forward, so DDP sees one forward per backward
        probs = model(torch.cat([views.original, views.transformed]))
        probs_original, p2 = probs.chunk(2)
        p1 = views.align(probs_original)  # view 1's clusters in view 2's frame
        mask = views.mask_like(p2)
        loss = criterion(p1, p2, image=views.transformed, mask=mask)
        optimizer.zero_grad()
        loss.backward()  # all-reduces dL/dJ, then DDP averages the parameter gradients
        optimizer.step()

        if step == 1 or step % 10 == 0 or step == steps:
            with torch.no_grad():
                mi_term = BF.regularized_mi(p1, p2, offsets=1, mask=mask, backend=backend, sync=True)
                global_loss = loss.detach().clone()
                dist.all_reduce(global_loss)
                global_loss /= world_size
            if rank == 0:
                print(f"step {step:3d}  global loss {global_loss.item():+.4f}  "
                      f"MI term (global batch) {mi_term.item():+.4f}")

    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world_size)]
    dist.all_gather(gathered, weights)
    if rank == 0:
        in_sync = all(torch.equal(gathered[0], other) for other in gathered[1:])
        print(f"{world_size} ranks x {PER_RANK_BATCH} images, {steps} steps in "
              f"{time.perf_counter() - start:.1f} s; replicas identical: {in_sync}")
    # Tear down in order: DDP's reducer, which holds the process group, freed now (it sits in
    # reference cycles: del alone leaves it to the collector, which may run after the group is
    # destroyed, and then the rank aborts at exit with "terminate called without an active
    # exception"; 4-5 runs in 25 here); then every rank done before any destroys the group.
    del model, optimizer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=positive_int, default=2, help="number of CPU processes (ranks)")
    parser.add_argument("--steps", type=positive_int, default=40)
    parser.add_argument("--backend", default="auto", help="kernel backend: auto, reference, cpp, ...")
    args = parser.parse_args()
    # a backend the CPU ranks cannot use is a usage error here, not a traceback from every rank
    reasons = bimi_kernels.available_backends("cpu")
    if args.backend != "auto" and args.backend not in reasons:
        parser.error(f"argument --backend: expected auto or one of {sorted(reasons)}, got {args.backend!r}")
    if args.backend != "auto" and reasons[args.backend] is not None:
        parser.error(f"argument --backend: {args.backend!r} cannot run on the CPU: {reasons[args.backend]}")
    mp.spawn(train, args=(args.world_size, free_port(), args.steps, args.backend), nprocs=args.world_size)


if __name__ == "__main__":
    main()
