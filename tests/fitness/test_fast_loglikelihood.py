"""The fast loglikelihood path (evomerge.fitness.loglikelihood) against lm-eval's own: every
request's (logprob, is_greedy) equals ``HFLM.loglikelihood``'s on the same live model, with the
same ``_encode_pair`` (the chat template's as-given split included).

Tolerance: float32, |Δ logprob| <= 1e-4 per request. The two paths add the same terms in other
orders (other batch shapes, a prefix's keys and values computed apart and concatenated, the LM head
on fewer rows): rounding differences of a few float32 ulps per logit; the largest seen here is
1.5e-5 on sums of up to tens of nats (~1e-6 relative). 1e-4 leaves a margin above that and is
still far below any difference a search could act on. is_greedy must be identical (the items are
built so that some are greedy and some not).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from evomerge.compat.lm_eval import encode_loglikelihood_requests, score_continuations_as_given
from evomerge.fitness import load_fitness
from evomerge.fitness.loglikelihood import (
    lm_eval_input_tokens,
    model_input,
    reusing_prefixes,
    score_loglikelihood,
    unavailable_reason,
)
from evomerge.io import shipped
from tests.chat_tokenizers import chatml_tokenizer

TOLERANCE = 1e-4
DATA = Path(__file__).parents[1] / "data" / "fitness"
SYSTEM = "You are a small assistant that answers with one line."
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}"
          "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The zoo's tokenizer with ChatML tokens and a template whose system turn every prompt shares."""
    return chatml_tokenizer(tmp_path_factory.mktemp("fast-ll-tokenizer"), CHATML)


def build(architecture: str, tokenizer) -> torch.nn.Module:
    """A random tiny model whose newline row is scaled by 2, so that it ends some answers, and whose
    byte-fallback rows are 0, so that its answers are text (bytes do not re-encode alike)."""
    torch.manual_seed(0)
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **special))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                                           n_positions=512, initializer_range=0.3, **special))
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tokenizer.convert_tokens_to_ids("\n")] *= 2
        head[tokenizer.convert_tokens_to_ids([f"<0x{i:02X}>" for i in range(256)])] = 0
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tokenizer):
    return build(request.param, tokenizer)


def hflm(model, tokenizer, *, batch_size: int = 8, chat: bool = False, max_length: int | None = None):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    if chat:
        score_continuations_as_given(lm)  # what LmEvalMetric does with apply_chat_template
    return lm


def compare(model, tokenizer, requests, *, batch_size: int, chat: bool = False, max_length: int | None = None):
    """(ours, lm-eval's) values of ``requests``: score_loglikelihood on HFLM's own token pairs
    against ``HFLM.loglikelihood``; asserts they agree (module doc). Returns the fast path's Scored."""
    lm = hflm(model, tokenizer, batch_size=batch_size, chat=chat, max_length=max_length)
    with torch.no_grad():
        theirs = lm.loglikelihood(requests, disable_tqdm=True)
        ours = score_loglikelihood(model, encode_loglikelihood_requests(lm, requests), max_length=lm.max_length,
                                   batch_size=batch_size)
    assert len(ours.values) == len(theirs) == len(requests)
    assert max(abs(a - b) for (a, _), (b, _) in zip(ours.values, theirs)) <= TOLERANCE
    assert [g for _, g in ours.values] == [g for _, g in theirs]
    return ours, theirs


def request(context: str, continuation: str):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)


def greedy_items(model, tokenizer, prompts: list[str], render=lambda p: p) -> list[dict]:
    """Items whose answer is the model's greedy answer (to its newline) on every other prompt
    where it ends one within 8 tokens, else its first token (wrong: it goes on)."""
    newline, items = tokenizer.convert_tokens_to_ids("\n"), []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(render(prompt), return_tensors="pt").input_ids
        out = []
        with torch.no_grad():
            for _ in range(8):
                out.append(int(model(torch.cat([ids, torch.tensor([out], dtype=ids.dtype)], 1)).logits[0, -1].argmax()))
                if out[-1] == newline:
                    break
        ended = (out[-1] == newline and i % 2 == 0
                 and tokenizer(tokenizer.decode(out), add_special_tokens=False).input_ids == out)
        items.append({"prompt": prompt, "answer": tokenizer.decode(out[:-1] if ended else out[:1])})
    return items


