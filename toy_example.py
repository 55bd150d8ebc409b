"""2D toy example of "Guiding a Diffusion Model with a Bad Version of Itself"
(autoguidance): train small models on a fractal two-class distribution and plot
how guidance changes their samples. The logic lives in training/toy.py."""

import os
import pickle

import click
import torch

from torch_utils import distributed as dist
from torch_utils import misc
from training import toy
from training.cli.options import DEVICE

URL_BASE = 'https://nvlabs-fi-cdn.nvidia.com/edm2/toy-example'
DEFAULT_NET = f'{URL_BASE}/clsA-layers04-dim64/iter4096.pkl'
DEFAULT_GNET = f'{URL_BASE}/clsA-layers04-dim32/iter0512.pkl'

def _device(name):
    return torch.device(name) if name else misc.default_device()

def _load(option, src, device):
    """Load a toy pickle; any failure becomes one clear error line naming the option."""
    try:
        return toy.load_toy_net(src, device)
    except (OSError, pickle.UnpicklingError, TypeError, ValueError) as err:  # ValueError: EDM2_TRUST_PICKLE
        raise click.ClickException(f'{option}: {err}') from err

def _print_table(rows):
    print(toy.format_stats_table(rows))

@click.group()
def cmdline():
    """2D toy example of autoguidance (Karras et al. 2024, Figures 1-2).

    \b
    Quick start (trains three small models on CPU in a few minutes, saves the figure, prints the table):
    python toy_example.py demo --outdir=toy-demo

    \b
    Plot the official models (downloaded) or your own pickles:
    python toy_example.py plot --save=toy.png
    python toy_example.py plot --net=runs/clsA-dim64/iter4096.pkl --gnet=runs/clsA-dim32/iter0512.pkl --save=toy.png

    \b
    Train the main model and the guide as published:
    python toy_example.py train --outdir=runs/clsA-dim64 --viz=False
    python toy_example.py train --outdir=runs/clsA-dim32 --dim=32 --viz=False
    """
    try:
        dist.check_single_process('toy_example.py')
    except ValueError as err:
        raise click.ClickException(str(err)) from None

@cmdline.command()
@click.option('--outdir', help='Where to save the EMA snapshots iterNNNN.pkl (none if omitted)', metavar='DIR', type=str, default=None)
@click.option('--cls', help='Target classes', metavar='A|B|AB', type=click.Choice(['A', 'B', 'AB']), default='A', show_default=True)
@click.option('--layers', help='Number of hidden layers', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--dim', help='Hidden dimension', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--viz', help='Show an interactive training window', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--iters', help='Training iterations', metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--batch', help='Batch size', metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--seed', help='Random seed', metavar='INT', type=int, default=0, show_default=True)
@click.option('--device', help='Torch device [default: cuda if available, else cpu]', metavar='STR', type=DEVICE, default=None)
def train(outdir, cls, layers, dim, viz, iters, batch, seed, device):
    """Train a 2D toy model on the ground-truth mixture (exact score matching)."""
    pkl_pattern = None
    if outdir is not None:
        pkl_pattern = os.path.join(outdir, 'iter%04d.pkl')
        print(f'Will save snapshots to {outdir}')
    print('Training...')
    toy.do_train(classes=cls, num_layers=layers, hidden_dim=dim, batch_size=batch, total_iter=iters, seed=seed,
                 pkl_pattern=pkl_pattern, viz_iter=32 if viz else None, device=_device(device))
    print('Done.')

@cmdline.command()
@click.option('--net', help='Main model', metavar='PKL|URL', type=str, default=DEFAULT_NET, show_default=True)
@click.option('--gnet', help='Guiding model', metavar='PKL|URL', type=str, default=DEFAULT_GNET, show_default=True)
@click.option('--guidance', help='Guidance weight', metavar='FLOAT', type=float, default=3, show_default=True)
@click.option('--save', help='Save figure here instead of displaying it', metavar='PNG|PDF', type=str, default=None)
@click.option('--cfg-gnet', help='Also measure classifier-free guidance with this (class AB) guide', metavar='PKL|URL', type=str, default=None)
@click.option('--grid', help='Grid resolution of the density plots', metavar='INT', type=click.IntRange(min=8), default=400, show_default=True)
@click.option('--samples-scale', help='Scale the number of samples per panel', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option('--device', help='Torch device [default: cuda if available, else cpu]', metavar='STR', type=DEVICE, default=None)
def plot(net, gnet, guidance, save, cfg_gnet, grid, samples_scale, device):
    """Draw the 2x4 figure and print sample statistics per panel.

    The table gives, for the panels that sample the whole class-A tree: the mean
    ground-truth log-density of the samples, the fraction inside the class-A
    outline, and how many of the 127 branches receive samples inside it."""
    import matplotlib
    if save is not None:
        try:
            toy.figure_format(save)   # fail now, not after minutes of drawing
        except ValueError as err:
            raise click.ClickException(f'--save: {err}') from err
        matplotlib.use('Agg')
    device = _device(device)
    print('Loading models...')
    net = _load('--net', net, device)
    gnet = _load('--gnet', gnet, device)
    cfg_gnet = _load('--cfg-gnet', cfg_gnet, device) if cfg_gnet is not None else None
    print('Drawing plots...')
    fig, rows = toy.plot_figure(net, gnet, guidance, device, grid, samples_scale)
    rows = [(toy.label_for_panel(title, guidance), stats) for title, stats in rows]
    if cfg_gnet is not None:
        num_samples = max(int(toy.VIEW_A['num_samples'] * samples_scale), 1)
        rows.append((f'CFG guide (w={guidance:g})', toy.guided_stats(net, cfg_gnet, guidance, num_samples, device)))
    _print_table(rows)
    if save is not None:
        print(f'Saving to {save}')
        toy.save_figure(fig, save)
    else:
        print('Displaying...')
        import matplotlib.pyplot as plt
        plt.show()
    print('Done.')

@cmdline.command()
@click.option('--outdir', help='Where to put the models and toy-example.png', metavar='DIR', type=str, default='toy-demo', show_default=True)
@click.option('--main-iter', help='Training iterations of the main model (official snapshot: iter4096)', metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--guide-iter', help='Training iterations of the guides', metavar='INT', type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--guidance', help='Guidance weight', metavar='FLOAT', type=float, default=3, show_default=True)
@click.option('--grid', help='Grid resolution of the density plots', metavar='INT', type=click.IntRange(min=8), default=400, show_default=True)
@click.option('--samples-scale', help='Scale the number of samples per panel', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option('--device', help='Torch device [default: cuda if available, else cpu]', metavar='STR', type=DEVICE, default=None)
def demo(outdir, main_iter, guide_iter, guidance, grid, samples_scale, device):
    """Quick demo: train main model, autoguidance guide and CFG guide, save the
    figure and print how each sampler matches the ground truth. Snapshots in
    OUTDIR are reused, so an interrupted run resumes."""
    import matplotlib
    matplotlib.use('Agg')
    table = toy.run_demo(outdir, main_iter=main_iter, guide_iter=guide_iter, guidance=guidance, device=_device(device),
                         grid_resolution=grid, samples_scale=samples_scale)
    print(table)
    print(f'Saved figure to {os.path.join(outdir, "toy-example.png")}')
    print('Done.')

if __name__ == '__main__':
    cmdline()
