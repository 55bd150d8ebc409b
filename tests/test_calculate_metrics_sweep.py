"""calculate_metrics.py sweep and ref --features end to end (click CliRunner, stand-in detectors, a simulated
tiny training run): the sweep equals reconstruct_phema.py + calculate_metrics.py gen point by point, and a
killed sweep resumes to identical results without computing a point twice."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import calculate_metrics
import reconstruct_phema
from tests import detector_standins as standins
from tests.tiny import make_tiny_precond, simulate_ema_run, write_tiny_snapshot
from torch_utils import persistence
from training.evaluation import calculate_metrics as metrics
from training.evaluation import detectors
from training.evaluation import precision_recall as pr
from training.evaluation import sweep

EMAS = [0.05, 0.1, 0.15]
GUIDANCE = [1, 1.5, 2.5]
GUIDE_EMA, GUIDE_KIMG = 0.1, 4
NUM, STEPS, BATCH = 8, 2, 4
METRICS = 'fid,nima,pr'  # a Frechet distance, a scorer, and precision/recall


def run(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args])


def error_line(result):
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(lines) == 1, result.output
    return lines[0]


def sweep_args(data, out, *extra):
    return ('sweep', '--indir', data['run'], '--ema', ','.join(map(str, EMAS)), '--guide-ema', GUIDE_EMA,
            '--guide-kimg', GUIDE_KIMG, '--guidance', ','.join(map(str, GUIDANCE)), '--ref', data['ref'],
            '--metrics', METRICS, '--num', NUM, '--steps', STEPS, '--batch', BATCH, '--ema-batch', 2,
            '--out', out, *extra)


def read_lines(base):
    with open(f'{base}.jsonl') as f:
        return [json.loads(line) for line in f]


def by_key(lines):
    return {sweep.point_key(line['point']): line for line in lines}


@pytest.fixture(scope='module')
def data(tmp_path_factory, cache_root):
    """A simulated run, reference images with stored features, and one uninterrupted sweep over it."""
    root = tmp_path_factory.mktemp('sweep')
    paths = dict(run=str(root / 'run'), images=str(root / 'images'), ref=str(root / 'ref.pkl'), full=str(root / 'full'))
    simulate_ema_run(paths['run'])
    standins.write_images(paths['images'], 12, size=16)
    with pytest.MonkeyPatch.context() as mp:
        standins.use_cache(mp, cache_root)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = run(calculate_metrics.cmdline, 'ref', '--data', paths['images'], '--dest', paths['ref'],
                         '--metrics', 'fid,fd_dinov2', '--features', 'all', '--workers', 0)
            assert result.exit_code == 0, result.output
            result = run(calculate_metrics.cmdline, *sweep_args(paths, paths['full'], '--save-nets', root / 'nets'))
            assert result.exit_code == 0, result.output
            paths['output'] = result.output
        finally:
            torch.set_num_threads(threads)
            detectors.clear_detector_cache()
    return paths


def test_sweep_equals_reconstruct_phema_plus_gen(cache, data, tmp_path):
    lines = read_lines(data['full'])
    assert len(lines) == len(EMAS) * len(GUIDANCE) and len(by_key(lines)) == len(lines)
    assert run(reconstruct_phema.cmdline, '--indir', data['run'], '--outdir', tmp_path / 'main', '--outstd',
               ','.join(map(str, EMAS))).exit_code == 0
    assert run(reconstruct_phema.cmdline, '--indir', data['run'], '--outdir', tmp_path / 'guide', '--outstd', GUIDE_EMA,
               '--outkimg', GUIDE_KIMG).exit_code == 0
    [guide] = [os.path.join(tmp_path / 'guide', name) for name in os.listdir(tmp_path / 'guide')]
    for line in lines:
        point = line['point']
        net = os.path.join(tmp_path / 'main', f'phema-0000008-{point["net"]["ema"]:.3f}.pkl')
        out = tmp_path / f'gen-{point["net"]["ema"]}-{point["guidance"]}'
        guided = ('--gnet', guide) if point['guidance'] != 1 else ()
        result = run(calculate_metrics.cmdline, 'gen', '--net', net, *guided, '--guidance', point['guidance'],
                     '--ref', data['ref'], '--metrics', 'fid,nima', '--num', NUM, '--steps', STEPS,
                     '--batch', BATCH, '--out', out)
        assert result.exit_code == 0, result.output
        with open(f'{out}.json') as f:
            expected = json.load(f)
        assert line['results']['fid'] == expected['fid'] and line['results']['nima'] == expected['nima']
        assert line['seeds'] == [0, NUM - 1] and line['num_images'] == NUM
        assert 0 <= line['results']['precision_inception']['ref'] <= 1
    assert len({line['results']['fid']['ref'] for line in lines}) == len(lines)  # every point differs
    # --save-nets wrote the networks reconstruct_phema.py writes.
    for name in os.listdir(tmp_path / 'main'):
        mine = persistence.load_pickle(os.path.join(os.path.dirname(data['full']), 'nets', name))['ema'].state_dict()
        theirs = persistence.load_pickle(os.path.join(tmp_path / 'main', name))['ema'].state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_killed_sweep_resumes_without_recomputing(cache, data, tmp_path, monkeypatch):
    evaluate, calls = sweep.evaluate_point, []

    def killed_after(n):
        def wrapper(net, encoder, gnet, point, *args, **kwargs):
            if len(calls) == n:
                raise KeyboardInterrupt  # killed during the evaluation of point n + 1
            calls.append(sweep.point_key(point))
            return evaluate(net, encoder, gnet, point, *args, **kwargs)
        return wrapper

    base = tmp_path / 'resumed'
    monkeypatch.setattr(sweep, 'evaluate_point', killed_after(4))
    assert run(calculate_metrics.cmdline, *sweep_args(data, base)).exit_code != 0
    assert len(read_lines(base)) == 4
    with open(f'{base}.jsonl', 'ab') as f:
        f.write(b'{"point": {"net": {"ema"')  # and a kill while appending
    first_run = list(calls)
    monkeypatch.setattr(sweep, 'evaluate_point', killed_after(10 ** 6))
    result = run(calculate_metrics.cmdline, *sweep_args(data, base))
    assert result.exit_code == 0, result.output
    assert 'dropped an incomplete last line' in result.output and '4 finished, 5 to do' in result.output
    assert len(calls) == len(set(calls)) == 9 and set(calls[4:]).isdisjoint(first_run)
    resumed, full = by_key(read_lines(base)), by_key(read_lines(data['full']))
    assert list(resumed) == list(full)  # same points, in grid order
    assert all(resumed[key]['results'] == full[key]['results'] for key in full)
    result = run(calculate_metrics.cmdline, *sweep_args(data, base))
    assert result.exit_code == 0 and '9 finished, 0 to do' in result.output and len(calls) == 9


def test_report_and_plots(data):
    output = data['output']
    assert 'Best point per metric' in output and 'not comparable with published numbers' in output
    assert 'precision_inception:ref' in output and 'k = 3' in output
    base = data['full']
    for kind in ('vs-ema', 'heatmap'):
        assert os.path.isfile(f'{base}-fid-ref-{kind}.png')
    result = run(calculate_metrics.cmdline, 'sweep', '--out', base, '--report')
    assert result.exit_code == 0 and result.output.split('Saved')[0] in output


def test_repeats_use_disjoint_seed_sets(cache, data, tmp_path):
    snapshot = str(tmp_path / 'net.pkl')
    write_tiny_snapshot(snapshot, net=make_tiny_precond())
    base = tmp_path / 'rep'
    common = ('--ref', data['ref'], '--metrics', 'fid', '--num', 4, '--steps', STEPS)
    result = run(calculate_metrics.cmdline, 'sweep', '--net', snapshot, '--repeats', 2, '--seed', 10, '--out', base,
                 *common)
    assert result.exit_code == 0, result.output
    lines = read_lines(base)
    assert [line['seeds'] for line in lines] == [[10, 13], [14, 17]]
    for i, line in enumerate(lines):
        result = run(calculate_metrics.cmdline, 'gen', '--net', snapshot, '--seed', line['seeds'][0], '--out',
                     tmp_path / f'gen{i}', *common)
        assert result.exit_code == 0, result.output
        with open(tmp_path / f'gen{i}.json') as f:
            assert json.load(f)['fid'] == line['results']['fid']
    values = [line['results']['fid']['ref'] for line in lines]
    report = run(calculate_metrics.cmdline, 'sweep', '--out', base, '--report').output
    assert f'{np.mean(values):.4g} ±{np.std(values, ddof=1):.2g} (min {min(values):.4g})' in report
    assert 'report the minimum' in report


def test_solvers_and_discretizations_are_grid_axes(cache, data, tmp_path):
    snapshot = str(tmp_path / 'net.pkl')
    write_tiny_snapshot(snapshot, net=make_tiny_precond())
    base = tmp_path / 'solvers'
    common = ('--ref', data['ref'], '--metrics', 'fid', '--num', 4, '--steps', 3)
    result = run(calculate_metrics.cmdline, 'sweep', '--net', snapshot, '--solver', 'heun,dpm++2m', '--disc',
                 'edm,logsnr', '--out', base, *common)
    assert result.exit_code == 0, result.output
    lines = read_lines(base)
    assert [(line['point']['sampler']['solver'], line['point']['sampler']['discretization']) for line in lines] == \
        [('heun', 'edm'), ('heun', 'logsnr'), ('dpm++2m', 'edm'), ('dpm++2m', 'logsnr')]
    line = lines[3]
    result = run(calculate_metrics.cmdline, 'gen', '--net', snapshot, '--solver', 'dpm++2m', '--disc', 'logsnr',
                 '--out', tmp_path / 'gen', *common)
    assert result.exit_code == 0, result.output
    with open(tmp_path / 'gen.json') as f:
        assert json.load(f)['fid'] == line['results']['fid']
    assert len({line['results']['fid']['ref'] for line in lines}) == 4
    assert '--solver' in error_line(run(calculate_metrics.cmdline, 'sweep', '--net', snapshot, '--solver', 'rk4',
                                        '--out', base, *common))


def test_ref_features(cache, data, tmp_path):
    with open(data['ref'], 'rb') as f:
        stats = pickle.load(f)  # the official loader's way: the features are one more array
    assert stats['fid']['features'].shape == (12, 64) and stats['fid']['features'].dtype == np.float32
    assert stats['fd_dinov2']['features'].shape == (12, 16)
    np.testing.assert_allclose(stats['fid']['features'].mean(0), stats['fid']['mu'], rtol=1e-5, atol=1e-6)
    # The images' own features: precision = recall = 1.
    own = metrics.run_with_progress(metrics.calculate_stats_for_files(
        data['images'], num_workers=0, metrics=['fid'], keep_features=['fid'], verbose=False, device='cpu'),
        verbose=False)
    assert pr.calculate_pr_results(own, dict(ref=stats), ['fid', 'pr']) == dict(
        precision_inception=dict(ref=1.0), recall_inception=dict(ref=1.0))
    # A random subset of 5: mean/covariance of all images, features of 5 of them.
    dest = tmp_path / 'sub.pkl'
    result = run(calculate_metrics.cmdline, 'ref', '--data', data['images'], '--dest', dest, '--metrics', 'fid,nima',
                 '--features', 5, '--workers', 0)
    assert result.exit_code == 0, result.output
    sub = metrics.load_stats(str(dest), verbose=False)
    assert sub['num_images'] == 12 and sub['fid']['features'].shape == (5, 64) and 'features' not in sub['nima']
    np.testing.assert_array_equal(sub['fid']['mu'], stats['fid']['mu'])
    gaps = np.abs(sub['fid']['features'][:, None] - stats['fid']['features'][None]).max(axis=2)  # [5, 12]
    assert gaps.min(axis=1).max() < 1e-4 and len(set(gaps.argmin(axis=1))) == 5  # 5 distinct images of the 12


def test_bad_input(cache, data, tmp_path):
    cli = calculate_metrics.cmdline
    line = error_line(run(cli, 'ref', '--data', data['images'], '--dest', tmp_path / 'r.npz', '--metrics', 'fid',
                          '--features', 'all'))
    assert '--dest' in line and 'no features' in line
    assert '--features' in error_line(run(cli, 'ref', '--data', data['images'], '--dest', tmp_path / 'r.pkl',
                                          '--metrics', 'nima', '--features', 'all'))
    assert '--features' in error_line(run(cli, 'ref', '--data', data['images'], '--dest', tmp_path / 'r.pkl',
                                          '--features', 2))
    plain = tmp_path / 'plain.pkl'
    assert run(cli, 'ref', '--data', data['images'], '--dest', plain, '--metrics', 'fid', '--workers', 0).exit_code == 0
    base = tmp_path / 'bad'
    line = error_line(run(cli, *sweep_args(dict(data, ref=plain), base)))
    assert '--ref plain: no fid features' in line and '--features' in line
    assert 'needs fid and/or fd_dinov2' in error_line(run(cli, 'sweep', '--out', base, '--metrics', 'nima,pr'))
    assert '--ema: give --indir' in error_line(run(cli, 'sweep', '--out', base, '--ema', 0.1, '--metrics', 'nima'))
    assert 'give the main networks' in error_line(run(cli, 'sweep', '--out', base, '--metrics', 'nima'))
    line = error_line(run(cli, 'sweep', '--indir', data['run'], '--ema', 0.1, '--kimg', 9, '--metrics', 'nima',
                          '--num', 2, '--out', base))
    assert '--indir' in line and 'beyond the last input pickle' in line
    assert '--guidance-interval' in error_line(run(cli, 'sweep', '--out', base, '--guidance-interval', '3,1'))
    line = error_line(run(cli, *sweep_args(data, data['full'], '--num', 6)))  # same file, other setup
    assert 'full.jsonl holds results computed with num=8, this run has 6' in line
    assert not os.path.exists(f'{base}.jsonl')


def test_sweep_under_torchrun_matches_single_process(cache, data, tmp_path):
    import subprocess
    import sys
    from tests.procs import REPO, child_env
    base = tmp_path / 'two-ranks'
    args = [str(a) for a in sweep_args(data, base)]
    args[args.index('--ema') + 1], args[args.index('--guidance') + 1] = '0.05,0.15', '1,2.5'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--',
           'calculate_metrics.py', *args]
    result = subprocess.run(cmd, cwd=REPO, env=child_env(DNNLIB_CACHE_DIR=cache), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    two, one = by_key(read_lines(base)), by_key(read_lines(data['full']))
    assert len(two) == 4 and result.stdout.count('Best point per metric') == 1  # rank 0 writes and reports
    for key, line in two.items():
        assert line['num_images'] == NUM
        columns, expected = sweep.flatten_results(line['results']), sweep.flatten_results(one[key]['results'])
        assert columns == pytest.approx(expected, rel=1e-4, abs=1e-6)
