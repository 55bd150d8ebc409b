"""calculate_metrics.py end to end (click CliRunner, stand-in detectors, tiny image sets and nets)."""

import json
import os
import pickle
import shutil

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import calculate_metrics
from tests import detector_standins as standins
from tests.tiny import make_tiny_precond, write_tiny_snapshot
from training.evaluation import calculate_metrics as metrics
from tests.procs import child_env




@pytest.fixture(scope='module')
def image_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('images'))
    standins.write_images(path, 10, size=16)
    return path


def run(*args):
    result = CliRunner().invoke(calculate_metrics.cmdline, [str(a) for a in args])
    return result


def error_line(result):
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(lines) == 1, result.output
    return lines[0]


def test_ref_then_calc_gives_zero(cache, image_dir, tmp_path):
    dest = tmp_path / 'refs' / 'mine.pkl'
    result = run('ref', '--data', image_dir, '--dest', dest, '--metrics', 'fid,fd_dinov2', '--workers', 0, '--batch', 4)
    assert result.exit_code == 0, result.output
    with open(dest, 'rb') as f:
        stats = pickle.load(f)
    assert stats['num_images'] == 10 and stats['fid']['sigma'].shape == (64, 64) and stats['fid']['mu'].dtype == np.float64
    result = run('calc', '--images', image_dir, '--ref', dest, '--metrics', 'fid,fd_dinov2', '--num', 'all',
                 '--workers', 0, '--batch', 3)
    assert result.exit_code == 0, result.output
    values = {line.split(' = ')[0]: float(line.split(' = ')[1]) for line in result.output.splitlines() if ' = ' in line}
    assert set(values) == {'fid', 'fd_dinov2'}
    assert all(abs(v) < 1e-5 for v in values.values()), values


def test_three_refs_out_and_hist(cache, image_dir, tmp_path):
    base_ref = tmp_path / 'first.pkl'
    assert run('ref', '--data', image_dir, '--dest', base_ref, '--metrics', 'fid', '--workers', 0).exit_code == 0
    shutil.copy(base_ref, tmp_path / 'second.pkl')
    metrics.save_stats(metrics.load_stats(str(base_ref), verbose=False), str(tmp_path / 'third.npz'))
    out = tmp_path / 'results' / 'run1'
    result = run('calc', '--images', image_dir, '--num', 8, '--metrics', 'fid,nima', '--workers', 0,
                 '--ref', base_ref, '--ref', tmp_path / 'second.pkl', '--ref', tmp_path / 'third.npz',
                 '--out', out, '--hist')
    assert result.exit_code == 0, result.output
    with open(f'{out}.json') as f:
        data = json.load(f)
    assert sorted(data['fid']) == ['first', 'second', 'third']
    assert len({round(v, 9) for v in data['fid'].values()}) == 1 and data['fid']['first'] > 0  # 8 of 10 images
    assert data['nima']['sigma'] == pytest.approx(np.sqrt(data['nima']['variance']))
    assert sum(data['nima']['histogram']) == 8
    with open(f'{out}.pkl', 'rb') as f:
        assert set(pickle.load(f)) == {'fid', 'num_images', 'provenance'}
    with PIL.Image.open(f'{out}-nima.png') as image:
        assert image.format == 'PNG'
    assert 'fid on second = ' in result.output


def test_fewer_images_than_num(cache, image_dir):
    line = error_line(run('calc', '--images', image_dir, '--metrics', 'nima', '--workers', 0))
    assert 'Found 10 images, but expected at least 50000' in line and image_dir in line


def test_missing_and_corrupt_reference(cache, image_dir, tmp_path):
    line = error_line(run('calc', '--images', image_dir, '--ref', tmp_path / 'nope.pkl', '--num', 'all'))
    assert 'nope.pkl' in line
    corrupt = tmp_path / 'corrupt.pkl'
    corrupt.write_bytes(b'\x80\x04garbage')
    line = error_line(run('calc', '--images', image_dir, '--ref', corrupt, '--num', 'all'))
    assert 'corrupt.pkl' in line
    assert not os.path.exists(tmp_path / 'out.json')


def test_unknown_metric_and_bad_num(image_dir):
    assert 'Invalid metric "fidd"' in error_line(run('calc', '--images', image_dir, '--metrics', 'fidd'))
    assert 'need at least 2' in error_line(run('calc', '--images', image_dir, '--num', 1))
    assert 'Invalid metric' in error_line(run('ref', '--data', image_dir, '--dest', 'x.pkl', '--metrics', 'x'))
    assert 'give at least one reference' in error_line(run('calc', '--images', image_dir, '--metrics', 'fid'))


def test_bad_dataset_path(cache, tmp_path):
    line = error_line(run('ref', '--data', tmp_path / 'missing.zip', '--dest', tmp_path / 'r.pkl', '--metrics', 'nima'))
    assert 'missing.zip' in line


