"""Spherical linear interpolation between two whole tensors (mergekit semantics)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from evomerge.methods.workspace import Workspace

DOT_THRESHOLD = 0.9995
_CHUNK = 1024 * 1024


def slerp_merge(t: float, v0: torch.Tensor, v1: torch.Tensor, *, eps: float = 1e-8,
                workspace: Workspace | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Interpolate from ``v0`` (t = 0) to ``v1`` (t = 1) along the great circle.

    Directions are compared on the flattened tensors; nearly collinear pairs
    (|cos| > 0.9995) fall back to linear interpolation. Float32 math, output in v0's dtype,
    written to ``out`` when given. Everything runs in 1M-element chunks, so the scratch
    (two chunks from ``workspace``) does not grow with the tensor.
    """
    workspace = Workspace() if workspace is None else workspace
    out = torch.empty(v0.shape, dtype=v0.dtype, device=v0.device) if out is None else out
    if v0.numel() == 0:
        return out
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    chunks_a, chunks_b = v0.reshape(-1).split(_CHUNK), v1.reshape(-1).split(_CHUNK)

    def compute(op: Callable | None, chunk: torch.Tensor, scalar: torch.Tensor | None,
                slot: str) -> torch.Tensor:
        """``op(chunk in the compute dtype, scalar)`` in workspace slot ``slot``."""
        buffer = workspace.take(slot, chunk.shape, dtype, chunk.device)
        if chunk.dtype != dtype:
            chunk = buffer.copy_(chunk)
        return chunk if op is None else op(chunk, scalar, out=buffer)

    # Reduce in 1M-element chunks (as mergekit does): one float32 reduction over tens of
    # millions of elements loses enough precision to push the cosine of an embedding
    # matrix past the linear-fallback threshold.
    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(compute(None, x, None, "stacked")) for x in chunks_a]))
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(compute(None, y, None, "stacked")) for y in chunks_b]))
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([
        compute(torch.div, x, norm_a, "stacked").mul_(compute(torch.div, y, norm_b, "masks")).sum()
        for x, y in zip(chunks_a, chunks_b)]).sum().clamp(-1, 1)
    t_ = torch.tensor(t, dtype=dtype, device=v0.device)
    if dot.abs() > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t_, t_
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t_) * theta) / sin_theta
        coef_b = torch.sin(t_ * theta) / sin_theta
    # coef_a * a + coef_b * b, chunk by chunk, cast to the output dtype
    for target, x, y in zip(out.view(-1).split(_CHUNK), chunks_a, chunks_b):
        target.copy_(compute(torch.mul, x, coef_a, "stacked").add_(compute(torch.mul, y, coef_b, "masks")))
    return out
