"""Count the search loop's storage traffic per trial: SQL statements, transactions, Optuna storage calls.

Wall-clock timings of the loop's own share of a trial (``benchmarks/search.py``'s "other s")
need an idle machine; what the loop asks of its storage does not. This script runs the same
small search (a tiny Llama family, base + 3 sources, a TIES space, a 64-token perplexity, a
SQLite study in a temporary folder) and counts, while ``Runner.run`` runs only (setup excluded):

* **statements**: every SQL statement the storage's engine sends (SQLAlchemy's
  ``before_cursor_execute`` event, on every engine), and the transactions among them (``commit``);
* **storage calls**: the calls into Optuna's ``RDBStorage`` from outside it (Optuna's cache in
  front of it, the study, the sampler, evomerge), the outermost call counted once;
* **ms/trial**: the loop's own share of a trial (its wall time less the materializer's ``apply``
  and the fitness's stages, both timed here). On a busy machine it is noise: trust the counts.

``growth`` is the statements of the last quarter of a row's trials over the first quarter's
(trials are delimited by the materializer's ``apply``), which shows per-trial traffic that grows
with the study. ``--checkout PATH`` (repeatable) runs each row against that checkout's
``evomerge`` (``PYTHONPATH=PATH``, one subprocess each), e.g. an old commit in a worktree::

    git worktree add --detach /tmp/old 591daf1
    python benchmarks/search_storage.py --checkout /tmp/old --checkout .
    python benchmarks/search_storage.py --heartbeat 30 --calls   # the CLI's heartbeats; calls by name

Rows are ``cma`` (the ``cma`` package), ``cmaes`` (Optuna's CMA-ES) and ``cmaes+warm`` (evomerge's
defaults: CMA-ES after the space's known recipes), as in ``benchmarks/search.py``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SAMPLERS = ("cma", "cmaes", "cmaes+warm")
WORDS = "the quick brown fox jumps over lazy dog merging models 12 30 42 + =".split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkout", action="append", type=Path, default=None,
                        help="a checkout whose evomerge runs the rows (repeatable) [default: the one "
                             "this script is in]")
    parser.add_argument("--trials", type=int, default=16, help="trials per row")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help=f"subset of {','.join(SAMPLERS)}")
    parser.add_argument("--heartbeat", type=int, default=None,
                        help="heartbeat seconds (evomerge search's default: 30) [default: none, as "
                             "benchmarks/search.py]")
    parser.add_argument("--calls", action="store_true",
                        help="also print, per trial, each storage call's count and its statements")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the tiny family is built [default: a temporary folder]")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # JSON out of one run
    args = parser.parse_args(argv)
    args.samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    if set(args.samplers) - set(SAMPLERS) or args.trials < 4:
        parser.error(f"--samplers: a subset of {','.join(SAMPLERS)}; --trials: at least 4")
    return args


# --------------------------------------------------------------------------- counting (in a worker)


class Counter:
    """SQL statements, transactions and outermost ``RDBStorage`` calls, while :attr:`on`."""

    def __init__(self) -> None:
        self.reset()
        self._depth = threading.local()

    def reset(self) -> None:
        """Zero every count (between rows)."""
        self.on = False
        self.statements = 0
        self.kinds: collections.Counter[str] = collections.Counter()
        self.commits = 0
        self.calls: collections.Counter[str] = collections.Counter()
        self.by_call: collections.Counter[str] = collections.Counter()  # statements by outermost call

    def install(self) -> None:
        import optuna
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        @event.listens_for(Engine, "before_cursor_execute")
        def statement(conn, cursor, text, parameters, context, executemany):
            if self.on:
                self.statements += 1
                self.kinds[text.lstrip().split(None, 1)[0].upper()] += 1
                self.by_call[getattr(self._depth, "name", None) or "(not through RDBStorage)"] += 1

        @event.listens_for(Engine, "commit")
        def commit(conn):
            if self.on:
                self.commits += 1

        cls = optuna.storages.RDBStorage
        for name in {n for klass in cls.__mro__[:-1] for n in vars(klass)}:
            function = getattr(cls, name)
            if name.startswith("__") or not callable(function) or isinstance(
                    cls.__dict__.get(name), (staticmethod, classmethod)):
                continue
            setattr(cls, name, self._counted(name, function))

    def _counted(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._depth, "n", 0)
            if self.on and depth == 0:
                self.calls[name] += 1
                self._depth.name = name
            self._depth.n = depth + 1
            try:
                return function(*args, **kwargs)
            finally:
                self._depth.n = depth
                if depth == 0:
                    self._depth.name = None
        return wrapper


def build(work: Path) -> tuple[list[str], dict[str, str]]:
    """The tiny family (built once under ``work``) and a random-word corpus."""
    try:
        from evomerge.zoo.synthetic import build_family
    except ImportError:  # before the layout of one folder per layer
        from evomerge.synthetic import build_family
    family = work / "family"
    if not (family / "ft3" / "config.json").exists():
        build_family(family, "llama", size="tiny", sources=3)
    rng = random.Random(0)
    corpus = {}
    for split in ("search", "test"):
        corpus[split] = str(work / f"{split}.txt")
        Path(corpus[split]).write_text(" ".join(rng.choice(WORDS) for _ in range(512)) + "\n")
    return [str(family / name) for name in ("base", "ft1", "ft2", "ft3")], corpus


def run_row(sampler: str, args: argparse.Namespace, counter: Counter, work: Path) -> dict[str, Any]:
    from evomerge.search.driver import Runner, open_search
    from evomerge.search.experiment import Experiment

    models, corpus = build(work)
    experiment = Experiment.model_validate({
        "name": f"storage-{sampler}", "models": {"base": models[0], "sources": models[1:]},
        "search_space": {"kind": "parameter", "method": "ties", "layer_granularity": 2,
                         "search": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}},
        "fitness": {"metrics": {"ppl": {"type": "perplexity", "data": corpus, "max_tokens": 64,
                                        "context": 64, "batch_size": 4}}},
        "optimizer": {"sampler": sampler.removesuffix("+warm"), "popsize": 4, "sigma0": 0.25, "seed": 0,
                      "warm_start": sampler.endswith("+warm")},
        "budget": {"n_trials": args.trials, "max_failures_in_a_row": args.trials},
        "device": "cpu", "dtype": "float32", "seed": 0})
    db = Path(tempfile.mkdtemp(dir=work)) / "study.db"
    search = open_search(experiment, storage=f"sqlite:///{db}", heartbeat=args.heartbeat)
    runner = Runner(search, progress=False)
    work_s, marks = [0.0], []  # merge + fitness seconds; statements at each apply

    def timed_apply(apply: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            marks.append(counter.statements)
            began = time.perf_counter()
            try:
                return apply(*a, **k)
            finally:
                work_s[0] += time.perf_counter() - began
        return wrapper

    def timed_stages(stages: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def wrapper(*a: Any, **k: Any) -> Iterator[Any]:
            iterator = stages(*a, **k)
            while True:
                began = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    work_s[0] += time.perf_counter() - began
                    return
                work_s[0] += time.perf_counter() - began
                yield item
        return wrapper

    runner.materializer.apply = timed_apply(runner.materializer.apply)
    search.fitness.iter_stages = timed_stages(search.fitness.iter_stages)
    counter.on = True
    began = time.perf_counter()
    ran = runner.run(args.trials, None)
    loop_s = time.perf_counter() - began
    counter.on = False
    marks.append(counter.statements)
    per_trial = [b - a for a, b in zip(marks, marks[1:])]
    quarter = max(1, len(per_trial) // 4)
    first, last = per_trial[:quarter], per_trial[-quarter:]
    return {"sampler": sampler, "trials": ran, "statements": counter.statements, "commits": counter.commits,
            "kinds": dict(counter.kinds), "calls": dict(counter.calls),
            "by_call": dict(counter.by_call), "loop_s": loop_s, "work_s": work_s[0],
            "growth": (sum(last) / len(last)) / (sum(first) / len(first)) if first and sum(first) else None}


def worker(args: argparse.Namespace) -> None:
    import optuna

    import evomerge

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as `evomerge search` (cli/logs.py)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    counter = Counter()
    counter.install()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="evomerge-storage-"))
    rows = []
    for sampler in args.samplers:
        counter.reset()
        rows.append(run_row(sampler, args, counter, work))
    args.worker.write_text(json.dumps({"evomerge": str(Path(evomerge.__file__).parent.parent), "rows": rows}))


# --------------------------------------------------------------------------- the table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return 0
    checkouts = [c.resolve() for c in (args.checkout or [Path(__file__).resolve().parent.parent])]
    results = []
    with tempfile.TemporaryDirectory(prefix="evomerge-storage-") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        for i, checkout in enumerate(checkouts):
            out = Path(tmp) / f"{i}.json"
            env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--work-dir",
                       str(work), "--trials", str(args.trials), "--samplers", ",".join(args.samplers)]
            if args.heartbeat is not None:
                command += ["--heartbeat", str(args.heartbeat)]
            subprocess.run(command, env=env, check=True, cwd=checkout)
            results.append(json.loads(out.read_text()))
            if Path(results[-1]["evomerge"]) != checkout:
                raise SystemExit(f"{checkout}: ran the evomerge of {results[-1]['evomerge']} instead")
    print(f"{args.trials} trials a row, tiny llama, SQLite, heartbeat {args.heartbeat or 'off'}; per trial "
          "of Runner.run. ms/trial: the loop's own share (wall less merge and fitness), noise unless the "
          "machine is idle")
    header = ("checkout", "row", "statements", "SELECT", "INSERT", "UPDATE", "DELETE", "transactions",
              "storage calls", "growth", "ms/trial")
    table = [header]
    for checkout, result in zip(checkouts, results):
        for row in result["rows"]:
            n = row["trials"]
            kinds = row["kinds"]
            table.append((str(checkout), row["sampler"], f"{row['statements'] / n:.1f}",
                          *(f"{kinds.get(k, 0) / n:.1f}" for k in ("SELECT", "INSERT", "UPDATE", "DELETE")),
                          f"{row['commits'] / n:.1f}", f"{sum(row['calls'].values()) / n:.1f}",
                          "-" if row["growth"] is None else f"{row['growth']:.2f}",
                          f"{(row['loop_s'] - row['work_s']) / n * 1000:.1f}"))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for line in table:
        print(" | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    if args.calls:
        for checkout, result in zip(checkouts, results):
            for row in result["rows"]:
                n, statements = row["trials"], row["by_call"]
                names = sorted(set(row["calls"]) | set(statements), key=lambda k: -statements.get(k, 0))
                print(f"\n{checkout} {row['sampler']}, per trial: call × calls (statements): " + ", ".join(
                    f"{name} {row['calls'].get(name, 0) / n:.2f} ({statements.get(name, 0) / n:.1f})"
                    for name in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
