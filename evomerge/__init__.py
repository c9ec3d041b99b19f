"""evomerge: search for the best way to merge fine-tuned LLMs that share a base model."""

from evomerge.engine.config import MergeConfig, load_config, parse_config
from evomerge.engine.merge import merge, merge_state_dict
from evomerge.errors import ConfigError, EvomergeError, ModelError

__all__ = ["ConfigError", "EvomergeError", "MergeConfig", "ModelError", "load_config", "merge",
           "merge_state_dict", "parse_config"]
__version__ = "0.1.0"
