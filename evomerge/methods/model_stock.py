"""Model Stock (Jang et al., 2024): interpolate the fine-tunes' average toward the base
by a ratio derived from the angle between their task vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.methods.task_arithmetic import task_vectors
from evomerge.methods.workspace import Workspace


def model_stock_merge(base: torch.Tensor, sources: Sequence[torch.Tensor], *,
                      filter_wise: bool = False, workspace: Workspace | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``t·mean(sources) + (1-t)·base`` with ``t = k·cos / (1 + (k-1)·cos)``.

    ``cos`` is the mean pairwise cosine between task vectors, over the whole tensor or
    per row (``filter_wise``); where the ratio is singular the base is kept. The result
    is written to ``out`` when given; temporaries come from ``workspace``.
    """
    workspace = Workspace() if workspace is None else workspace
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device) if out is None else out

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        if filter_wise:
            return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor
        return tensor.reshape(-1)

    w0, ws = rows(base), [rows(s) for s in sources]
    offsets = [rows(offset) for offset in task_vectors(base, sources, workspace)]
    norms = [torch.norm(offset, dim=-1) for offset in offsets]
    product = workspace.take("masks", w0.shape, w0.dtype, w0.device)
    cosines = []
    for i, first in enumerate(offsets):
        for j in range(i + 1, len(offsets)):
            dot = torch.mul(first, offsets[j], out=product).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (count * cos) / safe)
    average = torch.add(ws[0], 0, out=product)  # sum(ws) / count, as Python's sum adds them
    for w in ws[1:]:
        average += w
    average /= count
    # t * average + (1 - t) * w0
    torch.mul(w0, 1 - t, out=rows(out)).add_(average.mul_(t))
    return out
