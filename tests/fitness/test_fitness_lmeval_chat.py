"""lm-eval fitness through a chat template (``apply_chat_template: true``): a loglikelihood
request scores the answer's tokens only, never the template's generation prompt (issue #19);
its ``acc`` equals greedy generation through the same template, item by item."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.fitness import load_fitness
from evomerge.io import shipped
from tests.chat_tokenizers import chatml_tokenizer

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GENERATION_PROMPT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """The zoo's tokenizer with ChatML's special tokens and template, saved and loaded back."""
    loaded = chatml_tokenizer(tmp_path_factory.mktemp("chatml-tokenizer"), CHATML)
    assert loaded.chat_template == CHATML and loaded.convert_tokens_to_ids("<|im_end|>") >= 400
    return loaded


def llama(tokenizer, seed: int, cls=LlamaForCausalLM):
    torch.manual_seed(seed)
    return cls(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)).eval()


def render(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> list[int]:
    """Greedy generation through the chat template, one full forward pass per token (no cache)."""
    ids = tokenizer(render(tokenizer, prompt), return_tensors="pt").input_ids
    newline, out = tokenizer.convert_tokens_to_ids("\n"), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.cat([ids, torch.tensor([out], dtype=ids.dtype)], 1)).logits[0, -1].argmax())
            out.append(token)
            if token == newline:
                break
    return out


def generated_answer(model, tokenizer, prompt: str) -> str | None:
    """What greedy generation answers (the text before its newline), None without a newline."""
    out = greedy(model, tokenizer, prompt)
    return tokenizer.decode(out[:-1]) if out[-1] == tokenizer.convert_tokens_to_ids("\n") else None


def write_tasks(folder: Path, items: list[dict]) -> Path:
    """probe (generation, exact match) and probe_greedy (loglikelihood acc): the shipped zoo templates."""
    tasks, data = folder / "tasks", {s: folder / f"{s}.jsonl" for s in ("search", "test")}
    tasks.mkdir()
    for path in data.values():
        path.write_text("".join(json.dumps(item) + "\n" for item in items))
    for template, task in (("_zoo_template_yaml", "probe"), ("_zoo_greedy_template_yaml", "probe_greedy")):
        (tasks / template).write_text((shipped.folder("fitness") / "tasks" / template).read_text())
        (tasks / f"{task}.yaml").write_text(yaml.safe_dump({
            "include": template, "task": task,
            "dataset_kwargs": {"data_files": {s: str(p) for s, p in data.items()}}}))
    return tasks


def chat_metric(task: str, name: str) -> dict:
    return {"type": "lm_eval", "task": task, "metric": name, "apply_chat_template": True}


class TemplateShy(LlamaForCausalLM):
    """The merge of issue #19, by rule: right after ``<|im_start|>assistant`` it puts 0.998 on
    ``<|im_end|>`` (the template's newline second), yet once the generation prompt is there it
    answers the last digit of the user's turn, then a newline. (Rules read the whole sequence:
    call it without a key-value cache.)"""

    def set_tokens(self, tokenizer) -> None:
        self.start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.newline = tokenizer.convert_tokens_to_ids("\n")
        self.assistant = tokenizer("assistant", add_special_tokens=False).input_ids
        self.digits = {tokenizer.convert_tokens_to_ids(d) for d in "0123456789"}

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        prompt = [self.start, *self.assistant]
        for row, ids in enumerate(input_ids.tolist()):
            for t in range(len(ids)):
                head = ids[:t + 1]
                if head[-len(prompt):] == prompt:
                    self._put(out.logits[row, t], {self.end: 0.998, self.newline: 0.0019})
                elif head[-len(prompt) - 1:] == prompt + [self.newline]:
                    self._put(out.logits[row, t], {[i for i in head if i in self.digits][-1]: 0.99})
                elif head[-len(prompt) - 2:-1] == prompt + [self.newline] and head[-1] in self.digits:
                    self._put(out.logits[row, t], {self.newline: 0.99})
        return out

    @staticmethod
    def _put(row: torch.Tensor, probabilities: dict[int, float]) -> None:
        rest = (1 - sum(probabilities.values())) / (row.numel() - len(probabilities))
        row.fill_(math.log(rest))
        for token, p in probabilities.items():
            row[token] = math.log(p)


def test_template_newline_is_not_scored(chat_tokenizer, tmp_path):
    """Issue #19's regression: the fixed ``acc`` scores every item right, as greedy generation
    does; stock lm-eval (``simple_evaluate`` on the same live model) scores each 0."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = llama(chat_tokenizer, 0, TemplateShy)
    model.set_tokens(chat_tokenizer)
    items = [{"prompt": f"say {d} ->", "answer": str(d)} for d in (3, 1, 4, 1, 5, 9, 2, 6)]
    for item in items:  # the oracle: greedy generation through the template answers every item
        assert generated_answer(model, chat_tokenizer, item["prompt"]) == item["answer"]
        ids = chat_tokenizer(render(chat_tokenizer, item["prompt"]), return_tensors="pt").input_ids
        with torch.no_grad():
            after_assistant = model(ids[:, :-1]).logits[0, -1].softmax(-1)
        assert after_assistant[model.end] > 0.99 > 0.01 > after_assistant[model.newline]
    tasks = write_tasks(tmp_path, items)
    fitness = load_fitness({"include_path": str(tasks), "metrics": {"greedy": chat_metric("probe_greedy", "acc")}})
    scores, values = fitness.evaluate_items(model, chat_tokenizer, "test")
    assert values["greedy"] == [1.0] * len(items) and scores["greedy"] == 1.0
    assert fitness.evaluate(model, chat_tokenizer, "search")["greedy"] == 1.0  # both splits
    stock = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=chat_tokenizer, batch_size=8), tasks=["probe_greedy"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        apply_chat_template=True, bootstrap_iters=0)
    assert stock["results"]["probe_greedy"]["acc,none"] == 0.0  # what the fix is for


