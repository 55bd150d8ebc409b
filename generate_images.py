"""Generate images with EDM2 networks: a thin CLI over `training.sampling`.

`generate_images` and the other names of the official script are re-exported here so
that `from generate_images import generate_images, config_presets` keeps working.
"""

import pickle
import sys

import click
import tqdm

from torch_utils import distributed as dist
from torch_utils import misc
from training.cli.options import DEVICE, solver_options
from dnnlib.util import count_of, parse_int_list
from training.sampling.edm1_presets import edm1_presets
from training.sampling.generate_images import generate_images, missing_seeds, save_image_grid
from training.sampling.presets import (  # noqa: F401 -- re-exported for compatibility
    config_presets, ignored_gnet_warning, model_root, parse_interval, preset_sampler_options, resolve_options)
from training.sampling.sampler import StackedRandomGenerator, edm_sampler  # noqa: F401 -- re-exported for compatibility


def _parse_seeds(ctx: click.Context, param: click.Parameter, value: str) -> list:
    try:
        seeds = parse_int_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None
    if not seeds:
        raise click.BadParameter(f'no seeds in "{value}"', ctx, param)
    return seeds


def _parse_interval(ctx: click.Context, param: click.Parameter, value: str) -> tuple:
    try:
        return parse_interval(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None


def _fast_path(plain: bool, compute_dtype: str) -> dict:
    """set_fast() kwargs of the networks; None leaves the network defaults untouched."""
    if plain and compute_dtype is not None:
        raise click.BadOptionUsage('dtype', '--dtype cannot be combined with --plain')
    if plain:
        return dict(enabled=False)
    return None if compute_dtype is None else dict(dtype=compute_dtype)


def _apply_preset_sampler_options(preset: str, opts: dict) -> None:
    """An EDM v1 preset's steps and churn, where the command line does not set them."""
    ctx = click.get_current_context()
    for key, value in preset_sampler_options(preset).items():
        if ctx.get_parameter_source(key) in (None, click.core.ParameterSource.DEFAULT):
            opts[key] = value


def _run(opts: dict, grid: str, skip_existing: bool) -> None:
    """Generate every batch with a progress bar (rank 0); keep the first batch for --grid."""
    if skip_existing:
        requested = len(opts['seeds'])
        opts['seeds'] = missing_seeds(opts['seeds'], opts['outdir'], opts['subdirs'])
        dist.print0(f'--skip-existing: {count_of(requested - len(opts["seeds"]), "image")} already in {opts["outdir"]}, '
                    f'{len(opts["seeds"])} to generate')
    image_iter = generate_images(**opts)
    first_images = None
    # Rank 0 counts the images of all ranks: the ranks move through their batches in step.
    with tqdm.tqdm(total=image_iter.total_images, unit='img', disable=(dist.get_rank() != 0)) as progress:
        for r in image_iter:
            if first_images is None and r.images is not None:
                first_images = r.images
            progress.update(image_iter.batch_totals[r.batch_idx])
    if grid is not None and dist.get_rank() == 0:
        if first_images is None:
            print(f'Warning: no image generated; --grid {grid} not written', file=sys.stderr)
            return
        save_image_grid(first_images, grid)
        print(f'Saved a grid of the first {count_of(first_images.shape[0], "image")} to {grid}')


@click.command(context_settings=dict(show_default=True))
# Main options.
@click.option('--preset', help=f'Configuration preset, e.g. edm2-img512-s-guid-dino, or for EDM v1 edm-cifar10-32x32-cond-vp ({len(config_presets) + len(edm1_presets)} presets; an unknown name lists them)', metavar='STR', type=str, default=None)
@click.option('--net', '--network', 'net', help="Network pickle filename or URL (--network: the name in EDM v1's generate.py)", metavar='PATH|URL', type=str, default=None)
@click.option('--gnet', help='Reference network for guidance', metavar='PATH|URL', type=str, default=None)
@click.option('--outdir', help='Where to save the output images', metavar='DIR', type=str, required=True)
@click.option('--subdirs', help='Create subdirectory for every 1000 seeds', is_flag=True)
@click.option('--seeds', help='List of random seeds (e.g. 1,2,5-10)', metavar='LIST', type=str, default='16-19', callback=_parse_seeds)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=32)
@click.option('--net-batch', 'net_batch_size', help='Evaluate the networks on groups of exactly INT images (last one padded) so that images are bit-identical for any --batch and process count  [default: whole batch]', metavar='INT', type=click.IntRange(min=1), default=None)
# Sampler options.
@solver_options
@click.option('--sigma_min', help='Lowest noise level  [default: 0.002; EDM v1 ablation sampler: per --disc; EDM v1 networks: at least theirs]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--sigma_max', help='Highest noise level  [default: 80; EDM v1 ablation sampler: per --disc; EDM v1 networks: at most theirs]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--rho', help='Time step exponent of --disc=edm', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7)
@click.option('--guidance', help='Guidance strength  [default: 1; no guidance]', metavar='FLOAT', type=float, default=None)
@click.option('--S_churn', 'S_churn', help='Stochasticity strength (heun and euler only)', metavar='FLOAT', type=click.FloatRange(min=0), default=0)
@click.option('--S_min', 'S_min', help='Stoch. min noise level', metavar='FLOAT', type=click.FloatRange(min=0), default=0)
@click.option('--S_max', 'S_max', help='Stoch. max noise level', metavar='FLOAT', type=click.FloatRange(min=0), default='inf')
@click.option('--S_noise', 'S_noise', help='Stoch. noise inflation', metavar='FLOAT', type=float, default=1)
# Extensions.
@click.option('--guidance-interval', 'guidance_interval', help='Guide only for sigma in [LO,HI] (Kynkaanniemi et al. 2024)  [default: all sigmas]', metavar='LO,HI', type=str, default=None, callback=_parse_interval)
@click.option('--unlabeled-guide', 'unlabeled_guide', help="Call the guiding network without class labels (the fork's behaviour)", is_flag=True)
@click.option('--grid', help='Also save the first batch as one image grid PNG', metavar='PATH', type=str, default=None)
@click.option('--skip-existing', help='Resume: skip seeds whose PNG already exists in --outdir', is_flag=True)
@click.option('--device', help='Compute device  [default: cuda if available, else cpu]', metavar='STR', type=DEVICE, default=None)
@click.option('--plain', help='Use the official op-for-op network computation (no fast paths)', is_flag=True)
@click.option('--dtype', 'compute_dtype', help='Compute dtype of the image path  [default: official rule: fp16 on CUDA if the net uses it, else fp32]', type=click.Choice(['fp32', 'bf16', 'fp16']), default=None)
def cmdline(preset, net, gnet, guidance, grid, skip_existing, unlabeled_guide, device, plain, compute_dtype, **opts):
    """Generate random images using the given model.

    Examples:

    \b
    # Generate a couple of images and save them as out/*.png
    python generate_images.py --preset=edm2-img512-s-guid-dino --outdir=out

    \b
    # Generate 50000 images using 8 GPUs and save them as out/*/*.png
    torchrun --standalone --nproc_per_node=8 -- generate_images.py \\
        --preset=edm2-img64-s-fid --outdir=out --subdirs --seeds=0-49999

    \b
    # Fewer network evaluations: DPM-Solver++(3M), 16 steps (16 evaluations per image instead of 63)
    python generate_images.py --preset=edm2-img64-s-fid --outdir=out --solver=dpm++3m --steps=16

    \b
    # EDM v1: the published conditional CIFAR-10 model (18 steps), then an ablation of its sampler
    python generate_images.py --preset=edm-cifar10-32x32-cond-vp --outdir=out --seeds=0-63
    python generate_images.py --net=edm-cifar10-32x32-cond-vp.pkl --outdir=out \\
        --solver=euler --disc=vp --schedule=vp --scaling=vp --steps=64

    The random numbers of an image depend only on its seed; add --net-batch=8 to make
    the images bit-identical for any --batch and number of processes (math kernels
    are chosen by batch size). PNGs are written atomically; --skip-existing resumes.
    """
    try:
        opts.update(resolve_options(preset, net, gnet, guidance))
        _apply_preset_sampler_options(preset, opts)
        opts.update(guide_labels=not unlabeled_guide, fast_path=_fast_path(plain, compute_dtype))
        misc.check_output_path(opts['outdir'], '--outdir', is_dir=True)
        if grid is not None:
            misc.check_output_path(grid, '--grid')
        dist.init(device=device or str(misc.default_device()))
        warning = ignored_gnet_warning(gnet, opts['guidance'])
        if warning is not None:
            dist.print0(f'Warning: {warning}', file=sys.stderr, flush=True)
        opts.update(device=dist.get_device())  # cuda:LOCAL_RANK under torchrun with NCCL
        _run(opts, grid, skip_existing)
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        raise click.ClickException(str(e)) from None
    dist.shutdown()


if __name__ == '__main__':
    cmdline()
