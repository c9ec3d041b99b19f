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
* *Guesses, verified in one pass.* A prompt may come with *drafts*: guesses of the tokens it
  generates (in an evaluation, the answers earlier models gave and the reference answer with its
  stop). Each pass runs, per prompt, the tokens not yet in the cache (first its remaining prompt
  tokens, then its last generated token) and the rest of the first draft that goes on from what
  it has generated so far, with the LM head only at the positions that predict a generated
  token. Greedy decoding would generate the guessed tokens as long as each is the argmax at the
  position before it; so the generated tokens are read off the pass up to and including the
  first argmax that differs from the guess (the causal mask makes each of those logits the one
  incremental decoding computes), and the attention mask hides the rejected guess tokens from
  then on. A prompt with no draft that goes on decodes one token per pass. A guess costs its
  tokens, never a different output; a good one saves passes (a batch runs as many as its
  slowest prompt needs).
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


def generate_greedy(model: nn.Module, prompts: Sequence[Sequence[int]], drafts: Sequence[Sequence[Sequence[int]]],
                    *, max_new_tokens: int, done: Callable[[list[int]], bool]) -> list[list[int]]:
    """Per prompt (one batch), the tokens greedy decoding generates (module doc): until ``done``
    is true of the tokens so far, or ``max_new_tokens``. ``drafts[i]``: guesses of the tokens
    prompt ``i`` generates, in order of preference (none: no guess); each pass verifies, per
    prompt, the first guess that goes on from the tokens generated so far. The model must be in
    eval mode, under ``torch.no_grad``."""
    from transformers import DynamicCache

    if not prompts or max_new_tokens < 1:
        return [[] for _ in prompts]
    if any(not prompt for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.get_input_embeddings().weight.device
    prefix = shared_prefix(model, {tuple(prompt): 1 for prompt in prompts})
    offset = len(prefix)
    suffixes = [list(prompt[offset:]) for prompt in prompts]
    size = len(prompts)
    if prefix:
        cache = DynamicCache([(k.expand(size, -1, -1, -1), v.expand(size, -1, -1, -1))
                              for k, v in prefix_states(model, prefix, device)[0]], config=model.config)
    else:
        cache = DynamicCache(config=model.config)

    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(size))  # prompts still generating
    mask = torch.ones(size, offset, dtype=torch.bool, device=device)  # the cache's columns a row sees
    while active:
        # each prompt's tokens not yet in the cache (first pass: its remaining prompt; then its last
        # generated token), then its guess; logits where a generated token is predicted
        fed = [suffixes[i] if not outputs[i] else outputs[i][-1:] for i in active]
        guesses = [_guess(drafts[i], outputs[i], max_new_tokens) for i in active]
        rows = [tokens + guess for tokens, guess in zip(fed, guesses)]
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + row[-1:] * (width - len(row)) for row in rows])
        real = torch.zeros(len(active), width, dtype=torch.bool)
        selected = torch.zeros(len(active), width, dtype=torch.bool)
        for j, (tokens, row) in enumerate(zip(fed, rows)):
            real[j, :len(row)] = True
            selected[j, len(tokens) - 1:len(row)] = True
        starts = torch.tensor([offset + len(suffixes[i]) + len(outputs[i]) - len(tokens)
                               for i, tokens in zip(active, fed)])
        mask = torch.cat([mask, real.to(device)], dim=1)
        logits = model(input_ids=ids.to(device), attention_mask=mask.long(),
                       position_ids=(starts[:, None] + torch.arange(width)).to(device), use_cache=True,
                       logits_to_keep=selected.to(device), **{cache_argument(model): cache}).logits
        picks = logits.argmax(dim=-1).tolist()

        still, start = [], 0
        for j, (i, tokens, guess) in enumerate(zip(active, fed, guesses)):
            row_picks, start = picks[start:start + len(guess) + 1], start + len(guess) + 1
            for k, token in enumerate(row_picks):
                outputs[i].append(token)
                finished = done(outputs[i]) or len(outputs[i]) >= max_new_tokens
                if finished or k == len(guess) or token != guess[k]:
                    break
            mask[j, mask.shape[1] - width + len(tokens) + k:] = False  # rejected guess tokens, padding
            if not finished:
                still.append(j)
        if len(still) < len(active):  # finished prompts leave the batch
            if still:
                cache.batch_select_indices(torch.tensor(still, device=device))
            mask = mask[still]
            active = [active[j] for j in still]
    return outputs


def _guess(drafts: Sequence[Sequence[int]], generated: list[int], max_new_tokens: int) -> list[int]:
    """The tokens after ``generated`` of the first draft that goes on from them (none: []), at most
    as many as a pass can still use (the last generated token predicts one more)."""
    n = len(generated)
    for draft in drafts:
        if len(draft) > n and list(draft[:n]) == generated:
            return list(draft[n:max_new_tokens - 1])
    return []
