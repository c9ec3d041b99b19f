"""The materializer's inputs at run time: a :class:`~evomerge.live.tiers.TierPlan`'s device and
host tiers held in memory, and each op's inputs brought to the kernels.

:meth:`TieredInputs.stream` yields, op after op, every part (:class:`~evomerge.live.tiers.Part`)
the op reads, or the rows of it that one row block of the op reads, on the device in the dtype
its kernels get: a device-tier tensor (or those rows of it) itself, or a view of a staging buffer
the part (its rows, read alone from the files) was copied into along its
:func:`~evomerge.live.tiers.route`. On
CUDA the copies run on a copy stream into one of two buffer sets, the next op's while the current
op's kernels run: the next op's copies are issued before the current op is yielded, each set's
reuse waits (on the copy stream) for the kernels of the op that read it, a host buffer's reuse
waits (on the host) for the copies out of it, and the consumer's stream waits for its op's copies
before its kernels start. On CPU the copies are plain and synchronous, into one buffer set.

Resident tensors are copies, never the mapped file pages: on CPU in the same dtype ``.to()``
would return the pages themselves, which the kernel may evict and re-read from disk. Buffers
grow to the largest part they have held and are reused by every later candidate.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import TypeAlias
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from evomerge.io.adapter import AdapterFolder
from evomerge.live.tiers import Folder, Key, Part, TierPlan, route

Index: TypeAlias = "tuple[slice, ...] | None"  # which elements of a part an op reads: ``part[index]``; None: all
Need: TypeAlias = "Mapping[Key, Index]"  # the parts one op (or one row block of it) reads


class TieredInputs:
    """The inputs of ``plan`` over ``folders`` (opened as the plan's): its device and host tiers
    loaded now (``progress``: a bar), the others read per candidate."""

    def __init__(self, plan: TierPlan, folders: Mapping[Path, Folder], *, progress: bool = False):
        self.plan = plan
        self.device = plan.device
        self.folders = folders
        self.cuda = self.device.type == "cuda"
        self.parts = {part.key: part for part in plan.parts}
        self.tiers = plan.tier_of()
        self.kept: dict[Key, torch.Tensor] = {}  # the device and host tiers
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._sets = 2 if self.cuda else 1
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._consumer = torch.cuda.current_stream(self.device)  # the stream the kernels run on
            self._copied = [torch.cuda.Event() for _ in range(self._sets)]  # a set's copies issued
            self._read = [torch.cuda.Event() for _ in range(self._sets)]  # its op's kernels issued
        loaded = [part for part in plan.parts if self.tiers[part.key] != "mmap"]
        for part in tqdm(loaded, desc="loading models", unit="tensor", disable=not progress):
            self.kept[part.key] = self._load(part, self.tiers[part.key] == "device")

    def _files(self, part: Part, index: Index = None) -> torch.Tensor:
        """``part`` (``part[index]``: for a dense part, rows ``(slice,)`` only, read alone) as the
        files (or an adapter's reader) hold it, on the CPU."""
        folder = self.folders[part.path]
        if isinstance(folder, AdapterFolder):
            factor = getattr(folder.factors[part.name], part.role)
            return factor if index is None else factor[index]
        return folder.tensor(part.name) if index is None else folder.rows(part.name, *index)

    def _load(self, part: Part, on_device: bool) -> torch.Tensor:
        tensor = self._files(part)
        if on_device:
            return nn.Parameter(tensor.to(self.device, part.kept, copy=True), requires_grad=False)
        return torch.empty(part.shape, dtype=part.kept, pin_memory=True).copy_(tensor)

    def resident(self, key: Key) -> nn.Parameter | None:
        """The device tier's tensor of ``key`` when the kernels get it as it is (else None)."""
        part = self.parts[key]
        return self.kept[key] if self.tiers[key] == "device" and part.kept == part.target else None

    def stream(self, needs: Sequence[Need]) -> Iterator[dict[Key, torch.Tensor]]:
        """For each entry of ``needs`` (the parts of one op or row block, with the elements
        it reads of each), those parts on the device in the dtype the kernels get. A yielded
        tensor may be a staging buffer's: it is valid until the next one is asked for, and
        must not be written to."""
        ahead: deque[dict[Key, torch.Tensor]] = deque()
        for index in range(len(needs)):
            while len(ahead) < self._sets and index + len(ahead) < len(needs):
                following = index + len(ahead)
                ahead.append(self._bring(needs[following], following % self._sets))
            current = ahead.popleft()
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self._copied[index % self._sets])
            try:
                yield current
            finally:  # also when the caller stops early (zip, an error): the next reuse must wait
                if self.cuda:
                    self._read[index % self._sets].record(torch.cuda.current_stream(self.device))

    def _bring(self, need: Need, buffer_set: int) -> dict[Key, torch.Tensor]:
        """Issue the copies of ``need``'s parts into buffer set ``buffer_set``; their tensors."""
        if self.cuda:
            self._consumer = torch.cuda.current_stream(self.device)
            self._copied[buffer_set].synchronize()  # the host buffers' last copies out are done
            self._copy_stream.wait_event(self._read[buffer_set])  # the device buffers' last readers are done
        brought, used = {}, {}
        with torch.cuda.stream(self._copy_stream) if self.cuda else contextlib.nullcontext():
            for key, index in need.items():
                part = self.parts[key]
                tier = self.tiers[key]
                if tier == "mmap":
                    tensor = self._files(part, index)
                else:
                    tensor = self.kept[key] if index is None else self.kept[key][index]
                for step in route(part, tier, self.cuda):
                    group = (step.kind, step.dtype, bool(part.role))
                    slot = used[group] = used.get(group, -1) + 1
                    buffer = self._buffer((buffer_set, *group, slot), tensor.numel()).view(tensor.shape)
                    tensor = buffer.copy_(tensor, non_blocking=step.kind == "land")
                brought[key] = tensor
            if self.cuda:
                self._copied[buffer_set].record(self._copy_stream)
        return brought

    def _buffer(self, key: tuple, numel: int) -> torch.Tensor:
        """Staging buffer ``key`` = (set, step kind, dtype, a factor's, index), at least ``numel`` long."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            kind, dtype = key[1], key[2]
            if kind == "host":
                buffer = torch.empty(numel, dtype=dtype, pin_memory=self.cuda)
            else:  # on CUDA allocated on the copy stream; the consumer's use is recorded for its release
                buffer = torch.empty(numel, dtype=dtype, device=self.device)
                if self.cuda:
                    buffer.record_stream(self._consumer)
            self._buffers[key] = buffer
        return buffer[:numel]
