"""Tests of dataset_tool.py and training/data_tools/dataset_tool.py: convert, encode, decode, process-and-encode."""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import dataset_tool
from tests import faults
from tests.faults import png_bytes, write_files
from training.data_tools import dataset_tool as lib
from training.dataset import ImageFolderDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Source images: odd sizes and every common PIL mode, in two top-level folders (labels 0 and 1).


def _rgb(seed: int, w: int, h: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _source_images() -> dict:
    rgba = np.concatenate([_rgb(3, 31, 31), _rgb(4, 31, 31)[:, :, :1]], axis=2)
    return {
        'a/rgb.png': PIL.Image.fromarray(_rgb(1, 37, 23)),                       # wide, odd
        'a/gray.png': PIL.Image.fromarray(_rgb(2, 23, 41)[:, :, 0]),             # tall, grayscale
        'b/rgba.png': PIL.Image.fromarray(rgba, 'RGBA'),                         # square, alpha
        'b/palette.png': PIL.Image.fromarray(_rgb(5, 48, 33)).convert('P'),      # palette
        'b/photo.jpg': PIL.Image.fromarray(_rgb(6, 70, 66)),                     # JPEG, > 2x the output
    }


def _write_source(root) -> str:
    for name, image in _source_images().items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.save(path)
    return str(root)


def _decoded_sources(root: str) -> list:
    """RGB arrays of the source files in the tool's input order (sorted names)."""
    names = sorted(_source_images())
    return names, [np.array(PIL.Image.open(os.path.join(root, n)).convert('RGB')) for n in names]


def _read_zip(path: str) -> dict:
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def _png(data: bytes) -> np.ndarray:
    return np.array(PIL.Image.open(io.BytesIO(data)))

#----------------------------------------------------------------------------
# The transforms, written out again with plain PIL operations.


def expected_center_crop(img, W, H):
    h, w = img.shape[:2]
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)
    return np.array(PIL.Image.fromarray(img).crop(box).resize((W, H), PIL.Image.LANCZOS))


