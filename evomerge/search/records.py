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
  applies.

``warm_start`` (True on the space's known recipes) is an attribute of its own too: it is written
with the enqueued trial, not by the loop. Studies written before the records were packed (one
user attribute per record, same names) read the same through :func:`trial_records`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial

CANDIDATE = "candidate"  # user attribute: the records written before the merge, but the plan
PLAN = "plan"  # user attribute: the plan (YAML)
RESULT = "result"  # user attribute: the records written when the trial ends
CANDIDATE_KEYS = ("worker", "device", "seed", "plan_hash")
RESULT_KEYS = ("metrics", "time_materialize_s", "time_fitness_s", "same_plan_as", "failure")


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
    warm_start: bool = False


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
    return TrialRecords(**values, warm_start=bool(user_attrs.get("warm_start", False)))


def with_failure(trial: FrozenTrial, reason: str) -> dict[str, Any]:
    """The ``result`` attribute of ``trial`` that records its failure for ``reason`` (what it
    recorded there already kept)."""
    return {**_object(trial.user_attrs.get(RESULT)), "failure": reason}


def _object(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
