"""The peer losses users come from, re-implemented here from their published descriptions (not
copied), so tests/test_peers.py can show which `bimi_kernels` arguments reproduce each one:

- IIC (Ji, Henriques, Vedaldi, ICCV 2019), segmentation losses: the joint of two cluster maps
  over a (2T+1)^2 window of displacements by one conv2d (the first map's (K, B, H, W) as input,
  the second's as weights, padding T), then either *collapsed* (summed over the displacements,
  one distribution) or *uncollapsed* (one distribution per displacement, losses averaged);
  symmetrised; P, its marginals clamped from below at machine epsilon; loss
  -sum P (log P - lamb log P_i - lamb log P_j).
- The BIMI authors' terms (Peng et al. 2024): the redundancy-reduction (RR) loss, i.e. the
  regularised MI of the offset-0 joint J / N with eps = 1e-5 inside the logs, and the boundary
  cross-correlation (CC) loss between the per-sample min-max-normalised entropy of each map and
  the image's edge map (wrap-around differences, per-sample min-max, power gamma), local NCC
  over a k x k box, averaged over the two views.

Run `python tests/peers.py` for the agreement table quoted in the README.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

MACHINE_EPS = sys.float_info.epsilon


def _iic_joint_by_displacement(x1, x2, half_window):
    """(2T+1, 2T+1, K, K): entry [u, v, i, j] = sum_b,s x1[b, i, s + (u - T, v - T)] x2[b, j, s]."""
    joint = F.conv2d(x1.transpose(0, 1), weight=x2.transpose(0, 1), padding=(half_window, half_window))
    return joint.permute(2, 3, 0, 1)


def _iic_information(p, lamb):
    p_i = p.sum(dim=-1, keepdim=True)
    p_j = p.sum(dim=-2, keepdim=True)
    p, p_i, p_j = (t.clamp(min=MACHINE_EPS) for t in (p, p_i, p_j))
    return (-p * (torch.log(p) - lamb * torch.log(p_i) - lamb * torch.log(p_j))).sum(dim=(-2, -1))


def iic_collapsed(x1, x2, half_window, lamb=1.0):
    """IIC's segmentation loss: one joint over the whole displacement window."""
    p = _iic_joint_by_displacement(x1, x2, half_window).sum(dim=(0, 1))
    p = p / p.sum()
    p = (p + p.t()) / 2
    return _iic_information(p, lamb)


def iic_uncollapsed(x1, x2, half_window, lamb=1.0):
    """IIC's uncollapsed segmentation loss: one joint per displacement, losses averaged."""
    p = _iic_joint_by_displacement(x1, x2, half_window)
    p = p / p.sum(dim=(2, 3), keepdim=True)
    p = (p + p.transpose(2, 3)) / 2
    return _iic_information(p, lamb).mean()


def authors_rr(x1, x2, alpha, lamda=1.0, eps=1e-5):
    """The authors' redundancy-reduction term: the offset-0 joint J / N, symmetrised,
    -sum T log(P + eps) + lamda sum P [log(r + eps) + log(c + eps)], T = alpha I/K + (1-alpha) P."""
    k = x1.shape[1]
    a = x1.transpose(0, 1).reshape(k, -1)
    b = x2.transpose(0, 1).reshape(k, -1)
    n = a.shape[1]
    p = (a / n ** 0.5) @ (b.t() / n ** 0.5)
    p = (p + p.t()) / 2
    target = torch.eye(k, dtype=p.dtype) / k * alpha + p * (1 - alpha)
    p_i = p.sum(dim=1, keepdim=True).expand(k, k)
    p_j = p.sum(dim=0, keepdim=True).expand(k, k)
    constrained = (-p * (-lamda * torch.log(p_j + eps) - lamda * torch.log(p_i + eps))).sum()
    return -(target * torch.log(p + eps)).sum() + constrained


def _minmax_per_sample(x):
    lo = x.flatten(1).min(dim=1).values.detach().reshape(-1, *([1] * (x.dim() - 1)))
    hi = x.flatten(1).max(dim=1).values.detach().reshape(-1, *([1] * (x.dim() - 1)))
    return (x - lo) / (hi - lo + 1e-6)


