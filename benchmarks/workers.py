"""Benchmark: search throughput (trials per minute) with 1, 2 and 4 local workers on one study.

Each row runs ``run_workers`` (what ``evomerge search --workers N`` runs) on a fresh study
of the same storage with the same budget, on the tiny zoo's shapes (Llama, hidden 128,
4 layers, base + 3 specialists; built once under ``.cache/bench/zoo-workers`` with few
training steps: speed does not depend on how well they were trained, only the generated
answers' lengths might) and the zoo's fitness (the shipped ``zoo_skills``: three lm-eval
tasks and a perplexity, ``--limit`` items each). The 1-worker row is the anchor measured in
the same run; "scaling" is each row's trials/minute over the anchor's.

trials/minute counts the trial phase only: from the first trial's start to the last trial's
end as recorded in the study (worker start-up, i.e. imports and loading the models, is the
"start-up" column). The last columns split a 1-worker trial: materialize, fitness, and the
rest (ask: sampler and storage, decoding the plan, tell), and the time to decode one plan
(``SearchSpace.decode``), which is what pipelining the next plan's decode would hide.

Storage: a throwaway PostgreSQL server (``tests/postgres_server.py``) when its binaries are
found, else a journal file; or ``--storage URL``. CPU workers split the cores
(``torch.set_num_threads(cores // N)``; ``--threads`` fixes it: on a busy shared machine a
worker with 2 OpenMP threads stalls when other processes hold the cores, which slows the
1-worker anchor and inflates the scaling). The 1-minute load average before each row is
printed: other jobs share the machine.

    python benchmarks/workers.py                     # 1, 2, 4 workers, 16 trials each
    python benchmarks/workers.py --threads 1 --trials 12 --limit 8   # a busy 2-core machine
    python benchmarks/workers.py --workers 1 2 --trials 8 --limit 8
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evomerge.io import shipped  # noqa: E402
from evomerge.search.distributed.workers import WorkerOptions, run_workers  # noqa: E402
from evomerge.search.experiment import parse_experiment  # noqa: E402
from evomerge.search.records import trial_records  # noqa: E402
from evomerge.zoo.build import build_zoo  # noqa: E402
from evomerge.zoo.recipe import Recipe  # noqa: E402

ZOO = REPO / ".cache" / "bench" / "zoo-workers"
RECIPE = dict(pretrain_steps=30, finetune_steps=10, corpus_paragraphs=2000, eval_items=64, threads=1)


def experiment_yaml(limit: int) -> str:
    folder = shipped.folder("fitness")
    fitness = re.sub(r"limit: \d+", f"limit: {limit}", (folder / "zoo_skills.yaml").read_text())
    fitness = fitness.replace("include_path: tasks", f"include_path: {folder / 'tasks'}")
    fitness = fitness.replace("data/general/", f"{folder / 'data' / 'general'}/")
    path = Path(tempfile.mkdtemp(prefix="evomerge-bench-")) / "fitness.yaml"
    path.write_text(fitness)
    return f"""
name: bench
models: {{base: {ZOO}/base, sources: [{ZOO}/increment, {ZOO}/reverse, {ZOO}/dates]}}
search_space: {{kind: parameter, method: task_arithmetic, layer_granularity: 1, search: {{weight: [0.0, 1.5]}},
               fixed: {{lambda: 1.0}}}}
fitness: {path}
optimizer: {{sampler: cmaes, popsize: 8, sigma0: 0.25, seed: 0, warm_start: false}}
device: cpu
"""


def storage_url(choice: str | None):
    """(URL, cleanup) for ``--storage``: a URL, or a throwaway server / journal file."""
    if choice:
        return choice, lambda: None
    from tests.postgres_server import PostgresServer, binaries

    if binaries() is not None:
        server = PostgresServer(binaries())
        server.start()
        return server.create_database("bench"), server.cleanup
    return f"journal:{tempfile.mkdtemp(prefix='evomerge-bench-')}/study.log", lambda: None


def row(experiment, url: str, workers: int, trials: int, heartbeat: int, threads: int | None) -> dict:
    load = os.getloadavg()[0]
    options = WorkerOptions(study_name=f"bench-{workers}w", storage=url, n_trials=trials, heartbeat=heartbeat,
                            threads=threads)
    started = time.perf_counter()
    search = run_workers(experiment, ["cpu"] * workers, options)
    wall = time.perf_counter() - started
    done = [t for t in search.study.get_trials() if t.datetime_complete is not None]
    first = min(t.datetime_start for t in done)
    window = (max(t.datetime_complete for t in done) - first).total_seconds()
    return {"workers": workers, "trials": len(done), "window": window, "per_min": 60 * len(done) / window,
            "startup": wall - window, "load": load, "search": search, "done": done}


def split(result: dict) -> tuple[float, float, float, float, float]:
    """Mean trial, materialize, fitness, rest (s) and one plan decode (ms) of a row."""
    done, search = result["done"], result["search"]
    trial = statistics.mean((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    records = [trial_records(t) for t in done]
    materialize = statistics.mean(r.time_materialize_s or 0 for r in records)
    fitness = statistics.mean(r.time_fitness_s or 0 for r in records)
    started = time.perf_counter()
    for t in done:
        search.decode(t.params)
    decode = (time.perf_counter() - started) / len(done)
    return trial, materialize, fitness, trial - materialize - fitness, decode * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--trials", type=int, default=16, help="budget of each row's study")
    parser.add_argument("--limit", type=int, default=16, help="lm-eval items per task per candidate")
    parser.add_argument("--storage", default=None, help="study storage URL (default: throwaway PostgreSQL)")
    parser.add_argument("--heartbeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: cores / workers); 1 on a busy shared machine")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not (ZOO / "base").is_dir():
        print(f"building the zoo's shapes in {ZOO} ...", file=sys.stderr)
        build_zoo(ZOO, Recipe().override(**RECIPE), progress=False)
    experiment = parse_experiment(experiment_yaml(args.limit))
    url, cleanup = storage_url(args.storage)
    try:
        rows = [row(experiment, url, n, args.trials, args.heartbeat, args.threads) for n in args.workers]
    finally:
        cleanup()
    anchor = rows[0]["per_min"]
    print(f"storage: {url.split('@')[-1]}   cores: {len(os.sched_getaffinity(0))}   trials per row: {args.trials}"
          f"   lm-eval limit: {args.limit}   threads per worker: {args.threads or 'cores / workers'}")
    print(f"{'workers':>7} {'trials':>6} {'window s':>9} {'trials/min':>10} {'scaling':>8} {'start-up s':>10}"
          f" {'load':>5}")
    for r in rows:
        print(f"{r['workers']:>7} {r['trials']:>6} {r['window']:>9.1f} {r['per_min']:>10.1f}"
              f" {r['per_min'] / anchor:>7.2f}x {r['startup']:>10.1f} {r['load']:>5.2f}")
    trial, materialize, fitness, rest, decode = split(rows[0])
    print(f"\n{rows[0]['workers']}-worker trial: {trial:.3f} s = materialize {materialize:.3f} + fitness {fitness:.3f}"
          f" + rest {rest:.3f} (ask, storage, tell); decoding a plan: {decode:.2f} ms"
          f" ({100 * decode / 1000 / trial:.2f}% of a trial)")


if __name__ == "__main__":
    main()
