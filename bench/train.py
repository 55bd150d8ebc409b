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
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.loop import step as train_step  # noqa: E402
from training.networks_edm2 import Precond  # noqa: E402
from training.phema import PowerFunctionEMA  # noqa: E402
from training.training_loop import EDM2Loss  # noqa: E402

CPU_NET = dict(img_resolution=32, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2, 2],
               num_blocks=2, attn_resolutions=[16], use_fp16=False)
GPU_NET = dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=128, use_fp16=True)  # edm2-img512-xs

#----------------------------------------------------------------------------

class Variant:
    """A network + optimizer + EMA set up either the plain or the fast way."""

    def __init__(self, net: torch.nn.Module, fast: bool, fast_kwargs: dict, device: torch.device):
        self.net = net.train().requires_grad_(True).to(device)
        self.fast = fast
        self.net.set_fast(**fast_kwargs) if fast else self.net.set_fast(False)
        self.params = list(self.net.parameters())
        if fast:
            self.opt = train_step.make_optimizer(self.params, dict(class_name='torch.optim.Adam', betas=(0.9, 0.99)), device)
        else:
            self.opt = torch.optim.Adam(self.params, betas=(0.9, 0.99), foreach=False, fused=False)
        self.ema = PowerFunctionEMA(self.net)
        self.loss_fn = EDM2Loss()
        self.nimg = 0

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.net, images, labels)
        loss.sum().mul(1 / images.shape[0]).backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.fast:
            _, finite = train_step.gradient_health(grads, loss.detach().sum(), 1.0)
            if not finite:
                train_step.zero_nonfinite_(grads)
        else:
            for g in grads:
                torch.nan_to_num(g, nan=0, posinf=0, neginf=0, out=g)
        self.opt.step()
        self.nimg += images.shape[0]
        if self.fast:
            self.ema.update(self.nimg, images.shape[0])
        else:
            self._plain_ema_update(images.shape[0])

    @torch.no_grad()
    def _plain_ema_update(self, batch: int) -> None:
        for exp, ema in zip(self.ema._exps, self.ema.emas):
            beta = (1 - batch / self.nimg) ** (exp + 1)
            for p_ema, p_net in zip(ema.parameters(), self.net.parameters()):
                p_ema.lerp_(p_net, 1 - beta)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_steps(variant: Variant, images, labels, steps: int, device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        variant.step(images, labels)
    _sync(device)
    return (time.perf_counter() - start) / steps


def step_flops(variant: Variant, images, labels) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        loss = variant.loss_fn(variant.net, images, labels)
        loss.sum().backward()
    variant.opt.zero_grad(set_to_none=True)
    return counter.get_total_flops()

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
