"""Evaluation metrics: feature statistics, Fréchet distances, scorer histograms.

* `calculate_stats_for_iterable()` -- accumulate per-metric feature sums in float64 over any
  iterable of image batches, reduce across ranks; yields one progress record per batch, the last
  one carrying mean/covariance (and histograms), as the official API.
* `calculate_stats_for_files()` / `calculate_stats_for_network()` -- the dataset and
  generate-on-the-fly sources used by `calculate_metrics.py calc`/`ref` and `gen`; they return the
  progress records too. `run_with_progress()` drains records into the statistics dict.
* `load_stats()` / `save_stats()` -- EDM2 `.pkl` and EDM v1 `.npz` reference statistics. A `.pkl`
  may also hold per-image features, `{metric: {'mu', 'sigma', 'features': float32 [N, D]}}` (written by
  `ref --features`, read by precision/recall in `precision_recall.py`); tools that read only `mu` and
  `sigma`, the official ones included, are not affected.
* `frechet_distance()` -- FD in float64 with a stable fallback for singular/complex cases.
* `calculate_metrics_from_stats()` (official, one reference) and `calculate_results()` (fork:
  several named references, scorer summaries), `save_results()` (JSON/PKL/histogram PNGs).

Fixes over the originals: scorer `sigma` is the standard deviation (docs/differences.md#metrics-1; the variance is
stored as `variance`), one histogram figure per metric (docs/differences.md#metrics-2), images keep their own resolution
unless `resolution` is given (docs/differences.md#metrics-3), result files are written atomically, checked before the
(long) computation starts, never overwritten, and carry the provenance of their run; statistics
carry a marker of the detector weights that made them (`detectors.detector_marker`).
"""

import datetime
import json
import os
import pickle
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import scipy.linalg
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from training import dataset
from training.evaluation import detectors

HIST_BINS_PER_UNIT = 10  # Histogram: 10 bins per score unit, bin k covers scores rounding to (k+1)/10.


class MetricsError(ValueError):
    """Bad input to a metrics computation; the message is one line naming the file/option at fault."""

#----------------------------------------------------------------------------
# Metric names.


def parse_metric_list(metrics: Union[str, Sequence[str]]) -> list:
    """'fid,fd_dinov2' -> ['fid', 'fd_dinov2']; unknown names raise MetricsError."""
    names = [m.strip() for m in metrics.split(',')] if isinstance(metrics, str) else list(metrics)
    names = [m for m in names if m]
    if not names:
        raise MetricsError('--metrics: no metric given')
    for name in names:
        if name not in detectors.detector_classes:
            raise MetricsError(f'Invalid metric "{name}" (choose from {", ".join(detectors.detector_classes)})')
    return list(dict.fromkeys(names))

#----------------------------------------------------------------------------
# Accumulation.


def _images_of(batch: Any) -> Optional[torch.Tensor]:
    """The uint8 NCHW images of a batch: dict with 'images', (images, labels) pair, tensor or array."""
    if isinstance(batch, dict):
        batch = batch.get('images', None)
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    if batch is None:
        return None
    return torch.as_tensor(batch)


def _detector_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """3-channel uint8 images on `device`: grayscale repeated, alpha dropped."""
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise MetricsError(f'detectors need NCHW images with 1, 3 or 4 channels, got shape {list(images.shape)}'
                           ' (latent datasets must be decoded first)')
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images[:, :3].to(device)


def check_device(device: Union[str, torch.device]) -> torch.device:
    """The compute device; a device this machine lacks (e.g. the default cuda on a CPU-only
    machine) is one clear MetricsError instead of a failure deep inside torch."""
    try:
        return misc.check_device(str(device))
    except ValueError as err:
        raise MetricsError(f'device: {err}') from None


