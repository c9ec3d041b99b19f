"""The experiment config: which models, which search space, which fitness, how to search.

::

    name: zoo-ps-ties                    # also the default study name
    models:
      base: runs/zoo/base                # relative paths: from the current directory
      sources: [runs/zoo/increment, runs/zoo/reverse, runs/zoo/dates]
    search_space: ps_ties                # a shipped name, a path, or an inline mapping
    fitness: zoo_skills                  # a shipped name, a path (relative to the current directory) or a mapping
    optimizer:
      sampler: cmaes                     # cmaes | cma | tpe | nsga2 | random
      popsize: 8                         # CMA-ES population / NSGA-II population
      sigma0: 0.25                       # CMA-ES initial step, in units of each parameter's range
      restarts: null                     # ipop: restart a converged CMA-ES, population ×2 (sampler cma)
      seed: 0
      warm_start: true                   # first trials: the space's known recipes
    budget: {n_trials: 40, timeout: null, max_failures_in_a_row: 5}
    storage: null                        # Optuna storage URL; default sqlite:///runs/studies/<name>.db
    device: cpu
    dtype: float32                       # the dtype candidates are merged and scored in
    seed: 0                              # DARE/DELLA mask seed of every candidate
    trim_cache: auto                     # auto | on | off: per-source trim caches (same results)

The experiment itself is a file or the name of one shipped with the package
(``evomerge search zoo_ps``; names: :mod:`evomerge.io.shipped`), and so are a string
``search_space`` and ``fitness``.

Pruning comes from the fitness definition's ``stages``: with more than one stage, a
candidate is scored on the first fraction of the search split, reported to Optuna's
median pruner, and stopped early when it falls behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from evomerge.engine.config import DTYPES, field_path, read_file, read_mapping, validation_failure, yaml_line
from evomerge.errors import ConfigError
from evomerge.io import shipped

Sampler = Literal["cmaes", "cma", "tpe", "nsga2", "random"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Models(_Strict):
    base: str
    sources: list[str]

    @field_validator("sources")
    @classmethod
    def _not_empty(cls, sources: list[str]) -> list[str]:
        if not sources:
            raise ValueError("expected at least one source model")
        return sources


class Optimizer(_Strict):
    sampler: Sampler = "cmaes"
    popsize: int | None = None
    sigma0: float | None = None
    restarts: Literal["ipop"] | None = None
    seed: int = 0
    warm_start: bool = True


class Budget(_Strict):
    n_trials: int | None = 40
    timeout: float | None = None
    max_failures_in_a_row: int = 5


class Experiment(_Strict):
    name: str
    models: Models
    search_space: str | dict[str, Any]
    fitness: str | dict[str, Any]
    optimizer: Optimizer = Optimizer()
    budget: Budget = Budget()
    storage: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    # the materializer's per-source trim caches: auto (those that fit), on (all), off (cache-free)
    trim_cache: Literal["auto", "on", "off"] = "auto"

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, dtype: str) -> str:
        if dtype not in DTYPES:
            raise ValueError(f"expected one of {', '.join(DTYPES)}")
        return dtype

    @property
    def default_storage(self) -> str:
        return f"sqlite:///runs/studies/{self.name}.db"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_experiment(text: str, source: str = "<experiment>") -> Experiment:
    """Validate an experiment from YAML text; errors name the file, line and field."""
    data, root = read_mapping(text, source)
    try:
        return Experiment.model_validate(data)
    except ValidationError as error:
        path, message = validation_failure(error)
        raise ConfigError(message, file=source, field=field_path(path), line=yaml_line(root, path)) from None


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file, or the shipped experiment of that name."""
    path = shipped.find("experiments", path)
    return parse_experiment(read_file(path, "experiment"), str(path))
