"""The merge config: mergekit's YAML schema, validated with errors that point at the YAML line.

Supported: ``merge_method``, ``base_model``, ``models`` or ``slices`` (with ``layer_range``),
``parameters`` at the top level, per slice and per model/slice source (scalars, gradient
lists, ``{filter, value}`` lists), ``dtype``, ``out_dtype``, ``tokenizer_source`` (``base``,
``union`` or a model path), the ``tokenizer:`` block (``source``, ``tokens`` with per-token
``source``/``force``, ``pad_to_multiple_of``; see :mod:`evomerge.engine.tokenizer`) and
``chat_template``. Parameter resolution follows mergekit: the most
specific scope that yields a value wins (source → slice → top level), a filter list takes
its first entry whose ``filter`` is a substring of the tensor name (or ``*``/no filter),
and a gradient list is interpolated piecewise-linearly over the layers of its slice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from evomerge.errors import ConfigError
from evomerge.methods.registry import METHODS, REQUIRED, MergeMethod, Param

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}
SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's when PyYAML was built with it


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConditionalParameter(_Strict):
    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = Union[ConditionalParameter, list[ConditionalParameter], ScalarOrGradient]
Parameters = dict[str, ParameterSetting]


class InputModel(_Strict):
    model: str
    parameters: Parameters | None = None


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None
    # evomerge-only (data-flow merges): multiply the hidden state entering each layer of
    # this slice by this factor. mergekit rejects configs that set it.
    input_scale: float | None = None


class OutputSlice(_Strict):
    sources: list[InputSlice]
    base_model: str | None = None
    parameters: Parameters | None = None


class ModelTokenSource(_Strict):
    """A token's row taken from one model's row of another token (by id or by name)."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroSource(_Strict):
    kind: Literal["zero"]


class TokenSettings(_Strict):
    """``tokenizer.tokens.<token>``: where the token's embedding/head row comes from
    (``source``: a model path, ``{kind: zero}`` or ``{kind: model_token, ...}``) and whether
    that source replaces the rows models already have (``force``)."""

    source: ModelTokenSource | ZeroSource | str | None = None
    force: bool = False


class TokenizerSettings(_Strict):
    """mergekit's ``tokenizer:`` block; ``tokenizer_source: X`` is ``tokenizer: {source: X}``."""

    source: str = "union"  # union | base | a model path
    tokens: dict[str, TokenSettings] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class MergeConfig(_Strict):
    """A mergekit-compatible merge config (``mergekit-yaml`` reads the same file)."""

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    _source: str = PrivateAttr(default="<config>")

    @property
    def source(self) -> str:
        """The file (or label) the config was parsed from, for error messages."""
        return self._source

    @property
    def method(self) -> MergeMethod:
        return METHODS[self.merge_method]

    def tokenizer_settings(self) -> TokenizerSettings | None:
        """The output tokenizer's settings (``tokenizer_source`` as a block), None without either."""
        if self.tokenizer is not None:
            return self.tokenizer
        return None if self.tokenizer_source is None else TokenizerSettings(source=self.tokenizer_source)

    def referenced_models(self) -> list[str]:
        """Every model path the config names, base first, without repeats."""
        names = [self.base_model] if self.base_model else []
        for entry in self.models or []:
            names.append(entry.model)
        for output_slice in self.slices or []:
            names += [output_slice.base_model] if output_slice.base_model else []
            names += [source.model for source in output_slice.sources]
        return list(dict.fromkeys(names))

    def to_yaml(self) -> str:
        """Dump as YAML that both ``evomerge merge`` and ``mergekit-yaml`` read (the same text
        as ``yaml.safe_dump``, written with libyaml's emitter when it is installed; a search hashes it)."""
        return yaml.dump(self.model_dump(mode="json", exclude_none=True), Dumper=SAFE_DUMPER, sort_keys=False)


def model_labels(paths: Sequence[str]) -> list[str]:
    """Short names for parameter names: the folder names (``/`` and spaces replaced), or
    ``m0, m1, ...`` when two folders share a name."""
    labels = [re.sub(r"[^A-Za-z0-9_\-]", "_", path.rstrip("/").rsplit("/", 1)[-1]) or "m"
              for path in paths]
    return labels if len(set(labels)) == len(labels) else [f"m{i}" for i in range(len(paths))]


def torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else DTYPES[name]


# --------------------------------------------------------------------------- settings


def evaluate_setting(setting: ParameterSetting, tensor_name: str, t: float, param: Param) -> Any:
    """Value of one setting for ``tensor_name`` at relative depth ``t`` (None: no match)."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, list) and setting and isinstance(setting[0], ConditionalParameter):
        for conditional in setting:
            if conditional.filter in (None, "*") or conditional.filter in tensor_name:
                return evaluate_setting(conditional.value, tensor_name, t, param)
        return None
    if isinstance(setting, list):
        if not setting:
            return None
        values = [coerce(v, param) for v in setting]
        if param.kind is not float:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    return coerce(setting, param)


def coerce(value: Any, param: Param) -> Any:
    """Convert a YAML scalar to the parameter's type (ValueError when it cannot be)."""
    if value is None and param.optional:
        return None
    if param.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"expected true/false, got {value!r}")
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if param.kind is int:
        if isinstance(value, (int, float)) and float(value).is_integer():
            return int(value)
        raise ValueError(f"expected an integer, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None


def resolve(param: Param, scopes: list[Parameters | None], tensor_name: str, t: float) -> Any:
    """First value found for ``param`` in ``scopes`` (most specific first), else its default."""
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t, param)
            if value is not None:
                return value
    if param.default is REQUIRED:
        raise ConfigError(f"missing required parameter '{param.name}' for tensor {tensor_name}",
                          field="parameters")
    return param.default


# --------------------------------------------------------------------------- loading


def yaml_line(root: yaml.Node | None, path: tuple) -> int | None:
    """1-based line of the node at ``path`` (or of its closest existing parent)."""
    node, line = root, None
    for key in path:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


def field_path(path: tuple) -> str:
    """A YAML path as a field name for messages: ``models[0].parameters``."""
    text = ""
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


def _settings_paths(config: MergeConfig):
    """Yield (yaml path, parameters dict) for every ``parameters`` block of the config."""
    yield ("parameters",), config.parameters
    for i, entry in enumerate(config.models or []):
        yield ("models", i, "parameters"), entry.parameters
    for i, output_slice in enumerate(config.slices or []):
        yield ("slices", i, "parameters"), output_slice.parameters
        for j, source in enumerate(output_slice.sources):
            yield ("slices", i, "sources", j, "parameters"), source.parameters


