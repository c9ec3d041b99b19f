"""The in-memory materializer against the merge engine: same weights, bit for bit.

Oracle: ``evomerge merge`` / ``merge_state_dict`` of the same config (itself checked
against mergekit in test_mergekit_parity.py). Both run the same kernels on the same
inputs in the same dtype, so equality is exact (``torch.equal``), not approximate; the
logits of the live model and of the merged folder loaded from disk are compared exactly
too, since the weights and the modules are the same.
"""

from __future__ import annotations

import random

import pytest
import torch
import yaml

from evomerge import ConfigError, EvomergeError, merge, merge_state_dict, parse_config
from evomerge.live.materializer import Materializer
from evomerge.live.modeling import load_model
from evomerge.methods import _cpu, registry
from evomerge.methods.registry import METHODS
from tests.method_configs import method_configs


def as_config(data: dict, dtype: str | None = None):
    return parse_config(yaml.safe_dump(dict(data, dtype=dtype) if dtype else data, sort_keys=False))


def stacking_configs(base: str, ft: list[str]) -> dict[str, dict]:
    """Depth-changing plans: deeper, shallower, repeated layers, data flow with input scales."""
    return {
        "deeper": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": base, "layer_range": [0, 4]}]},
            {"sources": [{"model": ft[0], "layer_range": [1, 4]}]}]},
        "shallower": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": ft[1], "layer_range": [0, 1]}]},
            {"sources": [{"model": ft[2], "layer_range": [3, 4]}]}]},
        "repeated": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": ft[0], "layer_range": [0, 2]}]},
            {"sources": [{"model": ft[0], "layer_range": [0, 2]}]},
            {"sources": [{"model": ft[1], "layer_range": [2, 4]}]}]},
        "data_flow": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": m, "layer_range": [i, i + 1], "input_scale": s}]}
            for m, i, s in [(ft[0], 0, None), (ft[1], 1, 0.8), (ft[0], 1, 1.2), (ft[2], 3, 0.5),
                            (ft[1], 3, None)]]},
        "stacked_ties": {"merge_method": "ties", "base_model": base, "slices": [
            {"sources": [{"model": base, "layer_range": [0, 3]},
                         {"model": ft[0], "layer_range": [0, 3], "parameters": {"weight": 0.7}},
                         {"model": ft[1], "layer_range": [1, 4], "parameters": {"weight": 0.4}}]},
            {"sources": [{"model": base, "layer_range": [2, 4]},
                         {"model": ft[2], "layer_range": [2, 4], "parameters": {"weight": 1.0}}]}],
            "parameters": {"density": 0.5}},
    }


def all_configs(base: str, ft: list[str], arch: str = "llama") -> dict[str, dict]:
    return {**method_configs(base, ft, arch), **stacking_configs(base, ft)}


def applied(materializer: Materializer, config, seed: int = 0) -> dict[str, torch.Tensor]:
    materializer.apply(config, seed=seed)
    return materializer.state_dict()


def assert_same_weights(live: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], label: str):
    assert set(reference) <= set(live), f"{label}: missing {sorted(set(reference) - set(live))[:3]}"
    for name, tensor in reference.items():
        assert live[name].dtype == tensor.dtype, f"{label}: {name} dtype"
        assert torch.equal(live[name], tensor), f"{label}: {name} differs"
    extra = {n for n in set(live) - set(reference) if "lm_head" not in n}
    assert not extra, f"{label}: live model has stale tensors {sorted(extra)[:3]}"


@pytest.fixture(scope="module")
def family(family_factory):
    return [str(p) for p in family_factory("llama")]


@pytest.fixture(scope="module")
def materializer(family):
    base, *ft = family
    return Materializer(base, ft)


def test_every_method_is_covered(family):
    base, *ft = family
    assert set(METHODS) <= {c["merge_method"] for c in all_configs(base, ft).values()}


@pytest.mark.parametrize("name", sorted(all_configs("b", ["f1", "f2", "f3"])))
def test_apply_equals_the_merge_engine(materializer, family, name):
    base, *ft = family
    config = as_config(all_configs(base, ft)[name])
    materializer.apply(config, seed=3)
    assert_same_weights(materializer.state_dict(), merge_state_dict(config, seed=3), name)


