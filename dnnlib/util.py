"""Miscellaneous utility classes and functions.

Everything here is plain Python: no torch, no GPU, no network at import time.
`open_url` downloads through `requests` (imported lazily) into an on-disk cache.
"""

import ctypes
import errno
import fnmatch
import hashlib
import html
import importlib
import inspect
import io
import os
import re
import shutil
import sys
import tempfile
import time
import types
import urllib.parse
import uuid
from typing import Any, BinaryIO, Callable, Optional, Sequence, Union

import numpy as np

#----------------------------------------------------------------------------
# EasyDict


class EasyDict(dict):
    """Dict whose items can also be read and written as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


#----------------------------------------------------------------------------
# Logger: mirror stdout/stderr into a file.


class Logger:
    """Replace sys.stdout and sys.stderr by a tee that also writes to `file_name`."""

    def __init__(self, file_name: Optional[str] = None, file_mode: str = 'w', should_flush: bool = True):
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush = should_flush
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = self
        sys.stderr = self

    def __enter__(self) -> 'Logger':
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def write(self, text: Union[str, bytes]) -> None:
        if isinstance(text, bytes):
            text = text.decode()
        if len(text) == 0:  # Empty writes happen e.g. on print(end='').
            return
        if self.file is not None:
            self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()
        self.stdout.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        """Flush, restore the original streams if still installed, close the file."""
        self.flush()
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None


#----------------------------------------------------------------------------
# Cache directories.

_dnnlib_cache_dir: Optional[str] = None


def set_cache_dir(path: Optional[str]) -> None:
    """Override the cache root used by make_cache_dir_path (None restores the default)."""
    global _dnnlib_cache_dir
    _dnnlib_cache_dir = path


def make_cache_dir_path(*paths: str) -> str:
    """Path inside the cache root; the directory is not created."""
    if _dnnlib_cache_dir is not None:
        return os.path.join(_dnnlib_cache_dir, *paths)
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    if 'HOME' in os.environ:
        return os.path.join(os.environ['HOME'], '.cache', 'dnnlib', *paths)
    if 'USERPROFILE' in os.environ:
        return os.path.join(os.environ['USERPROFILE'], '.cache', 'dnnlib', *paths)
    return os.path.join(tempfile.gettempdir(), '.cache', 'dnnlib', *paths)


#----------------------------------------------------------------------------
# Small helpers.


def format_time(seconds: Union[int, float]) -> str:
    """Human-readable duration, e.g. '1h 02m 03s'."""
    s = int(np.rint(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {(s // 60) % 60:02}m {s % 60:02}s'
    return f'{s // 86400}d {(s // 3600) % 24:02}h {(s // 60) % 60:02}m'


def format_time_brief(seconds: Union[int, float]) -> str:
    """Like format_time, but drops the smallest unit above one hour."""
    s = int(np.rint(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {(s // 60) % 60:02}m'
    return f'{s // 86400}d {(s // 3600) % 24:02}h'


def tuple_product(t: tuple) -> Any:
    """Product of all elements of a tuple (1 for the empty tuple)."""
    result = 1
    for v in t:
        result *= v
    return result


_str_to_ctype = {
    'uint8': ctypes.c_ubyte,
    'uint16': ctypes.c_uint16,
    'uint32': ctypes.c_uint32,
    'uint64': ctypes.c_uint64,
    'int8': ctypes.c_byte,
    'int16': ctypes.c_int16,
    'int32': ctypes.c_int32,
    'int64': ctypes.c_int64,
    'float32': ctypes.c_float,
    'float64': ctypes.c_double,
}


def get_dtype_and_ctype(type_obj: Any) -> tuple:
    """Numpy dtype and ctypes type for a type name ('uint8' ... 'float64') or a type object."""
    if isinstance(type_obj, str):
        type_str = type_obj
    elif hasattr(type_obj, '__name__'):
        type_str = type_obj.__name__
    elif hasattr(type_obj, 'name'):
        type_str = type_obj.name
    else:
        raise RuntimeError(f'Cannot infer type name from input: {type_obj!r}')
    if type_str not in _str_to_ctype:
        raise ValueError(f'Unsupported type name: {type_str}')
    dtype = np.dtype(type_str)
    ctype = _str_to_ctype[type_str]
    assert dtype.itemsize == ctypes.sizeof(ctype)
    return dtype, ctype


def is_pickleable(obj: Any) -> bool:
    """True if `obj` can be pickled (tried in memory)."""
    import pickle

    try:
        with io.BytesIO() as stream:
            pickle.dump(obj, stream)
        return True
    except Exception:
        return False


#----------------------------------------------------------------------------
# Name-based lookup and construction.


def get_module_from_obj_name(obj_name: str) -> tuple:
    """Split 'pkg.mod.Obj.attr' into (imported module, 'Obj.attr'), longest module first."""
    if obj_name.startswith('np.'):
        obj_name = 'numpy.' + obj_name[3:]
    if obj_name.startswith('tf.'):
        obj_name = 'tensorflow.' + obj_name[3:]
    parts = obj_name.split('.')
    splits = [('.'.join(parts[:i]), '.'.join(parts[i:])) for i in range(len(parts), 0, -1)]

    # Happy path: an importable module whose remainder resolves.
    for module_name, local_name in splits:
        try:
            module = importlib.import_module(module_name)
            get_obj_from_module(module, local_name)
            return module, local_name
        except Exception:
            pass

    # A module exists but fails to import: surface that real error.
    for module_name, _local_name in splits:
        try:
            importlib.import_module(module_name)
        except ImportError as err:
            if not str(err).startswith(f"No module named '{module_name}'"):
                raise

    # A module imports but the attribute is missing: surface the AttributeError.
    for module_name, local_name in splits:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        get_obj_from_module(module, local_name)

    raise ImportError(obj_name)


def get_obj_from_module(module: types.ModuleType, obj_name: str) -> Any:
    """Resolve a dotted attribute path inside a module ('' -> the module)."""
    if obj_name == '':
        return module
    obj = module
    for part in obj_name.split('.'):
        obj = getattr(obj, part)
    return obj


def get_obj_by_name(name: str) -> Any:
    """Object referred to by a fully qualified dotted name."""
    module, obj_name = get_module_from_obj_name(name)
    return get_obj_from_module(module, obj_name)


def call_func_by_name(*args: Any, func_name: Union[str, Callable], **kwargs: Any) -> Any:
    """Call a function given by dotted name (or the callable itself)."""
    assert func_name is not None
    func_obj = get_obj_by_name(func_name) if isinstance(func_name, str) else func_name
    if not callable(func_obj):
        raise TypeError(f'{func_name} is not callable')
    return func_obj(*args, **kwargs)


def construct_class_by_name(*args: Any, class_name: Union[str, type], **kwargs: Any) -> Any:
    """Instantiate a class given by dotted name (or the class itself)."""
    return call_func_by_name(*args, func_name=class_name, **kwargs)


def get_module_dir_by_obj_name(obj_name: str) -> str:
    """Directory of the module that defines the named object."""
    module, _ = get_module_from_obj_name(obj_name)
    return os.path.dirname(inspect.getfile(module))


def is_top_level_function(obj: Any) -> bool:
    """True if `obj` is a function defined at the top level of its module."""
    return callable(obj) and obj.__name__ in sys.modules[obj.__module__].__dict__


def get_top_level_function_name(obj: Any) -> str:
    """'module.function' name; '__main__' is replaced by the script's base name."""
    assert is_top_level_function(obj)
    module = obj.__module__
    if module == '__main__':
        main_file = sys.modules[module].__file__
        module = os.path.splitext(os.path.basename(main_file))[0]
    return module + '.' + obj.__name__


