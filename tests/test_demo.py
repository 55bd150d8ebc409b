"""The demo's own pieces (digits export, offline recognition figure, class grid) and one tiny end-to-end run."""
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import demo
from training.data_tools import demo_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_export_digits_writes_labelled_pngs(tmp_path):
    assert demo_digits.export_digits(str(tmp_path), max_images=30) == 30
    labels = json.loads((tmp_path / 'dataset.json').read_text())['labels']
    assert len(labels) == 30 and all(fname.startswith(f'{label}/') for fname, label in labels)
    image = np.asarray(PIL.Image.open(tmp_path / labels[0][0]))
    assert image.shape == (8, 8) and image.dtype == np.uint8 and image.max() > 200


def test_recognition_rate_separates_real_digits_from_noise():
    images, labels = demo_digits.load_digits_uint8()
    real = np.stack([np.asarray(PIL.Image.fromarray(img).resize((16, 16), PIL.Image.LANCZOS)) for img in images[:200]])
    real = np.repeat(real[:, None], 3, axis=1)
    assert demo_digits.digit_recognition_rate(real, labels[:200]) > 0.9
    assert demo_digits.digit_recognition_rate(real, (labels[:200] + 1) % 10) < 0.2
    noise = np.random.default_rng(0).integers(0, 256, size=(200, 3, 16, 16), dtype=np.uint8)
    assert demo_digits.digit_recognition_rate(noise, labels[:200]) < 0.3


def test_tile_class_grid_puts_one_class_per_row(tmp_path):
    dirs = []
    for label in range(3):
        d = tmp_path / f'class{label}'
        d.mkdir()
        for seed in range(4):
            PIL.Image.new('RGB', (8, 8), (label * 100, 0, seed * 60)).save(d / f'{seed:06d}.png')
        dirs.append(str(d))
    images, labels = demo.tile_class_grid(dirs, str(tmp_path / 'grid.png'))
    assert images.shape == (12, 3, 8, 8) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    grid = np.asarray(PIL.Image.open(tmp_path / 'grid.png'))
    cell = grid.shape[0] // 3
    assert grid.shape[1] // 4 == cell
    assert grid[cell // 2, cell // 2, 0] == 0 and grid[2 * cell + cell // 2, cell // 2, 0] == 200 # row = class
    assert grid[cell // 2, 3 * cell + cell // 2, 2] == 180 # column = seed


def test_demo_end_to_end_tiny(tmp_path):
    # Started from outside the repository, with a relative --outdir: the steps must find the scripts by themselves.
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'demo.py'), '--outdir=out', '--no-toy', '--kimg=1',
                             '--device=cpu'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f'$ python {os.path.join(ROOT, "train_edm2.py")} ' in result.stdout   # the echoed command works from here
    tmp_path = tmp_path / 'out'
    assert 'of the samples as the requested class' in result.stdout
    assert (tmp_path / 'samples-per-class.png').is_file()
    assert len(list((tmp_path / 'samples').glob('phema-*-0.100/class*/*.png'))) == 100
    assert list((tmp_path / 'phema').glob('phema-*-0.100.pkl'))


def test_another_network_gets_its_own_samples(tmp_path, monkeypatch):
    # A longer --kimg makes a new network: its grid must not be built from the old network's (skipped) samples.
    duration = {}

    def fake_step(title, args, env=None):
        options = dict(arg[2:].split('=', 1) for arg in args[1:] if arg.startswith('--') and '=' in arg)
        if args[0] == 'train_edm2.py':
            duration['kimg'] = int(options['duration'][:-2])
        elif args[0] == 'reconstruct_phema.py':
            os.makedirs(options['outdir'], exist_ok=True)
            open(os.path.join(options['outdir'], f'phema-{duration["kimg"]:07d}-0.100.pkl'), 'wb').close()
        elif args[0] == 'generate_images.py':  # like --skip-existing: existing PNGs are kept
            os.makedirs(options['outdir'], exist_ok=True)
            shade = 10 * duration['kimg']
            for seed in range(10):
                path = os.path.join(options['outdir'], f'{seed:06d}.png')
                if not os.path.exists(path):
                    PIL.Image.new('RGB', (8, 8), (shade, shade, shade)).save(path)

    monkeypatch.setattr(demo, 'run_step', fake_step)
    monkeypatch.setattr(demo_digits, 'digit_recognition_rate', lambda images, labels: 0.5)
    monkeypatch.chdir(tmp_path)
    os.makedirs('out/digits-src')
    open('out/digits-src/dataset.json', 'w').close()
    for kimg in (1, 2):
        result = CliRunner().invoke(demo.main, ['--outdir=out', '--no-toy', f'--kimg={kimg}'], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert f'samples/phema-{kimg:07d}-0.100/class*' in result.output
    grid = np.asarray(PIL.Image.open(tmp_path / 'out' / 'samples-per-class.png'))
    assert grid[60, 60, 0] == 20  # a pixel of the 2-kimg network's first sample, not the 1-kimg one's (10)


@pytest.mark.parametrize('device', ['bogus', 'cuda:99'])
def test_bad_device_is_refused_before_any_step(tmp_path, monkeypatch, device):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(demo.main, ['--outdir=out', f'--device={device}'], catch_exceptions=False)
    assert result.exit_code == 2 and '--device' in result.output and '===' not in result.output
    assert os.listdir(tmp_path) == []


def test_kimg_help_says_ki():
    assert 'thousands (Ki = 1024) of images' in ' '.join(CliRunner().invoke(demo.main, ['--help']).output.split())
