"""``evomerge search --workers N --devices cuda:0,cuda:1``: N local worker processes on one study.

The parent checks the experiment and creates the study (with its warm start) once, then
starts one process per worker (``spawn``), each with its own materializer on its device,
running the same loop as a single ``evomerge search``: they share the budget and recover
each other's trials through the storage (``coordination.py``), exactly as workers on other
hosts do. CPU workers split the cores between them (``torch.set_num_threads``). Ctrl-C
reaches every worker; each stops after its current trial.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

import torch

from evomerge.engine.execute import resolve_device
from evomerge.errors import EvomergeError
from evomerge.search.distributed.coordination import Budget
from evomerge.search.distributed.storage import STORAGE_ERRORS
from evomerge.search.driver import HEARTBEAT, Search, open_search, run_search
from evomerge.search.experiment import Experiment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    """What every worker process runs with (the options of ``evomerge search``)."""

    study_name: str | None = None
    storage: str | None = None
    n_trials: int | None = None
    timeout: float | None = None
    heartbeat: int = HEARTBEAT
    log_setup: Callable[[], None] | None = None  # configures logging in each worker (picklable)
    threads: int | None = None  # torch threads of a CPU worker (default: the cores split between them)


def worker_devices(workers: int | None, devices: str | None, device: str) -> list[str]:
    """The device of each worker: ``devices`` (comma list) cycled over ``workers`` (default:
    one worker per device), else ``device`` for every worker. Each device is checked."""
    names = [d.strip() for d in devices.split(",") if d.strip()] if devices else [device]
    count = workers or len(names)
    for name in set(names):
        resolved = resolve_device(name)
        if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
            raise EvomergeError(f"--devices: {name} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return [names[i % len(names)] for i in range(count)]


def run_workers(experiment: Experiment, devices: list[str], options: WorkerOptions) -> Search:
    """Create or join the study, run one worker process per entry of ``devices`` until the
    budget is spent, and return the search. Raises EvomergeError (the first worker's error)
    when a worker failed and the budget was not reached."""
    search = open_search(experiment, study_name=options.study_name, storage=options.storage,
                         device=devices[0], heartbeat=options.heartbeat)
    search.enqueue_warm_start()
    context = multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    cpu_workers = sum(resolve_device(d).type == "cpu" for d in devices)
    threads = options.threads or max(1, len(os.sched_getaffinity(0)) // max(1, cpu_workers))
    processes = [context.Process(target=_worker, name=f"evomerge-worker-{i}",
                                 args=(i, experiment, device, threads, options, errors))
                 for i, device in enumerate(devices)]
    previous = signal.signal(signal.SIGINT, _wait_for_workers)
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    messages = {}
    while not errors.empty():
        index, message = errors.get()
        messages[index] = message
    failed = [(i, p.exitcode) for i, p in enumerate(processes) if p.exitcode != 0]
    budget = experiment.budget.n_trials if options.n_trials is None else options.n_trials
    if failed and not _reached(search, budget):
        index, code = failed[0]
        raise EvomergeError(f"worker {index} ({devices[index]}): "
                            + messages.get(index, f"exited with code {code}"))
    for index, code in failed:
        log.warning("worker %d (%s) exited with code %s; the others finished the budget", index, devices[index], code)
    return search


def _reached(search: Search, budget: int | None) -> bool:
    try:
        return budget is not None and Budget(budget).finished(search.study.get_trials(deepcopy=False)) >= budget
    except STORAGE_ERRORS:  # the workers' error says it
        return False


def _wait_for_workers(signum, frame) -> None:
    log.warning("waiting for the workers to finish their current trials")


def _worker(index: int, experiment: Experiment, device: str, threads: int, options: WorkerOptions,
            errors) -> None:
    """One worker process: the single-process search loop on ``device``."""
    if options.log_setup is not None:
        options.log_setup()
    if resolve_device(device).type == "cpu":
        torch.set_num_threads(threads)
    try:
        run_search(experiment, study_name=options.study_name, storage=options.storage, n_trials=options.n_trials,
                   timeout=options.timeout, device=device, progress=False, heartbeat=options.heartbeat)
    except EvomergeError as error:
        errors.put((index, str(error)))
        raise SystemExit(2) from None