#----------------------------------------------------------------------------
# File helpers.


def list_dir_recursively_with_ignore(dir_path: str, ignores: Optional[list] = None,
                                     add_base_to_relative: bool = False) -> list:
    """All files under `dir_path` as (absolute path, relative path), skipping fnmatch `ignores`."""
    assert os.path.isdir(dir_path)
    base_name = os.path.basename(os.path.normpath(dir_path))
    ignores = ignores or []
    result = []
    for root, dirs, files in os.walk(dir_path, topdown=True):
        for pattern in ignores:
            dirs[:] = [d for d in dirs if not fnmatch.fnmatch(d, pattern)]
            files = [f for f in files if not fnmatch.fnmatch(f, pattern)]
        for name in files:
            absolute = os.path.join(root, name)
            relative = os.path.relpath(absolute, dir_path)
            if add_base_to_relative:
                relative = os.path.join(base_name, relative)
            result.append((absolute, relative))
    return result


def copy_files_and_create_dirs(files: list) -> None:
    """Copy (src, dst) pairs, creating destination directories as needed."""
    for src, dst in files:
        dst_dir = os.path.dirname(dst)
        if dst_dir:
            os.makedirs(dst_dir, exist_ok=True)
        shutil.copyfile(src, dst)


#----------------------------------------------------------------------------
# URLs and downloads.


