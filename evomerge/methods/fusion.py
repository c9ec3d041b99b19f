"""Two-model fusions that take the fine-tune's value only where it matters or is close:
NearSwap and Arcee Fusion (semantics of mergekit 0.1.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evomerge.methods.random import random_words

QUANTILE_SAMPLE = 1_000_000


def nearswap_merge(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per element, move from ``base`` to ``other`` by ``min(1, t / |other - base|)``: elements
    that differ by at most ``t`` are swapped, farther ones are moved by ``t`` toward it."""
    weight = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def fusion_importance(source: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|source - base|`` times the KL divergence of the rows' softmaxes (source ‖ base)."""
    eps = 1e-8
    p = F.softmax(source, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    return (source - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def upper_fence(values: torch.Tensor, key: int = 0) -> torch.Tensor:
    """``median + 1.5 · IQR`` of ``values``, from its sorted elements at ``⌊q·(n-1)⌋``; over
    :data:`QUANTILE_SAMPLE` elements drawn (with replacement) from the random stream
    ``key`` when it has more, so the threshold is reproducible."""
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[random_words(key, 0, QUANTILE_SAMPLE, flat.device) % flat.numel()]
    ordered = torch.sort(flat).values
    index = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long().to(ordered.device)
    q1, median, q3 = ordered[index]
    return median + 1.5 * (q3 - q1)


def arcee_fusion_merge(base: torch.Tensor, source: torch.Tensor, key: int = 0) -> torch.Tensor:
    """``base`` plus the task vector where its importance (:func:`fusion_importance`) reaches
    the upper fence of the importances (:func:`upper_fence`), else ``base``; in ``base``'s
    dtype (mergekit 0.1.5 returns float32 for half-precision inputs, its float32 mask
    promoting the sum: the same values before that last rounding)."""
    importance = fusion_importance(source, base)
    mask = (importance >= upper_fence(importance, key)).float()
    return (base + (source - base) * mask).to(base.dtype)
