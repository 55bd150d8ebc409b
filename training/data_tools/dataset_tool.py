"""Library behind `dataset_tool.py`: input readers, atomic output writers, `convert`, `encode`, `decode`
and the fork's `process_and_encode` (docs/formats.md#datasets-written-by-dataset_toolpy).

Every command returns a `SkipLog` listing the inputs it skipped and why (unreadable files, images too
small for `center-crop-wide`); the CLI prints its summary and, with `--strict`, fails when it is not
empty. Errors the user must fix raise `DatasetToolError` with a one-line message.
"""

import contextlib
import io
import json
import os
import shutil
import stat
import sys
import tempfile
import zipfile
import zlib
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import PIL.Image
import torch
import tqdm

from torch_utils import distributed
from torch_utils import misc
from training.data_tools import image_transforms

#----------------------------------------------------------------------------
# Errors and the skip log.


class DatasetToolError(Exception):
    """A problem with the options or inputs, described in one line."""


class SkipLog:
    """Inputs that were skipped, with the reason for each."""

    def __init__(self, total: int = 0):
        self.items = []  # [(name, reason), ...]
        self.total = total  # Number of inputs considered.

    def add(self, name: str, reason: str) -> None:
        self.items.append((name, reason))

    def __len__(self) -> int:
        return len(self.items)

    def summary(self, max_listed: int = 10) -> str:
        if not self.items:
            return f'Processed {self.total} inputs, skipped none.'
        lines = [f'Processed {self.total} inputs, skipped {len(self.items)}:']
        lines += [f'  {name}: {reason}' for name, reason in self.items[:max_listed]]
        if len(self.items) > max_listed:
            lines.append(f'  ... and {len(self.items) - max_listed} more')
        return '\n'.join(lines)


# What reading one input can raise when its bytes are bad; a zip member with a bad CRC or a damaged
# deflate stream raises BadZipFile / zlib.error, which are not OSErrors.
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError,
                     zipfile.BadZipFile, zlib.error)

#----------------------------------------------------------------------------
# Names and encodings.


def parse_size(s: Optional[str]) -> tuple:
    """'512x512' or '512,512' -> (512, 512); None -> (None, None). Sizes must be positive; ValueError
    (the message names no option: the caller adds it)."""
    if s is None:
        return None, None
    parts = s.replace(',', 'x').split('x')
    shown = s.encode('unicode_escape').decode('ascii')  # Keep the error message on one line.
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f'cannot parse tuple {shown} (expected WxH, e.g. 512x512)')
    width, height = int(parts[0]), int(parts[1])
    if width <= 0 or height <= 0:
        raise ValueError(f'width and height must be positive, got {shown}')
    return width, height


def parse_tuple(s: Optional[str]) -> tuple:
    """`parse_size` of the --resolution option; DatasetToolError naming it."""
    try:
        return parse_size(s)
    except ValueError as err:
        raise DatasetToolError(f'--resolution: {err}') from None


def archive_name(idx: int, prefix: str, ext: str) -> str:
    """'NNNNN/<prefix>NNNNNNNN<ext>': 8-digit index, folder = its first five digits (1000 per folder)."""
    digits = f'{idx:08d}'
    return f'{digits[:5]}/{prefix}{digits}{ext}'


def image_extensions() -> set:
    PIL.Image.init()
    return {ext.lower() for ext in PIL.Image.EXTENSION}


def has_extension(fname: str, extensions: set) -> bool:
    return '.' in fname and '.' + fname.rsplit('.', 1)[1].lower() in extensions


def decode_rgb(data: bytes) -> np.ndarray:
    """HWC uint8 RGB array of an encoded image (any PIL mode: grayscale, palette, RGBA, ...)."""
    try:
        image = PIL.Image.open(io.BytesIO(data))
    except PIL.UnidentifiedImageError:
        # PIL's message names the in-memory buffer ('<_io.BytesIO object at 0x...>'), which is noise.
        raise PIL.UnidentifiedImageError('cannot identify image file format') from None
    with image:
        return image_transforms.to_rgb_array(image)


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format='png', compress_level=0, optimize=False)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()

