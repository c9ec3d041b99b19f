"""Racing (evomerge.fitness.racing): the bound (closed forms, coverage, the properties a paired
race must have), the chunk schedule, the decision, Fitness.race with a counting fake metric, and
the racing: block of a fitness definition."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.errors import ConfigError, FitnessError
from evomerge.fitness import Fitness, Metric, Racing, load_fitness
from evomerge.fitness.racing import (Gains, Reference, completed, decide, decide_screened, difference_bounds,
                                     in_data_order, in_item_order, item_order, mean_lower_bound, mean_upper_bound,
                                     restricted, screen)

DATA = Path(__file__).parents[1] / "data" / "fitness"


class Items(Metric):
    """A fake item-mean metric: item i of a model is ``values[model][i]`` (the model is a key);
    it takes its ``item_order`` (racing's) when one is set and counts 10 tokens an item."""

    item_mean = True

    def __init__(self, name: str, values: dict[str, list[float]], weight: float = 1.0, direction="maximize"):
        super().__init__(name, direction, weight)
        self.values, self.calls = values, []

    def num_items(self, split: str) -> int:
        return len(next(iter(self.values.values())))

    def score(self, model, tokenizer, split, start, stop):
        self.calls.append((start, stop))
        self.tokens_scored += 10 * (stop - start)
        values = np.asarray(self.values[model.key], dtype=float)
        if self.item_order is not None and split == "search":
            values = values[np.asarray(self.item_order)]
        return [float(v) for v in values[start:stop]]

    def aggregate(self, values):
        return {self.name: float(np.mean(values))}


class Exact(Metric):
    """A fake metric that is not an item mean (one item, a number per model)."""

    def __init__(self, name: str, values: dict[str, float], weight: float = 1.0):
        super().__init__(name, "maximize", weight)
        self.values, self.calls = values, 0

    def num_items(self, split):
        return 1

    def score(self, model, tokenizer, split, start, stop):
        self.calls += 1
        return [self.values[model.key]]

    def aggregate(self, values):
        return {self.name: values[0]}


class Model:
    """Stands in for a model: the fake metrics read ``key``; ``scoring`` needs eval()."""

    def __init__(self, key: str):
        self.key = key

    def eval(self):
        return self


def reference_of(fitness: Fitness, key: str, number: int = 0) -> Reference:
    """A fully evaluated ``key`` as a reference, its per-item values put in racing order."""
    scores = fitness.evaluate(Model(key), None, cache_key=key)
    items = fitness.item_values(key)
    return Reference(number, {n: in_item_order(v, fitness.racing.seed) for n, v in items.items()}, scores)


# --------------------------------------------------------------------------- the bound

def test_bound_closed_forms():
    assert mean_upper_bound([], 10, 0.05) == 1.0
    assert mean_upper_bound([0.3, 0.7, 0.2], 3, 0.05) == pytest.approx(0.4)  # every item seen: the mean
    assert mean_upper_bound([1.0] * 5, 20, 0.01) == 1.0
    # never above the mean with every unseen item at 1, never below the mean with them at 0
    assert mean_upper_bound([0.0] * 10, 20, 0.5) <= 0.5 and mean_upper_bound([0.0] * 10, 20, 1e-9) == 0.5
    # one draw of 0: the capital at m is 1 + λ·m, λ = min(plug-in √8, 0.75 / (1 - m)); the bound is where it is 1/α
    m = mean_upper_bound([0.0], 1000, 0.5)
    assert 1 + min(math.sqrt(2 * math.log(2) / (0.25 * math.log(2))), 0.75 / (1 - m)) * m == pytest.approx(2, abs=1e-9)
    assert mean_lower_bound([1.0, 1.0], 2, 0.1) == 1.0
    assert mean_lower_bound([0.2] * 8, 64, 0.05) < 0.2 < mean_upper_bound([0.2] * 8, 64, 0.05)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        mean_upper_bound([1.5], 3, 0.1)


def test_bound_shrinks_with_the_items_seen_and_with_alpha():
    rng = np.random.default_rng(0)
    x = rng.random(200)
    widths = [mean_upper_bound(x[:n], 200, 0.01) - mean_lower_bound(x[:n], 200, 0.01) for n in (10, 50, 150, 200)]
    assert widths == sorted(widths, reverse=True) and widths[-1] == pytest.approx(0)
    assert mean_upper_bound(x[:50], 200, 0.2) < mean_upper_bound(x[:50], 200, 0.01)


@pytest.mark.parametrize("kind", ["binary", "uniform", "rare"])
def test_bound_covers_the_mean_at_every_look_with_the_stated_confidence(kind):
    """Anytime validity, measured: over random orders of fixed populations, the mean is above
    the upper bound at any of the looks (all looks together) at most alpha of the time."""
    rng = np.random.default_rng(1)
    population = {"binary": (rng.random(128) < 0.4).astype(float), "uniform": rng.random(128),
                  "rare": (rng.random(128) < 0.05).astype(float)}[kind]
    alpha, runs, misses = 0.1, 400, 0
    for _ in range(runs):
        x = rng.permutation(population)
        misses += any(mean_upper_bound(x[:n], 128, alpha) < population.mean() for n in (4, 8, 16, 32, 64, 100))
    assert misses / runs <= alpha


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=4, max_size=40), st.data())
def test_a_candidate_ahead_on_every_scored_item_is_never_stopped(reference, data):
    n = data.draw(st.integers(1, len(reference)))
    ahead = [data.draw(st.sampled_from([v for v in (0.0, 0.5, 1.0) if v >= r])) for r in reference[:n]]
    low, high = difference_bounds(ahead, reference, 0.001)
    assert high >= 0
    gains = Gains([{"m": 1.0}], frozenset({"m"}))
    assert not decide(gains, {"m": ahead}, {}, [Reference(0, {"m": np.array(reference)}, {"m": 0})], 0.999).stop
    assert not decide(gains, {"m": reference[:n]}, {}, [Reference(0, {"m": np.array(reference)}, {"m": 0})],
                      0.5).stop  # equal to the incumbent: never stopped, at any confidence


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=30), st.floats(1e-6, 0.5))
def test_bounds_bracket_the_mean_of_the_seen_items_feasibly(values, alpha):
    population = 2 * len(values)
    x = np.asarray(values)
    upper, lower = mean_upper_bound(x, population, alpha), mean_lower_bound(x, population, alpha)
    assert x.sum() / population - 1e-9 <= lower <= upper <= (x.sum() + population - x.size) / population + 1e-9


