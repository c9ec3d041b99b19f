"""Racing: score a candidate in growing chunks of a fixed item order; stop it once it cannot win.

Setting. A candidate is compared with *references*: fully evaluated trials whose per-item values
are known (in a single-objective search the incumbent, the best completed trial; in a
multi-objective one the Pareto front). Items of every metric are scored in one seeded order,
the same for every candidate (:func:`item_order`), so after ``n`` of a metric's ``N`` items the
candidate and a reference are paired on the same items. The order is a uniformly random
permutation of the items, so the items scored so far are a simple random sample, drawn without
replacement, of all of them: that is what the bound below rests on.

The gain. Each objective ``k`` is a linear form of the metrics' scores; its *gain* over a
reference R is ``g_k = Σ_m b_km (μ_m − R_m)``, positive when the candidate is better
(``b_km = w_m·s_m`` for ``weighted_sum``, ``s_m = ±1`` by the metric's direction; ``separate``:
the objective's metric with its direction's sign). For a metric whose score is the mean of its
per-item values in [0, 1] (``Metric.item_mean``: lm-eval's acc, exact_match, ...) the term
``μ_m − R_m`` is ``D_m``, the mean over all ``N`` items of the paired differences
``d_i = c_i − r_i`` (candidate minus reference, in [−1, 1]); it is what racing bounds. Any other
optimized metric (perplexity, a callable) cannot be raced: it is scored in full before the first
decision, and its exact term enters every bound. Metrics of weight 0 are not optimized: they are
scored only for a candidate that survives.

The bound. ``D_m`` is the mean of a finite population of ``N`` numbers, of which the first
``n`` of a uniformly random order are seen. :func:`mean_upper_bound` is the betting confidence
sequence for sampling without replacement of Waudby-Smith & Ramdas ("Confidence sequences for
sampling without replacement", NeurIPS 2020): for a guessed mean ``m`` the capital
``K_n(m) = Π_{i≤n} (1 − λ_i (x_i − μ_i(m)))``, with ``μ_i(m)`` the mean of the items not yet
drawn were ``m`` the population mean, is a nonnegative martingale when ``m`` is the true mean,
so by Ville's inequality it ever reaches ``1/α`` with probability at most ``α``. The upper
bound is the largest ``m`` whose capital stays below ``1/α``. It holds at every ``n`` at once
(*anytime valid*): looking after every chunk needs no correction for the number of looks. It
uses the finite population (it shrinks to the exact mean at ``n = N``; ``μ_i(m)`` accounts
for the items already drawn) and adapts to the variance of the differences (the bets ``λ_i``
are a predictable plug-in of the running variance, at most ``0.75 / (1 − μ_i(m))`` so that
every factor stays ≥ 1/4; each factor, hence the capital, grows with ``m``, which makes the
bound a bisection), so a candidate that agrees with the reference on most items is bounded
tightly. No normal approximation is made: the bound holds for any values in [0, 1] and any ``n``.

Why paired differences rather than the candidate's own mean (the reference's items being known,
``D_m`` = the known paired part on the items scored + the candidate's unknown mean on the rest −
the reference's known mean on the rest): a bound on the candidate's own mean alone has half the
range and stops a candidate that lost a skill a chunk earlier, but it can stop a candidate equal
to the reference when the first items happen to be the reference's worst; the paired bound never
stops a candidate that is level with or ahead of the reference on every item scored (the
capital of the mean difference 0 then never grows), and it is tighter for candidates close to
the reference, where a wrong stop costs most.

The decision. With the bounds of all raced metrics against all references holding together,
with probability at least ``confidence`` (a union bound: ``α = 1 − confidence`` is split evenly
over the (reference, raced metric) pairs), the upper bound of each gain is
``Σ_{b>0} b·UCB(D_m) + Σ_{b<0} b·LCB(D_m) + Σ_known b·(exact difference)``. A candidate is
stopped when some reference beats it on every objective for sure: all upper bounds of its gains
over that reference are below 0 (one objective: it cannot beat the incumbent). So a candidate
that full evaluation would make the new incumbent (one objective: a positive gain; several: not
dominated by any reference) is stopped with probability at most ``1 − confidence``. Ties are not
stopped: a candidate equal to the reference on every item scored has an upper bound ≥ 0.

Screening (``screen: W``, off by default). In a search that has converged, most items get the
same value from every candidate, and no paired bound can tell near-equal candidates apart after a
fraction of the items. Screening leaves out the items on which the last ``W`` fully scored trials
and every reference have the best value an item can have (:func:`unbeatable`: 1 for a metric the
objectives want higher, 0 for one they want lower). On such an item a candidate can only tie or
lose, so counting it as a tie can only raise the candidate's gains: the bounds on the other items,
the *informative* ones, stay valid bounds of the true gains, with no assumption. The candidate is
raced on the informative items in their racing order, as a population of its own (the gains'
coefficients scaled by the informative share), and the last decision comes when they are all
scored, with the exact gain on them. An item every trial got wrong stays informative: a
candidate may be the first to get it right. What the window chooses is only how many items are
left out: a left-out item the candidate would have lost hides that loss, which costs a stop,
never a winner. So a candidate that survives the informative items is then scored on the
left-out ones in chunks, each decision exact on the items scored so far with the others still
counted as ties (:func:`decide_screened`): once its losses there pass its lead, it is stopped,
with no risk. A candidate that survives them all is scored on every item, and its values join
the pool the next informative items are found from.

The probe (``probe: P``, with screening). A stopped candidate's *estimate* is what the sampler
learns from (``evomerge.search.samplers``): its own mean on the informative items it scored for
those it did not, and for the left-out items it did not score its mean on the left-out items it
did (:func:`completed`). Without a probe a candidate stopped on the informative items has
scored none of them, and they take the references' best values: a candidate far from the
incumbent, which loses many of them, is ranked as if it had kept them all, and a search whose
candidates are mostly stopped can drift where its estimates are most optimistic (measured:
docs/benchmarks.md). The probe is the first ``P`` left-out items in racing order (each metric
its share of them, :func:`shares`), a simple random sample of them, which every screened
candidate scores first: its mean there estimates the others without bias, and its exact
difference there enters every decision (a candidate that loses the probe is stopped sooner).
(Screening as first built left out every item the trials agreed on, the wrong ones too; the
replay found that it dropped winners: docs/benchmarks.md.)

Anchors (``anchors: K``, with screening; off by default). Item selection in the manner of
tinyBenchmarks' anchor points (Polo et al., 2024): the informative items are clustered by how the
pool's and the references' trials scored them (:func:`anchor_items`: k-medoids, the distance
between two items the mean absolute difference of their values over those trials), ``K`` clusters
over all raced metrics together (each metric its share of the informative items, rounded, at least
one: about ``K`` in all). The medoid of each cluster, its *anchor*, is scored first, and every
other informative item is *estimated* by its anchor's value (the estimate weighs each anchor by
its cluster's size; a stopped candidate's unscored informative items take these predictions, not
its mean). A candidate whose estimated gain over some reference is below 0 on every objective is
stopped after its anchors (:func:`estimate`). That is a prediction, not a bound: what it costs in
winners lost is again what the replay counts. A candidate that is not stopped there goes on as
under screening (the anchors count among its informative items, which are no longer in a random
order, so the anytime bound's guarantee is void for it; the last decision, on all informative
items, is exact).

Caveat: the order is fixed for the whole search, and the sampler that proposes candidates sees
earlier candidates' estimates on its first items; the guarantee is the one of a candidate that
does not depend on the order. The replay (:mod:`evomerge.analysis.replay`) measures how often
racing would have dropped a winner on a finished study.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

BET_CLIP = 0.75  # a bet λ_i is at most BET_CLIP / (1 − μ_i(m)): every capital factor stays ≥ 1/4
TIE = 1e-12  # an upper bound of a gain within this of 0 is a tie (floating-point sums): never stopped
_BISECTIONS = 60


@dataclass(frozen=True)
class Racing:
    """Racing settings (the ``racing:`` block of a fitness definition).

    ``first``: items of the first chunk, over all raced metrics together (each metric takes its
    share: its items over all raced items, at least one); each next chunk ends ``growth`` times
    further; the last ends at every item. ``confidence``: the chance that no candidate that full
    evaluation would make the incumbent is stopped (module docstring). ``seed``: of the item order.
    ``screen``: the trials, besides the references, that decide which items are informative
    (screening, module docstring; 0: off). ``anchors``: the informative items, over all raced
    metrics, scored first to predict the others (anchors, module docstring; 0: off). ``probe``:
    with screening, the left-out items, over all raced metrics, every candidate scores first (the
    probe, module docstring; 0: none).
    """

    first: int = 32
    growth: float = 2.0
    confidence: float = 0.99
    seed: int = 0
    screen: int = 0
    anchors: int = 0
    probe: int = 0

    def __post_init__(self) -> None:
        if self.first < 1:
            raise ValueError(f"racing.first must be at least 1, got {self.first}")
        if not self.growth > 1:
            raise ValueError(f"racing.growth must be above 1, got {self.growth}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"racing.confidence must be in (0, 1), got {self.confidence}")
        if self.seed < 0:
            raise ValueError(f"racing.seed must be at least 0, got {self.seed}")
        if self.screen < 0:
            raise ValueError(f"racing.screen must be at least 0 (0: off), got {self.screen}")
        if self.anchors < 0:
            raise ValueError(f"racing.anchors must be at least 0 (0: off), got {self.anchors}")
        if self.probe < 0:
            raise ValueError(f"racing.probe must be at least 0 (0: none), got {self.probe}")
        if self.probe and not self.screen:
            raise ValueError("racing.probe needs racing.screen: the probe is drawn from the items screening leaves out")
        if self.anchors and not self.screen:
            raise ValueError("racing.anchors needs racing.screen: the anchors are chosen from the screening trials")

    def chunks(self, sizes: Mapping[str, int]) -> list[dict[str, int]]:
        """Items scored of each metric (``sizes``: its items) at the end of each chunk, the last
        chunk all of them; a chunk that would add no item is left out."""
        total = sum(sizes.values())
        ends, end = [], float(self.first)
        while end < total:
            ends.append(end)
            end *= self.growth
        chunks: list[dict[str, int]] = []
        for end in ends:
            chunk = shares(end, sizes)
            if not chunks or chunk != chunks[-1]:
                chunks.append(chunk)
        full = dict(sizes)
        if not chunks or chunks[-1] != full:
            chunks.append(full)
        return chunks


def shares(count: float, sizes: Mapping[str, int]) -> dict[str, int]:
    """``count`` items split over metrics of ``sizes`` items by their share of all of them: each
    metric ``ceil(count · size / total)``, at least one while it has any, at most its size."""
    total = sum(sizes.values())
    return {name: min(size, max(1, math.ceil(count * size / total - 1e-9))) if size else 0
            for name, size in sizes.items()}


def item_order(size: int, seed: int) -> np.ndarray:
    """The racing order of ``size`` items: position ``j`` scores item ``order[j]`` (a uniformly
    random permutation from ``seed``, the same for every candidate and on every machine)."""
    return np.random.default_rng([seed, size]).permutation(size)


def in_item_order(values: Sequence[float], seed: int) -> np.ndarray:
    """Values given in the items' own order, put in their racing order (:func:`item_order`)."""
    array = np.asarray(values, dtype=float)
    return array[item_order(array.size, seed)]


