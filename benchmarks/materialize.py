"""Benchmark the in-memory materializer against mergekit's path, per search candidate.

A search evaluates many candidates over the same models. What one candidate costs:

* **evomerge**: ``Materializer.apply(config)`` writes the merge into the live model in
  place (plan building included). The first apply of a method also builds its caches
  (magnitude positions, random words) and grows the scratch workspace; it is reported
  separately. The per-candidate time is the median over ``--repeats`` further applies,
  each with different weights (or ``t``, or stacked source) so nothing is trivially reused.
* **mergekit**: what an evaluator that goes through disk pays: in-process
  ``mergekit.merge.run_merge`` (mergekit 0.1.5's in-memory ``plan_in_memory`` raises a
  TypeError, so this is its in-process path) on the same device, then
  ``AutoModelForCausalLM.from_pretrained`` of the output onto the device (every page
  touched, as a first forward pass would); median over ``--mergekit-repeats`` runs, merge
  and reload shown apart.
* **copy**: copying one model's parameters device-to-device into existing tensors (the
  device's copy bandwidth); ``× copy`` = apply / copy.
* **floor**: a plain copy of the bytes the merge must read and write, as the materializer
  issue defines it: a method that reads ``n`` models (base + 3 sources for the
  task-arithmetic family and model_stock, base + 1 for slerp, 1 for a layer stack) and
  writes one moves ``(n + 1) / 2`` times a one-model copy's bytes, so its floor is
  ``copy · (n + 1) / 2``; ``× floor`` = apply / floor. Caches (magnitude positions, random
  words) are the materializer's choice and not counted as bytes the merge must read.
* **peak memory**: on CPU, the process's resident-set high-water mark during the method's
  applies (first one included; ``/proc/self/clear_refs`` resets it before each method)
  minus the memory-mapped file pages still mapped and minus the process's memory before
  the materializer was built; on CUDA, ``torch.cuda.max_memory_allocated``. Compared with
  ``Materializer.bound``: resident + live + scratch + the caches built so far (+ the
  per-tensor transient of building one or trimming without one). CPU peaks include what
  the C allocator keeps of freed temporaries.
* **row blocks** (``--block-limit N``): after the main run, the methods again on pairs of
  materializers told them (``methods=``): one merging every tensor whole, one merging each
  tensor above ``N`` elements in row blocks (:mod:`evomerge.methods.blocked`, which use no trim
  caches), once cache-free (``trim_cache="off"``: only the blocking differs) and once with the
  caches that fit (``auto``: the whole one keeps them on every tensor), in the same run:
  per-candidate times, their ratio, and each one's peak against its bound.
* **cache vs cache-free** (``--trim-cache``): after the main run, the trimming methods again
  on a materializer built with ``trim_cache="off"`` (exact cuts and recomputed random words,
  no per-source cache), in the same run; the table gives both per-candidate times, their
  ratio against the cached anchor, and each one's peak against its bound.

Synthetic Llama family (``evomerge.zoo.synthetic.build_family``, base + ft1..ft3) built once
under ``.cache/bench``. The load average (1 min) is printed with every row: on a shared
machine, timings move with it, and with other busy processes two torch threads stall at
every parallel op (several times slower, for both tools); ``--threads 1`` is steadier.
Run from the repository root with the venv active::

    python benchmarks/materialize.py                           # 100M params, float32, CPU
    python benchmarks/materialize.py --threads 1 --dtype bfloat16
    python benchmarks/materialize.py --methods ties,task_arithmetic --repeats 5
    python benchmarks/materialize.py --device cuda --size tinyllama   # bfloat16 on CUDA
    python benchmarks/materialize.py --threads 1 --methods ties,dare_ties --trim-cache --mergekit-repeats 0
    python benchmarks/materialize.py --real runs/real --methods task_arithmetic,ties,dare_ties
    python benchmarks/materialize.py --threads 1 --methods task_arithmetic,ties --mergekit-repeats 0 \
        --tiers device,mmap --resident-dtype bfloat16
    python benchmarks/materialize.py --threads 1 --methods task_arithmetic,ties --mergekit-repeats 0 \
        --repeats 2 --block-limit 524288

``--tiers device,host,mmap``: after the main run, the same candidates on materializers with every
input forced into one tier (:mod:`evomerge.live.tiers`: on the device, in pinned host memory (CUDA
only), or read from the memory-mapped files per candidate), in the same run: per-candidate time,
peak against each plan's bound, and the plan's transfer per candidate. ``--resident-dtype bfloat16``:
the error of keeping the inputs in bfloat16 under float32 merges, per method: the max absolute and
the relative (‖Δ‖/‖W‖ over all weights) error of the merged weights against full-precision inputs,
and the change of a fitness (the mean next-token NLL of the live model on fixed random tokens).

``--real DIR``: the real-model example instead (``evomerge zoo --real``: SmolLM2-135M-Instruct and
three LoRA adapters), measured three ways in one run: the materializer with the adapters kept
low-rank (**LoRA-native**), the same materializer over their dense equivalents (PEFT's
``merge_and_unload`` saved as full folders under ``--cache-dir`` once: **dense**), and mergekit's
``run_merge`` of the same configs with mergekit's ``BASE+ADAPTER`` sources, plus the reload.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from merge_to_disk import ensure_family, warm_page_cache

from evomerge import parse_config
from evomerge.live.materializer import Materializer
from evomerge.live.tiers import TIERS
from evomerge.methods import get_method
from evomerge.zoo.synthetic import SIZES

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
METHODS = ("task_arithmetic", "ties", "breadcrumbs_ties", "dare_ties", "della", "slerp", "model_stock",
           "passthrough")
MODELS_READ = {"task_arithmetic": 4, "ties": 4, "breadcrumbs_ties": 4, "dare_ties": 4, "della": 4, "slerp": 2,
               "model_stock": 4, "passthrough": 1}  # models a candidate's merge reads (below): its floor's bytes
WEIGHTS = (0.5, 0.3, 0.2)  # on ft1, ft2, ft3
REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark Materializer.apply against mergekit's merge + reload, per candidate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="100m", help="synthetic llama size")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model and merge dtype [default: float32 on CPU, bfloat16 on CUDA]")
    parser.add_argument("--repeats", type=int, default=3, help="timed applies per method (median)")
    parser.add_argument("--mergekit-repeats", type=int, default=1,
                        help="timed mergekit runs per method (0: mergekit not run)")
    parser.add_argument("--trim-cache", action="store_true",
                        help="also time the trimming methods cache-free (trim_cache=off) against the cached run")
    parser.add_argument("--block-limit", type=int, default=None,
                        help="also time the methods merged whole against in row blocks of this many elements")
    parser.add_argument("--tiers", default="",
                        help="also time the methods with every input in each of these tiers (device,host,mmap)")
    parser.add_argument("--resident-dtype", choices=sorted(DTYPES), default=None,
                        help="also measure the error of keeping the inputs in this dtype (e.g. bfloat16)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--seed", type=int, default=0, help="random-mask seed (fixed, as in a search)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both tools [default: torch's default]")
    parser.add_argument("--real", type=Path, default=None,
                        help="the real-model example's folder (evomerge zoo --real): LoRA-native vs dense vs mergekit")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the family is built and reused "
                             "[default: <repo>/.cache/bench/llama-<size>-<dtype>]")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    args.tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    if set(args.tiers) - set(TIERS):
        parser.error(f"--tiers: choose from {','.join(TIERS)}")
    if args.repeats < 1 or args.mergekit_repeats < 0:
        parser.error("--repeats must be at least 1, --mergekit-repeats at least 0")
    if args.block_limit is not None and args.block_limit < 1:
        parser.error("--block-limit must be a positive number of elements")
    args.device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    default_dir = REPO_ROOT / ".cache" / "bench" / (f"real-dense-{args.dtype}" if args.real
                                                    else f"llama-{args.size}-{args.dtype}")
    args.cache_dir = (args.cache_dir or default_dir).absolute()
    return args


def candidate(method: str, models: list[Path], layers: int, repeat: int, dtype: str) -> dict:
    """Candidate ``repeat`` of ``method`` (mergekit format): different numbers each repeat."""
    base, fts = str(models[0]), [str(m) for m in models[1:]]
    scale = 1 + 0.1 * repeat
    weighted = [{"model": m, "parameters": {"weight": w * scale}} for m, w in zip(fts, WEIGHTS)]
    configs = {
        "task_arithmetic": {"models": weighted, "base_model": base},
        "ties": {"models": weighted, "base_model": base, "parameters": {"density": 0.5}},
        "breadcrumbs_ties": {"models": weighted, "base_model": base, "parameters": {"density": 0.5, "gamma": 0.01}},
        "dare_ties": {"models": weighted, "base_model": base, "parameters": {"density": 0.5}},
        "della": {"models": weighted, "base_model": base, "parameters": {"density": 0.5, "epsilon": 0.1}},
        "slerp": {"models": [{"model": base}, {"model": fts[0]}], "base_model": base,
                  "parameters": {"t": (0.3 + 0.1 * repeat) % 1}},
        "model_stock": {"models": [{"model": m} for m in fts], "base_model": base},
        # base's layers, then the top half of a fine-tune's: a 1.5× deeper model
        "passthrough": {"slices": [
            {"sources": [{"model": base, "layer_range": [0, layers]}]},
            {"sources": [{"model": fts[repeat % len(fts)], "layer_range": [layers // 2, layers]}]}]},
    }
    return {"merge_method": method, **configs[method], "dtype": dtype}


# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    function()
    sync(device)
    return time.perf_counter() - start


def load() -> float:
    return os.getloadavg()[0]


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


class PeakMemory:
    """Peak bytes above a baseline: CUDA allocations, or the process's anonymous resident set."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = self._current()

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return (_status_kb("VmRSS") - _status_kb("RssFile")) * 1024

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return (_status_kb("VmHWM") - _status_kb("RssFile")) * 1024 - self.baseline


