"""The study report: one folder with an offline ``index.html``, PNG plots and the tables.

:func:`write_report` writes, atomically (a hidden temporary folder renamed into place;
an existing non-empty folder is refused unless ``force``):

* ``index.html`` — self-contained (one inline copy of plotly.js, no network): the study
  summary, the held-out table and the interactive plots;
* one PNG per plot (matplotlib; figures are closed after saving, the backend is left to
  the caller: ``evomerge report`` selects ``Agg``): the optimization history (one per
  objective in a multi-objective study), parameter importances (PED-ANOVA, Optuna's
  default; skipped with a note under two completed trials or when it fails), the Pareto
  front (multi-objective studies with two or three objectives), and a layer map of each
  reported trial's merge (:func:`layer_map`);
* ``heldout.md`` / ``heldout.json`` — the held-out comparison on the test split
  (:mod:`evomerge.analysis.heldout`), and ``paired.json`` — each reported trial against every
  other row, item by item (:mod:`evomerge.analysis.paired`); ``trials.csv`` —
  ``study.trials_dataframe()``, a column per trial record (:func:`trials_frame`).

The reported trials are the best trial, or the Pareto front of a multi-objective study
(trials with the same plan counted once).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evomerge.analysis.heldout import as_html, as_markdown, comparisons, heldout_rows, heldout_table, paired_table
from evomerge.analysis.paired import RESAMPLES, Paired
from evomerge.analysis.results import locate_study, open_study, summarize
from evomerge.engine.config import ConditionalParameter, MergeConfig, parse_config
from evomerge.engine.plan import build_plan, open_models
from evomerge.errors import ConfigError, EvomergeError
from evomerge.io.writer import check_output_dir
from evomerge.search.driver import Search, open_search
from evomerge.search.experiment import load_experiment, parse_experiment
from evomerge.search.records import CANDIDATE, RESULT, TrialRecords, trial_records
from evomerge.engine.config import model_labels

log = logging.getLogger(__name__)
ANNOTATE_MAX_COLUMNS = 32  # layer maps write each cell's value up to this many layers
PAIRED_NOTE = (f"Paired on the same held-out items: Δ = the trial's mean skill minus the other row's; 95% CI: "
               f"paired bootstrap over the items ({RESAMPLES} resamples, each skill's items on their own); "
               "wins/losses: items the trial scored higher/lower on; p: exact two-sided sign test of wins "
               "against losses.")


@dataclass(frozen=True)
class Plot:
    """One figure, drawn twice: interactive (plotly) for the HTML and as a matplotlib PNG.
    ``fallible``: a failure becomes a note in the report instead of an error."""

    slug: str
    title: str
    plotly: Callable[[], Any]
    matplotlib: Callable[[], Any]  # -> matplotlib Figure
    fallible: bool = False


@dataclass(frozen=True)
class LayerMap:
    """A rows × output-layers matrix (NaN: empty cell) with a label per cell ("" for none)."""

    title: str
    rows: list[str]
    values: list[list[float]]
    text: list[list[str]]
    colorbar: str


# ----------------------------------------------------------------------------- the study


def report_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial, or the Pareto front (one trial per plan) of a multi-objective study."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ConfigError(f"study {study.study_name} has no completed trial yet", field="study")
    if len(study.directions) == 1:
        return [study.best_trial]
    front: dict[str, FrozenTrial] = {}
    for trial in sorted(study.best_trials, key=lambda t: t.number):
        front.setdefault(trial_records(trial).plan_hash or str(trial.number), trial)
    return list(front.values())


def trials_frame(study: optuna.Study) -> Any:
    """``study.trials_dataframe()`` with one ``user_attrs_<record>`` column per record of
    :class:`~evomerge.search.records.TrialRecords` but the per-item values (the packed
    ``candidate`` and ``result`` attributes unpacked; a study written with one attribute per record
    reads the same), and the trial's totals ``items_scored`` and ``tokens_scored`` and whether it
    was ``raced_out``."""
    frame = study.trials_dataframe()
    if frame.empty:
        return frame
    fields = [f.name for f in dataclasses.fields(TrialRecords)]
    frame = frame.drop(columns=[c for c in frame.columns if c.removeprefix("user_attrs_") in
                                {CANDIDATE, RESULT, *fields} and c.startswith("user_attrs_")])
    records = {t.number: trial_records(t) for t in study.get_trials(deepcopy=False)}
    for name in [*fields, "items_scored", "tokens_scored", "raced_out"]:
        if name != "items":  # per-item values: in the study (trial_records), too wide for a table
            frame[f"user_attrs_{name}"] = [getattr(records[n], name) for n in frame["number"]]
    return frame


def objective_names(study: optuna.Study) -> list[str]:
    """The objectives' names as the search recorded them (``objective i`` otherwise)."""
    names = study.user_attrs.get("signature", {}).get("objectives")
    if names and len(names) == len(study.directions):
        return list(names)
    return [f"objective {i}" for i in range(len(study.directions))]


