"""Injected faults (docs/reliability.md) for training/evaluation/calculate_metrics.py: a full disk under the
statistics writer, bad and hostile statistics files.

Kept apart from tests/training/evaluation/test_calculate_metrics.py, which holds this module's other tests."""

import os
import re

import numpy as np
import pytest

from tests import faults
from training.evaluation import calculate_metrics as metrics


@pytest.fixture(scope='module')
def bad_pickles(tmp_path_factory):
    return faults.write_bad_pickles(tmp_path_factory.mktemp('pickles'))


@pytest.mark.reliability
@pytest.mark.parametrize('ext', ['.pkl', '.npz'])
def test_reference_stats_full_disk(tmp_path, full_disk, ext):
    path = str(tmp_path / f'ref{ext}')
    stats = {'fid': dict(mu=np.zeros(4), sigma=np.eye(4))}
    faults.check_previous_kept(path, lambda: metrics.save_stats(stats, path), full_disk)


@pytest.mark.reliability
@pytest.mark.parametrize('kind', ['hostile', 'truncated', 'wrong_type', 'torch_save', 'text'])
def test_reference_stats_refuse_bad_files(bad_pickles, kind):
    with pytest.raises(metrics.MetricsError) as info:
        metrics.load_stats(bad_pickles[kind], verbose=False)
    assert bad_pickles[kind] in str(info.value) and '\n' not in str(info.value)
    assert not os.path.exists(bad_pickles['marker'])


@pytest.mark.reliability
def test_reference_stats_npz_with_objects_is_refused(tmp_path):
    path = str(tmp_path / 'ref.npz')
    np.savez(path, mu=np.array([object()], dtype=object), sigma=np.eye(2))
    with pytest.raises(metrics.MetricsError, match=f'^{re.escape(path)}: ') as info:
        metrics.load_stats(path, verbose=False)
    assert '\n' not in str(info.value)