class StatsAccumulator:
    """Float64 running sums per metric: S1 = sum f, S2 = sum f f^T, count; scorer histograms; and, for
    the metrics in `keep_features`, the per-image features themselves (float32, for precision/recall)."""

    def __init__(self, metrics: Sequence[str], device: torch.device, verbose: bool = True,
                 keep_features: Sequence[str] = ()):
        self.metrics = list(metrics)
        self.device = device  # checked by the caller (check_device)
        self.detectors = {m: detectors.get_detector(m, verbose=verbose) for m in self.metrics}
        self.num_images = torch.zeros([], dtype=torch.int64, device=self.device)
        self.sums = dict()
        self.features = {m: [] for m in keep_features if m in self.detectors}

    def _init_sums(self, metric: str, dim: int) -> None:
        sums = dict(s1=torch.zeros([dim], dtype=torch.float64, device=self.device),
                    s2=torch.zeros([dim, dim], dtype=torch.float64, device=self.device))
        max_score = self.detectors[metric].max_score
        if max_score is not None:
            sums['hist'] = torch.zeros([HIST_BINS_PER_UNIT * max_score], dtype=torch.float64, device=self.device)
        self.sums[metric] = sums

    def add(self, images: torch.Tensor) -> None:
        images = _detector_input(images, self.device)
        for metric, detector in self.detectors.items():
            features = detector(images).to(torch.float64).reshape(images.shape[0], -1)
            if metric not in self.sums:
                self._init_sums(metric, features.shape[1])
            sums = self.sums[metric]
            sums['s1'] += features.sum(dim=0)
            sums['s2'] += features.T @ features
            if metric in self.features:
                self.features[metric].append(features.to(torch.float32).cpu())
            if 'hist' in sums:
                # Bin index clamp(round(10 * score), 1, 10 * max_score) - 1.
                bins = (features[:, 0] * HIST_BINS_PER_UNIT).round().clamp(1, sums['hist'].numel()).to(torch.int64) - 1
                sums['hist'] += torch.bincount(bins, minlength=sums['hist'].numel()).to(torch.float64)
        self.num_images += images.shape[0]

    def total_images(self) -> int:
        """Collective: the number of images added so far on all ranks."""
        return int(_all_reduce(self.num_images.clone()).item())

    def finish(self, n: int) -> dict:
        """Collective: reduce across ranks, return {'num_images', metric: {'mu', 'sigma'[, 'histogram']}};
        `n` is `total_images()`."""
        for metric, detector in self.detectors.items():
            if metric not in self.sums:  # this rank saw no image; the others define the shapes
                self._init_sums(metric, int(detector.feature_dim))
        if n < 2:
            raise MetricsError(f'Found {n} images, but need at least 2 to compute statistics')
        stats = dict(num_images=n)
        for metric in self.metrics:  # same order on every rank (collectives)
            sums = self.sums[metric]
            s1, s2 = _all_reduce(sums['s1'].clone()), _all_reduce(sums['s2'].clone())
            mu = s1 / n
            sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)  # unbiased covariance
            stats[metric] = dict(mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(),
                                 detector=detectors.detector_marker(self.detectors[metric], self.device))
            if 'hist' in sums:
                stats[metric]['histogram'] = _all_reduce(sums['hist'].clone()).cpu().numpy()
            if metric in self.features:
                stats[metric]['features'] = self._gathered_features(metric, mu.shape[0])
        return stats

    def _gathered_features(self, metric: str, dim: int) -> np.ndarray:
        """Collective: this metric's features of all ranks, [n, D] float32, rank by rank."""
        kept = self.features[metric]
        mine = torch.cat(kept).numpy() if kept else np.zeros([0, dim], np.float32)
        if dist.get_world_size() == 1:
            return mine
        parts = [None] * dist.get_world_size()
        torch.distributed.all_gather_object(parts, mine)
        return np.concatenate(parts)


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


class ProgressRecords:
    """One-shot iterator over progress records; `len()` is the number of batches when known
    (as the official iterable, so `tqdm(records)` shows a total)."""

    def __init__(self, records: Iterator[dnnlib.EasyDict], num_batches: Optional[int]):
        self._records = records
        self.num_batches = num_batches

    def __iter__(self) -> 'ProgressRecords':
        return self

    def __next__(self) -> dnnlib.EasyDict:
        return next(self._records)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError('the number of batches is not known')
        return self.num_batches


def calculate_stats_for_iterable(
    image_iter: Iterable,                   # Batches: dicts with 'images', (images, labels) pairs, or tensors.
    metrics: Sequence[str] = ('fid', 'fd_dinov2'),
    verbose: bool = True,
    dest_path: Optional[str] = None,        # Rank 0 saves the statistics here.
    device: Union[str, torch.device] = 'cuda',
    num_batches: Optional[int] = None,      # For progress records; default len(image_iter) when defined.
    keep_features: Sequence[str] = (),      # Also return these metrics' per-image features (stats[m]['features']).
) -> ProgressRecords:
    """Iterator of progress records {stats, images, batch_idx, num_batches, num_images}, one per batch
    (as in the official API). `stats` is None except in the record of the last batch, which carries the
    reduced statistics on every rank, so `r.stats` of the final record (batch_idx == num_batches - 1)
    is the result; `run_with_progress()` drains the records into that dict. `num_images` is the
    running total over all ranks (all-reduced at every batch, so every rank must yield the same
    number of batches, as `generate_images` and `calculate_stats_for_files` do). An empty iterable
    counts as one batch without images (then too few images: MetricsError). The device and the
    detectors are checked and set up before this returns, so missing weights fail before any work."""
    acc = StatsAccumulator(parse_metric_list(metrics), check_device(device), verbose=verbose, keep_features=keep_features)
    if num_batches is None:
        num_batches = len(image_iter) if hasattr(image_iter, '__len__') else None
    return ProgressRecords(_accumulate(acc, image_iter, dest_path, num_batches), num_batches)


