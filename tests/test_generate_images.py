"""End-to-end tests of generate_images (library function and CLI) on tiny pickles built here:
reproducibility across runs, batch sizes and processes, guidance options, output layout,
latent decoding through the pickle's encoder, and one-line errors that leave no files."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate_images as cli
from tests.tiny import make_tiny_precond, write_tiny_snapshot
from training.sampling import generate_images as sampling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(num_steps=4, verbose=False, device='cpu')


@pytest.fixture(scope='module')
def pkls(tmp_path_factory):
    root = tmp_path_factory.mktemp('pkls')
    paths = {}

    def write(name, **kwargs):
        paths[name] = str(root / f'{name}.pkl')
        write_tiny_snapshot(paths[name], **kwargs)

    write('net', net=make_tiny_precond(seed=0, label_dim=4))
    write('gnet', net=make_tiny_precond(seed=1, label_dim=4))
    write('uncond_gnet', net=make_tiny_precond(seed=2, label_dim=0))
    write('bad_res', net=make_tiny_precond(seed=3, label_dim=4, img_resolution=8))
    write('bad_label', net=make_tiny_precond(seed=4, label_dim=3))
    write('no_ema', ema=None)
    return paths


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    """Tiny convolutions run 10x faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    """The CLI calls dist.init(); leave no process group or env vars behind for other tests."""
    saved_env = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved_env)


def _run_lib(net, outdir=None, **kwargs):
    return list(sampling.generate_images(net, outdir=outdir, **{**FAST, **kwargs}))


def _read_pngs(outdir):
    files = {}
    for root, _dirs, names in os.walk(outdir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                files[os.path.relpath(path, outdir)] = f.read()
    return files


def _invoke(*args):
    return CliRunner().invoke(cli.cmdline, [str(a) for a in args])

#----------------------------------------------------------------------------
# Reproducibility.


def test_same_seeds_give_identical_files_across_runs_and_batch_sizes(pkls, tmp_path):
    runs = {}
    for name, batch in [('b6', 6), ('b6_again', 6), ('b1', 1), ('b4', 4)]:
        _run_lib(pkls['net'], tmp_path / name, seeds=range(10, 16), max_batch_size=batch, net_batch_size=4, num_steps=3)
        runs[name] = _read_pngs(tmp_path / name)
    assert sorted(runs['b6']) == [f'{seed:06d}.png' for seed in range(10, 16)]
    for name in runs:
        assert runs[name] == runs['b6'], name
    # The default path (whole batch per call) is reproducible too.
    _run_lib(pkls['net'], tmp_path / 'd1', seeds=range(10, 14), max_batch_size=2)
    _run_lib(pkls['net'], tmp_path / 'd2', seeds=range(10, 14), max_batch_size=2)
    assert _read_pngs(tmp_path / 'd1') == _read_pngs(tmp_path / 'd2')


def test_torchrun_two_processes_write_the_same_files(pkls, tmp_path):
    _run_lib(pkls['net'], tmp_path / 'single', seeds=range(10), max_batch_size=10, net_batch_size=4)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(REPO, 'generate_images.py'), f'--net={pkls["net"]}', f'--outdir={tmp_path / "multi"}',
           '--seeds=0-9', '--batch=4', '--net-batch=4', '--steps=4', '--device=cpu']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    single, multi = _read_pngs(tmp_path / 'single'), _read_pngs(tmp_path / 'multi')
    assert len(single) == 10 and single == multi

#----------------------------------------------------------------------------
# Per-seed noise, labels and output layout.


def test_batches_record_seeds_noise_and_labels(pkls, tmp_path):
    results = _run_lib(pkls['net'], tmp_path, seeds=[5, 1234, 7], max_batch_size=2, subdirs=True)
    assert [r.seeds for r in results] == [[5, 1234], [7]]
    assert [r.num_batches for r in results] == [2, 2] and [r.batch_idx for r in results] == [0, 1]
    r = results[0]
    assert r.images.dtype == torch.uint8 and r.images.shape == (2, 3, 16, 16)
    gen = torch.Generator().manual_seed(1234)
    assert torch.equal(r.noise[1], torch.randn([3, 16, 16], generator=gen))
    assert torch.equal(r.labels[1], torch.eye(4)[torch.randint(4, size=[], generator=gen)])
    assert sorted(_read_pngs(tmp_path)) == ['000000/000005.png', '000000/000007.png', '001000/001234.png']
    png = np.array(PIL.Image.open(tmp_path / '001000' / '001234.png'))
    assert png.shape == (16, 16, 3) and np.array_equal(png, r.images[1].permute(1, 2, 0).numpy())