def test_successive_applies_do_not_leak_state(materializer, family):
    """Many candidates in a random order (depth going up and down): each equals a fresh merge."""
    base, *ft = family
    configs = all_configs(base, ft)
    references = {name: merge_state_dict(as_config(c), seed=1) for name, c in configs.items()}
    order = list(configs) * 2
    random.Random(0).shuffle(order)
    for name in order:
        materializer.apply(as_config(configs[name]), seed=1)
        assert_same_weights(materializer.state_dict(), references[name], name)


def test_source_models_are_never_written(family):
    base, *ft = family
    materializer = Materializer(base, ft)
    before = {key: t.clone() for key, t in materializer.inputs.kept.items()}
    configs = all_configs(base, ft)
    for name in ["repeated", "ties", "data_flow", "passthrough", "deeper", "slerp"]:
        materializer.apply(as_config(configs[name]))
        materializer.model(torch.randint(0, 256, (1, 8)))
    assert len(before) == len(materializer.memory_plan.parts)
    for key, tensor in materializer.inputs.kept.items():
        assert torch.equal(tensor, before[key]), key


@pytest.mark.parametrize("name", ["ties", "dare_ties", "slerp", "deeper", "repeated", "data_flow"])
def test_live_logits_equal_the_merged_folder_loaded_from_disk(materializer, family, tmp_path, name):
    base, *ft = family
    config = as_config(all_configs(base, ft)[name])
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    live = materializer.apply(config, seed=5)(tokens).logits
    disk = load_model(merge(config, tmp_path / name, seed=5))
    assert disk.config.num_hidden_layers == materializer.model.config.num_hidden_layers
    assert torch.equal(live, disk(tokens).logits)


def test_generation_with_repeated_layers_matches_disk(materializer, family, tmp_path):
    """Repeated layers get their own KV-cache slot (layer_idx), as in a real stacked model."""
    base, *ft = family
    config = as_config(stacking_configs(base, ft)["repeated"])
    prompt = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    live = materializer.apply(config).generate(prompt, **kwargs)
    disk = load_model(merge(config, tmp_path / "repeated")).generate(prompt, **kwargs)
    assert torch.equal(live, disk)


def test_blocked_kernels_equal_the_merge_engine(family, monkeypatch):
    """With blocks far smaller than the tensors (1000 elements: not dividing them), every
    kernel that is elementwise given the caches runs block by block; each candidate still
    equals the engine's unblocked merge. Rescaled DARE/DELLA (an L1 sum over the whole
    tensor) get their factors from a blockwise pass first; the non-elementwise methods
    run whole."""
    base, *ft = family
    monkeypatch.setattr(_cpu, "BLOCK", 1000)  # also the chunks of the engine's L1 sums
    configs = {name: as_config(c) for name, c in method_configs(base, ft).items()}
    references = {name: merge_state_dict(config, seed=2) for name, config in configs.items()}
    materializer = Materializer(base, ft)
    blocked = []

    def counting(kernel, inputs, block=None, prepare=None):
        blocked.append(inputs.tensors[0].numel() > _cpu.BLOCK)
        return _cpu.run_in_blocks(kernel, inputs, block, prepare)

    monkeypatch.setattr(registry, "run_in_blocks", counting)
    whole = {name for name, config in configs.items()
             if config.method.elementwise is None and config.method.sparsify is None}
    for name, config in configs.items():
        blocked.clear()
        assert_same_weights(applied(materializer, config, seed=2), references[name], name)
        assert any(blocked) == (name not in whole), name


def test_the_first_candidate_that_builds_caches_says_so(family, caplog):
    base, *ft = family
    materializer = Materializer(base, ft)
    configs = method_configs(base, ft)
    expected = [("task_arithmetic", None), ("ties", "magnitude positions"), ("breadcrumbs", None),
                ("dare_ties", "random words"), ("della", "DELLA ranks and random words"), ("ties", None)]
    for name, cached in expected:
        caplog.clear()
        with caplog.at_level("INFO", logger="evomerge.live.materializer"):
            materializer.apply(as_config(configs[name]))
        messages = [r.getMessage() for r in caplog.records if "caching" in r.getMessage()]
        assert messages == ([] if cached is None else [
            f"first {configs[name]['merge_method']} candidate: caching the task vectors' {cached} "
            "(once; later candidates reuse them)"]), name


