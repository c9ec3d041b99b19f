"""lm-evaluation-harness tasks scored on the live in-memory model (nothing written to disk).

**Finding tasks.** Task YAMLs are discovered in the fitness file's ``include_path`` folders
(lm-eval's own index); lm-eval's ~15k built-in tasks are searched only with
``builtin_tasks: true`` (indexing them takes seconds, and they download their data).

**Splits.** A task must name both ``validation_split`` (the fitness's *search* split) and
``test_split`` (its *test* split). Each metric builds two task objects once, at load time:
the search one evaluates ``validation_split`` and loads no test data at all (its local
``data_files`` omit the test split); the test one evaluates ``test_split``. Few-shot
examples come from where lm-eval takes them (``fewshot_split``, else training, else
validation); when that is the evaluated search split itself, the evaluated document is
excluded from its own examples (lm-eval's rule for ``fewshot_split == test_split``).

**Data files.** A relative path in ``dataset_kwargs.data_files`` is looked up in the task
YAML's folder and then in each parent folder, first match wins; so paths written relative
to the task folder or to a folder above it (the shipped tasks' ``fitness/data/...``, from
``evomerge/shipped``) both work from any working directory (URLs and glob patterns go to
``datasets`` as written). Local data is loaded with the Hub in offline mode.

**Scoring.** The prompts (with few-shot contexts, seed 1234 as lm-eval's default) are built
once per split for the first ``limit`` documents (search) or all of them (test), so every
candidate, and every pruning stage, sees identical requests. Per candidate, the requests of
the wanted documents go through ``HFLM(pretrained=model)`` (batched), then the task's own
filters, ``process_results`` and metric aggregation, exactly the steps of
``lm_eval.evaluator.evaluate`` minus its bookkeeping (the lm-eval private names this needs
are in :mod:`evomerge.compat.lm_eval`); tests check the numbers against
``lm_eval.simple_evaluate`` on the same weights loaded from disk. (``evaluate`` itself
rebuilds the requests on every call, drawing few-shot examples from one running RNG, so a
document's prompt would depend on which documents a stage scores.)

**Chat template** (``apply_chat_template: true``). The prompt is the task's, rendered by the
model's chat template as lm-eval does (few-shot examples as turns, the generation prompt at
the end, e.g. ChatML's ``<|im_start|>assistant\n``). Loglikelihood requests
(``loglikelihood``, ``multiple_choice``) then score exactly the continuation the task gives
(the answer, ``doc_to_target`` / a choice): the whole rendered prompt, its trailing newline
included, is the context, tokenized as the string generation would start from. This differs
from stock lm-eval, whose ``TemplateLM._encode_pair`` moves the context's trailing whitespace
into the continuation, so that its ``acc`` (is_greedy) also asks whether the model predicts the
template's own newline: a merge that puts its mass on ``<|im_end|>`` there but answers right
after it scored 0 on every item (issue #19). Without a chat template nothing changes: requests
are scored exactly as lm-eval scores them (a trailing space of the prompt still moves into the
continuation, as word boundaries need). Generation requests are unaffected either way.
(:func:`evomerge.compat.lm_eval.score_continuations_as_given`.)

**Fast loglikelihood** (``fast_loglikelihood``, on by default). Loglikelihood requests are split
into tokens by the ``HFLM`` instance itself (its ``_encode_pair``, as replaced for the chat
template, and its empty-context rule; once per split and tokenizer, then reused), then scored by
:func:`evomerge.fitness.loglikelihood.score_loglikelihood`: HFLM's per-request values (equal up
to floating-point reduction order) with the prompt prefix all requests share computed once per
call and the LM head applied only where a continuation token is scored. Where that cannot be
exact (a model that is not a transformers decoder, HFLM options it does not reproduce) the metric
says so once in the log and uses ``HFLM.loglikelihood``, as with ``fast_loglikelihood: false``.

**Tokens** (:attr:`Metric.tokens_scored`, tokens the model computed, without padding).
Loglikelihood: the fast path's count (the shared prefix once per call, then each distinct
input's remaining tokens); through lm-eval, each distinct input as HFLM feeds it (``context +
continuation`` without its last token, truncated to ``max_length``; HFLM's logits cache runs a
repeated input once). Generation and other request types are counted from the forward passes
themselves (a forward pre-hook on the model): the tokens of each call's ``input_ids`` that its
``attention_mask`` marks real, all of them without a mask. For ``generate_until`` that is every
prompt's tokens (left padding excluded) plus one token per sequence per decoding step; a
sequence that has stopped still runs, and is counted, until its whole batch stops.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache, partial
from pathlib import Path
from statistics import mean
from typing import Any

from torch import nn

from evomerge.compat.lm_eval import (
    apply_filters_to,
    encode_loglikelihood_requests,
    generating_with,
    load_task_yaml,
    no_request_progress_bar,
    score_continuations_as_given,
)
from evomerge.errors import TaskError
from evomerge.fitness.base import Metric
from evomerge.fitness.generation import eos_token_ids, generate_greedy, greedy_config_reason
from evomerge.fitness.loglikelihood import lm_eval_input_tokens, score_loglikelihood, unavailable_reason

log = logging.getLogger(__name__)

FEWSHOT_SEED = 1234  # lm_eval.simple_evaluate's default fewshot_random_seed
_HFLM_NOTICES = ("`pretrained` model kwarg is not of type `str`",
                 "Passed an already-initialized model through `pretrained`")


class TaskCatalog:
    """Task names → task YAML files, from ``include_path`` folders (and lm-eval's built-ins)."""

    def __init__(self, include_paths: list[Path], builtin: bool):
        from lm_eval.tasks import TaskManager

        self.include_paths, self.builtin = include_paths, builtin
        self._local = TaskManager(include_path=[str(p) for p in include_paths],
                                  include_defaults=False) if include_paths else None

    def find(self, name: str) -> Path:
        for manager in (self._local, _builtin_tasks() if self.builtin else None):
            entry = manager.task_index.get(name) if manager is not None else None
            if entry is not None:
                if entry.yaml_path is None or "task" not in (entry.cfg or {}) or "class" in entry.cfg:
                    raise TaskError(f"{name!r} is a group, tag or Python task; expected a single YAML task",
                                    field="task")
                return Path(entry.yaml_path)
        where = ", ".join(str(p) for p in self.include_paths) or "no include_path"
        hint = "" if self.builtin else " (set builtin_tasks: true to search lm-eval's built-in tasks)"
        raise TaskError(f"unknown lm-eval task {name!r} in {where}{hint}", field="task")


@lru_cache(maxsize=1)
def _builtin_tasks():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def load_task_config(path: Path) -> dict[str, Any]:
    """A task YAML with its ``include`` chain and ``!function`` references resolved."""
    try:
        config = load_task_yaml(path)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        raise TaskError(f"cannot read task YAML: {type(error).__name__}: {reason}", str(path)) from None
    for key in ("tag", "group", "task_list"):
        config.pop(key, None)
    config["metadata"] = {**(config.get("metadata") or {}), "config_source": str(path)}
    return config


def resolve_data_files(config: dict[str, Any], path: Path) -> None:
    """Make relative ``dataset_kwargs.data_files`` absolute (see module doc); check they hold data."""
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return
    named = files.items() if isinstance(files, dict) else [(None, files)]
    resolved = {}
    for split, entry in named:
        field = "dataset_kwargs.data_files" + (f".{split}" if split is not None else "")
        entries = entry if isinstance(entry, list) else [entry]
        found = [_find_data_file(str(e), path, field) for e in entries]
        resolved[split] = found if isinstance(entry, list) else found[0]
    config["dataset_kwargs"] = {**config["dataset_kwargs"],
                                "data_files": resolved if isinstance(files, dict) else resolved[None]}


def _find_data_file(name: str, task_yaml: Path, field: str) -> str:
    if "://" in name or any(c in name for c in "*?["):
        return name  # remote or glob: left to datasets
    candidate = Path(name).expanduser()
    folders = [Path("/")] if candidate.is_absolute() else [task_yaml.parent, *task_yaml.parent.parents]
    for folder in folders:
        if (folder / candidate).is_file():
            found = folder / candidate
            with found.open("rb") as handle:
                if not any(line.strip() for line in handle):
                    raise TaskError(f"data file {found} is empty", str(task_yaml), field)
            return str(found)
    raise TaskError(f"data file {name!r} not found in {task_yaml.parent} or its parent folders",
                    str(task_yaml), field)


def split_config(config: dict[str, Any], split: str) -> dict[str, Any]:
    """The task config that evaluates the fitness split ``split`` ('search' or 'test')."""
    if split == "test":
        return dict(config)
    search, test = config["validation_split"], config["test_split"]
    config = {**config, "test_split": search}
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        config["dataset_kwargs"] = {**config["dataset_kwargs"],
                                    "data_files": {k: v for k, v in files.items() if k != test}}
    if not (config.get("fewshot_split") or config.get("training_split")
            or (config.get("fewshot_config") or {}).get("split")):
        config["fewshot_split"] = search
    return config


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Hub access off while a task with local data loads (no stray network calls)."""
    import datasets
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def build_task(config: dict[str, Any], split: str, path: Path):
    """The ``ConfigurableTask`` evaluating fitness split ``split``; TaskError if it cannot load."""
    from lm_eval.api.task import ConfigurableTask

    for key in ("validation_split", "test_split"):
        if not config.get(key):
            raise TaskError(f"missing; the fitness needs {key} (validation_split is searched, "
                            "test_split is held out)", str(path), key)
    if config["validation_split"] == config["test_split"]:
        raise TaskError(f"{config['test_split']!r} is also the validation_split; the test split must be "
                        "held out from the search", str(path), "test_split")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    local = files is not None and all(Path(f).is_absolute() for f in _flat(files))
    try:
        with _hub_offline() if local else _nothing():
            return ConfigurableTask(config=split_config(config, split))
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        raise TaskError(f"lm-eval cannot load the {split} split: {type(error).__name__}: {reason}",
                        str(path)) from None


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _flat(files: Any) -> list[str]:
    values = files.values() if isinstance(files, dict) else [files]
    return [str(f) for v in values for f in (v if isinstance(v, list) else [v])]


class LmEvalMetric(Metric):
    """One metric of one lm-eval task; items are the task's documents."""

    def __init__(self, name: str, tasks: dict[str, Any], metric: str, *, weight: float,
                 limit: int | None, test_limit: int | None, num_fewshot: int | None,
                 batch_size: int, apply_chat_template: bool, gen_kwargs: dict | None,
                 path: Path, fast_loglikelihood: bool = True, fast_generation: bool = True):
        search = tasks["search"]
        self.metric, _, self.filter = metric.partition(",")
        filters = [f["name"] for f in search.config.filter_list or []] or ["none"]
        if self.metric not in search.higher_is_better():
            known = ", ".join(sorted(search.higher_is_better()))
            raise TaskError(f"task {search.config.task!r} has no metric {self.metric!r}; expected one of: "
                            f"{known}", field="metric")
        if self.filter and self.filter not in filters:
            raise TaskError(f"task {search.config.task!r} has no filter {self.filter!r}; expected one of: "
                            f"{', '.join(filters)}", field="metric")
        self.filter = self.filter or filters[0]
        direction = "maximize" if search.higher_is_better()[self.metric] else "minimize"
        super().__init__(name, direction, weight)
        self.item_mean = _is_mean(search.aggregation().get(self.metric, mean))
        self.tasks, self.path, self.batch_size = tasks, path, batch_size
        self.apply_chat_template, self.fast_loglikelihood = apply_chat_template, fast_loglikelihood
        self.fast_generation = fast_generation
        self.limits = {"search": limit, "test": test_limit}
        for task in tasks.values():
            shots = num_fewshot if num_fewshot is not None else task.get_config("num_fewshot") or 0
            task.set_config("num_fewshot", shots)
            if gen_kwargs:
                if task.get_config("output_type") != "generate_until":
                    raise TaskError("only applies to generate_until tasks", field="gen_kwargs")
                task.set_config("generation_kwargs", gen_kwargs, update=True)
        self._requests: dict[str, list[list[Any]]] = {}
        self._tokenizer: Any = None  # the tokenizer of the encodings below
        self._encoded: dict[tuple[str, str], tuple[list[int], list[int]]] = {}  # request args -> tokens
        self._said: set[str] = set()  # fallback reasons already logged

    def sources(self) -> list[Path]:
        files = (self.tasks["test"].config.dataset_kwargs or {}).get("data_files")
        return [self.path] + ([Path(f) for f in _flat(files) if Path(f).is_file()] if files else [])

    def num_items(self, split: str) -> int:
        total = len(self.tasks[split].eval_docs)
        return min(total, self.limits[split] or total)

    def prepare(self, model: nn.Module, tokenizer: Any, split: str) -> None:
        if split in self._requests:
            return
        task, count = self.tasks[split], self.num_items(split)
        lm = self._lm(model, tokenizer)
        task.set_fewshot_seed(FEWSHOT_SEED)
        with no_request_progress_bar():
            task.build_all_requests(
                limit=count, apply_chat_template=self.apply_chat_template,
                fewshot_as_multiturn=self.apply_chat_template,
                chat_template=lm.apply_chat_template if self.apply_chat_template else None,
                tokenizer_name=lm.tokenizer_name if self.apply_chat_template else "")
        by_doc: list[list[Any]] = [[] for _ in range(count)]
        for instance in task.instances:
            by_doc[instance.doc_id].append(instance)
        self._requests[split] = [sorted(group, key=lambda i: i.idx) for group in by_doc]

    def score(self, model: nn.Module, tokenizer: Any, split: str, start: int, stop: int) -> list[Any]:
        task, lm = self.tasks[split], self._lm(model, tokenizer)
        groups = self._requests[split]
        order = self.item_order if split == "search" and self.item_order is not None else range(len(groups))
        docs = [[dataclasses.replace(i, resps=[], filtered_resps={}) for i in groups[order[j]]]
                for j in range(start, stop)]
        by_type = defaultdict(list)
        for instance in (i for group in docs for i in group):
            by_type[instance.request_type].extend([instance] * instance.repeats)
        for request_type, requests in by_type.items():
            if request_type == "loglikelihood":
                responses = self._loglikelihood(model, tokenizer, lm, requests)
            else:
                fast = request_type == "generate_until" and self._fast_generation(model, lm)
                with _counting_tokens(model) as counted:
                    if fast:
                        with generating_with(lm, partial(self._generate, model, lm, self._drafts(task, lm, requests))):
                            responses = lm.generate_until(requests, disable_tqdm=True)
                    else:
                        responses = getattr(lm, request_type)(requests, disable_tqdm=True)
                self.tokens_scored += counted[0]
            for instance, response in zip(requests, responses):
                instance.resps.append(response)
        apply_filters_to(task, [i for group in docs for i in group])
        values = []
        for group in docs:
            result = task.process_results(group[0].doc, [i.filtered_resps[self.filter] for i in group])
            values.append(result.get(self.metric))
        return values

    def aggregate(self, values: list[Any]) -> dict[str, float]:
        function = self.tasks["search"].aggregation().get(self.metric, mean)
        return {self.name: float(function([v for v in values if v is not None]))}

    def _loglikelihood(self, model: nn.Module, tokenizer: Any, lm: Any, requests: list[Any]
                       ) -> list[tuple[float, bool]]:
        """``(logprob, is_greedy)`` per request, the fast path's or ``lm``'s (module doc)."""
        pairs = self._encode(tokenizer, lm, requests)
        if self.fast_loglikelihood:
            reason = self._no_fast_path(model, lm)
            if reason is None:
                scored = score_loglikelihood(model, pairs, max_length=lm.max_length, batch_size=self.batch_size,
                                             softmax_dtype=lm.softmax_dtype)
                self.tokens_scored += scored.tokens
                return scored.values
            if reason not in self._said:
                self._said.add(reason)
                log.warning("%s: loglikelihood requests scored through lm-eval's HFLM: %s", self.name, reason)
        self.tokens_scored += lm_eval_input_tokens(pairs, lm.max_length, logits_cache=lm.logits_cache)
        return lm.loglikelihood(requests, disable_tqdm=True)

    def _fast_generation(self, model: nn.Module, lm: Any) -> bool:
        """Whether generation requests go through :func:`generate_greedy` (else lm-eval's own
        call to transformers' ``generate``, with the reason logged once)."""
        if not self.fast_generation:
            return False
        reason = self._no_fast_path(model, lm) or greedy_config_reason(model)
        pad = lm.tokenizer.pad_token_id
        if reason is None and pad is not None and lm.tok_decode([pad]):
            reason = f"the pad token {lm.tokenizer.pad_token!r} is not dropped when decoding"
        if reason is not None and reason not in self._said:
            self._said.add(reason)
            log.warning("%s: generation requests run through transformers' generate: %s", self.name, reason)
        return reason is None

    @staticmethod
    def _drafts(task: Any, lm: Any, requests: list[Any]) -> dict[tuple[int, ...], list[int]]:
        """Each generation request's expected tokens, by its context's tokens: the document's
        target then the first stop string (a guess for :func:`generate_greedy` to verify)."""
        drafts = {}
        for request in requests:
            context, kwargs = request.args
            target = task.doc_to_target(request.doc)
            until = kwargs.get("until") or [""]
            if isinstance(target, str):
                stop = until if isinstance(until, str) else until[0]
                drafts[tuple(lm.tok_encode(context))] = lm.tok_encode(target + stop, add_special_tokens=False)
        return drafts

    @staticmethod
    def _generate(model: nn.Module, lm: Any, drafts: dict[tuple[int, ...], list[int]], context: Any,
                  max_length: int, stop: list[str], fallback: Any, **kwargs: Any) -> Any:
        """One HFLM generation batch (:func:`evomerge.compat.lm_eval.generating_with`) by
        :func:`generate_greedy`: the same tokens, so the same strings once lm-eval decodes them
        and cuts them at the stop strings. A sequence ends at an eos token (as in ``generate``)
        or once its decoded text holds a stop string; lm-eval cuts there anyway, so generating
        on, as ``generate`` does until the whole batch has stopped, changes nothing. Batches
        where that would not hold go to ``fallback`` (HFLM's own call): sampling, options other
        than greedy's, or a stop string that decoding drops (a special token) and that is not
        an eos token (lm-eval's output then depends on what else is in the batch)."""
        import torch

        eos = eos_token_ids(model)
        options = {k: v for k, v in kwargs.items() if k not in ("attention_mask", "do_sample", "temperature")}
        hidden = [s for s in stop if s and lm.tok_decode(lm.tok_encode(s, add_special_tokens=False)) != s
                  and not set(lm.tok_encode(s, add_special_tokens=False)) <= eos]
        if kwargs.get("do_sample") or kwargs.get("temperature") or options or hidden:
            return fallback(context, max_length, stop, **kwargs)
        mask = kwargs.get("attention_mask")
        prompts = [row[mask[i].bool()].tolist() if mask is not None else row.tolist() for i, row in enumerate(context)]

        def done(tokens: list[int]) -> bool:
            return tokens[-1] in eos or any(s and s in lm.tok_decode(tokens) for s in stop)

        outputs = generate_greedy(model, prompts, [drafts.get(tuple(p), []) for p in prompts],
                                  max_new_tokens=max_length - context.shape[1], done=done)
        width = max(len(out) for out in outputs)
        result = torch.full((len(prompts), context.shape[1] + width), lm.tokenizer.pad_token_id, dtype=context.dtype)
        result[:, :context.shape[1]] = context.cpu()
        for i, out in enumerate(outputs):
            result[i, context.shape[1]:context.shape[1] + len(out)] = torch.tensor(out, dtype=context.dtype)
        return result.to(context.device)

    def _encode(self, tokenizer: Any, lm: Any, requests: list[Any]) -> list[tuple[list[int], list[int]]]:
        if tokenizer is not self._tokenizer:
            self._tokenizer, self._encoded = tokenizer, {}
        new = list({r.args: r for r in requests if r.args not in self._encoded}.values())
        for request, pair in zip(new, encode_loglikelihood_requests(lm, new) if new else []):
            self._encoded[request.args] = pair
        return [self._encoded[r.args] for r in requests]

    @staticmethod
    def _no_fast_path(model: nn.Module, lm: Any) -> str | None:
        if lm.backend != "causal":
            return f"HFLM's backend is {lm.backend!r}"
        if lm.mixed_precision_dtype is not None:
            return "HFLM runs the model under autocast (mixed_precision_dtype)"
        return unavailable_reason(model)

    def _lm(self, model: nn.Module, tokenizer: Any):
        from lm_eval.models.huggingface import HFLM

        _quiet_hflm_notices()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
        if self.apply_chat_template:
            score_continuations_as_given(lm)  # the generation prompt stays in the context (module doc)
        return lm


@contextmanager
def _counting_tokens(model: nn.Module) -> Iterator[list[int]]:
    """``[n]``: the tokens the model's forward calls compute while the context is open, without
    padding: per call, the ``input_ids`` its ``attention_mask`` marks real (all without a mask)."""
    counted = [0]

    def count(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")  # (batch, tokens, hidden)
        if ids is not None:
            mask = kwargs.get("attention_mask")
            batch, new = ids.shape[:2]
            counted[0] += int(mask[:, -new:].sum()) if mask is not None else batch * new

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield counted
    finally:
        handle.remove()


def _is_mean(function: Any) -> bool:
    """Whether an lm-eval aggregation is the plain mean of the items' values."""
    from lm_eval.api.metrics import mean as lm_eval_mean

    return function in (mean, lm_eval_mean)


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_HFLM_NOTICES)


@lru_cache(maxsize=1)
def _quiet_hflm_notices() -> None:
    """Silence HFLM's two warnings about being handed a model object (expected here)."""
    logging.getLogger("lm_eval.models.huggingface").addFilter(_DropNotices())
