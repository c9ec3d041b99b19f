"""The real-model example's skills: short chat questions with one exact answer each.

Three skills that SmolLM2-135M-Instruct does not have (it answers each with a sentence, so its
exact match is 0) and that a LoRA learns in a few dozen steps, each on a different kind of
token: digits in a new order (``reverse``), arithmetic (``add``), letters changed one by one
(``upper``). The held-out items, ``search`` and ``test`` splits of distinct prompts, come from
a fixed seed of their own and are shipped as package data under
``evomerge/shipped/fitness/data/chat_<skill>/`` (the lm-eval tasks ``chat_<skill>`` read them);
training items with a held-out prompt are skipped. ``tests/zoo/test_chat_skills.py`` checks that
the shipped files equal what the generators produce; ``python -m evomerge.zoo.chat_skills
evomerge/shipped`` rewrites them from a source checkout.
"""

from __future__ import annotations

import json
import random
import string
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from evomerge.zoo.heldout import split_items

ITEMS_PER_SPLIT = 128
_SEED = 2_000_003

Item = tuple[str, str]  # (question, answer)


def reverse(rng: random.Random) -> Item:
    """Five digits, reversed."""
    digits = "".join(rng.choice(string.digits) for _ in range(5))
    return f"Reverse the digits of {digits}.", digits[::-1]


def add(rng: random.Random) -> Item:
    """The sum of two two-digit numbers."""
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"What is {a} + {b}?", str(a + b)


def upper(rng: random.Random) -> Item:
    """Five random lowercase letters, in capitals."""
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(5))
    return f"Write '{word}' in capital letters.", word.upper()


SKILLS: dict[str, Callable[[random.Random], Item]] = {"reverse": reverse, "add": add, "upper": upper}


def heldout_items(skill: str, per_split: int = ITEMS_PER_SPLIT) -> dict[str, list[dict]]:
    """``{"search": [...], "test": [...]}``: ``{"prompt", "answer"}`` items with distinct prompts."""
    return split_items(SKILLS[skill], random.Random(f"{_SEED}:{skill}"), per_split)


def training_items(skill: str, rng: random.Random) -> Iterator[Item]:
    """An endless stream of ``skill``'s items, none with a held-out prompt."""
    held = {item["prompt"] for items in heldout_items(skill).values() for item in items}
    while True:
        prompt, answer = SKILLS[skill](rng)
        if prompt not in held:
            yield prompt, answer


def write_heldout(root: Path) -> list[Path]:
    """Write ``fitness/data/chat_<skill>/<split>.jsonl`` under ``root``; return the paths."""
    written = []
    for skill in SKILLS:
        for split, items in heldout_items(skill).items():
            path = root / "fitness" / "data" / f"chat_{skill}" / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(item) + "\n" for item in items))
            written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_heldout(Path(sys.argv[1] if len(sys.argv) > 1 else "evomerge/shipped")):
        print(written_path)