def in_data_order(values: Sequence[float], seed: int) -> np.ndarray:
    """The inverse of :func:`in_item_order`: values in racing order back in the items' own order."""
    array = np.asarray(values, dtype=float)
    out = np.empty_like(array)
    out[item_order(array.size, seed)] = array
    return out


def mean_upper_bound(values: Sequence[float], population: int, alpha: float) -> float:
    """An upper confidence bound on the mean of ``population`` numbers in [0, 1], of which
    ``values`` are the first in a uniformly random order: the mean exceeds it at any size of
    ``values`` with probability at most ``alpha`` (module docstring; anytime valid)."""
    x = np.asarray(values, dtype=float)
    n = x.size
    if n > population:
        raise ValueError(f"{n} values of a population of {population}")
    if np.any((x < 0) | (x > 1)) or np.any(np.isnan(x)):
        raise ValueError("values must lie in [0, 1]")
    if n == 0:
        return 1.0
    sums = np.concatenate([[0.0], np.cumsum(x)])
    low, high = sums[n] / population, (sums[n] + population - n) / population  # the feasible means
    if n == population:
        return float(low)
    drawn = np.arange(n)  # items drawn before draw i (0-based i)
    remaining = population - drawn
    # predictable plug-in bets (Waudby-Smith & Ramdas, "Estimating means of bounded random variables by
    # betting", 2023): from the draws before i only, so the capital stays a martingale
    running_mean = (0.5 + sums[1:]) / (drawn + 2)
    deviations = np.concatenate([[0.0], np.cumsum((x - running_mean) ** 2)])[:-1]
    variance = (0.25 + deviations) / (drawn + 1)
    target = np.log(1 / alpha)
    plug_in = np.sqrt(2 * target / (variance * (drawn + 1) * np.log(drawn + 2)))

    def log_capital(m: float) -> float:  # increasing in m (each factor is: see the module docstring)
        remaining_mean = np.clip((population * m - sums[:-1]) / remaining, 0.0, 1.0)
        with np.errstate(divide="ignore"):
            bets = np.minimum(plug_in, BET_CLIP / (1 - remaining_mean))
        return float(np.sum(np.log1p(-bets * (x - remaining_mean))))

    if log_capital(high) < target:
        return float(high)
    if log_capital(low) >= target:
        return float(low)
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        low, high = (middle, high) if log_capital(middle) < target else (low, middle)
    return float(high)


