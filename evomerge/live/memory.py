"""The materializer's memory bound, and the memory available on its device.

Memory (bytes, ``dtype`` size ``s``, ``N`` parameters per model, ``K`` sources of which ``L``
are LoRA adapters, ``T`` the largest tensor's element count, ``D`` the deepest plan's extra
layers, ``c = max(s, 4)`` the size of ``promote(dtype, float32)``)::

    resident  = (K − L + 1) · N · s          base and full sources
              + Σ_adapters Σ_weights r·(in + out) · c      adapters: their factors A, B only
    live      = N · s  (+ D layers)          the live model's own parameters
    per cache = K · N · 4                    each cache kind: int32 magnitude positions
                                             (TIES, breadcrumbs), float32 DELLA ranks,
                                             int32 random words (DARE, DELLA)
    building  = 36 · T                       while a cache is built: sorting one tensor
    scratch   = (2K + 1) · T · max(s, 4)     the workspace (kernel temporaries)
              + L · T · s + T · c            with adapters: each adapter input's weight formed
                                             per tensor (W + scale·B@A), and the product B@A

A cache exists once a method that uses it has run; it is built on that method's first
candidate, one tensor at a time. DELLA also allocates its float32 keep probabilities per
tensor. The caches are dense for adapters too (they index a task vector's elements), so with
many adapters and a trimming method ``cache_positions=False`` keeps the low-rank saving.
On CPU the process's resident set can exceed the bound by what the C allocator
keeps of freed temporaries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psutil
import torch

from evomerge.io.adapter import AdapterFolder
from evomerge.io.reader import ModelFolder
from evomerge.methods.sparsify import CACHE_ITEMSIZE, CACHE_KINDS


@dataclass(frozen=True)
class MemoryBound:
    """Bytes the materializer needs on its device (see the module docstring)."""

    resident: int
    live: int
    per_cache: int
    building: int
    scratch: int

    @property
    def caches(self) -> int:
        """All cache kinds, and the transient of building one."""
        return self.per_cache * len(CACHE_KINDS) + self.building

    @property
    def total(self) -> int:
        return self.resident + self.live + self.caches + self.scratch

    @property
    def streaming(self) -> int:
        """What streaming the inputs from disk needs: the live model and the workspace."""
        return self.live + self.scratch


def memory_bound(base: ModelFolder, models: Iterable[ModelFolder], dtype: torch.dtype, *,
                 caches: bool) -> MemoryBound:
    """The bound for ``base`` and ``models`` (base and sources, all loaded) in ``dtype``;
    ``caches``: whether the trim caches are on (else they count 0)."""
    models = list(models)
    numel = [int(torch.Size(base.shape(n)).numel()) for n in base.names()]
    sources = len(models) - 1
    adapters = [f for f in models if isinstance(f, AdapterFolder)]
    full = [f for f in models if not isinstance(f, AdapterFolder)]
    compute = max(dtype.itemsize, 4)
    return MemoryBound(
        resident=sum(sum(int(torch.Size(f.shape(n)).numel()) for n in f.names()) for f in full) * dtype.itemsize
        + sum(f.adapter.num_parameters() for f in adapters) * compute,
        live=sum(numel) * dtype.itemsize,
        per_cache=sources * sum(numel) * CACHE_ITEMSIZE if caches else 0,
        building=36 * max(numel) if caches else 0,
        scratch=(2 * sources + 1) * max(numel) * compute
        + (len(adapters) * max(numel) * dtype.itemsize + max(numel) * compute if adapters else 0))


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device`` (CUDA: free device memory; CPU: available system memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def gb(size: int) -> str:
    """``size`` bytes as ``'1.23 GB'``."""
    return f"{size / 1e9:.2f} GB"
