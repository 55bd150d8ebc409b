"""Calculate evaluation metrics (FID, FD_DINOv2, and the fork's NIMA / aesthetic scores).

Thin click CLI over `training.evaluation.calculate_metrics`; see `python calculate_metrics.py --help`.
"""

import pickle
import sys
from typing import Any, Callable, Optional

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from training.cli.options import solver_options
from training.evaluation import detectors
from training.evaluation import calculate_metrics as metrics_lib
from training.sampling.presets import ignored_gnet_warning

#----------------------------------------------------------------------------
# Option parsing and error reporting.

_EXPECTED_ERRORS = (metrics_lib.MetricsError, OSError, pickle.UnpicklingError)


def _parse_metrics(ctx: click.Context, param: click.Parameter, value: str) -> list:
    try:
        return metrics_lib.parse_metric_list(value)
    except metrics_lib.MetricsError as err:
        raise click.BadParameter(str(err), ctx, param) from None


def _parse_num(ctx: click.Context, param: click.Parameter, value: str) -> Optional[int]:
    if value is None or value.strip().lower() == 'all':
        return None
    try:
        num = int(value)
    except ValueError:
        raise click.BadParameter(f'expected an integer >= 2 or "all", got "{value}"', ctx, param) from None
    if num < 2:
        raise click.BadParameter(f'need at least 2 images, got {num}', ctx, param)
    return num


def _collective(fn: Callable[[], Any], rank0_only: bool = True) -> Any:
    """Run `fn` (on rank 0 only by default); if it fails on any rank, every rank exits with its message."""
    result, error = None, None
    if dist.get_rank() == 0 or not rank0_only:
        try:
            result = fn()
        except _EXPECTED_ERRORS as err:
            error = err
    if dist.any_rank(error is not None):
        raise click.ClickException(dnnlib.util.first_line(error) if error is not None else 'failed on rank 0 (see its output)')
    return result


def _setup() -> torch.device:
    # Loader workers use the spawn start method (set per DataLoader, not process-wide).
    dist.init()
    return dist.get_device()


def _prepare_outputs(refs: tuple, metric_list: list, out: Optional[str]) -> dict:
    """Rank 0: load the references and check the result files before the long computation."""
    if not refs and out is None and not all(detectors.is_scorer(m) for m in metric_list):
        raise metrics_lib.MetricsError('--ref: give at least one reference for fid/fd_dinov2 (or --out to save the features)')
    loaded = metrics_lib.load_references(refs)
    if out is not None:
        metrics_lib.check_output_base(out)
    return loaded


def _warn(message: str) -> None:
    """One warning line on rank 0 (stderr, so that it does not mix with the results)."""
    dist.print0(f'Warning: {message}', file=sys.stderr, flush=True)


def _check_hist(out: Optional[str], hist: bool) -> None:
    if hist and out is None:
        _warn('--hist has no effect without --out (the histograms are saved as OUT-<metric>.png)')


def _report(stats: dict, refs: dict, metric_list: list, out: Optional[str], hist: bool) -> None:
    """Rank 0: print the metrics and save --out / --hist files."""
    if dist.get_rank() != 0:
        return
    if len(refs) == 1 and out is None and not any(detectors.is_scorer(m) for m in metric_list):
        metrics_lib.calculate_metrics_from_stats(stats, next(iter(refs.values())), metric_list)
        return
    results = metrics_lib.calculate_results(stats, refs, metric_list)
    if out is not None:
        for path in metrics_lib.save_results(results, out, metric_list, hist=hist):
            print(f'Saved {path}')

#----------------------------------------------------------------------------


@click.group()
def cmdline():
    """Calculate evaluation metrics (FID and FD_DINOv2; also the fork's NIMA and aesthetic scores).

    Examples:

    \b
    # Generate 50000 images using 8 GPUs and save them as out/*/*.png
    torchrun --standalone --nproc_per_node=8 -- generate_images.py \\
        --preset=edm2-img512-xxl-guid-fid --outdir=out --subdirs --seeds=0-49999

    \b
    # Calculate metrics for a random subset of 50000 images in out/
    python calculate_metrics.py calc --images=out \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl

    \b
    # Calculate metrics directly for a given model without saving any images
    # ("--" keeps torchrun from reading options such as --num as its own)
    torchrun --standalone --nproc_per_node=8 -- calculate_metrics.py gen \\
        --net=https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-s-2147483-0.130.pkl \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl \\
        --seed=123456789

    \b
    # Compute dataset reference statistics
    python calculate_metrics.py ref --data=datasets/my-dataset.zip \\
        --dest=fid-refs/my-dataset.pkl

    \b
    # Several references at once, results saved as results.json/.pkl, NIMA histogram
    python calculate_metrics.py calc --images=out --ref=a.pkl --ref=b.npz \\
        --metrics=fid,nima --out=results --hist
    """

#----------------------------------------------------------------------------


_ref_option = click.option('--ref', 'refs', help='Reference statistics (.pkl, EDM v1 .npz, or URL); repeatable, results are named after each file', metavar='PKL|NPZ|URL', type=str, multiple=True)
_metrics_option = click.option('--metrics', help='List of metrics to compute (fid, fd_dinov2, nima, ascore)', metavar='LIST', type=str, default='fid,fd_dinov2', show_default=True, callback=_parse_metrics)
_out_option = click.option('--out', help='Save results as OUT.json and OUT.pkl (merged into existing files)', metavar='PATH', type=str, default=None)
_hist_option = click.option('--hist', help='With --out, plot score histograms as OUT-<metric>.png', is_flag=True)