def mean_lower_bound(values: Sequence[float], population: int, alpha: float) -> float:
    """The lower counterpart of :func:`mean_upper_bound` (the same guarantee)."""
    return 1.0 - mean_upper_bound(1.0 - np.asarray(values, dtype=float), population, alpha)


def difference_bounds(candidate: Sequence[float], reference: Sequence[float], alpha: float) -> tuple[float, float]:
    """(lower, upper) bounds, each at level ``alpha``, on the mean over all items of the paired
    differences candidate − reference (values in [0, 1]): ``candidate`` holds the first items
    in racing order, ``reference`` all of them."""
    c = np.asarray(candidate, dtype=float)
    x = (c - np.asarray(reference, dtype=float)[:c.size] + 1) / 2  # in [0, 1]
    population = len(reference)
    return 2 * mean_lower_bound(x, population, alpha) - 1, 2 * mean_upper_bound(x, population, alpha) - 1


@dataclass(frozen=True)
class Reference:
    """A fully evaluated trial a candidate races against: its per-item values of every raced
    metric (in racing order) and its scores."""

    number: int
    items: Mapping[str, np.ndarray]
    scores: Mapping[str, float]


@dataclass(frozen=True)
class Gains:
    """The objectives as gains over a reference: ``coefficients[k][m]`` is ``b_km`` of the
    module docstring; ``raced``: the metrics bounded item by item (the others are exact)."""

    coefficients: list[dict[str, float]]
    raced: frozenset[str]

    def exact(self, k: int, scores: Mapping[str, float], reference: Reference) -> float:
        """The part of gain ``k`` from metrics that are not raced (exact)."""
        return sum(b * (scores[m] - reference.scores[m]) for m, b in self.coefficients[k].items()
                   if m not in self.raced)


