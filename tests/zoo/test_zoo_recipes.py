"""benchmarks/zoo_recipes.py on the mini zoo: the merges it scores, its retuning, its errors.

The mini zoo's specialists score 0 on every skill, so these tests check the script's merges
and plumbing; the landscape itself is measured on the real zoo (see the README's zoo section).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import read_folder
from tests.recipes.test_subtract import load_script, mini_zoo, run_script

SKILLS = ("increment", "reverse", "dates")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return mini_zoo(tmp_path_factory)


@pytest.fixture(scope="module")
def script():
    return load_script("zoo_recipes")


def test_per_group_weights_are_the_closed_form(zoo, script):
    from transformers import AutoTokenizer, LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(zoo / "base").eval()
    tuned = {s: LlamaForCausalLM.from_pretrained(zoo / s).eval() for s in SKILLS}
    landscape = script.Landscape(base, tuned, AutoTokenizer.from_pretrained(zoo / "base"), items=2)
    scores = landscape.score({("increment", "layers.1.mlp."): 0.5, "reverse": 0.0,
                              ("dates", "layers.0.self_attn."): 2.0})
    assert set(scores) == set(SKILLS) and all(0.0 <= v <= 1.0 for v in scores.values())
    theta = {name: read_folder(zoo / name) for name in ("base", *SKILLS)}
    live = landscape.live.state_dict()
    for name, tensor in theta["base"].items():
        w_inc = 0.5 if "layers.1.mlp." in name else 1.0
        w_dates = 2.0 if "layers.0.self_attn." in name else 1.0
        expected = (tensor + w_inc * (theta["increment"][name] - tensor)
                    + w_dates * (theta["dates"][name] - tensor))
        assert torch.allclose(live[name], expected, atol=1e-6), name
    changed = [n for n in theta["base"]
               if "layers.1.mlp." in n and not torch.equal(theta["increment"][n], theta["base"][n])]
    assert changed  # the 0.5 applied to tensors the increment specialist really changed


def test_retuning_with_the_zoos_own_recipe_reproduces_its_specialists(zoo, tmp_path, capsys):
    assert run_script("zoo_recipes", [str(zoo), "--items", "2", "--save", str(tmp_path / "tuned"),
                                      "--grid", "0,1", "--coordinate", "0.5"]) == 0
    for skill in SKILLS:
        ours, built = read_folder(tmp_path / "tuned" / skill), read_folder(zoo / skill)
        assert ours.keys() == built.keys()
        assert all(torch.equal(ours[n], built[n]) for n in built), skill
    out = capsys.readouterr().out
    for line in ("| base |", "| increment specialist |", "| task arithmetic, every weight 1 |", "| without dates |",
                 "best of the 2^3 grid", "per-layer/filter greedy", "the default merge keeps"):
        assert line in out, line


def test_a_changed_field_changes_the_specialists(zoo, tmp_path, capsys):
    assert run_script("zoo_recipes", [str(zoo), "--items", "1", "--set", "finetune_lr=0.05",
                                      "--save", str(tmp_path / "tuned")]) == 0
    ours, built = read_folder(tmp_path / "tuned" / "dates"), read_folder(zoo / "dates")
    assert any(not torch.equal(ours[n], built[n]) for n in built)
    assert "finetune_lr=0.05" in capsys.readouterr().out


@pytest.mark.parametrize("pairs, message", [
    (["pretrain_steps=3"], "--set: pretrain_steps: changes the base"),
    (["keep_weight=oops"], "is not a JSON value"),
])
def test_bad_overrides_exit_2_with_one_line(zoo, tmp_path, capsys, pairs, message):
    argv = [str(zoo), "--save", str(tmp_path / "tuned")] + [f"--set={p}" for p in pairs]
    assert run_script("zoo_recipes", argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "tuned").exists()


def test_a_folder_without_a_zoo_exits_2(tmp_path, capsys):
    assert run_script("zoo_recipes", [str(tmp_path)]) == 2
    assert "no zoo.json" in capsys.readouterr().err


def test_bad_weights_are_refused_by_argparse(zoo, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_script("zoo_recipes", [str(zoo), "--grid", "1,heavy"])
    assert exit_.value.code == 2
    assert "--grid: expected comma-separated numbers, got '1,heavy'" in capsys.readouterr().err
