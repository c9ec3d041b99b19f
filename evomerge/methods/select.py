"""Exact magnitude cuts without a sort and without a per-element cache.

A magnitude trim keeps a range ``[start, stop)`` of the stable decreasing-``|delta|`` order
(ties broken by position). The cached path precomputes every element's position in that
order once (:func:`~evomerge.methods.sparsify.magnitude_position`, a sort, 4 bytes per
element kept for the whole search); this module finds the same set per trim, from the task
vector alone, in a few passes over one tensor of keys and O(tensor) scratch:

* **Keys.** A non-negative float's bit pattern, read as a signed integer of its width, orders
  like its value (NaN above +inf), and equal values have equal bits (``abs`` makes -0 +0). So
  the keys are ``|delta|`` viewed as int32 (float32) or int16 (bfloat16, float16): the same
  order and the same ties as the cached path's float32 bits of ``|delta|``, since widening a
  16-bit float to float32 is exact and monotone. Other dtypes are rounded to float32 first,
  as the cached path does (:func:`magnitude_keys`).
* **A cut.** "The first ``c`` positions of the order" is ``{key > t}`` plus the first ``m``
  elements, by index, of ``{key == t}``, where ``t`` is the ``c``-th largest key and
  ``m = c - #{key > t}``. A :class:`Cut` stores ``t`` and the index one past the ``m``-th
  tied element, so the test of one element needs only its key and its index
  (:meth:`Cut.within`): a blocked kernel applies it to each block, given the block's offset.
* **Finding t** (:func:`magnitude_cut`): a fixed sample of the keys (a Weyl sequence of
  indices, so it does not align with rows) is sorted, and its keys at the ranks around
  ``c·s/n`` bracket ``t`` with near certainty. One pass counts the keys above the bracket
  and in it; when the ``c``-th largest falls inside, the bracket's keys (a few percent of
  the tensor) are gathered and ``t`` is a k-th value among them; otherwise (a sample that
  missed, or a tensor too small to sample) the bracket is the whole tensor. ``t`` is exact
  either way; only the work depends on the sample.
* **The tie cut**: none when the cut keeps every tied key (counted among the gathered ones);
  else the tied keys counted per block, then their positions inside the one block where
  the ``m``-th falls.

Every step is a plain torch op, so the same code runs on CUDA tensors; no step depends on
the thread count or the device, so a cut equals the cached path's kept range bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_KEY_DTYPES = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_SAMPLE = 1 << 14  # keys sampled to bracket the cut (the bracket: ~8/sqrt(s) = 6% of a tensor)
_MARGIN = 4 * math.isqrt(_SAMPLE) + 1  # sample ranks each side of the cut's expected rank
_TIE_BLOCK = 1 << 18  # elements per block when locating the tie cut
_GOLDEN = (math.sqrt(5) - 1) / 2


def key_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of :func:`magnitude_keys` of a tensor of ``dtype``."""
    return _KEY_DTYPES.get(dtype, torch.int32)


