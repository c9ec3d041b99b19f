"""Generation drafts from the last model's answers against drafts from the targets.

The fast generation path (evomerge.fitness.lmeval, ``fast_generation``) verifies a guessed answer
per prompt in one forward pass; only the prompts whose guess is wrong are then decoded one token
per pass, and a batch runs as many of those passes as its longest wrong guess needs. The guess is
the answers the last models scored generated from the same prompt (in a search, near candidates),
then the document's target; after a rejection, the first guess that goes on from what was
generated is verified in the next pass. This replays a finished study's candidates in trial order and scores each
one's generation metrics on the search split twice, by two fitness instances of the experiment:

* **targets**: drafts from the targets only (``LmEvalMetric.forget_answers`` before each candidate);
* **last answers**: the metric's memory of recent answers on, as a search runs;

and, as the oracle and the anchor, by lm-eval's own path (``fast_generation: false``: HFLM's
``generate_until``, transformers' ``generate``). Prints forward passes, tokens
(``Metric.tokens_scored``) and seconds of each, and checks that the per-item values of all three
are the same. Run it from the folder the experiment's relative model paths start
from (``--trials A:B``: the trial numbers to replay)::

    python benchmarks/generation_drafts.py real_ps --storage sqlite:///runs/r192/full-s0.db --trials 128:192
"""

from __future__ import annotations

import argparse
import time
from functools import partial

from racing_search import with_racing  # run as a script: benchmarks/ is on the path

from evomerge.analysis.heldout import search_materializer
from evomerge.engine.config import parse_config
from evomerge.fitness import load_fitness
from evomerge.fitness.base import scoring
from evomerge.fitness.lmeval import LmEvalMetric
from evomerge.fitness.loglikelihood import reusing_prefixes
from evomerge.search.driver import open_search
from evomerge.search.experiment import load_experiment
from evomerge.search.records import trial_records


def _count(forwards: list[int], *_: object) -> None:
    forwards[0] += 1


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="experiment name or YAML")
    parser.add_argument("--storage", required=True, help="storage URL of a finished study of the experiment")
    parser.add_argument("--trials", default="0:64", help="trial numbers A:B to replay (default 0:64)")
    args = parser.parse_args(argv)
    first, end = (int(part) for part in args.trials.split(":"))

    experiment = load_experiment(args.experiment)
    search = open_search(experiment, storage=args.storage, create=False)
    definition = with_racing(experiment, {}).fitness  # the definition, its paths made absolute
    del definition["racing"]
    slow = {**definition, "metrics": {name: {**spec, "fast_generation": False} if spec.get("type") == "lm_eval"
                                      else spec for name, spec in definition["metrics"].items()}}
    fitnesses = {"targets": load_fitness(definition), "last answers": load_fitness(definition),
                 "lm-eval's path": load_fitness(slow)}
    metrics = {label: [m for m in fitness.metrics.values() if isinstance(m, LmEvalMetric)
                       and m.tasks["search"].get_config("output_type") == "generate_until"]
               for label, fitness in fitnesses.items()}
    if not metrics["targets"]:
        raise SystemExit(f"{args.experiment}: no generation metric to replay")
    materializer = search_materializer(search)
    trials = [t for t in search.study.trials if first <= t.number < end and trial_records(t).plan]
    totals = {label: {"forwards": 0, "tokens": 0, "seconds": 0.0} for label in fitnesses}
    for trial in trials:
        records = trial_records(trial)
        model = materializer.apply(parse_config(records.plan, f"<trial {trial.number}>"),
                                   seed=experiment.seed if records.seed is None else records.seed)
        forwards = [0]
        hook = model.register_forward_pre_hook(partial(_count, forwards))
        values = {}
        try:
            labels = ["targets", "last answers"]
            for label in (labels if trial.number % 2 else labels[::-1]) + ["lm-eval's path"]:  # alternate
                for metric in metrics[label]:
                    metric.prepare(model, materializer.tokenizer, "search")  # the requests, built once
                    if label == "targets":
                        metric.forget_answers()
                before = [m.tokens_scored for m in metrics[label]]
                forwards[0], start = 0, time.perf_counter()
                with scoring(model), reusing_prefixes():
                    values[label] = [m.score(model, materializer.tokenizer, "search", 0, m.num_items("search"))
                                     for m in metrics[label]]
                totals[label]["seconds"] += time.perf_counter() - start
                totals[label]["forwards"] += forwards[0]
                totals[label]["tokens"] += sum(m.tokens_scored - b for m, b in zip(metrics[label], before))
        finally:
            hook.remove()
        assert values["targets"] == values["last answers"] == values["lm-eval's path"], (
            f"trial {trial.number}: the per-item values differ")
    a, b, c = totals["targets"], totals["last answers"], totals["lm-eval's path"]
    names = ", ".join(m.name for m in metrics["targets"])
    print(f"{len(trials)} candidates (trials {first}-{end - 1}), metrics {names}, search split, one call each:")
    for label, row in totals.items():
        print(f"  {label:14s} {row['forwards']:6,} forward passes, {row['tokens']:8,} tokens, {row['seconds']:7.1f} s")
    print(f"  last answers / targets: forward passes {b['forwards'] / a['forwards']:.3f}, tokens "
          f"{b['tokens'] / a['tokens']:.3f}, seconds {b['seconds'] / a['seconds']:.3f}")
    print(f"  against lm-eval's path: seconds, targets {a['seconds'] / c['seconds']:.3f}, last answers "
          f"{b['seconds'] / c['seconds']:.3f}; per-item values the same on all three")
    return totals


if __name__ == "__main__":
    main()