#----------------------------------------------------------------------------
# Input readers.


class Source:
    """Sorted input names of a directory or zip, their labels, and raw bytes by name. Picklable; the zip is
    reopened in every process."""

    def __init__(self, path: str, extensions: set):
        if not os.path.exists(path):
            raise DatasetToolError(f'Missing input file or directory: {path}')
        self.path = path
        self.is_dir = os.path.isdir(path)
        self._zip = None
        self._zip_pid = None
        if not self.is_dir:
            self._open_zip()
        self.names = sorted(n for n in self._list_all() if has_extension(n, extensions))
        self.labels = self._load_labels()

    def _list_all(self) -> list:
        if self.is_dir:
            return [os.path.relpath(os.path.join(root, f), self.path).replace('\\', '/')
                    for root, _dirs, files in os.walk(self.path) for f in files]
        return self._zipfile().namelist()

    def _open_zip(self) -> None:
        """Open the source zip now, telling a file that is not a zip from a damaged zip."""
        with open(self.path, 'rb') as f:
            is_zip = f.read(2) == b'PK'  # every zip (local header or empty-archive record) starts so
        try:
            self._zipfile()
        except zipfile.BadZipFile:
            if is_zip:
                raise DatasetToolError(f'{self.path}: not a valid zip archive (truncated or corrupt?)') from None
            raise DatasetToolError(f'Only zip archives are supported: {self.path}') from None

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _zip=None, _zip_pid=None)

    def read(self, name: str) -> bytes:
        if self.is_dir:
            with open(os.path.join(self.path, name), 'rb') as f:
                return f.read()
        return self._zipfile().read(name)

    def _read_dataset_json(self) -> Optional[list]:
        try:
            data = json.loads(self.read('dataset.json'))
        except (FileNotFoundError, KeyError):
            return None
        except ValueError as err:
            raise DatasetToolError(f'{self.path}: dataset.json is not valid JSON ({err})') from err
        labels = data.get('labels') if isinstance(data, dict) else []
        pairs_ok = isinstance(labels, list) and all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in labels)
        if not isinstance(data, dict) or 'labels' not in data or not (labels is None or pairs_ok):
            raise DatasetToolError(f'{self.path}: malformed dataset.json: expected '
                                   '{"labels": [[file name, label], ...]} or {"labels": null}')
        return labels

    def _load_labels(self) -> Optional[dict]:
        pairs = self._read_dataset_json()
        if pairs is not None:
            return {name: label for name, label in pairs}
        if not self.is_dir:
            return None
        folders = sorted({n.split('/')[0] if '/' in n else '' for n in self.names})
        if len(folders) <= 1:
            return None
        index = {name: i for i, name in enumerate(folders)}
        return {n: index[n.split('/')[0] if '/' in n else ''] for n in self.names}

    def label(self, name: str) -> Any:
        return None if self.labels is None else self.labels.get(name)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

#----------------------------------------------------------------------------
# Output writers, atomic: a zip is written to a temp file, a folder to a temp folder,
# and renamed into place only when everything succeeded.


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


