"""Linear merge / model soup: a (normalized) weighted average, computed in float32."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.methods.workspace import Workspace


def linear_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
                 normalize: bool = True, workspace: Workspace | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``sum(w_i · x_i) / sum(w_i)`` (or without the division) in the inputs' dtype,
    written to ``out`` when given; the float32 accumulator comes from ``workspace``."""
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = torch.tensor(list(weights), dtype=dtype, device=first.device)
    out = torch.empty(first.shape, dtype=first.dtype, device=first.device) if out is None else out
    workspace = Workspace() if workspace is None else workspace
    result = out if out.dtype == dtype else workspace.take("mixed", first.shape, dtype, first.device)
    result.zero_()
    for tensor, coefficient in zip(tensors, weight.unbind(0)):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(weight.sum())
    return out if result is out else out.copy_(result)
