"""The study report and the held-out table, on a tiny search with split-aware callable metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from evomerge.analysis.heldout import DEFAULT_MERGES, as_markdown, as_text, heldout_table
from evomerge.analysis.report import write_report
from evomerge.cli.main import main
from evomerge.errors import EvomergeError
from evomerge.live.modeling import load_model
from evomerge.search.driver import run_search
from evomerge.search.experiment import parse_experiment
from evomerge.search.records import trial_records
from evomerge.zoo.synthetic import build_family

FUNCTIONS = Path(__file__).parents[1] / "data" / "search" / "fitness_fns.py"
TASKS = Path(__file__).parents[1] / "data" / "fitness" / "tasks"
SPLIT_AWARE = '''
def skill(model, tokenizer, split="search"):
    """A smooth function of the weights, shifted by 1000 on the test split."""
    weight = model.model.layers[-1].mlp.down_proj.weight.double()
    return float(weight.mean() * 100 - weight.std()) + (1000.0 if split == "test" else 0.0)


def norm(model, tokenizer, split="search"):
    return float(model.model.norm.weight.double().sum())
'''


def experiment_data(family, folder: Path, **extra) -> dict:
    functions = folder / "split_aware.py"
    functions.write_text(SPLIT_AWARE)
    base, *sources = map(str, family)
    return {
        "name": "r", "models": {"base": base, "sources": sources},
        "search_space": {"kind": "parameter", "method": "ties", "layer_granularity": 2,
                         "search": {"weight": [0, 1], "density": [0.2, 1]}},
        "fitness": {"metrics": {
            "skill": {"type": "callable", "function": f"{functions}:skill", "direction": "maximize"},
            "norm": {"type": "callable", "function": f"{functions}:norm", "direction": "minimize", "weight": 0.5},
            "extra": {"type": "callable", "function": f"{functions}:norm", "direction": "maximize", "weight": 0},
        }},
        "optimizer": {"sampler": "cmaes", "popsize": 4, "seed": 0},
        "budget": {"n_trials": 5}, "storage": f"sqlite:///{folder}/study.db", **extra,
    }


@pytest.fixture(scope="module")
def reported(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    data = experiment_data(llama, folder)
    search = run_search(parse_experiment(yaml.safe_dump(data)), progress=False)
    out = write_report(search, folder / "out")
    return search, out, data, folder


def test_report_writes_plots_tables_and_an_offline_page(reported):
    search, out, _, _ = reported
    best = search.study.best_trial.number
    pngs = {"optimization-history", "param-importances", f"layers-{best}"}
    assert {p.stem for p in out.glob("*.png")} == pngs
    for stem in pngs:
        path = out / f"{stem}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        with Image.open(path) as image:
            image.verify()
    page = (out / "index.html").read_text()
    for stem in pngs:
        assert f'id="{stem}"' in page and f'href="{stem}.png"' in page
    assert '<table class="heldout">' in page and "ties w=1 density=0.5" in page
    assert "<script src=" not in page and "Plotly.newPlot" in page  # plotly.js inline: opens offline
    with (out / "trials.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(search.study.trials)
    header = "| model | kind | extra | norm | skill | weighted_sum | mean skill |"
    assert (out / "heldout.md").read_text().startswith(header)
    assert not list(out.parent.glob(".out.tmp-*"))
    assert json.loads((out / "paired.json").read_text()) == []  # callables score no items to pair
    assert '<table class="paired">' not in page


def test_heldout_rows_cover_trial_base_sources_and_defaults_on_the_test_split(reported):
    search, out, _, _ = reported
    rows = json.loads((out / "heldout.json").read_text())
    labels = [f"trial {search.study.best_trial.number}", "base", "ft1", "ft2", "ft3", *DEFAULT_MERGES]
    assert [row["label"] for row in rows] == labels
    defaults = ["default"] * len(DEFAULT_MERGES)
    assert [row["kind"] for row in rows] == ["trial", "base", "source", "source", "source", *defaults]
    best = search.study.best_trial
    assert rows[0]["trial"] == best.number
    assert rows[0]["metrics"]["skill"] == trial_records(best).metrics["skill"] + 1000.0  # the test split
    assert trial_records(best).metrics["skill"] < 1000  # the search never saw it
    for row in rows:
        scores = row["metrics"]
        assert row["objectives"]["weighted_sum"] == pytest.approx(scores["skill"] - 0.5 * scores["norm"])
        assert row["mean_skill"] == scores["skill"]  # minimized and weight-0 metrics left out
    for row, path in zip(rows[1:5], [search.base, *search.sources]):
        assert row["metrics"] == search.fitness.evaluate(load_model(path), None, "test")  # exact
    assert len({row["metrics"]["skill"] for row in rows[1:]}) == len(rows) - 1  # each its own model


def test_trials_are_compared_with_every_row_item_by_item(tmp_path):
    """With lm-eval skills (per-item scores), each reported trial gets a paired comparison
    with every other row, consistent with the rows' own items and mean skills. (Fine-tunes
    10× further from the base than the shared family's, so that the rows answer differently.)"""
    family = build_family(tmp_path / "family", "llama", delta_scale=0.5)
    data = experiment_data(family, tmp_path, budget={"n_trials": 2})
    data["fitness"] = {"include_path": str(TASKS), "metrics": {
        "mc": {"type": "lm_eval", "task": "fit_mc", "metric": "acc", "limit": 4},
        "const": {"type": "lm_eval", "task": "fit_const", "metric": "exact_match", "weight": 0.5}}}
    search = run_search(parse_experiment(yaml.safe_dump(data)), progress=False)
    out = write_report(search, tmp_path / "out")
    rows = json.loads((out / "heldout.json").read_text())
    paired = json.loads((out / "paired.json").read_text())
    trial, others = rows[0], rows[1:]
    assert [(p["model"], p["reference"]) for p in paired] == [(trial["label"], row["label"]) for row in others]
    assert {name: len(values) for name, values in trial["items"].items()} == {"mc": 8, "const": 4}
    for comparison, row in zip(paired, others):
        for name, values in row["items"].items():
            assert sum(values) / len(values) == row["metrics"][name]
        assert comparison["difference"] == pytest.approx(trial["mean_skill"] - row["mean_skill"], abs=1e-12)
        pairs = [(a, b) for name in trial["items"] for a, b in zip(trial["items"][name], row["items"][name])]
        assert (comparison["wins"], comparison["losses"]) == (sum(a > b for a, b in pairs),
                                                              sum(a < b for a, b in pairs))
    assert any(p["wins"] + p["losses"] for p in paired)  # the rows do differ on some items
    assert "Paired on the same held-out items" in (out / "heldout.md").read_text()
    assert '<table class="paired">' in (out / "index.html").read_text()


