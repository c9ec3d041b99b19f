"""Layer-stacking (frankenmerge / passthrough) search: which source layers fill the output.

The output is ``num_blocks`` blocks in order. Block ``i`` has parameters ``b{i}.model``
(categorical over the source labels), ``b{i}.start`` (int) and, when ``block_length`` is a
``[min, max]`` range, ``b{i}.length`` (int); a fixed ``block_length`` is not searched.
Repeats are allowed. Every point decodes to a valid passthrough config, by clipping:

1. a block runs ``[start, start + length)`` with ``start`` clipped to ``depth - length``
   (so blocks near the top slide down instead of overrunning);
2. with ``max_layers``, blocks are cut so the output depth stays ``<= max_layers``: the
   block that crosses it is shortened, later blocks are dropped. The first block always
   keeps at least one layer.

``block_length`` values above the models' depth are clipped to it. Sources are the
experiment's models, plus the base model first when ``include_base: true``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from optuna.distributions import CategoricalDistribution, IntDistribution
from pydantic import PositiveInt

from evomerge.engine.config import MergeConfig
from evomerge.search.spaces.space import Fail, SearchSpace, SpaceContext, SpaceSpec
from evomerge.engine.config import model_labels


class StackingSpec(SpaceSpec):
    kind: Literal["stacking"]
    num_blocks: PositiveInt
    block_length: int | tuple[int, int] = 1
    max_layers: PositiveInt | None = None
    include_base: bool = False


class StackingSpace(SearchSpace):
    """Output blocks, each a layer range of one source model."""

    @property
    def methods(self) -> tuple[str, ...]:
        return ("passthrough",)

    Spec = StackingSpec

    def __init__(self, spec: StackingSpec, context: SpaceContext, fail: Fail):
        super().__init__(spec, context, fail)
        self.sources = context.sources(spec.include_base)
        if not self.sources:
            fail(("models",), "layer stacking needs at least one model")
        self.labels = model_labels(self.sources)
        depth = context.num_layers
        lengths = spec.block_length if isinstance(spec.block_length, tuple) else (spec.block_length,) * 2
        if not 1 <= lengths[0] <= lengths[1]:
            fail(("block_length",), "expected a length >= 1 or [min, max] with 1 <= min <= max, "
                 f"got {spec.block_length}")
        self.lengths = (min(lengths[0], depth), min(lengths[1], depth))
        for i in range(spec.num_blocks):
            self._distributions[f"b{i}.model"] = CategoricalDistribution(self.labels)
            self._distributions[f"b{i}.start"] = IntDistribution(0, depth - self.lengths[0])
            if self.lengths[0] < self.lengths[1]:
                self._distributions[f"b{i}.length"] = IntDistribution(*self.lengths)

    def decode(self, params: Mapping[str, Any]) -> MergeConfig:
        values = self._checked(params)
        depth, room = self.context.num_layers, self.spec.max_layers or float("inf")
        slices = []
        for i in range(self.spec.num_blocks):
            length = values.get(f"b{i}.length", self.lengths[0])
            start = min(values[f"b{i}.start"], depth - length)
            length = min(length, room)
            if length <= 0:
                break
            room -= length
            model = self.sources[self.labels.index(values[f"b{i}.model"])]
            slices.append({"sources": [{"model": model, "layer_range": [start, start + length]}]})
        return self._config({"merge_method": "passthrough", "slices": slices})

    def known_recipes(self) -> list[dict[str, Any]]:
        """Each source alone (its layers in order), when ``num_blocks`` blocks of an
        allowed length tile the depth exactly and ``max_layers`` permits it."""
        depth, blocks = self.context.num_layers, self.spec.num_blocks
        length = depth // blocks
        if (length * blocks != depth or not self.lengths[0] <= length <= self.lengths[1]
                or (self.spec.max_layers or depth) < depth):
            return []
        recipes = []
        for label in self.labels:
            recipe: dict[str, Any] = {}
            for i in range(blocks):
                recipe |= {f"b{i}.model": label, f"b{i}.start": i * length}
                if f"b{i}.length" in self._distributions:
                    recipe[f"b{i}.length"] = length
            recipes.append(recipe)
        return recipes
