"""How mergeable is a zoo recipe? Fine-tune specialists from a zoo's base and map the merge landscape.

The zoo issue asks for specialists whose default merges keep a clear part of each skill *and*
leave room that per-layer weights can recover. This script measures both for a recipe that
differs from a built zoo's only in fine-tuning fields (``--set keep_weight=0.03``): it loads
the zoo's base, fine-tunes one specialist per skill with the changed recipe (or loads the
zoo's own specialists with ``--as-built``), and scores on each skill's search split, with
the zoo's greedy exact match (``evomerge.zoo.evaluate``, the build's mirror of the lm-eval tasks):

* each specialist alone, its task vector scaled by 0.5 … 1.5 (how sharp its skill is);
* task arithmetic with every weight 1 (the default merge) and each skill left out;
* optionally a grid over the three global weights (``--grid``);
* optionally a greedy search over per-layer, per-filter (attention / MLP) weights
  (``--coordinate``): from all weights 1, a change to one group's weight is kept when it raises
  the mean skill by more than 0.005; two passes.

    python benchmarks/zoo_recipes.py runs/zoo --as-built --coordinate 0.5,1.5
    python benchmarks/zoo_recipes.py runs/zoo --set keep_weight=0.03 --grid 0.6,0.8,1,1.25,1.5
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from evomerge.cli.zoo import _overrides
from evomerge.errors import ConfigError
from evomerge.zoo.build import deterministic, read_manifest
from evomerge.zoo.evaluate import exact_match
from evomerge.zoo.heldout import skill_items
from evomerge.zoo.recipe import Recipe

# Recipe fields that only fine-tuning reads: changing them keeps the zoo's base valid.
FINETUNE_FIELDS = {"finetune_steps", "finetune_lr", "general_fraction", "general_weight", "slot_units",
                   "keep_rows", "keep_weight", "specialists", "threads"}
SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


def weights(text: str) -> list[float]:
    """``"0.5,1,1.5"`` → ``[0.5, 1.0, 1.5]`` (argparse reports a bad value)."""
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("zoo", type=Path, nargs="?", default=Path("runs/zoo"), help="a built zoo folder")
    parser.add_argument("--set", dest="pairs", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"override a fine-tuning field of the zoo's recipe: {', '.join(sorted(FINETUNE_FIELDS))}")
    parser.add_argument("--as-built", action="store_true", help="score the zoo's own specialists (no tuning)")
    parser.add_argument("--items", type=int, default=128, help="search-split items per skill")
    parser.add_argument("--grid", type=weights, default=None,
                        help="comma-separated weights: every combination for the three")
    parser.add_argument("--coordinate", type=weights, default=None, help="comma-separated per-group weights to try")
    parser.add_argument("--save", type=Path, default=None, help="save the tuned specialists here")
    return parser.parse_args(argv)


def tuned_recipe(zoo: Path, pairs: list[str]) -> tuple[Recipe, dict]:
    """The zoo's recipe with fine-tuning overrides; ConfigError for any other field."""
    manifest = read_manifest(zoo)
    if manifest is None:
        raise ConfigError(f"no zoo.json; build the zoo first (evomerge zoo {zoo})", file=str(zoo))
    changes = _overrides(tuple(pairs))  # ConfigError: not FIELD=JSON
    foreign = sorted(set(changes) - FINETUNE_FIELDS)
    if foreign:
        raise ConfigError(f"changes the base, not only the fine-tunes; expected one of "
                          f"{sorted(FINETUNE_FIELDS)}", file="--set", field=foreign[0])
    return Recipe().override(**manifest["recipe"]).override(**changes), manifest


def specialists(zoo: Path, recipe: Recipe, base, tokenizer, as_built: bool) -> dict:
    """``{skill: model}``: the zoo's own, or fine-tuned from its base with ``recipe``."""
    from transformers import LlamaForCausalLM

    from evomerge.zoo.models import corpus, finetune

    if as_built:
        return {skill: LlamaForCausalLM.from_pretrained(zoo / skill).eval() for skill in recipe.skills}
    tokens = torch.tensor(tokenizer.encode(corpus(recipe), add_special_tokens=False))
    return {spec.skill: finetune(recipe, spec, base, tokenizer, tokens) for spec in recipe.specialists}


