"""The files shipped inside the package: search spaces, experiments and fitness definitions.

They are package data in ``evomerge/shipped/`` (a data folder, no code)::

    search_spaces/<name>.yaml     search spaces (``search_space: ps_ties``)
    experiments/<name>.yaml       experiments (``evomerge search zoo_ps``); merges/: example merge configs
    fitness/<name>.yaml           fitness definitions (``fitness: zoo_skills``), with tasks/ and data/

and are read through :mod:`importlib.resources`, so an installed package (``pip install .``,
not editable) finds them as a source checkout does. A *name* is a string with no path
separator and no suffix (``zoo_ps``, not ``zoo_ps.yaml`` or ``./zoo_ps``); it picks a shipped
file. Anything else is a path, read as given (relative paths from the caller's base folder).
Relative paths inside a shipped file resolve relative to that file, as for any other file.
"""

from __future__ import annotations

import atexit
import os
from contextlib import ExitStack
from functools import lru_cache
from importlib.resources import as_file, files
from pathlib import Path, PurePath

from evomerge.errors import ConfigError

KINDS = {"search_spaces": "search space", "experiments": "experiment", "fitness": "fitness definition"}


@lru_cache(maxsize=1)
def root() -> Path:
    """The shipped folder as a real directory (lm-eval and ``datasets`` need file paths).

    An ordinary install is already a directory; from a zip (Python >= 3.12) ``as_file``
    extracts it to a temporary folder that is removed when the process exits."""
    stack = ExitStack()
    atexit.register(stack.close)
    return Path(stack.enter_context(as_file(files("evomerge") / "shipped")))


def folder(kind: str) -> Path:
    """``search_spaces``, ``experiments`` or ``fitness`` of the shipped folder."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of shipped file {kind!r}; expected one of: {', '.join(KINDS)}")
    return root() / kind


def is_name(spec: str | PurePath) -> bool:
    """Whether ``spec`` is a shipped name (no path separator, no suffix) rather than a path."""
    text = os.fspath(spec)
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return bool(text) and not any(s in text for s in separators) and not PurePath(text).suffix \
        and text not in (".", "..")


def names(kind: str) -> list[str]:
    """The names of the shipped files of ``kind`` (the stems of its YAML files that are names;
    ``llama3_8b_ties.example.yaml`` is a template to copy, not a name)."""
    return sorted(path.stem for path in folder(kind).glob("*.yaml") if is_name(path.stem))


def find(kind: str, spec: str | PurePath, base_dir: str | Path | None = None, *,
         file: str | None = None, field: str | None = None) -> Path:
    """The file ``spec`` names: a shipped name, else a path relative to ``base_dir``
    (default: the working directory). An unknown name is a :class:`ConfigError` listing the
    shipped ones (``file`` and ``field`` say where the name was written); a path is returned
    as is, for the caller's own "cannot read" error."""
    if not is_name(spec):
        path = Path(spec)
        return path if base_dir is None else Path(base_dir) / path
    path = folder(kind) / f"{os.fspath(spec)}.yaml"
    try:
        shipped = path.is_file()
    except (OSError, ValueError):  # not a possible file name (too long, NUL)
        shipped = False
    if not shipped:
        raise ConfigError(f"unknown {KINDS[kind]} {os.fspath(spec)!r}; expected a YAML file or one of: "
                          f"{', '.join(names(kind))}", file=file, field=field)
    return path
