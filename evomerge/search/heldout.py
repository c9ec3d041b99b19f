"""Held-out comparison: the found merge(s) against the base, each source and default merges.

Every row is scored on the fitness's **test** split (the search only ever sees the
``search`` split), through the same in-memory :class:`~evomerge.materialize.Materializer`
the search uses. Rows, in order:

* ``trial``: each given trial's stored ``plan`` with its stored mask ``seed``;
* ``base``: the base model, as a passthrough of all its layers;
* ``source``: each source alone, as a passthrough of all its layers (the exact source
  weights, so its scores equal scoring the source folder loaded from disk);
* ``default``: untuned merges of every source: task arithmetic with every weight 1.0 and
  ``lambda`` 1 (the plain sum of the task vectors, as in Ilharco et al.), and TIES with
  every weight 1.0, density 0.5 and ``normalize: true`` (the TIES paper's defaults).

A row is ``{"label", "kind", "trial", "metrics", "objectives", "mean_skill"}``: ``trial``
is the trial number (None for the others), ``metrics`` every score the fitness reports,
``objectives`` the objective value(s) by name, and ``mean_skill`` the mean of the
metrics with a non-zero weight that are maximized (the skill accuracies: minimized
metrics such as perplexity and report-only metrics of weight 0 are left out; None when
there are none), one scale-free number to compare rows by.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from optuna.trial import FrozenTrial
from tqdm.auto import tqdm

from evomerge.config import MergeConfig, parse_config, torch_dtype
from evomerge.materialize import Materializer
from evomerge.search.driver import Search, plan_hash
from evomerge.search.space import model_labels

log = logging.getLogger(__name__)
SPLIT = "test"
DEFAULT_MERGES = {  # label -> (method, per-source parameters, top-level parameters)
    "task_arithmetic w=1 λ=1": ("task_arithmetic", {"weight": 1.0}, {"lambda": 1.0}),
    "ties w=1 density=0.5": ("ties", {"weight": 1.0, "density": 0.5}, {"normalize": True}),
}


@dataclass(frozen=True)
class Candidate:
    """One model to score: a merge config with its mask seed."""

    label: str
    kind: str  # trial | base | source | default
    config: MergeConfig
    seed: int
    trial: int | None = None


def search_materializer(search: Search, *, progress: bool = False) -> Materializer:
    """A materializer over the search's models, device and dtype."""
    return Materializer(search.base, search.sources, device=search.device,
                        dtype=torch_dtype(search.experiment.dtype), progress=progress)


def candidates(search: Search, trials: Sequence[FrozenTrial]) -> list[Candidate]:
    """The trials' stored plans, then the base, each source alone and the default merges."""
    experiment = search.experiment
    dtype, seed = experiment.dtype, experiment.seed
    depth = search.space.context.num_layers

    def whole(model: str) -> MergeConfig:
        return MergeConfig.model_validate({
            "merge_method": "passthrough", "dtype": dtype,
            "slices": [{"sources": [{"model": model, "layer_range": [0, depth]}]}]})

    rows = [Candidate(f"trial {t.number}", "trial", parse_config(t.user_attrs["plan"], f"<trial {t.number}>"),
                      t.user_attrs.get("seed", seed), t.number) for t in trials]
    rows.append(Candidate("base", "base", whole(search.base), seed))
    rows += [Candidate(label, "source", whole(path), seed)
             for label, path in zip(model_labels(search.sources), search.sources)]
    for label, (method, per_source, top) in DEFAULT_MERGES.items():
        config = MergeConfig.model_validate({
            "merge_method": method, "base_model": search.base, "dtype": dtype, "parameters": top,
            "models": [{"model": path, "parameters": per_source} for path in search.sources]})
        rows.append(Candidate(label, "default", config, seed))
    return rows


def mean_skill(search: Search, scores: dict[str, float]) -> float | None:
    """Mean of the maximized metrics with a non-zero weight (None when there are none)."""
    skills = [scores[name] for name, metric in search.fitness.metrics.items()
              if metric.weight != 0 and metric.direction == "maximize" and name in scores]
    return sum(skills) / len(skills) if skills else None


def heldout_rows(search: Search, trials: Sequence[FrozenTrial], *, materializer: Materializer | None = None,
                 progress: bool = False) -> list[dict[str, Any]]:
    """Score ``trials``, the base, each source and the default merges on the test split."""
    materializer = materializer or search_materializer(search, progress=progress)
    fitness, rows = search.fitness, []
    for candidate in tqdm(candidates(search, trials), desc="held-out", unit="model", disable=not progress):
        model = materializer.apply(candidate.config, seed=candidate.seed)
        scores = fitness.evaluate(model, materializer.tokenizer, SPLIT,
                                  cache_key=plan_hash(candidate.config, candidate.seed))
        log.debug("held-out %s: %s", candidate.label, scores)
        rows.append({"label": candidate.label, "kind": candidate.kind, "trial": candidate.trial,
                     "metrics": scores,
                     "objectives": dict(zip(fitness.metric_names, fitness.objectives(scores))),
                     "mean_skill": mean_skill(search, scores)})
    return rows


def _table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells: label, kind, every metric, objectives not already a
    metric column, mean skill."""
    metrics = list(dict.fromkeys(name for row in rows for name in row["metrics"]))
    objectives = [name for name in dict.fromkeys(n for row in rows for n in row["objectives"])
                  if name not in metrics]

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[row["label"], row["kind"], *(cell(row["metrics"].get(m)) for m in metrics),
              *(cell(row["objectives"].get(o)) for o in objectives), cell(row["mean_skill"])]
             for row in rows]
    return ["model", "kind", *metrics, *objectives, "mean skill"], cells


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an aligned plain-text table (numbers right-aligned)."""
    header, cells = _table(rows)
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, cells)])


def rows_to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a GitHub-flavoured Markdown table."""
    header, cells = _table(rows)
    lines = [header, ["---", "---", *["---:"] * (len(header) - 2)], *cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def rows_to_html(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an HTML ``<table>`` (escaped)."""
    header, cells = _table(rows)
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in line) + "</tr>" for line in cells)
    return f'<table class="heldout"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