def test_item_order_is_a_seeded_permutation_and_undoes():
    order = item_order(50, 3)
    assert sorted(order) == list(range(50)) and list(order) == list(item_order(50, 3))
    assert list(order) != list(item_order(50, 4))
    values = np.arange(50.0)
    assert list(in_data_order(in_item_order(values, 3), 3)) == list(values)


# --------------------------------------------------------------------------- schedule and decision

def test_chunks_grow_by_growth_and_split_in_proportion():
    chunks = Racing(first=16, growth=2).chunks({"a": 100, "b": 300})
    assert chunks == [{"a": 4, "b": 12}, {"a": 8, "b": 24}, {"a": 16, "b": 48}, {"a": 32, "b": 96},
                      {"a": 64, "b": 192}, {"a": 100, "b": 300}]
    assert Racing(first=500).chunks({"a": 100}) == [{"a": 100}]
    assert Racing(first=1, growth=1.5).chunks({"a": 3, "b": 1})[0] == {"a": 1, "b": 1}  # at least one each


@pytest.mark.parametrize("field,value,message", [("first", 0, "at least 1"), ("growth", 1.0, "above 1"),
                                                 ("confidence", 1.0, r"in \(0, 1\)"),
                                                 ("probe", -1, "at least 0"),
                                                 ("probe", 4, "probe needs racing.screen")])
def test_racing_settings_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        Racing(**{field: value})


def test_decide_combines_metrics_with_their_signs_and_exact_terms():
    gains = Gains([{"a": 1.0, "b": -2.0, "ppl": 0.5}], frozenset({"a", "b"}))
    reference = Reference(7, {"a": np.ones(40), "b": np.zeros(40)}, {"a": 1.0, "b": 0.0, "ppl": 3.0})
    worse = {"a": [0.0] * 30, "b": [1.0] * 30}
    decision = decide(gains, worse, {"ppl": 3.0}, [reference], 0.99)
    assert decision.stop and decision.beaten_by == 7 and decision.upper[7][0] < 0
    # a large enough exact gain (ppl's term: 0.5 × 20) makes up for it
    assert not decide(gains, worse, {"ppl": 23.0}, [reference], 0.99).stop
    assert not decide(gains, worse, {"ppl": 3.0}, [], 0.99).stop  # nothing to race against


