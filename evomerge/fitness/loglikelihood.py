"""Loglikelihood requests scored on a live causal LM: lm-eval's per-request values, fewer computed tokens.

**Contract.** :func:`score_loglikelihood` takes requests as lm-eval's ``TemplateLM.loglikelihood``
hands them to ``HFLM._loglikelihood_tokens`` (a context's and a continuation's token ids, from
:func:`evomerge.compat.lm_eval.encode_loglikelihood_requests`) and returns, per request, what
``HFLM.loglikelihood`` returns: the sum of the continuation tokens' log-probabilities and whether
each of them is the most likely next token (is_greedy). The model sees what HFLM feeds it: the
sequence ``context + continuation`` without its last token, truncated from the left to
``max_length`` tokens (:func:`model_input`), right-padded in batches, no attention mask; the
log-softmax runs in ``softmax_dtype`` (HFLM's option; None: the logits' dtype) and is_greedy is
the argmax of the log-probabilities over the model's whole output vocabulary. The values differ
from HFLM's only by floating-point reduction order (other batch shapes, a cached prefix): at most
1.5e-5 in float32 on the test models, ~1e-6 relative (``tests/fitness/test_fast_loglikelihood.py``
allows 1e-4); in bfloat16 by more, as any two batchings of bfloat16 do.

**Savings.**

* *Shared prefix.* The longest token prefix common to every input of the call (a chat template's
  system prompt and turn markers, fixed few-shot examples) runs once; each batch reuses its keys
  and values (a fresh ``DynamicCache`` per batch built from the prefix's tensors expanded to the
  batch, which the cache copies: batch × prefix keys and values per layer; a forward extends the
  cache it is given). Each input keeps at least its
  scored positions out of the prefix (the first scored logit is the last context token's).
  Suffixes are right-padded after it: position ids continue from the prefix's length and, as in
  HFLM, no attention mask is needed (a padding token comes after every real one). Used only when
  two or more distinct inputs share a prefix and every cache layer is a plain ``DynamicLayer``
  (sliding-window, linear-attention and quantized caches keep their own state). Inside
  :func:`reusing_prefixes` (the fitness opens one for each candidate it scores) a prefix's keys
  and values are kept, so a candidate scored in several calls, as racing scores it, runs the
  start its prefixes share once, and each call only what its prefix adds to it.
* *LM head at scored positions only.* ``logits_to_keep`` (transformers' public argument) gets a
  boolean mask of the scored positions, so the model computes its output embedding and any final
  logit processing (Gemma's softcapping, ...) on those rows only, with its own code.
* *Identical inputs run once* (multiple choice with one-token choices): requests whose inputs are
  equal share a row, as HFLM's logits cache (``group_by="contexts"``) does.

**Where it does not apply** (:func:`unavailable_reason`): a model that is not a transformers
decoder-only model, whose ``forward`` lacks ``logits_to_keep`` or a cache argument, or for which a
three-token probe (run once per model object, not counted in ``tokens``) does not return one row
of logits per selected position. The caller then uses lm-eval's own path.

**Tokens** (:attr:`Scored.tokens`): the tokens the model computes, without padding: the shared
prefix once plus each distinct input's tokens after it (lm-eval's path, by the same rule:
:func:`lm_eval_input_tokens`).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Pair = tuple[Sequence[int], Sequence[int]]  # (context token ids, continuation token ids)

_CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers 5.x's name, then its older one
_probed: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()
# inside reusing_prefixes: (id(model), device) -> {prefix: its keys and values per layer}
_reused: ContextVar[dict[tuple[int, torch.device], dict[tuple[int, ...], list]] | None] = ContextVar(
    "evomerge_reused_prefixes", default=None)


@dataclass(frozen=True)
class Scored:
    """Per-request ``(logprob, is_greedy)``, in request order, and the tokens the model computed."""

    values: list[tuple[float, bool]]
    tokens: int


def model_input(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The tokens HFLM feeds the model for one request: ``(context + continuation)[:-1]``, its
    last ``max_length`` (lm-eval's left truncation); the logits at its last ``len(continuation)``
    positions score the continuation. Refuses what HFLM asserts against."""
    if not context or not continuation or len(continuation) > max_length:
        raise ValueError(f"a loglikelihood request needs a context and 1 to max_length ({max_length}) "
                         f"continuation tokens; got {len(context)} and {len(continuation)}")
    return tuple((list(context) + list(continuation))[-(max_length + 1):][:-1])


