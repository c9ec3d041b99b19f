"""Racing against full evaluation: the same search twice, its held-out quality, tokens and time.

For one experiment and optimizer seed, runs (or resumes) the search with full evaluation of every
candidate and the same search with racing (the experiment's fitness plus a ``racing:`` block;
evomerge.fitness.racing), then compares them:

* **held-out**: each study's best trial scored on the test split (which neither search saw);
  racing's best minus full evaluation's in mean skill, with the 95% paired bootstrap interval and
  the sign test of :mod:`evomerge.analysis.paired`. "Within the interval" means the interval
  reaches 0 or above: the racing search's best is not significantly worse;
* **rescore** (``--rescore``): every trial of the racing search scored in full afterwards (as
  long again as a full search): the **live false drops** (stopped trials whose value in full beat
  the incumbent of their time, the replay's count on the trials this search proposed) and how the
  estimates its sampler learned from match those values (mean estimate − value and their rank
  correlation, over all stopped trials and over each quarter of the search);
* **cost**: tokens and items scored over all trials (the trials' ``scored`` records: forward-pass
  tokens, ``Metric.tokens_scored``), the trials' wall time (sum of their durations: materializing,
  scoring, records) and trials per minute. Both searches use the same scorer (the fast
  loglikelihood path unless the fitness turns it off), so the token ratio is racing's own saving;
  ``--lm-eval-tokens`` also prints the tokens a full evaluation of one candidate feeds through
  lm-eval's own path (the base model), for the saving of both together.

Run it from the folder the experiment's relative model paths start from. A study that is already
complete is only read (so the full-evaluation study of a finished ``evomerge demo`` can be given)::

    python benchmarks/racing_search.py zoo_ps --seed 0 --full sqlite:///runs/demo/study.db \\
        --raced sqlite:///runs/race/s0.db --first 32 --confidence 0.99 --json runs/race/s0.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import numpy as np
import yaml
from optuna.trial import TrialState

from evomerge.analysis.heldout import search_materializer, skill_metrics
from evomerge.analysis.paired import compare
from evomerge.analysis.replay import rank_correlation
from evomerge.analysis.results import pick_trial
from evomerge.engine.config import parse_config
from evomerge.io import shipped
from evomerge.search.driver import run_search
from evomerge.search.experiment import Experiment, load_experiment
from evomerge.search.records import trial_records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="experiment name or YAML")
    parser.add_argument("--seed", type=int, default=0, help="optimizer seed of both searches")
    parser.add_argument("--full", required=True, help="storage URL of the full-evaluation study")
    parser.add_argument("--raced", required=True, help="storage URL of the racing study")
    parser.add_argument("--first", type=int, default=32, help="racing: items of the first chunk")
    parser.add_argument("--growth", type=float, default=2.0, help="racing: chunk growth")
    parser.add_argument("--confidence", type=float, default=0.99, help="racing: confidence")
    parser.add_argument("--screen", type=int, default=0,
                        help="racing: screening, leaving out the items the last SCREEN fully scored trials and the "
                             "incumbent all have right (0: off)")
    parser.add_argument("--anchors", type=int, default=0,
                        help="racing: with --screen, score ANCHORS informative items first, stop on their prediction")
    parser.add_argument("--probe", type=int, default=0,
                        help="racing: with --screen, left-out items every candidate scores first (0: none)")
    parser.add_argument("--limit", type=int, default=None,
                        help="racing search only: score at most this many search items of every lm-eval metric")
    parser.add_argument("--trials", type=int, default=None, help="trials per search (default: the budget)")
    parser.add_argument("--lm-eval-tokens", action="store_true",
                        help="also count one full evaluation's tokens through lm-eval's own path")
    parser.add_argument("--rescore", action="store_true",
                        help="also score every racing trial in full: live false drops and the estimates' error")
    parser.add_argument("--json", type=Path, default=None, help="write the row here too")
    return parser.parse_args(argv)


def with_racing(experiment: Experiment, racing: dict, limit: int | None = None) -> Experiment:
    """The experiment with its fitness definition (a file or a shipped name) plus ``racing`` (and
    ``limit`` on every lm-eval metric, when given), its relative paths (task folders, perplexity
    data) made absolute from the definition's folder."""
    if isinstance(experiment.fitness, dict):
        raise SystemExit("give the experiment's fitness as a file or a shipped name")
    path = shipped.find("fitness", experiment.fitness)
    data = yaml.safe_load(path.read_text())
    folders = data.get("include_path", [])
    data["include_path"] = [str(path.parent / p) for p in ([folders] if isinstance(folders, str) else folders)]
    for metric in data["metrics"].values():
        if metric.get("type") == "perplexity":
            metric["data"] = {split: str(path.parent / file) for split, file in metric["data"].items()}
        if metric.get("type") == "lm_eval" and limit is not None:
            metric["limit"] = limit
    data["racing"] = racing
    raced = copy.deepcopy(experiment)
    raced.fitness = data
    return raced


