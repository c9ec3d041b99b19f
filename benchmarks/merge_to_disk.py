"""Benchmark ``evomerge merge`` against ``mergekit-yaml``, both writing a merged model to disk.

What it measures, for each merge method (ties, task_arithmetic, slerp by default):

* wall time of the whole command-line run (interpreter start-up, imports, reading the
  inputs, merging, writing the output), median over ``--repeats`` runs;
* peak resident memory of the child process, max over the runs: the kernel's high-water
  mark reported by ``/usr/bin/time`` (exact, nothing missed between samples) when it is
  installed, else the summed RSS of the process tree polled every 20 ms with psutil.
  RSS counts the memory-mapped pages of the input files that a tool has touched, for
  both tools alike;
* correctness: after the first run of each tool, both outputs are loaded (all shards)
  and the largest absolute element-wise difference is reported as ``max |Δ|``.

Both tools get the same YAML config (absolute model paths, ``dtype`` equal to the
models' dtype) and the same synthetic Llama family (``evomerge.zoo.synthetic.build_family``:
a random base and three fine-tune-like variants), built once into a cache folder. The
two tools run interleaved, alternating which goes first on each repeat (A B, B A, ...),
so that drift (thermal, page cache, background load) hits both equally. All inputs are
read once before timing so that neither tool pays for a cold page cache.

Run with the project's virtual environment active (paths below are from the repository root)::

    python benchmarks/merge_to_disk.py                                 # 100M params, bf16
    python benchmarks/merge_to_disk.py --size small --repeats 1        # quick smoke run
    python benchmarks/merge_to_disk.py --dtype float32 --methods ties,slerp
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
import yaml

from evomerge.io import ModelFolder
from evomerge.zoo.synthetic import SIZES, build_family

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
METHODS = ("ties", "task_arithmetic", "slerp")
TOOLS = ("evomerge", "mergekit")
WEIGHTS = (0.5, 0.3, 0.2)  # on ft1, ft2, ft3
POLL_SECONDS = 0.02
TIME_BIN = "/usr/bin/time"
REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark `evomerge merge` against `mergekit-yaml` writing to disk.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="dtype of the synthetic models and of the merge (config `dtype`)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs per method and tool (median time, max peak RSS)")
    parser.add_argument("--size", choices=sorted(SIZES), default="100m",
                        help="synthetic model size (see evomerge.zoo.synthetic.SIZES)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the model family is built and reused "
                             "[default: <repo>/.cache/bench/llama-<size>-<dtype>]")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.cache_dir is None:
        args.cache_dir = REPO_ROOT / ".cache" / "bench" / f"llama-{args.size}-{args.dtype}"
    args.cache_dir = args.cache_dir.absolute()
    return args


def ensure_family(cache_dir: Path, size: str, dtype: torch.dtype) -> list[Path]:
    """Build base + ft1..ft3 under ``cache_dir`` unless already there; return their paths."""
    paths = [cache_dir / name for name in ("base", "ft1", "ft2", "ft3")]
    if all((p / "config.json").exists() for p in paths):
        print(f"reusing model family in {cache_dir}")
        if not (paths[0] / "tokenizer_config.json").exists():
            print("warning: the cached base has no tokenizer, so mergekit-yaml will try (and fail) "
                  "to load one with transformers; delete the cache folder to rebuild it")
        return paths
    print(f"building {size} llama family ({dtype}) in {cache_dir} ...", flush=True)
    start = time.perf_counter()
    paths = build_family(cache_dir, "llama", size=size, sources=3, dtype=dtype)
    print(f"built in {time.perf_counter() - start:.1f} s")
    return [Path(p).absolute() for p in paths]




def warm_page_cache(folders: list[Path]) -> None:
    """Read every input file once so that the first timed run does not pay for disk reads."""
    for folder in folders:
        for file in folder.iterdir():
            if file.is_file():
                with open(file, "rb") as handle:
                    while handle.read(1 << 24):
                        pass


def merge_configs(models: list[Path], dtype: str) -> dict[str, dict]:
    """One mergekit-format config per method; both tools read the same file."""
    base, fts = str(models[0]), [str(m) for m in models[1:]]
    weighted = [{"model": m, "parameters": {"weight": w}} for m, w in zip(fts, WEIGHTS)]
    return {
        "ties": {"merge_method": "ties", "base_model": base, "models": weighted,
                 "parameters": {"density": 0.5}, "dtype": dtype},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base,
                            "models": weighted, "dtype": dtype},
        "slerp": {"merge_method": "slerp", "base_model": base,
                  "models": [{"model": base}, {"model": fts[0]}],
                  "parameters": {"t": 0.5}, "dtype": dtype},
    }


def write_configs(config_dir: Path, configs: dict[str, dict]) -> dict[str, Path]:
    config_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for method, config in configs.items():
        paths[method] = config_dir / f"{method}.yml"
        paths[method].write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


def executable(name: str) -> str:
    """The console script from this interpreter's environment (else from PATH)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"error: `{name}` not found next to {sys.executable} or on PATH")
    return found


