"""Dead and hung ranks under torchrun (issue "Reliability").

A wrapper makes rank 1 SIGKILL itself (or hang forever) at its K-th collective call
(all_reduce / barrier / all_gather_object / broadcast), i.e. in the middle of the job. The
whole job - every rank and torchrun - must end within a bounded time with a non-zero
exit and a message naming the failed rank; nothing may be left running.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest

from tests.procs import child_env
from torch_utils import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRAPPER = """
import os, runpy, signal, sys, time
import torch.distributed as td

def sabotage(name):
    real = getattr(td, name)
    def wrapped(*args, **kwargs):
        count = int(os.environ.get('_CALLS', '0')) + 1
        os.environ['_CALLS'] = str(count)
        if count == int(os.environ['FAIL_AT_CALL']):
            if os.environ['FAIL_MODE'] == 'die':
                os.kill(os.getpid(), signal.SIGKILL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stuck, but killable by torchrun at once
            while True:  # hang: never enter the collective
                time.sleep(1)
        return real(*args, **kwargs)
    setattr(td, name, wrapped)

if os.environ.get('RANK') == '1':
    for name in ('all_reduce', 'barrier', 'all_gather_object', 'broadcast', 'all_gather'):
        sabotage(name)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.fixture(scope='module')
def data16(tmp_path_factory):
    root = tmp_path_factory.mktemp('data16')
    rng = np.random.RandomState(0)
    for i in range(64):
        PIL.Image.fromarray(rng.randint(0, 256, [16, 16, 3]).astype(np.uint8)).save(root / f'{i:03d}.png')
    return str(root)


def _torchrun(tmp_path, script_args: list, fail_mode: str, fail_at: int, timeout_env: str = '600',
              limit_s: float = 90) -> tuple:
    wrapper = tmp_path / 'sabotage.py'
    wrapper.write_text(WRAPPER)
    env = child_env(FAIL_MODE=fail_mode, FAIL_AT_CALL=str(fail_at), EDM2_DIST_TIMEOUT=timeout_env,
                    TORCHELASTIC_ERROR_FILE='')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(wrapper),
           *script_args]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f'job still running after {limit_s} s:\n{output[-3000:]}')
    elapsed = time.time() - start
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # No worker survived torchrun.
        os.killpg(proc.pid, 0)
    return proc.returncode, output, elapsed


def _assert_rank1_failure_reported(returncode: int, output: str) -> None:
    assert returncode != 0, output[-3000:]
    assert 'local_rank: 1' in output or 'rank 1' in output.lower() or 'Signal 9' in output, output[-3000:]


def test_collective_timeout_from_env(monkeypatch):
    monkeypatch.setenv('EDM2_DIST_TIMEOUT', '12.5')
    assert distributed.collective_timeout().total_seconds() == 12.5
    for bad in ('soon', '0', '-3'):
        monkeypatch.setenv('EDM2_DIST_TIMEOUT', bad)
        with pytest.raises(ValueError, match='EDM2_DIST_TIMEOUT'):
            distributed.collective_timeout()


def _train_args(tmp_path, data16) -> list:
    return ['train_edm2.py', f'--outdir={tmp_path / "run"}', f'--data={data16}', '--cond=0',
            '--preset=edm2-cifar10-32x32-uncond', '--channels=8', '--channel-mult=1,2', '--num-blocks=1',
            '--attn-res=8', '--channels-per-head=8', '--fp16=0', '--workers=0', '--device=cpu', '--batch=16',
            '--duration=64Ki', '--status=1Ki', '--snapshot=64Ki', '--checkpoint=64Ki']


def test_training_rank_killed_mid_run_stops_the_job(tmp_path, data16):
    returncode, output, elapsed = _torchrun(tmp_path, _train_args(tmp_path, data16), 'die', fail_at=8)
    _assert_rank1_failure_reported(returncode, output)
    assert elapsed < 90


def test_training_rank_hung_mid_run_times_out(tmp_path, data16):
    # Rank 1 stops taking part without dying: rank 0 must give up after EDM2_DIST_TIMEOUT.
    returncode, output, elapsed = _torchrun(tmp_path, _train_args(tmp_path, data16), 'hang', fail_at=8,
                                            timeout_env='5')
    assert returncode != 0, output[-3000:]
    assert 'local_rank: 0' in output or 'timed out' in output.lower() or 'timeout' in output.lower(), output[-3000:]


def test_generation_rank_killed_mid_run_stops_the_job(tmp_path):
    from tests import tiny
    net = str(tmp_path / 'net.pkl')
    tiny.write_tiny_snapshot(net)
    args = ['generate_images.py', f'--net={net}', f'--outdir={tmp_path / "out"}', '--seeds=0-63', '--batch=2',
            '--steps=4', '--device=cpu']
    returncode, output, _elapsed = _torchrun(tmp_path, args, 'die', fail_at=3)
    _assert_rank1_failure_reported(returncode, output)
    assert len(os.listdir(tmp_path / 'out')) < 64


def test_metrics_rank_killed_mid_run_stops_the_job(tmp_path, data16, monkeypatch):
    from tests import detector_standins
    cache = tmp_path / 'cache'
    detector_standins.build_standin_cache(str(cache))
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(cache))
    args = ['calculate_metrics.py', 'ref', f'--data={data16}', f'--dest={tmp_path / "ref.pkl"}', '--metrics=fid',
            '--batch=4', '--workers=0']
    returncode, output, _elapsed = _torchrun(tmp_path, args, 'die', fail_at=2)
    _assert_rank1_failure_reported(returncode, output)
    assert not (tmp_path / 'ref.pkl').exists()
