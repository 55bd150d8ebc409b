"""Fault injection shared by the reliability tests (docs/reliability.md): a full disk, bad and hostile
pickles, malformed image files and datasets, and a torchrun rank that dies or hangs.

The `full_disk` fixture that arms the full-disk injection lives in tests/conftest.py.
"""

import errno
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

import numpy as np
import PIL.Image
import pytest
import torch

from tests import tiny
from tests.procs import REPO, child_env
from torch_utils import misc

#----------------------------------------------------------------------------
# A full disk: OSError(ENOSPC) at the first write, the fsync or the final os.replace of misc.atomic_open.

PREVIOUS = b'previous version, must survive'
FULL_DISK_POINTS = ('write', 'fsync', 'replace')


class FullDiskFile:
    """File proxy whose writes fail with ENOSPC once `budget` bytes were written."""

    def __init__(self, f, budget: int):
        self._f = f
        self._budget = budget

    def write(self, data):
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if size > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= size
        return self._f.write(data)

    def fileno(self):  # Force writers (PIL) through write() instead of the raw descriptor.
        raise OSError(errno.EBADF, 'no descriptor for this test file')

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_disk_arm(point: str, monkeypatch) -> Callable[[], None]:
    """A function that makes the next atomic_open fail at `point` (one of FULL_DISK_POINTS)."""
    def arm():
        if point == 'write':
            real_fdopen = os.fdopen
            monkeypatch.setattr(misc.os, 'fdopen', lambda *a, **k: FullDiskFile(real_fdopen(*a, **k), budget=0))
        elif point == 'fsync':
            real_fsync = os.fsync
            monkeypatch.setattr(misc.os, 'fsync', lambda fd: enospc() if os.path.isfile(f'/proc/self/fd/{fd}')
                                or not os.path.exists('/proc/self/fd') else real_fsync(fd))
        else:
            assert point == 'replace', point
            monkeypatch.setattr(misc.os, 'replace', enospc)
    return arm


def check_previous_kept(path: str, write: Callable[[], None], arm: Callable[[], None]) -> None:
    """`write` to `path` on a full disk: ENOSPC naming the file, the previous file intact, no temp file left."""
    with open(path, 'wb') as f:
        f.write(PREVIOUS)
    arm()
    with pytest.raises(OSError) as info:
        write()
    assert info.value.errno == errno.ENOSPC
    assert os.path.basename(path) in str(info.value), str(info.value)  # The error names the file.
    with open(path, 'rb') as f:
        assert f.read() == PREVIOUS
    leftovers = [name for name in os.listdir(os.path.dirname(path)) if '.tmp' in name or name.startswith('tmp')]
    assert leftovers == []

#----------------------------------------------------------------------------
# Bad pickles. The hostile one runs `touch <marker>` when unpickled by a loader that allows it.


class Hostile:
    """Unpickling this runs a shell command that creates `marker` (if the loader lets it)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def _write(path, obj=None, data: Optional[bytes] = None) -> str:
    with open(path, 'wb') as f:
        f.write(pickle.dumps(obj) if data is None else data)
    return str(path)


def write_bad_pickles(root) -> dict:
    """Good and bad network pickles under `root`: kind -> path, plus 'marker', which must never appear."""
    marker = str(root / 'PWNED')
    good = str(root / 'good.pkl')
    tiny.write_tiny_snapshot(good)
    with open(good, 'rb') as f:
        good_bytes = f.read()
    paths = dict(
        good=good,
        hostile=_write(root / 'hostile.pkl', dict(ema=Hostile(marker))),
        truncated=_write(root / 'truncated.pkl', data=good_bytes[:len(good_bytes) // 2]),
        empty=_write(root / 'empty.pkl', data=b''),
        wrong_type=_write(root / 'wrong_type.pkl', [1, 2, 3]),
        no_ema=_write(root / 'no_ema.pkl', dict(net=None)),
        torch_save=str(root / 'state.pt'),
        other_res=str(root / 'other_res.pkl'),
        text=_write(root / 'text.pkl', data=b'hello, I am not a pickle\n'),
    )
    torch.save(dict(net=torch.zeros(3)), paths['torch_save'])
    tiny.write_tiny_snapshot(paths['other_res'], net=tiny.make_tiny_precond(img_resolution=8))
    paths['marker'] = marker
    return paths


def run_script(*args, timeout: float = 120, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """`python <args>` in the repository, in the environment of tests.procs.child_env."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=child_env(**(env or {})))


def invoke(cmd, args: list) -> subprocess.CompletedProcess:
    """Run a click command in-process (much faster than a subprocess); the output is in `stderr`."""
    from click.testing import CliRunner
    result = CliRunner().invoke(cmd, args)
    return subprocess.CompletedProcess(args, result.exit_code, stdout='', stderr=result.output)


def assert_one_line_refusal(result: subprocess.CompletedProcess, name: str) -> None:
    """A non-zero exit with exactly one 'Error' line, which names `name`, and no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and name in errors[0], result.stderr

#----------------------------------------------------------------------------
# Image files and datasets.


def png_bytes(size: int = 8, channels: int = 3, value: int = 0) -> bytes:
    """A PNG of one grey `value`, `size` x `size`, with 3 channels or 1."""
    shape = [size, size, channels] if channels > 1 else [size, size]
    buf = io.BytesIO()
    PIL.Image.fromarray(np.full(shape, value, np.uint8)).save(buf, format='png')
    return buf.getvalue()


def write_files(root, files: dict, as_zip: bool = False) -> str:
    """files: {relative path: bytes | JSON-able object}; returns the folder, or a zip of it."""
    root = str(root)
    for name, content in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        with open(path, 'wb') as f:
            f.write(data)
    os.makedirs(root, exist_ok=True)
    return shutil.make_archive(root, 'zip', root) if as_zip else root


def write_random_images(root, count: int, size: int) -> str:
    rng = np.random.RandomState(0)
    for i in range(count):
        PIL.Image.fromarray(rng.randint(0, 256, [size, size, 3]).astype(np.uint8)).save(root / f'{i:03d}.png')
    return str(root)

#----------------------------------------------------------------------------
# A torchrun job whose rank 1 SIGKILLs itself (or hangs forever) at its K-th collective call
# (all_reduce / barrier / all_gather_object / broadcast / all_gather), i.e. in the middle of the job.

RANK_FAULT_WRAPPER = """
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


def torchrun_with_faulty_rank(tmp_path, script_args: list, fail_mode: str, fail_at: int, timeout_env: str = '600',
                              limit_s: float = 90) -> tuple:
    """Run `torchrun --standalone --nproc_per_node=2 <script_args>` with rank 1 sabotaged; check that the
    whole job ended within `limit_s` and left no process behind. Returns (exit code, output, seconds)."""
    wrapper = tmp_path / 'sabotage.py'
    wrapper.write_text(RANK_FAULT_WRAPPER)
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


def torchrun_root_cause(output: str) -> str:
    """The 'Root Cause' section of torchrun's ChildFailedError report (empty when there is none)."""
    return output.partition('Root Cause (first observed failure):')[2]


def assert_rank1_killed_reported(returncode: int, output: str) -> None:
    """A non-zero exit, and torchrun's report names the SIGKILL of local rank 1 as the root cause."""
    assert returncode != 0, output[-3000:]
    root_cause = torchrun_root_cause(output)
    assert '(local_rank: 1)' in root_cause and 'Signal 9 (SIGKILL)' in root_cause, output[-3000:]
