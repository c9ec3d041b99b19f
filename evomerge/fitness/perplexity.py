"""Strided-window perplexity of a text corpus, batched, with the token windows built once.

The corpus (``.txt``: the whole file is one document; ``.jsonl``: one document per line,
field ``text_field``; ``.parquet``: column ``text_field``; or a ``datasets.save_to_disk``
folder) is tokenized without special tokens, documents joined by the EOS token, and cut at
``max_tokens`` (on the search split at ``limit`` when it is smaller: a cheaper estimate while
searching, the whole ``max_tokens`` in held-out reports). Windows follow Hugging Face's
strided-perplexity recipe: window *k* covers tokens ``[k·stride, k·stride + context)`` (the
last one ends at the stream's end) and scores only the tokens no earlier window scored, so
every token after the first is predicted exactly once, each with at least ``context − stride``
tokens of context (the first window's tokens with what precedes them). ``stride < context`` is
required for that.

Perplexity = exp(total negative log-likelihood / scored tokens). The items are the windows,
so a fraction scores the first windows of the corpus. Only the logits of scored positions
are computed (``logits_to_keep``) and no KV cache is built. :attr:`Metric.tokens_scored` grows by
the tokens of every window fed (``end − begin`` each; windows are batched by equal length, so
nothing is padded).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evomerge.errors import EvomergeError
from evomerge.fitness.base import Metric

log = logging.getLogger(__name__)

TOKENIZE_CHUNK = 64  # documents per tokenizer call


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """The documents of a corpus file or folder; raises ValueError on bad content."""
    if path.is_dir():
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if len(data) != 1:
                raise ValueError(f"a DatasetDict with splits {sorted(data)}; expected one Dataset")
            data = next(iter(data.values()))
        if text_field not in data.column_names:
            raise ValueError(f"no column {text_field!r} (columns: {', '.join(data.column_names)})")
        texts = data[text_field]
    elif path.suffix == ".txt":
        texts = [path.read_text(encoding="utf-8")]
    elif path.suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict) or text_field not in record:
                        raise ValueError(f"line {number} has no field {text_field!r}")
                    texts.append(record[text_field])
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise ValueError(f"no column {text_field!r} (columns: {', '.join(table.column_names)})")
        texts = table.column(text_field).to_pylist()
    else:
        raise ValueError("unsupported format; expected .txt, .jsonl, .parquet or a "
                         "datasets.save_to_disk folder")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("no text in it")
    return texts


def token_stream(texts: list[str], tokenizer: Any, max_tokens: int | None) -> list[int]:
    """Token ids of the documents, EOS-separated, at most ``max_tokens`` of them."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        for doc in tokenizer(texts[start:start + TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"]:
            if ids and eos is not None:
                ids.append(eos)
            ids.extend(doc)
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
    return ids


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` as model input; the last ``scored`` of them are predicted."""

    begin: int
    end: int
    scored: int


def plan_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Hugging Face's strided windows: each scores only tokens no earlier window scored."""
    windows, scored_until = [], 1  # token 0 has nothing to be predicted from
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        windows.append(Window(begin, end, end - scored_until))
        scored_until = end
        if end == n_tokens:
            break
    return windows


class _Corpus:
    """One split's token windows for one tokenizer, stacked by length for batching."""

    def __init__(self, ids: list[int], context: int, stride: int):
        if len(ids) < 2:
            raise EvomergeError(f"the corpus has {len(ids)} token(s); perplexity needs at least 2")
        self.windows = plan_windows(len(ids), context, stride)
        self.ids = torch.tensor(ids, dtype=torch.long)


class PerplexityMetric(Metric):
    """Perplexity of ``texts[split]`` (lower is better); items are token windows."""

    def __init__(self, name: str, texts: dict[str, list[str]], *, context: int, stride: int,
                 max_tokens: int | None, batch_size: int, weight: float, paths: list[Path],
                 limit: int | None = None):
        super().__init__(name, "minimize", weight)
        self.texts, self.context, self.stride = texts, context, stride
        self.batch_size, self.paths = batch_size, paths
        search = max_tokens if limit is None else min(limit, max_tokens or limit)
        self.max_tokens = {"search": search, "test": max_tokens}
        self._tokenizer: Any = None
        self._corpora: dict[str, _Corpus] = {}

    def sources(self) -> list[Path]:
        return self.paths

    def corpus(self, tokenizer: Any, split: str) -> _Corpus:
        """The split's windows, tokenized on first use with this tokenizer."""
        if tokenizer is not self._tokenizer:
            self._tokenizer, self._corpora = tokenizer, {}
        if split not in self._corpora:
            ids = token_stream(self.texts[split], tokenizer, self.max_tokens[split])
            self._corpora[split] = _Corpus(ids, self.context, self.stride)
            log.debug("%s/%s: %d tokens in %d windows", self.name, split, len(ids),
                      len(self._corpora[split].windows))
        return self._corpora[split]

    def num_items(self, split: str) -> int:
        return len(self._corpora[split].windows)

    def prepare(self, model: nn.Module, tokenizer: Any, split: str) -> None:
        limit = _max_positions(model)
        if limit is not None and self.context > limit:
            raise EvomergeError(f"perplexity metric {self.name!r}: context {self.context} exceeds the "
                                f"model's {limit} positions")
        self.corpus(tokenizer, split)

    def score(self, model: nn.Module, tokenizer: Any, split: str, start: int, stop: int) -> list[Any]:
        corpus = self.corpus(tokenizer, split)
        windows = corpus.windows[start:stop]
        device = next(model.parameters()).device
        ids = corpus.ids.to(device)
        values: list[tuple[float, int]] = []
        i = 0
        while i < len(windows):
            length = windows[i].end - windows[i].begin
            batch = [windows[i]]
            while (i + len(batch) < len(windows) and len(batch) < self.batch_size
                   and windows[i + len(batch)].end - windows[i + len(batch)].begin == length):
                batch.append(windows[i + len(batch)])
            values += _score_batch(model, ids, batch)
            self.tokens_scored += len(batch) * length
            i += len(batch)
        return values

    def aggregate(self, values: list[Any]) -> dict[str, float]:
        nll = sum(v[0] for v in values)
        count = sum(v[1] for v in values)
        return {self.name: math.exp(nll / count)}


def _score_batch(model: nn.Module, ids: torch.Tensor, windows: list[Window]) -> list[tuple[float, int]]:
    """(summed NLL, scored tokens) of equal-length windows, in one forward pass."""
    inputs = torch.stack([ids[w.begin:w.end] for w in windows])
    keep = max(w.scored for w in windows) + 1  # logits of the positions that predict scored tokens
    logits = model(input_ids=inputs, use_cache=False, logits_to_keep=keep).logits[:, -keep:-1]
    targets = inputs[:, -keep + 1:]
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    nll = nll.view(len(windows), keep - 1)
    scored = torch.tensor([w.scored for w in windows], device=nll.device)
    positions = torch.arange(keep - 1, device=nll.device)
    mask = positions >= (keep - 1) - scored[:, None]
    sums = (nll * mask).sum(dim=1, dtype=torch.float64).tolist()
    return [(s, w.scored) for s, w in zip(sums, windows)]


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None
