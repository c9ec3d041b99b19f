"""Tiered residency: every plan of where the inputs live gives the all-device candidates bit for
bit; plans respect their budgets; ``inspect --plan-memory``; low-precision residency within its
rounding bound; a search under a ``max_memory`` below the resident set.

Oracle: the all-device materializer (itself equal to the merge engine, test_materialize.py). A
kernel gets the same values from every tier (the tiers only move bytes), so equality is exact.
"""

from __future__ import annotations

import random
import re

import pytest
import torch
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

from evomerge import EvomergeError
from evomerge.cli.main import main
from evomerge.io.source import source_key
from evomerge.live.materializer import Materializer
from evomerge.live.memory import human
from evomerge.live.tiers import Part, open_inputs, plan_blocks, plan_tiers, route
from evomerge.search.driver import run_search
from evomerge.search.experiment import parse_experiment
from tests.live.test_lowrank import as_config, candidate
from tests.live.test_materialize import applied, assert_same_weights
from tests.search.test_search import experiment_dict

METHODS = ["task_arithmetic", "ties", "dare_ties", "slerp", "linear", "stacked"]
BF16_UNIT = 2.0 ** -8  # bfloat16's unit roundoff: |bf16(x) - x| <= 2^-8 |x| (8-bit significand, round to nearest)


@pytest.fixture(scope="module")
def family(family_factory):
    return [str(p) for p in family_factory("llama")]


def mixed_budget(base: str, sources: list[str]) -> int:
    """A ``max_memory`` halfway between the all-off-device and the all-device plans' bounds (no caches)."""
    folders = open_inputs(base, sources)
    plans = [plan_tiers(folders, source_key(base), device=torch.device("cpu"), dtype=torch.float32, tier=tier,
                        trim_cache="off") for tier in ("mmap", "device")]
    return (plans[0].bound.total + plans[1].bound.total) // 2


def assert_tiers_agree(reference: Materializer, others: dict[str, Materializer], base: str, sources: list[str],
                       steps: int) -> None:
    """Successive random candidates of METHODS (caches, workspace and buffers reused): equal everywhere."""
    rng = random.Random(0)
    for step in range(steps):
        method = METHODS[step % len(METHODS)]
        config = as_config(candidate(method, base, sources, rng))
        reference.apply(config, seed=4)
        expected = reference.state_dict()
        for label, other in others.items():
            other.apply(config, seed=4)
            assert_same_weights(other.state_dict(), expected, f"{label}: step {step} {method}")


def test_every_tier_plan_gives_the_all_device_candidates(family):
    base, *ft = family
    reference = Materializer(base, ft)
    mixed = Materializer(base, ft, max_memory=mixed_budget(base, ft))
    others = {"mmap": Materializer(base, ft, tier="mmap"), "mix": mixed,
              "mix cache-free": Materializer(base, ft, max_memory=mixed_budget(base, ft), trim_cache="off")}
    assert set(mixed.memory_plan.tiers) == {"device", "mmap"}
    assert_tiers_agree(reference, others, base, ft, steps=3 * len(METHODS))


def test_lora_sources_in_every_tier(lora_family):
    family = lora_family("llama")
    reference = Materializer(family.base, family.adapters)
    mixed = Materializer(family.base, family.adapters, max_memory=mixed_budget(family.base, family.adapters))
    assert set(mixed.memory_plan.tiers) == {"device", "mmap"}
    factors = {tier for part, tier in zip(mixed.memory_plan.parts, mixed.memory_plan.tiers) if part.role}
    assert factors == {"device"}  # the adapters' factors fill the device first
    others = {"mmap": Materializer(family.base, family.adapters, tier="mmap"), "mix": mixed}
    assert_tiers_agree(reference, others, family.base, family.adapters, steps=2 * len(METHODS))


