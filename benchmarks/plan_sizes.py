"""The materializer's memory plans for Llama-3-8B × 3 sources and Llama-3-70B × 2 sources, from
header-only fake checkpoints (nothing is downloaded, nothing of the models' size is written).

Each model is an HF-style folder: ``config.json`` of the real shapes and safetensors shards of
at most 5 GB with their index, as the real checkpoints, whose headers list every tensor with its
real name, shape and dtype (bfloat16) and whose data regions are *sparse* holes: the header is
written, then the file is truncated up to its full size, so the ~490 GB of checkpoints take about
1 MB of disk (checked with ``st_blocks``, what ``du`` reports). Every scenario of
:data:`SCENARIOS` is written as an experiment file and planned by
:func:`evomerge.cli.commands.memory_plan`, the function ``evomerge inspect --plan-memory
EXPERIMENT`` prints: it opens the headers only (a CUDA plan needs no GPU when ``max_memory`` is
given), which the script checks by the process's resident set staying far below one model's size.
The planner is told the search's method (the experiment's search space): a task-arithmetic
search is charged no trim terms, and both methods merge in row blocks (the default block limit:
the largest layer matrix, so that the embedding and the head split). Per scenario it prints the
plan's report (or the one-line refusal of a plan that cannot work), then a table of all of them
with a per-candidate time projected from the constants below (see docs/memory_plans.md for where
they come from)::

    python benchmarks/plan_sizes.py                  # every scenario: reports, then the table
    python benchmarks/plan_sizes.py --table          # the table only
    python benchmarks/plan_sizes.py --only 8b        # scenarios whose id contains "8b"
    python benchmarks/plan_sizes.py --keep DIR       # write the folders and experiments into DIR
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from evomerge.cli.commands import memory_plan
from evomerge.errors import EvomergeError
from evomerge.live.tiers import TierPlan

GiB = 2**30
SHARD = 5 * 10**9  # bytes per safetensors shard at most, as the real checkpoints (save_pretrained's 5GB)

# the real models' shapes (Meta's config.json of Meta-Llama-3-8B and Meta-Llama-3-70B)
SHAPES = {
    "llama3-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "llama3-70b": {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256},
}
FAMILIES = {"8b": ("llama3-8b", 3), "70b": ("llama3-70b", 2)}  # id: (shape, sources)

@dataclass(frozen=True)
class Machine:
    device: str
    max_memory: str  # the experiment's max_memory (what the device, or on CPU the RAM, gives the materializer)
    max_host_memory: str | None  # CUDA: the pinned-host budget
    ram: int  # GiB of host RAM (what the page cache can use is what the plan leaves of it)
    bandwidth: tuple[float, float]  # the kernels' memory bandwidth, bytes/s (low, high)
    label: str


MACHINES = {
    "gpu80": Machine("cuda", "72GiB", "200GiB", 256, (2.0e12, 3.35e12),
                     "one 80 GB GPU (A100/H100 80GB), 256 GiB host"),
    "gpu24": Machine("cuda", "20GiB", "100GiB", 128, (0.94e12, 1.01e12),
                     "one 24 GB GPU (RTX 3090/4090), 128 GiB host"),
    "cpu256": Machine("cpu", "224GiB", None, 256, (0, 0), "CPU only, 256 GiB RAM"),
    "cpu64": Machine("cpu", "56GiB", None, 64, (0, 0), "CPU only, 64 GiB RAM"),
}
# precision: (dtype, resident_dtype)
PRECISIONS = {"bf16": ("bfloat16", None), "fp32": ("float32", None), "fp32-bf16in": ("float32", "bfloat16")}

# the search's method (the experiment's search space), which the planner is told: id: method
SEARCHES = {"ta": "task_arithmetic", "ties": "ties"}
# The scenarios: (id, family, machine, precision, search)
SCENARIOS = [(f"{family}-{machine}-{precision}-{search}", family, machine, precision, search)
             for family in FAMILIES for machine in MACHINES for precision in PRECISIONS for search in SEARCHES]

# Projection constants (see docs/memory_plans.md for their sources)
PCIE = 25e9  # PCIe 4.0 x16 host→device, pinned, sustained
NVME = (3e9, 7e9)  # NVMe sequential read (PCIe 3.0 .. 4.0 drives): files not in the page cache
# files in the page cache: benchmarks.md tiers table, task arithmetic mmap − device: 1.99 GB in 0.14 s
PAGE_CACHED = 14e9
OS_SHARE = 1 / 8  # of the RAM, left to the OS and the rest of the process before the page cache
# docs/benchmarks.md, 124.7M-parameter family, base + 3 sources, float32 merges, one thread, 2-core
# machine: seconds per candidate (TIES cache-free: the cache-free / cached ratio 2.34 of the
# trims-without-caches table applied to the idle-machine cached time; the first TIES candidate:
# the search table's 11.0-11.6 s); scaled by parameters / 124.7M and by (K + 1) / 4 models read
CPU_PARAMS = 124.7e6
CPU_SECONDS = {"task_arithmetic": 0.273, "ties": 0.891, "ties cache-free": 0.891 * 2.34, "ties first": 11.3}
# bfloat16 merges on CPU against float32 ones: measured here, 5.5M family, one thread, load 2.2
# (`benchmarks/materialize.py --size small --threads 1 --dtype D --methods task_arithmetic,ties
# --repeats 5 --mergekit-repeats 0`): task arithmetic 0.029 / 0.021 s, TIES 0.094 / 0.051 s
CPU_BF16 = {"task_arithmetic": 1.4, "ties": 1.8, "ties cache-free": 1.8, "ties first": 1.0}
# GPU kernels: the method's time as a multiple of a one-model copy (benchmarks.md "× copy": the
# passes over memory the kernels make), the copy being 2·N·s bytes at the device's bandwidth
COPY_MULTIPLE = {"task_arithmetic": 6.8, "ties": 22.3, "ties cache-free": 22.3 * 2.34}
# resident_dtype narrower than the merge dtype: every input is cast per op, bf16 → fp32 reads 2 and
# writes 4 bytes an element, 0.75 of a float32 copy's 8; CPU: a one-model float32 copy of the 124.7M
# family takes 0.040 s (benchmarks.md, materializer table)
CAST_COPIES = 0.75
CPU_COPY_SECONDS = 0.040


def tensors(shape: dict) -> list[tuple[str, list[int]]]:
    """Every tensor of a Llama checkpoint with these shapes (untied head), HF names, file order."""
    h, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    out = [("model.embed_tokens.weight", [vocab, h])]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", [h]), (p + "self_attn.q_proj.weight", [h, h]),
                (p + "self_attn.k_proj.weight", [kv, h]), (p + "self_attn.v_proj.weight", [kv, h]),
                (p + "self_attn.o_proj.weight", [h, h]), (p + "post_attention_layernorm.weight", [h]),
                (p + "mlp.gate_proj.weight", [inter, h]), (p + "mlp.up_proj.weight", [inter, h]),
                (p + "mlp.down_proj.weight", [h, inter])]
    return [*out, ("model.norm.weight", [h]), ("lm_head.weight", [vocab, h])]


def write_model(folder: Path, shape: dict) -> int:
    """A header-only fake checkpoint in ``folder``; returns its parameter count."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape,
              "head_dim": shape["hidden_size"] // shape["num_attention_heads"], "hidden_act": "silu",
              "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
              "eos_token_id": 128001, "attention_bias": False, "mlp_bias": False}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shards: list[list[tuple[str, list[int], int]]] = [[]]
    for name, dims in tensors(shape):
        size = 2  # bfloat16
        for d in dims:
            size *= d
        if shards[-1] and sum(s for *_, s in shards[-1]) + size > SHARD:
            shards.append([])
        shards[-1].append((name, dims, size))
    weight_map, params = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dims, size in shard:
            header[name] = {"dtype": "BF16", "shape": dims, "data_offsets": [offset, offset + size]}
            weight_map[name] = file
            offset += size
        params += offset // 2
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data region starts 8-byte aligned
        with open(folder / file, "wb") as handle:
            handle.write(struct.pack("<Q", len(text)) + text)
            handle.truncate(8 + len(text) + offset)  # the data region: a hole
        blocks = (folder / file).stat().st_blocks * 512
        if blocks > 1 << 20:
            raise SystemExit(f"{folder / file}: {blocks} bytes on disk; this filesystem does not keep holes")
    index = {"metadata": {"total_size": 2 * params}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return params


def write_models(root: Path) -> dict[str, tuple[Path, list[Path], int]]:
    """Base and sources per family: {family: (base, sources, parameters)}."""
    made = {}
    for family, (shape, count) in FAMILIES.items():
        base = root / f"{shape}-base"
        params = write_model(base, SHAPES[shape])
        sources = [root / f"{shape}-ft{i}" for i in range(1, count + 1)]
        for source in sources:
            write_model(source, SHAPES[shape])
        made[family] = (base, sources, params)
    return made


def write_experiment(root: Path, scenario: str, base: Path, sources: list[Path], machine: str,
                     precision: str, search: str) -> Path:
    spec = MACHINES[machine]
    dtype, resident = PRECISIONS[precision]
    experiment = {"name": scenario, "models": {"base": str(base), "sources": [str(s) for s in sources]},
                  "search_space": {"kind": "parameter", "method": SEARCHES[search], "search": {"weight": [0.0, 1.0]}},
                  "fitness": "unused.yaml", "device": spec.device, "dtype": dtype, "trim_cache": "auto",
                  "max_memory": spec.max_memory}
    if spec.max_host_memory is not None:
        experiment["max_host_memory"] = spec.max_host_memory
    if resident is not None:
        experiment["resident_dtype"] = resident
    path = root / f"{scenario}.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


Range = tuple[float, float]


def page_cache_room(plan: TierPlan, machine: Machine) -> int:
    """Bytes of RAM the plan leaves to the page cache (after the OS share)."""
    used = plan.bound.total if plan.device.type == "cpu" else plan.host + plan.host_staging
    return int(machine.ram * GiB * (1 - OS_SHARE)) - used


def project(plan: TierPlan, machine: Machine, params: int, sources: int) -> dict[str, Range | None]:
    """Seconds per candidate (low, high) per method of CPU_SECONDS; None where TIES's positions are not kept.

    The files' bytes come from the page cache when they fit in :func:`page_cache_room`, else from
    NVMe. CUDA: the stages are pipelined (copy stream, two buffer sets), so a candidate takes its
    slowest stage: the kernels (COPY_MULTIPLE × a one-model copy at the device's bandwidth), the
    host→device copies (PCIE) or the files read into pinned buffers. CPU: the 124.7M family's
    one-thread seconds scaled (module constants) plus the files read (synchronous). Both add the
    per-op casts of ``resident_dtype`` inputs (CAST_COPIES one-model copies per input model)."""
    moved, read = plan.transfer()
    cached = read <= page_cache_room(plan, machine)
    disk = (read / PAGE_CACHED,) * 2 if cached else (read / NVME[1], read / NVME[0])
    scale = (sources + 1) / 4  # models read per element, against the measured base + 3 sources
    out: dict[str, Range | None] = {}
    casts = CAST_COPIES * (sources + 1) if plan.resident_dtype is not None else 0.0  # in one-model copies
    for method in CPU_SECONDS:
        if plan.device.type == "cuda":
            if method == "ties first":
                continue
            copy = 2 * params * plan.dtype.itemsize
            kernels = [(COPY_MULTIPLE[method] * scale + casts) * copy / bw for bw in reversed(machine.bandwidth)]
            out[method] = tuple(max(k, moved / PCIE, d) for k, d in zip(kernels, disk))  # type: ignore[assignment]
        else:
            ratio = CPU_BF16[method] if plan.dtype.itemsize == 2 else 1.0
            kernels = (CPU_SECONDS[method] * scale * ratio + casts * CPU_COPY_SECONDS) / CPU_PARAMS * params
            out[method] = (kernels + disk[0], kernels + disk[1])
    if "position" not in plan.bound.cached:
        out["ties"] = out["ties first"] = None
    return out


def placement(plan: TierPlan) -> str:
    """Per model: its tiers in GB, e.g. ``base D16.1; ft1 D1.05+H15; ft2 H16.1``."""
    cells = []
    for path, tiers in plan.by_model().items():
        label = "base" if plan.labels[path].endswith("(base)") else path.name.rsplit("-", 1)[-1]
        parts = [f"{tier[0].upper()}{size / 1e9:.3g}" for tier, (_, size) in tiers.items()]
        cells.append(f"{label} {'+'.join(parts)}")
    return "; ".join(cells)


def seconds(span: Range | None) -> str:
    if span is None:
        return "-"
    low, high = span

    def fmt(x: float) -> str:
        return f"{x:.2g}" if x < 10 else f"{x:.0f}"
    return fmt(low) if fmt(low) == fmt(high) else f"{fmt(low)}–{fmt(high)}"


def row(scenario: str, search: str, plan: TierPlan | str, machine: Machine, params: int, sources: int) -> str:
    if isinstance(plan, str):
        return f"| {scenario} | **refused**: {plan} | | | | | | |"
    b = plan.bound
    moved, read = plan.transfer()
    times = project(plan, machine, params, sources)
    host = "-" if plan.host_budget is None else f"{(plan.host + plan.host_staging) / 1e9:.3g}"
    files = f"{read / 1e9:.3g} ({'page cache' if read <= page_cache_room(plan, machine) else 'NVMe'})" if read else "0"
    if search == "ta":
        time = seconds(times["task_arithmetic"])
    elif times["ties"] is not None:  # positions kept
        time = f"{seconds(times['ties'])} (first {seconds(times['ties first'])})"
    else:
        time = f"{seconds(times['ties cache-free'])} (cache-free)"
    return (f"| {scenario} | {placement(plan)} | {b.total / 1e9:.3g} | {host} | {', '.join(b.cached) or 'none'} | "
            f"{moved / 1e9:.3g} | {files} | {time} |")


HEADER = ("| scenario | inputs (GB; D device, H pinned host, M files) | device GB | host GB | caches kept "
          "| host→device GB | files GB | s per candidate |\n"
          "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="print the table only")
    parser.add_argument("--only", default="", help="scenarios whose id contains this")
    parser.add_argument("--keep", type=Path, default=None, help="write into this folder (kept) instead of a temp one")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="plan_sizes_") as temp:
        root = args.keep or Path(temp)
        root.mkdir(parents=True, exist_ok=True)
        made = write_models(root)
        apparent = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
        on_disk = sum(f.stat().st_blocks * 512 for f in root.rglob("*"))
        print(f"fake checkpoints in {root}: {apparent / 1e9:.1f} GB apparent, {on_disk / 1e3:.0f} kB on disk")
        for family, (_, sources, params) in made.items():
            print(f"  {family}: {params / 1e9:.3f} B parameters per model ({2 * params / 1e9:.2f} GB bf16), "
                  f"base + {len(sources)} sources")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rows = []
        for scenario, family, name, precision, search in SCENARIOS:
            if args.only not in scenario:
                continue
            base, sources, params = made[family]
            machine = MACHINES[name]
            path = write_experiment(root, scenario, base, sources, name, precision, search)
            try:
                plan: TierPlan | str = memory_plan(path)
            except EvomergeError as error:
                plan = str(error)
            if not args.table:
                budgets = f"max_memory {machine.max_memory}" + (
                    f", max_host_memory {machine.max_host_memory}" if machine.max_host_memory else "")
                print(f"\n## {scenario}: {FAMILIES[family][0]} × {len(sources)} sources, {machine.label}, "
                      f"{precision}, a {SEARCHES[search]} search ({budgets})")
                print(plan if isinstance(plan, str) else plan.report())
            rows.append(row(scenario, search, plan, machine, params, len(sources)))
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
        print(f"\nresident set grew by {grown / 1e6:.0f} MB while planning"
              + (": no model's data was read" if grown < 1e9 else ": WARNING, the planner read data"))
        print(f"after planning: {sum(f.stat().st_blocks * 512 for f in root.rglob('*')) / 1e3:.0f} kB on disk")
        print("\n" + HEADER)
        print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
