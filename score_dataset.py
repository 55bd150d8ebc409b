"""[FORK] Score every image of a dataset with NIMA or the LAION aesthetic predictor, resumably.

Thin click CLI over `training.evaluation.score_dataset`; see `python score_dataset.py --help`.
"""

import pickle
import signal
import sys
from typing import Optional

import click

import dnnlib
from torch_utils import distributed as dist
from training.evaluation import score_dataset as scoring
from training.evaluation.calculate_metrics import MetricsError

STOPPED_EXIT_CODE = 128 + signal.SIGTERM


@click.command()
@click.option('--images', 'image_path', help='Dataset to score', metavar='PATH|ZIP', type=str, required=True)
@click.option('--out', 'out_dir', help='Output directory (results_<n>.csv checkpoints, results_full.csv, metadata.json)', metavar='DIR', type=str, required=True)
@click.option('--metric', help='Scorer to use: nima or ascore', metavar='NAME', type=str, required=True)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', 'num_workers', help='Subprocesses to use for data loading', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--checkpoints', help='Write a results_<n>.csv checkpoint every this many batches (0 or default: only at the end)', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--resolution', help='Centre-crop/resize images to this size before scoring; 0 = as stored', metavar='INT', type=click.IntRange(min=0), default=512, show_default=True)
def main(image_path: str, out_dir: str, metric: str, max_batch_size: int, num_workers: int,
         checkpoints: Optional[int], resolution: int) -> None:
    """Score the images of a dataset and write per-image results to CSV.

    An interrupted run (Ctrl-C, SIGTERM, crash) resumes where its last checkpoint left off when
    started again with the same --out. The final results_full.csv lists every image once, and
    metadata.json can be copied to the dataset root for training/ref filtering
    (--nima-threshold, --top-percent, --top-per-category).

    Examples:

    \b
    # Score a dataset with NIMA on 8 GPUs, checkpointing every 100 batches
    torchrun --standalone --nproc_per_node=8 -- score_dataset.py \\
        --images=datasets/imagenet-train --out=scores/nima --metric=nima --checkpoints=100
    """
    dist.init()
    dist.install_signal_handlers()
    try:
        scores = scoring.score_dataset(image_path, out_dir, metric, max_batch_size=max_batch_size,
                                       num_workers=num_workers, checkpoints=(checkpoints or None),
                                       resolution=(resolution or None), device=dist.get_device())
    except (MetricsError, OSError, pickle.UnpicklingError) as err:
        raise click.ClickException(dnnlib.util.first_line(err)) from None
    # Rank 0 gets None only when a stop signal ended the run early: exit like a terminated process
    # (128 + SIGTERM), so that schedulers and scripts do not take the partial run for a finished one.
    stopped = dist.any_rank(dist.get_rank() == 0 and scores is None)
    if scores is not None:
        dist.print0(f'Scored {len(scores)} images; results in {out_dir}')
    dist.shutdown()
    if stopped:
        sys.exit(STOPPED_EXIT_CODE)


if __name__ == '__main__':
    main()
