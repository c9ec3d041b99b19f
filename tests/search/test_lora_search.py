"""A search whose sources are LoRA adapters (bare folders and BASE+ADAPTER): the materializer keeps
them low-rank, and the exported best merge, run by ``evomerge merge``, gives the evaluated weights."""

from __future__ import annotations

import torch
import yaml

from evomerge import merge
from evomerge.analysis.results import export_yaml, pick_trial
from evomerge.live.materializer import Materializer
from evomerge.search.driver import run_search
from evomerge.search.experiment import parse_experiment
from tests.conftest import read_folder
from tests.search.test_search import experiment_dict
from tests.search.test_search import test_log as test_log  # noqa: F401 (a fixture)


def test_search_over_adapters_exports_the_evaluated_weights(lora_family, tmp_path, test_log):
    family = lora_family("llama")
    sources = [*family.adapters[:2], f"{family.base}+{family.adapters[2]}"]
    search = run_search(parse_experiment(yaml.safe_dump(
        experiment_dict([family.base, *sources], tmp_path, n_trials=4, seed=3))), progress=False)
    assert sum(t.state.name == "COMPLETE" for t in search.study.trials) == 4
    best = pick_trial(search.study)
    exported = tmp_path / "best.yaml"
    exported.write_text(export_yaml(search.study, best))
    on_disk = read_folder(merge(exported, tmp_path / "merged", seed=3))
    materializer = Materializer(search.base, search.sources)
    assert len({path for path, _, role in materializer.inputs.kept if role}) == 3  # three adapters kept low-rank
    materializer.apply(search.decode(best.params), seed=3)
    live = materializer.state_dict()
    assert all(torch.equal(on_disk[name], live[name]) for name in on_disk)
