"""Datasets of images or latents stored in a directory or an uncompressed zip.

* `Dataset`: abstract base with max_size sub-sampling, x-flip, in-memory cache, labels.
* `ImageFolderDataset`: PNG/JPEG/... (PIL) or `.npy` files, labels from `dataset.json`.
* `FilteredImageDataset`: the fork's selection by `metadata.json` scores and categories.
* `CenterCropImagenet`: the fork's `preprocess` callable (ADM centre crop to a square resolution).

Reliability beyond the originals: a corrupted file is skipped (replaced by the next readable item) and
counted in `dataset.skipped`, never turned into a black image; a zip archive is opened once per process
(reopened after fork); `node_cache=True` reads a node-local copy of the archive (`training.data_tools.node_cache`).
"""

import json
import os
import sys
import zipfile
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch

from dnnlib.util import count_of, parse_int_list
from training.data_tools import node_cache as data_cache
from training.data_tools import image_transforms

try:
    import pyspng
except ImportError:
    pyspng = None

#----------------------------------------------------------------------------
# Helpers.


def _label_array(labels: list, source: str) -> np.ndarray:
    """dataset.json labels -> int64 class indices (>= 0) or float32 vectors of one length."""
    where = f'dataset.json of {source}'
    try:
        raw = np.array(labels)
    except ValueError:
        raise IOError(f'{where}: labels must all be class indices or vectors of the same length') from None
    if raw.ndim == 1 and raw.dtype.kind in 'iub':
        if raw.size and raw.min() < 0:
            raise IOError(f'{where}: negative class label {int(raw.min())}')
        return raw.astype(np.int64)
    if raw.ndim == 2 and raw.dtype.kind in 'iubf':
        return raw.astype(np.float32)
    raise IOError(f'{where}: labels must be integer class indices or numeric vectors, found {raw.dtype} '
                  f'with {raw.ndim} dimensions')


def select_indices(num_items: int, max_size: Optional[float], random_seed: int) -> np.ndarray:
    """All indices, or a seeded random subset of `max_size` of them in ascending order."""
    indices = np.arange(num_items, dtype=np.int64)
    if max_size is not None and num_items > int(max_size):
        np.random.RandomState(random_seed % (1 << 31)).shuffle(indices)
        indices = np.sort(indices[:int(max_size)])
    return indices


class CorruptImageError(IOError):
    """A file of the dataset could not be decoded."""


class ImageShapeError(IOError):
    """An image's shape differs from the dataset's (all images must have the same size and channels)."""


def _pil_mode_for_array(image: PIL.Image.Image) -> Optional[str]:
    """Mode to convert to so that np.array gives meaningful uint8 channels (palette/bilevel/CMYK...), or None."""
    if image.mode in ('L', 'LA', 'RGB', 'RGBA', 'I;16', 'I', 'F'):
        return None
    if image.mode == 'P':
        return 'RGBA' if 'transparency' in image.info else 'RGB'
    if image.mode == '1':
        return 'L'
    return 'RGB'

#----------------------------------------------------------------------------


