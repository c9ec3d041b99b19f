"""The fast generation path (evomerge.fitness.generation) against two oracles: greedy decoding
recomputed from scratch at every step (no cache, no padding, no prefix: the argmax of the last
logits of the whole sequence), and lm-eval's own ``generate_until`` (transformers' ``generate``),
string by string and item by item, through the shipped zoo generation template, with and without
a chat template (a shared system turn), at several batch sizes.

Tolerance: none. The generated tokens and strings must be equal. Both sides take argmaxes of
float32 logits that differ only in reduction order (a few ulps); the tiny random models here have
no logits that close, so an argmax flip would be a bug, not rounding.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import torch

from evomerge.fitness import load_fitness
from evomerge.fitness.generation import eos_token_ids, generate_greedy, greedy_config_reason
from evomerge.fitness.loglikelihood import reusing_prefixes
from tests.chat_tokenizers import chatml_tokenizer
from tests.fitness.test_fast_loglikelihood import CHATML, build, greedy_items, write_tasks, zoo_prompts

MAX_NEW = 10


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The fast-loglikelihood tests' tokenizer: the zoo's, ChatML tokens, a shared system turn."""
    return chatml_tokenizer(tmp_path_factory.mktemp("fast-gen-tokenizer"), CHATML)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tokenizer):
    return build(request.param, tokenizer)


def naive_greedy(model, prompt: list[int], done) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        while len(out) < MAX_NEW:
            logits = model(torch.tensor([prompt + out])).logits[0, -1]
            out.append(int(logits.argmax()))
            if done(out):
                break
    return out


