"""Optuna storage from a URL: SQLite (default), PostgreSQL or any RDB URL, or a journal file.

Workers share a study through its storage and nothing else. With ``heartbeat`` set, each
running trial records a heartbeat every ``heartbeat`` seconds (:func:`heartbeat_thread`); a
running trial whose last heartbeat is older than ``GRACE`` intervals belongs to a dead worker,
and ``optuna.storages.fail_stale_trials`` fails it and re-queues it once (:class:`RetryDeadTrial`,
Optuna's ``RetryHeartbeatStaleTrialCallback``). RDB storages keep heartbeats in Optuna's heartbeat
table (database clock); the journal storage keeps them as a trial system attribute (each
host's clock: keep them NTP-synchronized). ``pool_pre_ping`` (on by default in Optuna) replaces
pooled connections that a database restart closed.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import ConfigError, StorageError

log = logging.getLogger(__name__)
JOURNAL_PREFIX = "journal:"
GRACE = 3  # missed heartbeats after which a running trial's worker counts as dead
MAX_RETRY = 1  # a dead worker's trial runs again once (a candidate that kills its worker fails twice)
HEARTBEAT_ATTR = "evomerge:heartbeat"
STORAGE_ERRORS = (sqlalchemy.exc.DBAPIError, optuna.exceptions.StorageInternalError)  # the database went away
CREATE_ATTEMPTS = 5  # openings of a new database that lose the race to create its tables are retried


class RetryDeadTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry callback, without the dead run's records (worker, plan, timings, heartbeat)."""

    KEPT = ("warm_start",)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in self.KEPT}
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if k != HEARTBEAT_ATTR}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            super().__call__(study, trial)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", ExperimentalWarning)
    RETRY = RetryDeadTrial(max_retry=MAX_RETRY)


class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with heartbeats kept as a trial system attribute (wall clock)."""

    def __init__(self, backend, heartbeat: int):
        super().__init__(backend)
        self.heartbeat = heartbeat

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if now - t.system_attrs.get(HEARTBEAT_ATTR, now) > GRACE * self.heartbeat]

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat

    def get_heartbeat_stale_trial_callback(self):
        return RETRY


def open_storage(url: str, *, heartbeat: int | None = None) -> optuna.storages.BaseStorage:
    """``sqlite:///path.db`` (its folder is created), ``postgresql://...`` and other
    SQLAlchemy URLs, or ``journal:path.log`` for Optuna's journal file storage. With
    ``heartbeat`` (seconds), running trials record heartbeats and dead workers' trials are
    failed and retried (module docstring)."""
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url.removeprefix(JOURNAL_PREFIX))
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        if heartbeat is None:
            return optuna.storages.JournalStorage(backend)
        return HeartbeatJournalStorage(backend, heartbeat)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif "://" not in url:
        raise ConfigError(f"expected an Optuna storage URL (sqlite:///file.db, postgresql://..., "
                          f"journal:file.log), got {url!r}", field="storage")
    options = {}
    if heartbeat is not None:
        options = {"heartbeat_interval": heartbeat, "grace_period": GRACE * heartbeat,
                   "heartbeat_stale_trial_callback": RETRY}
    engine = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else None
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, **options)
            break
        except Exception as error:  # SQLAlchemy raises many types for bad URLs / unreachable servers
            if _lost_creation_race(error) and attempt + 1 < CREATE_ATTEMPTS:
                time.sleep(0.1 * (attempt + 1))
                continue
            raise ConfigError(f"cannot open storage {display_url(url)}: {_first_line(error)}",
                              field="storage") from None
    if url.startswith("sqlite"):
        _write_ahead_log(storage)
    return storage


def _lost_creation_race(error: Exception) -> bool:
    """Whether ``error`` comes from another process creating the same new database's tables at
    the same moment (Optuna's schema creation is not atomic): opening again then succeeds."""
    if isinstance(error, sqlalchemy.exc.IntegrityError):  # both stamped the schema version
        return True
    text = str(error)
    return isinstance(error, sqlalchemy.exc.DBAPIError) and ("already exists" in text or "is locked" in text)


def display_url(url: str) -> str:
    """``url`` with its password hidden (for messages and logs)."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL (journal:...)
        return url


def lost(url: str, error: Exception) -> StorageError:
    """The one-line error of a worker whose storage went away mid-search."""
    return StorageError(f"lost the study's storage {display_url(url)} ({_first_line(error)}); its running "
                        "trial will be failed and retried: run the same command again to resume")


def _first_line(error: Exception) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def heartbeat_thread(storage: optuna.storages.BaseStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat now, then every interval while the block runs (no-op without
    heartbeats). Unlike Optuna's own thread, a failed write (the database restarting) is logged
    and retried at the next interval instead of ending the heartbeats."""
    if not is_heartbeat_enabled(storage):
        yield
        return
    storage.record_heartbeat(trial_id)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(storage.get_heartbeat_interval()):
            try:
                storage.record_heartbeat(trial_id)
            except Exception as error:  # the next beat retries; the grace period covers a few misses
                log.warning("heartbeat of trial id %d not recorded: %s", trial_id, _first_line(error))

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _write_ahead_log(storage: optuna.storages.RDBStorage) -> None:
    """SQLite in WAL mode with ``synchronous=NORMAL``: a trial makes several small commits
    (about 30 before ``writes.DeferredWrites`` batched its parameters and records), and a full
    fsync for each one cost more than merging and scoring a small model. Committed trials still
    survive the process being killed (only an OS crash can lose the last commits)."""
    from sqlalchemy import event

    def pragmas(connection, _record):
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # reconnect with the pragmas
