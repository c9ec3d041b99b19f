"""Linear merge / model soup: a (normalized) weighted average, computed in float32."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def linear_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
                 normalize: bool = True) -> torch.Tensor:
    """Return ``sum(w_i · x_i) / sum(w_i)`` (or without the division) in the inputs' dtype."""
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = torch.tensor(list(weights), dtype=dtype, device=first.device)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(tensors, weight.unbind(0)):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(weight.sum())
    return result.to(first.dtype)
