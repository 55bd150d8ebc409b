"""Tests for torch_utils.distributed: init without/with torchrun, signals, CheckpointIO."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from tests import faults
from tests.procs import child_env

from tests.procs import REPO as REPO_ROOT  # noqa: E402


def _clean_env():
    """Environment for child processes: no inherited torchrun variables, repo on the path."""
    return child_env()


def _run_script(tmp_path, source, *args, timeout=60):
    script = tmp_path / 'script.py'
    script.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, *args, str(script), str(tmp_path)], cwd=REPO_ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=timeout)


#----------------------------------------------------------------------------
# Single process, no torchrun.

SINGLE_PROCESS_SCRIPT = """
    import os, signal, sys, time
    import torch
    from torch_utils import distributed as dist, training_stats
    assert not torch.distributed.is_initialized(), "import must not create a process group"
    assert "MASTER_PORT" not in os.environ
    collector = training_stats.Collector()
    dist.init()
    expected_backend = "nccl" if torch.cuda.is_available() else "gloo"  # Auto choice without a device.
    assert torch.distributed.get_backend() == expected_backend, torch.distributed.get_backend()
    assert (dist.get_rank(), dist.get_world_size(), dist.get_local_rank()) == (0, 1, 0)
    assert "MASTER_PORT" not in os.environ  # Single process: nothing leaks to subprocesses.
    dist.init()  # Idempotent.
    dist.barrier()
    training_stats.report("Loss/x", [1.0, 3.0])
    collector.update()
    dist.print0("mean", collector.mean("Loss/x"))
    assert not dist.should_stop() and not dist.should_suspend()
    dist.request_suspend()
    dist.update_progress(3, 10)
    assert dist.should_suspend() and dist.get_progress() == (3, 10)
    dist.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)
    print("stop after SIGUSR1:", dist.should_stop(), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # Second signal: terminate at once.
    time.sleep(5)
    print("still alive", flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, 'SIGUSR1'), reason='POSIX signals needed')
def test_single_process_init_stats_and_signals(tmp_path):
    result = _run_script(tmp_path, SINGLE_PROCESS_SCRIPT)
    assert 'mean 2.0' in result.stdout, result.stderr
    assert 'stop after SIGUSR1: True' in result.stdout
    assert 'still alive' not in result.stdout
    assert result.returncode == -signal.SIGTERM, result.stderr
    assert 'Received signal SIGUSR1' in result.stderr


CTRL_C_SCRIPT = """
    import os, signal, time
    from torch_utils import distributed as dist
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
    except KeyboardInterrupt:
        print("default: KeyboardInterrupt", flush=True)
    dist.install_signal_handlers(sigint=True)
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)  # what torchrun forwards right after the terminal's Ctrl-C
    time.sleep(0.05)
    print("stop after Ctrl-C:", dist.should_stop(), flush=True)
    time.sleep(dist.SIGINT_REPEAT_GRACE_S)
    os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: terminate at once
    time.sleep(5)
    print("still alive", flush=True)
"""


def test_ctrl_c_requests_a_stop_only_when_asked_and_a_second_one_terminates(tmp_path):
    result = _run_script(tmp_path, CTRL_C_SCRIPT)
    assert 'default: KeyboardInterrupt' in result.stdout, result.stderr
    assert 'stop after Ctrl-C: True' in result.stdout and 'still alive' not in result.stdout
    assert result.returncode == -signal.SIGINT, result.stderr
    assert result.stderr.count('Received signal SIGINT: stopping after the current step') == 1


def test_helpers_without_process_group(capsys):
    assert not torch.distributed.is_initialized()
    assert dist.get_rank() == 0 and dist.get_world_size() == 1
    dist.barrier()
    assert dist.any_rank(True) and not dist.any_rank(False)
    dist.print0('visible')
    assert capsys.readouterr().out == 'visible\n'


#----------------------------------------------------------------------------
# Two gloo ranks under torchrun.

