"""Benchmark evomerge's search loop against a mergekit-evolve-style loop, in the same run.

What it measures, per regime, for N trials of each loop:

* **trials per minute** of the trial loop (setup excluded and reported on its own: loading
  the models resident for evomerge);
* **seconds per trial**, split into *merge* (evomerge: ``Materializer.apply`` writing the
  candidate into the live model; baseline: write the config YAML, mergekit's in-process
  ``run_merge`` to a temporary folder, ``AutoModelForCausalLM``/``AutoTokenizer``
  ``.from_pretrained`` of it), *fitness* (the same ``Fitness.evaluate`` on the search split)
  and *other* (sampler, Optuna storage, deleting the merged folder);
* **best fitness after N**: the lowest search-split perplexity among the N candidates.

The anchor ("baseline") does per candidate what ``mergekit-evolve`` does with its on-disk
evaluator (``mergekit.evo.helpers.merge_model`` + ``evaluate_model``): the ``cma`` package's
``CMAEvolutionStrategy`` asks a generation of genomes, each is decoded to a merge config,
merged to disk with ``run_merge`` (the ``MergeOptions`` mergekit-evolve uses: quiet, tokenizer
copy, one shard, CUDA flags when ``--device cuda``), reloaded, scored, and the folder deleted;
then ``tell``. Differences from mergekit-evolve, all in the baseline's favour or neutral: the
genome is evomerge's search space (``space.from_unit`` / ``decode``, the same genes and
bounds), no Ray, and the fitness is evomerge's perplexity metric instead of an lm-eval run
(it re-tokenizes the corpus for each reloaded tokenizer, as lm-eval would per candidate).

The evomerge rows are ``open_search`` + ``Runner.run`` (what ``run_search`` does), each with
its own SQLite study in a temporary folder: ``cma`` is the same package with the same ``x0``
(the space's first known recipe), seed, popsize and sigma0 as the baseline, warm start off;
``cmaes`` is Optuna's ``CmaEsSampler`` (another sampler, so another path), warm start off;
``cmaes+warm`` is evomerge's default configuration: ``CmaEsSampler`` after the warm-start
trials (the space's known recipes: uniform task arithmetic, default TIES, each source alone,
counted in N). With ``--same-time``, one more row runs the defaults for as long as the
baseline's N trials took (``timeout``; the trial in flight finishes): its best perplexity is
the best merge found in the same minutes. The other rows share one ``Fitness`` object per
regime (its score cache, keyed by merge plan, would serve the same-time row's first trials).
"same path" counts the trials whose parameters equal the baseline's trial of the same
number, with the largest |Δ perplexity| among them (the two merge engines' float rounding).
The two ``cma`` loops ask the same first generation; from the second on they part, because
evomerge's proposer tells ``cma`` the re-encoded parameters (``space.to_unit``, lists)
rather than the arrays ``ask`` returned, and ``cma`` then reconstructs the genotypes of
boundary-repaired samples differently (the space's ``x0`` sits on the density bound, so many
are repaired). So best-after-N compares two runs of the same algorithm: equal within noise,
not by construction. ``run_merge`` reseeds numpy's global RNG (``random_seed``), which
``cma`` samples from; the baseline restores it after each merge, as mergekit-evolve's Ray
workers leave the driver's RNG alone.

Regimes (rows grouped, ``--regimes``): ``merge`` (merge-bound: cheap perplexity, ``--cheap-
tokens`` tokens) and ``fitness`` (fitness-bound: ``--heavy-tokens`` tokens, where scoring
dominates and the ratio falls towards 1). The family is ``evomerge.zoo.synthetic.build_family``
(Llama, base + 3 fine-tunes, built once under ``.cache/bench``), the space a TIES space with
``layer_granularity`` and weight/density bounds; the corpus is random words written into a
temporary folder. The loops run one after the other (not interleaved); the 1-minute load
average at each row's start is printed next to it, because other jobs share the machine.
On a shared CPU machine pass ``--threads 1`` (both loops run with it): torch's OpenMP
threads stall when other processes hold the cores (measured on a 2-core machine at load
~3.5: ``Materializer.apply`` 0.3-15 s per candidate with 2 threads, 0.06 s with 1). On
CUDA, every timed section ends with ``torch.cuda.synchronize``.

Run from the repository root with the project's virtual environment active::

    python benchmarks/search.py                                # small llama, both regimes, N=16
    python benchmarks/search.py --threads 1                    # the same on a busy shared machine
    python benchmarks/search.py --regimes merge --samplers cma # the headline ratio only
    python benchmarks/search.py --threads 1 --regimes merge --same-time  # + best in the baseline's time
    python benchmarks/search.py --size 100m --trials 8 --popsize 4 --regimes merge --threads 1
    python benchmarks/search.py --size 100m --trials 32 --popsize 8 --device cuda
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
import transformers
import yaml

from evomerge.fitness import Fitness, load_fitness
from evomerge.io import ModelFolder
from evomerge.search.driver import Runner, open_search
from evomerge.search.experiment import Experiment
from evomerge.search.records import trial_records
from evomerge.search.spaces.loader import load_search_space
from evomerge.search.spaces.space import SearchSpace
from evomerge.zoo.synthetic import SIZES, build_family

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
REGIMES = ("merge", "fitness")
SAMPLERS = ("cma", "cmaes", "cmaes+warm")  # +warm: evomerge's defaults (warm start on)
METRIC = "ppl"
WORDS = ("the quick brown fox jumps over lazy dog merging models task arithmetic ties dare slerp "
         "and model stock 12 30 42 + =").split()


# --------------------------------------------------------------------------- setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark evomerge's search loop against a mergekit-evolve-style loop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="synthetic llama size")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the models, of every merge and of scoring")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both loops [default: torch's]; 1 on a shared machine")
    parser.add_argument("--trials", type=int, default=16, help="N: candidates per loop")
    parser.add_argument("--regimes", default=",".join(REGIMES),
                        help="comma-separated subset of merge (cheap fitness), fitness (heavy fitness)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS),
                        help="evomerge rows: cma (same package as the baseline), cmaes (Optuna)")
    parser.add_argument("--popsize", type=int, default=8, help="CMA-ES population")
    parser.add_argument("--sigma0", type=float, default=0.25, help="CMA-ES initial step on [0, 1]^d")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (and merge seed)")
    parser.add_argument("--granularity", type=int, default=2, help="layer_granularity of the TIES space")
    parser.add_argument("--cheap-tokens", type=int, default=512, help="perplexity max_tokens, merge regime")
    parser.add_argument("--heavy-tokens", type=int, default=8192, help="perplexity max_tokens, fitness regime")
    parser.add_argument("--context", type=int, default=512, help="perplexity window (≤ the model's 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="perplexity windows per forward pass")
    parser.add_argument("--same-time", action="store_true",
                        help="add a row: evomerge's defaults (cmaes + warm start) for as long as the "
                             "baseline's N trials took (best ppl in the same time)")
    parser.add_argument("--study-dir", type=Path, default=None,
                        help="folder for the evomerge rows' SQLite studies (e.g. /dev/shm, to take the "
                             "disk's commit latency out) [default: the benchmark's temporary folder]")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the model family is built and reused "
                             "[default: <repo>/.cache/bench/llama-<size>-<dtype>]")
    args = parser.parse_args(argv)
    args.regimes = _subset(parser, "--regimes", args.regimes, REGIMES)
    args.samplers = _subset(parser, "--samplers", args.samplers, SAMPLERS)
    if args.trials < 1 or args.popsize < 2:
        parser.error("--trials must be at least 1 and --popsize at least 2")
    if args.cache_dir is None:
        args.cache_dir = REPO_ROOT / ".cache" / "bench" / f"llama-{args.size}-{args.dtype}"
    args.cache_dir = args.cache_dir.absolute()
    return args


def _subset(parser: argparse.ArgumentParser, flag: str, value: str, known: tuple[str, ...]) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    if not chosen or set(chosen) - set(known):
        parser.error(f"{flag}: expected a comma-separated subset of {','.join(known)}, got {value!r}")
    return [k for k in known if k in chosen]


def ensure_family(cache_dir: Path, size: str, dtype: torch.dtype) -> list[Path]:
    """Build base + ft1..ft3 under ``cache_dir`` unless already there; return their paths."""
    paths = [cache_dir / name for name in ("base", "ft1", "ft2", "ft3")]
    if all((p / "config.json").exists() for p in paths) and (paths[0] / "tokenizer_config.json").exists():
        print(f"reusing model family in {cache_dir}")
        return paths
    print(f"building {size} llama family ({dtype}) in {cache_dir} ...", flush=True)
    return [Path(p).absolute() for p in build_family(cache_dir, "llama", size=size, sources=3, dtype=dtype)]


def write_corpus(folder: Path, tokens: int) -> dict[str, str]:
    """Random-word search and test texts, long enough for ``tokens`` tokens (≥ 1 per word)."""
    rng = random.Random(0)
    paths = {}
    for split in ("search", "test"):
        paths[split] = str(folder / f"{split}.txt")
        Path(paths[split]).write_text(" ".join(rng.choice(WORDS) for _ in range(2 * tokens)) + "\n")
    return paths


def space_definition(granularity: int) -> dict[str, Any]:
    return {"kind": "parameter", "method": "ties", "layer_granularity": granularity,
            "search": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}}


def fitness_definition(corpus: dict[str, str], tokens: int, context: int, batch_size: int) -> dict[str, Any]:
    return {"metrics": {METRIC: {"type": "perplexity", "data": corpus, "max_tokens": tokens,
                                 "context": context, "batch_size": batch_size}}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load1() -> float:
    return os.getloadavg()[0]


# --------------------------------------------------------------------------- the loops


@dataclass
class Row:
    """One loop's N trials: timings, perplexities and parameters in trial order."""

    regime: str
    loop: str
    load: float
    setup_s: float = 0.0
    loop_s: float = 0.0
    merge_s: list[float] = field(default_factory=list)
    fitness_s: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # perplexity, nan when the trial failed
    params: list[dict[str, float]] = field(default_factory=list)
    note: str = ""

    @property
    def trials(self) -> int:
        return len(self.values)

    @property
    def rate(self) -> float:
        """Trials per minute."""
        return self.trials / self.loop_s * 60

    @property
    def steady_rate(self) -> float:
        """Trials per minute without the first trial's merge and fitness (one-time caches)."""
        if self.trials < 2:
            return self.rate
        return (self.trials - 1) / (self.loop_s - self.merge_s[0] - self.fitness_s[0]) * 60

    @property
    def best(self) -> float:
        finite = [v for v in self.values if math.isfinite(v)]
        return min(finite) if finite else math.nan


