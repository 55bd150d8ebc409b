"""Node-local copy of a dataset archive, for datasets that live on slow network storage.

`localize(path)` returns the path of a local copy of the zip archive `path`. The first process on a
node to ask copies the archive into the cache directory while holding a file lock; the other
processes of that node block on the lock and then reuse the copy. A JSON stamp next to the copy
records the source's absolute path, size and mtime; a later run reuses the copy only while all three
still match (and the copy has the recorded size), otherwise it copies again. The copy is written to a
temporary file and renamed, so an interrupted copy never looks valid.

Cache directory: the `cache_dir` argument, else `$EDM2_DATASET_CACHE`, else
`<tempdir>/edm2-dataset-cache` (node-local on most clusters).
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Callable, Iterator, Optional

import tqdm

from torch_utils import misc

COPY_CHUNK = 4 << 20

# ----------------------------------------------------------------------------


def default_cache_dir() -> str:
    return os.environ.get('EDM2_DATASET_CACHE') or os.path.join(tempfile.gettempdir(), 'edm2-dataset-cache')


def cache_paths(path: str, cache_dir: str) -> tuple:
    """(copy path, stamp path, lock path) for source archive `path`; the name keeps the stem for humans."""
    abspath = os.path.abspath(path)
    key = hashlib.sha1(abspath.encode('utf-8')).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(abspath))[0]
    base = os.path.join(cache_dir, f'{stem}-{key}')
    return base + '.zip', base + '.json', base + '.lock'


def source_stamp(path: str) -> dict:
    st = os.stat(path)
    return dict(source=os.path.abspath(path), size=st.st_size, mtime_ns=st.st_mtime_ns)


def is_valid_copy(copy_path: str, stamp_path: str, stamp: dict) -> bool:
    """True if the stamp matches the source's current stamp and the copy has the recorded size."""
    try:
        with open(stamp_path, 'r', encoding='utf-8') as f:
            recorded = json.load(f)
        return recorded == stamp and os.path.getsize(copy_path) == stamp['size']
    except (OSError, ValueError):
        return False

# ----------------------------------------------------------------------------


@contextlib.contextmanager
def file_lock(lock_path: str, poll_s: float = 0.2) -> Iterator[None]:
    """Exclusive inter-process lock: fcntl.flock where available (released by the OS if the holder dies),
    else an O_EXCL lock file polled until it disappears."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None:
        with open(lock_path, 'a+b') as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return
    while True:
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            time.sleep(poll_s)
    try:
        yield
    finally:
        os.close(fd)
        os.remove(lock_path)


def copy_file(src: str, dst: str, opener: Callable = open, verbose: bool = True) -> None:
    """Copy `src` (read through `opener`) to `dst` atomically (temp file in the same directory, fsync, rename)."""
    with misc.atomic_open(dst, 'wb') as out, opener(src, 'rb') as inp:
        _copy_stream(inp, out, os.path.getsize(src), verbose, os.path.basename(src))


def _copy_stream(inp, out, total: int, verbose: bool, label: str) -> None:
    with tqdm.tqdm(total=total, unit='B', unit_scale=True, desc=f'Caching {label}', disable=not verbose) as bar:
        while True:
            chunk = inp.read(COPY_CHUNK)
            if not chunk:
                break
            out.write(chunk)
            bar.update(len(chunk))

# ----------------------------------------------------------------------------


def localize(path: str, cache_dir: Optional[str] = None, opener: Callable = open, verbose: bool = True) -> str:
    """Path of a valid node-local copy of zip archive `path` (made now if needed); `path` itself for a
    directory or when the cache directory lacks the free space."""
    if os.path.isdir(path) or not path.lower().endswith('.zip'):
        return path
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    copy_path, stamp_path, lock_path = cache_paths(path, cache_dir)
    stamp = source_stamp(path)
    if is_valid_copy(copy_path, stamp_path, stamp):
        return copy_path
    with file_lock(lock_path):
        if is_valid_copy(copy_path, stamp_path, stamp):  # another process made it while we waited
            return copy_path
        if shutil.disk_usage(cache_dir).free < stamp['size'] * 1.05:
            if verbose:
                print(f'Node-local dataset cache: not enough free space in {cache_dir}; reading {path} directly.')
            return path
        with contextlib.suppress(FileNotFoundError):
            os.remove(stamp_path)
        copy_file(path, copy_path, opener=opener, verbose=verbose)
        _write_json_atomic(stamp_path, stamp)
    return copy_path


def _write_json_atomic(path: str, obj: dict) -> None:
    with misc.atomic_open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f)


# ----------------------------------------------------------------------------
