"""Assorted torch helpers plus atomic file writing.

Embedded sources of published pickles call `const_like` and `constant`, so their
signatures and semantics must stay as specified.
"""

import contextlib
import os
import re
import shutil
import uuid
import warnings
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------
# Random seeds.


def set_random_seed(*args: Any) -> None:
    """Seed torch (all devices) and NumPy's global RNG with hash(args) mod 2^31."""
    seed = hash(args) % (1 << 31)
    torch.manual_seed(seed)
    np.random.seed(seed)


#----------------------------------------------------------------------------
# Cached constants. The cache key holds only hashable plain data (shape, dtype
# name, raw bytes, device, memory format). While torch.compile traces, the cache
# is bypassed and the tensor is built inline, so dynamo sees a plain tensor
# construction instead of a dict lookup keyed on numpy data.

_constant_cache: dict = {}


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _build_constant(value: Any, shape: Optional[tuple], dtype: torch.dtype, device: torch.device,
                    memory_format: torch.memory_format) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=dtype, device=device).clone()
    if shape is not None:
        tensor = tensor.broadcast_to(shape)
    return tensor.contiguous(memory_format=memory_format)


def _is_compiling() -> bool:
    """torch.compiler.is_compiling() where it exists (torch >= 2.3)."""
    is_compiling = getattr(getattr(torch, 'compiler', None), 'is_compiling', None)
    return bool(is_compiling()) if is_compiling is not None else False


