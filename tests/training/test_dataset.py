"""Tests of training/dataset.py and training/data_tools/node_cache.py on tiny generated datasets."""

import errno
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import faults
from tests.faults import png_bytes, write_files
from training.data_tools import node_cache as data_cache
from training.dataset import (CategoriesError, CenterCropImagenet, FilteredImageDataset, ImageFolderDataset,
                              parse_categories, parse_int_list, select_filtered)
from training.data_tools.image_transforms import center_crop_dhariwal

from tests.procs import REPO  # noqa: E402

#----------------------------------------------------------------------------
# Dataset builders.


def _pixels(seed: int, shape=(8, 8, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _write_tree(root, files: dict) -> str:
    """files: {relative path: bytes | np.ndarray (saved as PNG) | dict (saved as JSON)}."""
    for name, content in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(content, np.ndarray):
            PIL.Image.fromarray(content).save(path)
        elif isinstance(content, dict):
            with open(path, 'w') as f:
                json.dump(content, f)
        else:
            with open(path, 'wb') as f:
                f.write(content)
    return str(root)


def _zip_tree(root: str, zip_path: str) -> str:
    with zipfile.ZipFile(zip_path, 'w', compression=zipfile.ZIP_STORED) as z:
        for dirpath, _dirs, files in os.walk(root):
            for f in sorted(files):
                full = os.path.join(dirpath, f)
                z.write(full, os.path.relpath(full, root).replace('\\', '/'))
    return zip_path


@pytest.fixture(params=['dir', 'zip'])
def as_kind(request, tmp_path):
    """Callable turning a file dict into a dataset path of the parametrised kind (folder or zip)."""
    def make(files: dict) -> str:
        root = _write_tree(tmp_path / 'ds', files)
        return root if request.param == 'dir' else _zip_tree(root, str(tmp_path / 'ds.zip'))
    return make


def _labeled_files(n=6) -> dict:
    files = {f'00000/img{i:08d}.png': _pixels(i) for i in range(n)}
    files['dataset.json'] = {'labels': [[f'00000/img{i:08d}.png', i % 3] for i in range(n)]}
    return files

#----------------------------------------------------------------------------
# ImageFolderDataset.


def test_images_labels_and_shapes(as_kind):
    ds = ImageFolderDataset(as_kind(_labeled_files()))
    assert (len(ds), ds.image_shape, ds.resolution, ds.label_shape, ds.name) == (6, [3, 8, 8], 8, [3], 'ds')
    image, label = ds[4]
    assert image.dtype == np.uint8 and np.array_equal(image, _pixels(4).transpose(2, 0, 1))
    assert np.array_equal(label, np.float32([0, 1, 0])) and ds.has_onehot_labels
    assert ds.get_details(4)['raw_label'] == 1


def test_unlabeled_and_use_labels_false(as_kind):
    files = _labeled_files()
    ds = ImageFolderDataset(as_kind(files), use_labels=False)
    assert ds.label_shape == [0] and not ds.has_labels and ds[0][1].shape == (0,)


def test_null_labels_and_missing_label(tmp_path):
    files = {'a.png': _pixels(0), 'b.png': _pixels(1), 'dataset.json': {'labels': None}}
    assert not ImageFolderDataset(_write_tree(tmp_path / 'n', files)).has_labels
    files['dataset.json'] = {'labels': [['a.png', 0]]}
    ds = ImageFolderDataset(_write_tree(tmp_path / 'm', files))
    with pytest.raises(KeyError, match='b.png'):
        ds.label_shape


def test_float_labels_returned_as_is(tmp_path):
    files = {'a.png': _pixels(0), 'b.png': _pixels(1),
             'dataset.json': {'labels': [['a.png', [0.5, 1.5]], ['b.png', [2.0, 3.0]]]}}
    ds = ImageFolderDataset(_write_tree(tmp_path / 'f', files))
    assert ds.label_shape == [2] and not ds.has_onehot_labels
    assert np.array_equal(ds.get_label(1), np.float32([2, 3]))


def test_npy_latents_and_modes(as_kind):
    latent = np.random.default_rng(0).standard_normal([8, 4, 4]).astype(np.float32)
    gray = _pixels(1, (8, 8))
    palette = PIL.Image.fromarray(_pixels(2)).convert('P')
    rgba = _pixels(3, (8, 8, 4))
    files = {'l.npy': b'', 'g.png': gray, 'p.png': b'', 'r.png': rgba}
    path = as_kind(files)
    root = path if os.path.isdir(path) else os.path.join(os.path.dirname(path), 'ds')
    np.save(os.path.join(root, 'l.npy'), latent)
    palette.save(os.path.join(root, 'p.png'))
    if not os.path.isdir(path):
        os.remove(path)
        _zip_tree(root, path)
    ds = ImageFolderDataset(path, use_labels=False)
    assert ds._image_fnames == ['g.png', 'l.npy', 'p.png', 'r.png']
    assert np.array_equal(ds._load_raw_image(1), latent)
    assert np.array_equal(ds._load_raw_image(0), gray[None])                                  # grayscale kept
    assert np.array_equal(ds._load_raw_image(2), np.array(palette.convert('RGB')).transpose(2, 0, 1))  # palette -> RGB
    assert np.array_equal(ds._load_raw_image(3), rgba.transpose(2, 0, 1))                      # RGBA kept
    forced = ImageFolderDataset(path, use_labels=False, force_rgb=True)
    assert forced._load_raw_image(0).shape == (3, 8, 8)


def test_max_size_xflip_and_cache(as_kind):
    ds = ImageFolderDataset(as_kind(_labeled_files(10)), max_size=4, xflip=True, random_seed=3, cache=True)
    expected = np.arange(10)
    np.random.RandomState(3).shuffle(expected)
    assert list(ds._raw_idx) == sorted(expected[:4]) * 2 and len(ds) == 8
    plain, flipped = ds[0][0], ds[4][0]
    assert np.array_equal(flipped, plain[:, :, ::-1]) and ds.get_details(4)['xflip']
    assert set(ds._cached_images) == {int(ds._raw_idx[0])}


def test_path_errors(tmp_path):
    with pytest.raises(IOError, match='directory or zip'):
        ImageFolderDataset(str(tmp_path / 'x.tar'))
    with pytest.raises(IOError, match='No image files'):
        ImageFolderDataset(_write_tree(tmp_path / 'empty', {'readme.txt': b'x'}))
    with pytest.raises(IOError, match='resolution'):
        ImageFolderDataset(_write_tree(tmp_path / 'r', {'a.png': _pixels(0)}), resolution=16)


def test_center_crop_resolution_forces_rgb(tmp_path):
    files = {'a.png': _pixels(0, (16, 16)), 'b.png': _pixels(1, (24, 32, 3))}
    ds = ImageFolderDataset(_write_tree(tmp_path / 'c', files), resolution=16, center_crop=True, use_labels=False)
    assert ds.image_shape == [3, 16, 16]
    assert np.array_equal(ds[0][0], np.repeat(_pixels(0, (16, 16))[None], 3, axis=0))  # docs/differences.md#data-5
    assert np.array_equal(ds[1][0], center_crop_dhariwal(_pixels(1, (24, 32, 3)), 16).transpose(2, 0, 1))
    assert CenterCropImagenet(16)(ds[1][0]) is not None


def test_corrupted_images_are_skipped_and_counted(as_kind):
    files = {'a.png': b'not a png', 'b.png': _pixels(1), 'c.png': b'\x89PNG broken', 'd.png': _pixels(3)}
    ds = ImageFolderDataset(as_kind(files), use_labels=False)  # first file corrupted: shape from the next
    items = [ds[i][0] for i in range(len(ds))]
    assert sorted(ds.skipped) == ['a.png', 'c.png']
    assert np.array_equal(items[0], _pixels(1).transpose(2, 0, 1))    # never a black image
    assert np.array_equal(items[2], _pixels(3).transpose(2, 0, 1))
    assert all(item.any() for item in items)


class CountingOpener:
    """open() replacement that counts the calls (picklable)."""

    def __init__(self, log_path: str):
        self.log_path = log_path

    def __call__(self, path, mode='rb'):
        with open(self.log_path, 'a') as log:
            log.write(f'{os.getpid()} {path}\n')
        return open(path, mode)

    def calls(self) -> list:
        with open(self.log_path) as f:
            return f.read().splitlines()


def test_zip_opened_once_per_process(tmp_path):
    path = _zip_tree(_write_tree(tmp_path / 'z', _labeled_files(8)), str(tmp_path / 'z.zip'))
    opener = CountingOpener(str(tmp_path / 'opens.log'))
    ds = ImageFolderDataset(path, opener=opener)
    for i in range(len(ds)):
        ds[i]
    assert len(opener.calls()) == 1
    state = pickle.loads(pickle.dumps(ds))
    assert state._zipfile is None and state._raw_labels is None
    ctx = multiprocessing.get_context('fork')  # workers inherit the open archive and must reopen it
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=ctx)
    images = torch.cat([x for x, _ in loader])
    assert np.array_equal(images.numpy(), np.stack([ds[i][0] for i in range(8)]))
    assert len({line.split()[0] for line in opener.calls()}) == 3 and len(opener.calls()) == 3

#----------------------------------------------------------------------------
# Node-local cache.


def test_node_cache_copies_once_and_revalidates(tmp_path):
    path = _zip_tree(_write_tree(tmp_path / 'z', _labeled_files(4)), str(tmp_path / 'z.zip'))
    cache = str(tmp_path / 'cache')
    opener = CountingOpener(str(tmp_path / 'opens.log'))
    local = data_cache.localize(path, cache_dir=cache, opener=opener, verbose=False)
    assert os.path.dirname(local) == cache and open(local, 'rb').read() == open(path, 'rb').read()
    assert data_cache.localize(path, cache_dir=cache, opener=opener, verbose=False) == local
    assert len(opener.calls()) == 1
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # source changed -> copy again
    data_cache.localize(path, cache_dir=cache, opener=opener, verbose=False)
    assert len(opener.calls()) == 2
    with open(local, 'r+b') as f:  # truncated copy -> copy again
        f.truncate(10)
    data_cache.localize(path, cache_dir=cache, opener=opener, verbose=False)
    assert len(opener.calls()) == 3 and os.path.getsize(local) == os.path.getsize(path)
    assert data_cache.localize(str(tmp_path / 'z'), cache_dir=cache) == str(tmp_path / 'z')  # folders: as is


def _localize_in_child(path, cache, log):
    data_cache.localize(path, cache_dir=cache, opener=CountingOpener(log), verbose=False)


def test_node_cache_one_copy_for_concurrent_processes(tmp_path):
    path = _zip_tree(_write_tree(tmp_path / 'z', _labeled_files(4)), str(tmp_path / 'z.zip'))
    log = str(tmp_path / 'opens.log')
    ctx = multiprocessing.get_context('fork')
    procs = [ctx.Process(target=_localize_in_child, args=(path, str(tmp_path / 'cache'), log)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    assert len(CountingOpener(log).calls()) == 1


def test_dataset_with_node_cache(tmp_path):
    path = _zip_tree(_write_tree(tmp_path / 'z', _labeled_files(4)), str(tmp_path / 'z.zip'))
    ds = ImageFolderDataset(path, node_cache=str(tmp_path / 'cache'))
    assert ds._path.startswith(str(tmp_path / 'cache')) and ds.name == 'z'
    assert np.array_equal(ds[2][0], _pixels(2).transpose(2, 0, 1)) and ds.label_dim == 3

def _enospc_after_some_bytes(inp, out, total, verbose, label):
    out.write(inp.read(100))
    raise OSError(errno.ENOSPC, 'No space left on device')


def test_node_cache_io_error_falls_back_to_the_source(tmp_path, monkeypatch, capsys):
    path = _zip_tree(_write_tree(tmp_path / 'z', _labeled_files(4)), str(tmp_path / 'z.zip'))
    cache = tmp_path / 'cache'
    monkeypatch.setattr(data_cache, '_copy_stream', _enospc_after_some_bytes)  # disk full mid-copy
    assert data_cache.localize(path, cache_dir=str(cache)) == path
    out = capsys.readouterr().out
    assert out.count('\n') == 1 and out.startswith('Node-local dataset cache unusable ([Errno 28] No space left')
    assert out.rstrip().endswith(f'; reading {path} directly')
    assert [name for name in os.listdir(cache) if not name.endswith('.lock')] == []  # no partial copy kept
    not_a_dir = tmp_path / 'file'
    not_a_dir.write_bytes(b'')
    ds = ImageFolderDataset(path, node_cache=str(not_a_dir / 'cache'))  # cannot even be created
    assert ds._path == path and len(ds) == 4 and 'Node-local dataset cache unusable' in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):  # a missing source is still an error of the dataset
        data_cache.localize(str(tmp_path / 'missing.zip'), cache_dir=str(cache))


def test_node_cache_removes_killed_and_outdated_copies_before_the_space_check(tmp_path, monkeypatch):
    path = _zip_tree(_write_tree(tmp_path / 'z', _labeled_files(4)), str(tmp_path / 'z.zip'))
    cache = str(tmp_path / 'cache')
    local = data_cache.localize(path, cache_dir=cache, verbose=False)
    killed = [os.path.join(cache, f'.{os.path.basename(local)}.tmp-0123456789ab'),
              os.path.join(cache, f'.{os.path.basename(local)[:-4]}.json.tmp-ba9876543210')]
    for leftover in killed:
        open(leftover, 'wb').write(b'x' * 1000)
    other = os.path.join(cache, '.other-0000.zip.tmp-0123456789ab')  # another dataset's copy in progress
    open(other, 'wb').close()
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # source changed: the copy is outdated
    seen = []
    real_disk_usage = data_cache.shutil.disk_usage
    monkeypatch.setattr(data_cache.shutil, 'disk_usage', lambda d: seen.append(sorted(os.listdir(d))) or real_disk_usage(d))
    assert data_cache.localize(path, cache_dir=cache, verbose=False) == local
    assert seen == [sorted(['.other-0000.zip.tmp-0123456789ab', os.path.basename(local)[:-4] + '.lock'])]
    assert not any(os.path.exists(p) for p in killed) and os.path.exists(other)
    assert open(local, 'rb').read() == open(path, 'rb').read()


def test_node_cache_default_directory_is_per_user(monkeypatch):
    monkeypatch.delenv('EDM2_DATASET_CACHE', raising=False)
    name = os.path.basename(data_cache.default_cache_dir())
    assert name == (f'edm2-dataset-cache-{os.getuid()}' if hasattr(os, 'getuid') else 'edm2-dataset-cache')
    monkeypatch.setenv('EDM2_DATASET_CACHE', '/x/y')
    assert data_cache.default_cache_dir() == '/x/y'

def test_lock_file_without_fcntl_says_what_it_waits_for(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'fcntl', None)  # as on Windows: the O_EXCL lock file
    monkeypatch.setattr(data_cache, 'LOCK_NOTICE_S', 0.05)
    lock = tmp_path / 'd.lock'
    lock.write_bytes(b'')  # left by a killed holder
    remover = threading.Timer(0.3, lock.unlink)
    remover.start()
    with data_cache.file_lock(str(lock), poll_s=0.02):
        assert lock.exists()
    remover.join()
    assert capsys.readouterr().out == f'Waiting for {lock} (held by another process; delete it if no job is running)\n'
    assert not lock.exists()

#----------------------------------------------------------------------------
# FilteredImageDataset.

CATEGORY_SCORES = {'cat': [5.0, 2.0, 7.0, 4.0], 'dog': [1.0, 6.0, 3.0], 'eel': [8.0, 0.5]}


def _scored_files(with_labels: bool = False) -> dict:
    """Class folders with NIMA scores in metadata.json; `with_labels`: also dataset.json (class = folder index)."""
    files, metadata, labels, seed = {}, {}, [], 0
    for c, (category, scores) in enumerate(CATEGORY_SCORES.items()):
        for i, score in enumerate(scores):
            files[f'{category}/{i}.png'] = _pixels(seed)
            metadata[f'{category}/{i}'] = {'nima': score, 'labels': category}
            labels.append([f'{category}/{i}.png', c])
            seed += 1
    files['metadata.json'] = {'metadata': metadata}
    if with_labels:
        files['dataset.json'] = {'labels': labels}
    return files


def _kept(ds) -> list:
    return [ds._image_fnames[i] for i in ds._raw_idx]


def test_filter_nima_threshold(as_kind):
    ds = FilteredImageDataset(as_kind(_scored_files()), nima_threshold=5)
    assert _kept(ds) == ['cat/0.png', 'cat/2.png', 'dog/1.png', 'eel/0.png']


def test_filter_categories(as_kind):
    ds = FilteredImageDataset(as_kind(_scored_files(with_labels=True)), categories='0,2')
    assert _kept(ds) == ['cat/0.png', 'cat/1.png', 'cat/2.png', 'cat/3.png', 'eel/0.png', 'eel/1.png']
    assert ds.label_dim == 3  # full dataset's label dimension (docs/differences.md#data-11)
    assert np.array_equal(ds[5][1], np.float32([0, 0, 1]))
    with pytest.raises(CategoriesError, match='category 3 is out of range: .* has 3 categories'):
        FilteredImageDataset(as_kind(_scored_files()), categories=[3])


def test_filter_top_percent_ranks_by_own_score(as_kind):
    ds = FilteredImageDataset(as_kind(_scored_files()), top_percent=34)  # int(9 * 0.34) = 3 best: 8, 7, 6
    assert _kept(ds) == ['cat/2.png', 'dog/1.png', 'eel/0.png']  # docs/differences.md#data-6


def test_filter_top_per_category(as_kind):
    ds = FilteredImageDataset(as_kind(_scored_files()), top_per_category=50)  # 2 of cat, 1 of dog, 1 of eel
    assert _kept(ds) == ['cat/0.png', 'cat/2.png', 'dog/1.png', 'eel/0.png']


def test_filter_combinations_and_max_size(as_kind):
    path = as_kind(_scored_files())
    union = FilteredImageDataset(path, top_percent=34, top_per_category=50, nima_threshold=2, combine='union')
    assert _kept(union) == ['cat/0.png', 'cat/2.png', 'dog/1.png', 'eel/0.png']
    both = FilteredImageDataset(path, top_percent=34, top_per_category=50)
    assert _kept(both) == ['cat/2.png', 'dog/1.png', 'eel/0.png']
    capped = FilteredImageDataset(path, categories='0-1', max_size=3.0, random_seed=1, xflip=True)
    assert len(capped) == 6 and len(set(_kept(capped))) == 3
    assert all(name.split('/')[0] in ('cat', 'dog') for name in _kept(capped))
    no_filter = FilteredImageDataset(path, max_size=2)  # max_size applies without filters (docs/differences.md#data-8)
    assert len(no_filter) == 2


def test_filter_metadata_lookups(tmp_path):
    ds = FilteredImageDataset(_write_tree(tmp_path / 'd', _scored_files(with_labels=True)))
    assert ds.get_metadata(1) == {'nima': 2.0, 'labels': 'cat'}  # docs/differences.md#data-10
    assert ds.label_dim == 3 and len(ds) == 9


def test_filter_needs_metadata_for_scores_and_uses_dataset_json(tmp_path):
    path = _write_tree(tmp_path / 'd', _labeled_files(6))
    with pytest.raises(IOError, match='metadata.json'):
        FilteredImageDataset(path, nima_threshold=1)
    ds = FilteredImageDataset(path, categories=[2])
    assert _kept(ds) == ['00000/img00000002.png', '00000/img00000005.png'] and ds.label_dim == 3


def test_score_only_metadata_of_a_flat_folder(tmp_path, capsys):
    # What score_dataset.py writes for a flat folder: scores, no "labels", no category folders.
    files = {f'img{i}.png': _pixels(i) for i in range(6)}
    files['metadata.json'] = {'metadata': {f'img{i}': {'nima': float(i)} for i in range(6)}}
    path = _write_tree(tmp_path / 'flat', files)
    ds = FilteredImageDataset(path, nima_threshold=3, use_labels=False)  # a pure score filter needs no category
    assert _kept(ds) == ['img3.png', 'img4.png', 'img5.png'] and not ds.has_labels
    assert _kept(FilteredImageDataset(path, top_percent=50, max_size=2, use_labels=False)) == ['img4.png', 'img5.png']
    with pytest.raises(IOError, match=r'6 images without a category .* because --top-per-category needs one'):
        FilteredImageDataset(path, top_per_category=50, use_labels=False)


def test_dropped_uncategorized_images_are_counted_in_the_summary(tmp_path, capsys):
    files = _scored_files()
    files['loose.png'] = _pixels(99)  # top-level file: no folder, no metadata
    ds = FilteredImageDataset(_write_tree(tmp_path / 'd', files), categories='0')
    assert len(ds) == 4
    assert '(1 image without a category' in ds.summary()


def test_images_without_a_metadata_entry_are_dropped_by_score_filters(tmp_path, capsys):
    files = _scored_files()
    del files['metadata.json']['metadata']['cat/2']  # the best cat (7.0) and a low dog (3.0) lose their entries
    del files['metadata.json']['metadata']['dog/2']
    path = _write_tree(tmp_path / 'd', files)
    ds = FilteredImageDataset(path, top_percent=50)  # int(7 * 0.5) = 3 best of the 7 scored: 8, 6, 5
    assert _kept(ds) == ['cat/0.png', 'dog/1.png', 'eel/0.png']
    assert '2 of 9 images have no metadata.json entry' in ds.summary()
    assert 'cat/2.png' not in _kept(FilteredImageDataset(path, nima_threshold=0))
    assert 'cat/2.png' in _kept(FilteredImageDataset(path, categories='0'))  # no score needed: folder is the category
    assert select_filtered([None, 1.0, 0.0], [0, 0, 0], top_percent=100) == [1, 2]


def test_metadata_matching_no_file_is_an_error_naming_a_key_and_a_file(tmp_path):
    files = _scored_files()
    files['metadata.json'] = {'metadata': {f'00000/img{i:08d}': {'nima': float(i)} for i in range(9)}}
    path = _write_tree(tmp_path / 'd', files)
    with pytest.raises(IOError, match=r'no metadata.json key matches an image file \(e.g. key "00000/img00000000",'
                       r' file "cat/0.png"\)'):
        FilteredImageDataset(path, top_percent=30)


def test_select_filtered_is_deterministic_under_ties():
    scores, cats = [1.0] * 6, [0, 1, 0, 1, 0, 1]
    assert select_filtered(scores, cats, top_percent=50) == [0, 1, 2]
    assert select_filtered(scores, cats, top_per_category=40) == [0, 1]
    assert parse_int_list('0,1,12-14') == [0, 1, 12, 13, 14] and parse_int_list(None) is None


def test_select_filtered_reports_what_it_dropped_for_lacking_a_score_or_category():
    scores, cats = [None, 1.0, 2.0, None, 3.0], [0, None, 0, None, 0]
    dropped = dict()
    assert select_filtered(scores, cats, nima_threshold=0, dropped=dropped) == [1, 2, 4]  # no category needed
    assert dropped == dict(unscored=2, uncategorized=0)
    assert select_filtered(scores, cats, top_per_category=100, dropped=dropped) == [2, 4]
    assert dropped == dict(unscored=2, uncategorized=1)  # the unscored None-category image counts once
    assert select_filtered(scores, cats, categories=[0], dropped=dropped) == [0, 2, 4]
    assert dropped == dict(unscored=0, uncategorized=2)


def test_checked_image_refuses_a_shape_mismatch_and_first_raw_dtype_is_kept(tmp_path):
    from training.dataset import ImageShapeError
    path = _write_tree(tmp_path / 'd', {'a.png': _pixels(0), 'b.png': _pixels(1, (4, 4, 3))})
    ds = ImageFolderDataset(path)
    assert ds._first_raw_dtype == np.uint8 and ds._first_raw_shape == [3, 8, 8]
    assert ds._checked_image(0).shape == (3, 8, 8)
    with pytest.raises(ImageShapeError, match=r'b\.png: image shape \[3, 4, 4\] != dataset shape \[3, 8, 8\] '
                       r'\(all images must have the same size and channels; hint\)'):
        ds._checked_image(1, hint='; hint')


def _converted_files(n=20, classes=10, metadata_labels=True) -> dict:
    """A `dataset_tool.py convert` output (shard folder 00000, dataset.json class labels) plus the metadata.json
    that scoring it wrote: scores, and with `metadata_labels` the shard folder as "labels"."""
    files = {f'00000/img{i:08d}.png': _pixels(i) for i in range(n)}
    files['dataset.json'] = {'labels': [[f'00000/img{i:08d}.png', i % classes] for i in range(n)]}
    entry = lambda i: dict(nima=float(i), **({'labels': '00000'} if metadata_labels else {}))
    files['metadata.json'] = {'metadata': {f'00000/img{i:08d}': entry(i) for i in range(n)}}
    return files


def test_metadata_of_a_converted_dataset_keeps_the_dataset_json_labels(as_kind):
    # Issue #15, 1: the shard folder in metadata "labels" must not replace the class labels.
    ds = FilteredImageDataset(as_kind(_converted_files()), max_size=1000)
    assert ds.label_dim == 10 and [int(np.argmax(ds.get_label(i))) for i in range(len(ds))] == [i % 10 for i in range(20)]
    three = FilteredImageDataset(as_kind(_converted_files()), categories='3', nima_threshold=5)
    assert _kept(three) == ['00000/img00000013.png'] and three.label_dim == 10
    assert np.array_equal(three[0][1], np.eye(10, dtype=np.float32)[3])


def test_labels_come_from_dataset_json_with_and_without_filters(tmp_path):
    # Issue #15, 2: class folders + metadata.json, no dataset.json: unlabeled either way (no folder labels).
    files = _scored_files()
    path = _write_tree(tmp_path / 'd', files)
    assert not ImageFolderDataset(path).has_labels
    assert not FilteredImageDataset(path, max_size=1000).has_labels
    assert _kept(FilteredImageDataset(path, categories='1')) == ['dog/0.png', 'dog/1.png', 'dog/2.png']
    labeled = _write_tree(tmp_path / 'l', _scored_files(with_labels=True))
    assert ImageFolderDataset(labeled).label_dim == FilteredImageDataset(labeled, max_size=1000).label_dim == 3


def test_null_dataset_json_labels_mean_no_categories(tmp_path):
    files = _converted_files()
    files['dataset.json'] = {'labels': None}
    with pytest.raises(CategoriesError, match='has 0 categories'):  # never the shard folders
        FilteredImageDataset(_write_tree(tmp_path / 'd', files), categories='0')


@pytest.mark.parametrize('layout', ['extension-in-key', 'no-wrapper', 'integer-labels'])
def test_hand_written_metadata_variants(tmp_path, layout):
    # Issue #15, 11: keys with the extension, a file without {"metadata": ...}, integer labels as in dataset.json.
    files = {f'{c}/d{c}_{i}.png': _pixels(10 * c + i) for c in range(2) for i in range(3)}
    metadata = {f'{c}/d{c}_{i}': {'nima': float(i), 'labels': str(c)} for c in range(2) for i in range(3)}
    if layout == 'extension-in-key':
        metadata = {f'{key}.png': entry for key, entry in metadata.items()}
    if layout == 'integer-labels':  # a flat folder: categories come from the integer labels alone
        files = {f'd{c}_{i}.png': image for (c, i), image in zip([(c, i) for c in range(2) for i in range(3)],
                                                                  files.values())}
        metadata = {f'd{c}_{i}': {'nima': float(i), 'labels': c} for c in range(2) for i in range(3)}
    files['metadata.json'] = metadata if layout == 'no-wrapper' else {'metadata': metadata}
    ds = FilteredImageDataset(_write_tree(tmp_path / 'd', files), categories='1', nima_threshold=1)
    assert [os.path.basename(name) for name in _kept(ds)] == ['d1_1.png', 'd1_2.png']


def test_top_filters_must_both_hold_and_the_summary_says_so(tmp_path):
    # Issue #15, 7 and 12: intersection by default, stated in the one summary line; "1 image".
    path = _write_tree(tmp_path / 'd', _scored_files())
    ds = FilteredImageDataset(path, top_percent=34, top_per_category=50)
    assert _kept(ds) == ['cat/2.png', 'dog/1.png', 'eel/0.png']
    assert ds.summary() == ('After filtration there are 3 images in the dataset (of 9; kept: top 34% by NIMA and '
                            'top 50% of each category by NIMA)')
    union = FilteredImageDataset(path, top_percent=34, top_per_category=50, combine='union')
    assert '(top 34% by NIMA or top 50% of each category by NIMA)' in union.summary()
    one = FilteredImageDataset(path, nima_threshold=8)
    assert one.summary() == 'After filtration there is 1 image in the dataset (of 9; kept: NIMA >= 8)'
    capped = FilteredImageDataset(path, nima_threshold=5, max_size=2)
    assert capped.summary().endswith('kept: NIMA >= 5, then a random 2 of them (max_size))')


def test_building_a_filtered_dataset_prints_nothing(tmp_path, capsys):
    # Issue #15, 12: the training loop builds the dataset again; the summary is printed once, by the caller.
    FilteredImageDataset(_write_tree(tmp_path / 'd', _scored_files()), nima_threshold=5)
    assert capsys.readouterr().out == ''


ORDER_SCRIPT = """
import sys
from training.dataset import FilteredImageDataset
ds = FilteredImageDataset(sys.argv[1], top_per_category=60, top_percent=60, max_size=4)
print([ds._image_fnames[i] for i in ds._raw_idx])
"""


def test_two_processes_see_the_same_order(tmp_path):
    path = _zip_tree(_write_tree(tmp_path / 'd', _scored_files()), str(tmp_path / 'd.zip'))
    ds = FilteredImageDataset(path, top_per_category=60, top_percent=60, max_size=4)
    here = str(_kept(ds))
    hash_seed = '1' if os.environ.get('PYTHONHASHSEED') != '1' else '2'  # another string-hash order
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, '-c', ORDER_SCRIPT, path], env=env, capture_output=True,
                            text=True, check=True, cwd=REPO)
    assert result.stdout.strip().splitlines()[-1] == here and here.count('.png') == 4