def lm_eval_input_tokens(pairs: Sequence[Pair], max_length: int, *, logits_cache: bool = True) -> int:
    """The tokens HFLM's ``_loglikelihood_tokens`` feeds the model for ``pairs``, without padding:
    each request's :func:`model_input`; with its logits cache, once per group of requests with the
    same ``context + continuation[:-1]`` (its grouping key, before truncation)."""
    lengths = {(tuple(c) + tuple(k))[:-1] if logits_cache else i: len(model_input(c, k, max_length))
               for i, (c, k) in enumerate(pairs)}
    return sum(lengths.values())


def unavailable_reason(model: nn.Module) -> str | None:
    """Why :func:`score_loglikelihood` cannot score ``model`` exactly (None: it can). Checked
    once per model object (a probe forward of three tokens); eval mode, no grad expected."""
    if model not in _probed:
        _probed[model] = _reason(model)
    return _probed[model]


def score_loglikelihood(model: nn.Module, requests: Sequence[Pair], *, max_length: int, batch_size: int,
                        softmax_dtype: torch.dtype | None = None) -> Scored:
    """Score ``requests`` on ``model`` as ``HFLM.loglikelihood`` does (module doc), ``batch_size``
    distinct inputs per forward pass. The model must pass :func:`unavailable_reason`, be in eval
    mode and run under ``torch.no_grad``."""
    inputs = [model_input(context, continuation, max_length) for context, continuation in requests]
    keep: dict[tuple[int, ...], int] = {}  # distinct input -> its scored positions (longest continuation)
    members: dict[tuple[int, ...], list[int]] = {}
    for index, (tokens, (_, continuation)) in enumerate(zip(inputs, requests)):
        keep[tokens] = max(keep.get(tokens, 0), len(continuation))
        members.setdefault(tokens, []).append(index)
    device = model.get_input_embeddings().weight.device
    prefix = shared_prefix(model, keep)
    states, computed = prefix_states(model, prefix, device) if prefix else (None, 0)
    values: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    order = sorted(keep, key=lambda tokens: (-len(tokens), tokens))  # longest first, as HFLM
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        logprobs = _batch_logprobs(model, batch, keep, len(prefix), states, device, softmax_dtype)
        indices = [i for tokens in batch for i in members[tokens]]
        scored = _score_rows(logprobs, [(keep[tokens], [requests[i][1] for i in members[tokens]]) for tokens in batch])
        for index, value in zip(indices, scored):
            values[index] = value
    return Scored(values, computed + sum(len(tokens) - len(prefix) for tokens in keep))


def shared_prefix(model: nn.Module, keep: dict[tuple[int, ...], int]) -> tuple[int, ...]:
    """The longest prefix of every input that leaves each one's scored positions after it; empty
    with fewer than two inputs (nothing to share) or a cache that is not plain (module doc)."""
    if len(keep) < 2:
        return ()
    limit = min(len(tokens) - count for tokens, count in keep.items())
    first, last = min(keep), max(keep)  # the lexicographic extremes bound every common prefix
    length = 0
    while length < min(limit, len(first), len(last)) and first[length] == last[length]:
        length += 1
    if length == 0 or not _plain_cache(model):
        return ()
    return first[:length]


def _plain_cache(model: nn.Module) -> bool:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


@contextmanager
def reusing_prefixes() -> Iterator[None]:
    """Within the block, the keys and values of every prefix computed for a model are kept, and a
    later call on the same model (:func:`prefix_states`) reuses them: a candidate scored in several
    calls (racing scores it in chunks) runs its shared prefix once, not once a call. The model's
    weights must not change inside the block. Nested blocks share the outermost one's store."""
    if _reused.get() is not None:
        yield
        return
    token = _reused.set({})
    try:
        yield
    finally:
        _reused.reset(token)


