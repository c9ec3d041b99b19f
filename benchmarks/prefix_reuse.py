"""Prompt prefixes run once per candidate (``reusing_prefixes``) against once per scoring call.

For an experiment's base model and fitness, on the search split, each measured with and without
the block (``evomerge.fitness.fitness.reusing_prefixes`` replaced by a null context, here only):

* **one evaluation** (``Fitness.evaluate``): one call per metric, so only a prefix start the
  metrics share is saved (a chat template's system turn);
* **one race** (``Fitness.race`` against a reference that is the base itself, level on every item,
  so never stopped: every racing chunk is a call, the pattern of a raced candidate), with
  ``racing: {first: 32, growth: 2}``.

Prints the forward-pass tokens (``Metric.tokens_scored``), the seconds, and the per-item values'
agreement (the same items right either way). Run it from the folder the experiment's relative
model paths start from::

    python benchmarks/prefix_reuse.py real_ps
"""

from __future__ import annotations

import argparse
import contextlib
import time

from racing_search import with_racing  # run as a script: benchmarks/ is on the path

import evomerge.fitness.fitness as fitness_module
from evomerge.fitness import load_fitness
from evomerge.fitness.racing import Reference, in_item_order
from evomerge.search.experiment import load_experiment


def measure(definition: dict, model, tokenizer) -> dict:
    """Tokens and seconds of one evaluation and one race of ``model``, and its per-item values."""
    fitness = load_fitness(definition)
    scores, values = fitness.evaluate_items(model, tokenizer, "search")  # builds the tasks; not timed
    out = {}
    for label in ("evaluation", "race"):
        before, start = sum(m.tokens_scored for m in fitness.metrics.values()), time.perf_counter()
        if label == "evaluation":
            fitness.evaluate(model, tokenizer, "search")
        else:
            seed = fitness.racing.seed
            reference = Reference(0, {name: in_item_order(v, seed) for name, v in values.items()
                                      if name in fitness.gains.raced}, scores)
            race = fitness.race(model, tokenizer, [reference])
            assert not race.stopped, "a candidate level with its reference is never stopped"
        out[label] = {"tokens": sum(m.tokens_scored for m in fitness.metrics.values()) - before,
                      "seconds": time.perf_counter() - start}
    out["values"] = values
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="experiment name or YAML")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    experiment = load_experiment(args.experiment)
    definition = with_racing(experiment, {"first": 32, "growth": 2}).fitness  # its paths made absolute
    model = AutoModelForCausalLM.from_pretrained(experiment.models.base).eval()
    tokenizer = AutoTokenizer.from_pretrained(experiment.models.base)
    reused = measure(definition, model, tokenizer)
    with_block = fitness_module.reusing_prefixes
    fitness_module.reusing_prefixes = contextlib.nullcontext
    try:
        plain = measure(definition, model, tokenizer)
    finally:
        fitness_module.reusing_prefixes = with_block
    assert reused["values"] == plain["values"], "the per-item values differ with and without the block"
    for label in ("evaluation", "race"):
        a, b = plain[label], reused[label]
        print(f"{label}: {a['tokens']:,} tokens once a call, {b['tokens']:,} once a candidate "
              f"({a['tokens'] / b['tokens']:.3f}x fewer); {a['seconds']:.2f} s vs {b['seconds']:.2f} s")
    print("per-item values: the same with and without the block")
    return {"plain": plain, "reused": reused}


if __name__ == "__main__":
    main()
