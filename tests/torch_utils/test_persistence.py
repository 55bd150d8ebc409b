"""Tests for torch_utils.persistence: official pickle format, safe loader, atomic save, embed checks."""

import copy
import importlib
import importlib.util
import inspect
import io
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
import uuid

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnnlib
from tests import faults, tiny
from torch_utils import persistence

from tests.procs import REPO as REPO_ROOT  # noqa: E402

# Two versions of the same tiny network: "ours" (registered with the safe loader) and
# "official" (same class names and state layout, different source text), each a real module file.
TINY_SRC = '''
"""Tiny persistent network used by the persistence tests ({flavour})."""
import torch
from torch_utils import persistence


@persistence.persistent_class
class TinyConv(torch.nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))

    def forward(self, x):
        w = self.weight / self.weight.square().sum(dim=[1, 2, 3], keepdim=True).sqrt()  # {flavour}
        return torch.nn.functional.conv2d(x, w.to(x.dtype), padding=1)


@persistence.persistent_class
class TinyNet(torch.nn.Module):
    def __init__(self, channels=3, hidden=8, scale=1.0):
        super().__init__()
        self.conv_in = TinyConv(channels, hidden)
        self.conv_out = TinyConv(hidden, channels)
        self.layers = torch.nn.ModuleDict(dict(act=torch.nn.SiLU()))
        self.register_buffer('offset', torch.linspace(-1, 1, channels))
        self.scale = scale
{extra}
    def forward(self, x):
        y = self.conv_out(self.layers['act'](self.conv_in(x)))
        return y * self.scale + self.offset.reshape(1, -1, 1, 1)
'''

# Ours derives a cache attribute the official state lacks: the documented __setstate__ pattern.
OURS_EXTRA = """
        self._cache = {}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._cache = {}
"""


@pytest.fixture(autouse=True)
def _safe_by_default(monkeypatch):
    monkeypatch.delenv('EDM2_TRUST_PICKLE', raising=False)


