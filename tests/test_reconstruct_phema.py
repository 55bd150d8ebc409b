"""Tests for training/snapshots/reconstruct_phema.py and the reconstruct_phema.py CLI.

A simulated training run of a tiny Precond (smooth parameter trajectory)
tracks power-function EMAs with stds 0.050, 0.100, 0.150 and writes official-
layout snapshots at kimg 1..8; the tests reconstruct profiles from them.
"""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import reconstruct_phema
from tests.tiny import SIMULATED_STDS, make_tiny_precond, simulate_ema_run, write_tiny_snapshot
from torch_utils import persistence
from training import phema
from training.snapshots import reconstruct_phema as pr
from training.snapshots import safetensors_format as sf
from training.sampling import generate_images as sampling

STDS = list(SIMULATED_STDS)


def _flat(net):
    return torch.cat([p.detach().double().flatten() for p in net.parameters()])


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('run'))
    simulate_ema_run(path)
    return path


def _load(path):
    return persistence.load_pickle(path)


def _snapshot(run_dir, kimg, std):
    return _load(os.path.join(run_dir, f'network-snapshot-{kimg:07d}-{std:.3f}.pkl'))


def _cli(*args, env=None):
    return CliRunner().invoke(reconstruct_phema.cmdline, list(args), env=env)


#----------------------------------------------------------------------------
# Std lists and names.


def test_parse_std_list_ranges():
    values = pr.parse_std_list('0.010,0.015,...,0.250')
    assert len(values) == 49  # docs/differences.md#phema-1: not 31
    np.testing.assert_allclose(values, np.arange(49) * 0.005 + 0.010, atol=1e-12)
    assert values[4] == 0.030  # rounded, so names and --instd matching are exact
    assert pr.parse_std_list('0.2, 0.05,0.1,0.05') == [0.05, 0.1, 0.2]
    assert pr.parse_std_list('0.05,0.1,...,0.25,0.02') == [0.02, 0.05, 0.1, 0.15, 0.2, 0.25]
    assert pr.parse_std_list([0.3, 0.1]) == [0.3, 0.1]  # lists pass through


@pytest.mark.parametrize('text,message', [
    ('0.1,abc', 'not a float'),
    ('0.1,...,0.2', 'preceded by at least two floats'),
    ('0.1,0.2,...', 'followed by at least one float'),
    ('0.1,0.1,...,0.2', 'must not be equal'),
    ('0.1,0.2,...,0.25', 'non-empty interval'),
    ('0.1,0.2,...,0.45', 'evenly spaced'),
    ('0.3', 'less than 0.289'),
    ('0,0.1', 'positive'),
    ('', 'empty'),
])
def test_parse_std_list_errors(text, message):
    with pytest.raises(ValueError, match=message):
        pr.parse_std_list(text)


def test_names_and_discovery(run_dir, tmp_path):
    assert pr.kimg_to_nimg(2147483) == 2048 << 20 and pr.kimg_to_nimg(8) == 8192
    assert pr.pickle_path('out', 'phema', 2048 << 20, 0.15) == os.path.join('out', 'phema-2147483-0.150.pkl')
    assert pr.pickle_path('https://x/y/', 'p', 1024, 0.1) == 'https://x/y/p-0000001-0.100.pkl'
    found = pr.list_input_pickles(run_dir)
    assert len(found) == 24 and found[0].prefix == 'network-snapshot'
    assert [(f.nimg, f.std) for f in found[:4]] == [(1024, 0.05), (1024, 0.1), (1024, 0.15), (2048, 0.05)]
    assert len(pr.list_input_pickles(run_dir, in_std=[0.05, 0.15])) == 16
    assert len(pr.list_input_pickles(run_dir, in_prefix='network')) == 0
    with pytest.raises(pr.PhemaError, match='does not exist'):
        pr.list_input_pickles(str(tmp_path / 'missing'))


#----------------------------------------------------------------------------
# Reconstruction.


def _reconstruct(in_pkls, out_std, **kwargs):
    outs = []
    for record in pr.reconstruct_phema(in_pkls, out_std, verbose=False, **kwargs):
        outs += record.out
    return outs