@dataclass(frozen=True)
class Decision:
    """After a chunk: ``stop`` when a reference (``beaten_by``) beats the candidate on every
    objective with the racing confidence; ``upper``: the upper bounds of the gains over each
    reference (by trial number), one per objective. ``estimated``: a decision of
    :func:`estimate`, whose ``upper`` are the predicted gains."""

    stop: bool
    upper: dict[int, list[float]] = field(default_factory=dict)
    beaten_by: int | None = None
    estimated: bool = False  # from the anchors' prediction (:func:`estimate`), not from bounds


def decide(gains: Gains, candidate: Mapping[str, Sequence[float]], exact: Mapping[str, float],
           references: Sequence[Reference], confidence: float,
           known: Mapping[int, Sequence[float]] | None = None, split: int | None = None) -> Decision:
    """Whether to stop a candidate whose raced metrics' first items (racing order) are
    ``candidate`` and whose other optimized metrics scored ``exact``, against ``references``.
    ``known[r][k]``: a part of gain ``k`` over reference ``r`` known exactly that ``gains`` do
    not hold (screening: the probe's). ``split``: the metrics whose bounds share the confidence
    (default: those raced here); it must not shrink during one candidate's race, or the union
    bound over its looks no longer holds."""
    if not references:
        return Decision(False)
    raced = [m for m in gains.raced if any(c.get(m) for c in gains.coefficients)]
    alpha = (1 - confidence) / max(1, (len(raced) if split is None else split) * len(references))
    upper: dict[int, list[float]] = {}
    for reference in references:
        bounds = {m: difference_bounds(candidate[m], reference.items[m], alpha) for m in raced}
        offsets = known[reference.number] if known is not None else [0.0] * len(gains.coefficients)
        upper[reference.number] = [
            offsets[k] + gains.exact(k, exact, reference)
            + sum(b * bounds[m][1 if b > 0 else 0] for m, b in coefficients.items() if m in gains.raced)
            for k, coefficients in enumerate(gains.coefficients)]
    beaten_by = next((number for number, bounds in upper.items() if all(u < -TIE for u in bounds)), None)
    return Decision(beaten_by is not None, upper, beaten_by)