# ----------------------------------------------------------------------------- layer maps


def _named_settings(config: MergeConfig) -> tuple[list[str], list[str]]:
    """Parameter names set anywhere in ``config`` and the tensor-name filters they use, in order."""
    blocks = [config.parameters, *(m.parameters for m in config.models or []),
              *(s.parameters for s in config.slices or []),
              *(source.parameters for s in config.slices or [] for source in s.sources)]
    names: dict[str, None] = {}
    filters: dict[str, None] = {}
    for block in filter(None, blocks):
        for name, setting in block.items():
            names[name] = None
            entries = setting if isinstance(setting, list) else [setting]
            filters |= {e.filter: None for e in entries
                        if isinstance(e, ConditionalParameter) and e.filter not in (None, "*")}
    return list(names), list(filters)


def layer_map(config: MergeConfig, seed: int = 0) -> LayerMap:
    """What a merge does at each output layer, read from the engine's plan of ``config``
    (so gradients, filters and scope precedence resolve exactly as in the merge).

    Layer stacking (passthrough): one row per model, each cell the source layer that
    fills that output layer, with ``×s`` for a data-flow input scale. Other methods: one
    row per float parameter the config sets × model (shared parameters: one row) ×
    filter group (each filter of the config, then ``rest``), each cell the value at that
    layer (the mean over the layer's tensors in the group).
    """
    plan = build_plan(config, open_models(config), seed)
    labels = dict(zip(config.referenced_models(), model_labels(config.referenced_models())))
    depth = len(plan.layer_sources)
    if config.merge_method == "passthrough":
        models = list(dict.fromkeys(model for model, _ in plan.layer_sources))
        scales = plan.layer_scales or [None] * depth
        return LayerMap(
            "layer sources (cell: source layer, ×: input scale)", [labels[m] for m in models],
            [[layer if model == row else math.nan for model, layer in plan.layer_sources] for row in models],
            [[f"{layer}" + (f" ×{scale:.2g}" if scale not in (None, 1) else "") if model == row else ""
              for (model, layer), scale in zip(plan.layer_sources, scales)] for row in models],
            "source layer")
    method = plan.method
    names, filters = _named_settings(config)
    floats = [p.name for p in method.params if p.name in names and p.kind is float]
    groups = [*filters, "rest"] if filters else [""]
    models = config.referenced_models()
    cells: dict[tuple[int, int, int], list[list[float]]] = {}
    for op in plan.ops:
        if op.layer is None:
            continue
        group = groups.index(next((f for f in filters if f in op.name), "rest")) if filters else 0
        for p, name in enumerate(floats):
            if method.param(name).scope == "shared":
                cells.setdefault((p, -1, group), [[] for _ in range(depth)])[op.layer].append(op.shared[name])
                continue
            for (model, _), values in zip(op.inputs, op.per_input):
                if name in values:
                    key = (p, models.index(model), group)
                    cells.setdefault(key, [[] for _ in range(depth)])[op.layer].append(values[name])
    rows = sorted(cells)

    def label(p: int, m: int, g: int) -> str:
        return " ".join(part for part in (labels[models[m]] if m >= 0 else "", floats[p],
                                          f"[{groups[g]}]" if groups[g] else "") if part)

    values = [[sum(c) / len(c) if c else math.nan for c in cells[key]] for key in rows]
    text = [["" if math.isnan(v) else f"{v:.2f}" for v in row] for row in values]
    return LayerMap(f"{method.name} parameters per layer", [label(*key) for key in rows], values, text, "value")


def _plotly_layer_map(data: LayerMap):
    import plotly.graph_objects as go

    columns = len(data.values[0])
    figure = go.Figure(go.Heatmap(
        z=[[None if math.isnan(v) else v for v in row] for row in data.values], y=data.rows,
        x=list(range(columns)), text=data.text,
        texttemplate="%{text}" if columns <= ANNOTATE_MAX_COLUMNS else None, colorscale="Viridis", hoverongaps=False,
        colorbar={"title": {"text": data.colorbar}}))
    figure.update_layout(title=data.title, xaxis_title="output layer", yaxis={"autorange": "reversed"},
                         height=160 + 28 * len(data.rows))
    return figure


