"""Sparsification of task vectors: magnitude (TIES), outliers (breadcrumbs), random (DARE), DELLA.

All magnitude-based trims keep a range of one order: ``|delta|`` from largest to smallest,
stable, so ties break by position. A caller that trims the same task vector at many
densities (the in-memory materializer) may precompute each element's position in that order
once with :func:`magnitude_position`; a trim at any density is then one comparison pass.
Without it, the same set is found per trim by :mod:`~evomerge.methods.select`'s exact cuts
(no sort, no per-element cache), so both paths agree bit for bit. The random words of DARE
and DELLA are a pure function of (key, element index) (:mod:`~evomerge.methods.random`):
without a cache they are recomputed, for a block of the task vector from its offset.
Semantics follow mergekit 0.1.5 (``k = max(1, int(d·n))`` for magnitude, ``gamma`` largest
removed first for breadcrumbs, rank-scaled keep probabilities per row for DELLA, optional
rescale to the original L1 norm).

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
from evomerge.methods.select import Cut, key_dtype, magnitude_cut, magnitude_keys
from evomerge.methods.workspace import Workspace

_EPS = 1e-7


class Sparsify(str, Enum):
    magnitude = "magnitude"
    random = "random"
    magnitude_outliers = "magnitude_outliers"
    della = "della_magprune"

    @property
    def caches(self) -> tuple[str, ...]:
        """The per-element :class:`TrimCache` fields this trim may be given; without them it
        derives what it needs from the task vector (and its key)."""
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
    each shaped like ``delta`` or flat; ``cuts`` = :func:`magnitude_cuts` of ``delta``'s keys,
    what a magnitude trim without ``position`` uses instead. When ``delta`` is one block of a
    larger task vector (the caches sliced alike, :meth:`block`): ``numel`` is that vector's
    element count, in which magnitude trims count their kept range, ``offset`` the block's
    first element in it, and ``scale`` its L1 rescale factor (:func:`rescale_factor`)."""

    position: torch.Tensor | None = None
    rank: torch.Tensor | None = None
    words: torch.Tensor | None = None
    numel: int | None = None
    scale: torch.Tensor | None = None
    cuts: tuple[Cut, Cut] | None = None
    offset: int = 0

    def tensors(self) -> list[torch.Tensor]:
        """The per-element caches present."""
        return [t for t in (self.position, self.rank, self.words) if t is not None]

    def blockable(self, method: Sparsify) -> bool:
        """Whether ``method`` can trim one block of the task vector with this cache, once the
        kernel's ``prepare`` has added the cuts of a magnitude trim without positions: every
        trim but DELLA without ``rank`` (its ranks are per row of the whole tensor)."""
        return method is not Sparsify.della or self.rank is not None

    def block(self, part: slice, numel: int) -> TrimCache:
        """The cache of elements ``part`` of the flattened task vector of ``numel`` elements
        (when this cache is already a block's, of the larger vector's :attr:`numel`)."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.reshape(-1)[part]
        return dataclasses.replace(self, position=cut(self.position), rank=cut(self.rank),
                                   words=cut(self.words), numel=numel if self.numel is None else self.numel,
                                   offset=self.offset + part.start)


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


def kept_range(method: Sparsify, numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Positions [start, stop) of the magnitude order that a deterministic trim keeps."""
    if method is Sparsify.magnitude:
        return 0, max(1, int(density * numel))
    target = int(density * numel)
    n_bottom = max(0, numel - target - int(gamma * numel))
    return numel - n_bottom - target, numel - n_bottom


def magnitude_cuts(keys: torch.Tensor, trim: Trim, numel: int | None = None) -> tuple[Cut, Cut]:
    """The cuts at the start and the stop of the range of the magnitude order that ``trim`` (a
    magnitude or outlier trim) keeps of a task vector with :func:`~evomerge.methods.select.magnitude_keys`
    ``keys`` (flat; ``numel``: their count, default ``keys.numel()``)."""
    start, stop = kept_range(trim.method, keys.numel() if numel is None else numel, trim.density, trim.gamma)
    return magnitude_cut(keys, start), magnitude_cut(keys, stop)


