"""Merge methods as pure tensor functions, and the registry that names them."""

from evomerge.methods.fusion import arcee_fusion_merge, nearswap_merge
from evomerge.methods.linear import linear_merge
from evomerge.methods.model_stock import model_stock_merge
from evomerge.methods.ram import ram_merge
from evomerge.methods.registry import METHODS, MergeInputs, MergeMethod, Param, get_method
from evomerge.methods.sce import sce_merge
from evomerge.methods.slerp import slerp_merge
from evomerge.methods.spherical import karcher_merge, multislerp_merge, nuslerp, nuslerp_merge
from evomerge.methods.sparsify import Caches, Sparsify, Trim, TrimCache, della_rank, magnitude_position, sparsify
from evomerge.methods.task_arithmetic import sign_consensus, task_arithmetic_merge

__all__ = [
    "METHODS", "Caches", "MergeInputs", "MergeMethod", "Param", "Sparsify", "Trim", "TrimCache",
    "arcee_fusion_merge", "della_rank", "get_method", "karcher_merge", "linear_merge", "magnitude_position",
    "model_stock_merge", "multislerp_merge", "nearswap_merge", "nuslerp", "nuslerp_merge", "ram_merge",
    "sce_merge", "sign_consensus", "slerp_merge", "sparsify", "task_arithmetic_merge",
]