class DestWriter:
    """Atomic writer of a zip or folder dataset. `--dest` is checked when the writer is created, so a
    caller creates it before any long work (loading a VAE, reading the inputs)."""

    def __init__(self, dest: str):
        if dest == '':
            raise DatasetToolError('--dest output filename or directory must not be an empty string')
        self.dest = dest
        self.is_zip = dest.lower().endswith('.zip')
        self._parent = os.path.dirname(os.path.abspath(dest))
        self._stack = contextlib.ExitStack()
        self._zip = None
        self._tmp_dir = None
        self._check_dest()

    def _check_dest(self) -> None:
        try:
            misc.check_output_path(self.dest, '--dest', is_dir=not self.is_zip)
        except ValueError as err:
            raise DatasetToolError(str(err)) from None
        if not self.is_zip and os.path.isdir(self.dest) and os.listdir(self.dest):
            raise DatasetToolError('--dest folder must be empty')

    def remove_stale_temps(self) -> None:
        """A killed run (SIGKILL, power loss) cannot clean up, and its hidden partial output can be as
        large as the dataset: remove it, saying so, since this run writes the same --dest from scratch."""
        for path in misc.remove_stale_atomic_temps(self._parent, [self.dest]):
            print(f'Removed the partial output of an interrupted earlier run: {path}', file=sys.stderr)

    def __enter__(self) -> 'DestWriter':
        os.makedirs(self._parent, exist_ok=True)
        self.remove_stale_temps()
        try:
            if self.is_zip:
                fileobj = self._stack.enter_context(misc.atomic_open(self.dest, 'wb'))
                self._zip = self._stack.enter_context(zipfile.ZipFile(fileobj, 'w', compression=zipfile.ZIP_STORED))
            else:
                self._tmp_dir = tempfile.mkdtemp(prefix=misc.atomic_temp_prefix(self.dest), dir=self._parent)
        except OSError as err:
            self._stack.close()
            raise type(err)(err.errno, err.strerror, self.dest) from err  # name --dest, not the temp file
        return self

    def write(self, name: str, data: bytes) -> None:
        if self._zip is not None:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # fixed time: reproducible archives
            info.external_attr = 0o644 << 16
            self._zip.writestr(info, data, compress_type=zipfile.ZIP_STORED)
            return
        path = os.path.join(self._tmp_dir, name)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(data)
        except OSError as err:
            raise type(err)(err.errno, err.strerror, os.path.join(self.dest, name)) from err

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.is_zip:
            return self._stack.__exit__(exc_type, exc, tb)
        if exc_type is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            return False
        # mkdtemp makes the folder 0700; give it the mode of the folder it replaces, else what the umask gives.
        mode = stat.S_IMODE(os.stat(self.dest).st_mode) if os.path.isdir(self.dest) else 0o777 & ~_umask()
        os.chmod(self._tmp_dir, mode)
        if os.path.isdir(self.dest):
            os.rmdir(self.dest)  # empty (checked on entry); replaced by the finished folder
        os.replace(self._tmp_dir, self.dest)
        return False


def dataset_json(labels: list) -> bytes:
    """`dataset.json` content: label pairs, or null when any item has no label."""
    if any(label is None for _name, label in labels):
        labels = None
    return json.dumps({'labels': labels}).encode('utf-8')

#----------------------------------------------------------------------------
# convert.


CONVERT_HINT = 'use --resolution=WxH (and --transform) to give every image the same size'
ENCODE_HINT = 'encode needs a dataset of equal square images; make one with "dataset_tool.py convert --resolution=WxH"'


class DatasetShape:
    """The size fixed by the first written image; later images must match it. The first image must be
    square and a power of two (convert) or a multiple of `multiple_of` (encode: the VAE downsamples by 8).
    Errors name the file and end with `hint`, the way to fix it."""

    def __init__(self, multiple_of: Optional[int] = None, hint: str = CONVERT_HINT, stage: str = ' after scale and crop'):
        self.attrs = None
        self.multiple_of = multiple_of
        self.hint = hint
        self.stage = stage  # for the messages: convert checks images after its transform

    def _fail(self, name: str, message: str) -> None:
        raise DatasetToolError(f'{name}: {message}; {self.hint}')

    def check(self, img: np.ndarray, name: str) -> None:
        h, w = img.shape[:2]
        attrs = dict(width=w, height=h, channels=img.shape[2] if img.ndim == 3 else 1)
        if self.attrs is None:
            if w != h:
                self._fail(name, f'Image dimensions{self.stage} are required to be square.  Got {w}x{h}')
            if self.multiple_of is None and w != 2 ** int(np.floor(np.log2(w))):
                self._fail(name, f'Image width/height{self.stage} are required to be power-of-two.  Got {w}x{h}')
            if self.multiple_of is not None and w % self.multiple_of != 0:
                self._fail(name, f'Image width/height must be a multiple of {self.multiple_of}.  Got {w}x{h}')
            self.attrs = attrs
            return
        if attrs != self.attrs:
            diff = ', '.join(f'dataset {k}/cur image {k}: {self.attrs[k]}/{attrs[k]}' for k in attrs if attrs[k] != self.attrs[k])
            self._fail(name, f'Image attributes must be equal across all images of the dataset.  Got: {diff}')


