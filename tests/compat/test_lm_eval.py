"""evomerge.compat.lm_eval: the lm-eval private names evomerge relies on still exist and behave
as relied upon (fails when lm-eval moves one; see the module for why each is private)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from evomerge.compat import lm_eval as compat


@pytest.fixture()
def task(tmp_path, monkeypatch):
    """A two-document generate_until task on local data, with a filter pipeline of its own."""
    import datasets
    import huggingface_hub.constants as hub
    from lm_eval.api.task import ConfigurableTask

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}:", "answer": f"a{i}"}) + "\n" for i in range(2)))
    return ConfigurableTask(config={
        "task": "compat_probe", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"search": str(data), "test": str(data)}},
        "validation_split": "search", "test_split": "test", "output_type": "generate_until",
        "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
        "filter_list": [{"name": "upper", "filter": [
            {"function": "regex", "regex_pattern": "(a\\d)", "fallback": "none"}, {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]})


def test_load_task_yaml_merges_includes_and_resolves_functions(tmp_path):
    (tmp_path / "helpers.py").write_text("def twice(doc):\n    return doc['x'] * 2\n")
    (tmp_path / "_base_yaml").write_text("output_type: generate_until\ndoc_to_text: !function helpers.twice\n"
                                         "num_fewshot: 3\n")
    (tmp_path / "probe.yaml").write_text("include: _base_yaml\ntask: probe\nnum_fewshot: 0\n")
    config = compat.load_task_yaml(tmp_path / "probe.yaml")
    assert config["task"] == "probe" and config["output_type"] == "generate_until"
    assert config["num_fewshot"] == 0  # the including file's keys win
    assert "include" not in config
    assert callable(config["doc_to_text"]) and config["doc_to_text"]({"x": "ab"}) == "abab"


def test_apply_filters_to_filters_the_given_instances(task):
    task.build_all_requests(limit=2)
    built = task.instances
    assert len(built) == 2 and task._instances is built  # the property is the private list
    fresh = [dataclasses.replace(i, resps=[f"  {i.doc['answer']} tail"], filtered_resps={}) for i in built]
    compat.apply_filters_to(task, fresh)
    assert [i.filtered_resps["upper"] for i in fresh] == ["a0", "a1"]
    assert all(not i.filtered_resps for i in built)  # the built requests are left alone
    assert task.instances is fresh


def test_no_request_progress_bar_hides_build_all_requests_bar(task, capsys):
    import lm_eval.api.task as task_module
    from tqdm import tqdm

    assert task_module.tqdm is tqdm  # the module-level name build_all_requests calls
    task.build_all_requests(limit=2)
    assert "2/2" in capsys.readouterr().err  # the bar, drawn without the context
    with compat.no_request_progress_bar():
        assert task_module.tqdm is not tqdm
        task.build_all_requests(limit=2)
    assert "2/2" not in capsys.readouterr().err
    assert task_module.tqdm is tqdm  # restored


class _CharLM:
    """A ``TemplateLM`` whose tokens are characters, recording the pairs it is asked to score."""

    @staticmethod
    def make():
        from lm_eval.api.model import TemplateLM

        class CharLM(TemplateLM):
            backend = "causal"
            eot_token_id = 0

            def __init__(self):
                super().__init__()
                self.scored = []

            def tok_encode(self, string, add_special_tokens=None, **kwargs):
                return [ord(c) for c in string]

            def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
                self.scored += [(context, continuation) for _, context, continuation in requests]
                return [(0.0, True)] * len(requests)

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def generate_until(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return CharLM()


def test_score_continuations_as_given_keeps_context_whitespace():
    from types import SimpleNamespace

    from lm_eval.api.model import TemplateLM
    from lm_eval.models.huggingface import HFLM

    assert HFLM._encode_pair is TemplateLM._encode_pair  # HFLM does not override the patched method
    requests = [SimpleNamespace(args=("<user>q<assistant>\n", "7\n")), SimpleNamespace(args=("q:", " 7"))]
    enc = [ord(c) for c in "<user>q<assistant>\n"]
    stock = _CharLM.make()
    stock.loglikelihood(requests, disable_tqdm=True)
    assert stock.scored[0] == (enc[:-1], [ord(c) for c in "\n7\n"])  # stock moves the newline: still needed
    patched = _CharLM.make()
    compat.score_continuations_as_given(patched)
    patched.loglikelihood(requests, disable_tqdm=True)  # loglikelihood still splits through _encode_pair
    assert patched.scored[0] == (enc, [ord(c) for c in "7\n"])
    assert patched.scored[1] == stock.scored[1] == ([ord(c) for c in "q:"], [ord(c) for c in " 7"])
    assert _CharLM.make()._encode_pair("a\n", "b") == ([ord("a")], [ord("\n"), ord("b")])  # per instance


def test_encode_loglikelihood_requests_returns_the_pairs_loglikelihood_scores():
    from types import SimpleNamespace

    from lm_eval.models.huggingface import HFLM

    assert callable(HFLM._loglikelihood_tokens)  # the step loglikelihood hands the pairs to
    requests = [SimpleNamespace(args=(context, continuation)) for context, continuation in
                (("q: ", "7"), ("", "ab"), ("a\n", "b"))]  # a trailing space, an empty context
    stock = _CharLM.make()
    stock.loglikelihood(requests, disable_tqdm=True)
    lm = _CharLM.make()
    assert compat.encode_loglikelihood_requests(lm, requests) == stock.scored
    assert stock.scored[1] == ([0], [ord("a"), ord("b")])  # the prefix token (here eot, 0) as context
    assert lm.scored == [] and "_loglikelihood_tokens" not in vars(lm)  # nothing scored, method restored
    compat.score_continuations_as_given(lm)  # the instance's own _encode_pair is the one used
    assert compat.encode_loglikelihood_requests(lm, requests)[0] == ([ord(c) for c in "q: "], [ord("7")])


def test_generating_with_hands_each_batch_to_the_function(tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from tests.chat_tokenizers import chatml_tokenizer
    from tests.fitness.test_fast_loglikelihood import CHATML, build

    tokenizer = chatml_tokenizer(tmp_path, CHATML)
    model = build("llama", tokenizer)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    requests = [Instance(request_type="generate_until", doc={}, idx=0,
                         arguments=(prompt, {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}))
                for prompt in ("reverse: 12 ->", "increment: 7 ->", "dates: 3 ->")]
    stock = lm.generate_until(requests, disable_tqdm=True)
    calls = []

    def generate(context, max_length, stop, fallback, **kwargs):
        calls.append((tuple(context.shape), max_length, list(stop), sorted(kwargs)))
        return fallback(context, max_length, stop, **kwargs)

    with compat.generating_with(lm, generate):
        assert lm.generate_until(requests, disable_tqdm=True) == stock
    eos = tokenizer.decode([tokenizer.eos_token_id])
    assert [c[0][0] for c in calls] == [2, 1]  # HFLM's batches of 2
    assert all(length == shape[1] + 5 and stop == ["\n", eos] and "attention_mask" in kwargs
               for shape, length, stop, kwargs in calls)
    assert "_model_generate" not in vars(lm)  # the class's method again