def tool_command(tool: str, config: Path, out_dir: Path) -> list[str]:
    if tool == "evomerge":
        return [executable("evomerge"), "merge", str(config), str(out_dir), "--force", "--quiet"]
    # mergekit-yaml keeps its defaults: CPU, no lazy unpickle (it only affects .bin
    # inputs), synchronous writes, torch's default thread count (as evomerge), 5B-parameter
    # shards (so both tools write one shard here), tokenizer copy on (with the family's
    # tokenizer.json + tokenizer_config.json it copies files, as evomerge does) and the
    # README model card on (a few KB). --quiet only turns off progress bars, matching
    # evomerge's --quiet. --allow-crimes is not passed: it only relaxes the architecture
    # check, and all inputs share one architecture.
    return [executable("mergekit-yaml"), str(config), str(out_dir), "--quiet"]


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float


@dataclass
class Failure(Exception):
    command: list[str]
    returncode: int
    stderr: str

    def __str__(self) -> str:
        tail = "\n".join(self.stderr.strip().splitlines()[-15:])
        return f"`{shlex.join(self.command)}` exited with {self.returncode}:\n{tail}"


def _poll_tree_rss(process: psutil.Process, stop: threading.Event, peak: list[int]) -> None:
    """Record the largest summed RSS of ``process`` and its descendants until ``stop``."""
    while not stop.is_set():
        try:
            members = [process] + process.children(recursive=True)
        except psutil.Error:
            break
        total = 0
        for member in members:
            try:
                total += member.memory_info().rss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total)
        stop.wait(POLL_SECONDS)


def run_measured(command: list[str]) -> Run:
    """Run ``command``; return its wall time and peak RSS (raises :class:`Failure`)."""
    use_time = os.access(TIME_BIN, os.X_OK)
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file, \
            tempfile.TemporaryFile("w+") as stderr:
        full = [TIME_BIN, "-f", "%M", "-o", rss_file.name, *command] if use_time else command
        peak, stop = [0], threading.Event()
        start = time.perf_counter()
        child = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=stderr)
        poller = None
        if not use_time:
            poller = threading.Thread(target=_poll_tree_rss,
                                      args=(psutil.Process(child.pid), stop, peak), daemon=True)
            poller.start()
        returncode = child.wait()
        seconds = time.perf_counter() - start
        stop.set()
        if poller is not None:
            poller.join()
        if returncode != 0:
            stderr.seek(0)
            raise Failure(command, returncode, stderr.read())
        if use_time:
            # GNU time appends "Command exited ..." lines on failure; the last line is %M (KiB)
            peak[0] = int(rss_file.read().strip().splitlines()[-1]) * 1024
    return Run(seconds, peak[0] / 2**20)




