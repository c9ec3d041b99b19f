"""Many workers on one study, against a real PostgreSQL server (``postgres_url``, conftest.py):
a shared budget (and why Optuna's ``MaxTrialsCallback`` does not give one), dead workers' trials
failed and retried (kill -9, heartbeats), kill -9 and restart of the only process, and the
database server restarting mid-search."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest
import sqlalchemy.exc
import yaml
from optuna.trial import TrialState

from evomerge.search.distributed.coordination import Budget, OverBudget, fail_dead_trials
from evomerge.search.distributed.storage import RETRY, open_storage
from evomerge.search.driver import Runner, open_search
from evomerge.search.experiment import parse_experiment
from evomerge.search.records import CANDIDATE, trial_records
from tests.search.test_search import REPO, experiment_dict, logged, wait_for, write_experiment

HEARTBEAT = "2"  # seconds; a trial silent for 3 heartbeats counts as dead


def start(experiment: Path, tmp_path: Path, *args: str, sleep: str = "0") -> subprocess.Popen:
    """``evomerge search EXPERIMENT -q`` in a new process, logging fitness calls to calls.jsonl."""
    env = dict(os.environ, EVOMERGE_TEST_LOG=str(tmp_path / "calls.jsonl"), EVOMERGE_TEST_SLEEP=sleep,
               PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli.main", "search", str(experiment), "-q",
                             "--heartbeat", HEARTBEAT, *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def trials(url: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials; an RDB storage's connections are closed at once (tests poll this)."""
    storage = optuna.storages.RDBStorage(url) if url.startswith("postgresql") else url
    try:
        return optuna.load_study(study_name="t", storage=storage).get_trials()
    except KeyError:  # not created yet
        return []
    finally:
        if not isinstance(storage, str):
            storage.engine.dispose()


def complete(url: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials(url) if t.state == TrialState.COMPLETE]


def assert_retried(all_trials, dead) -> None:
    """Each dead trial was failed and its retry completed, with every parameter the dead trial had
    (a trial that died while its parameters were being written has some of them or none: the retry
    keeps those and samples the rest anew)."""
    for trial in dead:
        assert trial.state == TrialState.FAIL
        retry = next(t for t in all_trials if trial.number in t.system_attrs.get("retry_history", []))
        assert retry.state == TrialState.COMPLETE
        assert trial.params.items() <= retry.params.items()