def test_several_objectives_stop_only_when_one_reference_dominates():
    gains = Gains([{"a": 1.0}, {"b": 1.0}], frozenset({"a", "b"}))
    good_a = Reference(1, {"a": np.ones(40), "b": np.zeros(40)}, {})
    good_b = Reference(2, {"a": np.zeros(40), "b": np.ones(40)}, {})
    mixed = {"a": [0.0] * 30, "b": [0.0] * 30}
    assert decide(gains, mixed, {}, [good_a, good_b, Reference(3, {"a": np.ones(40), "b": np.ones(40)}, {})],
                  0.99).beaten_by == 3
    assert not decide(gains, mixed, {}, [good_a, good_b], 0.99).stop  # each is worse on one objective


# --------------------------------------------------------------------------- Fitness.race

def population(seed: int, p: float, n: int = 96) -> list[float]:
    return list((np.random.default_rng(seed).random(n) < p).astype(float))


def racing_fitness(**racing) -> tuple[Fitness, Items, Items, Exact]:
    skills = {"best": population(0, 0.9), "bad": population(1, 0.1), "same": population(0, 0.9),
              "better": [1.0] * 96}
    a, b = Items("a", skills), Items("b", {k: v[::-1] for k, v in skills.items()})
    extra = Exact("extra", {k: 1.0 for k in skills}, weight=0.0)
    return Fitness([a, b, extra], racing=Racing(**{"first": 8, **racing})), a, b, extra


def test_race_stops_a_hopeless_candidate_early_and_runs_a_winner_to_the_end():
    fitness, a, b, extra = racing_fitness()
    incumbent = reference_of(fitness, "best")
    a.calls.clear()
    with fitness.metered() as usage:
        race = fitness.race(Model("bad"), None, [incumbent], cache_key="bad")
    assert race.stopped and race.decision.beaten_by == 0 and race.items["a"] < 96
    assert set(race.scores) == {"a", "b"} and extra.calls == 1  # weight 0: only the incumbent's full run
    assert race.estimate == fitness.objectives(race.scores)
    assert usage["a"].items == race.items["a"] and usage["a"].tokens == 10 * race.items["a"]
    assert a.calls[0] == (0, 4) and all(x[1] == y[0] for x, y in zip(a.calls, a.calls[1:]))  # each item once
    for key in ("better", "same"):
        race = fitness.race(Model(key), None, [incumbent], cache_key=key)
        assert not race.stopped and set(race.scores) == {"a", "b", "extra"} and race.items == {"a": 96, "b": 96}
    assert fitness.race(Model("better"), None, [incumbent], cache_key="better").decision is None  # cached


def test_race_without_references_or_with_mismatched_ones_scores_in_full():
    fitness, *_ = racing_fitness()
    assert not fitness.race(Model("bad"), None, []).stopped
    wrong = Reference(0, {"a": np.ones(10), "b": np.ones(10)}, {"a": 1.0, "b": 1.0})
    assert not fitness.race(Model("bad"), None, [wrong]).stopped


def test_item_values_are_in_the_data_order_whatever_the_racing_order():
    fitness, *_ = racing_fitness(seed=5)
    fitness.evaluate(Model("bad"), None, cache_key="k")
    assert fitness.item_values("k") == {"a": population(1, 0.1), "b": population(1, 0.1)[::-1]}
    assert fitness.item_values("unknown") == {}


# --------------------------------------------------------------------------- screening

def test_screen_orders_the_informative_items_first_and_scales_their_gains():
    gains = Gains([{"a": 1.0, "b": 2.0, "x": 0.5}], frozenset({"a", "b"}))
    a_ref, a_other = np.array([1.0, 0, 1, 1, 0, 0]), np.array([1.0, 1, 1, 0, 0, 0])
    incumbent = Reference(7, {"a": a_ref, "b": np.ones(4)}, {})
    other = Reference(3, {"a": a_other, "b": np.ones(4)}, {})
    plan = screen(gains, [incumbent], [other], Racing(first=2))
    # left out: the items both have right (a: 0 and 2; b: all); items both have wrong stay in
    assert plan.counts == {"a": 4, "b": 0}
    assert list(plan.positions["a"]) == [1, 3, 4, 5, 0, 2] and list(plan.positions["b"]) == [0, 1, 2, 3]
    # raced on the informative items: a's coefficient times its informative share; b is right
    # everywhere and leaves the race; x is exact
    raced, references = restricted(plan.gains, plan.references, {"a": plan.informative("a")}, plan.positions)
    assert raced.coefficients == [{"a": pytest.approx(2 / 3), "x": 0.5}] and raced.raced == {"a"}
    assert [list(r.items["a"]) for r in references] == [[0.0, 1.0, 0.0, 0.0]] and references[0].number == 7
    # the last informative decision after every informative item; then the left-out chunks
    assert plan.steps == [{"a": 2, "b": 0}, {"a": 4, "b": 0}, {"a": 5, "b": 2}, {"a": 6, "b": 3}]


