"""Cache-free trims (``evomerge.methods.select``) against the cached path, bit for bit.

The oracle is the position cache: :func:`magnitude_position`, a stable sort, whose kept
range is the definition of a magnitude trim. Hypothesis draws task vectors with heavy
ties (few levels), signed zeros, float32 and bfloat16, tiny and odd sizes, densities
0 and 1; a monkeypatched small sample makes the bracket (and its misses) run on small
tensors, and a small block the blocked kernels' prepared cuts.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.methods import _cpu, select
from evomerge.methods.registry import MergeInputs, get_method
from evomerge.methods.select import magnitude_cut, magnitude_keys
from evomerge.methods.random import stream_words
from evomerge.methods.sparsify import Caches, Sparsify, Trim, TrimCache, della_rank, magnitude_position, sparsify

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def task_vector(numel: int, levels: int | None, zeros: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian values, or ``levels`` distinct magnitudes (heavy ties); a fraction ``zeros``
    of them +0 or -0."""
    generator = torch.Generator().manual_seed(seed)
    values = (torch.randn(numel, generator=generator) if levels is None
              else torch.randint(-levels, levels + 1, (numel,), generator=generator).float() / 8)
    zero = torch.rand(numel, generator=generator) < zeros
    signs = torch.where(torch.rand(numel, generator=generator) < 0.5, -1.0, 1.0)
    return torch.where(zero, 0.0 * signs, values).to(dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32)


@contextlib.contextmanager
def small_sample(block: int | None = None):
    """A 64-key sample (tensors above 1024 elements take the bracketed selection, whose
    narrow margin often misses), 37-element tie blocks, and kernel blocks of ``block``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(select, "_SAMPLE", 64)
        patch.setattr(select, "_MARGIN", 4)
        patch.setattr(select, "_TIE_BLOCK", 37)
        if block is not None:
            patch.setattr(_cpu, "BLOCK", block)
        yield


vectors = st.tuples(st.integers(1, 5000), st.one_of(st.none(), st.integers(0, 6)),
                    st.sampled_from([0.0, 0.3, 0.9]), st.integers(0, 2**16), st.sampled_from(sorted(DTYPES)))
densities = st.one_of(st.sampled_from([0.0, 1.0, 1e-4, 0.5, 0.9999]), st.floats(0, 1))


@settings(max_examples=150, deadline=None)
@given(vector=vectors, density=densities, gamma=st.sampled_from([0.0, 0.01, 0.2]),
       method=st.sampled_from([Sparsify.magnitude, Sparsify.magnitude_outliers]), rescale=st.booleans())
def test_cache_free_magnitude_trim_equals_the_position_cache(vector, density, gamma, method, rescale):
    delta = task_vector(*vector[:4], DTYPES[vector[4]])
    trim = Trim(method, density, rescale, gamma)
    cached = sparsify(delta, trim, TrimCache(position=magnitude_position(delta)))
    with small_sample():
        assert torch.equal(bits(sparsify(delta, trim)), bits(cached))


@settings(max_examples=150, deadline=None)
@given(vector=vectors, count=st.integers(-1, 5001))
def test_cut_is_the_stable_order_prefix(vector, count):
    delta = task_vector(*vector[:4], DTYPES[vector[4]])
    keys = magnitude_keys(delta)
    with small_sample():
        kept = magnitude_cut(keys, count).within(keys, 0, torch.empty_like(keys, dtype=torch.bool))
    assert torch.equal(kept, magnitude_position(delta) < count)


@settings(max_examples=40, deadline=None)
@given(vector=vectors, density=densities, block=st.sampled_from([7, 100, 999]),
       method=st.sampled_from(["ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "dare_linear", "della"]),
       rescale=st.booleans())
def test_blocked_cache_free_kernels_equal_the_cached_ones(vector, density, block, method, rescale):
    """The task-arithmetic kernels by blocks, with the cuts from ``prepare`` and the random
    words recomputed per block (DELLA without ranks: whole), equal the cached kernels."""
    numel, levels, zeros, seed, dtype = vector
    tensors = [task_vector(numel, levels, zeros, seed + i, DTYPES[dtype]) for i in range(3)]
    merge = get_method(method)
    per_input = [{"weight": 1.0, "density": 1.0}] + [
        {"weight": w, "density": density, "gamma": 0.05, "epsilon": min(0.1, density / 2, (1 - density) / 2)}
        for w in (0.7, -0.4)]
    shared = {"rescale": rescale, "normalize": True, "lambda": 1.0}
    keys = [0, 11, 12]
    caches = Caches([TrimCache()] + [
        TrimCache(position=magnitude_position(t - tensors[0]), words=stream_words(key, numel, "cpu"),
                  rank=della_rank(t - tensors[0])) for t, key in zip(tensors[1:], keys[1:])])
    with small_sample(block):  # both blocked alike: an L1 rescale sums by blocks
        cached = merge.run(MergeInputs(tensors, 0, shared, per_input, keys, caches))
        free = merge.run(MergeInputs(tensors, 0, shared, per_input, keys))
    assert torch.equal(bits(free), bits(cached))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_cuda_cache_free_equals_cpu_cached(dtype):
    """The cut's torch ops on CUDA tensors (the shipped sample and bracket) give the CPU
    cached path's trims, ties and signed zeros included."""
    for numel, levels in ((1 << 20, None), (1 << 20, 3), ((1 << 19) + 7, 0), (1000, None)):
        delta = task_vector(numel, levels, 0.2, numel, DTYPES[dtype])
        position = magnitude_position(delta)
        for method, density in ((Sparsify.magnitude, 0.3), (Sparsify.magnitude_outliers, 0.5),
                                (Sparsify.magnitude, 0.999)):
            trim = Trim(method, density, True, 0.05)
            cuda = sparsify(delta.cuda(), trim).cpu()
            assert torch.equal(bits(cuda), bits(sparsify(delta, trim, TrimCache(position=position))))
