"""Synthetic model families: a randomly initialized base and fine-tune-like variants.

Used by the tests, the benchmarks and the quick-start: real ``transformers`` models of
real architectures (Llama, Mistral, Qwen2, Gemma, Phi-3, GPT-2, GPT-NeoX), saved as real
Hugging Face folders, built offline in seconds. A "fine-tune" is the base plus a Gaussian
task vector whose scale is a fraction of each tensor's standard deviation.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from evomerge.io.reader import ModelFolder

ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox")

# name -> (hidden, layers, heads, kv heads, intermediate, vocab)
SIZES = {
    "tiny": (64, 4, 4, 2, 128, 256),
    "small": (256, 6, 8, 4, 704, 2048),
    "100m": (768, 12, 12, 4, 2048, 32000),
    "tinyllama": (2048, 22, 32, 4, 5632, 32000),
}


def make_config(architecture: str, size: str = "tiny", *, tie_embeddings: bool = False):
    """A ``transformers`` config of the given family and size."""
    import transformers as tf

    hidden, layers, heads, kv_heads, inter, vocab = SIZES[size]
    common = dict(vocab_size=vocab, tie_word_embeddings=tie_embeddings, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if architecture in ("llama", "mistral", "qwen2", "gemma", "phi3"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "gemma": tf.GemmaConfig, "phi3": tf.Phi3Config}[architecture]
        extra = {"head_dim": hidden // heads} if architecture == "gemma" else {}
        return cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                   num_key_value_heads=kv_heads, intermediate_size=inter,
                   max_position_embeddings=512, **extra, **common)
    if architecture == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
                             n_inner=inter, **common)
    if architecture == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=inter,
                                max_position_embeddings=512, **common)
    raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")


def build_family(out_dir: str | Path, architecture: str = "llama", *, size: str = "tiny",
                 sources: int = 3, seed: int = 0, delta_scale: float = 0.05,
                 dtype: torch.dtype = torch.float32, tie_embeddings: bool = False,
                 max_shard_size: str = "5GB", distinct_deltas: bool = False) -> list[Path]:
    """Write ``base`` and ``ft1..ftN`` model folders under ``out_dir``; return their paths.

    ``distinct_deltas`` (float32, unsharded) builds task vectors whose magnitudes are all
    different within each tensor and exactly recoverable as ``ft - base``: the base is
    rounded to multiples of 2**-20 and each task vector is a random permutation of
    ±(1..n)·2**-20. Magnitude trims (TIES, breadcrumbs) then have no ties to break, so two
    correct implementations must agree exactly.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        make_config(architecture, size, tie_embeddings=tie_embeddings), dtype=dtype)
    base_dir = out_dir / "base"
    shutil.rmtree(base_dir, ignore_errors=True)
    model.save_pretrained(base_dir, max_shard_size=max_shard_size)
    save_tokenizer(base_dir, model.config.vocab_size)
    logging.getLogger(__name__).debug("saved %s base to %s", architecture, base_dir)
    if distinct_deltas:
        _quantize_base(base_dir)
    base = ModelFolder(base_dir)
    paths = [base_dir]
    generator = torch.Generator().manual_seed(seed + 1)
    for i in range(1, sources + 1):
        ft_dir = out_dir / f"ft{i}"
        shutil.rmtree(ft_dir, ignore_errors=True)
        ft_dir.mkdir(parents=True)
        for extra in base_dir.glob("*.json"):
            if not extra.name.endswith(".index.json"):
                shutil.copy2(extra, ft_dir / extra.name)
        tuned = {}
        for name in base.names():
            tensor = base.tensor(name)
            if tensor.is_floating_point() and distinct_deltas:
                tensor = tensor + _distinct_delta(tensor.numel(), generator).reshape(tensor.shape)
            elif tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                scale = delta_scale * float(tensor.float().std().clamp(min=1e-3))
                tensor = (tensor.float() + noise * scale).to(tensor.dtype)
            tuned[name] = tensor.contiguous()
        save_file(tuned, str(ft_dir / "model.safetensors"), metadata={"format": "pt"})
        paths.append(ft_dir)
    return paths


_GRID = 2.0**-20


def _quantize_base(base_dir: Path) -> None:
    from safetensors.torch import save_file

    path = base_dir / "model.safetensors"
    if not path.exists():
        raise ValueError("distinct_deltas needs an unsharded float32 base")
    folder = ModelFolder(base_dir)
    tensors = {n: (torch.round(folder.tensor(n) / _GRID) * _GRID).contiguous() for n in folder.names()}
    del folder
    save_file(tensors, str(path), metadata={"format": "pt"})


def _distinct_delta(numel: int, generator: torch.Generator) -> torch.Tensor:
    magnitude = (torch.randperm(numel, generator=generator) + 1).to(torch.float32) * _GRID
    sign = torch.randint(0, 2, (numel,), generator=generator).to(torch.float32) * 2 - 1
    return magnitude * sign


_CORPUS = ("The quick brown fox jumps over the lazy dog. 12 + 30 = 42.\n"
           "Merging models: task arithmetic, TIES, DARE, SLERP and model stock.\n") * 8


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A small character-level BPE tokenizer (round-trips text exactly) saved for ``AutoTokenizer``."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.decoder = decoders.Fuse()
    special = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 160), special_tokens=special,
                                  show_progress=False)
    tokenizer.train_from_iterator([_CORPUS], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def add_tokens(source: str | Path, out_dir: str | Path, tokens: Sequence[str], *, seed: int = 0) -> Path:
    """A copy of model folder ``source`` at ``out_dir`` as a chat fine-tune would leave it: its
    embedding (and head) cut to its tokenizer's length, then one new row per added special
    token in ``tokens`` (random, on the 2**-20 grid of ``distinct_deltas`` families), the
    tokenizer saved with those tokens and ``vocab_size`` set to the new length. With no
    ``tokens`` it is the source with its vocabulary rows cut to the tokenizer's."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from evomerge.engine.architecture import family_for, is_vocab_tensor

    source, out_dir = Path(source), Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(source, out_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    length = len(tokenizer)
    if tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    tokenizer.save_pretrained(out_dir)
    rows = len(tokenizer)
    folder = ModelFolder(source)
    family = family_for(folder.config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in folder.names():
        tensor = folder.tensor(name)
        if is_vocab_tensor(name, family):
            extra = torch.randn((rows - length, *tensor.shape[1:]), generator=generator) * 0.02
            tensor = torch.cat([tensor[:length], (torch.round(extra / _GRID) * _GRID).to(tensor.dtype)])
        tensors[name] = tensor.contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config[family.vocab_size_key] = rows
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
