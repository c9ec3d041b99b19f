"""The tiny model zoo: data generators, held-out files, tokenizer, and a mini build end to end."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from evomerge.cli.main import main
from evomerge.errors import ConfigError
from evomerge.io import shipped
from evomerge.zoo.build import MANIFEST, build_zoo
from evomerge.zoo.corpus import MONTHS, SKILLS, dates, general_text, increment, reverse
from evomerge.zoo.heldout import SPLITS, general_texts, skill_items, write_heldout
from evomerge.zoo.recipe import Recipe
from evomerge.zoo.train import HiddenAnchor
from tests.conftest import read_folder

ROOT = Path(__file__).resolve().parents[2]
MINI = dict(hidden_size=32, layers=4, heads=4, intermediate_size=64, context=48, batch_size=4,
            corpus_paragraphs=200, pretrain_steps=4, finetune_steps=3, eval_items=4, threads=1,
            slot_units=16, keep_rows=1)
TRICKY = "Hello  world\n\n  12+345=357\tend.  x\n\u00e9t\u00e9 \U0001f642 "


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("zoo") / "zoo"
    return out, build_zoo(out, Recipe().override(**MINI), progress=False)


def test_skill_answers_are_correct():
    rng = random.Random(0)
    for _ in range(500):
        prompt, answer = increment(rng)
        assert int(answer) == int(re.fullmatch(r"next: (\d{3,4}) ->", prompt).group(1)) + 1
        prompt, answer = reverse(rng)
        assert answer == re.fullmatch(r"reverse: (\d{4}) ->", prompt).group(1)[::-1]
        prompt, answer = dates(rng)
        month, day, year = re.fullmatch(r"date: (\w+) (\d+) (\d{4}) ->", prompt).groups()
        assert answer == f"{int(day):02d}/{MONTHS.index(month) + 1:02d}/{year}"


def test_generators_are_seeded():
    assert general_text(random.Random(3), 5) == general_text(random.Random(3), 5)
    for skill in SKILLS.values():
        assert [skill(random.Random(7)) for _ in range(3)] == [skill(random.Random(7))] * 3


def test_shipped_heldout_files_match_generators_and_are_disjoint(tmp_path):
    write_heldout(tmp_path)
    for path in sorted((tmp_path / "fitness" / "data").rglob("*.*")):
        copy = shipped.root() / path.relative_to(tmp_path)  # the shipped copies are the source of truth
        assert copy.read_text() == path.read_text(), f"{copy} is stale: rerun evomerge.zoo.heldout"
    for skill in SKILLS:
        items = skill_items(skill)
        prompts = [{item["prompt"] for item in items[split]} for split in SPLITS]
        assert all(len(p) == len(items[s]) == 200 for p, s in zip(prompts, SPLITS))
        assert not prompts[0] & prompts[1]
    texts = general_texts()
    assert texts["search"] != texts["test"]


def test_task_yamls_load_in_lm_eval(monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(shipped.root())  # plain lm-eval reads data_files from the working directory
    names = [f"zoo_{skill}" for skill in SKILLS]
    tasks = TaskManager(include_path=str(shipped.folder("fitness") / "tasks")).load(names)["tasks"]
    for name in names:
        task = tasks[name]
        skill = name.removeprefix("zoo_")
        for split, docs in (("search", task.validation_docs()), ("test", task.test_docs())):
            expected = skill_items(skill)[split]
            assert [(task.doc_to_text(d), task.doc_to_target(d)) for d in docs] == \
                [(item["prompt"], item["answer"]) for item in expected]
        assert task.config.generation_kwargs["until"] == ["\n"]


def test_layout_and_manifest(zoo):
    out, manifest = zoo
    skills = list(SKILLS)
    assert manifest["skills"] == skills
    assert manifest["recipe_hash"] == Recipe().override(**MINI).hash()
    assert json.loads((out / MANIFEST).read_text()) == manifest
    for name in ["base", *skills]:
        folder = out / manifest["paths"][name]
        for file in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
            assert (folder / file).is_file(), f"{name}/{file}"
        assert set(manifest["scores"][name]) == {*skills, "general_ppl"}
    assert not list(out.parent.glob(".*tmp*"))


def test_tokenizer_round_trips_and_models_load(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, manifest = zoo
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    ids = tokenizer.encode(TRICKY, add_special_tokens=False)
    assert tokenizer.decode(ids) == TRICKY
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("123", add_special_tokens=False)) == ["1", "2", "3"]
    for name, path in manifest["paths"].items():
        model = AutoModelForCausalLM.from_pretrained(out / path)
        assert model.config.model_type == "llama"
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([ids])).logits).all(), name


def test_specialists_differ_from_base_only_in_their_slot(zoo):
    out, manifest = zoo
    base = read_folder(out / "base")
    recipe = Recipe().override(**MINI)
    head = recipe.hidden_size // recipe.heads
    for spec in recipe.specialists:
        tuned = read_folder(out / spec.skill)
        changed = {n for n in base if not torch.equal(base[n], tuned[n])}
        assert changed and all(re.search(spec.modules, n) for n in changed), spec.skill
        for name in changed:
            kind = name.split(".")[-2]
            dim = 1 if kind in ("down_proj", "o_proj") else 0
            size = recipe.slot_units if kind.endswith(("gate_proj", "up_proj", "down_proj")) else head
            rows = (tuned[name] != base[name]).any(dim=1 - dim).nonzero().flatten()
            assert rows.min() >= spec.slot * size and rows.max() < (spec.slot + 1) * size, (spec.skill, name)
        assert any("mlp" in n for n in changed) and any("self_attn" in n for n in changed), spec.skill


def test_slot_that_does_not_fit_is_refused(tmp_path):
    recipe = Recipe().override(**{**MINI, "slot_units": 32})
    with pytest.raises(ConfigError, match="slot 2 does not fit"):
        build_zoo(tmp_path / "zoo", recipe, progress=False)


def test_rebuild_is_deterministic_and_cached(zoo, tmp_path):
    out, manifest = zoo
    again = tmp_path / "zoo"
    shutil.copytree(out, again)
    stamp = (again / "base" / "model.safetensors").stat().st_mtime_ns
    overrides = [f"--set={k}={v}" for k, v in MINI.items()]
    result = CliRunner().invoke(main, ["zoo", str(again), *overrides])
    assert result.exit_code == 0, result.output
    assert str(again) in result.output
    assert (again / "base" / "model.safetensors").stat().st_mtime_ns == stamp  # up to date: kept
    result = CliRunner().invoke(main, ["zoo", str(again), *overrides, "--rebuild"])
    assert result.exit_code == 0, result.output
    assert (again / "base" / "model.safetensors").stat().st_mtime_ns != stamp  # trained again
    rebuilt = json.loads((again / MANIFEST).read_text())
    assert rebuilt["scores"] == manifest["scores"]
    for name in manifest["paths"]:
        first, second = read_folder(out / name), read_folder(again / name)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[n], second[n]) for n in first), name


def test_a_build_records_its_versions(zoo):
    import transformers

    _, manifest = zoo
    versions = manifest["versions"]
    assert versions["torch"] == torch.__version__ and versions["transformers"] == transformers.__version__
    assert {"python", "platform", "tokenizers", "numpy", "evomerge"} <= set(versions)


def test_the_shipped_zoo_is_the_default_recipes_and_is_copied(tmp_path):
    from evomerge.zoo.build import read_manifest, shipped_zoo
    from evomerge.zoo.evaluate import exact_match
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = shipped_zoo()
    assert source is not None
    manifest = read_manifest(source)
    # a changed recipe (or FORMAT) needs the shipped weights rebuilt:
    # evomerge zoo evomerge/shipped/zoo --rebuild (and the README's numbers measured again)
    assert manifest["recipe_hash"] == Recipe().hash()
    assert {"torch", "transformers", "python"} <= set(manifest["versions"])
    out = tmp_path / "zoo"
    assert build_zoo(out, progress=False) == manifest  # copied, not trained (seconds)
    for name in manifest["paths"]:
        assert read_folder(out / name).keys() == read_folder(source / name).keys()
        shipped_tensors, copied = read_folder(source / name), read_folder(out / name)
        assert all(torch.equal(shipped_tensors[n], copied[n]) for n in copied), name
    # the weights are those the manifest's scores were measured on (greedy exact match, test split)
    model = AutoModelForCausalLM.from_pretrained(out / "reverse", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "reverse")
    items = skill_items("reverse")["test"][:manifest["recipe"]["eval_items"]]
    assert exact_match(model, tokenizer, items) == manifest["scores"]["reverse"]["reverse"]


def test_refuses_foreign_folder_and_bad_overrides(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["zoo", str(tmp_path)])
    assert result.exit_code == 2 and "--force" in result.output
    with pytest.raises(ConfigError, match="unknown recipe field 'steps'"):
        Recipe().override(steps=3)
    result = CliRunner().invoke(main, ["zoo", str(tmp_path / "z"), "--set", "layers"])
    assert result.exit_code == 2 and "FIELD=VALUE" in result.output


def test_pretraining_corpus_holds_task_examples_but_no_heldout_prompt():
    from evomerge.zoo.models import corpus

    recipe = Recipe().override(corpus_paragraphs=400, prompt_share=0.5)
    lines = corpus(recipe).splitlines()
    for skill, generate in SKILLS.items():
        marker = generate(random.Random(0))[0].split(" ")[0]  # "next:", "reverse:", "date:"
        examples = [line for line in lines if line.startswith(marker)]
        assert len(examples) > 10, skill
        heldout = {item["prompt"] + item["answer"] for items in skill_items(skill).values() for item in items}
        assert not heldout & set(examples), skill
    with pytest.raises(ConfigError, match="prompt_mix has 2 weights for 3 specialists"):
        corpus(recipe.override(prompt_mix=[1, 1]))


def test_hidden_anchor_is_zero_for_the_base_and_ignores_other_rows_and_padding(zoo):
    from transformers import AutoModelForCausalLM

    out, _ = zoo
    base = AutoModelForCausalLM.from_pretrained(out / "base").eval()
    tuned = AutoModelForCausalLM.from_pretrained(out / "increment").eval()
    pad = base.config.pad_token_id
    ids = torch.randint(5, base.config.vocab_size, (3, 12))
    anchor = HiddenAnchor(base, slice(1, 3), pad, 2.0)
    with torch.no_grad():
        assert anchor(ids, base(input_ids=ids, output_hidden_states=True).hidden_states) == 0
        distance = anchor(ids, tuned(input_ids=ids, output_hidden_states=True).hidden_states)
        assert distance > 0
        other_rows = ids.clone()
        other_rows[0] = pad  # row 0 is outside the anchored rows
        hidden = tuned(input_ids=other_rows, output_hidden_states=True).hidden_states
        torch.testing.assert_close(anchor(other_rows, hidden), distance)
        padded = torch.cat([ids, torch.full((3, 4), pad)], dim=1)  # right padding: causal, so earlier states are equal
        hidden = tuned(input_ids=padded, output_hidden_states=True).hidden_states
        torch.testing.assert_close(anchor(padded, hidden), distance)


def test_a_plain_build_copies_the_shipped_zoo_and_rebuild_or_force_train(zoo, tmp_path, monkeypatch):
    import evomerge.zoo.build as build

    out, manifest = zoo
    monkeypatch.setattr(build, "shipped_zoo", lambda: out)  # as if the mini recipe's zoo shipped

    def training(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(build, "_build", training)
    recipe = Recipe().override(**MINI)
    assert build_zoo(tmp_path / "copied", recipe, progress=False) == manifest
    for flags in ({"rebuild": True}, {"force": True}):
        with pytest.raises(AssertionError, match="trained"):
            build_zoo(tmp_path / "trained", recipe, progress=False, **flags)
