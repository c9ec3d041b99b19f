"""Architecture map on real tensor names, and a merge of every supported family that loads."""

from __future__ import annotations

import pytest
import torch
import yaml

from evomerge import merge, parse_config
from evomerge.engine.architecture import family_for, layer_index, tensor_kind, with_layer
from evomerge.io import ModelFolder
from evomerge.zoo.synthetic import ARCHITECTURES


@pytest.mark.parametrize("name,kind,layer", [
    ("model.embed_tokens.weight", "embed", None),
    ("model.layers.3.self_attn.q_proj.weight", "attention", 3),
    ("model.layers.3.post_attention_layernorm.weight", "norm", 3),
    ("model.layers.12.mlp.down_proj.weight", "mlp", 12),
    ("model.norm.weight", "norm", None),
    ("lm_head.weight", "head", None),
])
def test_llama_names(name, kind, layer):
    family = family_for({"model_type": "llama"})
    assert tensor_kind(name) == kind and layer_index(name, family) == layer


@pytest.mark.parametrize("model_type,name,kind,layer", [
    ("gpt2", "transformer.h.7.attn.c_attn.weight", "attention", 7),
    ("gpt2", "transformer.h.7.mlp.c_fc.weight", "mlp", 7),
    ("gpt2", "transformer.h.7.ln_2.bias", "norm", 7),
    ("gpt2", "transformer.wte.weight", "embed", None),
    ("gpt_neox", "gpt_neox.layers.2.attention.query_key_value.weight", "attention", 2),
    ("gpt_neox", "gpt_neox.layers.2.mlp.dense_h_to_4h.weight", "mlp", 2),
    ("gpt_neox", "embed_out.weight", "head", None),
    ("phi3", "model.layers.1.self_attn.qkv_proj.weight", "attention", 1),
    ("phi3", "model.layers.1.mlp.gate_up_proj.weight", "mlp", 1),
    ("unknown-arch", "backbone.blocks.4.mixer.in_proj.weight", "other", 4),
])
def test_other_families_and_generic_fallback(model_type, name, kind, layer):
    family = family_for({"model_type": model_type})
    assert tensor_kind(name) == kind and layer_index(name, family) == layer
    if layer is not None:
        assert layer_index(with_layer(name, family, 9), family) == 9


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_family_merges_and_loads(family_factory, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    base, *ft = family_factory(arch, sources=2)
    config = parse_config(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in ft]}))
    out = merge(config, tmp_path / "out")
    assert set(ModelFolder(out).names()) == set(ModelFolder(base).names())
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_tied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.zoo.synthetic import build_family

    base, ft1 = build_family(tmp_path / "tied", "llama", sources=1, tie_embeddings=True)
    assert "lm_head.weight" not in ModelFolder(base).names()
    config = parse_config(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(ft1), "parameters": {"weight": 1.0}}]}))
    model = AutoModelForCausalLM.from_pretrained(merge(config, tmp_path / "out"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    expected = ModelFolder(ft1).tensor("model.embed_tokens.weight")
    torch.testing.assert_close(model.lm_head.weight.detach(), expected)