def test_tracked_profile_is_recovered_exactly(run_dir):
    in_pkls = pr.list_input_pickles(run_dir)
    for kimg in [8, 4]:
        [out] = _reconstruct(in_pkls, 0.150, out_nimg=pr.kimg_to_nimg(kimg))
        ref = _snapshot(run_dir, kimg, 0.150).ema
        assert out.nimg == kimg * 1024 and out.std == 0.150 and out.pkl_path is None
        assert all(p.dtype == torch.float16 for p in out.net.parameters())
        err = (_flat(out.net) - _flat(ref)).norm() / _flat(ref).norm()
        assert err < 1e-6
        assert out.net.unet.emb_fourier.freqs[0].item() == 2 * kimg  # buffers of the last used input


def test_untracked_profile_is_approximated_from_the_others(run_dir):
    # 0.150 from the 0.050/0.100 snapshots only: close to the EMA tracked during the "training".
    in_pkls = pr.list_input_pickles(run_dir, in_std=[0.05, 0.10])
    [out] = _reconstruct(in_pkls, 0.150)
    tracked, neighbour = _flat(_snapshot(run_dir, 8, 0.150).ema), _flat(_snapshot(run_dir, 8, 0.100).ema)
    assert (_flat(out.net) - tracked).norm() < 0.05 * (neighbour - tracked).norm()
    # The streamed float32 accumulation equals the float64 combination of the inputs (up to float16 output).
    X = phema.solve_posthoc_coefficients([p.nimg for p in in_pkls], [p.std for p in in_pkls], 8192, 0.150)[:, 0]
    assert abs(X.sum() - 1) < 1e-12
    expected = sum(x * _flat(_load(p.path).ema) for x, p in zip(X, in_pkls))
    torch.testing.assert_close(_flat(out.net), expected.half().double(), rtol=1e-3, atol=1e-3)


def test_batching_does_not_change_results(run_dir, tmp_path):
    in_pkls = pr.list_input_pickles(run_dir, in_std=[0.05, 0.10])
    stds = [0.03, 0.07, 0.12, 0.2]
    one = _reconstruct(in_pkls, stds, max_batch_size=1, out_dir=str(tmp_path / 'b1'))
    eight = _reconstruct(in_pkls, stds, max_batch_size=8, out_dir=str(tmp_path / 'b8'))
    assert [o.std for o in one] == [o.std for o in eight] == stds
    for a, b in zip(one, eight):
        da, db = _load(a.pkl_path), _load(b.pkl_path)
        assert list(da.keys()) == list(db.keys()) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema']
        sa, sb = da.ema.state_dict(), db.ema.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(_flat(one[0].net), _flat(one[1].net))


def test_progress_records(run_dir):
    in_pkls = pr.list_input_pickles(run_dir, in_std=[0.10])
    records = list(pr.reconstruct_phema(in_pkls, [0.05, 0.1, 0.2], max_batch_size=2, verbose=False))
    assert [r.step_idx for r in records] == list(range(16)) and all(r.num_steps == 16 for r in records)
    assert [len(r.out) for r in records] == [0] * 7 + [2] + [0] * 7 + [1]


def test_library_errors(run_dir, tmp_path):
    in_pkls = pr.list_input_pickles(run_dir)
    with pytest.raises(pr.PhemaError, match='No input pickles'):
        pr.reconstruct_phema([], 0.1)
    with pytest.raises(pr.PhemaError, match='must match one of the input pickles'):
        pr.reconstruct_phema(in_pkls, 0.1, out_nimg=3000)
    twice = in_pkls + [dict(in_pkls[0], path='other.pkl')]
    with pytest.raises(pr.PhemaError, match='Two input pickles for kimg 1'):
        pr.reconstruct_phema([type(in_pkls[0])(p) for p in twice], 0.1)
    kimg0 = [type(in_pkls[0])(in_pkls[0], nimg=0)]
    with pytest.raises(pr.PhemaError, match='No valid input pickles'):
        pr.reconstruct_phema(kimg0, 0.1)


