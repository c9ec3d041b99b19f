"""What evomerge records on a trial, and the one way to read it back (:func:`trial_records`).

A trial of ``evomerge search`` carries its records in three user attributes, each one write of
Optuna's public ``Trial.set_user_attr``; two of them pack several records into one JSON object,
as Optuna's samplers pack their state into few attributes:

* ``candidate`` (:data:`CANDIDATE`), written once the trial's parameters are decoded, before
  the candidate is merged: ``worker`` (``host:pid``, so a dead worker's trial is found),
  ``device``, ``seed`` (the mask seed) and ``plan_hash`` (identity of the candidate's weights);
* ``plan`` (:data:`PLAN`), written right after it: the decoded merge config, YAML text. It is
  a string of its own so that optuna-dashboard shows it whole (it cuts any other value's JSON
  at 1,024 characters; a plan of a real model is longer);
* ``result`` (:data:`RESULT`), written when the trial ends: ``metrics`` (every metric of the
  fitness; of the stages scored, for a pruned trial), ``time_materialize_s`` and
  ``time_fitness_s``, ``same_plan_as`` (the completed trial whose scores a repeated plan reused)
  and ``failure`` (why a failed trial failed, also when another worker failed it), each where it
  applies; and what scoring it cost and found: ``scored`` (per metric: ``items`` scored of the
  ``of`` a full evaluation scores, forward-pass ``tokens`` and ``seconds``), ``items`` (per
  item-mean metric scored in full: its per-item values in the items' own order, a string of
  ``0``/``1`` when every value is one of those, else a list of numbers; what racing compares
  against and the replay reads) and ``race`` (a trial raced against references: ``stopped``,
  ``items`` scored of the raced metrics, ``estimate``: the objective values on the items scored,
  ``upper``: the upper bounds of its gains over ``reference`` at the last decision; with
  screening, ``informative``: its informative items, ``probe``: the left-out items it scored
  first; ``estimated``: true when that decision was
  the anchors' prediction, ``upper`` then holding the predicted gains).

``warm_start`` (True on the space's known recipes) is an attribute of its own too: it is written
with the enqueued trial, not by the loop. Studies written before the records were packed (one
user attribute per record, same names) read the same through :func:`trial_records`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial

CANDIDATE = "candidate"  # user attribute: the records written before the merge, but the plan
PLAN = "plan"  # user attribute: the plan (YAML)
RESULT = "result"  # user attribute: the records written when the trial ends
CANDIDATE_KEYS = ("worker", "device", "seed", "plan_hash")
RESULT_KEYS = ("metrics", "time_materialize_s", "time_fitness_s", "same_plan_as", "failure", "scored", "items",
               "race")


@dataclass(frozen=True)
class TrialRecords:
    """A trial's evomerge records; None (``metrics``: empty) where the trial has none."""

    worker: str | None = None
    device: str | None = None
    seed: int | None = None
    plan_hash: str | None = None
    plan: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    time_materialize_s: float | None = None
    time_fitness_s: float | None = None
    same_plan_as: int | None = None
    failure: str | None = None
    scored: dict[str, dict[str, float]] = field(default_factory=dict)
    items: dict[str, list[float]] = field(default_factory=dict)
    race: dict[str, Any] | None = None
    warm_start: bool = False

    @property
    def items_scored(self) -> int:
        """Items scored for this trial, all metrics together."""
        return int(sum(entry.get("items", 0) for entry in self.scored.values()))

    @property
    def tokens_scored(self) -> int:
        """Forward-pass tokens scored for this trial, all metrics together."""
        return int(sum(entry.get("tokens", 0) for entry in self.scored.values()))

    @property
    def raced_out(self) -> bool:
        """Racing stopped this trial before its full evaluation."""
        return bool(self.race and self.race.get("stopped"))


def trial_records(trial: FrozenTrial | Any) -> TrialRecords:
    """The records of ``trial`` (a ``FrozenTrial``, or anything with ``user_attrs``, such as a
    running ``optuna.Trial``): from its ``candidate``, ``plan`` and ``result`` attributes, or,
    for a trial of a study written before they were packed, from one attribute per record."""
    return records_from(trial.user_attrs)


def records_from(user_attrs: Mapping[str, Any]) -> TrialRecords:
    """:func:`trial_records` of a trial whose user attributes are ``user_attrs``."""
    packed = {**_object(user_attrs.get(CANDIDATE)), **_object(user_attrs.get(RESULT))}
    values = {key: packed.get(key, user_attrs.get(key)) for key in (*CANDIDATE_KEYS, PLAN, *RESULT_KEYS)}
    values["metrics"] = dict(values["metrics"] or {})
    values["scored"] = dict(values["scored"] or {})
    values["items"] = {name: decode_items(v) for name, v in (values["items"] or {}).items()}
    return TrialRecords(**values, warm_start=bool(user_attrs.get("warm_start", False)))


def encode_items(values: Sequence[float]) -> str | list[float]:
    """Per-item values as the ``items`` record stores them: ``"0110..."`` when all are 0 or 1."""
    if all(v in (0.0, 1.0) for v in values):
        return "".join("1" if v else "0" for v in values)
    return [float(v) for v in values]


def decode_items(stored: str | Sequence[float]) -> list[float]:
    """The inverse of :func:`encode_items`."""
    if isinstance(stored, str):
        return [1.0 if c == "1" else 0.0 for c in stored]
    return [float(v) for v in stored]


def with_failure(trial: FrozenTrial, reason: str) -> dict[str, Any]:
    """The ``result`` attribute of ``trial`` that records its failure for ``reason`` (what it
    recorded there already kept)."""
    return {**_object(trial.user_attrs.get(RESULT)), "failure": reason}


def _object(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
