"""Where each input of the materializer lives: on the device, in host memory, or in the files.

The inputs (:func:`input_parts`) are the tensors of the base and of each full source, and the
factors A and B of each LoRA adapter's adapted weights (an adapter's other tensors are the
base's). Each lives in one tier:

* ``device``: copied onto the compute device once, in its kept dtype (floating dense tensors:
  ``resident_dtype`` when given, else the merge dtype; factors: ``promote(dtype, float32)``);
* ``host``: copied once into pinned host memory, in the kept dtype (CUDA only: on CPU, host
  memory *is* the device's, so the tiers there are resident or left in the files);
* ``mmap``: left in the memory-mapped files (a LoRA adapter's factors: in its reader's memory)
  and read again by every candidate.

Per candidate, an op's inputs outside the device tier, and every floating dense input when
``resident_dtype`` is narrower than the merge dtype, are brought to the kernels through staging
buffers in the steps of :func:`route`: the files read into a host buffer (pinned on CUDA;
this rounds to the kept dtype), a copy to a device buffer (``non_blocking``, from pinned
memory, on a copy stream), a cast to the merge dtype on the device. On CUDA there are two sets of
buffers, so the next op's copies overlap the current op's kernels (:mod:`evomerge.live.inputs`).
Whatever the tiers, a kernel gets the same values, each input rounded once to its kept dtype
(exact unless ``resident_dtype`` is narrower than the stored dtype) and cast to the merge dtype,
so every candidate is bit-identical to the all-device plan's with the same ``resident_dtype``.

The plan (:func:`plan_tiers`) fills the device tier with the inputs in the order of
:func:`input_parts` (the adapters' factors, a few bytes that each stand for a whole weight; the
base, which every task vector, slerp and adapter input reads; then the sources as given, each in
file order) as long as the device holds them with the materializer's other terms
(:mod:`evomerge.live.memory`) and the staging the other inputs need, within the device budget
(``max_memory``, default: the device's free memory); the next inputs go to host memory the same
way, within the host budget (``max_host_memory``, default
:func:`~evomerge.live.memory.host_budget`), the rest stays in the files. A candidate reads every
tensor of each model it names, so within a model no tensor is used more than another: the
order decides which models stay whole, not how much a candidate moves. Trim caches
(``trim_cache: auto``) get what the inputs leave on the device; ``on`` reserves them first.

Staging (bytes; ``B`` buffer sets: 2 on CUDA, 1 on CPU)::

    staging = B · Σ_g n_g · max over the parts through g of staged · itemsize(g)

over the groups ``g`` = (step, dtype, dense or factor) of :func:`route`, with ``n_g`` the models
that have a dense part through ``g`` (an op reads one tensor of each model: a model wholly on the
device in the merge dtype takes no buffer) and twice the adapters that have a factor through it;
``staged`` is what one copy holds of a part: the whole part, or the rows of one block of a tensor
merged in row blocks (:attr:`Part.staged`). The host steps' buffers are host memory on CUDA
(:attr:`TierPlan.host_staging`) and device memory on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from evomerge.errors import EvomergeError
from evomerge.io.adapter import AdapterFolder
from evomerge.io.reader import ModelFolder
from evomerge.io.source import open_model, source_key
from evomerge.live.memory import (
    CPU,
    HOST_MARGIN,
    MemoryBound,
    TrimCacheMode,
    available_bytes,
    cached_kinds,
    default_block_limit,
    host_budget,
    human,
    kernel_numel,
    memory_bound,
    method_terms,
)
from evomerge.methods.blocked import block_rows, planned_passes
from evomerge.methods.registry import METHODS

Tier = Literal["device", "host", "mmap"]
TIERS: tuple[Tier, ...] = ("device", "host", "mmap")
Key = tuple[Path, str, str]  # (model, tensor name, role: "" a dense tensor, "a" / "b" a LoRA factor)
Folder = ModelFolder | AdapterFolder
CACHE_WORDS = {"position": "positions", "words": "words", "rank": "ranks"}


@dataclass(frozen=True)
class Part:
    """One input: a dense tensor (``role`` ``""``) of a model folder, or the LoRA factor A or B
    (``role`` ``"a"``, ``"b"``) of an adapter's weight ``name``."""

    path: Path
    name: str
    role: str
    shape: tuple[int, ...]
    stored: torch.dtype  # in the files (factors: as the adapter's reader holds them)
    kept: torch.dtype  # in the device and host tiers
    target: torch.dtype | None  # what the kernels get; None: as brought (lora_dense promotes factors)
    staged: int | None = None  # elements one staging copy holds (a row block's); None: all

    @property
    def key(self) -> Key:
        return (self.path, self.name, self.role)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def staged_numel(self) -> int:
        return self.numel if self.staged is None else self.staged

    @property
    def kept_bytes(self) -> int:
        return self.numel * self.kept.itemsize

    @property
    def stored_bytes(self) -> int:
        return self.numel * self.stored.itemsize