def run_baseline(regime: str, space: SearchSpace, fitness: Fitness, args: argparse.Namespace,
                 work_dir: Path, device: torch.device) -> Row:
    """mergekit-evolve's per-candidate work: cma ask/tell, run_merge to disk, reload, score."""
    import cma
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    row = Row(regime, "baseline: cma + mergekit run_merge", load1())
    start = time.perf_counter()
    cuda = device.type == "cuda"
    options = MergeOptions(cuda=cuda, device=str(device), low_cpu_memory=cuda, read_to_gpu=cuda,
                           out_shard_size=1_000_000_000_000, random_seed=args.seed, quiet=True,
                           copy_tokenizer=True, safe_serialization=True)
    recipes = space.known_recipes()
    x0 = space.to_unit(recipes[0]) if recipes else [0.5] * len(space.distributions())
    es = cma.CMAEvolutionStrategy(x0, args.sigma0, {"seed": args.seed + 1, "bounds": [0, 1],
                                                    "verbose": -9, "popsize": args.popsize})
    row.setup_s = time.perf_counter() - start
    storage = work_dir / "baseline"
    storage.mkdir()
    start = time.perf_counter()
    while row.trials < args.trials:
        genomes = es.ask()
        costs = []
        for x in genomes[:args.trials - row.trials]:
            params = space.from_unit(x)
            config = space.decode(params).model_copy(update={"dtype": args.dtype})
            began = time.perf_counter()
            out_dir = tempfile.mkdtemp(prefix="merged", dir=storage)
            config_path = Path(out_dir) / "config.yaml"
            config_path.write_text(config.to_yaml())
            merge_config = MergeConfiguration.model_validate(yaml.safe_load(config_path.read_text()))
            # run_merge reseeds numpy's global RNG (random_seed), which cma samples from;
            # mergekit-evolve merges in a Ray worker, leaving the driver's RNG alone: so do we
            rng_state = np.random.get_state()
            run_merge(merge_config, out_dir, options=options)
            np.random.set_state(rng_state)
            model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=DTYPES[args.dtype]).to(device)
            tokenizer = AutoTokenizer.from_pretrained(out_dir)
            sync(device)
            merged = time.perf_counter()
            value = fitness.evaluate(model, tokenizer, "search")[METRIC]
            sync(device)
            row.merge_s.append(merged - began)
            row.fitness_s.append(time.perf_counter() - merged)
            row.values.append(value)
            row.params.append(params)
            costs.append(value)  # perplexity: cma minimizes it
            del model, tokenizer
            shutil.rmtree(out_dir)
        if len(costs) == len(genomes):
            es.tell(genomes, costs)
    row.loop_s = time.perf_counter() - start
    return row


