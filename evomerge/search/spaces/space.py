"""The :class:`SearchSpace` interface: a trial's named parameters ↔ a merge config.

A space owns a flat, stably ordered set of Optuna distributions and a pure, deterministic
``decode`` from any values inside them to a :class:`~evomerge.engine.config.MergeConfig` that
``build_plan`` accepts (spaces clip rather than reject, so an optimizer never meets an
invalid point). ``known_recipes`` are warm-start points (for ``study.enqueue_trial``);
``to_unit`` / ``from_unit`` put the same parameters on ``[0, 1]^d`` for the ``cma``
package. Each space kind is one module (``parameter``, ``stacking``, ``dataflow``) with
its YAML schema (a :class:`SpaceSpec`); ``loader.load_search_space`` builds them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

from optuna.distributions import BaseDistribution
from pydantic import BaseModel, ConfigDict

from evomerge.engine.config import MergeConfig
from evomerge.search.spaces import distributions as dists

Fail = Callable[[tuple, str], NoReturn]  # fail(field path, message) raises ConfigError


class SpaceSpec(BaseModel):
    """Fields every space file has: its ``kind``, a description, and merge-config fields
    copied into every decoded config unchanged."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    description: str | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None


@dataclass(frozen=True)
class SpaceContext:
    """What a space is built against: the experiment's models and their depth."""

    name: str
    models: tuple[str, ...]
    base_model: str | None
    num_layers: int

    def sources(self, include_base: bool) -> list[str]:
        """The models (the base first when ``include_base``), without repeats."""
        base = [self.base_model] if include_base and self.base_model else []
        return list(dict.fromkeys(base + list(self.models)))


class SearchSpace(ABC):
    """Trial parameters → merge config. Subclasses fill ``_distributions`` in ``__init__``."""

    Spec: ClassVar[type[SpaceSpec]]

    def __init__(self, spec: SpaceSpec, context: SpaceContext, fail: Fail):
        self.name = context.name
        self.spec = spec
        self.context = context
        self._distributions: dict[str, BaseDistribution] = {}

    @property
    def mergekit_compatible(self) -> bool:
        """Whether every decoded config is also a valid ``mergekit-yaml`` config."""
        return True

    @property
    @abstractmethod
    def methods(self) -> tuple[str, ...]:
        """The merge methods of the configs it decodes (what a materializer's memory plan counts)."""

    def distributions(self) -> dict[str, BaseDistribution]:
        """The searched parameters by name, in a stable order."""
        return dict(self._distributions)

    @abstractmethod
    def decode(self, params: Mapping[str, Any]) -> MergeConfig:
        """The merge config for ``params`` (keys outside ``distributions()`` are ignored;
        ValueError when one is missing or out of range)."""

    @abstractmethod
    def known_recipes(self) -> list[dict[str, Any]]:
        """Warm-start points inside the distributions, without duplicates."""

    def to_unit(self, params: Mapping[str, Any]) -> list[float]:
        """``params`` as a point of ``[0, 1]^d``, in ``distributions()`` order."""
        return dists.to_unit(self._distributions, params)

    def from_unit(self, vector: Sequence[float]) -> dict[str, Any]:
        """Parameters for a point of ``[0, 1]^d`` (coordinates outside are clipped)."""
        return dists.from_unit(self._distributions, vector)

    def _checked(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return dists.checked(self._distributions, params)

    def _config(self, data: dict[str, Any]) -> MergeConfig:
        """Build the decoded config, adding the spec's pass-through merge fields."""
        for key in ("dtype", "out_dtype", "tokenizer_source"):
            if getattr(self.spec, key) is not None:
                data[key] = getattr(self.spec, key)
        config = MergeConfig.model_validate(data)
        config._source = f"<search space {self.name}>"
        return config


def unique(recipes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``recipes`` without repeats, first occurrence kept."""
    result: list[dict[str, Any]] = []
    for recipe in recipes:
        if recipe not in result:
            result.append(recipe)
    return result
