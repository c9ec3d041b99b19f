"""lm-evaluation-harness private names (checked with lm-eval 0.4.13; pyproject: >=0.4.13,<0.5).

evomerge scores tasks on a live model with lm-eval's own steps (``build_all_requests``, the
task's filters, ``process_results``: :mod:`evomerge.fitness.lmeval`). Six of them have no
public API in 0.4.x, so they are here, one small function each; ``tests/compat/test_lm_eval.py``
fails when one moves or stops doing what is relied on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import MethodType
from typing import Any


def load_task_yaml(path: str | Path) -> dict[str, Any]:
    """A task YAML as a dict, with its ``include`` chain merged (local keys win) and its
    ``!function`` tags resolved to the functions.

    Why private: lm-eval 0.4.13 has no public loader for one task file. ``TaskManager`` uses
    ``lm_eval.tasks._yaml_loader.load_yaml`` itself (``TaskFactory._load_full_config``), but
    only to build the task right away, from the file as written; evomerge must change the
    config first (absolute data files, one split per task object) and build it without the
    test split's data. ``TaskManager.task_index``'s ``Entry.cfg`` (public) is the same file
    loaded with ``resolve_func=False``: ``!function`` left unresolved. (The
    ``lm_eval.utils.load_yaml_config`` of earlier 0.4 releases is not in 0.4.13.)
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=True)


def apply_filters_to(task: Any, instances: list[Any]) -> None:
    """Run ``task``'s filter pipelines (its ``filter_list``, else ``take_first``) on
    ``instances``: each instance's ``filtered_resps[<filter name>]`` is set from its ``resps``.

    Why private: ``Task.apply_filters()`` (public) filters ``task._instances`` only, the list
    ``build_all_requests`` stores, and the ``Task.instances`` property has no setter. evomerge
    scores fresh copies of a slice of those instances per candidate (responses of one model),
    so it points ``_instances`` at them first. The task's pipelines are ``task._filters``,
    also private, so rebuilding them from the config is no better.
    """
    task._instances = instances
    task.apply_filters()


@contextmanager
def no_request_progress_bar() -> Iterator[None]:
    """Hide the progress bar ``Task.build_all_requests`` draws over the documents (milliseconds
    of work here, once per split).

    Why private: ``build_all_requests`` has no option for it, and it calls the ``tqdm`` name of
    its module (``lm_eval.api.task.tqdm``, imported ``from tqdm import tqdm``), so the name is
    swapped for a disabled ``tqdm`` while the context is open. tqdm's ``TQDM_DISABLE``
    environment variable is read once, when tqdm is imported, so it cannot do this per call.
    """
    import lm_eval.api.task as task_module

    saved = task_module.tqdm
    task_module.tqdm = partial(saved, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = saved


def score_continuations_as_given(lm: Any) -> None:
    """Make ``lm.loglikelihood`` (an lm-eval ``TemplateLM``, e.g. ``HFLM``) score each request's
    continuation string as given: the context keeps its trailing whitespace. The context is
    tokenized as the string it is (the tokens a generation from that prompt conditions on); the
    scored tokens are those of ``context + continuation`` after the context's tokens, or, where
    the tokenizer merges across that boundary (the context's tokens are no prefix of the
    whole's), the continuation's own tokens (``add_special_tokens=False``).

    Why: stock ``TemplateLM._encode_pair`` moves the context's trailing whitespace into the
    continuation (a word-boundary space belongs to the next word). Through a chat template the
    context ends in the generation prompt (ChatML: ``<|im_start|>assistant\n``), so that newline,
    a template token, would be scored as part of the answer (issue #19).

    Why private: ``_encode_pair`` is the only place ``TemplateLM.loglikelihood`` splits a pair and
    it has no option for it; the token-level entry point ``_loglikelihood_tokens`` is private
    too. So this instance's ``_encode_pair`` is replaced (``HFLM`` does not override it). The
    empty-context branch of ``loglikelihood`` (no whitespace to move) is left as it is.
    """
    lm._encode_pair = MethodType(_encode_pair_as_given, lm)


def _encode_pair_as_given(self: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    context_enc = self.tok_encode(context)
    if self.backend == "causal":
        whole_enc = self.tok_encode(context + continuation)
        if whole_enc[:len(context_enc)] == context_enc:
            return context_enc, whole_enc[len(context_enc):]
    return context_enc, self.tok_encode(continuation, add_special_tokens=False)


def encode_loglikelihood_requests(lm: Any, requests: list[Any]) -> list[tuple[list[int], list[int]]]:
    """The ``(context tokens, continuation tokens)`` that ``lm.loglikelihood(requests)`` (an
    lm-eval ``TemplateLM``, e.g. ``HFLM``) would score, one pair per request, in order, without
    scoring them: its own split of each pair (``_encode_pair``, as replaced on this instance, e.g.
    by :func:`score_continuations_as_given`) and its own empty-context rule (the prefix token as
    context).

    Why private: ``TemplateLM.loglikelihood`` tokenizes and then hands the token pairs to
    ``_loglikelihood_tokens``, private, with no public way to get the pairs alone. So this
    instance's ``_loglikelihood_tokens`` is replaced, for the call, by one that records its
    requests and scores nothing; the tokenization is lm-eval's own code, not a copy of it.
    """
    pairs: list[tuple[list[int], list[int]]] = []

    def record(requests: list[tuple[Any, list[int], list[int]]], *args: Any, **kwargs: Any) -> list:
        pairs.extend((list(context), list(continuation)) for _, context, continuation in requests)
        return [(0.0, False)] * len(requests)

    lm._loglikelihood_tokens = record
    try:
        lm.loglikelihood(requests, disable_tqdm=True)
    finally:
        del lm._loglikelihood_tokens  # the class's method again
    return pairs


@contextmanager
def generating_with(lm: Any, generate: Callable[..., Any]) -> Iterator[None]:
    """While open, ``lm.generate_until`` (``HFLM``) hands each of its batches to ``generate``
    instead of transformers' ``generate``: ``generate(context, max_length, stop, fallback,
    **generation_kwargs)`` gets what HFLM would pass (the left-padded context ids, the total
    length, the stop strings with the eos, ``attention_mask`` and the sampling options among
    the keyword arguments) and ``fallback``, HFLM's own call, and returns the context ids followed
    by the generated ids, as ``generate`` does. Everything around it stays lm-eval's: encoding,
    left truncation, batching, decoding and cutting at the stop strings.

    Why private: ``HFLM._model_generate`` is the one place ``generate_until`` calls the model, and
    it has no hook; so this instance's ``_model_generate`` is replaced for the context.
    """
    fallback = lm._model_generate

    def replaced(context: Any, max_length: int, stop: list[str], **generation_kwargs: Any) -> Any:
        return generate(context, max_length, stop, fallback, **generation_kwargs)

    lm._model_generate = replaced
    try:
        yield
    finally:
        del lm._model_generate  # the class's method again
