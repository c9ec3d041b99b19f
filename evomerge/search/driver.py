"""The search loop: Optuna's ``study.optimize`` over an objective that decodes, materializes and scores.

Everything a search knows lives in its Optuna storage (SQLite file by default), so a
search is resumed by running it again: completed trials are kept, the sampler continues
from them, and a candidate whose plan was already scored is not evaluated again. Each
trial records its decoded plan (YAML), every metric, the seed, the time spent in
materialize and fitness, the device and the worker, or why it failed, in three user
attributes (``records.py``): ``candidate`` and ``plan`` before the candidate is merged,
``result`` when its trial ends. A candidate that
raises, runs out of memory or scores NaN fails its own trial only; ``max_failures_in_a_row``
failures stop the search. Ctrl-C stops after the current trial (``study.stop``). With a fitness
that races (``racing:``), a candidate is scored in growing chunks against the study's incumbent
and a hopeless one ends as a pruned trial carrying its estimate (:meth:`Runner._race`).

Many workers (processes, hosts) may run the same study at once: they coordinate through
the storage only (``coordination.py``): the budget is shared, and a dead worker's trial is
failed and retried by another (Optuna's heartbeat). ``workers.py`` starts N local workers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from evomerge import __version__
from evomerge.engine.config import MergeConfig
from evomerge.engine.architecture import num_layers
from evomerge.engine.plan import check_compatible
from evomerge.errors import ConfigError, EvomergeError
from evomerge.fitness import Fitness, load_fitness
from evomerge.fitness.fitness import Usage
from evomerge.fitness.racing import Reference, in_item_order
from evomerge.io.source import open_model, source_key, split_reference
from evomerge.live.materializer import Materializer
from evomerge.search.distributed.coordination import Budget, OverBudget, fail_dead_trials, worker_id
from evomerge.search.distributed.storage import GRACE, STORAGE_ERRORS, lost, open_storage, storage_error
from evomerge.search.experiment import Experiment
from evomerge.search.records import CANDIDATE, PLAN, RESULT, encode_items, trial_records
from evomerge.search.samplers import make_sampler
from evomerge.search.spaces.loader import load_search_space
from evomerge.search.spaces.space import SearchSpace

log = logging.getLogger(__name__)
HEARTBEAT = 30  # seconds between heartbeats of a running trial (default of `evomerge search`)
POLL = 1.0  # seconds between looks at the study while other workers run the last trials
# Optuna's loggers of each trial's end: "Trial N finished with value ..." (INFO) and "Trial N failed
# with parameters ... because of ..." (WARNING, with the traceback); the runner reports both itself
OPTUNA_TRIAL_LOGGERS = ("optuna.study.study", "optuna.study._optimize")


def _not_a_trial_record(record: logging.LogRecord) -> bool:
    """False for Optuna's records of a trial's end, which the progress bar and the runner's
    one-line failure warning replace (kept when evomerge logs at DEBUG)."""
    return log.isEnabledFor(logging.DEBUG) or not str(record.msg).startswith("Trial ")


@contextmanager
def _runner_reports_trials():
    """Within the block, Optuna does not log each trial's end (``_not_a_trial_record``)."""
    loggers = [logging.getLogger(name) for name in OPTUNA_TRIAL_LOGGERS]
    for logger in loggers:
        logger.addFilter(_not_a_trial_record)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_not_a_trial_record)


@dataclass
class Search:
    """An experiment bound to its study, search space and fitness."""

    experiment: Experiment
    study: optuna.Study
    space: SearchSpace
    fitness: Fitness
    device: str
    base: str  # absolute model paths
    sources: list[str]
    storage_url: str
    heartbeat: int | None = None  # seconds between heartbeats of a running trial; None: no heartbeats
    created: bool = False  # this process created the study

    def enqueue_warm_start(self) -> None:
        """Queue the space's known recipes as the first trials of a study this process created
        (so that workers started together enqueue them once)."""
        if self.created and self.experiment.optimizer.warm_start and not self.study.trials:
            for recipe in self.space.known_recipes():
                self.study.enqueue_trial(recipe, user_attrs={"warm_start": True})
        self.created = False

    def decode(self, params: dict[str, Any]) -> MergeConfig:
        """The trial's merge config, in the dtype candidates are merged in."""
        config = self.space.decode(params)
        return config.model_copy(update={"dtype": self.experiment.dtype})