def cost(study) -> dict:
    """Trials, items and tokens scored, and the trials' wall time, of a finished study; by metric,
    the items, tokens and scoring seconds its trials recorded."""
    trials = [t for t in study.trials if t.datetime_complete is not None]
    records = [trial_records(t) for t in trials]
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
    by_metric: dict[str, dict] = {}
    for record in records:
        for name, entry in record.scored.items():
            total = by_metric.setdefault(name, {"items": 0, "tokens": 0, "seconds": 0.0})
            for key in total:
                total[key] += entry.get(key, 0)
    return {"trials": len(trials), "raced_out": sum(r.raced_out for r in records),
            "items": sum(r.items_scored for r in records), "tokens": sum(r.tokens_scored for r in records),
            "seconds": round(seconds, 1), "trials_per_min": round(60 * len(trials) / seconds, 2),
            "by_metric": {name: {**total, "seconds": round(total["seconds"], 1)} for name, total in by_metric.items()}}


def heldout(searches: dict) -> tuple[dict, dict]:
    """Each study's best trial on the test split: its per-item values of the skill metrics and mean skill."""
    any_search = next(iter(searches.values()))
    materializer = search_materializer(any_search)
    skills, items, scores = skill_metrics(any_search), {}, {}
    for label, search in searches.items():
        best = pick_trial(search.study)
        records = trial_records(best)
        config = parse_config(records.plan, f"<{label} trial {best.number}>")
        model = materializer.apply(config, seed=any_search.experiment.seed if records.seed is None else records.seed)
        values, per_item = search.fitness.evaluate_items(model, materializer.tokenizer, "test")
        items[label] = {name: per_item[name] for name in skills}
        scores[label] = {"trial": best.number, "search_value": best.value,
                         "mean_skill": sum(values[n] for n in skills) / len(skills),
                         **{n: values[n] for n in skills}}
    return items, scores


def rescored(search) -> dict:
    """Every trial of a racing search scored in full on the search split (module docstring)."""
    materializer = search_materializer(search)
    rows = []
    for trial in search.study.trials:
        stopped = trial.state == TrialState.PRUNED
        if not (trial.state == TrialState.COMPLETE or stopped and trial.intermediate_values):
            continue  # failed, or stopped with no estimate (several objectives)
        records = trial_records(trial)
        model = materializer.apply(parse_config(records.plan, f"<trial {trial.number}>"),
                                   seed=search.experiment.seed if records.seed is None else records.seed)
        value = search.fitness.objectives(search.fitness.evaluate(model, materializer.tokenizer, "search"))[0]
        estimate = trial.intermediate_values[max(trial.intermediate_values)] if stopped else trial.value
        rows.append((trial.number, stopped, estimate, value))
    incumbent, false_drops = -math.inf, []
    for number, stopped, _, value in rows:  # one worker: trial order is the order the search met them
        if stopped and value > incumbent + 1e-12:
            false_drops.append(number)
        elif not stopped:
            incumbent = max(incumbent, value)
    stopped = [(number, estimate, value) for number, is_stopped, estimate, value in rows if is_stopped]
    end = max((number for number, *_ in rows), default=0) + 1
    quarters = [errors([(e, v) for n, e, v in stopped if q * end / 4 <= n < (q + 1) * end / 4]) for q in range(4)]
    return {"false_drops": false_drops, **errors([(e, v) for _, e, v in stopped]), "quarters": quarters}


