"""Replaying racing on a finished study: what it would have scored, and which winners it would have lost.

:func:`replay_racing` walks a study's trials in trial order as a racing search would have met
them, using each trial's stored per-item values (``items`` records, written for every trial
scored in full) instead of a model: a trial is raced, chunk by chunk
(:meth:`~evomerge.fitness.racing.Racing.chunks`, the same item order as a racing search with
that seed), against the best of the trials the replay has kept so far (several objectives:
their Pareto front), with :func:`~evomerge.fitness.racing.decide`. A stopped trial is dropped;
the others are kept. For each trial it records the items racing would have scored (raced
metrics up to the stop, other optimized metrics in full, metrics of weight 0 only for the
kept), the tokens (each metric's items × that trial's measured tokens per item of it: an
estimate, the items being a random sample of the metric's), and whether the drop was a
**false drop**: full evaluation would have made the trial the new incumbent (a gain over the
replay's incumbent above 0; several objectives: no kept trial dominates it). Trials that were
not scored in full (pruned, failed, a repeated plan) or recorded no per-item values are skipped.
With ``racing.screen``, a trial is raced on the informative items of the last ``screen`` kept
trials and the references, then exactly on the left-out ones, as a screening search would
(:mod:`evomerge.fitness.racing`; with ``racing.probe``, its probe first), and with
``racing.anchors`` its anchors decide first. A trial stopped under screening also records the
estimate a search would have handed its sampler, next to its value in full: how far the two
part (:meth:`Replay.estimate_error`) is what the sampler is misled by.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evomerge.fitness import Fitness, Racing
from evomerge.fitness.racing import Reference, Screen, completions, decide, decide_step, in_item_order, screen
from evomerge.search.driver import best_of
from evomerge.search.records import TrialRecords, trial_records


@dataclass(frozen=True)
class Replayed:
    """One trial of a replay: items and tokens racing would have scored and a full evaluation
    scored, whether racing would have stopped it, and whether that dropped a would-be incumbent."""

    number: int
    items: int
    full_items: int
    tokens: float
    full_tokens: float
    stopped: bool
    false_drop: bool
    lead: float | None = None  # a false drop's lead over the replay's incumbent (one objective)
    estimate: float | None = None  # a trial stopped under screening: the estimate a search would report (one objective)
    value: float | None = None  # its value in full (one objective)
    exact_stop: bool = False  # stopped under screening only once all its informative items were scored: no bound
    behind: float | None = None  # a stopped trial's value in full below the incumbent's (one objective)


@dataclass(frozen=True)
class Replay:
    """The trials replayed (in order), the numbers of those skipped, and the settings."""

    racing: Racing
    trials: list[Replayed]
    skipped: list[int]

    @property
    def false_drops(self) -> list[int]:
        return [t.number for t in self.trials if t.false_drop]

    @property
    def largest_lead(self) -> float | None:
        """The largest lead a dropped winner had over the replay's incumbent (one objective)."""
        leads = [t.lead for t in self.trials if t.false_drop and t.lead is not None]
        return max(leads) if leads else None

    def estimate_error(self) -> tuple[float, float] | None:
        """How the estimates of trials stopped under screening, which a sampler learns from, match
        their values in full: (mean estimate − value, the rank correlation of the two); None with
        fewer than 3 such trials. A sampler like CMA-ES ranks trials, so the rank correlation is
        what it sees; a bias growing with the distance to the incumbent lowers it."""
        pairs = np.array([(t.estimate, t.value) for t in self.trials if t.estimate is not None and t.value is not None])
        if len(pairs) < 3:
            return None
        return float(np.mean(pairs[:, 0] - pairs[:, 1])), rank_correlation(pairs[:, 0], pairs[:, 1])

    def totals(self) -> dict[str, float]:
        """Items and tokens with racing and in full, their ratios, the trials stopped (and of
        them those stopped only by an exact decision, with their median shortfall from the
        incumbent in full) and the estimates' error (:meth:`estimate_error`, None when there is
        none)."""
        items, full = sum(t.items for t in self.trials), sum(t.full_items for t in self.trials)
        tokens, full_tokens = sum(t.tokens for t in self.trials), sum(t.full_tokens for t in self.trials)
        error = self.estimate_error()
        behind = [t.behind for t in self.trials if t.exact_stop and t.behind is not None]
        return {"trials": len(self.trials), "stopped": sum(t.stopped for t in self.trials),
                "exact_stops": sum(t.exact_stop for t in self.trials),
                "exact_stops_median_behind": float(np.median(behind)) if behind else None,
                "false_drops": len(self.false_drops), "largest_lead": self.largest_lead,
                "items": items, "full_items": full,
                "items_ratio": full / items if items else 0.0, "tokens": tokens, "full_tokens": full_tokens,
                "tokens_ratio": full_tokens / tokens if tokens else 0.0,
                "estimate_bias": error[0] if error else None, "estimate_rank_correlation": error[1] if error else None}

    def summary(self) -> str:
        """Two lines for a person."""
        t = self.totals()
        racing = self.racing
        return (f"racing first={racing.first} growth={racing.growth} confidence={racing.confidence} "
                f"seed={racing.seed} screen={racing.screen} probe={racing.probe} anchors={racing.anchors}: "
                f"{t['stopped']} of {t['trials']} trials stopped "
                f"({len(self.skipped)} skipped; {t['exact_stops']} only once every informative item was scored"
                + (f", a median {t['exact_stops_median_behind']:.4g} behind the incumbent"
                   if t["exact_stops_median_behind"] is not None else "")
                + f"), {t['false_drops']} false drops"
                + (f" (trials {', '.join(map(str, self.false_drops))})" if self.false_drops else "")
                + (f", the largest leading the incumbent by {self.largest_lead:.4g}" if self.largest_lead else "")
                + "\n"
                f"items {t['items']:,} of {t['full_items']:,} ({t['items_ratio']:.2f}x fewer), "
                f"tokens {t['tokens']:,.0f} of {t['full_tokens']:,.0f} ({t['tokens_ratio']:.2f}x fewer)"
                + (f"; stopped trials' estimates: bias {t['estimate_bias']:+.3f}, rank correlation with their "
                   f"values {t['estimate_rank_correlation']:.2f}" if t["estimate_bias"] is not None else ""))


