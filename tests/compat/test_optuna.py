"""evomerge.compat.optuna: the private Optuna names it uses still exist and behave (on SQLite
behind Optuna's cache, as a search runs, and in memory)."""

from __future__ import annotations

import optuna
import pytest
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from evomerge.compat.optuna import cmaes_generation, requeue, set_user_attr


@pytest.fixture(params=["sqlite", "memory"])
def study(request, tmp_path) -> optuna.Study:
    storage = f"sqlite:///{tmp_path}/study.db" if request.param == "sqlite" else None
    return optuna.create_study(storage=storage)


def test_set_user_attr_writes_a_running_trial_and_refuses_a_finished_one(study):
    study.ask()
    [running] = study.get_trials()
    set_user_attr(study, running, "failure", "worker 1 died mid-trial")
    assert study.get_trials()[0].user_attrs == {"failure": "worker 1 died mid-trial"}
    study.tell(running.number, state=TrialState.FAIL)
    with pytest.raises(UpdateFinishedTrialError):
        set_user_attr(study, running, "failure", "again")


def test_requeue_puts_a_running_trial_back_and_ask_pops_it_again(study):
    study.enqueue_trial({"x": 0.5})
    first = study.ask()
    assert requeue(study, study.get_trials()[0]) is True
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING]
    again = study.ask()
    assert again.number == first.number and again.suggest_float("x", 0, 1) == 0.5


def test_cmaes_generation_is_the_generation_cmaes_sampled_a_trial_for(study):
    study.sampler = optuna.samplers.CmaEsSampler(seed=0, popsize=3)
    study.enqueue_trial({"x": 0.5, "y": 0.5})
    for _ in range(8):
        trial = study.ask()
        study.tell(trial, (trial.suggest_float("x", 0, 1) - 0.3) ** 2 + trial.suggest_float("y", 0, 1))
    generations = [cmaes_generation(t) for t in study.get_trials()]
    assert generations == [None, 0, 0, 0, 1, 1, 1, 2]