class _ConvertJob:
    """Decode + transform of one input, picklable for worker processes."""

    def __init__(self, source: Source, transform: Callable):
        self.source = source
        self.transform = transform

    def __call__(self, name: str) -> tuple:
        try:
            img = decode_rgb(self.source.read(name))
        except UNREADABLE_ERRORS as err:
            return None, f'unreadable image ({err})'
        h, w = img.shape[:2]
        out = self.transform(img)
        return (out, None) if out is not None else (None, f'too small for center-crop-wide ({w}x{h})')


_worker_job = None


def _init_worker(job: Callable) -> None:
    global _worker_job
    _worker_job = job


def _run_worker_job(item: Any) -> Any:
    return _worker_job(item)


def _ordered_map(job: Callable, items: Sequence, num_workers: int) -> Iterator:
    """map(job, items) in order, in `num_workers` spawned processes (the job is sent once per worker)."""
    if num_workers <= 0:
        yield from map(job, items)
        return
    import multiprocessing
    with multiprocessing.get_context('spawn').Pool(num_workers, initializer=_init_worker, initargs=(job,)) as pool:
        yield from pool.imap(_run_worker_job, items, chunksize=8)


def _torch_device(name: Optional[str]) -> torch.device:
    """--device (None: cuda if available, else cpu), refusing unknown or absent devices in one line."""
    if name is None:
        return misc.default_device()
    try:
        return misc.check_device(name)
    except ValueError as err:
        raise DatasetToolError(f'--device: {err}') from None


def _selected_names(src: Source, max_images: Optional[int], what: str) -> list:
    if not src.names:
        raise DatasetToolError(f'No {what} found in {src.path}')
    return src.names[:max_images] if max_images is not None else src.names


def _check_something_written(labels: list, skips: SkipLog, source: str) -> None:
    """Training refuses a dataset of zero items (ImageFolderDataset), so fail now and name the cause; the
    writer then discards its temp output."""
    if labels:
        return
    if not skips.items:
        raise DatasetToolError(f'No inputs selected from {source}; nothing to write')
    name, reason = skips.items[0]
    raise DatasetToolError(f'No usable inputs in {source}: all {len(skips)} were skipped (first: {name}: {reason})')


def convert(source: str, dest: str, max_images: Optional[int] = None, transform: Optional[str] = None,
            resolution: Optional[str] = None, num_workers: int = 0, verbose: bool = True) -> SkipLog:
    """Convert images in a folder or zip to a PNG dataset (zip or folder) with `dataset.json`."""
    width, height = parse_tuple(resolution)
    try:
        transform_fn = image_transforms.TransformWrapper(transform, width, height)
    except ValueError as err:
        raise DatasetToolError(str(err)) from err
    src = Source(source, image_extensions())
    names = _selected_names(src, max_images, 'image files')
    skips, shape, labels = SkipLog(len(names)), DatasetShape(), []
    with DestWriter(dest) as writer:
        results = _ordered_map(_ConvertJob(src, transform_fn), names, num_workers)
        for idx, (name, (img, reason)) in enumerate(tqdm.tqdm(zip(names, results), total=len(names), disable=not verbose)):
            if img is None:
                skips.add(name, reason)
                continue
            shape.check(img, name)
            out_name = archive_name(idx, 'img', '.png')
            writer.write(out_name, encode_png(img))
            labels.append([out_name, src.label(name)])
        _check_something_written(labels, skips, source)
        writer.write('dataset.json', dataset_json(labels))
    return skips

