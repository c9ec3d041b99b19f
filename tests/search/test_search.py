"""The search driver end to end on a tiny synthetic family with a fast callable fitness:
records, warm start, failures, resume after kill -9, Ctrl-C, samplers, export → merge."""

from __future__ import annotations

import logging
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

from evomerge import merge
from evomerge.analysis.results import export_yaml, pick_trial
from evomerge.cli.main import main
from evomerge.errors import EvomergeError
from evomerge.io import shipped
from evomerge.live.materializer import Materializer
from evomerge.search.driver import Runner, open_search, run_search
from evomerge.search.experiment import parse_experiment
from evomerge.search.records import CANDIDATE, PLAN, RESULT, trial_records
from evomerge.search.samplers import make_sampler
from tests.conftest import read_folder

FUNCTIONS = Path(__file__).parents[1] / "data" / "search" / "fitness_fns.py"
REPO = Path(__file__).resolve().parents[2]


def experiment_dict(family, tmp_path, *, space=None, sampler="cmaes", n_trials=6, metrics=None, **extra) -> dict:
    base, *ft = map(str, family)
    return {
        "name": "t", "models": {"base": base, "sources": ft},
        "search_space": space or {"kind": "parameter", "method": "ties", "layer_granularity": 2,
                                  "search": {"weight": [0, 1], "density": [0.2, 1]}},
        "fitness": {"metrics": metrics or {"close": {"type": "callable", "function": f"{FUNCTIONS}:closeness",
                                                      "direction": "maximize"}}},
        "optimizer": {"sampler": sampler, "popsize": 4, "seed": 0},
        "budget": {"n_trials": n_trials, "max_failures_in_a_row": 3},
        "storage": f"sqlite:///{tmp_path}/study.db", **extra,
    }


