"""Dataset processing tool for dataset image data conversion and VAE encode/decode preprocessing.

Thin click CLI over `training.data_tools.dataset_tool`."""

from __future__ import annotations

import multiprocessing
import signal
import sys

import click
import PIL.Image

from torch_utils import distributed
from training.data_tools import dataset_tool as lib
from training.cli.options import DEVICE

PIL.Image.init()

#----------------------------------------------------------------------------


def _single_process_only() -> None:
    subcommand = click.get_current_context().info_name
    try:
        distributed.check_single_process(f'dataset_tool.py {subcommand}')
    except ValueError as err:
        raise click.ClickException(f'{err}; only process-and-encode runs under torchrun') from None


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so half-written outputs (temp zip/folder) are removed."""
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))


def _run(func, strict: bool, **kwargs) -> None:
    """Run a library command: one-line errors, a summary of skipped inputs, exit 1 with --strict if any."""
    _exit_cleanly_on_sigterm()
    try:
        skips = func(**kwargs)
    except (lib.DatasetToolError, OSError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(skips.summary(), err=bool(len(skips)))
    total_skipped = lib.sum_over_ranks(len(skips))
    if strict and total_skipped:
        click.echo(f'--strict: {total_skipped} inputs were skipped; failing.', err=True)
        sys.exit(1)


def _check_resolution(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """--resolution is parsed up front, so a bad value is a usage error before any work."""
    try:
        lib.parse_size(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    return value


common_vae_options = [
    click.option('--model-url', help='VAE model to use (Hugging Face name or local folder)', metavar='URL',
                 type=str, default='stabilityai/sd-vae-ft-mse', show_default=True),
    click.option('--batch', help='Images per VAE batch', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True),
    click.option('--device', help='Torch device (default: cuda if available, else cpu)', metavar='STR', type=DEVICE, default=None),
]


def _add_options(options):
    def decorator(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorator

#----------------------------------------------------------------------------


@click.group()
def cmdline():
    """Dataset processing tool for dataset image data conversion and VAE encode/decode preprocessing.

    \b
    Examples:
      python dataset_tool.py convert --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
          --dest=datasets/img64.zip --resolution=64x64 --transform=center-crop-dhariwal
      python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
      python dataset_tool.py decode --source=datasets/img512-sd.zip --dest=out/decoded.zip

    Every subcommand prints what it skipped and why; --strict makes any skip an error (exit code 1).
    """


@cmdline.result_callback()
def _finish(*_args, **_kwargs) -> None:
    distributed.shutdown()  # process-and-encode under torchrun: every rank leaves the process group together


@cmdline.command()
@click.option('--source', help='Input directory or archive name', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output directory or archive name (.zip)', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Maximum number of images to output', metavar='INT', type=click.IntRange(min=0))
@click.option('--transform', help='Input crop/resize mode', metavar='MODE',
              type=click.Choice(['center-crop', 'center-crop-wide', 'center-crop-dhariwal']))
@click.option('--resolution', help='Output resolution (e.g., 512x512)', metavar='WxH', type=str, callback=_check_resolution)
@click.option('--workers', help='Decoding processes (0 = in this process)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--strict', help='Exit with an error if any input was skipped', is_flag=True)
def convert(source, dest, max_images, transform, resolution, workers, strict):
    """Convert an image dataset into archive format for training.

    \b
    Transforms: none (resize to --resolution if given), center-crop, center-crop-wide,
    center-crop-dhariwal (the ADM/ImageNet recipe). Output images are square power-of-two PNGs
    named NNNNN/imgNNNNNNNN.png, with labels in dataset.json (from the source's dataset.json,
    or the top-level folder index when the images live in several folders).
    """
    _single_process_only()
    _run(lib.convert, strict, source=source, dest=dest, max_images=max_images, transform=transform,
         resolution=resolution, num_workers=workers)


@cmdline.command()
@_add_options(common_vae_options)
@click.option('--source', help='Input directory or archive name (pixel dataset)', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output directory or archive name (.zip)', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Maximum number of images to output', metavar='INT', type=click.IntRange(min=0))
@click.option('--strict', help='Exit with an error if any input was skipped', is_flag=True)
def encode(model_url, batch, device, source, dest, max_images, strict):
    """Encode pixel data to VAE latents (NNNNN/img-mean-std-NNNNNNNN.npy: mean and std, 8 channels)."""
    _single_process_only()
    _run(lib.encode, strict, model_url=model_url, batch=batch, device=device, source=source, dest=dest,
         max_images=max_images)


@cmdline.command()
@_add_options(common_vae_options)
@click.option('--source', help='Input directory or archive name (latents written by encode)', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output directory or archive name (.zip)', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Maximum number of images to output', metavar='INT', type=click.IntRange(min=0))
@click.option('--seed', help='Seed of the posterior samples that are decoded', metavar='INT', type=int, default=0, show_default=True)
@click.option('--strict', help='Exit with an error if any input was skipped', is_flag=True)
def decode(model_url, batch, device, source, dest, max_images, seed, strict):
    """Decode VAE latents (as written by encode) to pixels: a posterior sample of each latent is decoded."""
    _single_process_only()
    _run(lib.decode, strict, model_url=model_url, batch=batch, device=device, source=source, dest=dest,
         max_images=max_images, seed=seed)


@cmdline.command(name='process-and-encode')
@click.option('--source', help='Directory with one sub-folder of images per category', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output directory (dest/<category>/<stem>.npy + dataset.json)', metavar='PATH', type=str, required=True)
@click.option('--model-url', help='VAE model to use', metavar='URL', type=str, default='stabilityai/sd-vae-ft-mse', show_default=True)
@click.option('--resolution', help='Output resolution', metavar='WxH', type=str, default='512x512', show_default=True,
              callback=_check_resolution)
@click.option('--transform', help='Crop mode (default: plain LANCZOS resize to the resolution)', metavar='MODE',
              type=click.Choice(['center-crop', 'center-crop-wide', 'center-crop-dhariwal']))
@click.option('--batch-size', help='DataLoader batch size', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--num-workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0), default=4, show_default=True)
@click.option('--gpu-batch-size', help='VAE micro-batch size', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--device', help="'cpu' to force CPU (default: cuda:<local rank> if available)", metavar='STR', type=DEVICE, default=None)
@click.option('--strict', help='Exit with an error if any input was skipped (on any rank)', is_flag=True)
def process_and_encode(source, dest, model_url, resolution, transform, batch_size, num_workers, gpu_batch_size, device, strict):
    """Resize/crop and VAE-encode a category-folder dataset, sharded over ranks (torchrun) and resumable.

    \b
    Example (4 GPUs):
      torchrun --standalone --nproc_per_node=4 dataset_tool.py process-and-encode \\
          --source=data/train --dest=datasets/train-sd --resolution=512x512 --transform=center-crop-dhariwal
    """
    multiprocessing.set_start_method('spawn', force=True)
    distributed.init(device=device)
    _run(lib.process_and_encode, strict, source=source, dest=dest, model_url=model_url, resolution=resolution,
         transform=transform, batch_size=batch_size, num_workers=num_workers, gpu_batch_size=gpu_batch_size)

#----------------------------------------------------------------------------


if __name__ == '__main__':
    cmdline()

#----------------------------------------------------------------------------