def test_class_overrides_label_without_changing_noise(pkls):
    rand = _run_lib(pkls['net'], seeds=[3, 4], max_batch_size=4)[0]
    fixed = _run_lib(pkls['net'], seeds=[3, 4], max_batch_size=4, class_idx=2)[0]
    assert torch.equal(fixed.labels, torch.eye(4)[[2, 2]])
    assert torch.equal(fixed.noise, rand.noise)
    with pytest.raises(ValueError, match='out of range'):
        sampling.generate_images(pkls['net'], class_idx=4, **FAST)


def test_empty_chunks_are_yielded_without_images(pkls):
    results = _run_lib(pathlib.Path(pkls['net']), seeds=[], max_batch_size=4)  # paths may be PathLike
    assert len(results) == 1 and results[0].images is None and results[0].seeds == []

#----------------------------------------------------------------------------
# Guidance through the CLI.


def test_cli_guidance_options(pkls, tmp_path):
    base = ['--net', pkls['net'], '--seeds=0-1', '--steps=3', '--device=cpu']
    variants = {
        'plain': [],
        'w1': ['--gnet', pkls['gnet'], '--guidance=1'],
        'w2': ['--gnet', pkls['gnet'], '--guidance=2'],
        'w2_full_interval': ['--gnet', pkls['gnet'], '--guidance=2', '--guidance-interval=0,1000'],
        'w2_cfg': ['--gnet', pkls['uncond_gnet'], '--guidance=2'],
        'w2_unlabeled': ['--gnet', pkls['gnet'], '--guidance=2', '--unlabeled-guide'],
    }
    files = {}
    for name, extra in variants.items():
        result = _invoke(*base, '--outdir', tmp_path / name, *extra)
        assert result.exit_code == 0, result.output
        files[name] = _read_pngs(tmp_path / name)
    assert len(files['plain']) == 2
    assert files['w1'] == files['plain']
    assert files['w2_full_interval'] == files['w2']
    assert files['w2'] != files['plain'] and files['w2_cfg'] != files['w2'] and files['w2_unlabeled'] != files['w2']


def test_solver_options_reach_the_sampler_and_stay_batch_independent(pkls, tmp_path):
    kwargs = dict(seeds=range(5), net_batch_size=2, num_steps=4, solver='dpm++3m', discretization='logsnr',
                  gnet=pkls['gnet'], guidance=2.0, guidance_interval=(0.05, 20.0))
    _run_lib(pkls['net'], tmp_path / 'b5', max_batch_size=5, **kwargs)
    _run_lib(pkls['net'], tmp_path / 'b2', max_batch_size=2, **kwargs)
    assert _read_pngs(tmp_path / 'b5') == _read_pngs(tmp_path / 'b2')
    args = ['--net', pkls['net'], '--seeds=0-4', '--steps=4', '--device=cpu', '--net-batch=2', '--gnet', pkls['gnet'],
            '--guidance=2', '--guidance-interval=0.05,20']
    result = _invoke(*args, '--outdir', tmp_path / 'cli', '--solver=dpm++3m', '--disc=logsnr')
    assert result.exit_code == 0, result.output
    assert 'Sampler: dpm++3m, 4 steps, logsnr time steps; network evaluations per image: 4 main + 2 guide' in result.output
    assert _read_pngs(tmp_path / 'cli') == _read_pngs(tmp_path / 'b5')
    result = _invoke(*args, '--outdir', tmp_path / 'heun')
    assert result.exit_code == 0 and 'Sampler: heun, 4 steps, edm time steps' in result.output
    assert _read_pngs(tmp_path / 'heun') != _read_pngs(tmp_path / 'cli')