class Dataset(torch.utils.data.Dataset):
    """Abstract base. Subclasses implement `_load_raw_image(raw_idx)` and `_load_raw_labels()`."""

    def __init__(self,
        name: str,                                  # Name of the dataset.
        raw_shape: Sequence[int],                   # Shape of the raw image data (NCHW).
        use_labels: bool = True,                    # Enable conditioning labels? False = label dimension is zero.
        max_size: Optional[float] = None,           # Artificially limit the size of the dataset. None = no limit.
        xflip: bool = False,                        # Artificially double the size of the dataset via x-flips.
        random_seed: int = 0,                       # Random seed to use when applying max_size.
        cache: bool = False,                        # Cache decoded images in CPU memory?
        preprocess: Optional[Callable] = None,      # [FORK] CHW array -> CHW array, applied before caching.
    ):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._preprocess = preprocess
        self._cached_images = dict()                # {raw_idx: np.ndarray, ...}
        self._raw_labels = None
        self._label_shape = None
        self._full_label_dim = None                 # Lower bound on the one-hot length (FilteredImageDataset).
        self.skipped = dict()                       # {file name: reason} of corrupted files met by this process.

        self._raw_idx = select_indices(self._raw_shape[0], max_size, random_seed)
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _get_raw_labels(self) -> np.ndarray:
        if self._raw_labels is None:
            self._raw_labels = self._load_raw_labels() if self._use_labels else None
            if self._raw_labels is None:
                self._raw_labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            assert isinstance(self._raw_labels, np.ndarray)
            assert self._raw_labels.shape[0] == self._raw_shape[0]
            assert self._raw_labels.dtype in [np.float32, np.int64]
            if self._raw_labels.dtype == np.int64:
                assert self._raw_labels.ndim == 1
                assert np.all(self._raw_labels >= 0)
        return self._raw_labels

    def close(self) -> None:  # to be overridden by subclass
        pass

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:  # to be overridden by subclass
        raise NotImplementedError

    def _load_raw_labels(self) -> Optional[np.ndarray]:  # to be overridden by subclass
        raise NotImplementedError

    def _raw_name(self, raw_idx: int) -> str:  # to be overridden by subclass
        return str(raw_idx)

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _raw_labels=None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __len__(self) -> int:
        return self._raw_idx.size

    def _get_image(self, raw_idx: int) -> np.ndarray:
        image = self._cached_images.get(raw_idx, None)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._preprocess is not None:
                image = self._preprocess(image)
            if self._cache:
                self._cached_images[raw_idx] = image
        return image

    def __getitem__(self, idx: int) -> tuple:
        # A corrupted file is skipped: the next readable item takes its place (deterministically).
        for attempt in range(len(self)):
            j = (idx + attempt) % len(self)
            raw_idx = int(self._raw_idx[j])
            if self._raw_name(raw_idx) in self.skipped:
                continue
            try:
                image = self._checked_image(raw_idx)
            except CorruptImageError as err:
                self._record_skip(raw_idx, err)
                continue
            if self._xflip[j]:
                assert image.ndim == 3  # CHW
                image = image[:, :, ::-1]
            return image.copy(), self.get_label(j)
        raise IOError(f'{self._name}: no readable image left ({len(self.skipped)} corrupted files skipped)')

    def _checked_image(self, raw_idx: int, hint: str = '') -> np.ndarray:
        """The (preprocessed) image; CorruptImageError if unreadable, ImageShapeError if its shape is not the dataset's."""
        image = self._get_image(raw_idx)
        if list(image.shape) != self._raw_shape[1:]:
            raise ImageShapeError(f'{self._raw_name(raw_idx)}: image shape {list(image.shape)} != dataset shape '
                          f'{self._raw_shape[1:]} (all images must have the same size and channels{hint})')
        return image

    def _record_skip(self, raw_idx: int, err: Exception) -> None:
        name = self._raw_name(raw_idx)
        self.skipped[name] = str(err)
        print(f'Skipping corrupted file: {name} ({err})', file=sys.stderr)

    def get_label(self, idx: int) -> np.ndarray:
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            label = onehot
        return label.copy()

    def get_details(self, idx: int) -> dict:
        return dict(raw_idx=int(self._raw_idx[idx]), xflip=(int(self._xflip[idx]) != 0),
                    raw_label=self._get_raw_labels()[self._raw_idx[idx]].copy())

    @property
    def name(self) -> str:
        return self._name

    @property
    def image_shape(self) -> list:  # [CHW]
        return list(self._raw_shape[1:])

    @property
    def num_channels(self) -> int:
        assert len(self.image_shape) == 3  # CHW
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        assert len(self.image_shape) == 3  # CHW
        assert self.image_shape[1] == self.image_shape[2]
        return self.image_shape[1]

    @property
    def label_shape(self) -> list:
        if self._label_shape is None:
            raw_labels = self._get_raw_labels()
            if raw_labels.dtype == np.int64:
                num_classes = int(np.max(raw_labels)) + 1 if raw_labels.size else 0
                self._label_shape = [max(num_classes, self._full_label_dim or 0)]
            else:
                self._label_shape = list(raw_labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self) -> int:
        assert len(self.label_shape) == 1
        return self.label_shape[0]

    @property
    def has_labels(self) -> bool:
        return any(x != 0 for x in self.label_shape)

    @property
    def has_onehot_labels(self) -> bool:
        return self._get_raw_labels().dtype == np.int64

#----------------------------------------------------------------------------