def test_magnitude_position_cache_changes_nothing(family):
    base, *ft = family
    cached, uncached = Materializer(base, ft), Materializer(base, ft, trim_cache="off")
    configs = method_configs(base, ft)
    for name in ["ties", "breadcrumbs", "breadcrumbs_ties", "della", "ties_unnormalized"]:
        config = as_config(configs[name])
        assert_same_weights(applied(cached, config), applied(uncached, config), name)
    assert cached.caches.built["position"] and cached.caches.built["rank"] and not uncached.caches.built["position"]


def test_sce_variance_order_cache_changes_nothing(family, caplog):
    """SCE's selection at any select_topk reuses one variance order per output tensor."""
    base, *ft = family
    cached, uncached = Materializer(base, ft), Materializer(base, ft, trim_cache="off")
    configs = method_configs(base, ft)
    with caplog.at_level("INFO", logger="evomerge.live.materializer"):
        first = applied(cached, as_config(configs["sce"]))
    assert any("SCE variance orders" in r.getMessage() for r in caplog.records)
    assert_same_weights(first, applied(uncached, as_config(configs["sce"])), "sce")
    orders = {name: entry[1] for name, entry in cached.caches.selections.items()}
    assert orders and not uncached.caches.selections
    for topk in (0.1, 0.55, 0.95):
        config = as_config(dict(configs["sce"], parameters={"select_topk": topk}))
        assert_same_weights(applied(cached, config), applied(uncached, config), f"sce {topk}")
        assert all(cached.caches.selections[name][1] is order for name, order in orders.items())


def test_candidates_allocate_nothing_beyond_the_bounded_workspace(family):
    """Once the workspace has grown (first round), candidates reuse its slots, whatever the
    method; it stays within the documented scratch bound."""
    base, *ft = family
    materializer = Materializer(base, ft)
    configs = [as_config(c) for c in all_configs(base, ft).values()]
    for config in configs:
        materializer.apply(config, seed=4)
    slots = dict(materializer.caches.workspace._slots)
    assert 0 < materializer.caches.workspace.nbytes <= materializer.bound.scratch
    for config in reversed(configs):
        materializer.apply(config, seed=4)
    assert materializer.caches.workspace._slots.keys() == slots.keys()
    assert all(materializer.caches.workspace._slots[name] is slot for name, slot in slots.items())


def test_random_words_are_cached_per_seed(materializer, family):
    """DARE masks threshold cached stream words: reused while the seed stays, replaced
    (not added to) when it changes, and every candidate still equals the engine."""
    base, *ft = family
    dare = method_configs(base, ft)["dare_ties"]
    materializer.apply(as_config(dare), seed=11)
    cached = {slot: words for slot, (_, words) in materializer.caches.built["words"].items()}
    assert cached and all(words.dtype == torch.int32 for words in cached.values())
    denser = as_config(dict(dare, models=[{"model": m["model"], "parameters": {"weight": 0.5, "density": 0.9}}
                                          for m in dare["models"]]))
    assert_same_weights(applied(materializer, denser, seed=11), merge_state_dict(denser, seed=11), "same seed")
    assert all(materializer.caches.built["words"][slot][1] is words for slot, words in cached.items())
    assert_same_weights(applied(materializer, denser, seed=12), merge_state_dict(denser, seed=12), "new seed")
    assert materializer.caches.built["words"].keys() == cached.keys()
    assert all(materializer.caches.built["words"][slot][1] is not words for slot, words in cached.items())


def test_resident_tensors_are_copies_not_file_maps(materializer):
    for (path, name, _), tensor in materializer.inputs.kept.items():
        assert tensor.data_ptr() != materializer.folders[path].tensor(name).data_ptr(), (path, name)


def test_streaming_mode_equals_resident(family):
    base, *ft = family
    resident = Materializer(base, ft)
    streaming = Materializer(base, ft, tier="mmap")
    assert set(streaming.memory_plan.tiers) == {"mmap"} and not streaming.inputs.kept
    assert set(resident.memory_plan.tiers) == {"device"}
    configs = all_configs(base, ft)
    for name in ["ties", "dare_ties", "model_stock", "repeated", "data_flow"]:
        config = as_config(configs[name])
        assert_same_weights(applied(streaming, config), applied(resident, config), name)


