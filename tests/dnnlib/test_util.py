"""Tests for dnnlib.util: EasyDict, Logger, cache dirs, name lookup, URLs and open_url downloads."""

import http.server
import io
import os
import pickle
import socket
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnnlib
from dnnlib import util
from tests import faults

#----------------------------------------------------------------------------
# EasyDict, Logger, small helpers.


def test_easydict_attribute_access_and_pickle():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d['b'] == 2 and d.a == 1
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        _ = d.missing
    with pytest.raises(AttributeError):
        del d.missing
    restored = pickle.loads(pickle.dumps(d))
    assert type(restored) is util.EasyDict and restored == {'b': 2}


def test_logger_tees_to_file_and_restores_streams(tmp_path, capsys):
    log_path = tmp_path / 'log.txt'
    original_stdout, original_stderr = sys.stdout, sys.stderr
    with util.Logger(file_name=str(log_path), file_mode='w') as logger:
        assert sys.stdout is logger and sys.stderr is logger
        print('hello')
        sys.stderr.write(b'bytes line\n')
        logger.write('')
    assert sys.stdout is original_stdout and sys.stderr is original_stderr
    assert log_path.read_text() == 'hello\nbytes line\n'
    assert 'hello' in capsys.readouterr().out
    # Append mode keeps earlier content.
    logger = util.Logger(file_name=str(log_path), file_mode='a')
    print('more')
    logger.close()
    assert log_path.read_text().endswith('more\n')


def test_make_cache_dir_path_precedence(monkeypatch, tmp_path):
    monkeypatch.setattr(util, '_dnnlib_cache_dir', None)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'env'))
    assert util.make_cache_dir_path('downloads') == os.path.join(str(tmp_path / 'env'), 'downloads')
    util.set_cache_dir(str(tmp_path / 'explicit'))
    assert dnnlib.make_cache_dir_path('a', 'b') == os.path.join(str(tmp_path / 'explicit'), 'a', 'b')
    util.set_cache_dir(None)
    monkeypatch.delenv('DNNLIB_CACHE_DIR')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert util.make_cache_dir_path() == os.path.join(str(tmp_path / 'home'), '.cache', 'dnnlib')
    assert not os.path.exists(tmp_path / 'home')  # Not created.


@pytest.mark.parametrize('seconds, full, brief', [
    (0.4, '0s', '0s'),
    (59, '59s', '59s'),
    (61, '1m 01s', '1m 01s'),
    (3 * 3600 + 2 * 60 + 5, '3h 02m 05s', '3h 02m'),
    (2 * 86400 + 3 * 3600 + 4 * 60 + 9, '2d 03h 04m', '2d 03h'),
])
def test_format_time(seconds, full, brief):
    assert util.format_time(seconds) == full
    assert util.format_time_brief(seconds) == brief


def test_small_helpers():
    assert util.tuple_product((2, 3, 4)) == 24 and util.tuple_product(()) == 1
    dtype, ctype = util.get_dtype_and_ctype('float32')
    assert dtype == np.float32 and ctype.__name__ == 'c_float'
    assert util.get_dtype_and_ctype(np.uint8)[0] == np.uint8
    with pytest.raises(ValueError):
        util.get_dtype_and_ctype('complex64')
    assert util.is_pickleable([1, 'a']) and not util.is_pickleable(lambda: 0)


#----------------------------------------------------------------------------
# Name-based lookup.


def _top_level_helper():
    return 42


def test_name_lookup_and_construction():
    assert util.get_obj_by_name('os.path.join') is os.path.join
    assert util.get_obj_by_name('np.float32') is np.float32
    module, rest = util.get_module_from_obj_name('dnnlib.util.EasyDict')
    assert module is util and rest == 'EasyDict'
    d = util.construct_class_by_name(class_name='dnnlib.util.EasyDict', x=1)
    assert isinstance(d, util.EasyDict) and d.x == 1
    assert util.construct_class_by_name(class_name=util.EasyDict, y=2) == {'y': 2}
    assert util.call_func_by_name(3, 4, func_name='operator.add') == 7
    assert util.call_func_by_name(func_name=_top_level_helper) == 42
    assert util.get_top_level_function_name(_top_level_helper) == f'{__name__}._top_level_helper'
    assert util.get_module_dir_by_obj_name('dnnlib.util.EasyDict') == os.path.dirname(util.__file__)
    with pytest.raises(AttributeError):
        util.get_obj_by_name('dnnlib.util.NoSuchThing')
    with pytest.raises(ImportError):
        util.get_obj_by_name('no_such_module_xyz.thing')