def prefix_states(model: nn.Module, prefix: tuple[int, ...], device: torch.device
                  ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Each layer's keys and values for ``prefix`` (batch 1), no logits computed, and the tokens
    the model ran for them: inside :func:`reusing_prefixes`, only those after the longest start
    ``prefix`` shares with a prefix already run on ``model`` (whose keys and values there, which
    depend on those tokens only, are extended)."""
    from transformers import DynamicCache

    store = _reused.get()
    known = store.setdefault((id(model), device), {}) if store is not None else {}
    done, start = [], 0
    for tokens, states in known.items():
        length = _common_length(tokens, prefix)
        if length > start:
            done, start = [(k[:, :, :length], v[:, :, :length]) for k, v in states], length
    if start < len(prefix):
        cache = DynamicCache(done, config=model.config) if done else DynamicCache(config=model.config)
        ids = torch.tensor([prefix[start:]], device=device)
        model(input_ids=ids, position_ids=torch.arange(start, len(prefix), device=device)[None], use_cache=True,
              logits_to_keep=torch.zeros_like(ids, dtype=torch.bool), **{cache_argument(model): cache})
        done = [(layer.keys, layer.values) for layer in cache.layers]
    if store is not None:
        known[prefix] = done
    return done, len(prefix) - start


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return length


def _batch_logprobs(model: nn.Module, batch: list[tuple[int, ...]], keep: dict[tuple[int, ...], int],
                    offset: int, states: list[tuple[torch.Tensor, torch.Tensor]] | None,
                    device: torch.device, softmax_dtype: torch.dtype | None) -> torch.Tensor:
    """Log-probabilities at the scored positions of ``batch`` (inputs after the ``offset``-token
    prefix whose ``states`` are given): rows in batch order, each input's last ``keep`` positions
    in order. Inputs are right-padded with their last token (any token would do after every real
    one; HFLM pads with 0, which transformers takes for padding without a mask and warns about)."""
    from transformers import DynamicCache

    width = len(batch[0]) - offset
    ids = torch.tensor([tokens[offset:] + tokens[-1:] * (width + offset - len(tokens)) for tokens in batch])
    selected = torch.zeros(len(batch), width, dtype=torch.bool)
    for row, tokens in enumerate(batch):
        selected[row, len(tokens) - offset - keep[tokens]:len(tokens) - offset] = True
    ids, selected = ids.to(device), selected.to(device)
    arguments = {}
    if states is not None:
        size = len(batch)
        arguments[cache_argument(model)] = DynamicCache(
            [(k.expand(size, -1, -1, -1), v.expand(size, -1, -1, -1)) for k, v in states], config=model.config)
        arguments["position_ids"] = torch.arange(offset, offset + width, device=device).expand(size, -1)
    logits = model(input_ids=ids, use_cache=states is not None, logits_to_keep=selected, **arguments).logits
    return F.log_softmax(logits, dim=-1, dtype=softmax_dtype)


def _score_rows(logprobs: torch.Tensor, rows: list[tuple[int, list[Sequence[int]]]]) -> list[tuple[float, bool]]:
    """``(sum of log-probabilities, is_greedy)`` of each continuation of each row, in order: a
    row's ``keep`` log-probability rows come in turn, a continuation is scored by its last ones."""
    positions, targets, owners = [], [], []
    start, request = 0, 0
    for count, continuations in rows:
        for continuation in continuations:
            positions += range(start + count - len(continuation), start + count)
            targets += continuation
            owners += [request] * len(continuation)
            request += 1
        start += count
    device = logprobs.device
    positions, targets = torch.tensor(positions, device=device), torch.tensor(targets, device=device)
    owners = torch.tensor(owners, device=device)
    picked = logprobs[positions, targets]
    misses = (logprobs.argmax(dim=-1)[positions] != targets).long()
    total = torch.promote_types(logprobs.dtype, torch.float32)  # torch.sum accumulates so, then rounds
    sums = torch.zeros(request, dtype=total, device=device).index_add_(0, owners, picked.to(total))
    wrong = torch.zeros(request, dtype=torch.long, device=device).index_add_(0, owners, misses)
    return [(float(s), not w) for s, w in zip(sums.to(logprobs.dtype).tolist(), wrong.tolist())]


def cache_argument(model: nn.Module) -> str:
    parameters = inspect.signature(model.forward).parameters
    return next(name for name in _CACHE_ARGUMENTS if name in parameters)


def _reason(model: nn.Module) -> str | None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return f"{type(model).__name__} is not a transformers PreTrainedModel"
    if getattr(model.config, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder model"
    parameters = inspect.signature(model.forward).parameters
    missing = [name for name in ("logits_to_keep", "position_ids") if name not in parameters]
    if not any(name in parameters for name in _CACHE_ARGUMENTS):
        missing.append("cache")
    if missing:
        return f"{type(model).__name__}.forward takes no {', '.join(missing)}"
    device, plain = model.get_input_embeddings().weight.device, _plain_cache(model)
    try:  # three tokens: one as a cached prefix (where a prefix would be used), two scored
        with torch.no_grad():
            states = prefix_states(model, (0,), device)[0] if plain else None
            logprobs = _batch_logprobs(model, [(0, 0, 0)], {(0, 0, 0): 2}, int(plain), states, device, None)
    except torch.OutOfMemoryError:
        raise  # transient: not a property of the model, so not remembered as one
    except Exception as error:  # a forward that does not take these arguments as transformers does
        return f"a probe forward with logits_to_keep as a position mask failed: {type(error).__name__}: {error}"
    if logprobs.shape[0] != 2:
        return f"logits_to_keep as a position mask gave logits of shape {tuple(logprobs.shape)}, expected 2 rows"
    return None
