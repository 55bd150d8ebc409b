"""Pickles that carry the source code of their classes, and the project's one safe loader.

Writer side (official format, version 6): a class decorated with `persistent_class`
pickles the full source text of its defining module together with the instance state,
as `(torch_utils.persistence._reconstruct_persistent_obj, (meta,))`. The official reader,
`_reconstruct_persistent_obj`, executes that source in a private module; it is what a
plain `pickle.load` runs, here and in the original toolkit.

Safe loading: this module owns it for the whole project. `load_pickle` (network snapshots, statistics,
toy models, detector pickles) and `load_torch_file` (training states and other torch.save files) read
every file through one restricted unpickler: only the globals these files really need are resolved
(tensors, arrays, containers, dtypes, torch.nn containers, `dnnlib.util.EasyDict`), embedded sources are
never executed, and every persistent object is rebuilt with this project's own class of the same name
(`safe_class_modules`, extended with `register_safe_class`). Anything else is refused with one line
naming the file, the global and the opt-in. `is_trusted` reads the opt-in, EDM2_TRUST_PICKLE, the same
way for every kind of file: 1/true/yes/on trusts (the official, code-executing `pickle.load` and
`torch.load`), unset/empty/0/false/no/off loads safely, anything else is an error.

A class whose instances need attributes derived from the pickled state should compute them
in its own `__setstate__` (calling super()), which every loading path goes through.

`check_module_src_imports` verifies that a module meant to be embedded only imports what the
official environment provides, so our pickles stay loadable by the original tools.
"""

import _compat_pickle
import ast
import builtins
import codecs
import collections
import copy
import importlib
import inspect
import io
import os
import pickle
import sys
import types
import uuid
from typing import Any, BinaryIO, Callable, Iterable, Optional, Union

import numpy as np
import torch

import dnnlib
from torch_utils import misc

#----------------------------------------------------------------------------
# Module-level state.

_version = 6  # Stored in every pickle and checked on load; must stay 6 for compatibility.
_decorators = set()  # Every wrapper class created by persistent_class().
_import_hooks = []  # Callables meta -> meta, applied before rebuilding an object.
_module_to_src_dict = dict()  # module object -> source text
_src_to_module_dict = dict()  # source text -> module object

PICKLE_PROTOCOL = 4  # What the official toolkit writes with Python 3.8-3.13 (pickle.DEFAULT_PROTOCOL).

#----------------------------------------------------------------------------
# Writer side: persistent_class (docs/formats.md#embedded-source-code).


def persistent_class(orig_class: type) -> type:
    """Class decorator: instances pickle the source of the defining module along with their state.

    Returns a subclass with the same name, qualified name, module and docstring, carrying
    `_orig_module_src` and `_orig_class_name`. Constructor arguments are recorded (deep copies)
    in `_init_args` / `_init_kwargs` unless the instance sets `_record_init_args = False` first.
    """
    assert isinstance(orig_class, type), 'persistent_class() expects a class'
    if is_persistent(orig_class):
        return orig_class
    assert orig_class.__module__ in sys.modules, f'module {orig_class.__module__} is not imported'
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record = getattr(self, '_record_init_args', True)
            self._init_args = copy.deepcopy(args) if record else None
            self._init_kwargs = copy.deepcopy(kwargs) if record else None
            assert orig_class.__name__ in orig_module.__dict__, \
                f'persistent class {orig_class.__name__} must be defined at the top level of its module'
            _check_pickleable(self.__reduce__())

        @property
        def init_args(self) -> tuple:
            assert self._init_args is not None, 'constructor arguments were not recorded'
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self) -> dnnlib.EasyDict:
            assert self._init_kwargs is not None, 'constructor arguments were not recorded'
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj  # Pickled by reference: the name every pickle uses.
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    _decorators.add(Decorator)
    return Decorator


def is_persistent(obj: Any) -> bool:
    """True for classes made by persistent_class() and for their instances."""
    try:
        if obj in _decorators:
            return True
    except TypeError:  # Unhashable object.
        pass
    return type(obj) in _decorators


def import_hook(hook: Callable[[dnnlib.EasyDict], dnnlib.EasyDict]) -> None:
    """Register `hook(meta) -> meta`, applied to every persistent object before it is rebuilt.

    Typical use: patch `meta.module_src` (string replacement) to repair an old pickle.
    """
    assert callable(hook)
    _import_hooks.append(hook)