class DownloadError(OSError):
    """A download failed; the message names the URL and where to put the file by hand."""


# Retry/timeout policy; module-level so tests and slow links can adjust it.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
BACKOFF_BASE_S = 0.25  # Sleep BACKOFF_BASE_S * 2**attempt between attempts ...
BACKOFF_MAX_S = 4.0  # ... capped at this.
MAX_UNREACHABLE_ATTEMPTS = 3  # Stop early when the host cannot be resolved or refuses.
LOCAL_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)  # Cache not writable: retrying won't help.
_CHUNK_BYTES = 1 << 20


def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    """True for strings like 'https://host.domain/...' (file:// only if allowed)."""
    if not isinstance(obj, str) or '://' not in obj:
        return False
    if allow_file_urls and obj.startswith('file://'):
        return True
    try:
        for candidate in (obj, urllib.parse.urljoin(obj, '/')):
            parsed = urllib.parse.urlparse(candidate)
            if not parsed.scheme or not parsed.netloc or '.' not in parsed.netloc:
                return False
    except ValueError:
        return False
    return True


def url_md5(url: str) -> str:
    """Cache key of a URL: MD5 hex digest of the URL string."""
    return hashlib.md5(url.encode('utf-8')).hexdigest()


def safe_file_name(name: str) -> str:
    """Replace characters outside [0-9a-zA-Z-._] by '_' and keep at most 128 characters."""
    return re.sub(r'[^0-9a-zA-Z\-._]', '_', name)[:128]


def expected_cache_path(url: str, cache_dir: Optional[str] = None) -> str:
    """Where open_url stores `url` when the server gives no Content-Disposition name."""
    cache_dir = cache_dir if cache_dir is not None else make_cache_dir_path('downloads')
    return os.path.join(cache_dir, f'{url_md5(url)}_{safe_file_name(url)}')


def find_cached_file(url: str, cache_dir: str) -> Optional[str]:
    """The single cached file `<md5>_*` for `url`, or None (none or ambiguous)."""
    if not os.path.isdir(cache_dir):
        return None
    prefix = url_md5(url) + '_'
    matches = [name for name in os.listdir(cache_dir) if name.startswith(prefix)]
    if len(matches) != 1:
        return None
    return os.path.join(cache_dir, matches[0])


def _local_path_from_file_url(url: str) -> str:
    path = urllib.parse.urlparse(url).path
    if re.match(r'^/[a-zA-Z]:', path):  # '/C:/...' -> 'C:/...' on Windows.
        path = path[1:]
    return urllib.parse.unquote(path)


def _name_from_response(url: str, headers: Any) -> str:
    disposition = headers.get('Content-Disposition', '') or ''
    match = re.search(r'filename="([^"]*)"', disposition)
    return safe_file_name(match.group(1) if match else url)


def _check_google_drive_nag(url: str, headers: Any, small_body: bytes) -> None:
    """Raise IOError (a retryable condition) for Google Drive virus-scan nags and quota pages."""
    text = small_body.decode('utf-8', errors='replace')
    if 'download_warning' in headers.get('Set-Cookie', ''):
        links = [html.unescape(part) for part in text.split('"') if 'export=download' in part]
        if len(links) == 1:
            raise _Redirect(urllib.parse.urljoin(url, links[0]))
    if 'Google Drive - Quota exceeded' in text or 'Google Drive - Virus scan warning' in text:
        raise IOError('Google Drive download quota exceeded or virus-scan page returned')