#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# Injected faults (docs/reliability.md): bad images, malformed dataset.json / metadata.json, empty datasets,
# fuzzed files and category lists, a full disk under the node-local cache. Every malformed dataset gives one
# clear error naming the file at fault, or a counted skip; never a silent wrong result.


def _read_all(ds) -> list:
    return [ds[i] for i in range(len(ds))]


@pytest.fixture(params=[False, True], ids=['dir', 'zip'])
def as_zip(request):
    return request.param


@pytest.mark.reliability
def test_truncated_and_corrupt_images_are_counted_skips(tmp_path, as_zip, capsys):
    good = png_bytes(value=7)
    files = {'a.png': good, 'b.png': good[:len(good) // 2], 'c.jpg': b'\xff\xd8\xff garbage', 'd.png': good}
    ds = ImageFolderDataset(write_files(tmp_path / 'ds', files, as_zip))
    items = _read_all(ds)
    assert sorted(ds.skipped) == ['b.png', 'c.jpg']
    assert len(items) == 4 and all(image.shape == (3, 8, 8) and image.max() == 7 for image, _ in items)
    assert capsys.readouterr().err.count('Skipping corrupted file') == 2


@pytest.mark.reliability
def test_first_file_corrupt_still_finds_the_shape(tmp_path, as_zip):
    # docs/differences.md#data-3: the fork crashes when the first file is unreadable.
    files = {'0.png': b'\x89PNG broken', '1.png': png_bytes(16)}
    ds = ImageFolderDataset(write_files(tmp_path / 'ds', files, as_zip))
    assert ds.image_shape == [3, 16, 16] and '0.png' in ds.skipped
    assert _read_all(ds)[0][0].shape == (3, 16, 16)


@pytest.mark.reliability
def test_all_images_corrupt_is_an_error(tmp_path, as_zip):
    with pytest.raises(OSError, match='No readable image files'):
        ImageFolderDataset(write_files(tmp_path / 'ds', {'0.png': b'x', '1.png': b'y'}, as_zip))


@pytest.mark.reliability
@pytest.mark.parametrize('odd', [png_bytes(16), png_bytes(8, channels=1)], ids=['size', 'channels'])
def test_wrong_size_or_channels_is_an_error_naming_the_file(tmp_path, as_zip, odd):
    ds = ImageFolderDataset(write_files(tmp_path / 'ds', {'a.png': png_bytes(8), 'b.png': odd}, as_zip))
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(OSError, match=r'b\.png: image shape \[[13], (8|16), (8|16)\] != dataset shape \[3, 8, 8\]'):
        ds[1]


@pytest.mark.reliability
def test_resolution_mismatch_is_an_error(tmp_path):
    with pytest.raises(OSError, match='do not match the specified resolution'):
        ImageFolderDataset(write_files(tmp_path / 'ds', {'a.png': png_bytes(8)}), resolution=16)


@pytest.mark.reliability
@pytest.mark.parametrize('files', [{}, {'readme.txt': b'no images here'}], ids=['empty', 'no-images'])
def test_zero_image_dataset_is_an_error(tmp_path, as_zip, files):
    with pytest.raises(OSError, match='No image files found'):
        ImageFolderDataset(write_files(tmp_path / 'ds', files, as_zip))


@pytest.mark.reliability
def test_truncated_zip_is_an_error(tmp_path):
    path = write_files(tmp_path / 'ds', {'a.png': png_bytes(), 'b.png': png_bytes()}, as_zip=True)
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) - 30])  # Central directory torn off.
    with pytest.raises(OSError, match='Not a valid zip archive'):
        ImageFolderDataset(path)


