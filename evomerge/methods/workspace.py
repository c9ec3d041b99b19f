"""Reusable scratch memory for the merge kernels.

A kernel that is handed a :class:`Workspace` takes its temporaries from it and computes
with ``out=`` / in-place ops; one without a workspace uses a throwaway one, i.e. fresh
allocations, so the merge engine and the in-memory materializer run the same code. The
materializer keeps one workspace for all candidates: after the first candidate its slots
have grown to the largest tensor and a candidate allocates nothing large (fresh large
allocations cost a page fault per 4 KiB page, every time).

All kernels draw from the same three slots, named after their use in the task-arithmetic
core: ``stacked`` and ``masks`` (up to K × T elements each, for K task vectors of T
elements) and ``mixed`` (T elements). So the workspace stays within (2K + 1)·T elements
of the working dtype (float32 for the kernels that compute in float32), whatever
methods a search alternates between; a magnitude trim without cached positions adds slot
``keys`` (T elements of 2 or 4 bytes, :func:`~evomerge.methods.sparsify.task_vector_cuts`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class Workspace:
    """Named scratch slots: :meth:`take` returns a view of slot ``name``'s bytes as a
    tensor, growing the slot (never shrinking it) to the largest request seen.

    A view stays valid until the next :meth:`take` of the same name; different names never
    share memory, so a caller can hold one view per name at a time.
    """

    def __init__(self) -> None:
        self._slots: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: Sequence[int], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        """An uninitialized ``shape`` × ``dtype`` tensor on ``device`` backed by slot ``name``."""
        nbytes = math.prod(shape) * dtype.itemsize
        slot = self._slots.get(name)
        if slot is None or slot.numel() < nbytes or slot.device != device:
            slot = self._slots[name] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return slot[:nbytes].view(dtype).view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by all slots."""
        return sum(slot.numel() for slot in self._slots.values())

