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
from torch_utils import persistence
from training.cli.options import solver_options
from training.sampling.families import ALL_DISCRETIZATIONS
from training.sampling.solvers import SOLVERS
from training.evaluation import detectors
from training.evaluation import calculate_metrics as metrics_lib
from training.evaluation import precision_recall as pr_lib
from training.evaluation import sweep as sweep_lib
from training.sampling.presets import ignored_gnet_warning, parse_interval
from training.snapshots.reconstruct_phema import parse_float_list, parse_std_list

#----------------------------------------------------------------------------
# Option parsing and error reporting.

_EXPECTED_ERRORS = (metrics_lib.MetricsError, OSError, pickle.UnpicklingError, persistence.TrustSettingError)


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


def _parse_sweep_metrics(ctx: click.Context, param: click.Parameter, value: str) -> list:
    try:
        return pr_lib.parse_metrics_with_pr(value)
    except metrics_lib.MetricsError as err:
        raise click.BadParameter(str(err), ctx, param) from None


def _parse_features(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Any:
    if value is None:
        return None
    if value.strip().lower() == 'all':
        return 'all'
    try:
        num = int(value)
    except ValueError:
        message = f'expected an integer > {pr_lib.DEFAULT_K} or "all", got "{value}"'
        raise click.BadParameter(message, ctx, param) from None
    if num <= pr_lib.DEFAULT_K:
        raise click.BadParameter(f'precision/recall needs more than {pr_lib.DEFAULT_K} images, got {num}', ctx, param)
    return num


def _parse_list(parse: Callable[[str], list]) -> Callable:
    """Click callback: a comma-separated list read by `parse` (None stays None); errors name the option."""
    def callback(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[list]:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as err:
            raise click.BadParameter(str(err), ctx, param) from None
    return callback


def _parse_int_list(value: str) -> list:
    values = parse_float_list(value)
    if any(v != int(v) or v < 1 for v in values):
        raise ValueError(f'expected positive integers, got "{value}"')
    return [int(v) for v in values]


def _parse_names(choices: tuple) -> Callable[[str], list]:
    def parse(value: str) -> list:
        names = [name.strip() for name in value.split(',') if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise ValueError(f'unknown "{",".join(unknown) or value}"; choose from {", ".join(choices)}')
        return names
    return parse


def _parse_intervals(ctx: click.Context, param: click.Parameter, value: tuple) -> list:
    try:
        return [None if v.strip().lower() == 'none' else parse_interval(v) for v in value] or [None]
    except ValueError as err:
        raise click.BadParameter(str(err), ctx, param) from None


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


def _uses_refs(metric_list: list) -> bool:
    return not all(detectors.is_scorer(m) for m in metric_list)


def _prepare_outputs(refs: tuple, metric_list: list, out: Optional[str], hist: bool) -> dict:
    """Rank 0: load the references and check the result files before the long computation."""
    if not refs and out is None and _uses_refs(metric_list):
        raise metrics_lib.MetricsError('--ref: give at least one reference for fid/fd_dinov2 (or --out to save the features)')
    if out is not None:
        metrics_lib.check_output_base(out, metric_list, hist)
    return metrics_lib.load_references(refs) if _uses_refs(metric_list) else dict()


def _warn(message: str) -> None:
    """One warning line on rank 0 (stderr, so that it does not mix with the results)."""
    dist.print0(f'Warning: {message}', file=sys.stderr, flush=True)


def _check_ignored(out: Optional[str], hist: bool, refs: tuple, metric_list: list) -> None:
    if hist and out is None:
        _warn('--hist has no effect without --out (the histograms are saved as OUT-<metric>.png)')
    if refs and not _uses_refs(metric_list):
        _warn(f'--ref is not used: {", ".join(metric_list)} need no reference (only fid and fd_dinov2 do)')


def _report(stats: dict, refs: dict, metric_list: list, out: Optional[str], hist: bool, command: str,
            source: Callable[[], dict], ref_paths: tuple) -> None:
    """Rank 0: print the metrics and save --out / --hist files with the provenance of the run (`source()`
    describes the images: called only here, as it may hash the network pickles)."""
    if dist.get_rank() != 0:
        return
    if len(refs) == 1 and out is None and not any(detectors.is_scorer(m) for m in metric_list):
        metrics_lib.calculate_metrics_from_stats(stats, next(iter(refs.values())), metric_list)
        return
    results = metrics_lib.calculate_results(stats, refs, metric_list)
    if out is not None:
        provenance = metrics_lib.run_provenance(command, source(), ref_paths if refs else (), stats)
        for path in metrics_lib.save_results(results, out, metric_list, hist=hist, provenance=provenance,
                                             num_images=stats['num_images']):
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

    \b
    # Sweep EMA lengths x guidance weights from raw snapshots (resumable),
    # 3 seed sets of 10000 images per point; results in sweeps/s.jsonl
    torchrun --standalone --nproc_per_node=8 -- calculate_metrics.py sweep \\
        --indir=raw-snapshots/edm2-img512-s --ema=0.050,0.075,...,0.200 \\
        --gnet=https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-xs-0134217-0.125.pkl \\
        --guidance=1,1.5,...,3 --num=10000 --repeats=3 --out=sweeps/s \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl
    """

#----------------------------------------------------------------------------


_ref_option = click.option('--ref', 'refs', help='Reference statistics (.pkl, EDM v1 .npz, or URL); repeatable, results are named after each file', metavar='PKL|NPZ|URL', type=str, multiple=True)
_metrics_option = click.option('--metrics', help='List of metrics to compute (fid, fd_dinov2, nima, ascore)', metavar='LIST', type=str, default='fid,fd_dinov2', show_default=True, callback=_parse_metrics)
_out_option = click.option('--out', help='Save results as OUT.json and OUT.pkl (OUT.pkl also serves as a --ref), with the provenance of the run; refused if they exist, so that a results file always describes one run', metavar='PATH', type=str, default=None)
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
    _check_ignored(out, hist, refs, metrics)
    ref_stats = _collective(lambda: _prepare_outputs(refs, metrics, out, hist))
    stats = _collective(lambda: metrics_lib.run_with_progress(metrics_lib.calculate_stats_for_files(
        image_path, num_images=num_images, seed=seed, max_batch_size=max_batch_size, num_workers=num_workers,
        resolution=resolution, metrics=metrics, device=device)), rank0_only=False)
    source = lambda: dict(images=image_path, num=('all' if num_images is None else num_images), seed=seed,
                          resolution=resolution)
    _collective(lambda: _report(stats, ref_stats, metrics, out, hist, 'calc', source, refs))
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
@solver_options
@click.option('--out-images', help='Also save the generated images here as PNG (flat)', metavar='DIR', type=str, default=None)
@_out_option
@_hist_option
def gen(net: str, gnet: Optional[str], refs: tuple, metrics: list, num_images: int, seed: int, max_batch_size: int,
        guidance: float, out_images: Optional[str], out: Optional[str], hist: bool, **sampler_options: Any) -> None:
    """Calculate metrics for a given model, generating the images on the fly."""
    device = _setup()
    _check_ignored(out, hist, refs, metrics)
    warning = ignored_gnet_warning(gnet, guidance)
    if warning is not None:
        _warn(warning)
        gnet = None
    ref_stats = _collective(lambda: _prepare_outputs(refs, metrics, out, hist))
    # Without --gnet the guide is the main network called without labels (the fork; docs/differences.md#metrics-7).
    stats = _collective(lambda: metrics_lib.run_with_progress(metrics_lib.calculate_stats_for_network(
        net, seeds=range(seed, seed + num_images), gnet=gnet, max_batch_size=max_batch_size, out_images=out_images,
        metrics=metrics, device=device, guidance=guidance, guide_labels=(gnet is not None), **sampler_options)),
        rank0_only=False)
    guide = 'none' if guidance == 1 else ('gnet, with labels' if gnet is not None else 'net, without labels')
    source = lambda: dict(net=metrics_lib.file_record(net), gnet=(gnet and metrics_lib.file_record(gnet)), guide=guide,
                          guidance=guidance, seeds=f'{seed}-{seed + num_images - 1}',
                          **{key: value for key, value in sampler_options.items() if value is not None},
                          out_images=out_images)
    _collective(lambda: _report(stats, ref_stats, metrics, out, hist, 'gen', source, refs))
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
@click.option('--top-percent', help='[fork] Keep the top X % of images by NIMA score (with --top-per-category: must pass both)', metavar='FLOAT', type=float, default=None)
@click.option('--top-per-category', help='[fork] Keep the top X % of each category by NIMA score (with --top-percent: must pass both)', metavar='FLOAT', type=float, default=None)
@click.option('--features', help='Also store the fid/fd_dinov2 features of this many randomly chosen images (seed 0; a second pass) or of all, for precision/recall (sweep --metrics=...,pr)', metavar='INT|all', type=str, default=None, callback=_parse_features)
def ref(image_path: str, dest_path: str, metrics: list, max_batch_size: int, num_workers: int,
        resolution: Optional[int], nima_threshold: Optional[float], top_percent: Optional[float],
        top_per_category: Optional[float], features: Any) -> None:
    """Calculate dataset reference statistics for 'calc', 'gen' and 'sweep'."""
    device = _setup()
    feature_metrics = pr_lib.feature_metrics(metrics + [pr_lib.PR_METRIC]) if features is not None else []
    if features is not None and not feature_metrics:
        raise click.BadParameter('needs fid and/or fd_dinov2 in --metrics', param_hint='--features')
    _collective(lambda: metrics_lib.check_stats_dest(dest_path, metrics, features=bool(feature_metrics)))
    filters = dict(nima_threshold=nima_threshold, top_percent=top_percent, top_per_category=top_per_category)
    _collective(lambda: metrics_lib.calculate_reference_stats(
        image_path, dest_path, metrics, keep_features=feature_metrics, features_num=None if features == 'all' else features,
        max_batch_size=max_batch_size, num_workers=num_workers, resolution=resolution, filter_kwargs=filters,
        device=device), rank0_only=False)
    dist.print0(f'Saved {dest_path}')
    dist.barrier()

#----------------------------------------------------------------------------


def _sweep_config(out: str, metrics: list, indir: Optional[str], inprefix: Optional[str], instd: Optional[list],
                  kimg: Optional[int], guide_indir: Optional[str], guide_inprefix: Optional[str],
                  guide_kimg: Optional[int], **options: Any) -> sweep_lib.SweepConfig:
    """The sweep's configuration; the snapshot directories are listed (not read) here."""
    if options['main_ema'] and indir is None:
        raise metrics_lib.MetricsError('--ema: give --indir, the snapshots to reconstruct the EMA profiles from')
    if options['guide_ema'] and indir is None and guide_indir is None:
        raise metrics_lib.MetricsError('--guide-ema: give --guide-indir (or --indir), the snapshots of the guide')
    ema_source = guide_source = None
    if options['main_ema']:
        ema_source = sweep_lib.open_ema_source(indir, inprefix, instd, kimg, '--indir')
    if options['guide_ema']:
        same = guide_indir is None
        guide_source = sweep_lib.open_ema_source(indir if same else guide_indir, inprefix if same else guide_inprefix,
                                                 instd if same else None, guide_kimg, '--guide-indir')
    options = {name: value for name, value in options.items() if value is not None}
    return sweep_lib.SweepConfig(out=out, metrics=metrics, ema_source=ema_source, guide_source=guide_source, **options)


def _start_sweep(cfg: sweep_lib.SweepConfig, refs: tuple) -> dict:
    """Rank 0: references loaded, configuration and results file checked; returns the references."""
    loaded = metrics_lib.load_references(refs)
    sweep_lib.check_config(cfg, loaded)
    sweep_lib.prepare_results(cfg, loaded)
    return loaded


@cmdline.command()
@click.option('--indir', help='Power-function EMA snapshots to reconstruct the --ema profiles from (as for reconstruct_phema.py)', metavar='DIR', type=str, default=None)
@click.option('--inprefix', help='Use only snapshots whose file-name prefix equals this', metavar='STR', type=str, default=None)
@click.option('--instd', help='Use only snapshots with these stds', metavar='LIST', type=str, default=None, callback=_parse_list(parse_std_list))
@click.option('--kimg', help='Training time of the reconstructions  [default: latest snapshot]', metavar='KIMG', type=click.IntRange(min=1), default=None)
@click.option('--ema', 'main_ema', help='Main EMA lengths (stds) to reconstruct in memory: a,b,c or a,b,...,z', metavar='LIST', type=str, default=None, callback=_parse_list(parse_std_list))
@click.option('--net', 'main_nets', help='Main network pickle (with or instead of --ema); repeatable', metavar='PATH|URL', type=str, multiple=True)
@click.option('--guide-indir', help='Snapshots for --guide-ema  [default: --indir with its --inprefix/--instd]', metavar='DIR', type=str, default=None)
@click.option('--guide-inprefix', help='Use only --guide-indir snapshots with this prefix', metavar='STR', type=str, default=None)
@click.option('--guide-kimg', help='Training time of the guide reconstructions  [default: latest guide snapshot]', metavar='KIMG', type=click.IntRange(min=1), default=None)
@click.option('--guide-ema', help='Guide EMA lengths (stds) to reconstruct in memory', metavar='LIST', type=str, default=None, callback=_parse_list(parse_std_list))
@click.option('--gnet', 'guide_nets', help='Guiding network pickle; repeatable  [default without guides: the main network called without labels]', metavar='PATH|URL', type=str, multiple=True)
@click.option('--guidance', help='Guidance weights (1 = no guidance): a,b,c or a,b,...,z', metavar='LIST', type=str, default='1', show_default=True, callback=_parse_list(parse_float_list))
@click.option('--guidance-interval', 'intervals', help='Guide only for sigma in [LO,HI] ("none": every sigma); repeatable, each one more grid value', metavar='LO,HI|none', type=str, multiple=True, callback=_parse_intervals)
@click.option('--steps', 'num_steps', help='Numbers of sampling steps (EDM v1 networks: EDM v1 samples with 18)', metavar='LIST', type=str, default='32', show_default=True, callback=_parse_list(_parse_int_list))
@click.option('--solver', 'solvers', help='ODE solvers, each one more grid value (as for gen)  [default: heun; EDM v1 networks: their EDM sampler]', metavar='LIST', type=str, default=None, callback=_parse_list(_parse_names(tuple(SOLVERS))))
@click.option('--disc', 'discretizations', help='Time-step discretizations, each one more grid value (as for gen)  [default: edm]', metavar='LIST', type=str, default=None, callback=_parse_list(_parse_names(ALL_DISCRETIZATIONS)))
@_ref_option
@click.option('--metrics', help='Metrics: fid, fd_dinov2, nima, ascore, and pr (precision/recall in the fid/fd_dinov2 feature spaces; needs references made with ref --features)', metavar='LIST', type=str, default='fid,fd_dinov2', show_default=True, callback=_parse_sweep_metrics)
@click.option('--num', help='Images per evaluation', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='First random seed', metavar='INT', type=int, default=0, show_default=True)
@click.option('--repeats', help='Evaluate every point on this many disjoint seed sets (mean, std, min)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--batch', 'max_batch_size', help='Maximum generation batch size', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--ema-batch', help='EMA profiles reconstructed per pass over the snapshots (memory: this many networks)', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--save-nets', help='Also save the reconstructed networks here as pickles', metavar='DIR', type=str, default=None)
@click.option('--out', help='Results: BASE.jsonl (one line per finished evaluation; a rerun resumes) and plots BASE-<metric>-*.png', metavar='BASE', type=str, required=True)
@click.option('--report', 'report_only', help='Only print the table of the results so far and write the plots (safe while a sweep runs)', is_flag=True)
def sweep(out: str, refs: tuple, report_only: bool, num_steps: list, solvers: Optional[list],
          discretizations: Optional[list], **options: Any) -> None:
    """Evaluate every combination of EMA lengths, guides, guidance and sampler settings.

    \b
    Every point is appended to OUT.jsonl when finished; a rerun skips the
    finished points. At the end (or with --report) it prints the table, the
    best point per metric, and plots metric vs EMA length and heatmaps.
    """
    if report_only:
        _collective(lambda: sweep_lib.report(out))
        return
    device = _setup()
    sampler_axes = dict(num_steps=num_steps, solver=solvers, discretization=discretizations)
    sampler_axes = {name: values for name, values in sampler_axes.items() if values is not None}  # unset: not an axis
    cfg = _collective(lambda: _sweep_config(out, sampler_axes=sampler_axes, **options), rank0_only=False)
    ref_stats = _collective(lambda: _start_sweep(cfg, refs))
    _collective(lambda: sweep_lib.run_sweep(cfg, ref_stats, device), rank0_only=False)
    _collective(lambda: sweep_lib.report(out))
    dist.barrier()

#----------------------------------------------------------------------------


if __name__ == '__main__':
    cmdline()
