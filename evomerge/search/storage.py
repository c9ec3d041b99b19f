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
        return optuna.storages.RDBStorage(url)
    except Exception as error:  # SQLAlchemy raises many types for bad URLs / unreachable servers
        raise ConfigError(f"cannot open storage {url}: {str(error).splitlines()[0]}", field="storage") from None
