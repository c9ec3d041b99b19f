"""Check and time the zoo's one-pass skill scoring against generating the answers, in the same run.

The shipped ``zoo_skills`` fitness scores each skill item with lm-eval's loglikelihood greedy check
(``zoo_<skill>_greedy``: is every token of the answer and its newline the most likely next
token?); ``zoo_skills_generate`` generates the answer (greedy, up to a newline
or 16 tokens) and compares it (``zoo_<skill>``, exact match): the anchor. For each model,
both score every item of each split on the same live model (requests built beforehand);
the table gives both times,
their ratio and how many items the two score differently (expected: none, since every zoo
answer is shorter than the generation budget). Models: the base, each specialist, the two
default merges of the held-out table and, with ``--study``, ``--trials`` plans of a study's
completed trials (evenly spaced over its history). Exits 1 when any item differs.

Run from the repository root with the project's virtual environment active, after
``evomerge zoo`` (or ``./dev.sh demo``)::

    python benchmarks/zoo_greedy.py                                   # runs/zoo, 7 models
    python benchmarks/zoo_greedy.py --study sqlite:///runs/demo/study.db --trials 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import optuna
import torch

from evomerge.analysis.heldout import as_text, reference_candidates
from evomerge.engine.config import MergeConfig, parse_config
from evomerge.fitness import load_fitness
from evomerge.live.materializer import Materializer
from evomerge.search.records import trial_records
from evomerge.zoo.corpus import SKILLS

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("zoo", nargs="?", type=Path, default=REPO / "runs" / "zoo", help="a built zoo")
    parser.add_argument("--study", default=None, help="Optuna storage URL of a search on this zoo")
    parser.add_argument("--study-name", default="zoo-ps-layers", help="the study's name")
    parser.add_argument("--trials", type=int, default=8, help="completed trials to check (with --study)")
    parser.add_argument("--splits", default="search,test", help="comma-separated: search, test")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    return parser.parse_args(argv)


def candidates(zoo: Path, args: argparse.Namespace) -> dict[str, MergeConfig]:
    """Label → merge config: base, specialists, default merges, then study trials."""
    depth = json.loads((zoo / "base" / "config.json").read_text())["num_hidden_layers"]
    configs = {c.label: c.config for c in reference_candidates(
        str(zoo / "base"), [str(zoo / skill) for skill in SKILLS], depth=depth, dtype="float32")}
    if args.study:
        study = optuna.load_study(study_name=args.study_name, storage=args.study)
        done = [t for t in study.get_trials(deepcopy=False)
                if t.state.name == "COMPLETE" and trial_records(t).plan is not None]
        step = max(1, len(done) // max(1, args.trials))
        for trial in done[::step][:args.trials]:
            configs[f"trial {trial.number}"] = parse_config(trial_records(trial).plan, f"<trial {trial.number}>")
    return configs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.zoo / "zoo.json").is_file():
        print(f"error: {args.zoo}: no built zoo (run `evomerge zoo {args.zoo}`)", file=sys.stderr)
        return 2
    splits = [s for s in args.splits.split(",") if s]
    os.chdir(REPO)  # the trials' plans name the zoo's models relative to the repository root
    generate, greedy = (load_fitness(name) for name in ("zoo_skills_generate", "zoo_skills"))  # shipped names
    materializer = Materializer(args.zoo / "base", [args.zoo / skill for skill in SKILLS], device="cpu", progress=False)
    print("command: python " + shlex.join(sys.argv))
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"python {platform.python_version()}; zoo {args.zoo}; load average {os.getloadavg()[0]:.2f}")
    for fitness in (generate, greedy):  # requests are built once per split, before timing
        for metric in fitness.metrics.values():
            for split in splits:
                metric.prepare(materializer.model, materializer.tokenizer, split)
    rows, total, differing = [], 0, 0
    for label, config in candidates(args.zoo, args).items():
        model = materializer.apply(config)
        for split in splits:
            times, items = {}, {}
            for name, fitness in (("generate", generate), ("greedy", greedy)):
                start = time.perf_counter()
                items[name] = fitness.evaluate_items(model, materializer.tokenizer, split)[1]
                times[name] = time.perf_counter() - start
            differ = {skill: sum(a != b for a, b in zip(items["generate"][skill], items["greedy"][skill]))
                      for skill in SKILLS}
            count = sum(len(items["greedy"][skill]) for skill in SKILLS)
            total, differing = total + count, differing + sum(differ.values())
            means = " / ".join(f"{sum(items['greedy'][s]) / len(items['greedy'][s]):.3f}" for s in SKILLS)
            rows.append([label, split, means, f"{times['generate']:.2f}", f"{times['greedy']:.2f}",
                         f"{times['generate'] / times['greedy']:.1f}x", f"{sum(differ.values())} / {count}"])
    print(as_text((["model", "split", " / ".join(SKILLS), "generate s", "greedy s", "speed-up", "items differing"],
                   rows)))
    print(f"{differing} of {total} items scored differently")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
