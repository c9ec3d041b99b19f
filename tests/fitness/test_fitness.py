"""Fitness core: objectives, stages, the score cache, callables, definition errors, `evomerge evaluate`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cli.main import main
from evomerge.errors import ConfigError, EvomergeError
from evomerge.fitness import FitnessError, load_fitness

DATA = Path(__file__).parents[1] / "data" / "fitness"
TEXT = {"search": "data/text/search.txt", "test": "data/text/test.txt"}
PPL = {"type": "perplexity", "data": TEXT, "context": 32, "stride": 16, "max_tokens": 160}


@pytest.fixture(scope="module")
def live(llama):
    model = AutoModelForCausalLM.from_pretrained(llama[0], dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(llama[0])


def callable_metric(function: str, **options) -> dict:
    return {"type": "callable", "function": f"scores.py:{function}", "direction": "maximize", **options}


def fitness_of(metrics: dict, **top) -> object:
    return load_fitness({"metrics": metrics, **top}, base_dir=DATA)


class Counter:
    """Wraps a metric's ``score`` to record the item ranges it was asked for."""

    def __init__(self, metric):
        self.calls, self._score = [], metric.score
        metric.score = self

    def __call__(self, model, tokenizer, split, start, stop):
        self.calls.append((split, start, stop))
        return self._score(model, tokenizer, split, start, stop)


# --------------------------------------------------------------------------- objectives


def test_weighted_sum_negates_minimized_metrics():
    fitness = fitness_of({"acc": callable_metric("constant", weight=2.0),
                          "ppl": {**PPL, "weight": 0.5},
                          "extra": callable_metric("constant", weight=0.0)})
    assert fitness.metric_names == ["weighted_sum"] and fitness.directions == ["maximize"]
    assert fitness.objectives({"acc": 0.5, "ppl": 10.0, "extra": 9.0}) == [2.0 * 0.5 - 0.5 * 10.0]


def test_separate_objectives_skip_zero_weights():
    fitness = fitness_of({"acc": callable_metric("constant"), "ppl": PPL,
                          "extra": callable_metric("constant", weight=0.0)}, objective="separate")
    assert fitness.metric_names == ["acc", "ppl"]
    assert fitness.directions == ["maximize", "minimize"]
    assert fitness.objectives({"acc": 0.5, "ppl": 10.0, "extra": 9.0}) == [0.5, 10.0]


# --------------------------------------------------------------------------- cache and stages


def test_repeated_cache_key_is_not_evaluated_again(live):
    model, tokenizer = live
    fitness = fitness_of({"ppl": PPL, "acc": callable_metric("constant")})
    counters = {name: Counter(metric) for name, metric in fitness.metrics.items()}
    first = fitness.evaluate(model, tokenizer, cache_key="plan-a")
    assert fitness.evaluate(model, tokenizer, cache_key="plan-a") == first
    assert [len(c.calls) for c in counters.values()] == [1, 1]
    fitness.evaluate(model, tokenizer, "test", cache_key="plan-a")  # another split: another entry
    fitness.evaluate(model, tokenizer, cache_key="plan-b")  # another candidate
    assert [len(c.calls) for c in counters.values()] == [3, 3]
    fitness.evaluate(model, tokenizer)  # no key: always evaluated
    assert [len(c.calls) for c in counters.values()] == [4, 4]


