"""A trial's records read the same through ``trial_records`` whether they are packed in the
``candidate``, ``plan`` and ``result`` user attributes or stored one attribute per record (studies
written before they were packed), and so do the readers of finished studies built on it."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from evomerge.analysis.report import trials_frame
from evomerge.analysis.results import export_yaml, summarize
from evomerge.search.records import CANDIDATE, RESULT, TrialRecords, records_from, trial_records
from evomerge.search.records import PLAN as PLAN_KEY

PLAN = "merge_method: ties\nbase_model: base\n"
CANDIDATE_RECORDS = {"worker": "host:12", "device": "cpu", "seed": 3, "plan_hash": "abc"}
RESULT_RECORDS = {"metrics": {"skill": 0.5, "ppl": 7.0}, "time_materialize_s": 0.25, "time_fitness_s": 1.5}
EXPECTED = TrialRecords(worker="host:12", device="cpu", seed=3, plan_hash="abc", plan=PLAN,
                        metrics={"skill": 0.5, "ppl": 7.0}, time_materialize_s=0.25, time_fitness_s=1.5)


def packed(candidate: dict | None = None, result: dict | None = None, **more) -> dict:
    """User attributes as the loop writes them (the plan with the candidate)."""
    return {**({CANDIDATE: candidate, PLAN_KEY: PLAN} if candidate is not None else {}),
            **({RESULT: result} if result is not None else {}), **more}


OLD = {**CANDIDATE_RECORDS, "plan": PLAN}  # one attribute per record


def test_packed_and_one_attribute_per_record_read_the_same():
    assert records_from(packed(CANDIDATE_RECORDS, RESULT_RECORDS)) == EXPECTED
    assert records_from({**OLD, **RESULT_RECORDS}) == EXPECTED
    failed = packed(CANDIDATE_RECORDS, {"failure": "worker 12 died mid-trial"}, warm_start=True)
    assert records_from(failed) == TrialRecords(**OLD, failure="worker 12 died mid-trial", warm_start=True)
    reused = records_from(packed(CANDIDATE_RECORDS, {"metrics": {"skill": 0.5}, "same_plan_as": 4}))
    assert reused.same_plan_as == 4 and reused.time_fitness_s is None


def test_a_trial_with_no_records_reads_as_empty():
    assert records_from({}) == TrialRecords()
    assert records_from({"warm_start": True}) == TrialRecords(warm_start=True)
    assert records_from(packed(result={"failure": "interrupted"})).plan is None
    assert records_from({"metrics": None}).metrics == {}


def test_a_running_trial_reads_its_own_records(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    trial = study.ask()
    trial.set_user_attr(CANDIDATE, CANDIDATE_RECORDS)
    trial.set_user_attr(PLAN_KEY, PLAN)
    assert trial_records(trial).worker == "host:12"
    assert trial_records(study.get_trials()[0]).plan == PLAN


def study_of(folder, attrs_per_trial: list[dict]) -> optuna.Study:
    folder.mkdir()
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{folder / 's.db'}", direction="maximize")
    study.set_user_attr("mergekit_compatible", True)
    for i, attrs in enumerate(attrs_per_trial):
        failed = "failure" in attrs or "failure" in attrs.get(RESULT, {})
        study.add_trial(create_trial(state=TrialState.FAIL if failed else TrialState.COMPLETE,
                                     value=None if failed else 0.5 + i, params={"x": 0.1 * i},
                                     distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
                                     user_attrs=attrs))
    return study


@pytest.mark.parametrize("reader", ["summarize", "export", "csv"])
def test_the_readers_give_the_same_for_a_packed_study_and_one_written_one_attribute_per_record(tmp_path, reader):
    failure = {"failure": "ValueError: boom"}
    old = study_of(tmp_path / "old", [{**OLD, **RESULT_RECORDS, "warm_start": True},
                                   {**OLD, **RESULT_RECORDS}, {**OLD, **failure}])
    new = study_of(tmp_path / "new", [
        packed(CANDIDATE_RECORDS, RESULT_RECORDS, warm_start=True), packed(CANDIDATE_RECORDS, RESULT_RECORDS),
        packed(CANDIDATE_RECORDS, failure)])
    if reader == "summarize":
        assert summarize(new) == summarize(old)
        assert "3.5 s in trials (0.5 s materializing)" in summarize(new) and "ValueError: boom" in summarize(new)
    elif reader == "export":
        assert export_yaml(new, new.best_trial) == export_yaml(old, old.best_trial)
        assert export_yaml(new, new.best_trial).endswith(PLAN) and "--seed 3" in export_yaml(new, new.best_trial)
    else:
        frames = [trials_frame(study) for study in (old, new)]
        assert frames[0].columns.tolist() == frames[1].columns.tolist()
        assert frames[0].drop(columns=["datetime_start", "datetime_complete", "duration"]).equals(
            frames[1].drop(columns=["datetime_start", "datetime_complete", "duration"]))
        assert frames[1]["user_attrs_plan"].tolist() == [PLAN] * 3
        assert f"user_attrs_{CANDIDATE}" not in frames[1].columns and f"user_attrs_{RESULT}" not in frames[1].columns
