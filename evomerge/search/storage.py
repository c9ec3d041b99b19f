"""Optuna storage from a URL: SQLite (default), any RDB URL, or a journal file."""

from __future__ import annotations

from pathlib import Path

import optuna

from evomerge.errors import ConfigError

JOURNAL_PREFIX = "journal:"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """``sqlite:///path.db`` (its folder is created), ``postgresql://...`` and other
    SQLAlchemy URLs, or ``journal:path.log`` for Optuna's journal file storage."""
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url.removeprefix(JOURNAL_PREFIX))
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif "://" not in url:
        raise ConfigError(f"expected an Optuna storage URL (sqlite:///file.db, postgresql://..., "
                          f"journal:file.log), got {url!r}", field="storage")
    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as error:  # SQLAlchemy raises many types for bad URLs / unreachable servers
        raise ConfigError(f"cannot open storage {url}: {str(error).splitlines()[0]}", field="storage") from None
    if url.startswith("sqlite"):
        _write_ahead_log(storage)
    return storage


def _write_ahead_log(storage: optuna.storages.RDBStorage) -> None:
    """SQLite in WAL mode with ``synchronous=NORMAL``: a trial makes ~30 small commits, and a
    full fsync for each one cost more than merging and scoring a small model. Committed trials
    still survive the process being killed (only an OS crash can lose the last commits)."""
    from sqlalchemy import event

    def pragmas(connection, _record):
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # reconnect with the pragmas
