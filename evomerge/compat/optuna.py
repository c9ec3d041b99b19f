"""Optuna's private names that evomerge needs: checked with ``optuna>=4.9,<6`` (tested on 5.1.0).

:func:`cmaes_generation` reads the generation Optuna's ``CmaEsSampler`` recorded on a trial, a
system attribute whose key is the sampler's own (``cma:generation``): the tests check with it
that a generation of CMA-ES takes the trials racing stopped. The two other functions act on a
trial of the study that this process holds no :class:`optuna.Trial` for (another worker's, or
one that ``study.ask`` just handed to the sampler): Optuna's public API writes a trial only
through the ``Trial`` that ``ask`` returned, and finishes it only through ``Study.tell``. They
write through the study's storage (``Study._storage``) by the trial's storage id
(``FrozenTrial._trial_id``). :class:`CmaEsSampler` overrides ``CmaEsSampler._get_trials``
(below). ``tests/compat/test_optuna.py`` fails when any of these names moves.
"""

from __future__ import annotations

import copy
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState


def set_user_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Record ``key: value`` on ``trial`` (a running trial of ``study``).

    Used to record why another worker's trial was failed (its worker died): ``Study.tell``
    can fail a trial by number but records nothing with it. Raises
    ``optuna.exceptions.UpdateFinishedTrialError`` when the trial has finished meanwhile."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def requeue(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Put the running ``trial`` back in ``study``'s queue (WAITING; ``ask`` pops it again later).

    Used for a trial just asked that falls outside a budget shared by several workers:
    ``Study.tell`` only finishes trials, and a finished one would count. Returns the storage's
    answer (False when the trial was not running)."""
    return study._storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)


def cmaes_generation(trial: FrozenTrial) -> int | None:
    """The CMA-ES generation ``CmaEsSampler`` (plain CMA, Optuna's default) sampled ``trial`` for;
    None for a trial it did not sample (an enqueued one, or another sampler's)."""
    return trial.system_attrs.get("cma:generation")


class CmaEsSampler(optuna.samplers.CmaEsSampler):
    """Optuna's ``CmaEsSampler``, which with ``consider_pruned_trials`` reads each pruned trial
    as completed with its last intermediate value: Optuna deep-copies every pruned trial, with
    its distributions and user attributes, on every ask (``_get_trials``), a cost that grows with
    the study (0.4 s an ask at 400 trials, most of them raced out). Here the copy is shallow:
    only the value is replaced, a new list on the copy (``FrozenTrial.value``'s setter), so the
    study's trial is untouched. The trials and values returned are Optuna's
    (``tests/compat/test_optuna.py``)."""

    def _get_trials(self, study: optuna.Study) -> list[FrozenTrial]:
        trials = []
        for trial in study._get_trials(deepcopy=False, use_cache=True):
            if trial.state == TrialState.COMPLETE:
                trials.append(trial)
            elif trial.state == TrialState.PRUNED and trial.intermediate_values and self._consider_pruned_trials:
                _, value = max(trial.intermediate_values.items())
                if value is not None:
                    estimate = copy.copy(trial)
                    estimate.value = value
                    trials.append(estimate)
        return trials