_END = object()  # end-of-iteration marker for the one-batch look-ahead


def _accumulate(acc: StatsAccumulator, image_iter: Iterable, dest_path: Optional[str],
                num_batches: Optional[int]) -> Iterator[dnnlib.EasyDict]:
    batches = iter(image_iter)
    batch, batch_idx = next(batches, _END), 0
    while True:
        images = None if batch is _END else _images_of(batch)
        if images is not None and images.shape[0] > 0:  # empty generation chunks carry no images (docs/differences.md#metrics-8)
            acc.add(images)
        r = dnnlib.EasyDict(stats=None, images=images, batch_idx=batch_idx, num_batches=num_batches,
                            num_images=acc.total_images())
        # Look one batch ahead: the record of the last batch carries the statistics, whatever len() said.
        following = _END if batch is _END else next(batches, _END)
        if following is _END:
            r.num_batches = batch_idx + 1
            r.stats = acc.finish(r.num_images)
            if dest_path is not None and dist.get_rank() == 0:
                save_stats(r.stats, dest_path)
            yield r
            return
        yield r
        batch, batch_idx = following, batch_idx + 1


def run_with_progress(records: Iterable[dnnlib.EasyDict], total: Optional[int] = None, verbose: bool = True) -> dict:
    """Drain progress records (calculate_stats_for_*) with a progress bar on rank 0; return the stats
    of the last record. `total` defaults to len(records) when known."""
    import tqdm
    if total is None:
        total = getattr(records, 'num_batches', None)
    stats = None
    bar = tqdm.tqdm(total=total, unit='batch', disable=(not verbose or dist.get_rank() != 0))
    with bar:
        for r in records:
            bar.update(1)
            if r.stats is not None:
                stats = r.stats
                bar.close()  # what the source prints after its last record comes below the bar
    if stats is None:
        raise MetricsError('the progress records ended without statistics')
    return stats

#----------------------------------------------------------------------------
# Image sources.


def open_image_dataset(image_path: str, num_images: Optional[int] = None, seed: int = 0,
                       resolution: Optional[int] = None, **filter_kwargs: Any) -> torch.utils.data.Dataset:
    """ImageFolderDataset (or FilteredImageDataset when a filter is set) over all or `num_images` images.

    `num_images` larger than the dataset is an error (official); `resolution` ADM-crops every image."""
    filters = {k: v for k, v in filter_kwargs.items() if v is not None}
    try:
        if filters:
            ds = dataset.FilteredImageDataset(image_path, max_size=num_images, random_seed=seed,
                                              resolution=resolution, **filters)
            dist.print0(ds.summary())
        else:
            ds = dataset.ImageFolderDataset(image_path, max_size=num_images, random_seed=seed,
                                            resolution=resolution, center_crop=(resolution is not None))
    except (IOError, KeyError, ValueError) as err:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        text = text.strip('\'"')  # KeyError quotes its message
        # Most dataset messages already name the path; do not print it twice.
        named = text.startswith(image_path) or text.endswith(image_path)
        raise MetricsError(text if named else f'{image_path}: {text}') from err
    if num_images is not None and len(ds) < num_images:
        raise MetricsError(f'{image_path}: Found {len(ds)} images, but expected at least {num_images}'
                           ' (--num all uses every image)')
    if len(ds) < 2:
        raise MetricsError(f'{image_path}: Found {len(ds)} images, but need at least 2 to compute statistics')
    return ds


class ReadableImages(torch.utils.data.Dataset):
    """Items (CHW uint8 image or None, file name, error or None) of an image dataset, for statistics.

    An unreadable file gives image None, so that `collate_readable` leaves it out: replacing it by
    another image (as the training dataset does) would count that image twice and skew the statistics.
    A shape mismatch travels as a message, so that it reaches the main process as one clear line
    even from a loader worker."""

    def __init__(self, ds: torch.utils.data.Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: int) -> tuple:
        raw_idx = int(self.ds._raw_idx[idx])
        name = self.ds._raw_name(raw_idx)
        try:
            return self.ds._checked_image(raw_idx, hint='; see --resolution'), name, None
        except dataset.CorruptImageError:
            return None, name, None
        except dataset.ImageShapeError as err:
            return None, name, str(err)


def collate_readable(items: list) -> dict:
    """Batch of `ReadableImages` items: {'images': NCHW uint8 or None, 'skipped': names, 'errors': messages}."""
    images = [image for image, _, _ in items if image is not None]
    return dict(images=torch.from_numpy(np.stack(images)) if images else None,
                skipped=[name for image, name, error in items if image is None and error is None],
                errors=[error for _, _, error in items if error is not None])