def test_larger_fraction_extends_the_smaller_one(live):
    model, tokenizer = live
    fitness = fitness_of({"ppl": PPL})
    counter = Counter(fitness.metrics["ppl"])
    half = fitness.evaluate(model, tokenizer, fraction=0.5, cache_key="k")
    full = fitness.evaluate(model, tokenizer, fraction=1.0, cache_key="k")
    n = fitness.metrics["ppl"].num_items("search")
    assert n > 2 and counter.calls == [("search", 0, n // 2 + n % 2), ("search", n // 2 + n % 2, n)]
    assert fitness.evaluate(model, tokenizer, fraction=0.5, cache_key="k") == half  # separate entries
    assert fitness.evaluate(model, tokenizer, fraction=1.0, cache_key="k") == full
    assert len(counter.calls) == 2
    assert full == fitness_of({"ppl": PPL}).evaluate(model, tokenizer)  # staged == in one go


def test_iter_stages_scores_each_item_once(live):
    model, tokenizer = live
    fitness = fitness_of({"ppl": PPL}, stages=[0.25, 0.5, 1.0])
    counter = Counter(fitness.metrics["ppl"])
    stages = list(fitness.iter_stages(model, tokenizer))
    assert [fraction for fraction, _ in stages] == [0.25, 0.5, 1.0]
    ranges = [(start, stop) for _, start, stop in counter.calls]
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert ranges[-1][1] == fitness.metrics["ppl"].num_items("search")
    assert stages[-1][1] == fitness.evaluate(model, tokenizer)


def test_cache_file_survives_a_restart_and_is_dropped_when_the_fitness_changes(live, tmp_path):
    model, tokenizer = live
    cache = tmp_path / "scores.jsonl"
    first = load_fitness({"metrics": {"ppl": PPL}}, base_dir=DATA, cache_file=cache)
    scores = first.evaluate(model, tokenizer, cache_key="k")
    again = load_fitness({"metrics": {"ppl": PPL}}, base_dir=DATA, cache_file=cache)
    counter = Counter(again.metrics["ppl"])
    assert again.evaluate(model, tokenizer, cache_key="k") == scores and counter.calls == []
    changed = load_fitness({"metrics": {"ppl": {**PPL, "stride": 8}}}, base_dir=DATA, cache_file=cache)
    counter = Counter(changed.metrics["ppl"])
    changed.evaluate(model, tokenizer, cache_key="k")
    assert len(counter.calls) == 1


# --------------------------------------------------------------------------- callables


def test_callable_float_and_dict(live):
    model, tokenizer = live
    fitness = fitness_of({"const": callable_metric("constant"),
                          "multi": callable_metric("several", key="accuracy")})
    scores = fitness.evaluate(model, tokenizer, "test")
    assert scores == {"const": 0.25, "multi": 0.75, "multi.accuracy": 0.75, "multi.latency": 3.0}
    assert fitness.evaluate(model, tokenizer)["const"] == 0.5


@pytest.mark.parametrize("function,options,message", [
    ("broken", {}, r"'bad' \(scores.py:broken\) raised RuntimeError: out of cheese"),
    ("not_a_number", {}, r"'bad' \(scores.py:not_a_number\) returned str; expected a number"),
    ("several", {}, r"returned keys \['accuracy', 'latency'\]; expected one entry \(or set `key`\)"),
    ("several", {"key": "speed"}, r"expected key 'speed'"),
])
def test_callable_failures_raise_fitness_error(live, function, options, message):
    model, tokenizer = live
    fitness = fitness_of({"bad": callable_metric(function, **options)})
    with pytest.raises(FitnessError, match=message) as caught:
        fitness.evaluate(model, tokenizer)
    assert isinstance(caught.value, EvomergeError) and "\n" not in str(caught.value)


# --------------------------------------------------------------------------- bad definitions


def write_fitness(tmp_path: Path, text: str) -> Path:
    """A fitness file next to copies of the test tasks, data and callables."""
    for name in ("tasks", "data", "scores.py"):
        source = DATA / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    path = tmp_path / "fit.yaml"
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


LM = "include_path: tasks\nmetrics:\n  m:\n    type: lm_eval\n    task: fit_const\n    metric: exact_match\n"
PP = ("metrics:\n  p:\n    type: perplexity\n    data: {search: data/text/search.txt, test: data/text/test.txt}\n"
      "    context: 32\n")


@pytest.mark.parametrize("text,field,message", [
    (PP.replace("search.txt", "missing.txt"), "metrics.p.data.search", "file not found: .*missing.txt"),
    (PP.replace("test.txt", "empty.txt"), "metrics.p.data.test", "no text in it"),
    (PP + "    stride: 32\n", "metrics.p.stride", "must be smaller than context"),
    (PP + "    bogus: 1\n", "metrics.p.bogus", "unknown field"),
    (LM.replace("fit_const", "fit_nope"), "metrics.m.task", "unknown lm-eval task 'fit_nope' in .*tasks "
     r"\(set builtin_tasks: true"),
    (LM.replace("exact_match", "accuracy"), "metrics.m.metric", "has no metric 'accuracy'; expected one of: "
     "exact_match"),
    (LM.replace("exact_match", "exact_match,strict"), "metrics.m.metric", "has no filter 'strict'; expected "
     "one of: const"),
    (LM + "    limit: 0\n", "metrics.m.limit", "greater than 0"),
    (LM.replace("include_path: tasks", "include_path: nowhere"), "include_path", "folder not found"),
    (LM.replace("lm_eval", "lm-eval"), "metrics.m.type", "unknown metric type 'lm-eval'; expected one of"),
    ("metrics:\n  c:\n    type: callable\n    function: nomodule_xyz:f\n    direction: maximize\n",
     "metrics.c.function", "cannot import 'nomodule_xyz': ModuleNotFoundError"),
    ("metrics:\n  c:\n    type: callable\n    function: scores.py:nothing\n    direction: maximize\n",
     "metrics.c.function", "'scores.py' has no function 'nothing'"),
    ("metrics:\n  c:\n    type: callable\n    function: scores.constant\n    direction: maximize\n",
     "metrics.c.function", "expected 'package.module:function' or 'file.py:function'"),
    ("metrics:\n  c:\n    type: callable\n    function: scores.py:constant\n    direction: up\n",
     "metrics.c.direction", "Input should be 'maximize' or 'minimize'"),
    ("stages: [0.5, 0.25, 1.0]\n" + PP, "stages", "expected increasing fractions in"),
    (PP + "    weight: 0\n", "metrics", "every metric has weight 0"),
    ("metric: {}\n", "metric", r"unknown field \(did you mean 'metrics'\?\)"),
])
def test_bad_definition_is_one_located_line(tmp_path, text, field, message):
    path = write_fitness(tmp_path, text)
    (tmp_path / "data" / "text" / "empty.txt").write_text("\n  \n")
    with pytest.raises(ConfigError) as caught:
        load_fitness(path)
    error = str(caught.value)
    assert "\n" not in error
    assert error.startswith(f"{path}:") and f": {field}: " in error, error
    assert re.search(message, error), error
    last = field.split(".")[-1]
    if any(line.strip().startswith(f"{last}: ") for line in text.splitlines()):  # a scalar on its line
        assert error.startswith(f"{path}:{line_of(text, last + ':')}: "), error


def test_bad_task_data_names_the_task_file(tmp_path):
    path = write_fitness(tmp_path, LM)
    task = tmp_path / "tasks" / "fit_const.yaml"
    (tmp_path / "data" / "const" / "test.jsonl").unlink()
    with pytest.raises(ConfigError, match=rf"^{task}: dataset_kwargs.data_files.test: data file "
                                          r"'data/const/test.jsonl' not found in .* or its parent folders$"):
        load_fitness(path)
    (tmp_path / "data" / "const" / "test.jsonl").write_text("")
    with pytest.raises(ConfigError, match=rf"^{task}: dataset_kwargs.data_files.test: data file .* is empty$"):
        load_fitness(path)
    shutil.copy(DATA / "data" / "const" / "test.jsonl", tmp_path / "data" / "const" / "test.jsonl")
    task.write_text(task.read_text().replace("validation_split: search\n", ""))
    with pytest.raises(ConfigError, match=rf"^{task}: validation_split: missing; the fitness needs"):
        load_fitness(path)
    task.write_text(task.read_text() + "validation_split: test\n")
    with pytest.raises(ConfigError, match=rf"^{task}: test_split: 'test' is also the validation_split"):
        load_fitness(path)


# --------------------------------------------------------------------------- command line


def test_evaluate_command_prints_table_and_json(llama):
    runner = CliRunner()
    args = ["evaluate", str(llama[0]), "--fitness", str(DATA / "fitness.yaml"), "--limit", "2", "-q"]
    result = runner.invoke(main, args + ["--split", "test"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["metric", "|", "value", "|", "direction", "|", "weight"]
    assert [line.split()[0] for line in lines[2:]] == ["mc", "const", "ppl", "mine", "objective"]
    result = runner.invoke(main, args + ["--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["split"] == "search" and set(report["scores"]) == {"mc", "const", "ppl", "mine"}
    assert report["scores"]["const"] == 1.0 and report["scores"]["mine"] == 0.5  # 2 docs, both "X"
    assert set(report["objectives"]) == {"weighted_sum"}


@pytest.mark.parametrize("case", ["bad fitness", "no model"])
def test_evaluate_command_bad_input_exits_2(llama, tmp_path, case):
    fitness = DATA / "fitness.yaml"
    model = llama[0]
    if case == "bad fitness":
        fitness = tmp_path / "fit.yaml"
        fitness.write_text(yaml.safe_dump({"metrics": {"x": {"type": "nope"}}}))
    else:
        model = tmp_path / "missing"
    result = CliRunner().invoke(main, ["evaluate", str(model), "--fitness", str(fitness), "-q"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert ("metrics.x.type: unknown metric type 'nope'" if case == "bad fitness"
            else "not a model folder") in result.stderr


def test_quiet_evaluate_shows_no_dataset_progress_bars(llama, tmp_path):
    """-q: warnings only, also on a first run, when `datasets` builds its cache of the local
    task data (its "Generating ... split" bars)."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    env.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    args = [sys.executable, "-m", "evomerge.cli.main", "evaluate", str(llama[0]), "--fitness",
            str(DATA / "fitness.yaml"), "--limit", "2", "-q"]
    process = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    assert (tmp_path / "hf-datasets").is_dir()  # the cache was built in this run
    assert "Generating" not in process.stderr and "examples/s" not in process.stderr, process.stderr