def render(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


@pytest.mark.parametrize("chat,reuse", [(False, False), (True, False), (True, True)])
def test_generate_greedy_equals_decoding_from_scratch(model, tokenizer, chat, reuse):
    """Right guesses, half-right, wrong, none, several: the same tokens as the oracle;
    ``reuse``: every call inside one reusing_prefixes block, later batches on the first's prefix."""
    newline = tokenizer.convert_tokens_to_ids("\n")

    def done(tokens):
        return tokens[-1] == newline

    texts = [render(tokenizer, p) if chat else p for p in zoo_prompts(6)]
    prompts = [tokenizer(t).input_ids for t in texts]
    expected = [naive_greedy(model, p, done) for p in prompts]
    assert any(len(e) < MAX_NEW for e in expected) and any(len(e) == MAX_NEW for e in expected)
    wrong = tokenizer.convert_tokens_to_ids("q")
    kinds = [lambda e: [e], lambda e: [e[:2] + [wrong] + e[3:]], lambda e: [[wrong] * 4], lambda e: [],
             lambda e: [e + [wrong] * 5],
             # several guesses: a wrong one then the right one (taken up after the rejection); two
             # half-right ones that part at different tokens; one that stops short
             lambda e: [[wrong] * 3, e], lambda e: [e[:1] + [wrong] + e[2:], e[:3] + [wrong]], lambda e: [e[:2]]]
    drafts = [kinds[i % len(kinds)](e) for i, e in enumerate(expected * 2)]
    prompts, expected = prompts * 2, expected * 2
    with torch.no_grad(), reusing_prefixes() if reuse else contextlib.nullcontext():
        for batch in (1, 4, len(prompts)):
            got = []
            for start in range(0, len(prompts), batch):
                got += generate_greedy(model, prompts[start:start + batch], drafts[start:start + batch],
                                       max_new_tokens=MAX_NEW, done=done)
            assert got == expected


def both_paths(definition: dict, model, tokenizer, split: str = "test"):
    """Per-item values and generated strings, fast path (default) and fast_generation: false."""
    results = []
    for fast in (True, False):
        fitness = load_fitness({**definition, "metrics": {
            name: {**spec, "fast_generation": fast} for name, spec in definition["metrics"].items()}})
        metric = next(iter(fitness.metrics.values()))
        with torch.no_grad():
            values = fitness.evaluate_items(model, tokenizer, split)[1]
        results.append((values, metric.tokens_scored))
    return results


@pytest.mark.parametrize("chat", [False, True])
def test_generation_task_matches_lm_eval(model, tokenizer, tmp_path, chat, caplog):
    """The shipped zoo generation template (until newline, exact_match): half the answers are
    the model's greedy ones (right drafts), half are not."""
    items = greedy_items(model, tokenizer, zoo_prompts(8), (lambda p: render(tokenizer, p)) if chat else (lambda p: p))
    tasks = write_tasks(tmp_path, items, "_zoo_template_yaml")
    for batch_size in (1, 5, 1000):
        definition = {"include_path": str(tasks), "metrics": {"gen": {
            "type": "lm_eval", "task": "probe", "metric": "exact_match", "batch_size": batch_size,
            "apply_chat_template": chat, "gen_kwargs": {"max_gen_toks": MAX_NEW}}}}
        with caplog.at_level(logging.WARNING):
            (fast, fast_tokens), (slow, slow_tokens) = both_paths(definition, model, tokenizer)
        assert fast == slow
        assert 0 < sum(fast["gen"]) < len(items)  # informative: some right, some wrong
        if chat and batch_size > 1:  # the system turn runs once per batch instead of once per item
            assert fast_tokens < slow_tokens
    assert not [r for r in caplog.records if r.name.startswith("evomerge")]  # no fallback


def test_greedy_config_and_hidden_stops_fall_back(tokenizer, tmp_path, caplog):
    """A generation config that changes greedy decoding: lm-eval's path, said once. A stop string
    that decoding drops and that is not an eos token (``<|im_end|>`` here): that batch too."""
    model = build("llama", tokenizer)
    items = greedy_items(model, tokenizer, zoo_prompts(4))
    tasks = write_tasks(tmp_path, items, "_zoo_template_yaml")
    definition = {"include_path": str(tasks), "metrics": {"gen": {
        "type": "lm_eval", "task": "probe", "metric": "exact_match", "gen_kwargs": {"max_gen_toks": MAX_NEW}}}}
    assert greedy_config_reason(model) is None and eos_token_ids(model) == {tokenizer.eos_token_id}

    neutral, model.generation_config.repetition_penalty = model.generation_config.repetition_penalty, 1.3
    assert greedy_config_reason(model) == "its generation config sets repetition_penalty"
    with caplog.at_level(logging.WARNING, logger="evomerge.fitness.lmeval"):
        (fast, fast_tokens), (slow, slow_tokens) = both_paths(definition, model, tokenizer)
    assert (fast, fast_tokens) == (slow, slow_tokens)
    assert [r.getMessage() for r in caplog.records] == [
        "gen: generation requests run through transformers' generate: its generation config sets repetition_penalty"]
    model.generation_config.repetition_penalty = neutral

    hidden = {**definition, "metrics": {"gen": {**definition["metrics"]["gen"],
                                                "gen_kwargs": {"max_gen_toks": MAX_NEW, "until": ["<|im_end|>"]}}}}
    (fast, fast_tokens), (slow, slow_tokens) = both_paths(hidden, model, tokenizer)
    assert (fast, fast_tokens) == (slow, slow_tokens)  # the same forward calls: lm-eval's
    (fast, fast_tokens), (slow, slow_tokens) = both_paths(definition, model, tokenizer)
    assert fast == slow and fast_tokens != slow_tokens  # without it, the fast path


def test_a_model_scored_after_another_gets_its_own_values(model, tokenizer, tmp_path):
    """The fast path drafts each prompt with what the last model scored generated from it (a
    guess it verifies): a model scored after another that answers differently gets the values
    lm-eval's own path gives it alone."""
    items = greedy_items(model, tokenizer, zoo_prompts(8))
    tasks = write_tasks(tmp_path, items, "_zoo_template_yaml")
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.3 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    definition = {"include_path": str(tasks), "metrics": {"gen": {
        "type": "lm_eval", "task": "probe", "metric": "exact_match", "batch_size": 1000,
        "gen_kwargs": {"max_gen_toks": MAX_NEW}}}}
    fitness = load_fitness(definition)
    with torch.no_grad():
        first = fitness.evaluate_items(model, tokenizer, "test")[1]
        after = fitness.evaluate_items(other, tokenizer, "test")[1]
    alone = both_paths(definition, other, tokenizer)[1][0]  # lm-eval's path, a fresh metric
    assert after == alone
    assert first != after  # the other model answers differently: its drafts were partly wrong


def test_the_same_model_again_costs_its_guesses_only_and_forget_answers_resets(model, tokenizer, tmp_path):
    """A model scored again is guessed right on every item by its own last answers: it computes
    fewer tokens than the first time (every wrong answer then cost a decoding); after
    ``forget_answers`` it computes what the first time did."""
    items = greedy_items(model, tokenizer, zoo_prompts(8))
    tasks = write_tasks(tmp_path, items, "_zoo_template_yaml")
    fitness = load_fitness({"include_path": str(tasks), "metrics": {"gen": {
        "type": "lm_eval", "task": "probe", "metric": "exact_match", "batch_size": 1000,
        "gen_kwargs": {"max_gen_toks": MAX_NEW}}}})
    metric = fitness.metrics["gen"]
    costs = []
    with torch.no_grad():
        for forget in (False, False, True):
            if forget:
                metric.forget_answers()
            before = metric.tokens_scored
            values = fitness.evaluate_items(model, tokenizer, "test")[1]
            costs.append((metric.tokens_scored - before, values))
    (first, values), (again, same), (reset, after) = costs
    assert values == same == after and 0 < sum(values["gen"]) < len(items)
    assert again < first == reset