TORCHRUN_SCRIPT = """
    import json, os, sys
    import torch
    import dnnlib
    from torch_utils import distributed as dist, training_stats as ts, misc
    out_dir = sys.argv[1]
    collector = ts.Collector(regex="Test/.*")
    dist.init(device="cpu")
    rank = dist.get_rank()
    res = dict(rank=rank, world=dist.get_world_size(), local_rank=dist.get_local_rank(),
               backend=torch.distributed.get_backend())

    ts.report("Test/values", torch.arange(rank * 3, rank * 3 + 3, dtype=torch.float32))
    ts.report("Test/values", [float("nan")])
    ts.report0("Test/only0", 10.0)
    collector.update()
    res.update(num=collector.num("Test/values"), mean=collector.mean("Test/values"),
               std=collector.std("Test/values"), only0=collector.num("Test/only0"))
    res.update(any=dist.any_rank(rank == 1), none=dist.any_rank(False))

    misc.set_random_seed(0)
    net = torch.nn.Linear(3, 2)
    misc.check_ddp_consistency(net)
    with torch.no_grad():
        net.weight[0, 0] += rank
    try:
        misc.check_ddp_consistency(net)
        res["ddp_mismatch"] = False
    except AssertionError:
        res["ddp_mismatch"] = True

    state = dnnlib.EasyDict(cur_nimg=1000 * (rank + 1))
    ckpt = dist.CheckpointIO(state=state)
    ckpt.save(os.path.join(out_dir, "training-state-0000001.pt"), verbose=False)
    dist.barrier()
    ckpt.load_latest(out_dir, verbose=False)
    res["loaded_cur_nimg"] = state.cur_nimg

    if rank == 1:
        ts.report("Test/extra", 1.0)
    try:
        collector.update()
        res["inconsistent"] = "no error"
    except ValueError as err:
        res["inconsistent"] = str(err)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    torch.distributed.destroy_process_group()
"""


def test_torchrun_two_gloo_ranks(tmp_path):
    result = _run_script(tmp_path, TORCHRUN_SCRIPT, '-m', 'torch.distributed.run', '--standalone',
                         '--nproc_per_node=2')
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    all_values = np.arange(6, dtype=np.float64)
    for r, res in enumerate(ranks):
        assert (res['rank'], res['world'], res['local_rank'], res['backend']) == (r, 2, r, 'gloo')
        assert res['num'] == 6 and res['mean'] == pytest.approx(all_values.mean())
        assert res['std'] == pytest.approx(all_values.std())
        assert res['only0'] == 1
        assert res['any'] is True and res['none'] is False
        assert res['loaded_cur_nimg'] == 1000  # Only rank 0 wrote the file.
        assert res['inconsistent'] == 'Training statistics are inconsistent between ranks'
    assert ranks[0]['ddp_mismatch'] is False and ranks[1]['ddp_mismatch'] is True


#----------------------------------------------------------------------------
# CheckpointIO.


class _LossLike:
    def __init__(self, p_mean=-0.4):
        self.P_mean = p_mean
        self.P_std = 1.0
        self._init_args = ()
        self._init_kwargs = {'P_mean': p_mean}