@pytest.mark.reliability
@pytest.mark.parametrize('content, message', [
    (b'{"labels": [["a.png", 0]', 'cannot read JSON'),
    ([1, 2], 'malformed'),
    ({'labels': 5}, 'malformed'),
    ({'labels': [['a.png']]}, 'malformed'),
    ({'labels': [['a.png', 'cat'], ['b.png', 'dog']]}, 'integer class indices'),
    ({'labels': [['a.png', -1], ['b.png', 0]]}, 'negative class label'),
    ({'labels': [['a.png', [1.0, 2.0]], ['b.png', [1.0]]]}, 'same length'),
], ids=['truncated', 'list', 'int', 'pair', 'strings', 'negative', 'ragged'])
def test_malformed_dataset_json_is_one_clear_error(tmp_path, as_zip, content, message):
    files = {'a.png': png_bytes(), 'b.png': png_bytes(), 'dataset.json': content}
    with pytest.raises(OSError, match=message) as info:
        ds = ImageFolderDataset(write_files(tmp_path / 'ds', files, as_zip), use_labels=True)
        ds[0]
    assert 'dataset.json' in str(info.value) and '\n' not in str(info.value)


@pytest.mark.reliability
def test_dataset_json_missing_an_image_is_an_error(tmp_path):
    files = {'a.png': png_bytes(), 'b.png': png_bytes(), 'dataset.json': {'labels': [['a.png', 0]]}}
    with pytest.raises(KeyError, match=r'no label for b\.png \(1 images unlabeled\)'):
        ImageFolderDataset(write_files(tmp_path / 'ds', files), use_labels=True)[0]


