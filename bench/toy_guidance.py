"""Toy example: how the guidance claims hold across training seeds.

Trains (or reuses, from --outdir) class-A main models (64 wide, 4096 iterations),
autoguidance guides (class A, 32 wide, 512 iterations) and classifier-free guides
(classes A+B, 32 wide, 512 iterations) with several seeds, all at the defaults of
`toy_example.py train`, then prints `sample_stats` of 16384 view-A samples for each
main model without guidance, with every autoguidance guide and with every CFG guide.
About 2 minutes per main model and 20 s per guide to train on 2 cores, then about
30 s per table row.

Usage: python bench/toy_guidance.py --outdir=toy-sweep [--main-seeds=0,1,2] [--guide-seeds=0-5] [--cfg-seeds=0-2]
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dnnlib.util import parse_int_list  # noqa: E402
from training import toy  # noqa: E402


def trained(outdir: str, classes: str, dim: int, iters: int, seed: int) -> toy.ToyModel:
    """The EMA model of one training run, cached as <outdir>/cls<C>-dim<D>-iter<N>-seed<S>.pkl."""
    path = os.path.join(outdir, f'cls{classes}-dim{dim}-iter{iters:04d}-seed{seed}.pkl')
    if not os.path.isfile(path):
        net = toy.do_train(classes=classes, hidden_dim=dim, total_iter=iters, seed=seed, viz_iter=None, device='cpu')
        toy.save_snapshot(net, path)
    return toy.load_toy_net(path, 'cpu')


@click.command()
@click.option('--outdir', help='Where to keep the trained models', metavar='DIR', required=True)
@click.option('--main-seeds', help='Seeds of the main models', metavar='LIST', default='0,1,2', show_default=True)
@click.option('--guide-seeds', help='Seeds of the autoguidance guides', metavar='LIST', default='0-5', show_default=True)
@click.option('--cfg-seeds', help='Seeds of the class-AB guides', metavar='LIST', default='0-2', show_default=True)
@click.option('--guidance', help='Guidance weight', metavar='FLOAT', type=float, default=3, show_default=True)
def main(outdir: str, main_seeds: str, guide_seeds: str, cfg_seeds: str, guidance: float) -> None:
    torch.set_grad_enabled(False)
    guides = {s: trained(outdir, 'A', 32, 512, s) for s in parse_int_list(guide_seeds)}
    cfg_guides = {s: trained(outdir, 'AB', 32, 512, s) for s in parse_int_list(cfg_seeds)}
    for main_seed in parse_int_list(main_seeds):
        net = trained(outdir, 'A', 64, 4096, main_seed)
        rows = [(f'main {main_seed}, no guidance', toy.guided_stats(net, device='cpu'))]
        for label, models in [('auto', guides), ('CFG', cfg_guides)]:
            for seed, gnet in models.items():
                rows.append((f'main {main_seed}, {label} guide {seed}, w={guidance:g}',
                             toy.guided_stats(net, gnet, guidance, device='cpu')))
        print(toy.format_stats_table(rows), flush=True)
        print()


if __name__ == '__main__':
    main()
