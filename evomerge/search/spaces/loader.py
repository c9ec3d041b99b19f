"""Load a search space from a name, a YAML file or an inline mapping.

A name (no path separator, no suffix) is a search space shipped with the package
(``evomerge/shipped/search_spaces/<name>.yaml``, see :mod:`evomerge.io.shipped`); anything
else is a path, relative to ``base_dir`` (e.g. the experiment file's folder).
The ``kind`` field picks the implementation: ``parameter`` and ``slerp``
(:mod:`.parameter`), ``stacking`` (:mod:`.stacking`), ``dfs`` (:mod:`.dataflow`). Every
problem is a :class:`~evomerge.errors.ConfigError` of one line naming the file, the YAML
line and the field. A space that loads has been checked to decode into a config that
``parse_config`` accepts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evomerge.engine.architecture import num_layers as config_depth
from evomerge.engine.config import field_path, parse_config, read_file, read_mapping, yaml_line
from evomerge.errors import ConfigError, ModelError
from evomerge.io import shipped
from evomerge.search.spaces.dataflow import DataFlowSpace
from evomerge.search.spaces.parameter import ParameterSpace
from evomerge.search.spaces.space import SearchSpace, SpaceContext
from evomerge.search.spaces.stacking import StackingSpace

KINDS: dict[str, type[SearchSpace]] = {
    "parameter": ParameterSpace, "slerp": ParameterSpace,
    "stacking": StackingSpace, "dfs": DataFlowSpace,
}
_TYPE_TAGS = {"bool", "int", "float", "str"}


def available_spaces() -> list[str]:
    """Names of the search spaces shipped with the package."""
    return shipped.names("search_spaces")


def load_search_space(spec: str | Path | Mapping[str, Any], *, models: Sequence[str | Path],
                      base_model: str | Path | None = None, num_layers: int | None = None,
                      base_dir: str | Path | None = None, source: str | None = None) -> SearchSpace:
    """Build the search space ``spec`` for ``models`` (and ``base_model``).

    ``num_layers`` is the models' depth (read from the first model's ``config.json`` when
    omitted); ``source`` labels an inline mapping in error messages.
    """
    data, root, source, name = _read(spec, base_dir, source)

    def fail(path: tuple, message: str):
        raise ConfigError(message, file=source, field=field_path(path), line=yaml_line(root, path))

    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        fail(("kind",), f"got {kind!r}; expected one of: {', '.join(KINDS)}")
    cls = KINDS[kind]
    try:
        parsed = cls.Spec.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        path = tuple(k for k in first["loc"]
                     if not (isinstance(k, str) and ("[" in k or k in _TYPE_TAGS)))
        fail(path, first["msg"].replace("Extra inputs are not permitted", "unknown field"))
    models = [str(m) for m in models]
    base = None if base_model is None else str(base_model)
    depth = num_layers if num_layers is not None else _depth(models or [base])
    space = cls(parsed, SpaceContext(name, tuple(models), base, depth), fail)
    try:
        parse_config(space.decode(space.from_unit([0.5] * len(space.distributions()))).to_yaml())
    except ConfigError as error:
        where = f"{error.field}: " if error.field else ""
        fail((), f"decodes to an invalid merge config: {where}{error.message}")
    return space


def _read(spec: str | Path | Mapping[str, Any], base_dir: str | Path | None,
          source: str | None) -> tuple[dict, yaml.Node | None, str, str]:
    """(data, YAML node tree or None, label for errors, space name)."""
    if isinstance(spec, Mapping):
        return dict(spec), None, source or "<search space>", "inline"
    path = shipped.find("search_spaces", str(spec), base_dir, file=source, field="search_space")
    data, root = read_mapping(read_file(path, "search space"), str(path))
    return data, root, str(path), path.stem


def _depth(models: Sequence[str | None]) -> int:
    if not models or models[0] is None:
        raise ConfigError("a search space needs at least one model", field="models")
    try:
        return config_depth(json.loads((Path(models[0]) / "config.json").read_text()))
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"{models[0]}: cannot read the depth from config.json ({error})") from None
