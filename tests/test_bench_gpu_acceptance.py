"""bench/gpu_acceptance.py, the acceptance command for GPU machines, run the way it runs without CUDA: on the CPU
at tiny sizes (--quick), so that the command keeps working between the rare runs on a GPU."""

import json
import subprocess
import sys
import time

import pytest
import torch

from tests.procs import REPO, child_env

CHECKS = ['environment', 'parity', 'precision', 'training', 'sampling', 'multi_gpu', 'compile']


def _run(*args, timeout=900):
    cmd = [sys.executable, 'bench/gpu_acceptance.py', *args]
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('acceptance') / 'results.json'
    start = time.time()
    proc = _run('--device=cpu', '--quick', f'--out={out}')
    return proc, json.loads(out.read_text()) if out.exists() else None, time.time() - start


def test_quick_cpu_run_passes_every_check(quick_run):
    proc, report, _ = quick_run
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert report is not None
    assert report['device'] == 'cpu' and report['quick'] and report['complete'] and report['passed']
    assert list(report['checks']) == CHECKS
    assert {name: check['status'] for name, check in report['checks'].items()} == {name: 'pass' for name in CHECKS}
    table = proc.stdout[proc.stdout.index('\nSummary'):]
    for name in CHECKS:
        assert f'\n{name:12s} PASS' in table
    assert 'ALL PASSED' in proc.stdout and 'Traceback' not in proc.stdout + proc.stderr


def test_quick_cpu_run_figures(quick_run):
    _, report, _ = quick_run
    figures = {name: check['figures'] for name, check in report['checks'].items()}
    assert figures['environment']['torch'] and figures['environment']['device'] == 'cpu'

    parity = figures['parity']['fast_fp32']   # fast path vs plain path, both float32 on the CPU
    assert 0 <= parity['forward_max_rel'] < 1e-5 and 0 <= parity['grad_l2_rel'] < 1e-4

    for dtype in ('fp16', 'bf16'):
        precision = figures['precision'][dtype]
        assert 0 <= precision['mean_abs'] <= precision['mean_limit'] and 0 <= precision['max_abs'] <= 255

    training = figures['training']
    assert training['model_flops_per_step'] > 0
    assert training['plain']['images_per_s'] > 0 and training['fast_bf16']['images_per_s'] > 0
    assert training['fast_bf16']['mfu_percent'] is None   # no peak known for a CPU

    sampling = figures['sampling']
    for name in ('plain', 'fast', 'solver:heun-32'):
        assert sampling[name]['images_per_s'] > 0
        assert sampling[name]['network_calls'] == 2 * 4 - 1   # 4 Heun steps in --quick
    assert sampling['fast']['change_vs_plain'].startswith('max |diff|')

    multi = figures['multi_gpu']
    assert multi['backend'] == 'gloo' and multi['world_size'] == 2 and multi['returncode'] == 0
    assert multi['max_rank_diff'] == 0 and multi['weights_moved'] > 0 and multi['all_finite']
    assert multi['allreduce_busbw_gbs'] > 0

    compile_ = figures['compile']
    assert compile_['backend'] == 'eager'
    for part in ('denoiser', 'training_step'):
        assert compile_[part]['graph_breaks'] == 0 and compile_[part]['unique_graphs'] == 1
        assert compile_[part]['compile_s'] > 0 and compile_[part]['speedup'] > 0


def test_quick_cpu_run_time(quick_run):
    *_, seconds = quick_run
    assert seconds < 600   # ~1 minute on an idle core; generous for shared machines


def test_a_failing_check_prints_one_line_and_the_others_still_run(tmp_path):
    # --device=cuda without CUDA: every check fails on its own, each with a one-line reason.
    if torch.cuda.is_available():
        pytest.skip('needs a machine without CUDA')
    out = tmp_path / 'results.json'
    proc = _run('--device=cuda', '--quick', '--checks=environment,parity', f'--out={out}', timeout=300)
    assert proc.returncode == 1
    report = json.loads(out.read_text())
    assert report['complete'] and not report['passed']
    assert [c['status'] for c in report['checks'].values()] == ['fail', 'fail']
    assert 'torch.cuda.is_available() is False' in report['checks']['environment']['error']
    assert report['checks']['parity']['error'] and report['checks']['parity']['traceback']
    fail_lines = [line for line in proc.stdout.splitlines() if line.startswith('FAIL ')]
    assert [line.split()[1] for line in fail_lines] == ['environment', 'parity']
    assert 'FAILED' in proc.stdout


def test_unknown_check_is_refused():
    proc = _run('--device=cpu', '--checks=parity,warp', timeout=120)
    assert proc.returncode == 2 and 'unknown check(s) warp' in proc.stderr


def test_check_time_limit_and_failure_capture():
    from bench import gpu_acceptance as ga

    def slow(ctx):
        ctx.figures['started'] = True
        try:
            time.sleep(5)
        except Exception:   # a check's own `except Exception` must not swallow the time limit
            ctx.figures['swallowed'] = True

    ctx = ga.Context(torch.device('cpu'), quick=True, peak=None, compile_backend=None)
    start = time.time()
    result = ga.run_check('slow', slow, ctx, budget=0.3)
    assert time.time() - start < 3
    assert result['status'] == 'fail' and 'timed out after' in result['error']
    assert result['figures'] == {'started': True}

    def broken(ctx):
        raise ValueError('first line\nsecond line')
    result = ga.run_check('broken', broken, ga.Context(torch.device('cpu'), True, None, None), budget=10)
    assert result['status'] == 'fail' and result['error'] == 'ValueError: first line'
