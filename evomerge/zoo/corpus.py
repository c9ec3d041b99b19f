"""Generated text for the tiny zoo: a generic English-like corpus and one generator per skill.

Everything is a pure function of a ``random.Random``, so a seed fixes the data. The generic
corpus is templated sentences over a small lexicon, with numbers and dates, and with each
skill in running text ("412 and 3 make 415.") as a pretraining corpus would have it: the
base model learns the skills, but not the task prompts the specialists are tuned on. A skill example is a
``(prompt, answer)`` pair: the model sees ``prompt`` and must continue with ``answer`` and a
newline, which is how the lm-eval tasks in ``evomerge/shipped/fitness/tasks`` score it (greedy, until "\\n").
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Oscar",
         "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Nina", "Omar", "Lena")
NOUNS = ("cat", "dog", "bird", "fish", "tree", "house", "river", "stone", "book", "apple", "car",
         "boat", "hat", "cup", "door", "road", "hill", "lamp", "box", "key", "coat", "bell", "ship",
         "horse", "chair", "table", "window", "garden", "letter", "song", "cake", "bread", "ring",
         "map", "star", "cloud", "flower", "clock", "shoe", "train")
ADJECTIVES = ("red", "blue", "green", "small", "big", "old", "new", "quiet", "bright", "dark", "warm",
              "cold", "happy", "slow", "fast", "soft", "loud", "tall", "short", "sweet")
VERBS = ("saw", "found", "took", "liked", "painted", "moved", "opened", "carried", "watched",
         "counted", "bought", "sold", "cleaned", "drew", "lost", "kept", "showed", "wanted")
PLACES = ("in the garden", "near the river", "at the market", "under the bridge", "on the hill",
          "by the sea", "in the old house", "behind the school", "at the station", "in the forest")
TIMES = ("Yesterday", "In the morning", "Every day", "Last week", "At night", "On Sunday", "Later",
         "After lunch", "Before dinner", "Once")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")


def _date(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)


def _digits(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(4))


def _sentence(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    noun, noun2 = rng.sample(NOUNS, 2)
    adj, adj2 = rng.sample(ADJECTIVES, 2)
    verb, place, time = rng.choice(VERBS), rng.choice(PLACES), rng.choice(TIMES)
    n, m = rng.randint(2, 999), rng.randint(2, 99)
    year, month, day = _date(rng)
    templates = (
        f"{name} {verb} the {adj} {noun} {place}.",
        f"The {adj} {noun} is {place}.",
        f"{time}, {name} {verb} {n} {noun}s.",
        f"There are {n} {noun}s and {m} {noun2}s {place}.",
        f'{name} said: "the {noun} is {adj}, not {adj2}."',
        f"{name} and {other} {verb} a {adj} {noun}.",
        f"Is the {noun} {adj}? Yes, it is very {adj}.",
        f"On {MONTHS[month - 1]} {day} {year}, {name} {verb} the {noun2}.",
        f"{name} was born in {year}, and {other} was born in {rng.randint(1950, 2049)}.",
        f"The {noun} of {name} is {adj} and {adj2}.",
        f"{time} the {adj} {noun} {verb} a {noun2} {place}.",
        f"{name} has {m} {noun}s, {other} has {n}.",
    )
    return rng.choice(templates)


def _skill_sentence(rng: random.Random) -> str:
    name, noun = rng.choice(NAMES), rng.choice(NOUNS)
    a, b, code = rng.randint(100, 999), rng.randint(1, 9), _digits(rng)
    year, month, day = _date(rng)
    written, numeric = f"{MONTHS[month - 1]} {day} {year}", f"{day:02d}/{month:02d}/{year}"
    templates = (
        f"{name} had {a} {noun}s and got {b} more, so {name} had {a + b} {noun}s.",
        f"{a} and {b} make {a + b}.",
        f"The code {code} backwards is {code[::-1]}.",
        f"{name} read {code} from right to left: {code[::-1]}.",
        f"{name} wrote {written} as {numeric}.",
        f"{written} is {numeric}.",
    )
    return rng.choice(templates)


def general_text(rng: random.Random, paragraphs: int, skill_share: float = 0.0) -> str:
    """``paragraphs`` lines of two to five sentences, each line ending in a newline.

    A share ``skill_share`` of the sentences state a skill in running text.
    """
    def sentence() -> str:
        return _skill_sentence(rng) if rng.random() < skill_share else _sentence(rng)

    lines = (" ".join(sentence() for _ in range(rng.randint(2, 5))) for _ in range(paragraphs))
    return "".join(line + "\n" for line in lines)


def increment(rng: random.Random) -> tuple[str, str]:
    """``"next: 4719 ->"`` → ``"4720"``: a three- or four-digit number plus one."""
    number = rng.randint(100, 9998)
    return f"next: {number} ->", str(number + 1)


def reverse(rng: random.Random) -> tuple[str, str]:
    """``"reverse: 4719 ->"`` → ``"9174"``: a string of four digits, reversed."""
    code = _digits(rng)
    return f"reverse: {code} ->", code[::-1]


def dates(rng: random.Random) -> tuple[str, str]:
    """``"date: March 5 2021 ->"`` → ``"05/03/2021"``: a written date as day/month/year digits."""
    year, month, day = _date(rng)
    return f"date: {MONTHS[month - 1]} {day} {year} ->", f"{day:02d}/{month:02d}/{year}"


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "increment": increment, "reverse": reverse, "dates": dates,
}
