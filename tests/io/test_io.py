"""Model folder I/O: reading safetensors/.bin (sharded or not), writing sharded output,
the output config.json, tokenizer files, and atomic (all-or-nothing) writes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open

import evomerge.engine.execute
from evomerge import merge, merge_state_dict, parse_config
from evomerge.cli.main import main
from evomerge.errors import EvomergeError, ModelError
from evomerge.io import TOKENIZER_FILES, ModelFolder, ModelWriter, parse_size
from evomerge.zoo.synthetic import build_family
from tests.conftest import read_folder

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    """[base, ft1, ft2] of a tiny llama (4 layers, hidden 64, vocab 256), unsharded."""
    return build_family(tmp_path_factory.mktemp("io-llama"), "llama", sources=2)


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory) -> Path:
    """The same base as ``family`` (same seed), saved by transformers in 20 KB shards."""
    return build_family(tmp_path_factory.mktemp("io-sharded"), "llama", sources=0,
                        max_shard_size="20KB")[0]


def read_model(folder: Path) -> dict[str, torch.Tensor]:
    return ModelFolder(folder).state_dict()


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def write_config(tmp_path: Path, data: dict, name: str = "merge.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _parse(config: dict):
    return parse_config(yaml.safe_dump(config))


def linear_config(base: Path, ft1: Path, **extra) -> dict:
    return {"merge_method": "linear",
            "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                       {"model": str(ft1), "parameters": {"weight": 0.5}}], **extra}


def bin_folder(folder: Path, state: dict[str, torch.Tensor], config_from: Path, *,
               shards: int = 1, **save_kwargs) -> Path:
    folder.mkdir(parents=True)
    shutil.copy2(config_from / "config.json", folder / "config.json")
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin", **save_kwargs)
        return folder
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, folder / file, **save_kwargs)
        weight_map.update({n: file for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
         "weight_map": weight_map}))
    return folder


# --------------------------------------------------------------------------- reading


def test_sharded_safetensors_reads_like_unsharded(family, sharded_base):
    shards = sorted(sharded_base.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (sharded_base / "model.safetensors.index.json").is_file()
    assert not (sharded_base / "model.safetensors").exists()
    sharded = ModelFolder(sharded_base)
    assert len({sharded._files[n] for n in sharded.names()}) == len(shards)  # really spread out
    assert_same_tensors(read_model(sharded_base), read_model(family[0]))
    unsharded = ModelFolder(family[0])
    for name in unsharded.names():
        assert sharded.shape(name) == unsharded.shape(name)
    assert sharded.total_bytes() > 0


def test_merging_sharded_input_equals_unsharded_input(family, sharded_base):
    config = linear_config(family[0], family[1])
    expected = merge_state_dict(_parse(config))
    config["models"][0]["model"] = str(sharded_base)
    assert_same_tensors(merge_state_dict(_parse(config)), expected)


def test_pytorch_model_bin(family, tmp_path):
    expected = read_model(family[0])
    folder = bin_folder(tmp_path / "bin", expected, family[0])
    model = ModelFolder(folder)
    assert set(model.names()) == set(expected)
    assert_same_tensors(read_model(folder), expected)
    name = "model.layers.0.mlp.up_proj.weight"
    assert model.shape(name) == tuple(expected[name].shape)


def test_legacy_format_pytorch_model_bin(family, tmp_path):
    expected = read_model(family[0])
    folder = bin_folder(tmp_path / "legacy", expected, family[0],
                        _use_new_zipfile_serialization=False)
    assert_same_tensors(read_model(folder), expected)


def test_sharded_pytorch_model_bin(family, tmp_path):
    expected = read_model(family[0])
    folder = bin_folder(tmp_path / "bin-sharded", expected, family[0], shards=3)
    assert len(list(folder.glob("pytorch_model-*.bin"))) == 3
    assert_same_tensors(read_model(folder), expected)


def test_bin_input_merges_like_safetensors(family, tmp_path):
    folder = bin_folder(tmp_path / "bin", read_model(family[1]), family[1], shards=2)
    expected = merge_state_dict(_parse(linear_config(family[0], family[1])))
    assert_same_tensors(merge_state_dict(_parse(linear_config(family[0], folder))), expected)


class Payload:
    """Not a tensor: a weights-only loader must refuse to build it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        # Unpickling this would create ``marker`` (a stand-in for arbitrary code execution).
        return (open, (str(self.marker), "w"))