def top_mask(magnitude: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the first ``count`` positions of the stable decreasing order of flat
    non-negative ``magnitude`` (what ``order[:count]`` of a stable sort gives), by an exact
    cut (:func:`~evomerge.methods.select.magnitude_cut`) instead of a sort."""
    keys = magnitude_keys(magnitude)
    return magnitude_cut(keys, count).within(keys, 0, torch.empty_like(keys, dtype=torch.bool))


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
        scale = l1_ratio(before, l1_norm(delta.mul_(mask), l1))
    else:
        delta.mul_(mask)
    return delta.mul_(scale)


def l1_norm(delta: torch.Tensor, scratch: torch.Tensor | None = None,
            total: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ|delta|`` (0-dim, ``delta``'s dtype), summed as :func:`~evomerge.methods._cpu.abs_sum`
    does (by chunks, so that :func:`rescale_factor` and a row-blocked kernel get the same
    bits); ``total``: a running sum that ``delta``, the next block of a larger tensor, is added to."""
    return _cpu.abs_sum(torch.abs(delta, out=scratch).reshape(-1), total)


def l1_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
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
    return l1_ratio(*(sum(sums, torch.zeros((), dtype=source.dtype)) for sums in (before, after)))


def task_vector_cuts(source: torch.Tensor, base: torch.Tensor, trim: Trim, workspace: Workspace) -> tuple[Cut, Cut]:
    """:func:`magnitude_cuts` of ``source - base`` (flat, contiguous CPU tensors) for ``trim``,
    what a blocked kernel gives each block's cache-free magnitude trim. The task vector is
    formed block by block; its keys take workspace slot ``keys`` (one element per element,
    2 or 4 bytes), the blocks slot ``stacked``."""
    keys = workspace.take("keys", source.shape, key_dtype(source.dtype), source.device)
    for start in range(0, source.numel(), _cpu.BLOCK):
        part = slice(start, start + _cpu.BLOCK)
        delta = torch.sub(source[part], base[part],
                          out=workspace.take("stacked", source[part].shape, source.dtype, source.device))
        keys[part] = magnitude_keys(delta, delta)
    return magnitude_cuts(keys, trim)


def _keep(delta: torch.Tensor, trim: Trim, cache: TrimCache, out: torch.Tensor,
          scratch: torch.Tensor | None) -> torch.Tensor:
    """Write the keep-mask of ``trim`` into ``out`` (flat, ``delta``'s dtype: 1 keep, 0 drop)
    and return it; ``scratch``: None or a flat buffer like ``out``."""
    method = trim.method
    if method in (Sparsify.magnitude, Sparsify.magnitude_outliers):
        numel = delta.numel() if cache.numel is None else cache.numel
        if cache.position is None:  # cache-free: the cuts (a blocked kernel's prepare found them)
            keys = magnitude_keys(delta.detach().reshape(-1), scratch)
            start, stop = magnitude_cuts(keys, trim, numel) if cache.cuts is None else cache.cuts
            stop.within(keys, cache.offset, out)
            if method is Sparsify.magnitude_outliers:
                out.masked_fill_(start.within(keys, cache.offset, torch.empty_like(keys, dtype=torch.bool)), 0)
            return out
        start, stop = kept_range(method, numel, trim.density, trim.gamma)
        position = cache.position.reshape(-1)
        torch.lt(position, stop, out=out)
        if start > 0:
            out.mul_(torch.ge(position, start, out=scratch))
        return out
    words = (stream_words(trim.key, delta.numel(), delta.device, start=cache.offset)
             if cache.words is None else cache.words)
    if method is Sparsify.random:
        return keep_flags(trim.density, words.reshape(-1), out)
    if method is Sparsify.della:
        rank = della_rank(delta) if cache.rank is None else cache.rank
        probability = (trim.density - trim.epsilon) + rank * (2 * trim.epsilon)
        return keep_flags(probability.reshape(-1), words.reshape(-1), out)
    raise ValueError(f"unknown sparsification {method!r}")  # pragma: no cover - enum is closed