def _matplotlib_layer_map(data: LayerMap):
    import numpy as np
    from matplotlib.figure import Figure

    values = np.ma.masked_invalid(np.array(data.values, dtype=float))
    rows, columns = values.shape
    figure = Figure(figsize=(max(6.0, 0.45 * columns + 3), max(2.5, 0.35 * rows + 1.5)))
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes, label=data.colorbar)
    axes.set_yticks(range(rows), data.rows, fontsize=8)
    axes.set_xticks(range(columns))
    axes.set_xlabel("output layer")
    axes.set_title(data.title)
    axes.grid(False)
    if columns <= ANNOTATE_MAX_COLUMNS:
        for (i, j), text in np.ndenumerate(np.array(data.text, dtype=object)):
            if text:
                bright = image.norm(values[i, j]) > 0.6
                axes.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if bright else "white")
    return figure


# ----------------------------------------------------------------------------- plots


def _optuna_plot(slug: str, title: str, function: str, study: optuna.Study, *, fallible: bool = False,
                 **kwargs: Any) -> Plot:
    """A plot Optuna draws with plotly and with its matplotlib twin (same arguments)."""
    from optuna import visualization
    from optuna.visualization import matplotlib as twin

    return Plot(slug, title, lambda: getattr(visualization, function)(study, **kwargs),
                lambda: getattr(twin, function)(study, **kwargs).figure, fallible)


def study_plots(study: optuna.Study, trials: Sequence[FrozenTrial]) -> tuple[list[Plot], list[str]]:
    """The report's plots and notes about the ones left out."""
    names, plots, notes = objective_names(study), [], []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    multi = len(names) > 1
    for i, name in enumerate(names):
        target = (lambda t, i=i: t.values[i]) if multi else None
        plots.append(_optuna_plot(f"history-{i}" if multi else "optimization-history",
                                  f"Optimization history: {name}", "plot_optimization_history", study,
                                  target=target, target_name=name))
    if len(complete) < 2:
        notes.append("parameter importances: need at least two completed trials")
    else:
        for i, name in enumerate(names):  # PED-ANOVA ranks low targets: maximized ones are negated
            sign = -1.0 if study.directions[i] == StudyDirection.MAXIMIZE else 1.0
            plots.append(_optuna_plot(f"importances-{i}" if multi else "param-importances",
                                      f"Parameter importances: {name}", "plot_param_importances", study,
                                      fallible=True, target=lambda t, i=i, s=sign: s * t.values[i],
                                      target_name=name))
    if multi and len(names) <= 3:
        plots.append(_optuna_plot("pareto-front", "Pareto front", "plot_pareto_front", study,
                                  target_names=names))
    elif multi:
        notes.append(f"Pareto front: not drawn for {len(names)} objectives (at most 3)")
    for trial in trials:
        records = trial_records(trial)
        config = parse_config(records.plan, f"<trial {trial.number}>")
        try:
            data = layer_map(config, records.seed or 0)
        except EvomergeError as error:  # e.g. the models are not on this machine
            notes.append(f"layer map of trial {trial.number}: {error}")
            continue
        if not data.rows:
            notes.append(f"layer map of trial {trial.number}: its plan sets no per-layer number")
            continue
        plots.append(Plot(f"layers-{trial.number}", f"Trial {trial.number}: {data.title}",
                          lambda data=data: _plotly_layer_map(data), lambda data=data: _matplotlib_layer_map(data)))
    return plots, notes


def _render(plot: Plot, folder: Path) -> str:
    """Save the plot's PNG into ``folder``; return its HTML div."""
    import matplotlib
    import matplotlib.pyplot as plt

    with warnings.catch_warnings(), matplotlib.rc_context():  # Optuna's twins set a global style
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")
        div = plot.plotly().to_html(full_html=False, include_plotlyjs=False, div_id=plot.slug,
                                    default_height="480px")
        figure = plot.matplotlib()
        figure.savefig(folder / f"{plot.slug}.png", dpi=110, bbox_inches="tight")
        plt.close(figure)
    return div


# ----------------------------------------------------------------------------- writing


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A hidden temporary folder next to ``out_dir``, renamed onto it when the block succeeds."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    elif out_dir.exists():
        out_dir.unlink()
    os.replace(tmp, out_dir)


