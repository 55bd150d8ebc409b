"""Dataset read throughput over simulated slow storage: uncached, node-cached and RAM-cached.

The storage is simulated by an `open()` replacement that sleeps LATENCY per open and size/BANDWIDTH per
read (defaults: 5 ms, 20 MB/s, like a busy network filesystem). Every scenario reads the whole dataset
once in a shuffled order, as one training epoch would, in this process, and prints images/s.

    python bench/dataset.py [--images 300] [--resolution 128] [--bandwidth-mb 20] [--latency-ms 5]
"""

import os
import sys
import tempfile
import time
import zipfile

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.data_tools import node_cache as data_cache  # noqa: E402
from training.dataset import ImageFolderDataset  # noqa: E402
from training.data_tools.dataset_tool import archive_name, encode_png  # noqa: E402

#----------------------------------------------------------------------------


class ThrottledFile:
    """File wrapper whose reads take size / bandwidth seconds."""

    def __init__(self, f, bandwidth: float):
        self._f = f
        self._bandwidth = bandwidth

    def read(self, n=-1):
        data = self._f.read(n)
        time.sleep(len(data) / self._bandwidth)
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class ThrottledOpener:
    """open() replacement for the simulated storage (picklable, for DataLoader workers)."""

    def __init__(self, bandwidth: float, latency: float):
        self.bandwidth = bandwidth
        self.latency = latency

    def __call__(self, path, mode='rb'):
        time.sleep(self.latency)
        return ThrottledFile(open(path, mode), self.bandwidth)


class ReopeningZipDataset(ImageFolderDataset):
    """The pattern to avoid: a new ZipFile (open + central directory read) for every image."""

    def _open_file(self, fname):
        if self._type == 'zip':
            self._zipfile = None
        return super()._open_file(fname)

#----------------------------------------------------------------------------


def make_dataset(root: str, num_images: int, resolution: int) -> tuple:
    """The same PNG images as a folder and as an uncompressed zip."""
    rng = np.random.default_rng(0)
    folder, zip_path = os.path.join(root, 'images'), os.path.join(root, 'images.zip')
    with zipfile.ZipFile(zip_path, 'w', compression=zipfile.ZIP_STORED) as z:
        for idx in range(num_images):
            data = encode_png(rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8))
            name = archive_name(idx, 'img', '.png')
            z.writestr(name, data)
            os.makedirs(os.path.join(folder, os.path.dirname(name)), exist_ok=True)
            with open(os.path.join(folder, name), 'wb') as f:
                f.write(data)
    return folder, zip_path


def epoch(dataset, seed: int = 0) -> float:
    """Images/s of one pass in shuffled order."""
    order = np.random.default_rng(seed).permutation(len(dataset))
    start = time.perf_counter()
    for idx in order:
        dataset[int(idx)]
    return len(order) / (time.perf_counter() - start)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start

#----------------------------------------------------------------------------


@click.command()
@click.option('--images', help='Number of images', type=click.IntRange(min=1), default=300, show_default=True)
@click.option('--resolution', help='Image size (RGB PNG, stored)', type=click.IntRange(min=8), default=128, show_default=True)
@click.option('--bandwidth-mb', help='Simulated storage bandwidth in MB/s', type=float, default=20, show_default=True)
@click.option('--latency-ms', help='Simulated latency per open in ms', type=float, default=5, show_default=True)
def main(images, resolution, bandwidth_mb, latency_ms):
    """Images/s reading a dataset from slow storage: uncached, node-cached, RAM-cached."""
    opener = ThrottledOpener(bandwidth_mb * 1e6, latency_ms * 1e-3)
    with tempfile.TemporaryDirectory() as root:
        folder, zip_path = make_dataset(root, images, resolution)
        size_mb = os.path.getsize(zip_path) / 1e6
        print(f'{images} images {resolution}x{resolution}, zip {size_mb:.1f} MB; storage {bandwidth_mb:g} MB/s, '
              f'{latency_ms:g} ms per open')
        kwargs = dict(use_labels=False, opener=opener)
        rows = [('folder, uncached (open per image)', epoch(ImageFolderDataset(folder, **kwargs))),
                ('zip, uncached, ZipFile reopened per image', epoch(ReopeningZipDataset(zip_path, **kwargs))),
                ('zip, uncached, one ZipFile per process', epoch(ImageFolderDataset(zip_path, **kwargs)))]
        cache_dir = os.path.join(root, 'node-cache')
        cold, copy_s = timed(lambda: ImageFolderDataset(zip_path, node_cache=cache_dir, **kwargs))
        rows.append((f'zip, node-cached, first run (copy {copy_s:.2f} s included)',
                     len(cold) / (copy_s + len(cold) / epoch(cold))))
        warm = ImageFolderDataset(zip_path, node_cache=cache_dir, **kwargs)
        assert warm._path == data_cache.cache_paths(zip_path, cache_dir)[0]
        rows.append(('zip, node-cached, later runs', epoch(warm, seed=1)))
        ram = ImageFolderDataset(zip_path, cache=True, **kwargs)
        epoch(ram)
        rows.append(('zip, RAM-cached (cache=True), second epoch', epoch(ram, seed=1)))
        for label, rate in rows:
            print(f'  {label:<58s} {rate:10.1f} img/s')

#----------------------------------------------------------------------------


if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
