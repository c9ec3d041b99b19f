"""The materializer's memory bound, and the memory available on its device and in host memory.

Memory on the device (bytes, ``dtype`` size ``s``, ``N`` parameters per model, ``K`` sources of
which ``L`` are LoRA adapters, ``E`` the most elements one kernel call sees, ``D`` the deepest
plan's extra layers, ``c = max(s, 4)`` the size of ``promote(dtype, float32)``)::

    resident  = Σ the inputs in the device tier  (:mod:`evomerge.live.tiers`); every input there:
                (K − L + 1) · N · s'           base and full sources (s' = resident_dtype's size, else s)
              + Σ_adapters Σ_weights r·(in + out) · c      adapters: their factors A, B only
    staging   = the buffers that bring the other inputs to the device, and cast low-precision
                ones to ``dtype`` (:mod:`evomerge.live.tiers`: 0 with every input on the device in
                ``dtype``), each sized by the largest part a kernel call reads of an input
    live      = N · s  (+ D layers)          the live model's own parameters
    per cache = K · N_c · 4                  each cache kind kept: int32 magnitude positions
                                             (TIES, breadcrumbs), float32 DELLA ranks,
                                             int32 random words (DARE, DELLA); N_c the elements
                                             of the tensors merged whole (row blocks use none)
    transient = 36 · E                       per kernel call, while a cache is built (a sort) or a
                                             trim runs without one (at most DELLA's per-row
                                             rank sort; a magnitude cut takes less); 0 when the
                                             methods are linear, task_arithmetic, passthrough
    scratch   = (2K + 1) · E · max(s, 4)     the workspace (kernel temporaries)
    keys      = E · 4                        without cached positions: the magnitude cuts' keys
                                             (a workspace slot); only for TIES, breadcrumbs, SCE
              + L · E · s + E · c            (scratch) with adapters: each adapter input's weight formed
                                             per kernel call (W + scale·B@A), and the product B@A

``E`` is the largest tensor's element count, unless every method the materializer may run
merges in row blocks (:mod:`evomerge.methods.blocked`: linear and the task-arithmetic family)
and a block limit is set: then a tensor above the limit is merged in blocks of whole rows
(:func:`kernel_numel`), and ``E`` is the largest block or unblocked tensor. The methods
(:func:`method_terms`; None: any method) also decide which terms and cache kinds count.

Host memory (CUDA only; on CPU host and device memory are one) holds the host tier's inputs
(pinned) and the pinned buffers the files' tensors are read into (:class:`~evomerge.live.tiers.TierPlan`).

Which cache kinds are kept is the materializer's ``trim_cache`` setting (:func:`cached_kinds`):
``on`` all, ``off`` none, ``auto`` (default) as many as fit in the memory the inputs leave, in
the order positions, words, ranks; a trim whose kind is not kept runs cache-free, with the same
result (:mod:`evomerge.methods.select`). A kept cache exists once a method that uses it has
run; it is built on that method's first candidate, one tensor at a time. DELLA also
allocates its float32 keep probabilities per tensor. The caches are dense for adapters too
(they index a task vector's elements), so with many adapters and a trimming method
``trim_cache="off"`` keeps the low-rank saving. On CPU the process's resident set can exceed
the bound by what the C allocator keeps of freed temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import psutil
import torch

from evomerge.errors import EvomergeError
from evomerge.io.adapter import AdapterFolder
from evomerge.io.reader import ModelFolder
from evomerge.methods.blocked import block_rows
from evomerge.methods.registry import METHODS
from evomerge.methods.sparsify import CACHE_ITEMSIZE, CACHE_KINDS, Sparsify


@dataclass(frozen=True)
class MemoryBound:
    """Bytes the materializer needs on its device (see the module docstring)."""

    resident: int
    staging: int
    live: int
    per_cache: int
    cached: tuple[str, ...]  # the cache kinds kept (of CACHE_KINDS)
    transient: int
    scratch: int
    keys: int

    @property
    def caches(self) -> int:
        """The cache kinds kept."""
        return self.per_cache * len(self.cached)

    @property
    def cache_free(self) -> int:
        """What trims without cached positions add: the cuts' keys (0 with positions kept)."""
        return 0 if "position" in self.cached else self.keys

    @property
    def total(self) -> int:
        return self.resident + self.staging + self.live + self.caches + self.transient + self.scratch + self.cache_free


TrimCacheMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class MethodTerms:
    """What the methods a materializer may run add to its bound: ``transient`` (trims or
    sorts), the cut ``keys``, the cache ``kinds`` their trims use, and whether they all merge
    in row blocks (``rows``)."""

    transient: bool
    keys: bool
    kinds: tuple[str, ...]
    rows: bool


CPU = torch.device("cpu")
_NO_TRANSIENT = frozenset({"linear", "task_arithmetic", "passthrough"})  # kernels within the workspace
_CUTS = (Sparsify.magnitude, Sparsify.magnitude_outliers)


def method_terms(methods: Collection[str] | None) -> MethodTerms:
    """The :class:`MethodTerms` of ``methods`` (merge method names; None: any method).
    Raises EvomergeError for an unknown name."""
    if methods is None:
        return MethodTerms(True, True, CACHE_KINDS, False)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise EvomergeError(f"methods: unknown merge method {unknown[0]!r}; expected some of {', '.join(METHODS)}")
    found = [METHODS[m] for m in methods]
    kinds = {kind for m in found if m.sparsify is not None for kind in m.sparsify.caches}
    if "sce" in methods:
        kinds.add("position")  # its variance orders are kept with the positions
    return MethodTerms(transient=any(m.name not in _NO_TRANSIENT for m in found),
                       keys=any(m.sparsify in _CUTS or m.name == "sce" for m in found),
                       kinds=tuple(k for k in CACHE_KINDS if k in kinds),
                       rows=bool(found) and all(m.rows for m in found))