def _module_to_src(module: types.ModuleType) -> str:
    """Source text of a module, cached in both directions."""
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src


def _src_to_module(src: str) -> types.ModuleType:
    """Module for a source text: the cached one, or a fresh private module executing it (trusted only)."""
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module = types.ModuleType('_imported_module_' + uuid.uuid4().hex)
        sys.modules[module.__name__] = module
        _module_to_src_dict[module] = src  # Before exec: the module's own decorators look it up.
        _src_to_module_dict[src] = module
        exec(src, module.__dict__)  # Official behaviour; reached only on the trusted path.
    return module


def _check_pickleable(obj: Any) -> None:
    """Fail early if `obj` cannot be pickled; cheap for containers, tensors and persistent objects."""
    def strip_known(x):
        if isinstance(x, (list, tuple, set)):
            return [strip_known(v) for v in x]
        if isinstance(x, dict):
            return [[strip_known(k), strip_known(v)] for k, v in x.items()]
        if isinstance(x, (str, int, float, bool, bytes, bytearray)):
            return None
        if f'{type(x).__module__}.{type(x).__name__}' in ('numpy.ndarray', 'torch.Tensor', 'torch.nn.parameter.Parameter'):
            return None
        if is_persistent(x):
            return None
        return x
    with io.BytesIO() as f:
        pickle.dump(strip_known(obj), f)

#----------------------------------------------------------------------------
# Official reader (docs/formats.md#embedded-source-code): executes the embedded source. Reached by plain pickle.load.


def _reconstruct_persistent_obj(meta: dict) -> Any:
    """Rebuild a persistent object from its meta by executing the embedded module source."""
    meta = _apply_import_hooks(meta)
    assert meta.version == _version, f'persistent object version {meta.version} is not {_version}'
    module = _src_to_module(meta.module_src)
    assert meta.type == 'class', f'unknown persistent object type {meta.type!r}'
    orig_class = module.__dict__[meta.class_name]
    decorator_class = persistent_class(orig_class)
    return _new_with_state(decorator_class, meta.state)


def _apply_import_hooks(meta: dict) -> dnnlib.EasyDict:
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state)
    for hook in _import_hooks:
        meta = hook(meta)
        assert meta is not None, f'import hook {hook} returned None'
    return meta


def _new_with_state(cls: type, state: dict) -> Any:
    """Create `cls` without calling __init__, then apply the pickled state."""
    obj = cls.__new__(cls)
    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(state)
    else:
        obj.__dict__.update(state)
    return obj

#----------------------------------------------------------------------------
# Safe loading: the one restricted unpickler, used for pickles and torch.save files alike.

TRUST_ENV_VAR = 'EDM2_TRUST_PICKLE'
TRUST_VALUES = ('1', 'true', 'yes', 'on')       # Trust every file: the official, code-executing loaders.
SAFE_VALUES = ('', '0', 'false', 'no', 'off')   # Unset counts as '': safe loading.
ZIP_MAGIC = b'PK\x03\x04'                       # First bytes of a torch.save file (and of any zip archive).

