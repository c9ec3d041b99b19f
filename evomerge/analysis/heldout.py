"""Held-out comparison: the found merge(s) against the base, each source and default merges.

Every row is scored on the fitness's **test** split (the search only ever sees the
``search`` split), through the same in-memory :class:`~evomerge.live.materializer.Materializer`
the search uses. Rows, in order:

* ``trial``: each given trial's stored ``plan`` with its stored mask ``seed``;
* ``base``: the base model, as a passthrough of all its layers;
* ``source``: each source alone, as a passthrough of all its layers (the exact source
  weights, so its scores equal scoring the source folder loaded from disk);
* ``default``: untuned merges of every source: their mean (``linear``, equal weights: a uniform
  soup, the base plus the mean of the task vectors), task arithmetic with every weight 1.0 and
  ``lambda`` 1 (the plain sum of the task vectors, as in Ilharco et al.), and TIES with
  every weight 1.0, density 0.5 and ``normalize: true`` (the TIES paper's defaults), and DARE-TIES
  with the same parameters (DARE's rescale on, its default; masks from the row's ``seed``).

A row is ``{"label", "kind", "trial", "metrics", "objectives", "mean_skill"}``: ``trial``
is the trial number (None for the others), ``metrics`` every score the fitness reports,
``objectives`` the objective value(s) by name, and ``mean_skill`` the mean of the
metrics with a non-zero weight that are maximized (the skill accuracies: minimized
metrics such as perplexity and report-only metrics of weight 0 are left out; None when
there are none), one scale-free number to compare rows by. ``items`` holds the per-item
values of those metrics (None when one of them has no per-item mean, e.g. a callable):
:func:`comparisons` pairs each trial with every other row on them (:mod:`.paired`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from optuna.trial import FrozenTrial
from tqdm.auto import tqdm

from evomerge.analysis.paired import Paired, compare
from evomerge.engine.config import MergeConfig, parse_config
from evomerge.live.materializer import Materializer
from evomerge.search.driver import Search
from evomerge.search.records import trial_records
from evomerge.engine.config import model_labels

log = logging.getLogger(__name__)
SPLIT = "test"
DEFAULT_MERGES = {  # label -> (method, per-source parameters, top-level parameters)
    "linear (mean)": ("linear", {"weight": 1.0}, {}),
    "task_arithmetic w=1 λ=1": ("task_arithmetic", {"weight": 1.0}, {"lambda": 1.0}),
    "ties w=1 density=0.5": ("ties", {"weight": 1.0, "density": 0.5}, {"normalize": True}),
    "dare_ties w=1 density=0.5": ("dare_ties", {"weight": 1.0, "density": 0.5}, {"normalize": True}),
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
    return Materializer(search.base, search.sources, device=search.device, progress=progress,
                        **search.experiment.materializer_options())


def candidates(search: Search, trials: Sequence[FrozenTrial]) -> list[Candidate]:
    """The trials' stored plans, then the base, each source alone and the default merges."""
    seed = search.experiment.seed
    records = [(t, trial_records(t)) for t in trials]
    rows = [Candidate(f"trial {t.number}", "trial", parse_config(r.plan, f"<trial {t.number}>"),
                      seed if r.seed is None else r.seed, t.number) for t, r in records]
    return rows + reference_candidates(search.base, search.sources, depth=search.space.context.num_layers,
                                       dtype=search.experiment.dtype, seed=seed)


def reference_candidates(base: str, sources: Sequence[str], *, depth: int, dtype: str,
                         seed: int = 0) -> list[Candidate]:
    """The base and each source alone (passthroughs of their ``depth`` layers), then the
    default merges of every source."""
    def whole(model: str) -> MergeConfig:
        return MergeConfig.model_validate({
            "merge_method": "passthrough", "dtype": dtype,
            "slices": [{"sources": [{"model": model, "layer_range": [0, depth]}]}]})

    rows = [Candidate("base", "base", whole(base), seed)]
    rows += [Candidate(label, "source", whole(path), seed) for label, path in zip(model_labels(sources), sources)]
    for label, (method, per_source, top) in DEFAULT_MERGES.items():
        config = MergeConfig.model_validate({
            "merge_method": method, "base_model": base, "dtype": dtype, "parameters": top,
            "models": [{"model": path, "parameters": per_source} for path in sources]})
        rows.append(Candidate(label, "default", config, seed))
    return rows


