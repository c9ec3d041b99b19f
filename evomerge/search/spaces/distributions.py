"""Values of a search space's Optuna distributions: membership checks and the unit-cube code.

A space's parameters are linear ``FloatDistribution``s, step-1 ``IntDistribution``s and
``CategoricalDistribution``s. :func:`to_unit` / :func:`from_unit` map them to and from
``[0, 1]^d`` for optimizers that work on a box (the ``cma`` package's ask/tell): a float
scales linearly; an int or a categorical with ``n`` values owns ``n`` equal bins of
``[0, 1]`` and encodes as its bin's centre. ``from_unit(to_unit(p)) == p`` (floats up to
rounding); ``from_unit`` clips coordinates outside ``[0, 1]``, as CMA-ES samples may be.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

Distributions = Mapping[str, BaseDistribution]


def checked(distributions: Distributions, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` restricted to ``distributions``, as plain Python values; ValueError names
    the first parameter that is missing or outside its distribution."""
    values = {}
    for name, dist in distributions.items():
        if name not in params:
            raise ValueError(f"missing parameter {name!r}")
        value = params[name]
        if isinstance(dist, CategoricalDistribution):
            ok = value in dist.choices
        elif isinstance(dist, IntDistribution):
            ok = float(value).is_integer() and dist.low <= value <= dist.high
            value = int(value)
        else:
            value = float(value)
            ok = dist.low <= value <= dist.high
        if not ok:
            raise ValueError(f"parameter {name!r}: {params[name]!r} is outside {dist}")
        values[name] = value
    return values


def _bins(dist: BaseDistribution) -> Sequence[Any]:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices
    return range(dist.low, dist.high + 1)


def to_unit(distributions: Distributions, params: Mapping[str, Any]) -> list[float]:
    """Encode ``params`` as a point of ``[0, 1]^d`` (order of ``distributions``)."""
    vector = []
    for name, value in checked(distributions, params).items():
        dist = distributions[name]
        if isinstance(dist, FloatDistribution):
            vector.append((value - dist.low) / (dist.high - dist.low))
        else:
            bins = _bins(dist)
            vector.append((list(bins).index(value) + 0.5) / len(bins))
    return vector


def from_unit(distributions: Distributions, vector: Sequence[float]) -> dict[str, Any]:
    """Decode a point of ``[0, 1]^d`` (coordinates clipped into it) into parameters."""
    if len(vector) != len(distributions):
        raise ValueError(f"expected a vector of {len(distributions)} values, got {len(vector)}")
    params = {}
    for (name, dist), u in zip(distributions.items(), vector):
        u = min(1.0, max(0.0, float(u)))
        if isinstance(dist, FloatDistribution):
            params[name] = min(dist.high, max(dist.low, dist.low + u * (dist.high - dist.low)))
        else:
            bins = _bins(dist)
            params[name] = bins[min(len(bins) - 1, int(u * len(bins)))]
    return params