class CenterCropImagenet:
    """[FORK] `preprocess` callable: ADM centre crop of a CHW uint8 image to `size` x `size`, forced to RGB.

    Unlike the fork, an image already at the target size is still forced to 3 channels (docs/differences.md#data-5)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.shape[1:] == (self.size, self.size) and image.shape[0] == 3:
            return image
        hwc = image.transpose(1, 2, 0)
        if hwc.shape[2] == 1:
            hwc = hwc[:, :, 0]
        rgb = image_transforms.to_rgb_array(PIL.Image.fromarray(hwc))
        if rgb.shape[:2] != (self.size, self.size):
            rgb = image_transforms.center_crop_dhariwal(rgb, self.size)
        return rgb.transpose(2, 0, 1)

#----------------------------------------------------------------------------


class ImageFolderDataset(Dataset):
    """Images (PIL formats) or latents (`.npy`) in a directory tree or an uncompressed zip archive."""

    def __init__(self,
        path: str,                                  # Path to directory or zip.
        resolution: Optional[int] = None,           # Ensure specific resolution, None = anything goes.
        center_crop: bool = False,                  # [FORK] True: ADM-crop every image to `resolution` (RGB) instead of raising on a mismatch.
        force_rgb: bool = False,                    # [FORK] Convert every PIL-decoded image to RGB.
        node_cache: Union[bool, str] = False,       # Read a node-local copy of a zip archive; a str names the cache directory.
        opener: Optional[Callable] = None,          # open(path, mode) replacement for the underlying storage (benchmarks).
        **super_kwargs: Any,                        # Additional arguments for the Dataset base class.
    ):
        self._source_path = path
        self._opener = opener
        self._force_rgb = force_rgb
        self._zipfile = None
        self._zipfile_pid = None
        self._path = self._resolve_path(path, node_cache)
        self._all_fnames = self._list_files()
        PIL.Image.init()
        supported_ext = set(PIL.Image.EXTENSION) | {'.npy'}
        self._image_fnames = sorted(f for f in self._all_fnames if self._file_ext(f) in supported_ext)
        if len(self._image_fnames) == 0:
            raise IOError(f'No image files found in the specified path: {path}')
        self._image_fnames = self._select_files(self._image_fnames)
        if len(self._image_fnames) == 0:
            raise IOError(f'No image files left after filtering: {path}')

        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        self.skipped = dict()
        first_shape = self._first_image_shape()
        if resolution is not None and center_crop:
            super_kwargs['preprocess'] = CenterCropImagenet(resolution)
            first_shape = [3, resolution, resolution]
        elif resolution is not None and (first_shape[1] != resolution or first_shape[2] != resolution):
            raise IOError(f'Image files do not match the specified resolution: {path}')
        raw_shape = [len(self._image_fnames)] + list(first_shape)
        skipped = self.skipped
        super().__init__(name=name, raw_shape=raw_shape, **super_kwargs)
        self.skipped.update(skipped)

    # Storage -----------------------------------------------------------------

    def _resolve_path(self, path: str, node_cache: Union[bool, str]) -> str:
        if os.path.isdir(path):
            return path
        if self._file_ext(path) != '.zip':
            raise IOError(f'Path must point to a directory or zip: {path}')
        if not os.path.isfile(path):
            raise IOError(f'Dataset zip not found: {path}')
        if node_cache:
            cache_dir = node_cache if isinstance(node_cache, str) else None
            local = data_cache.localize(path, cache_dir=cache_dir, opener=self._opener or open)
            if local != path:
                self._opener = None  # the local copy is read directly, not through the slow-storage opener
            return local
        return path

    @property
    def _type(self) -> str:
        return 'dir' if os.path.isdir(self._path) else 'zip'

    @staticmethod
    def _file_ext(fname: str) -> str:
        return os.path.splitext(fname)[1].lower()

    def _list_files(self) -> list:
        if self._type == 'dir':
            return [os.path.relpath(os.path.join(root, fname), start=self._path).replace('\\', '/')
                    for root, _dirs, files in os.walk(self._path) for fname in files]
        try:
            return list(self._get_zipfile().namelist())
        except zipfile.BadZipFile as err:
            raise IOError(f'Not a valid zip archive: {self._source_path} ({err})') from err

    def _get_zipfile(self) -> zipfile.ZipFile:
        # One ZipFile per process: reopened after fork, never per image.
        assert self._type == 'zip'
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            fileobj = (self._opener or open)(self._path, 'rb')
            self._zipfile = zipfile.ZipFile(fileobj)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname: str):
        if self._type == 'dir':
            return (self._opener or open)(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def _has_file(self, fname: str) -> bool:
        if getattr(self, '_all_fnames_set', None) is None:
            self._all_fnames_set = set(self._all_fnames)
        return fname in self._all_fnames_set

    def close(self) -> None:
        try:
            if self._zipfile is not None and self._zipfile_pid == os.getpid():
                self._zipfile.close()
        finally:
            self._zipfile = None

    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), _zipfile=None, _zipfile_pid=None)

    # Hooks for subclasses ----------------------------------------------------

    def _select_files(self, fnames: list) -> list:
        return fnames

    def _raw_name(self, raw_idx: int) -> str:
        return self._image_fnames[raw_idx]

    # Decoding ----------------------------------------------------------------

    def _first_image_shape(self) -> list:
        """Shape of the first readable image; unreadable ones before it are recorded as skipped.
        Its raw shape and dtype are kept (`_first_raw_shape`, `_first_raw_dtype`) for format checks."""
        for raw_idx, fname in enumerate(self._image_fnames):
            try:
                image = self._load_raw_image(raw_idx)
                self._first_raw_shape, self._first_raw_dtype = list(image.shape), image.dtype
                return list(image.shape)
            except CorruptImageError as err:
                self.skipped[fname] = str(err)
                print(f'Skipping corrupted file: {fname} ({err})', file=sys.stderr)
        raise IOError(f'No readable image files in the specified path: {self._source_path}')

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        fname = self._image_fnames[raw_idx]
        ext = self._file_ext(fname)
        try:
            with self._open_file(fname) as f:
                if ext == '.npy':
                    image = np.load(f)
                    return image.reshape(-1, *image.shape[-2:])
                if ext == '.png' and pyspng is not None and not self._force_rgb:
                    image = pyspng.load(f.read())
                else:
                    image = self._decode_pil(f)
        except (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile) as err:
            raise CorruptImageError(str(err)) from err
        image = image.reshape(*image.shape[:2], -1)  # HW => HWC
        return image.transpose(2, 0, 1)  # HWC => CHW

    def _decode_pil(self, f) -> np.ndarray:
        image = PIL.Image.open(f)
        image.load()
        mode = 'RGB' if self._force_rgb and image.mode != 'RGB' else _pil_mode_for_array(image)
        if mode is not None:
            image = image.convert(mode)
        return np.array(image)

    # Labels ------------------------------------------------------------------

    def _read_json(self, fname: str) -> Optional[dict]:
        if not self._has_file(fname):
            return None
        try:
            with self._open_file(fname) as f:
                return json.load(f)
        except (OSError, ValueError) as err:
            raise IOError(f'{os.path.join(self._source_path, fname)}: cannot read JSON ({err})') from err

    def _dataset_json_labels(self) -> Optional[dict]:
        """{relative path: label} from dataset.json, or None when absent or null."""
        data = self._read_json('dataset.json')
        labels = data.get('labels') if isinstance(data, dict) else data
        if labels is None:
            return None
        if not isinstance(labels, list) or not all(isinstance(e, list) and len(e) == 2 for e in labels):
            raise IOError(f'{os.path.join(self._source_path, "dataset.json")}: malformed; expected '
                          f'{{"labels": [["<file>", <label>], ...]}} or {{"labels": null}}')
        return {str(name): label for name, label in labels}

    def _load_raw_labels(self) -> Optional[np.ndarray]:
        labels = self._dataset_json_labels()
        if labels is None:
            return None
        missing = [fname for fname in self._image_fnames if fname not in labels]
        if missing:
            raise KeyError(f'dataset.json of {self._source_path} has no label for {missing[0]}'
                           f' ({len(missing)} images unlabeled)')
        absent = [name for name in labels if not self._has_file(name)]
        if absent:
            print(f'Warning: dataset.json of {self._source_path} labels {len(absent)} files that do not exist '
                  f'(e.g. {absent[0]}); ignored', file=sys.stderr)
        return _label_array([labels[fname] for fname in self._image_fnames], self._source_path)

#----------------------------------------------------------------------------


class CategoriesError(ValueError):
    """A category list that does not parse, or names a category the dataset does not have."""


def parse_categories(spec: Union[None, str, Sequence[int]], num_categories: int, source: str = '') -> Optional[list]:
    """The one check of a category list: '0,1,12-14' (or a list of ints) -> [0, 1, 12, 13, 14], each index
    in range(num_categories); None stays None. Raises CategoriesError."""
    if spec is None:
        return None
    try:
        values = parse_int_list(spec)
    except ValueError as err:
        raise CategoriesError(str(err)) from None
    bad = [c for c in values if not 0 <= c < num_categories]
    if bad:
        owner = source or 'the dataset'
        raise CategoriesError(f'category {bad[0]} is out of range: {owner} has '
                              f'{count_of(num_categories, "category", "categories")} '
                              '(its dataset.json class labels, else its top-level folders)')
    return values


def select_filtered(
    scores: Sequence[Optional[float]],              # Per-image score (NIMA), in file order; None = no metadata entry.
    categories_of: Sequence[Optional[int]],         # Per-image category index (None = no category).
    nima_threshold: Optional[float] = None,         # Drop images scoring below this.
    categories: Optional[Sequence[int]] = None,     # Keep only these category indices (checked by parse_categories).
    top_percent: Optional[float] = None,            # Keep the best X % of the remaining images, by their own score.
    top_per_category: Optional[float] = None,       # Keep the best X % of each category (at least one image).
    combine: str = 'intersection',                  # Both top filters must hold; 'union': either (the fork's code).
    dropped: Optional[dict] = None,                 # Filled with the counts dropped for lacking a score/category.
) -> list:
    """Indices of the kept images in ascending order (the fork's selection, deterministic).

    `nima_threshold` and `categories` apply first; `top_percent` and `top_per_category` rank what remains,
    and an image must pass both of them ('intersection', what a curated subset means; the fork's code
    keeps the union, its comment says intersection). Images without a category (None) are dropped only
    when `categories` or `top_per_category` needs one; images without a score (None: no metadata entry)
    are dropped by every score filter, never ranked as if they scored 0. `dropped` receives `unscored`
    (images without a score, when a score filter is on) and `uncategorized` (scored images without a
    category, when a category is needed). Every ranking sorts by (score descending, file index
    ascending), so all processes see the same selection in the same order."""
    if combine not in ('union', 'intersection'):
        raise ValueError(f"combine must be 'union' or 'intersection', not {combine!r}")
    categories = None if categories is None else set(categories)
    need_category = categories is not None or top_per_category is not None
    need_score = nima_threshold is not None or top_percent is not None or top_per_category is not None
    if dropped is not None:
        dropped['unscored'] = sum(score is None for score in scores) if need_score else 0
        dropped['uncategorized'] = sum(cat is None for cat, score in zip(categories_of, scores)
                                       if score is not None or not need_score) if need_category else 0
    kept = [i for i, (score, cat) in enumerate(zip(scores, categories_of))
            if (cat is not None or not need_category) and (score is not None or not need_score)
            and (nima_threshold is None or score >= nima_threshold)
            and (categories is None or cat in categories)]
    by_rank = lambda indices: sorted(indices, key=lambda i: (-scores[i], i))
    selections = []
    if top_per_category is not None:
        per_category = dict()
        for i in kept:
            per_category.setdefault(categories_of[i], []).append(i)
        selections.append({i for members in per_category.values()
                           for i in by_rank(members)[:max(1, int(len(members) * top_per_category / 100))]})
    if top_percent is not None:
        selections.append(set(by_rank(kept)[:int(len(kept) * top_percent / 100)]))
    if not selections:
        return kept
    chosen = set.union(*selections) if combine == 'union' else set.intersection(*selections)
    return sorted(chosen)

#----------------------------------------------------------------------------


class FilteredImageDataset(ImageFolderDataset):
    """[FORK] `ImageFolderDataset` restricted by per-image scores (`metadata.json`) and categories.

    Class labels come from `dataset.json` only, exactly as for `ImageFolderDataset`: filtering never
    changes them. Categories (what `categories` and `top_per_category` select by) are those class labels;
    a dataset without `dataset.json` uses the fork's categories instead: an image's metadata "labels"
    (a top-level folder name or a category index), else its top-level folder, indexed in the sorted list
    of top-level folders. One-hot labels keep the length of the full dataset whatever is filtered out.
    Metadata keys are "<relative path>" with or without the file extension; the file holds
    {"metadata": {key: {"nima": <score>, ...}}} or the bare {key: {...}} mapping (docs/user-files.md).
    Works on zip archives; `max_size` always applies. `summary()` says what the filters kept.
    """

    def __init__(self,
        path: str,                                  # Path to directory or zip.
        resolution: Optional[int] = None,           # Resolution; mismatching images are ADM-cropped (fork).
        nima_threshold: Optional[float] = None,     # Minimum NIMA score.
        categories: Union[None, str, Sequence[int]] = None,  # Category indices to keep, e.g. '0,1,12-14'.
        top_percent: Optional[float] = None,        # Keep the top X % by NIMA.
        top_per_category: Optional[float] = None,   # Keep the top X % by NIMA in each category.
        max_size: Optional[float] = None,           # Cap on the dataset size (seeded random subset).
        combine: str = 'intersection',              # How top_percent and top_per_category combine (or 'union').
        center_crop: bool = True,                   # Fork behaviour of `resolution`.
        force_rgb: bool = True,                     # Fork behaviour of PIL decoding.
        **super_kwargs: Any,                        # Additional arguments for ImageFolderDataset / Dataset.
    ):
        self._filter_kwargs = dict(nima_threshold=nima_threshold, categories=categories, top_percent=top_percent,
                                   top_per_category=top_per_category, combine=combine)
        self._num_uncategorized = 0
        self._num_unscored = 0                      # Images without a metadata.json entry dropped by a score filter.
        self._num_listed = 0                        # Image files before filtering.
        super().__init__(path, resolution=resolution, center_crop=center_crop, force_rgb=force_rgb,
                         max_size=max_size, **super_kwargs)
        self._full_label_dim = self._num_categories

    @property
    def _filtering_active(self) -> bool:
        return any(self._filter_kwargs[k] is not None
                   for k in ('nima_threshold', 'categories', 'top_percent', 'top_per_category'))

    def _top_level_dirs(self) -> list:
        if self._type == 'dir':
            return sorted(d for d in os.listdir(self._path) if os.path.isdir(os.path.join(self._path, d)))
        return sorted({name.split('/')[0] for name in self._all_fnames if '/' in name})

    def _load_metadata(self) -> dict:
        """{key: entry} of metadata.json, with or without its {"metadata": ...} wrapper; {} when absent."""
        data = self._read_json('metadata.json')
        metadata = data.get('metadata', data) if isinstance(data, dict) else data
        if metadata is None:
            return {}
        where = os.path.join(self._source_path, 'metadata.json')
        if not isinstance(metadata, dict) or not all(isinstance(v, dict) for v in metadata.values()):
            raise IOError(f'{where}: malformed; expected '
                          f'{{"metadata": {{"<category>/<file stem>": {{"nima": <float>, "labels": "<category>"}}}}}}')
        bad = [k for k, v in metadata.items() if not isinstance(v.get('nima', 0), (int, float, type(None)))]
        if bad:
            raise IOError(f'{where}: "nima" of {bad[0]} is not a number')
        bad = [k for k, v in metadata.items() if not isinstance(v.get('labels', ''), (str, int, type(None)))]
        if bad:
            raise IOError(f'{where}: "labels" of {bad[0]} is neither a folder name nor a category index')
        return metadata

    def _select_files(self, fnames: list) -> list:
        self._metadata = self._load_metadata()
        self._num_listed = len(fnames)
        self._num_categories, cats = self._categories(fnames)
        categories = parse_categories(self._filter_kwargs['categories'], self._num_categories, self._source_path)
        if not self._filtering_active:
            return fnames
        # No entry = no score (None), dropped by score filters; an entry without "nima" scores 0 (the fork).
        scores = [self._score_of(f) for f in fnames]
        dropped = dict()
        kept = select_filtered(scores, cats, **dict(self._filter_kwargs, categories=categories), dropped=dropped)
        self._num_unscored, self._num_uncategorized = dropped['unscored'], dropped['uncategorized']
        if self._num_unscored == len(fnames):  # a score filter is on, and no image has a score
            self._check_metadata_matches(fnames)
        if not kept:
            raise IOError(f'No image files left after filtering: {self._source_path}{self._dropped_note()}')
        return [fnames[i] for i in kept]

    def _categories(self, fnames: list) -> tuple:
        """(number of categories, category index or None per file): the dataset.json class labels; without
        dataset.json, the fork's categories (metadata "labels": folder name or index; else the top-level folder)."""
        if self._has_file('dataset.json'):
            labels = self._dataset_json_labels() or {}
            classes = [v for v in labels.values() if _is_class_index(v)]
            return (max(classes) + 1 if classes else 0), [labels.get(f) if _is_class_index(labels.get(f)) else None
                                                          for f in fnames]
        folder_index = {name: i for i, name in enumerate(self._top_level_dirs())}
        cats = [self._fork_category(f, folder_index) for f in fnames]
        return max([len(folder_index)] + [c + 1 for c in cats if c is not None]), cats

    def _fork_category(self, fname: str, folder_index: dict) -> Optional[int]:
        label = self.metadata_of(fname).get('labels')
        if _is_class_index(label):
            return label
        if isinstance(label, str) and label:
            return folder_index.get(label)
        return folder_index.get(fname.split('/')[0]) if '/' in fname else None

    def _entry_of(self, fname: str) -> Optional[dict]:
        entry = self._metadata.get(os.path.splitext(fname)[0], None)
        return self._metadata.get(fname, None) if entry is None else entry

    def _score_of(self, fname: str) -> Optional[float]:
        entry = self._entry_of(fname)
        return None if entry is None else float(entry.get('nima', 0) or 0)

    def _check_metadata_matches(self, fnames: list) -> None:
        """No image has a score: metadata.json is missing or empty, or was written for another layout (e.g. of
        a decoded copy) and matches no file; say which."""
        if not self._has_file('metadata.json'):
            raise IOError(f'{self._source_path}: nima_threshold/top_percent/top_per_category need metadata.json'
                          ' with per-image scores at the dataset root')
        if not self._metadata:
            raise IOError(f'{os.path.join(self._source_path, "metadata.json")}: no entries; score the dataset with '
                          'score_dataset.py (docs/user-files.md)')
        raise IOError(f'{self._source_path}: no metadata.json key matches an image file (e.g. key '
                      f'"{next(iter(self._metadata))}", file "{fnames[0]}"); keys are "<folder>/<file stem>" of '
                      'this dataset, so score a folder with the same layout (e.g. the source of process-and-encode)')

    def summary(self) -> str:
        """One line: how many images the filters kept, by which rules, and why others were dropped."""
        kwargs = self._filter_kwargs
        rules = []
        if kwargs['nima_threshold'] is not None:
            rules.append(f'NIMA >= {kwargs["nima_threshold"]:g}')
        if kwargs['categories'] is not None:
            rules.append(f'categories {kwargs["categories"]}')
        if kwargs['top_percent'] is not None:
            rules.append(f'top {kwargs["top_percent"]:g}% by NIMA')
        if kwargs['top_per_category'] is not None:
            rules.append(f'top {kwargs["top_per_category"]:g}% of each category by NIMA')
        both_tops = kwargs['top_percent'] is not None and kwargs['top_per_category'] is not None
        if both_tops and kwargs['combine'] == 'union':
            rules[-2:] = [f'({rules[-2]} or {rules[-1]})']
        rule = ' and '.join(rules) or 'all'
        kept = int(np.unique(self._raw_idx).size)
        if kept < len(self._image_fnames):
            rule += f', then a random {kept} of them (max_size)'
        verb = 'is' if kept == 1 else 'are'
        return (f'After filtration there {verb} {count_of(kept, "image")} in the dataset (of {self._num_listed};'
                f' kept: {rule}){self._dropped_note()}')

    def _dropped_note(self) -> str:
        """Why images were dropped besides the filters themselves ('' when none were)."""
        note = self._uncategorized_note()
        if self._num_unscored:
            note += (f' ({self._num_unscored} of {self._num_listed} images have no metadata.json entry'
                     ' and were dropped by the score filter)')
        return note

    def _uncategorized_note(self) -> str:
        """Why images were dropped for lacking a category ('' when none were)."""
        if self._num_uncategorized == 0:
            return ''
        kwargs = self._filter_kwargs
        reasons = [name for name, on in (('--categories', kwargs['categories'] is not None),
                   ('--top-per-category', kwargs['top_per_category'] is not None)) if on]
        return (f' ({count_of(self._num_uncategorized, "image")} without a category (dataset.json class label, else'
                f' metadata "labels" / top-level folder) dropped because {" and ".join(reasons)} needs one)')

    def metadata_of(self, fname: str) -> dict:
        """Metadata entry of a file (key: relative path without extension, or with it), {} if none."""
        return self._entry_of(fname) or {}

    def get_metadata(self, idx: int) -> dict:
        return self.metadata_of(self._image_fnames[self._raw_idx[idx]])


def _is_class_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0

#----------------------------------------------------------------------------
