"""How workers on one study share its budget and recover each other's trials, through the storage only.

**Budget.** Trials are counted in creation order (trial numbers, which the storage hands out
atomically), leaving out failed trials that were retried (their retry stands in for them).
A worker runs a trial only if fewer than ``budget`` counted trials come before it. When two
workers ask at the same moment and the later trial falls outside the budget, its worker puts
it back as WAITING (it runs first if the study is resumed with a larger budget) instead of
running it, so N workers stop at exactly ``budget`` trials. Enqueued trials (warm start,
retries) are counted from their creation, so a warm start larger than the budget leaves
its last recipes waiting.

**Dead workers.** Before claiming a trial, a worker fails the running trials of dead
workers and re-queues them once (``storage.RETRY``): trials whose heartbeat went stale
(any host), trials of processes on its own host that no longer exist (at once, without
waiting for the grace period), and trials older than the grace period that never recorded
a worker (a worker records its first heartbeat, then itself, so every started trial has
one of the two). A worker with nothing left to claim waits while other
trials are still running, since one of them may come back as a retry.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import optuna
import psutil
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from evomerge.search.distributed.storage import GRACE, RETRY

log = logging.getLogger(__name__)
POLL = 1.0  # seconds between looks at the study while other workers run the last trials


def worker_id() -> str:
    """``host:pid`` of this process, recorded on each trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count towards the budget, in creation order."""
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    return sorted((t for t in trials if t.number not in retried), key=lambda t: t.number)


def fail_dead_workers(study: optuna.Study, trials: list[FrozenTrial]) -> int:
    """Fail (and re-queue once) the running trials of dead workers among ``trials`` (the study's,
    just read); return how many were failed here."""
    storage, count = study._storage, 0
    for trial, reason in _dead_trials(study, trials):
        try:
            storage.set_trial_user_attr(trial._trial_id, "failure", reason)
            if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another worker got there first
            continue
        RETRY(study, storage.get_trial(trial._trial_id))
        count += 1
    if is_heartbeat_enabled(storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    return count


def _dead_trials(study: optuna.Study, trials: list[FrozenTrial]) -> list[tuple[FrozenTrial, str]]:
    """Running trials of processes on this host that are gone, and (with heartbeats) trials whose
    worker died between asking and recording itself (no worker, no heartbeat, older than the grace)."""
    host, now, dead = socket.gethostname(), datetime.datetime.now(), []
    storage = study._storage
    grace = GRACE * storage.get_heartbeat_interval() if is_heartbeat_enabled(storage) else None
    for trial in (t for t in trials if t.state == TrialState.RUNNING):
        worker = trial.user_attrs.get("worker")
        if worker is None:
            started = trial.datetime_start
            if grace is not None and started is not None and (now - started).total_seconds() > grace:
                dead.append((trial, "its worker died before recording itself"))
            continue
        worker_host, _, pid = str(worker).rpartition(":")
        if worker_host == host and pid.isdigit() and not _alive(int(pid)):
            dead.append((trial, f"worker {pid} died mid-trial"))
    return dead


def _alive(pid: int) -> bool:
    """Whether process ``pid`` (not this one) runs; a killed worker not yet reaped (zombie) does not."""
    try:
        return pid != os.getpid() and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


class Claim(NamedTuple):
    trial: optuna.Trial
    trials: list[FrozenTrial]  # the study's trials, read just before ``trial`` was asked


def claim(study: optuna.Study, ask: Callable[[], optuna.Trial], budget: int | None,
          stop: Callable[[], bool]) -> Claim | None:
    """The next trial this worker may run within ``budget`` (module docstring), with the study's
    trials read just before asking it, or None when the budget is spent (or ``stop()``).
    ``ask`` creates or pops a trial (``study.ask``)."""
    waits = is_heartbeat_enabled(study._storage)  # else a dead worker's trial is never failed: do not wait
    while not stop():
        everything = study.get_trials(deepcopy=False)
        dead = fail_dead_workers(study, everything)
        if dead:
            log.warning("failed and re-queued %d trial(s) of dead workers", dead)
            everything = study.get_trials(deepcopy=False)
        if budget is None:
            return Claim(ask(), everything)
        trials = counted(everything)
        if len(trials) < budget or any(t.state == TrialState.WAITING for t in trials[:budget]):
            trial = ask()
            if _position(trial.number, everything, trials, study) < budget:
                return Claim(trial, everything)
            log.debug("trial %d is over the budget (another worker asked first): back to waiting", trial.number)
            trial.storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)  # after its queued writes
            continue
        if not waits or not any(t.state == TrialState.RUNNING for t in trials):
            return None
        _sleep(POLL, stop)
    return None


def _position(number: int, everything: list[FrozenTrial], trials: list[FrozenTrial],
              study: optuna.Study) -> int:
    """Trial ``number``'s index among the counted trials, just after it was asked; ``everything``
    and ``trials`` (its counted part) were read before asking. A trial popped from the queue was
    among them, and since then only new trials can have appeared, which come after it or retire
    a failed trial before it: its index can only have dropped. A new trial numbered right after
    ``everything`` had no other trial created before it. Otherwise the study is read again."""
    if number < len(everything):
        index = next((i for i, t in enumerate(trials) if t.number == number), None)
        if index is not None:
            return index
    elif number == len(everything):
        return len(trials)
    return [t.number for t in counted(study.get_trials(deepcopy=False))].index(number)


def _sleep(seconds: float, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not stop() and time.monotonic() < deadline:
        time.sleep(min(0.2, seconds))


def finished(study: optuna.Study) -> int:
    """How many counted trials have finished (complete, pruned or failed without retry)."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(t.state in states for t in counted(study.get_trials(deepcopy=False)))
