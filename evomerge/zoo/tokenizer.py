"""A BPE tokenizer that round-trips any text exactly, saved so ``AutoTokenizer`` loads it offline.

Pre-tokenization isolates every digit, space, newline and punctuation mark and keeps runs
of letters together, so merges only join letters into words: numbers are read digit by
digit, a space is always its own token, and a word is the same token wherever it stands.
The alphabet is printable ASCII plus the 256 byte tokens ``<0x00>``..``<0xFF>`` (byte
fallback), so no character is ever dropped. It is saved as a plain
``PreTrainedTokenizerFast`` (``tokenizer.json``), which transformers loads as is; a
model-specific class such as ``LlamaTokenizer`` would rebuild it with its own
pre-tokenizer and lose spaces.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
_PIECES = r"[A-Za-z]+|[^A-Za-z]"
_BYTES = [f"<0x{i:02X}>" for i in range(256)]


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train on ``texts`` (``vocab_size`` counts the byte tokens); return a ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECES), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(_BYTES), show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=list(string.printable))
    tokenizer.train_from_iterator(texts, trainer)
    trained = json.loads(tokenizer.to_str())["model"]
    vocab = trained["vocab"] | {token: len(trained["vocab"]) + i for i, token in enumerate(_BYTES)}
    merges = [tuple(merge) for merge in trained["merges"]]
    tokenizer.model = models.BPE(vocab, merges, byte_fallback=True)
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    pad, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, bos_token=bos,
                                   eos_token=eos)
