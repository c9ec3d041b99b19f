"""Samplers: Optuna's CMA-ES / TPE / NSGA-II / random, and the ``cma`` package as an Optuna sampler.

``cmaes`` (the default for a single objective) is Optuna's ``CmaEsSampler``: its state
lives in the study, so a resumed search continues the same evolution. Optuna normalizes
every parameter to [0, 1] for CMA-ES, so ``sigma0`` is in units of each parameter's range.
``cma`` runs Nikolaus Hansen's ``cma`` package on the space's ``[0, 1]^d`` code
(``SearchSpace.to_unit``/``from_unit``) through :class:`CmaPackageSampler`; on resume its
state is rebuilt from the study's finished trials, generation by generation.

Restarts (``restarts: ipop``, Auger & Hansen 2005) run with ``cma``: when an evolution meets
one of ``cma``'s stopping criteria (it has converged, or its fitness went flat), a new one
starts from a uniformly random point of ``[0, 1]^d`` (from the optimizer's seed) with twice
the population, and the study goes on. Optuna's ``CmaEsSampler`` ignores restart strategies
since Optuna 4.4, so ``cmaes`` refuses the option rather than silently running without them.

Pruned trials (``consider_pruned``, which a search turns on when its fitness races: a trial that
racing stopped is pruned, its estimate on the items it scored its last intermediate value, at
step = items scored; with screening, completed for the items it did not score: its own mean on
the informative ones, and on the left-out ones its mean on those it scored, the probe, or
without one the incumbent's (best) values: ``evomerge.fitness.racing``). ``cmaes`` passes
``consider_pruned_trials=True`` to a CmaEsSampler (Optuna's, which copies pruned trials
shallowly: :class:`evomerge.compat.optuna.CmaEsSampler`), which then takes such a trial, with
its last intermediate value as its value, as a member of
the generation it was sampled for: a generation completes with raced members and the evolution
moves on their estimates. ``cma`` does the same (:class:`CmaPackageSampler`). ``tpe`` always
uses pruned trials (ranked below every completed trial, by step reached, then value).
``nsga2`` and ``random`` leave them out: NSGA-II fills a generation with completed trials only
(a raced-out candidate was dominated for sure by a completed one, so it would not have been
selected), and Optuna keeps no intermediate values in a multi-objective study.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from evomerge.compat.optuna import CmaEsSampler
from evomerge.errors import ConfigError
from evomerge.search.experiment import Optimizer
from evomerge.search.spaces.space import SearchSpace

log = logging.getLogger(__name__)


def make_sampler(optimizer: Optimizer, space: SearchSpace, directions: list[str], *,
                 consider_pruned: bool = False) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for ``optimizer`` on ``space``, for a study in ``directions``; with
    ``consider_pruned`` CMA-ES learns from pruned trials too (module docstring).
    Raises ConfigError for a combination the samplers do not run (module docstring)."""
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
            # consider_pruned_trials: experimental since Optuna 2.0, unchanged since
            warnings.filterwarnings("ignore", message=".*consider_pruned_trials", category=ExperimentalWarning)
            return CmaEsSampler(
                seed=seed, independent_sampler=optuna.samplers.RandomSampler(seed=seed),
                warn_independent_sampling=False, consider_pruned_trials=consider_pruned,
                **{k: v for k, v in options.items() if v is not None})
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=optimizer.popsize or 16, seed=seed)
    if kind == "cma":
        return CmaPackageSampler(space, optimizer, directions[0], consider_pruned=consider_pruned)
    return optuna.samplers.RandomSampler(seed=seed)


class CmaPackageSampler(optuna.samplers.BaseSampler):
    """Nikolaus Hansen's ``cma.CMAEvolutionStrategy`` as an Optuna sampler, on ``space``'s
    ``[0, 1]^d`` code, for a study of one objective in ``direction``.

    Every trial of ``space`` gets its parameters from the current generation (``sample_relative``;
    parameters outside ``space`` come from a seeded random sampler). The evolution learns from every
    finished trial of the study that has all of ``space``'s parameters, in the order this sampler
    sees them: its own as they are told (``after_trial``), the others (earlier runs, other
    workers) before it next samples, in trial-number order, so a resumed study rebuilds its
    evolution. A completed trial is scored by its value, a failed one as worse than the worst so
    far; a pruned one, with ``consider_pruned``, by its last intermediate value (racing's
    estimate), else it is left out. ``popsize`` results make a generation. With ``restarts: ipop``
    a stopped evolution restarts as the module docstring says."""

    def __init__(self, space: SearchSpace, optimizer: Optimizer, direction: str, *, consider_pruned: bool = False):
        self.space, self.optimizer, self.consider_pruned = space, optimizer, consider_pruned
        self.sign = -1.0 if direction == "maximize" else 1.0
        self.dimension = len(space.distributions())
        self.restarts = 0
        self._starts = np.random.default_rng(optimizer.seed)  # restart points
        self._random = optuna.samplers.RandomSampler(seed=optimizer.seed)
        recipes = space.known_recipes()
        self.es = self._evolution(space.to_unit(recipes[0]) if recipes else [0.5] * self.dimension,
                                  optimizer.popsize)
        self._pending: list = []  # the generation's points not handed out yet
        self._asked = False  # cma needs an ask() before each tell()
        self._proposed: dict[int, Any] = {}  # trial number -> cma's own point (bound repair)
        self._seen: set[int] = set()  # numbers of the trials learnt from
        self._told: list[tuple[Any, float | None]] = []

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.space.distributions()

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        self.sync(study)
        if not self._pending:
            self._pending, self._asked = list(self.es.ask()), True
        x = self._pending.pop(0)
        self._proposed[trial.number] = x
        return self.space.from_unit(list(x))

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._learn(trial, state, values)

    def sync(self, study: optuna.Study) -> None:
        """Learn from the study's finished trials not seen yet, in trial-number order."""
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL,
                                                               TrialState.PRUNED)):
            self._learn(trial, trial.state, trial.values)

    def _learn(self, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        """Record a result (a failure scores as the worst so far); a full generation updates CMA."""
        if state == TrialState.PRUNED and self.consider_pruned and trial.intermediate_values:
            state, values = TrialState.COMPLETE, [trial.intermediate_values[max(trial.intermediate_values)]]
        number, params = trial.number, trial.params
        if number in self._seen or state not in (TrialState.COMPLETE, TrialState.FAIL) \
                or set(params) != set(self.space.distributions()):
            return
        self._seen.add(number)
        x = self._proposed.pop(number, None)
        x = self.space.to_unit(params) if x is None else x
        self._told.append((x, self.sign * values[0] if state == TrialState.COMPLETE and values else None))
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
