"""Merge planning: a validated config + the model folders → one op per output tensor.

A :class:`MergePlan` is everything needed to compute the merged model without looking
at the config again: for each output tensor, which input tensors feed it (model, name),
which one is the base, and the parameters resolved for that tensor (gradients evaluated
at its layer's depth, filters matched against its name). The merge engine executes the
ops against files; the in-memory materializer executes the same ops against resident
tensors. All checks that can fail (shapes, architectures, parameter ranges) happen here,
before anything is computed or written.

With a ``tokenizer_source``/``tokenizer`` setting the plan also carries the output
:class:`~evomerge.engine.tokenizer.Vocabulary`, and each embedding/head op a
:class:`~evomerge.engine.tokenizer.RowMap` that re-maps its inputs' rows to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evomerge.engine.architecture import (
    Family,
    family_for,
    is_vocab_tensor,
    layer_index,
    num_layers,
    tensor_kind,
    with_layer,
)
from evomerge.engine.config import MergeConfig, Parameters, input_models, resolve, torch_dtype
from evomerge.engine.tokenizer import RowMap, Vocabulary, build_vocabulary, row_map
from evomerge.errors import ConfigError, ModelError
from evomerge.io.reader import ModelFolder
from evomerge.io.source import open_model
from evomerge.methods.random import random_key
from evomerge.methods.registry import MergeMethod

INPUT_SCALES_KEY = "evomerge_input_scales"  # config.json: per-layer input scales (data flow)


@dataclass(frozen=True)
class TensorOp:
    """How one output tensor is computed."""

    name: str
    inputs: tuple[tuple[str, str], ...]  # (model path, tensor name), in input order
    base_index: int | None
    shared: dict[str, Any]
    per_input: tuple[dict[str, Any], ...]
    keys: tuple[int, ...]
    layer: int | None = None  # output layer index, None outside the decoder stack
    crop_rows: int | None = None  # keep this many vocabulary rows (sources differ in size)
    vocab: RowMap | None = field(default=None, compare=False)  # re-map rows to the output vocabulary


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    ops: list[TensorOp]
    template: str  # model whose config.json (and, by default, tokenizer) the output takes
    family: Family
    layer_sources: list[tuple[str, int]] = field(default_factory=list)  # per output layer
    vocab_size: int | None = None
    layer_scales: list[float | None] = field(default_factory=list)  # per output layer (data flow)
    vocabulary: Vocabulary | None = None  # the output tokenizer (tokenizer_source / tokenizer)

    @property
    def input_scales(self) -> list[float] | None:
        """Per-layer input scales when any layer has one (evomerge-only), else None."""
        if all(scale is None for scale in self.layer_scales):
            return None
        return [1.0 if scale is None else scale for scale in self.layer_scales]

    @property
    def num_layers(self) -> int:
        return len(self.layer_sources)


@dataclass(frozen=True)
class _Slice:
    models: list[str]
    starts: list[int]
    length: int
    base_index: int | None
    source_params: list[Parameters | None]
    params: Parameters | None
    input_scale: float | None = None
    base: str | None = None  # the slice's base_model (or the config's), used or not


def open_models(config: MergeConfig) -> dict[str, ModelFolder]:
    """Open every model the config references (adapters over ``base_model``, see
    :func:`evomerge.io.source.open_model`) and check they share one architecture."""
    opened: dict = {}
    models = {name: open_model(name, config.base_model, opened=opened) for name in config.referenced_models()}
    check_compatible(models)
    return models


def check_compatible(models: dict[str, ModelFolder]) -> None:
    """Raise ModelError unless all ``models`` share one architecture and width."""
    first_name, first = next(iter(models.items()))
    for name, folder in models.items():
        for key in ("model_type", "architectures", "hidden_size", "n_embd"):
            if folder.config.get(key) != first.config.get(key):
                raise ModelError(f"{name} and {first_name} have different architectures "
                                 f"({key}: {folder.config.get(key)!r} vs {first.config.get(key)!r})")


def _slices(config: MergeConfig, method: MergeMethod, models: dict[str, ModelFolder]) -> list[_Slice]:
    if config.models:
        inputs, base_index = input_models(method, [m.model for m in config.models], config.base_model)
        depths = {name: num_layers(models[name].config) for name in inputs}
        if len(set(depths.values())) > 1:
            raise ModelError(f"models have different depths {depths}; use slices to merge them")
        params = {m.model: m.parameters for m in config.models}
        return [_Slice(inputs, [0] * len(inputs), next(iter(depths.values())), base_index,
                       [params.get(name) for name in inputs], None, base=config.base_model)]
    result = []
    for output_slice in config.slices:
        names = [s.model for s in output_slice.sources]
        inputs, base_index = input_models(method, names, output_slice.base_model or config.base_model)
        sources = {s.model: s for s in output_slice.sources}
        first = output_slice.sources[0]
        scaled = [s for s in output_slice.sources if s.input_scale is not None]
        if scaled and method.name != "passthrough":
            raise ConfigError(f"input_scale needs merge_method passthrough, not {method.name}",
                              field="slices.sources.input_scale")
        starts = [sources[n].layer_range[0] if n in sources else first.layer_range[0] for n in inputs]
        length = first.layer_range[1] - first.layer_range[0]
        for name, start in zip(inputs, starts):
            depth = num_layers(models[name].config)
            if start + length > depth:
                raise ConfigError(f"layer_range [{start}, {start + length}] exceeds the {depth} "
                                  f"layers of {name}", field="slices")
        result.append(_Slice(inputs, starts, length, base_index,
                             [sources[n].parameters if n in sources else None for n in inputs],
                             output_slice.parameters, first.input_scale,
                             output_slice.base_model or config.base_model))
    return result


def _op(name: str, input_names: list[str], part: _Slice, t: float, layer: int | None,
        config: MergeConfig, method: MergeMethod, models: dict[str, ModelFolder],
        family: Family, seed: int, vocabulary: Vocabulary | None = None) -> TensorOp:
    for model, tensor in zip(part.models, input_names):
        if tensor not in models[model]:
            raise ModelError(f"{model} has no tensor {tensor}")
    shared_scopes = [part.params, config.parameters]
    shared = {p.name: resolve(p, shared_scopes, name, t) for p in method.params if p.scope == "shared"}
    per_input = []
    for i, (model, tensor) in enumerate(zip(part.models, input_names)):
        scopes = [part.source_params[i], part.params, config.parameters]
        is_base = i == part.base_index
        per_input.append({p.name: resolve(p, scopes, tensor, t) for p in method.params
                          if p.scope == "input" or (p.scope == "non_base" and not is_base)})
        _check_resolved(method, per_input[-1], name, model)
    shapes = [models[m].shape(n) for m, n in zip(part.models, input_names)]
    crop = None
    if vocabulary is not None and is_vocab_tensor(name, family):
        if len({s[1:] for s in shapes}) > 1:
            detail = ", ".join(f"{m}: {list(s)}" for m, s in zip(part.models, shapes))
            raise ModelError(f"tensor {name} has different shapes ({detail})")
        vocab = row_map(vocabulary, part.models, part.base, shapes, name)
        return TensorOp(name, tuple(zip(part.models, input_names)), part.base_index, shared, tuple(per_input),
                        tuple(random_key(seed, name, i) for i in range(len(part.models))), layer, vocab=vocab)
    if len(set(shapes)) > 1:
        same_tail = len({s[1:] for s in shapes}) == 1
        if not (same_tail and is_vocab_tensor(name, family)):
            detail = ", ".join(f"{m}: {list(s)}" for m, s in zip(part.models, shapes))
            raise ModelError(f"tensor {name} has different shapes ({detail})")
        crop = min(s[0] for s in shapes)
    return TensorOp(name, tuple(zip(part.models, input_names)), part.base_index, shared,
                    tuple(per_input), tuple(random_key(seed, name, i) for i in range(len(part.models))),
                    layer, crop)


def _check_resolved(method: MergeMethod, values: dict[str, Any], tensor: str, model: str) -> None:
    density, epsilon = values.get("density"), values.get("epsilon")
    if epsilon is not None and density is not None and density < 1 and not (
            0 < density - epsilon and density + epsilon < 1):
        raise ConfigError(f"{method.name}: density ± epsilon must stay inside (0, 1) for {model} "
                          f"{tensor} (density={density}, epsilon={epsilon})", field="parameters")


def build_plan(config: MergeConfig, models: dict[str, ModelFolder], seed: int = 0,
               vocabulary: Vocabulary | None = None) -> MergePlan:
    """Resolve ``config`` against the opened ``models`` into one op per output tensor.

    ``vocabulary``: the config's output vocabulary when already built (the materializer builds
    it once); by default it is built here when the config sets a tokenizer. Config errors found
    only now (resolved parameters, layer ranges, ``tokens`` entries) name the config's file.
    """
    try:
        return _build_plan(config, models, seed, vocabulary)
    except ConfigError as error:
        raise error.in_file(config.source) from None


def output_vocabulary(config: MergeConfig, models: dict[str, ModelFolder]) -> Vocabulary | None:
    """The config's output vocabulary (None when it sets no tokenizer)."""
    settings = config.tokenizer_settings()
    if settings is None:
        return None
    return build_vocabulary(settings, config.base_model, config.referenced_models(), models)


