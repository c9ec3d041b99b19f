"""Shipped files (evomerge/shipped): found by name through importlib.resources, and in the wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.fitness import load_fitness
from evomerge.io import shipped
from evomerge.search.experiment import load_experiment

REPO = Path(__file__).resolve().parents[2]


def test_names_and_paths():
    assert all(shipped.is_name(n) for n in ("zoo_ps", "ps_ties", "zoo-skills"))
    assert not any(shipped.is_name(p) for p in ("zoo_ps.yaml", "./zoo_ps", "x/zoo_ps", "a.yml", "", ".", ".."))
    assert {"ps_ties", "dfs", "stacking"} <= set(shipped.names("search_spaces"))
    assert {"zoo_ps", "zoo_ps_ties", "zoo_dfs", "zoo_pareto", "zoo_subtract"} <= set(shipped.names("experiments"))
    assert "llama3_8b_ties.example" not in shipped.names("experiments")  # a template to copy, not a name
    assert {"zoo_skills", "zoo_skills_generate", "zoo_skills_pareto"} <= set(shipped.names("fitness"))


def test_a_name_finds_the_shipped_file_and_a_path_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of the checkout in the working directory
    experiment = load_experiment("zoo_ps")
    assert experiment.fitness == "zoo_skills" and experiment.models.base == "runs/zoo/base"
    (tmp_path / "mine.yaml").write_text((shipped.folder("experiments") / "zoo_ps.yaml").read_text())
    assert load_experiment("mine.yaml") == experiment
    by_name, by_path = load_fitness("zoo_skills"), load_fitness(shipped.folder("fitness") / "zoo_skills.yaml")
    assert list(by_name.metrics) == list(by_path.metrics) == ["increment", "reverse", "dates", "general_ppl"]
    with pytest.raises(ConfigError, match="unknown experiment 'nope'; expected a YAML file or one of: .*zoo_ps"):
        load_experiment("nope")
    with pytest.raises(ConfigError, match="unknown fitness definition 'nope'; .*zoo_skills"):
        load_fitness(Path("nope"))
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_experiment("nope.yaml")  # a path: read as given, not looked up


def test_shipped_fitness_paths_resolve_relative_to_the_shipped_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fitness = load_fitness("zoo_skills_subtract")
    sources = {path for metric in fitness.metrics.values() for path in metric.sources()}
    root = shipped.root().resolve()
    assert sources and all(path.resolve().is_relative_to(root) for path in sources)
    assert {p.name for p in sources} >= {"zoo_dates.yaml", "test.jsonl", "search.txt"}


def test_demo_writes_under_its_work_folder(tmp_path):
    from evomerge.cli.demo import DEFAULT_EXPERIMENT, _anchored

    experiment = _anchored(load_experiment(DEFAULT_EXPERIMENT), tmp_path)
    assert experiment.models.base == str(tmp_path / "runs" / "zoo" / "base")
    assert experiment.models.sources == [str(tmp_path / "runs" / "zoo" / s) for s in ("increment", "reverse", "dates")]
    assert experiment.fitness == "zoo_skills"  # a shipped name stays a name


@pytest.mark.slow
def test_the_wheel_holds_the_shipped_files(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"  # a copy, so the build leaves nothing (build/, egg-info) in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", ".cache", "__pycache__", "*.egg-info", "build", "tests", "benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist")], check=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("evomerge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"evomerge/shipped/{path.relative_to(shipped.root()).as_posix()}"
                for path in shipped.root().rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    assert expected <= names
    for path in ("search_spaces/ps_ties.yaml", "experiments/zoo_ps.yaml", "experiments/merges/ties.yaml",
                 "fitness/zoo_skills.yaml", "fitness/tasks/_zoo_template_yaml", "fitness/tasks/zoo_dates.yaml",
                 "fitness/data/dates/test.jsonl", "fitness/data/general/search.txt", "zoo/zoo.json",
                 "zoo/base/model.safetensors", "zoo/dates/tokenizer.json"):
        assert f"evomerge/shipped/{path}" in names
    assert "evomerge/io/shipped.py" in names
    assert not any(name.startswith(("tests/", "benchmarks/", "search_spaces/", "fitness/")) for name in names)


def test_the_cli_takes_an_experiment_name(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from evomerge.cli.main import main

    monkeypatch.chdir(tmp_path)
    unknown = CliRunner().invoke(main, ["search", "nope"])
    assert unknown.exit_code == 2 and "unknown experiment 'nope'" in unknown.output and "zoo_ps" in unknown.output
    import optuna

    optuna.create_study(study_name="other", storage=f"sqlite:///{tmp_path}/study.db")
    missing = CliRunner().invoke(main, ["status", "zoo_ps", "--storage", f"sqlite:///{tmp_path}/study.db"])
    assert missing.exit_code == 2 and "'zoo-ps-layers'" in missing.output  # the shipped experiment's study name
    assert not (tmp_path / "runs").exists()