def test_plans_respect_their_budgets(family):
    """Over a sweep of budgets, CPU and (planned without a GPU) CUDA: within both budgets, tiers
    in fill order (device, then host, then the files), and one more input on the device would not fit."""
    base, *ft = family
    folders = open_inputs(base, ft)
    key = source_key(base)
    full = plan_tiers(folders, key, device=torch.device("cpu"), dtype=torch.float32, trim_cache="off")
    least = plan_tiers(folders, key, device=torch.device("cuda"), dtype=torch.float32, tier="mmap", trim_cache="off",
                       max_memory=10**9, max_host_memory=10**9)
    for device in ("cpu", "cuda"):
        for share in (0.0, 0.2, 0.5, 0.8, 1.0):
            budget = int(least.bound.total * 1.2 + share * full.bound.total)
            host = least.host_staging + int(share * full.bound.resident)
            plan = plan_tiers(folders, key, device=torch.device(device), dtype=torch.float32, max_memory=budget,
                              max_host_memory=host, trim_cache="off")
            order = {"device": 0, "host": 1, "mmap": 2}
            assert [order[t] for t in plan.tiers] == sorted(order[t] for t in plan.tiers)
            assert plan.bound.total <= budget
            if device == "cuda":
                assert plan.host + plan.host_staging <= host
            else:
                assert "host" not in plan.tiers and plan.host == plan.host_staging == 0
            cut = plan.tiers.count("device")
            if cut < len(plan.parts):
                assert plan.bound.total + plan.parts[cut].kept_bytes > budget


def test_cuda_plans_count_pinned_and_device_staging(family):
    base, *ft = family
    folders = open_inputs(base, ft)
    cuda = torch.device("cuda")
    plan = plan_tiers(folders, source_key(base), device=cuda, dtype=torch.float32, tier="mmap",
                      max_memory=10**9, max_host_memory=10**9, trim_cache="off")
    largest = max(p.kept_bytes for p in plan.parts)
    assert plan.bound.staging == 2 * 4 * largest  # two sets × 4 models × the largest tensor, landed
    assert plan.host_staging == 2 * 4 * largest and plan.host == 0  # its pinned read buffers
    assert plan.transfer() == (plan.bound.resident + sum(p.kept_bytes for p in plan.parts), sum(
        p.stored_bytes for p in plan.parts))
    with pytest.raises(EvomergeError, match="^max_host_memory 1.00 kB is below the .* of pinned buffers"):
        plan_tiers(folders, source_key(base), device=cuda, dtype=torch.float32, max_memory=plan.bound.total,
                   max_host_memory=1000, trim_cache="off")
    least = plan_tiers(folders, source_key(base), device=cuda, dtype=torch.float32, tier="mmap",
                       max_memory=10**9, max_host_memory=10**9, trim_cache="off").bound  # every input off the device
    terms = (f"live {human(least.live)} + scratch {human(least.scratch)} + transient {human(least.transient)} + "
             f"cut keys {human(least.cache_free)} + staging {human(least.staging)}, every input off the device")
    with pytest.raises(EvomergeError, match=f"^max_memory .* below the materializer's minimum {human(least.total)} "
                                            f"on cuda \\({re.escape(terms)}\\)$"):
        plan_tiers(folders, source_key(base), device=cuda, dtype=torch.float32, max_memory=least.total - 1,
                   max_host_memory=10**9)
    with pytest.raises(EvomergeError, match="^tier host needs a CUDA device"):
        Materializer(base, ft, tier="host")
    with pytest.raises(EvomergeError, match="^tier device needs .* on cpu but max_memory is 1.00 MB$"):
        Materializer(base, ft, tier="device", max_memory=10**6)


def test_routes():
    part = Part(source_key("/m"), "w", "", (4, 4), torch.float32, torch.bfloat16, torch.float32)
    kinds = {(tier, cuda): [(s.kind, s.dtype) for s in route(part, tier, cuda)]
             for tier in ("device", "host", "mmap") for cuda in (False, True)}
    assert kinds[("device", False)] == kinds[("device", True)] == [("cast", torch.float32)]
    assert kinds[("host", True)] == [("land", torch.bfloat16), ("cast", torch.float32)]
    assert kinds[("mmap", True)] == [("host", torch.bfloat16), ("land", torch.bfloat16), ("cast", torch.float32)]
    assert kinds[("mmap", False)] == [("host", torch.bfloat16), ("cast", torch.float32)]
    exact = Part(source_key("/m"), "w", "", (4,), torch.float32, torch.float32, torch.float32)
    assert route(exact, "mmap", False) == () and route(exact, "device", True) == ()


