"""The zoo's held-out evaluation data, shipped as package data under
``evomerge/shipped/fitness/data`` and never trained on.

Per skill, ``search`` and ``test`` items (disjoint, distinct prompts) come from a fixed seed
of their own, independent of the recipe, so the shipped files and every zoo build agree on
what is held out; training examples with a held-out prompt are skipped. The general
perplexity corpora are generic text from two further fixed seeds.
The shipped files are the source of truth (the zoo build only calls :func:`skill_items` to
skip held-out prompts; it writes no data file); ``tests/zoo/test_zoo.py`` checks that they
equal what the generators produce. ``python -m evomerge.zoo.heldout evomerge/shipped``,
from a source checkout, rewrites them (``write_heldout(ROOT)`` writes ``ROOT/fitness/data``).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

from evomerge.zoo.corpus import SKILLS, general_text

SPLITS = ("search", "test")
ITEMS_PER_SPLIT = 200
GENERAL_PARAGRAPHS = 300
_SEED = 1_000_003


def split_items(generate: Callable[[random.Random], tuple[str, str]], rng: random.Random,
                per_split: int) -> dict[str, list[dict]]:
    """``{"search": [...], "test": [...]}``: ``per_split`` ``{"prompt", "answer"}`` items each, drawn
    from ``generate(rng)`` in order, every prompt distinct (a repeated draw is skipped)."""
    items: dict[str, dict] = {}
    while len(items) < len(SPLITS) * per_split:
        prompt, answer = generate(rng)
        items.setdefault(prompt, {"prompt": prompt, "answer": answer})
    ordered = list(items.values())
    return {split: ordered[i * per_split:(i + 1) * per_split] for i, split in enumerate(SPLITS)}


def skill_items(skill: str, per_split: int = ITEMS_PER_SPLIT) -> dict[str, list[dict]]:
    """``{"search": [...], "test": [...]}``: ``{"prompt", "answer"}`` items with distinct prompts."""
    return split_items(SKILLS[skill], random.Random(f"{_SEED}:{skill}"), per_split)


def heldout_prompts(skill: str) -> set[str]:
    """Every held-out prompt of ``skill`` (both splits)."""
    return {item["prompt"] for items in skill_items(skill).values() for item in items}


def general_texts() -> dict[str, str]:
    """``{"search": text, "test": text}`` for the general perplexity metric."""
    return {split: general_text(random.Random(f"{_SEED}:general:{split}"), GENERAL_PARAGRAPHS)
            for split in SPLITS}


def write_heldout(root: Path) -> list[Path]:
    """Write ``fitness/data/<skill>/<split>.jsonl`` and ``fitness/data/general/<split>.txt`` under ``root``."""
    written = []
    data = root / "fitness" / "data"
    for skill in SKILLS:
        for split, items in skill_items(skill).items():
            path = data / skill / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(item) + "\n" for item in items))
            written.append(path)
    for split, text in general_texts().items():
        path = data / "general" / f"{split}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover
    write_heldout(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
