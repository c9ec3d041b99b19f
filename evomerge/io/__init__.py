"""Reading and writing Hugging Face model folders; finding the files shipped with the package (:mod:`.shipped`)."""

from evomerge.io.reader import ModelFolder
from evomerge.io.writer import DEFAULT_SHARD_SIZE, TOKENIZER_FILES, ModelWriter, check_output_dir, parse_size

__all__ = ["DEFAULT_SHARD_SIZE", "TOKENIZER_FILES", "ModelFolder", "ModelWriter", "check_output_dir",
           "parse_size"]