#----------------------------------------------------------------------------
# encode / decode through training.encoders.StabilityVAEEncoder, batched.


def _batches(items: Iterator, batch: int) -> Iterator[list]:
    """Consecutive items grouped into lists of up to `batch` equal-shape arrays (item[2] is the array)."""
    group = []
    for item in items:
        if group and (len(group) == batch or item[2].shape != group[0][2].shape):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def _make_vae(model_url: str, batch: int, device: torch.device) -> Any:
    """The VAE, loaded now so that a missing model fails before any input is read."""
    from training.encoders import StabilityVAEEncoder  # heavy (diffusers); only the VAE commands need it
    vae = StabilityVAEEncoder(vae_name=model_url, batch_size=batch)
    vae.init(device)
    return vae


def _iter_arrays(src: Source, names: list, load: Callable, check: Callable, skips: SkipLog,
                 verbose: bool) -> Iterator[tuple]:
    """(index, name, array) of every readable input, after `check(array, name)` (which raises for arrays
    the VAE cannot take); unreadable inputs go to the skip log."""
    for idx, name in enumerate(tqdm.tqdm(names, disable=not verbose)):
        try:
            array = load(src.read(name))
        except UNREADABLE_ERRORS as err:
            skips.add(name, f'unreadable ({err})')
            continue
        check(array, name)
        yield idx, name, array


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class _LatentShape:
    """Decode takes what encode writes: numeric arrays [C, h, w], C = 2 x the VAE's latent channels."""

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, x: np.ndarray, name: str) -> None:
        if x.ndim != 3 or x.shape[0] != self.channels or x.dtype.kind not in 'fiu':
            raise DatasetToolError(f'{name}: expected a latent array of shape [{self.channels}, h, w] as written by '
                                   f'encode, got {x.dtype} {list(x.shape)}')


def encode(source: str, dest: str, model_url: str = 'stabilityai/sd-vae-ft-mse', max_images: Optional[int] = None,
           batch: int = 8, device: Optional[str] = None, verbose: bool = True) -> SkipLog:
    """Pixels -> raw VAE latents [8, H/8, W/8] (mean, std) as `NNNNN/img-mean-std-NNNNNNNN.npy`."""
    device = _torch_device(device)
    src = Source(source, image_extensions())
    names = _selected_names(src, max_images, 'image files')
    writer = DestWriter(dest)  # checks --dest before the VAE loads
    vae, skips = _make_vae(model_url, batch, device), SkipLog(len(names))
    shape = DatasetShape(multiple_of=8, hint=ENCODE_HINT, stage='')
    def encode_batch(arrays: np.ndarray) -> np.ndarray:
        pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).to(device)
        return vae.encode_pixels(pixels).cpu().numpy().astype(np.float32)
    items = _iter_arrays(src, names, decode_rgb, shape.check, skips, verbose)
    _write_converted(writer, src, items, batch, encode_batch, ('img-mean-std-', '.npy', encode_npy), skips, source)
    return skips


def decode(source: str, dest: str, model_url: str = 'stabilityai/sd-vae-ft-mse', max_images: Optional[int] = None,
           batch: int = 8, device: Optional[str] = None, seed: int = 0, verbose: bool = True) -> SkipLog:
    """Raw latents (`.npy`, as written by `encode`) -> PNGs of a posterior sample (docs/differences.md#data-1)."""
    device = _torch_device(device)
    src = Source(source, {'.npy'})
    names = _selected_names(src, max_images, '.npy latents')
    writer = DestWriter(dest)  # checks --dest before the VAE loads
    vae, skips = _make_vae(model_url, batch, device), SkipLog(len(names))
    check = _LatentShape(2 * len(vae.scale))  # mean and std of every latent channel
    torch.manual_seed(seed)  # encode_latents draws the posterior sample from the global RNG
    def decode_batch(arrays: np.ndarray) -> np.ndarray:
        latents = torch.from_numpy(arrays).to(device)
        return vae.decode(vae.encode_latents(latents)).permute(0, 2, 3, 1).cpu().numpy()
    items = _iter_arrays(src, names, _load_npy, check, skips, verbose)
    _write_converted(writer, src, items, batch, decode_batch, ('img', '.png', encode_png), skips, source)
    return skips