def expected_center_crop_wide(img, W, H):
    h, w = img.shape[:2]
    ch = int(np.round(W * h / w))
    if w < W or ch < H:
        return None
    band = PIL.Image.fromarray(img).crop((0, (h - ch) // 2, w, (h + ch) // 2)).resize((W, H), PIL.Image.LANCZOS)
    canvas = PIL.Image.new('RGB', (W, W))
    canvas.paste(band, (0, (W - H) // 2))
    return np.array(canvas)


def expected_dhariwal(img, S):
    pil = PIL.Image.fromarray(img)
    while min(pil.size) >= 2 * S:
        pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), PIL.Image.BOX)
    scale = S / min(pil.size)
    pil = pil.resize((round(pil.size[0] * scale), round(pil.size[1] * scale)), PIL.Image.BICUBIC)
    left, top = (pil.size[0] - S) // 2, (pil.size[1] - S) // 2
    return np.array(pil.crop((left, top, left + S, top + S)))


def expected_resize(img, W, H):
    return np.array(PIL.Image.fromarray(img).resize((W, H), PIL.Image.LANCZOS))


@pytest.mark.parametrize('transform, resolution, expected', [
    (None, '16x16', lambda img: expected_resize(img, 16, 16)),
    ('center-crop', '16x16', lambda img: expected_center_crop(img, 16, 16)),
    ('center-crop-wide', '32,16', lambda img: expected_center_crop_wide(img, 32, 16)),
    ('center-crop-dhariwal', '16x16', lambda img: expected_dhariwal(img, 16)),
])
def test_convert_transforms(tmp_path, transform, resolution, expected):
    src = _write_source(tmp_path / 'src')
    dest = str(tmp_path / 'out' / 'ds.zip')
    skips = lib.convert(src, dest, transform=transform, resolution=resolution, verbose=False)
    names, images = _decoded_sources(src)
    members = _read_zip(dest)
    labels = json.loads(members.pop('dataset.json'))['labels']
    kept = [(i, expected(img)) for i, img in enumerate(images) if expected(img) is not None]
    assert sorted(members) == [f'00000/img{i:08d}.png' for i, _ in kept]  # index counts skipped images
    assert labels == [[f'00000/img{i:08d}.png', int(names[i].startswith('b/'))] for i, _ in kept]
    for i, img in kept:
        assert np.array_equal(_png(members[f'00000/img{i:08d}.png']), img), names[i]
    assert [name for name, _reason in skips.items] == [n for n, img in zip(names, images) if expected(img) is None]
    if transform == 'center-crop-wide':
        assert len(skips) == 2 and 'too small' in skips.items[0][1]  # gray (23 wide) and rgba (31 wide) < 32


def test_convert_to_folder_from_zip_with_dataset_json(tmp_path):
    src = _write_source(tmp_path / 'src')
    labels = {name: 7 - i for i, name in enumerate(sorted(_source_images()))}
    with zipfile.ZipFile(tmp_path / 'src.zip', 'w') as z:
        for name in sorted(labels):
            z.write(os.path.join(src, name), name)
        z.writestr('dataset.json', json.dumps({'labels': [[n, v] for n, v in labels.items()]}))
    dest = tmp_path / 'folder'
    dest.mkdir()  # an existing empty folder is fine
    lib.convert(str(tmp_path / 'src.zip'), str(dest), transform='center-crop', resolution='8x8',
                max_images=3, verbose=False)
    files = sorted(os.path.relpath(os.path.join(r, f), dest) for r, _d, fs in os.walk(dest) for f in fs)
    assert files == ['00000/img00000000.png', '00000/img00000001.png', '00000/img00000002.png', 'dataset.json']
    assert [v for _n, v in json.load(open(dest / 'dataset.json'))['labels']] == [7, 6, 5]
    ds = ImageFolderDataset(str(dest))
    assert ds.image_shape == [3, 8, 8] and ds.label_dim == 8


def test_convert_errors_leave_nothing_behind(tmp_path):
    src = _write_source(tmp_path / 'src')
    with pytest.raises(lib.DatasetToolError, match='required to be square'):
        lib.convert(src, str(tmp_path / 'out.zip'), verbose=False)  # first image 31x31 (RGBA) ... 37x23 not square
    for name, size in (('x/a.png', 16), ('x/b.png', 16), ('x/c.png', 8)):
        os.makedirs(tmp_path / 'mixed' / 'x', exist_ok=True)
        PIL.Image.fromarray(_rgb(0, size, size)).save(tmp_path / 'mixed' / name)
    with pytest.raises(lib.DatasetToolError, match='dataset width/cur image width: 16/8'):
        lib.convert(str(tmp_path / 'mixed'), str(tmp_path / 'out.zip'), verbose=False)
    with pytest.raises(lib.DatasetToolError, match='power-of-two'):
        lib.convert(str(tmp_path / 'mixed'), str(tmp_path / 'outdir'), resolution='12x12', verbose=False)
    assert sorted(os.listdir(tmp_path)) == ['mixed', 'src']  # no zip, no folder, no temp file


def test_unreadable_input_is_skipped(tmp_path):
    src = _write_source(tmp_path / 'src')
    with open(os.path.join(src, 'a', 'broken.png'), 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n garbage')
    skips = lib.convert(src, str(tmp_path / 'o.zip'), transform='center-crop', resolution='8x8', verbose=False)
    assert [n for n, _ in skips.items] == ['a/broken.png'] and 'unreadable' in skips.items[0][1]
    assert len(_read_zip(str(tmp_path / 'o.zip'))) == 5 + 1

#----------------------------------------------------------------------------
# CLI.


def _cli(*args):
    return CliRunner().invoke(dataset_tool.cmdline, list(args))


def test_cli_convert_summary_and_strict(tmp_path):
    src = _write_source(tmp_path / 'src')
    ok = _cli('convert', f'--source={src}', f'--dest={tmp_path}/a.zip', '--transform=center-crop', '--resolution=8x8')
    assert ok.exit_code == 0 and 'skipped none' in ok.output
    args = ['convert', f'--source={src}', '--transform=center-crop-wide', '--resolution=32x16']
    lax = _cli(*args, f'--dest={tmp_path}/b.zip')
    assert lax.exit_code == 0 and 'skipped 2' in lax.output and 'a/gray.png' in lax.output
    strict = _cli(*args, f'--dest={tmp_path}/c.zip', '--strict')
    assert strict.exit_code == 1 and '--strict' in strict.output


@pytest.mark.parametrize('args, message', [
    (['--dest='], 'must not be an empty string'),
    (['--resolution=abc'], 'cannot parse tuple abc'),
    (['--transform=center-crop'], 'must specify --resolution=WxH when using center-crop transform'),
    (['--transform=center-crop-dhariwal', '--resolution=16x8'], 'width and height must match'),
    (['--source=/nonexistent/x'], 'Missing input file or directory: /nonexistent/x'),
])
def test_cli_errors(tmp_path, args, message):
    src = _write_source(tmp_path / 'src')
    result = _cli('convert', f'--source={src}', f'--dest={tmp_path}/o.zip', *args)
    assert result.exit_code != 0 and message in result.output


def test_cli_source_and_dest_checks(tmp_path):
    (tmp_path / 'notzip.zip').write_bytes(b'plain file')
    result = _cli('convert', f'--source={tmp_path}/notzip.zip', f'--dest={tmp_path}/o.zip')
    assert result.exit_code != 0 and 'Only zip archives are supported' in result.output
    src = _write_source(tmp_path / 'src')
    result = _cli('convert', f'--source={src}', f'--dest={src}', '--transform=center-crop', '--resolution=8x8')
    assert result.exit_code != 0 and '--dest folder must be empty' in result.output


def test_cli_refuses_world_size(tmp_path, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    result = _cli('convert', '--source=x', '--dest=y.zip')
    assert result.exit_code != 0 and 'Distributed execution is not supported (WORLD_SIZE=2)' in result.output
    assert 'dataset_tool.py convert runs as a single process' in result.output
    assert 'only process-and-encode runs under torchrun' in result.output


def test_cli_single_process_world_size_with_spaces_is_accepted(tmp_path, monkeypatch):
    """WORLD_SIZE=" 1" is one process for torch_utils.distributed.init(), so the guard must agree."""
    monkeypatch.setenv('WORLD_SIZE', ' 1')
    src = _write_source(tmp_path / 'src')
    result = _cli('convert', f'--source={src}', f'--dest={tmp_path / "out.zip"}', '--transform=center-crop',
                  '--resolution=8x8')
    assert result.exit_code == 0, result.output
    assert (tmp_path / 'out.zip').is_file()

#----------------------------------------------------------------------------
# VAE subcommands with a tiny random AutoencoderKL saved where load_stability_vae finds it (a local folder).


@pytest.fixture(scope='module')
def tiny_vae(tmp_path_factory):
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                                  down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
                                  block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=16)
    path = str(tmp_path_factory.mktemp('vae'))
    vae.save_pretrained(path)
    return path, vae.eval()


@pytest.fixture(scope='module')
def pixel_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('pixels')
    src = _write_source(root / 'src')
    lib.convert(src, str(root / 'px.zip'), transform='center-crop', resolution='16x16', verbose=False)
    return str(root / 'px.zip')


def test_encode_decode_round_trip(tmp_path, tiny_vae, pixel_dataset):
    vae_path, vae = tiny_vae
    result = _cli('encode', f'--model-url={vae_path}', f'--source={pixel_dataset}', f'--dest={tmp_path}/sd.zip',
                  '--batch=2', '--device=cpu')
    assert result.exit_code == 0, result.output
    pixels = _read_zip(pixel_dataset)
    latents = _read_zip(f'{tmp_path}/sd.zip')
    names = [f'00000/img-mean-std-{i:08d}.npy' for i in range(5)]
    assert sorted(latents) == names + ['dataset.json']
    images = torch.stack([torch.from_numpy(_png(pixels[f'00000/img{i:08d}.png'])).permute(2, 0, 1) for i in range(5)])
    with torch.no_grad():
        dist = vae.encode(images.float() / 255).latent_dist  # inputs in [0, 1] (docs/differences.md#keep-1)
    expected = torch.cat([dist.mean, dist.std], dim=1).numpy()
    arrays = [np.load(io.BytesIO(latents[n])) for n in names]
    assert all(a.shape == (8, 2, 2) and a.dtype == np.float32 for a in arrays)
    assert np.allclose(np.stack(arrays), expected, atol=1e-5)
    assert json.loads(latents['dataset.json'])['labels'] == [[n, int(i >= 2)] for i, n in enumerate(names)]
    assert ImageFolderDataset(f'{tmp_path}/sd.zip').image_shape == [8, 2, 2]

    result = _cli('decode', f'--model-url={vae_path}', f'--source={tmp_path}/sd.zip', f'--dest={tmp_path}/dec',
                  '--batch=3', '--device=cpu')
    assert result.exit_code == 0, result.output
    decoded = ImageFolderDataset(f'{tmp_path}/dec')
    assert len(decoded) == 5 and decoded.image_shape == [3, 16, 16] and decoded.label_dim == 2


def test_decode_needs_latents(tmp_path, tiny_vae, pixel_dataset):
    result = _cli('decode', f'--model-url={tiny_vae[0]}', f'--source={pixel_dataset}', f'--dest={tmp_path}/d.zip')
    assert result.exit_code != 0 and 'No .npy latents' in result.output


def test_encode_missing_model_is_one_clear_error(tmp_path, tiny_vae, pixel_dataset, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    result = _cli('encode', f'--model-url={tmp_path}/no-vae', f'--source={pixel_dataset}', f'--dest={tmp_path}/e.zip')
    assert result.exit_code == 1 and 'Cannot load the VAE' in result.output and len(result.output.splitlines()) == 1
    assert not os.path.exists(f'{tmp_path}/e.zip')

#----------------------------------------------------------------------------
# process-and-encode.


def _category_source(root) -> str:
    for category, seeds in (('dogs', [1, 2, 3]), ('cats', [4, 5])):
        os.makedirs(os.path.join(root, category))
        for seed in seeds:
            PIL.Image.fromarray(_rgb(seed, 20 + seed, 17)).save(os.path.join(root, category, f'im{seed}.png'))
    with open(os.path.join(root, 'dogs', 'broken.jpg'), 'wb') as f:
        f.write(b'not a jpeg')
    return str(root)


def test_process_and_encode_offline_fails_at_once_leaving_no_folders(tmp_path, monkeypatch):
    # Issue #15, 10: a model that is not cached, and no network (nothing listens on port 9).
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')
    src = _category_source(tmp_path / 'src')
    result = _cli('process-and-encode', f'--source={src}', f'--dest={tmp_path / "dest"}', '--model-url=nobody/no-vae',
                  '--resolution=16x16', '--num-workers=0', '--device=cpu')
    errors = [line for line in result.output.splitlines() if line.startswith('Error: ')]
    assert result.exit_code == 1 and len(errors) == 1 and 'Retrying' not in result.output, result.output
    assert 'Cannot load the VAE "nobody/no-vae"' in errors[0] and 'no network connection to 127.0.0.1' in errors[0]
    assert not (tmp_path / 'dest').exists()


def test_process_and_encode_under_torchrun(tmp_path, tiny_vae):
    src = _category_source(tmp_path / 'src')
    dest = tmp_path / 'dest'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'dataset_tool.py',
           'process-and-encode', f'--source={src}', f'--dest={dest}', f'--model-url={tiny_vae[0]}',
           '--resolution=16x16', '--transform=center-crop', '--batch-size=2', '--num-workers=0',
           '--gpu-batch-size=2', '--device=cpu', '--strict']
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and 'dogs/broken.jpg: unreadable' in result.stdout + result.stderr  # --strict: one skip
    labels = json.load(open(dest / 'dataset.json'))['labels']
    assert labels == [['cats/im4.npy', 0], ['cats/im5.npy', 0], ['dogs/im1.npy', 1], ['dogs/im2.npy', 1],
                      ['dogs/im3.npy', 1]]
    latent = np.load(dest / 'dogs' / 'im2.npy')
    crop = np.array(PIL.Image.fromarray(_rgb(2, 22, 17)).crop((2, 0, 19, 17)).resize((16, 16), PIL.Image.LANCZOS))
    with torch.no_grad():
        dist = tiny_vae[1].encode(torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255).latent_dist
    assert latent.shape == (8, 2, 2) and np.allclose(latent, torch.cat([dist.mean, dist.std], 1)[0].numpy(), atol=1e-5)

    # Resume: everything is there, so nothing is encoded (the VAE is not even loaded) and outputs stay.
    mtime = os.path.getmtime(dest / 'dogs' / 'im2.npy')
    skips = lib.process_and_encode(src, str(dest), model_url='/nonexistent', resolution='16x16',
                                   transform='center-crop', num_workers=0, verbose=False)
    assert [n for n, _ in skips.items] == ['dogs/broken.jpg'] and os.path.getmtime(dest / 'dogs' / 'im2.npy') == mtime

#----------------------------------------------------------------------------
# Review fixes: permissions, damaged inputs, option checks, empty results, --dest checks, shapes, stale temps.


def _squares(root, sizes: dict) -> str:
    """A flat folder of random RGB PNGs: {file name: (w, h)}."""
    os.makedirs(root, exist_ok=True)
    for i, (name, (w, h)) in enumerate(sizes.items()):
        PIL.Image.fromarray(_rgb(i, w, h)).save(os.path.join(root, name))
    return str(root)


def test_folder_output_mode_follows_umask_or_replaced_folder(tmp_path):
    src = _squares(tmp_path / 'src', {'a.png': (8, 8)})
    old = os.umask(0o022)
    try:
        lib.convert(src, str(tmp_path / 'new'), verbose=False)
        (tmp_path / 'mine').mkdir()
        os.chmod(tmp_path / 'mine', 0o750)
        lib.convert(src, str(tmp_path / 'mine'), verbose=False)
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / 'new').st_mode & 0o777) == oct(0o755)  # not mkdtemp's 0700
    assert oct(os.stat(tmp_path / 'mine').st_mode & 0o777) == oct(0o750)


def _zip_with_bad_crc(tmp_path) -> str:
    src = _squares(tmp_path / 'src', {'a.png': (8, 8), 'b.png': (8, 8)})
    path = str(tmp_path / 'src.zip')
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for name in ('a.png', 'b.png'):
            z.write(os.path.join(src, name), name)
    data = bytearray(open(path, 'rb').read())
    data[60] ^= 0xFF  # inside a.png's stored bytes: its CRC no longer matches
    open(path, 'wb').write(bytes(data))
    return path


def test_corrupt_zip_member_is_a_counted_skip(tmp_path):
    skips = lib.convert(_zip_with_bad_crc(tmp_path), str(tmp_path / 'o.zip'), verbose=False)
    assert [n for n, _ in skips.items] == ['a.png'] and 'Bad CRC' in skips.items[0][1]
    assert sorted(_read_zip(str(tmp_path / 'o.zip'))) == ['00000/img00000001.png', 'dataset.json']


def test_damaged_source_messages_name_the_cause(tmp_path):
    data = open(_zip_with_bad_crc(tmp_path), 'rb').read()
    (tmp_path / 'trunc.zip').write_bytes(data[:100])
    result = _cli('convert', f'--source={tmp_path}/trunc.zip', f'--dest={tmp_path}/o.zip')
    assert result.exit_code == 1 and 'not a valid zip archive (truncated or corrupt?)' in result.output
    src = _squares(tmp_path / 'broken', {'b.png': (8, 8)})
    (tmp_path / 'broken' / 'a.png').write_bytes(b'garbage')
    skips = lib.convert(src, str(tmp_path / 'o.zip'), verbose=False)
    assert skips.items == [('a.png', 'unreadable image (cannot identify image file format)')]  # no '<_io.BytesIO ...>'
    _squares(tmp_path / 'mix', {'a.png': (8, 8), 'b.png': (16, 16)})
    with pytest.raises(lib.DatasetToolError, match=r'^b\.png: .*: 8/16.*use --resolution=WxH \(and --transform\)'):
        lib.convert(str(tmp_path / 'mix'), str(tmp_path / 'm.zip'), verbose=False)


@pytest.mark.parametrize('cmd', ['encode', 'decode', 'process-and-encode'])
@pytest.mark.parametrize('device, message', [('bogus', 'is not a torch device'), ('cuda:99', 'CUDA')])
def test_cli_device_is_checked_when_parsed(tmp_path, cmd, device, message):
    result = _cli(cmd, f'--source={tmp_path}/missing', f'--dest={tmp_path}/o', f'--device={device}')
    assert result.exit_code == 2 and "Invalid value for '--device'" in result.output and message in result.output


@pytest.mark.parametrize('content', [{'labels': [['a.png', 1, 2]]}, {'labels': {'a.png': 1}}, [1, 2], {'x': 1}])
def test_malformed_dataset_json_structure_is_one_line(tmp_path, content):
    src = _squares(tmp_path / 'src', {'a.png': (8, 8)})
    (tmp_path / 'src' / 'dataset.json').write_text(json.dumps(content))
    with pytest.raises(lib.DatasetToolError, match=r'malformed dataset\.json: expected \{"labels"'):
        lib.convert(src, str(tmp_path / 'o.zip'), verbose=False)


@pytest.mark.parametrize('cmd', ['convert', 'process-and-encode'])
@pytest.mark.parametrize('value', ['0x0', '16x0', '-1x8'])
def test_cli_resolution_must_be_positive(tmp_path, cmd, value):
    result = _cli(cmd, f'--source={tmp_path}', f'--dest={tmp_path}/o', f'--resolution={value}', '--transform=center-crop')
    assert result.exit_code == 2 and "Invalid value for '--resolution'" in result.output
    with pytest.raises(lib.DatasetToolError, match='--resolution'):
        lib.parse_tuple(value)
    with pytest.raises(ValueError) as info:  # the rule names no option; each caller adds it once
        lib.parse_size(value)
    assert f"'--resolution': {info.value}" in result.output and not str(info.value).startswith('--resolution')


def test_center_crop_wide_refuses_tall_resolution(tmp_path):
    src = _squares(tmp_path / 'src', {'t.png': (16, 40)})
    with pytest.raises(lib.DatasetToolError, match='height must not exceed width.*center-crop-wide'):
        lib.convert(src, str(tmp_path / 'o.zip'), transform='center-crop-wide', resolution='16x32', verbose=False)


@pytest.mark.parametrize('dest', ['o.zip', 'outdir'])
def test_no_usable_images_is_an_error_leaving_no_output(tmp_path, dest):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(lib.DatasetToolError, match='No image files found in .*empty'):
        lib.convert(str(tmp_path / 'empty'), str(tmp_path / dest), verbose=False)
    src = _squares(tmp_path / 'small', {'a.png': (8, 8), 'b.png': (9, 9)})
    with pytest.raises(lib.DatasetToolError, match=r'all 2 were skipped \(first: a\.png: too small'):
        lib.convert(src, str(tmp_path / dest), transform='center-crop-wide', resolution='32x16', verbose=False)
    with pytest.raises(lib.DatasetToolError, match='No image files found in .*lat.zip'):  # latents, not pixels
        with zipfile.ZipFile(tmp_path / 'lat.zip', 'w') as z:
            z.writestr('00000/img-mean-std-00000000.npy', lib.encode_npy(np.zeros([8, 2, 2], np.float32)))
        lib.encode(str(tmp_path / 'lat.zip'), str(tmp_path / dest), model_url='/nonexistent', device='cpu', verbose=False)
    assert sorted(os.listdir(tmp_path)) == ['empty', 'lat.zip', 'small']


def test_process_and_encode_needs_category_folders(tmp_path):
    src = _squares(tmp_path / 'flat', {'a.png': (8, 8)})
    with pytest.raises(lib.DatasetToolError, match='no category sub-folders'):
        lib.process_and_encode(src, str(tmp_path / 'dest'), model_url='/nonexistent', resolution='8x8', verbose=False)
    assert not os.path.exists(tmp_path / 'dest')


def test_zip_dest_that_is_a_folder_is_refused_up_front(tmp_path, monkeypatch):
    src = _squares(tmp_path / 'src', {'a.png': (8, 8)})
    (tmp_path / 'd.zip').mkdir()
    monkeypatch.setattr(lib, 'decode_rgb', lambda _data: pytest.fail('an input was read'))
    with pytest.raises(lib.DatasetToolError, match='--dest: .*d.zip is a directory, not a file'):
        lib.convert(src, str(tmp_path / 'd.zip'), verbose=False)


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs Linux /proc')
def test_unwritable_dest_error_names_dest_not_temp(tmp_path):
    src = _squares(tmp_path / 'src', {'a.png': (8, 8)})
    result = _cli('convert', f'--source={src}', '--dest=/proc/edm2-test.zip')
    assert result.exit_code == 1 and "'/proc/edm2-test.zip'" in result.output and '.tmp-' not in result.output


def test_stale_temp_outputs_are_reported_and_removed(tmp_path, capsys):
    src = _squares(tmp_path / 'src', {'a.png': (8, 8)})
    (tmp_path / '.o.zip.tmp-0123456789ab').write_bytes(b'partial')
    (tmp_path / '.out.tmp-abcdef').mkdir()
    (tmp_path / '.out.tmp-abcdef' / 'x.png').write_bytes(b'partial')
    (tmp_path / '.other.zip.tmp-0123456789ab').write_bytes(b'not ours')
    lib.convert(src, str(tmp_path / 'o.zip'), verbose=False)
    lib.convert(src, str(tmp_path / 'out'), verbose=False)
    err = capsys.readouterr().err
    assert '.o.zip.tmp-0123456789ab' in err and '.out.tmp-abcdef' in err and 'interrupted' in err
    assert sorted(os.listdir(tmp_path)) == ['.other.zip.tmp-0123456789ab', 'o.zip', 'out', 'src']


def test_encode_checks_image_shapes(tmp_path, tiny_vae):
    cases = [({'a.png': (16, 8)}, r'a\.png: .*square'), ({'a.png': (12, 12)}, r'a\.png: .*multiple of 8'),
             ({'a.png': (8, 8), 'b.png': (16, 16)}, r'b\.png: .*must be equal')]
    for i, (sizes, message) in enumerate(cases):
        src = _squares(tmp_path / f'src{i}', sizes)
        with pytest.raises(lib.DatasetToolError, match=message):
            lib.encode(src, str(tmp_path / 'e.zip'), model_url=tiny_vae[0], device='cpu', verbose=False)
    assert not os.path.exists(tmp_path / 'e.zip')


def test_decode_refuses_latents_of_the_wrong_shape(tmp_path, tiny_vae):
    with zipfile.ZipFile(tmp_path / 'lat.zip', 'w') as z:
        z.writestr('00000/img-mean-std-00000000.npy', lib.encode_npy(np.zeros([4, 2, 2], np.float32)))
    result = _cli('decode', f'--model-url={tiny_vae[0]}', f'--source={tmp_path}/lat.zip', f'--dest={tmp_path}/d.zip',
                  '--device=cpu')
    assert result.exit_code == 1 and 'img-mean-std-00000000.npy: expected a latent array of shape [8, h, w]' in result.output
    assert not os.path.exists(tmp_path / 'd.zip')

#----------------------------------------------------------------------------


def test_process_and_encode_skips_name_the_category_folder():
    skips = lib.SkipLog()
    kept = lib._drop_duplicate_stems(['a', 'b'], [(0, 'x.png'), (0, 'x.jpg'), (1, 'x.png')], skips)
    assert kept == [(0, 'x.png'), (1, 'x.png')] and [name for name, _ in skips.items] == ['a/x.jpg']

#----------------------------------------------------------------------------
# Injected faults (docs/reliability.md): corrupt inputs, a full disk under the output zip, fuzzed --resolution.


@pytest.mark.reliability
def test_dataset_tool_convert_skips_corrupt_input_and_counts_it(tmp_path):
    files = {'a.png': png_bytes(16, value=3), 'b.png': b'\x89PNG truncated', 'c.png': png_bytes(16, value=5)}
    source = write_files(tmp_path / 'src', files)
    dest = tmp_path / 'out.zip'
    result = faults.run_script('dataset_tool.py', 'convert', f'--source={source}', f'--dest={dest}')
    assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr
    assert 'Processed 3 inputs, skipped 1:\n  b.png: unreadable image (' in result.stderr
    ds = ImageFolderDataset(str(dest))
    assert len(ds) == 2 and [int(ds[i][0].max()) for i in range(2)] == [3, 5]


@pytest.mark.reliability
def test_dataset_tool_corrupt_zip_member_is_a_counted_skip(tmp_path):
    source = write_files(tmp_path / 'src', {'a.png': png_bytes(16), 'b.png': png_bytes(16, value=9)}, as_zip=True)
    with open(source, 'rb') as f:
        data = bytearray(f.read())
    data[data.index(b'a.png') + 8] ^= 0xFF  # inside a.png's compressed bytes, just after its local header
    with open(source, 'wb') as f:
        f.write(bytes(data))
    dest = tmp_path / 'out.zip'
    result = faults.run_script('dataset_tool.py', 'convert', f'--source={source}', f'--dest={dest}', '--strict')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'a.png: unreadable image' in result.stderr and '--strict: 1 inputs were skipped' in result.stderr


@pytest.mark.reliability
def test_dataset_tool_zip_full_disk(tmp_path, full_disk):
    def write():
        with lib.DestWriter(path) as dest:
            dest.write('00000/img00000000.png', b'x' * 100)
    path = str(tmp_path / 'out.zip')
    faults.check_previous_kept(path, write, full_disk)


PARSER_ALPHABET = st.sampled_from(list('0123456789,-.eE+ KMGix') + ['...', 'inf', 'nan', 'X', '\n'])


@pytest.mark.reliability
@settings(max_examples=60, deadline=500)
@given(st.lists(PARSER_ALPHABET, max_size=20).map(''.join) | st.text(max_size=20))
def test_resolution_tuple_parse_or_raise_tool_error(text):
    try:
        w, h = lib.parse_tuple(text)
    except lib.DatasetToolError as err:
        assert str(err).startswith('--resolution: ') and '\n' not in str(err).strip()
        return
    # Accepted: WxH or W,H of two positive integers.
    assert type(w) is int and type(h) is int and w > 0 and h > 0
    assert [int(part) for part in text.replace(',', 'x').split('x')] == [w, h]