def skill_metrics(search: Search) -> list[str]:
    """The maximized metrics with a non-zero weight: what the mean skill averages."""
    return [name for name, metric in search.fitness.metrics.items()
            if metric.weight != 0 and metric.direction == "maximize"]


def mean_skill(search: Search, scores: dict[str, float]) -> float | None:
    """Mean of the maximized metrics with a non-zero weight (None when there are none)."""
    skills = [scores[name] for name in skill_metrics(search) if name in scores]
    return sum(skills) / len(skills) if skills else None


def heldout_rows(search: Search, trials: Sequence[FrozenTrial], *, materializer: Materializer | None = None,
                 progress: bool = False) -> list[dict[str, Any]]:
    """Score ``trials``, the base, each source and the default merges on the test split."""
    materializer = materializer or search_materializer(search, progress=progress)
    fitness, skills, rows = search.fitness, skill_metrics(search), []
    for candidate in tqdm(candidates(search, trials), desc="held-out", unit="model", disable=not progress):
        model = materializer.apply(candidate.config, seed=candidate.seed)
        scores, items = fitness.evaluate_items(model, materializer.tokenizer, SPLIT)
        log.debug("held-out %s: %s", candidate.label, scores)
        rows.append({"label": candidate.label, "kind": candidate.kind, "trial": candidate.trial,
                     "metrics": scores,
                     "objectives": dict(zip(fitness.metric_names, fitness.objectives(scores))),
                     "mean_skill": mean_skill(search, scores),
                     "items": {name: items[name] for name in skills} if skills and set(skills) <= set(items)
                     else None})
    return rows


def comparisons(rows: Sequence[dict[str, Any]]) -> list[Paired]:
    """Each trial row against every other row, paired on their items (rows without items are skipped)."""
    paired = [row for row in rows if row.get("items")]
    return [compare(row["items"], other["items"], labels=(row["label"], other["label"]))
            for row in paired if row["kind"] == "trial" for other in paired if other is not row]


Table = tuple[list[str], list[list[str]]]  # header, cells


def heldout_table(rows: Sequence[dict[str, Any]]) -> Table:
    """Label, kind, every metric, objectives not already a metric column, mean skill."""
    metrics = list(dict.fromkeys(name for row in rows for name in row["metrics"]))
    objectives = [name for name in dict.fromkeys(n for row in rows for n in row["objectives"])
                  if name not in metrics]

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[row["label"], row["kind"], *(cell(row["metrics"].get(m)) for m in metrics),
              *(cell(row["objectives"].get(o)) for o in objectives), cell(row["mean_skill"])]
             for row in rows]
    return ["model", "kind", *metrics, *objectives, "mean skill"], cells


def paired_table(paired: Sequence[Paired]) -> Table:
    """Model, reference, Δ mean skill with its 95% interval, wins, losses, sign-test p."""
    cells = [[p.model, p.reference, f"{p.difference:+.4f}", f"[{p.low:+.4f}, {p.high:+.4f}]", str(p.wins),
              str(p.losses), f"{p.p_value:.2g}"] for p in paired]
    return ["model", "vs", "Δ mean skill", "95% CI", "wins", "losses", "p (sign test)"], cells


def as_text(table: Table) -> str:
    """An aligned plain-text table (the first two columns left-aligned, the rest right-aligned)."""
    header, cells = table
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, cells)])


def as_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table."""
    header, cells = table
    lines = [header, ["---", "---", *["---:"] * (len(header) - 2)], *cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def as_html(table: Table, css_class: str) -> str:
    """An HTML ``<table>`` (escaped)."""
    header, cells = table
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in line) + "</tr>" for line in cells)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
