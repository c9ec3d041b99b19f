"""Reinforced agent merging (RAM, arXiv:2601.13572) and its tensor-local variant RAM+.

Per element, only the task vectors that change it (``|delta| > epsilon``) count: an element
changed by one model takes that model's change, one changed by several takes their mean.
RAM+ (``ramplus_tl``) also rescales each model's unique changes by
``1 + r · min(alpha, shared / unique)``, the ratio of its elements it shares with other
models to those only it changes, counted over the tensor. Semantics follow mergekit 0.1.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.methods.task_arithmetic import task_vectors
from evomerge.methods.workspace import Workspace


def ram_merge(base: torch.Tensor, sources: Sequence[torch.Tensor], *, epsilon: float = 1e-5,
              plus: tuple[float, float] | None = None, workspace: Workspace | None = None) -> torch.Tensor:
    """``base`` plus the RAM merge of the task vectors ``sources - base``; ``plus = (r, alpha)``:
    RAM+ (tensor-local) with those settings. In ``base``'s dtype (mergekit 0.1.5 returns
    RAM+ in float32 for half-precision inputs, its float32 factors promoting the sum: the
    same values before that last rounding)."""
    if not sources:
        return base
    deltas = task_vectors(base, sources, workspace).view(len(sources), -1)
    changed = deltas.abs() > epsilon
    count = changed.sum(dim=0, keepdim=True)
    shared, unique = count > 1, count == 1
    deltas = deltas * changed
    mean_shared = deltas * shared / count.clamp(min=1)
    if plus is None:
        mixed = (deltas * unique + mean_shared).sum(dim=0, keepdim=True)
    else:
        r, alpha = plus
        ratio = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
        factor = 1 + r * ratio.clamp(min=0, max=alpha)
        mixed = (deltas * unique * factor.unsqueeze(-1) + mean_shared).sum(dim=0, keepdim=True)
    return (base + mixed.reshape_as(base)).to(base.dtype)
