"""Skill subtraction on a model zoo: the table of each skill's score and general perplexity.

Rows: the base, each specialist, the task-arithmetic merge of all of them, the merge without
the removed skill's specialist (the control), and the merge of the kept specialists minus
λ times the removed skill's task vector (see :mod:`evomerge.subtract`). Scores are on the
fitness's held-out ``test`` split by default. Works on any zoo folder with ``base/`` and one
folder per skill (``evomerge zoo``'s layout)::

    python benchmarks/zoo_subtract.py runs/zoo --remove dates
    python benchmarks/zoo_subtract.py runs/zoo --remove increment --lambda 0.5 --write-config sub.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from evomerge.fitness import load_fitness
from evomerge.subtract import format_table, score_configs, subtraction_configs, verdict, zoo_models

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Skill subtraction table for a model zoo.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("zoo", type=Path, nargs="?", default=Path("runs/zoo"), help="zoo folder")
    parser.add_argument("--remove", default="dates", help="skill whose task vector is subtracted")
    parser.add_argument("--lambda", dest="lam", type=float, default=1.0, help="scale of the subtracted task vector")
    parser.add_argument("--weight", type=float, default=1.0, help="weight of every kept task vector")
    parser.add_argument("--fitness", type=Path, default=REPO_ROOT / "fitness" / "zoo_skills.yaml")
    parser.add_argument("--split", choices=["search", "test"], default="test")
    parser.add_argument("--limit", type=int, default=None, help="at most N documents per lm-eval metric")
    parser.add_argument("--margin", type=float, default=0.05, help="allowed change of a kept skill's score")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write-config", type=Path, default=None, help="write the subtraction merge YAML here")
    parser.add_argument("--quiet", "-q", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    base, sources = zoo_models(args.zoo)
    fitness = load_fitness(args.fitness, limit=args.limit)
    configs = subtraction_configs(base, sources, args.remove, weight=args.weight, lam=args.lam)
    if args.write_config is not None:
        args.write_config.write_text(list(configs.values())[-1].to_yaml())
    rows = score_configs(base, list(sources.values()), configs, fitness, split=args.split, device=args.device)
    skills = [s for s in sources if s in fitness.metrics]
    print(f"skill subtraction on {args.zoo} ({args.split} split, remove {args.remove}, λ={args.lam:g}, "
          f"kept weight {args.weight:g})")
    print(format_table(rows, list(fitness.metrics)))
    print(verdict(rows, args.remove, skills, args.margin))
    print(f"command: python benchmarks/zoo_subtract.py {' '.join(argv if argv is not None else sys.argv[1:])}"
          f"  ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