# Persistent class name -> module of this project that defines it (EDM2 and EDM v1 class names do
# not clash); more can be added with register_safe_class().
safe_class_modules = {
    'MPFourier': 'training.networks_edm2',
    'MPConv': 'training.networks_edm2',
    'Block': 'training.networks_edm2',
    'UNet': 'training.networks_edm2',
    'Precond': 'training.networks_edm2',
    'Encoder': 'training.encoders',
    'StandardRGBEncoder': 'training.encoders',
    'StabilityVAEEncoder': 'training.encoders',
    'EDM2Loss': 'training.training_loop',
    'MPSiLU': 'training.toy',
    'MPLinear': 'training.toy',
    'ToyModel': 'training.toy',
    # EDM v1 (Karras et al. 2022): the module paths its pickles store.
    **{name: 'training.networks' for name in (
        'Linear', 'Conv2d', 'GroupNorm', 'UNetBlock', 'PositionalEmbedding', 'FourierEmbedding', 'SongUNet',
        'DhariwalUNet', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond')},
    **{name: 'training.loss' for name in ('VPLoss', 'VELoss', 'EDMLoss')},
    'AugmentPipe': 'training.augment',
}


def register_safe_class(class_name: str, module_name: str) -> None:
    """Let the safe loader rebuild persistent objects named `class_name` with `module_name`.`class_name`."""
    safe_class_modules[class_name] = module_name


class TrustSettingError(ValueError):
    """EDM2_TRUST_PICKLE holds a value that means neither yes nor no."""


class PickleLoadError(pickle.UnpicklingError):
    """A file could not be loaded; the one-line message is '<path>: <reason>'."""

    def __init__(self, path: str, reason: str):
        super().__init__(f'{path}: {reason}')
        self.path, self.reason = path, reason

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.reason)


class UnsafePickleError(PickleLoadError):
    """The safe loader refused a global or class the file needs; the message names it and how to opt in."""


class _Refused(pickle.UnpicklingError):
    """Raised inside the safe unpickler with what it refused; the loaders turn it into UnsafePickleError."""


class _Malformed(pickle.UnpicklingError):
    """Raised inside the safe unpickler for a persistent object that no loader could rebuild."""


def is_trusted(trust: Optional[bool] = None) -> bool:
    """`trust` when given, else whether EDM2_TRUST_PICKLE says yes (1, true, yes, on; any case) or no
    (unset, empty, 0, false, no, off). Any other value raises TrustSettingError: a typo must not decide
    whether code in a file runs."""
    if trust is not None:
        return bool(trust)
    value = os.environ.get(TRUST_ENV_VAR, '')
    setting = value.strip().lower()
    if setting in TRUST_VALUES or setting in SAFE_VALUES:
        return setting in TRUST_VALUES
    raise TrustSettingError(f'{TRUST_ENV_VAR}={value!r}: expected {", ".join(TRUST_VALUES)} to trust files (running '
                            f'the code they reference), or {", ".join(SAFE_VALUES[1:])} or unset for safe loading')


def _numpy_globals() -> dict:
    """numpy's reconstruction helpers under both module paths (numpy 1.x `core`, 2.x `_core`)."""
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    table = {'numpy.ndarray': np.ndarray, 'numpy.dtype': np.dtype, 'numpy.array': np.array}
    for kind in ('int', 'uint', 'float'):   # the portable scalar names save_pickle writes
        for bits in (8, 16, 32, 64):
            if hasattr(np, f'{kind}{bits}'):
                table[f'numpy.{kind}{bits}'] = getattr(np, f'{kind}{bits}')
    for core in ('numpy.core', 'numpy._core'):
        table[f'{core}.multiarray._reconstruct'] = reconstruct
        table[f'{core}.multiarray.scalar'] = scalar
        table[f'{core}.numeric._frombuffer'] = frombuffer
    return table


def _torch_globals() -> dict:
    """Tensor/parameter rebuild functions and plain torch value types (dtypes, devices, sizes)."""
    table = {'torch.device': torch.device, 'torch.Size': torch.Size, 'torch.Tensor': torch.Tensor,
             'torch.nn.parameter.Parameter': torch.nn.Parameter,
             'torch.storage._load_from_bytes': _load_storage_safely}
    for name in ('_rebuild_tensor', '_rebuild_tensor_v2', '_rebuild_tensor_v3', '_rebuild_parameter',
                 '_rebuild_parameter_with_state'):
        if hasattr(torch._utils, name):
            table[f'torch._utils.{name}'] = getattr(torch._utils, name)
    for name in ('_rebuild_from_type', '_rebuild_from_type_v2'):
        if hasattr(torch._tensor, name):
            table[f'torch._tensor.{name}'] = getattr(torch._tensor, name)
    if hasattr(torch.serialization, '_get_layout'):  # How torch.layout values pickle.
        table['torch.serialization._get_layout'] = torch.serialization._get_layout
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.memory_format)):  # These pickle as `torch.<name>`.
            table[f'torch.{name}'] = value
    return table


def _plain_globals() -> dict:
    table = {'collections.OrderedDict': collections.OrderedDict, '_codecs.encode': codecs.encode,
             'dnnlib.util.EasyDict': dnnlib.util.EasyDict, 'dnnlib.EasyDict': dnnlib.util.EasyDict}
    for name in ('set', 'frozenset', 'slice', 'complex', 'range', 'bytearray', 'bytes'):
        table[f'builtins.{name}'] = getattr(builtins, name)
    return table


_safe_globals_cache = None


def _safe_globals() -> dict:
    global _safe_globals_cache
    if _safe_globals_cache is None:
        _safe_globals_cache = {**_plain_globals(), **_numpy_globals(), **_torch_globals()}
    return _safe_globals_cache