def _scalars(setting: ParameterSetting):
    if isinstance(setting, ConditionalParameter):
        yield from _scalars(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _scalars(item)
    else:
        yield setting


def _check(config: MergeConfig, fail) -> None:
    """Semantic checks mergekit would only hit mid-merge; ``fail(path, message)`` raises."""
    if config.merge_method not in METHODS:
        fail(("merge_method",), f"unknown method {config.merge_method!r}; expected one of: "
             f"{', '.join(METHODS)}")
    method = config.method
    if bool(config.models) == bool(config.slices):
        fail(("models",), "exactly one of 'models' or 'slices' must be given")
    for key in ("dtype", "out_dtype"):
        if getattr(config, key) is not None and getattr(config, key) not in DTYPES:
            fail((key,), f"unknown dtype {getattr(config, key)!r}; expected one of: "
                 "float32, float16, bfloat16, float64")
    if config.tokenizer_source is not None and config.tokenizer is not None:
        fail(("tokenizer_source",), "give either tokenizer_source or a tokenizer: block, not both")
    for path, params in _settings_paths(config):
        for name, setting in (params or {}).items():
            param = method.param(name)
            if param is None:
                known = ", ".join(p.name for p in method.params) or "none"
                fail(path + (name,), f"unknown parameter for {method.name} (known: {known})")
            for value in _scalars(setting):
                try:
                    number = coerce(value, param)
                except ValueError as error:
                    fail(path + (name,), str(error))
                if isinstance(number, (int, float)) and not isinstance(number, bool) and not (
                        (param.low is None or number >= param.low)
                        and (param.high is None or number <= param.high)):
                    fail(path + (name,), f"{number} is out of range; expected {expected_range(param)}")
    if config.slices:
        for i, output_slice in enumerate(config.slices):
            if not output_slice.sources:
                fail(("slices", i, "sources"), "a slice needs at least one source")
            lengths = set()
            for j, source in enumerate(output_slice.sources):
                start, end = source.layer_range
                if not 0 <= start < end:
                    fail(("slices", i, "sources", j, "layer_range"),
                         f"expected [start, end) with 0 <= start < end, got [{start}, {end}]")
                lengths.add(end - start)
            if len(lengths) > 1:
                fail(("slices", i, "sources"), "all sources of a slice must span the same "
                     f"number of layers, got {sorted(lengths)}")
            _check_inputs(method, [s.model for s in output_slice.sources],
                          output_slice.base_model or config.base_model,
                          lambda msg, i=i: fail(("slices", i, "sources"), msg))
    else:
        _check_inputs(method, [m.model for m in config.models], config.base_model,
                      lambda msg: fail(("models",), msg))


def expected_range(param: Param) -> str:
    """``param``'s range in words: ``a value in [low, high]``, ``a value >= low``, ..."""
    if param.high is None:
        return f"a value >= {param.low}"
    if param.low is None:
        return f"a value <= {param.high}"
    return f"a value in [{param.low}, {param.high}]"


def input_models(method: MergeMethod, models: list[str], base: str | None) -> tuple[list[str], int | None]:
    """The inputs a method sees (the base appended when the method uses it and it is not
    listed) and the base's index (None unless the method takes a base and there is one)."""
    models = list(models)
    if not (method.takes_base or method.base_as_input):
        return models, None
    if base is not None and base not in models:
        models.append(base)
    return models, (models.index(base) if base is not None and method.takes_base else None)


def _check_inputs(method: MergeMethod, models: list[str], base: str | None, fail) -> None:
    if len(set(models)) != len(models):
        fail("the same model is listed twice")
    if method.needs_base and base is None:
        fail(f"{method.name} needs a base_model")
    inputs, _ = input_models(method, models, base)
    if len(inputs) < method.min_inputs or (method.max_inputs and len(inputs) > method.max_inputs):
        expected = (f"exactly {method.min_inputs}" if method.min_inputs == method.max_inputs
                    else f"at most {method.max_inputs}" if method.max_inputs
                    else f"at least {method.min_inputs}")
        fail(f"{method.name} takes {expected} models (base included), got {len(inputs)}")
    others = len(inputs) - (base is not None and method.takes_base)
    if others < method.min_non_base or (method.max_non_base is not None and others > method.max_non_base):
        expected = (f"exactly {method.min_non_base}" if method.min_non_base == method.max_non_base
                    else f"at most {method.max_non_base}" if method.max_non_base is not None
                    else f"at least {method.min_non_base}")
        fail(f"{method.name} takes {expected} models besides the base, got {others}")


def read_mapping(text: str, source: str) -> tuple[dict, yaml.Node]:
    """YAML text → (top-level mapping, node tree for line numbers); ConfigError otherwise."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"malformed YAML: {problem}", file=source,
                          line=mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping at the top level", file=source, line=1)
    return data, root


def validation_failure(error: ValidationError) -> tuple[tuple, str]:
    """The YAML path and a one-line message of pydantic's first error."""
    first = error.errors()[0]
    path = tuple(k for k in first["loc"] if not (isinstance(k, str) and (
        "[" in k or k in ("ConditionalParameter", "ModelTokenSource", "ZeroSource", "bool", "int", "float", "str",
                                         "function-after"))))
    message = first["msg"].replace("Extra inputs are not permitted", "unknown field")
    return path, message.removeprefix("Value error, ")


def read_file(path: str | Path, what: str) -> str:
    """A config file's text; ConfigError naming it when it cannot be read."""
    try:
        return Path(path).read_text()
    except (OSError, ValueError) as error:  # ValueError: a NUL in the name
        raise ConfigError(f"cannot read {what}: {getattr(error, 'strerror', None) or error}", file=str(path)) from None


def parse_config(text: str, source: str = "<config>") -> MergeConfig:
    """Parse and validate a merge config from YAML text; raises :class:`ConfigError`."""
    data, root = read_mapping(text, source)

    def fail(path: tuple, message: str):
        raise ConfigError(message, file=source, field=field_path(path), line=yaml_line(root, path))

    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as error:
        fail(*validation_failure(error))
    _check(config, fail)
    config._source = source
    return config


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge config file; relative model paths stay as written."""
    return parse_config(read_file(path, "config"), str(path))
