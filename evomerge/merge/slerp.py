"""Spherical linear interpolation between two whole tensors (mergekit semantics)."""

from __future__ import annotations

import torch

DOT_THRESHOLD = 0.9995
_CHUNK = 1024 * 1024


def slerp_merge(t: float, v0: torch.Tensor, v1: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Interpolate from ``v0`` (t = 0) to ``v1`` (t = 1) along the great circle.

    Directions are compared on the flattened tensors; nearly collinear pairs
    (|cos| > 0.9995) fall back to linear interpolation. Float32 math, output in v0's dtype.
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    if a.numel() == 0:
        return v0.clone()
    # Reduce in 1M-element chunks (as mergekit does): one float32 reduction over tens of
    # millions of elements loses ~1e-3 relative precision, enough to push the cosine of
    # an embedding matrix past the linear-fallback threshold.
    chunks_a, chunks_b = a.split(_CHUNK), b.split(_CHUNK)
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in chunks_a]))
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(y) for y in chunks_b]))
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((x / norm_a) * (y / norm_b)).sum()
                       for x, y in zip(chunks_a, chunks_b)]).sum().clamp(-1, 1)
    t_ = torch.tensor(t, dtype=dtype, device=a.device)
    if dot.abs() > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t_, t_
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t_) * theta) / sin_theta
        coef_b = torch.sin(t_ * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(v0.shape).to(v0.dtype)
