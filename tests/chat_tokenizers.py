"""A small tokenizer with ChatML's special tokens and a given chat template (for chat-format tests)."""

from __future__ import annotations

import random
from pathlib import Path

from transformers import AutoTokenizer


def chatml_tokenizer(folder: Path, template: str):
    """The zoo's tokenizer (400 tokens) plus ``<|im_start|>`` / ``<|im_end|>`` and ``template``,
    saved to ``folder`` and loaded back (as a model folder's tokenizer is)."""
    from evomerge.zoo.corpus import general_text
    from evomerge.zoo.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([general_text(random.Random(0), 40)], 400)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)
