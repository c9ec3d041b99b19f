"""Data-flow-space (DFS) search, after Akiba et al., "Evolutionary Optimization of Model
Merging Recipes" (2024, arXiv:2403.13187).

The ``L`` layers of each of the ``M`` sources are laid out in sequence (source by source)
and the sequence is repeated ``repeats`` (``r``) times: ``T = M·L·r`` slots. Slot
``r{k}.{model}.{layer}`` has an include bit ``...on`` (int 0/1, so CMA-ES can search it;
the paper's indicator array) and, when ``scale: [low, high]`` is set, a factor
``...scale`` on the hidden state entering that layer. (The paper scales by a matrix
``W[i, j]`` indexed by the previous and the next layer; one factor per slot is the
simplification used here.)

A point decodes to a passthrough config with one 1-layer slice per included slot, in slot
order: ``{sources: [{model, layer_range: [i, i+1], input_scale: s}]}``. ``input_scale`` is
evomerge-only and emitted only when ``s != 1``, so the space is mergekit-compatible
exactly when no scale is searched. Guards (clip, not reject): no slot included → the first
slot alone; ``max_layers`` → only the first ``max_layers`` included slots. Sources are the
experiment's models, plus the base model first when ``include_base: true``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from optuna.distributions import FloatDistribution, IntDistribution
from pydantic import PositiveInt

from evomerge.engine.config import MergeConfig
from evomerge.search.spaces.space import Fail, SearchSpace, SpaceContext, SpaceSpec
from evomerge.engine.config import model_labels


class DataFlowSpec(SpaceSpec):
    kind: Literal["dfs"]
    repeats: PositiveInt = 3
    scale: tuple[float, float] | None = None
    max_layers: PositiveInt | None = None
    include_base: bool = False


class DataFlowSpace(SearchSpace):
    """An include bit (and optionally an input scale) per slot of the repeated layer sequence."""

    @property
    def methods(self) -> tuple[str, ...]:
        return ("passthrough",)

    Spec = DataFlowSpec

    def __init__(self, spec: DataFlowSpec, context: SpaceContext, fail: Fail):
        super().__init__(spec, context, fail)
        sources = context.sources(spec.include_base)
        if not sources:
            fail(("models",), "a data-flow space needs at least one model")
        if spec.scale is not None and not spec.scale[0] < spec.scale[1]:
            fail(("scale",), f"expected [low, high] with low < high, got {list(spec.scale)}")
        labels = model_labels(sources)
        # (parameter-name prefix, model path, layer) per slot, in data-flow order
        self.slots = [(f"r{k}.{label}.{layer}", model, layer)
                      for k in range(spec.repeats)
                      for model, label in zip(sources, labels)
                      for layer in range(context.num_layers)]
        for prefix, _, _ in self.slots:
            self._distributions[f"{prefix}.on"] = IntDistribution(0, 1)
            if spec.scale is not None:
                self._distributions[f"{prefix}.scale"] = FloatDistribution(*spec.scale)

    @property
    def mergekit_compatible(self) -> bool:
        return self.spec.scale is None

    def decode(self, params: Mapping[str, Any]) -> MergeConfig:
        values = self._checked(params)
        chosen = [slot for slot in self.slots if values[f"{slot[0]}.on"]] or self.slots[:1]
        slices = []
        for prefix, model, layer in chosen[:self.spec.max_layers]:
            source: dict[str, Any] = {"model": model, "layer_range": [layer, layer + 1]}
            scale = values.get(f"{prefix}.scale", 1.0)
            if scale != 1.0:
                source["input_scale"] = scale
            slices.append({"sources": [source]})
        return self._config({"merge_method": "passthrough", "slices": slices})

    def known_recipes(self) -> list[dict[str, Any]]:
        """Each source alone: its layers in order (first repeat), scales 1 (clipped)."""
        one = 1.0 if self.spec.scale is None else min(self.spec.scale[1], max(self.spec.scale[0], 1.0))
        recipes = []
        for model in dict.fromkeys(model for _, model, _ in self.slots):
            recipe: dict[str, Any] = {}
            for index, (prefix, slot_model, _) in enumerate(self.slots):
                recipe[f"{prefix}.on"] = int(slot_model == model and index < len(self.slots) //
                                             self.spec.repeats)
                if self.spec.scale is not None:
                    recipe[f"{prefix}.scale"] = one
            recipes.append(recipe)
        return recipes
