"""Cheap scalar statistics, averaged over time, devices and processes (docs/formats.md#statsjsonl).

Anywhere in the code, `report(name, value)` adds the moments [count, sum, sum of
squares] of the finite elements of `value` into a per-device counter. A
`Collector` later sums the counters (all-reducing them across processes) and
turns the increments since its previous `update()` into num / mean / std.
"""

import re
from typing import Any, Optional

import numpy as np
import torch

import dnnlib

from . import misc

#----------------------------------------------------------------------------

_num_moments = 3  # [num_scalars, sum_of_scalars, sum_of_squares]
_reduce_dtype = torch.float32  # Per-tensor reduction.
_counter_dtype = torch.float64  # Accumulated counters.
_rank = 0  # Rank of this process.
_sync_device: Optional[torch.device] = None  # Device for cross-process sums; None = CPU.
_sync_called = False  # Has _sync() run yet?
_counters: dict = {}  # name -> device -> moments tensor, in registration order.
_cumulative: dict = {}  # name -> cumulative moments on CPU.

#----------------------------------------------------------------------------


def init_multiprocessing(rank: int, sync_device: Optional[torch.device]) -> None:
    """Set this process's rank and the device used for all-reduce; call before the first sync."""
    global _rank, _sync_device
    assert not _sync_called, 'training_stats.init_multiprocessing() must be called before the first sync'
    _rank = rank
    _sync_device = sync_device


@misc.profiled_function
def report(name: str, value: Any) -> Any:
    """Accumulate the finite elements of `value` under `name`; return `value` unchanged.

    Moments added: [n, Σx, Σx²] over elements whose square is finite (NaN/Inf are ignored).
    The name is registered even when `value` is empty.
    """
    if name not in _counters:
        _counters[name] = {}
    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value
    elems = elems.detach().flatten().to(_reduce_dtype)
    square = elems.square()
    finite = square.isfinite()
    moments = torch.stack([
        finite.sum(dtype=_reduce_dtype),
        torch.where(finite, elems, 0).sum(),
        torch.where(finite, square, 0).sum(),
    ]).to(_counter_dtype)
    device_counters = _counters[name]
    if moments.device not in device_counters:
        device_counters[moments.device] = torch.zeros_like(moments)
    device_counters[moments.device].add_(moments)
    return value


def report0(name: str, value: Any) -> Any:
    """`report` on rank 0; other ranks only register the name (empty value)."""
    report(name, value if _rank == 0 else [])
    return value


#----------------------------------------------------------------------------


class Collector:
    """Reads the counters of the names matching `regex` and exposes per-interval statistics."""

    def __init__(self, regex: str = '.*', keep_previous: bool = False):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative: dict = {}  # name -> cumulative moments seen at this collector's last update.
        self._moments: dict = {}  # name -> moments of the last interval.
        self.update()
        self._moments.clear()

    def names(self) -> list:
        """Registered names that fully match the regex, in registration order."""
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self) -> None:
        """Collective: sum counters across devices/processes and store the increments since last update."""
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
            delta = cumulative - self._cumulative[name]
            self._cumulative[name].copy_(cumulative)
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def _get_delta(self, name: str) -> torch.Tensor:
        assert self._regex.fullmatch(name), f"'{name}' does not match the collector's regex"
        if name not in self._moments:
            self._moments[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        return self._moments[name]

    def num(self, name: str) -> int:
        """Number of finite scalars reported under `name` during the last interval."""
        return int(self._get_delta(name)[0])

    def mean(self, name: str) -> float:
        """Mean of the last interval; NaN without data."""
        delta = self._get_delta(name)
        if int(delta[0]) == 0:
            return float('nan')
        return float(delta[1] / delta[0])

    def std(self, name: str) -> float:
        """Standard deviation of the last interval: sqrt(max(E[x²] − E[x]², 0)); 0 for one value."""
        delta = self._get_delta(name)
        if int(delta[0]) == 0 or not np.isfinite(float(delta[1])):
            return float('nan')
        if int(delta[0]) == 1:
            return 0.0
        mean = float(delta[1] / delta[0])
        raw_var = float(delta[2] / delta[0])
        return float(np.sqrt(max(raw_var - mean * mean, 0.0)))

    def as_dict(self) -> dnnlib.EasyDict:
        """EasyDict(name -> EasyDict(num, mean, std)) for every selected name."""
        stats = dnnlib.EasyDict()
        for name in self.names():
            stats[name] = dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
        return stats

    def __getitem__(self, name: str) -> float:
        return self.mean(name)


#----------------------------------------------------------------------------


def _multi_process() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _check_names_consistent(names: list, device: torch.device) -> None:
    """All ranks must report the same names in the same order; every rank raises on mismatch."""
    value = hash(tuple(tuple(ord(char) for char in name) for name in names)) % (1 << 62)
    extremes = torch.tensor([value, -value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
    if int(extremes[0]) != value or int(extremes[1]) != -value:  # max(h) == min(h) on every rank.
        raise ValueError('Training statistics are inconsistent between ranks')


def _sync(names: list) -> list:
    """Sum (and zero) the device counters of `names`, all-reduce, add into the cumulative totals."""
    global _sync_called
    if len(names) == 0:
        return []
    _sync_called = True
    device = _sync_device if _sync_device is not None else torch.device('cpu')
    multi = _multi_process()
    if multi:
        _check_names_consistent(names, device)

    deltas = []
    for name in names:
        delta = torch.zeros([_num_moments], dtype=_counter_dtype, device=device)
        for counter in _counters[name].values():
            delta.add_(counter.to(device))
            counter.zero_()
        deltas.append(delta)
    deltas = torch.stack(deltas)
    if multi:
        torch.distributed.all_reduce(deltas)

    deltas = deltas.cpu()
    for idx, name in enumerate(names):
        if name not in _cumulative:
            _cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        _cumulative[name].add_(deltas[idx])
    return [(name, _cumulative[name]) for name in names]


#----------------------------------------------------------------------------

default_collector = Collector()

#----------------------------------------------------------------------------


def reset() -> None:
    """Forget every statistic and the sync state, as in a fresh process (tests, notebooks running two jobs).

    Collectors other than `default_collector` keep their own totals and must be recreated afterwards.
    """
    global _sync_called
    _sync_called = False
    _counters.clear()
    _cumulative.clear()
    default_collector._cumulative.clear()
    default_collector._moments.clear()
