"""``Fitness``: scores a live model on every metric of a definition and turns them into objectives.

Objectives. ``weighted_sum`` is one objective, maximized: Σ wᵢ·sᵢ·vᵢ over the metrics, with
sᵢ = +1 for a maximized metric and −1 for a minimized one (perplexity, ...), so a positive
weight always means "better is rewarded" and a negative weight penalizes a skill.
``separate`` gives one objective per metric with a non-zero weight: its raw value in its own
direction (the weight only selects). Metrics of weight 0 are scored and reported, not optimized.

Staged evaluation (pruning). ``stages`` (default ``[1.0]``) are fractions of each metric's
items. :meth:`Fitness.iter_stages` yields the scores after each stage, scoring only the
items the previous stage did not; ``evaluate(fraction=f)`` is one stage on its own.

Caching. With a ``cache_key`` (the search driver passes a hash of the merge plan), final
scores are cached by (key, split, fraction), in memory and optionally in a JSON-lines file;
the per-item values of the most recent keys are kept too, so a later, larger fraction of the
same candidate extends the earlier one instead of starting over.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from torch import nn

from evomerge.fitness.base import SPLITS, Direction, Metric, scoring
from evomerge.fitness.cache import ScoreCache

log = logging.getLogger(__name__)

Objective = Literal["weighted_sum", "separate"]
ITEM_CACHE_KEYS = 8  # candidates whose per-item values are kept for later stages


class Fitness:
    """Metrics, how they combine into objectives, pruning stages, and the score cache."""

    def __init__(self, metrics: list[Metric], *, objective: Objective = "weighted_sum",
                 stages: tuple[float, ...] = (1.0,), fingerprint: str = "", cache_file: Path | None = None):
        self.metrics = {metric.name: metric for metric in metrics}
        self.objective, self.stages = objective, tuple(stages)
        self._optimized = [m for m in metrics if m.weight != 0]
        if not self._optimized:
            raise ValueError("every metric has weight 0; at least one must be optimized")
        self._cache = ScoreCache(fingerprint, cache_file)
        self._items: OrderedDict[tuple[str, str], dict[str, list[Any]]] = OrderedDict()

    @property
    def metric_names(self) -> list[str]:
        """One name per objective: ``["weighted_sum"]``, or the optimized metrics' names."""
        if self.objective == "weighted_sum":
            return ["weighted_sum"]
        return [m.name for m in self._optimized]

    @property
    def directions(self) -> list[Direction]:
        """One direction per objective (for ``optuna.create_study(directions=...)``)."""
        if self.objective == "weighted_sum":
            return ["maximize"]
        return [m.direction for m in self._optimized]

    def objectives(self, scores: dict[str, float]) -> list[float]:
        """The objective value(s) of a scores dict from :meth:`evaluate`."""
        if self.objective == "weighted_sum":
            return [sum(m.weight * (scores[m.name] if m.direction == "maximize" else -scores[m.name])
                        for m in self._optimized)]
        return [scores[m.name] for m in self._optimized]

    def evaluate(self, model: nn.Module, tokenizer: Any, split: str = "search", *,
                 fraction: float = 1.0, cache_key: str | None = None) -> dict[str, float]:
        """Score ``model`` on ``split``: ``{metric: value}`` (a callable's dict entries too).

        ``fraction`` scores the first ceil(fraction × n) items of each metric (an early,
        prunable estimate). ``cache_key`` identifies the model's weights: a repeated key
        returns the cached scores without touching the model.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if cache_key is not None:
            cached = self._cache.get(cache_key, split, fraction)
            if cached is not None:
                log.debug("fitness cache hit: %s %s %.3g", cache_key, split, fraction)
                return cached
        scores = self._score(model, tokenizer, split, fraction, self._item_store(cache_key, split))
        if cache_key is not None:
            self._cache.put(cache_key, split, fraction, scores)
        return scores

    def evaluate_items(self, model: nn.Module, tokenizer: Any, split: str = "test"
                       ) -> tuple[dict[str, float], dict[str, list[float]]]:
        """Every item of ``split`` scored afresh (no cache): the scores of :meth:`evaluate`, and
        the per-item values of each metric whose score is their mean (``Metric.item_mean``; a
        metric with an unscored item is left out), for paired comparisons."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        items: dict[str, list[Any]] = {}
        scores = self._score(model, tokenizer, split, 1.0, items)
        return scores, {name: [float(v) for v in values] for name, values in items.items()
                        if self.metrics[name].item_mean and None not in values}

    def iter_stages(self, model: nn.Module, tokenizer: Any, split: str = "search", *,
                    cache_key: str | None = None) -> Iterator[tuple[float, dict[str, float]]]:
        """``(fraction, scores)`` after each of :attr:`stages`; stop iterating to prune.

        Each stage scores only the items the previous ones did not, also without a cache key.
        """
        if cache_key is not None:
            for fraction in self.stages:
                yield fraction, self.evaluate(model, tokenizer, split, fraction=fraction, cache_key=cache_key)
            return
        items: dict[str, list[Any]] = {}
        for fraction in self.stages:
            yield fraction, self._score(model, tokenizer, split, fraction, items)

    def _item_store(self, cache_key: str | None, split: str) -> dict[str, list[Any]]:
        if cache_key is None:
            return {}
        store = self._items.pop((cache_key, split), {})
        self._items[(cache_key, split)] = store
        while len(self._items) > ITEM_CACHE_KEYS:
            self._items.popitem(last=False)
        return store

    def _score(self, model: nn.Module, tokenizer: Any, split: str, fraction: float,
               items: dict[str, list[Any]]) -> dict[str, float]:
        scores: dict[str, float] = {}
        with scoring(model):
            for name, metric in self.metrics.items():
                metric.prepare(model, tokenizer, split)
                values = items.setdefault(name, [])
                wanted = metric.items_for(split, fraction)
                if len(values) < wanted:
                    start, first = time.perf_counter(), len(values)
                    values += metric.score(model, tokenizer, split, first, wanted)
                    log.debug("%s/%s: items %d-%d scored in %.2f s", name, split, first, wanted - 1,
                              time.perf_counter() - start)
                scores.update(metric.aggregate(values[:wanted]))
        return scores