@dataclass(frozen=True)
class Step:
    """One copy on the way to the kernels: into a buffer of ``kind`` (``host``: host memory, pinned
    on CUDA; ``land``: the device, from the host; ``cast``: the device, another dtype) in ``dtype``."""

    kind: Literal["host", "land", "cast"]
    dtype: torch.dtype


def route(part: Part, tier: Tier, cuda: bool) -> tuple[Step, ...]:
    """The copies that bring ``part`` from ``tier`` to the kernels (none: the tier's tensor itself)."""
    steps = []
    dtype = part.stored if tier == "mmap" else part.kept
    if tier == "mmap" and not part.role and (cuda or dtype != part.kept):
        steps.append(Step("host", part.kept))  # the files read (and rounded to the kept dtype)
        dtype = part.kept
    if tier != "device" and cuda:
        steps.append(Step("land", dtype))
    if part.target is not None and dtype != part.target:
        steps.append(Step("cast", part.target))
    return tuple(steps)


Group = tuple[str, torch.dtype, bool]  # (step kind, dtype, a factor's)
Widest = dict[Group, tuple[int, frozenset[Path]]]  # per group: the largest copy's bytes, the models through it


def _groups(part: Part, tier: Tier, cuda: bool) -> Widest:
    """The staging groups ``part`` goes through from ``tier``, with the bytes a copy takes in each."""
    return {(step.kind, step.dtype, bool(part.role)): (part.staged_numel * step.dtype.itemsize,
                                                       frozenset((part.path,)))
            for step in route(part, tier, cuda)}


def _widest(maxima: Widest, groups: Widest) -> Widest:
    merged = dict(maxima)
    for group, (size, models) in groups.items():
        known = merged.get(group)
        merged[group] = (size, models) if known is None else (max(size, known[0]), known[1] | models)
    return merged


def open_inputs(base: str | Path, sources: Sequence[str | Path]) -> dict[Path, Folder]:
    """The base and the sources opened (headers only), by :func:`~evomerge.io.source.source_key`, base first."""
    opened: dict[Path, ModelFolder] = {}
    return {source_key(p): open_model(p, base, opened=opened) for p in (base, *sources)}


def input_parts(folders: Mapping[Path, Folder], base: Path, dtype: torch.dtype,
                resident_dtype: torch.dtype | None = None, *, block: int | None = None,
                device: torch.device = CPU) -> list[Part]:
    """Every input of a materializer over ``folders`` merging in ``dtype`` on ``device``, in fill
    order (see the module docstring); shapes and dtypes from the files' headers. ``block``: the
    block limit of row-blocked merges (None: every tensor read whole), which sizes
    :attr:`Part.staged`: a blocked weight's rows, and of its adapters' factors the rows of B
    (the columns of A for a transposed weight)."""
    compute = torch.promote_types(dtype, torch.float32)
    parts = []
    for path, folder in folders.items():
        if isinstance(folder, AdapterFolder):
            for name, factors in folder.factors.items():
                rows = None if block is None else block_rows(factors.shape, block, device)
                sliced = "a" if factors.transpose else "b"
                parts += [Part(path, name, role, tuple(t.shape), t.dtype, compute, None,
                               None if rows is None or role != sliced else rows * factors.rank)
                          for role, t in (("a", factors.a), ("b", factors.b))]
    full = sorted((p for p, f in folders.items() if not isinstance(f, AdapterFolder)), key=lambda p: p != base)
    for path in full:
        folder = folders[path]
        for name in folder.names():
            stored = folder.dtype(name)
            floating = stored.is_floating_point
            shape = tuple(folder.shape(name))
            staged = kernel_numel(shape, block, device) if floating else math.prod(shape)
            parts.append(Part(path, name, "", shape, stored, (resident_dtype or dtype) if floating else stored,
                              dtype if floating else stored, None if staged == math.prod(shape) else staged))
    return parts


