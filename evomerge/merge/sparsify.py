"""Sparsification of task vectors: magnitude (TIES), outliers (breadcrumbs), random (DARE), DELLA.

All magnitude-based trims keep a range of one order: ``|delta|`` from largest to smallest,
stable, so ties break by position. A caller that trims the same task vector at many
densities (the in-memory materializer) precomputes each element's position in that order
once with :func:`magnitude_position`; a trim at any density is then one comparison pass.
Without it, the same set is found by a k-th value selection (no sort), so both paths
agree bit for bit. Semantics follow mergekit 0.1.5 (``k = max(1, int(d·n))``
for magnitude, ``gamma`` largest removed first for breadcrumbs, rank-scaled keep
probabilities per row for DELLA, optional rescale to the original L1 norm).
"""

from __future__ import annotations

from enum import Enum

import torch

from evomerge.merge.random import bernoulli_mask


class Sparsify(str, Enum):
    magnitude = "magnitude"
    random = "random"
    magnitude_outliers = "magnitude_outliers"
    della = "della_magprune"


def magnitude_position(delta: torch.Tensor) -> torch.Tensor:
    """Each element's position in the stable decreasing-``|delta|`` order (int32, shaped
    like ``delta``): a magnitude trim keeping ``k`` elements keeps ``position < k``."""
    order = torch.argsort(delta.detach().abs().reshape(-1).float(), descending=True, stable=True)
    position = torch.empty(order.numel(), dtype=torch.int32, device=delta.device)
    position[order] = torch.arange(order.numel(), dtype=torch.int32, device=delta.device)
    return position.reshape(delta.shape)


def della_rank(delta: torch.Tensor) -> torch.Tensor:
    """Per-row magnitude rank scaled to [0, 1] (0 = smallest), float32, shaped like ``delta``."""
    rows = delta.detach().reshape(1, -1) if delta.dim() < 2 else delta.detach()
    ranks = torch.argsort(torch.argsort(rows.abs().float(), dim=1, stable=True), dim=1)
    ranks = ranks.to(torch.float32) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    return ((ranks - low) / (high - low)).clamp(0, 1).reshape(delta.shape)


def _kept_range(method: Sparsify, numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Positions [start, stop) of the magnitude order that a deterministic trim keeps."""
    if method is Sparsify.magnitude:
        return 0, max(1, int(density * numel))
    target = int(density * numel)
    n_bottom = max(0, numel - target - int(gamma * numel))
    return numel - n_bottom - target, numel - n_bottom


def _top(magnitude: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the first ``count`` positions of the stable decreasing-magnitude order.

    Equivalent to ``order[:count]`` without sorting: a k-th value selection, then the
    elements tied with it are taken by position (what a stable sort does).
    """
    if count <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    if count >= magnitude.numel():
        return torch.ones_like(magnitude, dtype=torch.bool)
    threshold = torch.kthvalue(magnitude, magnitude.numel() - count + 1).values
    above = magnitude > threshold
    tied = magnitude == threshold
    missing = count - int(above.sum())
    return above | (tied & (torch.cumsum(tied, 0) <= missing))


def _rescale_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def sparsify(delta: torch.Tensor, method: Sparsify, density: float, *, rescale: bool,
             gamma: float = 0.0, epsilon: float = 0.0, key: int = 0,
             position: torch.Tensor | None = None, rank: torch.Tensor | None = None) -> torch.Tensor:
    """Return a sparsified copy of ``delta`` (same dtype); ``key`` seeds random methods.

    ``position`` (from :func:`magnitude_position`) and ``rank`` (from :func:`della_rank`)
    may be passed precomputed; they are derived from ``delta`` when omitted.
    """
    if density >= 1:
        return delta
    numel = delta.numel()
    if method in (Sparsify.magnitude, Sparsify.magnitude_outliers):
        if numel == 0 or (density <= 0 and method is Sparsify.magnitude):
            return torch.zeros_like(delta)
        start, stop = _kept_range(method, numel, density, gamma)
        if position is not None:
            mask = position < stop
            if start > 0:
                mask &= position >= start
        else:
            magnitude = delta.detach().abs().reshape(-1).float()
            mask = (_top(magnitude, stop) & ~_top(magnitude, start)).reshape(delta.shape)
        kept = delta * mask
    elif method is Sparsify.random:
        kept = delta * bernoulli_mask(density, delta.shape, key, delta.device)
    elif method is Sparsify.della:
        if density <= 0:
            return torch.zeros_like(delta)
        rank = della_rank(delta) if rank is None else rank
        probability = (density - epsilon) + rank * (2 * epsilon)
        kept = delta * bernoulli_mask(probability, delta.shape, key, delta.device)
    else:  # pragma: no cover - enum is closed
        raise ValueError(f"unknown sparsification {method!r}")
    return _rescale_l1(delta, kept) if rescale else kept