def _drop_unreadable(loader: Iterable, skipped: list) -> Iterator[dict]:
    """Pass the batches on; collect the names of unreadable files in `skipped`, raise on a shape error."""
    for batch in loader:
        if batch['errors']:
            raise MetricsError(batch['errors'][0])
        skipped.extend(batch['skipped'])
        yield batch


def report_skipped(skipped: list, max_names: int = 5) -> int:
    """Collective: print one line on rank 0 with the number of files left out on all ranks."""
    names = list(skipped)
    if dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        torch.distributed.all_gather_object(parts, names)
        names = sorted(name for part in parts for name in part)
    if names:
        shown = ', '.join(names[:max_names]) + (', ...' if len(names) > max_names else '')
        dist.print0(f'Skipped {len(names)} unreadable file{"s" if len(names) > 1 else ""} '
                    f'(left out of the statistics): {shown}')
    return len(names)


def rank_batches(num_items: int, max_batch_size: int) -> list:
    """This rank's index chunks, split like image generation (`split_seeds` of training/sampling/generate_images.py). Empty chunks
    (fewer items than ranks) are kept: every rank needs the same number of batches, because the
    image count is all-reduced at every batch."""
    from training.sampling.generate_images import split_seeds
    return [chunk.tolist() for chunk in split_seeds(num_items, max_batch_size, dist.get_rank(), dist.get_world_size())]


def make_loader(ds: torch.utils.data.Dataset, max_batch_size: int, num_workers: int,
                prefetch_factor: int = 2) -> torch.utils.data.DataLoader:
    """This rank's batches of `ReadableImages(ds)` (see `collate_readable`)."""
    return torch.utils.data.DataLoader(ReadableImages(ds), batch_sampler=rank_batches(len(ds), max_batch_size),
                                       collate_fn=collate_readable, num_workers=num_workers,
                                       prefetch_factor=(prefetch_factor if num_workers > 0 else None),
                                       multiprocessing_context=('spawn' if num_workers > 0 else None))


def calculate_stats_for_files(
    image_path: str,                        # Directory or zip of images.
    num_images: Optional[int] = None,       # None = all images; else a seeded random subset (error if fewer).
    seed: int = 0,                          # Subset seed.
    max_batch_size: int = 64,
    num_workers: int = 2,
    prefetch_factor: int = 2,
    resolution: Optional[int] = None,       # None = images as stored; int = ADM centre crop (fork: 512).
    verbose: bool = True,
    filter_kwargs: Optional[dict] = None,   # [FORK] nima_threshold / top_percent / top_per_category.
    **stats_kwargs: Any,                    # metrics, dest_path, device.
) -> ProgressRecords:
    """Progress records (see `calculate_stats_for_iterable`) for a folder/zip of images; the dataset
    is opened (rank 0 first) before this returns. `run_with_progress()` turns them into the stats.
    Unreadable files are left out and listed once the last record has been consumed."""
    if dist.get_rank() != 0:
        dist.barrier()
    try:
        if verbose:
            dist.print0(f'Loading images from {image_path} ...')
        ds = open_image_dataset(image_path, num_images, seed, resolution, **(filter_kwargs or {}))
    finally:
        if dist.get_rank() == 0:
            dist.barrier()
    loader = make_loader(ds, max_batch_size, num_workers, prefetch_factor)
    if verbose:
        dist.print0(f'Calculating statistics for {len(ds)} images...')
    skipped = []
    records = calculate_stats_for_iterable(_drop_unreadable(loader, skipped), verbose=verbose,
                                           num_batches=len(loader), **stats_kwargs)
    return ProgressRecords(_report_skipped_after(records, skipped), records.num_batches)


def _report_skipped_after(records: Iterator[dnnlib.EasyDict], skipped: list) -> Iterator[dnnlib.EasyDict]:
    """Pass the records on; list the unreadable files after the last one (below a progress bar)."""
    try:
        yield from records
    except MetricsError as err:
        if not skipped:
            raise
        raise MetricsError(f'{err} ({len(skipped)} unreadable files left out, e.g. {skipped[0]})') from err
    report_skipped(skipped)


