"""Check the real example's chat tasks item by item against greedy generation.

The fitness ``chat_skills`` scores an item with one forward pass: loglikelihood ``acc`` of
``answer<|im_end|>`` after the prompt rendered by SmolLM2's chat template. This script generates
the answer greedily instead (``model.generate`` from the same rendered prompt, stopped at
``<|im_end|>``) and counts, per model and skill, the items where the two disagree. Models: the
base, each specialist, the default merges of the held-out table, and any merge config given with
``--merge`` (e.g. a search's exported ``best.yaml``), all built by the same materializer the
search uses.

    python benchmarks/real_greedy.py --zoo runs/real --items 32 --merge runs/real-search/best.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from evomerge.analysis.heldout import reference_candidates
from evomerge.engine.config import load_config
from evomerge.fitness import load_fitness
from evomerge.live.materializer import Materializer
from evomerge.zoo.build import read_manifest
from evomerge.zoo.chat_skills import heldout_items
from evomerge.zoo.real import END_OF_TURN, render


@torch.no_grad()
def generated(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> str | None:
    """The greedy answer up to the end of turn, or None when the model does not end its turn."""
    ids = tokenizer(render(tokenizer, prompt), return_tensors="pt", add_special_tokens=False).input_ids
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=end, pad_token_id=end)[0, ids.shape[1]:].tolist()
    return tokenizer.decode(out[:out.index(end)]) if end in out else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=Path("runs/real"), help="built by evomerge zoo --real")
    parser.add_argument("--items", type=int, default=32, help="search-split items per skill")
    parser.add_argument("--merge", type=Path, action="append", default=[], help="a merge config to check too")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest = read_manifest(args.zoo)
    if manifest is None:
        raise SystemExit(f"{args.zoo}: no zoo.json (build it with evomerge zoo --real)")
    base = str(args.zoo / "base")
    sources = [str(args.zoo / skill) for skill in manifest["skills"]]
    fitness = load_fitness("chat_skills", limit=args.items)
    materializer = Materializer(base, sources)
    depth = json.loads((args.zoo / "base" / "config.json").read_text())["num_hidden_layers"]
    models = [(c.label, c.config, c.seed) for c in reference_candidates(base, sources, depth=depth, dtype="float32")]
    models += [(path.name, load_config(path), 0) for path in args.merge]
    print(f"{'model':<28} {'skill':<8} {'lm-eval acc':>11} {'generation':>10} {'disagree':>8}")
    total = 0
    for label, config, seed in models:
        model = materializer.apply(config, seed=seed)
        _, values = fitness.evaluate_items(model, materializer.tokenizer, "search")
        for skill in manifest["skills"]:
            items = heldout_items(skill)["search"][:args.items]
            greedy = [generated(model, materializer.tokenizer, item["prompt"]) == item["answer"] for item in items]
            scored = [value == 1.0 for value in values[skill]]
            disagree = sum(a != b for a, b in zip(greedy, scored))
            total += disagree
            print(f"{label:<28} {skill:<8} {sum(scored) / len(items):>11.3f} {sum(greedy) / len(items):>10.3f} "
                  f"{disagree:>8}", flush=True)
    print(f"disagreements: {total} of {len(models) * len(manifest['skills']) * args.items} items")


if __name__ == "__main__":
    main()
