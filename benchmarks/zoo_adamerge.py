"""AdaMerging on a model zoo: entropy and held-out skill scores before and after.

Learns task-arithmetic coefficients of the zoo's specialists by minimizing the merge's
prediction entropy on the fitness's ``search``-split prompts (unlabeled: answers unused), from
every coefficient at ``--init`` or from a study's best trial (``--study``/``--storage``), then
scores the start and the learned merge with the fitness on the held-out ``test`` split (skill
exact match, general perplexity) and prints the table, with the entropy on the training
prompts and on the ``test``-split prompts. See :mod:`evomerge.recipes.adamerge`::

    python benchmarks/zoo_adamerge.py runs/zoo
    python benchmarks/zoo_adamerge.py runs/zoo --granularity task --steps 200
    python benchmarks/zoo_adamerge.py runs/zoo --study zoo-ps --storage sqlite:///runs/studies/zoo-ps.db
"""

from __future__ import annotations

import sys
import time

import torch

from evomerge.io.writer import write_text_atomic
from evomerge.recipes.adamerge import AdaMerger, AdaMergeSettings, coefficient_table
from evomerge.recipes.adamerge_inputs import fitness_prompts, trial_start
from evomerge.recipes.subtract import format_table, score_configs, zoo_table_inputs, zoo_table_parser


def parse_args(argv: list[str] | None = None):
    parser = zoo_table_parser("AdaMerging before/after table for a model zoo.")
    parser.add_argument("--granularity", choices=["layer", "task"], default="layer")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=3)
    parser.add_argument("--init", type=float, default=0.3, help="starting coefficient (without --study)")
    parser.add_argument("--bounds", type=float, nargs=2, default=(0.0, 1.0))
    parser.add_argument("--study", default=None, help="start from this study's best trial")
    parser.add_argument("--storage", default=None, help="the study's storage URL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the learned merge YAML here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    base, sources, fitness = zoo_table_inputs(args)
    prompts = {split: fitness_prompts(fitness, split) for split in ("search", "test")}
    merger = AdaMerger(base, list(sources.values()), granularity=args.granularity, device=args.device,
                       dtype=torch.float32, answer_tokens=args.answer_tokens)
    start = trial_start(merger, args.study, args.storage) if args.study else merger.uniform(args.init)
    bounds = (min(args.bounds[0], float(start.min())), max(args.bounds[1], float(start.max())))
    settings = AdaMergeSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                answer_tokens=args.answer_tokens, bounds=bounds, seed=args.seed)
    result = merger.train(prompts["search"], start, settings, progress=not args.quiet)
    labels = {"start": result.start, "AdaMerging": result.coefficients}
    entropy = {label: {f"H {split}": merger.mean_entropy(c, p) for split, p in prompts.items()}
               for label, c in labels.items()}
    configs = {label: merger.config(c) for label, c in labels.items()}
    if args.output is not None:
        write_text_atomic(args.output, configs["AdaMerging"].to_yaml())
    coefficients = coefficient_table(merger, result)
    del merger
    rows = score_configs(base, list(sources.values()), configs, fitness, split="test", device=args.device)
    skills = [s for s in sources if s in fitness.metrics]
    for row in rows:
        row["metrics"].update(entropy[row["label"]])
        row["metrics"]["mean skill"] = sum(row["metrics"][s] for s in skills) / len(skills)
    start_label = f"trial of {args.study}" if args.study else f"every coefficient {args.init:g}"
    print(f"AdaMerging on {args.zoo}: {args.granularity}-wise, {args.steps} steps, lr {args.lr:g}, "
          f"{len(prompts['search'])} search-split prompts, {args.answer_tokens} answer token(s); start: {start_label}")
    print(coefficients)
    print(format_table(rows, ["H search", "H test", *fitness.metrics, "mean skill"]))
    print("H: mean next-token entropy (nats) at the answer positions; skill scores and perplexity: test split")
    print(f"command: python benchmarks/zoo_adamerge.py {' '.join(argv if argv is not None else sys.argv[1:])}"
          f"  ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