#----------------------------------------------------------------------------
# Command line.


def test_cli_end_to_end(run_dir, tmp_path):
    out_dir = str(tmp_path / 'out')
    res = _cli(f'--indir={run_dir}', f'--outdir={out_dir}', '--outstd=0.010,0.030,...,0.070,0.150',
               '--instd=0.050,0.100', '--batch=2')
    assert res.exit_code == 0, res.output
    assert 'Loading 16 input pickles...' in res.output
    assert 'Reconstructing 5 output pickles in 3 batches...' in res.output
    assert 'Warning: std 0.010 is poorly represented' in res.output
    assert 'Warning: std 0.150' not in res.output
    names = sorted(os.listdir(out_dir))
    assert names == [f'phema-0000008-{s}.pkl' for s in ['0.010', '0.030', '0.050', '0.070', '0.150']]
    data = _load(os.path.join(out_dir, names[-1]))
    assert data.dataset_kwargs.class_name == 'training.dataset.ImageFolderDataset'
    assert data.ema.unet.out_gain.dtype == torch.float16
    x = torch.randn(2, 3, 16, 16)
    assert torch.isfinite(data.ema(x, torch.tensor([0.5, 2.0]))).all()
    # The output is a snapshot that the sampler accepts as --net.
    [batch] = list(sampling.generate_images(os.path.join(out_dir, names[-1]), seeds=[3], device='cpu',
                                            num_steps=2, verbose=False))
    assert batch.images.shape == (1, 3, 16, 16) and batch.images.dtype == torch.uint8
    # --skip: only the missing output is computed; nothing left is a clean no-op (docs/differences.md#phema-2).
    res = _cli(f'--indir={run_dir}', f'--outdir={out_dir}', '--outstd=0.070,0.200', '--outprefix=phema', '--skip')
    assert res.exit_code == 0, res.output
    assert 'Reconstructing 1 output pickles in 1 batches' in res.output
    res = _cli(f'--indir={run_dir}', f'--outdir={out_dir}', '--outstd=0.070,0.200', '--skip')
    assert res.exit_code == 0 and 'already exist' in res.output and 'nothing to do' in res.output


def test_cli_outkimg_and_prefix(run_dir, tmp_path):
    out_dir = str(tmp_path / 'out')
    res = _cli(f'--indir={run_dir}', f'--outdir={out_dir}', '--outstd=0.15', '--outkimg=4',
               '--inprefix=network-snapshot', '--outprefix=rec')
    assert res.exit_code == 0, res.output
    assert 'Loading 12 input pickles...' in res.output
    assert os.listdir(out_dir) == ['rec-0000004-0.150.pkl']


def _bad(args, message, env=None):
    res = _cli(*args, env=env)
    assert res.exit_code != 0, res.output
    assert message in res.output, res.output
    return res


def test_cli_bad_input(run_dir, tmp_path):
    out = f'--outdir={tmp_path / "out"}'
    empty = tmp_path / 'empty'
    empty.mkdir()
    _bad([f'--indir={empty}', out, '--outstd=0.1'], 'No input pickles')
    _bad([f'--indir={tmp_path / "nowhere"}', out, '--outstd=0.1'], 'Input directory does not exist')
    _bad([f'--indir={run_dir}', out, '--outstd=0.1,0.2,...,0.45'], "Invalid value for '--outstd'")
    _bad([f'--indir={run_dir}', out, '--outstd=0.1', '--instd=x'], "Invalid value for '--instd'")
    _bad([f'--indir={run_dir}', out, '--outstd=0.1', '--outkimg=9'], 'beyond the last input pickle (kimg 8)')
    _bad([f'--indir={run_dir}', out, '--outstd=0.1', '--batch=0'], "Invalid value for '--batch'")
    _bad([f'--indir={run_dir}', out, '--outstd=0.1'], 'Distributed execution is not supported', env={'WORLD_SIZE': '2'})
    assert not os.path.exists(tmp_path / 'out')