def _make_objects(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    state = dnnlib.EasyDict(cur_nimg=seed * 1000, total_elapsed_time=float(seed))
    ema = {'stds': [0.05, 0.1], 'emas': [net.state_dict(), net.state_dict()]}
    return dict(state=state, net=net, loss_fn=_LossLike(-0.4 + seed), optimizer=optimizer, ema=ema, extra=None)


def test_checkpoint_roundtrip(tmp_path, capsys):
    src = _make_objects(seed=1)
    path = str(tmp_path / 'training-state-0001000.pt')
    dist.CheckpointIO(**src).save(path)
    assert capsys.readouterr().out == f'Saving {path} ... done\n'
    dst = _make_objects(seed=2)
    dist.CheckpointIO(**dst).load(path)
    assert capsys.readouterr().out == f'Loading {path} ... done\n'
    assert type(dst['state']) is dnnlib.EasyDict and dst['state'] == {'cur_nimg': 1000, 'total_elapsed_time': 1.0}
    for a, b in zip(src['net'].state_dict().values(), dst['net'].state_dict().values()):
        assert torch.equal(a, b)
    assert dst['loss_fn'].P_mean == src['loss_fn'].P_mean
    assert dst['optimizer'].state_dict()['state'][0]['step'] == 1
    assert dst['ema']['stds'] == [0.05, 0.1]


def test_load_latest_picks_numerically_newest(tmp_path):
    for nimg in (2, 10, 9):
        objects = _make_objects(seed=nimg)
        dist.CheckpointIO(**objects).save(str(tmp_path / f'training-state-{nimg}.pt'), verbose=False)
    (tmp_path / 'training-state-99.pt.bak').write_bytes(b'not matching')
    (tmp_path / 'network-snapshot-0000100-0.050.pkl').write_bytes(b'other')
    dst = _make_objects(seed=0)
    loaded = dist.CheckpointIO(**dst).load_latest(str(tmp_path), verbose=False)
    assert loaded == str(tmp_path / 'training-state-10.pt') and dst['state'].cur_nimg == 10000


def test_load_latest_empty_dir_returns_none(tmp_path):
    assert dist.CheckpointIO(state=dnnlib.EasyDict()).load_latest(str(tmp_path)) is None
    assert dist.CheckpointIO(state=dnnlib.EasyDict()).load_latest(str(tmp_path / 'missing')) is None


def test_load_latest_skips_torn_newest_file(tmp_path):
    good = _make_objects(seed=3)
    dist.CheckpointIO(**good).save(str(tmp_path / 'training-state-0003000.pt'), verbose=False)
    data = (tmp_path / 'training-state-0003000.pt').read_bytes()
    (tmp_path / 'training-state-0004000.pt').write_bytes(data[: len(data) // 2])  # Torn copy.
    dst = _make_objects(seed=0)
    with pytest.warns(UserWarning, match='training-state-0004000.pt'):
        loaded = dist.CheckpointIO(**dst).load_latest(str(tmp_path), verbose=False)
    assert loaded.endswith('training-state-0003000.pt') and dst['state'].cur_nimg == 3000


def test_load_latest_all_torn_raises(tmp_path):
    (tmp_path / 'training-state-0000001.pt').write_bytes(b'\x00' * 10)
    state = dnnlib.EasyDict(cur_nimg=5)
    with pytest.warns(UserWarning):
        with pytest.raises(dist.CheckpointError, match='none of the 1 files'):
            dist.CheckpointIO(state=state).load_latest(str(tmp_path))
    assert state.cur_nimg == 5


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_untrusted_checkpoint_is_refused_without_running_code(tmp_path, monkeypatch):
    marker = str(tmp_path / 'pwned')
    older = str(tmp_path / 'training-state-0000001.pt')
    dist.CheckpointIO(state=dnnlib.EasyDict(cur_nimg=1)).save(older, verbose=False)
    hostile = str(tmp_path / 'training-state-0000002.pt')
    torch.save({'state': _Exploit(marker)}, hostile)
    with pytest.raises(persistence.UnsafePickleError, match="global 'io.open'.*EDM2_TRUST_PICKLE=1") as info:
        dist.CheckpointIO(state=dnnlib.EasyDict()).load_latest(str(tmp_path), verbose=False)
    assert info.value.path == hostile and '\n' not in str(info.value)  # refused, not skipped for the older state
    assert not os.path.exists(marker)
    monkeypatch.setenv('EDM2_TRUST_PICKLE', '1')  # Explicit opt-in restores plain torch.load.
    with pytest.raises(dist.CheckpointMismatchError, match="'state' does not match"):  # an open file is no state
        dist.CheckpointIO(state=dnnlib.EasyDict()).load_latest(str(tmp_path), verbose=False)
    assert os.path.exists(marker)


def test_official_style_file_with_easydict_loads(tmp_path):
    """Files from the original toolkit pickle the EasyDict itself (plain torch.save)."""
    src = _make_objects(seed=4)
    official = {'state': src['state'], 'net': src['net'].state_dict(), 'loss_fn': src['loss_fn'].__dict__,
                'optimizer': src['optimizer'].state_dict(), 'ema': src['ema'], 'extra': None,
                'np_scalar': np.float64(0.5), 'misc': dnnlib.EasyDict(arr=np.arange(3), tags={'a', 'b'})}
    torch.save(official, str(tmp_path / 'training-state-0004000.pt'))
    assert persistence.load_torch_file(str(tmp_path / 'training-state-0004000.pt'))['misc']['tags'] == {'a', 'b'}
    dst = _make_objects(seed=0)
    dist.CheckpointIO(**dst).load(str(tmp_path / 'training-state-0004000.pt'), verbose=False)
    assert dst['state'] == {'cur_nimg': 4000, 'total_elapsed_time': 4.0}
    assert dst['loss_fn'].P_mean == pytest.approx(3.6)


def test_missing_entry_is_a_clear_error(tmp_path):
    path = str(tmp_path / 'training-state-0000001.pt')
    dist.CheckpointIO(state=dnnlib.EasyDict(cur_nimg=1)).save(path, verbose=False)
    with pytest.raises(dist.CheckpointError, match="missing entries \\['net'\\]"):
        dist.CheckpointIO(state=dnnlib.EasyDict(), net=torch.nn.Linear(1, 1)).load(path)


def test_save_is_atomic_and_rank0_only(tmp_path, monkeypatch):
    path = tmp_path / 'training-state-0000001.pt'
    dist.CheckpointIO(state=dnnlib.EasyDict(cur_nimg=1)).save(str(path), verbose=False)

    def disk_full(_fd):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', disk_full)
    with pytest.raises(OSError):
        dist.CheckpointIO(state=dnnlib.EasyDict(cur_nimg=2)).save(str(path), verbose=False)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [path.name]
    state = dnnlib.EasyDict()
    dist.CheckpointIO(state=state).load(str(path), verbose=False)
    assert state.cur_nimg == 1

    monkeypatch.setattr(dist, 'get_rank', lambda: 1)
    dist.CheckpointIO(state=state).save(str(tmp_path / 'training-state-0000002.pt'), verbose=False)
    assert not (tmp_path / 'training-state-0000002.pt').exists()


def test_atomic_torch_save_used_by_checkpoint_is_loadable_weights_only(tmp_path):
    path = str(tmp_path / 's.pt')
    objects = _make_objects(seed=7)
    objects['optimizer'].param_groups[0]['lr'] = np.float64(0.01)  # what the learning-rate schedule yields
    dist.CheckpointIO(**objects).save(path, verbose=False)
    loaded = torch.load(path, weights_only=True)  # plain torch, no extra globals
    assert loaded['state'] == {'cur_nimg': 7000, 'total_elapsed_time': 7.0}
    assert type(loaded['optimizer']['param_groups'][0]['lr']) is float
    misc.atomic_torch_save({'x': 1}, path)
    assert torch.load(path, weights_only=True) == {'x': 1}


def test_state_of_another_shape_is_a_mismatch_error_after_a_failed_loading_line(tmp_path, capsys):
    src = _make_objects(seed=1)
    path = str(tmp_path / 'training-state-0001000.pt')
    dist.CheckpointIO(**src).save(path, verbose=False)
    dst = _make_objects(seed=2)
    dst['net'] = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5))  # another network shape
    with pytest.raises(dist.CheckpointMismatchError) as info:
        dist.CheckpointIO(**dst).load_latest(str(tmp_path))
    assert info.value.path == path and info.value.name == 'net'
    assert 'size mismatch for 0.weight' in info.value.detail and '\n' not in str(info.value)
    assert capsys.readouterr().out == f'Loading {path} ... failed\n'  # the line is ended before the error


#----------------------------------------------------------------------------
# Incomplete torchrun environments; the stop-signal message.


@pytest.mark.parametrize('env', [{}, {'WORLD_SIZE': '1'}, {'RANK': '0'}, {'WORLD_SIZE': '1', 'RANK': '0'},
                                 {'WORLD_SIZE': '1', 'MASTER_ADDR': 'nowhere.invalid'}])
def test_world_size_one_is_a_private_single_process(env):
    kwargs = dist._init_method_kwargs(dict(env))
    assert kwargs['init_method'].startswith('tcp://localhost:') and (kwargs['rank'], kwargs['world_size']) == (0, 1)


@pytest.mark.parametrize('env, missing', [({'WORLD_SIZE': '2'}, 'RANK'), ({'RANK': '1'}, 'WORLD_SIZE'),
                                          ({'WORLD_SIZE': '2', 'RANK': '0', 'MASTER_ADDR': 'h'}, 'MASTER_PORT')])
def test_incomplete_multi_process_environment_names_the_missing_variable(env, missing):
    with pytest.raises(ValueError, match=f'Incomplete distributed environment .*: {missing} is not set'):
        dist._init_method_kwargs(env)


def test_world_size_one_alone_initializes_without_writing_environ(tmp_path):
    script = """
        import os
        from torch_utils import distributed as dist
        before = dict(os.environ)
        dist.init(device="cpu")
        assert (dist.get_rank(), dist.get_world_size()) == (0, 1) and dict(os.environ) == before
        print("ok")
    """
    (tmp_path / 's.py').write_text(textwrap.dedent(script))
    result = subprocess.run([sys.executable, str(tmp_path / 's.py')], cwd=REPO_ROOT, env=child_env(WORLD_SIZE='1'),
                            capture_output=True, text=True, timeout=60)
    assert result.stdout == 'ok\n', result.stderr


@pytest.mark.skipif(not hasattr(signal, 'SIGUSR1'), reason='POSIX signals needed')
def test_stop_signal_handler_prints_nothing_until_should_stop(monkeypatch, capsys):
    for name in ('_stop_requested', '_stop_signal', '_stop_announced'):
        monkeypatch.setattr(dist, name, getattr(dist, name))  # restored after the test
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        dist.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):  # let the handler run
            if dist._stop_requested:
                break
        assert dist._stop_requested and capsys.readouterr().err == ''  # the handler itself wrote nothing
        assert dist.should_stop() and dist.should_stop()
        err = capsys.readouterr().err
        assert err.count('Received signal SIGUSR1: stopping after the current step') == 1 and err.count('\n') == 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize('value, message', [('1', None), (' 1 ', None), ('2', 'Distributed execution is not supported'),
                                            ('-1', 'Distributed execution is not supported'),
                                            ('x', 'WORLD_SIZE="x" is not an integer')])
