"""How workers on one study share its budget and recover each other's trials, through the storage only.

Optuna does most of it: ``study.optimize`` records each running trial's heartbeat, and before
asking a trial fails the running trials whose heartbeat went stale and re-queues them once
(``optuna.storages.fail_stale_trials`` with the storage's ``RETRY``, ``storage.py``). Two
requirements it does not meet are kept here, each with the test that shows it:

* :class:`Budget`: exactly ``n_trials`` trials across all workers. Optuna's ``MaxTrialsCallback``
  stops a worker after a trial once enough trials have finished, so workers that started
  trials meanwhile run past the budget (``test_max_trials_callback_lets_workers_overshoot``).
* :func:`fail_dead_trials`: a trial whose worker process on this host is gone is failed at
  once, with the reason recorded, where the heartbeat waits for its grace period and records
  none (``test_resume_after_kill_9_...``, ``test_kill_9_one_worker_...``); and a trial that
  recorded neither a heartbeat nor a worker (its worker died while asking, suggesting or
  decoding it, before it wrote its ``candidate`` records: ``driver.Runner._objective``) is failed
  after the grace period, which Optuna's heartbeat check never does
  (``test_a_trial_without_heartbeat_or_worker_is_failed_after_the_grace_period``).
"""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from collections.abc import Sequence
from typing import Any

import optuna
import psutil
from optuna.distributions import BaseDistribution
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from evomerge.compat.optuna import requeue, set_user_attr
from evomerge.search.distributed.storage import GRACE, RETRY
from evomerge.search.records import RESULT, trial_records, with_failure


def worker_id() -> str:
    """``host:pid`` of this process, recorded on each trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


class OverBudget(Exception):
    """The trial just asked falls outside the budget (another worker asked first); it was put back."""


class Budget:
    """Exactly ``n_trials`` trials of a study across all its workers (None: no limit).

    Trials count in creation order (trial numbers, which the storage hands out atomically),
    leaving out failed trials that were retried (their retry stands in for them). A trial may
    run only if fewer than ``n_trials`` counted trials come before it: the sampler of
    :meth:`gate` checks each trial right after it is asked and puts one outside the budget
    back as WAITING (it runs first if the study is resumed with a larger budget), so workers
    that ask at the same moment stop at exactly ``n_trials``. Enqueued trials (warm start,
    retries) count from their creation, so a warm start larger than the budget leaves its
    last recipes waiting.

    :attr:`trials` is the study as this worker last read it (:meth:`see`); the gate places a
    trial from it where it can (:meth:`position`), so a worker that reads the study once
    between two trials does not read it again to ask the next."""

    def __init__(self, n_trials: int | None):
        self.n_trials = n_trials
        self.trials: list[FrozenTrial] | None = None  # the study's trials as last read (see)

    def see(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        """Keep ``trials``, the study's trials just read by this worker, as :attr:`trials`; return them."""
        self.trials = trials
        return trials

    def position(self, number: int, study: optuna.Study) -> int:
        """The index among the counted trials of trial ``number`` of ``study``, just asked
        (created or popped from the queue), from :attr:`trials` where it tells, else from the
        study read again (kept as :attr:`trials`). Since the last read, only new trials can have
        appeared: they come after trial ``number`` or retire a failed trial before it (a retry).
        So a popped trial that was in the last read, or a new trial numbered right after it,
        has at most the index the last read gives it: the index returned is never too low
        (a too high one puts a trial back that a fresh read would place within the budget)."""
        trials = self.trials
        if trials is not None and number < len(trials):
            index = next((i for i, t in enumerate(self.counted(trials)) if t.number == number), None)
            if index is not None:
                return index
        elif trials is not None and number == len(trials):
            return len(self.counted(trials))
        return [t.number for t in self.counted(self.see(study.get_trials(deepcopy=False)))].index(number)

    @staticmethod
    def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        """The trials that count towards a budget, in creation order."""
        retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
        return sorted((t for t in trials if t.number not in retried), key=lambda t: t.number)

    def open(self, trials: Sequence[FrozenTrial]) -> bool:
        """Whether a worker may ask a trial (``trials``: the study's): the budget has room for
        a new one, or a trial within it waits in the queue."""
        if self.n_trials is None:
            return True
        counted = self.counted(trials)
        return len(counted) < self.n_trials or any(t.state == TrialState.WAITING for t in counted[:self.n_trials])

    def running(self, trials: Sequence[FrozenTrial]) -> bool:
        """Whether a trial within the budget still runs (it may come back as a retry)."""
        return any(t.state == TrialState.RUNNING for t in self.counted(trials)[:self.n_trials])

    def finished(self, trials: Sequence[FrozenTrial]) -> int:
        """How many counted trials have finished (complete, pruned or failed without retry)."""
        return sum(t.state.is_finished() for t in self.counted(trials))

    def gate(self, sampler: optuna.samplers.BaseSampler) -> optuna.samplers.BaseSampler:
        """``sampler``, refusing trials outside the budget: its ``before_trial`` (which
        ``study.ask`` calls) puts such a trial back as WAITING and raises :class:`OverBudget`."""
        return _Gate(sampler, self)


class _Gate(optuna.samplers.BaseSampler):
    """A sampler that checks each trial against a :class:`Budget`, then defers to ``sampler``."""

    def __init__(self, sampler: optuna.samplers.BaseSampler, budget: Budget):
        self.sampler, self.budget = sampler, budget

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.budget.n_trials is not None:
            if self.budget.position(trial.number, study) >= self.budget.n_trials:
                requeue(study, trial)
                raise OverBudget(f"trial {trial.number} is over the budget of {self.budget.n_trials}: back to waiting")
        self.sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


def fail_dead_trials(study: optuna.Study, heartbeat: int | None, *, stale: bool = True) -> list[FrozenTrial]:
    """Fail and re-queue once (``RETRY``) the running trials of dead workers, and return the
    study's trials read afterwards. Dead: a process of this host that no longer exists (at
    once); with heartbeats every ``heartbeat`` seconds, a trial older than the grace period
    that recorded no worker, and, with ``stale``, one whose heartbeat went stale (Optuna's
    ``fail_stale_trials``, after the others: they record why; ``study.optimize`` also runs it
    before each trial it asks, so the check between two of its trials leaves it out)."""
    trials = study.get_trials(deepcopy=False)
    failed_any = False
    for trial in (t for t in trials if t.state == TrialState.RUNNING):
        if (reason := _dead(trial, heartbeat)) is None:
            continue
        try:
            set_user_attr(study, trial, RESULT, with_failure(trial, reason))
            failed = study.tell(trial.number, state=TrialState.FAIL)
        except (UpdateFinishedTrialError, ValueError):  # another worker got there first
            continue
        RETRY(study, failed)
        failed_any = True
    if stale:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    return study.get_trials(deepcopy=False) if failed_any or stale else trials


def _dead(trial: FrozenTrial, heartbeat: int | None) -> str | None:
    """Why the running ``trial``'s worker is known to be dead, or None."""
    worker = trial_records(trial).worker
    if worker is None:
        age = (datetime.datetime.now() - trial.datetime_start).total_seconds() if trial.datetime_start else 0
        return "its worker died before recording itself" if heartbeat and age > GRACE * heartbeat else None
    host, _, pid = str(worker).rpartition(":")
    return f"worker {pid} died mid-trial" if host == socket.gethostname() and pid.isdigit() \
        and not _alive(int(pid)) else None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` (not this one) runs; a killed worker not yet reaped (zombie) does not."""
    try:
        return pid != os.getpid() and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