def test_the_left_out_items_are_those_at_the_value_no_candidate_can_beat():
    from evomerge.fitness.racing import unbeatable

    a_ref, a_other = np.array([1.0, 0, 1, 1, 0, 0]), np.array([1.0, 1, 1, 0, 0, 0])
    trials = [Reference(7, {"a": a_ref}, {})], [Reference(3, {"a": a_other}, {})]
    lower = Gains([{"a": -1.0}], frozenset({"a"}))  # a minimized: 0 is the best an item can be
    assert unbeatable(lower, "a") == 0.0 and unbeatable(Gains([{"a": 2.0}], frozenset({"a"})), "a") == 1.0
    plan = screen(lower, *trials, Racing())
    assert plan.counts == {"a": 4} and list(plan.positions["a"]) == [0, 1, 2, 3, 4, 5]
    both = Gains([{"a": 1.0}, {"a": -1.0}], frozenset({"a"}))  # objectives that pull apart: no item is left out
    assert unbeatable(both, "a") is None and screen(both, *trials, Racing()).counts == {"a": 6}


def screening_fitness(screen_trials: int = 2, probe: int = 0):
    """Fitness ``a`` (one metric, 8 items) with screening; the incumbent and the pool disagree on
    items 0, 1, both have items 2, 4, 5 right and items 3, 6, 7 wrong; racing order seed 3 scores
    items 1 2 3 4 0 7 5 6, so the informative items come as 1 3 0 7 6, the left-out ones as 2 4 5."""
    keys = {"incumbent": [1, 0, 1, 0, 1, 1, 0, 0], "pool": [0, 1, 1, 0, 1, 1, 0, 0],
            "worse": [0, 0, 1, 0, 0, 0, 0, 0], "better": [1, 1, 1, 1, 0, 0, 0, 0]}
    a = Items("a", {k: [float(v) for v in values] for k, values in keys.items()})
    extra = Exact("extra", {k: 1.0 for k in keys}, weight=0.0)
    fitness = Fitness([a, extra], racing=Racing(first=1, confidence=0.5, seed=3, screen=screen_trials, probe=probe))
    return fitness, a, extra


def test_screening_races_on_the_informative_items_and_completes_the_estimate_with_the_reference():
    fitness, a, extra = screening_fitness()
    incumbent, pool = reference_of(fitness, "incumbent", 1), reference_of(fitness, "pool", 2)
    extra.calls = 0
    with fitness.metered() as usage:
        race = fitness.race(Model("worse"), None, [incumbent], pool=[pool, incumbent], cache_key="worse")
    # informative: 0, 1, 3, 6, 7; "worse" has 0 on items 1 3 0 7, the incumbent 0 0 1 0: one behind
    # with one item to go, stopped at confidence 0.5
    assert race.stopped and race.informative == 5 and race.items == {"a": 4} and usage["a"].items == 4
    assert extra.calls == 0  # weight 0: not scored for a stopped candidate
    # the estimate: "worse" on items 1 3 0 7, its mean (0) on item 6, the incumbent's on 2 4 5 (all 1)
    assert race.scores["a"] == pytest.approx(3 / 8)
    assert fitness.metrics["a"].item_order is not None  # the racing order is back after the race
    assert list(fitness.metrics["a"].item_order) == list(item_order(8, 3))

    race = fitness.race(Model("better"), None, [incumbent], pool=[pool, incumbent], cache_key="better")
    assert not race.stopped and race.informative == 5 and race.items == {"a": 8}
    assert race.scores == {"a": 0.5, "extra": 1.0}
    assert fitness.item_values("better") == {"a": [1.0, 1, 1, 1, 0, 0, 0, 0]}  # every item, the data's order
    # the same candidate without screening (no pool): plain racing, the same full scores
    assert fitness.race(Model("better"), None, [incumbent], cache_key="b2").scores == race.scores


