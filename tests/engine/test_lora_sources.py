"""LoRA adapters as merge sources in the engine: ``evomerge merge``, mergekit's ``model+lora``
form, ``evomerge inspect``.

Oracles: (1) the same merge over PEFT's ``merge_and_unload`` of each adapter saved as a full
folder — the adapter view forms those very tensors (``tests/io/test_adapter.py``), so the
merges must be equal bit for bit; (2) ``mergekit-yaml`` on the same config (mergekit 0.1.5
merges each ``model+lora`` with PEFT into its ``--lora-merge-cache``, then merges): float32,
``atol=1e-6`` as in ``test_mergekit_parity.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from evomerge import merge, merge_state_dict, parse_config
from evomerge.cli.main import main
from evomerge.engine.inspect import inspect_models
from tests.conftest import read_folder


def configs(base: str, sources: list[str]) -> dict[str, dict]:
    a, b, c = sources
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": [1.0, 0.3]}}, {"model": b, "parameters": {"weight": 0.5}},
            {"model": base, "parameters": {"weight": 0.2}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": [0.5, 1.0]}}, {"model": b, "parameters": {"weight": -0.3}},
            {"model": c, "parameters": {"weight": 0.8}}]},
        "ties": {"merge_method": "ties", "base_model": base, "models": [
            {"model": m, "parameters": {"weight": w, "density": d}}
            for m, w, d in [(a, 0.7, 0.5), (b, 0.4, [0.3, 0.9]), (c, 1.0, 0.6)]]},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": [
            {"model": m, "parameters": {"weight": 0.6, "density": 0.7}} for m in (a, b, c)]},
        "slerp": {"merge_method": "slerp", "base_model": base,
                  "models": [{"model": base}, {"model": a}], "parameters": {"t": [0.2, 0.8]}},
    }


def as_config(data: dict):
    return parse_config(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "slerp"])
def test_adapters_merge_like_their_merged_folders(lora_family, arch, method):
    family = lora_family(arch)
    bare = configs(family.base, family.adapters)[method]
    plus = configs(family.base, [f"{family.base}+{a}" for a in family.adapters])[method]
    dense = merge_state_dict(as_config(configs(family.base, family.dense)[method]), seed=4)
    for data in (bare, plus):
        ours = merge_state_dict(as_config(data), seed=4)
        assert set(ours) == set(dense)
        for name, tensor in dense.items():
            assert torch.equal(ours[name], tensor), f"{method}: {name}"


def test_cli_merge_of_model_plus_lora_writes_a_loadable_model(lora_family, tmp_path):
    from transformers import AutoModelForCausalLM

    family = lora_family("llama")
    config = configs(family.base, [f"{family.base}+{a}" for a in family.adapters])["task_arithmetic"]
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "merge.yml"), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "tokenizer.json").exists()  # the base's, not the adapter folder's
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model(torch.randint(0, 256, (1, 6))).logits.isfinite().all()


def test_mergekit_parity_model_plus_lora(lora_family, tmp_path):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    family = lora_family("llama")
    for method in ("linear", "task_arithmetic", "ties", "slerp"):
        data = dict(configs(family.base, [f"{family.base}+{a}" for a in family.adapters])[method], dtype="float32")
        text = yaml.safe_dump(data, sort_keys=False)
        ours = read_folder(merge(parse_config(text), tmp_path / f"evomerge-{method}"))
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / f"mergekit-{method}"),
                  MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False,
                               lora_merge_cache=str(tmp_path / "lora-cache")))
        theirs = read_folder(tmp_path / f"mergekit-{method}")
        assert set(ours) == set(theirs), method
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6,
                                       msg=lambda m, name=name, method=method: f"{method} {name}: {m}")
    assert len(list((tmp_path / "lora-cache").iterdir())) == 3  # mergekit merged each adapter with PEFT


def test_inspect_on_adapters(lora_family):
    family = lora_family("llama")
    report = inspect_models(family.base, family.adapters)
    dense = inspect_models(family.base, family.dense)
    assert [s.verdict for s in report.stats] == ["ok"] * 3
    for ours, theirs in zip(report.stats, dense.stats):
        assert ours.relative_norm == pytest.approx(theirs.relative_norm, rel=1e-12)
    result = CliRunner().invoke(main, ["inspect", family.base, *family.adapters, "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["sources"] == family.adapters
    result = CliRunner().invoke(main, ["inspect", family.base, f"{family.base}+{family.adapters[1]}", "-q"])
    assert result.exit_code == 0 and "verdict" in result.output, result.output


def test_cli_errors_name_the_adapter_file(lora_family, tmp_path):
    family = lora_family("llama")
    broken = tmp_path / "dora"
    broken.mkdir()
    config = json.loads((Path(family.adapters[0]) / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    result = CliRunner().invoke(main, ["inspect", family.base, str(broken), "-q"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and f"{broken}/adapter_config.json: use_dora" in result.output
