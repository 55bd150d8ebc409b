"""[FORK] Per-image scoring of a dataset, resumable (docs/differences.md#metrics-11, #metrics-12).

`score_dataset()` scores every image of a directory or zip with one scorer (`nima`, `ascore`):

* work is split over ranks like image generation; every `checkpoints` batches (and at the end,
  or when SIGTERM/SIGUSR1 asks to stop) the scores of all ranks are written to
  `out/results_<n>.csv` atomically, so an interrupted run loses at most the pending batches;
* a restart reads `out/results_<n>.csv` (never `results_full.csv`) and skips scored images;
* at the end `out/results_full.csv` holds every score exactly once, sorted by file name, and
  `out/metadata.json` holds them in the format `training.dataset.FilteredImageDataset` reads
  (`{"metadata": {"<folder>/<stem>": {"<metric>": score, "labels": "<folder>"}}}`, no "labels" for a
  dataset with dataset.json; docs/user-files.md); copy it to the dataset root to filter by score.

CSV layout: header `filename,<metric>`, one row per image, the name being the path relative to
the dataset root with `/` separators and without extension. Scores are written with full
float precision (repr), so a resumed run writes exactly what an uninterrupted one would.
"""

import csv
import io
import json
import os
import re
from typing import Optional, Union

import numpy as np
import torch

from torch_utils import distributed as dist
from torch_utils import misc
from training import dataset as dataset_lib
from training.evaluation import detectors
from training.evaluation.calculate_metrics import MetricsError

CHECKPOINT_RE = re.compile(r'^results_(\d+)\.csv$')
FULL_RESULTS = 'results_full.csv'
METADATA = 'metadata.json'

#----------------------------------------------------------------------------
# CSV files.


def read_scores_csv(path: str, metric: str) -> dict:
    """{file name: score} of one results CSV; the score column must be `metric`."""
    with open(path, 'r', newline='', encoding='utf-8') as f:
        rows = list(csv.reader(f))
    if not rows or len(rows[0]) != 2 or rows[0][0] != 'filename':
        raise MetricsError(f'{path}: not a score_dataset results file (header {rows[0] if rows else "missing"})')
    if rows[0][1] != metric:
        raise MetricsError(f'{path}: holds "{rows[0][1]}" scores, not "{metric}"; use another --out directory')
    try:
        return {name: float(value) for name, value in rows[1:]}
    except ValueError as err:
        raise MetricsError(f'{path}: malformed row ({err})') from err


def write_scores_csv(scores: dict, path: str, metric: str) -> None:
    """Atomic CSV, rows sorted by file name."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(['filename', metric])
    for name in sorted(scores):
        writer.writerow([name, repr(float(scores[name]))])
    with misc.atomic_open(path, 'w', encoding='utf-8', newline='') as f:
        f.write(buf.getvalue())


def checkpoint_files(out_dir: str) -> list:
    """[(index, path)] of out/results_<n>.csv sorted by n; results_full.csv is not one of them
    (docs/differences.md#metrics-12)."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), os.path.join(out_dir, name)) for name in os.listdir(out_dir)
             for m in [CHECKPOINT_RE.match(name)] if m]
    return sorted(found)


def read_checkpoints(out_dir: str, metric: str) -> tuple:
    """(all scores so far, next checkpoint index); later files win on duplicate names."""
    scores, next_index = dict(), 0
    for index, path in checkpoint_files(out_dir):
        scores.update(read_scores_csv(path, metric))
        next_index = index + 1
    return scores, next_index

#----------------------------------------------------------------------------
# Dataset items with names; corrupted files are reported, never replaced by another image.


def image_name(fname: str) -> str:
    """'n01/n01_1.JPEG' -> 'n01/n01_1' (the key used by the CSV and metadata.json)."""
    return os.path.splitext(fname.replace('\\', '/'))[0]


class NamedImages(torch.utils.data.Dataset):
    """Items (CHW uint8 image or None if unreadable, name) for selected raw indices of an ImageFolderDataset."""

    def __init__(self, ds: dataset_lib.ImageFolderDataset, raw_indices: list):
        self.ds = ds
        self.raw_indices = list(raw_indices)

    def __len__(self) -> int:
        return len(self.raw_indices)

    def __getitem__(self, idx: int) -> tuple:
        raw_idx = self.raw_indices[idx]
        name = image_name(self.ds._raw_name(raw_idx))
        try:
            return self.ds._get_image(raw_idx), name
        except dataset_lib.CorruptImageError:
            return None, name


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """CHW uint8 with 3 channels: gray (+alpha) repeated, alpha dropped (what the scorers take)."""
    return np.repeat(image[:1], 3, axis=0) if image.shape[0] < 3 else image[:3]


