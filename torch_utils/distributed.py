"""Process-group helpers, stop/suspend hooks and checkpoint I/O (docs/formats.md#training-states).

Importing this module has no side effects: no process group, no CUDA.
`init()` works for a plain single process (no torchrun needed) and under torchrun;
it uses NCCL when the job runs on CUDA and Gloo otherwise.
"""

import collections
import datetime
import gc
import os
import re
import signal
import socket
import sys
import time
import warnings
from typing import Any, Optional

import numpy as np
import torch

import dnnlib

from . import misc, persistence, training_stats

#----------------------------------------------------------------------------
# Process group.

_device: Optional[torch.device] = None  # Compute device chosen by init().
TIMEOUT_ENV_VAR = 'EDM2_DIST_TIMEOUT'
DEFAULT_TIMEOUT_S = 1800


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _choose_backend(device: Optional[str]) -> str:
    """'nccl' for CUDA jobs, 'gloo' for CPU jobs, machines without CUDA, and Windows."""
    if os.name == 'nt' or not torch.cuda.is_available():
        return 'gloo'
    if device is not None and torch.device(device).type != 'cuda':
        return 'gloo'
    return 'nccl'


_RENDEZVOUS_VARS = ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def _init_method_kwargs(env: Any) -> dict:
    """init_process_group arguments for the environment `env`.

    All torchrun variables set: `env://`. A world size of 1 (WORLD_SIZE unset or 1, RANK unset or 0;
    some schedulers export WORLD_SIZE=1 alone): a private TCP store on a free port, whatever MASTER_*
    say, since a single process meets nobody. Unlike the official code nothing is written to
    os.environ, so subprocesses started later do not inherit a port that is already taken.
    Anything else is an incomplete multi-process setup: ValueError naming the missing variable.
    """
    missing = [name for name in _RENDEZVOUS_VARS if name not in env]
    if not missing:
        return dict(init_method='env://?use_libuv=False' if os.name == 'nt' else 'env://')
    world_size, rank = env.get('WORLD_SIZE', '1'), env.get('RANK', '0')
    if world_size.strip() == '1' and rank.strip() == '0':
        return dict(init_method=f'tcp://localhost:{_find_free_port()}', rank=0, world_size=1)
    given = ', '.join(f'{name}={env[name]}' for name in _RENDEZVOUS_VARS if name in env)
    raise ValueError(f"Incomplete distributed environment ({given}): {missing[0]} is not set; start multi-process "
                     f"jobs with torchrun, which sets {', '.join(_RENDEZVOUS_VARS)}")


def check_single_process(script_name: str) -> None:
    """ValueError unless WORLD_SIZE (read as init() reads it: unset or 1) means a single process; for
    tools such as `script_name` that have no distributed mode."""
    value = os.environ.get('WORLD_SIZE', '1')
    if value.strip() == '1':
        return
    hint = f'{script_name} runs as a single process (unset WORLD_SIZE)'
    if re.fullmatch(r'\s*[+-]?\d+\s*', value) is None:
        raise ValueError(f'WORLD_SIZE="{value}" is not an integer; {hint}')
    raise ValueError(f'Distributed execution is not supported (WORLD_SIZE={value.strip()}); {hint}')


def init(device: Optional[str] = None, backend: Optional[str] = None) -> None:
    """Join (or create) the process group and set up training_stats.

    `device`: 'cpu' forces a CPU job (Gloo); None means CUDA when available.
    `backend`: override the automatic choice. Under torchrun the usual env variables are used; without
    them, or with a world size of 1, the job is a single process with rank 0 (nothing is written to
    os.environ). An incomplete multi-process environment raises ValueError naming the missing variable.
    """
    global _device
    if torch.distributed.is_initialized():
        return
    backend = backend if backend is not None else _choose_backend(device)
    init_kwargs = _init_method_kwargs(os.environ)
    if backend == 'nccl':
        _device = torch.device('cuda', get_local_rank())
        torch.cuda.set_device(_device)
    else:
        _device = torch.device(device) if device is not None else torch.device('cpu')
    torch.distributed.init_process_group(backend=backend, timeout=collective_timeout(), **init_kwargs)

    # Cross-process sums run on the CUDA device with NCCL, on the CPU with Gloo.
    sync_device = None
    if get_world_size() > 1:
        sync_device = _device if backend == 'nccl' else torch.device('cpu')
    training_stats.init_multiprocessing(rank=get_rank(), sync_device=sync_device)


def collective_timeout() -> datetime.timedelta:
    """Bound on any wait for other ranks (env EDM2_DIST_TIMEOUT, seconds; default 1800): a hung or
    dead rank makes the others fail with an error after this long instead of waiting forever."""
    value = os.environ.get(TIMEOUT_ENV_VAR, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f'{TIMEOUT_ENV_VAR}={value!r}: expected a number of seconds') from None
    if not seconds > 0:
        raise ValueError(f'{TIMEOUT_ENV_VAR}={value!r}: must be positive')
    return datetime.timedelta(seconds=seconds)


