"""Reading and writing Hugging Face model folders; LoRA adapters as sources; GGUF import; finding the
files shipped with the package (:mod:`.shipped`)."""

from evomerge.io.adapter import AdapterFolder, LoraAdapter
from evomerge.io.reader import ModelFolder
from evomerge.io.source import open_model
from evomerge.io.writer import DEFAULT_SHARD_SIZE, TOKENIZER_FILES, ModelWriter, check_output_dir, parse_size

__all__ = ["DEFAULT_SHARD_SIZE", "TOKENIZER_FILES", "AdapterFolder", "LoraAdapter", "ModelFolder", "ModelWriter",
           "check_output_dir", "open_model", "parse_size"]
