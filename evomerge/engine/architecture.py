"""Tensor names → (layer index, module kind) for the common decoder families.

Known families (Llama, Mistral, Qwen2, Gemma, Phi-3, GPT-2, GPT-NeoX) have explicit
layer prefixes and kind patterns; anything else falls back to generic name patterns
(``...layers.N.``/``...h.N.``/``...blocks.N.`` and substrings such as ``attn``, ``mlp``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["embed", "attention", "mlp", "norm", "head", "other"]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layer_prefix: str  # regex matching everything up to and including "<index>."
    num_layers_key: str
    vocab_size_key: str = "vocab_size"


FAMILIES = [
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"),
           r"model\.layers\.(\d+)\.", "num_hidden_layers"),
    Family("gpt2", ("gpt2",), r"(?:transformer\.)?h\.(\d+)\.", "n_layer"),
    Family("gpt_neox", ("gpt_neox",), r"gpt_neox\.layers\.(\d+)\.", "num_hidden_layers"),
]
GENERIC = Family("generic", (), r"(?:.*\.)?(?:layers|layer|h|blocks|block)\.(\d+)\.",
                 "num_hidden_layers")

_KIND_PATTERNS: list[tuple[Kind, re.Pattern]] = [
    ("embed", re.compile(r"embed_tokens|wte|wpe|embed_in|word_embeddings|embed_positions")),
    ("head", re.compile(r"lm_head|embed_out|output\.weight$")),
    ("norm", re.compile(r"norm|ln_\w+|ln_f|layernorm")),
    ("attention", re.compile(r"attn|attention|q_proj|k_proj|v_proj|o_proj|qkv")),
    ("mlp", re.compile(r"mlp|feed_forward|gate_proj|up_proj|down_proj|fc_|dense_h_to_4h|"
                       r"dense_4h_to_h|c_fc|experts")),
]
VOCAB_KINDS = ("embed", "head")


def family_for(config: dict) -> Family:
    """The family of a model from its ``config.json`` (generic fallback)."""
    model_type = config.get("model_type", "")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return GENERIC


def num_layers(config: dict) -> int:
    """Decoder depth from ``config.json``."""
    family = family_for(config)
    for key in (family.num_layers_key, "num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    raise KeyError("config.json has no num_hidden_layers / n_layer")


def layer_index(name: str, family: Family) -> int | None:
    """Decoder layer index of a tensor, or None for embeddings, final norm and head."""
    match = re.match(family.layer_prefix, name)
    return int(match.group(1)) if match else None


def with_layer(name: str, family: Family, index: int) -> str:
    """The same tensor name in layer ``index``."""
    match = re.match(family.layer_prefix, name)
    if not match:
        raise ValueError(f"{name} is not a layer tensor")
    return name[:match.start(1)] + str(index) + name[match.end(1):]


def tensor_kind(name: str) -> Kind:
    """Module kind of a tensor by name: embed / attention / mlp / norm / head / other."""
    lowered = name.lower()
    for kind, pattern in _KIND_PATTERNS:
        if pattern.search(lowered):
            return kind
    return "other"


def is_vocab_tensor(name: str, family: Family) -> bool:
    """True for token embeddings and the LM head (whose rows follow the vocabulary)."""
    return layer_index(name, family) is None and tensor_kind(name) in VOCAB_KINDS and not (
        "wpe" in name or "embed_positions" in name)
