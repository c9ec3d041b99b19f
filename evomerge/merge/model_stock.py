"""Model Stock (Jang et al., 2024): interpolate the fine-tunes' average toward the base
by a ratio derived from the angle between their task vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def model_stock_merge(base: torch.Tensor, sources: Sequence[torch.Tensor], *,
                      filter_wise: bool = False) -> torch.Tensor:
    """Return ``t·mean(sources) + (1-t)·base`` with ``t = k·cos / (1 + (k-1)·cos)``.

    ``cos`` is the mean pairwise cosine between task vectors, over the whole tensor or
    per row (``filter_wise``); where the ratio is singular the base is kept.
    """
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [s.unsqueeze(0) if s.dim() == 1 else s for s in sources]
    else:
        w0 = base.reshape(-1)
        ws = [s.reshape(-1) for s in sources]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, first in enumerate(offsets):
        for second in offsets[i + 1:]:
            norms = torch.norm(first, dim=-1) * torch.norm(second, dim=-1)
            cosines.append(((first * second).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (count * cos) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(shape)
