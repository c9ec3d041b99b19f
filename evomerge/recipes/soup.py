"""Model soups (Wortsman et al., 2022, https://arxiv.org/abs/2203.05482): weight averages of fine-tunes.

A soup is a mergekit ``linear`` config with weight 1.0 per ingredient and ``normalize: true``,
i.e. the uniform average of the ingredients' weights (a soup of one ingredient is that model,
bit for bit). Every candidate is written into one live model by the in-memory
:class:`~evomerge.live.materializer.Materializer` and scored by a :class:`~evomerge.fitness.Fitness`
on its ``search`` split, the validation split (the ``test`` split stays held out).

* uniform soup: every ingredient;
* greedy soup (the paper's Recipe 1): score each ingredient alone, sort them by that score
  (best first), start the soup with the best one, and add each next ingredient only when
  the soup with it scores at least as well as the soup without it (the paper's ``>=``). The
  soup's score never goes down, so the greedy soup is never worse on the validation split
  than the best single ingredient.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from evomerge.engine.config import MergeConfig
from evomerge.errors import ConfigError
from evomerge.fitness import Fitness
from evomerge.live.materializer import Materializer

log = logging.getLogger(__name__)


def soup_config(models: Sequence[str], dtype: str | None = None) -> MergeConfig:
    """The uniform soup of ``models``: a mergekit ``linear`` config, weight 1.0 each, normalized."""
    data: dict[str, Any] = {"merge_method": "linear",
                            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
                            "parameters": {"normalize": True}}
    if dtype is not None:
        data["dtype"] = dtype
    return MergeConfig.model_validate(data)


@dataclass(frozen=True)
class SoupStep:
    """One ingredient tried: its score alone, the score of the soup with it, whether it was kept."""

    model: str
    alone: float
    soup: float
    added: bool


@dataclass(frozen=True)
class SoupResult:
    """A soup: its ingredients and config, its objective and metrics on ``split``, and the steps."""

    ingredients: list[str]
    config: MergeConfig
    objective: float
    scores: dict[str, float]
    split: str
    steps: list[SoupStep]


class SoupScorer:
    """Scores soups of models resident in a materializer with a single-objective fitness."""

    def __init__(self, materializer: Materializer, fitness: Fitness, *, split: str = "search",
                 dtype: str | None = None):
        if len(fitness.metric_names) != 1:
            raise ConfigError(f"a soup needs one objective; the fitness has {len(fitness.metric_names)} "
                              f"({', '.join(fitness.metric_names)}); use objective: weighted_sum",
                              field="objective")
        self.materializer, self.fitness, self.split, self.dtype = materializer, fitness, split, dtype

    def score(self, models: Sequence[str]) -> tuple[float, dict[str, float]]:
        """(objective, metrics) of the uniform soup of ``models`` on the scorer's split."""
        model = self.materializer.apply(soup_config(models, self.dtype))
        scores = self.fitness.evaluate(model, self.materializer.tokenizer, self.split)
        objective = self.fitness.objectives(scores)[0]
        log.info("soup of %d (%s): %.6g", len(models), ", ".join(models), objective)
        return objective, scores


def uniform_soup(scorer: SoupScorer, models: Sequence[str]) -> SoupResult:
    """The average of every model in ``models``."""
    objective, scores = scorer.score(models)
    return SoupResult(list(models), soup_config(models, scorer.dtype), objective, scores, scorer.split, [])


def greedy_soup(scorer: SoupScorer, models: Sequence[str]) -> SoupResult:
    """Wortsman et al.'s greedy soup of ``models`` (see the module docstring)."""
    if not models:
        raise ConfigError("a soup needs at least one model", field="models")
    alone = {model: scorer.score([model]) for model in models}
    ranked = sorted(models, key=lambda m: alone[m][0], reverse=True)
    ingredients = [ranked[0]]
    objective, scores = alone[ranked[0]]
    steps = [SoupStep(ranked[0], objective, objective, True)]
    for model in ranked[1:]:
        candidate, candidate_scores = scorer.score([*ingredients, model])
        added = candidate >= objective
        steps.append(SoupStep(model, alone[model][0], candidate, added))
        if added:
            ingredients.append(model)
            objective, scores = candidate, candidate_scores
    return SoupResult(ingredients, soup_config(ingredients, scorer.dtype), objective, scores, scorer.split, steps)


def soup_yaml(result: SoupResult, kind: str) -> str:
    """The soup's config as YAML for ``evomerge merge`` / ``mergekit-yaml``, with a header."""
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in result.scores.items())
    return (f"# evomerge soup ({kind}): {len(result.ingredients)} ingredient(s); {result.split} split: "
            f"objective {result.objective:.6g} ({metrics})\n" + result.config.to_yaml())


def format_steps(result: SoupResult) -> str:
    """The greedy soup's steps as a plain-text table."""
    width = max([len(s.model) for s in result.steps] + [10])
    lines = [f"{'ingredient':<{width}}  {'alone':>10}  {'soup with it':>12}  kept"]
    lines += [f"{s.model:<{width}}  {s.alone:>10.4g}  {s.soup:>12.4g}  {'yes' if s.added else 'no'}"
              for s in result.steps]
    return "\n".join(lines)