def _local_ncc(u, e, window, eps=1e-5):
    ones = torch.ones((1, 1, window, window), dtype=u.dtype)
    box = lambda t: F.conv2d(t, ones, padding=window // 2)  # noqa: E731
    n = window * window
    s_u, s_e, s_uu, s_ee, s_ue = box(u), box(e), box(u * u), box(e * e), box(u * e)
    mu_u, mu_e = s_u / n, s_e / n
    cross = torch.clamp(s_ue - mu_e * s_u - mu_u * s_e + mu_u * mu_e * n, min=eps)
    var_u = torch.clamp(s_uu - 2 * mu_u * s_u + mu_u * mu_u * n, min=eps)
    var_e = torch.clamp(s_ee - 2 * mu_e * s_e + mu_e * mu_e * n, min=eps)
    return -(cross * cross / (var_u * var_e)).mean()


def authors_cc(x1, x2, image, window=5, power=0.75):
    """The authors' boundary term for 2-D maps, averaged over the two views."""
    if tuple(image.shape[-2:]) != tuple(x1.shape[-2:]):
        image = F.interpolate(image, size=tuple(x1.shape[-2:]), mode="bilinear", align_corners=False)
    dx = image - torch.roll(image, shifts=1, dims=2)
    dy = image - torch.roll(image, shifts=1, dims=3)
    edges = torch.sqrt(dx.pow(2) + dy.pow(2)).mean(dim=1, keepdim=True)
    edges = _minmax_per_sample(edges).pow(power)
    terms = []
    for x in (x1, x2):
        entropy = -(x * torch.log(x + 1e-16)).sum(dim=1, keepdim=True)
        terms.append(_local_ncc(_minmax_per_sample(entropy), edges, window))
    return sum(terms) / 2


def agreement_table(seed: int = 0) -> str:
    """Markdown: each peer against the `bimi_kernels` call that reproduces it (float64 and
    float32, B=4 K=10 64x64, two views' logits correlated as a trained network's are), the
    loss difference relative to the loss and the largest gradient difference relative to the
    largest gradient (with respect to the logits)."""
    import bimi_kernels

    rows = []
    cases = [
        ("IIC collapsed, T=1", lambda a, b, im: iic_collapsed(a, b, 1),
         "RegularizedMILoss(offsets=1, alpha=0, lamda=1, pool_offsets=True, eps_convention='clamp')",
         lambda a, b, im: bimi_kernels.RegularizedMILoss(offsets=1, alpha=0.0, pool_offsets=True, eps_convention="clamp")(a, b)),
        ("IIC uncollapsed, T=2", lambda a, b, im: iic_uncollapsed(a, b, 2),
         "RegularizedMILoss(offsets=2, alpha=0, lamda=1, eps_convention='clamp')",
         lambda a, b, im: bimi_kernels.RegularizedMILoss(offsets=2, alpha=0.0, eps_convention="clamp")(a, b)),
        ("IIC collapsed, T=1, default eps", lambda a, b, im: iic_collapsed(a, b, 1),
         "RegularizedMILoss(offsets=1, alpha=0, lamda=1, pool_offsets=True)",
         lambda a, b, im: bimi_kernels.RegularizedMILoss(offsets=1, alpha=0.0, pool_offsets=True)(a, b)),
        ("authors' RR, alpha=0.5", lambda a, b, im: authors_rr(a, b, 0.5),
         "RegularizedMILoss(offsets=0, alpha=0.5, lamda=1)",
         lambda a, b, im: bimi_kernels.RegularizedMILoss(offsets=0, alpha=0.5)(a, b)),
        ("authors' CC, 5x5, power 0.75", lambda a, b, im: authors_cc(a, b, im, 5, 0.75),
         "BoundaryCCLoss(window=5, gamma=0.75)",
         lambda a, b, im: bimi_kernels.BoundaryCCLoss(window=5, gamma=0.75)(a, b, im)),
        ("authors' RR + CC", lambda a, b, im: authors_rr(a, b, 0.5) + authors_cc(a, b, im),
         "BIMILoss()", lambda a, b, im: bimi_kernels.BIMILoss()(a, b, im)),
    ]
    for dtype in (torch.float64, torch.float32):
        for title, peer, call, ours in cases:
            g = torch.Generator().manual_seed(seed)
            logits1 = 3 * torch.randn(4, 10, 64, 64, generator=g, dtype=dtype)
            logits2 = logits1 + torch.randn(4, 10, 64, 64, generator=g, dtype=dtype)
            image = torch.rand(4, 1, 96, 96, generator=g, dtype=dtype)
            results = []
            for fn in (peer, ours):
                a = logits1.clone().requires_grad_(True)
                b = logits2.clone().requires_grad_(True)
                loss = fn(a.softmax(1), b.softmax(1), image)
                loss.backward()
                results.append((loss.detach(), a.grad, b.grad))
            (lp, gp1, gp2), (lo, go1, go2) = results
            rel = lambda x, y: ((x - y).abs().max() / y.abs().max()).item()  # noqa: E731
            rows.append(f"| {title} | `{call}` | {str(dtype)[6:]} | {lp.item():.7f} | {lo.item():.7f} | "
                        f"{rel(lo, lp):.1e} | {max(rel(go1, gp1), rel(go2, gp2)):.1e} |")
    header = ("| peer | bimi_kernels | dtype | peer loss | our loss | loss rel. diff | gradient rel. diff |\n"
              "|---|---|---|---|---|---|---|")
    return header + "\n" + "\n".join(rows)


if __name__ == "__main__":
    print(agreement_table())