def test_screening_keeps_a_candidate_that_wins_items_every_trial_got_wrong():
    """Behind on the items the trials disagree on, ahead on items they all got wrong: a winner
    (5 of 8 against 4), which screening that left out every agreed item would have stopped."""
    fitness, a, extra = screening_fitness()
    incumbent, pool = reference_of(fitness, "incumbent", 1), reference_of(fitness, "pool", 2)
    a.values["late"], extra.values["late"] = [0.0, 0, 1, 1, 1, 1, 1, 0], 1.0
    race = fitness.race(Model("late"), None, [incumbent], pool=[pool, incumbent], cache_key="late")
    assert not race.stopped and race.items == {"a": 8} and race.scores["a"] == 5 / 8


def test_a_survivor_of_the_informative_items_is_stopped_on_the_left_out_ones_it_loses():
    """"slip" is one item ahead on the informative items (item 3) but loses items 2 and 4, which the
    incumbent and the pool both have right: left out, scored after the informative ones (racing
    order: items 2, 4, 5), and once its losses there pass its lead it is stopped, exactly."""
    fitness, a, extra = screening_fitness()
    incumbent, pool = reference_of(fitness, "incumbent", 1), reference_of(fitness, "pool", 2)
    a.values["slip"], extra.values["slip"] = [1.0, 0, 0, 1, 0, 1, 0, 0], 1.0
    plan = screen(fitness.gains, [incumbent], [pool, incumbent], fitness.racing)
    assert plan.steps[-2:] == [{"a": 6}, {"a": 7}]  # the left-out chunks (first 1, growth 2), before all 8
    race = fitness.race(Model("slip"), None, [incumbent], pool=[pool, incumbent], cache_key="slip")
    # after item 2 (lost): level, a tie; after item 4 (lost): one behind with item 5 to go, at most a tie
    assert race.stopped and race.items == {"a": 7} and race.decision.upper[1] == [pytest.approx(-1 / 8)]
    # item 5 left: its mean on the left-out items it scored (items 2 and 4, a random sample of them), 0
    assert race.scores["a"] == pytest.approx(2 / 8)


def test_the_confidence_stays_split_over_a_metric_once_its_informative_items_are_all_scored():
    """Metric a has one informative item, b sixteen: after the first step a is known exactly and
    only b is bounded, but b's bound keeps its share of the confidence (split over both): letting
    a metric leave the split mid-race would spend more than 1 − confidence over the race's looks."""
    gains = Gains([{"a": 1.0, "b": 1.0}], frozenset({"a", "b"}))
    trials = [Reference(0, {"a": np.array([0.0, 1, 1, 1]), "b": np.zeros(16)}, {})]
    plan = screen(gains, trials, trials, Racing(first=2, screen=1))
    assert plan.counts == {"a": 1, "b": 16} and plan.steps[0] == {"a": 1, "b": 2}
    values = {"a": [0.0], "b": [0.0] * 8}  # level with the reference on every item scored
    upper = decide_screened(plan, values, {}, 0.9).upper[0][0]
    b_only, references = restricted(plan.gains, plan.references, {"b": plan.informative("b")}, plan.positions)
    both = decide(b_only, {"b": values["b"]}, {}, references, 0.9, split=2).upper[0][0]
    alone = decide(b_only, {"b": values["b"]}, {}, references, 0.9).upper[0][0]
    assert upper == pytest.approx(both) and alone < both  # a looser bound than b's alone would give


