"""Replaying racing on a synthetic finished study (evomerge.analysis.replay and
benchmarks/racing_replay.py): items and tokens it would have scored, and the false-drop count."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState, create_trial

from evomerge.analysis.replay import rank_correlation, replay_racing
from evomerge.fitness import Fitness, Racing
from evomerge.fitness.racing import in_data_order
from evomerge.search.records import RESULT, encode_items
from tests.fitness.test_racing import Exact, Items

N = 64
REPO = Path(__file__).resolve().parents[2]


def result(a_in_racing_order: list[float], seed: int = 0, extra: float = 1.0) -> dict:
    """A fully evaluated trial's result record, its items given in racing order (seed)."""
    data = list(in_data_order(a_in_racing_order, seed))
    return {"metrics": {"a": float(np.mean(data)), "extra": extra}, "items": {"a": encode_items(data)},
            "scored": {"a": {"items": N, "of": N, "tokens": 5 * N, "seconds": 0.1},
                       "extra": {"items": 1, "of": 1, "tokens": 100, "seconds": 0.5}}}


def half() -> list[float]:
    return [float(i % 2) for i in range(N)]


def winner(late: bool) -> list[float]:
    """Better than ``half`` in full (0.625); ``late``: with nothing right among its first 24 items
    (an order a random permutation gives about once in 10^9), else with its right items spread."""
    return [0.0] * 24 + [1.0] * 40 if late else [float(i % 8 < 5) for i in range(N)]


def synthetic_study(late: bool = False) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    rows = [half(), [0.0] * N, [float(i % 8 == 0) for i in range(N)], winner(late), [1.0] * N]
    for values in rows:
        study.add_trial(create_trial(value=float(np.mean(values)), params={}, distributions={},
                                     user_attrs={RESULT: result(values)}))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={}, distributions={}))  # not replayable
    return study


def fitness() -> Fitness:
    return Fitness([Items("a", {}), Exact("extra", {}, weight=0.0)])


def test_replay_stops_the_hopeless_and_counts_items_and_tokens():
    replay = replay_racing(synthetic_study(), fitness(), Racing(first=8, confidence=0.99))
    assert replay.skipped == [5]
    by_number = {t.number: t for t in replay.trials}
    assert not by_number[0].stopped and by_number[0].items == N + 1  # nothing to race against: in full
    assert by_number[1].stopped and by_number[1].items < N / 2 and by_number[1].tokens == 5 * by_number[1].items
    assert by_number[1].full_items == N + 1 and by_number[1].full_tokens == 5 * N + 100  # weight 0: not scored
    assert not by_number[3].stopped and not by_number[4].stopped and replay.false_drops == []
    totals = replay.totals()
    assert totals["stopped"] == sum(t.stopped for t in replay.trials) >= 2
    assert totals["items_ratio"] > 1 and totals["tokens_ratio"] > 1
    assert "0 false drops" in replay.summary()


def test_replay_counts_a_false_drop():
    """A winner whose first items are all wrong is dropped (the bound holds for random orders, and
    this one is not): the replay counts it, as it would count a bound that failed."""
    replay = replay_racing(synthetic_study(late=True), fitness(), Racing(first=8, confidence=0.99))
    assert replay.false_drops == [3]  # it would have become the incumbent
    assert replay.largest_lead == replay.trials[3].lead == 0.625 - 0.5
    assert "1 false drops (trials 3)" in replay.summary()
    assert replay_racing(synthetic_study(late=True), fitness(), Racing(first=N)).false_drops == []  # no early look


def ones(*ranges: tuple[int, int]) -> list[float]:
    """N values in racing order, 1 on the given [start, stop) ranges of positions."""
    return [float(any(start <= i < stop for start, stop in ranges)) for i in range(N)]


