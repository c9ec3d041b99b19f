"""Greedy generation on a live causal LM: the tokens ``model.generate`` picks, fewer computed tokens.

**Contract.** :func:`generate_greedy` takes a batch of prompts (token ids, no padding) and returns,
per prompt, the tokens greedy decoding generates after it (``do_sample=False``, no logits
processor: each token is the argmax of the model's logits over its whole output vocabulary),
up to and including the first token after which ``done`` says the sequence is complete, at most
``max_new_tokens``. These are the tokens transformers' ``generate`` picks for the prompt, up to
floating-point reduction order (another batch shape, a prefix's keys and values computed apart):
an argmax can differ only where two logits are within rounding of each other.

**Savings.**

* *Shared prefix.* The longest token prefix common to every prompt of the batch (a chat
  template's system turn, fixed few-shot examples) runs once; its keys and values are expanded
  to the batch (:func:`evomerge.fitness.loglikelihood.prefix_states`; inside
  :func:`~evomerge.fitness.loglikelihood.reusing_prefixes`, once for all the batches and calls
  of the block). Each prompt keeps at least its last token after it.
* *Drafts, verified in one pass.* A prompt may come with a *draft*: the tokens it is expected to
  generate (an evaluation's reference answer and its stop). The prompt's remaining tokens and
  its draft run in one forward pass, with the LM head only at the positions that predict a
  generated token. Greedy decoding would generate the draft's tokens as long as each is the
  argmax at the position before it; so the generated tokens are read off that pass up to and
  including the first argmax that differs from the draft (the causal mask makes each of those
  logits the one incremental decoding computes). Decoding then goes on, one token per step, from
  the first rejected draft position, which the attention mask hides from then on. A draft is a
  guess: a wrong one costs its tokens, never a different output.
* *Finished prompts leave the batch* (their rows of the cache are dropped).

**Where it applies.** A transformers decoder-only model that passes
:func:`evomerge.fitness.loglikelihood.unavailable_reason` (a plain cache, ``logits_to_keep`` as a
position mask) and whose generation config adds no logits processor to greedy decoding
(:func:`greedy_config_reason`). The caller checks both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from evomerge.fitness.loglikelihood import cache_argument, prefix_states, shared_prefix

# generation-config fields that change greedy decoding's choice or length when not at their defaults
_PROCESSOR_FIELDS = (
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "min_length", "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id",
    "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "exponential_decay_length_penalty",
    "renormalize_logits", "num_beams", "num_beam_groups", "penalty_alpha", "guidance_scale",
    "watermarking_config", "diversity_penalty", "constraints", "force_words_ids", "stop_strings",
    "max_time", "assistant_model", "prompt_lookup_num_tokens")


def greedy_config_reason(model: nn.Module) -> str | None:
    """Why the model's generation config makes ``generate``'s greedy decoding more than the plain
    argmax of the logits (None: it does not)."""
    from transformers import GenerationConfig

    config, default = getattr(model, "generation_config", None), GenerationConfig()
    if config is None:
        return None
    changed = [name for name in _PROCESSOR_FIELDS
               if getattr(config, name, None) != getattr(default, name, None)]
    return f"its generation config sets {', '.join(changed)}" if changed else None


def eos_token_ids(model: nn.Module) -> frozenset[int]:
    """The token ids after which ``generate`` ends a sequence (the generation config's eos)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])


def generate_greedy(model: nn.Module, prompts: Sequence[Sequence[int]], drafts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, done: Callable[[list[int]], bool]) -> list[list[int]]:
    """Per prompt (one batch), the tokens greedy decoding generates (module doc): until ``done``
    is true of the tokens so far, or ``max_new_tokens``. ``drafts[i]``: prompt ``i``'s expected
    tokens (empty: none). The model must be in eval mode, under ``torch.no_grad``."""
    from transformers import DynamicCache

    if not prompts or max_new_tokens < 1:
        return [[] for _ in prompts]
    if any(not prompt for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.get_input_embeddings().weight.device
    prefix = shared_prefix(model, {tuple(prompt): 1 for prompt in prompts})
    offset = len(prefix)
    suffixes = [list(prompt[offset:]) for prompt in prompts]
    drafts = [list(draft[:max_new_tokens - 1]) for draft in drafts]  # a later draft token predicts nothing kept
    size = len(prompts)
    if prefix:
        cache = DynamicCache([(k.expand(size, -1, -1, -1), v.expand(size, -1, -1, -1))
                              for k, v in prefix_states(model, prefix, device)[0]], config=model.config)
    else:
        cache = DynamicCache(config=model.config)

    # one pass: each prompt's remaining tokens and its draft, logits where a generated token is predicted
    rows = [suffix + draft for suffix, draft in zip(suffixes, drafts)]
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + row[-1:] * (width - len(row)) for row in rows])
    real = torch.zeros(size, width, dtype=torch.bool)
    selected = torch.zeros(size, width, dtype=torch.bool)
    for i, (suffix, row) in enumerate(zip(suffixes, rows)):
        real[i, :len(row)] = True
        selected[i, len(suffix) - 1:len(row)] = True
    mask = torch.cat([torch.ones(size, offset, dtype=torch.bool), real], dim=1)
    positions = torch.arange(offset, offset + width).expand(size, -1)
    logits = model(input_ids=ids.to(device), attention_mask=mask.long().to(device),
                   position_ids=positions.to(device), use_cache=True, logits_to_keep=selected.to(device),
                   **{cache_argument(model): cache}).logits
    picks = logits.argmax(dim=-1).tolist()

    outputs: list[list[int]] = []
    active: list[int] = []  # prompts still generating
    start = 0
    for i, draft in enumerate(drafts):
        row_picks, start = picks[start:start + len(draft) + 1], start + len(draft) + 1
        generated: list[int] = []
        finished = False
        for j, token in enumerate(row_picks):
            generated.append(token)
            finished = done(generated) or len(generated) >= max_new_tokens
            if finished or j == len(draft) or token != draft[j]:
                break
        outputs.append(generated)
        if not finished:
            active.append(i)
            mask[i, offset + len(suffixes[i]) + len(generated) - 1:] = False  # rejected draft tokens, padding

    # then one token per step for the prompts still generating
    mask = mask.long().to(device)
    if active and len(active) < size:
        cache.batch_select_indices(torch.tensor(active, device=device))
    mask = mask[active]
    while active:
        step = torch.tensor([[outputs[i][-1]] for i in active], device=device)
        where = torch.tensor([[offset + len(suffixes[i]) + len(outputs[i]) - 1] for i in active], device=device)
        mask = torch.cat([mask, torch.ones(len(active), 1, dtype=mask.dtype, device=device)], dim=1)
        logits = model(input_ids=step, attention_mask=mask, position_ids=where, use_cache=True, logits_to_keep=1,
                       **{cache_argument(model): cache}).logits
        still = []
        for row, (i, token) in enumerate(zip(active, logits[:, -1].argmax(dim=-1).tolist())):
            outputs[i].append(token)
            if not (done(outputs[i]) or len(outputs[i]) >= max_new_tokens):
                still.append(row)
        if len(still) < len(active):
            if still:
                cache.batch_select_indices(torch.tensor(still, device=device))
            mask = mask[still]
            active = [active[row] for row in still]
    return outputs