def kernel_numel(shape: Sequence[int], block: int | None, device: torch.device) -> int:
    """The elements one kernel call sees of a tensor of ``shape``: a row block's under the
    block limit ``block`` (None: no blocks; :func:`~evomerge.methods.blocked.block_rows`), else all."""
    numel = math.prod(shape)
    rows = None if block is None else block_rows(shape, block, device)
    return numel if rows is None else rows * numel // shape[0]


def default_block_limit(base: ModelFolder) -> int:
    """The default block limit: the largest tensor of ``base`` whose rows are not the
    vocabulary (the config's ``vocab_size``), so that only the embedding and the head (on
    Llama-3-8B 8.9× the largest layer matrix) are merged in row blocks, each block no larger
    than a layer matrix, and no layer tensor pays the blocks' extra passes; the largest tensor
    when every tensor has vocabulary rows."""
    vocabulary = base.config.get("vocab_size")
    shapes = [tuple(base.shape(n)) for n in base.names()]
    layers = [math.prod(shape) for shape in shapes if not shape or shape[0] != vocabulary]
    return max(layers, default=0) or max(map(math.prod, shapes), default=0) or 1


def check_block_limit(block_limit: int) -> int:
    """``block_limit`` when it is a positive element count; else EvomergeError in one line."""
    if isinstance(block_limit, bool) or not isinstance(block_limit, int) or block_limit <= 0:
        raise EvomergeError(f"block_limit: expected a positive number of elements, got {block_limit!r}")
    return block_limit


def memory_bound(base: ModelFolder, models: Iterable[ModelFolder], dtype: torch.dtype, *,
                 cached: Sequence[str], resident: int, staging: int, methods: Collection[str] | None = None,
                 block: int | None = None, device: torch.device = CPU) -> MemoryBound:
    """The bound for ``base`` and ``models`` (base and sources) in ``dtype`` with the trim cache
    kinds ``cached`` kept (the others count 0, their trims run cache-free), ``resident`` bytes
    of inputs on the device and ``staging`` bytes of buffers (both from the tier plan), for a
    materializer that runs ``methods`` (None: any) on ``device`` with the block limit ``block``
    (None: every tensor whole; it counts only when every method merges in row blocks)."""
    models = list(models)
    terms = method_terms(methods)
    block = block if terms.rows else None
    shapes = [tuple(base.shape(n)) for n in base.names()]
    numel = [math.prod(shape) for shape in shapes]
    calls = [kernel_numel(shape, block, device) for shape in shapes]
    whole = sum(n for n, call in zip(numel, calls) if n == call)  # the tensors that get caches
    largest = max(calls, default=0)
    sources = len(models) - 1
    adapters = [f for f in models if isinstance(f, AdapterFolder)]
    compute = max(dtype.itemsize, 4)
    return MemoryBound(
        resident=resident, staging=staging,
        live=sum(numel) * dtype.itemsize,
        per_cache=sources * whole * CACHE_ITEMSIZE,
        cached=tuple(kind for kind in cached if kind in terms.kinds),
        transient=36 * largest if terms.transient else 0,
        scratch=(2 * sources + 1) * largest * compute
        + (len(adapters) * largest * dtype.itemsize + largest * compute if adapters else 0),
        keys=largest * CACHE_ITEMSIZE if terms.keys else 0)


def cached_kinds(mode: TrimCacheMode, bound: Callable[[Sequence[str]], MemoryBound], available: int,
                 kinds: Sequence[str] = CACHE_KINDS) -> tuple[str, ...]:
    """The trim cache kinds of ``kinds`` (those the methods use) to keep under ``mode`` (see the
    module docstring), ``bound(kinds)`` being the bound with ``kinds`` kept and ``available``
    the bytes there are; ``on`` raises EvomergeError when its bound exceeds them."""
    if mode == "off":
        return ()
    if mode == "on":
        needed = bound(tuple(kinds)).total
        if needed > available:
            raise EvomergeError(f"trim_cache: on needs {gb(needed)} but {gb(available)} is available; "
                                f"use trim_cache: auto (caches that fit) or off (cache-free trims)")
        return tuple(kinds)
    kept: tuple[str, ...] = ()
    for kind in kinds:
        if bound((*kept, kind)).total <= available:
            kept = (*kept, kind)
    return kept


HOST_MARGIN = 0.1  # of the system's memory, left to the rest of the process and the machine


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device`` (CUDA: free device memory; CPU: available system memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def host_budget() -> int:
    """The default host-memory budget: available system memory less :data:`HOST_MARGIN` of the total."""
    memory = psutil.virtual_memory()
    return max(memory.available - int(HOST_MARGIN * memory.total), 0)


def gb(size: int) -> str:
    """``size`` bytes as ``'1.23 GB'``."""
    return f"{size / 1e9:.2f} GB"


def human(size: int) -> str:
    """``size`` bytes to three digits in the largest decimal unit it reaches: ``'1.20 MB'``,
    ``'65.5 kB'``, ``'362 GB'`` (below 1 kB: ``'12 B'``)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(size) >= scale:
            value = size / scale
            return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f} {unit}"
    return f"{size} B"