class _Redirect(Exception):
    def __init__(self, new_url: str):
        super().__init__(new_url)
        self.new_url = new_url


def _is_unreachable(err: BaseException) -> bool:
    """True for name-resolution failures and refused connections (retrying rarely helps)."""
    import socket

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (socket.gaierror, ConnectionRefusedError)):
            return True
        text = str(err)
        if 'Name or service not known' in text or 'Failed to resolve' in text or 'Temporary failure in name resolution' in text:
            return True
        err = err.__cause__ or err.__context__ or (err.args[0] if err.args and isinstance(err.args[0], BaseException) else None)
    return False


def _download_to_file(session: Any, url: str, cache_dir: str, md5: str) -> str:
    """One attempt: stream `url` into a temp file in `cache_dir`, rename atomically, return the path."""
    with session.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as res:
        res.raise_for_status()
        final_path = os.path.join(cache_dir, f'{md5}_{_name_from_response(url, res.headers)}')
        tmp_path = os.path.join(cache_dir, f'tmp_{uuid.uuid4().hex}_{os.path.basename(final_path)}')
        try:
            received, head = 0, b''
            with open(tmp_path, 'wb') as f:
                for chunk in res.iter_content(_CHUNK_BYTES):
                    f.write(chunk)
                    received += len(chunk)
                    head = head + chunk[:8192 - len(head)] if len(head) < 8192 else head
                f.flush()
                os.fsync(f.fileno())
            _check_body(url, res.headers, received, head)
            os.replace(tmp_path, final_path)
        except BaseException:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            raise
    return final_path


def _check_body(url: str, headers: Any, received: int, head: bytes) -> None:
    """Reject empty, truncated and Google Drive nag responses (all retryable)."""
    if received == 0:
        raise IOError('No data received')
    expected = headers.get('Content-Length')
    if expected is not None and 'Content-Encoding' not in headers and received != int(expected):
        raise IOError(f'Truncated download: got {received} of {expected} bytes')
    if received < 8192:
        _check_google_drive_nag(url, headers, head)