def test_memory_bound_is_checked_before_loading(family, monkeypatch):
    base, *ft = family
    monkeypatch.setattr("evomerge.live.tiers.available_bytes", lambda device: 1000)
    with pytest.raises(EvomergeError, match="the free memory of cpu 1.00 kB is below the materializer's minimum"):
        Materializer(base, ft)
    with pytest.raises(EvomergeError, match=r"^max_memory 1.00 kB is below the materializer's minimum .* MB on cpu "
                                            r"\(live .* every input off the device\)$"):
        Materializer(base, ft, max_memory=1000)


def test_memory_bound_formula(family):
    base, *ft = family
    materializer = Materializer(base, ft)
    n = sum(p.numel() for p in materializer.model.parameters())  # untied tiny llama: all stored
    bound = materializer.bound
    assert bound.resident == 4 * n * 4 and bound.live == n * 4 and bound.per_cache == 3 * n * 4
    largest = max(p.numel() for p in materializer.model.parameters())
    assert bound.scratch == 7 * largest * 4


def test_configs_the_materializer_cannot_serve(materializer, family, tmp_path):
    base, *ft = family
    other = tmp_path / "elsewhere"
    with pytest.raises(ConfigError, match="models: model .* is not loaded in the materializer"):
        materializer.apply(as_config({"merge_method": "linear", "models": [
            {"model": str(other), "parameters": {"weight": 1.0}}]}))
    with pytest.raises(ConfigError, match="dtype: the materializer works in torch.float32"):
        materializer.apply(as_config(method_configs(base, ft)["ties"], dtype="bfloat16"))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma", "gpt_neox"])
def test_other_architectures(family_factory, arch):
    base, *ft = map(str, family_factory(arch))
    materializer = Materializer(base, ft)
    configs = {"ties": method_configs(base, ft, arch if arch in ("gpt2", "qwen2") else "llama")["ties"],
               **{k: v for k, v in stacking_configs(base, ft).items() if k in ("repeated", "data_flow")}}
    for name, data in configs.items():
        config = as_config(data)
        assert_same_weights(applied(materializer, config), merge_state_dict(config), f"{arch} {name}")
        materializer.model(torch.randint(0, 256, (1, 8)))


def test_bfloat16_models(family_factory):
    base, *ft = map(str, family_factory("llama", torch.bfloat16))
    materializer = Materializer(base, ft)
    assert materializer.dtype == torch.bfloat16
    for name, data in all_configs(base, ft).items():
        if name == "multislerp_base":  # refused in bf16, by mergekit too (test_mergekit_parity.py)
            continue
        config = as_config(data)
        assert_same_weights(applied(materializer, config), merge_state_dict(config), name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_the_engine_on_cuda(family):
    base, *ft = family
    materializer = Materializer(base, ft, device="cuda")
    for name, data in all_configs(base, ft).items():
        config = as_config(data)
        live = {k: v.cpu() for k, v in applied(materializer, config, seed=2).items()}
        assert_same_weights(live, {k: v.cpu() for k, v in merge_state_dict(config, seed=2, device="cuda").items()},
                            name)


# --------------------------------------------------------------------------- vocabularies


def chat_config(base, ft1, ft2, **tokenizer) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(ft1), "parameters": {"weight": 0.7}},
                       {"model": str(ft2), "parameters": {"weight": 0.4}}], **tokenizer}