def open_search(experiment: Experiment, *, study_name: str | None = None, storage: str | None = None,
                device: str | None = None, create: bool = True, heartbeat: int | None = None) -> Search:
    """Load the fitness and search space and create (or reopen) the experiment's study, with
    heartbeats every ``heartbeat`` seconds on an RDB storage (``storage.py``). Every input is
    checked before the storage is opened, so bad input writes nothing (ConfigError)."""
    paths = [experiment.models.base, *experiment.models.sources]
    for path in paths:  # a source may be an adapter folder or BASE+ADAPTER (evomerge.io.source)
        if not all(Path(part).is_dir() for part in split_reference(path) if part):
            raise ConfigError(f"model folder not found: {path}", field="models")
    folders = {path: open_model(path, experiment.models.base) for path in paths}
    check_compatible(folders)
    base = str(source_key(experiment.models.base))
    sources = [str(source_key(s)) for s in experiment.models.sources]
    spec = experiment.fitness
    fitness = load_fitness(spec if isinstance(spec, dict) else Path(spec))
    space = load_search_space(experiment.search_space, models=sources, base_model=base,
                              num_layers=num_layers(folders[experiment.models.base].config),
                              base_dir=Path.cwd(), source="search_space")
    sampler = make_sampler(experiment.optimizer, space, fitness.directions, consider_pruned=fitness.racing is not None)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5) if len(fitness.stages) > 1 else None
    url = storage or experiment.storage or experiment.default_storage
    backend = open_storage(url, heartbeat=heartbeat)
    heartbeat = heartbeat if isinstance(backend, optuna.storages.RDBStorage) else None
    name = study_name or experiment.name
    created = False
    try:
        if create:
            try:  # exactly one of the workers started together creates the study
                study = optuna.create_study(study_name=name, storage=backend, sampler=sampler, pruner=pruner,
                                            directions=fitness.directions)
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=name, storage=backend, sampler=sampler, pruner=pruner)
        else:
            study = optuna.load_study(study_name=name, storage=backend, sampler=sampler, pruner=pruner)
        _check_study(study, experiment, space, fitness)
    except STORAGE_ERRORS as error:
        raise lost(url, error) from None
    return Search(experiment, study, space, fitness, device or experiment.device, base, sources, url, heartbeat,
                  created)


def _signature(experiment: Experiment, space: SearchSpace, fitness: Fitness) -> dict[str, Any]:
    """What a study's trials depend on: resuming with another value would mix incomparable trials."""
    return {"space": sorted(space.distributions()), "objectives": fitness.metric_names,
            "directions": fitness.directions,
            "models": [Path(p).name for p in (experiment.models.base, *experiment.models.sources)],
            "seed": experiment.seed, "dtype": experiment.dtype, "resident_dtype": experiment.resident_dtype}


def _check_study(study: optuna.Study, experiment: Experiment, space: SearchSpace, fitness: Fitness) -> None:
    """Record the experiment in a new study; refuse to join one with a different setup."""
    signature = _signature(experiment, space, fitness)
    stored = study.user_attrs.get("signature")
    if stored is None:
        study.set_user_attr("signature", signature)
        study.set_user_attr("experiment", experiment.to_yaml())
        study.set_user_attr("mergekit_compatible", space.mergekit_compatible)
        study.set_user_attr("evomerge_version", __version__)
        return
    differ = [key for key in stored if stored[key] != signature.get(key)]
    if differ:  # keys of older studies only: a study records what its version checked
        raise ConfigError(f"study {study.study_name!r} belongs to another experiment (different "
                          f"{', '.join(differ)}); use a new --study name", field="study")


def plan_hash(config: MergeConfig | str, seed: int) -> str:
    """Identity of a candidate's weights: its config (or the config's YAML) and mask seed."""
    text = config if isinstance(config, str) else config.to_yaml()
    return hashlib.sha256(f"{seed}\n{text}".encode()).hexdigest()[:16]


class _Failed(Exception):
    pass


