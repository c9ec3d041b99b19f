"""The materializer's row-blocked merges against its whole-tensor ones and the merge engine.

A block limit far below the tiny models' tensors makes every tensor of a row-blocked method
(linear and the task-arithmetic family) split into many row blocks: its inputs are brought
(from the device tier, or read from the files with ``tier="mmap"``) and LoRA adapters' weights
formed one row block at a time. Over successive candidates of each method in a random order
(densities 0 and 1 included, rescale on and off), every parameter equals the unblocked
materializer's (with every trim cache, or none) and ``evomerge merge``'s (``torch.equal``).
"""

from __future__ import annotations

import random

import pytest
import torch

from evomerge import ConfigError, EvomergeError, merge_state_dict
from evomerge.live.materializer import Materializer
from evomerge.methods import _cpu
from evomerge.methods import blocked as blocked_module
from evomerge.methods.registry import METHODS
from tests.live.test_lowrank import as_config
from tests.live.test_materialize import assert_same_weights

ROWS = sorted(name for name, method in METHODS.items() if method.rows)
WHOLE = 10**12  # a block limit above every tensor: nothing blocked


def candidate(method: str, base: str, sources: list[str], rng: random.Random) -> dict:
    """A random candidate of row-blocked ``method``: weights, densities (0 and 1 among them),
    rescale on or off, gamma and epsilon where the method has them."""
    def density() -> float:
        return rng.choice([0.0, 1.0, round(rng.uniform(0.05, 0.95), 3)])

    models = []
    for source in sources:
        parameters = {"weight": round(rng.uniform(-0.6, 1.4), 3)}
        if method not in ("linear", "task_arithmetic"):
            parameters["density"] = density()
        if method.startswith("breadcrumbs"):
            parameters["gamma"] = rng.choice([0.0, 0.02, 0.1])
        if method.startswith("della"):
            parameters["density"] = round(rng.uniform(0.2, 0.8), 3)
            parameters["epsilon"] = 0.1
        models.append({"model": source, "parameters": parameters})
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": base, "parameters": {"weight": 0.4}}, *models]}
    shared = {} if method == "task_arithmetic" else {"rescale": rng.random() < 0.5}
    return {"merge_method": method, "base_model": base, "models": models, "parameters": shared}


@pytest.fixture(scope="module")
def family(family_factory):
    return [str(p) for p in family_factory("llama")]


