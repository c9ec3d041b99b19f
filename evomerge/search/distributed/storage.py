"""Optuna storage from a URL: SQLite (default), PostgreSQL or any RDB URL, or a journal file.

Workers share a study through its storage and nothing else. With ``heartbeat`` set, an RDB
storage records each running trial's heartbeat every ``heartbeat`` seconds (Optuna's own, in
``study.optimize``), and a running trial whose last heartbeat is older than ``GRACE`` intervals
(database clock) belongs to a dead worker: ``optuna.storages.fail_stale_trials`` fails it and
re-queues it once (:data:`RETRY`). Optuna's journal storage has no public heartbeat, so a
``journal:`` study runs without one: only a dead worker on the same host is found
(``coordination.fail_dead_trials``); another host's trial stays running until failed by hand.
``pool_pre_ping`` (on by default in Optuna) replaces pooled connections that a database
restart closed.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

from evomerge.errors import ConfigError, StorageError

log = logging.getLogger(__name__)
JOURNAL_PREFIX = "journal:"
GRACE = 3  # missed heartbeats after which a running trial's worker counts as dead
MAX_RETRY = 1  # a dead worker's trial runs again once (a candidate that kills its worker fails twice)
STORAGE_ERRORS = (sqlalchemy.exc.DBAPIError, optuna.exceptions.StorageInternalError)  # the database went away
SQLITE_BUSY_TIMEOUT = 30  # seconds a SQLite connection waits for another's write lock (pysqlite: 5)
CREATE_ATTEMPTS = 5  # openings of a new database that lose the race to create its tables are retried


class RetryDeadTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry callback (a WAITING copy of the failed ``trial``: same parameters, system
    attributes and ``retry_history``), without the dead run's records: a retry that carried the
    dead worker's ``worker`` would look dead itself once popped, before its new worker records
    itself."""

    KEPT = ("warm_start",)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in self.KEPT}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            super().__call__(study, trial)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", ExperimentalWarning)
    RETRY = RetryDeadTrial(max_retry=MAX_RETRY)


class HeartbeatTolerantRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, whose heartbeat write logs a failure instead of raising it: Optuna's
    heartbeat thread ends at its first exception, so a database restart while a trial runs would
    leave the trial without heartbeats, and another worker would fail it after the grace period
    (``test_a_failed_heartbeat_write_is_logged_and_the_next_one_still_made``)."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except STORAGE_ERRORS as error:  # the next interval retries; the grace period covers a few misses
            log.warning("heartbeat of trial id %d not recorded: %s", trial_id, _first_line(error))


def open_storage(url: str, *, heartbeat: int | None = None) -> optuna.storages.BaseStorage:
    """``sqlite:///path.db`` (its folder is created), ``postgresql://...`` and other
    SQLAlchemy URLs, or ``journal:path.log`` for Optuna's journal file storage. With
    ``heartbeat`` (seconds), running trials of an RDB storage record heartbeats and dead
    workers' trials are failed and retried (module docstring; a journal ignores it). Raises
    ConfigError for a URL that is not a storage or cannot be opened."""
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url.removeprefix(JOURNAL_PREFIX))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif "://" not in url:
        raise ConfigError(f"expected an Optuna storage URL (sqlite:///file.db, postgresql://..., "
                          f"journal:file.log), got {url!r}", field="storage")
    options = {}
    if heartbeat is not None:
        options = {"heartbeat_interval": heartbeat, "grace_period": GRACE * heartbeat,
                   "heartbeat_stale_trial_callback": RETRY}
    engine = ({"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else
              {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}} if url.startswith("sqlite") else None)
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                storage = HeartbeatTolerantRDBStorage(url, engine_kwargs=engine, **options)
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


def storage_error(error: BaseException) -> BaseException | None:
    """The error among ``error`` and those it was raised while handling that says the database
    went away, or None (Optuna may fail again while handling a storage error)."""
    while error is not None and not isinstance(error, STORAGE_ERRORS):
        error = error.__context__
    return error


def _first_line(error: Exception) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _write_ahead_log(storage: optuna.storages.RDBStorage) -> None:
    """SQLite in WAL mode with ``synchronous=NORMAL``: a trial makes a few dozen small commits,
    each without a full fsync. Committed trials still survive the process being killed (only an
    OS crash can lose the last commits)."""
    from sqlalchemy import event

    def pragmas(connection, _record):
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # reconnect with the pragmas