def write_tasks(folder: Path, items: list[dict], template: str) -> Path:
    tasks, data = folder / "tasks", {s: folder / f"{s}.jsonl" for s in ("search", "test")}
    tasks.mkdir(parents=True)
    for path in data.values():
        path.write_text("".join(json.dumps(item) + "\n" for item in items))
    (tasks / template).write_text((shipped.folder("fitness") / "tasks" / template).read_text())
    (tasks / "probe.yaml").write_text(yaml.safe_dump({
        "include": template, "task": "probe", "dataset_kwargs": {"data_files": {s: str(p) for s, p in data.items()}}}))
    return tasks


def zoo_prompts(count: int) -> list[str]:
    prompts = []
    for skill in ("increment", "reverse", "dates"):
        lines = (shipped.folder("fitness") / "data" / skill / "test.jsonl").read_text().splitlines()[:count]
        prompts += [json.loads(line)["prompt"] for line in lines]
    return prompts


def task_requests(fitness, name: str, model, tokenizer) -> list:
    metric = fitness.metrics[name]
    metric.prepare(model, tokenizer, "test")
    return [i for i in metric.tasks["test"].instances if i.request_type == "loglikelihood"]


def both_paths(definition: dict, model, tokenizer) -> tuple[dict, dict]:
    """evaluate_items' per-item values with the fast path (default) and with fast_loglikelihood: false."""
    fast = load_fitness(definition).evaluate_items(model, tokenizer, "test")[1]
    slow_definition = {**definition, "metrics": {name: {**spec, "fast_loglikelihood": False}
                                                 for name, spec in definition["metrics"].items()}}
    return fast, load_fitness(slow_definition).evaluate_items(model, tokenizer, "test")[1]


def test_zoo_greedy_tasks_match_lm_eval(model, tokenizer, tmp_path, caplog):
    """The shipped zoo greedy template (acc = is_greedy of answer + newline) on zoo prompts."""
    items = greedy_items(model, tokenizer, zoo_prompts(12))
    tasks = write_tasks(tmp_path, items, "_zoo_greedy_template_yaml")
    definition = {"include_path": str(tasks), "metrics": {"greedy": {"type": "lm_eval", "task": "probe",
                                                                     "metric": "acc", "batch_size": 5}}}
    requests = task_requests(load_fitness(definition), "greedy", model, tokenizer)
    for batch_size in (1, 5, 1000):  # one per batch, mixed lengths per batch, all in one batch
        _, theirs = compare(model, tokenizer, requests, batch_size=batch_size)
    assert 0 < sum(g for _, g in theirs) < len(theirs)  # informative: some greedy, some not
    with caplog.at_level(logging.WARNING):
        fast, slow = both_paths(definition, model, tokenizer)
    assert fast == slow
    assert not [r for r in caplog.records if r.name.startswith("evomerge")]  # the fast path ran: no fallback


def test_chat_template_task_matches_lm_eval(model, tokenizer, tmp_path):
    """apply_chat_template: true: every context starts with the same system turn (the shared
    prefix), the generation prompt stays in the context (score_continuations_as_given)."""
    def render(prompt: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)

    items = greedy_items(model, tokenizer, zoo_prompts(8), render)
    tasks = write_tasks(tmp_path, items, "_zoo_greedy_template_yaml")
    definition = {"include_path": str(tasks), "metrics": {"chat": {
        "type": "lm_eval", "task": "probe", "metric": "acc", "apply_chat_template": True, "batch_size": 4}}}
    requests = task_requests(load_fitness(definition), "chat", model, tokenizer)
    assert all(r.args[0].startswith("<|im_start|>system\n" + SYSTEM) for r in requests)
    for batch_size in (1, 4, 1000):
        ours, theirs = compare(model, tokenizer, requests, batch_size=batch_size, chat=True)
    assert 0 < sum(g for _, g in theirs) < len(theirs)
    pairs = encode_loglikelihood_requests(hflm(model, tokenizer, chat=True), requests)
    prefix = len(tokenizer("<|im_start|>system\n" + SYSTEM + "<|im_end|>\n<|im_start|>user\n").input_ids)
    assert ours.tokens <= lm_eval_input_tokens(pairs, 512) - (len(pairs) - 1) * prefix  # computed once
    fast, slow = both_paths(definition, model, tokenizer)
    assert fast == slow


