"""Atomic outputs everywhere (issue "Reliability").

A full disk is simulated by an injected OSError(ENOSPC) at three points of
`torch_utils.misc.atomic_open`: the first write, the fsync, the final os.replace. Every
writer must leave the previous file byte-identical, no temp file behind, and raise an
error naming the file it was writing.
"""

import errno
import os

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import distributed, misc, persistence

PREVIOUS = b'previous version, must survive'


class _FullDiskFile:
    """File proxy whose writes fail with ENOSPC once `budget` bytes were written."""

    def __init__(self, f, budget: int):
        self._f = f
        self._budget = budget

    def write(self, data):
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if size > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= size
        return self._f.write(data)

    def fileno(self):  # Force writers (PIL) through write() instead of the raw descriptor.
        raise OSError(errno.EBADF, 'no descriptor for this test file')

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(params=['write', 'fsync', 'replace'])
def full_disk(request, monkeypatch):
    """Returns a function that arms the injection (called right before the write under test)."""
    def arm():
        if request.param == 'write':
            real_fdopen = os.fdopen
            monkeypatch.setattr(misc.os, 'fdopen', lambda *a, **k: _FullDiskFile(real_fdopen(*a, **k), budget=0))
        elif request.param == 'fsync':
            real_fsync = os.fsync
            monkeypatch.setattr(misc.os, 'fsync', lambda fd: _enospc() if os.path.isfile(f'/proc/self/fd/{fd}')
                                or not os.path.exists('/proc/self/fd') else real_fsync(fd))
        else:
            monkeypatch.setattr(misc.os, 'replace', _enospc)
    return arm


def _check_previous_kept(path: str, write, arm) -> None:
    with open(path, 'wb') as f:
        f.write(PREVIOUS)
    arm()
    with pytest.raises(OSError) as info:
        write()
    assert info.value.errno == errno.ENOSPC
    assert os.path.basename(path) in str(info.value), str(info.value)  # The error names the file.
    with open(path, 'rb') as f:
        assert f.read() == PREVIOUS
    leftovers = [name for name in os.listdir(os.path.dirname(path)) if '.tmp' in name or name.startswith('tmp')]
    assert leftovers == []


def _tiny_net():
    from tests import tiny
    return tiny.make_tiny_precond()

#----------------------------------------------------------------------------


def test_network_pickle(tmp_path, full_disk):
    # Snapshots (train_status.save_snapshots) and reconstructed pickles (phema_reconstruct) use save_pickle.
    path = str(tmp_path / 'network-snapshot-0000001.pkl')
    _check_previous_kept(path, lambda: persistence.save_pickle(dnnlib.EasyDict(ema=_tiny_net()), path), full_disk)


def test_training_checkpoint(tmp_path, full_disk):
    path = str(tmp_path / 'training-state-0000001.pt')
    net = torch.nn.Linear(2, 2)
    io = distributed.CheckpointIO(net=net, state=dnnlib.EasyDict(cur_nimg=5))
    _check_previous_kept(path, lambda: io.save(path, verbose=False), full_disk)


def test_generated_png(tmp_path, full_disk):
    from training.sampling import generate_images as sampling
    path = str(tmp_path / '000000.png')
    image = np.full([8, 8, 3], 200, np.uint8)
    _check_previous_kept(path, lambda: sampling.save_png(image, path), full_disk)


def test_image_grid(tmp_path, full_disk):
    from training.sampling import generate_images as sampling
    path = str(tmp_path / 'grid.png')
    images = torch.zeros([4, 3, 8, 8], dtype=torch.uint8)
    _check_previous_kept(path, lambda: sampling.save_image_grid(images, path), full_disk)


def test_scores_csv(tmp_path, full_disk):
    from training.evaluation import score_dataset as scoring
    path = str(tmp_path / 'results_1.csv')
    _check_previous_kept(path, lambda: scoring.write_scores_csv({'a.png': 5.0}, path, 'nima'), full_disk)


