"""Studies written by ``evomerge search`` open in optuna-dashboard: its own WSGI app (what
``optuna-dashboard sqlite:///...`` serves) lists them and serves every trial, the plots'
data, parameter importances and the CSV export, for a single-objective study with a
failed trial and a multi-objective one."""

from __future__ import annotations

import csv
import io
import json
from wsgiref.util import setup_testing_defaults

import optuna_dashboard
import yaml
from optuna.trial import TrialState

from evomerge.search.distributed.storage import open_storage
from evomerge.search.driver import run_search
from evomerge.search.experiment import parse_experiment
from evomerge.search.records import CANDIDATE, PLAN, RESULT, trial_records
from tests.search.test_search import FUNCTIONS, experiment_dict


def get(app, path: str, query: str = "") -> tuple[str, bytes]:
    environ = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    return status[0], body


def test_single_objective_study_with_a_failed_trial(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_TEST_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("EVOMERGE_TEST_FAIL", "3")
    search = run_search(parse_experiment(yaml.safe_dump(experiment_dict(llama, tmp_path, n_trials=6))),
                        progress=False)
    trials = search.study.get_trials()
    assert [t.state for t in trials].count(TrialState.FAIL) == 1  # and warm-start recipes left waiting

    app = optuna_dashboard.wsgi(open_storage(search.storage_url))
    status, body = get(app, "/api/studies")
    assert status.startswith("200")
    [study] = json.loads(body)["study_summaries"]
    assert study["study_name"] == "t" and study["directions"] == ["maximize"]
    assert {a["key"] for a in study["user_attrs"]} >= {"experiment", "signature"}

    status, body = get(app, f"/api/studies/{study['study_id']}", "after=0")
    assert status.startswith("200")
    detail = json.loads(body)
    served = {t["number"]: t for t in detail["trials"]}
    assert sorted(served) == [t.number for t in trials]
    for trial in trials:
        attrs = {a["key"]: a["value"] for a in served[trial.number]["user_attrs"]}
        assert attrs.keys() == trial.user_attrs.keys()
        if trial.state != TrialState.WAITING:  # the decoded merge config and the scores, readable there
            records = trial_records(trial)
            assert attrs[PLAN] == records.plan and yaml.safe_load(attrs[PLAN])  # whole: a string is not cut
            candidate, result = json.loads(attrs[CANDIDATE]), json.loads(attrs[RESULT])
            assert candidate["worker"] == records.worker
            assert result.get("metrics") == records.metrics or result["failure"] == records.failure
        assert served[trial.number]["state"] == trial.state.name.capitalize()
    assert {t.state for t in trials} == {TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING}
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert [t["number"] for t in detail["best_trials"]] == [best.number]
    assert {p["name"] for p in detail["union_search_space"]} == set(search.space.distributions())

    for path in (f"/api/studies/{study['study_id']}/param_importances",
                 f"/api/studies/{study['study_id']}/plot/contour", "/dashboard"):
        status, _ = get(app, path)
        assert status.startswith("200"), (path, status)
    status, body = get(app, f"/csv/{study['study_id']}")
    rows = list(csv.reader(io.StringIO(body.decode())))
    assert status.startswith("200") and len(rows) == 1 + len(trials)


def test_multi_objective_study_shows_its_pareto_front(llama, tmp_path):
    metrics = {name: {"type": "callable", "function": f"{FUNCTIONS}:two_objectives", "key": name,
                      "direction": "maximize"} for name in ("first", "last")}
    data = experiment_dict(llama, tmp_path, sampler="nsga2", n_trials=6, metrics=metrics)
    data["fitness"]["objective"] = "separate"
    search = run_search(parse_experiment(yaml.safe_dump(data)), progress=False)
    app = optuna_dashboard.wsgi(open_storage(search.storage_url))
    [study] = json.loads(get(app, "/api/studies")[1])["study_summaries"]
    assert study["directions"] == ["maximize", "maximize"]
    detail = json.loads(get(app, f"/api/studies/{study['study_id']}", "after=0")[1])
    assert len(detail["trials"]) == len(search.study.trials)  # 6 run, the other warm-start recipes waiting
    assert sorted(t["number"] for t in detail["best_trials"]) == sorted(t.number for t in search.study.best_trials)
