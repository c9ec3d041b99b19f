"""The materializer's trim caches: what a candidate's trims reuse, built once per source tensor.

For each trimmed input, the cache kinds its method's sparsifier declares
(:attr:`~evomerge.methods.sparsify.Sparsify.caches`) that the materializer keeps (its
``trim_cache`` setting and memory bound, :func:`~evomerge.live.memory.cached_kinds`), built on the first candidate that
needs them and kept for all later ones: the magnitude positions and DELLA ranks of its
task vector, keyed by (source, tensor, base, base tensor), and the words of its random
stream, keyed by (source, tensor) and kept for one random key (the words depend on the
seed, so a search keeps its seed fixed; a new key replaces them). A trim at any density
is then one comparison pass. SCE's selection likewise gets the variance order of an op's
task vectors (:func:`~evomerge.methods.sce.variance_order`), kept for one set of inputs per
output tensor (a new set replaces it), so at most one int32 per element. Each op's caches
reach its kernel, with the one reusable workspace, as one
:class:`~evomerge.methods.sparsify.Caches`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from evomerge.engine.plan import MergePlan, TensorOp
from evomerge.methods.random import stream_words
from evomerge.methods.registry import trimmed_inputs
from evomerge.methods.sce import variance_order
from evomerge.methods.sparsify import CACHE_KINDS, NO_CACHE, Caches, TrimCache, della_rank, magnitude_position
from evomerge.methods.workspace import Workspace

CACHE_NAMES = {"position": "magnitude positions", "rank": "DELLA ranks", "words": "random words"}


class CacheStore:
    """The trim caches of one materializer, of the cache kinds ``kinds`` (the others' trims
    run cache-free; SCE's variance orders are kept with ``position``), and its workspace.

    ``built[kind]`` maps a cache slot to ``(random key or None, tensor)``; tensors are on ``device``.
    """

    def __init__(self, device: torch.device, kinds: Sequence[str]):
        self.device = device
        self.kinds = tuple(kinds)
        self.built: dict[str, dict[tuple, tuple[int | None, torch.Tensor]]] = {kind: {} for kind in CACHE_KINDS}
        self.workspace = Workspace()
        self.selections: dict[str, tuple[tuple, torch.Tensor]] = {}  # output tensor → (inputs, order)

    def to_build(self, plan: MergePlan) -> str | None:
        """In words, what ``plan``'s sparsifier caches when no candidate has built all of it yet
        (None: nothing to build, also when the plan trims no task vector)."""
        if "position" in self.kinds and plan.method.name == "sce" and not self.selections and any(
                _selects(op) for op in plan.ops):
            return "SCE variance orders"
        kinds = self._kinds(plan)
        if not kinds or all(self.built[kind] for kind in kinds):
            return None
        if not any(any(trimmed_inputs(op.per_input, op.base_index)) for op in plan.ops if op.base_index is not None):
            return None
        return " and ".join(CACHE_NAMES[kind] for kind in kinds)

    def _kinds(self, plan: MergePlan) -> list[str]:
        """The cache kinds ``plan``'s sparsifier uses that this store keeps."""
        sparsify = plan.method.sparsify
        return [] if sparsify is None else [kind for kind in sparsify.caches if kind in self.kinds]

    def for_op(self, op: TensorOp, plan: MergePlan, paths: dict[str, Path],
               tensors: Sequence[torch.Tensor]) -> Caches:
        """What ``op``'s kernel reuses: per trimmed input the caches of ``plan``'s sparsifier
        that this store keeps (built now if missing; none for a cropped op), and the workspace. ``paths``: the
        plan's model names resolved; ``tensors``: ``op``'s inputs, resident on the device."""
        if "position" in self.kinds and plan.method.name == "sce" and op.crop_rows is None and _selects(op):
            return Caches(workspace=self.workspace, selection=self._selection(op, paths, tensors))
        kinds = self._kinds(plan)
        if not kinds or op.crop_rows is not None or op.base_index is None:
            return Caches(workspace=self.workspace)
        base_model, base_name = op.inputs[op.base_index]
        base = (paths[base_model], base_name)
        trims = []
        for (model, name), tensor, key, trimmed in zip(op.inputs, tensors, op.keys,
                                                       trimmed_inputs(op.per_input, op.base_index)):
            source = (paths[model], name)
            trims.append(TrimCache(**{
                kind: self._entry(kind, source, base, tensor, tensors[op.base_index], key)
                for kind in kinds}) if trimmed else NO_CACHE)
        return Caches(trims, self.workspace)

    def _entry(self, kind: str, source: tuple[Path, str], base: tuple[Path, str], tensor: torch.Tensor,
               base_tensor: torch.Tensor, key: int) -> torch.Tensor:
        """The ``kind`` cache of input ``source`` (its task vector over ``base``), built if missing."""
        slot, stamp = (source, key) if kind == "words" else ((*source, *base), None)
        entry = self.built[kind].get(slot)
        if entry is None or entry[0] != stamp:
            if kind == "words":
                built = stream_words(key, tensor.numel(), self.device)
            else:
                built = (magnitude_position if kind == "position" else della_rank)(tensor - base_tensor)
            entry = self.built[kind][slot] = (stamp, built)
        return entry[1]

    def _selection(self, op: TensorOp, paths: dict[str, Path], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The variance order of ``op``'s task vectors, built if missing or for other inputs."""
        inputs = (tuple((paths[model], name) for model, name in op.inputs), op.base_index)
        entry = self.selections.get(op.name)
        if entry is None or entry[0] != inputs:
            sources = [t for i, t in enumerate(tensors) if i != op.base_index]
            entry = self.selections[op.name] = (inputs, variance_order(tensors[op.base_index], sources))
        return entry[1]


def _selects(op: TensorOp) -> bool:
    """Whether SCE's select step trims in ``op`` (select_topk strictly inside (0, 1))."""
    return 0 < op.shared.get("select_topk", 1.0) < 1 and len(op.inputs) > 1
