"""Training throughput: plain (official op-for-op) path vs this project's fast paths.

One training step = EDM2 loss forward + backward, force_finite, Adam, power-function EMA.
* plain: `set_fast(False)` network, Adam with per-parameter loops (foreach=False),
  per-parameter nan_to_num and EMA lerp, dtype by the official rule (fp16 on CUDA).
* fast:  default fast paths (+ `--dtype`, `--compile`, `--channels-last`), foreach/fused
  Adam, one foreach gradient check, foreach EMA.
The two variants alternate A B A B in one process (shared machines are noisy) and the
ratio of medians is quoted. On CUDA the model FLOP utilisation of the fast path is
computed from `torch.utils.flop_counter` (forward + backward of one step) and --peak-tflops.

    python bench/train.py                       # CPU: small 32x32 pixel net, batch 16 (< 2 min)
    python bench/train.py --device=cuda         # GPU: edm2-img512-xs-shaped net, batch 32, bf16
"""

import copy
import os
import statistics
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import GPU_NET, Variant, step_flops, time_steps  # noqa: E402
from training.networks_edm2 import Precond  # noqa: E402

CPU_NET = dict(img_resolution=32, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2, 2],
               num_blocks=2, attn_resolutions=[16], use_fp16=False)

#----------------------------------------------------------------------------

@click.command()
@click.option('--device', help='cpu or cuda', default='cpu', show_default=True)
@click.option('--batch', help='Batch size  [default: 16 on CPU, 32 on CUDA]', type=int, default=None)
@click.option('--steps', help='Steps per timed block', type=int, default=None)
@click.option('--reps', help='A B pairs', type=int, default=3, show_default=True)
@click.option('--dtype', help='Fast-path compute dtype  [default: bf16 on CUDA, fp32 on CPU]', type=click.Choice(['fp32', 'bf16', 'fp16']), default=None)
@click.option('--compile', 'use_compile', help='torch.compile the U-Net in the fast path', is_flag=True)
@click.option('--channels-last', help='channels_last in the fast path', is_flag=True)
@click.option('--threads', help='CPU threads (0 = torch default)', type=int, default=0, show_default=True)
@click.option('--peak-tflops', help='Peak dense TFLOP/s of the GPU at the fast dtype (H100/H200 bf16: 989)', type=float, default=989.0, show_default=True)
def main(device, batch, steps, reps, dtype, use_compile, channels_last, threads, peak_tflops):
    device = torch.device(device)
    cuda = device.type == 'cuda'
    if threads:
        torch.set_num_threads(threads)
    batch = batch or (32 if cuda else 16)
    steps = steps or (10 if cuda else 4)
    dtype = dtype or ('bf16' if cuda else 'fp32')
    if cuda:
        torch.backends.cudnn.benchmark = True
    net_kwargs = GPU_NET if cuda else CPU_NET
    torch.manual_seed(0)
    net = Precond(**net_kwargs)
    fast_kwargs = dict(dtype=dtype, compile=use_compile, channels_last=channels_last)
    plain = Variant(copy.deepcopy(net), False, fast_kwargs, device)
    fast = Variant(net, True, fast_kwargs, device)
    res, ch = net_kwargs['img_resolution'], net_kwargs['img_channels']
    images = torch.randn([batch, ch, res, res], device=device) * 0.5
    labels = torch.nn.functional.one_hot(torch.arange(batch, device=device) % net_kwargs['label_dim'], net_kwargs['label_dim']).float()
    print(f'device {device}, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, batch {batch}, '
          f'fast {fast_kwargs}, threads {torch.get_num_threads()}')
    for variant in (plain, fast):  # warm-up (cuDNN autotune, compile)
        time_steps(variant, images, labels, 2, device)
    times = {'plain': [], 'fast': []}
    for rep in range(reps):
        for name, variant in (('plain', plain), ('fast', fast)):
            times[name].append(time_steps(variant, images, labels, steps, device))
            print(f'  rep {rep} {name:5s}: {batch / times[name][-1]:8.1f} img/s')
    plain_t, fast_t = statistics.median(times['plain']), statistics.median(times['fast'])
    print(f'plain {batch / plain_t:.1f} img/s, fast {batch / fast_t:.1f} img/s, speed-up {plain_t / fast_t:.2f}x')
    if cuda:
        flops = step_flops(fast, images, labels)
        mfu = flops / fast_t / (peak_tflops * 1e12)
        print(f'model FLOPs per step {flops / 1e12:.3f} TFLOP; fast path {flops / fast_t / 1e12:.1f} TFLOP/s, '
              f'MFU {mfu * 100:.1f}% of {peak_tflops:g} TFLOP/s')


if __name__ == '__main__':
    main()
