"""Compatibility check: can these sources be merged on this base, and do they look fine-tuned from it?

A source may be a LoRA adapter folder (over the base) or ``BASE+ADAPTER``
(:func:`evomerge.io.source.open_model`); it is read as the model it makes of its base.

Structure (errors, :class:`ModelError`): one architecture and width
(:func:`evomerge.engine.plan.check_compatible`), every base tensor present in every source, equal
shapes except the vocabulary rows of the embeddings and LM head (merges use the common rows;
the sizes are reported).

Statistics, streamed one tensor at a time through the lazy readers of :mod:`evomerge.io` (a
model is never loaded whole; the largest tensor of every model is the peak), with task vectors
τ = θ_source − θ_base, over the weight matrices and embeddings (tensors of two or more
dimensions: norm scales and biases start at the same constants in every initialization, so
they say nothing about a shared origin, and in small models they would dominate the norms):

* per source: the relative norm ‖τ‖/‖θ_base‖ and the cosine between the source's and the
  base's weights (over every floating tensor, vocabulary tensors on their common rows);
* the cosine between every two task vectors;
* per layer (and for the embeddings / head / other tensors): each source's relative norm and
  the **sign-conflict rate** between sources, the share of the parameters that at least two
  sources change where the changes do not all have the same sign (TIES's interference).

Verdicts. A fine-tune moves its base's weights a little: ‖τ‖/‖θ_base‖ far below 0.5 and
cos(θ, θ_base) close to 1. Two independently initialized models are nearly orthogonal
(cos ≈ 0, ‖τ‖/‖θ_base‖ ≈ √2 for equal norms), and task arithmetic between them is
meaningless. So a source is ``unrelated`` when cos < 0.5 or ‖τ‖/‖θ_base‖ ≥ 1, ``far`` when
‖τ‖/‖θ_base‖ ≥ 0.5, ``identical`` when τ = 0, else ``ok``.

``sample`` limits the statistics to the first rows of each tensor (at most ``sample``
elements, and only those bytes are read from safetensors files): the automatic check that
``evomerge merge``, the materializer (searches, reports, soups) run before any work uses
:data:`AUTO_SAMPLE` so that it costs a fraction of a merge even on large models.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from evomerge.engine.architecture import family_for, is_vocab_tensor, layer_index, num_layers, tensor_kind
from evomerge.engine.plan import check_compatible
from evomerge.errors import ModelError
from evomerge.io.adapter import AdapterFolder
from evomerge.io.reader import ModelFolder
from evomerge.io.source import open_model
from evomerge.engine.config import model_labels

log = logging.getLogger(__name__)

AUTO_SAMPLE = 1 << 16  # elements per tensor read by the automatic check
UNRELATED_COSINE = 0.5
UNRELATED_NORM = 1.0
FAR_NORM = 0.5


@dataclass(frozen=True)
class SourceStats:
    """One source against the base: its statistics and verdict (ok / far / unrelated / identical)."""

    path: str
    relative_norm: float
    cosine_to_base: float
    verdict: str
    reason: str | None = None


@dataclass(frozen=True)
class GroupStats:
    """One layer (or embed / head / other): each source's ‖τ‖/‖θ_base‖ and the sign-conflict rate
    (None when fewer than two sources change any parameter of it)."""

    label: str
    relative_norms: list[float]
    sign_conflicts: float | None


@dataclass
class CompatReport:
    """The result of :func:`inspect_models`."""

    base: str
    sources: list[str]
    architecture: str
    depth: int
    vocab: dict[str, int]
    stats: list[SourceStats]
    cosines: list[list[float]]
    groups: list[GroupStats]
    sample: int | None = None

    @property
    def flagged(self) -> list[SourceStats]:
        """Sources that do not look like usable fine-tunes of the base."""
        return [s for s in self.stats if s.verdict != "ok"]


@dataclass
class _Sums:
    """Float64 running sums over tensors (one per group, one overall)."""

    sources: int
    base_sq: float = 0.0
    tau_sq: list[float] = field(default_factory=list)
    base_tau: list[float] = field(default_factory=list)
    gram: torch.Tensor | None = None
    contested: int = 0
    conflicts: int = 0

    def __post_init__(self):
        self.tau_sq = [0.0] * self.sources
        self.base_tau = [0.0] * self.sources
        self.gram = torch.zeros(self.sources, self.sources, dtype=torch.float64)

    def add(self, base: torch.Tensor, taus: torch.Tensor) -> None:
        flat_base, flat = base.flatten(), taus.flatten(1)
        self.base_sq += float(flat_base @ flat_base)
        gram = (flat @ flat.T).double()
        self.gram += gram
        base_tau = (flat @ flat_base).tolist()
        for k in range(self.sources):
            self.tau_sq[k] += float(gram[k, k])
            self.base_tau[k] += base_tau[k]
        if self.sources > 1:
            positive, negative = (taus > 0).sum(0), (taus < 0).sum(0)
            self.contested += int((positive + negative >= 2).sum())
            self.conflicts += int(((positive > 0) & (negative > 0)).sum())

    def relative_norms(self) -> list[float]:
        return [math.sqrt(t / self.base_sq) if self.base_sq else math.inf for t in self.tau_sq]


def _folder(model: str | Path | ModelFolder, base: ModelFolder | None = None) -> ModelFolder:
    """An opened model; a source may be an adapter (over ``base``, see :func:`open_model`)."""
    return model if isinstance(model, (ModelFolder, AdapterFolder)) else open_model(model, base)


def _group(name: str, family) -> str:
    index = layer_index(name, family)
    if index is not None:
        return str(index)
    kind = tensor_kind(name)
    return kind if kind in ("embed", "head") else "other"


def _read(folder: ModelFolder, name: str, rows: int | None) -> torch.Tensor:
    return folder.tensor(name) if rows is None else folder.head(name, rows)


def _rows(shapes: list[tuple[int, ...]], sample: int | None) -> int | None:
    """Rows to read of a tensor (None: all): the rows every model has, at most ``sample`` elements."""
    if not shapes[0]:
        return None
    limit = min(s[0] for s in shapes)
    if sample is not None:
        limit = min(limit, max(1, sample // (math.prod(shapes[0][1:]) or 1)))
    return None if all(limit >= s[0] for s in shapes) else limit


def inspect_models(base: str | Path | ModelFolder, sources: Sequence[str | Path | ModelFolder], *,
                   sample: int | None = None, progress: bool = False) -> CompatReport:
    """Check that ``sources`` can be merged on ``base`` and compute the task-vector statistics.

    Raises :class:`ModelError` for structural problems (architecture, missing tensors,
    shapes other than vocabulary rows); a source that does not look fine-tuned from the base
    is reported in :attr:`CompatReport.flagged`, not raised.
    """
    if not sources:
        raise ModelError("the compatibility check needs a base and at least one source")
    base_folder = _folder(base)
    folders = [base_folder, *(_folder(m, base_folder) for m in sources)]
    check_compatible({str(f.path): f for f in folders})
    family = family_for(folders[0].config)
    names = folders[0].names()
    for folder in folders[1:]:
        missing = [n for n in names if n not in folder]
        if missing:
            raise ModelError(f"{folder.path} lacks {len(missing)} tensor(s) of the base {folders[0].path}, "
                             f"e.g. {missing[0]}")
    vocab: dict[str, int] = {}
    overall, groups, changed = _Sums(len(sources)), {}, [False] * len(sources)
    for name in tqdm(names, desc="inspect", unit="tensor", disable=not progress):
        shapes = [f.shape(name) for f in folders]
        if len(set(shapes)) > 1 and not (len({s[1:] for s in shapes}) == 1 and is_vocab_tensor(name, family)):
            detail = ", ".join(f"{f.path}: {list(s)}" for f, s in zip(folders, shapes))
            raise ModelError(f"tensor {name} has different shapes ({detail})")
        if is_vocab_tensor(name, family) and shapes[0]:
            for f, s in zip(folders, shapes):
                vocab.setdefault(str(f.path), s[0])
        rows = _rows(shapes, sample)
        tensors = [_read(f, name, rows) for f in folders]
        if not tensors[0].is_floating_point():
            continue
        base_tensor = tensors[0].float()
        taus = torch.stack([t.float() - base_tensor for t in tensors[1:]])
        changed = [c or bool(tau.any()) for c, tau in zip(changed, taus)]
        if base_tensor.dim() >= 2:
            overall.add(base_tensor, taus)
            groups.setdefault(_group(name, family), _Sums(len(sources))).add(base_tensor, taus)
    return CompatReport(
        base=str(folders[0].path), sources=[str(f.path) for f in folders[1:]],
        architecture=f"{folders[0].config.get('model_type')} "
                     f"({', '.join(folders[0].config.get('architectures') or ['?'])})",
        depth=num_layers(folders[0].config), vocab=vocab,
        stats=[_verdict(str(f.path), overall, k, changed[k]) for k, f in enumerate(folders[1:])],
        cosines=_cosines(overall.gram), groups=_group_stats(groups), sample=sample)


def _verdict(path: str, sums: _Sums, k: int, changed: bool) -> SourceStats:
    relative = sums.relative_norms()[k]
    source_sq = sums.base_sq + 2 * sums.base_tau[k] + sums.tau_sq[k]
    cosine = (sums.base_sq + sums.base_tau[k]) / math.sqrt(sums.base_sq * source_sq) if source_sq else 0.0
    numbers = f"‖τ‖/‖θ_base‖ = {relative:.3g}, cos(θ, θ_base) = {cosine:.3g}"
    if not changed:
        return SourceStats(path, relative, cosine, "identical", "is identical to the base (its task vector is zero)")
    if cosine < UNRELATED_COSINE or relative >= UNRELATED_NORM:
        return SourceStats(path, relative, cosine, "unrelated",
                           f"does not look fine-tuned from the base ({numbers}; a fine-tune has a small "
                           "relative norm and a cosine near 1): a model trained from another "
                           "initialization? Merges built on its task vector will not work")
    if relative >= FAR_NORM:
        return SourceStats(path, relative, cosine, "far",
                           f"is far from the base ({numbers}); task-vector merges may degrade it")
    return SourceStats(path, relative, cosine, "ok")


def _cosines(gram: torch.Tensor) -> list[list[float]]:
    norms = gram.diagonal().sqrt()
    scale = torch.outer(norms, norms)
    return torch.where(scale > 0, gram / scale.clamp(min=1e-300), torch.zeros_like(gram)).tolist()


def _group_stats(groups: dict[str, _Sums]) -> list[GroupStats]:
    def order(label: str) -> tuple[int, int]:
        return (1, int(label)) if label.isdigit() else ({"embed": 0, "head": 2}.get(label, 3), 0)

    return [GroupStats(label if not label.isdigit() else f"layer {label}", sums.relative_norms(),
                       sums.conflicts / sums.contested if sums.contested else None)
            for label, sums in sorted(groups.items(), key=lambda item: order(item[0]))]


def format_report(report: CompatReport) -> str:
    """The report as plain-text tables."""
    names = model_labels(report.sources)
    width = max(len(n) for n in names + ["source"])
    sampled = f", first {report.sample} elements per tensor" if report.sample else ""
    lines = [f"base {report.base}: {report.architecture}, {report.depth} layers{sampled}"]
    sizes = set(report.vocab.values())
    if len(sizes) > 1:
        lines.append("vocabulary rows differ: " + ", ".join(f"{Path(p).name} {n}" for p, n in report.vocab.items())
                     + f" (merges keep the {min(sizes)} common rows)")
    lines += ["", f"{'source':<{width}}  {'‖τ‖/‖θ_base‖':>12}  {'cos(θ,θ_base)':>13}  verdict"]
    for name, stats in zip(names, report.stats):
        lines.append(f"{name:<{width}}  {stats.relative_norm:>12.4g}  {stats.cosine_to_base:>13.4f}  "
                     f"{stats.verdict}")
    if len(names) > 1:
        lines += ["", "cosine between task vectors", f"{'':<{width}}  " + "  ".join(f"{n:>8.8}" for n in names)]
        for name, row in zip(names, report.cosines):
            lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>8.3f}" for v in row))
    group_width = max(len(g.label) for g in report.groups)
    lines += ["", "per layer: ‖τ‖/‖θ_base‖ of each source, sign conflicts between sources",
              f"{'':<{group_width}}  " + "  ".join(f"{n:>8.8}" for n in names) + "  sign conflicts"]
    for group in report.groups:
        conflicts = "-" if group.sign_conflicts is None else f"{group.sign_conflicts:.3f}"
        lines.append(f"{group.label:<{group_width}}  " + "  ".join(f"{v:>8.3g}" for v in group.relative_norms)
                     + f"  {conflicts:>14}")
    for stats in report.flagged:
        lines.append(f"{'error' if stats.verdict == 'unrelated' else 'warning'}: {stats.path} {stats.reason}")
    return "\n".join(lines)


def check_sources(base: ModelFolder, sources: Sequence[ModelFolder]) -> CompatReport | None:
    """The automatic check before a merge or search: sampled statistics, one log line per
    source, a warning for each source that does not look fine-tuned from ``base``."""
    sources = [s for s in sources if s.path.resolve() != base.path.resolve()]
    if not sources:
        return None
    report = inspect_models(base, sources, sample=AUTO_SAMPLE)
    for stats in report.stats:
        if stats.verdict == "ok":
            log.info("%s: ‖τ‖/‖θ_base‖ %.3g, cos(θ, θ_base) %.4f", stats.path, stats.relative_norm,
                     stats.cosine_to_base)
        else:
            log.warning("%s %s (evomerge inspect %s %s)", stats.path, stats.reason, base.path, stats.path)
    return report
