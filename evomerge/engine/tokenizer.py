"""The output vocabulary of a merge and each input's embedding/head rows re-mapped to it.

Fine-tunes often add tokens (ChatML markers, tool tokens), so the models of a merge can have
different vocabularies. ``tokenizer_source: base | union | <model>`` or the ``tokenizer:``
block (``source``, ``tokens``, ``pad_to_multiple_of``) asks for mergekit's treatment:

1. :func:`build_vocabulary` (once per config): the output tokenizer — the base's, a given
   model's, or the union (the base's vocabulary, then every other model's tokens it lacks,
   then every model's added tokens, in config order) — plus the tokens the ``tokens`` block
   names; and for each referenced model its *row permutation*: output id → the row of that
   model's embedding/head that holds the token, or -1 when the model lacks it.
2. :func:`row_map` (per embedding/head op, at plan time): which row every input contributes
   for every output id, with mergekit's fill rule for the rows an input lacks (or that a
   ``force`` entry replaces) — the configured ``source`` of a ``tokens`` entry (a model's row
   of the token, another token's row, or zero); otherwise the only model that has the token,
   else the base's row when the base has it, else the mean of the inputs that have it (zero
   when none has it); padding rows (``pad_to_multiple_of``) get the mean of the real rows.
   Every check that can fail happens here, before anything is computed or written.
3. :meth:`RowMap.apply` (per candidate): each input's rows in output order, so every merge
   method runs unchanged on equally shaped inputs.

Where mergekit's result depends on a set's iteration order (the order in which the union
takes non-base models, hence the ids of their added tokens), evomerge takes the config's
order (base first, then the models as listed); where mergekit crashes (a non-base token
row beyond a model's ``vocab_size``, a ``tokens`` entry no model has and no ``source``
fills), evomerge treats the row as missing or refuses the config with one line.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.engine.architecture import family_for
from evomerge.engine.config import ModelTokenSource, TokenizerSettings, TokenSettings, ZeroSource
from evomerge.errors import ConfigError, ModelError
from evomerge.io.reader import ModelFolder

log = logging.getLogger(__name__)

FIELD = "tokenizer"


@dataclass
class Vocabulary:
    """The output tokenizer of one config and every referenced model's row permutation."""

    settings: TokenizerSettings
    tokenizer: Any  # a transformers tokenizer of exactly ``tokens``
    copy_from: Path | None  # a folder whose tokenizer files are the output's unchanged, if any
    tokens: dict[str, int]  # output vocabulary: token -> id (ids 0..len-1)
    size: int  # output rows: len(tokens), padded up to ``pad_to_multiple_of``
    rows: dict[str, torch.Tensor]  # model -> int64 [len(tokens)]: its row of each token, -1: none
    vocabs: dict[str, dict[str, int]]  # model -> its own tokenizer's vocabulary
    base: str
    _maps: dict = field(default_factory=dict, repr=False)  # row_map's results, reused by later plans

    @property
    def length(self) -> int:
        return len(self.tokens)


def _load(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, use_fast=True)


def _rows(folder: ModelFolder, vocab: dict[str, int]) -> int:
    size = folder.config.get(family_for(folder.config).vocab_size_key)
    return int(size) if isinstance(size, int) else len(vocab)


