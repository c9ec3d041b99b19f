"""The materializer's memory bound, and the memory available on its device and in host memory.

Memory on the device (bytes, ``dtype`` size ``s``, ``N`` parameters per model, ``K`` sources of
which ``L`` are LoRA adapters, ``T`` the largest tensor's element count, ``D`` the deepest plan's
extra layers, ``c = max(s, 4)`` the size of ``promote(dtype, float32)``)::

    resident  = Σ the inputs in the device tier  (:mod:`evomerge.live.tiers`); every input there:
                (K − L + 1) · N · s'           base and full sources (s' = resident_dtype's size, else s)
              + Σ_adapters Σ_weights r·(in + out) · c      adapters: their factors A, B only
    staging   = the buffers that bring the other inputs to the device, and cast low-precision
                ones to ``dtype`` (:mod:`evomerge.live.tiers`: 0 with every input on the device in
                ``dtype``)
    live      = N · s  (+ D layers)          the live model's own parameters
    per cache = K · N · 4                    each cache kind kept: int32 magnitude positions
                                             (TIES, breadcrumbs), float32 DELLA ranks,
                                             int32 random words (DARE, DELLA)
    transient = 36 · T                       per tensor, while a cache is built (a sort) or a
                                             trim runs without one (at most DELLA's per-row
                                             rank sort; a magnitude cut takes less)
    scratch   = (2K + 1) · T · max(s, 4)     the workspace (kernel temporaries)
    keys      = T · 4                        without cached positions: the magnitude cuts'
                                             keys (a workspace slot)
              + L · T · s + T · c            (scratch) with adapters: each adapter input's weight formed
                                             per tensor (W + scale·B@A), and the product B@A

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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import psutil
import torch

from evomerge.errors import EvomergeError
from evomerge.io.adapter import AdapterFolder
from evomerge.io.reader import ModelFolder
from evomerge.methods.sparsify import CACHE_ITEMSIZE, CACHE_KINDS


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


def memory_bound(base: ModelFolder, models: Iterable[ModelFolder], dtype: torch.dtype, *,
                 cached: Sequence[str], resident: int, staging: int) -> MemoryBound:
    """The bound for ``base`` and ``models`` (base and sources) in ``dtype`` with the trim cache
    kinds ``cached`` kept (the others count 0, their trims run cache-free), ``resident`` bytes
    of inputs on the device and ``staging`` bytes of buffers (both from the tier plan)."""
    models = list(models)
    numel = [int(torch.Size(base.shape(n)).numel()) for n in base.names()]
    sources = len(models) - 1
    adapters = [f for f in models if isinstance(f, AdapterFolder)]
    compute = max(dtype.itemsize, 4)
    return MemoryBound(
        resident=resident, staging=staging,
        live=sum(numel) * dtype.itemsize,
        per_cache=sources * sum(numel) * CACHE_ITEMSIZE,
        cached=tuple(cached),
        transient=36 * max(numel),
        scratch=(2 * sources + 1) * max(numel) * compute
        + (len(adapters) * max(numel) * dtype.itemsize + max(numel) * compute if adapters else 0),
        keys=max(numel) * CACHE_ITEMSIZE)


def cached_kinds(mode: TrimCacheMode, bound: Callable[[Sequence[str]], MemoryBound], available: int) -> tuple[str, ...]:
    """The trim cache kinds to keep under ``mode`` (see the module docstring), ``bound(kinds)``
    being the bound with ``kinds`` kept and ``available`` the bytes there are; ``on`` raises
    EvomergeError when its bound exceeds them."""
    if mode == "off":
        return ()
    if mode == "on":
        needed = bound(CACHE_KINDS).total
        if needed > available:
            raise EvomergeError(f"trim_cache: on needs {gb(needed)} but {gb(available)} is available; "
                                f"use trim_cache: auto (caches that fit) or off (cache-free trims)")
        return CACHE_KINDS
    kept: tuple[str, ...] = ()
    for kind in CACHE_KINDS:
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
