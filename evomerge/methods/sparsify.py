"""Sparsification of task vectors: magnitude (TIES), outliers (breadcrumbs), random (DARE), DELLA.

All magnitude-based trims keep a range of one order: ``|delta|`` from largest to smallest,
stable, so ties break by position. A caller that trims the same task vector at many
densities (the in-memory materializer) precomputes each element's position in that order
once with :func:`magnitude_position`; a trim at any density is then one comparison pass.
Without it, the same set is found by a k-th value selection (no sort), so both paths
agree bit for bit. Semantics follow mergekit 0.1.5 (``k = max(1, int(d·n))``
for magnitude, ``gamma`` largest removed first for breadcrumbs, rank-scaled keep
probabilities per row for DELLA, optional rescale to the original L1 norm).
"""

from __future__ import annotations

import sys
from enum import Enum

import numpy as np
import torch

from evomerge.methods import blocks
from evomerge.methods.random import keep_flags, stream_words
from evomerge.methods.workspace import Workspace

_EPS = 1e-7


class Sparsify(str, Enum):
    magnitude = "magnitude"
    random = "random"
    magnitude_outliers = "magnitude_outliers"
    della = "della_magprune"


def magnitude_position(delta: torch.Tensor) -> torch.Tensor:
    """Each element's position in the stable decreasing-``|delta|`` order (int32, shaped
    like ``delta``): a magnitude trim keeping ``k`` elements keeps ``position < k``."""
    # The bits of a non-negative float32 order like its value: the ascending stable order of
    # 2**31 - 1 - bits (written over the fresh |delta|) is the decreasing-magnitude order.
    keys = delta.detach().abs().reshape(-1).float().view(torch.int32).neg_().add_(0x7FFFFFFF)
    index = torch.arange(keys.numel(), dtype=torch.int32, device=delta.device)
    order = _stable_order_cpu(keys, index) if delta.device.type == "cpu" else torch.argsort(keys, stable=True)
    position = torch.empty_like(index).scatter_(0, order, index)
    return position.reshape(delta.shape)


_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)  # int32 words of an int64


