"""The materializer with LoRA adapter sources kept low-rank, against the same materializer
given the adapters' dense equivalents (PEFT's ``merge_and_unload`` saved as full folders), and
against the merge engine.

Both forms compute every adapted weight with the same float operations (the adapter view and
the materializer share ``lora_dense``; the dense folders hold PEFT's identical result,
``tests/io/test_adapter.py``), and the kernels then see equal inputs, so every candidate must
be equal bit for bit (``torch.equal``), over many successive candidates of several methods in a
random order (caches, workspace and adapter scratch reused between them).
"""

from __future__ import annotations

import random

import pytest
import torch
import yaml

from evomerge import ModelError, merge_state_dict, parse_config
from evomerge.live.materializer import Materializer
from tests.live.test_materialize import assert_same_weights


def as_config(data: dict, dtype: str | None = None):
    return parse_config(yaml.safe_dump(dict(data, dtype=dtype) if dtype else data, sort_keys=False))


def candidate(method: str, base: str, sources: list[str], rng: random.Random) -> dict:
    """A random candidate of ``method`` over ``sources`` (the same draws give the same candidate
    over the adapters and over their dense folders)."""
    weights = [round(rng.uniform(-0.5, 1.5), 3) for _ in sources]
    densities = [round(rng.uniform(0.2, 0.8), 3) for _ in sources]  # della: density ± 0.15 inside (0, 1)
    if method == "linear":
        return {"merge_method": "linear", "models": [
            {"model": m, "parameters": {"weight": abs(w) + 0.1}} for m, w in zip(sources, weights)]}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": sources[0]}],
                "parameters": {"t": [round(rng.random(), 3), round(rng.random(), 3)]}}
    if method == "stacked":
        a, b = rng.sample(sources, 2)
        return {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3]}]}, {"sources": [{"model": b, "layer_range": [2, 4]}]}]}
    parameters = {"weight": 0, "density": 0}
    models = [{"model": m, "parameters": {k: v for k, v in (("weight", w), ("density", d)) if k in parameters}}
              for m, w, d in zip(sources, weights, densities)]
    if method == "task_arithmetic":
        models = [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}} for m in models]
    return {"merge_method": method, "base_model": base, "models": models}


METHODS = ["task_arithmetic", "ties", "dare_ties", "linear", "della", "breadcrumbs", "slerp", "stacked"]


@pytest.fixture(scope="module")
def llama(lora_family):
    family = lora_family("llama")
    return family, Materializer(family.base, family.adapters), Materializer(family.base, family.dense)


def test_low_rank_equals_dense_over_many_candidates(llama):
    family, lowrank, dense = llama
    order = METHODS * 3
    random.Random(0).shuffle(order)
    for step, method in enumerate(order):
        draws = random.Random(step)
        config = candidate(method, family.base, family.adapters, draws)
        twin = candidate(method, family.base, family.dense, random.Random(step))
        lowrank.apply(as_config(config), seed=5)
        dense.apply(as_config(twin), seed=5)
        assert_same_weights(lowrank.state_dict(), dense.state_dict(), f"{step} {method}")


def test_low_rank_equals_the_merge_engine(llama):
    family, lowrank, _ = llama
    for step, method in enumerate(METHODS):
        config = as_config(candidate(method, family.base, family.adapters, random.Random(100 + step)))
        lowrank.apply(config, seed=2)
        assert_same_weights(lowrank.state_dict(), merge_state_dict(config, seed=2), method)


def test_adapters_stay_low_rank(llama):
    family, lowrank, dense = llama
    base = lowrank.base_path
    kept = lowrank.inputs.kept
    for path in lowrank.folders:  # no dense copy: the base's own tensors, and the factors
        roles = {role for (owner, _, role) in kept if owner == path}
        assert roles == ({""} if path == base else {"a", "b"})
    factors = sum(t.numel() for (_, _, role), t in kept.items() if role)
    n = lowrank.folders[base].num_parameters()
    assert lowrank.bound.resident == n * 4 + factors * 4
    assert dense.bound.resident == 4 * n * 4
    assert lowrank.bound.resident < 0.5 * dense.bound.resident
    folder = lowrank.folders[base]
    largest = max(torch.Size(folder.shape(name)).numel() for name in folder.names())
    assert lowrank.bound.scratch == dense.bound.scratch + 3 * largest * 4 + largest * 4
    assert sum(s.numel() for s in lowrank._adapter_scratch) * 4 <= 3 * largest * 4