@cmdline.result_callback()
def _finish(*_args, **_kwargs) -> None:
    dist.shutdown()  # after a successful subcommand: every rank leaves the process group together


@cmdline.command()
@click.option('--images', 'image_path', help='Path to the images', metavar='PATH|ZIP', type=str, required=True)
@_ref_option
@_metrics_option
@click.option('--num', 'num_images', help='Number of images to use ("all" = every image); an error if there are fewer', metavar='INT|all', type=str, default='50000', show_default=True, callback=_parse_num)
@click.option('--seed', help='Random seed for selecting the images', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', 'num_workers', help='Subprocesses to use for data loading', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--resolution', help='Centre-crop/resize every image to this size first (fork: 512); default: as stored', metavar='INT', type=click.IntRange(min=1), default=None)
@_out_option
@_hist_option
def calc(image_path: str, refs: tuple, metrics: list, num_images: Optional[int], seed: int, max_batch_size: int,
         num_workers: int, resolution: Optional[int], out: Optional[str], hist: bool) -> None:
    """Calculate metrics for a given set of images."""
    device = _setup()
    _check_hist(out, hist)
    ref_stats = _collective(lambda: _prepare_outputs(refs, metrics, out))
    stats = _collective(lambda: metrics_lib.run_with_progress(metrics_lib.calculate_stats_for_files(
        image_path, num_images=num_images, seed=seed, max_batch_size=max_batch_size, num_workers=num_workers,
        resolution=resolution, metrics=metrics, device=device)), rank0_only=False)
    _collective(lambda: _report(stats, ref_stats, metrics, out, hist))
    dist.barrier()

#----------------------------------------------------------------------------


@cmdline.command()
@click.option('--net', help='Network pickle filename', metavar='PATH|URL', type=str, required=True)
@click.option('--gnet', help='Guiding network for --guidance, called with the class labels  [default: the main network called without labels (CFG-like, as in the fork)]', metavar='PATH|URL', type=str, default=None)
@_ref_option
@_metrics_option
@click.option('--num', 'num_images', help='Number of images to generate', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='First random seed (seeds seed..seed+num-1)', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--guidance', help='Guidance strength (1 = no guidance)', metavar='FLOAT', type=float, default=1.0, show_default=True)
@click.option('--steps', 'num_steps', help='Number of solver steps', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@solver_options
@click.option('--out-images', help='Also save the generated images here as PNG (flat)', metavar='DIR', type=str, default=None)
@_out_option
@_hist_option
def gen(net: str, gnet: Optional[str], refs: tuple, metrics: list, num_images: int, seed: int, max_batch_size: int,
        guidance: float, num_steps: int, solver: str, discretization: str, out_images: Optional[str], out: Optional[str],
        hist: bool) -> None:
    """Calculate metrics for a given model, generating the images on the fly."""
    device = _setup()
    _check_hist(out, hist)
    warning = ignored_gnet_warning(gnet, guidance)
    if warning is not None:
        _warn(warning)
        gnet = None
    ref_stats = _collective(lambda: _prepare_outputs(refs, metrics, out))
    # Without --gnet the guide is the main network called without labels (the fork, quirk F19).
    stats = _collective(lambda: metrics_lib.run_with_progress(metrics_lib.calculate_stats_for_network(
        net, seeds=range(seed, seed + num_images), gnet=gnet, max_batch_size=max_batch_size, out_images=out_images,
        metrics=metrics, device=device, guidance=guidance, num_steps=num_steps, solver=solver,
        discretization=discretization, guide_labels=(gnet is not None))),
        rank0_only=False)
    _collective(lambda: _report(stats, ref_stats, metrics, out, hist))
    dist.barrier()

#----------------------------------------------------------------------------


@cmdline.command()
@click.option('--data', 'image_path', help='Path to the dataset', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Destination file (.pkl; .npz writes the EDM v1 fid-only format)', metavar='PKL', type=str, required=True)
@_metrics_option
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', 'num_workers', help='Subprocesses to use for data loading', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--resolution', help='Centre-crop/resize every image to this size first (fork: 512); default: as stored', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--nima-threshold', help='[fork] Keep images with a metadata.json NIMA score >= this', metavar='FLOAT', type=float, default=None)
@click.option('--top-percent', help='[fork] Keep the top X % of images by NIMA score', metavar='FLOAT', type=float, default=None)
@click.option('--top-per-category', help='[fork] Keep the top X % of each category by NIMA score', metavar='FLOAT', type=float, default=None)
def ref(image_path: str, dest_path: str, metrics: list, max_batch_size: int, num_workers: int,
        resolution: Optional[int], nima_threshold: Optional[float], top_percent: Optional[float],
        top_per_category: Optional[float]) -> None:
    """Calculate dataset reference statistics for 'calc' and 'gen'."""
    device = _setup()
    _collective(lambda: metrics_lib.check_stats_dest(dest_path, metrics))
    filters = dict(nima_threshold=nima_threshold, top_percent=top_percent, top_per_category=top_per_category)
    _collective(lambda: metrics_lib.run_with_progress(metrics_lib.calculate_stats_for_files(
        image_path, num_images=None, max_batch_size=max_batch_size, num_workers=num_workers, resolution=resolution,
        filter_kwargs=filters, metrics=metrics, device=device, dest_path=dest_path)), rank0_only=False)
    dist.print0(f'Saved {dest_path}')
    dist.barrier()

#----------------------------------------------------------------------------


if __name__ == '__main__':
    cmdline()
