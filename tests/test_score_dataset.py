"""score_dataset.py / training.evaluation.score_dataset: CSV layout, resume after interruption, no duplicates (docs/differences.md#metrics-12),
metadata.json usable by FilteredImageDataset (docs/differences.md#metrics-11), zip input, bad input."""

import csv
import json
import os
import shutil
import zipfile

import pytest
import torch
from click.testing import CliRunner

import score_dataset
from tests import detector_standins as standins
from tests import faults
from torch_utils import distributed as dist
from training import dataset as dataset_lib
from training.evaluation import detectors
from training.evaluation import score_dataset as scoring
from tests.procs import child_env




@pytest.fixture(scope='module')
def image_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('dataset'))
    standins.write_images(path, 11, size=16, folders=2)
    return path


def run(*args):
    return CliRunner().invoke(score_dataset.main, [str(a) for a in args])


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.reader(f))


class Interrupting:
    """Wraps a detector; raises KeyboardInterrupt at call number `at` (simulates Ctrl-C / a crash)."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0
        self.max_score, self.feature_dim = inner.max_score, inner.feature_dim

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner(images)


def test_full_run_layout_and_metadata(cache, image_dir, tmp_path):
    out = tmp_path / 'scores'
    result = run('--images', image_dir, '--out', out, '--metric', 'nima', '--batch', 3, '--workers', 0, '--checkpoints', 2)
    assert result.exit_code == 0, result.output
    rows = read_csv(out / 'results_full.csv')
    assert rows[0] == ['filename', 'nima']
    names = [r[0] for r in rows[1:]]
    assert len(names) == 11 and names == sorted(set(names)) and names[0] == 'c0/img000'
    assert sorted(os.listdir(out)) == ['metadata.json', 'results_0.csv', 'results_1.csv', 'results_full.csv']
    scores = {name: float(value) for name, value in rows[1:]}
    # Default --resolution 512: the ADM crop/resize happens before the detector's own resize.
    ds = dataset_lib.ImageFolderDataset(image_dir, resolution=512, center_crop=True)
    image, _ = ds[0]
    expected = detectors.get_detector('nima')(torch.from_numpy(image[None]))
    assert scores['c0/img000'] == pytest.approx(float(expected), rel=1e-5)
    # metadata.json, copied to the dataset root, drives FilteredImageDataset.
    with open(out / 'metadata.json') as f:
        metadata = json.load(f)['metadata']
    assert metadata['c1/img001'] == {'nima': scores['c1/img001'], 'labels': 'c1'}
    data_copy = tmp_path / 'curated'
    shutil.copytree(image_dir, data_copy)
    shutil.copy(out / 'metadata.json', data_copy / 'metadata.json')
    threshold = sorted(scores.values())[5]
    kept = dataset_lib.FilteredImageDataset(str(data_copy), nima_threshold=threshold)
    assert len(kept) == sum(score >= threshold for score in scores.values()) == 6


def test_interrupted_run_resumes_to_identical_results(cache, image_dir, tmp_path, monkeypatch):
    reference = tmp_path / 'reference'
    scoring.score_dataset(image_dir, str(reference), 'nima', max_batch_size=2, num_workers=0, resolution=None,
                          verbose=False)
    resumed = tmp_path / 'resumed'
    detectors._detector_cache['nima'] = Interrupting(detectors.get_detector('nima'), at=4)
    with pytest.raises(KeyboardInterrupt):
        scoring.score_dataset(image_dir, str(resumed), 'nima', max_batch_size=2, num_workers=0, checkpoints=1,
                              resolution=None, verbose=False)
    assert sorted(os.listdir(resumed)) == ['results_0.csv', 'results_1.csv', 'results_2.csv']  # 3 batches kept
    detectors.clear_detector_cache()
    scores = scoring.score_dataset(image_dir, str(resumed), 'nima', max_batch_size=4, num_workers=0, checkpoints=1,
                                   resolution=None, verbose=False)
    assert len(scores) == 11
    with open(reference / 'results_full.csv', 'rb') as a, open(resumed / 'results_full.csv', 'rb') as b:
        assert a.read() == b.read()
    # A third run finds nothing to do and rewrites the same file: no duplicated rows (docs/differences.md#metrics-12).
    result = run('--images', image_dir, '--out', resumed, '--metric', 'nima', '--workers', 0, '--resolution', 0)
    assert result.exit_code == 0 and 'Dataset Already Fully Processed' in result.output
    with open(reference / 'results_full.csv', 'rb') as a, open(resumed / 'results_full.csv', 'rb') as b:
        assert a.read() == b.read()


def test_stop_signal_writes_checkpoint(cache, image_dir, tmp_path, monkeypatch):
    calls = iter(range(100))
    monkeypatch.setattr(dist, 'should_stop', lambda: next(calls) >= 1)  # stop after the second batch
    out = tmp_path / 'stopped'
    assert scoring.score_dataset(image_dir, str(out), 'nima', max_batch_size=3, num_workers=0, resolution=None,
                                 verbose=False) is None
    assert len(read_csv(out / 'results_0.csv')) == 1 + 6 and not os.path.exists(out / 'results_full.csv')


def test_zip_dataset_same_names(cache, image_dir, tmp_path):
    archive = tmp_path / 'data.zip'
    with zipfile.ZipFile(archive, 'w') as z:
        for root, _, files in os.walk(image_dir):
            for name in files:
                z.write(os.path.join(root, name), os.path.relpath(os.path.join(root, name), image_dir))
    out = tmp_path / 'zip-scores'
    assert run('--images', archive, '--out', out, '--metric', 'ascore', '--workers', 0, '--resolution', 0).exit_code == 0
    rows = read_csv(out / 'results_full.csv')
    assert rows[0] == ['filename', 'ascore'] and len(rows) == 12 and rows[1][0] == 'c0/img000'


def test_bad_input(cache, image_dir, tmp_path):
    for metric in ('fid', 'foo'):
        result = run('--images', image_dir, '--out', tmp_path / 'x', '--metric', metric)
        assert result.exit_code != 0 and f'invalid scorer "{metric}" (choose from nima, ascore)' in result.output
    result = run('--images', tmp_path / 'nothing', '--out', tmp_path / 'y', '--metric', 'nima')
    assert result.exit_code != 0 and 'nothing' in result.output
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'results_0.csv').write_text('filename,ascore\na,1.0\n')
    result = run('--images', image_dir, '--out', other, '--metric', 'nima', '--workers', 0)
    assert result.exit_code != 0 and 'holds "ascore" scores' in result.output


def test_score_under_torchrun_matches_single_process(cache, image_dir, tmp_path):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = child_env(DNNLIB_CACHE_DIR=cache)
    out = tmp_path / 'two-ranks'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'score_dataset.py',
           f'--images={image_dir}', f'--out={out}', '--metric=nima', '--batch=2', '--workers=0', '--checkpoints=2',
           '--resolution=0']
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    one = scoring.score_dataset(image_dir, str(tmp_path / 'one'), 'nima', max_batch_size=2, num_workers=0,
                                resolution=None, verbose=False)
    rows = read_csv(out / 'results_full.csv')[1:]
    assert [name for name, _ in rows] == sorted(one)
    assert all(float(value) == pytest.approx(one[name], rel=1e-6) for name, value in rows)
    assert len(scoring.checkpoint_files(str(out))) == 2  # 3 batches per rank, checkpoint after the 2nd and at the end


def test_resolution_0_scores_mixed_sizes_and_channels(cache, tmp_path):
    import numpy as np
    import PIL.Image
    folder = tmp_path / 'mixed'
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name, shape, mode in (('a', (16, 16, 3), 'RGB'), ('b', (20, 16, 3), 'RGB'), ('c', (20, 20), 'L'),
                              ('d', (16, 16, 4), 'RGBA'), ('e', (16, 16, 3), 'RGB')):
        PIL.Image.fromarray(rng.randint(0, 256, size=shape).astype(np.uint8), mode).save(folder / f'{name}.png')
    out = tmp_path / 'scores'
    result = run('--images', folder, '--out', out, '--metric', 'nima', '--workers', 0, '--resolution', 0, '--batch', 5)
    assert result.exit_code == 0, result.output
    assert [row[0] for row in read_csv(out / 'results_full.csv')[1:]] == ['a', 'b', 'c', 'd', 'e']


def test_stop_signal_exits_non_zero_and_checkpoints_0(cache, image_dir, tmp_path, monkeypatch):
    assert run('--images', image_dir, '--out', tmp_path / 'full', '--metric', 'nima', '--workers', 0,
               '--checkpoints', 0, '--batch', 4).exit_code == 0
    assert sorted(os.listdir(tmp_path / 'full')) == ['metadata.json', 'results_0.csv', 'results_full.csv']
    calls = iter(range(100))
    monkeypatch.setattr(dist, 'should_stop', lambda: next(calls) >= 1)
    result = run('--images', image_dir, '--out', tmp_path / 'stopped', '--metric', 'nima', '--workers', 0, '--batch', 3)
    assert result.exit_code == 143 and 'Stopped on request' in result.output


def test_latent_datasets_are_refused_without_writing(cache, tmp_path):
    import numpy as np
    import PIL.Image
    latents = tmp_path / 'latents' / 'c0'
    latents.mkdir(parents=True)
    for i in range(2):
        np.save(latents / f'img{i}.npy', np.zeros([8, 4, 4], dtype=np.float32))
    wide = tmp_path / 'sixteen-bit'
    wide.mkdir()
    PIL.Image.fromarray(np.full([16, 16], 40000, dtype=np.uint16)).save(wide / 'a.png')
    for folder, resolution in ((latents.parent, 512), (latents.parent, 0), (wide, 0)):
        out = tmp_path / f'scores-{folder.name}-{resolution}'
        result = run('--images', folder, '--out', out, '--metric', 'nima', '--workers', 0, '--resolution', resolution)
        assert result.exit_code != 0 and 'latent datasets must be decoded first' in result.output, result.output
        assert 'Traceback' not in result.output and not out.exists()


def test_scores_of_a_dataset_with_dataset_json_carry_no_folder_labels(cache, tmp_path):
    # Issue #15, 1: a convert output's folder is a shard ("00000"), not a class; its labels stay in dataset.json.
    data = tmp_path / 'converted'
    names = standins.write_images(str(data / '00000'), 4, size=8)
    with open(data / 'dataset.json', 'w') as f:
        json.dump({'labels': [[f'00000/{name}', i % 2] for i, name in enumerate(names)]}, f)
    result = run('--images', data, '--out', tmp_path / 'scores', '--metric', 'nima', '--workers', 0, '--resolution', 0)
    assert result.exit_code == 0, result.output
    with open(tmp_path / 'scores' / 'metadata.json') as f:
        metadata = json.load(f)['metadata']
    assert sorted(metadata) == [f'00000/img00{i}' for i in range(4)]
    assert all(set(entry) == {'nima'} for entry in metadata.values())


def test_out_that_is_a_file_is_one_clear_line(cache, image_dir, tmp_path):
    # Issue #15, 11: not "[Errno 17] File exists".
    (tmp_path / 'taken').write_text('x')
    result = run('--images', image_dir, '--out', tmp_path / 'taken', '--metric', 'nima', '--workers', 0)
    assert result.exit_code == 1
    assert result.output == f'Error: --out: {tmp_path / "taken"} is a file, not a directory\n'


@pytest.mark.reliability
def test_scores_csv_full_disk(tmp_path, full_disk):
    path = str(tmp_path / 'results_1.csv')
    faults.check_previous_kept(path, lambda: scoring.write_scores_csv({'a.png': 5.0}, path, 'nima'), full_disk)
