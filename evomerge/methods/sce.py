"""SCE (Wan et al., 2024, arXiv:2408.07990): select, calculate, erase.

*Select* keeps the ``select_topk`` fraction of elements where the task vectors vary most
across the models (the largest variances, counted among the nonzero ones); *calculate*
weighs each model's task vector by its mean squared value (normalized to sum to 1);
*erase* drops, per element, the task vectors whose sign disagrees with the sign of their
sum (TIES's election, :func:`~evomerge.methods.task_arithmetic.sign_consensus`). The
merged task vector is the weighted mean of the survivors. Semantics follow mergekit 0.1.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.methods.sparsify import magnitude_position, top_mask
from evomerge.methods.task_arithmetic import sign_consensus, task_vectors
from evomerge.methods.workspace import Workspace


def variance_mask(deltas: torch.Tensor, fraction: float, *, order: torch.Tensor | None = None) -> torch.Tensor:
    """1 where the variance across ``deltas`` (stacked, ``(K, *shape)``) is among the
    ``int(nonzero · fraction)`` largest (ties by position), else 0, in ``deltas``' dtype and
    shaped like one task vector. ``order``: the variances' positions in the stable
    decreasing order (:func:`~evomerge.methods.sparsify.magnitude_position`), if known."""
    shape = deltas.shape[1:]
    if fraction >= 1:
        return torch.ones(shape, dtype=deltas.dtype, device=deltas.device)
    if fraction <= 0:
        return torch.zeros(shape, dtype=deltas.dtype, device=deltas.device)
    variance = torch.var(deltas, dim=0, unbiased=False)
    count = int(torch.count_nonzero(variance) * fraction)
    if order is not None:
        return (order.reshape(shape) < count).to(deltas.dtype)
    return top_mask(variance.abs().reshape(-1), count).reshape(shape).to(deltas.dtype)


def variance_order(base: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each element's position in the stable decreasing order of the variance across the task
    vectors ``sources - base`` (int32, shaped like ``base``): :func:`variance_mask` keeps
    ``position < count``."""
    variance = torch.var(task_vectors(base, sources), dim=0, unbiased=False)
    return magnitude_position(variance)


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Per task vector its mean square, divided by their sum (uniform when that is ~0)."""
    weights = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def sce_merge(base: torch.Tensor, sources: Sequence[torch.Tensor], *, select_topk: float = 1.0,
              order: torch.Tensor | None = None, workspace: Workspace | None = None) -> torch.Tensor:
    """``base`` plus the SCE merge of the task vectors ``sources - base`` (see the module doc).

    ``order``: the variance order of these task vectors (for a selection at any
    ``select_topk`` in one pass; the in-memory materializer caches it). ``int8_mask`` of
    mergekit only changes the mask's storage, never a value, so it has no argument here.
    """
    if not sources:
        return base
    deltas = task_vectors(base, sources, workspace)
    if select_topk < 1:
        deltas.mul_(variance_mask(deltas, select_topk, order=order))
    keep = sign_consensus(deltas)
    weights = sce_weights(deltas).reshape((-1,) + (1,) * base.dim()) * keep
    merged = (deltas * weights).sum(dim=0) / torch.sum(weights, dim=0).clamp(min=1e-6)
    return base + merged