def _torch_module_class(module: str, name: str) -> Optional[type]:
    """Standard torch.nn layer classes (e.g. ModuleDict) are safe: their code is torch's own."""
    if not module.startswith('torch.nn.modules.'):
        return None
    try:
        value = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return value if isinstance(value, type) and issubclass(value, torch.nn.Module) else None


def _python3_name(module: str, name: str) -> tuple:
    """Protocol 0-2 pickles (torch.save writes protocol 2) use Python 2 names such as `__builtin__.set`;
    pickle.Unpickler.find_class translates them, so an override has to as well."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _SafeUnpickler(pickle.Unpickler):
    """Resolves allow-listed globals only; persistent objects go to _rebuild_safely(), which never runs
    their embedded source."""

    def find_class(self, module: str, name: str) -> Any:
        module, name = _python3_name(module, name)
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            return _rebuild_safely
        value = _safe_globals().get(f'{module}.{name}', None)
        if value is None:
            value = _torch_module_class(module, name)
        if value is None:
            raise _Refused(f"global '{module}.{name}', which is not on the safe-loading list")
        return value


# What torch.load(pickle_module=...) needs: the safe unpickler for the data and the metadata records.
_SAFE_PICKLE_MODULE = types.SimpleNamespace(__name__='torch_utils.persistence.safe', Unpickler=_SafeUnpickler,
                                            load=lambda f, **kwargs: _SafeUnpickler(f, **kwargs).load())


def _load_storage_safely(data: bytes) -> Any:
    """Safe stand-in for torch.storage._load_from_bytes, through which plainly pickled tensors store their
    data: the embedded torch.save blob is read by the same restricted unpickler."""
    map_location = None if torch.cuda.is_available() else 'cpu'
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False,
                      pickle_module=_SAFE_PICKLE_MODULE)


def _rebuild_safely(meta: Any) -> Any:
    """Safe counterpart of _reconstruct_persistent_obj: never executes meta.module_src."""
    if not isinstance(meta, dict) or not isinstance(meta.get('state', None), dict):
        raise _Malformed('malformed persistent object (expected a meta dict with a state dict)')
    meta = _apply_import_hooks(meta)
    if meta.get('version', None) != _version:
        raise _Malformed(f"persistent object version {meta.get('version', None)!r} is not {_version}")
    if meta.get('type', None) != 'class':
        raise _Malformed(f"unknown persistent object type {meta.get('type', None)!r}")
    cls = _project_class(meta.get('class_name', None))
    return _new_with_state(cls, meta.state)


def _project_class(class_name: Any) -> type:
    """This project's persistent class that replaces the pickled class `class_name`."""
    module_name = safe_class_modules.get(class_name, None) if isinstance(class_name, str) else None
    if module_name is None:
        raise _Refused(f"persistent class {class_name!r}, which is not one of this project's classes")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if cls is None or not is_persistent(cls):
        raise _Malformed(f'{module_name}.{class_name} is missing or not a persistent class')
    return cls

#----------------------------------------------------------------------------
# Public load/save API.

Source = Union[str, os.PathLike, BinaryIO]


def load_pickle(src: Source, *, trust: Optional[bool] = None, name: Optional[str] = None) -> Any:
    """Load a pickle (network snapshot, statistics, toy model, detector) from a path, a URL (downloaded
    through the dnnlib cache) or a binary file.

    Safe unless is_trusted(trust) (see the module docstring); trusted, it is plain `pickle.load`, which
    executes the code the file references (official behaviour). `name` names the file in errors (default:
    the path, or the stream's name). Raises UnsafePickleError when the safe loader refuses something,
    PickleLoadError for any other bad content, OSError (incl. dnnlib.util.DownloadError) when the file
    cannot be opened, TrustSettingError for an invalid EDM2_TRUST_PICKLE.
    """
    trusted = is_trusted(trust)
    return _load(src, name, 'pickle', lambda f: pickle.load(f) if trusted else _SafeUnpickler(f).load())


def load_torch_file(src: Source, *, trust: Optional[bool] = None, name: Optional[str] = None) -> Any:
    """Load a torch.save file (training state, state dict) with its tensors on the CPU; same sources,
    trust rule and errors as load_pickle, and the same restricted unpickler unless trusted."""
    pickle_module = pickle if is_trusted(trust) else _SAFE_PICKLE_MODULE
    return _load(src, name, 'torch.save file',
                 lambda f: torch.load(f, map_location='cpu', weights_only=False, pickle_module=pickle_module))