def calculate_stats_for_network(
    net: Any,                               # Path, URL or module.
    seeds: Sequence[int],
    gnet: Any = None,
    max_batch_size: int = 32,
    out_images: Optional[str] = None,       # Save the generated PNGs here (flat).
    verbose: bool = True,
    metrics: Sequence[str] = ('fid', 'fd_dinov2'),
    device: Union[str, torch.device] = 'cuda',
    dest_path: Optional[str] = None,
    keep_features: Sequence[str] = (),      # Also return these metrics' per-image features.
    **sampler_kwargs: Any,                  # solver, num_steps, discretization, guidance, ... (and encoder= for a network given as a module)
) -> ProgressRecords:
    """Progress records (see `calculate_stats_for_iterable`) for images generated on the fly by
    `training.sampling.generate_images.generate_images`; the networks are loaded before this returns."""
    from training.sampling.generate_images import generate_images
    if len(seeds) < 2:
        raise MetricsError(f'--num: need at least 2 images to compute statistics, got {len(seeds)}')
    if out_images is not None:  # generate_images leaves this check to its callers, which name the option
        _check_path(out_images, '--out-images', is_dir=True)
    metrics = parse_metric_list(metrics)
    device = check_device(device)
    try:
        image_iter = generate_images(net, gnet=gnet, seeds=seeds, max_batch_size=max_batch_size, outdir=out_images,
                                     verbose=verbose, device=device, **sampler_kwargs)
    except MetricsError:
        raise
    except ValueError as err:  # bad network pickles, mismatched guide, bad --class: one line
        raise MetricsError(dnnlib.util.first_line(err)) from err
    return calculate_stats_for_iterable(image_iter, metrics=metrics, verbose=verbose, dest_path=dest_path,
                                        device=device, keep_features=keep_features)

#----------------------------------------------------------------------------
# Statistics files (docs/formats.md#reference-statistics).


def _check_stats(stats: Any, path: str) -> dict:
    if not isinstance(stats, dict):
        raise MetricsError(f'{path}: not a feature statistics file (a {type(stats).__name__}, expected a dict)')
    for metric, entry in list(stats.items()):
        if metric in ('num_images', 'provenance'):
            continue
        if isinstance(entry, dict) and 'mu' not in entry and 'mean' in entry:  # an --out features file of the fork
            entry = stats[metric] = dict(entry, mu=entry['mean'])
        mu = entry.get('mu', None) if isinstance(entry, dict) else None
        sigma = entry.get('sigma', None) if isinstance(entry, dict) else None
        if not isinstance(mu, np.ndarray) or not isinstance(sigma, np.ndarray) \
                or mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise MetricsError(f'{path}: entry "{metric}" is not a pair of mu [D] / sigma [D, D] arrays')
        features = entry.get('features', None)
        if features is not None and (not isinstance(features, np.ndarray) or features.ndim != 2
                                     or features.shape[1] != mu.shape[0]):
            raise MetricsError(f'{path}: entry "{metric}" has features that are not an [N, {mu.shape[0]}] array')
    return stats


def load_stats(path: str, verbose: bool = True) -> dict:
    """Reference statistics from a `.pkl` (EDM2) or `.npz` (EDM v1, read as 'fid'), path or URL."""
    if verbose:
        dist.print0(f'Loading feature statistics from {path} ...')
    try:
        with dnnlib.util.open_url(path, verbose=verbose) as f:
            if path.lower().endswith('.npz'):
                with np.load(f) as data:
                    return _check_stats({'fid': dict(mu=data['mu'], sigma=data['sigma'])}, path)
            return _check_stats(persistence.load_pickle(f, name=path), path)
    except MetricsError:
        raise
    except persistence.PickleLoadError as err:
        raise MetricsError(str(err)) from err
    except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as err:
        reason = dnnlib.util.first_line(err, with_type=True)
        raise MetricsError(f'{path}: cannot read reference statistics ({reason})') from err