def _build_plan(config: MergeConfig, models: dict[str, ModelFolder], seed: int,
                vocabulary: Vocabulary | None) -> MergePlan:
    method = config.method
    parts = _slices(config, method, models)
    if vocabulary is None:
        vocabulary = output_vocabulary(config, models)
    template = config.base_model if config.base_model in models else parts[0].models[0]
    family = family_for(models[template].config)
    names = models[template].names()
    non_layer = [n for n in names if layer_index(n, family) is None]
    pre = [n for n in non_layer if tensor_kind(n) == "embed"]
    post = [n for n in non_layer if n not in pre]

    ops: list[TensorOp] = []
    for name in pre:
        ops.append(_op(name, [name] * len(parts[0].models), parts[0], 0.0, None, config, method,
                       models, family, seed, vocabulary))
    layer_sources: list[tuple[str, int]] = []
    layer_scales: list[float | None] = []
    by_layer: dict[str, dict[int, list[str]]] = {}
    for part in parts:
        lead_model, lead_start = part.models[0], part.starts[0]
        if lead_model not in by_layer:
            by_layer[lead_model] = {}
            for n in models[lead_model].names():
                by_layer[lead_model].setdefault(layer_index(n, family), []).append(n)
        for offset in range(part.length):
            t = offset / (part.length - 1) if part.length > 1 else 1.0
            out_layer = len(layer_sources)
            for lead_name in by_layer[lead_model].get(lead_start + offset, []):
                inputs = [with_layer(lead_name, family, start + offset) for start in part.starts]
                ops.append(_op(with_layer(lead_name, family, out_layer), inputs, part, t, out_layer,
                               config, method, models, family, seed))
            layer_sources.append((lead_model, lead_start + offset))
            layer_scales.append(part.input_scale)
    for name in post:
        ops.append(_op(name, [name] * len(parts[-1].models), parts[-1], 0.0, None, config, method,
                       models, family, seed, vocabulary))
    crops = [op.crop_rows for op in ops if op.crop_rows is not None]
    vocab_size = vocabulary.size if vocabulary is not None else min(crops) if crops else None
    return MergePlan(config, method, ops, template, family, layer_sources, vocab_size=vocab_size,
                     layer_scales=layer_scales, vocabulary=vocabulary)


def output_config(plan: MergePlan, models: dict[str, ModelFolder], out_dtype_name: str | None) -> dict:
    """The output ``config.json``: the template's, with depth, dtype and vocabulary updated."""
    config = dict(models[plan.template].config)
    source_depth = num_layers(config)
    depth_key = next(k for k in (plan.family.num_layers_key, "num_hidden_layers", "n_layer")
                     if k in config)
    config[depth_key] = plan.num_layers
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == source_depth:
        config["layer_types"] = [models[m].config.get("layer_types", layer_types)[i]
                                 for m, i in plan.layer_sources]
    if out_dtype_name:
        dtype_key = "torch_dtype" if "torch_dtype" in config else "dtype"
        config[dtype_key] = str(torch_dtype(out_dtype_name)).removeprefix("torch.")
    if plan.vocab_size is not None:
        config[plan.family.vocab_size_key] = plan.vocab_size
    if plan.input_scales is not None:
        config[INPUT_SCALES_KEY] = plan.input_scales
    return config