def _load(src: Source, name: Optional[str], kind: str, read: Callable[[BinaryIO], Any]) -> Any:
    if not isinstance(src, (str, os.PathLike)):
        return _read(src, name or str(getattr(src, 'name', '<stream>')), kind, read)
    path = os.fspath(src)
    with _open_source(path) as f:
        return _read(f, name or path, kind, read)


def _open_source(path: str) -> BinaryIO:
    if '://' in path:
        return dnnlib.util.open_url(path)
    return open(path, 'rb')


def _read(f: BinaryIO, name: str, kind: str, read: Callable[[BinaryIO], Any]) -> Any:
    try:
        return read(f)
    except _Refused as err:
        raise UnsafePickleError(name, f'refusing to load {err}; if you trust this file, set {TRUST_ENV_VAR}=1 to '
                                'load it with the official, code-executing loader') from err
    except Exception as err:  # Garbage bytes surface as any type: struct.error, IndexError, KeyError, ...
        raise PickleLoadError(name, _describe_failure(f, err, kind)) from err


def _describe_failure(f: BinaryIO, err: BaseException, kind: str) -> str:
    if isinstance(err, _Malformed):
        return str(err)
    if kind == 'pickle' and _starts_with(f, ZIP_MAGIC):
        return 'a zip archive (a torch.save file such as a training-state-*.pt), not a pickle'
    if isinstance(err, (EOFError, pickle.UnpicklingError)):
        return f'truncated or not a {kind} ({dnnlib.util.first_line(err)})'
    return f'cannot load {kind} ({dnnlib.util.first_line(err, with_type=True)})'


def _starts_with(f: BinaryIO, magic: bytes) -> bool:
    try:
        f.seek(0)
        return f.read(len(magic)) == magic
    except (OSError, AttributeError, ValueError):  # Not seekable, or already closed.
        return False