class NoBytes(LlamaForCausalLM):
    """Never predicts a byte-fallback token (those decode to text that does not re-encode alike)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits[..., self.config.vocab_size - 258:self.config.vocab_size - 2] = -1e9
        return out


def test_chat_acc_equals_greedy_generation_item_by_item(chat_tokenizer, tmp_path, monkeypatch):
    """Two models (a random Llama whose newline row is scaled by 2.4, so that it ends some
    answers, often at once, and a perturbed copy, which ends others): on every item, the fixed
    loglikelihood ``acc`` through the chat template equals exact match of greedy generation
    through it (our own loop, and lm-eval's generate_until task); the requests score the
    answer's tokens (and its newline) only. Answers: each model's own greedy answers on
    alternate items, every other one with a character added (wrong); where the model does not
    end its answer, its first token (wrong)."""
    from lm_eval.models.huggingface import HFLM

    newline = chat_tokenizer.convert_tokens_to_ids("\n")
    assert chat_tokenizer.convert_ids_to_tokens([len(chat_tokenizer) - 258, len(chat_tokenizer) - 3]) == [
        "<0x00>", "<0xFF>"]  # the byte tokens, then the two ChatML tokens
    models = [llama(chat_tokenizer, 0, NoBytes)]
    with torch.no_grad():
        models[0].lm_head.weight[newline] *= 2.4
    models.append(llama(chat_tokenizer, 0, NoBytes))
    models[1].load_state_dict(models[0].state_dict())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in models[1].parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.03)
    items = []
    for skill in ("increment", "reverse", "dates"):
        lines = (shipped.folder("fitness") / "data" / skill / "test.jsonl").read_text().splitlines()[:16]
        for prompt in (json.loads(line)["prompt"] for line in lines):
            i = len(items)
            out = greedy(models[i % 2], chat_tokenizer, prompt)
            answer = generated_answer(models[i % 2], chat_tokenizer, prompt)
            if answer is None or chat_tokenizer(answer + "\n", add_special_tokens=False).input_ids != out:
                answer = chat_tokenizer.decode(out[:1])  # the model goes on: wrong
            elif i % 4 >= 2:
                answer += "x"
            items.append({"prompt": prompt, "answer": answer})
    tasks = write_tasks(tmp_path, items)
    scored = []
    original = HFLM._loglikelihood_tokens

    def spy(self, requests, *args, **kwargs):
        scored.extend(requests)
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", spy)
    fitness = load_fitness({"include_path": str(tasks), "metrics": {
        "generate": chat_metric("probe", "exact_match"), "greedy": chat_metric("probe_greedy", "acc")}})
    for model in models:
        scored.clear()
        scores, values = fitness.evaluate_items(model, chat_tokenizer, "test")
        oracle = [float(generated_answer(model, chat_tokenizer, item["prompt"]) == item["answer"]) for item in items]
        assert values["greedy"] == oracle == values["generate"]
        assert 0 < scores["greedy"] < 1  # informative: right on some items, wrong on others
        by_context = {context: (context_enc, continuation_enc) for (context, _), context_enc, continuation_enc
                      in scored}
        assert len(scored) == len(items)
        for item in items:
            context_enc, continuation_enc = by_context[render(chat_tokenizer, item["prompt"])]
            assert continuation_enc == chat_tokenizer(item["answer"] + "\n", add_special_tokens=False).input_ids
            assert context_enc == chat_tokenizer(render(chat_tokenizer, item["prompt"])).input_ids
            assert chat_tokenizer.decode(context_enc).endswith(GENERATION_PROMPT)
    assert sum(a != b for a, b in zip(*(
        [float(generated_answer(m, chat_tokenizer, item["prompt"]) == item["answer"]) for item in items]
        for m in models))) >= 6  # the two models are right on different items
