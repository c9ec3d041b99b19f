"""AdaMerging for an experiment: its models, unlabeled prompts, and the start (uniform or a study's trial).

Prompts come from a file (``.txt``: one prompt per line; ``.jsonl``: field ``prompt_field``)
or from the fitness: the inputs (``doc_to_text``, zero-shot) of the documents that each
``lm_eval`` metric with a positive weight scores on a split, the ``search`` split for
training (what a search optimizes, so the ``test`` split stays held out). The start is every
coefficient at ``init``, or the merge of a study's trial (its best by default), which must be
a ``task_arithmetic`` merge of the experiment's models.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from evomerge.engine.config import parse_config
from evomerge.errors import ConfigError
from evomerge.fitness import Fitness
from evomerge.recipes.adamerge import AdaMerger

log = logging.getLogger(__name__)


def fitness_prompts(fitness: Fitness, split: str) -> list[str]:
    """The inputs of the documents every positively weighted lm-eval metric scores on ``split``."""
    from evomerge.fitness.lmeval import LmEvalMetric

    prompts: list[str] = []
    for metric in fitness.metrics.values():
        if isinstance(metric, LmEvalMetric) and metric.weight > 0:
            task = metric.tasks[split]
            docs = list(task.eval_docs)[:metric.num_items(split)]
            prompts += [str(task.doc_to_text(doc)) for doc in docs]
    if not prompts:
        raise ConfigError("the fitness has no lm_eval metric with a positive weight to take prompts from; "
                          "give a prompts file", field="fitness")
    return prompts


def read_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts from a ``.txt`` file (one per non-empty line) or a ``.jsonl`` file (``field`` of each line)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"cannot read prompts: {error.strerror}", file=str(path)) from None
    if path.suffix == ".txt":
        prompts = [line for line in lines if line.strip()]
    elif path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"invalid JSON ({error.msg})", file=str(path), line=number) from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ConfigError(f"expected a string field {field!r}", file=str(path), line=number)
            prompts.append(record[field])
    else:
        raise ConfigError("expected a .txt or .jsonl prompts file", file=str(path))
    if not prompts:
        raise ConfigError("no prompts in the file", file=str(path))
    return prompts


def trial_start(merger: AdaMerger, study_name: str, storage: str, trial: int | None = None) -> torch.Tensor:
    """The coefficients of a study's trial (the best one by default)."""
    from evomerge.analysis.results import open_study, pick_trial

    study = open_study(study_name, storage)
    chosen = pick_trial(study, trial)
    log.info("AdaMerging starts from trial %d of study %s (value %s)", chosen.number, study_name, chosen.values)
    from evomerge.search.records import trial_records

    return merger.from_config(parse_config(trial_records(chosen).plan, f"<trial {chosen.number}>"))