@pytest.mark.reliability
def test_dataset_json_naming_missing_files_is_counted(tmp_path, capsys):
    files = {'a.png': png_bytes(), 'dataset.json': {'labels': [['a.png', 2], ['gone.png', 1], ['gone2.png', 0]]}}
    ds = ImageFolderDataset(write_files(tmp_path / 'ds', files), use_labels=True)
    assert ds[0][1].tolist() == [0, 0, 1]
    assert 'labels 2 files that do not exist' in capsys.readouterr().err


@pytest.mark.reliability
@pytest.mark.parametrize('content, message', [
    (b'{not json', 'cannot read JSON'),
    ([], 'malformed'),
    ({'metadata': [1, 2]}, 'malformed'),
    ({'metadata': {'c/a': 5}}, 'malformed'),
    ({'metadata': {'c/a': {'nima': 'high'}}}, 'is not a number'),
], ids=['truncated', 'list', 'inner-list', 'entry-int', 'nima-str'])
def test_malformed_metadata_json_is_one_clear_error(tmp_path, as_zip, content, message):
    files = {'c/a.png': png_bytes(), 'c/b.png': png_bytes(), 'metadata.json': content}
    with pytest.raises(OSError, match=message) as info:
        FilteredImageDataset(write_files(tmp_path / 'ds', files, as_zip), nima_threshold=1.0)
    assert 'metadata.json' in str(info.value)