def screening_study() -> optuna.Study:
    """Trials 0 and 1 (0.625 each) both have positions 0-31 right and 48-63 wrong and split
    32-47; trial 2 has only 0-31; trial 3 (0.656) loses 32-39 to trial 0 and wins 48-57, which
    both got wrong; trial 4 has every item."""
    study = optuna.create_study(direction="maximize")
    rows = [ones((0, 40)), ones((0, 32), (40, 48)), ones((0, 32)), ones((0, 32), (48, 58)), ones((0, N))]
    for values in rows:
        study.add_trial(create_trial(value=float(np.mean(values)), params={}, distributions={},
                                     user_attrs={RESULT: result(values)}))
    return study


def test_replay_screens_once_its_pool_is_full_and_keeps_a_winner_on_items_all_got_wrong():
    """screen=2: from the third trial on, a trial is raced on all items but the 32 both kept
    trials have right. Trial 2 is behind there and stopped after those 32; trial 3 is behind on
    the items the two split but ahead on items both got wrong: a winner, kept (screening that
    left out every agreed item would have dropped it)."""
    replay = replay_racing(screening_study(), fitness(), Racing(first=N, screen=2))
    by_number = {t.number: t for t in replay.trials}
    assert not by_number[0].stopped and not by_number[1].stopped  # a tie is not stopped; the pool fills
    assert by_number[2].stopped and by_number[2].items == N // 2 and by_number[2].tokens == 5 * N // 2
    # stopped on the exact decision after all 32 informative items, 8 items (0.125) behind trial 0
    assert by_number[2].exact_stop and by_number[2].behind == 0.625 - 0.5
    assert replay.totals()["exact_stops"] == 1 and replay.totals()["exact_stops_median_behind"] == 0.125
    assert "1 only once every informative item was scored, a median 0.125 behind" in replay.summary()
    assert not by_number[3].stopped and by_number[3].items == N + 1 and replay.false_drops == []
    assert not by_number[4].stopped and "0 false drops" in replay.summary()


def test_replay_stops_a_survivor_on_the_left_out_items_it_lost():
    """Trial 2 is 8 items ahead of trial 0 on the informative items (32-63) and has lost positions
    0-23 of the left-out ones: with chunks of 8, it is level after 8 of them and stopped after 16."""
    study = optuna.create_study(direction="maximize")
    for values in [ones((0, 40)), ones((0, 32), (40, 48)), ones((24, 48))]:
        study.add_trial(create_trial(value=float(np.mean(values)), params={}, distributions={},
                                     user_attrs={RESULT: result(values)}))
    replay = replay_racing(study, fitness(), Racing(first=8, screen=2))
    slip = replay.trials[2]
    assert slip.stopped and slip.items == 48 and slip.tokens == 5 * 48 and replay.false_drops == []


def test_replay_with_anchors_stops_a_predicted_loser_after_its_anchors():
    """screen=2, anchors=1: of the 32 informative items (screening_study), the 16 that every
    trial got wrong are the largest group scored alike, so one anchor among them (position 48)
    predicts them all. Trial 2 has a 0 there: predicted wrong on every informative item, stopped
    after one item; trial 3 has a 1 there, goes on, and is kept."""
    replay = replay_racing(screening_study(), fitness(), Racing(first=N, screen=2, anchors=1))
    by_number = {t.number: t for t in replay.trials}
    assert by_number[2].stopped and by_number[2].items == 1  # 0 at the anchor: predicted all wrong
    assert not by_number[2].exact_stop  # a prediction, before the informative items were scored
    plain = replay_racing(screening_study(), fitness(), Racing(first=N, screen=2))
    assert plain.trials[2].stopped and plain.trials[2].items == N // 2  # without anchors: every informative item
    assert not by_number[3].stopped and by_number[3].items == N + 1  # right at the anchor: scored in full
    assert "anchors=1" in replay.summary()


