"""``evomerge init``: an experiment written for your own models, with a comment on every choice.

:func:`plan_experiment` inspects a base and its sources (the compatibility check of
:mod:`evomerge.engine.inspect`, then architecture, depth, dtype, parameter count, which sources
are LoRA adapters, and the materializer's memory bound of :mod:`evomerge.live.memory` on the
chosen device) and chooses:

* the search space: an inline ``parameter`` space, TIES weights and densities when every source
  is a full model, there are at least two and the trim caches fit in memory, else task-arithmetic
  weights (adapters: the dense trim caches would cost what the low-rank factors save); a
  ``layer_granularity`` from the depth so that the gene count stays at most :data:`MAX_GENES`;
* the optimizer: CMA-ES with its default population ``4 + ⌊3 ln n⌋`` for ``n`` genes;
* the budget: that population times ``n`` generations (between 10 and 40);
* a fitness that loads as written: a ``perplexity`` metric on placeholder text files written
  next to the experiment (to replace), with commented-out ``lm_eval`` metrics to fill in.

:func:`write_experiment` writes the experiment (atomically) and the placeholder files that do
not exist yet; nothing is written when the models do not fit together.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from evomerge.engine.architecture import num_layers
from evomerge.engine.config import DTYPES
from evomerge.engine.inspect import AUTO_SAMPLE, CompatReport, inspect_models
from evomerge.errors import EvomergeError, ModelError
from evomerge.io.adapter import AdapterFolder, is_adapter
from evomerge.io.source import open_model, split_reference
from evomerge.io.writer import write_text_atomic
from evomerge.live.memory import MemoryBound, available_bytes, default_block_limit, gb, memory_bound
from evomerge.live.tiers import input_parts
from evomerge.methods.sparsify import CACHE_KINDS
from evomerge.search.experiment import parse_experiment

log = logging.getLogger(__name__)

MAX_GENES = 32  # the most genes the chosen layer granularity gives (when one group does not exceed it)
SIGMA0 = 0.2
DEFAULT_CONTEXT = 1024
PLACEHOLDER = (
    "This file is a placeholder written by evomerge init. Replace it with text from the domain your merge "
    "should be good at: a few hundred kilobytes of held-out documents, one per line in a .jsonl file with a "
    "text field, or plain text in a .txt file. The search split scores every candidate; the test split is only "
    "read by the reports, so keep the two files disjoint.\n"
    "Merging fine-tuned models that share a base adds their task vectors, the differences between each "
    "fine-tune and the base, with weights chosen for each group of layers. The search looks for the weights "
    "that make the merged model best on the fitness, here the perplexity of this text.\n"
)


@dataclass
class ModelInfo:
    """What :func:`inspect_for_init` found out about the models."""

    base: str
    sources: list[str]
    adapters: list[bool]
    architecture: str
    depth: int
    dtype: str
    parameters: int
    max_positions: int | None
    report: CompatReport
    device: str
    available: int | None  # bytes free on the device (None: the device is not on this machine)
    bounds: dict[bool, MemoryBound] = field(default_factory=dict)  # TIES with its caches / task arithmetic


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def inspect_for_init(base: str, sources: list[str], device: str = "auto") -> ModelInfo:
    """Open and check the models (raises :class:`ModelError` when they cannot be merged) and
    measure them; ``device`` is cpu, cuda, cuda:N or auto (CUDA when available)."""
    if split_reference(base)[1] is not None or is_adapter(base):
        raise ModelError(f"{base}: the base must be a model folder, not an adapter")
    for path in [base, *sources]:
        if not all(Path(part).is_dir() for part in split_reference(path) if part):
            raise ModelError(f"model folder not found: {path}")
    base_folder = open_model(base)
    folders = [open_model(s, base_folder) for s in sources]
    report = inspect_models(base_folder, folders, sample=AUTO_SAMPLE)
    name = next((n for n in base_folder.names() if base_folder.head(n, 1).is_floating_point()), None)
    if name is None:
        raise ModelError(f"{base} has no floating-point tensor to merge")
    dtype = base_folder.head(name, 1).dtype
    config = base_folder.config
    positions = next((config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx")
                      if isinstance(config.get(k), int)), None)
    resolved, available = _device(device)
    inputs = {Path(base): base_folder, **{Path(s): f for s, f in zip(sources, folders)}}
    resident = sum(part.kept_bytes for part in input_parts(inputs, Path(base), dtype))  # every input on the device
    bounds = {}
    for ties in (True, False):  # as the materializer plans: whole tensors when they fit, else row blocks
        for block in (None, default_block_limit(base_folder)):
            bounds[ties] = memory_bound(base_folder, [base_folder, *folders], dtype,
                                        cached=CACHE_KINDS if ties else (), resident=resident, staging=0,
                                        methods=("ties" if ties else "task_arithmetic",), block=block,
                                        device=torch.device(resolved))
            if available is None or bounds[ties].total <= available:
                break
    return ModelInfo(base=str(base), sources=[str(s) for s in sources],
                     adapters=[isinstance(f, AdapterFolder) for f in folders], architecture=report.architecture,
                     depth=num_layers(config), dtype=_dtype_name(dtype), parameters=base_folder.num_parameters(),
                     max_positions=positions, report=report, device=resolved, available=available, bounds=bounds)


def _device(device: str) -> tuple[str, int | None]:
    """The device to write and its free memory here (None when it is not on this machine)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise EvomergeError(f"--device: expected cpu, cuda, cuda:N or auto, got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        return device, None
    if resolved.type not in ("cpu", "cuda"):
        raise EvomergeError(f"--device: expected cpu, cuda, cuda:N or auto, got {device!r}")
    return device, available_bytes(resolved)


def choose_granularity(depth: int, per_layer_genes: int, max_genes: int = MAX_GENES) -> int:
    """Layers per group: the smallest number that keeps ``groups × per_layer_genes`` at most
    ``max_genes`` (the whole depth, one group, when even that is more), or a divisor of the depth
    up to 1.5 times that, so that the groups are equal (32 layers, 6 genes a layer: 8, not 7)."""
    depth = max(depth, 1)
    smallest = next((k for k in range(1, depth + 1) if math.ceil(depth / k) * per_layer_genes <= max_genes), depth)
    return next((k for k in range(smallest, int(1.5 * smallest) + 1) if depth % k == 0), smallest)


def popsize_for(genes: int) -> int:
    """CMA-ES's default population for ``genes`` dimensions."""
    return 4 + int(3 * math.log(max(genes, 1)))


def experiment_name(output: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", output.name.removesuffix(".yaml").removesuffix(".yml")).strip("-")
    return name or "experiment"


def _q(value: str) -> str:
    """A string as a YAML scalar (JSON's double-quoted strings are YAML)."""
    plain = re.fullmatch(r"[A-Za-z0-9_./:+-]+", value) and value[0] not in "-:" and yaml.safe_load(value) == value
    return value if plain else json.dumps(value)


def _relative(path: Path) -> str:
    """``path`` as the experiment names it: relative to the current directory when under it."""
    path = path.absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass
class Plan:
    """The experiment text and the placeholder data files it names."""

    text: str
    data: dict[str, Path]
    method: str
    genes: int
    info: ModelInfo
    warnings: list[str]


def plan_experiment(info: ModelInfo, output: Path, name: str | None = None) -> Plan:
    """The commented experiment YAML for ``info``, to be written at ``output``."""
    name = name or experiment_name(output)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise EvomergeError(f"--name {name!r}: expected letters, digits, '_', '-' and '.'")
    k_sources = len(info.sources)
    n_adapters = sum(info.adapters)
    warnings: list[str] = []
    available = info.available
    where = f"{info.device}" if available is not None else f"{info.device} (not on this machine: unchecked)"
    fits_caches = available is None or info.bounds[True].total <= available

    if n_adapters:
        method, why = "task_arithmetic", (f"{n_adapters} of the sources are LoRA adapters: task arithmetic keeps "
                                          "their low-rank saving (TIES's trim caches are dense)")
    elif k_sources < 2:
        method, why = "task_arithmetic", "one source: no sign conflicts for TIES to resolve"
    elif not fits_caches:
        method, why = "task_arithmetic", (f"TIES's trim caches ({gb(info.bounds[True].caches)}) do not fit in "
                                          f"the memory available on {info.device}")
    else:
        conflicts = [g.sign_conflicts for g in info.report.groups if g.sign_conflicts is not None]
        rate = f" (sign conflicts on {sum(conflicts) / len(conflicts):.0%} of the parameters two sources change)" \
            if conflicts else ""
        method, why = "ties", f"{k_sources} full models: TIES trims each task vector and elects signs{rate}"
    per_model = 2 if method == "ties" else 1
    per_layer = k_sources * per_model
    k = choose_granularity(info.depth, per_layer)
    groups = math.ceil(info.depth / k) if info.depth else 1
    genes = groups * per_layer
    popsize = popsize_for(genes)
    generations = min(max(genes, 10), 40)
    n_trials = popsize * generations
    needed = info.bounds[method == "ties"].total

    stem = output.name.removesuffix(".yaml").removesuffix(".yml")
    data = {split: output.parent / f"{stem}.{split}.txt" for split in ("search", "test")}
    context = min(DEFAULT_CONTEXT, info.max_positions or DEFAULT_CONTEXT)

    kinds = ["LoRA adapter (read as its base + B·A)" if a else "full model" for a in info.adapters]
    lines = [
        "# Written by `evomerge init` for these models; edit freely. Run it with",
        f"#   evomerge search {_relative(output)}",
        "# from this directory: relative paths (models, fitness data, storage) are from where you run it.",
        "#",
        f"# base: {info.architecture}, {info.depth} layers, {info.dtype}, {info.parameters / 1e6:.4g} M parameters",
    ]
    for stats, kind in zip(info.report.stats, kinds):
        lines.append(f"#   {stats.path}: {kind}, ‖τ‖/‖θ_base‖ {stats.relative_norm:.3g}, "
                     f"cos(θ, θ_base) {stats.cosine_to_base:.4f}: {stats.verdict}")
        if stats.verdict != "ok":
            warnings.append(f"{stats.path} {stats.reason}")
            lines.append(f"#   warning: {stats.reason}")
    lines += [
        f"name: {_q(name)}",
        "models:",
        f"  base: {_q(info.base)}",
        "  sources:",
        *[f"    - {_q(s)}  # {kind}" for s, kind in zip(info.sources, kinds)],
        "",
        f"# {method}: {why}.",
        f"# {info.depth} layers: layer_granularity {k} gives {groups} group{'s' * (groups != 1)} × {k_sources} "
        f"source{'s' * (k_sources != 1)}"
        + (f" (the last group has {info.depth - (groups - 1) * k} layers)" if info.depth % k else "")
        + (f" × 2 (weight, density) = {genes} genes" if method == "ties" else f" = {genes} weights")
        + f" (at most {MAX_GENES} where the depth allows: CMA-ES needs more trials for more genes).",
        "# Finer: a smaller layer_granularity; per attention / MLP values: filters: [self_attn, mlp] (×3 genes).",
        "search_space:",
        "  kind: parameter",
        f"  method: {method}",
        f"  layer_granularity: {k}",
        "  search:",
    ]
    if method == "ties":
        lines += ["    weight: [0.0, 1.0]",
                  "    density: [0.2, 1.0]  # the share of each task vector kept (largest magnitudes)",
                  "  fixed: {normalize: true, int8_mask: true}"]
    else:
        lines += ["    weight: [0.0, 1.0]  # a negative low lets a weight subtract a skill",
                  "  fixed: {lambda: 1.0}"]
    lines += [
        "",
        "# The fitness is valid as written so that `evomerge search` runs: the perplexity (lower is better;",
        "# the weighted sum subtracts it) of PLACEHOLDER text files written next to this experiment.",
        "# Replace their text with held-out text of your domain (.txt, or .jsonl with a text field),",
        "# and/or uncomment lm-eval tasks below (then set the perplexity's weight to 0: reported, not",
        "# optimized, as perplexities and accuracies have different scales). Do it before the real search:",
        "# a study belongs to its fitness (a changed one needs another --study or storage).",
        "fitness:",
        "  objective: weighted_sum",
        "  # builtin_tasks: true  # lm-eval's own tasks (they download their data)",
        "  # include_path: path/to/tasks  # or task YAMLs with local data (search + test splits)",
        "  metrics:",
        "    perplexity:",
        "      type: perplexity",
        "      data:",
        f"        search: {_q(_relative(data['search']))}  # PLACEHOLDER: replace its text",
        f"        test: {_q(_relative(data['test']))}  # PLACEHOLDER: held-out text, for the reports",
        f"      context: {context}  # tokens per window"
        + (f" (the models' {info.max_positions} positions)" if info.max_positions == context else ""),
        "      max_tokens: 65536",
        "      limit: 16384  # search-split tokens per candidate (the test split reads max_tokens)",
        "      batch_size: 4",
        "      weight: 1.0",
        "    # arc_easy: {type: lm_eval, task: arc_easy, metric: acc, limit: 200, weight: 1.0}",
        "    # hellaswag: {type: lm_eval, task: hellaswag, metric: acc_norm, limit: 200, weight: 1.0}",
        "    # gsm8k: {type: lm_eval, task: gsm8k, metric: \"exact_match,strict-match\", limit: 200, weight: 1.0}",
        "    # mmlu: {type: lm_eval, task: mmlu, metric: acc, limit: 200, weight: 1.0}",
        "",
        f"# CMA-ES on {genes} genes: popsize 4 + ⌊3 ln {genes}⌋ = {popsize} (its default population);",
        f"# sigma0 {SIGMA0} of each range: the first generations spread about ±{SIGMA0} of every range around",
        "# its middle (smaller: a local search); warm_start: the space's known recipes are the first trials.",
        f"optimizer: {{sampler: cmaes, popsize: {popsize}, sigma0: {SIGMA0}, seed: 0, warm_start: true}}",
        f"# {popsize} × {generations} generations = {n_trials} trials (a generation per gene, 10 to 40);"
        " each trial merges",
        "# and scores one candidate: set a timeout (seconds) to bound the wall time on large models.",
        f"budget: {{n_trials: {n_trials}, timeout: null, max_failures_in_a_row: 5}}",
        "# Optuna storage: a local SQLite file; PostgreSQL (postgresql://...) for workers on several hosts.",
        f"storage: {_q(f'sqlite:///runs/studies/{name}.db')}",
    ]
    if available is None:
        memory = (f"# memory bound {gb(needed)} on {where}"
                  f" (base + {k_sources - n_adapters} full sources resident, the live model, "
                  f"{'trim caches, ' if method == 'ties' else ''}scratch).")
    else:
        memory = (f"# memory bound {gb(needed)} of {gb(available)} available on {info.device}"
                  f" (base + {k_sources - n_adapters} full sources resident, the live model, "
                  f"{'trim caches, ' if method == 'ties' else ''}scratch).")
        if needed > available:
            warning = (f"the materializer needs {gb(needed)} with every input resident but {gb(available)} is "
                       f"available on {info.device}: the search keeps some inputs in host memory or the files "
                       f"(slower per candidate; evomerge inspect --plan-memory shows the plan)")
            warnings.append(warning)
            memory += f"\n# warning: {warning}."
    lines += [
        memory,
        f"device: {_q(info.device)}",
        f"# dtype: the models' own ({info.dtype}); candidates are merged and scored in it.",
        f"dtype: {info.dtype}",
        "seed: 0",
    ]
    text = "\n".join(lines) + "\n"
    parse_experiment(text, str(output))  # what search will read (raises ConfigError on a bug here)
    return Plan(text, data, method, genes, info, warnings)


def write_experiment(plan: Plan, output: Path, *, force: bool = False) -> list[Path]:
    """Write the experiment and the placeholder data files that do not exist yet (kept when they
    do: they may hold your text already); returns the files written."""
    if output.exists() and not force:
        raise EvomergeError(f"{output} exists; pass --force to replace it")
    if output.is_dir():
        raise EvomergeError(f"{output} is a folder")
    written = []
    for path in plan.data.values():
        if not path.exists():
            write_text_atomic(path, PLACEHOLDER)
            written.append(path)
    write_text_atomic(output, plan.text)
    return [output, *written]


def init_experiment(base: str, sources: list[str], output: str | Path, *, name: str | None = None,
                    device: str = "auto", force: bool = False) -> tuple[Plan, list[Path]]:
    """Inspect the models and write ``output`` (see the module docstring)."""
    output = Path(output)
    if output.exists() and not force:  # before reading any model
        raise EvomergeError(f"{output} exists; pass --force to replace it")
    if not sources:
        raise ModelError("init: give the base model and at least one source")
    info = inspect_for_init(base, sources, device)
    plan = plan_experiment(info, output, name)
    return plan, write_experiment(plan, output, force=force)


__all__ = ["MAX_GENES", "ModelInfo", "Plan", "choose_granularity", "init_experiment", "inspect_for_init",
           "plan_experiment", "popsize_for", "write_experiment"]