def run_evomerge(regime: str, sampler: str, experiment: Experiment, fitness: Fitness,
                 storage: str, device: torch.device, timeout: float | None = None) -> Row:
    """``run_search`` in two timed steps: open the study and load the materializer, then the trials
    (the experiment's ``n_trials``, or as many as fit in ``timeout`` seconds)."""
    label = f"evomerge: {sampler}" + (", baseline's time" if timeout else "")
    row = Row(regime, label, load1())
    start = time.perf_counter()
    search = open_search(experiment, storage=storage)
    search.fitness = fitness  # the very object the baseline scores with (same definition)
    runner = Runner(search, progress=False)
    runner.materializer.apply = _synced(runner.materializer.apply, device)  # time the kernels, not launches
    sync(device)
    row.setup_s = time.perf_counter() - start
    start = time.perf_counter()
    runner.run(None if timeout else experiment.budget.n_trials, timeout)
    sync(device)
    row.loop_s = time.perf_counter() - start
    failed = 0
    for trial in search.study.get_trials(deepcopy=False):
        if trial.state == optuna.trial.TrialState.WAITING:
            continue
        records = trial_records(trial)
        row.merge_s.append(records.time_materialize_s or 0.0)
        row.fitness_s.append(records.time_fitness_s or 0.0)
        row.values.append(records.metrics[METRIC] if trial.state == optuna.trial.TrialState.COMPLETE
                          else math.nan)
        row.params.append(dict(trial.params))
        failed += trial.state == optuna.trial.TrialState.FAIL
    if failed:
        row.note = f"{failed} failed trial(s)"
    return row


