"""Training faults through train_edm2.py (issue "Reliability"): SIGKILL while a checkpoint is
being written plus a torn newest checkpoint on disk, and a loss that stays non-finite.

The 12-trial version with random kill times is bench/kill_resume.py (docs/reliability.md).
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
from tests.procs import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ['--cond=1', '--preset=edm2-cifar10-32x32-cond', '--channels=8', '--channel-mult=1,2', '--num-blocks=1',
        '--attn-res=4', '--channels-per-head=8', '--dropout=0', '--lr=0.01', '--rampup=0', '--fp16=0',
        '--workers=0', '--device=cpu', '--batch=64', '--status=1Ki', '--snapshot=1Ki', '--checkpoint=1Ki']


def _env() -> dict:
    return child_env()


@pytest.fixture(scope='module')
def data8(tmp_path_factory):
    root = tmp_path_factory.mktemp('data8')
    rng = np.random.RandomState(0)
    labels = []
    for i in range(32):
        PIL.Image.fromarray(rng.randint(0, 256, [8, 8, 3]).astype(np.uint8)).save(root / f'{i:03d}.png')
        labels.append([f'{i:03d}.png', i % 4])
    (root / 'dataset.json').write_text(json.dumps({'labels': labels}))
    return str(root)


def _cmd(outdir, data, *extra) -> list:
    return [sys.executable, os.path.join(REPO, 'train_edm2.py'), f'--outdir={outdir}', f'--data={data}', *ARGS, *extra]


def _run(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)


def _load(path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=False)


def test_kill_during_checkpoint_write_and_torn_file_resume_bit_exact(data8, tmp_path):
    reference = _run(_cmd(tmp_path / 'ref', data8, '--duration=2048'))
    assert reference.returncode == 0, reference.stderr[-2000:]

    # 1. SIGKILL exactly while training-state-0000002.pt is being written (its temp file exists).
    outdir = tmp_path / 'killed'
    cmd = _cmd(outdir, data8, '--duration=2048')
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if glob.glob(str(outdir / '.training-state-0000002.pt.tmp-*')):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before the checkpoint write could be interrupted'
    assert not (outdir / 'training-state-0000002.pt').exists()  # Never a torn file under the final name.
    _load(outdir / 'training-state-0000001.pt')  # The previous checkpoint is complete.
    assert glob.glob(str(outdir / '.training-state-0000002.pt.tmp-*'))  # SIGKILL leaves the temp file...

    # 2. Worse: a torn file with the newest name (e.g. a non-atomic copy) must be skipped, not loaded.
    complete = (outdir / 'training-state-0000001.pt').read_bytes()
    (outdir / 'training-state-0000002.pt').write_bytes(complete[:len(complete) // 3])

    resumed = _run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = (outdir / 'log.txt').read_text()
    assert 'Skipping unreadable checkpoint' in resumed.stderr + log
    assert not glob.glob(str(outdir / '.*.tmp-*'))  # ...which the resumed run removes.
    assert 'training-state-0000001.pt' in log and 'Training from 1 kimg to 2 kimg' in log
    # On CPU the resumed run equals the uninterrupted one bit for bit (net, optimizer, EMA).
    ref_state, res_state = _load(tmp_path / 'ref' / 'training-state-0000002.pt'), _load(outdir / 'training-state-0000002.pt')
    for key, value in ref_state['net'].items():
        assert torch.equal(value, res_state['net'][key]), key
    for ref_ema, res_ema in zip(ref_state['ema']['emas'], res_state['ema']['emas']):
        assert all(torch.equal(v, res_ema[k]) for k, v in ref_ema.items())
    for ref_p, res_p in zip(ref_state['optimizer']['state'].values(), res_state['optimizer']['state'].values()):
        assert all(torch.equal(ref_p[k], res_p[k]) for k in ref_p)


def test_persistent_nonfinite_loss_stops_without_garbage_snapshots(data8, tmp_path):
    outdir = tmp_path / 'nan'
    # P_mean=1000 makes sigma overflow to inf, so every loss and gradient is non-finite.
    result = _run(_cmd(outdir, data8, '--duration=4Ki', '--status=64', '--P_mean=1000', '--nonfinite-limit=3'))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and 'non-finite' in errors[0], result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    names = os.listdir(outdir)
    assert not [n for n in names if n.startswith('training-state-')]
    assert not [n for n in names if n.startswith('network-snapshot-') and not n.startswith('network-snapshot-0000000')]
    stats = [json.loads(line) for line in (outdir / 'stats.jsonl').read_text().splitlines()]  # Strict JSON (docs/differences.md#io-5).
    counted = [s['Loss/nonfinite_grads'] for s in stats if 'Loss/nonfinite_grads' in s]
    assert counted and all(value == 1.0 for value in counted)
