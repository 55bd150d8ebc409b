"""Benchmark of EDM v1 sampling (training/sampling/edm1_sampler.py): plain path vs network fast paths.

Samples one batch with `edm1_sampler` (per-seed latents and labels, float64 Heun steps, float64 ->
uint8) for each variant in turn, alternately (A B C A B C ...) so that machine noise hits every
variant alike. Prints images/s per variant (median over rounds), the speed-up over the plain path
(median of per-round ratios), and how far the results move against the plain path (max abs
difference of the float64 samples in [-1, 1] units, max abs uint8 difference, share of changed pixels).

Variants (`set_fast()` switches of training/networks.py):
  plain   the original computation op for op (einsum + float32 softmax attention)
  fast    fused attention (scaled_dot_product_attention)
  cl      fast + channels-last convolutions
  bf16    fast with the U-Net in bfloat16
  fp16    fast with the U-Net in float16 (CUDA)

Workload: an EDMPrecond + DDPM++ network (the edm-cifar10-32x32-cond-vp layout: 32x32x3, 10 classes,
attention at 16x16) at reduced width and depth (--channels=32 --blocks=1 by default, 1.6M parameters;
--channels=128 --blocks=4 is the published network), random weights, batch 4, 4 steps (7 network
calls). On CPU, bf16 is opt-in (--variants=plain,bf16): without native bf16 instructions it runs
many times slower than float32.

Examples:
    python bench/edm1_sample.py                         # CPU, about a minute on an idle 2-core machine
    python bench/edm1_sample.py --device=cuda --channels=128 --blocks=4 --batch=256 --steps=18
"""

import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.loop import edm1_presets  # noqa: E402
from training.sampling.edm1_sampler import edm1_sampler, to_uint8  # noqa: E402
from training.sampling.sampler import StackedRandomGenerator  # noqa: E402

FAST_PATHS = {
    'plain': dict(enabled=False),
    'fast': dict(enabled=True),
    'cl': dict(enabled=True, channels_last=True),
    'bf16': dict(enabled=True, dtype='bf16'),
    'fp16': dict(enabled=True, dtype='fp16'),
}


def make_net(device: str, channels: int, blocks: int) -> torch.nn.Module:
    """The network with trained-looking weights: every weight ~ N(0, 1/fan_in), so all layers contribute
    (at initialisation the output layers are zero and attention starts near uniform)."""
    kwargs = edm1_presets.edm1_model_network_kwargs('edm-cifar10-32x32-cond-vp', cbase=channels)
    kwargs['num_blocks'] = blocks
    torch.manual_seed(0)
    net = edm1_presets.construct_edm1_network(kwargs)
    with torch.no_grad():
        for param in net.parameters():
            if param.ndim > 1:
                param.normal_(0, param[0].numel() ** -0.5)
    return net.eval().requires_grad_(False).to(device)


def sample_once(net: torch.nn.Module, batch: int, steps: int, device: str) -> tuple:
    """One batch of seeds 0..batch-1; returns (seconds, float64 samples, uint8 images)."""
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    start = time.perf_counter()
    rnd = StackedRandomGenerator(device, range(batch))
    latents = rnd.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[batch], device=device)]
    with torch.no_grad():
        x = edm1_sampler(net, latents, labels, randn_like=rnd.randn_like, num_steps=steps)
    images = to_uint8(x).cpu()
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    return time.perf_counter() - start, x.cpu(), images


def change(result: tuple, reference: tuple) -> str:
    x_diff = float((result[1] - reference[1]).abs().max())
    diff = (result[2].int() - reference[2].int()).abs()
    return (f'max |x diff| {x_diff:.2e}, max |pixel diff| {int(diff.max()):3d}, '
            f'{float((diff > 0).float().mean()) * 100:5.2f}% of values changed')


@click.command()
@click.option('--device', help='cpu or cuda', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--variants', help='Comma-separated variants (first = baseline)  [default: plain,fast,cl (CPU), '
              'plain,fast,cl,fp16,bf16 (CUDA)]', default=None)
@click.option('--channels', type=int, default=32, show_default=True, help='model_channels (128 = published)')
@click.option('--blocks', type=int, default=1, show_default=True, help='num_blocks per resolution (4 = published)')
@click.option('--batch', type=int, default=4, show_default=True, help='Images per batch')
@click.option('--steps', type=int, default=4, show_default=True, help='Sampler steps')
@click.option('--rounds', type=int, default=2, show_default=True, help='Alternating measurement rounds')
def main(device, variants, channels, blocks, batch, steps, rounds):
    """Images/s of edm1_sampler for the plain path and the fast paths."""
    if variants is None:
        variants = 'plain,fast,cl,fp16,bf16' if device.startswith('cuda') else 'plain,fast,cl'
    variants = variants.split(',')
    nets = {variant: make_net(device, channels, blocks) for variant in variants}
    for variant, net in nets.items():
        net.set_fast(**FAST_PATHS[variant])
    params = sum(p.numel() for p in nets[variants[0]].parameters())
    print(f'device {device}, threads {torch.get_num_threads()}, DDPM++ C={channels} blocks={blocks} 32x32x3 '
          f'({params / 1e6:.1f}M parameters), batch {batch}, {steps} steps ({2 * steps - 1} calls), {rounds} rounds')
    results = {variant: sample_once(nets[variant], batch, steps, device) for variant in variants}   # warm-up
    times = {variant: [] for variant in variants}
    for _ in range(rounds):
        for variant in variants:
            times[variant].append(sample_once(nets[variant], batch, steps, device)[0])
    base = variants[0]
    for variant in variants:
        speedup = statistics.median(b / t for b, t in zip(times[base], times[variant]))
        print(f'{variant:6s} {batch / statistics.median(times[variant]):8.3f} img/s   x{speedup:5.2f} vs {base}   '
              f'{change(results[variant], results[base])}')


if __name__ == '__main__':
    main()
