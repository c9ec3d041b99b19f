"""Merge kernels against closed forms, hypothesis properties, and the DARE/DELLA semantics."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.methods import (
    Caches,
    Sparsify,
    Trim,
    TrimCache,
    _cpu,
    della_rank,
    linear_merge,
    magnitude_position,
    model_stock_merge,
    sign_consensus,
    slerp_merge,
    sparsify,
    task_arithmetic_merge,
)
from evomerge.methods import random as random_module
from evomerge.methods.random import bernoulli_mask, keep_flags, random_key, random_words, stream_words
from evomerge.methods.sparsify import rescale_factor, sparsify_
from evomerge.methods.task_arithmetic import sum_rows, task_vectors
from evomerge.methods.workspace import Workspace

floats = st.floats(-2, 2, allow_nan=False, width=32)


def tensors(shape=(5, 7), seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


# ------------------------------------------------------------------ closed forms


@settings(max_examples=50, deadline=None)
@given(weight=floats, lam=floats, seed=st.integers(0, 1000))
def test_task_arithmetic_is_base_plus_scaled_delta(weight, lam, seed):
    base, source = tensors(seed=seed, n=2)
    merged = task_arithmetic_merge(base, [source - base], [weight], lam=lam)
    torch.testing.assert_close(merged, base + lam * weight * (source - base))


def test_negative_weight_subtracts_a_skill():
    base, a, b = tensors()
    merged = task_arithmetic_merge(base, [a - base, b - base], [1.0, -1.0])
    torch.testing.assert_close(merged, base + (a - base) - (b - base))


@settings(max_examples=50, deadline=None)
@given(weights=st.lists(st.floats(0.1, 3), min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_linear_normalized_is_weighted_mean(weights, seed):
    xs = tensors(seed=seed, n=len(weights))
    expected = sum(w * x for w, x in zip(weights, xs)) / sum(weights)
    torch.testing.assert_close(linear_merge(xs, weights), expected)
    torch.testing.assert_close(linear_merge(xs, weights, normalize=False),
                               sum(w * x for w, x in zip(weights, xs)))


def test_ties_dense_same_sign_is_weighted_mean_of_deltas():
    base = torch.zeros(4, dtype=torch.float64)
    deltas = [torch.tensor([1.0, 2, 3, 4], dtype=torch.float64), torch.tensor([3.0, 2, 1, 2], dtype=torch.float64)]
    merged = task_arithmetic_merge(base, deltas, [1.0, 3.0], trims=[Trim(Sparsify.magnitude, 1.0)] * 2,
                                   consensus=True, normalize=True)
    torch.testing.assert_close(merged, (1 * deltas[0] + 3 * deltas[1]) / 4)


def test_ties_sign_election_drops_the_minority():
    weighted = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 1.0, 0.5]])
    # column sums: -2 (negative wins), -1 (negative), 1 (positive)
    assert sign_consensus(weighted).tolist() == [[False, True, True], [True, False, True]]
    merged = task_arithmetic_merge(torch.zeros(3), list(weighted), [1.0, 1.0],
                                   trims=[Trim(Sparsify.magnitude, 1.0)] * 2, consensus=True, normalize=True)
    assert merged.tolist() == [-3.0, -2.0, 0.5]


def test_magnitude_keeps_the_k_largest_and_breaks_ties_by_position():
    delta = torch.tensor([0.1, -5.0, 2.0, 2.0, 2.0, -0.3])
    kept = sparsify(delta, Trim(Sparsify.magnitude, 0.5))
    assert kept.tolist() == [0.0, -5.0, 2.0, 2.0, 0.0, 0.0]  # k = 3; the first tied 2.0s win
    assert sparsify(delta, Trim(Sparsify.magnitude, 0.01)).tolist() == [0, -5.0, 0, 0, 0, 0]


def test_magnitude_with_precomputed_position_is_identical():
    delta = tensors(shape=(31, 9))[0].float()
    position = magnitude_position(delta)
    for density in (0.05, 0.3, 0.77):
        assert torch.equal(sparsify(delta, Trim(Sparsify.magnitude, density)),
                           sparsify(delta, Trim(Sparsify.magnitude, density), TrimCache(position=position)))


def test_breadcrumbs_drops_top_gamma_then_bottom():
    delta = torch.arange(1.0, 101.0)  # magnitudes 1..100
    kept = sparsify(delta, Trim(Sparsify.magnitude_outliers, 0.5, gamma=0.1))
    assert torch.nonzero(kept).flatten().tolist() == list(range(40, 90))  # values 41..90


@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.2), (0.3, 0.0)])
def test_breadcrumbs_matches_mergekit(density, gamma):
    sparsify_mk = pytest.importorskip("mergekit.sparsify")
    delta = torch.randperm(1000).float() - 500.5  # distinct magnitudes
    ours = sparsify(delta, Trim(Sparsify.magnitude_outliers, density, gamma=gamma))
    theirs = sparsify_mk.magnitude_outliers(delta, density=density, gamma=gamma)
    assert torch.equal(ours, theirs)


def test_slerp_endpoints_and_orthogonal_midpoint():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp_merge(0.0, a, b), a)
    torch.testing.assert_close(slerp_merge(1.0, a, b), b)
    torch.testing.assert_close(slerp_merge(0.5, a, b), torch.tensor([1.0, 1.0]) / math.sqrt(2))
    # nearly collinear: falls back to linear interpolation
    torch.testing.assert_close(slerp_merge(0.25, a, 2 * a), 1.25 * a)


def test_model_stock_closed_forms():
    base = torch.zeros(4, dtype=torch.float64)
    same = torch.tensor([1.0, 2, 3, 4], dtype=torch.float64)
    # identical task vectors: cos = 1 → t = 1 → the average of the fine-tunes
    torch.testing.assert_close(model_stock_merge(base, [same, same]), same)
    # orthogonal task vectors: cos = 0 → t = 0 → the base
    ortho = [torch.tensor([1.0, 0, 0, 0], dtype=torch.float64), torch.tensor([0.0, 1, 0, 0], dtype=torch.float64)]
    torch.testing.assert_close(model_stock_merge(base, ortho), base)
    # k = 2, cos = 0.5 → t = 2·0.5 / (1 + 0.5) = 2/3
    c = [torch.tensor([1.0, 0], dtype=torch.float64), torch.tensor([0.5, math.sqrt(3) / 2], dtype=torch.float64)]
    expected = (2 / 3) * (c[0] + c[1]) / 2
    torch.testing.assert_close(model_stock_merge(torch.zeros(2, dtype=torch.float64), c), expected)


# ------------------------------------------------------------------ DARE / DELLA


def test_dare_keep_rate_and_l1_rescale():
    delta = tensors(shape=(200, 500))[0].float()
    for density in (0.1, 0.5, 0.9):
        kept = sparsify(delta, Trim(Sparsify.random, density, key=random_key(0, "w", 0)))
        n = delta.numel()
        rate = (kept != 0).float().mean().item()
        assert abs(rate - density) < 5 * math.sqrt(density * (1 - density) / n)  # 5 sigma
        rescaled = sparsify(delta, Trim(Sparsify.random, density, rescale=True, key=random_key(0, "w", 0)))
        # same mask, scaled so the L1 norm matches the dense task vector (mergekit semantics)
        assert torch.equal(rescaled != 0, kept != 0)
        torch.testing.assert_close(rescaled.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)


def test_random_masks_depend_only_on_seed_name_and_input():
    shape = torch.Size([64, 64])
    one = bernoulli_mask(0.5, shape, random_key(7, "model.layers.0.mlp.up_proj.weight", 1), "cpu")
    again = bernoulli_mask(0.5, shape, random_key(7, "model.layers.0.mlp.up_proj.weight", 1), "cpu")
    assert torch.equal(one, again)
    for other in (random_key(8, "model.layers.0.mlp.up_proj.weight", 1),
                  random_key(7, "model.layers.1.mlp.up_proj.weight", 1),
                  random_key(7, "model.layers.0.mlp.up_proj.weight", 2)):
        different = bernoulli_mask(0.5, shape, other, "cpu")
        agreement = (different == one).float().mean().item()
        assert 0.4 < agreement < 0.6  # independent streams agree ~50% of the time


def test_random_masks_do_not_depend_on_thread_count():
    key = random_key(3, "t", 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = bernoulli_mask(0.3, torch.Size([1 << 20]), key, "cpu")
        torch.set_num_threads(max(2, threads))
        multi = bernoulli_mask(0.3, torch.Size([1 << 20]), key, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_masks_identical_on_cuda():
    key = random_key(3, "t", 0)
    probability = torch.rand(1000, 300)
    cpu = bernoulli_mask(probability, probability.shape, key, "cpu")
    gpu = bernoulli_mask(probability.cuda(), probability.shape, key, "cuda")
    assert torch.equal(cpu, gpu.cpu())


def test_random_words_are_uniform():
    from evomerge.methods.random import random_words

    words = random_words(random_key(0, "u", 0), 0, 1 << 18, "cpu")
    counts = torch.bincount((words >> 28).flatten(), minlength=16).float()  # 16 buckets
    expected = words.numel() / 16
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 50  # 15 dof: p ≈ 1e-5 at 50


def test_della_keeps_large_magnitudes_more_often_and_preserves_l1():
    delta = tensors(shape=(400, 400))[0].float()
    kept = sparsify(delta, Trim(Sparsify.della, 0.5, rescale=True, epsilon=0.3, key=random_key(0, "d", 0)))
    rate = (kept != 0).float().mean().item()
    assert abs(rate - 0.5) < 0.01
    rank = della_rank(delta)
    high = (kept[rank > 0.9] != 0).float().mean().item()
    low = (kept[rank < 0.1] != 0).float().mean().item()
    assert high > 0.75 and low < 0.25  # keep probability runs from 0.2 to 0.8 with rank
    torch.testing.assert_close(kept.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("method,gamma", [(Sparsify.magnitude, 0.0), (Sparsify.magnitude_outliers, 0.05)])
def test_selection_without_sort_equals_stable_order_with_ties(method, gamma):
    g = torch.Generator().manual_seed(1)
    delta = torch.randint(-6, 7, (4000,), generator=g).float() / 4  # heavy magnitude ties
    position = magnitude_position(delta)
    for density in (0.1, 0.37, 0.5, 0.93):
        fast = sparsify(delta, Trim(method, density, gamma=gamma))
        sorted_ = sparsify(delta, Trim(method, density, gamma=gamma), TrimCache(position=position))
        assert torch.equal(fast, sorted_)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 3000), st.sampled_from([torch.float32, torch.bfloat16]),
       st.integers(1, 40))
def test_magnitude_position_is_the_stable_decreasing_magnitude_order(seed, numel, dtype, levels):
    """The CPU path (NumPy sort of key << 32 | index) equals torch's stable argsort: ties (few
    magnitude levels, signed zeros, bf16 rounding) by position."""
    g = torch.Generator().manual_seed(seed)
    delta = (torch.randint(-levels, levels + 1, (numel,), generator=g).float() / 7
             + torch.randn(numel, generator=g) * (seed % 2) * 1e-3).to(dtype)
    if numel:
        delta[torch.randint(0, numel, (numel // 5,), generator=g)] = -0.0
    order = torch.argsort(delta.float().abs(), descending=True, stable=True)
    expected = torch.empty(numel, dtype=torch.int32)
    expected[order] = torch.arange(numel, dtype=torch.int32)
    position = magnitude_position(delta)
    assert position.dtype == torch.int32 and torch.equal(position, expected)


def test_slerp_keeps_precision_on_large_tensors():
    """Tens of millions of elements: the cosine must not drift past the linear fallback."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(24_000_000, generator=g)
    b = 0.9987 * a + 0.051 * torch.randn(24_000_000, generator=g)  # cos ≈ 0.9987 < 0.9995
    a64, b64 = a.double(), b.double()
    cos = float((a64 @ b64) / (a64.norm() * b64.norm()))
    theta = math.acos(cos)
    expected = (math.sin(0.5 * theta) / math.sin(theta)) * (a64 + b64)
    merged = slerp_merge(0.5, a, b).double()
    linear_error = float((0.5 * (a64 + b64) - expected).abs().max())
    assert cos < 0.9995 and linear_error > 5e-4  # a linear fallback would fail below
    assert float((merged - expected).abs().max()) < 1e-4  # float32 coefficient rounding


