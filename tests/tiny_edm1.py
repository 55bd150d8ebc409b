"""Tiny EDM v1 networks and snapshot pickles shared by the test suite.

`make_tiny_edm1(precond, arch)` builds a real `training.networks` preconditioner small enough for unit
tests (16x16x3, two resolution levels, attention at 8x8) with every weight drawn at random, so its
output depends on every layer (at the official initialisation the output layers are zero).
`write_edm1_snapshot()` writes a pickle with the layout of EDM v1's training snapshots: a plain dict
with `ema`, `loss_fn`, `augment_pipe` and `dataset_kwargs`.
"""

import copy
import io
import pickle
from typing import Any, Optional

import torch

TINY_ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1,
                   attn_resolutions=[8]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[8]),
    'skip': dict(model_type='SongUNet', encoder_type='skip', decoder_type='skip', model_channels=16, channel_mult=[1, 2],
                 num_blocks=1, attn_resolutions=[8]),
    'adm': dict(model_type='DhariwalUNet', model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
}

PRECOND_CLASSES = ('VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond')


def tiny_kwargs(arch: str = 'ddpmpp', label_dim: int = 4, augment_dim: int = 9, **overrides: Any) -> dict:
    kwargs = dict(img_resolution=16, img_channels=3, label_dim=label_dim, augment_dim=augment_dim, dropout=0.1,
                  **copy.deepcopy(TINY_ARCHS[arch]))
    kwargs.update(overrides)
    return kwargs


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Draw every parameter at random: weights ~ N(0, 1/fan_in), gains ~ N(1, 0.2^2), biases ~ N(0, 0.2^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim > 1:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif 'norm' in name and name.endswith('.weight'):   # GroupNorm gains
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
    return net


def make_tiny_edm1(precond: str = 'EDMPrecond', arch: str = 'ddpmpp', seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny preconditioner with random weights, in eval mode."""
    from training import networks
    torch.manual_seed(seed)
    net = getattr(networks, precond)(**tiny_kwargs(arch, **overrides))
    return randomize(net, seed).eval()


def edm1_snapshot(net: torch.nn.Module, loss_fn: Any = None, augment_pipe: Any = None) -> dict:
    """The dict EDM v1's training loop pickles: `ema` an eval-mode, no-grad copy of the network."""
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    dataset_kwargs = dict(class_name='training.dataset.ImageFolderDataset', path='datasets/tiny.zip',
                          use_labels=bool(net.label_dim), xflip=False, cache=True, resolution=net.img_resolution,
                          max_size=100)
    return dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dataset_kwargs)


class ForeignSourcePickler(pickle.Pickler):
    """Pickles persistent objects with `module_src` replaced by `source(meta)`: what a pickle written by
    other code (e.g. the original toolkit) with the same class names and state looks like."""

    def __init__(self, file, source, protocol: int = 4):
        super().__init__(file, protocol=protocol)
        self.source = source

    def reducer_override(self, obj: Any) -> Any:
        from torch_utils import persistence
        if not persistence.is_persistent(obj) or isinstance(obj, type):
            return NotImplemented
        fields = list(obj.__reduce__())
        meta = dict(fields[1][0], module_src=self.source(fields[1][0]))
        fields[1] = (meta,)
        return tuple(fields)


def dumps_with_foreign_source(obj: Any, source) -> bytes:
    buffer = io.BytesIO()
    ForeignSourcePickler(buffer, source).dump(obj)
    return buffer.getvalue()


def write_edm1_snapshot(path: str, net: Optional[torch.nn.Module] = None, loss_fn: Any = None,
                        augment_pipe: Any = None) -> dict:
    """Write an EDM v1-layout snapshot pickle (official persistence format) and return the saved dict."""
    from torch_utils import persistence
    net = make_tiny_edm1() if net is None else net
    data = edm1_snapshot(net, loss_fn, augment_pipe)
    persistence.save_pickle(data, path)
    return data
