"""Tests for torch_utils.misc: constants, sampler, module helpers, summary, tiling, atomic writes."""

import contextlib
import errno
import itertools
import os
import stat

import numpy as np
import pytest
import torch

from torch_utils import misc

#----------------------------------------------------------------------------
# Constants.


def test_constant_is_cached_and_keyed_on_value_and_options():
    a = misc.constant(np.float32([1, 2, 3]))
    assert a is misc.constant(np.float32([1, 2, 3]))
    assert a is misc.constant(torch.tensor([1.0, 2.0, 3.0]))  # Same bytes, same key.
    assert a.dtype == torch.get_default_dtype() and a.device.type == 'cpu'
    assert a is not misc.constant(np.float32([1, 2, 4]))
    assert misc.constant(np.float32([1, 2, 3]), dtype=torch.float64).dtype == torch.float64
    b = misc.constant(2.5, shape=[2, 3])
    assert b.shape == (2, 3) and b.is_contiguous() and bool((b == 2.5).all())


def test_const_like_follows_reference():
    ref = torch.zeros(4, dtype=torch.float16)
    filt = np.outer(np.float32([1, 1]), np.float32([1, 1]))[np.newaxis, np.newaxis] / 4
    c = misc.const_like(ref, filt)
    assert c.dtype == torch.float16 and c.shape == (1, 1, 2, 2)
    assert torch.equal(c, torch.full([1, 1, 2, 2], 0.25, dtype=torch.float16))
    assert misc.const_like(ref, filt, dtype=torch.float32).dtype == torch.float32
    nhwc = misc.const_like(ref, 1.0, shape=[1, 3, 2, 2], memory_format=torch.channels_last)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)


def test_constant_built_in_inference_mode_works_with_autograd():
    with torch.inference_mode():
        c = misc.constant(np.float32([7, 8, 9]))
    x = torch.ones(3, requires_grad=True)
    (x * misc.constant(np.float32([7, 8, 9]))).sum().backward()
    assert c.is_inference() is False and torch.equal(x.grad, torch.tensor([7.0, 8.0, 9.0]))


def test_const_like_traces_in_one_graph_under_compile():
    def scale(x):
        return x * misc.const_like(x, [[1.0, 2.0], [3.0, 4.0]])

    torch._dynamo.reset()
    compiled = torch.compile(scale, backend='eager', fullgraph=True)  # fullgraph: any graph break raises.
    x = torch.ones(2, 2)
    assert torch.equal(compiled(x), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_set_random_seed_is_reproducible():
    misc.set_random_seed(3, 'a')
    first = (torch.rand(3), np.random.rand(3))
    misc.set_random_seed(3, 'a')
    assert torch.equal(first[0], torch.rand(3)) and np.array_equal(first[1], np.random.rand(3))


def test_pinned_buf_is_cached():
    buf = misc.pinned_buf([2, 3], torch.uint8)
    assert buf.shape == (2, 3) and buf.dtype == torch.uint8
    assert misc.pinned_buf((2, 3), torch.uint8) is buf


def test_assert_shape():
    x = torch.zeros(2, 3, 4)
    misc.assert_shape(x, [2, None, 4])
    with pytest.raises(AssertionError, match='number of dimensions'):
        misc.assert_shape(x, [2, 3])
    with pytest.raises(AssertionError, match='dimension 2'):
        misc.assert_shape(x, [2, 3, 5])


def test_profiled_function_keeps_behaviour():
    @misc.profiled_function
    def add_one(v):
        return v + 1

    assert add_one.__name__ == 'add_one' and add_one(1) == 2
    with torch.autograd.profiler.profile() as prof:
        add_one(torch.zeros(1))
    assert any(evt.name == 'add_one' for evt in prof.function_events)


#----------------------------------------------------------------------------
# InfiniteSampler.


def _reference_stream(n, seed, shuffle=True):
    """Global order of the official InfiniteSampler: epoch e uses arange(n) shuffled by RandomState(hash((seed, e)) % 2^31)."""
    for epoch in itertools.count():
        order = np.arange(n)
        if shuffle:
            np.random.RandomState(hash((seed, epoch)) % (1 << 31)).shuffle(order)
        yield from order.tolist()


def test_infinite_sampler_matches_official_order():
    stream = list(itertools.islice(_reference_stream(7, seed=5), 40))
    sampler = misc.InfiniteSampler(list(range(7)), seed=5)
    assert list(itertools.islice(iter(sampler), 40)) == stream
    assert sorted(stream[:7]) == list(range(7)) and stream[:7] != stream[7:14]


def test_infinite_sampler_ranks_and_resume():
    stream = list(itertools.islice(_reference_stream(5, seed=1), 60))
    for rank in range(3):
        sampler = misc.InfiniteSampler(range(5), rank=rank, num_replicas=3, seed=1)
        assert list(itertools.islice(iter(sampler), 20)) == stream[rank::3]
    resumed = misc.InfiniteSampler(range(5), rank=1, num_replicas=3, seed=1, start_idx=12)
    assert list(itertools.islice(iter(resumed), 10)) == stream[13::3][:10]


def test_infinite_sampler_without_shuffle_and_bad_args():
    sampler = misc.InfiniteSampler(range(3), shuffle=False)
    assert list(itertools.islice(iter(sampler), 7)) == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(AssertionError):
        misc.InfiniteSampler([], seed=0)
    with pytest.raises(AssertionError):
        misc.InfiniteSampler(range(3), rank=2, num_replicas=2)


#----------------------------------------------------------------------------
# Parameters, DDP helpers, summary.


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 2))

    def forward(self, x):
        return self.head(self.norm(self.conv(x)))