@pytest.mark.reliability
def test_score_filter_without_metadata_is_an_error(tmp_path):
    with pytest.raises(OSError, match='need metadata.json'):
        FilteredImageDataset(write_files(tmp_path / 'ds', {'c/a.png': png_bytes()}), top_percent=50)


@pytest.mark.reliability
@pytest.mark.parametrize('categories', ['3', '-1'])
def test_out_of_range_category_is_an_error(tmp_path, categories):
    with pytest.raises(CategoriesError, match=f'category {categories} is out of range'):
        FilteredImageDataset(write_files(tmp_path / 'ds', {'c/a.png': png_bytes()}), categories=categories)


@pytest.mark.reliability
def test_node_cache_copy_full_disk(tmp_path, full_disk):
    src = tmp_path / 'src.zip'
    src.write_bytes(b'z' * 1000)
    path = str(tmp_path / 'cache.zip')
    faults.check_previous_kept(path, lambda: data_cache.copy_file(str(src), path, verbose=False), full_disk)

# Fuzzing.


FUZZ = settings(max_examples=60, deadline=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZ_IO = settings(max_examples=25, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Text made of the characters the parsers care about, plus some noise.
PARSER_ALPHABET = st.sampled_from(list('0123456789,-.eE+ KMGi') + ['...', 'inf', 'nan', 'x', '\n'])
parser_text = st.lists(PARSER_ALPHABET, max_size=20).map(''.join) | st.text(max_size=20)


@pytest.mark.reliability
@FUZZ
@given(parser_text)
def test_category_lists_parse_or_raise_value_error(text):
    # --categories: the seed-list syntax (dnnlib.util.parse_int_list), each index in range.
    try:
        values = parse_categories(text, num_categories=10)
    except CategoriesError as err:
        assert '\n' not in str(err).strip()
        try:
            values = parse_int_list(text)
        except ValueError as parse_err:
            assert str(err) == str(parse_err)  # The parser's own message.
        else:
            assert str(err).startswith(f'category {[v for v in values if not 0 <= v < 10][0]} is out of range')
        return
    assert values == parse_int_list(text) and all(0 <= v < 10 for v in values)


@pytest.mark.reliability
def test_huge_category_ranges_are_refused_not_expanded():
    # A typo such as 0-99999999999 must give a clean error, not exhaust memory.
    with pytest.raises(CategoriesError, match='too many items'):
        parse_categories('0-99999999999', num_categories=10**12)


GOOD_PNG = png_bytes()


def _mutate(data: bytes, cut: int, flips: list) -> bytes:
    data = bytearray(data[:max(cut, 1)])
    for pos, value in flips:
        data[pos % len(data)] = value
    return bytes(data)


@pytest.mark.reliability
@FUZZ_IO
@given(st.sampled_from(['a.png', 'a.jpg', 'a.npy', 'a.bmp']), st.integers(0, len(GOOD_PNG)),
       st.lists(st.tuples(st.integers(0, 10**4), st.integers(0, 255)), max_size=4), st.booleans())
def test_dataset_with_corrupt_file_raises_ioerror_or_skips(name, cut, flips, as_zip):
    """A folder/zip holding one good PNG and one mangled file: the mangled one is a counted skip (the good
    image takes its place), or it decodes to an image of the dataset's shape, or the dataset raises one
    OSError line (e.g. the decoded shape differs). Nothing else escapes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_files(os.path.join(tmp, 'ds'), {'good.png': GOOD_PNG, name: _mutate(GOOD_PNG, cut, flips)},
                           as_zip)
        try:
            ds = ImageFolderDataset(path)
            try:
                items = _read_all(ds)
            finally:
                ds.close()
        except OSError as err:  # Unreadable data set or shape mismatch: one clear line.
            assert str(err).strip() and '\n' not in str(err).strip()
            return
    assert len(items) == 2 and all(image.shape == (3, 8, 8) for image, _label in items)
    assert set(ds.skipped) <= {name}
    if ds.skipped:
        assert all(np.array_equal(image, np.zeros([3, 8, 8], np.uint8)) for image, _label in items)


@pytest.mark.reliability
@FUZZ_IO
@given(st.binary(max_size=200))
def test_zip_dataset_of_random_bytes_is_an_ioerror(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'ds.zip')
        with open(path, 'wb') as f:
            f.write(data)
        with pytest.raises(OSError, match=r'^(Not a valid zip archive|No image files found in the specified path): '):
            ImageFolderDataset(path)


@pytest.mark.reliability
@FUZZ_IO
@given(st.binary(max_size=200), st.sampled_from(['dataset.json', 'metadata.json']))
def test_random_json_sidecars_are_clean_errors(data, name):
    with tempfile.TemporaryDirectory() as tmp:
        root = write_files(os.path.join(tmp, 'ds'), {'img.png': GOOD_PNG, name: data})
        if name == 'metadata.json':  # A score filter needs a real entry for img.png: random bytes never are one.
            with pytest.raises(OSError) as info:
                FilteredImageDataset(root, use_labels=False, nima_threshold=0.5)[0]
            assert str(info.value).strip() and '\n' not in str(info.value)
            return
        try:
            label = ImageFolderDataset(root, use_labels=True)[0][1]
        except OSError as err:
            assert str(err).startswith(os.path.join(root, 'dataset.json') + ': ') and '\n' not in str(err)
            return
        except KeyError as err:  # Valid JSON labelling no file, e.g. [].
            assert str(err) == f"'dataset.json of {root} has no label for img.png (1 images unlabeled)'"
            return
    assert label.dtype == np.float32
