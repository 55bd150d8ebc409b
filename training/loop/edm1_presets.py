"""Training configurations of EDM v1 (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Appendix F.2 and Table 7) as plain dicts.

`EDM1_ARCHS` holds the U-Net keyword arguments of each architecture (DDPM++ and NCSN++ of Song et al.
2021, ADM of Dhariwal & Nichol 2021), `EDM1_PRECONDS` the preconditioner and loss of each formulation
(VP, VE, EDM), and `EDM1_MODELS` the published models: data shape, architecture, formulation and the
training options that differ from the defaults of `EDM1_TRAINING_DEFAULTS`. `edm1_network_kwargs()`
assembles the keyword arguments of the network exactly as EDM v1's training script does, and
`construct_edm1_network()` builds it (on any device, e.g. 'meta' to count parameters).

The published models are named after their pickles (`edm-<model>.pkl`); the '-vp'/'-ve' suffix names
the architecture family (DDPM++ / NCSN++), all of them use the EDM formulation (config F).
"""

import copy
from typing import Any, Optional, Sequence, Union

import torch

from training import augment, loss, networks

EDM1_ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}

EDM1_PRECONDS = {   # formulation -> (network class, loss class), Table 1
    'vp': ('VPPrecond', 'VPLoss'),
    've': ('VEPrecond', 'VELoss'),
    'edm': ('EDMPrecond', 'EDMLoss'),
}

# Options of EDM v1's train.py and their defaults (duration and ema in Mimg, augment = probability p).
EDM1_TRAINING_DEFAULTS = dict(cond=False, arch='ddpmpp', precond='edm', duration=200, batch=512, cbase=None, cres=None,
                              lr=1e-3, ema=0.5, dropout=0.13, augment=0.12, xflip=False, fp16=False, ls=1)

# Augmentations enabled in training, each with probability `augment`, x-flips always (non-leaking, 9 labels).
EDM1_AUGMENT_KWARGS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
EDM1_AUGMENT_DIM = 9

# Data shapes (label_dim = classes in the dataset; unconditional models ignore them).
_CIFAR10 = dict(img_resolution=32, img_channels=3, label_dim=10)
_FFHQ_AFHQ = dict(img_resolution=64, img_channels=3, label_dim=0)
_IMAGENET = dict(img_resolution=64, img_channels=3, label_dim=1000)
_FACES = dict(batch=256, cres=[1, 2, 2, 2], lr=2e-4, augment=0.15)


def _model(data: dict, **options: Any) -> dict:
    return dict(data=data, options=dict(EDM1_TRAINING_DEFAULTS, **options))


EDM1_MODELS = {
    'edm-cifar10-32x32-cond-vp':     _model(_CIFAR10, cond=True, arch='ddpmpp'),
    'edm-cifar10-32x32-cond-ve':     _model(_CIFAR10, cond=True, arch='ncsnpp'),
    'edm-cifar10-32x32-uncond-vp':   _model(_CIFAR10, arch='ddpmpp'),
    'edm-cifar10-32x32-uncond-ve':   _model(_CIFAR10, arch='ncsnpp'),
    'edm-ffhq-64x64-uncond-vp':      _model(_FFHQ_AFHQ, arch='ddpmpp', dropout=0.05, **_FACES),
    'edm-ffhq-64x64-uncond-ve':      _model(_FFHQ_AFHQ, arch='ncsnpp', dropout=0.05, **_FACES),
    'edm-afhqv2-64x64-uncond-vp':    _model(_FFHQ_AFHQ, arch='ddpmpp', dropout=0.25, **_FACES),
    'edm-afhqv2-64x64-uncond-ve':    _model(_FFHQ_AFHQ, arch='ncsnpp', dropout=0.25, **_FACES),
    'edm-imagenet-64x64-cond-adm':   _model(_IMAGENET, cond=True, arch='adm', duration=2500, batch=4096, lr=1e-4, ema=50,
                                            dropout=0.10, augment=0, fp16=True, ls=100),
}


def edm1_network_kwargs(arch: str = 'ddpmpp', precond: str = 'edm', img_resolution: int = 32, img_channels: int = 3,
                        label_dim: int = 0, cbase: Optional[int] = None, cres: Optional[Sequence[int]] = None,
                        dropout: float = 0.13, augment: float = 0.12, fp16: bool = False) -> dict:
    """Constructor kwargs of the preconditioner (with `class_name`), as EDM v1's train.py assembles them."""
    if arch not in EDM1_ARCHS:
        raise ValueError(f'Invalid arch "{arch}"; expected one of {", ".join(EDM1_ARCHS)}')
    if precond not in EDM1_PRECONDS:
        raise ValueError(f'Invalid precond "{precond}"; expected one of {", ".join(EDM1_PRECONDS)}')
    kwargs = dict(class_name=f'training.networks.{EDM1_PRECONDS[precond][0]}', **copy.deepcopy(EDM1_ARCHS[arch]))
    if cbase is not None:
        kwargs['model_channels'] = cbase
    if cres is not None:
        kwargs['channel_mult'] = list(cres)
    if augment:
        kwargs['augment_dim'] = EDM1_AUGMENT_DIM
    kwargs.update(dropout=dropout, use_fp16=fp16, img_resolution=img_resolution, img_channels=img_channels,
                  label_dim=label_dim)
    return kwargs


def edm1_model_network_kwargs(name: str, **overrides: Any) -> dict:
    """edm1_network_kwargs() of a published model; `overrides` replace its options (e.g. cbase=32)."""
    if name not in EDM1_MODELS:
        raise ValueError(f'Unknown EDM v1 model "{name}"; expected one of {", ".join(EDM1_MODELS)}')
    model = EDM1_MODELS[name]
    opts = dict(model['options'], **overrides)
    data = dict(model['data'], label_dim=model['data']['label_dim'] if opts['cond'] else 0)
    return edm1_network_kwargs(opts['arch'], opts['precond'], cbase=opts['cbase'], cres=opts['cres'],
                               dropout=opts['dropout'], augment=opts['augment'], fp16=opts['fp16'], **data)


def construct_edm1_network(network_kwargs: dict, device: Union[str, torch.device] = 'cpu') -> torch.nn.Module:
    """Build the preconditioner described by `network_kwargs` (with `class_name`) on `device`."""
    kwargs = dict(network_kwargs)
    class_name = kwargs.pop('class_name').rsplit('.', 1)[-1]
    with torch.device(device):
        return getattr(networks, class_name)(**kwargs)


def edm1_loss(precond: str = 'edm') -> Any:
    """The loss object of a formulation (Table 1) with its default parameters."""
    return getattr(loss, EDM1_PRECONDS[precond][1])()


def edm1_augment_pipe(p: float) -> Optional[augment.AugmentPipe]:
    """The augmentation pipeline used in training with probability `p` (None for p = 0)."""
    return augment.AugmentPipe(p=p, **EDM1_AUGMENT_KWARGS) if p else None
