"""Reading a finished (or running) study: status summary, trial choice, YAML export."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import ConfigError
from evomerge.search.distributed.storage import open_storage
from evomerge.search.experiment import Experiment, load_experiment
from evomerge.search.records import TrialRecords, trial_records


def locate_study(experiment: str | Path | None, study: str | None, storage: str | None) -> tuple[str, str]:
    """(study name, storage URL) from options, falling back to the experiment file's."""
    loaded: Experiment | None = load_experiment(experiment) if experiment else None
    name = study or (loaded.name if loaded else None)
    url = storage or (loaded.storage or loaded.default_storage if loaded else None)
    if not name or not url:
        raise ConfigError("give an EXPERIMENT file, or --study and --storage", field="study")
    return name, url


def open_study(name: str, url: str) -> optuna.Study:
    """Load an existing study (ConfigError naming the study and storage when missing)."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"no study database at {url}", field="storage")
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = ", ".join(s.study_name for s in optuna.get_all_study_summaries(storage)) or "none"
        raise ConfigError(f"no study named {name!r} in {url} (studies: {names})", field="study") from None


def pick_trial(study: optuna.Study, number: int | None = None) -> FrozenTrial:
    """Trial ``number``, else the best completed one (single objective only)."""
    if number is not None:
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not trials or trials[0].state != TrialState.COMPLETE:
            raise ConfigError(f"trial {number} is not a completed trial of {study.study_name}", field="trial")
        return trials[0]
    if len(study.directions) > 1:
        front = ", ".join(str(t.number) for t in study.best_trials)
        raise ConfigError(f"a multi-objective study has no single best trial; pick one of the Pareto "
                          f"front with --trial ({front})", field="trial")
    try:
        return study.best_trial
    except ValueError:
        raise ConfigError(f"study {study.study_name} has no completed trial yet", field="study") from None


def export_yaml(study: optuna.Study, trial: FrozenTrial) -> str:
    """The trial's merge config as YAML, with a header saying how to reproduce it."""
    records = trial_records(trial)
    if records.plan is None:
        raise ConfigError(f"trial {trial.number} of {study.study_name} recorded no plan", field="trial")
    seed = 0 if records.seed is None else records.seed
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in records.metrics.items())
    compatible = study.user_attrs.get("mergekit_compatible", True) and "input_scale" not in records.plan
    lines = [f"# evomerge study {study.study_name}, trial {trial.number}: {metrics}",
             f"# reproduce: evomerge merge THIS.yaml OUT_DIR --seed {seed}"]
    if not compatible:
        lines.append("# evomerge-only (data-flow input_scale): mergekit-yaml cannot read this config")
    return "\n".join(lines) + "\n" + records.plan


def cost_lines(records: list[TrialRecords]) -> list[str]:
    """What scoring cost, from the trials' ``scored`` and ``race`` records: items and tokens in
    all and per trial, and, when racing stopped trials, the items it saved and the time they
    would have taken (each metric's items not scored × its measured seconds per item, over
    every item the study scored of it). Nothing for a study without those records."""
    scored = [r for r in records if r.scored]
    if not scored:
        return []
    items, tokens = sum(r.items_scored for r in scored), sum(r.tokens_scored for r in scored)
    lines = [f"scored: {items:,} items, {tokens:,} tokens in {len(scored)} trials "
             f"({items / len(scored):,.0f} items, {tokens / len(scored):,.0f} tokens a trial)"]
    raced = [r for r in scored if r.race is not None]
    if raced:
        seconds: dict[str, list[float]] = {}
        for r in scored:
            for name, entry in r.scored.items():
                total = seconds.setdefault(name, [0.0, 0.0])
                total[0] += entry.get("seconds", 0.0)
                total[1] += entry.get("items", 0)
        stopped = [r for r in raced if r.raced_out]
        skipped = {name: sum(r.scored[name]["of"] - r.scored[name]["items"] for r in stopped if name in r.scored)
                   for name in seconds}
        full = sum(entry["of"] for r in scored for entry in r.scored.values())
        saved = sum(n * seconds[name][0] / seconds[name][1] for name, n in skipped.items() if seconds[name][1])
        lines.append(f"racing: {len(stopped)} of {len(raced)} raced trials stopped early; {sum(skipped.values()):,} "
                     f"items not scored ({sum(skipped.values()) / full:.0%} of a full evaluation of every trial), "
                     f"~{saved:.1f} s saved (est.: per metric, items not scored × seconds per item)")
        screened = [r for r in raced if "informative" in r.race]
        if screened:
            informative = sorted(r.race["informative"] for r in screened)
            probe = sorted(r.race.get("probe", 0) for r in screened)
            on_left_out = sum(r.raced_out and r.race["items"] > r.race["informative"] + r.race.get("probe", 0)
                              for r in screened)
            lines.append(f"screening: {len(screened)} trials raced on the informative items first (median "
                         f"{informative[len(informative) // 2]:,}"
                         + (f", after a probe of {probe[len(probe) // 2]:,} left-out items" if probe[-1] else "")
                         + f"), {sum(r.raced_out for r in screened)} of them stopped, {on_left_out} of those on the "
                         "left-out items (which the screening trials all had right)")
        by_anchors = [r for r in screened if r.race.get("estimated")]
        if by_anchors:
            lines.append(f"anchors: {len(by_anchors)} of them stopped on their anchors' prediction (median "
                         f"{sorted(r.race['items'] for r in by_anchors)[len(by_anchors) // 2]:,} items scored)")
    return lines


def summarize(study: optuna.Study) -> str:
    """A few lines: trials by state, best value(s), time spent, items and tokens scored (and saved
    by racing: :func:`cost_lines`)."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    lines = [f"study {study.study_name}: {len(trials)} trials ("
             + ", ".join(f"{n} {name}" for name, n in counts.items() if n) + ")"]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete and len(study.directions) == 1:
        best = study.best_trial
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in trial_records(best).metrics.items())
        lines.append(f"best: trial {best.number}, value {best.value:.4g} ({metrics})")
    elif complete:
        lines.append("pareto front: " + ", ".join(f"trial {t.number} {[round(v, 4) for v in t.values]}"
                                                  for t in study.best_trials))
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if finished:  # raced-out (pruned) trials took time too
        records = [trial_records(t) for t in finished]
        materialize = sum(r.time_materialize_s or 0 for r in records)
        spent = materialize + sum(r.time_fitness_s or 0 for r in records)
        lines.append(f"time: {spent:.1f} s in trials ({materialize:.1f} s materializing)")
    lines += cost_lines([trial_records(t) for t in trials])
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        lines.append(f"last failure: trial {failed[-1].number}: {trial_records(failed[-1]).failure or '?'}")
    return "\n".join(lines)
