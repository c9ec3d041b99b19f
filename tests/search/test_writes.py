"""DeferredWrites: a trial's parameters and user attributes reach the storage in one
transaction at flush (RDB), or call by call (journal), and never before."""

from __future__ import annotations

import optuna
import pytest
from sqlalchemy import event

from evomerge.search.distributed.storage import open_storage
from evomerge.search.writes import DeferredWrites, deferring

SPACE = {"x": optuna.distributions.FloatDistribution(0, 1),
         "n": optuna.distributions.IntDistribution(1, 4),
         "c": optuna.distributions.CategoricalDistribution(["a", "b"])}


def commits(storage) -> list[int]:
    """A list that grows by one at every commit of the RDB storage behind Optuna's cache."""
    counted: list[int] = []
    event.listen(storage._backend.engine, "commit", lambda connection: counted.append(1))
    return counted


def deferred_trial(study: optuna.Study) -> tuple[optuna.Trial, DeferredWrites]:
    writes = DeferredWrites(study._storage)
    with deferring(study, writes):
        trial = study.ask(SPACE)
    trial.set_user_attr("plan", "merge_method: ties\n")
    trial.set_user_attr("metrics", {"skill": 0.5})
    return trial, writes


@pytest.mark.parametrize("url", ["sqlite:///{}/study.db", "journal:{}/study.log"])
def test_writes_wait_for_flush_and_then_all_arrive(tmp_path, url):
    url = url.format(tmp_path)
    study = optuna.create_study(storage=open_storage(url), study_name="s")
    study.enqueue_trial({"x": 0.25, "n": 3, "c": "b"})
    for enqueued in (True, False):
        trial, writes = deferred_trial(study)
        reader = optuna.load_study(study_name="s", storage=open_storage(url))
        seen = reader.trials[trial.number]
        assert seen.params == {} and seen.user_attrs == {}
        writes.flush()
        seen = optuna.load_study(study_name="s", storage=open_storage(url)).trials[trial.number]
        assert seen.params == trial.params and set(seen.params) == set(SPACE)
        assert seen.user_attrs == {"plan": "merge_method: ties\n", "metrics": {"skill": 0.5}}
        if enqueued:
            assert seen.params == {"x": 0.25, "n": 3, "c": "b"}
        study.tell(trial, 1.0)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2


def test_one_commit_per_flush_on_rdb(tmp_path):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/study.db"), study_name="s")
    counted = commits(study._storage)
    for _ in range(2):  # the first trial takes Optuna's path for parameters new to the study
        trial, writes = deferred_trial(study)
        counted.clear()
        writes.flush()
        assert len(counted) == 1, "parameters and user attributes of one trial: one transaction"
        study.tell(trial, 1.0)


def test_any_other_call_through_the_proxy_flushes_first(tmp_path):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/study.db"), study_name="s")
    trial, _ = deferred_trial(study)
    trial.report(0.5, step=1)  # Trial.report goes through the proxy: the queue is written first
    stored = study._storage.get_trial(trial._trial_id)
    assert set(stored.params) == set(SPACE) and stored.intermediate_values == {1: 0.5}


def test_incompatible_distribution_is_refused_at_flush(tmp_path):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/study.db"), study_name="s")
    trial, writes = deferred_trial(study)
    writes.flush()
    study.tell(trial, 1.0)
    writes = DeferredWrites(study._storage)
    with deferring(study, writes):
        study.ask({"x": optuna.distributions.IntDistribution(0, 5)})
    with pytest.raises(ValueError, match="different distribution kind"):
        writes.flush()


def test_a_flush_updates_attributes_already_stored_and_the_last_value_wins(tmp_path):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/study.db"), study_name="s")
    study.enqueue_trial({"x": 0.5, "n": 1, "c": "a"}, user_attrs={"warm_start": True})
    trial, writes = deferred_trial(study)
    writes.flush()
    trial.set_user_attr("warm_start", False)  # stored by enqueue_trial: updated, not duplicated
    trial.set_user_attr("plan", "merge_method: linear\n")  # stored by the first flush
    trial.set_user_attr("failure", "first")
    trial.set_user_attr("failure", "second")  # twice in one queue
    writes.flush()
    stored = optuna.load_study(study_name="s", storage=open_storage(f"sqlite:///{tmp_path}/study.db")).trials[0]
    assert stored.user_attrs == {"warm_start": False, "plan": "merge_method: linear\n",
                                 "metrics": {"skill": 0.5}, "failure": "second"}


def test_statements_per_flush_do_not_grow_with_the_records(tmp_path):
    """Parameters and user attributes are written in bulk: a flush's statement count does not
    depend on how many of them are queued."""
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/study.db"), study_name="s")
    statements: list[str] = []
    event.listen(study._storage._backend.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *args: statements.append(statement))
    counts = []
    for extra in (0, 0, 12):  # the first trial takes Optuna's path for parameters new to the study
        trial, writes = deferred_trial(study)
        for i in range(extra):
            trial.set_user_attr(f"extra{i}", i)
        statements.clear()
        writes.flush()
        counts.append(len(statements))
        study.tell(trial, 1.0)
    assert counts[1] == counts[2] <= 6, counts
