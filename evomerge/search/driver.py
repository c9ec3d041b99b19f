"""The search loop: ask → decode → materialize → score → tell, over an Optuna study.

Everything a search knows lives in its Optuna storage (SQLite file by default), so a
search is resumed by running it again: completed trials are kept, the sampler continues
from them, and a candidate whose plan was already scored is not evaluated again. Each
trial records its decoded plan (YAML), every metric, the seed, the time spent in
materialize and fitness, the device and the worker, or why it failed. A candidate that
raises, runs out of memory or scores NaN fails its own trial only; ``max_failures_in_a_row``
failures stop the search. Ctrl-C stops after the current trial.

Many workers (processes, hosts) may run the same study at once: they coordinate through
the storage only (``coordination.py``): the budget is shared, and a dead worker's trial is
failed and retried by another. ``workers.py`` starts N local workers.
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
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from evomerge import __version__
from evomerge.engine.config import MergeConfig, torch_dtype
from evomerge.engine.architecture import num_layers
from evomerge.engine.plan import check_compatible
from evomerge.errors import ConfigError, EvomergeError
from evomerge.fitness import Fitness, load_fitness
from evomerge.io.source import open_model, source_key, split_reference
from evomerge.live.materializer import Materializer
from evomerge.search.distributed.coordination import claim, finished, worker_id
from evomerge.search.distributed.storage import GRACE, STORAGE_ERRORS, heartbeat_thread, lost, open_storage
from evomerge.search.experiment import Experiment
from evomerge.search.samplers import CmaPackageProposer, make_sampler
from evomerge.search.spaces.loader import load_search_space
from evomerge.search.spaces.space import SearchSpace
from evomerge.search.writes import DeferredWrites, deferring

log = logging.getLogger(__name__)
HEARTBEAT = 30  # seconds between heartbeats of a running trial (default of `evomerge search`)


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
    """Load the fitness and search space and create (or reopen) the experiment's study.
    Every input is checked before the storage is opened, so bad input writes nothing."""
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
    sampler = make_sampler(experiment.optimizer, space, fitness.directions)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5) if len(fitness.stages) > 1 else None
    url = storage or experiment.storage or experiment.default_storage
    backend = open_storage(url, heartbeat=heartbeat)
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
    return Search(experiment, study, space, fitness, device or experiment.device, base, sources, url, created)


def _signature(experiment: Experiment, space: SearchSpace, fitness: Fitness) -> dict[str, Any]:
    """What a study's trials depend on: resuming with another value would mix incomparable trials."""
    return {"space": sorted(space.distributions()), "objectives": fitness.metric_names,
            "directions": fitness.directions,
            "models": [Path(p).name for p in (experiment.models.base, *experiment.models.sources)],
            "seed": experiment.seed, "dtype": experiment.dtype}


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


@contextmanager
def _stop_on_interrupt(flag: dict[str, bool]):
    """First Ctrl-C: finish the current trial, then stop. Second: abort now."""
    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
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


class _Failed(Exception):
    pass


