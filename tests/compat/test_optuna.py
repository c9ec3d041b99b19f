"""evomerge.compat.optuna: the private Optuna names it uses still exist and behave (on SQLite
behind Optuna's cache, as a search runs, and in memory)."""

from __future__ import annotations

import optuna
import pytest
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from evomerge.compat.optuna import CmaEsSampler, cmaes_generation, requeue, set_user_attr


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


def test_cmaes_sampler_reads_the_trials_optunas_does_and_samples_the_same(study):
    """The shallow-copy override of ``CmaEsSampler._get_trials``: the same trials and values as
    Optuna's own (pruned trials read at their last intermediate value), the study's pruned trials
    left as they were, and the same search when both sample."""
    def run(sampler, tag: str) -> list[dict]:
        target = optuna.create_study(study_name=f"{study.study_name}-{tag}", storage=study._storage, sampler=sampler)
        for i in range(14):
            trial = target.ask()
            x, y = trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)
            if i % 3 == 2:  # pruned with an estimate; one without an intermediate value
                if i != 5:
                    trial.report(x + y, step=4)
                target.tell(trial, state=TrialState.PRUNED)
            else:
                target.tell(trial, x + 2 * y)
        return target

    def options():
        return {"seed": 1, "popsize": 4, "consider_pruned_trials": True}

    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        ours, theirs = run(CmaEsSampler(**options()), "ours"), run(optuna.samplers.CmaEsSampler(**options()), "theirs")
    assert [t.params for t in ours.trials] == [t.params for t in theirs.trials]
    before = [(t.number, t.state, t.values) for t in ours.get_trials(deepcopy=False)]
    read = CmaEsSampler(**options())._get_trials(ours)
    reference = optuna.samplers.CmaEsSampler(**options())._get_trials(ours)
    assert [(t.number, t.value) for t in read] == [(t.number, t.value) for t in reference] and len(read) == 13
    assert [(t.number, t.state, t.values) for t in ours.get_trials(deepcopy=False)] == before
