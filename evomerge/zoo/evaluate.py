"""Quick in-process scores for the zoo: greedy exact match on skill items, sliding-window perplexity.

They mirror the lm-eval tasks in ``evomerge/shipped/fitness/tasks`` (prompt encoded without special tokens,
greedy decoding, generation cut at the first newline, exact string match) and the
perplexity fitness (windows of ``context`` tokens advanced by ``stride``, each scoring
only its new tokens), without lm-eval's overhead; the zoo build records them in ``zoo.json``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


@torch.no_grad()
def exact_match(model, tokenizer, items: list[dict], *, max_new_tokens: int = 16,
                batch_size: int = 64) -> float:
    """Fraction of ``{"prompt", "answer"}`` items whose greedy continuation, up to "\\n", is the answer."""
    newline = tokenizer.convert_tokens_to_ids("\n")
    by_length: dict[int, list[tuple[list[int], str]]] = defaultdict(list)
    for item in items:
        ids = tokenizer.encode(item["prompt"], add_special_tokens=False)
        by_length[len(ids)].append((ids, item["answer"]))
    correct = 0
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            prompts = torch.tensor([ids for ids, _ in chunk])
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=[newline, tokenizer.eos_token_id])
            for row, (_, answer) in zip(out[:, prompts.shape[1]:].tolist(), chunk):
                text = tokenizer.decode(row, skip_special_tokens=True)
                correct += text.split("\n", 1)[0] == answer
    return correct / len(items)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, *, max_tokens: int = 8192, context: int = 64,
               stride: int = 32, batch_size: int = 64) -> float:
    """Perplexity of the first ``max_tokens`` tokens of ``text``, windows of ``context`` every ``stride``."""
    tokens = tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
    ends = list(range(min(context, len(tokens)), len(tokens), stride)) + [len(tokens)]
    windows, scored = [], 1
    for end in sorted(set(ends)):
        windows.append((tokens[max(0, end - context):end], end - scored))
        scored = end
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in chunk])
        logits = model(input_ids=ids).logits.float()
        for row, (window, new) in enumerate(chunk):
            end = len(window)
            nll += torch.nn.functional.cross_entropy(logits[row, end - 1 - new:end - 1],
                                                     ids[row, end - new:end], reduction="sum").item()
            count += new
    return math.exp(nll / count)
