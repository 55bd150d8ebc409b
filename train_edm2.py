"""Train or fine-tune EDM2 diffusion models: a thin CLI over `training.loop.train_edm2` and `training.training_loop`."""

import pickle
import warnings

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from training.loop import edm1_config, presets
from training.cli.options import DEVICE
from training.loop.train_edm2 import (ConfigError, check_config, check_level_list, launch_training, parse_nimg,
                                      parse_rampup, print_training_config, setup_training_config)
from training.training_loop import TrainingDivergedError

warnings.filterwarnings('ignore', 'You are using `torch.load` with `weights_only=False`')

#----------------------------------------------------------------------------
# Option parsers.

def _nimg(ctx: click.Context, param: click.Parameter, value):
    if value is None:
        return None
    try:
        nimg = parse_nimg(value)
    except ValueError:
        raise click.BadParameter(f'"{value}" is not an image count (e.g. 4096, 128Ki, 8Mi, 2Gi)', ctx, param) from None
    if nimg < 0:
        raise click.BadParameter('must not be negative', ctx, param)
    return nimg


def _mimg(ctx: click.Context, param: click.Parameter, value):
    try:
        return parse_rampup(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx, param) from None


def _int_list(ctx: click.Context, param: click.Parameter, value):
    if value is None:
        return None
    try:
        values = [int(x) for x in value.split(',') if x.strip() != '']
    except ValueError:
        raise click.BadParameter(f'"{value}" is not a comma-separated list of integers', ctx, param) from None
    try:
        check_level_list(param.name, values)  # param.name: channel_mult or attn_res
    except ValueError as err:
        raise click.BadParameter(str(err), ctx, param) from None
    return values


#----------------------------------------------------------------------------

EPILOG = """
Examples:

\b
# Train XS-sized model for ImageNet-512 using 8 GPUs
torchrun --standalone --nproc_per_node=8 train_edm2.py \\
    --outdir=training-runs/00000-edm2-img512-xs \\
    --data=datasets/img512-sd.zip \\
    --preset=edm2-img512-xs \\
    --batch-gpu=32

\b
# Small pixel-space model on a 32x32 dataset, on the CPU (~minutes)
python train_edm2.py --outdir=runs/tiny --data=datasets/tiny-32x32.zip --cond=0 \\
    --preset=edm2-cifar10-32x32-uncond --channels=16 --channel-mult=1,2 \\
    --num-blocks=1 --batch=32 --duration=64Ki --status=4Ki --snapshot=16Ki \\
    --checkpoint=16Ki --workers=0 --rampup=0

\b
# EDM v1: the published CIFAR-10 DDPM++ model (edm-cifar10-32x32-cond-vp) on 8 GPUs
torchrun --standalone --nproc_per_node=8 train_edm2.py \\
    --outdir=training-runs/edm-cifar10-32x32-cond-vp --data=datasets/cifar10-32x32.zip \\
    --preset=edm-cifar10-32x32-cond-vp

\b
# Fine-tune a published snapshot on a filtered dataset (the fork's workflow)
python train_edm2.py --outdir=runs/ft --data=datasets/my-latents \\
    --preset=base-finetuning --model2finetune=edm2-img512-xs-2147483-0.135.pkl \\
    --freeze-down=True --max-grad-norm=1 --nima-threshold=5

To resume training, run the same command again: the newest training-state-*.pt
in --outdir is loaded (an unreadable newest file is skipped). Ctrl-C (SIGINT),
SIGTERM or SIGUSR1 (cluster preemption) writes a training state at the current
step and exits with status 0; a second Ctrl-C or signal exits at once.

Durations are image counts (4096, 128Ki, 8Mi, 2Gi). --rampup takes them too;
a plain number there means Mimg, as in the fork (--rampup=10 is 10 Mimg). The
start of a run prints its length in steps, and the first status after a step
an estimate of the time to finish; warnings flag a ramp-up longer than the run,
a run of more than 10000 epochs of the dataset, and preset noise settings
(--P_mean, --P_std) made for latents on pixel data or the other way round.

Differences from the fork: --model2finetune is optional (without it a fresh
network is built from the preset, as in the official toolkit); --freeze-down
defaults to False and --max-grad-norm to 0 (off), so pass them explicitly to get
the fork's behaviour; the clipping threshold applies to the gradient norm with
--ls divided out. --rampup defaults to the preset's value, else 0 Mimg when
fine-tuning (fork) and 10 Mimg otherwise (official). Frozen parameters keep
their exact values. Dataset filter options select the FilteredImageDataset
(directories and zip archives). Scores come from metadata.json at the dataset
root (docs/user-files.md). Every filter given must hold: --nima-threshold and
--categories apply first, then --top-percent and --top-per-category rank what
remains and an image must pass both (the fork's code kept images passing
either). Class labels come from dataset.json alone, with or without filters;
--categories are those labels (without dataset.json: the top-level folders).

With --dropout=0, results do not depend on the number of processes or
--batch-gpu (up to float rounding): the noise of each step, and the VAE
posterior sample of latent datasets, are drawn for the whole batch from
(--seed, step). Dropout masks are drawn per process and per
--batch-gpu round, so with dropout > 0 (e.g. the edm2-cifar10-32x32-* presets)
they do. With --model2finetune the network comes from the pickle: --channels,
--channel-mult, --num-blocks, --attn-res, --channels-per-head and --dropout
have no effect (a warning says so), and training_options.json records the
pickle's network. A run whose loss or gradients stay non-finite for --nonfinite-limit
steps stops with an error; stats.jsonl is strict JSON (non-finite -> null) and
counts steps with non-finite gradients (Loss/nonfinite_grads).

EDM v1 presets (edm-*) train the networks of "Elucidating the Design Space of
Diffusion-Based Generative Models" with the same loop: --arch (ddpmpp, ncsnpp,
adm) and --precond (vp, ve, edm) choose the network and its loss, --augment the
probability of the augmentation pipeline (its labels go to the network), --ema
the half-life of the classic EMA (ramped up over the first images as in EDM v1,
no ramp-up when fine-tuning); the learning rate is constant after --rampup.
--channels, --channel-mult, --num-blocks, --attn-res set the U-Net (EDM v1's
--cbase, --cres). Snapshots are network-snapshot-<kimg:06d>.pkl in EDM v1's
layout; --model2finetune takes an EDM v1 snapshot with an EDM v1 preset (EDM
v1's --transfer). The EDM v1 losses draw noise levels, augmentations and noise
per process from (--seed, process, step), so their results depend on the
number of processes and --batch-gpu; resuming is exact all the same.
"""