@pytest.mark.parametrize('ext', ['.pkl', '.npz'])
def test_reference_stats(tmp_path, full_disk, ext):
    from training.evaluation import calculate_metrics as metrics
    path = str(tmp_path / f'ref{ext}')
    stats = {'fid': dict(mu=np.zeros(4), sigma=np.eye(4))}
    _check_previous_kept(path, lambda: metrics.save_stats(stats, path), full_disk)


def test_training_options_json(tmp_path, full_disk):
    # _write_options keeps an existing file (resume), so the failing write is the first one.
    from training.loop import train_edm2 as train_config
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    full_disk()
    with pytest.raises(OSError) as info:
        train_config._write_options(str(run_dir), dict(batch_size=2))
    assert 'training_options.json' in str(info.value)
    assert os.listdir(run_dir) == []


def test_node_cache_copy(tmp_path, full_disk):
    from training.data_tools import node_cache as data_cache
    src = tmp_path / 'src.zip'
    src.write_bytes(b'z' * 1000)
    path = str(tmp_path / 'cache.zip')
    _check_previous_kept(path, lambda: data_cache.copy_file(str(src), path, verbose=False), full_disk)


def test_dataset_tool_zip(tmp_path, full_disk):
    from training.data_tools import dataset_tool as dataset_tool_lib

    def write():
        with dataset_tool_lib.DestWriter(path) as dest:
            dest.write('00000/img00000000.png', b'x' * 100)
    path = str(tmp_path / 'out.zip')
    _check_previous_kept(path, write, full_disk)


def test_toy_figure(tmp_path, full_disk):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from training import toy
    fig = plt.figure(figsize=(1, 1))
    path = str(tmp_path / 'toy.png')
    try:
        _check_previous_kept(path, lambda: toy.save_figure(fig, path), full_disk)
    finally:
        plt.close(fig)


def test_generate_images_cli_reports_full_disk(tmp_path, monkeypatch):
    """End to end: the CLI exits 1 with one line naming the PNG; images written before stay."""
    from click.testing import CliRunner

    import generate_images
    from tests import tiny
    net = str(tmp_path / 'net.pkl')
    tiny.write_tiny_snapshot(net)
    outdir = tmp_path / 'out'
    outdir.mkdir()
    (outdir / '000001.png').write_bytes(PREVIOUS)
    monkeypatch.setattr(misc.os, 'replace', _enospc)
    result = CliRunner().invoke(generate_images.cmdline, [f'--net={net}', f'--outdir={outdir}', '--seeds=0-1',
                                                          '--steps=2', '--device=cpu', '--batch=2'])
    assert result.exit_code == 1, result.output
    assert 'No space left on device' in result.output and '00000' in result.output
    assert (outdir / '000001.png').read_bytes() == PREVIOUS
    assert sorted(os.listdir(outdir)) == ['000001.png']


def test_download_cache_full_disk_leaves_nothing(tmp_path, monkeypatch):
    """A download that fails to write (ENOSPC) leaves no partial file in the cache and ends at
    once with DownloadError naming the URL, the cause and the cache path."""
    import requests

    class _Response:
        headers = {'Content-Length': '8'}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def raise_for_status(self):
            pass

        def iter_content(self, _size):
            yield b'12345678'

    attempts = []
    monkeypatch.setattr(requests.Session, 'get', lambda *a, **k: attempts.append(1) or _Response())
    real_open = open

    def full_open(path, mode='r', *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return _FullDiskFile(f, budget=0) if 'w' in mode and str(tmp_path) in str(path) else f
    monkeypatch.setattr('builtins.open', full_open)
    with pytest.raises(dnnlib.util.DownloadError) as info:
        dnnlib.util.open_url('https://example.invalid/net.pkl', cache_dir=str(tmp_path), verbose=False)
    assert 'https://example.invalid/net.pkl' in str(info.value) and str(tmp_path) in str(info.value)
    assert 'No space left on device' in str(info.value)
    assert len(attempts) == 1  # A full disk is not retried 10 times with back-off.
    assert os.listdir(tmp_path) == []