class _PortablePickler(pickle.Pickler):
    """Writes numeric numpy arrays and scalars through names every numpy version has (`numpy.array`,
    `numpy.float32`, ...). numpy 2's default reduction names `numpy._core`, which numpy < 1.26 cannot
    import, so the official environment could not load our latent-model snapshots (encoder constants)."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and obj.dtype.kind in 'biuf':
            return np.array, (obj.tolist(), obj.dtype.str)
        if isinstance(obj, np.generic) and obj.dtype.kind in 'iuf' and type(obj).__name__ == obj.dtype.name:
            return type(obj), (obj.item(),)
        return NotImplemented


def dump_portable(obj: Any, file: Any) -> None:
    """pickle.dump with numpy values under names every numpy version can import (see _PortablePickler)."""
    _PortablePickler(file, protocol=PICKLE_PROTOCOL).dump(obj)


def save_pickle(obj: Any, path: Union[str, os.PathLike]) -> None:
    """Write `obj` as a pickle in the official format, atomically (all or nothing)."""
    path = os.fspath(path)
    dir_path = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(dir_path):
        raise FileNotFoundError(f'{path}: output directory {dir_path} does not exist')
    with misc.atomic_open(path, 'wb') as f:
        dump_portable(obj, f)

#----------------------------------------------------------------------------
# Compatibility check for modules whose source gets embedded (docs/formats.md#embedded-source-code).

# Public API of the official torch_utils / dnnlib modules.
OFFICIAL_API = {
    'torch_utils': {'persistence', 'misc', 'distributed', 'training_stats'},
    'torch_utils.persistence': {'persistent_class', 'is_persistent', 'import_hook', '_reconstruct_persistent_obj'},
    'torch_utils.misc': {
        'set_random_seed', 'constant', 'const_like', 'pinned_buf', 'symbolic_assert', 'suppress_tracer_warnings',
        'assert_shape', 'profiled_function', 'InfiniteSampler', 'params_and_buffers', 'named_params_and_buffers',
        'copy_params_and_buffers', 'ddp_sync', 'check_ddp_consistency', 'print_module_summary', 'tile_images'},
    'torch_utils.distributed': {
        'init', 'get_rank', 'get_world_size', 'should_stop', 'should_suspend', 'request_suspend',
        'update_progress', 'print0', 'CheckpointIO'},
    'torch_utils.training_stats': {'init_multiprocessing', 'report', 'report0', 'Collector', 'default_collector'},
    'dnnlib': {'util', 'EasyDict', 'make_cache_dir_path'},
    'dnnlib.util': {
        'EasyDict', 'Logger', 'set_cache_dir', 'make_cache_dir_path', 'format_time', 'format_time_brief',
        'tuple_product', 'get_dtype_and_ctype', 'is_pickleable', 'get_module_from_obj_name',
        'get_obj_from_module', 'get_obj_by_name', 'call_func_by_name', 'construct_class_by_name',
        'get_module_dir_by_obj_name', 'is_top_level_function', 'get_top_level_function_name',
        'list_dir_recursively_with_ignore', 'copy_files_and_create_dirs', 'is_url', 'open_url'},
}
OFFICIAL_THIRD_PARTY = frozenset({'numpy', 'torch', 'psutil'})
_STDLIB_FALLBACK = frozenset({  # Python 3.9 has no sys.stdlib_module_names.
    '__future__', 'abc', 'ast', 'collections', 'contextlib', 'copy', 'ctypes', 'dataclasses', 'functools',
    'glob', 'hashlib', 'importlib', 'inspect', 'io', 'itertools', 'json', 'math', 'os', 'pickle', 'random',
    're', 'shutil', 'socket', 'sys', 'tempfile', 'time', 'types', 'typing', 'uuid', 'warnings', 'zipfile'})


def check_module_src_imports(src: str, extra_allowed: Iterable[str] = (), check_api: bool = True,
                             include_functions: bool = True) -> list:
    """Names a module source uses that the official toolkit's environment lacks (empty list = fine).

    Every import must be standard library, numpy, torch, psutil, an official torch_utils/dnnlib
    module, or a top-level package in `extra_allowed`. Relative imports are reported (an embedded
    source runs outside any package). With `check_api`, names taken from torch_utils/dnnlib
    (`from torch_utils.misc import X`, `misc.X`) must be official API too. With
    `include_functions=False`, code inside function bodies (not run when a pickle loads) is skipped.
    """
    nodes = list(_walk(ast.parse(src), include_functions))
    allowed_top = set(getattr(sys, 'stdlib_module_names', _STDLIB_FALLBACK)) | OFFICIAL_THIRD_PARTY | set(extra_allowed)
    problems, aliases = set(), {}
    for node in nodes:
        if isinstance(node, ast.Import):
            _check_import(node, allowed_top, problems, aliases)
        elif isinstance(node, ast.ImportFrom):
            _check_import_from(node, allowed_top, check_api, problems, aliases)
    if check_api:
        for node in nodes:
            if isinstance(node, ast.Attribute):
                _check_attribute(node, aliases, problems)
    return sorted(problems)


def _walk(node: ast.AST, include_functions: bool) -> Iterable[ast.AST]:
    """ast.walk, optionally without descending into function bodies."""
    yield node
    for child in ast.iter_child_nodes(node):
        if include_functions or not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, include_functions)


def _module_allowed(name: str, allowed_top: set) -> bool:
    top = name.split('.')[0]
    if top in ('torch_utils', 'dnnlib'):
        return name in OFFICIAL_API
    return top in allowed_top


def _check_import(node: ast.Import, allowed_top: set, problems: set, aliases: dict) -> None:
    for alias in node.names:
        if not _module_allowed(alias.name, allowed_top):
            problems.add(alias.name)
        elif alias.asname:
            aliases[alias.asname] = alias.name
        else:
            top = alias.name.split('.')[0]
            aliases[top] = top


def _check_import_from(node: ast.ImportFrom, allowed_top: set, check_api: bool, problems: set, aliases: dict) -> None:
    if node.level:
        problems.add('.' * node.level + (node.module or ''))
        return
    if not _module_allowed(node.module, allowed_top):
        problems.add(node.module)
        return
    for alias in node.names:
        full = f'{node.module}.{alias.name}'
        if full in OFFICIAL_API:
            aliases[alias.asname or alias.name] = full
        elif check_api and node.module in OFFICIAL_API and alias.name not in OFFICIAL_API[node.module]:
            problems.add(full)


def _check_attribute(node: ast.Attribute, aliases: dict, problems: set) -> None:
    """For `a.b.c` with `a` bound to an official torch_utils/dnnlib module, check each step."""
    chain = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or aliases.get(node.id, None) not in OFFICIAL_API:
        return
    path = aliases[node.id]
    for attr in reversed(chain):
        if attr not in OFFICIAL_API[path]:
            problems.add(f'{path}.{attr}')
            return
        if f'{path}.{attr}' not in OFFICIAL_API:
            return
        path = f'{path}.{attr}'