class Runner:
    """Runs trials of one :class:`Search` with one materializer, through ``study.optimize``."""

    def __init__(self, search: Search, *, progress: bool = True):
        self.search = search
        experiment = search.experiment
        self.materializer = Materializer(search.base, search.sources, device=search.device, progress=progress,
                                         tokenizer=search.space.spec.tokenizer_source,  # fixed per search
                                         methods=search.space.methods, **experiment.materializer_options())
        self.device_name = str(self.materializer.device)
        if self.materializer.device.type == "cuda":
            self.device_name += f" ({torch.cuda.get_device_name(self.materializer.device)})"
        self.progress = progress
        self._reference_cache: dict[int, Reference | None] = {}  # trial number -> its per-item values

    def run(self, n_trials: int | None, timeout: float | None) -> int:
        """Run until ``n_trials`` trials of the study have finished (counting earlier runs and
        other workers' trials; :class:`Budget`), ``timeout`` seconds pass, or Ctrl-C (the first
        stops after the current trial, the second fails it and raises KeyboardInterrupt); return
        the number of trials run by this worker. Raises EvomergeError when
        ``max_failures_in_a_row`` trials failed in a row, StorageError when the storage is lost."""
        try:
            return self._run(Budget(n_trials), timeout)
        except Exception as error:
            if (lost_error := storage_error(error)) is None:
                raise
            raise lost(self.search.storage_url, lost_error) from None

    def _run(self, budget: Budget, timeout: float | None) -> int:
        study, heartbeat = self.search.study, self.search.heartbeat
        self.search.enqueue_warm_start()
        self.budget = budget
        trials = budget.see(fail_dead_trials(study, heartbeat))
        if not budget.open(trials) and not budget.running(trials):
            log.info("study %s already has %d finished trials", study.study_name, budget.finished(trials))
            return 0
        deadline = None if timeout is None else time.monotonic() + timeout
        self.ran, self.failures, self.interrupted, self.current = 0, 0, False, None
        sampler = study.sampler
        bar = tqdm(total=None if budget.n_trials is None else budget.n_trials - budget.finished(trials),
                   desc=f"search {study.study_name}", unit="trial", disable=not self.progress)
        with self._stop_on_interrupt(), _runner_reports_trials(), bar:
            study.sampler = budget.gate(sampler)
            try:
                while not self.interrupted and (deadline is None or time.monotonic() < deadline):
                    if budget.open(trials):
                        self._optimize(budget, bar, None if deadline is None else deadline - time.monotonic())
                    elif heartbeat and budget.running(trials):  # may come back as a retry
                        time.sleep(POLL)
                    else:
                        break
                    trials = budget.see(fail_dead_trials(study, heartbeat))
            finally:
                study.sampler = sampler
        return self.ran

    def _optimize(self, budget: Budget, bar, timeout: float | None) -> None:
        """``study.optimize`` until the budget has no room (or Ctrl-C, or ``timeout``)."""
        study = self.search.study

        def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            self.ran, self.current = self.ran + 1, None
            bar.update()
            self._count_failure(trial.state, trial_records(trial).failure)
            self._show_best(bar)
            trials = budget.see(fail_dead_trials(study, self.search.heartbeat, stale=False))
            if self.interrupted or not budget.open(trials):
                study.stop()

        try:
            study.optimize(self._objective, timeout=timeout, catch=(Exception,), callbacks=[after_trial])
        except OverBudget as error:  # another worker took the last place first
            log.debug("%s", error)
        except ValueError:  # optimize's tell of a trial that another worker failed meanwhile
            lost_trial, self.current = self.current, None
            if lost_trial is None or not study.get_trials(deepcopy=False)[lost_trial].state.is_finished():
                raise
            log.warning("trial %d was failed by another worker (no heartbeat for %d heartbeat intervals); "
                        "its retry runs instead", lost_trial, GRACE)
            self._count_failure(TrialState.FAIL, "missed heartbeats")

    def _count_failure(self, state: TrialState, reason: str | None) -> None:
        self.failures = self.failures + 1 if state == TrialState.FAIL else 0
        if self.failures >= self.search.experiment.budget.max_failures_in_a_row:
            raise EvomergeError(f"{self.failures} candidates failed in a row (last: {reason}); stopping the search")

    @contextmanager
    def _stop_on_interrupt(self):
        """First Ctrl-C: stop after the current trial. Second: abort it (KeyboardInterrupt)."""
        def handler(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            log.warning("stopping after the current trial (Ctrl-C again to abort it)")

        try:
            previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _show_best(self, bar) -> None:
        study = self.search.study
        if not bar.disable and len(study.directions) == 1:  # two storage queries: only when shown
            try:
                bar.set_postfix(best=f"{study.best_value:.4g}", trial=study.best_trial.number)
            except ValueError:
                pass

    def _objective(self, trial: optuna.Trial) -> list[float]:
        """One candidate: its parameters, then its records on ``trial`` (``records.py``), then
        its objective values. The records take three writes of ``trial.set_user_attr``: the
        ``candidate`` (worker, device, seed, plan hash) and ``plan`` attributes once the
        parameters are decoded, before the candidate is merged, and the ``result`` attribute
        (metrics, timings, or why it failed: ``failure``) when the trial ends, also when it fails,
        is pruned or interrupted. A failed candidate raises after recording why; a lost storage,
        or a trial finished meanwhile by another worker, raises without writing."""
        self.current = trial.number
        result: dict[str, Any] = {}
        try:
            return self._evaluate(trial, result)
        except (*STORAGE_ERRORS, UpdateFinishedTrialError):
            result.clear()  # nothing more can be written
            raise
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            result["failure"] = "interrupted"
            raise
        except Exception as error:
            reason = str(error) if isinstance(error, _Failed) else \
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if self.materializer.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("trial %d failed: %s", trial.number, reason)
            result["failure"] = reason
            raise
        finally:
            if result:
                trial.set_user_attr(RESULT, result)

    def _evaluate(self, trial: optuna.Trial, result: dict[str, Any]) -> list[float]:
        """``trial``'s objective values, after writing its ``candidate`` and ``plan``; its ``result``
        records go into ``result`` (written by the caller)."""
        search, experiment = self.search, self.search.experiment
        config = search.decode({name: _suggest(trial, name, distribution)
                                for name, distribution in search.space.distributions().items()})
        plan = config.to_yaml()
        key = plan_hash(plan, experiment.seed)
        # with the worker, by which a dead worker's trial is found (coordination.fail_dead_trials)
        trial.set_user_attr(CANDIDATE, {"worker": worker_id(), "device": self.device_name, "seed": experiment.seed,
                                        "plan_hash": key})
        trial.set_user_attr(PLAN, plan)
        previous = _completed_with(self.budget.trials, key)  # the study as read before this trial was asked
        if previous is not None:
            result.update(metrics=trial_records(previous).metrics, same_plan_as=previous.number)
            return list(previous.values)
        started = time.perf_counter()
        model = self.materializer.apply(config, seed=experiment.seed)
        if self.materializer.device.type == "cuda":
            torch.cuda.synchronize(self.materializer.device)
        materialized = time.perf_counter()
        result["time_materialize_s"] = round(materialized - started, 4)
        fitness = search.fitness
        with fitness.metered() as usage:
            try:
                scores = (self._race(trial, model, key, result) if fitness.racing is not None
                          else self._stages(trial, model, key, result))
            finally:
                result["time_fitness_s"] = round(time.perf_counter() - materialized, 4)
                result["scored"] = _scored_record(fitness, usage)
        values = fitness.objectives(scores)
        result.update(metrics=scores, items={name: encode_items(v) for name, v in fitness.item_values(key).items()})
        if not all(math.isfinite(v) for v in values):
            raise _Failed(f"non-finite fitness {scores}")
        return values

    def _stages(self, trial: optuna.Trial, model: Any, key: str, result: dict[str, Any]) -> dict[str, float]:
        """The scores of the fitness's stages; a trial the median pruner stops raises TrialPruned."""
        fitness = self.search.fitness
        scores: dict[str, float] = {}
        for fraction, scores in fitness.iter_stages(model, self.materializer.tokenizer, cache_key=key):
            values = fitness.objectives(scores)
            if fraction < 1 and len(values) == 1:
                trial.report(values[0], step=round(fraction * 1000))
                if trial.should_prune():
                    result["metrics"] = scores
                    raise optuna.TrialPruned()
        return scores

    def _race(self, trial: optuna.Trial, model: Any, key: str, result: dict[str, Any]) -> dict[str, float]:
        """The scores of a candidate raced against the references (the incumbent, or the Pareto
        front) of the study as read before this trial was asked. A candidate racing stops
        records its estimate and raises TrialPruned: a pruned trial is never the best trial, and
        the samplers learn from its estimate (``samplers.py``). In a single-objective study the
        estimate is the trial's intermediate value at step = items scored (Optuna's API for a
        pruned trial's value: ``CmaEsSampler(consider_pruned_trials=True)`` and TPE read it);
        Optuna keeps no intermediate values in a multi-objective study, whose samplers leave
        pruned trials out."""
        fitness = self.search.fitness
        references, pool = self._references()
        race = fitness.race(model, self.materializer.tokenizer, references, pool=pool, cache_key=key)
        if race.decision is not None:
            reference = race.decision.beaten_by if race.stopped else next(iter(race.decision.upper))
            result["race"] = {"stopped": race.stopped, "estimate": race.estimate, "reference": reference,
                              "upper": race.decision.upper[reference],
                              "items": sum(race.items.values())}
            if race.informative is not None:
                result["race"]["informative"] = race.informative
                result["race"]["probe"] = race.probe
            if race.decision.estimated:
                result["race"]["estimated"] = True
        if not race.stopped:
            return race.scores
        result["metrics"] = race.scores
        if len(race.estimate) == 1:
            trial.report(race.estimate[0], step=result["race"]["items"])
        raise optuna.TrialPruned()

    def _references(self) -> tuple[list[Reference], list[Reference]]:
        """What a candidate races against: the best completed trial of the study (as read before
        this trial was asked) among those that recorded per-item values of every raced metric,
        or, with several objectives, the Pareto front of those; and the screening pool, the last
        ``racing.screen`` of those trials by number (none without screening)."""
        fitness = self.search.fitness
        raced, seed = fitness.gains.raced, fitness.racing.seed
        usable = []
        for trial in self.budget.trials:
            if trial.state != TrialState.COMPLETE:
                continue
            if trial.number not in self._reference_cache:
                records = trial_records(trial)
                self._reference_cache[trial.number] = None if not raced <= set(records.items) else Reference(
                    trial.number, {name: in_item_order(records.items[name], seed) for name in raced},
                    records.metrics)
            if self._reference_cache[trial.number] is not None:
                usable.append(trial)
        screen = fitness.racing.screen
        pool = sorted(usable, key=lambda t: t.number)[-screen:] if screen else []
        pool = pool if len(pool) == screen else []  # screening starts with a full pool
        return ([self._reference_cache[t.number] for t in best_of(usable, self.search.study.directions)],
                [self._reference_cache[t.number] for t in pool])


def _suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """``trial``'s value of parameter ``name`` (sampled, or fixed by an enqueued trial)."""
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step,
                                   log=distribution.log)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step,
                                 log=distribution.log)
    return trial.suggest_categorical(name, distribution.choices)