def _download_to_memory(session: Any, url: str) -> bytes:
    """One attempt without caching: the whole body in memory."""
    with session.get(url, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as res:
        res.raise_for_status()
        data = res.content
        _check_body(url, res.headers, len(data), data[:8192])
    return data


def open_url(url: str, cache_dir: Optional[str] = None, num_attempts: int = 10, verbose: bool = True,
             return_filename: bool = False, cache: bool = True) -> Union[BinaryIO, str]:
    """Open a local path, file:// URL or http(s) URL as a binary stream, downloading through a cache.

    With `return_filename`, return a local path instead (requires `cache` for remote URLs).
    A failed download raises DownloadError naming the URL and the cache path for a manual copy.
    """
    assert num_attempts >= 1
    assert not (return_filename and not cache)

    # Local path or file:// URL.
    if not re.match(r'^[a-z]+://', url):
        return url if return_filename else open(url, 'rb')
    if url.startswith('file://'):
        path = _local_path_from_file_url(url)
        return path if return_filename else open(path, 'rb')
    if not is_url(url):
        raise ValueError(f'Not a valid URL: {url}')

    cache_dir = cache_dir if cache_dir is not None else make_cache_dir_path('downloads')
    if cache:
        cached = find_cached_file(url, cache_dir)
        if cached is not None:
            return cached if return_filename else open(cached, 'rb')

    if cache:
        os.makedirs(cache_dir, exist_ok=True)
    result = _download_with_retries(url, cache_dir, num_attempts, verbose, cache)
    if not cache:
        return io.BytesIO(result)
    return result if return_filename else open(result, 'rb')


def _download_with_retries(url: str, cache_dir: str, num_attempts: int, verbose: bool, cache: bool) -> Any:
    """Retry loop with backoff; returns the cache path (cache=True) or the bytes (cache=False)."""
    import requests

    md5 = url_md5(url)
    current_url = url
    last_error: Optional[BaseException] = None
    unreachable = 0
    if verbose:
        print(f'Downloading {url} ...', end='', flush=True)
    with requests.Session() as session:
        for attempt in range(num_attempts):
            try:
                result = _download_to_file(session, current_url, cache_dir, md5) if cache else _download_to_memory(session, current_url)
                if verbose:
                    print(' done', flush=True)
                return result
            except KeyboardInterrupt:
                if verbose:
                    print(' interrupted', flush=True)
                raise
            except _Redirect as redirect:
                current_url = redirect.new_url
                last_error = IOError('Google Drive virus checker nag')
            except (requests.RequestException, OSError) as err:
                last_error = err
                unreachable = unreachable + 1 if _is_unreachable(err) else 0
            local_failure = isinstance(last_error, OSError) and getattr(last_error, 'errno', None) in LOCAL_WRITE_ERRNOS
            refused = _client_error_status(last_error) is not None
            if attempt + 1 == num_attempts or unreachable >= MAX_UNREACHABLE_ATTEMPTS or local_failure or refused:
                break
            if verbose:
                print('.', end='', flush=True)
            time.sleep(min(BACKOFF_BASE_S * 2**attempt, BACKOFF_MAX_S))
    if verbose:
        print(' failed', flush=True)
    status = _client_error_status(last_error)
    if status is not None:
        raise DownloadError(f"Could not download {url}: the server answered HTTP {status} "
                            f"{last_error.response.reason or ''}".rstrip())
    hint = 'if this machine is offline, fetch' if unreachable else 'you can also fetch'
    raise DownloadError(f'Could not download {url} ({first_line(last_error, with_type=True)}); {hint} the file '
                        f'elsewhere and put it at {expected_cache_path(url, cache_dir)}')


def _client_error_status(err: Optional[BaseException]) -> Optional[int]:
    """The status of an HTTP 4xx answer that retrying cannot change (not 408 timeout / 429 rate limit), else None."""
    response = getattr(err, 'response', None)
    status = getattr(response, 'status_code', None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return status
    return None


def first_line(err: BaseException, with_type: bool = False) -> str:
    """One readable line for an error message: the first non-empty line of str(err), whitespace collapsed,
    cut to 400 characters (room for two long paths). A first line ending in ':' only announces the detail (e.g. torch's
    'Error(s) in loading state_dict for X:'), so the next line is used. Without text, the exception type
    name; `with_type` prefixes it anyway ('KeyError: ...')."""
    lines = [' '.join(line.split()) for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(':'):
        lines = lines[1:]
    if not lines:
        return type(err).__name__
    text = f'{type(err).__name__}: {lines[0]}' if with_type else lines[0]
    return text if len(text) <= 400 else text[:397] + '...'


def count_of(n: int, noun: str, plural: Optional[str] = None) -> str:
    """'1 image', '3 images', '2 categories' (plural given): counts in messages read as English."""
    return f'{n} {noun if n == 1 else (plural or noun + "s")}'

#----------------------------------------------------------------------------
# Option parsing shared by the scripts (--seeds, --categories).

_RANGE_RE = re.compile(r'^(\d+)-(\d+)$')
MAX_LIST_ITEMS = 10_000_000  # A larger list is a typo (e.g. 0-99999999999), refused before it fills the memory.


def parse_int_list(s: Union[str, Sequence[int], None]) -> Optional[list]:
    """Parse '1,2,5-10' into [1, 2, 5, 6, 7, 8, 9, 10] (ranges inclusive).

    None stays None and a list/range passes through as a list. Raises ValueError naming
    the malformed item.
    """
    if s is None or isinstance(s, (list, tuple, range)):
        return None if s is None else list(s)
    result = []
    shown = str(s).encode('unicode_escape').decode('ascii')  # Keep the error message on one line.
    for item in str(s).split(','):
        item = item.strip()
        match = _RANGE_RE.match(item)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if lo > hi:
                raise ValueError(f'invalid range "{item}" in "{shown}": start exceeds end')
            if len(result) + hi - lo + 1 > MAX_LIST_ITEMS:
                raise ValueError(f'too many items in "{shown}" (more than {MAX_LIST_ITEMS})')
            result.extend(range(lo, hi + 1))
            continue
        try:
            result.append(int(item))
        except ValueError:
            shown_item = item.encode('unicode_escape').decode('ascii')
            raise ValueError(f'invalid item "{shown_item}" in "{shown}": expected an integer or a range like 5-10') from None
    return result
