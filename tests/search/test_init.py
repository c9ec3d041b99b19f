"""``evomerge init``: a commented experiment for the given models that ``evomerge search`` runs as written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from evomerge.cli.main import main
from evomerge.search.experiment import load_experiment
from evomerge.search.init import PLACEHOLDER, choose_granularity, popsize_for


def init(*args: str):
    return CliRunner().invoke(main, ["init", *map(str, args)])


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_init_writes_a_commented_experiment_that_search_runs(llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = init(*llama, "-o", "exp.yaml", "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = Path("exp.yaml").read_text()
    experiment = load_experiment("exp.yaml")
    assert experiment.name == "exp" and experiment.device == "cpu" and experiment.dtype == "float32"
    assert experiment.models.sources == [str(p) for p in llama[1:]]
    space = experiment.search_space
    assert space["kind"] == "parameter" and space["method"] == "ties" and space["layer_granularity"] == 1
    assert experiment.optimizer.sampler == "cmaes" and experiment.optimizer.popsize == 13
    assert experiment.budget.n_trials == 13 * 24
    assert experiment.storage == "sqlite:///runs/studies/exp.db"
    for comment in ["# 4 layers: layer_granularity 1 gives 4 groups × 3 sources × 2 (weight, density) = 24 genes",
                    "# CMA-ES on 24 genes: popsize 4 + ⌊3 ln 24⌋ = 13", "# sigma0 0.2", "available on cpu",
                    "# memory bound ", "# dtype: the models' own (float32)", "# arc_easy: {type: lm_eval",
                    "PLACEHOLDER", "llama (LlamaForCausalLM), 4 layers, float32", "full model"]:
        assert comment in text, comment
    data = experiment.fitness["metrics"]["perplexity"]["data"]
    assert data == {"search": "exp.search.txt", "test": "exp.test.txt"}
    assert Path("exp.search.txt").read_text() == PLACEHOLDER
    commented = yaml.safe_load(text.replace("    # arc_easy:", "    arc_easy:"))  # the lm-eval entries parse
    assert commented["fitness"]["metrics"]["arc_easy"]["type"] == "lm_eval"

    searched = CliRunner().invoke(main, ["search", "exp.yaml", "--n-trials", "2", "-q"])
    assert searched.exit_code == 0, searched.output
    assert Path("runs/studies/exp.db").is_file()
    assert "perplexity=" in searched.output


def test_a_mismatched_source_exits_2_with_one_line_and_writes_nothing(llama, family_factory, tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    gpt2 = family_factory("gpt2", sources=1)
    line = one_error_line(init(llama[0], llama[1], gpt2[1], "-o", "exp.yaml"))
    assert "different architectures" in line
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_needs_force_and_edited_data_is_kept(llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("exp.yaml").write_text("mine\n")
    assert "exists; pass --force" in one_error_line(init(*llama, "-o", "exp.yaml"))
    assert Path("exp.yaml").read_text() == "mine\n" and not Path("exp.search.txt").exists()
    Path("exp.search.txt").write_text("my own text, replacing the placeholder\n")
    result = init(*llama, "-o", "exp.yaml", "--force", "--name", "mine")
    assert result.exit_code == 0, result.output
    assert load_experiment("exp.yaml").name == "mine"
    assert Path("exp.search.txt").read_text() == "my own text, replacing the placeholder\n"
    assert Path("exp.test.txt").read_text() == PLACEHOLDER
    assert "--name" in one_error_line(init(*llama, "-o", "other.yaml", "--name", "a b"))
    assert not Path("other.yaml").exists()


def test_adapters_are_reported_and_searched_with_task_arithmetic(lora_family, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    family = lora_family("llama")
    result = init(family.base, *family.adapters[:2], family.dense[2], "-o", "lora.yaml", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.output.count("LoRA adapter") == 2 and "full model" in result.output
    text = Path("lora.yaml").read_text()
    assert text.count("# LoRA adapter") == 2 and "2 of the sources are LoRA adapters" in text
    experiment = load_experiment("lora.yaml")
    assert experiment.search_space["method"] == "task_arithmetic"
    assert "= 12 weights" in text  # 4 layers × 3 sources, one weight each
    searched = CliRunner().invoke(main, ["search", "lora.yaml", "--n-trials", "2", "-q"])
    assert searched.exit_code == 0, searched.output


def test_the_models_dtype_and_an_absent_cuda_device_are_written(family_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    family = family_factory("llama", torch.bfloat16, sources=2)
    device = "cpu" if torch.cuda.is_available() else "cuda"
    result = init(*family, "-o", "bf16.yaml", "--device", device)
    assert result.exit_code == 0, result.output
    experiment = load_experiment("bf16.yaml")
    assert experiment.dtype == "bfloat16" and experiment.device == device
    if device == "cuda":
        assert "not on this machine: unchecked" in Path("bf16.yaml").read_text()


@pytest.mark.parametrize("depth, per_layer, expected",
                         [(30, 3, 3), (4, 6, 1), (32, 6, 8), (22, 6, 5), (80, 40, 80), (1, 2, 1)])
def test_layer_granularity_keeps_the_gene_count_moderate(depth, per_layer, expected):
    assert choose_granularity(depth, per_layer) == expected


def test_popsize_is_cma_es_default():
    assert [popsize_for(n) for n in (1, 10, 24, 100)] == [4, 10, 13, 17]


def test_the_bound_counts_every_input_resident_as_the_materializer_plans_it(llama):
    from evomerge.live.materializer import Materializer
    from evomerge.search.init import inspect_for_init

    info = inspect_for_init(str(llama[0]), [str(p) for p in llama[1:]], device="cpu")
    plan = Materializer(llama[0], list(llama[1:]), trim_cache="off",  # all fit: all on the device
                        methods=["task_arithmetic"]).memory_plan.bound
    assert info.bounds[False].resident == plan.resident > 0
    assert info.bounds[False].total == plan.total
