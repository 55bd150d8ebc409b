"""Node-local copy of a dataset archive, for datasets that live on slow network storage.

`localize(path)` returns the path of a local copy of the zip archive `path`. The first process on a
node to ask copies the archive into the cache directory while holding a file lock; the other
processes of that node block on the lock and then reuse the copy. A JSON stamp next to the copy
records the source's absolute path, size and mtime; a later run reuses the copy only while all three
still match (and the copy has the recorded size), otherwise it copies again. The copy is written to a
temporary file and renamed, so an interrupted copy never looks valid; the temp files of copies
that were killed, and an outdated copy of the same archive, are deleted by the next process that
takes the lock.

The cache only speeds reading up: when it cannot be used (no free space, a read-only or foreign
directory, a lock or copy that fails with any OSError), `localize` prints one line and returns the
source path. Valid copies are never removed automatically.

Cache directory: the `cache_dir` argument, else `$EDM2_DATASET_CACHE`, else
`<tempdir>/edm2-dataset-cache-<uid>` (per user; node-local on most clusters).
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
LOCK_NOTICE_S = 10.0  # Without fcntl, say after this long which lock file we are waiting for.

#----------------------------------------------------------------------------


def default_cache_dir() -> str:
    """$EDM2_DATASET_CACHE, else a per-user directory in the temp dir (a shared one would belong to
    whoever ran first, and its 0755 mode would lock every other user out)."""
    return os.environ.get('EDM2_DATASET_CACHE') or os.path.join(tempfile.gettempdir(), f'edm2-dataset-cache{_user_suffix()}')


def _user_suffix() -> str:
    # Windows has no getuid, but its temp dir is per user already.
    return f'-{os.getuid()}' if hasattr(os, 'getuid') else ''


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

#----------------------------------------------------------------------------


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
    start, announced = time.monotonic(), False
    while True:
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if not announced and time.monotonic() - start >= LOCK_NOTICE_S:  # a killed holder leaves the file
                print(f'Waiting for {lock_path} (held by another process; delete it if no job is running)', flush=True)
                announced = True
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

#----------------------------------------------------------------------------


def localize(path: str, cache_dir: Optional[str] = None, opener: Callable = open, verbose: bool = True) -> str:
    """Path of a valid node-local copy of zip archive `path` (made now if needed); `path` itself for a
    directory, or when the cache cannot be used (too little free space, any OSError of the cache)."""
    if os.path.isdir(path) or not path.lower().endswith('.zip'):
        return path
    stamp = source_stamp(path)  # a missing source is an error of the dataset, not of the cache
    try:
        return _localize(path, cache_dir or default_cache_dir(), stamp, opener, verbose)
    except OSError as err:
        if getattr(err, 'filename', None) in (path, stamp['source']):
            raise  # the source itself cannot be opened: reading it directly would fail the same way
        if verbose:
            print(f'Node-local dataset cache unusable ({err}); reading {path} directly')
        return path


def _localize(path: str, cache_dir: str, stamp: dict, opener: Callable, verbose: bool) -> str:
    os.makedirs(cache_dir, exist_ok=True)
    copy_path, stamp_path, lock_path = cache_paths(path, cache_dir)
    if is_valid_copy(copy_path, stamp_path, stamp):
        return copy_path
    with file_lock(lock_path):
        if is_valid_copy(copy_path, stamp_path, stamp):  # another process made it while we waited
            return copy_path
        # Holding the lock, nobody else writes these files: free the space of killed copies and of the
        # outdated copy before checking it (os.replace would drop the old copy only after the new one is written).
        _remove_stale_files(cache_dir, copy_path, stamp_path, verbose)
        if shutil.disk_usage(cache_dir).free < stamp['size'] * 1.05:
            if verbose:
                print(f'Node-local dataset cache: not enough free space in {cache_dir}; reading {path} directly.')
            return path
        try:
            copy_file(path, copy_path, opener=opener, verbose=verbose)
            _write_json_atomic(stamp_path, stamp)
        except BaseException:
            with contextlib.suppress(OSError):  # a copy without its stamp is useless: give the space back
                os.remove(copy_path)
            raise
    return copy_path


def _remove_stale_files(cache_dir: str, copy_path: str, stamp_path: str, verbose: bool) -> None:
    """Delete the stamp and copy of `copy_path` and temp files of atomic writes to either (misc.atomic_open)."""
    leftovers = misc.remove_stale_atomic_temps(cache_dir, [copy_path, stamp_path])
    if leftovers and verbose:
        print(f'Node-local dataset cache: removed {len(leftovers)} incomplete copy file(s) left by an interrupted run')
    for stale in (stamp_path, copy_path):  # stamp first: a copy without a stamp never looks valid
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)


def _write_json_atomic(path: str, obj: dict) -> None:
    with misc.atomic_open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f)


#----------------------------------------------------------------------------
