"""Bad data (issue "Reliability"): every malformed dataset gives one clear error naming the
file at fault, or a counted skip; never a silent wrong result."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from training import dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(size: int = 8, channels: int = 3, value: int = 0) -> bytes:
    shape = [size, size, channels] if channels > 1 else [size, size]
    buf = io.BytesIO()
    PIL.Image.fromarray(np.full(shape, value, np.uint8)).save(buf, format='png')
    return buf.getvalue()


def _make(root, files: dict, as_zip: bool = False) -> str:
    """files: {relative path: bytes | JSON-able object}; returns a folder or zip path."""
    root = str(root)
    for name, content in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        with open(path, 'wb') as f:
            f.write(data)
    os.makedirs(root, exist_ok=True)
    return shutil.make_archive(root, 'zip', root) if as_zip else root


def _read_all(ds) -> list:
    return [ds[i] for i in range(len(ds))]


@pytest.fixture(params=[False, True], ids=['dir', 'zip'])
def as_zip(request):
    return request.param

#----------------------------------------------------------------------------
# Images.


def test_truncated_and_corrupt_images_are_counted_skips(tmp_path, as_zip, capsys):
    good = _png(value=7)
    files = {'a.png': good, 'b.png': good[:len(good) // 2], 'c.jpg': b'\xff\xd8\xff garbage', 'd.png': good}
    ds = dataset.ImageFolderDataset(_make(tmp_path / 'ds', files, as_zip))
    items = _read_all(ds)
    assert sorted(ds.skipped) == ['b.png', 'c.jpg']
    assert all(image.shape == (3, 8, 8) and image.max() == 7 for image, _ in items)  # Only real pixels returned.
    assert capsys.readouterr().err.count('Skipping corrupted file') == 2


def test_first_file_corrupt_still_finds_the_shape(tmp_path, as_zip):
    # docs/differences.md#data-3: the fork crashes when the first file is unreadable.
    ds = dataset.ImageFolderDataset(_make(tmp_path / 'ds', {'0.png': b'\x89PNG broken', '1.png': _png(16)}, as_zip))
    assert ds.image_shape == [3, 16, 16] and '0.png' in ds.skipped
    assert _read_all(ds)[0][0].shape == (3, 16, 16)


def test_all_images_corrupt_is_an_error(tmp_path, as_zip):
    with pytest.raises(IOError, match='No readable image files'):
        dataset.ImageFolderDataset(_make(tmp_path / 'ds', {'0.png': b'x', '1.png': b'y'}, as_zip))


@pytest.mark.parametrize('odd', [_png(16), _png(8, channels=1)], ids=['size', 'channels'])
def test_wrong_size_or_channels_is_an_error_naming_the_file(tmp_path, as_zip, odd):
    ds = dataset.ImageFolderDataset(_make(tmp_path / 'ds', {'a.png': _png(8), 'b.png': odd}, as_zip))
    ds[0]
    with pytest.raises(IOError, match=r'b\.png: image shape'):
        ds[1]


def test_resolution_mismatch_is_an_error(tmp_path):
    with pytest.raises(IOError, match='do not match the specified resolution'):
        dataset.ImageFolderDataset(_make(tmp_path / 'ds', {'a.png': _png(8)}), resolution=16)


@pytest.mark.parametrize('files', [{}, {'readme.txt': b'no images here'}], ids=['empty', 'no-images'])
def test_zero_image_dataset_is_an_error(tmp_path, as_zip, files):
    with pytest.raises(IOError, match='No image files found'):
        dataset.ImageFolderDataset(_make(tmp_path / 'ds', files, as_zip))


def test_truncated_zip_is_an_error(tmp_path):
    path = _make(tmp_path / 'ds', {'a.png': _png(), 'b.png': _png()}, as_zip=True)
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) - 30])  # Central directory torn off.
    with pytest.raises(IOError, match='Not a valid zip archive'):
        dataset.ImageFolderDataset(path)

#----------------------------------------------------------------------------
# dataset.json / metadata.json.


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
    files = {'a.png': _png(), 'b.png': _png(), 'dataset.json': content}
    with pytest.raises(IOError, match=message) as info:
        ds = dataset.ImageFolderDataset(_make(tmp_path / 'ds', files, as_zip), use_labels=True)
        ds[0]
    assert 'dataset.json' in str(info.value) and '\n' not in str(info.value)


def test_dataset_json_missing_an_image_is_an_error(tmp_path):
    files = {'a.png': _png(), 'b.png': _png(), 'dataset.json': {'labels': [['a.png', 0]]}}
    with pytest.raises(KeyError, match='no label for b.png'):
        dataset.ImageFolderDataset(_make(tmp_path / 'ds', files), use_labels=True)[0]


def test_dataset_json_naming_missing_files_is_counted(tmp_path, capsys):
    files = {'a.png': _png(), 'dataset.json': {'labels': [['a.png', 2], ['gone.png', 1], ['gone2.png', 0]]}}
    ds = dataset.ImageFolderDataset(_make(tmp_path / 'ds', files), use_labels=True)
    assert ds[0][1].tolist() == [0, 0, 1]
    assert 'labels 2 files that do not exist' in capsys.readouterr().err


@pytest.mark.parametrize('content, message', [
    (b'{not json', 'cannot read JSON'),
    ([], 'malformed'),
    ({'metadata': [1, 2]}, 'malformed'),
    ({'metadata': {'c/a': 5}}, 'malformed'),
    ({'metadata': {'c/a': {'nima': 'high'}}}, 'is not a number'),
], ids=['truncated', 'list', 'inner-list', 'entry-int', 'nima-str'])
def test_malformed_metadata_json_is_one_clear_error(tmp_path, as_zip, content, message):
    files = {'c/a.png': _png(), 'c/b.png': _png(), 'metadata.json': content}
    with pytest.raises(IOError, match=message) as info:
        dataset.FilteredImageDataset(_make(tmp_path / 'ds', files, as_zip), nima_threshold=1.0)
    assert 'metadata.json' in str(info.value)


def test_score_filter_without_metadata_is_an_error(tmp_path):
    with pytest.raises(IOError, match='need metadata.json'):
        dataset.FilteredImageDataset(_make(tmp_path / 'ds', {'c/a.png': _png()}), top_percent=50)


@pytest.mark.parametrize('categories', ['3', '-1'])
def test_out_of_range_category_is_an_error(tmp_path, categories):
    with pytest.raises(dataset.CategoriesError, match='out of range'):
        dataset.FilteredImageDataset(_make(tmp_path / 'ds', {'c/a.png': _png()}), categories=categories)

#----------------------------------------------------------------------------
# Through the CLIs.


def _cli(*args, cwd=REPO, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_train_cond_without_labels_is_refused(tmp_path):
    data = _make(tmp_path / 'ds', {'a.png': _png(16), 'b.png': _png(16)})
    result = _cli('train_edm2.py', f'--outdir={tmp_path / "run"}', f'--data={data}', '--cond=1',
                  '--preset=edm2-img512-xs', '--batch=2', '--duration=4', '--dry-run')
    assert result.returncode != 0
    assert 'no labels found in the dataset' in result.stderr
    assert 'Traceback' not in result.stderr


def test_dataset_tool_convert_skips_or_names_corrupt_input(tmp_path):
    source = _make(tmp_path / 'src', {'a.png': _png(16), 'b.png': b'\x89PNG truncated', 'c.png': _png(16)})
    dest = tmp_path / 'out.zip'
    result = _cli('dataset_tool.py', 'convert', f'--source={source}', f'--dest={dest}')
    if result.returncode == 0:  # Counted skip: the message names the file; two images written.
        assert 'b.png' in result.stdout + result.stderr
        ds = dataset.ImageFolderDataset(str(dest))
        assert len(ds) == 2
    else:  # Or a clear refusal that names it and leaves no output.
        assert 'b.png' in result.stderr and 'Traceback' not in result.stderr
        assert not dest.exists()


def test_dataset_tool_corrupt_zip_member_is_a_counted_skip(tmp_path):
    source = _make(tmp_path / 'src', {'a.png': _png(16), 'b.png': _png(16, value=9)}, as_zip=True)
    with open(source, 'rb') as f:
        data = bytearray(f.read())
    data[data.index(b'a.png') + 8] ^= 0xFF  # inside a.png's compressed bytes, just after its local header
    with open(source, 'wb') as f:
        f.write(bytes(data))
    dest = tmp_path / 'out.zip'
    result = _cli('dataset_tool.py', 'convert', f'--source={source}', f'--dest={dest}', '--strict')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'a.png: unreadable image' in result.stderr and '--strict: 1 inputs were skipped' in result.stderr