@pytest.mark.parametrize("setting, configs", [
    ("union", [{"tokenizer_source": "union"},
               # the same vocabulary, other fill rows: a token forced from another token's row
               {"tokenizer": {"tokens": {"<|im_end|>": {"force": True, "source": {
                   "kind": "model_token", "model": "FT2", "token": "<tool>"}}}}}]),
    ({"source": "union", "pad_to_multiple_of": 8, "tokens": {"<new>": {"source": {"kind": "zero"}}}},
     [{"tokenizer": {"source": "union", "pad_to_multiple_of": 8,
                     "tokens": {"<new>": {"source": {"kind": "zero"}}}}}]),
])
def test_vocabulary_merges_equal_the_merge_engine(chat_family, tmp_path, setting, configs):
    from transformers import AutoTokenizer

    from evomerge.engine.config import TokenizerSettings

    base, ft1, ft2 = chat_family
    if isinstance(setting, dict):
        setting = TokenizerSettings.model_validate(setting)
    materializer = Materializer(base, [ft1, ft2], tokenizer=setting)
    for i, extra in enumerate(configs):
        config = as_config(yaml.safe_load(yaml.safe_dump(chat_config(*chat_family, **extra)).replace("FT2", str(ft2))))
        assert_same_weights(applied(materializer, config), merge_state_dict(config), f"config {i}")
        out = merge(config, tmp_path / f"out{i}")
        assert materializer.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(out).get_vocab()
        reference = load_model(out)
        ids = materializer.tokenizer("<|im_start|>user\nThe quick<|im_end|>", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert torch.equal(materializer.model(ids).logits, reference(ids).logits)
    assert materializer.model.config.vocab_size == materializer.vocabulary.size


def test_a_config_with_another_vocabulary_is_refused(chat_family):
    base, ft1, ft2 = chat_family
    materializer = Materializer(base, [ft1, ft2], tokenizer="union")
    for extra, detail in (({"tokenizer_source": "base"}, "gives"), ({}, "sets no tokenizer")):
        with pytest.raises(ConfigError, match=f"tokenizer: the live model's vocabulary .*{detail}") as error:
            materializer.apply(as_config(chat_config(*chat_family, **extra)))
        assert "\n" not in str(error.value)
    plain = Materializer(base, [ft1, ft2])
    with pytest.raises(ConfigError, match="fixed once per materializer"):
        plain.apply(as_config(chat_config(*chat_family, tokenizer_source="union")))


TRIMMING = ["ties", "ties_unnormalized", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "dare_linear",
            "dare_ties_unrescaled", "della", "della_unrescaled", "della_linear"]


def test_cache_free_trims_equal_the_merge_engine(family):
    """``trim_cache="off"``: every trimming method, cache-free, equals ``evomerge merge``."""
    base, *ft = family
    materializer = Materializer(base, ft, trim_cache="off")
    configs = method_configs(base, ft)
    for name in TRIMMING:
        config = as_config(configs[name])
        assert_same_weights(applied(materializer, config, seed=3), merge_state_dict(config, seed=3), name)
    assert not any(materializer.caches.built.values()) and materializer.bound.cached == ()


def test_a_tight_bound_trims_cache_free_with_the_cached_results(family):
    """Under a ``max_memory`` that holds no cache, ``auto`` keeps none (the bound says so,
    with the cuts' keys instead); with room for one, the positions. Successive candidates
    (densities, weights, methods interleaved) equal the all-cached materializer's."""
    base, *ft = family
    cached = Materializer(base, ft, trim_cache="on")
    everything = cached.bound
    assert everything.cached == ("position", "words", "rank") and everything.cache_free == 0
    free_total = everything.total - everything.caches + everything.keys
    tight = Materializer(base, ft, max_memory=free_total + everything.per_cache // 2)
    assert set(tight.memory_plan.tiers) == {"device"} and tight.bound.cached == () and tight.bound.total == free_total
    assert everything.total - tight.bound.total == 3 * everything.per_cache - everything.keys
    one = Materializer(base, ft, max_memory=free_total - everything.keys + everything.per_cache)
    assert one.bound.cached == ("position",)
    configs = method_configs(base, ft)
    for step in range(4):
        for name in ("ties", "breadcrumbs_ties", "dare_ties", "della"):
            data = dict(configs[name], models=[
                {"model": m["model"], "parameters": {**m["parameters"], "density": 0.2 + 0.2 * step,
                                                     "weight": 0.3 + 0.1 * step}}
                for m in configs[name]["models"]])
            config = as_config(data)
            reference = applied(cached, config, seed=5)
            for other in (tight, one):
                assert_same_weights(applied(other, config, seed=5), reference, f"{name} step {step}")
    assert not any(tight.caches.built.values()) and one.caches.built["position"] and not one.caches.built["words"]


def test_trim_cache_on_is_refused_when_it_does_not_fit(family):
    """``on`` reserves the caches first: a budget short of them moves inputs off the device; one
    short of them with every input off the device is refused."""
    base, *ft = family
    everything = Materializer(base, ft, trim_cache="on").bound
    spilled = Materializer(base, ft, trim_cache="on", max_memory=everything.total - 1)
    assert spilled.bound.cached == everything.cached and "mmap" in spilled.memory_plan.tiers
    least = Materializer(base, ft, trim_cache="on", tier="mmap").bound.total
    with pytest.raises(EvomergeError, match="trim_cache: on needs"):
        Materializer(base, ft, trim_cache="on", max_memory=least - 1)
