"""Executing a plan: one output tensor from its inputs, on a compute device.

:func:`execute_op` is the one place a merge kernel runs, for the engine (:func:`iter_merged`,
streaming from memory-mapped inputs) and for the materializer alike, so both give the same
tensors bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from evomerge.engine.config import torch_dtype
from evomerge.engine.plan import MergePlan, TensorOp
from evomerge.errors import EvomergeError, ModelError
from evomerge.io.reader import ModelFolder
from evomerge.methods.registry import MergeInputs
from evomerge.methods.sparsify import Caches


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when available) → a usable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise EvomergeError(f"--device: expected cpu, cuda, cuda:N or auto, got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvomergeError("--device cuda: no CUDA device is available")
    return resolved


def work_dtype(tensors: list[torch.Tensor], config_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a kernel computes in: the config's ``dtype``, else the inputs' promoted dtype."""
    if config_dtype is not None:
        return config_dtype
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def execute_op(op: TensorOp, plan: MergePlan, tensors: list[torch.Tensor], *,
               caches: Caches | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Compute one output tensor from its input tensors (already on the compute device).

    ``caches``: what the kernel may reuse, per input its trim caches (e.g. the
    materializer's magnitude positions, DELLA ranks and random words) and a workspace of
    scratch buffers (default: none cached, fresh allocations); ``out``: a tensor of the
    output's shape and working dtype that the kernel may write the result into (the result
    is returned either way). Neither changes the result. An op with a
    :class:`~evomerge.engine.tokenizer.RowMap` re-maps its inputs' rows first. Raises :class:`ModelError` for a
    non-floating buffer that differs between inputs.
    """
    if op.crop_rows is not None:
        tensors = [t[:op.crop_rows] for t in tensors]
    if not all(t.is_floating_point() for t in tensors):
        if any(t.dtype != tensors[0].dtype or not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise ModelError(f"non-floating buffer {op.name} differs between inputs")
        return tensors[0].clone()
    dtype = work_dtype(tensors, torch_dtype(plan.config.dtype))
    tensors = [t.to(dtype) for t in tensors]
    if op.vocab is not None:  # rows in the output vocabulary's order (mergekit: after the dtype cast)
        tensors = op.vocab.apply(tensors)
    return plan.method.run(MergeInputs(tensors, op.base_index, op.shared, op.per_input, op.keys,
                                       Caches() if caches is None else caches, out))


def iter_merged(plan: MergePlan, models: dict[str, ModelFolder], device: torch.device,
                *, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, merged tensor)`` for every output tensor, in plan order."""
    out_dtype, dtype = torch_dtype(plan.config.out_dtype), torch_dtype(plan.config.dtype)
    for op in tqdm(plan.ops, desc=f"{plan.method.name} merge", unit="tensor", disable=not progress):
        # in the config's dtype already: an adapter source forms W + scale·B@A in it
        tensors = [models[model].tensor(name, dtype).to(device) for model, name in op.inputs]
        merged = execute_op(op, plan, tensors)
        if out_dtype is not None and merged.is_floating_point():
            merged = merged.to(out_dtype)
        yield op.name, merged