def _write_converted(writer: 'DestWriter', src: 'Source', items: Iterator, batch: int, convert: Callable,
                     output: tuple, skips: 'SkipLog', source: str) -> None:
    """Shared loop of encode/decode: convert `items` (index, name, array) in batches, write each result
    as `output` = (name prefix, extension, serialiser) with its source label, then dataset.json."""
    prefix, ext, serialise = output
    labels = []
    with writer, torch.no_grad():
        for group in _batches(items, batch):
            results = convert(np.stack([array for _i, _n, array in group]))
            for (idx, name, _array), result in zip(group, results):
                out_name = archive_name(idx, prefix, ext)
                writer.write(out_name, serialise(result))
                labels.append([out_name, src.label(name)])
        _check_something_written(labels, skips, source)
        writer.write('dataset.json', dataset_json(labels))

#----------------------------------------------------------------------------
# process-and-encode (fork; docs/differences.md#data-13): category folders -> per-image latents, sharded over ranks.


def list_category_images(source: str) -> tuple:
    """(sorted category folder names, [(category index, file name), ...]) — image files directly inside
    each immediate sub-folder of `source`, sorted, so that every rank derives the same list."""
    if not os.path.isdir(source):
        raise DatasetToolError(f'--source must be a directory with one sub-folder per category: {source}')
    extensions = image_extensions()
    categories = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d)))
    if not categories:
        raise DatasetToolError(f'--source has no category sub-folders (images must be in <source>/<category>/): {source}')
    items = [(c, f) for c, name in enumerate(categories)
             for f in sorted(os.listdir(os.path.join(source, name))) if has_extension(f, extensions)]
    if not items:
        raise DatasetToolError(f'No image files found in the category sub-folders of {source}')
    return categories, items


class _CategoryImages(torch.utils.data.Dataset):
    """Item i of `items`: (i, transformed HWC image or None, reason)."""

    def __init__(self, source: str, categories: list, items: list, transform: Callable):
        self.source, self.categories, self.items, self.transform = source, categories, items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple:
        cat, fname = self.items[i]
        try:
            with open(os.path.join(self.source, self.categories[cat], fname), 'rb') as f:
                img = decode_rgb(f.read())
        except UNREADABLE_ERRORS as err:
            return i, None, f'unreadable image ({err})'
        out = self.transform(img)
        return (i, out, None) if out is not None else (i, None, f'too small for the transform ({img.shape[1]}x{img.shape[0]})')


def _collate_keep_skips(batch: list) -> tuple:
    """Default collate cannot batch None (docs/differences.md#data-13): split the batch into kept images and skips."""
    kept = [(i, img) for i, img, _reason in batch if img is not None]
    skipped = [(i, reason) for i, img, reason in batch if img is None]
    pixels = torch.from_numpy(np.stack([img for _i, img in kept])) if kept else None
    return [i for i, _img in kept], pixels, skipped


def _item_name(categories: list, item: tuple) -> str:
    """'<category>/<file>': file names repeat across categories, so a skip names both."""
    cat, fname = item
    return f'{categories[cat]}/{fname}'


def _latent_path(dest: str, categories: list, item: tuple) -> str:
    cat, fname = item
    return os.path.join(dest, categories[cat], os.path.splitext(fname)[0] + '.npy')