def test_the_live_model_runs_and_sources_are_untouched(llama):
    family, lowrank, _ = llama
    before = {key: t.clone() for key, t in lowrank.inputs.kept.items()}
    for method in ("stacked", "ties", "slerp"):
        lowrank.apply(as_config(candidate(method, family.base, family.adapters, random.Random(7))))
        assert lowrank.model(torch.randint(0, 256, (1, 8))).logits.isfinite().all()
    assert all(torch.equal(t, before[key]) for key, t in lowrank.inputs.kept.items())


def test_mixed_full_and_adapter_sources_and_plus_form(lora_family, family_factory):
    family = lora_family("llama")
    plus = [f"{family.base}+{a}" for a in family.adapters[:2]]
    mixed = Materializer(family.base, [*plus, family.dense[2]])
    for step, method in enumerate(["ties", "task_arithmetic", "stacked"]):
        config = as_config(candidate(method, family.base, [*plus, family.dense[2]], random.Random(step)))
        mixed.apply(config, seed=1)
        assert_same_weights(mixed.state_dict(), merge_state_dict(config, seed=1), method)


def test_streaming_and_uncached_equal_resident(lora_family, llama):
    family, lowrank, _ = llama
    streaming = Materializer(family.base, family.adapters, tier="mmap")
    uncached = Materializer(family.base, family.adapters, trim_cache="off")
    assert set(streaming.memory_plan.tiers) == {"mmap"} and not streaming.inputs.kept
    for step, method in enumerate(["ties", "dare_ties", "stacked"]):
        config = as_config(candidate(method, family.base, family.adapters, random.Random(50 + step)))
        lowrank.apply(config)
        reference = lowrank.state_dict()
        for other in (streaming, uncached):
            other.apply(config)
            assert_same_weights(other.state_dict(), reference, method)


def test_bfloat16_low_rank_equals_the_engine(lora_family):
    family = lora_family("llama")
    lowrank = Materializer(family.base, family.adapters, dtype=torch.bfloat16)
    for step, method in enumerate(["ties", "linear", "stacked"]):
        config = as_config(candidate(method, family.base, family.adapters, random.Random(step)), dtype="bfloat16")
        lowrank.apply(config, seed=3)
        assert_same_weights(lowrank.state_dict(), merge_state_dict(config, seed=3), method)


def test_adapters_of_another_base_are_refused(lora_family, family_factory):
    family = lora_family("llama")
    other = str(family_factory("llama")[0])
    with pytest.raises(ModelError, match="is not the base"):
        Materializer(other, family.adapters[:1])
    with pytest.raises(ModelError, match="an adapter of .*, not of the materializer's base"):
        Materializer(other, [f"{family.base}+{family.adapters[0]}"])
    with pytest.raises(ModelError, match="base must be a model folder, not an adapter"):
        Materializer(family.adapters[0], family.adapters[1:])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_low_rank_equals_the_engine_on_cuda(lora_family):
    """Adapters resident low-rank on the GPU, their task vectors formed there, over successive
    candidates: equal to the merge engine on CUDA (the same kernels on the same device)."""
    family = lora_family("llama")
    lowrank = Materializer(family.base, family.adapters, device="cuda")
    for step, method in enumerate(METHODS * 2):
        config = as_config(candidate(method, family.base, family.adapters, random.Random(200 + step)))
        lowrank.apply(config, seed=3)
        live = {name: tensor.cpu() for name, tensor in lowrank.state_dict().items()}
        engine = {name: tensor.cpu() for name, tensor in merge_state_dict(config, seed=3, device="cuda").items()}
        assert_same_weights(live, engine, f"{step} {method}")
