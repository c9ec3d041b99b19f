"""``Fitness``: scores a live model on every metric of a definition and turns them into objectives.

Objectives. ``weighted_sum`` is one objective, maximized: Σ wᵢ·sᵢ·vᵢ over the metrics, with
sᵢ = +1 for a maximized metric and −1 for a minimized one (perplexity, ...), so a positive
weight always means "better is rewarded" and a negative weight penalizes a skill.
``separate`` gives one objective per metric with a non-zero weight: its raw value in its own
direction (the weight only selects). Metrics of weight 0 are scored and reported, not optimized.

Staged evaluation (pruning). ``stages`` (default ``[1.0]``) are fractions of each metric's
items. :meth:`Fitness.iter_stages` yields the scores after each stage, scoring only the
items the previous stage did not; ``evaluate(fraction=f)`` is one stage on its own.

Racing (``racing`` settings, :mod:`evomerge.fitness.racing`): :meth:`Fitness.race` scores a
candidate in growing chunks of one seeded item order and stops it as soon as it cannot beat
the references it races against (the incumbent, or a multi-objective study's Pareto front); it
replaces the stages. :meth:`Fitness.metered` counts what is scored (items, forward-pass tokens,
seconds per metric), whichever way.

Caching. With a ``cache_key`` (the search driver passes a hash of the merge plan), final
scores are cached by (key, split, fraction), in memory and optionally in a JSON-lines file;
the per-item values of the most recent keys are kept too, so a later, larger fraction of the
same candidate extends the earlier one instead of starting over.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from evomerge.errors import FitnessError
from evomerge.fitness.base import SPLITS, Direction, Metric, scoring
from evomerge.fitness.cache import ScoreCache
from evomerge.fitness.loglikelihood import reusing_prefixes
from evomerge.fitness.racing import (Decision, Gains, Racing, Reference, completions, decide, decide_step, item_order,
                                     screen)

log = logging.getLogger(__name__)

Objective = Literal["weighted_sum", "separate"]
ITEM_CACHE_KEYS = 8  # candidates whose per-item values are kept for later stages


@dataclass
class Usage:
    """What a fitness scored of one metric: items, forward-pass tokens (``Metric.tokens_scored``'s
    growth) and seconds in ``score``."""

    items: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Race:
    """The outcome of :meth:`Fitness.race`: ``scores`` of every metric when the candidate ran to
    the end, else (``stopped``) of the optimized metrics on the items scored, whose objective
    values are ``estimate``; ``decision``: the last decision taken (None when none was);
    ``items``: the items of each raced metric scored; ``informative`` and ``probe``: with screening,
    the informative items and the probe of all raced metrics (None without)."""

    scores: dict[str, float]
    stopped: bool
    estimate: list[float]
    decision: Decision | None
    items: dict[str, int]
    informative: int | None = None
    probe: int | None = None


class Fitness:
    """Metrics, how they combine into objectives, pruning stages, and the score cache."""

    def __init__(self, metrics: list[Metric], *, objective: Objective = "weighted_sum",
                 stages: tuple[float, ...] = (1.0,), racing: Racing | None = None, fingerprint: str = "",
                 cache_file: Path | None = None):
        self.metrics = {metric.name: metric for metric in metrics}
        self.objective, self.stages, self.racing = objective, tuple(stages), racing
        self._optimized = [m for m in metrics if m.weight != 0]
        if not self._optimized:
            raise ValueError("every metric has weight 0; at least one must be optimized")
        if racing is not None:
            if len(self.stages) > 1:
                raise ValueError("racing replaces stages: give one of them")
            if not any(m.item_mean for m in self._optimized):
                raise ValueError("racing needs an optimized metric whose score is a mean over items "
                                 "(lm-eval acc, exact_match, ...); none is")
        self._cache = ScoreCache(fingerprint, cache_file)
        self._items: OrderedDict[tuple[str, str], dict[str, list[Any]]] = OrderedDict()
        self._meters: list[dict[str, Usage]] = []

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

    @property
    def gains(self) -> Gains:
        """The objectives as gains over a reference (:class:`~evomerge.fitness.racing.Gains`): the
        coefficient of each optimized metric, and which of them racing bounds item by item."""
        sign = {m.name: 1.0 if m.direction == "maximize" else -1.0 for m in self._optimized}
        if self.objective == "weighted_sum":
            coefficients = [{m.name: m.weight * sign[m.name] for m in self._optimized}]
        else:
            coefficients = [{m.name: sign[m.name]} for m in self._optimized]
        return Gains(coefficients, frozenset(m.name for m in self._optimized if m.item_mean))

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

    def race(self, model: nn.Module, tokenizer: Any, references: Sequence[Reference], *,
             pool: Sequence[Reference] = (), cache_key: str | None = None) -> Race:
        """Score ``model`` on the search split in the chunks of :attr:`racing`, stopping as soon
        as a reference beats it for sure (:func:`~evomerge.fitness.racing.decide`).

        The optimized metrics that are not item means are scored in full first (their terms are
        exact); metrics of weight 0 only for a candidate that survives. ``references`` hold the
        raced metrics' per-item values in racing order; one whose item counts differ from this
        fitness's is ignored. Without references the candidate is scored in full. With
        ``racing.screen`` and a ``pool`` (the last fully scored trials, as references), the
        candidate is raced first on all items but those on which every trial of ``pool`` and
        ``references`` has the best value, then exactly on those (screening:
        :mod:`~evomerge.fitness.racing`). A survivor's scores are cached under ``cache_key`` as
        :meth:`evaluate`'s, and a cached candidate is not scored again. Raises FitnessError when
        a raced metric's item is not a number in [0, 1]. A prompt prefix is run once for all
        the calls of the race (:func:`~evomerge.fitness.loglikelihood.reusing_prefixes`).
        """
        if self.racing is None:
            raise ValueError("this fitness has no racing settings")
        with reusing_prefixes():
            return self._race(model, tokenizer, references, pool, cache_key)

    def _race(self, model: nn.Module, tokenizer: Any, references: Sequence[Reference], pool: Sequence[Reference],
              cache_key: str | None) -> Race:
        gains = self.gains
        with scoring(model):
            for metric in self.metrics.values():
                self._prepare(metric, model, tokenizer, "search")
        sizes = {name: self.metrics[name].num_items("search") for name in sorted(gains.raced)}
        if cache_key is not None and (cached := self._cache.get(cache_key, "search", 1.0)) is not None:
            return Race(cached, False, self.objectives(cached), None, sizes)
        items = self._item_store(cache_key, "search")
        references, pool = ([r for r in group if all(len(r.items.get(name, ())) == n for name, n in sizes.items())]
                            for group in (references, pool))
        decision, informative, probe = None, None, None
        if references:
            exact = self._score_counts(model, tokenizer, "search", items,
                                       {m.name: m.num_items("search") for m in self._optimized
                                        if m.name not in gains.raced})
            if self.racing.screen and pool:
                screened = self._screen(model, tokenizer, gains, exact, references, pool, items)
                if screened.stopped:
                    return screened
                decision, informative, probe = screened.decision, screened.informative, screened.probe
            else:
                for chunk in self.racing.chunks(sizes)[:-1]:
                    scores = {**exact, **self._score_counts(model, tokenizer, "search", items, chunk)}
                    decision = decide(gains, {name: self._unit_values(name, items[name][:n])
                                              for name, n in chunk.items()},
                                      exact, references, self.racing.confidence)
                    if decision.stop:
                        return Race(scores, True, self.objectives(scores), decision, chunk)
        scores = self._score(model, tokenizer, "search", 1.0, items)
        if cache_key is not None:
            self._cache.put(cache_key, "search", 1.0, scores)
        return Race(scores, False, self.objectives(scores), decision, sizes, informative, probe)

    def _screen(self, model: nn.Module, tokenizer: Any, gains: Gains, exact: dict[str, float],
                references: Sequence[Reference], pool: Sequence[Reference], items: dict[str, list[Any]]) -> Race:
        """Racing under screening (:func:`~evomerge.fitness.racing.screen`): the probe and the
        informative items, then the left-out ones. A stopped candidate's :class:`Race`, whose
        scores complete the items not scored (:func:`~evomerge.fitness.racing.completions`); a
        survivor's values of every raced metric's items, all scored, end in ``items`` (racing
        order) and its returned Race carries only the last decision."""
        names = sorted(gains.raced)
        plan = screen(gains, references, pool, self.racing)
        values: dict[str, list[Any]] = {name: [] for name in names}
        decision = None
        racing_orders = {name: np.asarray(self.metrics[name].item_order) for name in names}
        try:
            for name in names:  # the metric scores in screening order while it is raced
                self.metrics[name].item_order = racing_orders[name][plan.positions[name]]
            for step, chunk in enumerate(plan.steps):
                for name, n in chunk.items():
                    self._extend(self.metrics[name], model, tokenizer, "search", values[name], n)
                scored = {name: self._unit_values(name, values[name]) for name in names}
                decision = decide_step(plan, step, scored, exact, self.racing.confidence)
                if decision.stop:
                    reference = next(r for r in references if r.number == decision.beaten_by)
                    scores = dict(exact)
                    for name, completed in completions(plan, scored, reference).items():
                        scores.update(self.metrics[name].aggregate(completed))
                    return Race(scores, True, self.objectives(scores), decision,
                                {name: len(values[name]) for name in names}, sum(plan.counts.values()),
                                sum(plan.probe.values()))
            for name in names:
                self._extend(self.metrics[name], model, tokenizer, "search", values[name], len(plan.positions[name]))
        finally:
            for name in names:
                self.metrics[name].item_order = racing_orders[name]
        for name in names:  # back in racing order, for the item store and the records
            ordered: list[Any] = [None] * len(plan.positions[name])
            for position, value in zip(plan.positions[name], values[name]):
                ordered[position] = value
            items[name] = ordered
        return Race({}, False, [], decision, {name: len(plan.positions[name]) for name in names},
                    sum(plan.counts.values()), sum(plan.probe.values()))

    def item_values(self, cache_key: str, split: str = "search") -> dict[str, list[float]]:
        """The per-item values of candidate ``cache_key`` on ``split`` kept from its scoring, in
        the items' own order (racing order undone), of each item-mean metric scored in full;
        empty for a candidate no longer kept (the most recent :data:`ITEM_CACHE_KEYS` are)."""
        store = self._items.get((cache_key, split), {})
        out = {}
        for name, values in store.items():
            metric = self.metrics[name]
            if metric.item_mean and len(values) == metric.num_items(split) and None not in values:
                order = metric.item_order if split == "search" else None
                if order is not None:  # racing order undone
                    values = [values[j] for j in np.argsort(order)]
                out[name] = [float(v) for v in values]
        return out

    @contextmanager
    def metered(self) -> Iterator[dict[str, Usage]]:
        """Within the block, the :class:`Usage` of each metric scored (a cache hit scores nothing)."""
        usage: dict[str, Usage] = {}
        self._meters.append(usage)
        try:
            yield usage
        finally:  # by identity: two open meters may hold equal dicts
            self._meters = [meter for meter in self._meters if meter is not usage]

    def _unit_values(self, name: str, values: list[Any]) -> list[float]:
        for i, value in enumerate(values):
            if not isinstance(value, Real) or math.isnan(value) or not 0 <= value <= 1:
                raise FitnessError(f"metric {name}: racing needs per-item values in [0, 1]; item {i} "
                                   f"(racing order) is {value!r}")
        return [float(v) for v in values]

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
        return self._scored(model, tokenizer, split, items, self.metrics,
                            lambda metric: metric.items_for(split, fraction))

    def _score_counts(self, model: nn.Module, tokenizer: Any, split: str, items: dict[str, list[Any]],
                      counts: dict[str, int]) -> dict[str, float]:
        """The scores of the metrics in ``counts``, each on its first ``counts[name]`` items."""
        return self._scored(model, tokenizer, split, items, counts, lambda metric: counts[metric.name])

    def _scored(self, model: nn.Module, tokenizer: Any, split: str, items: dict[str, list[Any]],
                names: Any, wanted: Callable[[Metric], int]) -> dict[str, float]:
        scores: dict[str, float] = {}
        with scoring(model), reusing_prefixes():
            for name, metric in self.metrics.items():
                if name not in names:
                    continue
                self._prepare(metric, model, tokenizer, split)
                values = items.setdefault(name, [])
                count = wanted(metric)
                self._extend(metric, model, tokenizer, split, values, count)
                scores.update(metric.aggregate(values[:count]))
        return scores

    def _prepare(self, metric: Metric, model: nn.Module, tokenizer: Any, split: str) -> None:
        """``metric.prepare``, then, with racing, a raced metric's racing order (Metric.item_order)."""
        metric.prepare(model, tokenizer, split)
        if self.racing is not None and metric.item_order is None and metric.item_mean and metric.weight != 0:
            metric.item_order = self._racing_order(metric)

    def _racing_order(self, metric: Metric) -> np.ndarray:
        return item_order(metric.num_items("search"), self.racing.seed)

    def _extend(self, metric: Metric, model: nn.Module, tokenizer: Any, split: str, values: list[Any],
                count: int) -> None:
        """Score ``metric``'s next items (in its order) until ``values`` holds ``count``, metered."""
        if len(values) >= count:
            return
        start, first, tokens = time.perf_counter(), len(values), metric.tokens_scored
        with scoring(model):
            values += metric.score(model, tokenizer, split, first, count)
        seconds = time.perf_counter() - start
        log.debug("%s/%s: items %d-%d scored in %.2f s", metric.name, split, first, count - 1, seconds)
        for usage in self._meters:
            entry = usage.setdefault(metric.name, Usage())
            entry.items += count - first
            entry.tokens += metric.tokens_scored - tokens
            entry.seconds += seconds