@dataclass(frozen=True)
class TierPlan:
    """Each input's tier (``tiers[i]`` for ``parts[i]``), the device bound it gives and the host memory it takes."""

    parts: tuple[Part, ...]
    tiers: tuple[Tier, ...]
    bound: MemoryBound  # device memory
    host: int  # the host tier's inputs (pinned)
    host_staging: int  # pinned buffers the files are read into (CUDA)
    device: torch.device
    dtype: torch.dtype
    resident_dtype: torch.dtype | None
    budget: int
    budget_source: str
    host_budget: int | None  # None on CPU
    host_source: str
    labels: dict[Path, str]
    methods: tuple[str, ...] | None = None  # the merge methods planned for (None: any)
    block: int | None = None  # the row blocks' element limit (None: every tensor merged whole)
    counted: bool = False  # whether the bound counts the blocks (every method merges in row blocks)
    passes: int = 1  # the most passes a row-blocked run makes over its inputs (methods/blocked.py)

    def kernels(self) -> str:
        """The methods planned for and how their tensors are merged, in words."""
        methods = "any method" if self.methods is None else ", ".join(self.methods)
        if self.block is None:
            return methods + "; every tensor merged whole"
        if not self.counted:
            return methods + (f"; tensors above {self.block:,} elements merged in row blocks by the methods that "
                              "can (counted whole: not every method can)")
        return methods + (f"; tensors above {self.block:,} elements merged in row blocks, in at most "
                          f"{self.passes} pass{'es' if self.passes > 1 else ''}")

    def tier_of(self) -> dict[Key, Tier]:
        return {part.key: tier for part, tier in zip(self.parts, self.tiers)}

    def transfer(self) -> tuple[int, int]:
        """Bytes a candidate that reads every input moves: (host → device, read from the files);
        a tensor merged in row blocks is brought once per pass (:attr:`passes`, at most)."""
        cuda = self.device.type == "cuda"
        times = [self.passes if p.staged is not None and not p.role else 1 for p in self.parts]
        moved = sum(p.kept_bytes * n for p, t, n in zip(self.parts, self.tiers, times) if t != "device" and cuda)
        read = sum(p.stored_bytes * n for p, t, n in zip(self.parts, self.tiers, times) if t == "mmap")
        return moved, read

    def by_model(self) -> dict[Path, dict[Tier, tuple[int, int]]]:
        """Per model, per tier: (tensors, bytes in the tier's dtype)."""
        rows: dict[Path, dict[Tier, tuple[int, int]]] = {path: {} for path in self.labels}
        for part, tier in zip(self.parts, self.tiers):
            count, size = rows[part.path].get(tier, (0, 0))
            rows[part.path][tier] = (count + 1, size + (part.stored_bytes if tier == "mmap" else part.kept_bytes))
        return rows

    def summary(self) -> str:
        """The plan in one paragraph (what the materializer logs when it loads)."""
        b = self.bound
        kept = ", ".join(CACHE_WORDS[k] for k in b.cached) or "none"
        device = (f"device {human(b.total)} of {human(self.budget)} ({self.budget_source}): inputs {human(b.resident)}"
                  f" + staging {human(b.staging)} + live {human(b.live)} + scratch {human(b.scratch)} + transient "
                  f"{human(b.transient)} + keys {human(b.cache_free)} + caches {human(b.caches)} (kept: {kept})")
        host = ("host: none (on cpu, host memory is the device tier)" if self.host_budget is None else
                f"host {human(self.host + self.host_staging)} of {human(self.host_budget)} ({self.host_source}): "
                f"inputs {human(self.host)} pinned + staging {human(self.host_staging)}")
        models = "; ".join(f"{self.labels[path]}: " + ", ".join(
            f"{n} tensors {human(size)} {tier}" for tier, (n, size) in tiers.items())
            for path, tiers in self.by_model().items())
        moved, read = self.transfer()
        text = (f"memory plan on {self.device} ({_name(self.dtype)} merges; {self.kernels()}): {device}; {host}; "
                f"{models}; "
                f"per candidate reading every input: {human(moved)} host→device, {human(read)} from the files")
        if self.resident_dtype is not None:
            exact = all(p.stored == self.resident_dtype for p in self.parts
                        if not p.role and p.stored.is_floating_point)
            text += (f"; inputs kept in {_name(self.resident_dtype)} (resident_dtype): " +
                     ("as the files store them, so candidates are the full-precision inputs' (no rounding)" if exact
                      else "rounded once, so candidates differ from the full-precision inputs' by that rounding"))
        return text + "."

    def report(self) -> str:
        """The bound's terms and the plan per model, as lines (``evomerge inspect --plan-memory``)."""
        b = self.bound
        lines = [f"device {self.device}, budget {human(self.budget)} ({self.budget_source}); "
                 f"merges in {_name(self.dtype)}"
                 + (f", inputs kept in {_name(self.resident_dtype)}" if self.resident_dtype else ""),
                 f"methods: {self.kernels()}",
                 "device memory:"]
        terms = [("inputs (device tier)", b.resident), ("staging", b.staging), ("live model", b.live),
                 ("scratch", b.scratch), ("transient", b.transient), ("cut keys", b.cache_free),
                 (f"caches ({', '.join(CACHE_WORDS[k] for k in b.cached) or 'none kept'})", b.caches),
                 ("total", b.total)]
        lines += [f"  {label:<32} {human(size):>12}" for label, size in terms]
        if self.host_budget is not None:
            lines += [f"host memory (budget {human(self.host_budget)}, {self.host_source}):",
                      f"  {'inputs (host tier, pinned)':<32} {human(self.host):>12}",
                      f"  {'staging (pinned)':<32} {human(self.host_staging):>12}"]
        lines.append(f"  {'model':<32} " + " ".join(f"{tier:>22}" for tier in TIERS))
        for path, tiers in self.by_model().items():
            cells = [f"{tiers[t][0]:>5} t {human(tiers[t][1]):>12}" if t in tiers else f"{'-':>22}" for t in TIERS]
            lines.append(f"  {self.labels[path]:<32} " + " ".join(f"{c:>22}" for c in cells))
        moved, read = self.transfer()
        lines.append(f"per candidate reading every input: {human(moved)} host→device, {human(read)} from the files")
        return "\n".join([*lines, "", self.summary()])