@pytest.mark.parametrize("storage", ["sqlite", "postgres"])
def test_workers_opening_a_new_database_at_once_all_get_it(tmp_path, storage, request):
    url = request.getfixturevalue("postgres_url") if storage == "postgres" else f"sqlite:///{tmp_path}/study.db"
    start_together = threading.Barrier(4)
    errors: list[Exception] = []

    def open_and_create(index: int) -> None:
        start_together.wait()
        try:  # each opening races to create the schema
            optuna.create_study(study_name=f"s{index}", storage=open_storage(url))
        except Exception as error:
            errors.append(error)

    workers = [threading.Thread(target=open_and_create, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors
    assert sorted(optuna.get_all_study_names(url)) == ["s0", "s1", "s2", "s3"]


counted = Budget.counted


def _study(tmp_path: Path, waiting: int = 0) -> optuna.Study:
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/claim.db"))
    for i in range(waiting):
        study.enqueue_trial({"x": i})
    return study


def gated(study: optuna.Study, n_trials: int) -> Budget:
    """A budget of ``n_trials``, its gate installed as the study's sampler (as ``Runner`` does)."""
    budget = Budget(n_trials)
    study.sampler = budget.gate(study.sampler)
    return budget


def test_max_trials_callback_lets_workers_overshoot(tmp_path):
    """Why coordination.Budget exists: with Optuna's callback, each of three workers that asked
    before any finished runs its trial to the end, so a budget of one trial runs three."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/study.db")
    all_started = threading.Barrier(3)

    def objective(trial):
        all_started.wait(timeout=60)
        return trial.suggest_float("x", 0, 1)

    study.optimize(objective, n_jobs=3, callbacks=[optuna.study.MaxTrialsCallback(1, states=None)])
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3


def test_claim_puts_back_a_trial_another_worker_pushed_over_the_budget(tmp_path):
    study = _study(tmp_path)
    study.tell(study.ask(), 1.0)
    budget = gated(study, 2)
    assert budget.open(study.get_trials())  # this worker looks: room for one more
    study.ask()  # another worker asks first
    with pytest.raises(OverBudget):
        study.ask()
    assert not budget.open(study.get_trials())
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING,
                                                     TrialState.WAITING]


def test_claim_puts_back_a_new_trial_when_another_worker_took_the_last_queued_one(tmp_path):
    study = _study(tmp_path, waiting=1)
    study.tell(study.ask(), 1.0)  # trial 0 was the queued one
    study.enqueue_trial({"x": 1})
    budget = gated(study, 2)
    assert budget.open(study.get_trials())  # trial 1 waits within the budget
    study.ask()  # another worker pops trial 1
    with pytest.raises(OverBudget):
        study.ask()  # a new trial, 2: over the budget of 2
    assert not budget.open(study.get_trials())
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING,
                                                     TrialState.WAITING]


def test_claim_runs_a_queued_trial_within_the_budget_and_a_new_one_at_its_edge(tmp_path):
    study = _study(tmp_path, waiting=2)
    budget = gated(study, 3)
    first = study.ask()
    fixed = study.get_trials()[first.number].system_attrs.get("fixed_params")
    assert first.number == 0 and fixed == {"x": 0}  # popped from the queue
    for trial in (first, study.ask()):
        study.tell(trial, 1.0)
    assert budget.open(study.get_trials())
    third = study.ask()
    fixed = study.get_trials()[third.number].system_attrs.get("fixed_params")
    assert third.number == 2 and fixed is None  # a new trial: the queue is empty
    study.tell(third, 1.0)
    assert not budget.open(study.get_trials())


def test_claim_counts_a_retry_enqueued_meanwhile_in_place_of_its_failed_trial(tmp_path):
    study = _study(tmp_path)
    dead = study.ask()
    study.tell(dead, state=TrialState.FAIL)
    budget = gated(study, 2)
    RETRY(study, study.get_trials()[dead.number])  # another worker re-queues the failed trial
    claimed = study.ask()
    assert claimed.number == 1  # the retry, counted in place of trial 0
    assert [t.number for t in counted(study.get_trials())] == [1]
    assert budget.open(study.get_trials())


def test_the_gate_places_a_trial_from_the_last_read_and_reads_the_study_only_when_it_cannot(
        tmp_path, monkeypatch):
    study = _study(tmp_path, waiting=1)
    budget = gated(study, 2)
    reads: list[int] = []
    get_trials = study.get_trials
    monkeypatch.setattr(study, "get_trials", lambda **kw: reads.append(1) or get_trials(**kw))
    for _ in range(2):  # trial 0 popped from the queue, then trial 1 created: both placed from the read
        budget.see(get_trials())
        study.tell(study.ask(), 1.0)
    assert reads == []
    budget.see(get_trials())
    other = optuna.load_study(study_name=study.study_name, storage=study._storage)  # another worker's
    other.ask()  # trial 2, unknown to this worker's read
    with pytest.raises(OverBudget):
        study.ask()  # trial 3: the read cannot place it, the study is read again
    assert reads == [1] and [t.number for t in budget.trials] == [0, 1, 2, 3]


def test_a_retry_created_since_the_last_read_is_put_back_once_then_runs(tmp_path):
    """A retry created after the worker's last read counts in place of its failed trial, which the
    read does not know yet: the gate places it too late, puts it back, and the next read runs it."""
    study = _study(tmp_path)
    study.tell(study.ask(), state=TrialState.FAIL)
    budget = gated(study, 1)
    budget.see(study.get_trials())
    RETRY(study, study.get_trials()[0])  # before this worker's next ask (optimize's stale check)
    with pytest.raises(OverBudget):
        study.ask()
    assert budget.open(budget.see(study.get_trials()))
    assert study.ask().number == 1


def test_a_failed_heartbeat_write_is_logged_and_the_next_one_still_made(tmp_path, monkeypatch, caplog):
    """Optuna's heartbeat thread ends at the first failed write (the database restarting):
    open_storage's storage logs it, and the next interval writes again."""
    writes: list[int] = []
    record = optuna.storages.RDBStorage.record_heartbeat

    def first_write_fails(self, trial_id: int) -> None:
        writes.append(trial_id)
        if len(writes) == 1:
            raise sqlalchemy.exc.OperationalError("UPDATE trial_heartbeats", {}, Exception("server closed"))
        record(self, trial_id)

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", first_write_fails)
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/study.db", heartbeat=1))
    study.optimize(lambda trial: time.sleep(2.5) or 1.0, n_trials=1)
    assert len(writes) >= 3 and "not recorded: server closed" in caplog.text


@pytest.mark.filterwarnings("ignore:Heartbeat of storage", "ignore::optuna.exceptions.ExperimentalWarning")
def test_a_trial_without_heartbeat_or_worker_is_failed_after_the_grace_period(tmp_path):
    """A worker killed between asking a trial and its first heartbeat leaves a running trial
    that Optuna's heartbeat check never fails (it skips trials without a heartbeat)."""
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/study.db", heartbeat=1))
    orphan = study.ask()
    time.sleep(3.5)  # the grace period: 3 heartbeats
    optuna.storages.fail_stale_trials(study)
    assert study.get_trials()[orphan.number].state == TrialState.RUNNING
    trials = fail_dead_trials(study, heartbeat=1)
    assert trial_records(trials[orphan.number]).failure == "its worker died before recording itself"
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].system_attrs["retry_history"] == [orphan.number]


@pytest.fixture
def experiment_dict_for(llama):
    def make(tmp_path: Path, url: str, n_trials: int) -> dict:
        return experiment_dict(llama, tmp_path, n_trials=n_trials, storage=url)
    return make


@pytest.mark.slow
def test_three_workers_run_exactly_the_budget(experiment_dict_for, tmp_path, postgres_url):
    experiment = write_experiment(tmp_path, experiment_dict_for(tmp_path, postgres_url, 30))
    process = start(experiment, tmp_path, "--workers", "3", sleep="0.1")
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    study = trials(postgres_url)
    numbers = [t.number for t in study]
    assert len(numbers) == len(set(numbers))
    assert sum(t.state == TrialState.COMPLETE for t in study) == 30
    assert {t.state for t in study} <= {TrialState.COMPLETE, TrialState.WAITING}  # none lost or left running
    assert all(t.number > 29 for t in study if t.state == TrialState.WAITING)  # only a put-back over the budget
    assert len({trial_records(t).worker for t in study if t.state == TrialState.COMPLETE}) >= 2
    reused = sum(trial_records(t).same_plan_as is not None for t in study)
    assert len(logged(tmp_path / "calls.jsonl")) == 30 - reused  # each candidate scored once
    generations = {t.system_attrs.get("cma:generation") for t in study} - {None}
    assert max(generations) >= 3  # CMA-ES generations complete with concurrent workers (popsize 4)


@pytest.mark.slow
def test_kill_9_one_worker_mid_trial_fails_and_retries_its_trial(experiment_dict_for, tmp_path, postgres_url):
    experiment = write_experiment(tmp_path, experiment_dict_for(tmp_path, postgres_url, 12))
    process = start(experiment, tmp_path, "--workers", "3", sleep="2")

    def running_child():  # a child's trial with over a second of scoring left when it is killed
        children = {c.pid for c in psutil.Process(process.pid).children()}
        if len(complete(postgres_url)) < 2:
            return None
        now = datetime.datetime.now()
        return next((t for t in trials(postgres_url) if t.state == TrialState.RUNNING
                     and (now - t.datetime_start).total_seconds() < 1
                     and int(str(trial_records(t).worker or ":0").rpartition(":")[2]) in children), None)

    worker = trial_records(wait_for(running_child, process)).worker
    os.kill(int(worker.rpartition(":")[2]), signal.SIGKILL)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err  # the other two finished the budget
    assert "exited with code -9" in err
    study = trials(postgres_url)
    dead = [t for t in study if t.state == TrialState.FAIL]
    assert len(dead) == 1 and trial_records(dead[0]).worker == worker
    assert "died mid-trial" in trial_records(dead[0]).failure and trial_records(dead[0]).plan
    assert_retried(study, dead)
    assert sum(t.state == TrialState.COMPLETE for t in counted(study)) == 12
    assert not [t for t in study if t.state == TrialState.RUNNING]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_silent_worker_on_another_host_is_found_by_its_heartbeat(llama, tmp_path, postgres_url):
    search = open_search(parse_experiment(yaml.safe_dump(experiment_dict(llama, tmp_path, n_trials=3,
                                                                         storage=postgres_url))), heartbeat=1)
    orphan = search.study.ask(search.space.distributions())
    orphan.set_user_attr(CANDIDATE, {"worker": "another-host:1"})  # no process this worker could look up
    search.study._storage.record_heartbeat(orphan._trial_id)  # ... then silence
    started = time.monotonic()
    Runner(search, progress=False).run(3, None)
    assert time.monotonic() - started >= 3  # the grace period: 3 heartbeats
    study = search.study.get_trials()
    assert_retried(study, [t for t in study if t.number == orphan.number])
    assert [t.state for t in counted(study)] == [TrialState.COMPLETE] * 3


def test_a_journal_study_runs_without_heartbeats(llama, tmp_path):
    """Optuna's journal storage has no public heartbeat: a silent worker on another host is not
    found, and the search ends without waiting for it (its trial is left running)."""
    search = open_search(parse_experiment(yaml.safe_dump(experiment_dict(
        llama, tmp_path, n_trials=3, storage=f"journal:{tmp_path}/study.log"))), heartbeat=1)
    assert search.heartbeat is None
    orphan = search.study.ask(search.space.distributions())
    orphan.set_user_attr(CANDIDATE, {"worker": "another-host:1"})
    assert Runner(search, progress=False).run(3, None) == 2
    assert [t.state for t in search.study.get_trials()] == [TrialState.RUNNING] + [TrialState.COMPLETE] * 2


@pytest.mark.slow
def test_kill_9_the_only_process_then_restart_loses_and_repeats_nothing(experiment_dict_for, tmp_path, postgres_url):
    experiment = write_experiment(tmp_path, experiment_dict_for(tmp_path, postgres_url, 10))
    process = start(experiment, tmp_path, sleep="0.5")
    wait_for(lambda: len(complete(postgres_url)) >= 3, process)
    time.sleep(0.2)  # into the next trial
    process.kill()
    process.wait()
    before = {t.number: t.value for t in complete(postgres_url)}
    resumed = start(experiment, tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    study = trials(postgres_url)
    assert {t.number: t.value for t in study if t.number in before} == before  # nothing lost
    dead = [t for t in study if t.state == TrialState.FAIL]
    assert len(dead) <= 1 and all("died mid-trial" in trial_records(t).failure for t in dead)
    assert_retried(study, dead)
    assert [t.state for t in counted(study)] == [TrialState.COMPLETE] * 10
    scored = [e["fingerprint"] for e in logged(tmp_path / "calls.jsonl")]
    assert len(scored) - len(set(scored)) <= len(dead)  # no completed candidate scored again


@pytest.mark.slow
def test_database_restart_stops_workers_with_one_line_and_a_rerun_resumes(experiment_dict_for, tmp_path,
                                                                         postgres_server, postgres_url):
    """Workers that touch the storage while the server is down stop with one clear line (exit 2);
    running the same command again resumes: nothing completed is lost, interrupted trials are retried."""
    experiment = write_experiment(tmp_path, experiment_dict_for(tmp_path, postgres_url, 16))
    process = start(experiment, tmp_path, "--workers", "2", sleep="0.3")
    wait_for(lambda: len(complete(postgres_url)) >= 4, process)
    postgres_server.stop()
    try:
        out, err = process.communicate(timeout=120)
    finally:
        postgres_server.start()
    assert process.returncode == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert "lost the study's storage postgresql://postgres@127.0.0.1" in errors[0]
    assert "run the same command again to resume" in errors[0]
    before = {t.number: t.value for t in complete(postgres_url)}

    resumed = start(experiment, tmp_path, "--workers", "2")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    study = trials(postgres_url)
    assert {t.number: t.value for t in study if t.number in before} == before
    assert_retried(study, [t for t in study if t.state == TrialState.FAIL])
    assert [t.state for t in counted(study)][:16] == [TrialState.COMPLETE] * 16
    assert not [t for t in study if t.state == TrialState.RUNNING]