def replay_racing(trials: optuna.Study | Sequence[FrozenTrial], fitness: Fitness, racing: Racing,
                  directions: Sequence[StudyDirection] | None = None) -> Replay:
    """Replay ``racing`` over ``trials`` (a study's, or a list in trial order) whose objectives
    are ``fitness``'s (module docstring). ``directions``: the study's (default: a study's own, else
    the fitness's)."""
    if isinstance(trials, optuna.Study):
        directions = directions or trials.directions
        trials = trials.get_trials(deepcopy=False)
    directions = list(directions or [StudyDirection.MAXIMIZE if d == "maximize" else StudyDirection.MINIMIZE
                                     for d in fitness.directions])
    gains = fitness.gains
    raced = sorted(gains.raced)
    exact = [m.name for m in fitness.metrics.values() if m.weight != 0 and m.name not in gains.raced]
    kept: list[FrozenTrial] = []
    references: dict[int, Reference] = {}
    replayed, skipped = [], []
    for trial in sorted(trials, key=lambda t: t.number):
        records = trial_records(trial)
        if (trial.state != TrialState.COMPLETE or records.same_plan_as is not None
                or not set(raced) <= set(records.items) or not set(exact) <= set(records.metrics)):
            skipped.append(trial.number)
            continue
        items = {name: in_item_order(records.items[name], racing.seed) for name in raced}
        sizes = {name: len(values) for name, values in items.items()}

        # as Fitness.race does, trials whose item counts differ from this one's are left out
        reference_trials = [t for t in best_of(kept, directions) if _same_sizes(references[t.number], sizes)]
        pool = kept[-racing.screen:] if racing.screen else []
        pool = ([references[t.number] for t in pool if _same_sizes(references[t.number], sizes)]
                if len(pool) == racing.screen else [])
        stop_at = None
        estimate_value = None
        exact_stop = False
        if reference_trials and pool:  # screening: the probe and the informative items, in screening order
            chosen = [references[t.number] for t in reference_trials]
            plan = screen(gains, chosen, pool, racing)
            for step, chunk in enumerate(plan.steps):
                scored = _scored(items, plan, chunk)
                decision = decide_step(plan, step, scored, records.metrics, racing.confidence)
                if decision.stop:
                    stop_at = chunk
                    beaten_by = references[decision.beaten_by]
                    estimate_value = _estimate(fitness, plan, scored, beaten_by, records.metrics)
                    exact_stop = all(chunk[m] >= plan.probe[m] + plan.counts[m] for m in chunk)
                    break
        elif reference_trials:
            for chunk in racing.chunks(sizes)[:-1]:
                if decide(gains, {n: items[n][:k] for n, k in chunk.items()}, records.metrics,
                          [references[t.number] for t in reference_trials], racing.confidence).stop:
                    stop_at = chunk
                    break
        false_drop = stop_at is not None and _would_lead(trial, reference_trials, directions)
        lead = behind = None  # one objective: the trial's value in full over the incumbent's
        if stop_at is not None and len(directions) == 1:
            sign = 1.0 if directions[0] == StudyDirection.MAXIMIZE else -1.0
            gain = sign * (trial.values[0] - reference_trials[0].values[0])
            lead, behind = (gain if false_drop else None), -gain
        counts = _counts(fitness, records, stop_at, exact)
        replayed.append(Replayed(trial.number, sum(counts.values()), sum(_full(records).values()),
                                 _tokens(records, counts), _tokens(records, _full(records)), stop_at is not None,
                                 false_drop, lead, estimate_value, trial.values[0] if len(directions) == 1 else None,
                                 exact_stop, behind))
        if stop_at is None:
            kept.append(trial)
            references[trial.number] = Reference(trial.number, items, records.metrics)
    return Replay(racing, replayed, skipped)


