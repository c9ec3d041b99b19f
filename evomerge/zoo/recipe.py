"""The zoo recipe: every number that decides the zoo's weights, and its hash (the cache key).

A build is a pure function of the recipe (and of this package's code, whose data format is
versioned by ``FORMAT``): the same recipe gives the same tensors, so ``zoo.json`` stores the
recipe's hash and a rebuild with an equal hash is skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from evomerge.errors import ConfigError

FORMAT = 2


@dataclass(frozen=True)
class Specialist:
    """One fine-tune: its skill, which linear layers it trains (regex on module names) and, when
    ``slot`` is set, which part of them: MLP units ``[slot * slot_units, (slot + 1) * slot_units)``
    and attention head ``slot`` (rows of the projections into them, columns of those out of them)."""

    skill: str
    modules: str
    slot: int | None = None


@dataclass(frozen=True)
class Recipe:
    """Model shape, data and optimization settings for the base and its specialists."""

    seed: int = 0
    vocab_size: int = 768
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    context: int = 64
    batch_size: int = 32
    corpus_paragraphs: int = 20000
    skill_share: float = 0.5
    prompt_share: float = 0.1
    prompt_mix: tuple[float, ...] = (0.45, 0.45, 0.1)
    pretrain_steps: int = 1000
    pretrain_lr: float = 3e-3
    finetune_steps: int = 600
    finetune_lr: float = 2e-3
    general_fraction: float = 0.5
    general_weight: float = 0.5
    slot_units: int = 128
    keep_rows: int = 6
    keep_weight: float = 0.03
    eval_items: int = 200
    threads: int = 2
    specialists: tuple[Specialist, ...] = field(default_factory=lambda: (
        Specialist("increment", r"layers\.", 0),
        Specialist("reverse", r"layers\.", 1),
        Specialist("dates", r"layers\.", 2),
    ))

    @property
    def skills(self) -> list[str]:
        return [s.skill for s in self.specialists]

    def to_dict(self) -> dict:
        """The recipe as JSON data."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def hash(self) -> str:
        """SHA-256 (first 16 hex digits) of the recipe and the data format version."""
        text = json.dumps({"format": FORMAT, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def override(self, **changes) -> Recipe:
        """A copy with some fields changed; unknown fields are a ConfigError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown recipe field {unknown[0]!r}; expected one of {sorted(names)}")
        if "prompt_mix" in changes:
            changes["prompt_mix"] = tuple(float(w) for w in changes["prompt_mix"])
        if "specialists" in changes:
            changes["specialists"] = tuple(s if isinstance(s, Specialist) else Specialist(**s)
                                           for s in changes["specialists"])
        return dataclasses.replace(self, **changes)