@click.command(epilog=EPILOG)

# Main options.
@click.option('--outdir',           help='Where to save the results', metavar='DIR',              type=str, required=True)
@click.option('--data',             help='Path to the dataset', metavar='ZIP|DIR',                type=str, required=True)
@click.option('--cond',             help='Train class-conditional model  [default: True; EDM v1 presets: as named]', metavar='BOOL', type=bool, default=None)
@click.option('--preset',           help='Configuration preset: ' + ', '.join(presets.preset_names() + edm1_config.preset_names()), metavar='STR', type=str, default='edm2-img512-s', show_default=True)
@click.option('--model2finetune',   help='Network snapshot pickle to fine-tune (its EMA network and encoder)  [default: train a fresh network]', metavar='PKL', type=str, default=None)

# Hyperparameters.
@click.option('--duration',         help='Training duration', metavar='NIMG',                     type=str, default=None, callback=_nimg)
@click.option('--batch',            help='Total batch size', metavar='NIMG',                      type=str, default=None, callback=_nimg)
@click.option('--channels',         help='Channel multiplier (model_channels)', metavar='INT',    type=click.IntRange(min=1), default=None)
@click.option('--dropout',          help='Dropout probability', metavar='FLOAT',                  type=click.FloatRange(min=0, max=1), default=None)
@click.option('--P_mean', 'P_mean', help='Noise level mean', metavar='FLOAT',                     type=float, default=None)
@click.option('--P_std', 'P_std',   help='Noise level standard deviation', metavar='FLOAT',       type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--lr',               help='Learning rate max. (alpha_ref)', metavar='FLOAT',       type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--decay',            help='Learning rate decay (t_ref)', metavar='BATCHES',        type=click.FloatRange(min=0), default=None)
@click.option('--rampup',           help='Learning rate ramp-up: images like --duration (e.g. 256Ki), or a plain number in Mimg  [default: preset, else 0 when fine-tuning, 10 (Mimg) otherwise]', metavar='NIMG|MIMG', type=str, default=None, callback=_mimg)

# Architecture knobs (fixed by the presets).
@click.option('--channel-mult',     help='Per-resolution channel multipliers, e.g. 1,2,3,4  [default: preset]', metavar='LIST', type=str, default=None, callback=_int_list)
@click.option('--num-blocks',       help='Residual blocks per resolution  [default: preset]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--attn-res',         help='Resolutions with self-attention, e.g. 16,8  [default: preset]', metavar='LIST', type=str, default=None, callback=_int_list)
@click.option('--channels-per-head', help='Channels per attention head  [default: 64]', metavar='INT', type=click.IntRange(min=1), default=None)

