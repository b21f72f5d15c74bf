"""Small input factories shared by the tests (`from helpers import random_maps`)."""
import torch


def random_maps(shape, dtype=torch.float64, seed=0, device="cpu", requires_grad=False):
    """Two softmax maps of `shape` (B, K, *S), seeded."""
    g = torch.Generator().manual_seed(seed)
    p1 = torch.randn(shape, generator=g, dtype=torch.float64).softmax(1).to(device=device, dtype=dtype)
    p2 = torch.randn(shape, generator=g, dtype=torch.float64).softmax(1).to(device=device, dtype=dtype)
    if requires_grad:
        p1.requires_grad_(True)
        p2.requires_grad_(True)
    return p1, p2


def random_image(shape, channels=1, dtype=torch.float64, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((shape[0], channels) + tuple(shape[2:]), generator=g, dtype=dtype).to(device)


def random_mask(shape, seed=2, keep=0.8, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((shape[0], 1) + tuple(shape[2:]), generator=g) < keep).to(device)