def shutdown() -> None:
    """End of a successful job: wait for every rank, then leave the process group. Without this a rank
    whose peers have already exited can abort in Gloo's teardown ("terminate called without an active
    exception"). Call it only on the success path: after a failure, the other ranks are stopped by torchrun."""
    if not torch.distributed.is_initialized():
        return
    # Objects that hold the process group (e.g. a DistributedDataParallel wrapper caught in a reference
    # cycle) must go now, not during interpreter teardown, where their communication threads abort.
    gc.collect()
    if get_world_size() > 1:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def get_device() -> torch.device:
    """Compute device picked by init() (CPU before init)."""
    return _device if _device is not None else torch.device('cpu')


def get_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get('LOCAL_RANK', '0'))


def barrier() -> None:
    """Wait for all ranks (no-op for a single process)."""
    if get_world_size() > 1:
        torch.distributed.barrier()


def any_rank(flag: bool) -> bool:
    """Collective: True on every rank if `flag` is True on at least one rank."""
    if get_world_size() == 1:
        return bool(flag)
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_sync_tensor_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def _sync_tensor_device() -> torch.device:
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else 'gloo'
    return get_device() if backend == 'nccl' else torch.device('cpu')


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)


#----------------------------------------------------------------------------
# Stop / suspend hooks. SIGTERM and SIGUSR1 (sent by cluster schedulers before
# killing a job), and optionally SIGINT (Ctrl-C), request a clean stop; a second
# signal terminates at once.

_stop_requested = False
_stop_signal: Optional[int] = None  # The signal that requested the stop, announced by should_stop().
_stop_time = 0.0  # time.monotonic() of that signal.
_stop_announced = False
# torchrun passes the SIGINT it gets from the terminal on to its workers, which got the same Ctrl-C
# directly: a repeat this soon is the same request, not a second Ctrl-C.
SIGINT_REPEAT_GRACE_S = 1.0
_suspend_requested = False
_progress = (0, 0)
_installed_handlers: dict = {}


def _is_forwarded_sigint(signum: int) -> bool:
    return signum == _stop_signal == signal.SIGINT and time.monotonic() - _stop_time < SIGINT_REPEAT_GRACE_S


def _handle_stop_signal(signum: int, _frame: Any) -> None:
    global _stop_requested, _stop_signal, _stop_time
    if _stop_requested and _is_forwarded_sigint(signum):
        return
    if _stop_requested:  # Second signal: give up on a clean stop.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    # Only record it: printing here would re-enter a write the main thread may be in the middle of
    # (RuntimeError "reentrant call" on a buffered log file, or the message spliced into a line).
    _stop_requested, _stop_signal, _stop_time = True, signum, time.monotonic()


def install_signal_handlers(sigint: bool = False) -> None:
    """Make SIGTERM and SIGUSR1, and with `sigint` also SIGINT (Ctrl-C), set should_stop(); call from the
    main thread."""
    for name in ('SIGTERM', 'SIGUSR1') + (('SIGINT',) if sigint else ()):
        signum = getattr(signal, name, None)
        if signum is None:  # SIGUSR1 does not exist on Windows.
            continue
        try:
            _installed_handlers[signum] = signal.signal(signum, _handle_stop_signal)
        except ValueError:  # Not the main thread.
            warnings.warn('install_signal_handlers() must be called from the main thread; signals not handled')
            return


def should_stop() -> bool:
    """True once a stop signal was received by this process (see any_rank() to agree across ranks).
    The first call that sees it prints which signal arrived (from normal code, not the handler)."""
    global _stop_announced
    if _stop_signal is not None and not _stop_announced:
        _stop_announced = True
        print(f'Received signal {signal.Signals(_stop_signal).name}: stopping after the current step '
              f'(send it again to terminate at once).', file=sys.stderr, flush=True)
    return _stop_requested


def should_suspend() -> bool:
    """True once request_suspend() was called (the job stops at a slice boundary)."""
    return _suspend_requested


def request_suspend() -> None:
    global _suspend_requested
    _suspend_requested = True


def update_progress(cur: int, total: int) -> None:
    """Record progress for cluster integration (kept in memory only)."""
    global _progress
    _progress = (int(cur), int(total))


def get_progress() -> tuple:
    return _progress


#----------------------------------------------------------------------------
# Checkpoint I/O (docs/formats.md#training-states).


class CheckpointError(RuntimeError):
    """A training-state file cannot be used; the message names the file."""


class CheckpointMismatchError(CheckpointError):
    """A readable training-state file whose entry `name` does not fit the object it is restored into
    (saved for another network or optimizer layout). `detail` is the restore error on one line."""

    def __init__(self, path: str, name: str, detail: str):
        super().__init__(f"{path}: '{name}' does not match the saved state ({detail})")
        self.path, self.name, self.detail = path, name, detail