@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_multiple_choice_and_few_shot_match_lm_eval(model, tokenizer, num_fewshot):
    """fit_mc: choices share their document's context (one-token choices: one input for all of them)."""
    definition = {"include_path": str(DATA / "tasks"), "metrics": {"mc": {
        "type": "lm_eval", "task": "fit_mc", "metric": "acc", "num_fewshot": num_fewshot, "batch_size": 3}}}
    requests = task_requests(load_fitness(definition), "mc", model, tokenizer)
    assert len({r.args[0] for r in requests}) < len(requests)  # several choices per context
    for batch_size in (1, 3, 1000):
        compare(model, tokenizer, requests, batch_size=batch_size)
    fast, slow = both_paths(definition, model, tokenizer)
    assert fast == slow and 0 < sum(fast["mc"]) < len(fast["mc"])


def test_edge_cases_match_lm_eval(model, tokenizer):
    """Mixed lengths, a context that is all shared prefix, an empty context (HFLM's prefix token),
    repeated and one-token requests, and inputs truncated from the left at max_length."""
    shared = "the cat sat on the mat and"
    requests = [request(shared, " the dog"), request(shared + " the dog ran", " far away"),
                request(shared + " then", " it"), request(shared, " the dog"), request(shared, " a"),
                request(shared + " so", " it sat on the mat and the dog ran far far away"),
                request("", "the cat")]
    for batch_size in (1, 2, 100):
        compare(model, tokenizer, requests, batch_size=batch_size)
    long = [request("one two three four five six seven eight nine ten eleven twelve thirteen " * 2, " end"),
            request("a b c d e f g h i j k l m n o p q r s t u v w x y z", " a b c"),
            request("short", " s t u v w x y z")]  # a continuation of max_length tokens
    lm = hflm(model, tokenizer, max_length=16)
    pairs = encode_loglikelihood_requests(lm, long)
    assert all(len(c) + len(k) > 17 for c, k in pairs) and len(pairs[2][1]) == 16  # all truncated
    for batch_size in (1, 3):
        compare(model, tokenizer, long, batch_size=batch_size, max_length=16)


def test_lm_head_runs_on_scored_positions_only(model, tokenizer):
    """A hook on the output embedding counts the positions it projects: the fast path, one per
    scored token of each distinct input; lm-eval's, every position of every padded batch."""
    requests = [request(f"the cat sat on the mat and the dog ran far away {'and ' * i}then", " it sat")
                for i in range(12)]
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        lm = hflm(model, tokenizer, batch_size=4)
        with torch.no_grad():
            lm.loglikelihood(requests, disable_tqdm=True)
            theirs, rows[:] = sum(rows), []
            pairs = encode_loglikelihood_requests(lm, requests)
            score_loglikelihood(model, pairs, max_length=lm.max_length, batch_size=4)
    finally:
        handle.remove()
    assert sum(rows) == sum(len(k) for _, k in pairs)
    assert sum(rows) * 5 < theirs, (sum(rows), theirs)


def shared_prefix(inputs: list[tuple[int, ...]], keep: dict[tuple[int, ...], int]) -> int:
    """The expected prefix length, computed naively: the longest common prefix, capped so that
    every input keeps its scored positions."""
    length = 0
    while all(len(i) > length and i[length] == inputs[0][length] for i in inputs):
        length += 1
    return min(length, *(len(i) - keep[i] for i in inputs))


