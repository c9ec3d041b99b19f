"""LoRA adapter sources (``evomerge.io.adapter`` / ``evomerge.io.source``) against PEFT.

Oracle: PEFT's own ``merge_and_unload`` of the adapter on its base. The adapter view forms
``W + scale·B@A`` with the same float operations in the same order (the product and the sum in
float32, one rounding to the working dtype), so the weights must be equal bit for bit
(``torch.equal``): in float32, and in bfloat16 for a base loaded in bf16.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.errors import ModelError
from evomerge.io.source import open_model, source_key, split_reference
from tests.lora_adapters import make_adapter, peft_merged


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_view_equals_peft_merge_and_unload(lora_family, arch):
    family = lora_family(arch)
    for adapter in family.adapters:
        view = open_model(adapter, family.base)
        merged = peft_merged(family.base, adapter).state_dict()
        assert view.factors, adapter
        for name in view.names():
            assert torch.equal(view.tensor(name), merged[name]), f"{adapter}: {name}"


def test_options_reach_the_scale(lora_family):
    family = lora_family("llama")
    plain, rslora, patterns = (open_model(a, family.base) for a in family.adapters)
    assert {f.scale for f in plain.factors.values()} == {16 / 4}
    assert {f.scale for f in rslora.factors.values()} == {8 / 8 ** 0.5}
    down = patterns.factors["model.layers.0.mlp.down_proj.weight"]
    q = patterns.factors["model.layers.0.self_attn.q_proj.weight"]
    assert (down.rank, down.scale, q.rank, q.scale) == (6, 4 / 6, 2, 10 / 2)


def test_bfloat16_equals_peft_in_bfloat16(lora_family, tmp_path):
    family = lora_family("llama")
    adapter = make_adapter(family.base, tmp_path / "bf16", seed=3, targets=["q_proj", "up_proj"],
                           dtype=torch.bfloat16)
    view = open_model(str(adapter), family.base)
    merged = peft_merged(family.base, adapter, torch.bfloat16).state_dict()
    for name in view.names():
        assert torch.equal(view.tensor(name, torch.bfloat16), merged[name]), name


def test_head_reads_the_first_rows(lora_family):
    family = lora_family("llama")
    view = open_model(family.adapters[0], family.base)
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(view.head(name, 5), view.tensor(name)[:5], rtol=0, atol=1e-7)


def test_references():
    assert split_reference("/a/base+/b/adapter") == ("/a/base", "/b/adapter")
    assert split_reference("/a/base") == ("/a/base", None)
    assert str(source_key("/a/base+/b/adapter")) == "/a/base+/b/adapter"
    with pytest.raises(ModelError, match="BASE\\+ADAPTER"):
        split_reference("/a+/b+/c")


def test_bare_adapter_finds_its_base_by_name(lora_family):
    family = lora_family("llama")
    view = open_model(family.adapters[0])  # base_model_name_or_path is the local base folder
    assert str(view.base.path) == family.base and view.files_dir == view.base.path


def _copy(adapter: str, tmp_path, name: str = "copy", **config_changes):
    target = tmp_path / name
    shutil.copytree(adapter, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config.update(config_changes)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "adapter_config.json: use_dora: True is not supported"),
    ({"peft_type": "IA3"}, "adapter_config.json: peft_type: 'IA3' is not supported"),
    ({"modules_to_save": ["lm_head"]}, "adapter_config.json: modules_to_save:"),
    ({"lora_bias": True}, "adapter_config.json: lora_bias:"),
    ({"bias": "all"}, "adapter_config.json: bias:"),
    ({"init_lora_weights": "pissa"}, "adapter_config.json: init_lora_weights: 'pissa' changes the base"),
    ({"r": 3}, "are not rank-3 factors"),
])
def test_unsupported_options_are_one_line_errors(lora_family, tmp_path, change, message):
    family = lora_family("llama")
    target = _copy(family.adapters[0], tmp_path, **change)
    with pytest.raises(ModelError, match=message.replace("(", "\\(")) as error:
        open_model(str(target), family.base)
    assert "\n" not in str(error.value) and str(target) in str(error.value)


def test_missing_and_broken_files(lora_family, tmp_path):
    family = lora_family("llama")
    target = _copy(family.adapters[0], tmp_path)
    weights = target / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if "layers.0.self_attn.q_proj.lora_B" not in k}, weights)
    with pytest.raises(ModelError, match=r"adapter_model.safetensors: .*layers.0.self_attn.q_proj: has no lora_B"):
        open_model(str(target), family.base)
    save_file({**tensors, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 256)}, weights)
    with pytest.raises(ModelError, match="lora_embedding_A: unsupported tensor"):
        open_model(str(target), family.base)
    weights.write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="corrupt or unreadable adapter weights"):
        open_model(str(target), family.base)
    weights.unlink()
    with pytest.raises(ModelError, match="no adapter_model.safetensors or adapter_model.bin"):
        open_model(str(target), family.base)
    (target / "adapter_config.json").write_text("{")
    with pytest.raises(ModelError, match="adapter_config.json: unreadable"):
        open_model(str(target), family.base)
    with pytest.raises(ModelError, match="adapter folder not found"):
        open_model(f"{family.base}+{tmp_path / 'nowhere'}")


def test_adapter_of_another_base(lora_family, family_factory, tmp_path):
    family = lora_family("llama")
    other = str(family_factory("llama")[0])  # same shapes, another folder
    with pytest.raises(ModelError, match=r"base_model_name_or_path: .* is not the base .*write .*\+"):
        open_model(family.adapters[0], other)
    assert open_model(f"{other}+{family.adapters[0]}").base.path.resolve() == source_key(other)  # as written
    gpt2 = lora_family("gpt2").base
    with pytest.raises(ModelError, match="the base .* has no tensor model.layers"):
        open_model(f"{gpt2}+{family.adapters[0]}")
    wider = build_wider(family_factory, tmp_path)
    with pytest.raises(ModelError, match=r"down_proj: adapts a \[64, 128\] weight but .* is \[96, 128\]"):
        open_model(f"{wider}+{family.adapters[0]}")
    hub = _copy(family.adapters[0], tmp_path, "hub", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    with pytest.raises(ModelError, match="'meta-llama/Llama-3.2-1B' is not a local folder"):
        open_model(str(hub))
    assert open_model(str(hub), family.base).factors  # the context's base


def build_wider(family_factory, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wider")
    return tmp_path / "wider"