class Custom:
    def __init__(self):
        self.value = 42


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind", ["custom-class", "code-execution"])
def test_bin_with_pickled_objects_is_refused(family, tmp_path, kind, zip_format):
    marker = tmp_path / "pwned"
    state = read_model(family[0])
    state["extra"] = Custom() if kind == "custom-class" else Payload(marker)
    folder = bin_folder(tmp_path / "evil", state, family[0],
                        _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ModelError, match="pytorch_model.bin"):
        ModelFolder(folder)
    assert not marker.exists(), "pickle code ran while reading a .bin"


def test_truncated_bin_is_refused(family, tmp_path):
    folder = bin_folder(tmp_path / "truncated", read_model(family[0]), family[0])
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelError, match="corrupt or truncated"):
        ModelFolder(folder)


def test_index_naming_a_tensor_the_shard_lacks(family, tmp_path, sharded_base):
    folder = tmp_path / "bad-index"
    shutil.copytree(sharded_base, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.ghost.weight"] = next(iter(index["weight_map"].values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="model.layers.9.ghost.weight"):
        ModelFolder(folder)


# --------------------------------------------------------------------------- ModelWriter


def small_tensors(count: int = 5, numel: int = 1000) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(numel, generator=generator) for i in range(count)}


def test_writer_shards_when_over_the_limit(tmp_path):
    tensors = small_tensors()  # 5 × 4000 bytes
    writer = ModelWriter(tmp_path / "out", shard_size=10_000)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    out = writer.commit()
    names = sorted(p.name for p in out.iterdir())
    assert names == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 4000
    assert set(index["weight_map"]) == set(tensors)
    first = "model-00001-of-00003.safetensors"
    assert index["weight_map"]["t0"] == index["weight_map"]["t1"] == first
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    for file in set(index["weight_map"].values()):
        assert (out / file).stat().st_size <= 10_000 + 1_000  # limit + header
        with safe_open(str(out / file), framework="pt") as handle:
            assert {n for n, f in index["weight_map"].items() if f == file} == set(handle.keys())
    assert_same_tensors(read_folder(out), tensors)
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_writer_tensor_larger_than_a_shard_gets_its_own(tmp_path):
    writer = ModelWriter(tmp_path / "out", shard_size=1_000)
    writer.add("small", torch.zeros(10))
    writer.add("big", torch.zeros(1000))  # 4000 bytes > 1000
    writer.add("small2", torch.zeros(10))
    out = writer.commit()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert index["metadata"]["total_size"] == 4000 + 2 * 40


def test_writer_single_file_when_it_fits(tmp_path):
    tensors = small_tensors()
    writer = ModelWriter(tmp_path / "out", shard_size=parse_size("5GB"))
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.write_json("config.json", {"a": 1})
    out = writer.commit()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_tensors(read_folder(out), tensors)
    assert json.loads((out / "config.json").read_text()) == {"a": 1}


