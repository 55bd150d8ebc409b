"""Pieces shared by the benchmark scripts (not a script itself).

* `make_xs_net()`: an edm2-img512-xs-layout `Precond` (any size) with trained-looking gains.
* `Variant`, `time_steps()`, `step_flops()`: one training step set up the plain or the fast way
  (bench/train.py, bench/gpu_acceptance.py).
* `FAST_PATHS`, `sample_once()`, `image_change()`: timing of `generate_images()` (bench/sample.py,
  bench/gpu_acceptance.py).
* `peak_tflops()`: dense bf16/fp16 tensor-core peak of a GPU by name, for model FLOP utilisation.
"""

import time
from typing import Callable, Optional

import torch

from training.encoders import StandardRGBEncoder
from training.loop import presets
from training.loop import step as train_step
from training.phema import PowerFunctionEMA
from training.sampling import generate_images as sampling
from training.sampling.sampler import edm_sampler
from training.training_loop import EDM2Loss

GPU_NET = dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=128, use_fp16=True)  # edm2-img512-xs

#----------------------------------------------------------------------------
# Networks.


def make_xs_net(device: str, resolution: int, channels: int, weights: str = 'fp32', seed: int = 0,
                **overrides) -> torch.nn.Module:
    """edm2-img512-xs layout (eval mode, no gradients) with trained-looking gains, stored weights in `weights`
    dtype; `overrides` replace constructor arguments (e.g. channel_mult, num_blocks, label_dim)."""
    torch.manual_seed(seed)
    net = presets.construct_network_for_preset('edm2-img512-xs', device='cpu', img_resolution=resolution,
                                               model_channels=channels, **overrides)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith('gain'):
                param.fill_(0.7)
    net = net.to(torch.float16) if weights == 'fp16' else net
    return net.to(device)

#----------------------------------------------------------------------------
# Training step: plain vs fast.


class Variant:
    """A network + optimizer + EMA set up either the plain or the fast way."""

    def __init__(self, net: torch.nn.Module, fast: bool, fast_kwargs: dict, device: torch.device):
        self.net = net.train().requires_grad_(True).to(device)
        self.fast = fast
        self.net.set_fast(**fast_kwargs) if fast else self.net.set_fast(False)
        self.params = list(self.net.parameters())
        if fast:
            adam = dict(class_name='torch.optim.Adam', betas=(0.9, 0.99))
            self.opt = train_step.make_optimizer(self.params, adam, device)
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


def cuda_sync(device) -> None:
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def time_steps(variant: Variant, images, labels, steps: int, device) -> float:
    """Seconds per training step, averaged over `steps` steps."""
    cuda_sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        variant.step(images, labels)
    cuda_sync(device)
    return (time.perf_counter() - start) / steps


def step_flops(variant: Variant, images, labels) -> int:
    """Model FLOPs of one training step (loss forward + backward) by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        loss = variant.loss_fn(variant.net, images, labels)
        loss.sum().backward()
    variant.opt.zero_grad(set_to_none=True)
    return counter.get_total_flops()

#----------------------------------------------------------------------------
# Image generation.

FAST_PATHS = {
    'plain': dict(enabled=False),
    'fast': dict(enabled=True),
    'bf16': dict(enabled=True, dtype='bf16'),
    'fp16': dict(enabled=True, dtype='fp16'),
    'compile': dict(enabled=True, compile=True),
    'compile_cl': dict(enabled=True, compile=True, channels_last=True),
}


def sample_once(net: torch.nn.Module, fast_path: Optional[dict], batch: int, device: str,
                sampler_fn: Callable = edm_sampler, **sampler_kwargs) -> tuple:
    """Generate one batch (seeds 0...batch-1) with `generate_images()`; returns (seconds, uint8 images on the CPU)."""
    cuda_sync(device)
    start = time.perf_counter()
    results = list(sampling.generate_images(net, encoder=StandardRGBEncoder(), seeds=range(batch), max_batch_size=batch,
                                            device=device, verbose=False, fast_path=fast_path, sampler_fn=sampler_fn,
                                            **sampler_kwargs))
    cuda_sync(device)
    return time.perf_counter() - start, results[0].images.cpu()


def image_change(images: torch.Tensor, reference: torch.Tensor) -> str:
    diff = (images.int() - reference.int()).abs()
    return f'max |diff| {int(diff.max()):3d}, {float((diff > 0).float().mean()) * 100:5.2f}% of values changed'

#----------------------------------------------------------------------------
# GPU peaks.

# Dense (no sparsity) bf16/fp16 tensor-core TFLOP/s by device-name substring, first match wins.
PEAK_TFLOPS = (
    ('H100 PCIe', 756.0),
    ('H200', 989.0),    # also GH200
    ('H100', 989.0),    # SXM
    ('A100', 312.0),
)


def peak_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak TFLOP/s of a GPU named `device_name`, None if unknown."""
    for key, value in PEAK_TFLOPS:
        if key in device_name:
            return value
    return None