@dataclass(frozen=True)
class Screen:
    """A candidate's race under screening (module docstring). ``positions[m]``: metric ``m``'s
    racing positions in screening order: its ``probe[m]`` probe items, its ``counts[m]``
    informative items (in racing order; with anchors, its ``anchors[m]`` anchors first), then the
    other left-out items (racing order). ``gains`` and ``references``: those of the whole race.
    ``steps``: the items of each metric, a prefix of screening order, after which to decide
    (:func:`decide_screened`): while the informative items are raced (the first, with anchors,
    decided by their prediction, :func:`estimate`; the last, all informative items), then on the
    left-out items, before all.
    ``clusters[m][i]``: the anchor (its index among them) that predicts informative item ``i``."""

    positions: dict[str, np.ndarray]
    probe: dict[str, int]
    counts: dict[str, int]
    gains: Gains
    references: list[Reference]
    steps: list[dict[str, int]]
    anchors: dict[str, int] = field(default_factory=dict)
    clusters: dict[str, np.ndarray] = field(default_factory=dict)

    def informative(self, name: str) -> np.ndarray:
        """Metric ``name``'s informative items (racing positions, screening order)."""
        start = self.probe[name]
        return self.positions[name][start:start + self.counts[name]]


def screen(gains: Gains, references: Sequence[Reference], pool: Sequence[Reference], racing: Racing) -> Screen:
    """The screening of a candidate raced against ``references``: the informative items are all
    but those on which every trial of ``references`` and ``pool`` has the best value
    (:func:`unbeatable`); the probe, the first ``racing.probe`` of the others in racing order
    (each metric its share of them, :func:`shares`)."""
    trials = [*references, *pool]
    informative, left_out = {}, {}
    for name in sorted(gains.raced):
        values = np.stack([np.asarray(t.items[name], dtype=float) for t in trials])
        best = unbeatable(gains, name)
        mask = np.any(values != best, axis=0) if best is not None else np.ones(values.shape[1], dtype=bool)
        informative[name], left_out[name] = np.flatnonzero(mask), np.flatnonzero(~mask)
    counts = {name: int(items.size) for name, items in informative.items()}
    probe = shares(racing.probe, {name: int(items.size) for name, items in left_out.items()}) if racing.probe else (
        dict.fromkeys(informative, 0))
    anchors, clusters = {}, {}
    if racing.anchors:
        total = sum(counts.values())
        for name in (m for m in informative if counts[m]):
            values = np.stack([np.asarray(t.items[name], dtype=float)[informative[name]] for t in trials])
            medoids, assignment = anchor_items(values, max(1, round(racing.anchors * counts[name] / total)))
            order = np.concatenate([medoids, np.setdiff1d(np.arange(counts[name]), medoids)])  # both in racing order
            informative[name] = informative[name][order]
            anchors[name] = len(medoids)
            clusters[name] = assignment[order]
    positions = {name: np.concatenate([left_out[name][:probe[name]], informative[name], left_out[name][probe[name]:]])
                 for name in informative}
    steps = [{m: probe[m] + anchors.get(m, 0) for m in positions}] if anchors else []
    for chunk in racing.chunks({m: counts[m] for m in positions if counts[m]}):
        steps.append({m: probe[m] + max(chunk.get(m, 0), anchors.get(m, 0)) for m in positions})
    rest = racing.chunks({m: len(positions[m]) - probe[m] - counts[m] for m in positions})[:-1]
    return Screen(positions, probe, counts, gains, list(references),
                  steps + [{m: probe[m] + counts[m] + chunk[m] for m in chunk} for chunk in rest], anchors, clusters)


def decide_step(plan: Screen, step: int, values: Mapping[str, Sequence[float]], exact: Mapping[str, float],
                confidence: float) -> Decision:
    """The decision after ``plan.steps[step]``, ``values[m]`` the items scored in screening order:
    with anchors, their prediction after the first step (:func:`estimate`), else the bounds
    (:func:`decide_screened`)."""
    if plan.anchors and step == 0:
        return estimate(plan, values, exact)
    return decide_screened(plan, values, exact, confidence)