def _plain(value: Any) -> Any:
    """Copy of `value` that plain torch.load(weights_only=True) can read: dict subclasses (EasyDict) inside
    lists/tuples/dicts become plain dicts, numpy scalars (e.g. the learning rate) Python numbers."""
    if isinstance(value, dict) and not isinstance(value, collections.OrderedDict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(_plain(item) for item in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _state_of(name: str, obj: Any) -> Any:
    """Save rule: None -> None; dict -> itself; state_dict(); __getstate__(); __dict__."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, 'state_dict'):
        return obj.state_dict()
    if hasattr(obj, '__getstate__'):
        return obj.__getstate__()
    if hasattr(obj, '__dict__'):
        return obj.__dict__
    raise ValueError(f"CheckpointIO: cannot save '{name}' of type {type(obj).__name__}")


def _restore(name: str, obj: Any, state: Any) -> None:
    """Load rule mirroring _state_of."""
    if obj is None:
        return
    if isinstance(obj, dict):
        obj.clear()
        obj.update(state)
    elif hasattr(obj, 'load_state_dict'):
        obj.load_state_dict(state)
    elif hasattr(obj, '__setstate__'):
        obj.__setstate__(state)
    elif hasattr(obj, '__dict__'):
        obj.__dict__.clear()
        obj.__dict__.update(state)
    else:
        raise ValueError(f"CheckpointIO: cannot load '{name}' into type {type(obj).__name__}")


class CheckpointIO:
    """Save/restore named training objects as one `torch.save` dict (written atomically by rank 0)."""

    def __init__(self, **objects: Any):
        self._objects = objects

    def save(self, path: str, verbose: bool = True) -> None:
        if verbose:
            print0(f'Saving {path} ... ', end='', flush=True)
        data = {name: _state_of(name, obj) for name, obj in self._objects.items()}
        if get_rank() == 0:
            misc.atomic_torch_save(_plain(data), path)
        if verbose:
            print0('done')

    def load(self, path: str, verbose: bool = True) -> None:
        self._apply(self._read(path), path, verbose)

    def _apply(self, data: dict, path: str, verbose: bool) -> None:
        """Restore every object; a mismatch raises CheckpointMismatchError (the 'Loading' line is ended first)."""
        if verbose:
            print0(f'Loading {path} ... ', end='', flush=True)
        for name, obj in self._objects.items():
            try:
                _restore(name, obj, data[name])
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
                if verbose:
                    print0('failed')
                raise CheckpointMismatchError(path, name, dnnlib.util.first_line(err)) from err
        if verbose:
            print0('done')

    def _read(self, path: str) -> dict:
        """Whole file first, so a bad file never leaves the objects half-restored."""
        data = persistence.load_torch_file(path)
        if not isinstance(data, dict):
            raise CheckpointError(f'{path}: not a training-state dict')
        missing = [name for name in self._objects if name not in data]
        if missing:
            raise CheckpointError(f'{path}: missing entries {missing}')
        return data

    def load_latest(self, run_dir: str, pattern: str = r'training-state-(\d+).pt', verbose: bool = True) -> Optional[str]:
        """Load the newest readable file in `run_dir` matching `pattern`; None if there is none.

        A newest file that cannot be read (torn, truncated) is skipped with a warning and the previous
        one is used; if no matching file can be read, CheckpointError is raised. A file the safe loader
        refuses (persistence.UnsafePickleError) is never skipped: it stops the run.
        """
        if get_rank() == 0:
            _remove_stale_temp_files(run_dir)
        candidates = _matching_files(run_dir, pattern)
        if len(candidates) == 0:
            return None
        for path in candidates:
            try:
                data = self._read(path)
            except persistence.UnsafePickleError:
                raise
            except (persistence.PickleLoadError, OSError) as err:
                warnings.warn(f'Skipping unreadable checkpoint: {dnnlib.util.first_line(err)}')  # names the file
                continue
            self._apply(data, path, verbose)
            return path
        raise CheckpointError(f'{run_dir}: none of the {len(candidates)} files matching {pattern} can be read')


def _remove_stale_temp_files(run_dir: str) -> None:
    """Delete temp files of atomic writes (misc.atomic_open) that a killed run left behind."""
    stale = misc.remove_stale_atomic_temps(run_dir)
    if stale:
        print0(f'Removed {len(stale)} incomplete file(s) left by an interrupted run, e.g. {os.path.basename(stale[0])}')


def _matching_files(run_dir: str, pattern: str) -> list:
    """Files fully matching `pattern`, newest (largest number in group 1) first."""
    if not os.path.isdir(run_dir):
        return []
    entries = [e.name for e in os.scandir(run_dir) if e.is_file() and re.fullmatch(pattern, e.name)]
    entries.sort(key=lambda name: float(re.fullmatch(pattern, name).group(1)), reverse=True)
    return [os.path.join(run_dir, name) for name in entries]


#----------------------------------------------------------------------------