def plan_tiers(folders: Mapping[Path, Folder], base: Path, *, device: torch.device, dtype: torch.dtype,
               resident_dtype: torch.dtype | None = None, max_memory: int | None = None,
               max_host_memory: int | None = None, trim_cache: TrimCacheMode = "auto",
               tier: Tier | None = None, methods: Collection[str] | None = None,
               block_limit: int | None = None) -> TierPlan:
    """The tier of every input of ``folders`` (``base`` among them) and the bound it gives (see the
    module docstring); ``tier``: every input there (the budgets still checked). ``methods``: the
    merge methods the materializer may run (None: any), ``block_limit``: its row blocks' element
    limit (None: none), which sizes the per-kernel terms and the staging when every method
    merges in row blocks (:func:`~evomerge.live.memory.memory_bound`). Nothing is loaded.
    Raises EvomergeError, in one line, for budgets that cannot hold the plan."""
    cuda = device.type == "cuda"
    if tier == "host" and not cuda:
        raise EvomergeError(f"tier host needs a CUDA device (on {device}, host memory is the device tier)")
    if resident_dtype == dtype:
        resident_dtype = None
    if resident_dtype is not None and not (resident_dtype.is_floating_point
                                           and resident_dtype.itemsize < dtype.itemsize):
        raise EvomergeError(f"resident_dtype {resident_dtype} is not a floating dtype narrower than the "
                            f"merge dtype {dtype}")
    terms = method_terms(methods)
    block = block_limit if terms.rows else None
    parts = input_parts(folders, base, dtype, resident_dtype, block=block, device=device)
    models = list(folders.values())
    sets = 2 if cuda else 1
    device_kinds = ("land", "cast") if cuda else ("host", "land", "cast")

    def staging(maxima: Widest, kinds: tuple[str, ...]) -> int:
        return sets * sum((2 if factor else 1) * len(through) * size
                          for (kind, _, factor), (size, through) in maxima.items() if kind in kinds)

    def bound(maxima: Widest, resident: int, cached: Sequence[str]) -> MemoryBound:
        return memory_bound(folders[base], models, dtype, cached=cached, resident=resident,
                            staging=staging(maxima, device_kinds), methods=methods, block=block, device=device)

    # device tier: parts[:cut]; the others in either of the other tiers (their staging counted for both)
    on_device = _Scan(parts, ("device",), ("host", "mmap") if cuda else ("mmap",), cuda)

    def device_bound(cut: int, cached: Sequence[str]) -> MemoryBound:
        return bound(on_device.maxima(cut), on_device.kept(0, cut), cached)

    n = len(parts)
    budget, budget_source = _device_budget(device, max_memory)
    reserved = terms.kinds if trim_cache == "on" else ()
    if tier is not None:
        cut, end = {"device": (n, n), "host": (0, n), "mmap": (0, 0)}[tier]
        needed = device_bound(cut, reserved).total
        if needed > budget:
            raise EvomergeError(f"tier {tier} needs {human(needed)} on {device} but {budget_source} is {human(budget)}")
    else:
        minimum = device_bound(0, ())
        if minimum.total > budget:
            raise EvomergeError(
                f"{budget_source} {human(budget)} is below the materializer's minimum {human(minimum.total)} "
                f"on {device} "
                f"(live {human(minimum.live)} + scratch {human(minimum.scratch)} + transient "
                f"{human(minimum.transient)} + cut keys {human(minimum.cache_free)} + staging "
                f"{human(minimum.staging)}, every input off the device)")
        if reserved:
            cached_kinds("on", lambda kinds: device_bound(0, kinds), budget, terms.kinds)  # raises if they cannot fit
        cut = _last_fit(n, lambda i: device_bound(i, reserved).total <= budget)
        end = cut
    cached = reserved or cached_kinds(trim_cache, lambda kinds: device_bound(cut, kinds), budget, terms.kinds)
    host_limit, host_source = None, "cpu: the device's memory"
    if cuda:
        host_limit, host_source = ((max_host_memory, "max_host_memory") if max_host_memory is not None else
                                   (host_budget(), f"available − {HOST_MARGIN:.0%} of the total"))
        in_host = _Scan(parts, ("host",), ("mmap",), cuda)  # from cut: parts[cut:end] in host memory

        def host_bytes(stop: int) -> int:
            return in_host.kept(cut, stop) + staging(in_host.maxima(stop, after=True), ("host",))

        if tier is None:
            if host_bytes(cut) > host_limit:
                raise EvomergeError(f"{host_source} {human(host_limit)} is below the {human(host_bytes(cut))} of "
                                    "pinned buffers the files' tensors are read through")
            end = cut + _last_fit(n - cut, lambda j: host_bytes(cut + j) <= host_limit)
        elif host_bytes(end) > host_limit:
            raise EvomergeError(f"tier {tier} needs {human(host_bytes(end))} of host memory but {host_source} "
                                f"is {human(host_limit)}")
    tiers: tuple[Tier, ...] = ("device",) * cut + ("host",) * (end - cut) + ("mmap",) * (n - end)
    maxima: Widest = {}
    for part, where in zip(parts, tiers):
        maxima = _widest(maxima, _groups(part, where, cuda))
    resident = sum(p.kept_bytes for p in parts[:cut])
    host = sum(p.kept_bytes for p in parts[cut:end]) if cuda else 0
    labels = {path: f"{path.name} (base)" if path == base else path.name for path in folders}
    return TierPlan(tuple(parts), tiers, bound(maxima, resident, cached), host,
                    staging(maxima, ("host",)) if cuda else 0, device, dtype, resident_dtype,
                    budget, budget_source, host_limit, host_source, labels,
                    None if methods is None else tuple(methods), block_limit, block is not None,
                    max((planned_passes(METHODS[m], dtype) for m in methods), default=1) if block else 1)


