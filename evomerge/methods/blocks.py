"""Elementwise kernels run block by block on CPU, so their passes stay in the cache.

The task-arithmetic core makes about ten passes over each tensor (task vectors, trim,
weights, election, sum, add). On a tensor of millions of elements every pass goes to
main memory; on a block of :data:`BLOCK` elements the temporaries (workspace slots of
block size) stay in the last-level cache, and only the inputs and the output travel.
A block is a slice of the flattened tensors, and every step of such a kernel is
elementwise (magnitude trims count their kept range in the whole tensor; the L1 rescale
of DARE/DELLA, a sum over the whole tensor, is computed first by the method's
``prepare``), so the result is the same bit for bit. On CUDA a block would only add
kernel launches: there kernels run whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from evomerge.methods.registry import MergeInputs

BLOCK = 1 << 18  # elements: 1 MiB per float32 buffer; a K=3 TIES block uses ~12 MiB


def _blocks(tensors: Sequence[torch.Tensor | None] | None, start: int,
            stop: int) -> list[torch.Tensor | None] | None:
    return None if tensors is None else [None if t is None else t.view(-1)[start:stop]
                                         for t in tensors]


def run_in_blocks(kernel: Callable[[MergeInputs], torch.Tensor], inputs: MergeInputs,
                  block: int | None = None,
                  prepare: Callable[[MergeInputs], MergeInputs] | None = None) -> torch.Tensor:
    """``kernel(inputs)``, computed on successive blocks of the flattened tensors (and of the
    per-input caches) when they are contiguous and larger than ``block`` (default
    :data:`BLOCK`), after ``prepare(inputs)`` (what the blocks need from the whole tensors).
    The caller runs it on CPU tensors only."""
    block = BLOCK if block is None else block
    tensors, out = inputs.tensors, inputs.out
    per_element = [*tensors, *(t for cache in (inputs.positions, inputs.ranks, inputs.words)
                               for t in cache or () if t is not None)]
    numel = tensors[0].numel()
    if (numel <= block or not all(t.is_contiguous() for t in per_element)
            or out is not None and not out.is_contiguous()):
        return kernel(inputs)
    out = torch.empty_like(tensors[0]) if out is None else out
    inputs = inputs if prepare is None else prepare(inputs)
    for start in range(0, numel, block):
        stop = min(start + block, numel)
        target = out.view(-1)[start:stop]
        merged = kernel(dataclasses.replace(
            inputs, tensors=_blocks(tensors, start, stop), positions=_blocks(inputs.positions, start, stop),
            ranks=_blocks(inputs.ranks, start, stop), words=_blocks(inputs.words, start, stop),
            out=target, numel=numel))
        if merged is not target:
            target.copy_(merged)
    return out
