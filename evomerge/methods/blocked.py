"""Row-blocked merges: one output tensor merged in blocks of whole rows (dim 0).

A kernel on whole tensors takes temporaries of the tensor's size: the workspace's
``(2K + 1)`` slots, a magnitude cut's keys, a trim's per-row rank sort. For a vocabulary
tensor (Llama-3-8B's embedding and head: 525M elements, 8.9× its largest layer matrix)
those dominate a GPU's memory. A method whose output rows need the same rows of its inputs
only (:attr:`~evomerge.methods.registry.MergeMethod.rows`: linear and the task-arithmetic
family) is merged here in blocks of :func:`block_rows` rows, so that every temporary is
sized by the block, with the whole tensor's results bit for bit:

* elementwise steps (weights, sums, TIES's sign election and disjoint mean, DARE's random
  drop, whose words are a function of the element index: ``stream_words(start=)``) and
  DELLA's per-row ranks see a block as they see those rows of the tensor;
* a magnitude cut (TIES, breadcrumbs) is over the whole task vector: its threshold comes
  from :class:`~evomerge.methods.select.StreamedCut`'s radix-select passes over all the
  blocks first (one for 16-bit keys, two for 32-bit), its tied keys are cut in index order
  as the blocks come;
* an L1 rescale factor is a sum over the whole tensor: a pass sums ``|delta|`` before and
  after the trim, block after block, in the chunks :func:`~evomerge.methods._cpu.abs_sum`
  sums a whole tensor in (the blocks are a multiple of the chunk), so the sum is the same.

:class:`RowBlocked` is one output tensor's run: its :attr:`~RowBlocked.units` (pass, rows),
each :meth:`~RowBlocked.feed` the inputs' rows, the last pass writing the output's rows.
Trim caches are not used (their build needs the whole tensor): every trim runs cache-free.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.methods import _cpu
from evomerge.methods.registry import MergeInputs, MergeMethod, trims_for
from evomerge.methods.select import StreamedCut, key_dtype, magnitude_keys
from evomerge.methods.sparsify import Caches, Sparsify, TrimCache, kept_range, l1_ratio, l1_norm, sparsify_
from evomerge.methods.workspace import Workspace

_MAGNITUDE = (Sparsify.magnitude, Sparsify.magnitude_outliers)


def block_rows(shape: Sequence[int], limit: int, device: torch.device) -> int | None:
    """Rows per block of a tensor of ``shape`` merged on ``device`` with at most about ``limit``
    elements a block; None when it is not blocked (at most ``limit`` elements, or fewer than
    two dimensions, or when a block would hold every row). A block is a whole number of rows
    and of :func:`~evomerge.methods._cpu.sum_block` elements (the L1 sums' chunks), so its
    smallest size is lcm(chunk, columns) elements: with CPU chunks (2^18) and the usual
    hidden sizes that is a few rows, but with the 2^24-element chunks off the CPU it can be
    far above ``limit`` (896 columns: 117M elements), or above every row, and the tensor is
    merged whole (768 columns at 50257 rows) or with an odd column count never blocked."""
    if limit <= 0:
        raise ValueError(f"block limit must be positive, got {limit}")
    if len(shape) < 2:
        return None
    columns = math.prod(shape[1:])
    if shape[0] * columns <= limit:
        return None
    chunk = _cpu.sum_block(device)
    align = chunk // math.gcd(chunk, columns)  # rows whose elements fill whole chunks
    rows = max(align, limit // columns // align * align)
    return None if rows >= shape[0] else rows


def planned_passes(method: MergeMethod, dtype: torch.dtype) -> int:
    """The passes a row-blocked run of ``method`` in ``dtype`` makes over its inputs with the
    method's default ``rescale`` (as :attr:`RowBlocked.passes` counts them): the magnitude
    cut's radix-select passes, an L1 rescale's, the merge. ``rescale: true`` on a method whose
    default is false (TIES, breadcrumbs) adds one."""
    selects = (2 if key_dtype(dtype) == torch.int32 else 1) if method.sparsify in _MAGNITUDE else 0
    rescale = method.param("rescale")
    return selects + bool(method.sparsify is not None and rescale is not None and rescale.default) + 1


class RowBlocked:
    """One output tensor of ``method`` (with :attr:`~evomerge.methods.registry.MergeMethod.rows`)
    merged in blocks of ``rows`` rows: the kernel's parameters (``shared``, ``per_input``,
    ``keys``, ``base_index``, as :class:`~evomerge.methods.registry.MergeInputs` has them),
    the inputs' ``shape`` (after any crop) and ``dtype`` (the working dtype)."""

    def __init__(self, method: MergeMethod, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]],
                 keys: Sequence[int], base_index: int | None, shape: Sequence[int], dtype: torch.dtype,
                 rows: int):
        if not method.rows:
            raise ValueError(f"{method.name} does not merge in row blocks")
        self.method, self.shared, self.per_input, self.keys = method, shared, per_input, keys
        self.base_index = base_index
        self.shape = tuple(shape)
        self.numel = math.prod(shape)
        self.trims = trims_for(method.sparsify, shared, per_input, keys, base_index)
        self._cuts: list[tuple[StreamedCut, StreamedCut] | None] = []
        for trim in self.trims:
            if trim is None or trim.method not in _MAGNITUDE:
                self._cuts.append(None)
                continue
            start, stop = kept_range(trim.method, self.numel, trim.density, trim.gamma)
            self._cuts.append(tuple(StreamedCut(count, self.numel, key_dtype(dtype)) for count in (start, stop)))
        self._scales: list[torch.Tensor | None] = [None] * len(self.trims)
        self._sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        selects = max((cut.passes for cuts in self._cuts if cuts for cut in cuts), default=0)
        rescale = any(trim is not None and trim.rescale for trim in self.trims)
        self.passes: tuple[str, ...] = ("select",) * selects + ("rescale",) * rescale + ("merge",)
        blocks = [slice(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)]
        self._columns = self.numel // shape[0]
        self.units: list[tuple[int, slice]] = [(step, block) for step in range(len(self.passes)) for block in blocks]
        self._last = blocks[-1].start

    def feed(self, unit: int, tensors: Sequence[torch.Tensor], workspace: Workspace,
             out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run ``units[unit]`` on ``tensors``, the inputs' rows of that block (in the working
        dtype, contiguous), with temporaries from ``workspace``; a merge unit returns the
        block's merged rows (written to ``out``, those rows of the output, when given)."""
        step, rows = self.units[unit]
        offset = rows.start * self._columns
        kind = self.passes[step]
        if kind == "select":
            for i, cuts in enumerate(self._cuts):
                live = [cut for cut in cuts or () if cut.passes > step]
                if live:
                    keys = self._keys(tensors, i, workspace)
                    for cut in live:
                        cut.add(keys)
                        if rows.start == self._last:
                            cut.end_pass()
            return None
        trims = [self._block_cache(tensors, i, offset, workspace) for i in range(len(tensors))]
        if kind == "rescale":
            last = rows.start == self._last
            for i, trim in enumerate(self.trims):
                if trim is not None and trim.rescale:
                    self._rescale(tensors, i, trims[i], workspace, last)
            for cut in (cut for cuts in self._cuts if cuts for cut in cuts):
                if last and cut.passes:
                    cut.rewind()  # the merge pass scans the tied keys again
            return None
        caches = Caches([t if s is None else dataclasses.replace(t, scale=s) for t, s in zip(trims, self._scales)],
                        workspace)
        return self.method.run(MergeInputs(tensors, self.base_index, self.shared, self.per_input, self.keys,
                                           caches, out))

    def _delta(self, tensors: Sequence[torch.Tensor], i: int, workspace: Workspace) -> torch.Tensor:
        """Input ``i``'s task vector rows (workspace slot ``stacked``)."""
        source, base = tensors[i], tensors[self.base_index]
        return torch.sub(source, base, out=workspace.take("stacked", source.shape, source.dtype, source.device))

    def _keys(self, tensors: Sequence[torch.Tensor], i: int, workspace: Workspace) -> torch.Tensor:
        """The magnitude keys of input ``i``'s task vector rows (flat, over slot ``stacked``)."""
        delta = self._delta(tensors, i, workspace).reshape(-1)
        return magnitude_keys(delta, delta)

    def _block_cache(self, tensors: Sequence[torch.Tensor], i: int, offset: int, workspace: Workspace) -> TrimCache:
        """Input ``i``'s trim cache for the next block in index order: its offset, and a
        magnitude trim's cuts within it (a scan of its tied keys)."""
        cuts = self._cuts[i]
        if cuts is None:
            return TrimCache(numel=self.numel, offset=offset)
        keys = self._keys(tensors, i, workspace) if any(cut.scans for cut in cuts) else None
        return TrimCache(numel=self.numel, offset=offset,
                         cuts=tuple(cut.cut(keys, offset, tensors[i].numel()) for cut in cuts))  # type: ignore[arg-type]

    def _rescale(self, tensors: Sequence[torch.Tensor], i: int, cache: TrimCache, workspace: Workspace,
                 last: bool) -> None:
        """Add input ``i``'s rows to its L1 sums before and after the trim (``cache``: the
        block's); after the last block, its rescale factor."""
        delta = self._delta(tensors, i, workspace)
        scratch = workspace.take("mixed", delta.shape, delta.dtype, delta.device)
        if i not in self._sums:
            zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
            self._sums[i] = (zero, zero.clone())
        before, after = self._sums[i]
        l1_norm(delta, scratch, before)
        unscaled = dataclasses.replace(self.trims[i], rescale=False)
        sparsify_(delta, unscaled, cache, mask=workspace.take("masks", delta.shape, delta.dtype, delta.device),
                  scratch=scratch)
        l1_norm(delta, scratch, after)
        if last:
            self._scales[i] = l1_ratio(before, after)