def constant(value: Any, shape: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None,
             device: Any = None, memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    """Cached constant tensor built from `value`, optionally broadcast to `shape`."""
    shape = tuple(shape) if shape is not None else None
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    device = torch.device(device) if device is not None else torch.device('cpu')
    memory_format = memory_format if memory_format is not None else torch.contiguous_format

    if _is_compiling():
        return _build_constant(value, shape, dtype, device, memory_format)

    array = _as_numpy(value)
    key = (array.shape, array.dtype.str, array.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        with torch.inference_mode(False):  # Usable later by autograd even if first built in inference mode.
            tensor = _build_constant(array.copy(), shape, dtype, device, memory_format)
        _constant_cache[key] = tensor
    return tensor


def const_like(ref: torch.Tensor, value: Any, shape: Optional[Sequence[int]] = None,
               dtype: Optional[torch.dtype] = None, device: Any = None,
               memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    """`constant` whose dtype and device default to those of `ref`."""
    dtype = dtype if dtype is not None else ref.dtype
    device = device if device is not None else ref.device
    return constant(value, shape=shape, dtype=dtype, device=device, memory_format=memory_format)


_pinned_bufs: dict = {}


def pinned_buf(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Cached CPU staging buffer, pinned when CUDA is available."""
    key = (tuple(shape), dtype)
    buf = _pinned_bufs.get(key, None)
    if buf is None:
        buf = torch.empty(key[0], dtype=dtype)
        if torch.cuda.is_available():
            buf = buf.pin_memory()
        _pinned_bufs[key] = buf
    return buf


#----------------------------------------------------------------------------
# Shape assertions that also work while tracing.

symbolic_assert = torch._assert


class suppress_tracer_warnings(warnings.catch_warnings):
    """Context manager that silences torch.jit.TracerWarning."""

    def __enter__(self):
        super().__enter__()
        warnings.simplefilter('ignore', category=torch.jit.TracerWarning)
        return self


def assert_shape(tensor: torch.Tensor, ref_shape: Sequence[Any]) -> None:
    """Check ndim and every size of `tensor` against `ref_shape` (None matches anything)."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is None:
            continue
        if isinstance(ref_size, torch.Tensor):
            with suppress_tracer_warnings():
                symbolic_assert(torch.equal(torch.as_tensor(size), ref_size), f'Wrong size for dimension {idx}')
        elif isinstance(size, torch.Tensor):
            with suppress_tracer_warnings():
                symbolic_assert(torch.equal(size, torch.as_tensor(ref_size)),
                                f'Wrong size for dimension {idx}: expected {ref_size}')
        elif size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size}')


def profiled_function(fn):
    """Decorator: record each call in the autograd profiler under the function's name."""
    def decorator(*args, **kwargs):
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)
    decorator.__name__ = fn.__name__
    decorator.__doc__ = fn.__doc__
    return decorator


#----------------------------------------------------------------------------
# Endless data sampler.


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless index stream, reshuffled each epoch, resumable at any global position.

    Global position p starts at start_idx + rank and advances by num_replicas.
    Epoch = p // N; its order is arange(N) shuffled by RandomState(hash((seed, epoch)) mod 2^31).
    """

    def __init__(self, dataset: Any, rank: int = 0, num_replicas: int = 1, shuffle: bool = True,
                 seed: int = 0, start_idx: int = 0):
        assert len(dataset) > 0, 'InfiniteSampler needs a non-empty dataset'
        assert num_replicas > 0
        assert 0 <= rank < num_replicas
        super().__init__()
        self.dataset = dataset
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.start_idx = start_idx

    def _epoch_order(self, epoch: int) -> np.ndarray:
        order = np.arange(len(self.dataset))
        if self.shuffle:
            np.random.RandomState(hash((self.seed, epoch)) % (1 << 31)).shuffle(order)
        return order

    def __iter__(self) -> Iterator[int]:
        num_items = len(self.dataset)
        pos = self.start_idx + self.rank
        epoch, order = None, None
        while True:
            if pos // num_items != epoch:
                epoch = pos // num_items
                order = self._epoch_order(epoch)
            yield int(order[pos % num_items])
            pos += self.num_replicas


#----------------------------------------------------------------------------
# Parameters, buffers and DDP helpers.


def params_and_buffers(module: torch.nn.Module) -> list:
    assert isinstance(module, torch.nn.Module)
    return list(module.parameters()) + list(module.buffers())


def named_params_and_buffers(module: torch.nn.Module) -> list:
    assert isinstance(module, torch.nn.Module)
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module, require_all: bool = False) -> None:
    """Copy tensors by name from src to dst; with require_all every dst name must exist in src."""
    assert isinstance(src_module, torch.nn.Module)
    assert isinstance(dst_module, torch.nn.Module)
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name in src_tensors:
            tensor.copy_(src_tensors[name])
        elif require_all:
            raise AssertionError(f"copy_params_and_buffers: '{name}' missing in source module")


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool):
    """Skip DDP gradient synchronisation inside the block when `sync` is False."""
    assert isinstance(module, torch.nn.Module)
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield


def check_ddp_consistency(module: torch.nn.Module, ignore_regex: Optional[str] = None) -> None:
    """Collective: assert every param/buffer equals rank 0's copy (NaNs compared as 0).

    All tensors are compared before raising, so every rank runs the same broadcasts.
    """
    assert isinstance(module, torch.nn.Module)
    mismatched = []
    for name, tensor in named_params_and_buffers(module):
        fullname = type(module).__name__ + '.' + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = torch.nan_to_num(tensor)
        reference = tensor.clone()
        torch.distributed.broadcast(tensor=reference, src=0)
        if not (tensor == reference).all():
            mismatched.append(fullname)
    assert not mismatched, f"Tensors differ from rank 0: {', '.join(mismatched)}"


#----------------------------------------------------------------------------
# Module summary table.


def _collect_forward_entries(module: torch.nn.Module, inputs: Sequence[Any], max_nesting: int) -> tuple:
    """Run module(*inputs) with hooks; return (outputs, [EasyDict(mod, outputs)] in completion order)."""
    entries = []
    depth = [0]

    def pre_hook(_mod, _inputs):
        depth[0] += 1

    def post_hook(mod, _inputs, outputs):
        depth[0] -= 1
        if depth[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            entries.append(dnnlib.EasyDict(mod=mod, outputs=[t for t in outputs if isinstance(t, torch.Tensor)]))

    handles = [m.register_forward_pre_hook(pre_hook) for m in module.modules()]
    handles += [m.register_forward_hook(post_hook) for m in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, entries


def _summary_rows(module: torch.nn.Module, entries: list, skip_redundant: bool) -> list:
    """Table rows: header, separator, one row per (entry, output), separator, total."""
    seen = set()
    for e in entries:  # Attribute each tensor to the first entry that shows it.
        e.params = [t for t in e.mod.parameters() if id(t) not in seen]
        e.buffers = [t for t in e.mod.buffers() if id(t) not in seen]
        e.new_outputs = [t for t in e.outputs if id(t) not in seen]
        seen |= {id(t) for t in e.params + e.buffers + e.new_outputs}
    if skip_redundant:
        entries = [e for e in entries if e.params or e.buffers or e.new_outputs]

    names = {m: name for name, m in module.named_modules()}
    header = [type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype']
    rows = [header, ['---'] * len(header)]
    param_total = buffer_total = 0
    for e in entries:
        name = '<top-level>' if e.mod is module else names[e.mod]
        num_params = sum(t.numel() for t in e.params)
        num_buffers = sum(t.numel() for t in e.buffers)
        param_total += num_params
        buffer_total += num_buffers
        shapes = [str(list(t.shape)) for t in e.outputs] or ['-']
        dtypes = [str(t.dtype).split('.')[-1] for t in e.outputs] or ['-']
        suffix = lambda i: f':{i}' if len(e.outputs) >= 2 else ''
        rows.append([name + suffix(0), str(num_params) if num_params else '-',
                     str(num_buffers) if num_buffers else '-', shapes[0], dtypes[0]])
        rows += [[name + suffix(i), '-', '-', shapes[i], dtypes[i]] for i in range(1, len(e.outputs))]
    rows.append(['---'] * len(header))
    rows.append(['Total', str(param_total), str(buffer_total), '-', '-'])
    return rows


def print_module_summary(module: torch.nn.Module, inputs: Sequence[Any], max_nesting: int = 3,
                         skip_redundant: bool = True) -> Any:
    """Run one forward pass and print per-submodule parameter/buffer counts and output shapes."""
    assert isinstance(module, torch.nn.Module)
    assert not isinstance(module, torch.jit.ScriptModule)
    assert isinstance(inputs, (tuple, list))
    outputs, entries = _collect_forward_entries(module, inputs, max_nesting)
    rows = _summary_rows(module, entries, skip_redundant)
    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    print()
    for row in rows:
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print()
    return outputs


#----------------------------------------------------------------------------
# Images.


def tile_images(x: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """Arrange an NCHW batch of w*h images into one CHW grid, row by row."""
    assert x.ndim == 4, 'tile_images expects an NCHW batch'
    num, channels, height, width = x.shape
    assert num == w * h, f'tile_images: batch of {num} cannot fill a {w}x{h} grid'
    x = x.reshape(h, w, channels, height, width)
    x = x.permute(2, 0, 3, 1, 4)
    return x.reshape(channels, h * height, w * width)


#----------------------------------------------------------------------------
# Devices.


def default_device() -> torch.device:
    """The device used when none is given: cuda if available, else cpu."""
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def check_device(name: str, allow_meta: bool = False) -> torch.device:
    """torch.device(name), refusing (ValueError) names torch does not know and devices this machine lacks."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'"{name}" is not a torch device (e.g. cuda, cuda:1, cpu)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('CUDA is not available on this machine; use cpu')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f'{name}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    if device.type == 'meta' and not allow_meta:
        raise ValueError('the meta device computes nothing; use cpu or cuda')
    if device.type not in ('cpu', 'cuda', 'meta'):
        raise ValueError(f'{name}: only cpu and cuda devices are supported')
    return device

#----------------------------------------------------------------------------
# Atomic file writing.


def _fsync_dir(dir_path: str) -> None:
    """Persist a rename on POSIX; silently skipped where directories cannot be opened."""
    try:
        fd = os.open(dir_path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_temp_prefix(path: str) -> str:
    """File-name prefix of atomic_open's temp files for `path` (".NAME.tmp-", then 12 hex digits): hidden,
    so that listings skip it, and recognisable, so that remove_stale_atomic_temps can clean up."""
    return f'.{os.path.basename(os.path.abspath(path))}.tmp-'


_ANY_ATOMIC_TEMP = re.compile(r'\..+\.tmp-[0-9a-f]{12}')


def remove_stale_atomic_temps(dir_path: str, targets: Optional[Sequence[str]] = None) -> list:
    """Delete what killed atomic writes (SIGKILL, power loss) left in `dir_path` and return the deleted
    paths: the temps of the paths `targets` (files, or folders created with atomic_temp_prefix), or,
    when None, every atomic_open temp file. Call it only where no other process writes the same paths."""
    if not os.path.isdir(dir_path):
        return []
    prefixes = tuple(atomic_temp_prefix(t) for t in targets) if targets is not None else None
    stale = []
    for entry in sorted(os.scandir(dir_path), key=lambda e: e.name):
        ours = entry.name.startswith(prefixes) if prefixes is not None else (
            entry.is_file() and _ANY_ATOMIC_TEMP.fullmatch(entry.name))
        if not ours:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.remove(entry.path)
        stale.append(entry.path)
    return stale


def check_output_path(path: str, option: str, is_dir: bool = False) -> None:
    """Raise ValueError naming `option` unless `path` can be written as a file (is_dir: used or created as a
    directory). Checked before long work so that a bad path fails at once; nothing is created here."""
    if is_dir and os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f'{option}: {path} is a file, not a directory')
    if not is_dir and os.path.isdir(path):
        raise ValueError(f'{option}: {path} is a directory, not a file')
    # The nearest existing directory is where makedirs or atomic_open will have to create something.
    base = os.path.abspath(path) if is_dir else os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        raise ValueError(f'{option}: cannot create {path}: {base} is a file, not a directory')
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f'{option}: cannot write {path}: {base} is not writable')


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'wb', **open_kwargs: Any):
    """Write `path` all-or-nothing: yield a temp file in the same directory, fsync + rename on success.

    On any exception (disk full, Ctrl-C, ...) the temp file is deleted and a previous
    version of `path` stays untouched.
    """
    assert mode.startswith('w') or mode.startswith('x'), 'atomic_open only supports write modes'
    path = os.fspath(path)
    dir_path = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(dir_path, f'{atomic_temp_prefix(path)}{uuid.uuid4().hex[:12]}')
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0), 0o666)
    try:
        with os.fdopen(fd, mode.replace('x', 'w'), **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if mode.startswith('x') and os.path.exists(path):
            raise FileExistsError(f'{path} already exists')
        os.replace(tmp_path, path)
    except BaseException as err:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if isinstance(err, OSError) and err.errno is not None and err.filename in (None, tmp_path):
            # Name the file the user asked for (e.g. "[Errno 28] No space left on device: 'out/x.pkl'").
            raise type(err)(err.errno, err.strerror or str(err), path) from err
        raise
    _fsync_dir(dir_path)


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save(obj, path) through atomic_open."""
    with atomic_open(path, 'wb') as f:
        torch.save(obj, f)

#----------------------------------------------------------------------------
