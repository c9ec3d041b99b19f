"""Model soups: the greedy soup is never worse than the best single ingredient on the validation split.

Property over seeds × fitness callables (smooth, piecewise-constant with ties, and one that
rewards averaging). The oracle re-scores independently of the soup code: every ingredient
loaded from its folder by ``transformers``, and the returned soup config merged by the
engine (``merge_state_dict``) into a fresh model.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from evomerge import merge_state_dict
from evomerge.cli.main import main
from evomerge.fitness import Fitness
from evomerge.fitness.callable import CallableMetric
from evomerge.live.materializer import Materializer
from evomerge.recipes.soup import SoupScorer, greedy_soup, soup_config, uniform_soup
from tests.conftest import read_folder


def log_likelihood(seed: int):
    """Mean log-probability of random target tokens after random inputs (smooth)."""
    generator = torch.Generator().manual_seed(seed)
    ids, targets = torch.randint(3, 256, (2, 2, 12), generator=generator)

    def score(model, tokenizer, split):
        log_p = model(input_ids=ids).logits.log_softmax(-1)
        return float(log_p.gather(-1, targets[..., None]).mean())
    return score


def argmax_agreement(seed: int):
    """Share of positions whose greedy token is a fixed random target (steps and ties)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (4, 16), generator=generator)

    def score(model, tokenizer, split):
        targets = (ids * (seed + 7)) % 256
        return float((model(input_ids=ids).logits.argmax(-1) == targets).float().mean())
    return score


def closeness_to_a_blend(seed: int, ingredients: list[str]):
    """−‖W − target‖ for one weight matrix, target a random convex blend of the ingredients'."""
    name = "model.layers.1.self_attn.q_proj.weight"
    mix = torch.rand(len(ingredients), generator=torch.Generator().manual_seed(seed))
    target = sum(m / mix.sum() * read_folder(p)[name] for m, p in zip(mix, ingredients))

    def score(model, tokenizer, split):
        return -float((model.get_parameter(name) - target).norm())
    return score


def fitness_of(function) -> Fitness:
    return Fitness([CallableMetric("score", function, "test", direction="maximize", weight=1.0)])


@pytest.fixture(scope="module")
def ingredients(llama):
    return [str(p) for p in llama]  # base and three fine-tunes


@pytest.fixture(scope="module")
def materializer(ingredients):
    return Materializer(ingredients[0], ingredients[1:])


@pytest.fixture(scope="module")
def loaded(ingredients):
    return [AutoModelForCausalLM.from_pretrained(p).eval() for p in ingredients]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["log_likelihood", "argmax_agreement", "closeness_to_a_blend"])
def test_greedy_soup_is_never_worse_than_the_best_ingredient(kind, seed, ingredients, materializer, loaded):
    function = (closeness_to_a_blend(seed, ingredients) if kind == "closeness_to_a_blend"
                else globals()[kind](seed))
    result = greedy_soup(SoupScorer(materializer, fitness_of(function)), ingredients)
    with torch.no_grad():
        singles = [function(model, None, split="search") for model in loaded]
        fresh = AutoModelForCausalLM.from_pretrained(ingredients[0]).eval()
        fresh.load_state_dict(merge_state_dict(result.config))
        soup_score = function(fresh, None, split="search")
    assert soup_score == pytest.approx(result.objective, abs=1e-6)
    assert soup_score >= max(singles) - 1e-6
    assert [s.model for s in result.steps] == sorted(ingredients, key=lambda p: -singles[ingredients.index(p)])
    assert result.ingredients == [s.model for s in result.steps if s.added]


def test_soup_configs(ingredients, materializer):
    config = soup_config(ingredients[1:3], "float32")
    assert yaml.safe_load(config.to_yaml()) == {
        "merge_method": "linear", "models": [{"model": p, "parameters": {"weight": 1.0}} for p in ingredients[1:3]],
        "parameters": {"normalize": True}, "dtype": "float32"}
    merged, source = merge_state_dict(soup_config(ingredients[2:3])), read_folder(ingredients[2])
    assert all(torch.equal(merged[n], source[n]) for n in source)  # a soup of one is the model
    mean = uniform_soup(SoupScorer(materializer, fitness_of(lambda m, t, split: 0.0)), ingredients[1:])
    averaged = merge_state_dict(mean.config)
    tensors = [read_folder(p) for p in ingredients[1:]]
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(averaged[name], sum(t[name] for t in tensors) / 3, atol=1e-7)


def cli_score(model, tokenizer, split):
    return -float(model.get_parameter("model.norm.weight").sum())


def test_soup_command(ingredients, tmp_path):
    fitness = tmp_path / "fitness.yaml"
    fitness.write_text("metrics:\n  s: {type: callable, function: 'tests.recipes.test_soup:cli_score', "
                       "direction: maximize}\n")
    out = tmp_path / "soup.yaml"
    result = CliRunner().invoke(main, ["soup", *ingredients[1:], "--base", ingredients[0], "--fitness",
                                       str(fitness), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "kept" in result.output and f"config written to {out}" in result.output
    config = yaml.safe_load(out.read_text())
    assert config["merge_method"] == "linear" and config["models"]
    fitness.write_text(fitness.read_text() + "  t: {type: callable, function: 'tests.recipes.test_soup:cli_score', "
                       "direction: minimize}\nobjective: separate\n")
    bad = CliRunner().invoke(main, ["soup", *ingredients[1:], "--fitness", str(fitness), "-o", str(out), "-q"])
    assert bad.exit_code == 2 and "a soup needs one objective" in bad.stderr and bad.stderr.count("\n") == 1
