"""Suite-wide isolation: CLIs invoked in-process may start a (single-process) process group, set the
torchrun variables and leave training statistics behind; undo all three after every test so that tests
do not depend on their order."""
import os

import pytest
import torch

from torch_utils import training_stats

if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)  # one pytest worker per core: more threads per worker only contend

_DIST_VARS = ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE')


@pytest.fixture(autouse=True)
def _isolate_process_group():
    saved = {name: os.environ.get(name) for name in _DIST_VARS}
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    training_stats.reset()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope='session')
def cache_root(tmp_path_factory):
    """Download and torch.hub caches seeded with small stand-in detector weights (built once per run)."""
    from tests import detector_standins
    return detector_standins.shared_standin_cache(tmp_path_factory)


@pytest.fixture
def cache(cache_root, monkeypatch):
    """Point DNNLIB_CACHE_DIR / torch.hub at the stand-ins; one thread for the small detectors."""
    from tests import detector_standins
    from training.evaluation import detectors
    detector_standins.use_cache(monkeypatch, cache_root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield cache_root
    torch.set_num_threads(threads)
    detectors.clear_detector_cache()


@pytest.fixture(params=['write', 'fsync', 'replace'])
def full_disk(request, monkeypatch):
    """A function that arms a full disk (ENOSPC) at one point of misc.atomic_open: the first write, the
    fsync or the final os.replace (tests/faults.py); call it right before the write under test."""
    from tests import faults
    return faults.full_disk_arm(request.param, monkeypatch)
