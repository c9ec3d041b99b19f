"""Fitness definitions (a YAML file or a dict): schema, up-front validation, building.

Everything is checked when the definition loads, before any model is touched: fields and
types, data files (exist, hold data), lm-eval task names, their splits and metrics, and
Python function references. A problem raises :class:`ConfigError` with one line naming the
file, the YAML line when known, the field and what was expected.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

from evomerge.engine.config import field_path, yaml_line
from evomerge.errors import ConfigError
from evomerge.fitness.base import SPLITS, Metric
from evomerge.fitness.fitness import Fitness
from evomerge.fitness.racing import Racing
from evomerge.io import shipped

METRIC_TYPES = ("lm_eval", "perplexity", "callable")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LmEvalSpec(_Strict):
    type: Literal["lm_eval"]
    task: str
    metric: str  # "exact_match", or "exact_match,<filter name>"
    num_fewshot: NonNegativeInt | None = None  # None: the task's own (else 0)
    limit: PositiveInt | None = None  # search-split documents per candidate (None: all)
    weight: float = 1.0
    batch_size: PositiveInt = 8
    apply_chat_template: bool = False
    gen_kwargs: dict[str, Any] | None = None
    fast_loglikelihood: bool = True  # False: loglikelihood requests through lm-eval's HFLM (evomerge.fitness.lmeval)
    fast_generation: bool = True  # False: greedy generation through lm-eval's HFLM (transformers' generate)


class SplitFiles(_Strict):
    search: str
    test: str


class PerplexitySpec(_Strict):
    type: Literal["perplexity"]
    data: SplitFiles
    text_field: str = "text"
    max_tokens: PositiveInt | None = None
    limit: PositiveInt | None = None  # search-split tokens per candidate (None: max_tokens); test ignores it
    context: int = Field(512, ge=2)
    stride: PositiveInt | None = None  # None: context // 2
    batch_size: PositiveInt = 8
    weight: float = 1.0


class CallableSpec(_Strict):
    type: Literal["callable"]
    function: str
    direction: Literal["maximize", "minimize"]
    key: str | None = None
    weight: float = 1.0


class RacingSpec(_Strict):
    """``racing:`` (:mod:`evomerge.fitness.racing`); off when absent."""

    first: PositiveInt = 32  # items of the first chunk, all raced metrics together
    growth: float = Field(2.0, gt=1)  # each chunk ends this many times further than the previous
    confidence: float = Field(0.99, gt=0, lt=1)  # chance that no would-be incumbent is stopped
    seed: NonNegativeInt = 0  # of the item order
    screen: NonNegativeInt = 0  # screening: the last trials that decide the informative items (0: off)
    anchors: NonNegativeInt = 0  # with screen: informative items scored first to predict the rest (0: off)
    probe: NonNegativeInt = 0  # with screen: left-out items every candidate scores first (0: none)


class FitnessSpec(_Strict):
    include_path: str | list[str] = []
    builtin_tasks: bool = False
    objective: Literal["weighted_sum", "separate"] = "weighted_sum"
    stages: list[float] = [1.0]
    racing: RacingSpec | None = None
    metrics: dict[str, dict[str, Any]] = Field(min_length=1)


_SPECS = {"lm_eval": LmEvalSpec, "perplexity": PerplexitySpec, "callable": CallableSpec}


def load_fitness(source: str | Path | dict[str, Any], base_dir: str | Path | None = None, *,
                 limit: int | None = None, cache_file: str | Path | None = None) -> Fitness:
    """Load and validate a fitness definition; raises :class:`ConfigError`.

    ``source`` is a YAML file, the name of one shipped with the package (``zoo_skills``, see
    :mod:`evomerge.io.shipped`) or an already-parsed dict. Relative paths in it are relative to
    ``base_dir`` (default: the file's folder, or the working directory for a dict). ``limit``
    caps every lm-eval metric at that many documents on both splits (quick runs).
    ``cache_file`` keeps the score cache on disk (see :mod:`evomerge.fitness.cache`).
    """
    if isinstance(source, dict):
        label, root, data = "<fitness>", None, source
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        path = shipped.find("fitness", source)
        label, root, data = _read_yaml(path)
        base = Path(base_dir) if base_dir is not None else path.parent

    def fail(at: tuple, message: str):
        raise ConfigError(message, file=label, field=field_path(at), line=yaml_line(root, at))

    if not isinstance(data, dict):
        fail((), "expected a mapping with a 'metrics' entry")
    spec = _validate(FitnessSpec, data, (), fail)
    _check_stages(spec.stages, fail)
    if spec.racing is not None and len(spec.stages) > 1:
        fail(("racing",), "racing replaces stages (the median pruner): give one of them")
    if spec.racing is not None and spec.racing.anchors and not spec.racing.screen:
        fail(("racing", "anchors"), "anchors need screening: give racing.screen too (the trials they are chosen from)")
    if spec.racing is not None and spec.racing.probe and not spec.racing.screen:
        fail(("racing", "probe"), "a probe needs screening: give racing.screen too (it is drawn from the items "
             "screening leaves out)")
    builder = _Builder(spec, base, limit, fail)
    metrics = [builder.metric(name, raw) for name, raw in spec.metrics.items()]
    racing = Racing(**spec.racing.model_dump()) if spec.racing is not None else None
    if racing is not None and not any(m.item_mean for m in metrics if m.weight != 0):
        fail(("racing",), "racing needs an optimized metric whose score is a mean over items (lm-eval acc, "
             "exact_match, ...); none is")
    try:
        return Fitness(metrics, objective=spec.objective, stages=tuple(spec.stages), racing=racing,
                       fingerprint=_fingerprint(data, metrics),
                       cache_file=Path(cache_file) if cache_file is not None else None)
    except ValueError as error:
        fail(("metrics",), str(error))


def _read_yaml(path: Path) -> tuple[str, yaml.Node | None, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as error:  # ValueError: a NUL in the name
        raise ConfigError(f"cannot read fitness definition: {getattr(error, 'strerror', None) or error}",
                          file=str(path)) from None
    try:
        return str(path), yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"malformed YAML: {problem}", file=str(path),
                          line=mark.line + 1 if mark else None) from None


def _validate(model: type[BaseModel], data: Any, at: tuple, fail):
    try:
        return model.model_validate(data)
    except ValidationError as error:
        errors = error.errors()  # an unknown field first: a misspelt key also makes another "missing"
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        loc = tuple(k for k in first["loc"] if not (isinstance(k, str) and k.startswith(("list[", "dict["))))
        message = first["msg"].replace("Field required", "missing; this field is required")
        if first["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1) if len(loc) == 1 else []
            message = "unknown field" + (f" (did you mean {close[0]!r}?)" if close else "")
        fail(at + loc, message)


def _check_stages(stages: list[float], fail) -> None:
    if (not stages or any(not 0 < s <= 1 for s in stages) or stages[-1] != 1
            or any(a >= b for a, b in zip(stages, stages[1:]))):
        fail(("stages",), f"{stages}: expected increasing fractions in (0, 1] ending with 1.0")


class _Builder:
    """Builds each metric of a validated spec, failing with the metric's field."""

    def __init__(self, spec: FitnessSpec, base: Path, limit: int | None, fail):
        self.spec, self.base, self.limit, self.fail = spec, base, limit, fail
        self._catalog = None

    def metric(self, name: str, raw: dict[str, Any]) -> Metric:
        at = ("metrics", name)
        if not _NAME.match(name):
            self.fail(at, "metric names are letters, digits, '_' and '-'")
        if not isinstance(raw, dict):
            self.fail(at, f"expected a mapping with a 'type' ({', '.join(METRIC_TYPES)})")
        kind = raw.get("type")
        if kind not in _SPECS:
            self.fail(at + ("type",), ("missing" if kind is None else f"unknown metric type {kind!r}")
                      + f"; expected one of: {', '.join(METRIC_TYPES)}")
        spec = _validate(_SPECS[kind], raw, at, self.fail)
        return getattr(self, f"_{kind}")(name, spec, at)

    def _lm_eval(self, name: str, spec: LmEvalSpec, at: tuple) -> Metric:
        from evomerge.errors import TaskError
        from evomerge.fitness.lmeval import LmEvalMetric, build_task, load_task_config, resolve_data_files

        try:
            path = self._tasks().find(spec.task)
            config = load_task_config(path)
            resolve_data_files(config, path)
            tasks = {split: build_task(config, split, path) for split in SPLITS}
            search_limit = min(filter(None, (spec.limit, self.limit)), default=None)
            return LmEvalMetric(name, tasks, spec.metric, weight=spec.weight, limit=search_limit,
                                test_limit=self.limit, num_fewshot=spec.num_fewshot,
                                batch_size=spec.batch_size, apply_chat_template=spec.apply_chat_template,
                                gen_kwargs=spec.gen_kwargs, path=path,
                                fast_loglikelihood=spec.fast_loglikelihood, fast_generation=spec.fast_generation)
        except TaskError as error:
            if error.file:
                raise ConfigError(str(error), file=error.file, field=error.field) from None
            self.fail(at + ((error.field,) if error.field else ()), str(error))

    def _perplexity(self, name: str, spec: PerplexitySpec, at: tuple) -> Metric:
        from evomerge.fitness.perplexity import PerplexityMetric, read_texts

        stride = spec.stride or spec.context // 2
        if stride >= spec.context:
            self.fail(at + ("stride",), f"{stride} must be smaller than context ({spec.context}), so that "
                      "every token after the first is scored exactly once")
        texts, paths = {}, []
        for split in SPLITS:
            path = self.base / getattr(spec.data, split)
            if not path.exists():
                self.fail(at + ("data", split), f"file not found: {path}")
            try:
                texts[split] = read_texts(path, spec.text_field)
            except Exception as error:
                self.fail(at + ("data", split), f"{path}: {error}")
            paths.append(path)
        return PerplexityMetric(name, texts, context=spec.context, stride=stride, max_tokens=spec.max_tokens,
                                limit=spec.limit, batch_size=spec.batch_size, weight=spec.weight, paths=paths)

    def _callable(self, name: str, spec: CallableSpec, at: tuple) -> Metric:
        from evomerge.fitness.callable import CallableMetric, resolve_function

        try:
            function, path = resolve_function(spec.function, self.base)
        except ValueError as error:
            self.fail(at + ("function",), str(error))
        return CallableMetric(name, function, spec.function, direction=spec.direction, weight=spec.weight,
                              key=spec.key, path=path)

    def _tasks(self):
        from evomerge.fitness.lmeval import TaskCatalog

        if self._catalog is None:
            paths = [self.spec.include_path] if isinstance(self.spec.include_path, str) else self.spec.include_path
            folders = []
            for i, entry in enumerate(paths):
                folder = self.base / entry
                if not folder.is_dir():
                    at = ("include_path",) + ((i,) if isinstance(self.spec.include_path, list) else ())
                    self.fail(at, f"folder not found: {folder}")
                folders.append(folder.resolve())
            self._catalog = TaskCatalog(folders, self.spec.builtin_tasks)
        return self._catalog


def _fingerprint(data: dict[str, Any], metrics: list[Metric]) -> str:
    """Hash of the definition and of the content of every file its metrics read."""
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode())
    for metric in metrics:
        for source in metric.sources():
            files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
            for file in files:
                digest.update(str(file.name).encode())
                with file.open("rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
    return digest.hexdigest()
