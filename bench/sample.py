"""Benchmark of image generation (training/sampling/): plain path vs network fast paths.

Runs the whole `generate_images()` pipeline (per-seed noise and labels, EDM Heun sampler,
decode to uint8) for one batch, for each variant in turn, alternately (A B C A B C ...) so
that machine noise hits every variant alike. Prints images/s per variant (median over
rounds), the speed-up over the plain path (median of per-round ratios), and how far the
images move (max abs uint8 difference and share of changed pixels vs plain, same seeds).

Variants (network `set_fast()` switches, see training/networks_edm2.py):
  plain    official op-for-op computation (set_fast(False))
  fast     default fast paths (fused weights, weight cache, SDPA), official dtype rule
  bf16     fast paths with the image path in bfloat16
  fp16     fast paths with the image path in float16 (CUDA)
  compile  fast paths + torch.compile
  compile_cl  fast paths + torch.compile + channels-last convolutions

Workloads: on CPU by default the XS layout at half width (C=64, 1000 classes, fp16 weights
as in published pickles, 29M parameters) on 16x16x4 latents, batch 4, 32 steps (63 calls, as
in real sampling: the weight cache pays off over the calls): a CPU-sized stand-in, about 30 s
per round on an idle 2-core machine; --steps=4 for a quick look. On CUDA an edm2-img512-xs-shaped
net (C=128, 64x64x4) at batch 64, 32 steps.

Examples:
    python bench/sample.py                                   # CPU
    python bench/sample.py --device=cuda                     # edm2-img512-xs, batch 64, 32 steps
    python bench/sample.py --variants=plain,fast,compile --device=cuda --rounds=3
"""

import os
import statistics
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import FAST_PATHS, image_change, make_xs_net, sample_once  # noqa: E402

CPU_DEFAULTS = dict(resolution=16, channels=64, batch=4, steps=32)
CUDA_DEFAULTS = dict(resolution=64, channels=128, batch=64, steps=32)


@click.command()
@click.option('--device', help='cpu or cuda', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--variants', help='Comma-separated variants (first = baseline)', default=None)
@click.option('--resolution', type=int, default=None, help='Latent resolution  [default: 16 CPU, 64 CUDA]')
@click.option('--channels', type=int, default=None, help='model_channels  [default: 64 CPU, 128 CUDA (= XS)]')
@click.option('--batch', type=int, default=None, help='Images per batch  [default: 4 CPU, 64 CUDA]')
@click.option('--steps', type=int, default=None, help='Sampler steps  [default: 32]')
@click.option('--rounds', type=int, default=2, show_default=True, help='Alternating measurement rounds')
@click.option('--weights', type=click.Choice(['fp16', 'fp32']), default='fp16', show_default=True, help='Stored weight dtype')
def main(device, variants, resolution, channels, batch, steps, rounds, weights):
    """Images/s of generate_images() for the plain path and the fast paths."""
    defaults = CUDA_DEFAULTS if device.startswith('cuda') else CPU_DEFAULTS
    resolution = resolution or defaults['resolution']
    channels = channels or defaults['channels']
    batch = batch or defaults['batch']
    steps = steps or defaults['steps']
    if variants is None:
        variants = 'plain,fast,fp16' if device.startswith('cuda') else 'plain,fast,bf16'
    variants = variants.split(',')
    print(f'device {device}, threads {torch.get_num_threads()}, XS layout C={channels} at {resolution}x{resolution}x4, '
          f'{weights} weights, batch {batch}, {steps} steps ({2 * steps - 1} calls), {rounds} rounds')
    nets = {variant: make_xs_net(device, resolution, channels, weights) for variant in variants}
    run = lambda variant: sample_once(nets[variant], FAST_PATHS[variant], batch, device, num_steps=steps)
    images = {variant: run(variant)[1] for variant in variants}  # warm-up
    times = {variant: [] for variant in variants}
    for _ in range(rounds):
        for variant in variants:
            times[variant].append(run(variant)[0])
    base = variants[0]
    for variant in variants:
        speedup = statistics.median(b / t for b, t in zip(times[base], times[variant]))
        print(f'{variant:8s} {batch / statistics.median(times[variant]):8.3f} img/s   x{speedup:5.2f} vs {base}   '
              f'{image_change(images[variant], images[base])}')


if __name__ == '__main__':
    main()
