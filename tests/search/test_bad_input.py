"""Bad input to ``evomerge search``: one ``error:`` line on stderr, exit code 2, nothing written
(no study database, no study, no trial). ``evomerge merge`` has the same contract, tested in
test_cli_errors.py. Then property tests: the YAML loaders (experiment, merge config, search
space, fitness) turn any input into a valid object or a one-line ConfigError, never a crash."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.cli.main import main
from evomerge.engine.config import parse_config
from evomerge.errors import EvomergeError
from evomerge.fitness import load_fitness
from evomerge.io import shipped
from evomerge.search.driver import run_search
from evomerge.search.experiment import parse_experiment
from evomerge.search.spaces.loader import load_search_space
from evomerge.zoo.synthetic import build_family
from tests.search.test_search import REPO, experiment_dict, write_experiment


def files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def search_fails(tmp_path: Path, data: dict | str, *args: str, expected: str) -> str:
    """Run ``evomerge search`` on ``data``; assert the contract; return the error line."""
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    before = files(tmp_path)
    result = CliRunner().invoke(main, ["search", str(experiment), "-q", *args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # handled, not a traceback
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr, result.stderr
    assert result.stdout == ""
    assert files(tmp_path) == before, "a failed search must write nothing"
    return result.stderr.strip()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default storage (runs/studies/<name>.db) would land here
    return tmp_path


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory) -> Path:
    return build_family(tmp_path_factory.mktemp("gpt2"), "gpt2", sources=0)[0]


def test_malformed_yaml(in_tmp):
    search_fails(in_tmp, "name: [x\nmodels: {}\n", expected="experiment.yaml:2: malformed YAML")


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.update(search_space="no_such_space"), "search_space"),
    (lambda d: d["search_space"].update(method="tiez"), "method"),
    (lambda d: d["search_space"].update(kind="grid"), "kind: got 'grid'"),
    (lambda d: d.update(fitness="no_such_fitness.yaml"), "no_such_fitness.yaml"),
    (lambda d: d["fitness"]["metrics"]["close"].update(type="bleu"), "bleu"),
    (lambda d: d["fitness"]["metrics"]["close"].update(function="nowhere.py:f"), "nowhere.py"),
    (lambda d: d["models"]["sources"].append("/no/such/model"), "model folder not found: /no/such/model"),
    (lambda d: d.update(storage="not-a-url"), "expected an Optuna storage URL"),
    (lambda d: d.update(storage=None) or d["fitness"]["metrics"]["close"].update(type="bleu"), "bleu"),
], ids=["unknown-space", "unknown-method", "unknown-kind", "missing-fitness", "unknown-metric-type",
        "missing-callable", "missing-model", "storage-not-a-url", "bad-fitness-default-storage"])
def test_bad_experiment(llama, in_tmp, change, expected):
    data = experiment_dict(llama, in_tmp)
    change(data)
    search_fails(in_tmp, data, expected=expected)


def test_incompatible_models(llama, gpt2_base, in_tmp):
    data = experiment_dict(llama, in_tmp)
    data["models"]["sources"][0] = str(gpt2_base)
    search_fails(in_tmp, data, expected="different architectures")


def test_unreachable_storage(llama, in_tmp):
    data = experiment_dict(llama, in_tmp, storage="postgresql://user:secret@127.0.0.1:1/nothing")
    line = search_fails(in_tmp, data, expected="cannot open storage postgresql://user:***@127.0.0.1:1/nothing")
    assert "secret" not in line


@pytest.mark.parametrize("args, expected", [
    (["--device", "cpu", "--devices", "cpu,cpu"], "--device and --devices"),
    (["--devices", "tpu:0"], "--device: expected cpu, cuda, cuda:N or auto"),
    (["--workers", "0"], "--workers"),
])
def test_bad_worker_options(llama, in_tmp, args, expected):
    search_fails(in_tmp, experiment_dict(llama, in_tmp), *args, expected=expected)


def test_study_name_clash_with_another_experiment(llama, tmp_path):
    first = experiment_dict(llama, tmp_path, n_trials=1)
    run_search(parse_experiment(yaml.safe_dump(first)), progress=False, heartbeat=None)
    other = experiment_dict(llama, tmp_path, n_trials=3, seed=5)  # other DARE/DELLA masks: incomparable
    storage = first["storage"]
    trials = len(optuna.load_study(study_name="t", storage=storage).trials)
    experiment = write_experiment(tmp_path, other)
    process = subprocess.run([sys.executable, "-m", "evomerge.cli.main", "search", str(experiment)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert process.returncode == 2 and process.stdout == ""
    lines = process.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), process.stderr
    assert "study 't' belongs to another experiment (different seed); use a new --study name" in lines[0]
    study = optuna.load_study(study_name="t", storage=storage)
    assert len(study.trials) == trials and study.user_attrs["signature"]["seed"] == 0


# --------------------------------------------------------------------------- property tests

KEYS = ["name", "models", "base", "sources", "search_space", "fitness", "optimizer", "sampler", "popsize",
        "budget", "n_trials", "storage", "device", "dtype", "seed", "kind", "method", "search", "weight",
        "density", "layer_granularity", "control_points", "filters", "fixed", "metrics", "type", "function",
        "data", "objective", "stages", "direction", "merge_method", "base_model", "parameters", "slices",
        "sources", "layer_range", "model", "t", "num_blocks", "max_layers", "repeats"]
SCALARS = (st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text("abxy01.:-/_ ", max_size=8) | st.sampled_from(KEYS + ["ties", "linear", "parameter", "dfs",
                                                                           "stacking", "slerp", "perplexity",
                                                                           "callable", "cmaes", "float16"]))
YAMLISH = st.recursive(SCALARS, lambda children: st.lists(children, max_size=4)
                       | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children, max_size=5),
                       max_leaves=20)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = (shipped.folder("experiments") / "zoo_ps.yaml").read_text()


def one_line_or_object(load, argument):
    try:
        return load(argument)
    except EvomergeError as error:
        assert "\n" not in str(error) and str(error), repr(str(error))
        return None


@FUZZ
@given(st.text(max_size=300) | YAMLISH.map(yaml.safe_dump))
def test_experiment_loader_never_crashes(text):
    one_line_or_object(parse_experiment, text)


@FUZZ
@given(st.integers(0, len(VALID)), st.integers(0, 20), st.text(max_size=6))
def test_edited_experiment_never_crashes(at, cut, inserted):
    one_line_or_object(parse_experiment, VALID[:at] + inserted + VALID[at + cut:])


@FUZZ
@given(st.text(max_size=300) | YAMLISH.map(yaml.safe_dump))
def test_merge_config_loader_never_crashes(text):
    one_line_or_object(parse_config, text)


SPEC = st.text(max_size=300) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), YAMLISH, max_size=6)


@FUZZ
@given(SPEC)
def test_search_space_loader_never_crashes(data):
    one_line_or_object(lambda d: load_search_space(d, models=["a", "b"], base_model="base", num_layers=4,
                                                   base_dir=Path.cwd(), source="space"), data)


@FUZZ
@given(SPEC)
def test_fitness_loader_never_crashes(data):
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        for metric in data["metrics"].values():  # never load lm-eval tasks (slow); junk types stay
            if isinstance(metric, dict) and metric.get("type") == "lm_eval":
                metric["type"] = "perplexity"
    one_line_or_object(load_fitness, data)


@pytest.mark.parametrize("size, expected", [(4.0e10, 40_000_000_000), (123, 123), ("1.5GiB", 3 * 2**29),
                                            ("40GB", 40 * 10**9), (None, None)])
def test_memory_budgets_read_bytes_and_sizes(size, expected):
    from evomerge.search.experiment import parse_bytes

    assert parse_bytes(size) == expected


@pytest.mark.parametrize("size", [True, -3, 0, "lots", [1]])
def test_a_bad_memory_budget_is_a_value_error(size):
    from evomerge.search.experiment import parse_bytes

    with pytest.raises(ValueError, match="expected"):
        parse_bytes(size)