def _stable_order_cpu(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``torch.argsort(keys, stable=True)`` (int64) for flat non-negative int32 ``keys``, with
    ``index`` = their arange (int32), faster on CPU: NumPy sorts the distinct int64 values
    ``key << 32 | index`` (a SIMD sort; distinct values need no stability), whose low words
    are the order. For the 24.6M-element embedding of a 124.7M-parameter family's task
    vector, one thread: 0.46 s instead of 1.0-1.5 s for the whole of ``magnitude_position``."""
    packed = np.empty(keys.numel(), dtype=np.int64)
    words = packed.view(np.int32).reshape(-1, 2)
    words[:, _LOW] = index.numpy()
    words[:, _HIGH] = keys.numpy()
    packed.sort()
    packed &= 0xFFFFFFFF
    return torch.from_numpy(packed)


def della_rank(delta: torch.Tensor) -> torch.Tensor:
    """Per-row magnitude rank scaled to [0, 1] (0 = smallest), float32, shaped like ``delta``."""
    rows = delta.detach().reshape(1, -1) if delta.dim() < 2 else delta.detach()
    ranks = torch.argsort(torch.argsort(rows.abs().float(), dim=1, stable=True), dim=1)
    ranks = ranks.to(torch.float32) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    return ((ranks - low) / (high - low)).clamp(0, 1).reshape(delta.shape)


def _kept_range(method: Sparsify, numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Positions [start, stop) of the magnitude order that a deterministic trim keeps."""
    if method is Sparsify.magnitude:
        return 0, max(1, int(density * numel))
    target = int(density * numel)
    n_bottom = max(0, numel - target - int(gamma * numel))
    return numel - n_bottom - target, numel - n_bottom


def _top(magnitude: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the first ``count`` positions of the stable decreasing-magnitude order.

    Equivalent to ``order[:count]`` without sorting: a k-th value selection, then the
    elements tied with it are taken by position (what a stable sort does).
    """
    if count <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    if count >= magnitude.numel():
        return torch.ones_like(magnitude, dtype=torch.bool)
    threshold = torch.kthvalue(magnitude, magnitude.numel() - count + 1).values
    above = magnitude > threshold
    tied = magnitude == threshold
    missing = count - int(above.sum())
    return above | (tied & (torch.cumsum(tied, 0) <= missing))


def sparsify(delta: torch.Tensor, method: Sparsify, density: float, *, rescale: bool,
             gamma: float = 0.0, epsilon: float = 0.0, key: int = 0,
             position: torch.Tensor | None = None, rank: torch.Tensor | None = None,
             words: torch.Tensor | None = None) -> torch.Tensor:
    """Return a sparsified copy of ``delta`` (same dtype); ``key`` seeds random methods.

    ``position`` (from :func:`magnitude_position`), ``rank`` (from :func:`della_rank`) and
    ``words`` (``stream_words(key, delta.numel())``) may be passed precomputed; they are
    derived from ``delta`` and ``key`` when omitted.
    """
    if density >= 1:
        return delta
    copy = delta.clone(memory_format=torch.contiguous_format)
    return sparsify_(copy, method, density, rescale=rescale, gamma=gamma, epsilon=epsilon, key=key,
                     position=position, rank=rank, words=words)


def sparsify_(delta: torch.Tensor, method: Sparsify, density: float, *, rescale: bool,
              gamma: float = 0.0, epsilon: float = 0.0, key: int = 0,
              position: torch.Tensor | None = None, rank: torch.Tensor | None = None,
              words: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              scratch: torch.Tensor | None = None, numel: int | None = None,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`sparsify` in place: ``delta`` becomes ``delta * keep`` (rescaled); returns it.

    ``delta`` must be contiguous. ``mask`` and ``scratch`` (shaped like ``delta``, its
    dtype, contiguous) are optional scratch buffers. When ``delta`` is one block of a
    larger task vector (with ``position``/``rank``/``words`` sliced alike): ``numel`` is
    that vector's element count, which magnitude trims count their kept range in, and
    ``scale`` its L1 rescale factor (:func:`rescale_factor`).
    """
    if density >= 1:
        return delta
    if delta.numel() == 0 or density <= 0 and method in (Sparsify.magnitude, Sparsify.della):
        return delta.zero_()
    # A float mask (1 or 0): multiplying by it gives the same values as by a boolean one
    # (signed zeros included) and is several times faster, and comparisons write it directly.
    mask = torch.empty_like(delta) if mask is None else mask
    _keep(delta, method, density, gamma, epsilon, key, position, rank, words, mask.view(-1),
          None if scratch is None else scratch.view(-1), delta.numel() if numel is None else numel)
    if not rescale:
        return delta.mul_(mask)
    if scale is None:
        l1 = torch.empty_like(delta) if scratch is None else scratch
        before = l1_norm(delta, l1)
        scale = _l1_ratio(before, l1_norm(delta.mul_(mask), l1))
    else:
        delta.mul_(mask)
    return delta.mul_(scale)


def l1_norm(delta: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ|delta|`` (0-dim, ``delta``'s dtype). On CPU: the sums of successive
    ``blocks.BLOCK``-element chunks of the flattened tensor, added in order, so that
    :func:`rescale_factor`, which visits a task vector block by block, gets the same bits."""
    absolute = torch.abs(delta, out=scratch).reshape(-1)
    if delta.device.type != "cpu":
        return absolute.sum()
    total = torch.zeros((), dtype=delta.dtype, device=delta.device)
    for start in range(0, absolute.numel(), blocks.BLOCK):
        total += absolute[start:start + blocks.BLOCK].sum()
    return total


def _l1_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The factor that restores the L1 norm (1 when either norm is ~0: no rescale)."""
    if before < _EPS or after < _EPS:
        return torch.ones((), dtype=before.dtype, device=before.device)
    return before / after


def rescale_factor(source: torch.Tensor, base: torch.Tensor, method: Sparsify, density: float, *,
                   gamma: float, epsilon: float, key: int, position: torch.Tensor | None,
                   rank: torch.Tensor | None, words: torch.Tensor | None,
                   workspace: Workspace) -> torch.Tensor:
    """The L1 rescale factor :func:`sparsify_` applies to ``source - base`` (flat, contiguous
    CPU tensors with their per-element caches), computed block by block as
    :func:`l1_norm` sums, so that a blocked kernel can apply it to each block."""
    numel, before, after = source.numel(), [], []
    for start in range(0, numel, blocks.BLOCK):
        part = slice(start, start + blocks.BLOCK)
        delta = torch.sub(source[part], base[part],
                          out=workspace.take("stacked", source[part].shape, source.dtype, source.device))
        scratch = workspace.take("mixed", delta.shape, delta.dtype, delta.device)
        before.append(torch.abs(delta, out=scratch).sum())
        sparsify_(delta, method, density, rescale=False, gamma=gamma, epsilon=epsilon, key=key,
                  position=None if position is None else position[part],
                  rank=None if rank is None else rank[part], words=None if words is None else words[part],
                  mask=workspace.take("masks", delta.shape, delta.dtype, delta.device),
                  scratch=scratch, numel=numel)
        after.append(torch.abs(delta, out=scratch).sum())
    return _l1_ratio(*(sum(sums, torch.zeros((), dtype=source.dtype)) for sums in (before, after)))


def _keep(delta: torch.Tensor, method: Sparsify, density: float, gamma: float, epsilon: float,
          key: int, position: torch.Tensor | None, rank: torch.Tensor | None,
          words: torch.Tensor | None, out: torch.Tensor, scratch: torch.Tensor | None,
          numel: int) -> torch.Tensor:
    """Write the keep-mask of a sparsification into ``out`` (flat, ``delta``'s dtype: 1 keep,
    0 drop) and return it; ``scratch``: None or a flat buffer like ``out``."""
    if method in (Sparsify.magnitude, Sparsify.magnitude_outliers):
        start, stop = _kept_range(method, numel, density, gamma)
        if position is None:
            magnitude = delta.detach().abs().reshape(-1).float()
            keep = _top(magnitude, stop) & ~_top(magnitude, start)
            return out.copy_(keep.view(torch.uint8))
        torch.lt(position.reshape(-1), stop, out=out)
        if start > 0:
            out.mul_(torch.ge(position.reshape(-1), start, out=scratch))
        return out
    if words is None:
        words = stream_words(key, delta.numel(), delta.device)
    if method is Sparsify.random:
        return keep_flags(density, words.reshape(-1), out)
    if method is Sparsify.della:
        rank = della_rank(delta) if rank is None else rank
        probability = (density - epsilon) + rank * (2 * epsilon)
        return keep_flags(probability.reshape(-1), words.reshape(-1), out)
    raise ValueError(f"unknown sparsification {method!r}")  # pragma: no cover - enum is closed
