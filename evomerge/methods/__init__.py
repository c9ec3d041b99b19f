"""Merge methods as pure tensor functions, and the registry that names them."""

from evomerge.methods.linear import linear_merge
from evomerge.methods.model_stock import model_stock_merge
from evomerge.methods.registry import METHODS, MergeInputs, MergeMethod, Param, get_method
from evomerge.methods.slerp import slerp_merge
from evomerge.methods.sparsify import Caches, Sparsify, Trim, TrimCache, della_rank, magnitude_position, sparsify
from evomerge.methods.task_arithmetic import sign_consensus, task_arithmetic_merge

__all__ = [
    "METHODS", "Caches", "MergeInputs", "MergeMethod", "Param", "Sparsify", "Trim", "TrimCache", "della_rank",
    "get_method", "linear_merge", "magnitude_position", "model_stock_merge", "sign_consensus", "slerp_merge",
    "sparsify", "task_arithmetic_merge",
]