def _drop_duplicate_stems(categories: list, items: list, skips: SkipLog) -> list:
    seen, unique = set(), []
    for cat, fname in items:
        key = (cat, os.path.splitext(fname)[0])
        if key in seen:
            skips.add(_item_name(categories, (cat, fname)), 'another file of this category has the same stem (output name clash)')
            continue
        seen.add(key)
        unique.append((cat, fname))
    return unique


def process_and_encode(source: str, dest: str, model_url: str = 'stabilityai/sd-vae-ft-mse',
                       resolution: str = '512x512', transform: Optional[str] = None, batch_size: int = 32,
                       num_workers: int = 4, gpu_batch_size: int = 8, device: Optional[str] = None,
                       verbose: bool = True) -> tuple:
    """Encode `source/<category>/<image>` to `dest/<category>/<stem>.npy` (float32 [8, H/8, W/8]) and write
    `dest/dataset.json` (labels = sorted category index). Runs on every rank of the process group (each takes
    every world_size-th image); files already present are kept, so an interrupted run resumes.
    Returns the SkipLog of this rank."""
    width, height = parse_tuple(resolution)
    try:
        transform_fn = image_transforms.TransformWrapper(transform, width, height)
    except ValueError as err:
        raise DatasetToolError(str(err)) from err
    categories, items = list_category_images(source)
    skips = SkipLog(len(items))
    items = _drop_duplicate_stems(categories, items, skips)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    shard = [it for it in items[rank::world] if not os.path.isfile(_latent_path(dest, categories, it))]
    print(f'[Rank {rank}] Total images in shard: {len(items[rank::world])} ({len(shard)} to encode)')
    device = _torch_device(device) if device else distributed.get_device()
    _encode_shard(_CategoryImages(source, categories, shard, transform_fn), dest, model_url, batch_size,
                  num_workers, gpu_batch_size, device, skips, verbose and rank == 0)
    distributed.barrier()
    if rank == 0:
        done = [it for it in items if os.path.isfile(_latent_path(dest, categories, it))]
        labels = [[f'{categories[c]}/{os.path.splitext(f)[0]}.npy', c] for c, f in done]
        os.makedirs(dest, exist_ok=True)
        with misc.atomic_open(os.path.join(dest, 'dataset.json'), 'wb') as f:
            f.write(dataset_json(labels))
    return skips


def _encode_shard(dataset: _CategoryImages, dest: str, model_url: str, batch_size: int, num_workers: int,
                  gpu_batch_size: int, device: torch.device, skips: SkipLog, verbose: bool) -> None:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_collate_keep_skips, shuffle=False,
                                         multiprocessing_context='spawn' if num_workers > 0 else None)
    print(f'[Rank {distributed.get_rank()}] Processing {len(loader)} batches.')
    vae = None  # loaded with the first readable image, so a resumed, finished run needs no model
    with torch.no_grad():
        for indices, pixels, skipped in tqdm.tqdm(loader, disable=not verbose):
            for i, reason in skipped:
                skips.add(_item_name(dataset.categories, dataset.items[i]), reason)
            if pixels is None:
                continue
            vae = vae or _make_vae(model_url, gpu_batch_size, device)
            latents = vae.encode_pixels(pixels.permute(0, 3, 1, 2).to(device)).cpu().numpy().astype(np.float32)
            for i, latent in zip(indices, latents):
                path = _latent_path(dest, dataset.categories, dataset.items[i])
                os.makedirs(os.path.dirname(path), exist_ok=True)  # on first use: a failed VAE load leaves no folders
                with misc.atomic_open(path, 'wb') as f:
                    np.save(f, latent)

#----------------------------------------------------------------------------


def sum_over_ranks(value: int) -> int:
    """Sum of an integer over all ranks (the value itself for a single process)."""
    if distributed.get_world_size() == 1:
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=distributed._sync_tensor_device())
    torch.distributed.all_reduce(tensor)
    return int(tensor.item())

#----------------------------------------------------------------------------
