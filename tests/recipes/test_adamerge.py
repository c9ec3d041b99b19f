"""AdaMerging: exact entropy gradients, a short run lowers the entropy, the export reproduces
the learned merge, the start from a study's trial, the command and the zoo table script."""

from __future__ import annotations

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner

from evomerge.cli.main import main
from evomerge.engine.config import parse_config
from evomerge.errors import ConfigError
from evomerge.live.materializer import Materializer
from evomerge.recipes.adamerge import AdaMerger, AdaMergeSettings
from evomerge.recipes.adamerge_inputs import trial_start
from tests.recipes.test_subtract import mini_zoo, quick_fitness, run_script

PROMPTS = ["The quick brown fox", "12 + 30 =", "Merging models:", "task arithmetic", "jumps over the lazy dog"]


@pytest.fixture(scope="module")
def family(llama):
    return [str(p) for p in llama]


@pytest.fixture(scope="module")
def merger(family):
    return AdaMerger(family[0], family[1:], granularity="layer", answer_tokens=3)


def test_entropy_gradient_matches_central_differences(family_factory):
    """Tolerance: 1e-6 of the largest gradient entry. Everything runs in float64 on GPT-2, whose
    layers do not upcast to float32 (Llama's RMSNorm does, which would put float32 rounding noise
    of ~1e-7 nats into every difference quotient); the central difference's truncation error is
    O(eps²·f''') ≈ 1e-8 relative at eps = 1e-4 and its rounding error ≈ 1e-16 / 1e-4 nats, far below."""
    family = [str(p) for p in family_factory("gpt2", sources=2)]
    merger = AdaMerger(family[0], family[1:], granularity="layer", dtype=torch.float64, answer_tokens=3)
    coefficients = merger.uniform(0.3) + 0.2 * torch.rand(merger.uniform(0).shape,
                                                          generator=torch.Generator().manual_seed(0),
                                                          dtype=torch.float64)
    ids, lengths = merger.answer_batch(coefficients, merger.encode(PROMPTS))
    variable = coefficients.clone().requires_grad_(True)
    merger.entropy(variable, ids, lengths).backward()
    eps, numeric = 1e-4, torch.zeros_like(coefficients)
    for index in range(coefficients.numel()):
        step = torch.zeros(coefficients.numel(), dtype=torch.float64)
        step[index] = eps
        step = step.view_as(coefficients)
        numeric.view(-1)[index] = (merger.entropy(coefficients + step, ids, lengths)
                                   - merger.entropy(coefficients - step, ids, lengths)) / (2 * eps)
    assert variable.grad.abs().max() > 0
    assert torch.allclose(variable.grad, numeric, rtol=0, atol=1e-6 * float(numeric.abs().max()))


def test_short_run_lowers_the_entropy(merger):
    settings = AdaMergeSettings(steps=15, lr=0.05, batch_size=3, bounds=(0.0, 1.0), seed=0)
    result = merger.train(PROMPTS, merger.uniform(0.3), settings)
    assert len(result.history) == 15
    assert ((result.coefficients >= 0) & (result.coefficients <= 1)).all()
    assert merger.mean_entropy(result.coefficients, PROMPTS) < merger.mean_entropy(result.start, PROMPTS)


def test_exported_config_reproduces_the_learned_merge(merger, family):
    coefficients = torch.rand(merger.uniform(0).shape, generator=torch.Generator().manual_seed(1))
    config = merger.config(coefficients)
    materializer = Materializer(family[0], family[1:])
    live = dict(materializer.apply(parse_config(config.to_yaml())).named_parameters())
    for name, tensor in merger.merged(coefficients).items():
        assert torch.allclose(live[name], tensor, atol=1e-6), name
    assert torch.allclose(merger.from_config(config), coefficients, atol=1e-6)


def test_start_from_a_study_trial(merger, family, tmp_path):
    base, sources = family[0], family[1:]
    slices = [{"sources": [*({"model": s, "layer_range": [i, i + 1], "parameters": {"weight": 0.1 * (i + k)}}
                             for k, s in enumerate(sources)), {"model": base, "layer_range": [i, i + 1]}]}
              for i in range(4)]
    plan = {"merge_method": "task_arithmetic", "base_model": base, "slices": slices, "parameters": {"lambda": 0.5}}
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="s", storage=storage)
    study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={"plan": yaml.safe_dump(plan)}))
    start = trial_start(merger, "s", storage)
    expected = torch.tensor([[0.05 * (i + k) for i in range(4)] for k in range(3)])
    assert torch.allclose(start[:, :4], expected, atol=1e-7)  # the decoder layers
    outside = {name: start[:, 4 + i] for i, name in enumerate(merger.outside)}
    assert torch.allclose(outside["model.embed_tokens.weight"], expected[:, 0])  # the first slice's
    assert torch.allclose(outside["lm_head.weight"], expected[:, 3])  # the last slice's
    with pytest.raises(ConfigError, match="task_arithmetic merges, not ties"):
        merger.from_config(parse_config(yaml.safe_dump({**plan, "merge_method": "ties"})))


def test_adamerge_command(family, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({"name": "t", "models": {"base": family[0], "sources": family[1:]},
                                          "search_space": "ps_ties", "fitness": "unused.yaml"}))
    out = tmp_path / "ada.yaml"
    result = CliRunner().invoke(main, ["adamerge", str(experiment), "-o", str(out), "--prompts", "prompts.txt",
                                       "--steps", "3", "--granularity", "task", "-q"])
    assert result.exit_code == 0, result.output
    assert "nats; merge written to" in result.output
    config = parse_config(out.read_text())
    assert config.merge_method == "task_arithmetic" and len(config.models) == 3
    bad = CliRunner().invoke(main, ["adamerge", str(experiment), "-o", str(out), "--prompts", "missing.txt"])
    assert bad.exit_code == 2 and "missing.txt: cannot read prompts" in bad.stderr


def test_zoo_table_script_on_the_mini_zoo(tmp_path_factory, tmp_path, capsys):
    zoo = mini_zoo(tmp_path_factory)
    assert run_script("zoo_adamerge", [str(zoo), "--fitness", str(quick_fitness(tmp_path)), "--steps", "3",
                                       "--output", str(tmp_path / "ada.yaml"), "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[header].split() == ["model", "H", "search", "H", "test", "increment", "reverse", "dates",
                                     "general_ppl", "mean", "skill"]
    assert [line.split()[0] for line in lines[header + 1:header + 3]] == ["start", "AdaMerging"]
    assert parse_config((tmp_path / "ada.yaml").read_text()).merge_method == "task_arithmetic"
