"""Replay racing on a finished, fully evaluated study: items and tokens saved, and false drops.

Racing (``racing:`` in a fitness definition) stops a candidate once it cannot beat the incumbent.
Whether that is safe and worth it on real candidates is measured here without a model: the
study's trials stored every per-item value of their full evaluation (``items`` records), so
racing can be replayed in trial order for any settings (:func:`evomerge.analysis.replay.replay_racing`).
Each row prints how many trials racing would have stopped, the items and tokens it would have
scored against the full evaluation's, and the **false drops**: trials racing would have stopped
although their full evaluation made them the new incumbent (it should be 0; racing's confidence
bounds the chance of one per would-be incumbent). ::

    python benchmarks/racing_replay.py EXPERIMENT.yaml                          # the experiment's study
    python benchmarks/racing_replay.py EXPERIMENT.yaml --study s --storage sqlite:///runs/s.db \\
        --first 16 --first 32 --growth 2 --confidence 0.99 --confidence 0.9 --json out.json

The fitness (objectives, weights, which metrics are item means) comes from the experiment; every
combination of the ``--first``/``--growth``/``--confidence``/``--seed`` values given is a row.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from evomerge.analysis.replay import replay_racing
from evomerge.analysis.results import locate_study, open_study
from evomerge.fitness import Racing, load_fitness
from evomerge.search.experiment import load_experiment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="the experiment YAML whose study and fitness to replay")
    parser.add_argument("--study", default=None, help="study name (default: the experiment's)")
    parser.add_argument("--storage", default=None, help="storage URL (default: the experiment's)")
    parser.add_argument("--first", type=int, action="append", help="items of the first chunk (default 32)")
    parser.add_argument("--growth", type=float, action="append", help="chunk growth (default 2)")
    parser.add_argument("--confidence", type=float, action="append", help="racing confidence (default 0.99)")
    parser.add_argument("--seed", type=int, action="append", help="item-order seed (default 0)")
    parser.add_argument("--screen", type=int, action="append",
                        help="screening: the last trials that decide the informative items (default 0: off)")
    parser.add_argument("--anchors", type=int, action="append",
                        help="with --screen: informative items scored first to predict the rest (default 0: off)")
    parser.add_argument("--probe", type=int, action="append",
                        help="with --screen: left-out items every candidate scores first (default 0: none)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    experiment = load_experiment(args.experiment)
    spec = experiment.fitness
    fitness = load_fitness(spec if isinstance(spec, dict) else Path(spec))
    study = open_study(*locate_study(args.experiment, args.study, args.storage))
    rows = []
    for first, growth, confidence, seed, screen, anchors, probe in itertools.product(
            args.first or [32], args.growth or [2.0], args.confidence or [0.99], args.seed or [0], args.screen or [0],
            args.anchors or [0], args.probe or [0]):
        if (anchors or probe) and not screen:  # both are drawn from what screening finds
            continue
        replay = replay_racing(study, fitness, Racing(first=first, growth=growth, confidence=confidence, seed=seed,
                                                      screen=screen, anchors=anchors, probe=probe))
        print(replay.summary())
        rows.append({"first": first, "growth": growth, "confidence": confidence, "seed": seed, "screen": screen,
                     "anchors": anchors, "probe": probe,
                     **replay.totals(), "false_drop_trials": replay.false_drops, "skipped": len(replay.skipped)})
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
