"""Sparsification of task vectors: magnitude (TIES), outliers (breadcrumbs), random (DARE), DELLA.

All magnitude-based trims keep a range of one order: ``|delta|`` from largest to smallest,
stable, so ties break by position. A caller that trims the same task vector at many
densities (the in-memory materializer) precomputes each element's position in that order
once with :func:`magnitude_position`; a trim at any density is then one comparison pass.
Without it, the same set is found by a k-th value selection (no sort), so both paths
agree bit for bit. Semantics follow mergekit 0.1.5 (``k = max(1, int(d·n))``
for magnitude, ``gamma`` largest removed first for breadcrumbs, rank-scaled keep
probabilities per row for DELLA, optional rescale to the original L1 norm).

What a trim may be given precomputed is a :class:`TrimCache` per task vector; which of its
fields each sparsifier uses is declared once, by :attr:`Sparsify.caches`. A kernel gets
them, for all its inputs, with its scratch :class:`Workspace`, as one :class:`Caches`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from evomerge.methods import _cpu
from evomerge.methods.random import keep_flags, stream_words
from evomerge.methods.workspace import Workspace

_EPS = 1e-7


class Sparsify(str, Enum):
    magnitude = "magnitude"
    random = "random"
    magnitude_outliers = "magnitude_outliers"
    della = "della_magprune"

    @property
    def caches(self) -> tuple[str, ...]:
        """The :class:`TrimCache` fields this trim uses: without them it derives them from
        the whole task vector (or its key), so it cannot run on one block of it."""
        return _CACHES[self]


_CACHES = {Sparsify.magnitude: ("position",), Sparsify.magnitude_outliers: ("position",),
           Sparsify.random: ("words",), Sparsify.della: ("rank", "words")}
CACHE_KINDS = tuple(dict.fromkeys(kind for kinds in _CACHES.values() for kind in kinds))
CACHE_ITEMSIZE = 4  # bytes an element of every cache kind (int32 positions and words, float32 ranks)


@dataclass(frozen=True)
class Trim:
    """How one task vector is sparsified: ``method`` keeps about ``density`` of it (``>= 1``:
    all), ``rescale`` restores its L1 norm; ``gamma``: the largest fraction breadcrumbs drop,
    ``epsilon``: the spread of DELLA's keep probabilities, ``key``: the random stream of
    random and DELLA trims (see :func:`~evomerge.methods.random.random_key`)."""

    method: Sparsify
    density: float
    rescale: bool = False
    gamma: float = 0.0
    epsilon: float = 0.0
    key: int = 0


@dataclass(frozen=True, eq=False)
class TrimCache:
    """What a trim of one task vector ``delta`` may be given instead of deriving it (each
    None: derived when needed): ``position`` = :func:`magnitude_position` (``delta``),
    ``rank`` = :func:`della_rank` (``delta``), ``words`` = ``stream_words(key, delta.numel())``,
    each shaped like ``delta`` or flat. When ``delta`` is one block of a larger task vector
    (the caches sliced alike, :meth:`block`): ``numel`` is that vector's element count, in
    which magnitude trims count their kept range, and ``scale`` its L1 rescale factor
    (:func:`rescale_factor`)."""

    position: torch.Tensor | None = None
    rank: torch.Tensor | None = None
    words: torch.Tensor | None = None
    numel: int | None = None
    scale: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """The per-element caches present."""
        return [t for t in (self.position, self.rank, self.words) if t is not None]

    def holds(self, method: Sparsify) -> bool:
        """Whether every cache ``method`` uses is present."""
        return all(getattr(self, kind) is not None for kind in method.caches)

    def block(self, part: slice, numel: int) -> TrimCache:
        """The cache of elements ``part`` of the flattened task vector of ``numel`` elements."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.reshape(-1)[part]
        return dataclasses.replace(self, position=cut(self.position), rank=cut(self.rank),
                                   words=cut(self.words), numel=numel)


NO_CACHE = TrimCache()


@dataclass(frozen=True, eq=False)
class Caches:
    """What the kernel of one output tensor may reuse: per input the :class:`TrimCache` of its
    task vector (``trims`` empty: none for any input), the :class:`Workspace` its
    temporaries come from (default: a fresh one, i.e. fresh allocations), and for SCE the
    variance order of all its task vectors (``selection``). None of it changes a result."""

    trims: Sequence[TrimCache] = ()
    workspace: Workspace = dataclasses.field(default_factory=Workspace)
    # SCE's select step: each element's position in the stable decreasing order of the
    # variance across the op's task vectors (None: derived when needed)
    selection: torch.Tensor | None = None

    def trim(self, index: int) -> TrimCache:
        """Input ``index``'s trim cache."""
        return self.trims[index] if self.trims else NO_CACHE

    def select(self, indices: Sequence[int]) -> Caches:
        """The caches of inputs ``indices``, in that order, with the same workspace."""
        return Caches([self.trim(i) for i in indices], self.workspace, self.selection)


def magnitude_position(delta: torch.Tensor) -> torch.Tensor:
    """Each element's position in the stable decreasing-``|delta|`` order (int32, shaped
    like ``delta``): a magnitude trim keeping ``k`` elements keeps ``position < k``."""
    # The bits of a non-negative float32 order like its value: the ascending stable order of
    # 2**31 - 1 - bits (written over the fresh |delta|) is the decreasing-magnitude order.
    keys = delta.detach().abs().reshape(-1).float().view(torch.int32).neg_().add_(0x7FFFFFFF)
    index = torch.arange(keys.numel(), dtype=torch.int32, device=delta.device)
    position = torch.empty_like(index).scatter_(0, _cpu.stable_order(keys, index), index)
    return position.reshape(delta.shape)


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


