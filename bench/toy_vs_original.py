"""Toy example: this toolkit's guidance figures beside those of the original toy code.

Trains with seed 0 on the CPU (or reuses from --outdir, official layout cls<C>-layers04-dim<D>/iter<N>.pkl)
the main model (class A, 64 wide, 1024 iterations), the autoguidance guide (class A, 32 wide, 512
iterations) and the CFG guide (classes A+B, 32 wide, 256 iterations). Each sampler maps the figure's
16384 initial points (seed 1, sigma 5); the exact row draws the same indices and noise from the class-A
mixture at sigma 0. Printed per row: mean log p_A floored at -10, the fraction inside the class-A
outline, and the branches and tips covered (at least 10% of their ground-truth share of the samples
inside the outline), each beside the original code's figure. About 15 minutes to train on 2 busy
cores, then 2 minutes to sample and measure.

Usage: python bench/toy_vs_original.py --outdir=toy-original
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import toy  # noqa: E402

# The original toy code, trained as above: (mean log p_A floored, inside outline, branches, tips covered).
ORIGINAL = {
    'exact samples of the distribution': (1.341, 0.986, 127, 64),
    'no guidance': (0.194, 0.839, 108, 45),
    'autoguidance (w=3)': (0.343, 0.866, 61, 21),
    'CFG (w=4)': (-0.754, 0.803, 45, 13),
}
NUM_SAMPLES = 1 << 14
SEED = 1         # the figure's initial points
SIGMA_MAX = 5


def samples(label: str, net, gnet, cfg_gnet) -> torch.Tensor:
    if label.startswith('exact'):   # the initial points' draws, at sigma 0
        return toy.gt('A').sample(NUM_SAMPLES, generator=torch.Generator().manual_seed(SEED))
    guide, weight = {'no guidance': (None, 1), 'autoguidance (w=3)': (gnet, 3), 'CFG (w=4)': (cfg_gnet, 4)}[label]
    return toy.sample_from_model(net, guide, weight, num_samples=NUM_SAMPLES, seed=SEED, sigma_max=SIGMA_MAX,
                                 device='cpu')


def row(label: str, stats: dict) -> str:
    ours = (stats['mean_logp_floored'], stats['in_support'], stats['branches_covered'], stats['tips_covered'])
    theirs = ORIGINAL[label]
    return (f'| {label} | {ours[0]:.3f} | {theirs[0]:.3f} | {ours[1]:.1%} | {theirs[1]:.1%} | '
            f'{ours[2]} | {theirs[2]} | {ours[3]} | {theirs[3]} |')


@click.command()
@click.option('--outdir', help='Where to keep the trained models', metavar='DIR', required=True)
def main(outdir: str) -> None:
    net = toy.train_or_load(outdir, 'A', 64, 1024, device='cpu', seed=0)
    gnet = toy.train_or_load(outdir, 'A', 32, 512, device='cpu', seed=0)
    cfg_gnet = toy.train_or_load(outdir, 'AB', 32, 256, device='cpu', seed=0)
    torch.set_grad_enabled(False)
    print('| samples | mean log p_A (floored at -10) | original | inside outline | original '
          '| branches covered (of 127) | original | tips covered (of 64) | original |')
    print('|---|---|---|---|---|---|---|---|---|')
    for label in ORIGINAL:
        print(row(label, toy.sample_stats(samples(label, net, gnet, cfg_gnet))), flush=True)


if __name__ == '__main__':
    main()
