"""Fast, deterministic fitness functions of a model's weights, for the search tests.

Environment knobs (read at each call): ``EVOMERGE_TEST_LOG`` appends one JSON line per
call (a fingerprint of the weights); ``EVOMERGE_TEST_SLEEP`` sleeps before scoring;
``EVOMERGE_TEST_FAIL`` is a comma list of call numbers (1-based, counted in the log) that
raise, ``EVOMERGE_TEST_NAN`` the same for calls that return NaN.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def _calls(log: Path | None) -> int:
    return 1 + (len(log.read_text().splitlines()) if log and log.exists() else 0)


def fingerprint(model) -> float:
    return float(sum(p.double().sum() for p in model.parameters()))


def closeness(model, tokenizer, split="search"):
    """Higher when the merged final norm is close to 1.05 (a smooth function of the merge)."""
    log = Path(os.environ["EVOMERGE_TEST_LOG"]) if os.environ.get("EVOMERGE_TEST_LOG") else None
    call = _calls(log)
    if log:
        with log.open("a") as handle:
            handle.write(json.dumps({"call": call, "split": split, "fingerprint": fingerprint(model)}) + "\n")
    time.sleep(float(os.environ.get("EVOMERGE_TEST_SLEEP", "0")))
    if str(call) in os.environ.get("EVOMERGE_TEST_FAIL", "").split(","):
        raise RuntimeError(f"planned failure at call {call}")
    if str(call) in os.environ.get("EVOMERGE_TEST_NAN", "").split(","):
        return float("nan")
    weights = [p for n, p in model.named_parameters() if "mlp.down_proj" in n]
    return -float(sum((w.mean() * 100 - 0.05) ** 2 for w in weights)) - float(
        (torch.stack([w.std() for w in weights]).mean() - 0.02) ** 2)


def two_objectives(model, tokenizer, split="search"):
    """Two conflicting scores for multi-objective tests."""
    first = model.model.layers[0].mlp.down_proj.weight.mean().item()
    last = model.model.layers[-1].mlp.down_proj.weight.mean().item()
    return {"first": first, "last": -last}