def _html(study: optuna.Study, sections: list[str], rows: list[dict] | None, paired: list[Paired],
          notes: list[str], trials: Sequence[FrozenTrial]) -> str:
    from plotly.offline import get_plotlyjs

    heldout = ""
    if rows is not None:
        heldout = ("<h2>Held-out comparison (test split)</h2>" + as_html(heldout_table(rows), "heldout")
                   + "<p>mean skill: the mean of the maximized metrics with a non-zero weight.</p>")
        if paired:
            heldout += ("<h3>Paired on the same items</h3>" + as_html(paired_table(paired), "paired")
                        + f"<p>{escape(PAIRED_NOTE)}</p>")
    plans = "".join(f"<h3>Trial {t.number}</h3><pre>{escape(trial_records(t).plan or '')}</pre>" for t in trials)
    note_list = "".join(f"<li>{escape(note)}</li>" for note in notes)
    files = " · ".join(f'<a href="{name}">{name}</a>' for name in
                       ["trials.csv", *(["heldout.md", "heldout.json", "paired.json"] if rows is not None else [])])
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>evomerge report: {escape(study.study_name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} td:nth-child(-n+2){{text-align:left}}
pre{{background:#f6f6f6;padding:8px}}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head><body>
<h1>evomerge study {escape(study.study_name)}</h1><pre>{escape(summarize(study))}</pre>
{heldout}{"".join(sections)}
{f"<h2>Notes</h2><ul>{note_list}</ul>" if notes else ""}
<h2>Merge config of the reported trial(s)</h2>{plans}
<p>Files: {files}</p>
</body></html>
"""


def write_report(search_or_study: Search | optuna.Study, out_dir: str | Path, *, heldout: bool = True,
                 rows: list[dict] | None = None, device: str | None = None, force: bool = False,
                 progress: bool = False) -> Path:
    """Write the report of a study into ``out_dir`` (see the module docstring); return it.

    The held-out table needs a :class:`Search` (its models and fitness) unless ``rows``
    (from :func:`~evomerge.analysis.heldout.heldout_rows`) are given; ``device`` overrides
    the search's for it. ``heldout=False`` leaves the table out.
    """
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, force)
    search = search_or_study if isinstance(search_or_study, Search) else None
    study = search.study if search else search_or_study
    trials = report_trials(study)
    if heldout and rows is None:
        if search is None:
            raise ConfigError("the held-out table needs the experiment's models and fitness: pass a Search "
                              "(open_search) or heldout=False", field="heldout")
        search = dataclasses.replace(search, device=device) if device else search
        rows = heldout_rows(search, trials, progress=progress)
    rows = rows if heldout else None
    paired = comparisons(rows) if rows is not None else []
    plots, notes = study_plots(study, trials)
    with _staging(out_dir) as folder:
        sections = []
        for plot in plots:
            try:
                div = _render(plot, folder)
            except Exception as error:  # only plots marked fallible
                if not plot.fallible:
                    raise
                log.warning("%s: skipped (%s: %s)", plot.title, type(error).__name__, error)
                notes.append(f"{plot.title}: skipped ({type(error).__name__}: {error})")
                continue
            sections.append(f'<h2>{escape(plot.title)}</h2>{div}<p><a href="{plot.slug}.png">PNG</a></p>')
        trials_frame(study).to_csv(folder / "trials.csv", index=False)
        if rows is not None:
            (folder / "heldout.md").write_text(as_markdown(heldout_table(rows)) + (
                f"\n{PAIRED_NOTE}\n\n{as_markdown(paired_table(paired))}" if paired else ""))
            (folder / "heldout.json").write_text(json.dumps(rows, indent=2) + "\n")
            (folder / "paired.json").write_text(json.dumps([p.as_dict() for p in paired], indent=2) + "\n")
        (folder / "index.html").write_text(_html(study, sections, rows, paired, notes, trials))
    log.info("wrote report %s", out_dir / "index.html")
    return out_dir


def open_report_source(experiment: str | Path | None, study: str | None, storage: str | None, *,
                       heldout: bool = True, device: str | None = None) -> Search | optuna.Study:
    """What :func:`write_report` needs, located like ``evomerge status``: the study alone
    without a held-out table, else a :class:`Search` over the EXPERIMENT file or, without
    one, the experiment the study recorded (its relative paths are taken from the current
    directory)."""
    name, url = locate_study(experiment, study, storage)
    stored = open_study(name, url)
    if not heldout:
        return stored
    if experiment:
        loaded = load_experiment(experiment)
    elif "experiment" in stored.user_attrs:
        loaded = parse_experiment(stored.user_attrs["experiment"], f"<experiment of study {name}>")
    else:
        raise ConfigError(f"study {name} records no experiment; give the EXPERIMENT file", field="experiment")
    return open_search(loaded, study_name=name, storage=url, device=device, create=False)