def test_tokens_scored_counts_forward_tokens(tokenizer, tmp_path):
    """tokens_scored grows, per call, by: fast path, the shared prefix once and each distinct
    input's remaining tokens; lm-eval's path, each distinct input's tokens; perplexity, the
    tokens of every window; generation through lm-eval, at least the prompts' tokens, at most one more per
    prompt per generated token beyond the first."""
    model = build("llama", tokenizer)
    items = [{"prompt": p, "answer": "1"} for p in zoo_prompts(4)]
    tasks = write_tasks(tmp_path, items, "_zoo_greedy_template_yaml")
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog ran far away " * 20)
    definition = {"include_path": str(tasks), "metrics": {
        "chat": {"type": "lm_eval", "task": "probe", "metric": "acc", "apply_chat_template": True},
        "plain": {"type": "lm_eval", "task": "probe", "metric": "acc", "fast_loglikelihood": False},
        "ppl": {"type": "perplexity", "data": {"search": str(text), "test": str(text)}, "context": 32, "stride": 16,
                "weight": 0}}}
    fitness = load_fitness(definition)
    fitness.evaluate(model, tokenizer, "test")
    metrics = fitness.metrics
    for name, chat in (("chat", True), ("plain", False)):
        pairs = encode_loglikelihood_requests(hflm(model, tokenizer, chat=chat),
                                              task_requests(fitness, name, model, tokenizer))
        inputs = list(dict.fromkeys(model_input(c, k, 512) for c, k in pairs))
        if chat:
            keep = {model_input(c, k, 512): len(k) for c, k in pairs}
            prefix = shared_prefix(inputs, keep)
            assert prefix > 10  # the system turn
            assert metrics[name].tokens_scored == prefix + sum(len(i) - prefix for i in inputs)
        else:
            assert metrics[name].tokens_scored == sum(len(i) for i in inputs)
    windows = metrics["ppl"].corpus(tokenizer, "test").windows
    assert metrics["ppl"].tokens_scored == sum(w.end - w.begin for w in windows)
    counts = {name: m.tokens_scored for name, m in metrics.items()}
    fitness.evaluate(model, tokenizer, "test")  # a running count: no cache key, scored again
    assert {name: m.tokens_scored for name, m in metrics.items()} == {n: 2 * c for n, c in counts.items()}

    generate = load_fitness({"include_path": str(write_tasks(tmp_path / "gen", items, "_zoo_template_yaml")),
                             "metrics": {"gen": {"type": "lm_eval", "task": "probe", "metric": "exact_match",
                                                 "fast_generation": False}}})
    generate.evaluate(model, tokenizer, "test")
    prompts = sum(len(tokenizer(item["prompt"]).input_ids) for item in items)
    assert prompts < generate.metrics["gen"].tokens_scored <= prompts + len(items) * 15  # max_gen_toks 16


def test_a_prefix_runs_once_for_all_the_calls_of_a_reusing_block(model, tokenizer):
    """Inside reusing_prefixes a later call on the same model takes the keys and values of the
    start its prefix shares with one run before: the same values as lm-eval's, that start not
    run (nor counted) again; a longer prefix runs only what it adds, a shorter one nothing.
    Outside a block nothing is kept."""
    common = "the cat sat on the mat and the dog ran far away"
    words = ["then", "now", "so", "and", "but", "yet", "or", "still"]
    calls = {"first": [request(f"{common} {w} it", " sat") for w in words[:4]],
             "second": [request(f"{common} {w} it", " ran") for w in words[4:]],
             "longer": [request(f"{common} and then {w} it", " sat") for w in words[:4]],
             "shorter": [request(f"the cat sat on the {w} it", " sat") for w in words[:4]]}
    lm = hflm(model, tokenizer)
    prefixes = {}
    for name, requests in calls.items():
        pairs = encode_loglikelihood_requests(lm, requests)
        inputs = [model_input(c, k, lm.max_length) for c, k in pairs]
        prefixes[name] = shared_prefix(inputs, {i: len(k) for i, (_, k) in zip(inputs, pairs)})
    assert prefixes["first"] == prefixes["second"] > prefixes["shorter"] > 2
    assert prefixes["longer"] > prefixes["first"]
    fresh = {name: compare(model, tokenizer, requests, batch_size=2)[0] for name, requests in calls.items()}
    with reusing_prefixes():
        reused = {name: compare(model, tokenizer, requests, batch_size=2)[0] for name, requests in calls.items()}
    assert reused["first"].tokens == fresh["first"].tokens
    for name in ("second", "longer"):  # the first call's prefix is not run again
        assert reused[name].tokens == fresh[name].tokens - prefixes["first"], name
    assert reused["shorter"].tokens == fresh["shorter"].tokens - prefixes["shorter"]  # all of it run before
    again = compare(model, tokenizer, calls["second"], batch_size=2)[0]  # the block is closed: run in full
    assert again.tokens == fresh["second"].tokens