def test_inspect_plan_memory_prints_the_plan_without_loading(family, tmp_path, monkeypatch):
    base, *ft = family
    data = experiment_dict(family, tmp_path, device="cuda", max_memory="3MB", max_host_memory="1.2 MB",
                           resident_dtype="bfloat16")
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr("evomerge.io.reader.ModelFolder.tensor", lambda *a, **k: pytest.fail("loaded a tensor"))
    result = CliRunner().invoke(main, ["inspect", "--plan-memory", str(path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "budget 3.00 MB (max_memory)" in out and "host memory (budget 1.20 MB, max_host_memory)" in out
    assert "inputs kept in bfloat16" in out and "caches (none kept)" in out
    for line in ("base (base)", "ft1", "ft2", "ft3"):
        assert any(row.strip().startswith(line) and " t " in row for row in out.splitlines()), line
    assert "host→device" in out and out.strip().endswith("by that rounding.")
    plan = plan_blocks(open_inputs(base, ft), source_key(base), device=torch.device("cuda"), dtype=torch.float32,
                       resident_dtype=torch.bfloat16, max_memory=3 * 10**6, max_host_memory=12 * 10**5,
                       methods=("ties",))  # the experiment's search space: TIES
    assert plan.summary() in out and set(plan.tiers) == {"device", "host"}


def test_bf16_residency_of_bf16_files_is_said_exact(family_factory):
    """resident_dtype bfloat16 over files that store bfloat16 rounds nothing, and the plan says so."""
    base, *ft = [str(p) for p in family_factory("llama", torch.bfloat16)]
    plan = plan_tiers(open_inputs(base, ft), source_key(base), device=torch.device("cpu"), dtype=torch.float32,
                      resident_dtype=torch.bfloat16, max_memory=10**9)
    assert plan.summary().endswith("as the files store them, so candidates are the full-precision inputs' "
                                   "(no rounding).")


def test_the_materializer_logs_its_plan(family, caplog):
    base, *ft = family
    with caplog.at_level("INFO", logger="evomerge.live.materializer"):
        materializer = Materializer(base, ft, tier="mmap")
    assert materializer.memory_plan.summary() in caplog.text and "tensors" in caplog.text


def test_low_precision_residency_is_within_the_bf16_rounding_bound(family):
    """bfloat16 residency under float32 merges: each input rounded once (``|Δx| <= 2^-8 |x|``), so
    a linear combination ``Σ c_i x_i`` differs by at most ``2^-8 Σ |c_i| |x_i|`` (+ float32
    rounding); the same in every tier, and the plan and the bound say so."""
    base, *ft = family
    exact = Materializer(base, ft)
    low = Materializer(base, ft, resident_dtype=torch.bfloat16)
    low_mmap = Materializer(base, ft, resident_dtype=torch.bfloat16, tier="mmap")
    n = sum(p.numel() for p in exact.model.parameters())
    assert low.bound.resident == 4 * n * 2 and exact.bound.resident == 4 * n * 4
    assert low.bound.staging > 0 == exact.bound.staging
    assert "inputs kept in bfloat16 (resident_dtype)" in low.memory_plan.summary()
    models = {path: exact.folders[source_key(path)].state_dict() for path in family}
    weights = [0.7, -0.4, 0.5]
    configs = {
        "task_arithmetic": ({"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": m, "parameters": {"weight": w}} for m, w in zip(ft, weights)]},
            lambda name: models[base][name].abs() + sum(abs(w) * (models[m][name].abs() + models[base][name].abs())
                                                        for m, w in zip(ft, weights))),
        "linear": ({"merge_method": "linear", "models": [
            {"model": m, "parameters": {"weight": abs(w)}} for m, w in zip(ft, weights)]},
            lambda name: sum(abs(w) * models[m][name].abs() for m, w in zip(ft, weights)) / sum(map(abs, weights))),
    }
    for method, (data, scale) in configs.items():
        config = as_config(data)
        reference = {k: v.clone() for k, v in applied(exact, config).items()}
        rounded = {k: v.clone() for k, v in applied(low, config).items()}
        assert_same_weights(applied(low_mmap, config), rounded, f"{method} tiers")
        worst = 0.0
        for name, tensor in reference.items():
            bound = (BF16_UNIT + 2.0 ** -20) * scale(name)
            error = (rounded[name] - tensor).abs()
            assert (error <= bound).all(), f"{method}: {name}"
            worst = max(worst, float((error / bound.clamp_min(1e-30)).max()))
        assert 0 < worst <= 1, method
    with pytest.raises(EvomergeError, match="^resident_dtype torch.float32 is not a floating dtype narrower"):
        Materializer(base, ft, dtype=torch.bfloat16, resident_dtype=torch.float32)


def test_a_search_under_a_max_memory_below_the_resident_set(family, tmp_path, monkeypatch):
    """The same search with every input on the device and under a ``max_memory`` that leaves part of
    them in the files: the same trials, the same values."""
    monkeypatch.setenv("EVOMERGE_TEST_LOG", str(tmp_path / "calls.jsonl"))
    base, *ft = family
    budget = mixed_budget(base, ft)
    assert "mmap" in Materializer(base, ft, max_memory=budget).memory_plan.tiers
    values = {}
    for label, extra in (("resident", {}), ("tiered", {"max_memory": budget})):
        folder = tmp_path / label
        folder.mkdir()
        data = experiment_dict(family, folder, n_trials=5, **extra)
        search = run_search(parse_experiment(yaml.safe_dump(data)), progress=False)
        values[label] = [t.value for t in search.study.get_trials(states=[TrialState.COMPLETE])]
    assert len(values["tiered"]) == 5 and values["tiered"] == values["resident"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_overlapped_copies_give_the_all_device_candidates(family, lora_family):
    """On CUDA, inputs in pinned host memory, in the files and a mix of device, host and files come
    in on the copy stream (double-buffered), and give the all-device candidates bit for bit."""
    base, *ft = family
    reference = Materializer(base, ft, device="cuda")
    all_device = reference.bound.total
    least = Materializer(base, ft, device="cuda", tier="mmap").bound.total
    mixed = Materializer(base, ft, device="cuda", max_memory=(least + all_device) // 2,
                         max_host_memory=reference.bound.resident // 3)
    assert set(mixed.memory_plan.tiers) == {"device", "host", "mmap"}
    others = {"host": Materializer(base, ft, device="cuda", tier="host"),
              "mmap": Materializer(base, ft, device="cuda", tier="mmap"), "mix": mixed,
              "bf16 mix": Materializer(base, ft, device="cuda", tier="host", resident_dtype=torch.bfloat16)}
    rng = random.Random(1)
    low = Materializer(base, ft, device="cuda", resident_dtype=torch.bfloat16)
    for step in range(2 * len(METHODS)):
        config = as_config(candidate(METHODS[step % len(METHODS)], base, ft, rng))
        expected = {k: v.cpu() for k, v in applied(reference, config, seed=2).items()}
        rounded = {k: v.cpu() for k, v in applied(low, config, seed=2).items()}
        for label, other in others.items():
            live = {k: v.cpu() for k, v in applied(other, config, seed=2).items()}
            assert_same_weights(live, rounded if label.startswith("bf16") else expected, f"{label}: {step}")
    family_lora = lora_family("llama")
    lowrank = Materializer(family_lora.base, family_lora.adapters, device="cuda")
    hosted = Materializer(family_lora.base, family_lora.adapters, device="cuda", tier="host")
    for step, method in enumerate(METHODS):
        config = as_config(candidate(method, family_lora.base, family_lora.adapters, random.Random(step)))
        expected = {k: v.cpu() for k, v in applied(lowrank, config).items()}
        assert_same_weights({k: v.cpu() for k, v in applied(hosted, config).items()},
                            expected, f"lora host: {method}")
