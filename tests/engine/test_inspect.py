"""The compatibility check (``evomerge inspect`` and the automatic check before merges).

Oracle for the statistics: the same numbers computed here directly from every tensor
(read with safetensors, independent of evomerge's reader), in float64.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from evomerge import merge_state_dict, parse_config
from evomerge.cli.main import main
from evomerge.engine.inspect import inspect_models
from evomerge.errors import ModelError
from tests.conftest import read_folder


@pytest.fixture(scope="module")
def family(llama):
    return [str(p) for p in llama]


@pytest.fixture(scope="module")
def stranger(family_factory):
    """A model of the same architecture and shapes, initialized separately (another seed)."""
    return str(family_factory("llama", sources=0)[0])


def test_flags_a_separately_initialized_model(family, stranger):
    base, ft1, ft2, _ = family
    report = inspect_models(base, [ft1, ft2, stranger])
    assert [s.verdict for s in report.stats] == ["ok", "ok", "unrelated"]
    # synthetic fine-tunes add Gaussian noise of 0.05 × each tensor's std
    assert all(0.04 < s.relative_norm < 0.06 and s.cosine_to_base > 0.99 for s in report.stats[:2])
    assert report.stats[2].relative_norm > 1.3 and abs(report.stats[2].cosine_to_base) < 0.05
    assert [s.path for s in report.flagged] == [stranger]


def test_statistics_match_a_direct_computation(family):
    base, *sources = family
    report = inspect_models(base, sources)
    tensors = [read_folder(p) for p in family]
    matrices = [n for n, t in tensors[0].items() if t.dim() >= 2]
    flat = [torch.cat([t[n].double().flatten() for n in matrices]) for t in tensors]
    taus = [f - flat[0] for f in flat[1:]]
    for stats, tau, source in zip(report.stats, taus, flat[1:]):
        assert stats.relative_norm == pytest.approx(float(tau.norm() / flat[0].norm()), rel=1e-5)
        assert stats.cosine_to_base == pytest.approx(float(source @ flat[0] / source.norm() / flat[0].norm()),
                                                     rel=1e-5)
    cosine = float(taus[0] @ taus[1] / taus[0].norm() / taus[1].norm())
    assert report.cosines[0][1] == pytest.approx(cosine, rel=1e-4, abs=1e-6)
    layer = [n for n in matrices if n.startswith("model.layers.2.")]
    signs = torch.stack([torch.cat([(t[n].double() - tensors[0][n].double()).sign().flatten() for n in layer])
                         for t in tensors[1:]])
    positive, negative = (signs > 0).sum(0), (signs < 0).sum(0)
    expected = int(((positive > 0) & (negative > 0)).sum()) / int((positive + negative >= 2).sum())
    group = next(g for g in report.groups if g.label == "layer 2")
    assert group.sign_conflicts == pytest.approx(expected, rel=1e-9)


def test_reports_vocabulary_differences(family, tmp_path):
    base, ft1 = family[:2]
    cropped = tmp_path / "cropped"
    shutil.copytree(ft1, cropped)
    tensors = read_folder(ft1)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = tensors[name][:-3].contiguous()
    save_file(tensors, str(cropped / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((cropped / "config.json").read_text())
    (cropped / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] - 3}))
    result = CliRunner().invoke(main, ["inspect", base, str(cropped), "-q"])
    assert result.exit_code == 0, result.output
    assert f"vocabulary rows differ: base {config['vocab_size']}, cropped {config['vocab_size'] - 3}" in result.output
    assert "ok" in result.output


def test_cli_table_and_strict_exit(family, stranger):
    base, ft1 = family[:2]
    result = CliRunner().invoke(main, ["inspect", base, ft1, stranger, "-q"])
    assert result.exit_code == 0, result.output
    for fragment in ("‖τ‖/‖θ_base‖", "cosine between task vectors", "layer 3", "sign conflicts",
                     f"error: {stranger} does not look fine-tuned from the base"):
        assert fragment in result.output
    strict = CliRunner().invoke(main, ["inspect", base, ft1, stranger, "-q", "--strict"])
    assert strict.exit_code == 2
    assert strict.stderr == f"error: {stranger} does not look fine-tuned from {base}\n"


def test_structural_mismatch_is_an_error(family, family_factory):
    gpt2 = str(family_factory("gpt2", sources=0)[0])
    with pytest.raises(ModelError, match="different architectures"):
        inspect_models(family[0], [gpt2])
    result = CliRunner().invoke(main, ["inspect", family[0], gpt2])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_merge_warns_about_an_unrelated_source(family, stranger, caplog):
    base, ft1 = family[:2]

    def config(source: str):
        return parse_config(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                            f"  - model: {ft1}\n    parameters: {{weight: 1.0}}\n"
                            f"  - model: {source}\n    parameters: {{weight: 1.0}}\n")

    with caplog.at_level(logging.WARNING, logger="evomerge.engine.inspect"):
        merge_state_dict(config(family[2]))
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="evomerge.engine.inspect"):
        merge_state_dict(config(stranger))
    assert [r.getMessage().split(" does not look")[0] for r in caplog.records] == [stranger]