def test_params_and_buffers_and_copy():
    src, dst = _TinyNet(), _TinyNet()
    assert len(misc.params_and_buffers(src)) == len(list(src.parameters())) + len(list(src.buffers()))
    names = [name for name, _ in misc.named_params_and_buffers(src)]
    assert 'conv.weight' in names and 'norm.running_mean' in names
    src.norm.running_mean.fill_(3.0)
    misc.copy_params_and_buffers(src, dst, require_all=True)
    for (_, a), (_, b) in zip(misc.named_params_and_buffers(src), misc.named_params_and_buffers(dst)):
        assert torch.equal(a, b)
    partial = torch.nn.Sequential(torch.nn.Linear(2, 2))
    misc.copy_params_and_buffers(partial, dst)  # No shared names: nothing copied, no error.
    with pytest.raises(AssertionError, match='missing'):
        misc.copy_params_and_buffers(partial, dst, require_all=True)


def test_ddp_sync_passthrough_for_plain_module():
    # A plain module has no no_sync(): both settings run the block, and gradients accumulate as usual.
    net = _TinyNet()
    x = torch.randn(2, 3, 8, 8)
    net(x).sum().backward()
    once = net.conv.weight.grad.clone()
    net.zero_grad()
    for sync in (True, False):
        with misc.ddp_sync(net, sync):
            net(x).sum().backward()
    torch.testing.assert_close(net.conv.weight.grad, 2 * once)


def test_ddp_sync_uses_no_sync_only_when_told_not_to_sync(monkeypatch):
    entered = []

    class _FakeDDP(torch.nn.Module):  # Stands in for DistributedDataParallel (which needs a process group).
        @contextlib.contextmanager
        def no_sync(self):
            entered.append('no_sync')
            yield
            entered.append('synced again')

    monkeypatch.setattr(torch.nn.parallel, 'DistributedDataParallel', _FakeDDP)
    ddp = _FakeDDP()
    with misc.ddp_sync(ddp, True):
        entered.append('body')
    assert entered == ['body']
    with misc.ddp_sync(ddp, False):
        entered.append('body')
    assert entered == ['body', 'no_sync', 'body', 'synced again']


def test_print_module_summary(capsys):
    net = _TinyNet()
    out = misc.print_module_summary(net, [torch.zeros(2, 3, 8, 8)])
    assert out.shape == (2, 2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert lines[0].split() == ['_TinyNet', 'Parameters', 'Buffers', 'Output', 'shape', 'Datatype']
    assert lines[1].split() == ['---'] * 5 and lines[-2].split() == ['---'] * 5
    total = lines[-1].split()
    num_params = sum(p.numel() for p in net.parameters())
    num_buffers = sum(b.numel() for b in net.buffers())
    assert total == ['Total', str(num_params), str(num_buffers), '-', '-']
    conv_row = next(line.split() for line in lines if line.startswith('conv '))
    assert conv_row == ['conv', str(3 * 4 * 9 + 4), '-', '[2,', '4,', '8,', '8]', 'float32']


def test_print_module_summary_nesting(capsys):
    net = _TinyNet()
    misc.print_module_summary(net, [torch.zeros(1, 3, 8, 8)], max_nesting=1)
    text = capsys.readouterr().out
    assert 'head.1' not in text and 'head ' in text
    misc.print_module_summary(net, [torch.zeros(1, 3, 8, 8)], max_nesting=2)
    assert 'head.1' in capsys.readouterr().out


def test_tile_images_layout():
    images = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1, 1).expand(6, 2, 3, 4)
    grid = misc.tile_images(images, w=3, h=2)
    assert grid.shape == (2, 2 * 3, 3 * 4)
    assert grid[0, 0, 0] == 0 and grid[0, 0, 4] == 1 and grid[0, 0, 8] == 2 and grid[1, 3, 0] == 3
    with pytest.raises(AssertionError):
        misc.tile_images(images, w=4, h=2)