def touch(model: torch.nn.Module) -> None:
    """Read one element per 4 KiB page of every parameter: ``from_pretrained`` may map the
    files lazily, and an evaluator pays for the page-ins on its first forward pass."""
    for parameter in model.parameters():
        parameter.view(-1)[::4096 // parameter.element_size()].sum()


def copy_time(model: torch.nn.Module, device: torch.device, repeats: int) -> float:
    """Median seconds to copy one model's parameters into existing tensors on ``device``."""
    targets = list(model.parameters())
    sources = [p.detach().clone() for p in targets]

    def copy() -> None:
        for target, source in zip(targets, sources):
            target.copy_(source)
    copy()
    return statistics.median(timed(copy, device) for _ in range(repeats))


@dataclass
class Row:
    first: float = 0.0
    applies: list[float] = field(default_factory=list)
    peak: int = 0
    bound: int = 0
    merges: list[float] = field(default_factory=list)
    reloads: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    error: str = ""


def bench_evomerge(materializer: Materializer, methods: list[str], models: list[Path], layers: int,
                   args: argparse.Namespace, memory: PeakMemory) -> dict[str, Row]:
    rows, built = {}, set()
    bound = materializer.bound
    for method in methods:
        row = rows[method] = Row()
        configs = [parse_config(yaml.safe_dump(candidate(method, models, layers, r, args.dtype)))
                   for r in range(args.repeats + 1)]
        memory.reset()
        seconds = [timed(lambda c=config: materializer.apply(c, seed=args.seed), args.device)
                   for config in configs]
        row.first, row.applies = seconds[0], seconds[1:]
        row.peak = memory.peak()
        sparsify = get_method(method).sparsify
        built.update(sparsify.caches if sparsify else ())
        row.bound = (bound.resident + bound.staging + bound.live + bound.scratch + bound.transient
                     + bound.cache_free + bound.per_cache * len(built & set(bound.cached)))
        row.loads.append(load())
        print(f"  evomerge {method:<16} first {row.first:7.2f} s, then "
              f"{' '.join(f'{s:.3f}' for s in row.applies)} s  (load {row.loads[-1]:.1f})", flush=True)
    return rows


def bench_mergekit(rows: dict[str, Row], models: list[Path], layers: int,
                   args: argparse.Namespace) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    options = MergeOptions(device=str(args.device), quiet=True,  # BASE+ADAPTER sources are merged into here
                           lora_merge_cache=str(args.cache_dir / "mergekit-lora-cache"))
    for method, row in rows.items():
        for repeat in range(args.mergekit_repeats):
            config = MergeConfiguration.model_validate(candidate(method, models, layers, repeat + 1,
                                                                 args.dtype))
            out_dir = Path(tempfile.mkdtemp(prefix=f"mergekit-{method}-"))

            def merge(config=config, out_dir=out_dir) -> None:
                run_merge(config, str(out_dir), options)

            def reload(out_dir=out_dir) -> None:
                touch(AutoModelForCausalLM.from_pretrained(out_dir, dtype=DTYPES[args.dtype]).to(args.device))
            try:
                row.merges.append(timed(merge, args.device))
                row.reloads.append(timed(reload, args.device))
            except Exception as error:  # report and go on with the other methods
                row.error = f"{type(error).__name__}: {error}".splitlines()[0]
                break
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)
        row.loads.append(load())
        print(f"  mergekit {method:<16} merge {' '.join(f'{s:.2f}' for s in row.merges)} s, reload "
              f"{' '.join(f'{s:.2f}' for s in row.reloads)} s  (load {row.loads[-1]:.1f})"
              + (f"  FAILED: {row.error}" if row.error else ""), flush=True)