def collate_named(items: list) -> tuple:
    """(groups, names of unreadable files); a group is (RGB images uint8 NCHW, their names) of one size.

    Images keep their stored size with --resolution 0, so a batch may mix sizes: each size is scored
    as its own group (the scorers resize every image to their input size anyway)."""
    groups = dict()
    for image, name in items:
        if image is not None:
            image = _as_rgb(image)
            groups.setdefault(image.shape, []).append((image, name))
    bad = [name for image, name in items if image is None]
    return [(torch.from_numpy(np.stack([image for image, _ in group])), [name for _, name in group])
            for group in groups.values()], bad


LATENT_HINT = ('latent datasets must be decoded first (dataset_tool.py decode); score the pixel images,'
               ' e.g. the source folder of process-and-encode')


def check_pixel_images(ds: dataset_lib.ImageFolderDataset, image_path: str) -> None:
    """Refuse latents (.npy, float or many-channel arrays): the scorers would read them as pixels, or crash."""
    latents = [fname for fname in ds._image_fnames if ds._file_ext(fname) == '.npy']
    if latents:
        raise MetricsError(f'{image_path}: {latents[0]} is a latent (.npy); {LATENT_HINT}')
    dtype, channels = ds._first_raw_dtype, ds._first_raw_shape[0]  # the first readable image, decoded on open
    if dtype != np.uint8 or not 1 <= channels <= 4:
        raise MetricsError(f'{image_path}: scorers need 8-bit images with 1-4 channels, got {dtype} with '
                           f'{channels} channels; {LATENT_HINT}')


def open_scoring_dataset(image_path: str, resolution: Optional[int]) -> dataset_lib.ImageFolderDataset:
    try:
        ds = dataset_lib.ImageFolderDataset(image_path, resolution=resolution, center_crop=(resolution is not None),
                                            use_labels=False)
    except (IOError, ValueError) as err:
        raise MetricsError(f'{image_path}: {err}') from err
    check_pixel_images(ds, image_path)
    return ds

#----------------------------------------------------------------------------
# Cross-rank merging and the final files.


def _gather_scores(pending: dict) -> dict:
    """Collective: the union of every rank's pending scores (on every rank)."""
    if dist.get_world_size() == 1:
        return dict(pending)
    parts = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(parts, pending)
    merged = dict()
    for part in parts:
        merged.update(part)
    return merged


def _flush(pending: dict, out_dir: str, metric: str, index: int) -> int:
    """Collective: write the ranks' pending scores as results_<index>.csv; return the next index."""
    merged = _gather_scores(pending)
    pending.clear()
    if not merged:
        return index
    if dist.get_rank() == 0:
        write_scores_csv(merged, os.path.join(out_dir, f'results_{index}.csv'), metric)
    dist.barrier()
    return index + 1


def metadata_of(scores: dict, metric: str, existing: Optional[dict] = None, folder_labels: bool = True) -> dict:
    """FilteredImageDataset metadata: the score under `metric`; with `folder_labels`, the top-level folder as
    the fork's category (`labels`). A dataset with dataset.json gets no `labels`: its folders may be shards
    (convert output), and its class labels are in dataset.json (scores and labels are separate facts)."""
    metadata = dict(existing or {})
    for name, score in sorted(scores.items()):
        entry = dict(metadata.get(name, {}))
        entry[metric] = float(score)
        entry.pop('labels', None)
        if folder_labels and '/' in name:
            entry['labels'] = name.split('/')[0]
        metadata[name] = entry
    return metadata


def write_final_files(out_dir: str, metric: str, folder_labels: bool = True) -> dict:
    """Rank 0: results_full.csv (every image once) and metadata.json (merged with an existing one);
    `folder_labels`: see `metadata_of`."""
    scores, _ = read_checkpoints(out_dir, metric)
    write_scores_csv(scores, os.path.join(out_dir, FULL_RESULTS), metric)
    meta_path = os.path.join(out_dir, METADATA)
    existing = dict()
    if os.path.isfile(meta_path):
        try:
            with open(meta_path, 'r', encoding='utf-8') as f:
                existing = json.load(f).get('metadata', {})
        except (OSError, ValueError, AttributeError) as err:
            raise MetricsError(f'{meta_path}: existing metadata is not valid JSON ({err}); move it away') from err
    with misc.atomic_open(meta_path, 'w', encoding='utf-8') as f:
        json.dump(dict(metadata=metadata_of(scores, metric, existing, folder_labels)), f, indent=1, sort_keys=True)
    return scores

