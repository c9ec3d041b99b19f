"""The CPU fast paths of the kernels, each beside the plain torch computation it equals.

:func:`fast` is the one place the device chooses: on a CPU tensor the fast path runs, on
any other device the plain torch path (the reference, which the property tests compare
the fast path with). Three fast paths:

* :func:`stable_order`: a stable ascending order of int32 keys by NumPy's sort of the
  distinct int64 values ``key << 32 | index`` (the reference: ``torch.argsort(stable=True)``);
* :func:`abs_sum`: a sum over a flat tensor as the sums of its successive chunks of
  :func:`sum_block` elements (:data:`BLOCK` on CPU), added in order, so a blocked kernel,
  which sees one block at a time (a multiple of the chunk), gets the same bits; the chunks
  are the same on every device (larger off the CPU, where each is a kernel launch);
* :func:`run_in_blocks`: an elementwise kernel computed on successive blocks of the
  flattened tensors (and of their per-input caches), so its temporaries (workspace slots
  of block size) stay in the last-level cache (the reference: the kernel on the whole
  tensors). Every step of such a kernel is elementwise (magnitude trims count their kept
  range in the whole tensor; an L1 rescale, a sum over the whole tensor, is computed first
  by the method's ``prepare``), so the result is the same bit for bit.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from evomerge.methods.registry import MergeInputs

BLOCK = 1 << 18  # elements: 1 MiB per float32 buffer
DEVICE_SUM_BLOCK = 1 << 24  # elements per partial sum of abs_sum off the CPU (a launch each)


def fast(tensor: torch.Tensor) -> bool:
    """Whether the CPU fast paths serve ``tensor``: it is on the CPU."""
    return tensor.device.type == "cpu"


_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)  # int32 words of an int64


def stable_order(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``torch.argsort(keys, stable=True)`` (int64) for flat non-negative int32 ``keys``, with
    ``index`` = their arange (int32)."""
    if not fast(keys):
        return torch.argsort(keys, stable=True)
    # distinct values need no stable sort: the low words of the sorted packed values are the order
    packed = np.empty(keys.numel(), dtype=np.int64)
    words = packed.view(np.int32).reshape(-1, 2)
    words[:, _LOW] = index.numpy()
    words[:, _HIGH] = keys.numpy()
    packed.sort()
    packed &= 0xFFFFFFFF
    return torch.from_numpy(packed)


def sum_block(device: torch.device) -> int:
    """The elements per partial sum of :func:`abs_sum` on ``device``."""
    return BLOCK if device.type == "cpu" else DEVICE_SUM_BLOCK


def abs_sum(absolute: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """The sum (0-dim, its dtype) of flat ``absolute`` as ``((total + Σ chunk 0) + Σ chunk 1) + …``
    over chunks of :func:`sum_block` elements; ``total`` (default: a new 0) is added to in
    place, so that the sums of successive blocks, each a multiple of the chunk but the last,
    continue one sum."""
    total = torch.zeros((), dtype=absolute.dtype, device=absolute.device) if total is None else total
    step = sum_block(absolute.device)
    for start in range(0, absolute.numel(), step):
        total += absolute[start:start + step].sum()
    return total


def run_in_blocks(kernel: Callable[[MergeInputs], torch.Tensor], inputs: MergeInputs,
                  block: int | None = None,
                  prepare: Callable[[MergeInputs], MergeInputs] | None = None) -> torch.Tensor:
    """``kernel(inputs)`` for an elementwise ``kernel``; on CPU, when the tensors (and their
    caches) are contiguous and larger than ``block`` (default :data:`BLOCK`), computed on
    successive blocks of them after ``prepare(inputs)`` (what the blocks need from the whole
    tensors)."""
    block = BLOCK if block is None else block
    tensors, out, trims = inputs.tensors, inputs.out, inputs.caches.trims
    per_element = [*tensors, *(t for trim in trims for t in trim.tensors())]
    numel = tensors[0].numel()
    if (not fast(tensors[0]) or numel <= block or not all(t.is_contiguous() for t in per_element)
            or out is not None and not out.is_contiguous()):
        return kernel(inputs)
    out = torch.empty_like(tensors[0]) if out is None else out
    inputs = inputs if prepare is None else prepare(inputs)
    for start in range(0, numel, block):
        part = slice(start, min(start + block, numel))
        target = out.view(-1)[part]
        # every input's cache, present or not, learns the block's offset (random words, cuts)
        caches = dataclasses.replace(inputs.caches, trims=[inputs.caches.trim(i).block(part, numel)
                                                           for i in range(len(tensors))])
        merged = kernel(dataclasses.replace(inputs, tensors=[t.view(-1)[part] for t in tensors],
                                            caches=caches, out=target))
        if merged is not target:
            target.copy_(merged)
    return out
