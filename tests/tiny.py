"""Tiny EDM2 networks and snapshot pickles shared by the test suite.

`make_tiny_precond()` builds a real `training.networks_edm2.Precond` small
enough for unit tests (16x16x3, two resolution levels, ~46k parameters).
`write_tiny_snapshot()` writes a snapshot pickle with the layout of the
official training loop (docs/formats.md#what-a-snapshot-holds): an `EasyDict` with keys
`encoder`, `dataset_kwargs`, `loss_fn`, `ema`, the `ema` network being an
eval-mode, no-grad, float16 copy.
"""

import copy
import os
from typing import Any, Optional

import torch

TINY_KWARGS = dict(
    img_resolution=16, img_channels=3, label_dim=0, use_fp16=False,
    model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
    channels_per_head=8,
)


def tiny_kwargs(**overrides: Any) -> dict:
    """Constructor kwargs of the tiny Precond, updated with `overrides`."""
    kwargs = copy.deepcopy(TINY_KWARGS)
    kwargs.update(overrides)
    return kwargs


def make_tiny_precond(seed: int = 0, train: bool = False, out_gain: Optional[float] = 1.0,
                      **overrides: Any) -> torch.nn.Module:
    """A tiny `Precond` in eval mode (or training mode with `train=True`), built from `seed`.

    `out_gain` (default 1) and every `emb_gain` are set to non-zero values so
    the network output depends on its input, labels and weights (at the
    official initialisation the output gain is 0 and D(x) = c_skip x).
    Pass `out_gain=None` to keep the official zero initialisation.
    """
    from training import networks_edm2
    torch.manual_seed(seed)
    net = networks_edm2.Precond(**tiny_kwargs(**overrides))
    if out_gain is not None:
        with torch.no_grad():
            net.unet.out_gain.fill_(out_gain)
            for name, param in net.named_parameters():
                if name.endswith('emb_gain'):
                    param.fill_(0.5)
    return net.train(train)


def tiny_dataset_kwargs(label_dim: int = 0, path: Optional[str] = None) -> Any:
    """`dataset_kwargs` as the official training loop stores them in snapshots."""
    import dnnlib
    return dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=path, use_labels=bool(label_dim))


def _default_encoder() -> Any:
    from training.encoders import StandardRGBEncoder
    return StandardRGBEncoder()


def write_tiny_snapshot(path: str, net: Optional[torch.nn.Module] = None, encoder: Any = None,
                        ema_dtype: Optional[torch.dtype] = torch.float16, **extra: Any) -> Any:
    """Write an official-layout snapshot pickle to `path` and return the dict that was saved.

    `net` defaults to `make_tiny_precond()`; `encoder` to `StandardRGBEncoder()`.
    The stored `ema` is a deep copy in eval mode without gradients, cast to
    `ema_dtype` (float16 like the official loop; None keeps the dtype).
    `extra` items are added to (or replace) the snapshot keys.
    """
    import dnnlib
    from torch_utils import persistence
    net = make_tiny_precond() if net is None else net
    encoder = _default_encoder() if encoder is None else encoder
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    if ema_dtype is not None:
        ema = ema.to(ema_dtype)
    data = dnnlib.EasyDict(encoder=encoder, dataset_kwargs=tiny_dataset_kwargs(getattr(net, 'label_dim', 0)),
                           loss_fn=None, ema=ema)
    data.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    persistence.save_pickle(data, path)
    return data


SIMULATED_STDS = (0.050, 0.100, 0.150)


def simulate_ema_run(run_dir: str, net: Optional[torch.nn.Module] = None, steps: int = 16,
                     stds: tuple = SIMULATED_STDS, batch: int = 512) -> None:
    """A simulated training run: move the parameters of a tiny Precond along a smooth random trajectory,
    track power-function EMAs with `stds`, and write official-layout snapshots every second step
    (network-snapshot-<kimg>-<std>.pkl; with the defaults kimg 1, 2, ..., 8)."""
    import numpy as np
    from training import phema
    net = make_tiny_precond() if net is None else net
    ema = phema.PowerFunctionEMA(net, stds=list(stds))
    theta0 = [p.detach().clone() for p in net.parameters()]
    gen = torch.Generator().manual_seed(1)
    dirs = [[torch.randn(p.shape, generator=gen) for p in theta0] for _ in range(2)]
    for step in range(1, steps + 1):
        nimg = step * batch
        t = nimg / (steps * batch)
        with torch.no_grad():
            for p, p0, a, b in zip(net.parameters(), theta0, *dirs):
                p.copy_(p0 + a * np.sin(3 * t) + b * t * t)
            net.unet.emb_fourier.freqs.fill_(step)  # a buffer: outputs take the last input's
        ema.update(cur_nimg=nimg, batch_size=batch)
        if step % 2 == 0:
            for ema_net, suffix in ema.get():
                write_tiny_snapshot(os.path.join(run_dir, f'network-snapshot-{nimg // 1000:07d}{suffix}.pkl'), net=ema_net)
