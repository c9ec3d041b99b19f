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

from evomerge.merge.sparsify import Sparsify, sparsify


def sign_consensus(weighted: torch.Tensor) -> torch.Tensor:
    """TIES election: True where a task vector agrees with the sign of their weighted sum."""
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    return weighted.sign() == majority


def task_arithmetic_merge(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    densities: Sequence[float] | None = None,
    sparsify_method: Sparsify | None = None,
    consensus: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lam: float = 1.0,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    keys: Sequence[int] | None = None,
    positions: Sequence[torch.Tensor | None] | None = None,
    ranks: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Merge task vectors ``deltas`` (each ``source - base``) into ``base``.

    ``weights``/``densities``/``gammas``/``epsilons``/``keys`` are per task vector;
    ``positions``/``ranks`` are optional precomputed magnitude positions / DELLA ranks.
    Returns a new tensor in ``base.dtype``.
    """
    if not deltas:
        return base.clone()
    count = len(deltas)
    stacked = base.new_empty((count, *base.shape))
    for i, delta in enumerate(deltas):
        if sparsify_method is not None:
            delta = sparsify(
                delta, sparsify_method, densities[i] if densities else 1.0, rescale=rescale,
                gamma=gammas[i] if gammas else 0.0, epsilon=epsilons[i] if epsilons else 0.0,
                key=keys[i] if keys else 0,
                position=positions[i] if positions else None,
                rank=ranks[i] if ranks else None)
        stacked[i] = delta
    weight = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    weight = weight.reshape((count,) + (1,) * base.dim())
    stacked.mul_(weight)
    if consensus:
        mask = sign_consensus(stacked)
        mixed = (stacked * mask).sum(dim=0)
        divisor = (weight * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = weight.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)
