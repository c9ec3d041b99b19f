"""Searches with racing on the tiny llama family: hopeless candidates stop early as pruned trials
with their estimate, the records (items, tokens, per-item values, the race), resume, status, and
how CMA-ES (Optuna's and the cma package's) and NSGA-II take raced-out trials."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState
from safetensors.torch import load_file

from evomerge.analysis.replay import replay_racing
from evomerge.analysis.report import trials_frame
from evomerge.cli.main import main
from evomerge.compat.optuna import cmaes_generation
from evomerge.fitness import Fitness, Metric, Racing
from evomerge.search.driver import Runner, open_search
from evomerge.search.experiment import parse_experiment
from evomerge.search.records import trial_records
from evomerge.search.samplers import make_sampler
from tests.search.test_search import FUNCTIONS, experiment_dict

ITEMS = 64


class Skill(Metric):
    """A fake lm-eval-like metric of a live model: how far the merged MLP weights moved toward
    one source, ``s`` = (cosine with that source's task vector + 1) / 2; item i scores 1 when
    ``s`` is above its seeded threshold, so the accuracy is about ``s`` and two models' items
    agree where both are above or below. Takes the racing order; counts 7 tokens an item."""

    item_mean = True

    def __init__(self, name: str, base, source, weight: float = 1.0):
        super().__init__(name, "maximize", weight)
        base_weights, source_weights = load_file(base / "model.safetensors"), load_file(source / "model.safetensors")
        self.names = [n for n in base_weights if "mlp" in n]
        self.base = {n: base_weights[n] for n in self.names}
        self.direction_vector = np.concatenate([(source_weights[n] - base_weights[n]).flatten().numpy()
                                                for n in self.names])
        self.thresholds = np.sort(np.random.default_rng(len(name)).uniform(0.6, 0.9, ITEMS))

    def num_items(self, split):
        return ITEMS

    def score(self, model, tokenizer, split, start, stop):
        weights = dict(model.named_parameters())
        moved = np.concatenate([(weights[n].detach() - self.base[n]).flatten().numpy() for n in self.names])
        cosine = moved @ self.direction_vector / (np.linalg.norm(moved) * np.linalg.norm(self.direction_vector) + 1e-12)
        values = ((cosine + 1) / 2 > self.thresholds).astype(float)
        if self.item_order is not None and split == "search":
            values = values[np.asarray(self.item_order)]
        self.tokens_scored += 7 * (stop - start)
        return list(values[start:stop])

    def aggregate(self, values):
        return {self.name: float(np.mean(values))}


def racing_search(family, tmp_path, *, sampler="cmaes", objective="weighted_sum", n_trials=16, first=8,
                  confidence=0.99, name="t", screen=0, anchors=0, probe=0):
    """An experiment on ``family`` whose fitness is replaced by Skill metrics (toward the first
    source; with ``separate``, also toward the second), with racing."""
    data = experiment_dict(family, tmp_path, sampler=sampler, n_trials=n_trials, name=name)
    data["optimizer"]["warm_start"] = False
    if objective == "separate":  # a study of two objectives
        data["fitness"] = {"objective": "separate", "metrics": {
            key: {"type": "callable", "function": f"{FUNCTIONS}:two_objectives", "key": key, "direction": "maximize"}
            for key in ("first", "last")}}
    search = open_search(parse_experiment(yaml.safe_dump(data)))
    metrics = [Skill("skill", family[0], family[1])]
    if objective == "separate":
        metrics.append(Skill("other", family[0], family[2]))
    racing = Racing(first=first, confidence=confidence, screen=screen, anchors=anchors, probe=probe)
    search.fitness = Fitness(metrics, objective=objective, racing=racing)
    search.study.sampler = make_sampler(search.experiment.optimizer, search.space, search.fitness.directions,
                                        consider_pruned=True)
    return search


def test_a_racing_search_stops_hopeless_candidates_and_records_what_it_scored(llama, tmp_path):
    search = racing_search(llama, tmp_path, n_trials=24)
    assert Runner(search, progress=False).run(24, None) == 24
    trials = search.study.get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == 24
    for trial in pruned:
        records = trial_records(trial)
        assert records.raced_out and records.race["items"] < ITEMS and not records.items
        assert records.scored["skill"] == {"items": records.race["items"], "of": ITEMS,
                                           "tokens": 7 * records.race["items"], "seconds": pytest.approx(
                                               records.scored["skill"]["seconds"])}
        assert trial.intermediate_values == {records.race["items"]: pytest.approx(records.race["estimate"][0])}
        assert max(records.race["upper"]) < 0 and records.race["reference"] < trial.number
    for trial in complete:
        records = trial_records(trial)
        assert records.scored["skill"]["items"] == ITEMS and records.tokens_scored == 7 * ITEMS
        assert len(records.items["skill"]) == ITEMS and isinstance(trial.user_attrs["result"]["items"]["skill"], str)
        assert np.mean(records.items["skill"]) == pytest.approx(trial.value)
    assert trial_records(trials[0]).race is None  # nothing to race against yet
    assert search.study.best_trial.state == TrialState.COMPLETE
    # the incumbent a trial raced against was the best completed trial before it
    for trial in pruned:
        earlier = [t for t in complete if t.number < trial.number and trial_records(t).items]
        assert trial_records(trial).race["reference"] == max(earlier, key=lambda t: t.value).number

    status = CliRunner().invoke(main, ["status", "--study", "t", "--storage", f"sqlite:///{tmp_path}/study.db"])
    assert status.exit_code == 0, status.output
    items = sum(trial_records(t).items_scored for t in trials)
    assert f"scored: {items:,} items, {7 * items:,} tokens in 24 trials" in status.output
    assert f"racing: {len(pruned)} of {sum(trial_records(t).race is not None for t in trials)} raced trials " \
           "stopped early" in status.output and "s saved" in status.output

    frame = trials_frame(search.study)  # the report's trials.csv
    assert frame["user_attrs_items_scored"].tolist() == [trial_records(t).items_scored for t in trials]
    assert frame["user_attrs_raced_out"].sum() == len(pruned) and "user_attrs_items" not in frame.columns

    replay = replay_racing(search.study, search.fitness, Racing(first=8))  # only the complete trials replay
    assert replay.skipped == [t.number for t in pruned] and len(replay.trials) == len(complete)
    assert replay.false_drops == []


@pytest.mark.parametrize("probe", [0, 4])
def test_a_screening_search_races_on_the_informative_items_once_its_pool_is_full(llama, tmp_path, probe):
    search = racing_search(llama, tmp_path, n_trials=24, screen=4, probe=probe)
    assert Runner(search, progress=False).run(24, None) == 24
    trials = sorted(search.study.get_trials(), key=lambda t: t.number)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    screened = [t for t in trials if trial_records(t).race and "informative" in trial_records(t).race]
    assert screened, "no trial was screened"
    assert {trial_records(t).raced_out for t in screened} == {True, False}  # some stopped, some scored in full
    for trial in screened:  # each raced after four complete trials; a stopped one before its last item
        race = trial_records(trial).race
        assert sum(t.number < trial.number for t in complete) >= 4
        assert race["informative"] + race["probe"] <= ITEMS and race["probe"] <= probe
        if trial_records(trial).raced_out:
            assert race["probe"] <= race["items"] < ITEMS and not trial_records(trial).items
        else:
            assert race["items"] == ITEMS and len(trial_records(trial).items["skill"]) == ITEMS
    if probe:
        assert any(trial_records(t).race["probe"] for t in screened)
    assert all("informative" not in (trial_records(t).race or {}) for t in trials
               if sum(c.number < t.number for c in complete) < 4)
    assert search.study.best_trial.state == TrialState.COMPLETE
    status = CliRunner().invoke(main, ["status", "--study", "t", "--storage", f"sqlite:///{tmp_path}/study.db"])
    races = [trial_records(t).race for t in screened]
    informative = sorted(race["informative"] for race in races)[len(races) // 2]
    probes = sorted(race["probe"] for race in races)
    stopped = [race for race in races if race["stopped"]]
    on_left_out = sum(race["items"] > race["informative"] + race["probe"] for race in stopped)
    assert status.exit_code == 0 and (
        f"screening: {len(screened)} trials raced on the informative items first (median {informative}"
        + (f", after a probe of {probes[len(probes) // 2]} left-out items" if probe else "")
        + f"), {len(stopped)} of them stopped, {on_left_out} of those on the left-out items") in status.output


def test_a_search_with_anchors_stops_predicted_losers_after_their_anchors(llama, tmp_path):
    search = racing_search(llama, tmp_path, n_trials=24, screen=4, anchors=2)
    assert Runner(search, progress=False).run(24, None) == 24
    races = [trial_records(t).race for t in search.study.get_trials() if trial_records(t).race]
    by_anchors = [r for r in races if r.get("estimated")]
    assert by_anchors, "no trial was stopped by its anchors"
    for race in by_anchors:  # stopped after its anchors (two, or one per informative item when fewer)
        assert race["stopped"] and race["items"] <= min(2, race["informative"]) and race["upper"][0] < 0
    assert search.study.best_trial.state == TrialState.COMPLETE
    status = CliRunner().invoke(main, ["status", "--study", "t", "--storage", f"sqlite:///{tmp_path}/study.db"])
    assert status.exit_code == 0 and f"anchors: {len(by_anchors)} of them stopped on their anchors'" in status.output


def test_resume_races_against_the_incumbent_stored_in_the_study(llama, tmp_path):
    first = racing_search(llama, tmp_path, n_trials=10)
    Runner(first, progress=False).run(10, None)
    best = first.study.best_trial.number
    again = racing_search(llama, tmp_path, n_trials=16)  # a new process: only the study is shared
    Runner(again, progress=False).run(16, None)
    new = [t for t in again.study.get_trials() if t.number >= 10]
    raced = [trial_records(t).race for t in new if trial_records(t).race is not None]
    assert raced and raced[0]["reference"] == best


def test_optunas_cma_es_counts_raced_trials_in_their_generation(llama, tmp_path):
    search = racing_search(llama, tmp_path, n_trials=20)
    Runner(search, progress=False).run(20, None)
    trials = search.study.get_trials()
    generations = {}
    for trial in trials:
        generations.setdefault(cmaes_generation(trial), []).append(trial.state)
    complete_generations = [g for g, states in generations.items() if g is not None and len(states) == 4]
    with_raced = [g for g in complete_generations if TrialState.PRUNED in generations[g]]
    assert with_raced and max(with_raced) + 1 in generations  # a generation with raced members was told


def test_the_cma_package_learns_from_raced_trials(llama, tmp_path):
    search = racing_search(llama, tmp_path, sampler="cma", n_trials=16)
    sampler = search.study.sampler
    start = sampler.es.mean.copy()
    Runner(search, progress=False).run(16, None)
    states = [t.state for t in search.study.get_trials()]
    assert TrialState.PRUNED in states[:12]
    assert sampler.es.countiter == 4 and not np.allclose(sampler.es.mean, start)  # 16 trials: 4 generations
    rebuilt = make_sampler(search.experiment.optimizer, search.space, ["maximize"], consider_pruned=True)
    rebuilt.sync(search.study)  # a resume rebuilds the generations from the study (its points: the repaired ones)
    assert rebuilt.es.countiter == 4
    ignoring = make_sampler(search.experiment.optimizer, search.space, ["maximize"])
    ignoring.sync(search.study)
    assert ignoring.es.countiter == states.count(TrialState.COMPLETE) // 4


@pytest.mark.parametrize("screen", [0, 4])
def test_a_multi_objective_racing_search_with_nsga2(llama, tmp_path, screen):
    # a low confidence: with two objectives and a front of several trials the bound is split many ways
    search = racing_search(llama, tmp_path, sampler="nsga2", objective="separate", n_trials=24, confidence=0.6,
                           first=16, screen=screen)
    Runner(search, progress=False).run(24, None)
    trials = search.study.get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.state == TrialState.COMPLETE for t in search.study.best_trials)
    for trial in pruned:
        race = trial_records(trial).race
        assert race["stopped"] and len(race["estimate"]) == 2 and all(u < 0 for u in race["upper"])
        assert not trial.intermediate_values  # Optuna keeps none in a multi-objective study
        beaten_by = next(t for t in trials if t.number == race["reference"])
        assert beaten_by.state == TrialState.COMPLETE
    assert len(search.study.get_trials(states=(TrialState.COMPLETE,))) > 8  # generations went on (popsize 4)
    if screen:  # the front and the pool set the informative items; a stopped trial is beaten on both objectives
        assert any("informative" in (trial_records(t).race or {}) for t in pruned)
