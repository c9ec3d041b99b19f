"""Row-blocked merges (``evomerge.methods.blocked``) against the whole-tensor kernels, bit for bit.

The streamed cut (:class:`~evomerge.methods.select.StreamedCut`) is checked against
:func:`~evomerge.methods.select.magnitude_cut`, and :class:`~evomerge.methods.blocked.RowBlocked`
against :meth:`MergeMethod.run` on the whole tensors, cache-free and with the position, rank
and word caches, for every row-blocked method: heavy ties, signed zeros, float32 and
bfloat16, densities 0 and 1, rescale on and off, tiny block limits (and tiny CPU blocks and
sum chunks) so that small tensors split into many row blocks.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.methods import _cpu
from evomerge.methods.blocked import RowBlocked, block_rows
from evomerge.methods.random import stream_words
from evomerge.methods.registry import METHODS, MergeInputs, get_method
from evomerge.methods.select import StreamedCut, key_dtype, magnitude_cut, magnitude_keys
from evomerge.methods.sparsify import Caches, TrimCache, della_rank, magnitude_position
from evomerge.methods.workspace import Workspace
from tests.methods.test_cache_free_trims import DTYPES, bits, task_vector

ROW_METHODS = sorted(name for name, method in METHODS.items() if method.rows)


@contextlib.contextmanager
def small_chunks(block: int):
    """CPU kernel blocks and L1 sum chunks of ``block`` elements."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_cpu, "BLOCK", block)
        yield


def test_the_row_blocked_methods():
    assert ROW_METHODS == sorted(["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                                  "breadcrumbs_ties", "della", "della_linear"])


@settings(max_examples=200, deadline=None)
@given(vector=st.tuples(st.integers(1, 3000), st.one_of(st.none(), st.integers(0, 6)),
                        st.sampled_from([0.0, 0.3, 0.9]), st.integers(0, 2**16), st.sampled_from(sorted(DTYPES))),
       count=st.integers(-1, 3001), block=st.integers(1, 400))
def test_streamed_cut_equals_the_whole_tensor_cut(vector, count, block):
    delta = task_vector(*vector[:4], DTYPES[vector[4]])
    keys = magnitude_keys(delta)
    numel = keys.numel()
    expected = magnitude_cut(keys, count).within(keys, 0, torch.empty_like(keys, dtype=torch.bool))
    cut = StreamedCut(count, numel, key_dtype(delta.dtype))
    blocks = [(start, keys[start:start + block]) for start in range(0, numel, block)]
    for _ in range(cut.passes):
        for _, part in reversed(blocks):  # any order
            cut.add(part)
        cut.end_pass()
    for _ in range(2):  # a rewound scan gives the same cuts
        cut.rewind()
        kept = [cut.cut(part if cut.scans else None, start, part.numel()).within(
            part, start, torch.empty_like(part, dtype=torch.bool)) for start, part in blocks]
        assert torch.equal(torch.cat(kept), expected)


def test_block_rows():
    cpu = torch.device("cpu")
    assert block_rows((100,), 10, cpu) is None
    assert block_rows((10, 10), 100, cpu) is None
    with small_chunks(8):
        assert block_rows((10, 4), 17, cpu) == 4  # 16 elements: two chunks
        assert block_rows((10, 3), 7, cpu) == 8  # a chunk needs 8 rows: over the limit
        assert block_rows((8, 3), 7, cpu) is None  # one block: not blocked
    with pytest.raises(ValueError, match="block limit must be positive, got 0"):
        block_rows((10, 10), 0, cpu)


def merge_inputs(method: str, numel: int, levels, zeros, seed, dtype, density, rescale, columns):
    rows = max(1, numel // columns)
    tensors = [task_vector(rows * columns, levels, zeros, seed + i, dtype).reshape(rows, columns) for i in range(4)]
    if method == "linear":
        return MergeInputs(tensors, None, {"normalize": True}, [{"weight": w} for w in (0.3, 0.5, -0.2, 0.4)],
                           [0] * 4)
    per_input = [{"weight": 1.0, "density": 1.0}] + [
        {"weight": w, "density": d, "gamma": 0.05, "epsilon": min(0.1, d / 2, (1 - d) / 2)}
        for w, d in ((0.7, density), (-0.4, density), (0.9, min(1.0, density * 1.7)))]
    shared = {"rescale": rescale, "normalize": True, "lambda": 0.9}
    return MergeInputs(tensors, 0, shared, per_input, [0, 11, 12, 13])


def run_blocked(inputs: MergeInputs, method: str, limit: int) -> torch.Tensor:
    base = inputs.tensors[0]
    rows = block_rows(base.shape, limit, base.device) or base.shape[0]
    blocked = RowBlocked(get_method(method), inputs.shared, inputs.per_input, inputs.keys, inputs.base_index,
                         base.shape, base.dtype, rows)
    out, workspace = torch.empty_like(base), Workspace()
    for unit, (_, part) in enumerate(blocked.units):
        merged = blocked.feed(unit, [t[part] for t in inputs.tensors], workspace, out[part])
        assert merged is None or merged.data_ptr() == out[part].data_ptr()
    return out


@settings(max_examples=120, deadline=None)
@given(numel=st.integers(1, 3000), levels=st.one_of(st.none(), st.integers(0, 6)),
       zeros=st.sampled_from([0.0, 0.3, 0.9]), seed=st.integers(0, 2**16), dtype=st.sampled_from(sorted(DTYPES)),
       density=st.one_of(st.sampled_from([0.0, 1.0, 1e-3, 0.5, 0.999]), st.floats(0, 1)),
       rescale=st.booleans(), columns=st.sampled_from([1, 4, 7, 32]), method=st.sampled_from(ROW_METHODS),
       limit=st.integers(1, 500), chunk=st.sampled_from([4, 8, 64]), cached=st.booleans())
def test_row_blocked_merge_equals_the_whole_tensor_merge(numel, levels, zeros, seed, dtype, density, rescale,
                                                          columns, method, limit, chunk, cached):
    """A whole-tensor run cache-free or with every cache (positions, ranks, words), against the
    row blocks (cache-free, by construction)."""
    inputs = merge_inputs(method, numel, levels, zeros, seed, DTYPES[dtype], density, rescale, columns)
    if cached and inputs.base_index is not None:
        base = inputs.tensors[0]
        inputs = MergeInputs(inputs.tensors, 0, inputs.shared, inputs.per_input, inputs.keys, Caches([TrimCache()] + [
            TrimCache(position=magnitude_position(t - base), rank=della_rank(t - base),
                      words=stream_words(key, t.numel(), "cpu").reshape(t.shape))
            for t, key in zip(inputs.tensors[1:], inputs.keys[1:])]))
    with small_chunks(chunk):
        whole = get_method(method).run(inputs)
        blocked = run_blocked(inputs, method, limit)
    assert torch.equal(bits(blocked), bits(whole))