# --------------------------------------------------------------------------- report


def floor(method: str, copy: float) -> float:
    """The time of a plain copy of the bytes ``method`` must read (``MODELS_READ``) and write (one model)."""
    return copy * (MODELS_READ[method] + 1) / 2


def render(table: list[tuple[str, ...]]) -> str:
    """Rows of cells (the first: the header) as aligned text, the first column left-aligned."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for i, cells in enumerate(table):
        lines.append(" | ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(rows: dict[str, Row], copy: float) -> str:
    header = ("method", "first apply s", "apply s", "mergekit merge s", "reload s", "mergekit total s",
              "mergekit/apply", "floor s", "× floor", "× copy", "peak GB", "bound GB", "load")
    table = [header]
    for method, row in rows.items():
        apply = statistics.median(row.applies)
        merge = statistics.median(row.merges) if row.merges else None
        reload = statistics.median(row.reloads) if row.reloads else None
        total = merge + reload if merge is not None and reload is not None else None
        table.append((
            method, f"{row.first:.2f}", f"{apply:.3f}",
            f"{merge:.2f}" if merge is not None else "FAIL" if row.error else "-",
            f"{reload:.2f}" if reload is not None else "-",
            f"{total:.2f}" if total is not None else "-",
            f"{total / apply:.0f}x" if total is not None else "-",
            f"{floor(method, copy):.3f}", f"{apply / floor(method, copy):.1f}", f"{apply / copy:.1f}",
            f"{row.peak / 1e9:.2f}", f"{row.bound / 1e9:.2f}",
            "/".join(f"{x:.1f}" for x in row.loads)))
    return render(table)


def format_trim_table(cached: dict[str, Row], free: dict[str, Row]) -> str:
    header = ("method", "cached apply s", "cache-free apply s", "ratio", "cached peak/bound GB",
              "cache-free peak/bound GB", "first apply s cached/free")
    table = [header]
    for method, row in free.items():
        anchor, apply = statistics.median(cached[method].applies), statistics.median(row.applies)
        table.append((method, f"{anchor:.3f}", f"{apply:.3f}", f"{apply / anchor:.2f}x",
                      f"{cached[method].peak / 1e9:.2f}/{cached[method].bound / 1e9:.2f}",
                      f"{row.peak / 1e9:.2f}/{row.bound / 1e9:.2f}",
                      f"{cached[method].first:.2f}/{row.first:.2f}"))
    return render(table)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def dense_twins(base: Path, adapters: list[Path], out_dir: Path, dtype: torch.dtype) -> list[Path]:
    """Each adapter merged into the base by PEFT (``merge_and_unload``), saved once under ``out_dir``
    with every tensor the base stores (``save_pretrained`` would leave out a tied head)."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = []
    for adapter in adapters:
        folder = out_dir / adapter.name
        if not (folder / "model.safetensors").is_file():
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)
            merged = model.merge_and_unload()
            folder.mkdir(parents=True, exist_ok=True)
            merged.config.save_pretrained(folder)
            AutoTokenizer.from_pretrained(base).save_pretrained(folder)
            save_file({name: tensor.detach().clone().contiguous() for name, tensor in merged.state_dict().items()},
                      folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    return folders


def main_real(args: argparse.Namespace) -> int:
    """LoRA-native vs dense materializer vs mergekit on the real-model example (``--real``)."""
    import json

    base = args.real.absolute() / "base"
    skills = json.loads((args.real / "zoo.json").read_text())["skills"]
    adapters = [args.real.absolute() / skill for skill in skills]
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    dense = dense_twins(base, adapters, args.cache_dir, DTYPES[args.dtype])
    variants = {"LoRA-native": [base, *adapters], "dense": [base, *dense]}
    warm_page_cache([base, *dense])
    import transformers.models.llama.modeling_llama  # noqa: F401  (not counted as the materializer's)
    tables, copy = {}, None
    for label, models in variants.items():
        memory = PeakMemory(args.device)
        start = time.perf_counter()
        materializer = Materializer(models[0], models[1:], device=args.device, dtype=DTYPES[args.dtype])
        built = time.perf_counter() - start
        print(f"{label}: materializer built in {built:.1f} s, bound {materializer.bound.total / 1e9:.2f} GB; "
              f"{describe_device(args.device)}, torch {torch.__version__}; load average {load():.1f}", flush=True)
        copy = copy if copy is not None else copy_time(materializer.model, args.device, args.repeats)
        tables[label] = bench_evomerge(materializer, args.methods, models, layers, args, memory)
        del materializer
    bench_mergekit(tables["LoRA-native"], [base, *(f"{base}+{adapter}" for adapter in adapters)], layers, args)
    print(f"\napply = median of {args.repeats} candidates after the first; mergekit = median of "
          f"{args.mergekit_repeats} run(s) of run_merge (BASE+ADAPTER sources) + from_pretrained; "
          f"copy (one model) {copy:.3f} s; peak = above the process before loading")
    for label, rows in tables.items():
        note = " (mergekit columns: the same configs through mergekit)" if label == "LoRA-native" else ""
        print(f"\n{label}{note}")
        print(format_table(rows, copy))
    return 1 if any(row.error for row in tables["LoRA-native"].values()) else 0


def bench_blocks(models: list[Path], layers: int, args: argparse.Namespace) -> str:
    """The methods merged whole and in row blocks of ``--block-limit`` elements, cache-free and with
    the caches that fit: the table."""
    table = [("method", "trim_cache", "whole apply s", "blocked apply s", "blocked / whole", "whole peak/bound GB",
              "blocked peak/bound GB", "load")]
    for trim_cache in ("off", "auto"):
        rows = {}
        for label, limit in (("whole", 10**15), ("blocked", args.block_limit)):
            memory = PeakMemory(args.device)
            materializer = Materializer(models[0], models[1:], device=args.device, dtype=DTYPES[args.dtype],
                                        trim_cache=trim_cache, methods=args.methods, block_limit=limit)
            print(f"  {label}, trim_cache {trim_cache}: {materializer.memory_plan.summary()}")
            rows[label] = bench_evomerge(materializer, args.methods, models, layers, args, memory)
            del materializer
        for method in args.methods:
            whole, blocked = rows["whole"][method], rows["blocked"][method]
            ratio = statistics.median(blocked.applies) / statistics.median(whole.applies)
            table.append((method, trim_cache, f"{statistics.median(whole.applies):.3f}",
                          f"{statistics.median(blocked.applies):.3f}", f"{ratio:.2f}",
                          f"{whole.peak / 1e9:.2f}/{whole.bound / 1e9:.2f}",
                          f"{blocked.peak / 1e9:.2f}/{blocked.bound / 1e9:.2f}", f"{blocked.loads[-1]:.1f}"))
    return render(table)


def bench_tiers(models: list[Path], layers: int, args: argparse.Namespace) -> str:
    """The methods on one materializer per forced tier (``--tiers``): the table."""
    table = [("tier", "method", "first apply s", "apply s", "peak GB", "bound GB", "host GB",
              "host→device GB/cand.", "files GB/cand.", "load")]
    for tier in args.tiers:
        if tier == "host" and args.device.type != "cuda":
            print(f"  tier host: skipped on {args.device} (host memory is the device tier)")
            continue
        memory = PeakMemory(args.device)
        materializer = Materializer(models[0], models[1:], device=args.device, dtype=DTYPES[args.dtype], tier=tier)
        plan = materializer.memory_plan
        print(f"  tier {tier}: {plan.summary()}")
        moved, read = plan.transfer()
        for method, row in bench_evomerge(materializer, args.methods, models, layers, args, memory).items():
            table.append((tier, method, f"{row.first:.2f}", f"{statistics.median(row.applies):.3f}",
                          f"{row.peak / 1e9:.2f}", f"{row.bound / 1e9:.2f}",
                          f"{(plan.host + plan.host_staging) / 1e9:.2f}", f"{moved / 1e9:.2f}", f"{read / 1e9:.2f}",
                          f"{row.loads[-1]:.1f}"))
        del materializer
    return render(table)


def fitness_nll(model: torch.nn.Module, device: torch.device) -> float:
    """The mean next-token NLL of ``model`` on 4 × 128 fixed random tokens (a fitness the rounding moves)."""
    tokens = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float(model(tokens.to(device), labels=tokens.to(device)).loss)


def bench_resident_dtype(models: list[Path], layers: int, args: argparse.Namespace) -> str:
    """The error of ``--resident-dtype`` residency against full-precision inputs, per method: the table."""
    low_dtype = DTYPES[args.resident_dtype]
    outcomes: dict[str, list] = {}
    for resident in (None, low_dtype):
        materializer = Materializer(models[0], models[1:], device=args.device, dtype=DTYPES[args.dtype],
                                    resident_dtype=resident)
        for method in args.methods:
            config = parse_config(yaml.safe_dump(candidate(method, models, layers, 1, args.dtype)))
            materializer.apply(config, seed=args.seed)
            weights = {name: tensor.detach().to("cpu", torch.float64, copy=True)
                       for name, tensor in materializer.state_dict().items()}
            outcomes.setdefault(method, []).append((weights, fitness_nll(materializer.model, args.device)))
        del materializer
    table = [("method", "max |Δw|", "‖Δw‖/‖w‖", "max |Δw|/max |w|", "NLL full", f"NLL {args.resident_dtype}",
              "|ΔNLL|")]
    for method, ((exact, nll), (low, low_nll)) in outcomes.items():
        worst = max(float((low[n] - w).abs().max()) for n, w in exact.items())
        largest = max(float(w.abs().max()) for w in exact.values())
        norm = sum(float((low[n] - w).square().sum()) for n, w in exact.items()) ** 0.5
        total = sum(float(w.square().sum()) for w in exact.values()) ** 0.5
        table.append((method, f"{worst:.3g}", f"{norm / total:.3g}", f"{worst / largest:.3g}", f"{nll:.5f}",
                      f"{low_nll:.5f}", f"{abs(low_nll - nll):.2g}"))
    return render(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command: " + shlex.join([Path(sys.executable).name, *sys.argv]))
    if args.real:
        return main_real(args)
    models = ensure_family(args.cache_dir, args.size, DTYPES[args.dtype])
    warm_page_cache(models)
    layers = SIZES[args.size][1]
    import transformers.models.llama.modeling_llama  # noqa: F401  (not counted as the materializer's)
    memory = PeakMemory(args.device)
    start = time.perf_counter()
    materializer = Materializer(models[0], models[1:], device=args.device, dtype=DTYPES[args.dtype],
                                trim_cache="on" if args.trim_cache else "auto")
    sync(args.device)
    built = time.perf_counter() - start
    params = sum(p.numel() for p in materializer.model.parameters())
    print(f"machine: {describe_device(args.device)}, python {platform.python_version()}, torch "
          f"{torch.__version__}, llama-{args.size} ({params / 1e6:.1f}M parameters) in {args.dtype} on "
          f"{args.device}; materializer built in {built:.1f} s; load average {load():.1f}")
    copy = copy_time(materializer.model, args.device, args.repeats)
    rows = bench_evomerge(materializer, args.methods, models, layers, args, memory)
    del materializer
    free_rows = {}
    if args.trim_cache:
        trimming = [m for m in args.methods if get_method(m).sparsify is not None]
        memory = PeakMemory(args.device)
        free = Materializer(models[0], models[1:], device=args.device, dtype=DTYPES[args.dtype], trim_cache="off")
        print(f"  cache-free materializer: bound {free.bound.total / 1e9:.2f} GB")
        free_rows = bench_evomerge(free, trimming, models, layers, args, memory)
        del free
    block_table = bench_blocks(models, layers, args) if args.block_limit else None
    tier_table = bench_tiers(models, layers, args) if args.tiers else None
    error_table = bench_resident_dtype(models, layers, args) if args.resident_dtype else None
    bench_mergekit(rows, models, layers, args)
    print()
    print(f"apply = median of {args.repeats} candidates after the first; mergekit = median of "
          f"{args.mergekit_repeats} run(s) of run_merge + from_pretrained onto {args.device}; "
          f"copy (one model) {copy:.3f} s; floor = copy · (models read + 1) / 2; "
          f"peak = above the process before loading; "
          f"load = 1-min load average after evomerge / after mergekit")
    print(format_table(rows, copy))
    if free_rows:
        print()
        print("cache vs cache-free (trim_cache on / off, this run): apply = median per candidate; "
              "ratio = cache-free / cached")
        print(format_trim_table(rows, free_rows))
    if block_table:
        print()
        print(f"row blocks (this run): apply = median per candidate; every tensor whole vs the tensors above "
              f"{args.block_limit:,} elements in row blocks (no trim caches on them); peak against each plan's bound")
        print(block_table)
    if tier_table:
        print()
        print("forced tiers (this run): apply = median per candidate; peak against the plan's bound (device memory); "
              "host = pinned host memory; transfer = what a candidate reading every input moves")
        print(tier_table)
    if error_table:
        print()
        print(f"resident_dtype {args.resident_dtype} vs full-precision inputs ({args.dtype} merges, candidate 1 of "
              f"each method): merged-weight error and fitness (mean NLL on fixed random tokens) change")
        print(error_table)
    return 1 if any(row.error for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