def top_mask(magnitude: torch.Tensor, count: int) -> torch.Tensor:
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


def sparsify(delta: torch.Tensor, trim: Trim, cache: TrimCache = NO_CACHE) -> torch.Tensor:
    """A copy of ``delta`` (same dtype) sparsified by ``trim``, with what ``cache`` holds of its
    trim data precomputed (see :class:`TrimCache`); ``delta`` itself when nothing is trimmed."""
    if trim.density >= 1:
        return delta
    return sparsify_(delta.clone(memory_format=torch.contiguous_format), trim, cache)


def sparsify_(delta: torch.Tensor, trim: Trim, cache: TrimCache = NO_CACHE, *,
              mask: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`sparsify` in place: ``delta`` becomes ``delta * keep`` (rescaled); returns it.

    ``delta`` must be contiguous. ``mask`` and ``scratch`` (shaped like ``delta``, its
    dtype, contiguous) are optional scratch buffers.
    """
    if trim.density >= 1:
        return delta
    if delta.numel() == 0 or trim.density <= 0 and trim.method in (Sparsify.magnitude, Sparsify.della):
        return delta.zero_()
    # A float mask (1 or 0): multiplying by it gives the same values as by a boolean one
    # (signed zeros included), and comparisons write it directly.
    mask = torch.empty_like(delta) if mask is None else mask
    _keep(delta, trim, cache, mask.view(-1), None if scratch is None else scratch.view(-1))
    if not trim.rescale:
        return delta.mul_(mask)
    scale = cache.scale
    if scale is None:
        l1 = torch.empty_like(delta) if scratch is None else scratch
        before = l1_norm(delta, l1)
        scale = _l1_ratio(before, l1_norm(delta.mul_(mask), l1))
    else:
        delta.mul_(mask)
    return delta.mul_(scale)


def l1_norm(delta: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ|delta|`` (0-dim, ``delta``'s dtype), summed as :func:`~evomerge.methods._cpu.abs_sum`
    does (on CPU by blocks, so that :func:`rescale_factor` gets the same bits)."""
    return _cpu.abs_sum(torch.abs(delta, out=scratch).reshape(-1))


def _l1_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The factor that restores the L1 norm (1 when either norm is ~0: no rescale)."""
    if before < _EPS or after < _EPS:
        return torch.ones((), dtype=before.dtype, device=before.device)
    return before / after


def rescale_factor(source: torch.Tensor, base: torch.Tensor, trim: Trim, cache: TrimCache,
                   workspace: Workspace) -> torch.Tensor:
    """The L1 rescale factor :func:`sparsify_` applies to ``source - base`` (flat, contiguous
    CPU tensors; ``cache`` holding the per-element caches ``trim`` uses), computed block by
    block as :func:`l1_norm` sums on CPU, so that a blocked kernel can apply it to each block.
    Temporaries come from ``workspace``'s three slots."""
    numel, before, after = source.numel(), [], []
    unscaled = dataclasses.replace(trim, rescale=False)
    for start in range(0, numel, _cpu.BLOCK):
        part = slice(start, start + _cpu.BLOCK)
        delta = torch.sub(source[part], base[part],
                          out=workspace.take("stacked", source[part].shape, source.dtype, source.device))
        scratch = workspace.take("mixed", delta.shape, delta.dtype, delta.device)
        before.append(torch.abs(delta, out=scratch).sum())
        sparsify_(delta, unscaled, cache.block(part, numel),
                  mask=workspace.take("masks", delta.shape, delta.dtype, delta.device), scratch=scratch)
        after.append(torch.abs(delta, out=scratch).sum())
    return _l1_ratio(*(sum(sums, torch.zeros((), dtype=source.dtype)) for sums in (before, after)))


def _keep(delta: torch.Tensor, trim: Trim, cache: TrimCache, out: torch.Tensor,
          scratch: torch.Tensor | None) -> torch.Tensor:
    """Write the keep-mask of ``trim`` into ``out`` (flat, ``delta``'s dtype: 1 keep, 0 drop)
    and return it; ``scratch``: None or a flat buffer like ``out``."""
    method = trim.method
    if method in (Sparsify.magnitude, Sparsify.magnitude_outliers):
        numel = delta.numel() if cache.numel is None else cache.numel
        start, stop = _kept_range(method, numel, trim.density, trim.gamma)
        if cache.position is None:
            magnitude = delta.detach().abs().reshape(-1).float()
            keep = top_mask(magnitude, stop) & ~top_mask(magnitude, start)
            return out.copy_(keep.view(torch.uint8))
        position = cache.position.reshape(-1)
        torch.lt(position, stop, out=out)
        if start > 0:
            out.mul_(torch.ge(position, start, out=scratch))
        return out
    words = stream_words(trim.key, delta.numel(), delta.device) if cache.words is None else cache.words
    if method is Sparsify.random:
        return keep_flags(trim.density, words.reshape(-1), out)
    if method is Sparsify.della:
        rank = della_rank(delta) if cache.rank is None else cache.rank
        probability = (trim.density - trim.epsilon) + rank * (2 * trim.epsilon)
        return keep_flags(probability.reshape(-1), words.reshape(-1), out)
    raise ValueError(f"unknown sparsification {method!r}")  # pragma: no cover - enum is closed