def test_check_single_process(monkeypatch, value, message):
    monkeypatch.setenv('WORLD_SIZE', value)
    if message is None:
        dist.check_single_process('tool.py')
    else:
        with pytest.raises(ValueError, match=message) as info:
            dist.check_single_process('tool.py')
        assert 'tool.py runs as a single process' in str(info.value)

#----------------------------------------------------------------------------
# Injected faults (docs/reliability.md): a full disk under CheckpointIO.save, a bad collective timeout.


@pytest.mark.reliability
def test_training_checkpoint_full_disk(tmp_path, full_disk):
    path = str(tmp_path / 'training-state-0000001.pt')
    io = dist.CheckpointIO(net=torch.nn.Linear(2, 2), state=dnnlib.EasyDict(cur_nimg=5))
    faults.check_previous_kept(path, lambda: io.save(path, verbose=False), full_disk)


@pytest.mark.reliability
def test_collective_timeout_from_env(monkeypatch):
    monkeypatch.setenv('EDM2_DIST_TIMEOUT', '12.5')
    assert dist.collective_timeout().total_seconds() == 12.5
    for bad, problem in (('soon', 'expected a number of seconds'), ('0', 'must be positive'),
                         ('-3', 'must be positive'), ('nan', 'must be positive')):
        monkeypatch.setenv('EDM2_DIST_TIMEOUT', bad)
        with pytest.raises(ValueError) as info:
            dist.collective_timeout()
        assert str(info.value) == f'EDM2_DIST_TIMEOUT={bad!r}: {problem}'