def test_cli_grid_and_skip_existing(pkls, tmp_path):
    out, grid = tmp_path / 'out', tmp_path / 'grid.png'
    result = _invoke('--net', pkls['net'], '--outdir', out, '--seeds=0-4', '--steps=2', '--device=cpu', '--grid', grid)
    assert result.exit_code == 0, result.output
    assert PIL.Image.open(grid).size == (3 * 16, 2 * 16)  # 5 images -> 3x2 grid
    assert f'Saved a grid of the first 5 images to {grid}' in result.output  # issue #15, 12
    first = _read_pngs(out)
    os.remove(out / '000003.png')
    stamp = os.stat(out / '000001.png').st_mtime_ns
    result = _invoke('--net', pkls['net'], '--outdir', out, '--seeds=0-4', '--steps=2', '--device=cpu', '--skip-existing')
    assert result.exit_code == 0, result.output
    assert _read_pngs(out) == first and os.stat(out / '000001.png').st_mtime_ns == stamp
    assert f'--skip-existing: 4 images already in {out}, 1 to generate' in result.output  # issue #15, 12

#----------------------------------------------------------------------------
# Latent models: decoding through the pickle's VAE encoder, in chunks.


def test_latent_model_decodes_through_pickle_encoder(tmp_path, monkeypatch):
    diffusers = pytest.importorskip('diffusers')
    from training.encoders import StabilityVAEEncoder
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
                                  layers_per_block=1, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(tmp_path / 'vae')
    pkl = str(tmp_path / 'latent.pkl')
    write_tiny_snapshot(pkl, net=make_tiny_precond(img_channels=4, label_dim=4),
                        encoder=StabilityVAEEncoder(vae_name=str(tmp_path / 'vae')))
    chunk_sizes = []
    original = StabilityVAEEncoder._run_vae_decoder
    monkeypatch.setattr(StabilityVAEEncoder, '_run_vae_decoder',
                        lambda self, x: (chunk_sizes.append(x.shape[0]), original(self, x))[1])
    results = _run_lib(pkl, tmp_path / 'out', seeds=range(6), max_batch_size=6, num_steps=2)
    assert results[0].images.shape == (6, 3, 32, 32) and results[0].images.dtype == torch.uint8
    assert chunk_sizes == [4, 2]  # encoder_batch_size=4 overrides the pickle's batch_size=8
    assert PIL.Image.open(tmp_path / 'out' / '000005.png').size == (32, 32)

#----------------------------------------------------------------------------
# Bad input: one clear error line, non-zero exit, no files.


@pytest.mark.parametrize('args,message', [
    (['--seeds=1,x'], "Invalid value for '--seeds': invalid item \"x\""),
    (['--seeds=9-3'], 'start exceeds end'),
    (['--preset=edm2-img512-huge'], 'Invalid configuration preset "edm2-img512-huge"; valid presets: edm2-img512-xs-fid'),
    (['--guidance=2'], 'Please specify --gnet when using guidance'),
    (['--gnet={bad_res}', '--guidance=2'], 'img_resolution 8 != 16'),
    (['--gnet={bad_label}', '--guidance=2'], 'label_dim 3 is neither 0 nor 4'),
    (['--class=9'], '--class=9 is out of range'),
    (['--guidance-interval=3'], 'expected two numbers'),
    (['--plain', '--dtype=bf16'], '--dtype cannot be combined with --plain'),
    (['--solver=dpm++2m', '--S_churn=5'], '--S_churn is only defined for --solver=heun or euler, not dpm++2m'),
    (['--solver=rk4'], "Invalid value for '--solver'"),
])
def test_cli_rejects_bad_input(pkls, tmp_path, args, message):
    out = tmp_path / 'out'
    args = [a.format(**pkls) for a in args]
    result = _invoke('--net', pkls['net'], '--outdir', out, '--steps=2', '--device=cpu', *args)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert 'Traceback' not in result.output
    assert not out.exists() or not os.listdir(out)