def decide_screened(plan: Screen, values: Mapping[str, Sequence[float]], exact: Mapping[str, float],
                    confidence: float) -> Decision:
    """:func:`decide` under screening: ``values[m]``, metric ``m``'s first items in screening
    order. What is scored of the probe (and, once a metric's informative items are all scored,
    of its left-out items) is known exactly; the informative items scored so far bound the
    rest of them; the left-out items not scored count as ties (module docstring)."""
    raced = {m: plan.informative(m) for m in plan.positions
             if plan.counts[m] and len(values[m]) < plan.probe[m] + plan.counts[m]}
    gains, references = restricted(plan.gains, plan.references, raced, plan.positions)
    known = _known_gains(plan, values, {m: min(len(values[m]), plan.probe[m]) if m in raced else len(values[m])
                                         for m in plan.positions})
    candidate = {m: values[m][plan.probe[m]:] for m in raced}
    # the confidence stays split over every metric with informative items, also once some are all scored
    split = sum(1 for m in plan.positions if plan.counts[m] and any(k.get(m) for k in plan.gains.coefficients))
    return decide(gains, candidate, exact, references, confidence, known, split)


def _known_gains(plan: Screen, values: Mapping[str, Sequence[float]],
                 known: Mapping[str, int]) -> dict[int, list[float]]:
    """Over each reference, each objective's part from each metric's first ``known[m]`` items in
    screening order (scored: ``values``), exactly: ``Σ_m b_km · Σ (c_i − r_i) / N_m``."""
    out = {}
    for reference in plan.references:
        totals = {m: float(np.sum(np.asarray(values[m][:n], dtype=float)
                                  - np.asarray(reference.items[m])[plan.positions[m][:n]])) / len(plan.positions[m])
                  for m, n in known.items()}
        out[reference.number] = [sum(b * totals[m] for m, b in coefficients.items() if m in totals)
                                 for coefficients in plan.gains.coefficients]
    return out


def restricted(gains: Gains, references: Sequence[Reference], population: Mapping[str, np.ndarray],
               positions: Mapping[str, np.ndarray]) -> tuple[Gains, list[Reference]]:
    """The gains and ``references`` of a race on a population of items: ``population[m]``, the
    racing positions of metric ``m``'s items that are bounded (racing order: a random sample of
    them is what is scored), its coefficient scaled by their share of its ``len(positions[m])``
    items. A raced metric not in ``population`` leaves the race (its part is known or a tie)."""
    coefficients = [{m: b * (len(population[m]) / len(positions[m]) if m in gains.raced else 1.0)
                     for m, b in k.items() if m not in gains.raced or m in population} for k in gains.coefficients]
    kept = [Reference(r.number, {m: np.asarray(r.items[m])[population[m]] for m in population}, r.scores)
            for r in references]
    return Gains(coefficients, frozenset(population)), kept


def completed(plan: Screen, name: str, scored: Sequence[float], reference: Reference,
              prediction: np.ndarray | None = None) -> list[float]:
    """A stopped screened candidate's values of metric ``name``'s items (screening order),
    completed for its estimate: ``scored``, its first items; each informative item not scored,
    its ``prediction`` (from the anchors: every informative item, screening order) or else the
    candidate's mean on the informative items it scored; each left-out item not scored, its mean
    on the left-out items it scored (the probe: a random sample of them). Where it scored none of
    a kind, the ``reference``'s values (the best, on left-out items)."""
    values = np.asarray(scored, dtype=float)
    probe, count, n = plan.probe[name], plan.counts[name], len(scored)
    left_out = np.ones(len(plan.positions[name]), dtype=bool)
    left_out[probe:probe + count] = False
    out = np.asarray(reference.items[name], dtype=float)[plan.positions[name]]  # kept where nothing tells
    out[:n] = values
    for kind in (True, False):
        missing = np.flatnonzero(left_out == kind)
        missing = missing[missing >= n]
        seen = values[left_out[:n] == kind]
        if not kind and prediction is not None:
            out[missing] = np.asarray(prediction, dtype=float)[missing - probe]
        elif seen.size:
            out[missing] = seen.mean()
    return out.tolist()


