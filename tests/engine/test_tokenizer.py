"""Merging models whose vocabularies differ: the output tokenizer and the re-mapped rows.

Parity with mergekit 0.1.5 on :func:`~tests.conftest.chat_family` (a base and two fine-tunes
that add different special tokens, one of them at different ids in the two). Tolerance: none,
tensors must be equal bit for bit: re-mapping is copies, one mean per missing row (the same
float32 additions in the same order, then one division) and one ``torch.mean`` for padding
rows, and the methods tested are elementwise (linear, task arithmetic) or, for TIES, trims
of task vectors with distinct magnitudes. The tokenizers must have the same vocabulary (token
→ id), the same added tokens and encode a chat-formatted text to the same ids.

mergekit builds the union over ``set(referenced_models)``, so the ids it gives the tokens of
non-base models depend on the process's string hashing; evomerge takes the config's order
(base, then as listed), and the parity runs pin mergekit's set to that order.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from evomerge import merge, parse_config
from evomerge.engine.merge import merge_state_dict
from tests.conftest import read_folder

TEXT = "<|im_start|>user\nThe quick brown fox<|im_end|>\n<tool>12 + 30 = 42<new>"


def task_arithmetic(base, ft1, ft2, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(ft1), "parameters": {"weight": 0.7}},
                       {"model": str(ft2), "parameters": {"weight": 0.4}}],
            "dtype": "float32", **extra}


def configs(base, ft1, ft2) -> dict[str, dict]:
    block = {"source": "union", "pad_to_multiple_of": 8, "tokens": {
        "<|im_start|>": {"source": str(ft1)},
        "<|im_end|>": {"source": {"kind": "model_token", "model": str(ft2), "token": "<tool>"}, "force": True},
        "<new>": {"source": {"kind": "zero"}},
        "<s>": {"source": str(ft2), "force": True},
    }}
    linear = {"merge_method": "linear", "base_model": str(base),
              "models": [{"model": str(m), "parameters": {"weight": w}}
                         for m, w in ((base, 0.2), (ft1, 0.5), (ft2, 0.3))], "dtype": "float32"}
    ties = {**task_arithmetic(base, ft1, ft2), "merge_method": "ties",
            "parameters": {"density": 0.5}}
    return {
        "union": task_arithmetic(base, ft1, ft2, tokenizer_source="union"),
        "union_linear_with_base_listed": {**linear, "tokenizer_source": "union"},
        "union_ties": {**ties, "tokenizer_source": "union"},
        "block": task_arithmetic(base, ft1, ft2, tokenizer=block),
        "block_linear": {**linear, "tokenizer": block},
        "block_no_base": {**linear, "base_model": None,
                          "tokenizer": {"tokens": {"<new>": {"source": {"kind": "zero"}}}}},
        "base": task_arithmetic(base, ft1, ft2, tokenizer_source="base"),
        "model": task_arithmetic(base, ft1, ft2, tokenizer_source=str(ft2)),
    }


def run_mergekit(text: str, out, monkeypatch):
    mergekit = pytest.importorskip("mergekit")  # noqa: F841
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    def ordered(self):  # mergekit's set of models, in the config's order
        names = [self.base_model] if self.base_model else []
        for scope in [self, *(self.modules or {}).values()]:  # mergekit moves models into modules
            names += [m.model for m in scope.models or []]
            names += [s.model for part in scope.slices or [] for s in part.sources]
        return list(dict.fromkeys(names))

    monkeypatch.setattr(MergeConfiguration, "referenced_models", ordered)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))


@pytest.mark.parametrize("name", ["union", "union_linear_with_base_listed", "union_ties", "block", "block_linear",
                                  "block_no_base", "base", "model"])
def test_parity_with_mergekit(chat_family, tmp_path, monkeypatch, name):
    from transformers import AutoTokenizer

    config = {k: v for k, v in configs(*chat_family)[name].items() if v is not None}
    text = yaml.safe_dump(config, sort_keys=False)
    ours = merge(parse_config(text), tmp_path / "evomerge")
    run_mergekit(text, tmp_path / "mergekit", monkeypatch)
    theirs = tmp_path / "mergekit"
    a, b = read_folder(ours), read_folder(theirs)
    assert set(a) == set(b)
    for tensor in a:
        assert a[tensor].shape == b[tensor].shape and torch.equal(a[tensor], b[tensor]), tensor
    ta, tb = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(theirs)
    assert ta.get_vocab() == tb.get_vocab()
    assert {i: (t.content, t.special) for i, t in ta.added_tokens_decoder.items()} == \
        {i: (t.content, t.special) for i, t in tb.added_tokens_decoder.items()}
    assert ta(TEXT)["input_ids"] == tb(TEXT)["input_ids"]
    vocab_size = json.loads((ours / "config.json").read_text())["vocab_size"]
    assert vocab_size == json.loads((theirs / "config.json").read_text())["vocab_size"]
    assert vocab_size == a["model.embed_tokens.weight"].shape[0]


def test_union_fill_rule(chat_family):
    """A row a model lacks: the only model that has it, else the base's, else the mean."""
    from transformers import AutoTokenizer

    base, ft1, ft2 = chat_family
    config = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}}
                                                   for m in (base, ft1, ft2)],
              "parameters": {"normalize": False}, "tokenizer_source": "union", "dtype": "float32"}
    merged = merge_state_dict(parse_config(yaml.safe_dump(config)))["model.embed_tokens.weight"]
    vocab = AutoTokenizer.from_pretrained(base).get_vocab()
    rows = {m: read_folder(m)["model.embed_tokens.weight"] for m in chat_family}
    ids = {m: AutoTokenizer.from_pretrained(m).get_vocab() for m in chat_family}
    assert merged.shape[0] == len(vocab) + 3
    start, end, tool = len(vocab), len(vocab) + 1, len(vocab) + 2  # config order: ft1's, then ft2's
    # only ft1 has <|im_start|>: all three inputs take its row
    torch.testing.assert_close(merged[start], 3 * rows[ft1][ids[ft1]["<|im_start|>"]])
    # ft1 and ft2 have <|im_end|> (at different ids), the base does not: it takes their mean
    one, two = rows[ft1][ids[ft1]["<|im_end|>"]], rows[ft2][ids[ft2]["<|im_end|>"]]
    torch.testing.assert_close(merged[end], one + two + (one + two) / 2)
    torch.testing.assert_close(merged[tool], 3 * rows[ft2][ids[ft2]["<tool>"]])
    # a token every model has stays each model's own row
    token = vocab["<s>"]
    torch.testing.assert_close(merged[token], sum(rows[m][token] for m in chat_family))


def test_merged_model_loads_and_generates_with_the_tokenizer(chat_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    block = {"source": "union", "pad_to_multiple_of": 8,
             "tokens": {"<new>": {"source": {"kind": "zero"}}}}
    text = yaml.safe_dump(task_arithmetic(*chat_family, tokenizer=block))
    out = merge(parse_config(text), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(chat_family[0])) + 4  # 3 added + <new>
    assert model.config.vocab_size % 8 == 0 and model.config.vocab_size >= len(tokenizer)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[0].tolist()).count("<|im_end|>") == 1
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, ids.shape[1] + 4)
    assert model(ids).logits.shape[-1] == model.config.vocab_size
    assert tokenizer.decode(generated[0], skip_special_tokens=False).startswith("<|im_start|>user")


def test_unchanged_source_tokenizer_files_are_copied(chat_family, tmp_path):
    _, _, ft2 = chat_family
    out = merge(parse_config(yaml.safe_dump(task_arithmetic(*chat_family, tokenizer_source=str(ft2)))),
                tmp_path / "out")
    assert (out / "tokenizer.json").read_bytes() == (ft2 / "tokenizer.json").read_bytes()
