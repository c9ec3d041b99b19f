"""The metric interface every fitness term implements, and the error a failing metric raises.

A metric's score is an aggregate over *items* (lm-eval documents, perplexity windows, or a
single call for a Python callable). Splitting scores into items is what makes staged
evaluation cheap: the fitness scores the first items of a split for an early, prunable
estimate and later extends the same per-item values to the full set, never scoring an item
twice for the same candidate.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Iterator, Literal

import torch
from torch import nn


SPLITS = ("search", "test")
Direction = Literal["maximize", "minimize"]


class Metric(ABC):
    """One reported score: ``name``, optimization ``direction`` and objective ``weight``.

    ``item_mean``: the score is the mean of the per-item values (numbers), so two models'
    values on the same items can be compared item by item (:mod:`evomerge.analysis.paired`).
    """

    item_mean = False
    #: Forward-pass tokens this metric has computed so far, a running count that ``score`` keeps
    #: (every token fed to the model, a shared prompt prefix once per call); a fitness reports
    #: the count's growth per candidate.
    tokens_scored: int = 0
    #: When set, an item-mean metric scores the items of its search split in this order
    #: (position j: the data's item ``item_order[j]``), the same for every model: a fitness with
    #: racing sets it on the metrics it races (``evomerge.fitness.racing``: the racing order,
    #: whose first items are a uniformly random sample of all, or screening's). None: the data's
    #: own order.
    item_order: Sequence[int] | None = None

    def __init__(self, name: str, direction: Direction, weight: float):
        self.name, self.direction, self.weight = name, direction, weight

    def prepare(self, model: nn.Module, tokenizer: Any, split: str) -> None:  # noqa: B027 (optional hook)
        """Per-split setup that needs the model or tokenizer; called before every evaluation,
        so it must be cheap after the first call."""

    @abstractmethod
    def num_items(self, split: str) -> int:
        """How many items a full (``fraction=1``) evaluation of ``split`` scores (after prepare)."""

    @abstractmethod
    def score(self, model: nn.Module, tokenizer: Any, split: str, start: int, stop: int) -> list[Any]:
        """Per-item values for items ``[start, stop)`` of ``split`` (model in eval mode, no grad)."""

    @abstractmethod
    def aggregate(self, values: list[Any]) -> dict[str, float]:
        """The reported score(s) of a prefix of per-item values: ``{self.name: value, ...}``."""

    def sources(self) -> list[Path]:
        """Files whose content defines this metric (for the on-disk cache's fingerprint)."""
        return []

    def items_for(self, split: str, fraction: float) -> int:
        """Items scored at ``fraction`` of ``split``: ceil(fraction × all), at least one."""
        total = self.num_items(split)
        return min(total, max(1, math.ceil(fraction * total - 1e-9)))


@contextmanager
def scoring(model: nn.Module) -> Iterator[None]:
    """Evaluation mode without autograd; the model is left in eval mode afterwards.

    ``no_grad`` rather than ``inference_mode``: buffers a forward pass creates (e.g. rotary
    caches) must stay writable by the materializer's in-place updates.
    """
    model.eval()
    with torch.no_grad():
        yield