def test_a_race_runs_the_shared_prefix_once_over_its_chunks(tokenizer, tmp_path, monkeypatch):
    """Fitness.race scores a candidate in chunks (here four calls), all inside one reusing block:
    the model runs from position 0 (the system turn) once. Without the block, once a call."""
    import contextlib

    import evomerge.fitness.fitness as fitness_module
    from evomerge.fitness.racing import Reference, in_item_order

    model = build("llama", tokenizer)
    tasks = write_tasks(tmp_path, [{"prompt": p, "answer": "1"} for p in zoo_prompts(4)], "_zoo_greedy_template_yaml")
    definition = {"include_path": str(tasks), "racing": {"first": 2, "confidence": 0.5}, "metrics": {
        "chat": {"type": "lm_eval", "task": "probe", "metric": "acc", "apply_chat_template": True}}}
    starts = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: starts.append(kwargs.get("position_ids") is None
                                                   or int(kwargs["position_ids"][0, 0]) == 0), with_kwargs=True)
    try:
        for reuse in (True, False):
            if not reuse:
                monkeypatch.setattr(fitness_module, "reusing_prefixes", contextlib.nullcontext)
            fitness = load_fitness(definition)
            scores, values = fitness.evaluate_items(model, tokenizer, "search")
            reference = Reference(0, {"chat": in_item_order(values["chat"], 0)}, scores)
            starts.clear()
            race = fitness.race(model, tokenizer, [reference])  # level with itself: never stopped, every chunk scored
            assert not race.stopped and race.scores == scores
            assert sum(starts) == (1 if reuse else len(fitness.racing.chunks({"chat": 12}))), (reuse, starts)
    finally:
        handle.remove()


class Wrapped(LlamaForCausalLM):
    """A model whose forward takes anything (as a wrapper might): the fast path cannot vouch for it."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_falls_back_to_lm_eval_with_one_log_line(tokenizer, tmp_path, caplog):
    model = build("llama", tokenizer)
    wrapped = Wrapped(model.config).eval()
    wrapped.load_state_dict(model.state_dict())
    assert unavailable_reason(model) is None
    assert "forward takes no logits_to_keep, position_ids, cache" in unavailable_reason(wrapped)
    items = greedy_items(model, tokenizer, zoo_prompts(4))
    tasks = write_tasks(tmp_path, items, "_zoo_greedy_template_yaml")
    fitness = load_fitness({"include_path": str(tasks), "metrics": {"greedy": {
        "type": "lm_eval", "task": "probe", "metric": "acc"}}})
    with caplog.at_level(logging.WARNING, logger="evomerge.fitness.lmeval"):
        values = [fitness.evaluate_items(wrapped, tokenizer, "test")[1] for _ in range(2)]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("evomerge")] == [
        "greedy: loglikelihood requests scored through lm-eval's HFLM: " + unavailable_reason(wrapped)]
    assert values[0] == values[1] == fitness.evaluate_items(model, tokenizer, "test")[1]