# EDM v1 runs (edm-* presets).
@click.option('--arch',             help='EDM v1 architecture  [default: preset]',                 type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']), default=None)
@click.option('--precond',          help='EDM v1 preconditioning and loss  [default: preset]',     type=click.Choice(['vp', 've', 'edm']), default=None)
@click.option('--augment',          help='EDM v1 augmentation probability (0 = off)  [default: preset]', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=None)
@click.option('--ema',              help='EDM v1 EMA half-life: images like --duration, or a plain number in Mimg  [default: preset]', metavar='NIMG|MIMG', type=str, default=None, callback=_mimg)

# Fine-tuning and dataset filtering [fork].
@click.option('--max-grad-norm',    help='Clip the global gradient norm to this (0 = off)', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--freeze-down',      help='Freeze the U-Net downsampling blocks', metavar='BOOL',  type=bool, default=False, show_default=True)
@click.option('--freeze-attn',      help='Freeze the attention weights', metavar='BOOL',          type=bool, default=False, show_default=True)
@click.option('--nima-threshold',   help='Keep images with a NIMA score >= this', metavar='FLOAT', type=float, default=None)
@click.option('--max-size',         help='Cap on the dataset size (seeded random subset)', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--categories',       help='Categories to keep, e.g. 0,1,12-14 (dataset.json labels, else top-level folders)', metavar='LIST',    type=str, default=None)
@click.option('--top-percent',      help='Keep the top X % by NIMA (with --top-per-category: must pass both)', metavar='FLOAT', type=click.FloatRange(min=0, max=100), default=None)
@click.option('--top-per-category', help='Keep the top X % by NIMA in each category (with --top-percent: must pass both)', metavar='FLOAT', type=click.FloatRange(min=0, max=100), default=None)

# Performance-related options.
@click.option('--batch-gpu',        help='Limit batch size per GPU', metavar='NIMG',              type=str, default='0', show_default=True, callback=_nimg)
@click.option('--fp16',             help='Enable mixed-precision training (CUDA)  [default: True; EDM v1 presets: their own]', metavar='BOOL', type=bool, default=None)
@click.option('--dtype',            help='Compute dtype of the network  [default: fp16 on CUDA with --fp16, else fp32]', type=click.Choice(['fp32', 'bf16', 'fp16']), default=None)
@click.option('--plain',            help='Use the official op-for-op network computation (no fast paths)', is_flag=True)
@click.option('--ls',               help='Loss scaling  [default: 1; EDM v1 presets: their own]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--bench',            help='Enable cuDNN benchmarking', metavar='BOOL',             type=bool, default=True, show_default=True)
@click.option('--node-cache',       help='Copy a zip dataset once per node to local disk and read it from there ($EDM2_DATASET_CACHE, else <tempdir>/edm2-dataset-cache-<uid>; copies are not removed automatically)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--workers',          help='Data loader worker processes per GPU', metavar='INT',   type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--device',           help='Compute device  [default: cuda if available, else cpu]', metavar='STR', type=DEVICE, default=None)

# I/O-related options.
@click.option('--status',           help='Interval of status prints', metavar='NIMG',             type=str, default='128Ki', show_default=True, callback=_nimg)
@click.option('--snapshot',         help='Interval of network snapshots', metavar='NIMG',         type=str, default='8Mi', show_default=True, callback=_nimg)
@click.option('--checkpoint',       help='Interval of training checkpoints', metavar='NIMG',      type=str, default='128Mi', show_default=True, callback=_nimg)
@click.option('--seed',             help='Random seed', metavar='INT',                            type=int, default=0, show_default=True)
@click.option('--nonfinite-limit',  help='Stop after this many consecutive steps with non-finite loss/gradients (0 = never)', metavar='INT', type=click.IntRange(min=0), default=100, show_default=True)
@click.option('-n', '--dry-run',    help='Print training options and exit', is_flag=True)

def cmdline(outdir, dry_run, device, **opts):
    """Train or fine-tune diffusion models according to the EDM2 recipe from the paper
    "Analyzing and Improving the Training Dynamics of Diffusion Models", or the EDM v1
    networks of "Elucidating the Design Space of Diffusion-Based Generative Models"."""
    torch.multiprocessing.set_start_method('spawn', force=True)
    try:
        dist.init(device=device or str(misc.default_device()))
    except (ValueError, RuntimeError) as err:  # incomplete torchrun environment, rendezvous failure
        raise click.ClickException(dnnlib.util.first_line(err)) from None
    try:
        misc.check_output_path(outdir, '--outdir', is_dir=True) # cheap, and before the dataset scan
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    try:
        c = setup_training_config(**opts)
        check_config(c, dist.get_world_size())
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    print_training_config(outdir, c)
    if dry_run:
        dist.print0('Dry run; exiting.')
        return
    dist.install_signal_handlers(sigint=True)
    try:
        launch_training(outdir, c, device=dist.get_device())
    except (TrainingDivergedError, dist.CheckpointError, ValueError, OSError, pickle.UnpicklingError) as err:
        raise click.ClickException(str(err)) from None
    dist.shutdown()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cmdline()

#----------------------------------------------------------------------------