def _import_file(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def tiny_modules(tmp_path_factory):
    """(ours, official): two imported module files defining TinyNet/TinyConv."""
    root = tmp_path_factory.mktemp('tinymods')
    modules = []
    for flavour, extra in (('ours', OURS_EXTRA), ('official', '')):
        name = f'tinynet_{flavour}_{uuid.uuid4().hex[:8]}'
        path = root / f'{name}.py'
        path.write_text(TINY_SRC.format(flavour=flavour, extra=extra))
        modules.append(_import_file(str(path), name))
    yield tuple(modules)
    for module in modules:
        sys.modules.pop(module.__name__, None)


@pytest.fixture
def ours(tiny_modules, monkeypatch):
    """Our tiny module, registered as the home of TinyNet/TinyConv for the safe loader."""
    module = tiny_modules[0]
    monkeypatch.setitem(persistence.safe_class_modules, 'TinyNet', module.__name__)
    monkeypatch.setitem(persistence.safe_class_modules, 'TinyConv', module.__name__)
    return module


class _Reduce:
    """Pickles as `fn(*args)`: the building block of hand-made (and hostile) pickles."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _marker_code(marker) -> str:
    return f'open({str(marker)!r}, "w").write("pwned")'


def _net_and_input(module, seed=0):
    torch.manual_seed(seed)
    net = module.TinyNet(channels=3, hidden=4, scale=0.5).eval()
    return net, torch.randn(2, 3, 8, 8)

#----------------------------------------------------------------------------
# Writer side: persistent_class and the official format.


def test_persistent_class_records_source_args_and_official_meta(tiny_modules):
    ours_module = tiny_modules[0]
    net, _ = _net_and_input(ours_module)
    cls = ours_module.TinyNet
    assert persistence.is_persistent(cls) and persistence.is_persistent(net)
    assert not persistence.is_persistent(torch.nn.Linear) and not persistence.is_persistent({})
    assert persistence.persistent_class(cls) is cls
    assert cls.__name__ == 'TinyNet' and cls.__module__ == ours_module.__name__
    assert cls._orig_class_name == 'TinyNet'
    assert cls._orig_module_src == inspect.getsource(ours_module)
    assert net.init_args == () and net.init_kwargs == dict(channels=3, hidden=4, scale=0.5)
    assert isinstance(net.init_kwargs, dnnlib.EasyDict)
    net.init_kwargs.hidden = 99  # A deep copy: the record is unchanged.
    assert net.init_kwargs.hidden == 4 and net.conv_in.init_args == (3, 4)

    fn, args, state = net.__reduce__()[:3]
    assert fn is persistence._reconstruct_persistent_obj and state is None
    meta = args[0]
    assert sorted(meta) == ['class_name', 'module_src', 'state', 'type', 'version']
    assert (meta['type'], meta['version'], meta['class_name']) == ('class', 6, 'TinyNet')
    assert meta['module_src'] == cls._orig_module_src
    assert meta['state']['_init_kwargs'] == dict(channels=3, hidden=4, scale=0.5)
    assert persistence.is_persistent(meta['state']['_modules']['conv_in'])
    assert b'torch_utils.persistence' in pickle.dumps(net) and b'_reconstruct_persistent_obj' in pickle.dumps(net)


def test_init_args_not_recorded_when_disabled(tmp_path):
    path = tmp_path / 'norecord_mod.py'
    path.write_text(textwrap.dedent("""
        from torch_utils import persistence

        class Base:
            def __init__(self, value):
                self._record_init_args = False
                self.value = value

        @persistence.persistent_class
        class NoRecord(Base):
            pass
    """))
    module = _import_file(str(path), f'norecord_{uuid.uuid4().hex[:8]}')
    obj = module.NoRecord(5)
    assert obj._init_args is None and obj._init_kwargs is None
    with pytest.raises(AssertionError):
        obj.init_kwargs
    assert pickle.loads(pickle.dumps(obj)).value == 5
    sys.modules.pop(module.__name__)


def test_deepcopy_reuses_the_defining_module(tiny_modules):
    net, x = _net_and_input(tiny_modules[0])
    clone = copy.deepcopy(net)
    assert type(clone) is type(net)  # Rebuilt from the source cache, not a freshly executed module.
    assert torch.equal(clone(x), net(x))


def test_import_hook_applies_on_both_paths(ours, tmp_path):
    net, x = _net_and_input(ours)
    path = tmp_path / 'net.pkl'
    persistence.save_pickle(net, path)
    seen = []

    def hook(meta):
        seen.append(meta.class_name)
        if meta.class_name == 'TinyNet':
            meta.state.scale = 2.0
        return meta
    persistence._import_hooks.append(hook)
    try:
        for trust in (False, True):
            assert persistence.load_pickle(path, trust=trust).scale == 2.0
    finally:
        persistence._import_hooks.remove(hook)
    assert seen.count('TinyNet') == 2 and seen.count('TinyConv') == 4

#----------------------------------------------------------------------------
# Safe loader: rebuild with our classes, never execute embedded code.


def test_save_load_round_trip_safe_and_trusted(ours, tmp_path):
    net, x = _net_and_input(ours)
    data = dnnlib.EasyDict(ema=net, dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset'),
                           loss_fn=None)
    path = tmp_path / 'snap.pkl'
    persistence.save_pickle(data, path)
    assert [p.name for p in tmp_path.iterdir()] == ['snap.pkl']  # No temp file left behind.
    for trust in (False, True):
        loaded = persistence.load_pickle(str(path), trust=trust)
        assert type(loaded) is dnnlib.EasyDict and type(loaded.dataset_kwargs) is dnnlib.EasyDict
        assert list(loaded) == ['ema', 'dataset_kwargs', 'loss_fn'] and loaded.loss_fn is None
        assert type(loaded.ema) is ours.TinyNet
        assert torch.equal(loaded.ema(x), net(x))


def test_official_pickle_loads_safely_into_our_class(tiny_modules, ours, tmp_path):
    official = tiny_modules[1]
    net, x = _net_and_input(official)
    path = tmp_path / 'official.pkl'
    with open(path, 'wb') as f:
        pickle.dump(net, f)  # Exactly what the official toolkit writes.
    assert pickle.loads(path.read_bytes()).__class__ is official.TinyNet

    safe = persistence.load_pickle(path)
    trusted = persistence.load_pickle(path, trust=True)
    assert type(safe) is ours.TinyNet and type(safe.conv_in) is ours.TinyConv
    assert type(trusted) is official.TinyNet
    assert torch.equal(safe(x), trusted(x)) and torch.equal(safe(x), net(x))
    # Behaves like an object built by our __init__: derived attribute, recorded args, state_dict.
    assert safe._cache == {} and safe.init_kwargs == dict(channels=3, hidden=4, scale=0.5)
    reference = ours.TinyNet(channels=3, hidden=4, scale=0.5)
    assert list(safe.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(safe.state_dict())
    assert torch.equal(reference.eval()(x), safe(x))
    # Re-saved, it embeds our source.
    assert pickle.loads(pickle.dumps(safe)).__class__ is ours.TinyNet


def test_precond_snapshot_round_trip():
    net = tiny.make_tiny_precond()
    buffer = io.BytesIO()
    pickle.dump(dnnlib.EasyDict(ema=copy.deepcopy(net).to(torch.float16), loss_fn=None), buffer)
    buffer.seek(0)
    loaded = persistence.load_pickle(buffer)
    assert type(loaded.ema) is type(net) and next(loaded.ema.parameters()).dtype == torch.float16
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0])
    expected = copy.deepcopy(net).to(torch.float16).float()(x, sigma)
    assert torch.equal(loaded.ema.float()(x, sigma), expected)


def test_safe_loader_accepts_the_usual_state_types(ours, tmp_path):
    net, x = _net_and_input(ours)
    net.extras = dict(arr=np.arange(6, dtype=np.float32).reshape(2, 3), scalar=np.float64(1.5), dtype=np.dtype('int16'),
                      tdtype=torch.bfloat16, device=torch.device('cpu'), size=torch.Size([1, 2]), members={1, 2},
                      frozen=frozenset('ab'), cplx=1 + 2j, sl=slice(1, 5, 2), raw=b'\x00\x01', buf=bytearray(b'ab'),
                      half=torch.ones(3, dtype=torch.float16), ints=torch.arange(4), strided=torch.ones(4, 4)[:, 1],
                      layout=torch.strided, easy=dnnlib.EasyDict(a=1))
    for protocol in (2, 3, 4, 5):
        loaded = persistence.load_pickle(io.BytesIO(pickle.dumps(net, protocol=protocol)))
        assert torch.equal(loaded(x), net(x))
        for key, value in net.extras.items():
            got = loaded.extras[key]
            if isinstance(value, (np.ndarray, torch.Tensor)):
                assert type(got) is type(value) and got.dtype == value.dtype and (got == value).all(), key
            else:
                assert got == value and type(got) is type(value), key


def test_hostile_reduce_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(dnnlib.EasyDict(ema=_Reduce(exec, (_marker_code(marker),)))))
    with pytest.raises(persistence.PickleLoadError) as info:
        persistence.load_pickle(path)
    message = str(info.value)
    assert message.startswith(f'{path}: ') and "'builtins.exec'" in message and 'EDM2_TRUST_PICKLE=1' in message
    assert '\n' not in message and isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()
    monkeypatch.setenv('EDM2_TRUST_PICKLE', '1')  # Official behaviour: the payload is live.
    persistence.load_pickle(path)
    assert marker.exists()
    monkeypatch.setenv('EDM2_TRUST_PICKLE', 'maybe')
    with pytest.raises(persistence.TrustSettingError, match="EDM2_TRUST_PICKLE='maybe'"):
        persistence.load_pickle(path)


def test_embedded_source_is_never_executed(tiny_modules, ours, tmp_path):
    marker = tmp_path / 'marker'
    official_src = inspect.getsource(tiny_modules[1]) + '\n' + _marker_code(marker) + '\n'
    net, x = _net_and_input(tiny_modules[1])
    state = net.__reduce__()[1][0]['state']

    def meta_pickle(class_name, **changes):
        meta = dict(type='class', version=6, module_src=official_src, class_name=class_name, state=state)
        meta.update(changes)
        return pickle.dumps(_Reduce(persistence._reconstruct_persistent_obj, (meta,)))

    safe = persistence.load_pickle(io.BytesIO(meta_pickle('TinyNet')))
    assert type(safe) is ours.TinyNet and torch.equal(safe(x), net(x))
    for blob, expected in ((meta_pickle('TinyConv2'), "class 'TinyConv2', which is not one of this project's classes"),
                           (meta_pickle('TinyNet', version=5), 'version 5 is not 6'),
                           (meta_pickle('TinyNet', type='function'), "type 'function'"),
                           (meta_pickle('TinyNet', state=None), 'malformed persistent object')):
        with pytest.raises(persistence.PickleLoadError, match=expected):
            persistence.load_pickle(io.BytesIO(blob))
    assert not marker.exists()
    persistence.load_pickle(io.BytesIO(meta_pickle('TinyNet')), trust=True)
    assert marker.exists()  # The trusted (official) path does execute it.


def test_crafted_tensor_storage_payload_is_refused(tmp_path):
    marker = tmp_path / 'marker'
    blob = io.BytesIO()
    torch.save(_Reduce(exec, (_marker_code(marker),)), blob)
    evil = pickle.dumps(_Reduce(torch.storage._load_from_bytes, (blob.getvalue(),)))
    refusal = r"refusing to load global 'builtins.exec'.*EDM2_TRUST_PICKLE=1"
    with pytest.raises(persistence.UnsafePickleError, match=refusal) as info:
        persistence.load_pickle(io.BytesIO(evil))
    assert '\n' not in str(info.value) and str(info.value).startswith('<stream>: ')
    assert not marker.exists()
    persistence.load_pickle(io.BytesIO(evil), trust=True)
    assert marker.exists()


def test_unknown_torch_or_project_globals_are_refused():
    blob = pickle.dumps(_Reduce(torch.nn.Module.__getattr__, (torch.nn.Identity(), 'x')))
    with pytest.raises(persistence.PickleLoadError, match='not on the safe-loading list'):
        persistence.load_pickle(io.BytesIO(blob))
    blob = pickle.dumps(persistence.save_pickle)
    with pytest.raises(persistence.PickleLoadError, match="'torch_utils.persistence.save_pickle'"):
        persistence.load_pickle(io.BytesIO(blob))

#----------------------------------------------------------------------------
# Errors, sources, atomic writes.


@pytest.mark.parametrize('trust', [False, True])
def test_truncated_empty_and_foreign_files_give_one_line_errors(ours, tmp_path, trust):
    net, _ = _net_and_input(ours)
    data = pickle.dumps(net)
    cases = {'truncated.pkl': data[:len(data) // 2], 'empty.pkl': b'', 'text.pkl': b'hello world\n',
             'cut-header.pkl': data[:1]}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(persistence.PickleLoadError) as info:
            persistence.load_pickle(path, trust=trust)
        message = str(info.value)
        assert message.startswith(f'{path}: truncated or not a pickle (') and '\n' not in message, message
    archive = tmp_path / 'state.pt'
    torch.save({'a': torch.ones(1)}, archive)
    zip_message = r'zip archive \(a torch.save file such as a training-state-\*.pt\), not a pickle'
    with pytest.raises(persistence.PickleLoadError, match=zip_message):
        persistence.load_pickle(archive, trust=trust)


def test_sources_path_url_and_file_object(ours, tmp_path):
    net, x = _net_and_input(ours)
    path = tmp_path / 'net.pkl'
    persistence.save_pickle(net, str(path))
    with open(path, 'rb') as f:
        from_file = persistence.load_pickle(f)
    from_url = persistence.load_pickle(path.as_uri())  # file:// URL through dnnlib.util.open_url.
    for loaded in (from_file, from_url, persistence.load_pickle(path)):
        assert torch.equal(loaded(x), net(x))
    with pytest.raises(FileNotFoundError, match='missing.pkl'):
        persistence.load_pickle(tmp_path / 'missing.pkl')


class _RefusesToPickle:
    """Pickling this fails half-way through a dump, after other items were already written."""

    def __reduce__(self):
        raise pickle.PicklingError('_RefusesToPickle cannot be pickled')


def test_save_pickle_is_atomic(tmp_path):
    path = tmp_path / 'out.pkl'
    persistence.save_pickle({'v': 1}, path)
    # The pickler's own error comes through unchanged; the old file stays and no temp file is left.
    with pytest.raises(pickle.PicklingError, match='_RefusesToPickle cannot be pickled'):
        persistence.save_pickle({'v': 2, 'big': np.zeros(10000), 'bad': _RefusesToPickle()}, path)
    assert persistence.load_pickle(path) == {'v': 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.pkl']
    with pytest.raises(FileNotFoundError, match='does not exist'):
        persistence.save_pickle({}, tmp_path / 'no-such-dir' / 'out.pkl')


def test_official_tools_load_our_pickles_with_plain_pickle(ours, tmp_path):
    """Fresh interpreter, our modules not importable: plain pickle.load executes the embedded sources."""
    net, x = _net_and_input(ours)
    persistence.save_pickle(dnnlib.EasyDict(ema=net, loss_fn=None), tmp_path / 'tinynet.pkl')
    torch.save(dict(x=x, y=net(x).detach()), tmp_path / 'expected.pt')
    data = tiny.write_tiny_snapshot(str(tmp_path / 'precond.pkl'))
    args = (torch.randn(2, 3, 16, 16), torch.tensor([0.3, 3.0]))
    torch.save(dict(args=args, y=data.ema.float()(*args)), tmp_path / 'precond.pt')
    script = textwrap.dedent("""
        import os, pickle, sys, torch
        sys.modules['training'] = None  # Only torch_utils and dnnlib exist, as in the official toolkit.
        folder = sys.argv[1]
        with open(os.path.join(folder, 'tinynet.pkl'), 'rb') as f:
            net = pickle.load(f).ema
        assert type(net).__module__.startswith('_imported_module_'), type(net).__module__
        expected = torch.load(os.path.join(folder, 'expected.pt'))
        assert torch.equal(net(expected['x']), expected['y'])
        with open(os.path.join(folder, 'precond.pkl'), 'rb') as f:
            data = pickle.load(f)
        assert type(data.ema).__name__ == 'Precond', type(data.ema)
        assert type(data.ema).__module__.startswith('_imported_module_')
        expected = torch.load(os.path.join(folder, 'precond.pt'))
        assert torch.equal(data.ema.float()(*expected['args']), expected['y'])
        print('ok')
    """)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHONDONTWRITEBYTECODE='1')
    result = subprocess.run([sys.executable, '-c', script, str(tmp_path)], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-3000:]

#----------------------------------------------------------------------------
# Embedded-source import check.


def test_check_module_src_imports_flags_what_official_tools_lack():
    good = textwrap.dedent("""
        import os, warnings
        import numpy as np
        import torch.nn.functional as F
        import dnnlib
        import torch_utils.persistence
        from torch_utils import misc, persistence
        from torch_utils.training_stats import report
        x = misc.const_like(None, 1) and dnnlib.util.open_url and torch_utils.persistence.persistent_class
    """)
    assert persistence.check_module_src_imports(good) == []
    bad = textwrap.dedent("""
        import scipy.special
        import training.phema
        from . import sibling
        from torch_utils import misc
        from torch_utils.misc import atomic_open
        from dnnlib.util import DownloadError
        import torch_utils.foo
        def f():
            import diffusers
            return misc.atomic_torch_save, dnnlib.util.nope
        import dnnlib
    """)
    assert persistence.check_module_src_imports(bad) == [
        '.', 'diffusers', 'dnnlib.util.DownloadError', 'dnnlib.util.nope', 'scipy.special', 'torch_utils.foo',
        'torch_utils.misc.atomic_open', 'torch_utils.misc.atomic_torch_save', 'training.phema']
    assert persistence.check_module_src_imports(bad, extra_allowed=['scipy', 'diffusers'], check_api=False) == [
        '.', 'torch_utils.foo', 'training.phema']
    assert persistence.check_module_src_imports(bad, include_functions=False) == [
        '.', 'dnnlib.util.DownloadError', 'scipy.special', 'torch_utils.foo', 'torch_utils.misc.atomic_open',
        'training.phema']


# Modules whose source our pickles embed, with what the official code needs too
# (docs/formats.md#embedded-source-code).
# Networks and encoders run their code in the official tools (forward), so their whole source is
# checked; of the training loop and the toy module only what runs on import matters.
EMBEDDED_MODULES = [
    ('training.networks_edm2', (), True),
    ('training.encoders', ('diffusers',), True),
    ('training.training_loop', (), False),
    ('training.toy', ('matplotlib', 'click', 'tqdm'), False),
]


@pytest.mark.parametrize('module_name, extra_allowed, whole_source', EMBEDDED_MODULES)
def test_project_modules_embed_only_official_imports(module_name, extra_allowed, whole_source):
    assert module_name in persistence.safe_class_modules.values()
    src = inspect.getsource(importlib.import_module(module_name))
    problems = persistence.check_module_src_imports(src, extra_allowed=extra_allowed, check_api=whole_source,
                                                    include_functions=whole_source)
    assert problems == []


def test_saved_numpy_values_use_names_every_numpy_has(ours, tmp_path):
    """numpy 2 pickles arrays as numpy._core.*, which numpy < 1.26 (the official image) cannot import."""
    net, x = _net_and_input(ours)
    values = dict(scale=np.array([0.5, 0.25, 0.125, 2.0], dtype=np.float32), grid=np.arange(6, dtype=np.int16).reshape(2, 3),
                  zero_d=np.array(3.5), flags=np.array([True, False]), scalar=np.float64(1.5), count=np.int64(7),
                  other=np.array(['a', 'b']))  # non-numeric: numpy's own reduction, still loads
    net.extras = values
    path = str(tmp_path / 'net.pkl')
    persistence.save_pickle(net, path)
    with open(path, 'rb') as f:
        data = f.read()
    numeric_only = dict(values)
    del numeric_only['other']
    net.extras = numeric_only
    persistence.save_pickle(net, str(tmp_path / 'numeric.pkl'))
    with open(tmp_path / 'numeric.pkl', 'rb') as f:
        assert b'_core' not in f.read()
    for loaded in (persistence.load_pickle(path), pickle.loads(data)):
        assert torch.equal(loaded(x), net(x))
        for key, value in values.items():
            got = loaded.extras[key]
            assert type(got) is type(value) and got.dtype == value.dtype and np.array_equal(got, value), key
            if isinstance(got, np.ndarray):
                assert got.shape == value.shape and got.flags.writeable, key

#----------------------------------------------------------------------------
# Injected faults (docs/reliability.md): random bytes, a full disk, a hostile pickle.

FUZZ_IO = settings(max_examples=25, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.reliability
@FUZZ_IO
@given(st.binary(max_size=300))
def test_load_pickle_random_bytes_raise_one_error_type(data):
    try:
        loaded = persistence.load_pickle(io.BytesIO(data))
    except persistence.PickleLoadError as err:
        assert str(err).startswith('<stream>: ') and '\n' not in str(err)
        return
    # The rare valid pickle of harmless values loads as the plain pickle module reads it.
    assert repr(loaded) == repr(pickle.loads(data))


@pytest.mark.reliability
@FUZZ_IO
@given(st.binary(max_size=300))
def test_training_state_random_bytes_are_refused_cleanly(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'training-state-0000001.pt')
        with open(path, 'wb') as f:
            f.write(data)
        with pytest.raises(persistence.PickleLoadError) as info:
            persistence.load_torch_file(path)
        assert str(info.value).startswith(f'{path}: ') and '\n' not in str(info.value)
        assert not isinstance(info.value, persistence.UnsafePickleError)  # Garbage, not a refused global.


@pytest.mark.reliability
def test_network_pickle_full_disk(tmp_path, full_disk):
    # Snapshots (train_status.save_snapshots) and reconstructed pickles (phema_reconstruct) use save_pickle.
    path = str(tmp_path / 'network-snapshot-0000001.pkl')
    net = tiny.make_tiny_precond()
    faults.check_previous_kept(path, lambda: persistence.save_pickle(dnnlib.EasyDict(ema=net), path), full_disk)


@pytest.mark.reliability
def test_trusted_mode_is_opt_in_and_does_run_code(tmp_path):
    """Control for the refusals of faults.write_bad_pickles' hostile file (here and in the tests of every
    command that loads a pickle): refused by default, and it really does run its command when trusted."""
    files = faults.write_bad_pickles(tmp_path)
    marker = files['marker']
    with pytest.raises(persistence.UnsafePickleError, match=f"refusing to load global '{os.system.__module__}.system'"):
        persistence.load_pickle(files['hostile'])
    assert not os.path.exists(marker)
    try:
        persistence.load_pickle(files['hostile'], trust=True)
        assert os.path.exists(marker)
    finally:
        if os.path.exists(marker):
            os.remove(marker)
