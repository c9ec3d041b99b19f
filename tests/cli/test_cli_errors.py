"""Bad input through the real ``evomerge merge`` command.

Product requirement: every bad input gives ONE line on stderr, starting with ``error:``,
naming the file/field at fault and what was expected; exit code 2; and no output folder
(nor a leftover hidden ``.<name>.tmp-*`` folder next to it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from evomerge.cli.main import main
from evomerge.methods.registry import METHODS
from evomerge.zoo.synthetic import build_family

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    """[base, ft1, ft2] of a tiny llama (4 layers, hidden 64)."""
    return build_family(tmp_path_factory.mktemp("cli-llama"), "llama", sources=2)


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory) -> Path:
    return build_family(tmp_path_factory.mktemp("cli-gpt2"), "gpt2", sources=0)[0]


def variant(family: list[Path], tmp_path: Path, name: str) -> Path:
    """A private copy of ft1 that a test may damage."""
    copy = tmp_path / name
    shutil.copytree(family[1], copy)
    return copy


def write(tmp_path: Path, text: str, name: str = "merge.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line of ``text`` containing ``needle``."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def linear(a: Path, b: Path) -> str:
    return (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {b}\n    parameters: {{weight: 1.0}}\n")


def run_merge(config: Path, out: Path, *extra: str):
    result = CliRunner().invoke(main, ["merge", str(config), str(out), *extra])
    result.out_dir = out
    return result


def assert_failed(result, *fragments: str) -> str:
    """Exit 2, one ``error:`` line on stderr containing every fragment, nothing written."""
    out = result.out_dir
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # a handled error, not a traceback
    stderr = result.stderr
    assert stderr.startswith("error: "), stderr
    assert stderr.endswith("\n") and stderr.count("\n") == 1, f"not one line: {stderr!r}"
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in stderr, f"{fragment!r} not in {stderr!r}"
    assert not out.exists(), "a failed merge must not create the output folder"
    leftovers = list(out.parent.glob(f".{out.name}.tmp-*"))
    assert not leftovers, f"temporary folder left behind: {leftovers}"
    return stderr.strip()


# --------------------------------------------------------------------------- success


def test_successful_merge_exits_0_and_writes_the_folder(family, tmp_path):
    base, ft1, _ = family
    config = write(tmp_path, linear(base, ft1))
    out = tmp_path / "out"
    result = run_merge(config, out)
    assert result.exit_code == 0, (result.output, result.exception)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "evomerge_config.yml"} <= names
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert f"merged model written to {out.absolute()}" in result.stdout
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    with safe_open(str(base / "model.safetensors"), framework="pt") as handle:
        assert names == set(handle.keys())
    saved = yaml.safe_load((out / "evomerge_config.yml").read_text())
    assert saved["merge_method"] == "linear"
    assert [m["model"] for m in saved["models"]] == [str(base), str(ft1)]


# --------------------------------------------------------------------------- 1. YAML


@pytest.mark.parametrize("text, bad_line", [
    ("merge_method: linear\nmodels: [\n  {model: a, parameters: {weight: 1}}\n", None),
    ("merge_method: linear\nmodels:\n  - model: a: b\n", 3),
    ("merge_method: linear\nmodels:\n  - model: a\n\tparameters: {weight: 1}\n", 4),
], ids=["unclosed-bracket", "colon-in-value", "tab-indent"])
def test_malformed_yaml(tmp_path, text, bad_line):
    config = write(tmp_path, text, "broken.yml")
    out = tmp_path / "out"
    message = assert_failed(run_merge(config, out), "broken.yml", "malformed YAML")
    match = re.match(rf"error: {re.escape(str(config))}:(\d+): ", message)
    assert match, message
    if bad_line is not None:
        assert int(match.group(1)) == bad_line


def test_config_file_missing(tmp_path):
    out = tmp_path / "out"
    assert_failed(run_merge(tmp_path / "nope.yml", out), "nope.yml", "cannot read config")


def test_top_level_not_a_mapping(tmp_path):
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, "- just\n- a list\n"), out), "merge.yml", "mapping")


# --------------------------------------------------------------------------- 2. method


def test_unknown_merge_method(family, tmp_path):
    text = f"models:\n  - model: {family[1]}\nmerge_method: tiez\n"
    out = tmp_path / "out"
    message = assert_failed(run_merge(write(tmp_path, text), out),
                            f"merge.yml:{line_of(text, 'tiez')}: merge_method:", "'tiez'")
    for name in METHODS:
        assert name in message


def test_missing_merge_method(family, tmp_path):
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, f"models:\n  - model: {family[1]}\n"), out),
                  "merge.yml", "merge_method", "required")


# --------------------------------------------------------------------------- 3. model paths


def test_missing_model_path(family, tmp_path):
    missing = tmp_path / "no-such-model"
    config = write(tmp_path, linear(family[0], missing))
    out = tmp_path / "out"
    assert_failed(run_merge(config, out), str(missing), "not found")


def test_missing_base_model_path(family, tmp_path):
    missing = tmp_path / "no-such-base"
    text = (f"merge_method: task_arithmetic\nbase_model: {missing}\nmodels:\n"
            f"  - model: {family[1]}\n    parameters: {{weight: 1.0}}\n")
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, text), out), str(missing), "not found")


def test_missing_tokenizer_source(family, tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    text = linear(family[0], family[1]) + f"tokenizer_source: {missing}\n"
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, text), out), "tokenizer_source", str(missing))


def chat_merge(base: Path, ft1: Path, tokens: str) -> str:
    return linear(base, ft1) + "tokenizer:\n  source: union\n  tokens:\n" + tokens


def test_token_no_model_has(chat_family, tmp_path):
    base, ft1, _ = chat_family
    text = chat_merge(base, ft1, "    <|unknown|>:\n      force: false\n")
    assert_failed(run_merge(write(tmp_path, text), tmp_path / "out"), "merge.yml", "tokenizer.tokens.<|unknown|>",
                  "no model has the token '<|unknown|>'")


@pytest.mark.parametrize("entry, fragments", [
    ("    <tool>:\n      source: {ft1}\n", ("tokenizer.tokens.<tool>", "has no token '<tool>'")),
    ("    <tool>:\n      source: {{kind: model_token, model: {ft1}, token: '<nope>'}}\n",
     ("tokenizer.tokens.<tool>", "has no token '<nope>'")),
    ("    <tool>:\n      source: {{kind: model_token, model: {ft1}, token_id: 100000}}\n",
     ("tokenizer.tokens.<tool>", "out of range")),
    ("    <|im_start|>:\n      source: {other}\n", ("tokenizer.tokens.<|im_start|>", "is not an input")),
    ("    <s>:\n      force: true\n", ("tokenizer.tokens.<s>", "force needs a source")),
])
def test_token_sources_that_cannot_be_honored(chat_family, tmp_path, entry, fragments):
    base, ft1, ft2 = chat_family
    text = chat_merge(base, ft1, entry.format(ft1=ft1, other=ft2))
    assert_failed(run_merge(write(tmp_path, text), tmp_path / "out"), "merge.yml", *fragments)


def test_tokenizer_source_and_block_together(family, tmp_path):
    text = linear(family[0], family[1]) + "tokenizer_source: union\ntokenizer:\n  source: base\n"
    assert_failed(run_merge(write(tmp_path, text), tmp_path / "out"),
                  f"merge.yml:{line_of(text, 'tokenizer_source')}", "not both")


def test_bad_pad_to_multiple_of(family, tmp_path):
    text = linear(family[0], family[1]) + "tokenizer:\n  pad_to_multiple_of: 0\n"
    assert_failed(run_merge(write(tmp_path, text), tmp_path / "out"), "tokenizer.pad_to_multiple_of")


# --------------------------------------------------------------------------- 4. base model


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_ties", "della", "model_stock"])
def test_missing_base_model(family, tmp_path, method):
    _, ft1, ft2 = family
    text = (f"merge_method: {method}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {ft2}\n    parameters: {{weight: 0.5}}\n")
    if method == "model_stock":
        text = text.replace("    parameters: {weight: 0.5}\n", "")
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, text), out),
                  # the line of the value of `models` (its first entry)
                  f"merge.yml:{line_of(text, '- model:')}: models:", f"{method} needs a base_model")


# --------------------------------------------------------------------------- 5. input count


@pytest.mark.parametrize("models, count", [(["ft1", "ft2"], 3), (["base"], 1)],
                         ids=["three", "one"])
def test_slerp_needs_exactly_two_models(family, tmp_path, models, count):
    paths = dict(zip(["base", "ft1", "ft2"], family))
    text = (f"merge_method: slerp\nbase_model: {paths['base']}\nmodels:\n"
            + "".join(f"  - model: {paths[m]}\n" for m in models) + "parameters:\n  t: 0.5\n")
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, text), out), "merge.yml:", "models:",
                  f"slerp takes exactly 2 models (base included), got {count}")


def merge_text(method: str, base: Path | None, models: list[Path], params: str = "") -> str:
    text = f"merge_method: {method}\n" + (f"base_model: {base}\n" if base else "") + "models:\n"
    return text + "".join(f"  - model: {m}\n" for m in models) + params


@pytest.mark.parametrize("method, with_base, sources, message", [
    ("nearswap", True, 2, "nearswap takes exactly 2 models (base included), got 3"),
    ("arcee_fusion", True, 2, "arcee_fusion takes exactly 2 models (base included), got 3"),
    ("nuslerp", False, 1, "nuslerp takes exactly 2 models besides the base, got 1"),
    ("nuslerp", True, 1, "nuslerp takes exactly 2 models besides the base, got 1"),
    ("multislerp", True, 0, "multislerp takes at least 1 models besides the base, got 0"),
    ("sce", False, 2, "sce needs a base_model"),
    ("ram", False, 2, "ram needs a base_model"),
    ("ramplus_tl", False, 2, "ramplus_tl needs a base_model"),
])
def test_new_methods_with_the_wrong_models(family, tmp_path, method, with_base, sources, message):
    base, *fts = family
    params = ("parameters:\n  t: 0.001\n" if method == "nearswap"
              else "parameters:\n  weight: 0.5\n" if "slerp" in method else "")
    text = merge_text(method, base if with_base else None, fts[:sources] or [base], params)
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, text), out), "merge.yml:", "models:", message)


@pytest.mark.parametrize("method, params, value, expected", [
    ("sce", "select_topk: 1.5", "1.5", "[0.0, 1.0]"),
    ("sce", "select_topk: [0.5, -0.1]", "-0.1", "[0.0, 1.0]"),
    ("nearswap", "t: -0.01", "-0.01", ">= 0.0"),
    ("ram", "epsilon: -1", "-1.0", ">= 0.0"),
    ("ramplus_tl", "r: [{filter: mlp, value: -0.5}, {value: 0.1}]", "-0.5", ">= 0.0"),
    ("multislerp", "eps: -1.0e-8", "-1e-08", ">= 0.0"),
    ("karcher", "max_iter: -3", "-3", ">= 0"),
])
def test_new_method_parameter_out_of_range(family, tmp_path, method, params, value, expected):
    base, ft1, ft2 = family
    models = [ft1] if method == "nearswap" else [ft1, ft2]
    extra = "  weight: 0.5\n" if method == "multislerp" else ""
    text = merge_text(method, base, models, f"parameters:\n  {params}\n{extra}")
    out = tmp_path / "out"
    name = params.split(":")[0]
    assert_failed(run_merge(write(tmp_path, text), out),
                  f"merge.yml:{line_of(text, params)}: parameters.{name}: {value} is out of range", expected)


def test_integer_parameter_of_wrong_type(family, tmp_path):
    base, ft1, ft2 = family
    text = merge_text("karcher", None, [ft1, ft2], "parameters:\n  max_iter: 2.5\n")
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, text), out),
                  f"merge.yml:{line_of(text, '2.5')}: parameters.max_iter:", "expected an integer")


def test_model_listed_twice(family, tmp_path):
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, linear(family[1], family[1])), out),
                  "merge.yml:", "models:", "listed twice")


# --------------------------------------------------------------------------- 6. ranges


def ties_with(family, params_yaml: str) -> str:
    base, ft1, ft2 = family
    return (f"merge_method: ties\nbase_model: {base}\nmodels:\n"
            f"  - model: {ft1}\n    parameters:\n      weight: 0.5\n{params_yaml}"
            f"  - model: {ft2}\n    parameters:\n      weight: 0.5\n")


@pytest.mark.parametrize("params_yaml, needle, field, value", [
    ("      density: 1.5\n", "density: 1.5", "models[0].parameters.density", "1.5"),
    ("      density: [0.5, 1.0, -0.2]\n", "density: [", "models[0].parameters.density", "-0.2"),
    ("      density:\n        - filter: mlp\n          value: 2.0\n        - value: 0.5\n",
     "- filter: mlp", "models[0].parameters.density", "2.0"),
], ids=["scalar", "gradient", "filter-list"])
def test_density_out_of_range(family, tmp_path, params_yaml, needle, field, value):
    text = ties_with(family, params_yaml)
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, text), out),
                  f"merge.yml:{line_of(text, needle)}: {field}: {value} is out of range",
                  "[0.0, 1.0]")


@pytest.mark.parametrize("where", ["top", "model"])
def test_slerp_t_out_of_range(family, tmp_path, where):
    base, ft1, _ = family
    if where == "top":
        text = (f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                f"  - model: {ft1}\nparameters:\n  t: -0.1\n")
        field = "parameters.t"
    else:
        text = (f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                f"  - model: {ft1}\n    parameters:\n      t: -0.1\n")
        field = "models[1].parameters.t"
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, text), out),
                  f"merge.yml:{line_of(text, 't: -0.1')}: {field}: -0.1 is out of range",
                  "[0.0, 1.0]")


def test_parameter_of_wrong_type(family, tmp_path):
    text = ties_with(family, "      density: lots\n")
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, text), out),
                  f"merge.yml:{line_of(text, 'lots')}: models[0].parameters.density:",
                  "expected a number", "'lots'")


# --------------------------------------------------------------------------- 7. shapes


def test_tensors_of_different_shapes(family, tmp_path):
    base = family[0]
    odd = variant(family, tmp_path, "odd-shape")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors = load_file(odd / "model.safetensors")
    tensors[name] = tensors[name][:100].clone()
    save_file(tensors, str(odd / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, linear(base, odd)), out),
                  name, "different shapes", f"{base}: [128, 64]", f"{odd}: [100, 64]")


def test_missing_tensor(family, tmp_path):
    lacking = variant(family, tmp_path, "lacking")
    name = "model.layers.2.self_attn.k_proj.weight"
    tensors = load_file(lacking / "model.safetensors")
    del tensors[name]
    save_file(tensors, str(lacking / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, linear(family[0], lacking)), out), str(lacking), name)


# --------------------------------------------------------------------------- 8. architectures


def test_different_architectures(family, gpt2_base, tmp_path):
    text = (f"merge_method: task_arithmetic\nbase_model: {family[0]}\nmodels:\n"
            f"  - model: {gpt2_base}\n    parameters: {{weight: 1.0}}\n")
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, text), out), str(gpt2_base), str(family[0]),
                  "different architectures", "'gpt2'", "'llama'")


# --------------------------------------------------------------------------- 9. broken files


def truncate(folder: Path) -> str:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    return "model.safetensors"


def garbage_header(folder: Path) -> str:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(b"\x13\x37" * 32 + data[64:])
    return "model.safetensors"


def bad_json_header(folder: Path) -> str:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:8] + b"{not json at all" + data[24:])
    return "model.safetensors"


def no_weights(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    return "no model.safetensors"


def no_config(folder: Path) -> str:
    (folder / "config.json").unlink()
    return "config.json"


def bad_config(folder: Path) -> str:
    (folder / "config.json").write_text('{"model_type": "llama",')
    return "config.json"


@pytest.mark.parametrize("damage", [truncate, garbage_header, bad_json_header, no_weights,
                                    no_config, bad_config], ids=lambda f: f.__name__)
def test_broken_model_folder(family, tmp_path, damage):
    broken = variant(family, tmp_path, "broken")
    fragment = damage(broken)
    out = tmp_path / "out"
    message = assert_failed(run_merge(write(tmp_path, linear(family[0], broken)), out), fragment)
    assert str(broken) in message


def test_index_lists_missing_shard(tmp_path):
    base = build_family(tmp_path / "sharded", "llama", sources=0, max_shard_size="20KB")[0]
    shards = sorted(base.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    out = tmp_path / "out"
    config = write(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {base}\n")
    assert_failed(run_merge(config, out), shards[-1].name, "missing")


# --------------------------------------------------------------------------- 10. output folder


def test_existing_output_folder_needs_force(family, tmp_path):
    base, ft1, _ = family
    config = write(tmp_path, linear(base, ft1))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")

    result = run_merge(config, out)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert str(out) in result.stderr and "--force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["stale.txt"], "the existing folder must be untouched"
    assert not list(tmp_path.glob(".out.tmp-*"))

    result = run_merge(config, out, "--force")
    assert result.exit_code == 0, (result.output, result.exception)
    names = {p.name for p in out.iterdir()}
    assert "stale.txt" not in names
    assert {"config.json", "model.safetensors", "evomerge_config.yml"} <= names
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_output_path_is_a_file(family, tmp_path):
    config = write(tmp_path, linear(family[0], family[1]))
    out = tmp_path / "out"
    out.write_text("not a folder")
    result = run_merge(config, out)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert str(out) in result.stderr
    assert out.read_text() == "not a folder"


def test_empty_output_folder_is_fine(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = run_merge(write(tmp_path, linear(family[0], family[1])), out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert (out / "model.safetensors").is_file()


# --------------------------------------------------------------------------- 11. unknown names


def test_unknown_parameter_for_method(family, tmp_path):
    text = ties_with(family, "      t: 0.5\n")
    out = tmp_path / "out"
    message = assert_failed(run_merge(write(tmp_path, text), out),
                            f"merge.yml:{line_of(text, '      t: 0.5')}: models[0].parameters.t:",
                            "unknown parameter for ties")
    for known in ("weight", "density"):
        assert known in message


def test_unknown_top_level_field(family, tmp_path):
    base, ft1, _ = family
    text = (f"merge_method: ties\nbase_modle: {base}\nmodels:\n"
            f"  - model: {ft1}\n    parameters: {{weight: 1.0}}\n")
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, text), out),
                  f"merge.yml:{line_of(text, 'base_modle')}: base_modle: unknown field")


def test_unknown_field_in_model_entry(family, tmp_path):
    text = linear(family[0], family[1]).replace("parameters: {weight", "params: {weight", 1)
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, text), out),
                  f"merge.yml:{line_of(text, 'params:')}: models[0].params: unknown field")


@pytest.mark.parametrize("key, value", [("dtype", "float8"), ("out_dtype", "int4")])
def test_unknown_dtype(family, tmp_path, key, value):
    text = linear(family[0], family[1]) + f"{key}: {value}\n"
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, text), out),
                  f"merge.yml:{line_of(text, key + ':')}: {key}: unknown dtype", "bfloat16")


def test_bad_shard_size_option(family, tmp_path):
    out = tmp_path / "out"
    assert_failed(run_merge(write(tmp_path, linear(family[0], family[1])), out,
                            "--out-shard-size", "lots"), "--out-shard-size", "5GB")


# --------------------------------------------------------------------------- 12. della


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("density, epsilon", [(0.9, 0.15), (0.1, 0.15), (0.5, 0.5)])
def test_della_density_epsilon_outside_unit_interval(family, tmp_path, method, density, epsilon):
    base, ft1, _ = family
    text = (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {ft1}\n"
            f"    parameters:\n      weight: 1.0\n      density: {density}\n"
            f"      epsilon: {epsilon}\n")
    out = tmp_path / "out"
    # checked per tensor at plan time (gradients); the message still names the config file
    assert_failed(run_merge(write(tmp_path, text), out), "merge.yml", "density ± epsilon",
                  "(0, 1)", f"density={density}", f"epsilon={epsilon}", str(ft1))


def test_della_inside_unit_interval_merges(family, tmp_path):
    base, ft1, _ = family
    text = (f"merge_method: della\nbase_model: {base}\nmodels:\n  - model: {ft1}\n"
            f"    parameters:\n      weight: 1.0\n      density: 0.5\n      epsilon: 0.1\n")
    out = tmp_path / "out"
    result = run_merge(write(tmp_path, text), out)
    assert result.exit_code == 0, (result.output, result.exception)


# --------------------------------------------------------------------------- the real process


def test_real_process_prints_one_line(family, tmp_path):
    """Outside CliRunner: logging and tqdm write to the real stderr; still one line."""
    text = ties_with(family, "      density: 1.5\n")
    config = write(tmp_path, text)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli.main", "merge", str(config), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "models[0].parameters.density" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