#----------------------------------------------------------------------------


def score_dataset(
    image_path: str,                        # Dataset directory or zip.
    out_dir: str,                           # Output directory (checkpoints, results_full.csv, metadata.json).
    metric: str,                            # Scorer: 'nima' or 'ascore'.
    max_batch_size: int = 64,
    num_workers: int = 2,
    checkpoints: Optional[int] = None,      # Write results_<n>.csv every this many batches; None = only at the end.
    resolution: Optional[int] = 512,        # ADM centre crop to this size (fork); None = images as stored.
    device: Union[str, torch.device] = 'cpu',
    verbose: bool = True,
) -> Optional[dict]:
    """Score the images not scored yet; return {name: score} of the whole dataset on rank 0
    (None on other ranks, or when the run was asked to stop early)."""
    scorers = [name for name in detectors.detector_classes if detectors.is_scorer(name)]
    if metric not in scorers:
        raise MetricsError(f'--metric: invalid scorer "{metric}" (choose from {", ".join(scorers)})')
    try:
        misc.check_output_path(out_dir, '--out', is_dir=True)
    except ValueError as err:
        raise MetricsError(str(err)) from None
    if dist.get_rank() != 0:
        dist.barrier()
    try:
        ds = open_scoring_dataset(image_path, resolution)  # first: bad input leaves no empty --out behind
        if dist.get_rank() == 0:
            os.makedirs(out_dir, exist_ok=True)
        done, next_index = read_checkpoints(out_dir, metric)
    finally:
        if dist.get_rank() == 0:
            dist.barrier()
    todo = [raw_idx for raw_idx in range(len(ds._image_fnames)) if image_name(ds._raw_name(raw_idx)) not in done]
    if not todo and done:
        dist.print0('Dataset Already Fully Processed')
    elif todo:
        if verbose:
            dist.print0(f'Scoring {len(todo)} images with {metric} ({len(done)} already scored)...')
        stopped = _score_images(NamedImages(ds, todo), out_dir, metric, max_batch_size, num_workers, checkpoints,
                                next_index, torch.device(device), verbose)
        if stopped:
            dist.print0(f'Stopped on request; run again with the same --out to resume ({out_dir})')
            return None
    folder_labels = not ds._has_file('dataset.json')
    scores = write_final_files(out_dir, metric, folder_labels) if dist.get_rank() == 0 else None
    dist.barrier()
    return scores


def _score_images(items: NamedImages, out_dir: str, metric: str, max_batch_size: int, num_workers: int,
                  checkpoints: Optional[int], index: int, device: torch.device, verbose: bool) -> bool:
    """Score `items` (split over ranks); True if stopped early by a signal."""
    import tqdm
    from training.sampling.generate_images import split_seeds
    chunks = [chunk.tolist() for chunk in split_seeds(len(items), max_batch_size, dist.get_rank(), dist.get_world_size())]
    loader = torch.utils.data.DataLoader(items, batch_sampler=chunks, collate_fn=collate_named, num_workers=num_workers,
                                         prefetch_factor=(2 if num_workers > 0 else None),
                                         multiprocessing_context=('spawn' if num_workers > 0 else None))
    detector = detectors.get_detector(metric, verbose=verbose)
    pending = dict()
    bar = tqdm.tqdm(total=len(chunks), unit='batch', disable=(not verbose or dist.get_rank() != 0))
    with bar:
        for batch_idx, (groups, bad) in enumerate(loader):
            for name in bad:
                print(f'Skipping unreadable image: {name}')
            for images, names in groups:
                scores = detector(images.to(device)).reshape(images.shape[0], -1)
                if scores.shape[1] != 1:
                    raise MetricsError(f'{metric}: expected one score per image, got {scores.shape[1]}')
                pending.update(zip(names, scores[:, 0].double().cpu().tolist()))
            bar.update(1)
            stop = dist.any_rank(dist.should_stop())
            if stop or (checkpoints and (batch_idx + 1) % checkpoints == 0):
                index = _flush(pending, out_dir, metric, index)
            if stop:
                return True
    _flush(pending, out_dir, metric, index)
    return False
