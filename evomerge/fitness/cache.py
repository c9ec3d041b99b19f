"""Scores of evaluated candidates by (cache key, split, fraction), optionally kept on disk.

The file is JSON lines: a header ``{"fingerprint": ...}`` (a hash of the fitness definition
and the content of every file it reads), then one ``{"key", "split", "fraction", "scores"}``
line per evaluation, appended as it completes, so an interrupted search loses nothing. A
file whose fingerprint differs (the fitness or its data changed) is started afresh.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class ScoreCache:
    """In-memory dict of scores, mirrored to a JSON-lines file when ``path`` is given."""

    def __init__(self, fingerprint: str, path: Path | None = None):
        self.fingerprint, self.path = fingerprint, path
        self._scores: dict[tuple[str, str, float], dict[str, float]] = {}
        if path is not None:
            self._open(path)

    def get(self, key: str, split: str, fraction: float) -> dict[str, float] | None:
        scores = self._scores.get((key, split, fraction))
        return dict(scores) if scores is not None else None

    def put(self, key: str, split: str, fraction: float, scores: dict[str, float]) -> None:
        self._scores[(key, split, fraction)] = dict(scores)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "split": split, "fraction": fraction,
                                         "scores": scores}) + "\n")

    def __len__(self) -> int:
        return len(self._scores)

    def _open(self, path: Path) -> None:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        header = _parse(lines[0]) if lines else None
        if header is not None and header.get("fingerprint") == self.fingerprint:
            for line in lines[1:]:
                entry = _parse(line)  # a line cut short by a crash is skipped
                if entry is not None:
                    self._scores[(entry["key"], entry["split"], entry["fraction"])] = entry["scores"]
            log.info("fitness cache %s: %d scores reused", path, len(self._scores))
            return
        if lines:
            log.warning("fitness cache %s was written for another fitness definition; starting afresh", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fingerprint": self.fingerprint}) + "\n", encoding="utf-8")


def _parse(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
