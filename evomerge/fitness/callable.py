"""A fitness term computed by user code: ``f(model, tokenizer, split=...) -> float | dict``.

``function`` is ``package.module:name`` (imported) or ``path/to/file.py:name`` (relative to
the fitness file). A float is the metric's value. A dict reports every entry as
``<metric>.<key>`` and takes the metric's value from entry ``key`` (default: the only entry).
A callable is one item: fractions (pruning stages) do not subsample it, it runs once per
candidate and split. An exception, or a value that is not a number, raises
:class:`FitnessError` naming the metric and the function.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
from collections.abc import Callable, Mapping
from numbers import Real
from pathlib import Path
from typing import Any

from torch import nn

from evomerge.errors import FitnessError
from evomerge.fitness.base import Direction, Metric


def resolve_function(reference: str, base_dir: Path) -> tuple[Callable, Path | None]:
    """The callable named by ``module:name`` or ``file.py:name``, and its file for the latter.

    Raises ValueError with a one-line reason.
    """
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected 'package.module:function' or 'file.py:function', got {reference!r}")
    path = None
    if module_name.endswith(".py"):
        path = (base_dir / module_name).resolve()
        if not path.is_file():
            raise ValueError(f"file not found: {path}")
        unique = "evomerge_fitness_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            raise ValueError(f"cannot load {path}: {type(error).__name__}: {error}") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise ValueError(f"cannot import {module_name!r}: {type(error).__name__}: {error}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"{module_name!r} has no function {attribute!r}")
    return function, path


class CallableMetric(Metric):
    """A user function as a metric (one item per candidate and split)."""

    def __init__(self, name: str, function: Callable, reference: str, *, direction: Direction,
                 weight: float, key: str | None = None, path: Path | None = None):
        super().__init__(name, direction, weight)
        self.function, self.reference, self.key, self.path = function, reference, key, path

    def sources(self) -> list[Path]:
        return [self.path] if self.path else []

    def num_items(self, split: str) -> int:
        return 1

    def score(self, model: nn.Module, tokenizer: Any, split: str, start: int, stop: int) -> list[Any]:
        try:
            result = self.function(model, tokenizer, split=split)
        except Exception as error:
            raise self._error(f"raised {type(error).__name__}: {error}") from error
        return [self._scores(result)]

    def aggregate(self, values: list[Any]) -> dict[str, float]:
        return dict(values[0])

    def _scores(self, result: Any) -> dict[str, float]:
        if not isinstance(result, Mapping):
            return {self.name: self._number(result, "returned")}
        scores = {f"{self.name}.{k}": self._number(v, f"returned {k!r} =") for k, v in result.items()}
        key = self.key
        if key is None and len(result) == 1:
            key = next(iter(result))
        if key not in result:
            wanted = f"key {key!r}" if key is not None else "one entry (or set `key`)"
            raise self._error(f"returned keys {sorted(map(str, result))}; expected {wanted}")
        return {self.name: scores[f"{self.name}.{key}"], **scores}

    def _number(self, value: Any, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, Real) and not _is_scalar_tensor(value):
            raise self._error(f"{what} {type(value).__name__}; expected a number or a dict of numbers")
        number = float(value)
        if math.isnan(number):
            raise self._error(f"{what} NaN")
        return number

    def _error(self, message: str) -> FitnessError:
        return FitnessError(f"fitness metric {self.name!r} ({self.reference}) {message}")


def _is_scalar_tensor(value: Any) -> bool:
    numel = getattr(value, "numel", None)
    return callable(numel) and numel() == 1 and hasattr(value, "__float__")