# ------------------------------------------------------------------ caches and workspace


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so signed zeros and NaN payloads count)."""
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def test_keep_flags_on_cached_words_equal_bernoulli_mask(monkeypatch):
    """The materializer's DARE/DELLA mask (an integer threshold on cached stream words)
    is bernoulli_mask's, at edge densities, with thresholds exactly on a word, across
    chunk boundaries, and for a tensor of probabilities (DELLA)."""
    monkeypatch.setattr(random_module, "_CHUNK", 1000)
    shape = torch.Size([37, 101])
    key = random_key(5, "model.layers.3.mlp.down_proj.weight", 2)
    words = stream_words(key, shape.numel(), "cpu")
    assert words.dtype == torch.int32
    assert torch.equal(words.long() + 2**31, random_words(key, 0, shape.numel(), "cpu"))
    word = int(words[7]) + 2**31
    on_a_word = [word / 2**32, (word + 1) / 2**32, (word + 0.5) / 2**32, (word - 0.5) / 2**32]
    for density in [0.0, -0.1, 2**-40, 1e-9, 0.3, 0.5, 1 - 2**-33, 1 - 1e-12, 1.0, 1.2, *on_a_word]:
        expected = bernoulli_mask(density, shape, key, "cpu")
        assert torch.equal(keep_flags(density, words).view(shape), expected), density
    probability = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    flat = probability.view(-1)
    flat[:500] = ((words[:500].double() + 2**31) / 2**32).float()  # next to each word
    flat[500:505] = torch.tensor([0.0, 1.0, -0.5, 1.5, 2**-30])
    assert torch.equal(keep_flags(probability.view(-1), words).view(shape),
                       bernoulli_mask(probability, shape, key, "cpu"))


TASK_ARITHMETIC_VARIANTS = [  # (sparsification, consensus, rescale)
    (None, False, False), (Sparsify.magnitude, True, False), (Sparsify.magnitude, False, True),
    (Sparsify.magnitude_outliers, True, False), (Sparsify.random, True, True),
    (Sparsify.random, False, False), (Sparsify.della, True, True), (Sparsify.della, False, False),
]


def test_workspace_out_and_caches_change_no_bit():
    """One workspace reused across shapes and methods, results written into ``out`` and
    cached positions/ranks/words: the same bits as the call that allocates everything."""
    workspace = Workspace()
    weights = [0.5, -0.3, 0.8]
    for shape in [(40, 30), (7,), (100, 64), (3, 5)]:
        base, *sources = [t.float() for t in tensors(shape, seed=len(shape), n=4)]
        deltas = [s - base for s in sources]
        keys = [random_key(0, str(shape), i) for i in range(3)]
        caches = Caches([TrimCache(magnitude_position(d), della_rank(d), stream_words(k, base.numel(), "cpu"))
                         for d, k in zip(deltas, keys)], workspace)
        for method, consensus, rescale in TASK_ARITHMETIC_VARIANTS:
            trims = None if method is None else [Trim(method, density, rescale, gamma=0.05, epsilon=0.1, key=k)
                                                 for density, k in zip([0.3, 0.6, 1.0], keys)]
            options = dict(trims=trims, consensus=consensus, normalize=consensus, lam=0.9)
            expected = task_arithmetic_merge(base, deltas, weights, **options)
            out = torch.empty_like(base)
            merged = task_arithmetic_merge(base, task_vectors(base, sources, workspace), weights,
                                           **options, caches=caches, out=out)
            assert merged is out and torch.equal(bits(out), bits(expected)), (shape, method)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_kernels_with_workspace_and_out_change_no_bit(dtype):
    workspace = Workspace()
    for shape in [(40, 30), (7,), (1100, 1000)]:  # the last spans two of slerp's 1M chunks
        base, a, b = [t.to(dtype) for t in tensors(shape, seed=1, n=3)]
        for merge, args, options in [
            (slerp_merge, (0.3, base, a), {}), (slerp_merge, (0.7, base, base * 1.0001), {}),
            (linear_merge, ([base, a, b], [0.2, 0.5, 0.3]), {}),
            (model_stock_merge, (base, [a, b]), {}),
            (model_stock_merge, (base, [a, b]), {"filter_wise": True}),
        ]:
            expected = merge(*args, **options)
            out = torch.empty_like(expected)
            assert merge(*args, **options, workspace=workspace, out=out) is out
            assert torch.equal(bits(out), bits(expected)), (merge.__name__, shape)


@given(rows=st.integers(1, 6), seed=st.integers(0, 1000),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_sum_rows_order_and_signed_zeros(rows, seed, dtype):
    """float32/64: numpy's row-by-row reduction from +0, bit for bit (a quarter of the entries
    are ±0, whose sums flip sign with the order); up to three rows that is also torch.sum's.
    bfloat16: torch.sum (float32 accumulation)."""
    generator = torch.Generator().manual_seed(seed)
    stacked = torch.randn(rows, 777, generator=generator, dtype=torch.float64)
    zeros = torch.rand(rows, 777, generator=generator) < 0.25
    stacked[zeros] = torch.where(torch.rand(rows, 777, generator=generator) < 0.5, -0.0, 0.0).double()[zeros]
    stacked = stacked.to(dtype)
    bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[dtype]
    if dtype == torch.bfloat16:
        expected = torch.sum(stacked, dim=0)
    else:
        expected = torch.from_numpy(np.add.reduce(stacked.numpy(), axis=0, initial=0.0))
        if rows <= 3:
            assert torch.equal(torch.sum(stacked, dim=0).view(bits), expected.view(bits))
    assert torch.equal(sum_rows(stacked).view(bits), expected.view(bits))
    assert torch.equal(sum_rows(stacked, out=torch.full_like(expected, 9.0)).view(bits), expected.view(bits))


@settings(deadline=None, max_examples=40)
@given(method=st.sampled_from(list(Sparsify)), density=st.floats(0.05, 0.95), gamma=st.floats(0, 0.1),
       rescale=st.booleans(), numel=st.integers(1, 5000), block=st.integers(7, 1500), seed=st.integers(0, 99))
def test_sparsify_by_blocks_equals_the_whole_vector(method, density, gamma, rescale, numel, block, seed):
    """A task vector trimmed block by block (sliced caches, the whole vector's ``numel`` and its
    ``rescale_factor``) equals the same trim of the whole vector, bit for bit."""
    generator = torch.Generator().manual_seed(seed)
    base, source = torch.randn(2, numel, generator=generator)
    delta = source - base
    key = random_key(seed, "w", 1)
    cache = TrimCache(magnitude_position(delta), della_rank(delta), stream_words(key, numel, "cpu"))
    trim = Trim(method, density, rescale, gamma=gamma, epsilon=min(density, 1 - density) / 2, key=key)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_cpu, "BLOCK", block)
        whole = sparsify_(delta.clone(), trim, cache)
        scale = rescale_factor(source, base, trim, cache, Workspace())
    blocked = delta.clone()
    for start in range(0, numel, block):
        part = slice(start, start + block)
        sliced = dataclasses.replace(cache.block(part, numel), scale=scale if rescale else None)
        sparsify_(blocked[part], trim, sliced)
    assert torch.equal(blocked.view(torch.int32), whole.view(torch.int32))