def write_experiment(tmp_path, data) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def logged(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def test_log(tmp_path, monkeypatch):
    path = tmp_path / "calls.jsonl"
    monkeypatch.setenv("EVOMERGE_TEST_LOG", str(path))
    return path


def test_search_records_every_trial_and_starts_from_known_recipes(llama, tmp_path, test_log):
    search = run_search(parse_experiment(yaml.safe_dump(experiment_dict(llama, tmp_path, n_trials=11))),
                        progress=False)
    trials = search.study.get_trials()
    assert len(trials) == 11 and all(t.state == TrialState.COMPLETE for t in trials)
    recipes = search.space.known_recipes()
    assert [t.params for t in trials[:len(recipes)]] == recipes
    assert all(trial_records(t).warm_start for t in trials[:len(recipes)])
    for trial in trials:
        records = trial_records(trial)
        assert yaml.safe_load(records.plan)["merge_method"] == "ties"
        assert records.metrics["close"] == pytest.approx(trial.value)
        assert records.seed == 0 and records.device == "cpu" and ":" in records.worker
        assert records.time_materialize_s > 0 and records.time_fitness_s >= 0
        assert set(trial.user_attrs) <= {CANDIDATE, PLAN, RESULT, "warm_start"}  # the records, packed
    assert len(logged(test_log)) == 11  # one fitness call per trial
    assert search.study.user_attrs["mergekit_compatible"] is True


def test_rerun_resumes_without_repeating(llama, tmp_path, test_log):
    experiment = parse_experiment(yaml.safe_dump(experiment_dict(llama, tmp_path, n_trials=10)))
    first = {t.number: t.value for t in run_search(experiment, progress=False).study.get_trials()}
    again = run_search(experiment, progress=False)  # budget already spent: nothing runs
    assert {t.number: t.value for t in again.study.get_trials()} == first
    more = run_search(experiment, n_trials=13, progress=False).study.get_trials()
    assert len(more) == 13 and {t.number: t.value for t in more[:10]} == first
    fingerprints = [entry["fingerprint"] for entry in logged(test_log)]
    assert len(fingerprints) == 13 - sum(trial_records(t).same_plan_as is not None for t in more)


def test_a_repeated_plan_reuses_the_stored_result(llama, tmp_path, test_log):
    search = open_search(parse_experiment(yaml.safe_dump(experiment_dict(llama, tmp_path, n_trials=3))))
    params = search.space.known_recipes()[0]
    search.study.enqueue_trial(params)
    search.study.enqueue_trial(params)
    from evomerge.search.driver import Runner

    Runner(search, progress=False).run(2, None)
    first, second = search.study.get_trials()[:2]
    assert trial_records(second).same_plan_as == first.number and second.value == first.value
    assert len(logged(test_log)) == 1


def test_a_trial_writes_its_records_in_three_user_attributes_and_the_loop_reads_the_study_once_a_trial(
        llama, tmp_path, test_log, monkeypatch):
    """The loop's own storage traffic (issue #18; benchmarks/search_storage.py counts it): a
    trial's records are three user-attribute writes (``candidate``, ``plan``, ``result``:
    records.py), its parameters one write each (Optuna's suggest API), and between two trials the
    loop reads the study once (the budget's gate and the plan-hash check reuse that read; besides,
    the warm start looks at the study once and the loop reads it twice before and twice after
    study.optimize)."""
    search = open_search(parse_experiment(yaml.safe_dump(experiment_dict(llama, tmp_path, sampler="random",
                                                                         n_trials=6))))
    runner = Runner(search, progress=False)
    reads, attrs, params = [], [], []
    get_trials = search.study.get_trials
    storage = optuna.storages.RDBStorage
    set_attr, set_param = storage.set_trial_user_attr, storage._set_trial_param  # behind Optuna's cache
    monkeypatch.setattr(search.study, "get_trials", lambda **kw: reads.append(1) or get_trials(**kw))
    monkeypatch.setattr(storage, "set_trial_user_attr",
                        lambda self, trial_id, key, value: attrs.append(key) or set_attr(self, trial_id, key, value))
    monkeypatch.setattr(storage, "_set_trial_param",
                        lambda self, trial_id, *args: params.append(args[0]) or set_param(self, trial_id, *args))
    assert runner.run(6, None) == 6
    assert attrs == [CANDIDATE, PLAN, RESULT] * 6
    assert len(params) == 6 * len(search.space.distributions())
    assert len(reads) <= 6 + 5
    done = search.study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 6 and all(trial_records(t).metrics and trial_records(t).worker for t in done)


def test_failing_and_nan_candidates_fail_only_their_trial(llama, tmp_path, test_log, monkeypatch):
    monkeypatch.setenv("EVOMERGE_TEST_FAIL", "2")
    monkeypatch.setenv("EVOMERGE_TEST_NAN", "4")
    trials = run_search(parse_experiment(yaml.safe_dump(experiment_dict(llama, tmp_path, n_trials=6))),
                        progress=False).study.get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.FAIL) == 2 and states.count(TrialState.COMPLETE) == 4
    assert "planned failure at call 2" in trial_records(trials[1]).failure
    assert "returned NaN" in trial_records(trials[3]).failure
    assert trial_records(trials[3]).time_materialize_s and trial_records(trials[1]).plan  # recorded before failing


def test_a_failed_candidate_is_one_warning_line_without_optunas_traceback(llama, tmp_path, test_log,
                                                                          monkeypatch, caplog):
    monkeypatch.setenv("EVOMERGE_TEST_FAIL", "2")
    optuna.logging.enable_propagation()  # Optuna's records reach caplog too
    try:
        with caplog.at_level(logging.INFO):
            run_search(parse_experiment(yaml.safe_dump(experiment_dict(llama, tmp_path, n_trials=3))),
                       progress=False)
    finally:
        optuna.logging.disable_propagation()
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].getMessage().startswith("trial 1 failed: FitnessError: ")
    assert failed[0].getMessage().endswith("raised RuntimeError: planned failure at call 2")
    assert failed[0].name == "evomerge.search.driver" and failed[0].exc_info is None
    assert not [r for r in caplog.records if r.name.startswith("optuna.study") and r.getMessage().startswith("Trial ")]


