"""Interpolation and means on the hypersphere: NuSLERP, Multi-SLERP and the Karcher mean.

All three split each tensor into a direction (a point on the unit sphere) and a norm, combine
the directions along great circles and rescale by the (weighted) norms; with a base, they
work on the task vectors (``source - base``) and add the base back. Semantics and the order
of operations follow mergekit 0.1.5 (``nuslerp``, ``multislerp``, ``karcher``), in the
inputs' dtype (the Karcher mean's norms in float32, float64 for float64 inputs), so float32
results agree with it to a few ulp.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.errors import ModelError


def _unit_rows(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False,
            flatten: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """SLERP from ``v0`` (t = 0) to ``v1`` (t = 1), over the flattened tensors (``flatten``),
    else per row (each slice along the last dim) or per column (``row_wise``: along dim 0).

    Unlike :func:`~evomerge.methods.slerp.slerp_merge` the norms are not renormalized: the
    great-circle formula is applied to the tensors themselves, and (nearly) collinear pairs
    (``1 - cos² <= eps²``) are interpolated linearly. Returns a tensor shaped like ``v0``.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = torch.sum(_unit_rows(v0) * _unit_rows(v1), dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, 0, cos))  # finite on both branches
    sin_theta = torch.sin(theta)
    curved = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(collinear, (1 - t) * v0 + t * v1, curved)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None,
                  *, row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """NuSLERP of two tensors with per-model ``weights`` (t = w₁ / (w₀ + w₁), 0.5 when the
    weights sum to ~0); with ``base``, of their task vectors, added back to the base."""
    first, second = tensors
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is None:
        return nuslerp(t, first, second, row_wise=row_wise, flatten=flatten)
    return base + nuslerp(t, first - base, second - base, row_wise=row_wise, flatten=flatten)


def multislerp_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                     base: torch.Tensor | None = None, *, normalize_weights: bool = True,
                     eps: float = 1e-8) -> torch.Tensor:
    """Barycentric interpolation of any number of tensors on the hypersphere (Multi-SLERP).

    The unit directions are averaged with ``weights`` (divided by their sum when
    ``normalize_weights``), projected to the tangent space at that mean, combined there and
    mapped back with the exponential map; the result has the weighted mean of the norms.
    With ``base``: of the task vectors, plus the base. One tensor is returned unchanged.
    Raises :class:`ModelError` when the weighted directions cancel out (three or more
    tensors; two fall back to a linear combination).
    """
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors), dim=0)
    if base is not None:
        stacked -= base
    rows = stacked.view(stacked.shape[0], -1)
    weight = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        weight = weight / weight.sum()
    norms = torch.norm(rows, dim=-1, keepdim=True)
    units = rows / (norms + eps)
    mean = (units * weight.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ModelError("multislerp: the weighted directions of the inputs cancel out "
                             "(antipodal inputs with balancing weights); change the weights")
        result = (stacked[0] * weight[0] + stacked[1] * weight[1]).view(stacked.shape[1:])
        return result if base is None else result + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weight.view(-1, 1)).sum(0)
    angle = torch.norm(tangent) + eps
    result = mean * torch.cos(angle) + tangent * (torch.sin(angle) / angle)
    result = (result * (norms.squeeze(-1) * weight).sum()).view(stacked.shape[1:])
    return result if base is None else result + base


def karcher_merge(tensors: Sequence[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The equally weighted Karcher (Riemannian) mean of the tensors' directions, scaled by
    their mean norm.

    Directions of norm <= ``tol`` are left out of the mean (their norms still count in the
    scale); the mean starts at the normalized average direction and takes up to
    ``max_iter`` Riemannian gradient steps, stopping when the step is shorter than ``tol``.
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    alpha = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(x.to(dtype)) for x in tensors]
    kept = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not kept:
        return sum(x * 0 for x in tensors)
    total = sum(alpha[i] for i in kept)
    share = [alpha[i] / total for i in kept]
    units = [(tensors[i] / norms[i]).to(tensors[i].dtype) for i in kept]

    def unit(x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x.to(dtype))
        return x if norm.item() <= tol else (x / norm).to(x.dtype)

    mean = torch.zeros_like(units[0])
    for a, u in zip(share, units):
        mean += a * u
    start = torch.linalg.vector_norm(mean.to(dtype))
    mean = units[0].clone() if start.item() < tol else (mean / start).to(mean.dtype)
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for a, u in zip(share, units):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() >= tol:
                step += a * (theta / torch.sin(theta)) * (u - dot * mean)
        length = torch.linalg.vector_norm(step.to(dtype))
        if length.item() < tol:
            break
        mean = unit((torch.cos(length) * mean + torch.sin(length) * (step / length)).to(mean.dtype))
    return sum(a * norm for a, norm in zip(alpha, norms)) * mean