#----------------------------------------------------------------------------
# Atomic writes.


def _leftovers(directory):
    return sorted(name for name in os.listdir(directory) if '.tmp-' in name)


def test_atomic_open_writes_and_respects_umask(tmp_path):
    path = tmp_path / 'out.txt'
    with misc.atomic_open(str(path), 'w') as f:
        f.write('first')
        assert not path.exists()  # Nothing visible before success.
    assert path.read_text() == 'first'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    with misc.atomic_open(path, 'wb') as f:
        f.write(b'second')
    assert path.read_bytes() == b'second' and _leftovers(tmp_path) == []


def test_atomic_open_exception_keeps_previous_file(tmp_path):
    path = tmp_path / 'state.bin'
    path.write_bytes(b'previous')
    with pytest.raises(OSError) as info:
        with misc.atomic_open(path) as f:
            f.write(b'half')
            raise OSError(errno.ENOSPC, 'No space left on device')
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == b'previous' and _leftovers(tmp_path) == []


def test_atomic_torch_save_enospc_on_fsync_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / 'training-state.pt'
    misc.atomic_torch_save({'a': torch.ones(2)}, str(path))

    def disk_full(_fd):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', disk_full)
    with pytest.raises(OSError):
        misc.atomic_torch_save({'a': torch.zeros(1000)}, str(path))
    monkeypatch.undo()
    assert torch.equal(torch.load(path)['a'], torch.ones(2)) and _leftovers(tmp_path) == []


def test_atomic_open_exclusive_mode(tmp_path):
    path = tmp_path / 'x.bin'
    with misc.atomic_open(path, 'xb') as f:
        f.write(b'1')
    with pytest.raises(FileExistsError):
        with misc.atomic_open(path, 'xb') as f:
            f.write(b'2')
    assert path.read_bytes() == b'1' and _leftovers(tmp_path) == []


def test_check_output_path_one_wording(tmp_path):
    afile = tmp_path / 'f'
    afile.write_text('x')
    misc.check_output_path(str(tmp_path / 'new' / 'deeper'), '--out', is_dir=True)
    misc.check_output_path(str(tmp_path / 'new' / 'x.pkl'), '--out')
    with pytest.raises(ValueError, match=r'^--out: .*f is a file, not a directory$'):
        misc.check_output_path(str(afile), '--out', is_dir=True)
    with pytest.raises(ValueError, match=r'^--out: cannot create .*f/sub: .*f is a file, not a directory$'):
        misc.check_output_path(str(afile / 'sub'), '--out', is_dir=True)
    with pytest.raises(ValueError, match=r'^--out: .* is a directory, not a file$'):
        misc.check_output_path(str(tmp_path), '--out')
    assert os.listdir(tmp_path) == ['f']  # nothing created


def test_remove_stale_atomic_temps_matches_atomic_open_names(tmp_path, monkeypatch):
    target = tmp_path / 'a.pkl'
    monkeypatch.setattr(os, 'replace', lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt), misc.atomic_open(str(target)) as f:
        f.write(b'x')
        leftover = tmp_path / f'{misc.atomic_temp_prefix(str(target))}0123456789ab'
        leftover.write_bytes(b'killed')  # what a SIGKILL at this point would leave
    monkeypatch.undo()
    (tmp_path / '.other.pkl.tmp-0123456789ab').write_bytes(b'other')
    assert misc.remove_stale_atomic_temps(str(tmp_path), [str(target)]) == [str(leftover)]
    assert misc.remove_stale_atomic_temps(str(tmp_path)) == [str(tmp_path / '.other.pkl.tmp-0123456789ab')]
    assert os.listdir(tmp_path) == []


def test_check_device_messages_are_option_neutral():
    with pytest.raises(ValueError, match='is not a torch device') as info:
        misc.check_device('bogus')
    assert '--device' not in str(info.value)
    assert misc.default_device().type == ('cuda' if torch.cuda.is_available() else 'cpu')