def _synced(function: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        sync(device)
        return result
    return wrapper


def same_path(row: Row, anchor: Row) -> str:
    """How many trials asked the anchor's parameters, and the largest |Δ perplexity| among them."""
    same, worst = 0, 0.0
    for params, value, anchor_params, anchor_value in zip(row.params, row.values, anchor.params, anchor.values):
        if params.keys() == anchor_params.keys() and all(
                abs(params[k] - anchor_params[k]) <= 1e-9 for k in params):
            same += 1
            worst = max(worst, abs(value - anchor_value))
    return f"{same}/{len(row.params)} (max |Δ| {worst:.2g})" if same else f"0/{len(row.params)}"


# --------------------------------------------------------------------------- the table


def format_table(groups: list[list[Row]]) -> str:
    header = ("regime", "loop", "load1", "trials", "trials/min", "s/trial", "merge s (1st)", "fitness s (1st)",
              "other s", "setup s", "best ppl", "ratio", "w/o 1st", "same path as baseline")
    rows: list[tuple[str, ...] | None] = [header]
    for group in groups:
        anchor = group[0]
        rows.append(None)
        for row in group:
            per_trial = row.loop_s / row.trials
            merge, fitness = sum(row.merge_s) / row.trials, sum(row.fitness_s) / row.trials
            rows.append((row.regime, row.loop, f"{row.load:.2f}", str(row.trials), f"{row.rate:.1f}",
                         f"{per_trial:.3f}", f"{merge:.3f} ({row.merge_s[0]:.2f})",
                         f"{fitness:.3f} ({row.fitness_s[0]:.2f})", f"{per_trial - merge - fitness:.3f}",
                         f"{row.setup_s:.2f}", f"{row.best:.4f}", f"{row.rate / anchor.rate:.2f}x",
                         f"{row.steady_rate / anchor.steady_rate:.2f}x",
                         "-" if row is anchor else same_path(row, anchor) + (f"; {row.note}" if row.note else "")))
    widths = [max(len(r[i]) for r in rows if r is not None) for i in range(len(header))]
    lines = []
    for row in rows:
        if row is None:
            lines.append("-+-".join("-" * w for w in widths))
            continue
        cells = [c.ljust(w) for c, w in zip(row[:2], widths)] + [c.rjust(w) for c, w in zip(row[2:], widths[2:])]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")  # CmaEsSampler(sigma0=...)
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print("command: " + shlex.join([Path(sys.executable).name, *sys.argv]))
    models = ensure_family(args.cache_dir, args.size, DTYPES[args.dtype])
    base, sources = str(models[0].resolve()), [str(m.resolve()) for m in models[1:]]
    params = ModelFolder(base).num_parameters()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"machine: {os.cpu_count()} CPUs, device {device} ({device_name or platform.machine()}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}; "
          f"llama-{args.size} {params / 1e6:.1f}M parameters, {args.dtype}, base + 3 sources; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    space_spec = space_definition(args.granularity)
    space = load_search_space(space_spec, models=sources, base_model=base)
    print(f"space: ties, layer_granularity {args.granularity}, {len(space.distributions())} genes; "
          f"CMA-ES popsize {args.popsize}, sigma0 {args.sigma0}, seed {args.seed}; N = {args.trials}")
    tokens = {"merge": args.cheap_tokens, "fitness": args.heavy_tokens}
    groups: list[list[Row]] = []
    with tempfile.TemporaryDirectory(prefix="evomerge-bench-search-") as tmp:
        work = Path(tmp)
        corpus = write_corpus(work, max(tokens[r] for r in args.regimes))
        for regime in args.regimes:
            definition = fitness_definition(corpus, tokens[regime], args.context, args.batch_size)
            fitness = load_fitness(definition)
            regime_dir = work / regime
            regime_dir.mkdir()
            print(f"[{regime}] baseline (load {load1():.2f}) ...", flush=True)
            group = [run_baseline(regime, space, fitness, args, regime_dir, device)]
            runs = [(sampler, None) for sampler in args.samplers]
            if args.same_time:
                runs.append(("cmaes+warm", group[0].loop_s))
            for sampler, timeout in runs:
                label = sampler.replace("+", "-") + ("-same-time" if timeout else "")
                experiment = Experiment.model_validate({
                    "name": f"bench-{regime}-{label}", "models": {"base": base, "sources": sources},
                    "search_space": space_spec, "fitness": definition,
                    "optimizer": {"sampler": sampler.removesuffix("+warm"), "popsize": args.popsize,
                                  "sigma0": args.sigma0, "seed": args.seed,
                                  "warm_start": sampler.endswith("+warm")},
                    "budget": {"n_trials": args.trials, "max_failures_in_a_row": args.trials},
                    "device": args.device, "dtype": args.dtype, "seed": args.seed})
                print(f"[{regime}] evomerge {sampler}{' for the baseline time' if timeout else ''} "
                      f"(load {load1():.2f}) ...", flush=True)
                study_dir = Path(tempfile.mkdtemp(dir=args.study_dir)) if args.study_dir else regime_dir
                try:
                    # the same-time row repeats the defaults' first trials: a fitness of its own, so
                    # that the shared one's score cache (keyed by plan) does not serve them
                    scorer = load_fitness(definition) if timeout else fitness
                    group.append(run_evomerge(regime, sampler, experiment, scorer,
                                              f"sqlite:///{study_dir}/{label}.db", device, timeout))
                finally:
                    if args.study_dir:
                        shutil.rmtree(study_dir, ignore_errors=True)
            groups.append(group)
    print()
    print(f"N = {args.trials} trials per loop; times are means per trial (the first trial's in parentheses: "
          f"evomerge caches magnitude orders and tokenizes the corpus there); other = s/trial - merge - "
          f"fitness (sampler, storage, cleanup); ratio = trials/min ÷ the baseline's in the same regime "
          f"(w/o 1st: both without their first trial's merge and fitness, the steady state); "
          f"best ppl = lowest search-split perplexity after N (after the row's trials for the "
          f"baseline's time); load1 = 1-minute load average at the row's "
          f"start (at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    print(format_table(groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