def test_the_probe_is_scored_first_counts_exactly_and_estimates_the_left_out_items():
    """probe=2: items 2 and 4, the first left-out ones in racing order, come first. "worse" has
    item 2 right and item 4 wrong: one item behind the incumbent, known exactly before any
    informative item, and its estimate gives item 5 (not scored) its mean on the probe, 0.5,
    where without a probe it would take the incumbent's 1."""
    fitness, a, extra = screening_fitness(probe=2)
    incumbent, pool = reference_of(fitness, "incumbent", 1), reference_of(fitness, "pool", 2)
    plan = screen(fitness.gains, [incumbent], [pool, incumbent], fitness.racing)
    order = item_order(8, 3)
    assert plan.probe == {"a": 2} and order[plan.positions["a"]].tolist() == [2, 4, 1, 3, 0, 7, 6, 5]
    assert plan.steps[0] == {"a": 3}  # the probe and the first informative item
    upper = decide_screened(plan, {"a": [1.0, 0.0]}, {}, 0.5).upper[1][0]  # the probe alone: at most its loss
    assert upper == pytest.approx(-1 / 8 + 5 / 8)  # the informative items unseen: each could be a win
    race = fitness.race(Model("worse"), None, [incumbent], pool=[pool, incumbent], cache_key="worse")
    assert race.stopped and race.probe == 2 and race.informative == 5
    scored = race.items["a"] - 2  # informative items scored: "worse" has them all wrong
    mean = 0.0  # its mean on the informative items it scored (all wrong) for the others
    assert race.scores["a"] == pytest.approx((1 + 0 + 0 * scored + mean * (5 - scored) + 0.5) / 8)
    plain, *_ = screening_fitness()
    assert plain.race(Model("worse"), None, [incumbent], pool=[pool, incumbent]).scores["a"] == pytest.approx(3 / 8)


@given(st.lists(st.tuples(*[st.sampled_from([0.0, 1.0])] * 4), min_size=2, max_size=24), st.integers(0, 6))
@settings(max_examples=100, deadline=None)
def test_the_gain_on_the_informative_items_bounds_the_true_gain(columns, probe):
    """Whatever the candidate, the trials and the probe: once the probe and the informative
    items are scored, its gain over the incumbent with the other left-out items counted as ties
    is at least its true gain, so a stop there is never wrong for lack of the others (the
    property that makes screening a bound, not an assumption)."""
    incumbent, pool, other, candidate = (np.array(values) for values in zip(*columns))
    gains = Gains([{"a": 1.0}], frozenset({"a"}))
    plan = screen(gains, [Reference(0, {"a": incumbent}, {})], [Reference(1, {"a": pool}, {}),
                                                                  Reference(2, {"a": other}, {})],
                  Racing(screen=2, probe=probe))
    assert plan.probe["a"] == min(probe, len(candidate) - plan.counts["a"])
    true_gain = float(np.mean(candidate - incumbent))
    scored = {"a": candidate[plan.positions["a"][:plan.probe["a"] + plan.counts["a"]]]}
    assert decide_screened(plan, scored, {}, 0.9).upper[0][0] >= true_gain - 1e-12


def test_a_tie_within_floating_point_noise_is_not_stopped():
    """Screening's last decision is exact, and a tie can sum to -1e-17: never a stop."""
    gains = Gains([{"x": 1.0}], frozenset())
    reference = Reference(0, {}, {"x": 0.1 + 0.2})
    assert 0.3 - (0.1 + 0.2) < 0 and not decide(gains, {}, {"x": 0.3}, [reference], 0.9).stop
    assert decide(gains, {}, {"x": 0.29}, [reference], 0.9).stop