def save_stats(stats: dict, path: str) -> None:
    """Write statistics atomically: `.npz` = EDM v1 format (fid mu/sigma only), else an EDM2 pickle
    (with the optional per-image `features` of each metric, see `with_features`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith('.npz'):
        if 'fid' not in stats:
            raise MetricsError(f'{path}: the EDM v1 .npz format holds fid statistics only; add fid to --metrics')
        with misc.atomic_open(path, 'wb') as f:
            np.savez(f, mu=stats['fid']['mu'], sigma=stats['fid']['sigma'])
        return
    with misc.atomic_open(path, 'wb') as f:
        persistence.dump_portable(stats, f)  # readable by the official tools, also under numpy < 1.26

#----------------------------------------------------------------------------
# Fréchet distance (Heusel et al. 2017; singular covariances: docs/differences.md#metrics-9).


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product_eig(sigma: np.ndarray, sigma_ref: np.ndarray) -> float:
    """tr sqrt(S1 S2) = nuclear norm of S1^(1/2) S2^(1/2): the eigenvalues of S1 S2 equal those of
    (S1^(1/2) S2^(1/2))(S1^(1/2) S2^(1/2))^T, i.e. the squared singular values. Real and stable for PSD input."""
    return float(np.linalg.norm(_psd_sqrt(sigma) @ _psd_sqrt(sigma_ref), ord='nuc'))


def _is_singular(sigma: np.ndarray, rcond: float = 1e-10) -> bool:
    """Numerically singular covariance? Cholesky fails, or its smallest pivot is tiny (cheap test:
    a rank-deficient matrix always has a pivot at round-off level; min L_ii^2 >= lambda_min)."""
    try:
        pivots = np.square(np.diag(np.linalg.cholesky((sigma + sigma.T) / 2)))
    except np.linalg.LinAlgError:
        return True
    return bool(pivots.min() <= rcond * pivots.max())


def _trace_sqrt_product_sqrtm(sigma: np.ndarray, sigma_ref: np.ndarray) -> Optional[float]:
    """tr sqrtm(S1 S2) with scipy (the original's method); None if not finite or not numerically real."""
    try:
        with np.errstate(all='ignore'):
            s = scipy.linalg.sqrtm(sigma @ sigma_ref)
    except (np.linalg.LinAlgError, ValueError):
        return None
    if not np.all(np.isfinite(s)):
        return None
    tr = np.trace(s)
    return float(tr.real) if abs(tr.imag) <= 1e-6 * max(abs(tr.real), 1.0) else None


def frechet_distance(mu: np.ndarray, sigma: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """FD = |mu - mu_ref|^2 + tr(S + S_ref - 2 sqrtm(S S_ref)), in float64.

    scipy's sqrtm as the original for regular covariances; for singular ones (fewer images than
    feature dimensions) or when sqrtm fails or is not numerically real, the trace term comes from
    the symmetric eigen form, which is exact for positive semi-definite matrices."""
    mu, mu_ref = np.asarray(mu, np.float64), np.asarray(mu_ref, np.float64)
    sigma, sigma_ref = np.asarray(sigma, np.float64), np.asarray(sigma_ref, np.float64)
    if mu.shape != mu_ref.shape or sigma.shape != sigma_ref.shape:
        raise MetricsError(f'feature dimensions differ: {mu.shape[0]} vs {mu_ref.shape[0]} (reference from another detector?)')
    trace_sqrt = None
    if not (_is_singular(sigma) or _is_singular(sigma_ref)):
        trace_sqrt = _trace_sqrt_product_sqrtm(sigma, sigma_ref)
    if trace_sqrt is None:
        trace_sqrt = _trace_sqrt_product_eig(sigma, sigma_ref)
    return float(np.square(mu - mu_ref).sum() + np.trace(sigma) + np.trace(sigma_ref) - 2 * trace_sqrt)

#----------------------------------------------------------------------------
# Metrics from statistics.


def calculate_metrics_from_stats(stats: dict, ref: Union[str, dict], metrics: Sequence[str] = ('fid', 'fd_dinov2'),
                                 verbose: bool = True) -> dict:
    """[EDM2] {metric: FD against one reference}; metrics missing on either side are skipped."""
    ref = load_stats(ref, verbose=verbose) if isinstance(ref, str) else ref
    results = dict()
    for metric in metrics:
        if metric not in stats or metric not in ref:
            if verbose:
                print(f'No statistics computed for {metric} -- skipping.')
            continue
        check_same_detector(metric, stats[metric], ref[metric], 'the reference')
        if verbose:
            print(f'Calculating {metric}...')
        results[metric] = frechet_distance(stats[metric]['mu'], stats[metric]['sigma'], ref[metric]['mu'], ref[metric]['sigma'])
        if verbose:
            print(f'{metric} = {results[metric]:g}')
    return results


def check_same_detector(metric: str, entry: dict, ref_entry: dict, ref_label: str) -> None:
    """Refuse to compare statistics whose detector markers say they come from different weights
    (statistics without a marker, e.g. the official references, are compared as before)."""
    ours, theirs = entry.get('detector'), ref_entry.get('detector')
    if isinstance(ours, dict) and isinstance(theirs, dict) and not detectors.same_detector(ours, theirs):
        raise MetricsError(f'{metric}: {ref_label} was computed with another detector '
                           f'({detectors.describe_marker(theirs)}) than these images ({detectors.describe_marker(ours)});'
                           ' recompute it with the same detector weights')


def reference_name(path: str) -> str:
    """'https://.../img512.pkl' -> 'img512' (results are keyed by it)."""
    return os.path.splitext(os.path.basename(path.rstrip('/')))[0]


def load_references(paths: Sequence[str], verbose: bool = True) -> dict:
    """{reference name: stats}; names must be distinct."""
    names = [reference_name(path) for path in paths]
    for name, path in zip(names, paths):
        if names.count(name) > 1:
            raise MetricsError(f'--ref: two references are named "{name}" ({path}); results are keyed by file name')
    return {name: load_stats(path, verbose=verbose) for name, path in zip(names, paths)}


def _scorer_summary(stats_entry: dict) -> Optional[dict]:
    mu, sigma = np.asarray(stats_entry['mu']), np.asarray(stats_entry['sigma'])
    if mu.size != 1 or sigma.size != 1:
        return None
    variance = float(sigma.reshape(-1)[0])
    return dict(mu=float(mu.reshape(-1)[0]), sigma=float(np.sqrt(max(variance, 0.0))), variance=variance,
                histogram=[float(x) for x in stats_entry.get('histogram', [])])


def calculate_results(stats: dict, refs: dict, metrics: Sequence[str], verbose: bool = True) -> dict:
    """[FORK] {'features': {metric: {'mean', 'sigma'}}, 'metrics': {metric: {ref name: FD} or scorer summary}}."""
    results = dict(features=dict(), metrics=dict())
    for metric in metrics:
        if metric not in stats:
            continue
        entry = stats[metric]
        if detectors.is_scorer(metric):
            summary = _scorer_summary(entry)
            if summary is None:
                print(f'{metric}: unexpected statistics shape {np.shape(entry["mu"])} -- skipping.')
                continue
            results['metrics'][metric] = summary
            if verbose:
                print(f'{metric}: mean = {summary["mu"]:g}, std = {summary["sigma"]:g}')
            continue
        # 'mean' is the fork's name; 'mu' (the same array, stored once) makes OUT.pkl a reference file too.
        results['features'][metric] = {key: entry[key] for key in ('mu', 'sigma', 'detector') if key in entry}
        results['features'][metric]['mean'] = entry['mu']
        values = dict()
        for name, ref in refs.items():
            if metric not in ref:
                if verbose:
                    print(f'No {metric} statistics in reference {name} -- skipping.')
                continue
            check_same_detector(metric, entry, ref[metric], f'reference {name}')
            values[name] = frechet_distance(entry['mu'], entry['sigma'], ref[metric]['mu'], ref[metric]['sigma'])
            if verbose:
                print(f'{metric} on {name} = {values[name]:g}')
        results['metrics'][metric] = values
    return results

#----------------------------------------------------------------------------
# Result files (docs/user-files.md#metric-results-outjson-outpkl).


def result_paths(base: str, metrics: Sequence[str] = (), hist: bool = False) -> dict:
    """{'json': BASE.json, 'pkl': BASE.pkl}, plus {metric: BASE-<metric>.png} of the scorers with `hist`."""
    paths = dict(json=f'{base}.json', pkl=f'{base}.pkl')
    if hist:
        paths.update({metric: f'{base}-{metric}.png' for metric in metrics if detectors.is_scorer(metric)})
    return paths


def _check_path(path: str, option: str, is_dir: bool = False) -> None:
    try:
        misc.check_output_path(path, option, is_dir=is_dir)
    except ValueError as err:
        raise MetricsError(str(err)) from None


def check_output_base(base: str, metrics: Sequence[str] = (), hist: bool = False) -> None:
    """Fail early: the result files must be creatable and must not exist yet. Each results file records
    one run and its provenance, so an earlier run's file is never overwritten nor mixed with a new one."""
    for path in result_paths(base, metrics, hist).values():
        _check_path(path, '--out')
        if os.path.lexists(path):
            raise MetricsError(f'--out: {path} exists (results of an earlier run); choose another --out or move it away')


def check_stats_dest(path: str, metrics: Sequence[str], features: bool = False) -> None:
    """Fail early: `ref --dest` must be a creatable file, and `.npz` needs fid and holds no features
    (see `save_stats`)."""
    _check_path(path, '--dest')
    if path.lower().endswith('.npz') and 'fid' not in metrics:
        raise MetricsError(f'--dest: {path}: the EDM v1 .npz format holds fid statistics only; add fid to --metrics')
    if path.lower().endswith('.npz') and features:
        raise MetricsError(f'--dest: {path}: the EDM v1 .npz format holds no features; use a .pkl with --features')


def calculate_reference_stats(image_path: str, dest_path: str, metrics: Sequence[str], keep_features: Sequence[str] = (),
                              features_num: Optional[int] = None, **kwargs: Any) -> dict:
    """Collective: the statistics of a dataset, saved to `dest_path` by rank 0 (`ref`). The metrics in
    `keep_features` also store per-image features: of every image (`features_num` None, in the same pass), or of
    a random subset of `features_num` images (seed 0, in a second pass over them). `kwargs`: as for
    `calculate_stats_for_files`."""
    subset = bool(keep_features) and features_num is not None
    stats = run_with_progress(calculate_stats_for_files(
        image_path, metrics=metrics, keep_features=() if subset else keep_features,
        dest_path=None if subset else dest_path, **kwargs))
    if not subset:
        return stats
    sample_num = features_num if features_num < stats['num_images'] else None
    sample = run_with_progress(calculate_stats_for_files(
        image_path, num_images=sample_num, metrics=keep_features, keep_features=keep_features, **kwargs))
    stats = with_features(stats, sample)
    if dist.get_rank() == 0:
        save_stats(stats, dest_path)
    return stats


def with_features(stats: dict, subset_stats: dict) -> dict:
    """`stats` with the per-image features of `subset_stats` (a second pass over a random subset of the
    same images) added to the entries of the metrics that have them: {metric: {'mu', 'sigma', 'features'}}."""
    merged = dict(stats)
    for metric, entry in subset_stats.items():
        if isinstance(entry, dict) and 'features' in entry and metric in stats:
            merged[metric] = dict(stats[metric], features=entry['features'])
    return merged

#----------------------------------------------------------------------------
# Provenance of a results file.


def toolkit_version() -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version('edm2-toolkit')
    except importlib.metadata.PackageNotFoundError:
        return 'unknown'


def file_record(path: str) -> dict:
    """{'path'} of an input file, with its size, modification time and SHA-256 when it is local (a URL
    is downloaded through the cache, which keeps the content of a URL fixed)."""
    import hashlib
    record = dict(path=path)
    if dnnlib.util.is_url(path) or not os.path.isfile(path):
        return record
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    stat = os.stat(path)
    mtime = datetime.datetime.fromtimestamp(stat.st_mtime, datetime.timezone.utc).isoformat(timespec='seconds')
    return dict(record, size=stat.st_size, mtime=mtime, sha256=digest.hexdigest())


def run_provenance(command: str, source: dict, ref_paths: Sequence[str], stats: dict) -> dict:
    """What produced a set of results: the subcommand, its image source (`source`: the image folder and
    subset, or the networks, seeds and sampler settings, as given by the caller), the number of images,
    the references and detectors used, the toolkit version and the time (UTC)."""
    used = [metric for metric in stats if isinstance(stats[metric], dict) and 'detector' in stats[metric]]
    return dict(command=command, **source, num_images=int(stats['num_images']),
                references={reference_name(path): file_record(path) for path in ref_paths},
                detectors={metric: detectors.describe_marker(stats[metric]['detector']) for metric in used},
                toolkit=toolkit_version(), torch=str(torch.__version__),
                time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))


def save_results(results: dict, base: str, metrics: Sequence[str], hist: bool = False,
                 provenance: Optional[dict] = None, num_images: Optional[int] = None) -> list:
    """Write BASE.json (metric values) and BASE.pkl (features; usable as a --ref), each with the run's
    `provenance`; with `hist`, BASE-<metric>.png for every scorer metric. Existing files are refused
    (`check_output_base`). Returns the written paths."""
    check_output_base(base, metrics, hist)  # again: another run may have written them meanwhile
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    data_json = {metric: results['metrics'][metric] for metric in metrics if metric in results['metrics']}
    data_pkl = dict(results['features'])
    if num_images is not None:
        data_pkl['num_images'] = num_images
    if provenance is not None:
        data_json['provenance'] = data_pkl['provenance'] = provenance
    paths = result_paths(base)
    # Both files are complete on disk before either appears: a failure leaves neither.
    with misc.atomic_open(paths['json'], 'w', encoding='utf-8') as f_json, misc.atomic_open(paths['pkl'], 'wb') as f_pkl:
        json.dump(data_json, f_json, indent=2)
        persistence.dump_portable(data_pkl, f_pkl)
    written = [paths['json'], paths['pkl']]
    if hist:
        for metric in metrics:
            summary = results['metrics'].get(metric, None)
            if detectors.is_scorer(metric) and summary is not None:
                written.append(plot_histogram(summary, metric, f'{base}-{metric}.png'))
    return written


def plot_histogram(summary: dict, metric: str, path: str) -> str:
    """Bar plot of the score histogram (zoom 3..6.5, mean in red) with a full-range inset; own figure."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    counts = np.asarray(summary['histogram'], dtype=np.float64)
    x = np.arange(1, counts.size + 1) / HIST_BINS_PER_UNIT
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        ax.bar(x, counts, width=1 / HIST_BINS_PER_UNIT, edgecolor='black')
        ax.axvline(summary['mu'], color='red')
        ax.set_xlim(3, 6.5)
        ax.set_title(f'Histogram of {metric} score')
        ax.set_xlabel('Score')
        ax.set_ylabel('Number of images')
        inset = ax.inset_axes([0.58, 0.58, 0.4, 0.4])
        inset.bar(x, counts, width=1 / HIST_BINS_PER_UNIT)
        inset.axvline(summary['mu'], color='red')
        inset.set_xlim(0, x[-1])
        inset.set_yticks([])
        inset.patch.set_alpha(0.6)
        with misc.atomic_open(path, 'wb') as f:
            fig.savefig(f, format='png')
    finally:
        plt.close(fig)
    return path