def _scored(items: dict[str, np.ndarray], plan: Screen, chunk: dict[str, int]) -> dict[str, np.ndarray]:
    """A trial's values (racing order) of the first ``chunk[m]`` items of each metric in screening order."""
    return {name: items[name][plan.positions[name][:n]] for name, n in chunk.items()}


def _estimate(fitness: Fitness, plan: Screen, scored: dict[str, np.ndarray], reference: Reference,
              metrics: dict[str, float]) -> float | None:
    """A stopped trial's estimate, as :meth:`Fitness.race` reports it (one objective; else None)."""
    if len(fitness.directions) != 1:
        return None
    scores = dict(metrics)
    for name, values in completions(plan, scored, reference).items():
        scores.update(fitness.metrics[name].aggregate(values))
    return fitness.objectives(scores)[0]


def _same_sizes(reference: Reference, sizes: dict[str, int]) -> bool:
    return all(len(reference.items[name]) == n for name, n in sizes.items())


def _full(records: TrialRecords) -> dict[str, int]:
    return {name: int(entry.get("of", 0)) for name, entry in records.scored.items()} or {
        name: len(values) for name, values in records.items.items()}


def _counts(fitness: Fitness, records: TrialRecords, stop_at: dict[str, int] | None,
            exact: list[str]) -> dict[str, int]:
    """Items of each metric racing would have scored for a trial stopped at ``stop_at`` (None: kept)."""
    full = _full(records)
    if stop_at is None:
        return full
    return {**{name: full.get(name, 0) for name in exact}, **stop_at}


def _tokens(records: TrialRecords, counts: dict[str, int]) -> float:
    """Tokens of ``counts`` items, at the trial's measured tokens per item of each metric."""
    total = 0.0
    for name, count in counts.items():
        entry = records.scored.get(name, {})
        if entry.get("items"):
            total += count * entry.get("tokens", 0) / entry["items"]
    return total


def _would_lead(trial: FrozenTrial, references: list[FrozenTrial], directions: Sequence[StudyDirection]) -> bool:
    """Full evaluation makes ``trial`` the incumbent: better than the best of ``references``, or,
    with several objectives, dominated by none of them."""
    signs = [1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in directions]
    mine = [s * v for s, v in zip(signs, trial.values)]
    theirs = [[s * v for s, v in zip(signs, r.values)] for r in references]
    if len(directions) == 1:
        return all(mine[0] > other[0] for other in theirs)
    return not any(all(o >= m for o, m in zip(other, mine)) for other in theirs)


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (tied values share their mean rank); 0
    when either is constant."""
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    scale = float(np.sqrt(np.sum(rx ** 2) * np.sum(ry ** 2)))
    return float(np.sum(rx * ry)) / scale if scale else 0.0


def _ranks(values: Sequence[float]) -> np.ndarray:
    _, inverse, counts = np.unique(np.asarray(values, dtype=float), return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse]
