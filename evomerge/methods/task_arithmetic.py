"""The generalized task-arithmetic core: sparsify → weight → sign consensus → normalize.

One routine serves task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
breadcrumbs_ties, della and della_linear; the methods differ only in which sparsifier
and consensus rule they switch on and in their defaults (see ``registry.py``). The
arithmetic mirrors mergekit 0.1.5 step for step (same dtype, same reduction order), so
float32 results agree with it to the last bit or two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.methods.sparsify import Caches, Trim, sparsify_
from evomerge.methods.workspace import Workspace


def sum_rows(stacked: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The sum over dim 0. In float32/float64: ``((0 + row 0) + row 1) + …`` in row order,
    one add per row (faster on CPU than ATen's dim-0 reduction, which gives the same bits
    for up to three rows, mergekit's case with three sources, and starts from +0 like it).
    Half-precision rows are summed by ``torch.sum``, which accumulates in float32."""
    if stacked.dtype not in (torch.float32, torch.float64):
        return torch.sum(stacked, dim=0, out=out)
    out = torch.zeros_like(stacked[0]) if out is None else out.zero_()
    for row in stacked:
        out.add_(row)
    return out


def sign_consensus(weighted: torch.Tensor, *, majority: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """TIES election: 1 where a task vector agrees with the sign of their weighted sum, else 0
    (in ``weighted``'s dtype). ``majority`` (shaped like one task vector) and ``out`` (like
    ``weighted``) are optional scratch buffers."""
    majority = sum_rows(weighted, out=majority)
    majority.ge_(0).mul_(2).sub_(1)  # torch.where(sum >= 0, 1, -1), NaN → -1
    return torch.sign(weighted, out=out).eq_(majority)


def task_vectors(base: torch.Tensor, sources: Sequence[torch.Tensor],
                 workspace: Workspace | None = None) -> torch.Tensor:
    """``source - base`` for each source, stacked into one ``(K, *base.shape)`` tensor."""
    workspace = Workspace() if workspace is None else workspace
    stacked = workspace.take("stacked", (len(sources), *base.shape), base.dtype, base.device)
    for row, source in zip(stacked, sources):
        torch.sub(source, base, out=row)
    return stacked


def task_arithmetic_merge(base: torch.Tensor, deltas: Sequence[torch.Tensor] | torch.Tensor,
                          weights: Sequence[float], *, trims: Sequence[Trim | None] | None = None,
                          consensus: bool = False, normalize: bool = False, lam: float = 1.0,
                          caches: Caches | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Merge task vectors ``deltas`` (each ``source - base``) into ``base``:
    ``base + lam · Σ weight · trimmed delta`` (TIES ``consensus``: only the deltas that agree
    with the sign of the weighted sum; ``normalize``: divided by the summed weights).

    ``deltas`` is a sequence of tensors or one stacked ``(K, *base.shape)`` tensor (e.g.
    from :func:`task_vectors`), which is overwritten. ``weights``, ``trims`` (how each task
    vector is sparsified; None: not at all) and ``caches.trims`` are per task vector;
    temporaries come from ``caches.workspace``. The result (in ``base.dtype``) is written
    to ``out`` when given, else to a new tensor. When ``base`` and ``deltas`` are one block
    of larger tensors, the trim caches say so (see :class:`~evomerge.methods.sparsify.TrimCache`).
    """
    caches = Caches() if caches is None else caches
    workspace = caches.workspace
    count = len(deltas)
    if count == 0:
        return base.clone() if out is None else out.copy_(base)
    trims = trims or [None] * count
    shape, dtype, device = (count, *base.shape), base.dtype, base.device
    stacked = deltas if isinstance(deltas, torch.Tensor) else torch.stack(
        list(deltas), out=workspace.take("stacked", shape, dtype, device))
    mixed = workspace.take("mixed", base.shape, dtype, device)
    masks = workspace.take("masks", shape, dtype, device) if consensus or any(trims) else None
    for i, (row, trim) in enumerate(zip(stacked, trims)):
        if trim is not None:
            sparsify_(row, trim, caches.trim(i), mask=masks[i], scratch=mixed)
    weight = torch.tensor(list(weights), dtype=dtype, device=device).reshape((count,) + (1,) * base.dim())
    stacked.mul_(weight)
    if consensus:
        mask = sign_consensus(stacked, majority=mixed, out=masks)
        sum_rows(stacked.mul_(mask), out=mixed)
        if normalize:  # by (weight * mask).sum(0), written over the (summed) task vectors
            divisor = sum_rows(mask.mul_(weight), out=stacked[0])
            mixed /= divisor.add_(torch.eq(divisor, 0, out=masks[0]))  # divisor[divisor == 0] = 1
    else:
        sum_rows(stacked, out=mixed)
        if normalize:
            divisor = weight.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
            mixed /= divisor
    if lam != 1:
        mixed *= lam
    return torch.add(base, mixed, out=out)
