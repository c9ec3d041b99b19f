"""Skill subtraction: the subtraction merge's closed form, and the table script on a mini zoo.

The mini zoo's specialists are trained for a few steps only (every skill scores 0), so these
tests check the recipe and the plumbing; the effect itself is measured on the real zoo with
``python benchmarks/zoo_subtract.py runs/zoo`` (see the report).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from evomerge import merge_state_dict
from evomerge.fitness import load_fitness
from evomerge.io import shipped
from evomerge.recipes.subtract import subtraction_configs, zoo_models
from evomerge.search.experiment import load_experiment
from evomerge.zoo.build import build_zoo
from evomerge.zoo.recipe import Recipe
from tests.conftest import read_folder
from tests.zoo.test_zoo import MINI

ROOT = Path(__file__).resolve().parents[2]


def mini_zoo(tmp_path_factory) -> Path:
    """The mini zoo of tests/test_zoo.py, built once per session (build_zoo reuses an equal recipe)."""
    out = tmp_path_factory.getbasetemp() / "mini-zoo"
    build_zoo(out, Recipe().override(**MINI), progress=False)
    return out


def quick_fitness(tmp_path: Path, skills: tuple[str, ...] = ("increment", "reverse", "dates")) -> Path:
    """The zoo's ``skills`` (lm-eval tasks, 2 documents) and a short general perplexity."""
    folder = shipped.folder("fitness")
    data = folder / "data" / "general"
    tasks = "".join(f"  {s}: {{type: lm_eval, task: zoo_{s}, metric: exact_match, num_fewshot: 0, limit: 2}}\n"
                    for s in skills)
    path = tmp_path / "fitness.yaml"
    path.write_text(f"include_path: {folder / 'tasks'}\nmetrics:\n{tasks}"
                    f"  general_ppl: {{type: perplexity, data: {{search: {data / 'search.txt'}, test: "
                    f"{data / 'test.txt'}}}, max_tokens: 256, context: 32, stride: 16, weight: 0.0}}\n")
    return path


def load_script(name: str):
    """``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, argv: list[str]) -> int:
    return load_script(name).main(argv)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    return mini_zoo(tmp_path_factory)


def test_subtraction_is_the_closed_form(zoo):
    base, sources = zoo_models(zoo)
    configs = subtraction_configs(base, sources, "dates", weight=0.8, lam=0.6)
    assert list(configs) == ["base", "increment", "reverse", "dates", "merge", "merge w/o dates", "merge − 0.6·dates"]
    theta = {name: read_folder(path) for name, path in {"base": base, **sources}.items()}
    merged = merge_state_dict(configs["merge − 0.6·dates"])
    for name, tensor in theta["base"].items():
        tau = {skill: theta[skill][name] - tensor for skill in sources}
        expected = tensor + 0.8 * tau["increment"] + 0.8 * tau["reverse"] - 0.6 * tau["dates"]
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    assert torch.equal(merge_state_dict(configs["dates"])["lm_head.weight"], theta["dates"]["lm_head.weight"])


def test_shipped_experiment_removes_dates_and_keeps_the_others():
    experiment = load_experiment("zoo_subtract")
    assert experiment.fitness == "zoo_skills_subtract"
    weights = {name: metric.weight for name, metric in load_fitness(experiment.fitness).metrics.items()}
    assert weights == {"increment": 1.0, "reverse": 1.0, "dates": -1.0, "general_ppl": 0.0}
    assert experiment.search_space["search"]["weight"][0] < 0  # negative task vectors are reachable
    assert experiment.models.sources == [f"runs/zoo/{s}" for s in ("increment", "reverse", "dates")]


def test_table_script_on_the_mini_zoo(zoo, tmp_path, capsys):
    config = tmp_path / "sub.yaml"
    fitness = quick_fitness(tmp_path, ("increment", "reverse"))  # two lm-eval tasks keep it quick
    assert run_script("zoo_subtract", [str(zoo), "--fitness", str(fitness), "--remove",
                                       "reverse", "--lambda", "0.5", "--write-config", str(config), "-q"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert lines[header].split() == ["model", "increment", "reverse", "general_ppl"]
    labels = [line.rsplit(None, 3)[0] for line in lines[header + 1:header + 8]]
    assert labels == ["base", "increment", "reverse", "dates", "merge", "merge w/o reverse", "merge − 0.5·reverse"]
    assert "reverse: merge" in out and "increment: merge" in out and "within ±0.05" in out
    weights = {Path(m["model"]).name: m["parameters"]["weight"] for m in yaml.safe_load(config.read_text())["models"]}
    assert weights == {"increment": 1.0, "dates": 1.0, "reverse": -0.5}