def test_a_screened_estimate_fills_unscored_items_with_the_candidates_mean_on_their_kind():
    incumbent = Reference(0, {"a": np.array([1.0, 0, 1, 1, 0, 0])}, {})  # racing order
    pool = [Reference(1, {"a": np.array([1.0, 1, 1, 0, 0, 0])}, {})]
    gains = Gains([{"a": 1.0}], frozenset({"a"}))
    plain = screen(gains, [incumbent], pool, Racing(screen=1))  # left out: positions 0 and 2
    assert list(plain.positions["a"]) == [1, 3, 4, 5, 0, 2]
    # the first two informative scored (1, 0): the other two get their mean; the left-out items
    # the reference's values (1: no probe to tell)
    assert completed(plain, "a", [1.0, 0.0], incumbent) == [1.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert completed(plain, "a", [], incumbent) == [0.0, 1.0, 0.0, 0.0, 1.0, 1.0]  # nothing scored
    probed = screen(gains, [incumbent], pool, Racing(screen=1, probe=1))  # position 0 is scored first
    assert list(probed.positions["a"]) == [0, 1, 3, 4, 5, 2] and probed.probe == {"a": 1}
    # lost the probe (0): the unscored left-out item takes its mean there, 0
    assert completed(probed, "a", [0.0, 1.0, 0.0], incumbent) == [0.0, 1.0, 0.0, 0.5, 0.5, 0.0]


def test_a_candidate_level_on_the_informative_items_is_scored_in_full():
    fitness, a, _ = screening_fitness()
    incumbent, pool = reference_of(fitness, "incumbent", 1), reference_of(fitness, "pool", 2)
    race = fitness.race(Model("pool"), None, [incumbent], pool=[pool, incumbent], cache_key="again")
    assert not race.stopped and race.items == {"a": 8}  # level with the incumbent: a tie is never stopped


def test_race_refuses_items_outside_the_unit_interval():
    metric = Items("a", {"m": [2.0] * 20, "ref": [1.0] * 20})
    fitness = Fitness([metric], racing=Racing(first=4))
    with pytest.raises(FitnessError, match=r"racing needs per-item values in \[0, 1\]"):
        fitness.race(Model("m"), None, [reference_of(fitness, "ref")])


def test_racing_needs_an_item_mean_metric_and_no_stages():
    with pytest.raises(ValueError, match="mean over items"):
        Fitness([Exact("x", {})], racing=Racing())
    with pytest.raises(ValueError, match="replaces stages"):
        Fitness([Items("a", {"m": [1.0]})], racing=Racing(), stages=(0.5, 1.0))


# --------------------------------------------------------------------------- the definition

MC = {"type": "lm_eval", "task": "fit_mc", "metric": "acc"}


def test_a_definition_turns_racing_on_and_orders_the_lm_eval_items(llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = load_fitness({"include_path": "tasks", "metrics": {"mc": MC}}, base_dir=DATA)
    raced = load_fitness({"include_path": "tasks", "racing": {"first": 4, "seed": 2}, "metrics": {"mc": MC}},
                         base_dir=DATA)
    assert plain.racing is None and raced.racing == Racing(first=4, growth=2.0, confidence=0.99, seed=2)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(llama[0]), AutoTokenizer.from_pretrained(llama[0])
    assert raced.evaluate(model, tokenizer, cache_key="m") == plain.evaluate(model, tokenizer, cache_key="m")
    mc = raced.metrics["mc"]
    assert list(mc.item_order) == list(item_order(mc.num_items("search"), 2)) and plain.metrics["mc"].item_order is None
    assert raced.item_values("m") == plain.item_values("m")  # stored in the data's order either way
    values = raced._items[("m", "search")]["mc"]  # scored in racing order
    assert values == list(in_item_order(plain.item_values("m")["mc"], 2))


@pytest.mark.parametrize("racing,message", [
    ({"first": 0}, "racing.first: Input should be greater than 0"),
    ({"growth": 1}, "racing.growth: Input should be greater than 1"),
    ({"confidence": 1.5}, "racing.confidence: Input should be less than 1"),
    ({"frist": 3}, "racing.frist: unknown field"),
    ({"seed": -1}, "racing.seed: Input should be greater than or equal to 0"),
    ({"anchors": 8}, "racing.anchors: anchors need screening: give racing.screen too"),
    ({"probe": 8}, "racing.probe: a probe needs screening: give racing.screen too"),
    ({"probe": -2, "screen": 4}, "racing.probe: Input should be greater than or equal to 0"),
])
def test_bad_racing_blocks_are_one_line_errors(racing, message):
    with pytest.raises(ConfigError) as error:
        load_fitness({"racing": racing, "metrics": {"mc": MC}, "include_path": "tasks"}, base_dir=DATA)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_racing_refuses_stages_and_a_fitness_without_item_means():
    scores = {"type": "callable", "function": "scores.py:constant", "direction": "maximize"}
    with pytest.raises(ConfigError, match="racing: racing replaces stages"):
        load_fitness({"racing": {}, "stages": [0.5, 1.0], "metrics": {"x": scores}}, base_dir=DATA)
    with pytest.raises(ConfigError, match="racing: racing needs an optimized metric whose score is a mean"):
        load_fitness({"racing": {}, "metrics": {"x": scores}}, base_dir=DATA)


# --------------------------------------------------------------------------- anchors

def test_anchor_items_are_the_medoids_of_items_scored_alike():
    from evomerge.fitness.racing import anchor_items

    # items 0-2 always agree, 3-4 agree, 5 alone: three clusters, each medoid a member
    trials = np.array([[1, 1, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=float)
    medoids, assignment = anchor_items(trials, 3)
    assert list(medoids) == [0, 3, 5]
    assert list(assignment) == [0, 0, 0, 1, 1, 2]
    assert list(anchor_items(trials, 6)[0]) == list(range(6)) == list(anchor_items(trials, 9)[1])
    medoids, assignment = anchor_items(trials, 1)  # one cluster: its medoid is the most central item
    assert list(assignment) == [0] * 6 and medoids[0] in (0, 1, 2)


@given(st.integers(2, 6), st.integers(1, 12), st.data())
@settings(max_examples=60, deadline=None)
def test_every_item_goes_to_its_nearest_anchor_and_anchors_to_themselves(trials, size, data):
    from evomerge.fitness.racing import anchor_items

    values = np.array(data.draw(st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=size, max_size=size),
                                         min_size=trials, max_size=trials)))
    k = data.draw(st.integers(1, size))
    medoids, assignment = anchor_items(values, k)
    assert len(set(medoids.tolist())) == len(medoids) <= k and list(medoids) == sorted(medoids)
    assert list(assignment[medoids]) == list(range(len(medoids)))
    distance = np.abs(values[:, :, None] - values[:, None, :]).mean(axis=0)
    assert np.allclose(distance[medoids[assignment], np.arange(size)], distance[medoids].min(axis=0))


def anchored_fitness(anchors: int):
    """Fitness ``a`` (8 items) with screening on the two trials below and ``anchors``; racing
    order seed 3. The incumbent and the pool both have items 4-7 (data order) right and disagree
    on 0-3, where items 0, 2 and items 1, 3 are scored alike by them."""
    keys = {"incumbent": [1, 0, 1, 0, 1, 1, 1, 1], "pool": [0, 1, 0, 1, 1, 1, 1, 1],
            "worse": [0, 1, 0, 0, 0, 0, 0, 0], "better": [1, 1, 1, 1, 1, 1, 1, 1]}
    a = Items("a", {k: [float(v) for v in values] for k, values in keys.items()})
    fitness = Fitness([a], racing=Racing(first=1, confidence=0.5, seed=3, screen=2, anchors=anchors))
    return fitness, a


def test_anchors_predict_the_informative_items_and_stop_a_predicted_loser_after_them():
    fitness, a = anchored_fitness(2)
    incumbent, pool = reference_of(fitness, "incumbent", 1), reference_of(fitness, "pool", 2)
    plan = screen(fitness.gains, [incumbent], [pool, incumbent], fitness.racing)
    assert plan.counts == {"a": 4} and plan.anchors == {"a": 2}
    order = item_order(8, 3)
    informative_data = sorted(order[plan.positions["a"][:4]].tolist())
    assert informative_data == [0, 1, 2, 3]
    # each anchor predicts the informative item scored alike: data items {0, 2} and {1, 3}
    anchor_data = order[plan.positions["a"][:2]]
    for i, c in enumerate(plan.clusters["a"]):
        assert order[plan.positions["a"][i]] % 2 == anchor_data[c] % 2

    race = fitness.race(Model("worse"), None, [incumbent], pool=[pool, incumbent], cache_key="worse")
    # "worse" on the anchors: 1 on the odd one, 0 on the even one, so it predicts 0 1 0 1 on items
    # 0-3 (two right, as the incumbent's 1 0 1 0): a tie, not stopped; the exact last decision
    # (it has 1 of 4 right) stops it
    assert race.stopped and not race.decision.estimated and race.items == {"a": 4}

    a.values["loser"] = [0.0, 0, 0, 0, 1, 1, 1, 1]
    race = fitness.race(Model("loser"), None, [incumbent], pool=[pool, incumbent], cache_key="loser")
    assert race.stopped and race.decision.estimated and race.items == {"a": 2}
    # the estimate: the anchors' values predict items 0-3 (all 0); the incumbent's values elsewhere
    assert race.scores["a"] == pytest.approx(4 / 8)
    assert list(fitness.metrics["a"].item_order) == list(order)  # the racing order is back

    race = fitness.race(Model("better"), None, [incumbent], pool=[pool, incumbent], cache_key="better")
    assert not race.stopped and race.items == {"a": 8} and race.scores == {"a": 1.0}


def test_anchors_need_screening():
    with pytest.raises(ValueError, match="anchors needs racing.screen"):
        Racing(anchors=4)
    with pytest.raises(ValueError, match="anchors must be at least 0"):
        Racing(screen=2, anchors=-1)
