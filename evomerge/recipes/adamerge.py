"""AdaMerging (Yang et al., 2024, https://arxiv.org/abs/2310.02575): learn task-arithmetic
coefficients by minimizing the merged model's prediction entropy on unlabeled prompts.

The merged weights are ``θ(λ) = θ_base + Σ_k λ[k, g] · τ_k`` for every parameter, with
``τ_k = θ_k − θ_base`` and ``g`` the parameter's group: one group for every tensor
(``task`` granularity, one coefficient per source), or (``layer``) one group per decoder layer
plus one per tensor outside the decoder stack (embeddings, final norm, LM head), as the
paper's layer-wise AdaMerging gives every block its own coefficient.

Objective: the mean Shannon entropy (nats) of the next-token distributions at the first
``answer_tokens`` positions after each prompt, where an answer starts: the first from the
prompt alone, the later ones from the prompt followed by the merged model's own greedy
continuation (regenerated from the current coefficients at every step, without gradient;
the entropy is differentiated with those tokens fixed). Gradients reach the coefficients
through the merged weights: ``torch.func.functional_call`` runs the base model's modules on
``θ(λ)``, and ``λ`` is the only tensor that requires a gradient (base and task vectors are
frozen). Adam minimizes the entropy over mini-batches of prompts (a seeded order); after each
step the coefficients are clipped to ``bounds`` (the paper keeps them in [0, 1]: entropy alone
rewards ever sharper, larger merges).

Export: a ``task_arithmetic`` config (``lambda`` 1) whose per-source ``weight`` is the
coefficient (task granularity), or a mergekit filter list: one entry per non-decoder tensor
(its full name as the filter) and a gradient list with one value per decoder layer (which
the engine and mergekit evaluate at exactly layer ``i``'s value). ``evomerge merge`` and the
materializer reproduce the learned merge from it (tests compare the tensors).

Memory: the base model, the ``K`` task vectors (``(K + 1) · N`` elements in the working
dtype), and per step the merged weights and activations of the autograd graph.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from evomerge.engine.architecture import family_for, layer_index, num_layers
from evomerge.engine.config import MergeConfig, model_labels
from evomerge.engine.execute import resolve_device
from evomerge.engine.inspect import check_sources
from evomerge.engine.plan import build_plan, check_compatible, open_models
from evomerge.errors import ConfigError, ModelError
from evomerge.io.reader import ModelFolder
from evomerge.live.modeling import checkpoint_names

log = logging.getLogger(__name__)

Granularity = Literal["task", "layer"]
EVAL_BATCH = 64  # prompts per forward pass when measuring the entropy of a whole prompt set


@dataclass(frozen=True)
class AdaMergeSettings:
    """How the coefficients are learned (defaults: a short run; the paper uses lr 1e-3, 500 steps)."""

    steps: int = 100
    lr: float = 5e-3
    batch_size: int = 16
    answer_tokens: int = 3
    bounds: tuple[float, float] = (0.0, 1.0)
    seed: int = 0


@dataclass
class AdaMergeResult:
    """Start and learned coefficients (``sources × groups``) and the mini-batch entropy per step."""

    start: torch.Tensor
    coefficients: torch.Tensor
    history: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _Entry:
    live: str  # the live model's parameter name
    checkpoint: str  # the tensor's name in the model files
    group: int
    base: torch.Tensor
    deltas: torch.Tensor  # (K, *shape), frozen


class AdaMerger:
    """Base and task vectors resident on ``device``; entropy, gradients and training of ``λ``."""

    def __init__(self, base: str | Path, sources: Sequence[str | Path], *, granularity: Granularity = "layer",
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None, answer_tokens: int = 3):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if answer_tokens < 1:
            raise ConfigError(f"answer_tokens must be at least 1, got {answer_tokens}", field="answer_tokens")
        self.base = str(Path(base).resolve())
        self.sources = [str(Path(s).resolve()) for s in sources]
        if not self.sources:
            raise ConfigError("AdaMerging needs at least one source model", field="models.sources")
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        folders = [ModelFolder(p) for p in (self.base, *self.sources)]
        check_compatible({str(f.path): f for f in folders})
        check_sources(folders[0], folders[1:])
        self.granularity, self.answer_tokens = granularity, answer_tokens
        self.family = family_for(folders[0].config)
        self.depth = num_layers(folders[0].config)
        self.dtype = dtype or next(t.dtype for t in map(folders[0].tensor, folders[0].names()) if t.is_floating_point())
        self.coefficient_dtype = torch.promote_types(self.dtype, torch.float32)
        self.model = AutoModelForCausalLM.from_pretrained(self.base, dtype=self.dtype)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        self.outside = [n for n in folders[0].names() if layer_index(n, self.family) is None]
        self.entries = self._entries(folders)
        self.num_groups = 1 if granularity == "task" else self.depth + len(self.outside)

    def _group(self, checkpoint: str) -> int:
        if self.granularity == "task":
            return 0
        index = layer_index(checkpoint, self.family)
        return index if index is not None else self.depth + self.outside.index(checkpoint)

    def _entries(self, folders: list[ModelFolder]) -> list[_Entry]:
        live_params = dict(self.model.named_parameters())
        live_of = checkpoint_names(self.model)
        entries, covered = [], set()
        for name in folders[0].names():
            live = live_of.get(name)
            if live not in live_params or live in covered:
                continue  # a buffer, or a tied copy of a parameter already covered
            base = folders[0].tensor(name).to(self.device, self.dtype)
            sources = [f.tensor(name) for f in folders[1:]]
            for folder, tensor in zip(folders[1:], sources):
                if tensor.shape != base.shape:
                    raise ModelError(f"AdaMerging needs equal shapes: {name} is {list(tensor.shape)} in "
                                     f"{folder.path} and {list(base.shape)} in the base")
            deltas = torch.stack([t.to(self.device, self.dtype) - base for t in sources])
            entries.append(_Entry(live, name, self._group(name), base, deltas))
            covered.add(live)
        missing = sorted(set(live_params) - covered)
        if missing:
            raise ModelError(f"{self.base}: parameter {missing[0]} of the model is not in its files")
        if self.granularity == "layer":
            names = [e.checkpoint for e in entries]
            for outside in self.outside:
                if sum(outside in n for n in names) > 1:
                    raise ModelError(f"tensor name {outside} is part of another tensor's name; it cannot be "
                                     "a mergekit filter of its own (use granularity task)")
        return entries

    # -- coefficients --------------------------------------------------------------------

    def uniform(self, value: float) -> torch.Tensor:
        """Coefficients with every entry ``value`` (``sources × groups``)."""
        return torch.full((len(self.sources), self.num_groups), float(value), dtype=self.coefficient_dtype)

    def from_config(self, config: MergeConfig) -> torch.Tensor:
        """The coefficients of a ``task_arithmetic`` merge of these models (``lambda`` and
        ``normalize`` folded in): per group, the mean over its tensors weighted by their size
        (exact when the config gives every tensor of a group the same weight)."""
        if config.merge_method != "task_arithmetic":
            raise ConfigError(f"AdaMerging starts from task_arithmetic merges, not {config.merge_method}",
                              file=config.source, field="merge_method")
        plan = build_plan(config, open_models(config))
        index = {source: k for k, source in enumerate(self.sources)}
        sizes = {e.checkpoint: e.base.numel() for e in self.entries}
        sums = torch.zeros(len(self.sources), self.num_groups, dtype=torch.float64)
        low = torch.full_like(sums, math.inf)
        high = torch.full_like(sums, -math.inf)
        counts = torch.zeros(self.num_groups, dtype=torch.float64)
        for op in plan.ops:
            if op.name not in sizes:
                continue
            values = self._op_coefficients(op, index, config)
            group = self._group(op.name)
            sums[:, group] += values * sizes[op.name]
            counts[group] += sizes[op.name]
            low[:, group] = torch.minimum(low[:, group], values)
            high[:, group] = torch.maximum(high[:, group], values)
        if (high - low).max() > 1e-9:
            log.warning("%s gives tensors of one %s group different weights; AdaMerging starts from their "
                        "size-weighted mean", config.source, self.granularity)
        return (sums / counts).to(self.coefficient_dtype)

    def _op_coefficients(self, op, index: dict[str, int], config: MergeConfig) -> torch.Tensor:
        values = torch.zeros(len(self.sources), dtype=torch.float64)
        weights = [p["weight"] for i, p in enumerate(op.per_input) if i != op.base_index]
        divisor = sum(weights) if op.shared["normalize"] and abs(sum(weights)) >= 1e-8 else 1.0
        for i, (model, name) in enumerate(op.inputs):
            path = str(Path(model).resolve())
            if name != op.name:
                raise ConfigError("AdaMerging cannot start from a layer-stacking plan", file=config.source,
                                  field="slices")
            if i == op.base_index:
                if path != self.base:
                    raise ConfigError(f"base_model {model} is not the experiment's base {self.base}",
                                      file=config.source, field="base_model")
                continue
            if path not in index:
                raise ConfigError(f"model {model} is not a source of the experiment", file=config.source,
                                  field="models")
            values[index[path]] = op.shared["lambda"] * op.per_input[i]["weight"] / divisor
        return values

    def config(self, coefficients: torch.Tensor) -> MergeConfig:
        """The merge ``coefficients`` describe, as a mergekit ``task_arithmetic`` config."""
        rows = coefficients.detach().to(torch.float64).cpu().tolist()
        models = [{"model": source, "parameters": {"weight": self._weight(row)}}
                  for source, row in zip(self.sources, rows)]
        return MergeConfig.model_validate({
            "merge_method": "task_arithmetic", "base_model": self.base, "models": models,
            "parameters": {"lambda": 1.0}, "dtype": str(self.dtype).removeprefix("torch.")})

    def _weight(self, row: list[float]) -> Any:
        if self.granularity == "task":
            return row[0]
        layers = row[:self.depth] if self.depth > 1 else row[0]
        outside = row[self.depth:]
        return ([{"filter": name, "value": value} for name, value in zip(self.outside, outside)]
                + [{"value": layers}])

    # -- entropy ---------------------------------------------------------------------------

    def merged(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """``θ_base + Σ_k λ[k, g] τ_k`` for every parameter, by live parameter name."""
        weights = coefficients.to(self.dtype)
        result = {}
        for entry in self.entries:
            scale = weights[:, entry.group].reshape(-1, *([1] * entry.base.dim()))
            result[entry.live] = entry.base + (scale * entry.deltas).sum(0)
        return result

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt (no special tokens, as the lm-eval tasks and the zoo use)."""
        encoded = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        empty = [p for p, ids in zip(prompts, encoded) if not ids]
        if empty:
            raise ConfigError(f"prompt {empty[0]!r} has no tokens", field="prompts")
        return encoded

    def _logits(self, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
        return functional_call(self.model, weights, args=(), kwargs=inputs).logits

    def answer_batch(self, coefficients: torch.Tensor,
                     prompts: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``ids`` (each prompt followed by the merge's greedy continuation of
        ``answer_tokens - 1`` tokens) and the prompt ``lengths``. Causal attention keeps the
        padding after the scored positions out of their context."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(prompts), int(lengths.max()) + self.answer_tokens - 1), pad, device=self.device)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = torch.tensor(prompt)
        rows = torch.arange(len(prompts), device=self.device)
        with torch.no_grad():
            weights = self.merged(coefficients.detach()) if self.answer_tokens > 1 else {}
            for step in range(self.answer_tokens - 1):
                positions = lengths - 1 + step
                logits = self._logits(weights, ids[:, :int(positions.max()) + 1])
                ids[rows, positions + 1] = logits[rows, positions].argmax(-1)
        return ids, lengths

    def entropy(self, coefficients: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mean entropy (nats) of the next-token distributions at the answer positions of
        ``ids`` (from :meth:`answer_batch`), differentiable in ``coefficients``."""
        logits = self._logits(self.merged(coefficients), ids)
        positions = lengths[:, None] - 1 + torch.arange(self.answer_tokens, device=self.device)
        rows = torch.arange(len(ids), device=self.device)[:, None]
        log_p = F.log_softmax(logits[rows, positions].to(self.coefficient_dtype), dim=-1)
        return -(log_p.exp() * log_p).sum(-1).mean()

    @torch.no_grad()
    def mean_entropy(self, coefficients: torch.Tensor, prompts: Sequence[str]) -> float:
        """The objective over every prompt of ``prompts`` (continuations from ``coefficients``)."""
        encoded = self.encode(prompts)
        total = 0.0
        for start in range(0, len(encoded), EVAL_BATCH):
            chunk = encoded[start:start + EVAL_BATCH]
            total += float(self.entropy(coefficients, *self.answer_batch(coefficients, chunk))) * len(chunk)
        return total / len(encoded)

    def train(self, prompts: Sequence[str], start: torch.Tensor, settings: AdaMergeSettings, *,
              progress: bool = False) -> AdaMergeResult:
        """Minimize the entropy on ``prompts`` from ``start`` (Adam, clipped to ``settings.bounds``)."""
        low, high = settings.bounds
        if low > high:
            raise ConfigError(f"bounds [{low}, {high}] are empty", field="bounds")
        outside = (start < low) | (start > high)
        if outside.any():
            raise ConfigError(f"the starting coefficients span [{float(start.min()):.4g}, {float(start.max()):.4g}], "
                              f"outside the bounds [{low}, {high}]", field="bounds")
        encoded = self.encode(prompts)
        coefficients = start.detach().clone().to(self.coefficient_dtype).requires_grad_(True)
        optimizer = torch.optim.Adam([coefficients], lr=settings.lr)
        generator = torch.Generator().manual_seed(settings.seed)
        batch_size = min(settings.batch_size, len(encoded))
        order: list[int] = []
        history = []
        for _ in tqdm(range(settings.steps), desc="adamerge", unit="step", disable=not progress):
            if len(order) < batch_size:
                order += torch.randperm(len(encoded), generator=generator).tolist()
            batch, order = [encoded[i] for i in order[:batch_size]], order[batch_size:]
            loss = self.entropy(coefficients, *self.answer_batch(coefficients, batch))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                coefficients.clamp_(low, high)
            history.append(loss.item())
        return AdaMergeResult(start.detach().clone(), coefficients.detach(), history)


def coefficient_table(merger: AdaMerger, result: AdaMergeResult) -> str:
    """Start → learned coefficient per source and group, as a plain-text table."""


    labels = ["all"] if merger.granularity == "task" else (
        [f"layer {i}" for i in range(merger.depth)] + merger.outside)
    names = model_labels(merger.sources)
    width = max(len(label) for label in labels)
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>17.17}" for n in names)]
    for g, label in enumerate(labels):
        cells = [f"{float(result.start[k, g]):>7.4f} → {float(result.coefficients[k, g]):<7.4f}"
                 for k in range(len(names))]
        lines.append(f"{label:<{width}}  " + "  ".join(f"{c:>17}" for c in cells))
    return "\n".join(lines)