def test_cli_mixed_architectures(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    write_tiny_snapshot(str(run / 'net-0000001-0.100.pkl'), net=make_tiny_precond())
    write_tiny_snapshot(str(run / 'net-0000002-0.100.pkl'), net=make_tiny_precond(model_channels=16))
    res = _bad([f'--indir={run}', f'--outdir={tmp_path / "out"}', '--outstd=0.1'], 'network architecture differs')
    assert 'net-0000002-0.100.pkl' in res.output
    assert not os.path.exists(tmp_path / 'out')
    (run / 'net-0000003-0.100.pkl').write_bytes(b'not a pickle')
    os.remove(run / 'net-0000002-0.100.pkl')
    res = _bad([f'--indir={run}', f'--outdir={tmp_path / "out"}', '--outstd=0.1'], 'net-0000003-0.100.pkl')


def test_cli_refuses_edm1_snapshots_with_one_line(tmp_path):
    """EDM v1 snapshots hold a classic EMA, not a power-function profile: nothing to reconstruct from."""
    from tests.tiny_edm1 import write_edm1_snapshot
    run = tmp_path / 'run'
    run.mkdir()
    for kimg in (1, 2):
        write_edm1_snapshot(str(run / f'network-snapshot-{kimg:07d}-0.100.pkl'))
    res = _bad([f'--indir={run}', f'--outdir={tmp_path / "out"}', '--outstd=0.1'],
               'holds an EDM v1 network (EDMPrecond) with a classic EMA, not a power-function EMA profile')
    assert [line for line in res.output.splitlines() if 'Error' in line] == [res.output.splitlines()[0]]
    assert not os.path.exists(tmp_path / 'out')


def test_cli_unusable_outdir_fails_before_loading_inputs(run_dir, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(pr, '_load_input', lambda path, reference: loaded.append(path))
    afile = tmp_path / 'afile'
    afile.write_text('x')
    for outdir in [afile, afile / 'sub']:
        res = _bad([f'--indir={run_dir}', f'--outdir={outdir}', '--outstd=0.1'], '--outdir')
        error = [line for line in res.output.splitlines() if line.startswith('Error:')]
        assert len(error) == 1 and 'is a file, not a directory' in error[0] and 'Loading' not in res.output
    assert loaded == [] and afile.read_text() == 'x'
    with pytest.raises(pr.PhemaError, match='Output directory'):  # the library checks too
        pr.reconstruct_phema(pr.list_input_pickles(run_dir), 0.1, out_dir=str(afile / 'sub'), verbose=False)
    _bad([f'--indir={run_dir}', f'--outdir={tmp_path}', '--outstd=0.1'], 'WORLD_SIZE="x" is not an integer',
         env={'WORLD_SIZE': 'x'})


def test_cli_refuses_mixed_prefixes_without_inprefix(run_dir, tmp_path):
    indir = tmp_path / 'in'
    indir.mkdir()
    for name in sorted(os.listdir(run_dir))[:6]:
        os.symlink(os.path.join(run_dir, name), indir / name)
    res = _cli(f'--indir={indir}', f'--outdir={indir}', '--outstd=0.07')   # one prefix: the official behaviour
    assert res.exit_code == 0, res.output
    res = _bad([f'--indir={indir}', f'--outdir={indir}', '--outstd=0.15'], '--inprefix')
    error = [line for line in res.output.splitlines() if line.startswith('Error:')]
    assert len(error) == 1 and '2 prefixes (network-snapshot, phema)' in error[0] and 'Loading' not in res.output
    assert len(os.listdir(indir)) == 7
    res = _cli(f'--indir={indir}', f'--outdir={indir}', '--outstd=0.15', '--inprefix=network-snapshot')
    assert res.exit_code == 0 and 'Loading 6 input pickles' in res.output, res.output


def test_output_keeps_the_first_inputs_entries_and_the_last_inputs_buffers(tmp_path):
    """docs/formats.md#post-hoc-ema-reconstructions: the output inherits the first input's encoder/dataset_kwargs/loss_fn."""
    indir = tmp_path / 'in'
    indir.mkdir()
    for kimg in (1, 2, 3):
        for std in (0.05, 0.1):
            net = make_tiny_precond(train=False)
            net.unet.emb_fourier.phases.fill_(kimg)        # a buffer: the last input's value wins
            persistence.save_pickle(dict(ema=net, encoder=None, loss_fn=None, dataset_kwargs=dict(path=f'data-{kimg}')),
                                    str(indir / f'network-snapshot-{kimg:07d}-{std:.3f}.pkl'))
    results = list(pr.reconstruct_phema(in_pkls=pr.list_input_pickles(str(indir)), out_std=[0.07],
                                        out_dir=str(tmp_path / 'out'), verbose=False))
    data = results[-1].out[0].pkl_data
    assert data['dataset_kwargs'] == dict(path='data-1')
    assert list(data.keys()) == ['ema', 'encoder', 'loss_fn', 'dataset_kwargs']
    assert bool((data['ema'].unet.emb_fourier.phases == 3).all())


#----------------------------------------------------------------------------
# Outputs without pickle (--format=safetensors, --convert).


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _profile(path):
    with open(path[:-len('.safetensors')] + '.json') as f:
        return json.load(f)['ema_profile']


def test_cli_safetensors_output_equals_the_pickle_output(run_dir, tmp_path):
    pkl_dir, st_dir = str(tmp_path / 'pkl'), str(tmp_path / 'st')
    assert _cli(f'--indir={run_dir}', f'--outdir={pkl_dir}', '--outstd=0.070').exit_code == 0
    args = [f'--indir={run_dir}', f'--outdir={st_dir}', '--outstd=0.070', '--format=safetensors',
            '--license=cc-by-nc-sa-4.0']
    res = _cli(*args)
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(st_dir)) == ['README.md', 'phema-0000008-0.070.json', 'phema-0000008-0.070.safetensors']
    weights = os.path.join(st_dir, 'phema-0000008-0.070.safetensors')
    assert _same_weights(sf.load_snapshot_safetensors(weights).ema, _load(os.path.join(pkl_dir, 'phema-0000008-0.070.pkl')).ema)
    assert _profile(weights) == dict(std=0.07, nimg=8192)
    assert 'license: cc-by-nc-sa-4.0\n' in open(os.path.join(st_dir, 'README.md')).read()
    res = _cli(*args, '--skip')   # the .json is written last: its presence means the export is complete
    assert res.exit_code == 0 and 'nothing to do' in res.output, res.output
    os.remove(weights[:-len('.safetensors')] + '.json')
    res = _cli(*args, '--skip')
    assert res.exit_code == 0 and 'Reconstructing 1 output pickles' in res.output, res.output


def test_cli_convert_writes_the_inputs_as_they_are(run_dir, tmp_path):
    out_dir = str(tmp_path / 'out')
    args = [f'--indir={run_dir}', f'--outdir={out_dir}', '--convert', '--instd=0.100', '--inprefix=network-snapshot']
    res = _cli(*args)
    assert res.exit_code == 0 and 'Converting 8 input pickles' in res.output, res.output
    names = [f'network-snapshot-{kimg:07d}-0.100' for kimg in range(1, 9)]
    assert sorted(os.listdir(out_dir)) == ['README.md'] + sorted(n + ext for n in names for ext in ('.json', '.safetensors'))
    weights = os.path.join(out_dir, names[-1] + '.safetensors')
    loaded = sf.load_snapshot_safetensors(weights)
    assert _same_weights(loaded.ema, _snapshot(run_dir, 8, 0.1).ema)
    assert _profile(weights) == dict(std=0.1, nimg=8192)
    mtime = os.stat(weights).st_mtime_ns
    assert _cli(*args, '--skip').exit_code == 0 and os.stat(weights).st_mtime_ns == mtime
    _bad(args + ['--outstd=0.1'], 'takes no --outstd')
    _bad([f'--indir={run_dir}', f'--outdir={out_dir}'], "Missing option '--outstd'")
    os.remove(os.path.join(out_dir, 'README.md'))
    (tmp_path / 'out' / 'README.md').write_text('notes\n')
    _bad(args, 'README.md exists and is not a model card')