def save(tuned: dict, out: Path) -> None:
    """Each model into ``out/<skill>``, written to a temporary folder renamed into place."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for skill, model in tuned.items():
        model.save_pretrained(tmp / skill)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


class Landscape:
    """Scores of ``base + Σ w·τ`` merges, the weights given per skill and per tensor group."""

    def __init__(self, base, tuned: dict, tokenizer, items: int):
        self.base_state = {k: v.clone() for k, v in base.state_dict().items()}
        self.tasks = {skill: {k: v - self.base_state[k] for k, v in model.state_dict().items()}
                      for skill, model in tuned.items()}
        self.live, self.tokenizer = copy.deepcopy(base), tokenizer
        self.items = {skill: skill_items(skill)["search"][:items] for skill in tuned}
        layers = base.config.num_hidden_layers
        self.groups = [f"layers.{layer}.{part}." for layer in range(layers) for part in ("self_attn", "mlp")]

    def score(self, weights: dict) -> dict[str, float]:
        """Exact match per skill of the merge; ``weights[skill]`` or ``weights[(skill, group)]``."""
        state = {}
        for name, tensor in self.base_state.items():
            group = next((g for g in self.groups if g in name), None)
            state[name] = tensor + sum(weights.get((skill, group), weights.get(skill, 1.0)) * tau[name]
                                       for skill, tau in self.tasks.items())
        self.live.load_state_dict(state)
        return {skill: exact_match(self.live, self.tokenizer, items) for skill, items in self.items.items()}


def mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def coordinate_search(landscape: Landscape, values: list[float], passes: int = 2) -> tuple[dict, dict]:
    """Greedy per-(skill, group) weight changes from all weights 1; the kept weights and scores."""
    weights: dict = {}
    scores = landscape.score(weights)
    for _ in range(passes):
        for skill, group, value in itertools.product(landscape.tasks, landscape.groups, values):
            trial = {**weights, (skill, group): value}
            trial_scores = landscape.score(trial)
            if mean(trial_scores) > mean(scores) + 0.005:
                weights, scores = trial, trial_scores
    return weights, scores


def row(name: str, scores: dict[str, float]) -> str:
    return f"| {name} | " + " | ".join(f"{v:.3f}" for v in scores.values()) + f" | {mean(scores):.3f} |"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        recipe, manifest = tuned_recipe(args.zoo, args.pairs)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with deterministic(recipe.threads):  # as the build tunes: the recipe's own values reproduce its specialists
        return report(args, recipe, manifest, start)


def report(args: argparse.Namespace, recipe: Recipe, manifest: dict, start: float) -> int:
    """Tune (or load) the specialists and print the landscape table."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.zoo / "base")
    base = LlamaForCausalLM.from_pretrained(args.zoo / "base").eval()
    tuned = specialists(args.zoo, recipe, base, tokenizer, args.as_built)
    if args.save is not None:
        save(tuned, args.save)
    landscape = Landscape(base, tuned, tokenizer, args.items)
    skills = list(tuned)
    print(f"zoo {manifest['recipe_hash']} → recipe {recipe.hash()} "
          f"({'as built' if args.as_built else ' '.join(args.pairs) or 'rebuilt'}), "
          f"search split, {args.items} items per skill")
    print("| merge | " + " | ".join(skills) + " | mean |\n|---|" + "---:|" * (len(skills) + 1))
    print(row("base", landscape.score(dict.fromkeys(skills, 0.0))))
    alone = {}
    for skill in skills:
        for scale in SCALES:
            scores = landscape.score({**dict.fromkeys(skills, 0.0), skill: scale})
            alone[skill, scale] = scores[skill]
            if scale == 1.0:
                print(row(f"{skill} specialist", scores))
    uniform = landscape.score({})
    print(row("task arithmetic, every weight 1", uniform))
    for skill in skills:
        print(row(f"without {skill}", landscape.score({skill: 0.0})))
    if args.grid:
        values = args.grid
        best = max(((w, landscape.score(dict(zip(skills, w)))) for w in itertools.product(values, repeat=len(skills))),
                   key=lambda pair: mean(pair[1]))
        print(row(f"best of the {len(values)}^{len(skills)} grid: {best[0]}", best[1]))
    if args.coordinate:
        weights, scores = coordinate_search(landscape, args.coordinate)
        kept = ", ".join(f"{s} {g.strip('.')} {v:g}" for (s, g), v in weights.items()) or "none kept"
        print(row(f"per-layer/filter greedy ({kept})", scores))
    print("\nown skill of each specialist, task vector scaled by " + ", ".join(f"{s:g}" for s in SCALES))
    for skill in skills:
        print(f"  {skill}: " + ", ".join(f"{alone[skill, s]:.3f}" for s in SCALES))
    kept = ", ".join(f"{skill} {uniform[skill] / max(alone[skill, 1.0], 1e-9):.0%}" for skill in skills)
    print(f"the default merge keeps {kept} of each specialist's skill ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