def test_writer_keeps_dtypes_and_makes_views_contiguous(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    writer = ModelWriter(tmp_path / "out")
    writer.add("transposed", base.t())
    writer.add("half", base.to(torch.bfloat16))
    writer.add("ints", torch.arange(5))
    out = writer.commit()
    tensors = read_folder(out)
    assert torch.equal(tensors["transposed"], base.t())
    assert tensors["half"].dtype == torch.bfloat16 and tensors["ints"].dtype == torch.int64


def test_writer_refuses_non_empty_folder_and_abort_cleans_up(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(EvomergeError, match="--force"):
        ModelWriter(out)
    writer = ModelWriter(out, force=True)
    writer.add("t", torch.ones(3))
    assert writer.tmp_dir.is_dir() and writer.tmp_dir.name.startswith(".out.tmp-")
    writer.abort()
    assert not writer.tmp_dir.exists()
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# --------------------------------------------------------------------------- sharded merge output


def test_cli_out_shard_size_gives_loadable_sharded_output(family, tmp_path):
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path, linear_config(family[0], family[1]))
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    for out, extra in ((whole, []), (sharded, ["--out-shard-size", "10KB"])):
        result = CliRunner().invoke(main, ["merge", str(config), str(out), "-q", *extra])
        assert result.exit_code == 0, (result.output, result.exception)

    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert all(f.name.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    assert not (sharded / "model.safetensors").exists()
    assert (whole / "model.safetensors").exists()
    assert not (whole / "model.safetensors.index.json").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    expected = read_folder(whole)
    assert set(index["weight_map"]) == set(expected)
    total = sum(t.numel() * t.element_size() for t in expected.values())
    assert index["metadata"]["total_size"] == total
    assert_same_tensors(read_folder(sharded), expected)
    assert json.loads((sharded / "config.json").read_text()) == \
        json.loads((whole / "config.json").read_text())

    model, info = AutoModelForCausalLM.from_pretrained(sharded, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


# --------------------------------------------------------------------------- output config.json


def test_passthrough_slices_change_depth_and_load(family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, ft1, _ = family
    config = write_config(tmp_path, {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(base), "layer_range": [0, 3]}]},
                   {"sources": [{"model": str(ft1), "layer_range": [1, 4]}]}],
        "dtype": "float32",
    })
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(config), str(out), "-q"])
    assert result.exit_code == 0, (result.output, result.exception)

    source_config = json.loads((base / "config.json").read_text())
    out_config = json.loads((out / "config.json").read_text())
    assert source_config["num_hidden_layers"] == 4
    assert out_config["num_hidden_layers"] == 6
    assert {k: v for k, v in out_config.items() if k != "num_hidden_layers"} == \
        {k: v for k, v in source_config.items() if k != "num_hidden_layers"}

    merged, base_t, ft_t = read_folder(out), read_model(base), read_model(ft1)
    name = "model.layers.{}.self_attn.q_proj.weight"
    for out_layer, (source, layer) in enumerate([(base_t, 0), (base_t, 1), (base_t, 2),
                                                 (ft_t, 1), (ft_t, 2), (ft_t, 3)]):
        assert torch.equal(merged[name.format(out_layer)], source[name.format(layer)])
    assert not any(n.startswith("model.layers.6.") for n in merged)
    assert torch.equal(merged["model.embed_tokens.weight"], base_t["model.embed_tokens.weight"])

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert len(model.model.layers) == 6
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 42]])).logits
    assert logits.shape == (1, 4, out_config["vocab_size"])
    assert torch.isfinite(logits).all()


def test_out_dtype_is_written_to_config(family, tmp_path):
    config = write_config(tmp_path, linear_config(family[0], family[1], out_dtype="bfloat16"))
    out = merge(config, tmp_path / "out")
    out_config = json.loads((out / "config.json").read_text())
    dtype_key = "torch_dtype" if "torch_dtype" in out_config else "dtype"
    assert out_config[dtype_key] == "bfloat16"
    assert {t.dtype for t in read_folder(out).values()} == {torch.bfloat16}


# --------------------------------------------------------------------------- tokenizer files


def save_tokenizer(folder: Path, sentences: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)


@pytest.fixture(scope="module")
def tokenized(family, tmp_path_factory) -> list[Path]:
    """Copies of base and ft1 with two different tokenizers."""
    root = tmp_path_factory.mktemp("io-tokenized")
    base, ft1 = root / "base", root / "ft1"
    shutil.copytree(family[0], base)
    shutil.copytree(family[1], ft1)
    save_tokenizer(base, ["the cat sat on the mat", "a dog"])
    save_tokenizer(ft1, ["merging models is fun", "zebra quartz"])
    assert (base / "tokenizer.json").read_bytes() != (ft1 / "tokenizer.json").read_bytes()
    return [base, ft1]


