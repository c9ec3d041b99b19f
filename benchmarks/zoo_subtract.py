"""Skill subtraction on a model zoo: the table of each skill's score and general perplexity.

Rows: the base, each specialist, the task-arithmetic merge of all of them, the merge without
the removed skill's specialist (the control), and the merge of the kept specialists minus
λ times the removed skill's task vector (see :mod:`evomerge.recipes.subtract`). Scores are on the
fitness's held-out ``test`` split by default. Works on any zoo folder with ``base/`` and one
folder per skill (``evomerge zoo``'s layout)::

    python benchmarks/zoo_subtract.py runs/zoo --remove dates
    python benchmarks/zoo_subtract.py runs/zoo --remove increment --lambda 0.5 --write-config sub.yaml
"""

from __future__ import annotations

import sys
import time

from evomerge.io.writer import write_text_atomic
from evomerge.recipes.subtract import (
    format_table,
    score_configs,
    subtraction_configs,
    verdict,
    zoo_table_inputs,
    zoo_table_parser,
)


def parse_args(argv: list[str] | None = None):
    parser = zoo_table_parser("Skill subtraction table for a model zoo.")
    parser.add_argument("--remove", default="dates", help="skill whose task vector is subtracted")
    parser.add_argument("--lambda", dest="lam", type=float, default=1.0, help="scale of the subtracted task vector")
    parser.add_argument("--weight", type=float, default=1.0, help="weight of every kept task vector")
    parser.add_argument("--split", choices=["search", "test"], default="test")
    parser.add_argument("--margin", type=float, default=0.05, help="allowed change of a kept skill's score")
    parser.add_argument("--write-config", default=None, help="write the subtraction merge YAML here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    base, sources, fitness = zoo_table_inputs(args)
    configs = subtraction_configs(base, sources, args.remove, weight=args.weight, lam=args.lam)
    if args.write_config is not None:
        write_text_atomic(args.write_config, list(configs.values())[-1].to_yaml())
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
