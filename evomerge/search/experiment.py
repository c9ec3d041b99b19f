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
    max_memory: null                     # device bytes for the materializer (e.g. 40GB); default: free memory
    max_host_memory: null                # pinned host bytes for inputs off the GPU; default: available − 10%
    resident_dtype: null                 # e.g. bfloat16: inputs kept rounded to it (not bit-identical)

The experiment itself is a file or the name of one shipped with the package
(``evomerge search zoo_ps``; names: :mod:`evomerge.io.shipped`), and so are a string
``search_space`` and ``fitness``.

Pruning comes from the fitness definition's ``stages``: with more than one stage, a
candidate is scored on the first fraction of the search split, reported to Optuna's
median pruner, and stopped early when it falls behind.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from evomerge.engine.config import (
    DTYPES,
    field_path,
    read_file,
    read_mapping,
    torch_dtype,
    validation_failure,
    yaml_line,
)
from evomerge.errors import ConfigError
from evomerge.io import shipped

Sampler = Literal["cmaes", "cma", "tpe", "nsga2", "random"]
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(size: int | float | str | None) -> int | None:
    """``40GB``, ``1.5 GiB``, ``123`` or ``4.0e10`` (bytes) → bytes; None stays None. Raises ValueError."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, float, str)):
        raise ValueError(f"expected bytes or a size such as 40GB or 1.5GiB, got {size!r}")
    if isinstance(size, (int, float)):
        if not 0 < size < float("inf"):
            raise ValueError(f"expected a positive number of bytes, got {size!r}")
        return int(size)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", size)
    if match is None or match.group(2).upper() not in _UNITS:
        raise ValueError(f"expected bytes or a size such as 40GB or 1.5GiB, got {size!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


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
    # the materializer's memory plan (evomerge inspect --plan-memory shows it): budgets in bytes
    max_memory: int | None = None
    max_host_memory: int | None = None
    resident_dtype: str | None = None

    @field_validator("dtype", "resident_dtype")
    @classmethod
    def _known_dtype(cls, dtype: str | None) -> str | None:
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"expected one of {', '.join(DTYPES)}")
        return dtype

    @field_validator("max_memory", "max_host_memory", mode="before")
    @classmethod
    def _size(cls, size: int | str | None) -> int | None:
        return parse_bytes(size)

    def materializer_options(self) -> dict[str, Any]:
        """The :class:`~evomerge.live.materializer.Materializer` keywords this experiment sets."""
        return {"dtype": torch_dtype(self.dtype), "trim_cache": self.trim_cache, "max_memory": self.max_memory,
                "max_host_memory": self.max_host_memory, "resident_dtype": torch_dtype(self.resident_dtype)}

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