def test_genuine_import_error_inside_module_is_reported(tmp_path, monkeypatch):
    (tmp_path / 'brokenmod_fu.py').write_text('import does_not_exist_fu\nVALUE = 1\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match='does_not_exist_fu'):
        util.get_obj_by_name('brokenmod_fu.VALUE')


def test_file_helpers(tmp_path):
    src = tmp_path / 'src'
    (src / 'sub').mkdir(parents=True)
    (src / 'a.txt').write_text('a')
    (src / 'sub' / 'b.txt').write_text('b')
    (src / 'skip.pyc').write_text('x')
    listed = util.list_dir_recursively_with_ignore(str(src), ignores=['*.pyc'])
    assert sorted(rel for _, rel in listed) == ['a.txt', os.path.join('sub', 'b.txt')]
    with_base = util.list_dir_recursively_with_ignore(str(src), add_base_to_relative=True)
    assert all(rel.startswith('src' + os.sep) for _, rel in with_base)
    util.copy_files_and_create_dirs([(abs_path, str(tmp_path / 'dst' / rel)) for abs_path, rel in listed])
    assert (tmp_path / 'dst' / 'sub' / 'b.txt').read_text() == 'b'


@pytest.mark.parametrize('url, expected', [
    ('https://nvlabs-fi-cdn.nvidia.com/edm2/x.pkl', True),
    ('http://127.0.0.1:8000/file.bin', True),
    ('http://localhost/file', False),
    ('/some/local/path.pkl', False),
    ('file:///tmp/x.pkl', False),
    (123, False),
])
def test_is_url(url, expected):
    assert util.is_url(url) == expected


def test_is_url_file_urls_when_allowed():
    assert util.is_url('file:///tmp/x.pkl', allow_file_urls=True)


#----------------------------------------------------------------------------
# open_url against a loopback HTTP server.


class _Server:
    """Loopback HTTP server driven by a list of planned responses (the last one repeats)."""

    def __init__(self):
        self.plan = []
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                step = server.plan[min(server.requests - 1, len(server.plan) - 1)]
                step(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={'poll_interval': 0.02}, daemon=True)
        self.thread.start()

    def url(self, path):
        return f'http://127.0.0.1:{self.httpd.server_address[1]}{path}'

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _ok(body, headers=None):
    def step(handler):
        handler.send_response(200)
        handler.send_header('Content-Length', str(len(body)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(body)
    return step


def _error(code):
    def step(handler):
        handler.send_response(code)
        handler.send_header('Content-Length', '0')
        handler.end_headers()
    return step


def _truncated(body, claimed):
    def step(handler):
        handler.send_response(200)
        handler.send_header('Content-Length', str(claimed))
        handler.end_headers()
        handler.wfile.write(body)
        handler.wfile.flush()
        handler.close_connection = True
    return step


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(util, 'BACKOFF_BASE_S', 0.01)
    monkeypatch.setattr(util, 'BACKOFF_MAX_S', 0.02)
    monkeypatch.setattr(util, 'CONNECT_TIMEOUT_S', 2.0)
    monkeypatch.setattr(util, 'READ_TIMEOUT_S', 2.0)


def test_open_url_downloads_into_cache(server, tmp_path):
    body = os.urandom(20000)
    server.plan = [_ok(body)]
    url = server.url('/models/net.pkl')
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == body
    assert os.listdir(tmp_path) == [os.path.basename(util.expected_cache_path(url, str(tmp_path)))]
    assert os.listdir(tmp_path)[0].startswith(util.url_md5(url) + '_')
    path = util.open_url(url, cache_dir=str(tmp_path), return_filename=True)
    assert open(path, 'rb').read() == body and server.requests == 1


def test_open_url_uses_content_disposition_name(server, tmp_path):
    server.plan = [_ok(b'x' * 9000, {'Content-Disposition': 'attachment; filename="weights v2.pt"'})]
    url = server.url('/dl?id=3')
    path = util.open_url(url, cache_dir=str(tmp_path), return_filename=True, verbose=False)
    assert os.path.basename(path) == f'{util.url_md5(url)}_weights_v2.pt'


def test_open_url_retries_after_failure(server, tmp_path, capsys):
    server.plan = [_error(500), _truncated(b'abc', 10), _ok(b'payload')]
    with util.open_url(server.url('/x.bin'), cache_dir=str(tmp_path), verbose=True) as f:
        assert f.read() == b'payload'
    assert server.requests == 3
    out = capsys.readouterr().out
    assert out.startswith(f"Downloading {server.url('/x.bin')} ...") and out.rstrip().endswith('done')


def test_open_url_cache_hit_needs_no_network(tmp_path):
    url = 'https://example.invalid.org/edm2/net.pkl'  # Never contacted.
    manual_path = util.expected_cache_path(url, str(tmp_path))
    os.makedirs(tmp_path, exist_ok=True)
    with open(manual_path, 'wb') as f:
        f.write(b'placed by hand')
    with util.open_url(url, cache_dir=str(tmp_path), num_attempts=1, verbose=False) as f:
        assert f.read() == b'placed by hand'


def test_open_url_default_cache_dir_honours_env(server, tmp_path, monkeypatch):
    monkeypatch.setattr(util, '_dnnlib_cache_dir', None)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    server.plan = [_ok(b'data')]
    path = util.open_url(server.url('/d.bin'), return_filename=True, verbose=False)
    assert os.path.dirname(path) == str(tmp_path / 'downloads')


def test_interrupted_download_leaves_nothing(server, tmp_path):
    server.plan = [_truncated(b'partial', 100000)]
    with pytest.raises(util.DownloadError):
        util.open_url(server.url('/big.bin'), cache_dir=str(tmp_path), num_attempts=2, verbose=False)
    assert os.listdir(tmp_path) == []


def test_keyboard_interrupt_during_download_leaves_nothing(server, tmp_path, monkeypatch):
    server.plan = [_ok(b'z' * 50000)]

    def interrupt(_fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, 'fsync', interrupt)
    with pytest.raises(KeyboardInterrupt):
        util.open_url(server.url('/big.bin'), cache_dir=str(tmp_path), verbose=False)
    assert os.listdir(tmp_path) == []


def test_offline_error_names_url_and_cache_path(tmp_path):
    with socket.socket() as s:  # A port nobody listens on: connection refused.
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}/edm2/model-0.100.pkl'
    start = time.time()
    with pytest.raises(util.DownloadError) as info:
        util.open_url(url, cache_dir=str(tmp_path), verbose=False)
    message = str(info.value)
    assert isinstance(info.value, OSError)
    assert '\n' not in message and url in message
    assert util.expected_cache_path(url, str(tmp_path)) in message
    assert time.time() - start < 5  # Unreachable hosts stop retrying early.
    assert os.listdir(tmp_path) == []


def test_empty_body_is_an_error(server, tmp_path):
    server.plan = [_ok(b'')]
    with pytest.raises(util.DownloadError, match='No data received'):
        util.open_url(server.url('/empty'), cache_dir=str(tmp_path), num_attempts=2, verbose=False)


def test_open_url_without_cache(server, tmp_path):
    server.plan = [_ok(b'in memory')]
    f = util.open_url(server.url('/m.bin'), cache_dir=str(tmp_path), cache=False, verbose=False)
    assert isinstance(f, io.BytesIO) and f.read() == b'in memory'
    assert not os.path.exists(tmp_path) or os.listdir(tmp_path) == []


def test_open_url_local_paths(tmp_path):
    path = tmp_path / 'local.bin'
    path.write_bytes(b'local')
    with util.open_url(str(path)) as f:
        assert f.read() == b'local'
    assert util.open_url(path.as_uri(), return_filename=True) == str(path)
    with util.open_url(path.as_uri()) as f:
        assert f.read() == b'local'


@pytest.mark.parametrize('code', [404, 403, 410])
def test_client_error_fails_at_once_without_offline_hint(server, tmp_path, code):
    server.plan = [_error(code)]
    url = server.url('/missing.bin')
    with pytest.raises(util.DownloadError) as info:
        util.open_url(url, cache_dir=str(tmp_path), verbose=False)
    message = str(info.value)
    assert server.requests == 1 and message.startswith(f'Could not download {url}: the server answered HTTP {code}')
    assert 'offline' not in message and '\n' not in message and os.listdir(tmp_path) == []


@pytest.mark.parametrize('code', [408, 429])
def test_timeout_and_rate_limit_answers_are_retried(server, tmp_path, code):
    server.plan = [_error(code), _ok(b'later')]
    with util.open_url(server.url('/busy.bin'), cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == b'later'
    assert server.requests == 2


def test_first_line():
    assert util.first_line(ValueError('\n  first \t line\nsecond')) == 'first line'
    assert util.first_line(KeyError()) == 'KeyError' and util.first_line(KeyError(), with_type=True) == 'KeyError'
    assert util.first_line(KeyError('x'), with_type=True) == "KeyError: 'x'"
    header = RuntimeError('Error(s) in loading state_dict for Linear:\n\tsize mismatch for weight: ...')
    assert util.first_line(header) == 'size mismatch for weight: ...'
    assert util.first_line(ValueError('only a header:')) == 'only a header:'
    long = util.first_line(OSError('x' * 900))
    assert len(long) == 400 and long.endswith('...')

#----------------------------------------------------------------------------
# Injected faults (docs/reliability.md): fuzzed integer lists, a full disk under the download cache.

FUZZ = settings(max_examples=60, deadline=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Text made of the characters the parsers care about, plus some noise.
PARSER_ALPHABET = st.sampled_from(list('0123456789,-.eE+ KMGi') + ['...', 'inf', 'nan', 'x', '\n'])
parser_text = st.lists(PARSER_ALPHABET, max_size=20).map(''.join) | st.text(max_size=20)


@pytest.mark.reliability
@FUZZ
@given(parser_text)
def test_seed_lists_parse_or_raise_value_error(text):
    try:
        seeds = util.parse_int_list(text)
    except ValueError as err:
        assert '\n' not in str(err).strip()
        return
    # Accepted: each comma-separated item is one integer or an inclusive range LO-HI, in order.
    expected = []
    for item in text.split(','):
        item = item.strip()
        try:
            expected.append(int(item))
        except ValueError:
            lo, hi = item.split('-')
            expected.extend(range(int(lo), int(hi) + 1))
    assert seeds == expected and all(type(seed) is int for seed in seeds)


@pytest.mark.reliability
@FUZZ
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=5))
def test_seed_ranges_expand_inclusively(pairs):
    text = ','.join(f'{a}-{a + b}' for a, b in pairs)
    expected = [s for a, b in pairs for s in range(a, a + b + 1)]
    assert util.parse_int_list(text) == expected


@pytest.mark.reliability
def test_huge_ranges_are_refused_not_expanded():
    # A typo such as 0-99999999999 must give a clean error, not exhaust memory.
    with pytest.raises(ValueError, match=r'^too many items in "0-99999999999" \(more than 10000000\)$'):
        util.parse_int_list('0-99999999999')


@pytest.mark.reliability
def test_download_cache_full_disk_leaves_nothing(tmp_path, monkeypatch):
    """A download that fails to write (ENOSPC) leaves no partial file in the cache and ends at
    once with DownloadError naming the URL, the cause and the cache path."""
    import requests

    class _Response:
        headers = {'Content-Length': '8'}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def raise_for_status(self):
            pass

        def iter_content(self, _size):
            yield b'12345678'

    attempts = []
    monkeypatch.setattr(requests.Session, 'get', lambda *a, **k: attempts.append(1) or _Response())
    real_open = open

    def full_open(path, mode='r', *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return faults.FullDiskFile(f, budget=0) if 'w' in mode and str(tmp_path) in str(path) else f
    monkeypatch.setattr('builtins.open', full_open)
    with pytest.raises(util.DownloadError) as info:
        util.open_url('https://example.invalid/net.pkl', cache_dir=str(tmp_path), verbose=False)
    assert 'https://example.invalid/net.pkl' in str(info.value) and str(tmp_path) in str(info.value)
    assert 'No space left on device' in str(info.value)
    assert len(attempts) == 1  # A full disk is not retried 10 times with back-off.
    assert os.listdir(tmp_path) == []