def build_vocabulary(settings: TokenizerSettings, base: str | None, referenced: list[str],
                     models: dict[str, ModelFolder]) -> Vocabulary:
    """The output tokenizer for ``settings`` and each of ``referenced``'s row permutations.

    ``base``: the config's base model (default: the first referenced model). Raises
    :class:`ModelError` when a needed tokenizer cannot be loaded, :class:`ConfigError` for a
    ``tokens`` entry that cannot be honored.
    """
    base = base if base is not None else referenced[0]
    try:
        base_tokenizer = _load(models[base].files_dir)
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(f"{base}: cannot load its tokenizer for the merge's tokenizer: "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    beyond = [t for t, i in base_tokenizer.get_vocab().items() if i >= _rows(models[base], base_tokenizer.get_vocab())]
    if beyond:
        raise ModelError(f"{base}: its tokenizer has {len(beyond)} tokens beyond its vocab_size "
                         f"(e.g. {beyond[0]!r}); evomerge cannot strip them")
    tokenizers = {base: base_tokenizer}
    for name in referenced:
        if name not in tokenizers:
            try:
                tokenizers[name] = _load(models[name].files_dir)
            except (OSError, ValueError, TypeError):
                log.warning("%s: cannot load its tokenizer; assuming the base's (%s)", name, base)
    source, copy_from = settings.source, None
    if source == "base":
        output = base_tokenizer  # mergekit: the base's own tokenizer object (added tokens become its too)
        copy_from = models[base].files_dir
    elif source == "union":
        output = _union(base_tokenizer, tokenizers, models)
    else:
        path = Path(source)
        if not path.is_dir():
            raise ModelError(f"tokenizer_source: folder not found: {source}")
        try:
            output = _load(path)
        except (OSError, ValueError, TypeError) as error:
            raise ModelError(f"tokenizer source {source}: cannot load its tokenizer: "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        copy_from = path
    before = len(output.get_vocab())
    existing = set(output.get_vocab())
    for token in settings.tokens or {}:
        if token not in existing:
            output.add_tokens(token)
            existing.add(token)
    if len(output.get_vocab()) != before:
        copy_from = None
    tokens = dict(output.get_vocab())
    if sorted(tokens.values()) != list(range(len(tokens))):
        raise ModelError("the output tokenizer's ids are not 0..n-1; cannot lay out its rows")
    rows = {}
    for name in referenced:
        own = tokenizers.get(name, base_tokenizer).get_vocab()
        limit = _rows(models[name], own)
        permutation = torch.full((len(tokens),), -1, dtype=torch.int64)
        for token, new_id in tokens.items():
            old_id = own.get(token)
            if old_id is None:
                continue
            if old_id >= limit:
                log.warning("%s: token %r has id %d beyond its %d rows; treated as missing",
                            name, token, old_id, limit)
                continue
            permutation[new_id] = old_id
        rows[name] = permutation
    size = len(tokens)
    multiple = settings.pad_to_multiple_of
    if multiple and size % multiple:
        size += multiple - size % multiple
    vocabs = {name: dict(tokenizer.get_vocab()) for name, tokenizer in tokenizers.items()}
    return Vocabulary(settings, output, copy_from, tokens, size, rows, vocabs, base)


def _union(base_tokenizer, tokenizers: dict, models: dict[str, ModelFolder]):
    """The base's tokenizer plus every other model's tokens it lacks, then all added tokens."""
    from transformers import AutoTokenizer

    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for name, tokenizer in tokenizers.items():
        vocab = tokenizer.get_vocab()
        limit = _rows(models[name], vocab)
        decoder = tokenizer.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        for token, index in vocab.items():
            if index < limit and token not in added_names:
                plain.setdefault(token)
        for index, info in decoder.items():
            if index >= limit:
                continue
            if info.content in added and added[info.content] != info:
                log.warning("token %r is added with different settings by different models; "
                            "using the first", info.content)
            added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as folder:  # a copy: the base's tokenizer stays as it is
        base_tokenizer.save_pretrained(folder)
        result = AutoTokenizer.from_pretrained(folder, use_fast=True)
    base_vocab = base_tokenizer.get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            result.add_tokens(token)
    for info in added.values():
        result.add_tokens(info)
    return result


# --------------------------------------------------------------------------- one op's rows


@dataclass
class RowMap:
    """How one embedding/head op's inputs become rows of the output vocabulary.

    ``index[j]``: for every output id the row of input ``j`` copied there (0 where a fill
    replaces it); ``fills[j]``: the output ids where input ``j`` takes a fill row and the
    position of that row among the op's fills. A fill is ``("zero",)``, ``("row", input,
    row)`` or ``("mean", ((input, row), ...))``, in output-id order.
    """

    length: int
    size: int
    index: list[torch.Tensor]
    fills: list[tuple[torch.Tensor, torch.Tensor]]  # per input: (output ids, fill positions)
    recipes: list[tuple]
    identity: list[bool]  # per input: its rows already are the output's (no copy needed)
    _devices: dict = field(default_factory=dict, repr=False)

    def _on(self, device: torch.device):
        if device not in self._devices:
            self._devices[device] = ([i.to(device) for i in self.index],
                                     [(ids.to(device), pos.to(device)) for ids, pos in self.fills])
        return self._devices[device]

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each input (vocabulary first, all of one dtype) with ``size`` rows in output order."""
        index, fills = self._on(tensors[0].device)
        defaults = self._defaults(tensors)
        result = []
        for j, tensor in enumerate(tensors):
            if self.identity[j] and tensor.shape[0] == self.size:
                result.append(tensor)
                continue
            rows = tensor.new_zeros((self.size, *tensor.shape[1:]))
            rows[:self.length] = tensor.index_select(0, index[j])
            ids, positions = fills[j]
            if ids.numel():
                rows[ids] = defaults.index_select(0, positions)
            if self.size > self.length:  # padding: the mean of the real rows
                rows[self.length:] = torch.mean(rows[:self.length], dim=0)
            result.append(rows)
        return result

    def _defaults(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        first = tensors[0]
        defaults = first.new_zeros((len(self.recipes), *first.shape[1:]))
        for position, recipe in enumerate(self.recipes):
            if recipe[0] == "row":
                defaults[position] = tensors[recipe[1]][recipe[2]]
            elif recipe[0] == "mean":  # mergekit: zero, then each present input's row in order, / count
                total = first.new_zeros(first.shape[1:])
                for j, row in recipe[1]:
                    total = total + tensors[j][row]
                defaults[position] = total / len(recipe[1])
        return defaults


def row_map(vocabulary: Vocabulary, inputs: list[str], base: str | None, shapes: list[tuple[int, ...]],
            tensor: str) -> RowMap:
    """The :class:`RowMap` of an embedding/head op named ``tensor`` over ``inputs`` (model names,
    in op order) with ``base`` (the slice's base model, or None) and the inputs' ``shapes``
    (built once per distinct arguments: a search plans the same ops for every candidate)."""
    key = (tuple(inputs), base, tuple(shapes), tensor)
    if key not in vocabulary._maps:
        vocabulary._maps[key] = _row_map(vocabulary, inputs, base, shapes, tensor)
    return vocabulary._maps[key]


def _row_map(vocabulary: Vocabulary, inputs: list[str], base: str | None, shapes: list[tuple[int, ...]],
             tensor: str) -> RowMap:
    permutations = [vocabulary.rows[name] for name in inputs]
    for name, permutation, shape in zip(inputs, permutations, shapes):
        if permutation.numel() and int(permutation.max()) >= shape[0]:
            raise ModelError(f"{name}: {tensor} has {shape[0]} rows but its tokenizer uses row "
                             f"{int(permutation.max())}")
    settings: dict[str, TokenSettings] = dict(vocabulary.settings.tokens or {})
    present = torch.stack(permutations) >= 0  # [inputs, tokens]
    counts = present.sum(0).tolist()
    base_j = inputs.index(base) if base in inputs else None
    recipes: list[tuple] = []
    fill_of: dict[int, int] = {}  # output id -> fill position
    for token, new_id in vocabulary.tokens.items():
        entry = settings.get(token)
        forced = entry is not None and entry.force
        if not forced and counts[new_id] == len(inputs):
            continue
        if entry is not None:
            recipe = _configured(vocabulary, entry, token, new_id, inputs, permutations, shapes)
        elif counts[new_id] == 1:
            j = int(present[:, new_id].nonzero()[0])
            recipe = ("row", j, int(permutations[j][new_id]))
        elif counts[new_id] == 0:
            log.warning("token %r is in none of %s's inputs; its row is zero", token, tensor)
            recipe = ("zero",)
        elif base_j is not None and present[base_j, new_id]:
            recipe = ("row", base_j, int(permutations[base_j][new_id]))
        else:
            recipe = ("mean", tuple((j, int(permutations[j][new_id])) for j in range(len(inputs))
                                    if present[j, new_id]))
        fill_of[new_id] = len(recipes)
        recipes.append(recipe)
    forced_ids = [vocabulary.tokens[t] for t, e in settings.items() if e.force and t in vocabulary.tokens]
    index, fills, identity = [], [], []
    arange = torch.arange(vocabulary.length)
    for j, permutation in enumerate(permutations):
        keep = permutation >= 0
        if forced_ids:
            keep[forced_ids] = False
        ids = (~keep).nonzero().flatten()
        positions = torch.tensor([fill_of[int(i)] for i in ids], dtype=torch.int64)
        index.append(torch.where(keep, permutation, 0))
        fills.append((ids, positions))
        identity.append(bool(keep.all()) and torch.equal(permutation, arange)
                        and shapes[j][0] == vocabulary.size == vocabulary.length)
    return RowMap(vocabulary.length, vocabulary.size, index, fills, recipes, identity)


def _configured(vocabulary: Vocabulary, entry: TokenSettings, token: str, new_id: int, inputs: list[str],
                permutations: list[torch.Tensor], shapes: list[tuple[int, ...]]) -> tuple:
    """The fill of a token the ``tokens`` block configures (mergekit's rules; a ConfigError where
    mergekit would fail mid-merge)."""
    where = f"{FIELD}.tokens.{token}"
    source = entry.source
    if isinstance(source, ZeroSource):
        return ("zero",)
    if source is None:
        lacking = [name for name, p in zip(inputs, permutations) if p[new_id] < 0]
        if len(lacking) == len(inputs):
            raise ConfigError(f"no model has the token {token!r}; give it a source "
                              "(a model, {kind: zero} or {kind: model_token, ...})", field=where)
        raise ConfigError(f"{'force needs' if entry.force else f'{lacking[0]} lacks the token, so it needs'} "
                          "a source (a model, {kind: zero} or {kind: model_token, ...})", field=where)
    model = source.model if isinstance(source, ModelTokenSource) else source
    if model not in inputs:
        raise ConfigError(f"source {model} is not an input of this merge's embeddings", field=where)
    j = inputs.index(model)
    if isinstance(source, ModelTokenSource):
        row = source.token_id
        if row is None:
            if source.token not in vocabulary.vocabs.get(model, vocabulary.vocabs[vocabulary.base]):
                raise ConfigError(f"{model} has no token {source.token!r}", field=where)
            row = vocabulary.vocabs.get(model, vocabulary.vocabs[vocabulary.base])[source.token]
        if not 0 <= row < shapes[j][0]:
            raise ConfigError(f"token id {row} is out of range for {model} ({shapes[j][0]} rows)", field=where)
        return ("row", j, row)
    if permutations[j][new_id] < 0:
        raise ConfigError(f"{model} has no token {token!r}", field=where)
    return ("row", j, int(permutations[j][new_id]))