def counting(monkeypatch) -> list[int]:
    """The row blocks each row-blocked run has (appended as runs are made). The CPU blocks and
    L1 sum chunks (which row blocks are a multiple of) shrink to 256 elements, for all alike."""
    monkeypatch.setattr(_cpu, "BLOCK", 256)
    runs: list[int] = []
    original = blocked_module.RowBlocked.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        runs.append(len(self.units) // len(self.passes))

    monkeypatch.setattr(blocked_module.RowBlocked, "__init__", init)
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_blocks_equal_whole_tensors_over_successive_candidates(family_factory, dtype, monkeypatch):
    base, *ft = [str(p) for p in family_factory("llama", dtype)]
    whole = Materializer(base, ft, trim_cache="on", block_limit=WHOLE)
    uncached = Materializer(base, ft, trim_cache="off", block_limit=WHOLE)
    blocked = Materializer(base, ft, block_limit=100)
    streamed = Materializer(base, ft, block_limit=300, tier="mmap")
    runs = counting(monkeypatch)
    order = ROWS * 2
    random.Random(1).shuffle(order)
    for step, method in enumerate(order):
        config = as_config(candidate(method, base, ft, random.Random(step)))
        whole.apply(config, seed=4)
        reference = whole.state_dict()
        uncached.apply(config, seed=4)
        assert_same_weights(uncached.state_dict(), reference, f"{step} {method} cache-free")
        runs.clear()
        for other in (blocked, streamed):
            other.apply(config, seed=4)
            assert_same_weights(other.state_dict(), reference, f"{step} {method}")
        assert runs and max(runs) > 4, method  # the tensors did split into many blocks
    for kind in blocked.caches.built.values():  # row blocks use no trim caches: only the 1-d tensors have them
        assert all(len(blocked.inputs.parts[(path, name, "")].shape) == 1 for path, name, *_ in kind)


def test_row_blocks_equal_the_merge_engine(family, monkeypatch):
    base, *ft = family
    runs = counting(monkeypatch)
    blocked = Materializer(base, ft, block_limit=64)
    for step, method in enumerate(ROWS):
        config = as_config(candidate(method, base, ft, random.Random(100 + step)))
        blocked.apply(config, seed=2)
        assert_same_weights(blocked.state_dict(), merge_state_dict(config, seed=2), method)
    assert runs and max(runs) > 4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: transposed (fan_in_fan_out) adapters
def test_lora_weights_formed_by_row_blocks(lora_family, arch, monkeypatch):
    family = lora_family(arch)
    whole = Materializer(family.base, family.adapters, block_limit=WHOLE)
    blocked = Materializer(family.base, family.adapters, block_limit=200)
    streamed = Materializer(family.base, family.adapters, block_limit=500, tier="mmap")
    runs = counting(monkeypatch)
    for step, method in enumerate(["ties", "task_arithmetic", "dare_ties", "linear", "della", "breadcrumbs"]):
        config = as_config(candidate(method, family.base, family.adapters, random.Random(step)))
        whole.apply(config, seed=3)
        reference = whole.state_dict()
        for other in (blocked, streamed):
            other.apply(config, seed=3)
            assert_same_weights(other.state_dict(), reference, f"{arch} {method}")
        if method != "linear":
            assert_same_weights(reference, merge_state_dict(config, seed=3), f"{arch} {method} engine")
    assert runs and max(runs) > 4


def test_methods_are_checked(family):
    base, *ft = family
    materializer = Materializer(base, ft, methods=["task_arithmetic"])
    with pytest.raises(ConfigError, match="merge_method ties is not among the materializer's methods "
                                          r"\(task_arithmetic\), which its memory plan counts"):
        materializer.apply(as_config(candidate("ties", base, ft, random.Random(0))))
    with pytest.raises(EvomergeError, match="methods: unknown merge method 'tie'"):
        Materializer(base, ft, methods=["tie"])


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_a_bad_block_limit_is_refused_in_one_line(family, limit):
    base, *ft = family
    with pytest.raises(EvomergeError, match=rf"^block_limit: expected a positive number of elements, got {limit!r}$"):
        Materializer(base, ft, block_limit=limit)


def plan(family, device: str = "cpu", **options):
    from evomerge.io.source import source_key
    from evomerge.live.tiers import open_inputs, plan_tiers

    base, *ft = family
    return plan_tiers(open_inputs(base, ft), source_key(base), device=torch.device(device), dtype=torch.float32,
                      **options)


def test_the_bound_counts_the_methods_terms_only(family):
    """Task arithmetic is charged no trim transient, keys or caches; TIES its positions and
    cut keys; DARE its words; any method (None) everything, as before."""
    anyway = plan(family, trim_cache="on").bound
    assert anyway.cached == ("position", "words", "rank") and anyway.transient > 0 and anyway.keys > 0
    ta = plan(family, trim_cache="on", methods=["task_arithmetic", "linear"]).bound
    assert (ta.cached, ta.transient, ta.keys, ta.scratch) == ((), 0, 0, anyway.scratch)
    ties = plan(family, trim_cache="on", methods=["ties"]).bound
    assert (ties.cached, ties.transient, ties.keys) == (("position",), anyway.transient, anyway.keys)
    dare = plan(family, trim_cache="on", methods=["dare_ties", "task_arithmetic"]).bound
    assert (dare.cached, dare.keys) == (("words",), 0)
    assert anyway.total - ta.total == 3 * anyway.per_cache + anyway.transient  # positions kept: no keys counted


def test_row_blocked_methods_get_block_sized_terms(family, monkeypatch):
    """With the CPU sum chunks at 256 elements, a 300-element limit merges every 2-d tensor of the
    tiny llama in 256-element row blocks: the per-kernel terms are sized by 256, the caches
    count the 1-d tensors only; a method that runs whole (slerp) brings back the full terms."""
    monkeypatch.setattr(_cpu, "BLOCK", 256)
    blocked = plan(family, methods=["ties", "linear"], block_limit=300, trim_cache="on")
    whole = plan(family, methods=["ties"], trim_cache="on").bound
    b = blocked.bound
    assert (b.scratch, b.transient, b.keys) == (7 * 256 * 4, 36 * 256, 256 * 4)
    vectors = sum(p.numel for p in blocked.parts if p.path == blocked.parts[0].path and len(p.shape) == 1)
    assert b.per_cache == 3 * vectors * 4 < whole.per_cache
    mixed = plan(family, methods=["ties", "slerp"], block_limit=300, trim_cache="on").bound
    full = plan(family, methods=["ties", "slerp"], trim_cache="on").bound
    assert mixed == full and mixed.scratch == whole.scratch
    assert "in row blocks, in at most 3 passes" in blocked.report()


def test_staging_is_sized_by_the_blocks_and_counts_the_models_off_the_device(family, monkeypatch):
    """A CUDA plan (no GPU needed with max_memory): every input in pinned host memory lands in
    two buffer sets, one buffer per model, of the largest copy: a row block's when blocked. A
    model wholly on the device lands nothing, so it takes no buffer. TIES in float32 brings a
    blocked tensor three times (two radix-select passes and the merge)."""
    monkeypatch.setattr(_cpu, "DEVICE_SUM_BLOCK", 256)
    options = {"device": "cuda", "max_memory": 10**9, "max_host_memory": 10**9, "trim_cache": "off"}
    largest = max(p.numel for p in plan(family, tier="host", **options).parts)
    assert plan(family, tier="host", **options).bound.staging == 2 * 4 * largest * 4
    blocked = plan(family, tier="host", methods=["ties"], block_limit=300, **options)
    assert blocked.bound.staging == 2 * 4 * 256 * 4
    moved, _ = blocked.transfer()
    assert moved == sum(p.kept_bytes * (3 if len(p.shape) == 2 else 1) for p in blocked.parts)
    least = plan(family, tier="mmap", **options).bound.total
    base_bytes = sum(p.kept_bytes for p in blocked.parts if p.path == blocked.parts[0].path)
    some = plan(family, **dict(options, max_memory=least + base_bytes))
    tiers = some.tier_of()
    base = some.parts[0].path
    assert {tiers[p.key] for p in some.parts if p.path == base} == {"device"}
    off = {p.path for p in some.parts if tiers[p.key] != "device"}
    assert base not in off and len(off) == 3
    assert some.bound.staging == 2 * 3 * largest * 4


def test_row_blocks_only_where_memory_asks_for_them(family):
    """By default nothing is blocked when every input fits on the device with whole tensors (blocks
    cost the trims passes and caches); under a budget that pushes an input off the device, the
    tensors above the largest layer matrix (the tiny llama's vocabulary tensors) are."""
    base, *ft = family
    roomy = Materializer(base, ft, methods=["ties"])
    assert roomy.block_limit is None and set(roomy.memory_plan.tiers) == {"device"}
    assert "every tensor merged whole" in roomy.memory_plan.summary()
    tight = Materializer(base, ft, methods=["ties"], max_memory=roomy.bound.total - roomy.bound.caches - 10**4)
    assert tight.block_limit == 128 * 64  # the MLP matrices; the 256-row embedding and head split
    assert "tensors above 8,192 elements merged in row blocks" in tight.memory_plan.summary()
    assert Materializer(base, ft, block_limit=100).block_limit == 100


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_row_blocks_equal_whole_tensors(family, monkeypatch):
    """On CUDA (L1 sum chunks shrunk to 256 elements for all alike), row blocks of inputs on the
    device, landed from pinned host memory and read from the files equal whole tensors."""
    monkeypatch.setattr(_cpu, "DEVICE_SUM_BLOCK", 256)
    base, *ft = family
    whole = Materializer(base, ft, device="cuda", block_limit=WHOLE)
    blocked = [Materializer(base, ft, device="cuda", block_limit=300, tier=tier) for tier in ("device", "host", "mmap")]
    for step, method in enumerate(ROWS):
        config = as_config(candidate(method, base, ft, random.Random(200 + step)))
        whole.apply(config, seed=6)
        reference = {name: t.cpu() for name, t in whole.state_dict().items()}
        for other in blocked:
            other.apply(config, seed=6)
            assert_same_weights({name: t.cpu() for name, t in other.state_dict().items()}, reference, method)