def compare_outputs(ours: Path, theirs: Path) -> tuple[float, str]:
    """Max |a - b| over all shared tensors (in float32), plus a note on any mismatch."""
    a, b = ModelFolder(ours).state_dict(), ModelFolder(theirs).state_dict()
    notes = []
    if a.keys() != b.keys():
        notes.append(f"{len(a.keys() - b.keys())} tensors only in evomerge's output, "
                     f"{len(b.keys() - a.keys())} only in mergekit's")
    worst, differing, elements = 0.0, 0, 0
    for name in sorted(a.keys() & b.keys()):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            notes.append(f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            continue
        if x.dtype != y.dtype:
            notes.append(f"{name}: dtype {x.dtype} vs {y.dtype}")
        diff = (x.float() - y.float()).abs()
        if diff.numel():
            worst = max(worst, float(diff.max()))
        differing += int((diff > 0).sum())
        elements += diff.numel()
    if differing:
        notes.append(f"{differing} of {elements} elements differ ({differing / elements:.2e})")
    return worst, "; ".join(notes)


# --------------------------------------------------------------------------- the benchmark


@dataclass
class Result:
    runs: dict[str, list[Run]] = field(default_factory=lambda: {t: [] for t in TOOLS})
    max_diff: float | None = None
    note: str = ""
    error: str = ""


def benchmark(methods: list[str], configs: dict[str, Path], work_dir: Path,
              repeats: int) -> dict[str, Result]:
    results = {method: Result() for method in methods}
    for repeat in range(repeats):
        order = TOOLS if repeat % 2 == 0 else TOOLS[::-1]
        for method in methods:
            result = results[method]
            if result.error:
                continue
            outs = {tool: work_dir / f"{method}-{tool}" for tool in TOOLS}
            try:
                for tool in order:
                    shutil.rmtree(outs[tool], ignore_errors=True)
                    run = run_measured(tool_command(tool, configs[method], outs[tool]))
                    result.runs[tool].append(run)
                    print(f"  repeat {repeat + 1}/{repeats} {method:<16} {tool:<8} "
                          f"{run.seconds:7.2f} s {run.peak_rss_mb:8.0f} MB", flush=True)
                if result.max_diff is None:
                    result.max_diff, result.note = compare_outputs(outs["evomerge"],
                                                                   outs["mergekit"])
            except Failure as failure:
                result.error = str(failure)
                print(f"  {method}: FAILED\n{failure}", flush=True)
            finally:
                for out in outs.values():
                    shutil.rmtree(out, ignore_errors=True)
    return results


def format_table(results: dict[str, Result]) -> str:
    header = ("method", "evomerge s", "mergekit s", "speedup", "evomerge peak RSS MB",
              "mergekit peak RSS MB", "max |Δ|")
    rows = [header]
    for method, result in results.items():
        ours, theirs = result.runs["evomerge"], result.runs["mergekit"]
        ours_s = statistics.median(r.seconds for r in ours) if ours else None
        theirs_s = statistics.median(r.seconds for r in theirs) if theirs else None
        rows.append((
            method,
            f"{ours_s:.2f}" if ours_s is not None else "FAIL",
            f"{theirs_s:.2f}" if theirs_s is not None else "FAIL",
            f"{theirs_s / ours_s:.2f}x" if ours_s and theirs_s else "-",
            f"{max(r.peak_rss_mb for r in ours):.0f}" if ours else "-",
            f"{max(r.peak_rss_mb for r in theirs):.0f}" if theirs else "-",
            f"{result.max_diff:.3g}" if result.max_diff is not None else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append(" | ".join(cells))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    print("command: " + shlex.join([Path(sys.executable).name, *sys.argv]))
    models = ensure_family(args.cache_dir, args.size, dtype)
    params = ModelFolder(models[0]).num_parameters()
    print(f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"python {platform.python_version()}, torch {torch.__version__}, dtype {args.dtype}, "
          f"llama-{args.size} with {params:,} parameters ({params / 1e6:.1f}M), "
          f"peak RSS via {'/usr/bin/time' if os.access(TIME_BIN, os.X_OK) else 'psutil polling'}")
    configs = write_configs(args.cache_dir / "configs",
                            {m: c for m, c in merge_configs(models, args.dtype).items()
                             if m in args.methods})
    warm_page_cache(models)
    work_dir = args.cache_dir / "out"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    try:
        results = benchmark(args.methods, configs, work_dir, args.repeats)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print()
    print(f"median wall time over {args.repeats} run(s), speedup = mergekit s / evomerge s, "
          f"peak RSS = max over runs, max |Δ| = largest |evomerge - mergekit| element")
    print(format_table(results))
    notes = [f"  {m}: {r.note}" for m, r in results.items() if r.note]
    if notes:
        print("notes:\n" + "\n".join(notes))
    return 1 if any(r.error for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