def _scored_record(fitness: Fitness, usage: dict[str, Usage]) -> dict[str, dict[str, float]]:
    """The ``scored`` record of a trial from what its fitness scored (``records.py``)."""
    return {name: {"items": usage.get(name, Usage()).items, "of": metric.num_items("search"),
                   "tokens": usage.get(name, Usage()).tokens, "seconds": round(usage.get(name, Usage()).seconds, 4)}
            for name, metric in fitness.metrics.items()}


def best_of(trials: list[FrozenTrial], directions: list[StudyDirection]) -> list[FrozenTrial]:
    """The best of completed ``trials`` (the first of equals), or with several objectives those no
    other one dominates (better or equal in every objective, better in one), in trial order."""
    signs = [1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in directions]
    keyed = [(t, [s * v for s, v in zip(signs, t.values)]) for t in trials]
    if len(directions) == 1:
        return [max(keyed, key=lambda pair: pair[1][0])[0]] if keyed else []
    return [t for t, mine in keyed
            if not any(all(o >= m for o, m in zip(other, mine)) and other != mine for _, other in keyed)]


def _completed_with(trials: list[FrozenTrial], key: str) -> FrozenTrial | None:
    """A completed trial among ``trials`` that scored the same candidate (plan hash ``key``)."""
    return next((t for t in trials if t.state == TrialState.COMPLETE and trial_records(t).plan_hash == key),
                None)


def run_search(experiment: Experiment, *, study_name: str | None = None, storage: str | None = None,
               n_trials: int | None = None, timeout: float | None = None, device: str | None = None,
               progress: bool = True, heartbeat: int | None = HEARTBEAT) -> Search:
    """Create or resume (or join) the experiment's study and run trials until the budget is spent."""
    search = open_search(experiment, study_name=study_name, storage=storage, device=device, heartbeat=heartbeat)
    budget = experiment.budget
    Runner(search, progress=progress).run(n_trials if n_trials is not None else budget.n_trials,
                                          timeout if timeout is not None else budget.timeout)
    return search