def magnitude_keys(delta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Integers ordered like ``|delta|``, with the cached path's ties (see the module docstring):
    ``|delta|`` written into ``out`` (like ``delta``; default: a new tensor) and viewed as
    int32 or int16; for other dtypes, ``|delta|`` rounded to float32, viewed as int32."""
    key_dtype = _KEY_DTYPES.get(delta.dtype)
    if key_dtype is None:
        return delta.abs().float().view(torch.int32)
    return torch.abs(delta, out=out).view(key_dtype)


@dataclass(frozen=True)
class Cut:
    """The first ``count`` positions of the stable decreasing-key order of some keys: an
    element at (global) index ``j`` with key ``k`` is in it iff ``k > key``, or ``k == key``
    and ``j < index``. ``key = -1``: every element; ``key`` = the largest key and
    ``index = 0``: none (keys are non-negative)."""

    key: int
    index: int

    def within(self, keys: torch.Tensor, offset: int, out: torch.Tensor) -> torch.Tensor:
        """Write into ``out`` (flat, like ``keys``; bool, or 1/0 in a float dtype) whether each
        of ``keys`` (flat, the elements ``offset ..`` of the keys the cut was found in) is in
        the cut; return ``out``."""
        torch.gt(keys, self.key, out=out)
        tied = min(max(self.index - offset, 0), keys.numel())
        if tied:
            torch.ge(keys[:tied], self.key, out=out[:tied])
        return out


def magnitude_cut(keys: torch.Tensor, count: int) -> Cut:
    """The :class:`Cut` of the first ``count`` positions of the stable decreasing order of
    ``keys`` (flat, non-negative integers, e.g. :func:`magnitude_keys`)."""
    numel = keys.numel()
    if count >= numel:
        return Cut(-1, 0)
    if count <= 0:
        return Cut(torch.iinfo(keys.dtype).max, 0)
    high, low = _bracket(keys, count)
    above = int(torch.count_nonzero(torch.gt(keys, high)))
    inside = torch.ge(keys, low).logical_and_(torch.le(keys, high))
    size = int(torch.count_nonzero(inside))
    if above < count <= above + size:
        candidates, rank = keys[inside], count - above
    else:  # the sample missed: select among all keys
        candidates, rank, above, size = keys, count, 0, numel
    threshold = torch.kthvalue(candidates, size - rank + 1).values
    above += int(torch.count_nonzero(torch.gt(candidates, threshold)))
    # every tied key is a candidate: when the cut keeps them all, no pass locates it
    if int(torch.count_nonzero(torch.eq(candidates, threshold))) == count - above:
        return Cut(int(threshold), numel)
    return Cut(int(threshold), _tie_index(torch.eq(keys, threshold), count - above))


def _bracket(keys: torch.Tensor, count: int) -> tuple[int, int]:
    """Keys ``(high, low)`` that likely bracket the ``count``-th largest key; for a tensor too
    small to sample, the whole range."""
    numel = keys.numel()
    if numel <= 16 * _SAMPLE:
        return torch.iinfo(keys.dtype).max, 0
    stride = int(numel * _GOLDEN) | 1
    index = torch.arange(_SAMPLE, dtype=torch.int64, device=keys.device).mul_(stride).remainder_(numel)
    sample = torch.sort(keys[index], descending=True).values
    rank = count * _SAMPLE // numel
    return int(sample[max(rank - _MARGIN, 0)]), int(sample[min(rank + _MARGIN, _SAMPLE - 1)])


def _tie_index(tied: torch.Tensor, wanted: int) -> int:
    """The index one past the ``wanted``-th True of flat ``tied`` (``wanted >= 1``)."""
    # count_nonzero per block is several times faster on CPU than a (bool → int) sum by rows
    reached = torch.cumsum(torch.stack([torch.count_nonzero(part) for part in tied.split(_TIE_BLOCK)]), 0)
    block = int(torch.searchsorted(reached, wanted))
    before = int(reached[block - 1]) if block else 0
    start = block * _TIE_BLOCK
    positions = torch.nonzero(tied[start:start + _TIE_BLOCK]).reshape(-1)
    return start + int(positions[wanted - before - 1]) + 1


class StreamedCut:
    """The :class:`Cut` of the first ``count`` positions of the stable decreasing order of
    ``numel`` keys (flat, non-negative, of dtype ``key_dtype``) seen block by block, with no
    scratch beyond one block: what a row-blocked kernel uses when no block may hold the
    whole tensor's keys.

    * **The threshold** ``t`` (the ``count``-th largest key) by a radix select over the keys'
      bits: :attr:`passes` passes over all the blocks (any order), each :meth:`add`-ing every
      block's keys to a histogram of 16 bits, then :meth:`end_pass`: one pass for 16-bit keys,
      two (high, then low 16 bits among the keys of the chosen high half) for 32-bit ones;
      none when ``count`` keeps none or all of them.
    * **The tie cut** in index order: :meth:`cut` of each block, given in index order from
      the first block on (:meth:`rewind` restarts the scan), is a Cut valid for that block
      that keeps its first tied keys while fewer than ``m = count − #{key > t}`` were kept.

    Every step is an integer count, so the cut equals :func:`magnitude_cut`'s on the whole
    keys exactly, on any device.
    """

    def __init__(self, count: int, numel: int, key_dtype: torch.dtype):
        self.count = count
        self._wide = key_dtype == torch.int32
        self._max = torch.iinfo(key_dtype).max
        trivial = count <= 0 or count >= numel
        self.passes = 0 if trivial else 2 if self._wide else 1
        self._trivial = Cut(-1, 0) if count >= numel else Cut(self._max, 0)
        self._pass = 0
        self._histogram: torch.Tensor | None = None
        self._high = 0  # the chosen high half (32-bit keys, after the first pass)
        self._wanted = count  # the rank of t among the keys the current pass counts
        self._above = 0  # keys known above t's candidates
        self._threshold: int | None = None
        self._ties = self._tied = self._remaining = 0  # tied keys: in all, and in the blocks not yet scanned

    def add(self, keys: torch.Tensor) -> None:
        """Count one block's keys (flat) in this pass's histogram."""
        if self._wide and self._pass == 0:
            digits, bins = torch.bitwise_right_shift(keys, 16), 1 << 15
        elif self._wide:
            inside = keys[torch.eq(torch.bitwise_right_shift(keys, 16), self._high)]
            digits, bins = inside.bitwise_and_(0xFFFF), 1 << 16
        else:
            digits, bins = keys, 1 << 15
        counts = torch.bincount(digits.to(torch.int32), minlength=bins)
        self._histogram = counts if self._histogram is None else self._histogram.add_(counts)

    def end_pass(self) -> None:
        """Choose this pass's digit of ``t`` from the histogram of every block."""
        histogram = self._histogram
        self._histogram = None
        at_least = torch.flip(torch.cumsum(torch.flip(histogram.cpu(), (0,)), 0), (0,))  # #{digit >= v}
        digit = int(torch.nonzero(at_least >= self._wanted).max())
        above = int(at_least[digit]) - int(histogram[digit])
        self._above += above
        self._wanted -= above
        self._pass += 1
        if self._wide and self._pass == 1:
            self._high = digit
            return
        self._threshold = (self._high << 16 | digit) if self._wide else digit
        self._ties = int(histogram[digit])
        self.rewind()

    def rewind(self) -> None:
        """Restart the tie cut's scan at the first block."""
        self._remaining, self._tied = self.count - self._above, self._ties

    @property
    def scans(self) -> bool:
        """Whether :meth:`cut` of the next block reads its keys (else they may be None)."""
        return self.passes > 0 and 0 < self._remaining < self._tied

    def cut(self, keys: torch.Tensor | None, offset: int, numel: int) -> Cut:
        """The cut within the next block in index order (flat ``keys``, the ``numel``
        elements ``offset ..`` of all of them; None unless :attr:`scans`), after every pass."""
        if self.passes == 0:
            return self._trivial
        if not self.scans:  # every tied key left is kept, or none
            return Cut(self._threshold, offset + numel if self._remaining > 0 else 0)
        tied = torch.eq(keys, self._threshold)
        here = int(torch.count_nonzero(tied))
        if here <= self._remaining:
            self._remaining -= here
            self._tied -= here
            return Cut(self._threshold, offset + numel)
        position = int(torch.nonzero(tied).reshape(-1)[self._remaining - 1])
        self._tied -= here
        self._remaining = 0
        return Cut(self._threshold, offset + position + 1)