def test_replay_reports_a_stopped_trials_estimate_and_the_probe_corrects_it():
    """Trial 2 loses left-out positions 0-7 and every informative item (32-63). Without a probe
    its estimate takes the references' 1 on all 32 left-out items (0.5 against its 0.375); with
    ``probe=8`` it scores positions 0-7 first and its estimate takes its mean there (0) for the
    left-out items it did not score: the probe is what tells the sampler about such losses."""
    study = optuna.create_study(direction="maximize")
    for values in [ones((0, 40)), ones((0, 32), (40, 48)), ones((8, 32)), ones((0, 32)), ones((0, 36))]:
        study.add_trial(create_trial(value=float(np.mean(values)), params={}, distributions={},
                                     user_attrs={RESULT: result(values)}))
    plain = replay_racing(study, fitness(), Racing(first=N, screen=2))
    assert plain.trials[2].stopped and plain.trials[2].estimate == 0.5 and plain.trials[2].value == 0.375
    probed = replay_racing(study, fitness(), Racing(first=N, screen=2, probe=8))
    assert probed.trials[2].stopped and probed.trials[2].items == 8 + 32 and probed.trials[2].estimate == 0.0
    # trials 3 and 4 have every left-out item right: the probe changes nothing for them
    assert [t.estimate for t in probed.trials[3:]] == [t.estimate for t in plain.trials[3:]] == [0.5, 0.5625]
    bias, correlation = plain.estimate_error()
    assert bias == np.mean([0.5 - 0.375, 0.0, 0.0])
    assert correlation == rank_correlation([0.5, 0.5, 0.5625], [0.375, 0.5, 0.5625]) < 1  # a tie where there is none
    assert probed.estimate_error() == (np.mean([0.0 - 0.375, 0.0, 0.0]), 1.0)
    assert "rank correlation with their values" in probed.summary() and "probe=8" in probed.summary()


def test_rank_correlation_closed_forms():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert rank_correlation([1, 2, 3], [1, 3, 2]) == 0.5  # Spearman: 1 - 6·2 / (3·8)
    assert rank_correlation([1, 1, 2], [1, 2, 3]) == np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1]  # a tie: mean rank


def test_replay_leaves_out_references_with_other_item_counts_as_a_search_does():
    """A study whose item count changed (a new ``limit``): trials of the other count are never
    references or in the screening pool, and nothing fails."""
    study = synthetic_study()
    short = [1.0] * (N // 2)
    record = result(short + [0.0] * (N // 2))
    record["items"] = {"a": encode_items(short)}
    study.add_trial(create_trial(value=1.0, params={}, distributions={}, user_attrs={RESULT: record}))
    study.add_trial(create_trial(value=0.5, params={}, distributions={}, user_attrs={RESULT: result(half())}))
    replay = replay_racing(study, fitness(), Racing(first=8, screen=2))
    by_number = {t.number: t for t in replay.trials}
    assert not by_number[6].stopped  # nothing of its count to race against: in full
    # raced against trial 4 (all ones, the first of the equal bests; the short trial is left out),
    # and stopped on the items trial 4 and the pool have right: it lost them
    assert by_number[7].stopped and by_number[7].items < N


def test_replay_script_prints_and_writes_rows(tmp_path, monkeypatch, capsys):
    """The script on a study in SQLite, its fitness replaced (the experiment's models are not needed)."""
    storage = f"sqlite:///{tmp_path}/s.db"
    source = synthetic_study()
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.add_trials(source.get_trials())
    experiment = tmp_path / "e.yaml"
    experiment.write_text("name: s\nmodels: {base: b, sources: [a]}\nsearch_space: ps_ties\nfitness: f.yaml\n"
                          f"storage: {storage}\n")
    module = runpy.run_path(str(REPO / "benchmarks" / "racing_replay.py"), run_name="replay")
    monkeypatch.setitem(module["main"].__globals__, "load_fitness", lambda spec: fitness())
    rows = module["main"]([str(experiment), "--first", "8", "--confidence", "0.99", "--confidence", "0.05",
                           "--json", str(tmp_path / "rows.json")])
    assert [r["confidence"] for r in rows] == [0.99, 0.05] and rows[0]["false_drops"] == 0
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    assert capsys.readouterr().out.count("false drops") == 2