def test_many_failures_in_a_row_stop_the_search(llama, tmp_path, test_log, monkeypatch):
    monkeypatch.setenv("EVOMERGE_TEST_FAIL", "1,2,3,4,5,6")
    experiment = parse_experiment(yaml.safe_dump(experiment_dict(llama, tmp_path, n_trials=6)))
    with pytest.raises(EvomergeError, match="3 candidates failed in a row .*planned failure"):
        run_search(experiment, progress=False)
    study = open_search(experiment).study
    started = [t.state for t in study.get_trials() if t.state != TrialState.WAITING]
    assert started == [TrialState.FAIL] * 3  # the rest of the warm start still waits for a resume


def _complete(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        study = optuna.load_study(study_name="t", storage=f"sqlite:///{db}")
    except Exception:  # not created yet
        return 0
    return len(study.get_trials(states=(TrialState.COMPLETE,)))


def _start_search(experiment: Path, tmp_path: Path, n_trials: int, sleep: str) -> subprocess.Popen:
    env = dict(os.environ, EVOMERGE_TEST_LOG=str(tmp_path / "calls.jsonl"), EVOMERGE_TEST_SLEEP=sleep,
               PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli.main", "search", str(experiment), "-q",
                             "--n-trials", str(n_trials)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 180):
    """Poll ``condition`` until it returns something true, and return that; fail with the
    search's output if ``process`` exits first or the condition still fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        exited = process.poll() is not None
        if exited or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            what = f"exited with {process.returncode}" if exited else f"still short after {timeout} s"
            pytest.fail(f"search {what}:\n{out}\n{err}")
        time.sleep(0.2)
    return result


@pytest.mark.slow
def test_resume_after_kill_9_keeps_completed_trials_and_repeats_none(llama, tmp_path):
    experiment = write_experiment(tmp_path, experiment_dict(llama, tmp_path))
    db = tmp_path / "study.db"
    process = _start_search(experiment, tmp_path, 10, sleep="0.5")
    wait_for(lambda: _complete(db) >= 3, process)
    time.sleep(0.2)  # into the next trial's fitness
    process.kill()
    process.wait()
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{db}")
    before = {t.number: t.value for t in study.get_trials(states=(TrialState.COMPLETE,))}
    evaluated_before = len(logged(tmp_path / "calls.jsonl"))

    resumed = _start_search(experiment, tmp_path, 12, sleep="0")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    trials = optuna.load_study(study_name="t", storage=f"sqlite:///{db}").get_trials()
    assert {t.number: t.value for t in trials if t.number in before} == before  # nothing lost
    dead = [t for t in trials if t.state == TrialState.FAIL]
    assert all("died mid-trial" in trial_records(t).failure for t in dead) and len(dead) <= 1
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len(trials) == 12 + len(dead)  # the dead trial was retried and its retry counts instead
    for trial in dead:
        retry = next(t for t in trials if t.system_attrs.get("failed_trial") == trial.number)
        assert retry.state == TrialState.COMPLETE and retry.params == trial.params
    fingerprints = [e["fingerprint"] for e in logged(tmp_path / "calls.jsonl")]
    assert len(fingerprints) - len(set(fingerprints)) <= len(dead)  # only the dead trial's candidate twice
    new = [t for t in trials if t.number not in before and t.state == TrialState.COMPLETE]
    assert len(fingerprints) == evaluated_before + len(new)


@pytest.mark.slow
def test_ctrl_c_stops_after_the_current_trial(llama, tmp_path):
    experiment = write_experiment(tmp_path, experiment_dict(llama, tmp_path, n_trials=50))
    db = tmp_path / "study.db"
    process = _start_search(experiment, tmp_path, 50, sleep="0.5")
    wait_for(lambda: _complete(db) >= 2, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    trials = optuna.load_study(study_name="t", storage=f"sqlite:///{db}").get_trials()
    started = [t.state for t in trials if t.state != TrialState.WAITING]  # waiting: warm start left
    assert set(started) == {TrialState.COMPLETE} and 2 <= len(started) < 50
    assert "study t:" in out


@pytest.mark.parametrize("sampler", ["cma", "tpe", "random"])
def test_other_samplers(llama, tmp_path, test_log, sampler):
    search = run_search(parse_experiment(yaml.safe_dump(
        experiment_dict(llama, tmp_path, sampler=sampler, n_trials=9))), progress=False)
    trials = search.study.get_trials()
    assert len(trials) == 9 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) >= 8


def test_ipop_restarts_a_stopped_cma_with_twice_the_population(llama, tmp_path):
    """A flat fitness meets cma's stopping criterion (tolfun) after every generation: with
    ``restarts: ipop`` the search goes on with populations 4, 8, 16; a new sampler rebuilt from
    the study (a resume) reaches the same evolution; without restarts one evolution runs."""
    flat = tmp_path / "flat.py"
    flat.write_text("def score(model, tokenizer, split='search'):\n    return 1.0\n")
    metrics = {"flat": {"type": "callable", "function": f"{flat}:score", "direction": "maximize"}}
    populations = {}
    for restarts in ("ipop", None):
        data = experiment_dict(llama, tmp_path, sampler="cma", n_trials=14, metrics=metrics,
                               name=f"t-{restarts}")
        data["optimizer"].update(restarts=restarts, warm_start=False)
        search = open_search(parse_experiment(yaml.safe_dump(data)))
        assert Runner(search, progress=False).run(14, None) == 14
        trials = search.study.get_trials()
        assert all(t.state == TrialState.COMPLETE for t in trials)
        assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 14
        replayed = make_sampler(search.experiment.optimizer, search.space, search.fitness.directions)
        replayed.sync(search.study)
        populations[restarts] = [(s.restarts, s.es.popsize) for s in (search.study.sampler, replayed)]
    assert populations == {"ipop": [(2, 16), (2, 16)], None: [(0, 4), (0, 4)]}


def test_restarts_with_optunas_cma_es_are_refused_before_anything_is_written(llama, tmp_path):
    data = experiment_dict(llama, tmp_path)
    data["optimizer"]["restarts"] = "ipop"
    with pytest.raises(EvomergeError, match="optimizer.restarts: restarts: ipop needs sampler cma"):
        open_search(parse_experiment(yaml.safe_dump(data)))
    assert not (tmp_path / "study.db").exists()


def test_multi_objective_search_with_nsga2(llama, tmp_path, test_log):
    metrics = {name: {"type": "callable", "function": f"{FUNCTIONS}:two_objectives", "key": name,
                   "direction": "maximize"}
               for name in ("first", "last")}
    data = experiment_dict(llama, tmp_path, sampler="nsga2", n_trials=6, metrics=metrics)
    data["fitness"]["objective"] = "separate"
    search = run_search(parse_experiment(yaml.safe_dump(data)), progress=False)
    assert len(search.study.directions) == 2 and search.study.best_trials
    with pytest.raises(EvomergeError, match="Pareto front with --trial"):
        pick_trial(search.study)
    with pytest.raises(EvomergeError, match="sampler cmaes optimizes one objective"):
        open_search(parse_experiment(yaml.safe_dump(dict(data, optimizer={"sampler": "cmaes"}, name="u"))))


def test_export_reproduces_the_evaluated_weights_with_evomerge_merge(llama, tmp_path, test_log):
    space = {"kind": "parameter", "method": "dare_ties", "control_points": 2,
             "search": {"weight": [0, 1], "density": [0.3, 1]}}
    search = run_search(parse_experiment(yaml.safe_dump(
        experiment_dict(llama, tmp_path, space=space, n_trials=6, seed=7))), progress=False)
    best = pick_trial(search.study)
    exported = tmp_path / "best.yaml"
    exported.write_text(export_yaml(search.study, best))
    assert "--seed 7" in exported.read_text()
    out = merge(exported, tmp_path / "merged", seed=7)
    materializer = Materializer(search.base, search.sources)
    materializer.apply(search.decode(best.params), seed=7)
    on_disk = read_folder(out)
    live = materializer.state_dict()
    assert all(torch.equal(on_disk[name], live[name]) for name in on_disk)
    fingerprint = logged(test_log)[best.number]["fingerprint"]
    assert math.isclose(fingerprint, sum(t.double().sum().item() for t in live.values()), rel_tol=1e-12)


def test_exported_ties_config_gives_mergekit_the_same_tensors(family_factory, tmp_path, test_log):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    family = family_factory("llama", distinct_deltas=True)
    search = run_search(parse_experiment(yaml.safe_dump(experiment_dict(family, tmp_path, n_trials=5))),
                        progress=False)
    text = export_yaml(search.study, pick_trial(search.study))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    exported = tmp_path / "best.yaml"
    exported.write_text(text)
    ours = read_folder(merge(exported, tmp_path / "ours"))
    theirs = read_folder(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name in ours:  # float32, distinct task-vector magnitudes: see test_mergekit_parity.py
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6)


def test_cli_search_status_export(llama, tmp_path, test_log, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiment = write_experiment(tmp_path, experiment_dict(llama, tmp_path, n_trials=4))
    runner = CliRunner()
    result = runner.invoke(main, ["search", str(experiment), "-q"])
    assert result.exit_code == 0, result.output
    assert "study t: 9 trials (4 complete, 5 waiting)" in result.output  # 9 warm-start recipes
    status = runner.invoke(main, ["status", str(experiment)])
    assert status.exit_code == 0 and "best: trial" in status.output
    exported = runner.invoke(main, ["export", str(experiment), "-o", "best.yaml"])
    assert exported.exit_code == 0, exported.output
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["merge_method"] == "ties"
    missing = runner.invoke(main, ["status", "--study", "nope", "--storage", f"sqlite:///{tmp_path}/study.db"])
    assert missing.exit_code == 2 and "no study named 'nope'" in missing.output
    bad_trial = runner.invoke(main, ["export", str(experiment), "--trial", "99"])
    assert bad_trial.exit_code == 2 and "trial 99 is not a completed trial" in bad_trial.output


@pytest.mark.parametrize("path", sorted(shipped.folder("experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_experiments_are_valid(path):
    from evomerge.search.experiment import load_experiment

    experiment = load_experiment(path)
    assert experiment.models.sources and experiment.name


@pytest.mark.parametrize("text,expected", [
    ("name: x\nmodels: {base: b}\nsearch_space: ps_ties\nfitness: f.yaml\n",
     "<experiment>:2: models.sources: Field required"),
    ("name: x\nmodels: {base: b, sources: [a]}\nsearch_space: ps_ties\nfitness: f.yaml\noptimiser: {}\n",
     "<experiment>:5: optimiser: unknown field"),
    ("name: x\nmodels: {base: b, sources: [a]}\nsearch_space: s\nfitness: f\noptimizer: {sampler: sgd}\n",
     "<experiment>:5: optimizer.sampler: Input should be 'cmaes', 'cma', 'tpe', 'nsga2' or 'random'"),
    ("name: x\nmodels: {base: b, sources: []}\nsearch_space: s\nfitness: f\n",
     "<experiment>:2: models.sources: expected at least one source model"),
    ("name: [x\n", "<experiment>:2: malformed YAML"),
])
def test_bad_experiments_give_one_line_errors(text, expected):
    from evomerge.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        parse_experiment(text)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


def test_bad_storage_url_and_missing_models(llama, tmp_path, test_log):
    data = experiment_dict(llama, tmp_path, storage="not-a-url")
    with pytest.raises(EvomergeError, match="storage: expected an Optuna storage URL"):
        open_search(parse_experiment(yaml.safe_dump(data)))
    data = experiment_dict(llama, tmp_path)
    data["models"]["sources"] = [str(tmp_path / "missing")]
    with pytest.raises(EvomergeError, match="models: model folder not found"):
        open_search(parse_experiment(yaml.safe_dump(data)))


@pytest.mark.parametrize("path", sorted(shipped.folder("fitness").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_fitness_definitions_load(path):
    from evomerge.fitness import load_fitness

    fitness = load_fitness(path)
    assert fitness.directions and all(d == "maximize" for d in fitness.directions)
