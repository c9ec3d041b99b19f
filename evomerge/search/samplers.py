"""Samplers: Optuna's CMA-ES / TPE / NSGA-II / random, and the ``cma`` package via ask/tell.

``cmaes`` (the default for a single objective) is Optuna's ``CmaEsSampler``: its state
lives in the study, so a resumed search continues the same evolution. Optuna normalizes
every parameter to [0, 1] for CMA-ES, so ``sigma0`` is in units of each parameter's range.
``cma`` runs Nikolaus Hansen's ``cma`` package on the space's ``[0, 1]^d`` code
(``SearchSpace.to_unit``/``from_unit``); on resume its state is rebuilt by replaying the
study's finished trials, generation by generation.

Restarts (``restarts: ipop``, Auger & Hansen 2005) run with ``cma``: when an evolution meets
one of ``cma``'s stopping criteria (it has converged, or its fitness went flat), a new one
starts from a uniformly random point of ``[0, 1]^d`` (from the optimizer's seed) with twice
the population, and the study goes on. Optuna's ``CmaEsSampler`` ignores restart strategies
since Optuna 4.4, so ``cmaes`` refuses the option rather than silently running without them.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from evomerge.errors import ConfigError
from evomerge.search.experiment import Optimizer
from evomerge.search.spaces.space import SearchSpace

log = logging.getLogger(__name__)


def make_sampler(optimizer: Optimizer, space: SearchSpace, directions: list[str]) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for ``optimizer`` (``cma`` proposals are enqueued; random fills gaps)."""
    kind, seed = optimizer.sampler, optimizer.seed
    if len(directions) > 1 and kind in ("cmaes", "cma"):
        raise ConfigError(f"sampler {kind} optimizes one objective; the fitness has {len(directions)} "
                          "(use nsga2, tpe or random)", field="optimizer.sampler")
    if kind == "cmaes":
        if optimizer.restarts:
            raise ConfigError(f"restarts: {optimizer.restarts} needs sampler cma (Optuna's CmaEsSampler ignores "
                              "restart strategies since Optuna 4.4)", field="optimizer.restarts")
        options = {"sigma0": optimizer.sigma0, "popsize": optimizer.popsize}
        with warnings.catch_warnings():  # sigma0: deprecated in Optuna 4.9, kept until 6 (pyproject: optuna<6)
            warnings.filterwarnings("ignore", message=".*sigma0", category=FutureWarning)
            return optuna.samplers.CmaEsSampler(
                seed=seed, independent_sampler=optuna.samplers.RandomSampler(seed=seed),
                warn_independent_sampling=False, **{k: v for k, v in options.items() if v is not None})
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=optimizer.popsize or 16, seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


class CmaPackageProposer:
    """Parameters proposed by ``cma.CMAEvolutionStrategy`` (restarted as the module docstring
    says with ``restarts: ipop``); told the (minimized) results."""

    def __init__(self, space: SearchSpace, optimizer: Optimizer, study: optuna.Study):
        self.space, self.optimizer = space, optimizer
        self.sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        self.dimension = len(space.distributions())
        recipes = space.known_recipes()
        self.restarts = 0
        self._starts = np.random.default_rng(optimizer.seed)  # restart points
        self.es = self._evolution(space.to_unit(recipes[0]) if recipes else [0.5] * self.dimension,
                                  optimizer.popsize)
        self._pending: list = []
        self._proposed: dict[str, Any] = {}
        self._asked = False  # cma needs an ask() before each tell()
        self._told: list[tuple[Any, float | None]] = []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            if set(trial.params) == set(space.distributions()):
                self.tell(trial.params, trial.values[0] if trial.values else None)

    def propose(self) -> dict[str, Any]:
        if not self._pending:
            self._pending, self._asked = list(self.es.ask()), True
        x = self._pending.pop(0)
        params = self.space.from_unit(list(x))
        self._proposed[_key(params)] = x  # cma must be told its own arrays (bound repair)
        return params

    def tell(self, params: dict[str, Any], value: float | None) -> None:
        """Record a result (None: failed, scored as the worst so far); a full generation updates CMA."""
        x = self._proposed.pop(_key(params), None)
        x = self.space.to_unit(params) if x is None else x
        self._told.append((x, None if value is None else self.sign * value))
        if len(self._told) < self.es.popsize:
            return
        known = [v for _, v in self._told if v is not None]
        worst = max(known) + 1 if known else 0.0
        if not self._asked:
            self.es.ask()
        self.es.tell([x for x, _ in self._told], [worst if v is None else v for _, v in self._told])
        self._told, self._pending, self._asked = [], [], False
        stopped = self.optimizer.restarts and self.es.stop()
        if stopped:
            self.restarts += 1
            log.info("CMA-ES stopped (%s): restart %d with population %d", ", ".join(stopped),
                     self.restarts, 2 * self.es.popsize)
            self.es = self._evolution(list(self._starts.random(self.dimension)), 2 * self.es.popsize)

    def _evolution(self, x0: list[float], popsize: int | None):
        import cma

        options = {"seed": self.optimizer.seed + 1 + self.restarts, "bounds": [0, 1], "verbose": -9}
        if popsize:
            options["popsize"] = popsize
        return cma.CMAEvolutionStrategy(x0, self.optimizer.sigma0 or 0.25, options)


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)