def test_tables_are_aligned_text_and_markdown():
    rows = [{"label": "trial 3", "kind": "trial", "trial": 3, "metrics": {"acc": 0.51234, "ppl": 12.5},
             "objectives": {"weighted_sum": 0.25}, "mean_skill": 0.51234},
            {"label": "base", "kind": "base", "trial": None, "metrics": {"acc": 0.25, "ppl": 9.0},
             "objectives": {"weighted_sum": -1.5}, "mean_skill": None}]
    lines = as_text(heldout_table(rows)).splitlines()
    assert lines[0].split() == ["model", "kind", "acc", "ppl", "weighted_sum", "mean", "skill"]
    assert len({len(line) for line in lines}) == 1 and lines[2].endswith("0.5123") and lines[3].endswith("-")
    markdown = as_markdown(heldout_table(rows)).splitlines()
    assert markdown[1] == "| --- | --- | ---: | ---: | ---: | ---: |"
    assert markdown[3] == "| base | base | 0.25 | 9 | -1.5 | - |"


def test_report_refuses_a_full_folder_and_needs_a_search_for_heldout(reported):
    search, out, _, folder = reported
    before = (out / "index.html").stat().st_mtime_ns
    with pytest.raises(EvomergeError, match="use --force"):
        write_report(search, out)
    with pytest.raises(EvomergeError, match="held-out table needs"):
        write_report(search.study, folder / "other")
    assert (out / "index.html").stat().st_mtime_ns == before and not (folder / "other").exists()


def test_multi_objective_report_has_a_pareto_front(llama, tmp_path):
    metrics = {name: {"type": "callable", "function": f"{FUNCTIONS}:two_objectives", "key": name,
                      "direction": "maximize"} for name in ("first", "last")}
    data = experiment_data(llama, tmp_path, optimizer={"sampler": "nsga2", "popsize": 4, "seed": 0},
                           budget={"n_trials": 4})
    data["fitness"] = {"metrics": metrics, "objective": "separate"}
    search = run_search(parse_experiment(yaml.safe_dump(data)), progress=False)
    out = write_report(search.study, tmp_path / "out", heldout=False)
    page = (out / "index.html").read_text()
    for stem in ("pareto-front", "history-0", "history-1", "importances-0", "importances-1"):
        assert (out / f"{stem}.png").stat().st_size > 5000 and f'id="{stem}"' in page
    front = {trial_records(t).plan_hash for t in search.study.best_trials}
    assert len(list(out.glob("layers-*.png"))) == len(front)
    assert not (out / "heldout.json").exists() and "heldout" not in page


def test_cli_report(reported, tmp_path, monkeypatch):
    _, _, data, folder = reported
    monkeypatch.chdir(tmp_path)
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(data))
    runner = CliRunner()
    result = runner.invoke(main, ["report", str(experiment), "-o", "rep", "--no-heldout", "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rep" / "index.html").exists() and not (tmp_path / "rep" / "heldout.json").exists()
    again = runner.invoke(main, ["report", str(experiment), "-o", "rep", "-q"])
    assert again.exit_code == 2 and "exists and is not empty" in again.output
    storage = ["--storage", data["storage"]]  # the models and fitness from the experiment the study recorded
    stored = runner.invoke(main, ["report", "--study", "r", *storage, "-o", "rep", "--force", "-q"])
    assert stored.exit_code == 0, stored.output
    assert len(json.loads((tmp_path / "rep" / "heldout.json").read_text())) == 5 + len(DEFAULT_MERGES)
    missing = runner.invoke(main, ["report", "--study", "nope", *storage, "-o", "x"])
    assert missing.exit_code == 2 and "no study named 'nope'" in missing.output
    assert len(missing.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