def test_gen_with_tiny_network(cache, tmp_path):
    snapshot = str(tmp_path / 'net.pkl')
    write_tiny_snapshot(snapshot, net=make_tiny_precond(label_dim=0))
    out, images = tmp_path / 'gen', tmp_path / 'imgs'
    result = run('gen', '--net', snapshot, '--num', 4, '--steps', 2, '--batch', 2, '--metrics', 'nima,fd_dinov2',
                 '--out', out, '--out-images', images)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(images)) == [f'{seed:06d}.png' for seed in range(4)]
    with open(f'{out}.json') as f:
        data = json.load(f)
    assert 1 <= data['nima']['mu'] <= 10 and sum(data['nima']['histogram']) == 4
    assert data['fd_dinov2'] == {}  # no reference: features only
    with open(f'{out}.pkl', 'rb') as f:
        assert pickle.load(f)['fd_dinov2']['mean'].shape == (16,)


def test_help_texts():
    for command in ([], ['calc'], ['gen'], ['ref']):
        result = run(*command, '--help')
        assert result.exit_code == 0 and 'Usage' in result.output


def test_ref_under_torchrun_matches_single_process(cache, image_dir, tmp_path):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = child_env(DNNLIB_CACHE_DIR=cache)
    dest = tmp_path / 'two-ranks.pkl'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'calculate_metrics.py',
           'ref', f'--data={image_dir}', f'--dest={dest}', '--metrics=fid,nima', '--batch=3', '--workers=0']
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(dest, 'rb') as f:
        two = pickle.load(f)
    one = metrics.run_with_progress(metrics.calculate_stats_for_files(
        image_dir, max_batch_size=3, num_workers=0, metrics=['fid', 'nima'], verbose=False, device='cpu'), verbose=False)
    assert two['num_images'] == one['num_images'] == 10
    for metric in ('fid', 'nima'):
        np.testing.assert_allclose(two[metric]['mu'], one[metric]['mu'], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(two[metric]['sigma'], one[metric]['sigma'], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(two['nima']['histogram'], one['nima']['histogram'])


def test_corrupt_image_is_left_out_not_replaced(cache, tmp_path):
    folder = tmp_path / 'corrupt'
    standins.write_images(str(folder), 4, size=16)
    (folder / 'img002.png').write_bytes(b'notapng')
    result = run('calc', '--images', folder, '--num', 'all', '--metrics', 'nima', '--out', tmp_path / 'res',
                 '--workers', 0, '--batch', 4)
    assert result.exit_code == 0, result.output
    assert 'Skipped 1 unreadable file' in result.output and 'img002.png' in result.output
    with open(tmp_path / 'res.json') as f:
        assert sum(json.load(f)['nima']['histogram']) == 3  # not 4: no image counted twice
    dest = tmp_path / 'ref.pkl'
    assert run('ref', '--data', folder, '--dest', dest, '--metrics', 'fid', '--workers', 0).exit_code == 0
    with open(dest, 'rb') as f:
        assert pickle.load(f)['num_images'] == 3


def _official_stats(records):
    """Consume progress records as scripts written for the official library do: stats of the last batch."""
    stats, counts = None, []
    for r in records:
        counts.append(r.num_images)
        if r.batch_idx == r.num_batches - 1:
            stats = r.stats
    return stats, counts


def test_library_sources_return_progress_records(cache, image_dir, tmp_path):
    records = metrics.calculate_stats_for_files(image_dir, max_batch_size=4, num_workers=0, metrics=['nima'],
                                                verbose=False, device='cpu')
    assert len(records) == 3  # 10 images in batches of 4, 3, 3
    stats, counts = _official_stats(records)
    assert stats['num_images'] == 10 and counts == [4, 7, 10]
    snapshot = str(tmp_path / 'net.pkl')
    write_tiny_snapshot(snapshot, net=make_tiny_precond())
    records = metrics.calculate_stats_for_network(snapshot, seeds=range(3), max_batch_size=2, metrics=['nima'],
                                                  verbose=False, device='cpu', num_steps=2)
    assert len(records) == 2
    stats, counts = _official_stats(records)
    assert stats['num_images'] == 3 and counts == [2, 3] and stats['nima']['histogram'].sum() == 3


def test_gen_guidance_without_gnet_guides_with_the_unlabeled_main_net(cache, tmp_path):
    snapshot = str(tmp_path / 'cnet.pkl')
    write_tiny_snapshot(snapshot, net=make_tiny_precond(label_dim=5))
    common = ('gen', '--net', snapshot, '--num', 2, '--steps', 2, '--metrics', 'nima')
    assert run(*common, '--out-images', tmp_path / 'plain').exit_code == 0
    assert run(*common, '--out-images', tmp_path / 'guided', '--guidance', 3).exit_code == 0
    name = '000000.png'
    assert (tmp_path / 'plain' / name).read_bytes() != (tmp_path / 'guided' / name).read_bytes()
    result = run(*common, '--gnet', snapshot, '--out-images', tmp_path / 'w1')
    assert result.exit_code == 0 and 'Warning: --gnet is ignored' in result.output
    assert (tmp_path / 'w1' / name).read_bytes() == (tmp_path / 'plain' / name).read_bytes()


def test_gen_takes_the_solver_options_of_generate_images(cache, tmp_path):
    from training.sampling.generate_images import generate_images
    snapshot = str(tmp_path / 'cnet.pkl')
    write_tiny_snapshot(snapshot, net=make_tiny_precond(label_dim=5))
    result = run('gen', '--net', snapshot, '--num', 2, '--steps', 3, '--metrics', 'nima', '--solver', 'ipndm',
                 '--disc', 'logsnr', '--out-images', tmp_path / 'gen')
    assert result.exit_code == 0, result.output
    assert 'Sampler: ipndm, 3 steps, logsnr time steps; network evaluations per image: 3 main' in result.output
    list(generate_images(snapshot, seeds=range(2), num_steps=3, solver='ipndm', discretization='logsnr',
                         outdir=str(tmp_path / 'lib'), device='cpu', verbose=False))
    for name in ('000000.png', '000001.png'):
        assert (tmp_path / 'gen' / name).read_bytes() == (tmp_path / 'lib' / name).read_bytes()


def test_gen_samples_edm1_networks_with_their_samplers(cache, tmp_path):
    from tests.tiny_edm1 import make_tiny_edm1, write_edm1_snapshot
    from training.sampling.generate_images import generate_images
    snapshot = str(tmp_path / 'v1.pkl')
    write_edm1_snapshot(snapshot, make_tiny_edm1('VEPrecond', label_dim=0))
    options = dict(num_steps=4, solver='euler', discretization='ve', schedule='ve', scaling='none', alpha=None)
    result = run('gen', '--net', snapshot, '--num', 2, '--metrics', 'nima', '--steps', 4, '--solver', 'euler',
                 '--disc', 've', '--schedule', 've', '--scaling', 'none', '--out-images', tmp_path / 'gen',
                 '--out', tmp_path / 'res')
    assert result.exit_code == 0, result.output
    assert 'EDM v1 ablation sampler: euler (alpha 1), 4 steps, ve time steps, schedule ve, scaling none' in result.output
    with open(tmp_path / 'res.json') as f:
        provenance = json.load(f)['provenance']
    assert (provenance['solver'], provenance['discretization'], provenance['schedule']) == ('euler', 've', 've')
    list(generate_images(snapshot, seeds=range(2), outdir=str(tmp_path / 'lib'), device='cpu', verbose=False, **options))
    for name in ('000000.png', '000001.png'):
        assert (tmp_path / 'gen' / name).read_bytes() == (tmp_path / 'lib' / name).read_bytes()


def test_output_paths_checked_before_computing(cache, image_dir, tmp_path):
    blocker = tmp_path / 'garbage.pkl'
    blocker.write_bytes(b'x')
    for dest, metric, message in ((blocker / 'x.pkl', 'nima', 'is a file'), (tmp_path / 'v1.npz', 'nima', 'add fid'),
                                  (tmp_path, 'nima', 'is a directory')):
        result = run('ref', '--data', image_dir, '--dest', dest, '--metrics', metric, '--workers', 0)
        assert '--dest' in error_line(result) and message in error_line(result)
        assert 'Calculating statistics' not in result.output
    bad = tmp_path / 'bad'
    (tmp_path / 'bad.json').write_text('{"fid": 3.2}')
    result = run('calc', '--images', image_dir, '--num', 'all', '--metrics', 'nima', '--out', bad, '--workers', 0)
    assert 'bad.json exists (results of an earlier run)' in error_line(result)
    assert 'Calculating statistics' not in result.output
    line = error_line(run('gen', '--net', blocker, '--num', 2, '--metrics', 'nima', '--out-images', blocker))
    assert '--out-images' in line and 'is a file' in line


def test_small_messages(cache, image_dir, tmp_path):
    assert '--num all' in error_line(run('calc', '--images', image_dir, '--metrics', 'nima', '--workers', 0))
    result = run('calc', '--images', image_dir, '--num', 'all', '--metrics', 'nima', '--workers', 0, '--hist')
    assert result.exit_code == 0 and 'Warning: --hist has no effect without --out' in result.output
    line = error_line(run('ref', '--data', image_dir, '--dest', tmp_path / 'r.pkl', '--metrics', 'nima',
                          '--top-percent', 50))
    assert line.count(os.path.basename(image_dir)) == 1, line


def test_help_torchrun_examples_separate_the_script():
    # torchrun would read e.g. --num after the script name as an abbreviation of its --numa-binding.
    lines = [line for line in run('--help').output.splitlines() if line.strip().startswith('torchrun')]
    assert lines and all(' -- ' in line for line in lines)


def test_results_record_provenance_refuse_overwriting_and_serve_as_a_reference(cache, image_dir, tmp_path):
    # Issue #15, 9.
    ref = tmp_path / 'ref.pkl'
    assert run('ref', '--data', image_dir, '--dest', ref, '--metrics', 'fid', '--workers', 0).exit_code == 0
    out = tmp_path / 'res'
    result = run('calc', '--images', image_dir, '--num', 8, '--seed', 3, '--metrics', 'fid,nima', '--ref', ref,
                 '--out', out, '--workers', 0)
    assert result.exit_code == 0, result.output
    with open(f'{out}.json') as f:
        provenance = json.load(f)['provenance']
    assert (provenance['command'], provenance['images'], provenance['num'], provenance['seed']) == ('calc', image_dir, 8, 3)
    assert provenance['num_images'] == 8 and provenance['detectors']['fid'].startswith('InceptionV3Detector, 64 features')
    with open(ref, 'rb') as f:
        digest = __import__('hashlib').sha256(f.read()).hexdigest()
    assert provenance['references'] == {'ref': dict(path=str(ref), size=os.path.getsize(ref), sha256=digest,
                                                    mtime=provenance['references']['ref']['mtime'])}
    assert provenance['toolkit'] and provenance['time'].endswith('+00:00')
    before = (open(f'{out}.json').read(), open(f'{out}.pkl', 'rb').read())
    line = error_line(run('calc', '--images', image_dir, '--num', 'all', '--metrics', 'nima', '--out', out, '--workers', 0))
    assert f'--out: {out}.json exists (results of an earlier run)' in line
    assert (open(f'{out}.json').read(), open(f'{out}.pkl', 'rb').read()) == before
    # OUT.pkl is a reference file: the same 8 images against it give FID 0.
    result = run('calc', '--images', image_dir, '--num', 8, '--seed', 3, '--metrics', 'fid', '--ref', f'{out}.pkl',
                 '--workers', 0)
    assert result.exit_code == 0, result.output
    assert abs(float(result.output.split('fid = ')[1].split()[0])) < 1e-6


def test_gen_results_record_the_network_and_sampler(cache, tmp_path):
    snapshot = str(tmp_path / 'net.pkl')
    write_tiny_snapshot(snapshot, net=make_tiny_precond(label_dim=0))
    out = tmp_path / 'gen'
    result = run('gen', '--net', snapshot, '--num', 2, '--steps', 2, '--seed', 5, '--guidance', 2, '--metrics', 'nima',
                 '--out', out)
    assert result.exit_code == 0, result.output
    with open(f'{out}.json') as f:
        provenance = json.load(f)['provenance']
    assert provenance['net']['path'] == snapshot and len(provenance['net']['sha256']) == 64 and provenance['gnet'] is None
    assert (provenance['guide'], provenance['guidance'], provenance['num_steps'], provenance['seeds']) == \
        ('net, without labels', 2.0, 2, '5-6')


def test_ref_with_scorers_only_warns_and_is_not_read(cache, image_dir, tmp_path):
    # Issue #15, 8: --ref when only NIMA is requested.
    result = run('calc', '--images', image_dir, '--num', 'all', '--metrics', 'nima', '--ref', tmp_path / 'absent.pkl',
                 '--workers', 0)
    assert result.exit_code == 0, result.output
    assert 'Warning: --ref is not used: nima need no reference (only fid and fd_dinov2 do)' in result.output


def test_statistics_carry_a_detector_marker_and_other_detectors_are_refused(cache, image_dir, tmp_path, capsys):
    # Issue #15, 12: the stand-in is accepted as Inception, but with a warning and a marker.
    ref = tmp_path / 'ref.pkl'
    result = run('ref', '--data', image_dir, '--dest', ref, '--metrics', 'fid', '--workers', 0)
    assert result.exit_code == 0 and 'gives 64 features, not the 2048 of the official Inception-v3' in result.output
    stats = metrics.load_stats(str(ref), verbose=False)
    marker = stats['fid']['detector']
    assert marker['detector'] == 'InceptionV3Detector' and marker['feature_dim'] == 64 and len(marker['probe']) == 8
    other = dict(stats, fid=dict(stats['fid'], detector=dict(marker, probe=[v + 1 for v in marker['probe']])))
    metrics.save_stats(other, str(tmp_path / 'other.pkl'))
    line = error_line(run('calc', '--images', image_dir, '--num', 'all', '--metrics', 'fid', '--ref', tmp_path / 'other.pkl',
                          '--workers', 0))
    assert 'fid: the reference was computed with another detector (InceptionV3Detector, 64 features)' in line
