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
left-out ones in chunks (``Screen.rest``), each decision exact on the items scored so far with
the others still counted as ties (:func:`restricted`): once its losses there pass its lead, it is
stopped, with no risk. A candidate that survives them all is scored on every item, and its values
join the pool the next informative items are found from. A stopped candidate's estimate takes its
own mean on the informative items it scored for those it did not, its own values on the left-out
items it scored, and the references' (best) values on the others (optimistic there). (Screening as
first built left out every item the trials agreed on, the wrong ones too; the replay found that it
dropped winners: docs/benchmarks.md.)

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
    metrics, scored first to predict the others (anchors, module docstring; 0: off).
    """

    first: int = 32
    growth: float = 2.0
    confidence: float = 0.99
    seed: int = 0
    screen: int = 0
    anchors: int = 0

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
            chunk = {name: min(size, max(1, math.ceil(end * size / total - 1e-9))) for name, size in sizes.items()}
            if not chunks or chunk != chunks[-1]:
                chunks.append(chunk)
        full = dict(sizes)
        if not chunks or chunks[-1] != full:
            chunks.append(full)
        return chunks


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
           references: Sequence[Reference], confidence: float) -> Decision:
    """Whether to stop a candidate whose raced metrics' first items (racing order) are
    ``candidate`` and whose other optimized metrics scored ``exact``, against ``references``."""
    if not references:
        return Decision(False)
    raced = [m for m in gains.raced if any(c.get(m) for c in gains.coefficients)]
    alpha = (1 - confidence) / max(1, len(raced) * len(references))
    upper: dict[int, list[float]] = {}
    for reference in references:
        bounds = {m: difference_bounds(candidate[m], reference.items[m], alpha) for m in raced}
        upper[reference.number] = [
            gains.exact(k, exact, reference)
            + sum(b * bounds[m][1 if b > 0 else 0] for m, b in coefficients.items() if m in gains.raced)
            for k, coefficients in enumerate(gains.coefficients)]
    beaten_by = next((number for number, bounds in upper.items() if all(u < -TIE for u in bounds)), None)
    return Decision(beaten_by is not None, upper, beaten_by)


@dataclass(frozen=True)
class Screen:
    """A candidate's race under screening (module docstring): ``positions[m]``, metric ``m``'s
    racing positions in screening order (the informative items first, in racing order, then the
    others); ``counts[m]``, its informative items; ``gains`` and ``references`` restricted to the
    informative items (a metric without one leaves the race: its difference is at most 0 for
    sure); and the ``chunks`` of informative items after which to decide, the last all of them.
    ``rest``: for a candidate not stopped on them, the items in screening order (informative ones
    and the first left-out ones) after which to decide exactly (:func:`restricted`), before all.
    With anchors, ``anchors[m]`` of metric ``m``'s informative items come first in ``positions[m]``,
    and ``clusters[m][i]`` is the anchor (its index among them) that predicts informative item
    ``i`` (screening order)."""

    positions: dict[str, np.ndarray]
    counts: dict[str, int]
    gains: Gains
    references: list[Reference]
    chunks: list[dict[str, int]]
    rest: list[dict[str, int]] = field(default_factory=list)
    anchors: dict[str, int] = field(default_factory=dict)
    clusters: dict[str, np.ndarray] = field(default_factory=dict)


def screen(gains: Gains, references: Sequence[Reference], pool: Sequence[Reference], racing: Racing) -> Screen:
    """The screening of a candidate raced against ``references``: the informative items are all
    but those on which every trial of ``references`` and ``pool`` has the best value
    (:func:`unbeatable`). Each raced metric's coefficient is scaled by its informative share
    ``counts[m] / N_m``."""
    trials = [*references, *pool]
    positions, counts = {}, {}
    for name in sorted(gains.raced):
        values = np.stack([np.asarray(t.items[name], dtype=float) for t in trials])
        best = unbeatable(gains, name)
        informative = np.any(values != best, axis=0) if best is not None else np.ones(values.shape[1], dtype=bool)
        positions[name] = np.concatenate([np.flatnonzero(informative), np.flatnonzero(~informative)])
        counts[name] = int(informative.sum())
    raced = [m for m in sorted(gains.raced) if counts[m] > 0]
    anchors, clusters = {}, {}
    if racing.anchors:
        total = sum(counts.values())
        for name in raced:
            informative = positions[name][:counts[name]]
            values = np.stack([np.asarray(t.items[name], dtype=float)[informative] for t in trials])
            k = max(1, round(racing.anchors * counts[name] / total))
            medoids, assignment = anchor_items(values, k)
            others = np.setdiff1d(np.arange(counts[name]), medoids)  # both in racing order
            order = np.concatenate([medoids, others])
            positions[name] = np.concatenate([informative[order], positions[name][counts[name]:]])
            anchors[name] = len(medoids)
            clusters[name] = assignment[order]
    left_out = racing.chunks({m: len(positions[m]) - counts[m] for m in sorted(gains.raced)})[:-1]
    rest = [{m: counts[m] + chunk[m] for m in chunk} for chunk in left_out]
    return Screen(positions, counts, *restricted(gains, references, positions, counts),
                  racing.chunks({m: counts[m] for m in raced}), rest, anchors, clusters)


def restricted(gains: Gains, references: Sequence[Reference], positions: Mapping[str, np.ndarray],
               counts: Mapping[str, int]) -> tuple[Gains, list[Reference]]:
    """The gains and ``references`` over each raced metric's first ``counts[m]`` items in
    screening order ``positions[m]`` (its coefficient scaled by ``counts[m] / N_m``; a metric
    with none leaves the race). With the informative items among them, the left-out ones
    count as ties, so each gain is an upper bound of the true one (module docstring); once all
    of them are scored, :func:`decide` on them is exact."""
    raced = frozenset(m for m in gains.raced if counts[m] > 0)
    coefficients = [{m: b * (counts[m] / len(positions[m]) if m in gains.raced else 1.0) for m, b in k.items()
                     if m not in gains.raced or m in raced} for k in gains.coefficients]
    kept = [Reference(r.number, {m: np.asarray(r.items[m])[positions[m][:counts[m]]] for m in raced}, r.scores)
            for r in references]
    return Gains(coefficients, raced), kept


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


def estimate(plan: Screen, candidate: Mapping[str, Sequence[float]], exact: Mapping[str, float]) -> Decision:
    """The anchors' decision (module docstring): ``candidate[m]``, the values of metric ``m``'s
    anchors; stop when some reference's predicted gain is below 0 on every objective. The
    decision's ``upper`` holds the predicted gains."""
    if not plan.references:
        return Decision(False, estimated=True)
    gains = plan.gains
    means = {m: predicted(plan, m, candidate[m]) for m in plan.anchors}
    upper = {reference.number: [
        gains.exact(k, exact, reference)
        + sum(b * float(np.mean(means[m] - reference.items[m])) for m, b in coefficients.items() if m in gains.raced)
        for k, coefficients in enumerate(gains.coefficients)] for reference in plan.references}
    beaten_by = next((number for number, gains_of in upper.items() if all(g < -TIE for g in gains_of)), None)
    return Decision(beaten_by is not None, upper, beaten_by, estimated=True)