def test_cli_rejects_bad_pickles(pkls, tmp_path):
    out = tmp_path / 'out'
    result = _invoke('--net', pkls['no_ema'], '--outdir', out, '--device=cpu')
    assert result.exit_code != 0 and 'no_ema.pkl: not a network snapshot' in result.output
    missing = tmp_path / 'missing.pkl'
    result = _invoke('--net', missing, '--outdir', out, '--device=cpu')
    assert result.exit_code != 0 and 'missing.pkl' in result.output
    garbage = tmp_path / 'garbage.pkl'
    garbage.write_bytes(b'not a pickle at all')
    result = _invoke('--net', garbage, '--outdir', out, '--device=cpu')
    assert result.exit_code != 0 and 'garbage.pkl' in result.output and 'Traceback' not in result.output
    assert not out.exists()


def test_cli_checks_output_paths_before_loading(pkls, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_bytes(b'x')
    result = _invoke('--net', pkls['net'], '--outdir', blocker, '--seeds=0-1', '--steps=2', '--device=cpu')
    assert result.exit_code != 0 and 'Error: --outdir: ' in result.output and 'is a file' in result.output
    assert 'Loading' not in result.output
    out, grid_dir = tmp_path / 'out', tmp_path / 'adir'
    grid_dir.mkdir()
    result = _invoke('--net', pkls['net'], '--outdir', out, '--seeds=0-1', '--steps=2', '--device=cpu', '--grid', grid_dir)
    assert result.exit_code != 0 and 'Error: --grid: ' in result.output and 'is a directory' in result.output
    assert not out.exists()
    result = _invoke('--net', pkls['net'], '--outdir', out, '--seeds=0-1', '--steps=2', '--device=cpu',
                     '--grid', blocker / 'grid.png')
    assert result.exit_code != 0 and 'Error: --grid: ' in result.output and not out.exists()


def test_cli_warns_when_gnet_is_unused(pkls, tmp_path):
    result = _invoke('--net', pkls['net'], '--gnet', pkls['gnet'], '--outdir', tmp_path / 'o', '--seeds=0',
                     '--steps=1', '--device=cpu')
    assert result.exit_code == 0 and result.output.count('Warning: --gnet is ignored') == 1


def test_progress_counts_the_images_of_all_ranks(pkls, monkeypatch):
    monkeypatch.setattr(sampling.dist, 'get_world_size', lambda: 2)
    monkeypatch.setattr(sampling.dist, 'get_rank', lambda: 0)
    monkeypatch.setattr(sampling.dist, 'barrier', lambda: None)
    image_iter = sampling.generate_images(pkls['net'], seeds=range(5), max_batch_size=2, **FAST)
    assert image_iter.num_images == 3 and image_iter.total_images == 5 and sum(image_iter.batch_totals) == 5
    assert len(image_iter.batch_totals) == len(image_iter)

#----------------------------------------------------------------------------
# EDM v1 networks (docs/edm1.md#sampling-from-the-command-line).


def _edm1_pickle(tmp_path, precond='EDMPrecond', **overrides):
    from tests.tiny_edm1 import make_tiny_edm1, write_edm1_snapshot
    path = str(tmp_path / f'{precond}.pkl')
    write_edm1_snapshot(path, make_tiny_edm1(precond, **overrides))
    return path


def _edm1_by_hand(path, seeds, sampler, **options):
    """EDM v1 generate.py's computation for one batch: per-seed latents, then one label draw, float64 result."""
    from training.sampling import edm1_sampler
    from training.snapshots.loading import load_snapshot
    net = load_snapshot(path, '--net')['ema'].eval()
    net.set_fast(False)
    rnd = sampling.StackedRandomGenerator('cpu', seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    labels = torch.eye(net.label_dim)[rnd.randint(net.label_dim, size=[len(seeds)])]
    with torch.no_grad():
        x = sampler(net, latents, labels, randn_like=rnd.randn_like, **options)
    return edm1_sampler.to_uint8(x).permute(0, 2, 3, 1).numpy()


def _png_array(path):
    return np.array(PIL.Image.open(path))


def test_edm1_pickle_samples_like_edm1_generate(tmp_path):
    from training.sampling import edm1_sampler
    pkl = _edm1_pickle(tmp_path, 'VPPrecond')
    common = ['--network', pkl, '--seeds=3-5', '--device=cpu', '--plain']   # EDM v1's name of --net
    result = _invoke(*common, '--outdir', tmp_path / 'edm', '--S_churn=5')
    assert result.exit_code == 0, result.output
    assert 'Sampler: EDM v1 EDM sampler (Alg. 2), 18 steps; network evaluations per image: 35 main' in result.output
    expected = _edm1_by_hand(pkl, [3, 4, 5], edm1_sampler.edm1_sampler, num_steps=18, S_churn=5)
    for i, seed in enumerate([3, 4, 5]):
        assert np.array_equal(_png_array(tmp_path / 'edm' / f'{seed:06d}.png'), expected[i])
    ablation = dict(solver='euler', discretization='vp', schedule='vp', scaling='vp', num_steps=6)
    result = _invoke(*common, '--outdir', tmp_path / 'abl', '--solver=euler', '--disc=vp', '--schedule=vp',
                     '--scaling=vp', '--steps=6')
    assert result.exit_code == 0, result.output
    assert 'EDM v1 ablation sampler: euler (alpha 1), 6 steps, vp time steps, schedule vp, scaling vp' in result.output
    expected = _edm1_by_hand(pkl, [3, 4, 5], edm1_sampler.ablation_sampler, **ablation)
    for i, seed in enumerate([3, 4, 5]):
        assert np.array_equal(_png_array(tmp_path / 'abl' / f'{seed:06d}.png'), expected[i])


def test_edm1_networks_guide_and_take_the_ode_solvers(tmp_path):
    main, guide = _edm1_pickle(tmp_path, 'EDMPrecond'), _edm1_pickle(tmp_path, 'VEPrecond', label_dim=0, seed=3)
    args = ['--net', main, '--seeds=0-3', '--device=cpu', '--steps=3', '--gnet', guide, '--guidance=1.5']
    result = _invoke(*args, '--outdir', tmp_path / 'b4', '--solver=dpm++2m')
    assert result.exit_code == 0, result.output
    assert 'Sampler: dpm++2m, 3 steps, edm time steps; network evaluations per image: 3 main + 3 guide' in result.output
    result = _invoke(*args, '--outdir', tmp_path / 'b1', '--solver=dpm++2m', '--batch=1', '--net-batch=4')
    assert result.exit_code == 0, result.output
    assert sorted(_read_pngs(tmp_path / 'b1')) == sorted(_read_pngs(tmp_path / 'b4'))
    result = _invoke(*args, '--outdir', tmp_path / 'heun')
    assert result.exit_code == 0 and '5 main + 5 guide' in result.output
    assert _read_pngs(tmp_path / 'heun') != _read_pngs(tmp_path / 'b4')


def test_edm1_preset_sets_steps_and_churn_unless_given(tmp_path):
    pkl = _edm1_pickle(tmp_path, 'EDMPrecond', label_dim=0)
    result = _invoke('--preset=edm-cifar10-32x32-uncond-vp', '--net', pkl, '--seeds=0', '--device=cpu',
                     '--outdir', tmp_path / 'out')
    assert result.exit_code == 0 and 'EDM v1 EDM sampler (Alg. 2), 18 steps' in result.output, result.output
    assert cli.preset_sampler_options('edm-imagenet-64x64-cond-adm') == \
        dict(num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
    assert cli.preset_sampler_options('edm2-img64-s-fid') == {} and cli.preset_sampler_options(None) == {}
    result = _invoke('--preset=edm-ffhq-64x64-uncond-vp', '--net', pkl, '--seeds=0', '--device=cpu', '--steps=2',
                     '--outdir', tmp_path / 'steps')
    assert result.exit_code == 0 and 'EDM v1 EDM sampler (Alg. 2), 2 steps' in result.output, result.output


@pytest.mark.parametrize('args, message', [
    (['--disc=iddpm'], '--disc=iddpm belongs to the EDM v1 ablation sampler'),
    (['--scaling=vp'], '--scaling belongs to the EDM v1 ablation sampler'),
])
def test_edm2_networks_refuse_the_edm1_ablation_options(pkls, tmp_path, args, message):
    result = _invoke('--net', pkls['net'], '--outdir', tmp_path / 'out', '--steps=2', '--device=cpu', *args)
    assert result.exit_code != 0 and message in result.output and 'Traceback' not in result.output, result.output
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')