def completions(plan: Screen, values: Mapping[str, Sequence[float]], reference: Reference) -> dict[str, list[float]]:
    """A stopped screened candidate's values of every raced metric, completed (:func:`completed`;
    with anchors, its unscored informative items predicted by them): ``values[m]``, metric ``m``'s
    first items in screening order; ``reference``, the one that stopped it."""
    out = {}
    for name, scored in values.items():
        start = plan.probe[name]
        anchors = plan.anchors.get(name)
        prediction = predicted(plan, name, scored[start:start + anchors]) if anchors else None
        out[name] = completed(plan, name, scored, reference, prediction)
    return out


def unbeatable(gains: Gains, name: str) -> float | None:
    """The value of metric ``name``'s item that no candidate can beat on any objective: 1 when
    every objective with a nonzero coefficient of it wants it higher, 0 when they all want it
    lower, None when they disagree or none uses it."""
    signs = {math.copysign(1.0, k[name]) for k in gains.coefficients if k.get(name)}
    if signs == {1.0}:
        return 1.0
    return 0.0 if signs == {-1.0} else None


def anchor_items(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Anchor points of items: ``values[t, i]``, trial ``t``'s value of item ``i``. Returns the
    medoids of ``k`` clusters (item indices, ascending) and each item's cluster (an index into
    the medoids). k-medoids with the distance between items ``i, j`` the mean over trials of
    ``|values[t, i] − values[t, j]|``: greedy build (each next medoid the item that most lowers
    the total distance of items to their nearest medoid), then alternating assignment and medoid
    update until stable (at most 100 rounds). Deterministic (ties go to the lower index);
    ``k`` ≥ the items: every item is its own anchor."""
    size = values.shape[1]
    if k >= size:
        return np.arange(size), np.arange(size)
    distance = np.abs(values[:, :, None] - values[:, None, :]).mean(axis=0)
    medoids = [int(np.argmin(distance.sum(axis=0)))]
    nearest = distance[medoids[0]].copy()
    while len(medoids) < k:
        gain = np.maximum(nearest[None, :] - distance, 0.0).sum(axis=1)
        gain[medoids] = -1.0
        medoids.append(int(np.argmax(gain)))
        nearest = np.minimum(nearest, distance[medoids[-1]])
    medoids.sort()
    for _ in range(100):
        assignment = np.argmin(distance[medoids], axis=0)
        updated = []
        for c in range(len(medoids)):
            members = np.flatnonzero(assignment == c)
            updated.append(int(members[np.argmin(distance[np.ix_(members, members)].sum(axis=0))])
                           if members.size else medoids[c])
        updated.sort()
        if updated == medoids:
            break
        medoids = updated
    medoid_array = np.asarray(medoids)
    assignment = np.argmin(distance[medoid_array], axis=0)
    assignment[medoid_array] = np.arange(medoid_array.size)  # a medoid predicts itself, even when tied
    return medoid_array, assignment


def predicted(plan: Screen, name: str, anchors: Sequence[float]) -> np.ndarray:
    """Metric ``name``'s informative items (screening order) as ``anchors`` (its anchors' values)
    predict them: each item its anchor's value."""
    return np.asarray(anchors, dtype=float)[plan.clusters[name]]


def estimate(plan: Screen, values: Mapping[str, Sequence[float]], exact: Mapping[str, float]) -> Decision:
    """The anchors' decision (module docstring): ``values[m]``, metric ``m``'s probe and anchors
    (screening order); stop when some reference's predicted gain is below 0 on every objective.
    The decision's ``upper`` holds the predicted gains (the probe's part exact)."""
    if not plan.references:
        return Decision(False, estimated=True)
    known = _known_gains(plan, values, plan.probe)
    means = {m: predicted(plan, m, values[m][plan.probe[m]:plan.probe[m] + plan.anchors[m]]) for m in plan.anchors}
    upper = {reference.number: [
        known[reference.number][k] + plan.gains.exact(k, exact, reference)
        + sum(b * plan.counts[m] / len(plan.positions[m])
              * float(np.mean(means[m] - np.asarray(reference.items[m])[plan.informative(m)]))
              for m, b in coefficients.items() if m in means)
        for k, coefficients in enumerate(plan.gains.coefficients)] for reference in plan.references}
    beaten_by = next((number for number, gains_of in upper.items() if all(g < -TIE for g in gains_of)), None)
    return Decision(beaten_by is not None, upper, beaten_by, estimated=True)
