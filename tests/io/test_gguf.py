"""``evomerge import-gguf`` on tiny GGUF files the tests write with the ``gguf`` package.

Oracle: transformers' own GGUF load of the same file (``from_pretrained(dir, gguf_file=...)``).
The import writes exactly the tensors that load produces (dequantized, then cast to the chosen
dtype once), and the folder loads into the same modules, so the logits must be equal bit for bit
(``torch.equal``) in float32 and in bfloat16, for float32, float16 and Q8_0 GGUF tensors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cli.main import main
from evomerge.errors import EvomergeError
from evomerge.io import writer as writer_module
from evomerge.io.gguf import import_gguf
from tests.gguf_files import CHAT_TEMPLATE, write_llama_gguf


@pytest.fixture(scope="module")
def original(family_factory):
    return AutoModelForCausalLM.from_pretrained(family_factory("llama")[0])


@pytest.fixture(scope="module")
def gguf_file(original, tmp_path_factory):
    return write_llama_gguf(original, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def gguf_load(file, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_imported_folder_equals_the_gguf_load(gguf_file, original, tmp_path, dtype):
    out = import_gguf(gguf_file, tmp_path / "out", dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == str(dtype).removeprefix("torch.")
    imported, reference = AutoModelForCausalLM.from_pretrained(out), gguf_load(gguf_file, dtype)
    assert imported.dtype == dtype and getattr(imported, "hf_quantizer", None) is None
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(imported(tokens).logits, reference(tokens).logits)
    if dtype == torch.float32:  # and the GGUF held the original model (q/k permuted and back)
        for name, tensor in original.state_dict().items():
            assert torch.equal(imported.state_dict()[name], tensor), name


def test_tokenizer_and_chat_template(gguf_file, tmp_path):
    out = import_gguf(gguf_file, tmp_path / "out")
    imported = AutoTokenizer.from_pretrained(out)
    reference = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    text = "hello, merged world"
    assert imported(text)["input_ids"] == reference(text)["input_ids"]
    assert imported.decode(imported(text)["input_ids"]) == text
    assert imported.chat_template == CHAT_TEMPLATE == (out / "chat_template.jinja").read_text()
    assert (out / "generation_config.json").exists()


def test_float16_gguf_and_tied_head(original, tmp_path):
    file = write_llama_gguf(original, tmp_path / "half.gguf", dtype=np.float16, tied=True)
    out = import_gguf(file, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as stored:  # once, under save_pretrained's name
        assert "model.embed_tokens.weight" in stored.keys() and "lm_head.weight" not in stored.keys()
    imported, reference = AutoModelForCausalLM.from_pretrained(out), gguf_load(file)
    tokens = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(imported(tokens).logits, reference(tokens).logits)


def test_quantized_gguf_is_dequantized_like_transformers_does(original, tmp_path):
    file = write_llama_gguf(original, tmp_path / "q8.gguf", q8_0=True)
    out = import_gguf(file, tmp_path / "out")
    imported, reference = AutoModelForCausalLM.from_pretrained(out), gguf_load(file)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(imported.state_dict()[name], original.state_dict()[name])  # really quantized
    tokens = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(imported(tokens).logits, reference(tokens).logits)


def test_imported_folder_is_a_merge_source(gguf_file, family_factory, tmp_path):
    from evomerge.engine.inspect import inspect_models

    out = import_gguf(gguf_file, tmp_path / "out")
    report = inspect_models(family_factory("llama")[0], [out])
    assert report.stats[0].verdict == "identical"  # the GGUF was written from that very base


def test_cli(gguf_file, tmp_path):
    result = CliRunner().invoke(main, ["import-gguf", str(gguf_file), str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert "imported model written to" in result.output
    result = CliRunner().invoke(main, ["import-gguf", str(gguf_file), str(tmp_path / "out")])
    assert result.exit_code == 2 and "exists and is not empty" in result.output


def test_errors_are_one_line_and_write_nothing(original, gguf_file, tmp_path):
    cases = {
        tmp_path / "missing.gguf": "GGUF file not found",
        tmp_path / "bogus.gguf": "not a readable GGUF file",
        write_llama_gguf(original, tmp_path / "arch.gguf", architecture="tinyarch"):
            "general.architecture: 'tinyarch' is not supported by transformers' GGUF loader",
    }
    (tmp_path / "bogus.gguf").write_bytes(b"GGUF but not really" * 10)
    for file, message in cases.items():
        result = CliRunner().invoke(main, ["import-gguf", str(file), str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert result.output.strip().count("\n") == 0 and message in result.output and str(file) in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arch.gguf", "bogus.gguf"]


def test_interrupted_import_leaves_nothing(gguf_file, tmp_path, monkeypatch):
    def fail(self, *args):
        raise OSError("disk full")

    monkeypatch.setattr(writer_module.ModelWriter, "write_json", fail)
    with pytest.raises(OSError, match="disk full"):
        import_gguf(gguf_file, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(EvomergeError):
        import_gguf(gguf_file, gguf_file.parent)  # a non-empty destination without force
