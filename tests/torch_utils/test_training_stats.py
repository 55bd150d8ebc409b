"""Tests for torch_utils.training_stats (single process; the 2-rank case is in test_distributed.py)."""

import math

import numpy as np
import pytest
import torch

from torch_utils import training_stats as ts


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each test starts with empty module state (counters, cumulative totals, rank 0)."""
    monkeypatch.setattr(ts, '_counters', {})
    monkeypatch.setattr(ts, '_cumulative', {})
    monkeypatch.setattr(ts, '_rank', 0)
    monkeypatch.setattr(ts, '_sync_device', None)
    monkeypatch.setattr(ts, '_sync_called', False)


def test_report_returns_value_and_collects_moments():
    collector = ts.Collector(regex='Loss/.*')
    values = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert ts.report('Loss/a', values) is values
    ts.report('Loss/a', 4.0)
    collector.update()
    data = np.array([1, 2, 3, 6, 4], dtype=np.float64)
    assert collector.num('Loss/a') == 5
    assert collector.mean('Loss/a') == pytest.approx(data.mean())
    assert collector.std('Loss/a') == pytest.approx(data.std())
    assert collector['Loss/a'] == pytest.approx(data.mean())


def test_non_finite_values_are_ignored():
    collector = ts.Collector()
    ts.report('x', [1.0, float('nan'), 3.0, float('inf'), -float('inf')])
    collector.update()
    assert collector.num('x') == 2 and collector.mean('x') == pytest.approx(2.0)


def test_empty_report_registers_name_without_data():
    ts.report('empty', [])
    collector = ts.Collector()
    assert collector.names() == ['empty']
    collector.update()
    assert collector.num('empty') == 0 and math.isnan(collector.mean('empty')) and math.isnan(collector.std('empty'))


def test_single_value_has_zero_std():
    collector = ts.Collector()
    ts.report('one', 5.0)
    collector.update()
    assert collector.std('one') == 0.0


def test_collector_sees_only_new_data_and_regex_order():
    ts.report('b/first', 1.0)
    collector = ts.Collector(regex='b/.*')  # Data reported before construction is not counted.
    ts.report('a/other', 9.0)
    ts.report('b/second', 2.0)
    ts.report('b/first', 3.0)
    assert collector.names() == ['b/first', 'b/second']
    collector.update()
    assert collector.num('b/first') == 1 and collector.mean('b/first') == 3.0
    with pytest.raises(AssertionError):
        collector.num('a/other')


def test_keep_previous_semantics():
    plain, keeping = ts.Collector(), ts.Collector(keep_previous=True)
    ts.report('k', [2.0, 4.0])
    plain.update()
    keeping.update()
    ts.report('other', 1.0)  # Interval with no data for "k".
    plain.update()
    keeping.update()
    assert plain.num('k') == 0 and math.isnan(plain.mean('k'))
    assert keeping.num('k') == 2 and keeping.mean('k') == 3.0


def test_independent_collectors_and_as_dict():
    first, second = ts.Collector(), ts.Collector()
    ts.report('v', 1.0)
    first.update()
    ts.report('v', 3.0)
    first.update()
    second.update()
    assert first.mean('v') == 3.0 and second.mean('v') == 2.0 and second.num('v') == 2
    stats = second.as_dict()
    assert stats.v.num == 2 and stats.v.mean == 2.0 and stats.v.std == pytest.approx(1.0)


def test_report0_only_counts_on_rank_zero(monkeypatch):
    collector = ts.Collector()
    ts.report0('r0', 7.0)
    monkeypatch.setattr(ts, '_rank', 1)
    assert ts.report0('r1', 7.0) == 7.0
    collector.update()
    assert collector.num('r0') == 1 and collector.num('r1') == 0 and 'r1' in collector.names()


def test_float64_counters_and_float32_reduction():
    collector = ts.Collector()
    ts.report('big', torch.full([1000], 0.1, dtype=torch.float64))
    collector.update()
    assert collector.mean('big') == pytest.approx(0.1, rel=1e-6)
    assert ts._cumulative['big'].dtype == torch.float64


def test_init_multiprocessing_must_precede_first_sync():
    ts.init_multiprocessing(rank=0, sync_device=None)
    ts.report('s', 1.0)
    ts.Collector().update()
    with pytest.raises(AssertionError):
        ts.init_multiprocessing(rank=0, sync_device=None)


def test_default_collector_selects_every_name_and_only_the_last_interval():
    ts.reset()
    ts.report('Default/a', 1.0)
    ts.report('Other/b', [2.0, 4.0])
    collector = ts.default_collector
    collector.update()
    assert collector.names() == ['Default/a', 'Other/b']  # regex '.*'
    assert collector.as_dict() == {'Default/a': dict(num=1, mean=1.0, std=0.0), 'Other/b': dict(num=2, mean=3.0, std=1.0)}
    collector.update()  # keep_previous=False: an interval without reports has no data.
    assert collector.num('Other/b') == 0 and math.isnan(collector.mean('Other/b'))


def test_reset_forgets_everything():
    ts.reset()
    ts.report('Reset/x', torch.tensor([1.0, 3.0]))
    ts.default_collector.update()
    assert ts.default_collector.mean('Reset/x') == 2.0
    ts.reset()
    assert 'Reset/x' not in ts.default_collector.names()
    ts.init_multiprocessing(rank=0, sync_device=None) # allowed again after a reset
    ts.report('Reset/x', torch.tensor([5.0]))
    ts.default_collector.update()
    assert ts.default_collector.mean('Reset/x') == 5.0