def errors(pairs: list[tuple[float, float]]) -> dict:
    """Stopped trials' (estimate, value) pairs: how many, the mean estimate − value, their rank
    correlation (from 3 pairs) and the best value."""
    if not pairs:
        return {"stopped": 0, "bias": None, "rank_correlation": None, "best_value": None}
    estimates, values = np.array(pairs).T
    return {"stopped": len(pairs), "bias": round(float(np.mean(estimates - values)), 4),
            "rank_correlation": round(rank_correlation(estimates, values), 3) if len(pairs) >= 3 else None,
            "best_value": round(float(values.max()), 4)}


def lm_eval_tokens(search) -> dict:
    """Tokens of one full search-split evaluation of the base, through the fast paths (loglikelihood
    and generation) and through lm-eval's own calls."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(search.base).eval()
    def use_fast_paths(fast: bool) -> None:
        for metric in search.fitness.metrics.values():
            if hasattr(metric, "fast_loglikelihood"):
                metric.fast_loglikelihood = metric.fast_generation = fast

    counts = {}
    for name, fast in (("fast", True), ("lm_eval", False)):
        use_fast_paths(fast)
        before = sum(m.tokens_scored for m in search.fitness.metrics.values())
        search.fitness.evaluate(model, search_materializer(search).tokenizer, "search")
        counts[name] = sum(m.tokens_scored for m in search.fitness.metrics.values()) - before
    use_fast_paths(True)
    return counts


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    experiment = load_experiment(args.experiment)
    experiment.optimizer.seed = args.seed
    racing = {"first": args.first, "growth": args.growth, "confidence": args.confidence, "screen": args.screen,
              "anchors": args.anchors, "probe": args.probe}
    searches = {"full": run_search(experiment, storage=args.full, n_trials=args.trials, progress=False),
                "raced": run_search(with_racing(experiment, racing, args.limit), storage=args.raced,
                                    n_trials=args.trials, progress=False)}
    costs = {label: cost(search.study) for label, search in searches.items()}
    items, scores = heldout(searches)
    paired = compare(items["raced"], items["full"], labels=("raced", "full"))
    row = {"experiment": args.experiment, "seed": args.seed, "racing": racing, "limit": args.limit, "cost": costs,
           "heldout": scores,
           "paired": paired.__dict__,
           "token_ratio": round(costs["full"]["tokens"] / max(costs["raced"]["tokens"], 1), 2),
           "speedup": round(costs["raced"]["trials_per_min"] / costs["full"]["trials_per_min"], 2),
           "within": paired.high >= 0}
    if args.lm_eval_tokens:
        row["one_evaluation_tokens"] = lm_eval_tokens(searches["full"])
    if args.rescore:
        row["rescore"] = rescored(searches["raced"])
        print(f"rescored: {len(row['rescore']['false_drops'])} live false drops; stopped trials' estimates: "
              f"bias {row['rescore']['bias']:+.3f}, rank correlation {row['rescore']['rank_correlation']:.2f} "
              f"(by quarter: {', '.join(str(q['rank_correlation']) for q in row['rescore']['quarters'])})")
    print(f"seed {args.seed}: full best trial {scores['full']['trial']} mean skill {scores['full']['mean_skill']:.3f}, "
          f"raced best trial {scores['raced']['trial']} {scores['raced']['mean_skill']:.3f}; raced - full "
          f"{paired.difference:+.3f} [{paired.low:+.3f}, {paired.high:+.3f}] p {paired.p_value:.2g}; tokens "
          f"{costs['full']['tokens']:,} vs {costs['raced']['tokens']:,} ({row['token_ratio']}x fewer), "
          f"trials/min {costs['full']['trials_per_min']} vs {costs['raced']['trials_per_min']} ({row['speedup']}x); "
          f"raced out {costs['raced']['raced_out']} of {costs['raced']['trials']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2) + "\n")
    return row


if __name__ == "__main__":
    main()
