"""The fast in-memory materializer: merge candidates written in place into one live model.

A search evaluates hundreds of candidates over the same models. :class:`Materializer`
loads the base and the sources once, keeps them resident (on the compute device, or where its
memory plan puts them) and owns
one live ``transformers`` model; :meth:`Materializer.apply` executes any plan the merge
engine accepts (the same :func:`~evomerge.engine.execute.execute_op` the engine runs, so the
weights are bit-identical to ``evomerge merge``) and writes each merged tensor into the
live model's parameters in place (the kernels write into them directly).

What a candidate would otherwise recompute is cached per source tensor, on the first
candidate of a method that needs it (:mod:`evomerge.live.caches`: magnitude positions,
DELLA ranks, random words), for the kinds the memory allows (``trim_cache``); a trim
whose kind is not kept runs cache-free with the same result. Kernel temporaries come from
one reusable workspace, so after the first candidate a candidate allocates nothing of the model's size. The memory this
takes is bounded by :mod:`evomerge.live.memory`'s formula, checked before loading.

A tensor larger than the block limit (``block_limit``; by default none when every input fits on
the device with every tensor merged whole, else the largest tensor whose rows are not the
vocabulary, :func:`~evomerge.live.tiers.plan_blocks`) is merged in blocks of whole rows when its
method allows it (:mod:`evomerge.methods.blocked`: linear and the
task-arithmetic family, bit-identical to the whole tensor): its inputs are brought, and an
adapter's weight formed, one row block at a time (the rows of B), in one pass per step of the
method (a magnitude cut's radix-select passes, an L1 rescale's sums, the merge), so that every
temporary is sized by the block; those tensors use no trim caches. Told the methods a search
may run (``methods``), the memory plan counts only their terms, and block-sized ones when every
method merges in row blocks.

Where the inputs live is planned before loading (:mod:`evomerge.live.tiers`, logged as one
paragraph): each tensor of the base and the sources, and each LoRA factor, on the device, in
(pinned) host memory or left in the memory-mapped files, filling the device first within
``max_memory`` (default: its free memory), then host memory within ``max_host_memory``; the
inputs off the device are brought in per op through staging buffers, on CUDA overlapping the
previous op's kernels (:mod:`evomerge.live.inputs`). Candidates are bit-identical whatever the
tiers. ``resident_dtype`` (e.g. bfloat16 under float32 merges) keeps the inputs in a narrower
dtype, rounded once, and casts each to the merge dtype per op: candidates then differ from the
full-precision ones by that rounding (the plan says so).

Layer stacking (passthrough slices, repeated layers, data-flow plans) does not copy:
each output position is a layer module whose parameters *are* the resident tensors of
the source layer (when they are on the device in the merge dtype), and ``input_scale``
becomes a forward pre-hook. Depth may change from one candidate to the next.

The live model is what ``from_pretrained`` returns; if that maps the base's file lazily,
the first candidate's in-place writes copy those pages.

A LoRA adapter source (:mod:`evomerge.io.adapter`) stays low-rank: its factors A, B and
scale per adapted weight are its inputs (kept in ``promote(dtype, float32)``), its other tensors
are the base's own, and each op forms the adapted weight ``W + scale·B@A`` in a scratch
buffer of its own (one per adapter input of the op) with the same formula the merge
engine's adapter view uses (:func:`~evomerge.io.adapter.lora_dense`), so candidates stay
bit-identical to ``evomerge merge`` on CPU (on CUDA the product B@A runs on the device while
the engine's adapter view forms it on CPU, so those weights may differ by float32 rounding).
K adapters of the base cost K·r·(in+out) per adapted weight instead of K full models.

The full sources are kept as they are, not as task vectors: the engine subtracts in the
working dtype and non-task-arithmetic methods (slerp, linear, model stock) need the
sources themselves, so this keeps every method exact for the same memory.

The live model's vocabulary is fixed once, when the materializer is built: the base's own
rows and tokenizer, or with ``tokenizer`` (a ``tokenizer_source`` value or a ``tokenizer:``
block, as in a merge config) the output vocabulary it builds over the base and the sources
(:mod:`evomerge.engine.tokenizer`); the live model is then resized to its rows once and
:attr:`Materializer.tokenizer` is that tokenizer. A config whose output vocabulary differs
(another tokenizer setting, or a union over other models) is refused. Each candidate re-maps
the embedding/head inputs' rows into scratch (one vocabulary tensor per input) and these ops
use no trim caches.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from evomerge.engine.architecture import family_for, layer_index, with_layer
from evomerge.engine.config import MergeConfig, TokenizerSettings, load_config, torch_dtype
from evomerge.engine.execute import execute_op, resolve_device
from evomerge.engine.inspect import check_sources
from evomerge.engine.plan import (
    MergePlan,
    TensorOp,
    build_plan,
    check_compatible,
    output_config,
    output_vocabulary,
)
from evomerge.engine.tokenizer import Vocabulary, build_vocabulary
from evomerge.errors import ConfigError, ModelError
from evomerge.io.adapter import AdapterFolder, LoraFactors, is_adapter, lora_dense
from evomerge.io.reader import ModelFolder
from evomerge.io.source import source_key, split_reference
from evomerge.live.caches import CACHE_NAMES, CacheStore
from evomerge.live.inputs import TieredInputs
from evomerge.live.inputs import Need
from evomerge.live.memory import TrimCacheMode, check_block_limit, method_terms
from evomerge.live.tiers import Key, Tier, open_inputs, plan_blocks, plan_tiers
from evomerge.live.modeling import checkpoint_names, layer_list_path, set_input_scale, set_parameter
from evomerge.methods.blocked import RowBlocked, block_rows
from evomerge.methods.sparsify import Caches

log = logging.getLogger(__name__)


class Materializer:
    """Base + sources held for ``device``; :meth:`apply` turns a plan into the live model.

    ``dtype`` (default: the base's) is the dtype models are merged in; a config
    whose ``dtype``/``out_dtype`` names another one is refused, so every candidate equals
    ``evomerge merge`` of the same config with ``dtype: <this dtype>``. Memory
    (:mod:`evomerge.live.tiers`): ``max_memory`` bytes on the device (default: its free memory)
    and ``max_host_memory`` in host memory (CUDA; default: available less a margin) are filled
    with the inputs, device first; ``tier`` forces every input into one tier (``device``,
    ``host``, ``mmap``: the files, per candidate); ``resident_dtype`` keeps them in that narrower
    dtype (rounded once; not bit-identical to full-precision inputs). ``trim_cache``
    chooses the per-source caches (positions, ranks, random words): ``auto`` keeps the kinds
    that fit in what the inputs leave on the device, ``on`` all of them (refused
    when they do not fit), ``off`` none; trims of the kinds not kept run cache-free
    (:mod:`evomerge.methods.select`), with the same result (:func:`~evomerge.live.memory.cached_kinds`). ``tokenizer``:
    the live model's output vocabulary (``"base"``, ``"union"``, a model path or a
    :class:`~evomerge.engine.config.TokenizerSettings`); default: the base's rows. ``methods``:
    the merge methods :meth:`apply` will be given (None: any; another one is refused), which
    the memory plan counts; ``block_limit``: the most elements a kernel call merges at once
    before a row-blocked method splits a tensor in row blocks (a positive int; default: none
    when every input fits on the device with whole tensors, since blocks cost the trims extra
    passes and their caches, else :func:`~evomerge.live.memory.default_block_limit`, so that
    only the vocabulary tensors split; :func:`~evomerge.live.tiers.plan_blocks`). The plan
    counts the blocks only when every method of ``methods`` merges in row blocks; with a
    ``tokenizer`` (its re-mapped vocabulary tensors are merged whole) nothing is blocked.
    """

    def __init__(self, base: str | Path, sources: Sequence[str | Path], *,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 max_memory: int | None = None, max_host_memory: int | None = None,
                 resident_dtype: torch.dtype | None = None, tier: Tier | None = None,
                 trim_cache: TrimCacheMode = "auto", progress: bool = False,
                 tokenizer: str | TokenizerSettings | None = None, methods: Sequence[str] | None = None,
                 block_limit: int | None = None):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        if split_reference(base)[1] is not None or is_adapter(base):
            raise ModelError(f"{base}: the materializer's base must be a model folder, not an adapter")
        self.folders = open_inputs(base, sources)
        check_compatible({str(p): folder for p, folder in self.folders.items()})
        self.base_path = source_key(base)
        for folder in self.folders.values():
            if isinstance(folder, AdapterFolder) and folder.base.path.resolve() != self.base_path:
                raise ModelError(f"{folder.reference}: an adapter of {folder.base.path}, not of the "
                                 f"materializer's base {self.base_path}")
        check_sources(self.folders[self.base_path], [f for p, f in self.folders.items() if p != self.base_path])
        base_folder = self.folders[self.base_path]
        self.dtype = dtype or next(stored for stored in map(base_folder.dtype, base_folder.names())
                                   if stored.is_floating_point)
        self.methods = None if methods is None else tuple(dict.fromkeys(methods))
        options = dict(device=self.device, dtype=self.dtype, resident_dtype=resident_dtype, max_memory=max_memory,
                       max_host_memory=max_host_memory, trim_cache=trim_cache, tier=tier, methods=self.methods)
        if tokenizer is not None:  # its re-mapped vocabulary tensors are merged whole
            self.memory_plan = plan_tiers(self.folders, self.base_path, **options)
        else:
            limit = None if block_limit is None else check_block_limit(block_limit)
            self.memory_plan = plan_blocks(self.folders, self.base_path, block_limit=limit, **options)
        self.block_limit = self.memory_plan.block  # None: every tensor merged whole
        self.bound = self.memory_plan.bound
        log.info("%s", self.memory_plan.summary())
        uncached = [CACHE_NAMES[kind] for kind in method_terms(self.methods).kinds if kind not in self.bound.cached]
        if uncached and trim_cache == "auto":
            log.info("trims without cached %s (over the memory budget): cache-free, same results",
                     ", ".join(uncached))
        self.progress = progress
        self._adapter_scratch: list[torch.Tensor] = []  # per adapter input of an op: its formed weight
        compute = torch.promote_types(self.dtype, torch.float32)
        self._product = torch.empty(0, dtype=compute, device=self.device)  # scale·B@A
        self.inputs = TieredInputs(self.memory_plan, self.folders, progress=progress)
        self.caches = CacheStore(self.device, self.bound.cached)
        self.vocabulary = self._live_vocabulary(tokenizer)
        self._vocabularies: dict[tuple, Vocabulary | None] = {}
        self.model, self.tokenizer = self._live_model()
        self._prepare_layers()

    # -- loading ---------------------------------------------------------------------------

    def _live_vocabulary(self, tokenizer: str | TokenizerSettings | None) -> Vocabulary | None:
        if tokenizer is None:
            return None
        settings = tokenizer if isinstance(tokenizer, TokenizerSettings) else TokenizerSettings(source=tokenizer)
        names = [str(path) for path in self.folders]
        return build_vocabulary(settings, str(self.base_path), names,
                                {str(path): folder for path, folder in self.folders.items()})

    def _live_model(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=self.dtype)
        model = model.to(self.device).eval().requires_grad_(False)
        if self.vocabulary is not None:
            model.resize_token_embeddings(self.vocabulary.size, mean_resizing=False)
            return model, self.vocabulary.tokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        except (OSError, ValueError):
            log.warning("%s has no tokenizer; the live model has none", self.base_path)
            tokenizer = None
        return model, tokenizer

    def _prepare_layers(self) -> None:
        """Split the live model into its non-layer parameters and per-position layer slots."""
        base = self.folders[self.base_path]
        self.family = family_for(base.config)
        names = [n for n, _ in self.model.named_parameters()]
        self._layer_path = layer_list_path(names, self.family)
        layers = self.model.get_submodule(self._layer_path)
        self._base_layers = list(layers)
        # owned storage: position -> {parameter name within the layer: tensor}
        self._owned = [dict(layer.named_parameters()) for layer in self._base_layers]
        self._shells: dict[tuple[int, int], nn.Module] = {}
        self._skeletons: dict[int, nn.Module] = {}
        live = dict(self.model.named_parameters(remove_duplicate=False))
        live.update(self.model.named_buffers())
        self._module_names = checkpoint_names(self.model)
        self._live = {name: live[module] for name, module in self._module_names.items()}

    # -- applying a plan -------------------------------------------------------------------

    def plan(self, config: MergeConfig | str | Path, seed: int = 0) -> MergePlan:
        """Build the engine's plan for ``config`` over the resident models."""
        config = config if isinstance(config, MergeConfig) else load_config(config)
        if self.methods is not None and config.merge_method not in self.methods:
            raise ConfigError(f"merge_method {config.merge_method} is not among the materializer's methods "
                              f"({', '.join(self.methods)}), which its memory plan counts",
                              file=config.source, field="merge_method")
        models = {}
        for name in config.referenced_models():
            path = source_key(name)
            if path not in self.folders:
                raise ConfigError(f"model {name} is not loaded in the materializer "
                                  f"(loaded: {', '.join(str(p) for p in self.folders)})",
                                  file=config.source, field="models")
            models[name] = self.folders[path]
        for field in ("dtype", "out_dtype"):
            wanted = torch_dtype(getattr(config, field))
            if wanted is not None and wanted != self.dtype:
                raise ConfigError(f"the materializer works in {self.dtype}, not {wanted}",
                                  file=config.source, field=field)
        return build_plan(config, models, seed, self._config_vocabulary(config, models))

    def _config_vocabulary(self, config: MergeConfig, models: dict[str, ModelFolder]) -> Vocabulary | None:
        """The config's output vocabulary (built once per tokenizer setting and models), refused
        unless it is the live model's."""
        settings = config.tokenizer_settings()
        key = (settings.model_dump_json() if settings else None, config.base_model, tuple(models))
        if key not in self._vocabularies:
            self._vocabularies[key] = None if settings is None else output_vocabulary(config, models)
        vocabulary = self._vocabularies[key]
        live = self.model.get_input_embeddings().weight.shape[0]
        if vocabulary is None and self.vocabulary is None:
            return None
        if vocabulary is None:
            detail = "this config sets no tokenizer"
        else:
            tokens = self.vocabulary.tokens if self.vocabulary is not None else (
                self.tokenizer.get_vocab() if self.tokenizer is not None else None)
            if vocabulary.size == live and vocabulary.tokens == tokens:
                return vocabulary
            detail = f"this config's tokenizer gives {vocabulary.length} tokens in {vocabulary.size} rows"
        raise ConfigError(f"the live model's vocabulary ({live} rows) is fixed once per materializer and "
                          f"{detail}; build the Materializer with tokenizer= this config's setting",
                          file=config.source, field="tokenizer")

    def apply(self, config: MergeConfig | MergePlan | str | Path, *, seed: int = 0) -> nn.Module:
        """Write the merge of ``config`` (or a prebuilt plan) into the live model; return it."""
        plan = config if isinstance(config, MergePlan) else self.plan(config, seed)
        paths = {name: source_key(name) for name in plan.config.referenced_models()}
        layers = self._layer_modules(plan)
        building = self.caches.to_build(plan)
        if building:
            log.info("first %s candidate: caching the task vectors' %s (once; later candidates reuse them)",
                     plan.method.name, building)
        units: list[tuple[TensorOp, RowBlocked | None, int]] = []  # (op, its row blocks, unit)
        needs: list[Need] = []
        for op in plan.ops:
            blocked = self._row_blocked(op, plan, paths)
            if blocked is None:
                units.append((op, None, 0))
                needs.append(self._needs(op, plan, paths))
            for unit, (_, rows) in enumerate(blocked.units if blocked is not None else ()):
                units.append((op, blocked, unit))
                needs.append(self._needs(op, plan, paths, rows))
        with torch.no_grad():
            for (op, blocked, unit), parts in tqdm(zip(units, self.inputs.stream(needs)), total=len(units),
                                                   desc=f"caching {building}", unit="tensor", leave=False,
                                                   disable=not (building and self.progress)):
                self._apply_op(op, plan, paths, layers, parts, blocked, unit)
        for layer, scale in zip(layers, plan.layer_scales):
            set_input_scale(layer, scale)
        self._set_layers(layers, plan)
        return self.model

    def _layer_modules(self, plan: MergePlan) -> list[nn.Module]:
        """One module per output position, shaped like the base layer it is taken from."""
        modules = []
        for position, (_, index) in enumerate(plan.layer_sources):
            if position == index:
                modules.append(self._base_layers[index])
                continue
            key = (position, index)
            if key not in self._shells:
                self._shells[key] = self._shell(position, index)
            modules.append(self._shells[key])
        return modules

    def _shell(self, position: int, index: int) -> nn.Module:
        """A copy of base layer ``index``'s structure (no parameters) serving ``position``."""
        if index not in self._skeletons:
            layer = self._base_layers[index]
            saved = dict(layer.named_parameters())
            for name in saved:
                set_parameter(layer, name, None)
            try:
                self._skeletons[index] = copy.deepcopy(layer)
            finally:
                for name, parameter in saved.items():
                    set_parameter(layer, name, parameter)
        shell = copy.deepcopy(self._skeletons[index])
        for module in shell.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
        for name, parameter in self._owned_slots(position, index).items():
            set_parameter(shell, name, parameter)
        return shell

    def _owned_slots(self, position: int, like: int) -> dict[str, nn.Parameter]:
        while len(self._owned) <= position:
            self._owned.append({name: nn.Parameter(torch.empty_like(p), requires_grad=False)
                                for name, p in self._owned[like].items()})
        return self._owned[position]

    def _row_blocked(self, op: TensorOp, plan: MergePlan, paths: dict[str, Path]) -> RowBlocked | None:
        """``op``'s row-blocked run when its method merges in row blocks and its (cropped)
        floating tensor exceeds the block limit, unless its rows are re-mapped (a tokenizer)."""
        model, name = op.inputs[0]
        part = self.inputs.parts[self._dense_key(paths[model], name)]
        if (self.block_limit is None or not plan.method.rows or op.vocab is not None
                or not part.stored.is_floating_point or not part.shape):
            return None
        shape = (op.crop_rows or part.shape[0], *part.shape[1:])
        rows = block_rows(shape, self.block_limit, self.device)
        if rows is None:
            return None
        return RowBlocked(plan.method, op.shared, op.per_input, op.keys, op.base_index, shape, self.dtype, rows)

    def _apply_op(self, op: TensorOp, plan: MergePlan, paths: dict[str, Path], layers: list[nn.Module],
                  parts: dict[Key, torch.Tensor], blocked: RowBlocked | None = None, unit: int = 0) -> None:
        """Merge ``op`` (with ``blocked``: its row-blocked run's ``unit``) into the live model."""
        if op.layer is None:
            self._compute_into(op, plan, paths, self._live[op.name], parts, blocked, unit)
            return
        first_layer_name = self._module_names[with_layer(op.name, plan.family, 0)]
        local = first_layer_name[len(self._layer_path) + 1:].split(".", 1)[1]
        reference = self._reference(op, plan, paths)
        if reference is None:
            reference = self._owned_slots(op.layer, layer_index(op.inputs[0][1], plan.family))[local]
            self._compute_into(op, plan, paths, reference, parts, blocked, unit)
        set_parameter(layers[op.layer], local, reference)

    def _reference(self, op: TensorOp, plan: MergePlan, paths: dict[str, Path]) -> nn.Parameter | None:
        """The resident tensor itself when the op is an unscaled pass-through of one input that the
        device tier holds in the merge dtype."""
        if (plan.method.name != "passthrough" or op.crop_rows is not None
                or op.vocab is not None or op.per_input[0]["scale"] is not None):
            return None
        model, name = op.inputs[0]
        if self._factors(paths[model], name) is not None:
            return None  # formed in scratch
        return self.inputs.resident(self._dense_key(paths[model], name))

    def _factors(self, path: Path, name: str) -> LoraFactors | None:
        """The LoRA factors of ``name`` when ``path`` is an adapter that adapts it."""
        folder = self.folders[path]
        return folder.factors.get(name) if isinstance(folder, AdapterFolder) else None

    def _dense_key(self, path: Path, name: str) -> Key:
        """The dense input that holds ``name`` of ``path`` (an adapter's: its base's)."""
        return (self.base_path if isinstance(self.folders[path], AdapterFolder) else path, name, "")

    def _needs(self, op: TensorOp, plan: MergePlan, paths: dict[str, Path], rows: slice | None = None) -> Need:
        """The input parts ``op`` reads (none when its layer takes a resident tensor as it is),
        or with ``rows`` those its row block reads: the dense parts' rows, an adapter's rows of
        B (of a transposed weight: columns of A)."""
        if op.layer is not None and self._reference(op, plan, paths) is not None:
            return {}
        dense = None if rows is None else (rows,)
        need: dict[Key, tuple[slice, ...] | None] = {}
        for model, name in op.inputs:
            path = paths[model]
            need[self._dense_key(path, name)] = dense
            factors = self._factors(path, name)
            if factors is not None:
                columns = None if rows is None else (slice(None), rows)
                need[(path, name, "a")] = columns if factors.transpose else None
                need[(path, name, "b")] = None if factors.transpose else dense
        return need

    def _input(self, path: Path, name: str, slot: int, parts: dict[Key, torch.Tensor]) -> torch.Tensor:
        """Input ``slot`` of an op: a brought part, or an adapter's weight formed in scratch."""
        weight = parts[self._dense_key(path, name)]
        factors = self._factors(path, name)
        if factors is None:
            return weight
        factors = dataclasses.replace(factors, a=parts[(path, name, "a")], b=parts[(path, name, "b")])
        while len(self._adapter_scratch) <= slot:
            self._adapter_scratch.append(torch.empty(0, dtype=self.dtype, device=self.device))
        if self._adapter_scratch[slot].numel() < weight.numel():
            self._adapter_scratch[slot] = torch.empty(weight.numel(), dtype=self.dtype, device=self.device)
        rows, columns = factors.b.shape[0], factors.a.shape[1]
        if self._product.numel() < rows * columns:
            self._product = torch.empty(rows * columns, dtype=self._product.dtype, device=self.device)
        out = self._adapter_scratch[slot][:weight.numel()].view(weight.shape)
        return lora_dense(weight, factors, self.dtype, out=out,
                          product=self._product[:rows * columns].view(rows, columns))

    def _compute_into(self, op: TensorOp, plan: MergePlan, paths: dict[str, Path], target: torch.Tensor,
                      parts: dict[Key, torch.Tensor], blocked: RowBlocked | None = None, unit: int = 0) -> None:
        """Merge ``op`` into ``target`` in place (kernels write into it directly when they can);
        with ``blocked``, its row-blocked run's ``unit`` (``parts``: that block's rows)."""
        tensors = [self._input(paths[model], name, slot, parts) for slot, (model, name) in enumerate(op.inputs)]
        if blocked is not None:
            if blocked.shape != target.shape:
                raise ModelError(f"{op.name}: merged shape {list(blocked.shape)} != live model's "
                                 f"{list(target.shape)} (the materializer needs equal vocabularies)")
            rows = target[blocked.units[unit][1]]
            out = rows if target.dtype == self.dtype else None
            merged = blocked.feed(unit, [t.to(self.dtype) for t in tensors], self.caches.workspace, out)
            if merged is not None and merged is not out:
                rows.copy_(merged)
            return
        rows = op.vocab.size if op.vocab is not None else op.crop_rows or tensors[0].shape[0]
        shape = (rows, *tensors[0].shape[1:]) if tensors[0].dim() else tensors[0].shape
        if shape != target.shape:
            raise ModelError(f"{op.name}: merged shape {list(shape)} != live model's "
                             f"{list(target.shape)} (the materializer needs equal vocabularies)")
        out = target if target.dtype == self.dtype else None
        caches = (Caches(workspace=self.caches.workspace) if op.vocab is not None  # inputs re-mapped per candidate
                  else self.caches.for_op(op, plan, paths, tensors))
        merged = execute_op(op, plan, tensors, caches=caches, out=out)
        if merged is not target:
            target.copy_(merged)

    def _set_layers(self, layers: list[nn.Module], plan: MergePlan) -> None:
        parent_path, _, attribute = self._layer_path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, attribute, nn.ModuleList(layers))
        models = {name: self.folders[source_key(name)] for name in plan.config.referenced_models()}
        updated = output_config(plan, models, None)
        for key in (self.family.num_layers_key, "num_hidden_layers", "n_layer", "layer_types"):
            if key in updated:
                setattr(self.model.config, key, updated[key])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live model's current weights under checkpoint names (references, not copies)."""
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, self.model.state_dict())