def plan_blocks(folders: Mapping[Path, Folder], base: Path, *, block_limit: int | None = None,
                **options) -> TierPlan:
    """:func:`plan_tiers` (``options``: its keywords) with the row blocks' limit chosen:
    ``block_limit`` when given; else (None) every tensor whole when that plan holds every input
    on the device, and otherwise the row blocks of :func:`~evomerge.live.memory.default_block_limit`.
    Row blocks cost the trimming methods passes and their caches on the blocked tensors (TIES
    1.6× slower per candidate on the 124.7M family, whose vocabulary tensors hold 40% of its
    elements: docs/benchmarks.md), so they are used only where memory asks for them."""
    if block_limit is not None:
        return plan_tiers(folders, base, block_limit=block_limit, **options)
    try:
        whole = plan_tiers(folders, base, **options)
    except EvomergeError:
        whole = None
    if whole is not None and set(whole.tiers) <= {"device"}:
        return whole
    return plan_tiers(folders, base, block_limit=default_block_limit(folders[base]), **options)


class _Scan:
    """Staging maxima and kept bytes of every split ``parts[:i]`` in ``inside`` tiers, ``parts[i:]``
    in ``outside`` ones (their groups counted for each), in O(groups) per split."""

    def __init__(self, parts: Sequence[Part], inside: tuple[Tier, ...], outside: tuple[Tier, ...], cuda: bool):
        def groups(part: Part, tiers: tuple[Tier, ...]) -> Widest:
            merged: Widest = {}
            for tier in tiers:
                merged = _widest(merged, _groups(part, tier, cuda))
            return merged

        self._prefix: list[Widest] = [{}]
        self._sizes = [0]
        for part in parts:
            self._prefix.append(_widest(self._prefix[-1], groups(part, inside)))
            self._sizes.append(self._sizes[-1] + part.kept_bytes)
        self._suffix: list[Widest] = [{}]
        for part in reversed(parts):
            self._suffix.append(_widest(self._suffix[-1], groups(part, outside)))
        self._suffix.reverse()

    def maxima(self, split: int, *, after: bool = False) -> Widest:
        """The groups' maxima of the split at ``split`` (``after``: of the outside parts only)."""
        return self._suffix[split] if after else _widest(self._prefix[split], self._suffix[split])

    def kept(self, start: int, stop: int) -> int:
        """The kept bytes of ``parts[start:stop]``."""
        return self._sizes[stop] - self._sizes[start]


def _last_fit(count: int, fits: Callable[[int], bool]) -> int:
    """The largest ``i`` in ``0..count`` with ``fits(i)`` (0 when none does)."""
    return next((i for i in range(count, 0, -1) if fits(i)), 0)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _device_budget(device: torch.device, max_memory: int | None) -> tuple[int, str]:
    if max_memory is not None:
        return max_memory, "max_memory"
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvomergeError(f"the free memory of {device} is unknown here (no CUDA device): set max_memory")
    return available_bytes(device), f"the free memory of {device}"