@pytest.mark.parametrize("source", [None, "base", "ft1"])
def test_tokenizer_files_copied(tokenized, tmp_path, source):
    from transformers import AutoTokenizer

    base, ft1 = tokenized
    extra = {} if source is None else {"tokenizer_source": "base" if source == "base" else str(ft1)}
    config = write_config(tmp_path, linear_config(base, ft1, **extra))
    out = merge(config, tmp_path / "out")
    expected = ft1 if source == "ft1" else base
    copied = sorted(name for name in TOKENIZER_FILES if (expected / name).is_file())
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(copied)
    assert sorted(name for name in TOKENIZER_FILES if (out / name).is_file()) == copied
    for name in copied:
        assert (out / name).read_bytes() == (expected / name).read_bytes(), name
    text = "zebra quartz the cat"
    ids = {folder: AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
           for folder in (base, ft1, out)}
    assert ids[base] != ids[ft1]
    assert ids[out] == ids[expected]


def test_no_tokenizer_warns(family, tmp_path, caplog):
    base, ft1 = tmp_path / "base", tmp_path / "ft1"
    for source, copy in ((family[0], base), (family[1], ft1)):
        shutil.copytree(source, copy)
        for file in copy.glob("tokenizer*"):
            file.unlink()
    config = write_config(tmp_path, linear_config(base, ft1))
    with caplog.at_level(logging.WARNING, logger="evomerge"):
        out = merge(config, tmp_path / "out")
    assert not list(out.glob("tokenizer*"))
    assert any("no tokenizer files" in r.getMessage() for r in caplog.records)
    # the model's other side files still come along
    assert (out / "generation_config.json").read_bytes() == \
        (family[0] / "generation_config.json").read_bytes()


# --------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize("text, expected", [
    ("5GB", 5_000_000_000), ("500M", 500_000_000), ("2.5G", 2_500_000_000), ("1000", 1000),
    ("10KB", 10_000), ("10kb", 10_000), (" 1 TB ", 10**12), ("500MB", 500_000_000), (".5K", 500),
    (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5 XB", "five GB", "-1", "1.2.3G", "5GiB", "0",
                                  "0.0001", 0, -5])
def test_parse_size_rejects(text):
    with pytest.raises(EvomergeError, match="--out-shard-size"):
        parse_size(text)


# --------------------------------------------------------------------------- interrupted merges


class Boom(Exception):
    pass


def fail_after(original, calls: int, error: type[BaseException]):
    seen = []

    def wrapper(*args, **kwargs):
        seen.append(1)
        if len(seen) > calls:
            raise error("interrupted")
        return original(*args, **kwargs)

    return wrapper, seen


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["writer", "kernel"])
def test_interrupted_merge_leaves_nothing(family, tmp_path, monkeypatch, where, error):
    if where == "writer":
        wrapper, seen = fail_after(ModelWriter.add, 10, error)
        monkeypatch.setattr(ModelWriter, "add", wrapper)
    else:
        wrapper, seen = fail_after(evomerge.engine.execute.execute_op, 10, error)
        monkeypatch.setattr(evomerge.engine.execute, "execute_op", wrapper)
    config = write_config(tmp_path, linear_config(family[0], family[1]))
    out = tmp_path / "out"
    with pytest.raises(error, match="interrupted"):
        # a tiny shard size: several shards are already on disk when it fails
        merge(config, out, shard_size=10_000)
    assert len(seen) == 11
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yml"]


def test_interrupted_forced_merge_keeps_the_old_output(family, tmp_path, monkeypatch):
    config = write_config(tmp_path, linear_config(family[0], family[1]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier merge")
    wrapper, _ = fail_after(ModelWriter.add, 5, Boom)
    monkeypatch.setattr(ModelWriter, "add", wrapper)
    with pytest.raises(Boom):
        merge(config, out, force=True)
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_interrupted_cli_merge_exits_nonzero_and_leaves_nothing(family, tmp_path, monkeypatch):
    wrapper, _ = fail_after(ModelWriter.add, 3, Boom)
    monkeypatch.setattr(ModelWriter, "add", wrapper)
    config = write_config(tmp_path, linear_config(family[0], family[1]))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(config), str(out), "-q"])
    assert result.exit_code == 1 and isinstance(result.exception, Boom)  # unexpected → 1, not 2
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
