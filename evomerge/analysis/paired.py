"""Paired held-out comparisons: is a found merge better than a reference, or is it noise?

Both models answer the same held-out items, so they are compared item by item, on the
metrics that make up the held-out table's *mean skill* (each skill metric's mean over its
items, averaged over the skill metrics):

* ``difference``: mean skill of the model minus that of the reference;
* ``low``/``high``: a 95% paired bootstrap interval of that difference: the items of each
  metric are resampled with replacement (each metric on its own, as the mean skill weighs
  metrics, not items), both models keeping their answers to the drawn items; the 2.5th and
  97.5th percentiles of ``RESAMPLES`` draws from a fixed seed (so a report is reproducible);
* ``wins``/``losses``: items (all skill metrics pooled) where the model scored higher/lower;
* ``p_value``: the exact two-sided sign test of wins against losses (McNemar's exact test
  when scores are 0/1): the chance of a split at least this uneven if each model were as
  likely as the other to win an item they disagree on. Ties carry no information and are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 10_000
SEED = 0
_CHUNK = 1_000  # resamples drawn at once (bounds memory at _CHUNK × items indices)


@dataclass(frozen=True)
class Paired:
    """One model against one reference on the same items (module docstring)."""

    model: str
    reference: str
    difference: float
    low: float
    high: float
    wins: int
    losses: int
    p_value: float

    def as_dict(self) -> dict:
        return asdict(self)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: P(a split at least as uneven as ``wins``:``losses``) under p = ½."""
    trials = wins + losses
    if trials == 0:
        return 1.0
    tail = sum(math.comb(trials, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**trials)


def compare(model: Mapping[str, Sequence[float]], reference: Mapping[str, Sequence[float]], *,
            labels: tuple[str, str] = ("model", "reference"), resamples: int = RESAMPLES,
            seed: int = SEED) -> Paired:
    """Compare per-item values ``{metric: [value per item]}`` of two models on the same items."""
    if set(model) != set(reference) or not model:
        raise ValueError(f"both models need the same metrics, got {sorted(model)} and {sorted(reference)}")
    differences = []
    for name in sorted(model):
        mine, theirs = np.asarray(model[name], dtype=float), np.asarray(reference[name], dtype=float)
        if mine.shape != theirs.shape or mine.ndim != 1 or mine.size == 0:
            raise ValueError(f"metric {name!r}: expected the same non-empty list of items for both models, "
                             f"got {mine.size} and {theirs.size} values")
        differences.append(mine - theirs)
    rng = np.random.default_rng(seed)
    draws = np.zeros(resamples)
    for start in range(0, resamples, _CHUNK):
        count = min(_CHUNK, resamples - start)
        for diff in differences:
            draws[start:start + count] += diff[rng.integers(0, diff.size, (count, diff.size))].mean(axis=1)
    draws /= len(differences)
    low, high = np.percentile(draws, [2.5, 97.5])
    wins = sum(int((diff > 0).sum()) for diff in differences)
    losses = sum(int((diff < 0).sum()) for diff in differences)
    difference = float(np.mean([diff.mean() for diff in differences]))
    return Paired(labels[0], labels[1], _clean(difference), _clean(low), _clean(high), wins, losses,
                  sign_test(wins, losses))


def _clean(value: float) -> float:
    """``value`` without float noise below 1e-12 (so an exact 0 prints as +0.0000, not -0.0000)."""
    return round(float(value), 12) + 0.0
