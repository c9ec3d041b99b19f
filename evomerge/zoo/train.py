"""Training for the tiny zoo: pretrain the base, fine-tune the specialists.

A specialist is trained on batches that mix packed skill examples (loss on the answers
only) with generic text (full loss, so general perplexity is kept); only the weights of
the linear layers its recipe names are trained, so its task vector lives on those layers,
and with a slot only its own MLP units and attention head in them. A hidden-state anchor
keeps its residual stream close to the base's on the other skills' examples, as a real
fine-tune leaves what it was not tuned for mostly alone.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from evomerge.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]  # token ids, and the loss weight of predicting each token


def llama_config(recipe, vocab_size: int, *, bos_id: int, eos_id: int, pad_id: int):
    """The ``LlamaConfig`` of the zoo's models."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=recipe.hidden_size,
                       num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                       num_key_value_heads=recipe.heads, intermediate_size=recipe.intermediate_size,
                       max_position_embeddings=2 * recipe.context, tie_word_embeddings=False,
                       bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)


def text_windows(tokens: torch.Tensor, rng: random.Random, rows: int, length: int) -> torch.Tensor:
    """``rows`` random windows of ``length`` tokens from a token stream."""
    starts = [rng.randrange(len(tokens) - length) for _ in range(rows)]
    return torch.stack([tokens[s:s + length] for s in starts])


def packed_examples(examples: Iterator[tuple[list[int], list[int]]], rows: int, length: int,
                    pad_id: int) -> Batch:
    """Rows of consecutive ``(prompt, answer)`` token lists; weight 1 on the answers, 0 elsewhere."""
    ids = torch.full((rows, length), pad_id, dtype=torch.long)
    answers = torch.zeros((rows, length))
    for row in range(rows):
        filled = 0
        while True:
            prompt, answer = next(examples)
            end = filled + len(prompt) + len(answer)
            if end > length:
                break
            ids[row, filled:end] = torch.tensor(prompt + answer)
            answers[row, filled + len(prompt):end] = 1.0
            filled = end
    return ids, answers


def select_trainable(model: nn.Module, pattern: str) -> list[str]:
    """Freeze ``model`` but the weights of the linear layers whose names match ``pattern``; return
    their names."""
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.search(pattern, n)]
    if not names:
        raise ConfigError(f"specialist modules {pattern!r} match no linear layer of the model")
    for name in names:
        model.get_submodule(name).weight.requires_grad_(True)
    return names


def restrict_to_slot(model: nn.Module, names: list[str], slot: int, units: int) -> list:
    """Zero the gradients of the linear layers ``names`` outside MLP units ``[slot * units,
    (slot + 1) * units)`` and attention head ``slot``; return the hook handles."""
    config = model.config
    head = config.hidden_size // config.num_attention_heads
    if not 0 <= slot < min(config.num_key_value_heads, config.intermediate_size // units):
        raise ConfigError(f"specialist slot {slot} does not fit: {config.num_key_value_heads} heads, "
                          f"{config.intermediate_size // units} MLP blocks of slot_units={units}")
    parts = {"gate_proj": (0, units), "up_proj": (0, units), "down_proj": (1, units),
             "q_proj": (0, head), "k_proj": (0, head), "v_proj": (0, head), "o_proj": (1, head)}
    hooks = []
    for name in names:
        kind = name.rsplit(".", 1)[-1]
        if kind not in parts:
            raise ConfigError(f"specialist slots cover MLP and attention projections, not {name!r}")
        dim, size = parts[kind]
        weight = model.get_submodule(name).weight
        mask = torch.zeros_like(weight)
        mask.narrow(dim, slot * size, size).fill_(1.0)
        hooks.append(weight.register_hook(lambda grad, mask=mask: grad * mask))
    return hooks


class HiddenAnchor:
    """``weight`` × Σ over layers of the mean, over the non-pad tokens of rows ``rows``, of the squared
    distance between a model's hidden states and those of the frozen ``base``."""

    def __init__(self, base: nn.Module, rows: slice, pad_id: int, weight: float):
        self.base, self.rows, self.pad_id, self.weight = base, rows, pad_id, weight

    def __call__(self, ids: torch.Tensor, hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids = ids[self.rows]
        with torch.no_grad():
            reference = self.base(input_ids=ids, output_hidden_states=True).hidden_states
        tokens = (ids != self.pad_id).unsqueeze(-1).float()
        distance = sum((((h[self.rows] - r) ** 2) * tokens).sum() for h, r in zip(hidden[1:], reference[1:]))
        return self.weight * distance / tokens.sum()


def train(model: nn.Module, batches: Callable[[int], Batch], steps: int, lr: float, *, desc: str,
          anchor: HiddenAnchor | None = None, loss_of: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
          progress: bool = True) -> float:
    """AdamW with linear warm-up and cosine decay over the trainable parameters; return the last loss.

    The loss of a batch ``(ids, weights)`` is the sum over positions of ``weights`` times the
    cross-entropy of predicting that token from the ones before it, plus ``anchor``'s penalty;
    ``loss_of(model, batch)``, when given, computes it instead (e.g. with the LM head applied
    only where ``weights`` is non-zero).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        batch = batches(step)
        loss = loss_of(model, batch) if loss_of is not None else _next_token_loss(model, batch, anchor)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


def _next_token_loss(model: nn.Module, batch: Batch, anchor: HiddenAnchor | None) -> torch.Tensor:
    ids, weights = batch
    output = model(input_ids=ids, output_hidden_states=anchor is not None)
    logits = output.logits[:, :-1]
    losses = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    loss = (losses * weights[:, 1:].flatten()).sum()
    return loss + anchor(ids, output.hidden_states) if anchor is not None else loss