class Runner:
    """Runs trials of one :class:`Search` with one materializer."""

    def __init__(self, search: Search, *, progress: bool = True):
        self.search = search
        experiment = search.experiment
        self.materializer = Materializer(search.base, search.sources, device=search.device,
                                         dtype=torch_dtype(experiment.dtype), progress=progress)
        self.device_name = str(self.materializer.device)
        if self.materializer.device.type == "cuda":
            self.device_name += f" ({torch.cuda.get_device_name(self.materializer.device)})"
        self.proposer = (CmaPackageProposer(search.space, experiment.optimizer, search.study)
                         if experiment.optimizer.sampler == "cma" else None)
        self.progress = progress
        self.writes = DeferredWrites(search.study._storage)  # the current trial's (set by _ask)

    def run(self, n_trials: int | None, timeout: float | None) -> int:
        """Run until ``n_trials`` trials of the study have finished (counting earlier runs and
        other workers' trials), ``timeout`` seconds pass or Ctrl-C; return the number of
        trials run by this worker. A lost storage raises :class:`StorageError`."""
        try:
            return self._run(n_trials, timeout)
        except STORAGE_ERRORS as error:
            raise lost(self.search.storage_url, error) from None

    def _run(self, n_trials: int | None, timeout: float | None) -> int:
        study, experiment = self.search.study, self.search.experiment
        self.search.enqueue_warm_start()
        done = finished(study)
        remaining = None if n_trials is None else max(0, n_trials - done)
        if remaining == 0:
            log.info("study %s already has %d finished trials", study.study_name, done)
            return 0
        start, ran, failures, flag = time.monotonic(), 0, 0, {"stop": False}

        def stop() -> bool:
            return flag["stop"] or (timeout is not None and time.monotonic() - start >= timeout)

        bar = tqdm(total=remaining, desc=f"search {study.study_name}", unit="trial", disable=not self.progress)
        with _stop_on_interrupt(flag), bar:
            while not stop():
                claimed = claim(study, self._ask, n_trials, stop)
                if claimed is None:
                    break
                trial = claimed.trial
                try:
                    state, reason = self._one_trial(trial, claimed.trials)
                except UpdateFinishedTrialError:  # failed as stale while it ran (heartbeats starved)
                    log.warning("trial %d was failed by another worker (no heartbeat for %d heartbeat "
                                "intervals); its retry runs instead", trial.number, GRACE)
                    state, reason = TrialState.FAIL, "missed heartbeats"
                ran += 1
                bar.update()
                failures = failures + 1 if state == TrialState.FAIL else 0
                if failures >= experiment.budget.max_failures_in_a_row:
                    raise EvomergeError(f"{failures} candidates failed in a row (last: {reason}); "
                                        "stopping the search")
                self._show_best(bar)
        return ran

    def _show_best(self, bar) -> None:
        study = self.search.study
        if not bar.disable and len(study.directions) == 1:  # two storage queries: only when shown
            try:
                bar.set_postfix(best=f"{study.best_value:.4g}", trial=study.best_trial.number)
            except ValueError:
                pass

    def _ask(self) -> optuna.Trial:
        study = self.search.study
        if self.proposer is not None and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            study.enqueue_trial(self.proposer.propose())
        self.writes = DeferredWrites(study._storage)  # the trial's params and records: see writes.py
        with deferring(study, self.writes):
            return study.ask(self.search.space.distributions())

    def _one_trial(self, trial: optuna.Trial, trials: list[FrozenTrial]) -> tuple[TrialState, str | None]:
        """Run ``trial``; ``trials``: the study's, read just before it was asked."""
        try:
            with heartbeat_thread(self.search.study._storage, trial._trial_id):
                trial.set_user_attr("worker", worker_id())  # after the first heartbeat: see coordination.py
                values = self._evaluate(trial, trials)
        except (*STORAGE_ERRORS, UpdateFinishedTrialError):
            raise
        except optuna.TrialPruned:
            self._tell(trial, state=TrialState.PRUNED)
            return TrialState.PRUNED, None
        except KeyboardInterrupt:
            trial.set_user_attr("failure", "interrupted")
            self._tell(trial, state=TrialState.FAIL)
            raise
        except _Failed as failure:
            return self._fail(trial, str(failure))
        except Exception as error:  # a failed candidate fails its trial, never the study
            return self._fail(trial, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        self._tell(trial, values)
        if self.proposer is not None:
            self.proposer.tell(trial.params, values[0])
        return TrialState.COMPLETE, None

    def _tell(self, trial: optuna.Trial, values: list[float] | None = None, *,
              state: TrialState | None = None) -> None:
        """Write the trial's queued records, then finish it (Optuna's ``tell``)."""
        self.writes.flush()
        self.search.study.tell(trial, values, state=state)

    def _fail(self, trial: optuna.Trial, reason: str) -> tuple[TrialState, str]:
        log.warning("trial %d failed: %s", trial.number, reason)
        if self.materializer.device.type == "cuda":
            torch.cuda.empty_cache()
        trial.set_user_attr("failure", reason)
        self._tell(trial, state=TrialState.FAIL)
        if self.proposer is not None:
            self.proposer.tell(trial.params, None)
        return TrialState.FAIL, reason

    def _evaluate(self, trial: optuna.Trial, trials: list[FrozenTrial]) -> list[float]:
        search, experiment = self.search, self.search.experiment
        config = search.decode(trial.params)
        plan = config.to_yaml()
        key = plan_hash(plan, experiment.seed)
        for name, value in (("plan", plan), ("plan_hash", key), ("seed", experiment.seed),
                            ("device", self.device_name)):
            trial.set_user_attr(name, value)
        previous = _completed_with(trials, key)
        if previous is not None:
            trial.set_user_attr("metrics", previous.user_attrs.get("metrics"))
            trial.set_user_attr("same_plan_as", previous.number)
            return list(previous.values)
        self.writes.flush()  # the plan is visible while it is merged and scored
        started = time.perf_counter()
        model = self.materializer.apply(config, seed=experiment.seed)
        if self.materializer.device.type == "cuda":
            torch.cuda.synchronize(self.materializer.device)
        materialized = time.perf_counter()
        trial.set_user_attr("time_materialize_s", round(materialized - started, 4))
        scores: dict[str, float] = {}
        for fraction, scores in search.fitness.iter_stages(model, self.materializer.tokenizer, cache_key=key):
            values = search.fitness.objectives(scores)
            if fraction < 1 and len(values) == 1:
                trial.report(values[0], step=round(fraction * 1000))
                if trial.should_prune():
                    trial.set_user_attr("metrics", scores)
                    raise optuna.TrialPruned()
        trial.set_user_attr("time_fitness_s", round(time.perf_counter() - materialized, 4))
        trial.set_user_attr("metrics", scores)
        if not all(math.isfinite(v) for v in values):
            raise _Failed(f"non-finite fitness {scores}")
        return values


def _completed_with(trials: list[FrozenTrial], key: str) -> FrozenTrial | None:
    """A completed trial among ``trials`` that scored the same candidate (plan hash ``key``)."""
    return next((t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("plan_hash") == key),
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
