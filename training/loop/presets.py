"""Training presets of EDM2 as plain dicts.

A preset maps CLI option names of `train_edm2.py` to defaults: every key is the
name of an option (`duration`, `batch`, `channels`, `lr`, `decay`, `dropout`,
`P_mean`, `P_std`, and `rampup` for the pixel-space presets) whose value
replaces a CLI value left at None. `duration` and `batch` are in images,
`decay` is `ref_batches` (t_ref) in batches, `lr` is `ref_lr` (alpha_ref).

Besides the hyperparameters, each preset has a data shape (the interface the
network is built for: resolution, channels and label count of the *encoded*
training data) and, for the pixel-space presets, extra U-Net kwargs that have
no CLI option. `network_kwargs_for_preset()` assembles everything that is
needed to construct `training.networks_edm2.Precond` for a preset.

Origins:
* `edm2-img512-*`, `edm2-img64-*`: official EDM2 presets (the `xxs` and
  `img64-xs` rows are the paper's small models, trained in the official code by
  overriding `--channels`/`--lr` of the `xs`/`s` presets).
* `base-finetuning`: the fork's preset; it has no `channels` because the fork
  takes the network from `--model2finetune`.
* `edm2-cifar10-32x32-*`: this project's pixel-space presets built from the
  CIFAR settings of futurexiang-edm2, an independent pixel-space
  reimplementation (config E hyperparameters on the config G network): 128
  channels, channel_mult [1,2,2,2], attention at 16x16 only, dropout 0.13,
  P_mean -1.2, P_std 1.2, batch 512, lr 2e-2, t_ref = 400 CIFAR-10 epochs
  (400 * 50000 / 512 batches) and 200 epochs (10 Mimg) of LR ramp-up. The
  duration (200Mi, about 4200 epochs) is this project's choice.
"""

import copy
from typing import Any, Union

import torch

import dnnlib

Mi = 1 << 20
_CIFAR10_IMAGES = 50000

PRECOND_CLASS_NAME = 'training.networks_edm2.Precond'

#----------------------------------------------------------------------------
# Hyperparameters (keys = train_edm2.py option names).

def _official(duration: int, channels: int, lr: float, decay: int, dropout: float, P_mean: float, P_std: float) -> dict:
    return dict(duration=duration, batch=2048, channels=channels, lr=lr, decay=decay, dropout=dropout, P_mean=P_mean, P_std=P_std)

def _cifar32() -> dict:
    batch = 512
    return dict(duration=200 * Mi, batch=batch, channels=128, lr=0.0200, decay=400 * _CIFAR10_IMAGES / batch,
        dropout=0.13, P_mean=-1.2, P_std=1.2, rampup=200 * _CIFAR10_IMAGES / 1e6)

TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    'edm2-img512-xxs':  _official(2048 * Mi, 64,  0.0170, 70000, 0.00, -0.4, 1.0),
    'edm2-img512-xs':   _official(2048 * Mi, 128, 0.0120, 70000, 0.00, -0.4, 1.0),
    'edm2-img512-s':    _official(2048 * Mi, 192, 0.0100, 70000, 0.00, -0.4, 1.0),
    'edm2-img512-m':    _official(2048 * Mi, 256, 0.0090, 70000, 0.10, -0.4, 1.0),
    'edm2-img512-l':    _official(1792 * Mi, 320, 0.0080, 70000, 0.10, -0.4, 1.0),
    'edm2-img512-xl':   _official(1280 * Mi, 384, 0.0070, 70000, 0.10, -0.4, 1.0),
    'edm2-img512-xxl':  _official(896 * Mi,  448, 0.0065, 70000, 0.10, -0.4, 1.0),
    'edm2-img64-xs':    _official(1024 * Mi, 128, 0.0120, 35000, 0.00, -0.8, 1.6),
    'edm2-img64-s':     _official(1024 * Mi, 192, 0.0100, 35000, 0.00, -0.8, 1.6),
    'edm2-img64-m':     _official(2048 * Mi, 256, 0.0090, 35000, 0.10, -0.8, 1.6),
    'edm2-img64-l':     _official(1024 * Mi, 320, 0.0080, 35000, 0.10, -0.8, 1.6),
    'edm2-img64-xl':    _official(640 * Mi,  384, 0.0070, 35000, 0.10, -0.8, 1.6),
    'base-finetuning':  dict(duration=2048 * Mi, batch=256, lr=0.001, decay=70000, dropout=0.00, P_mean=-0.4, P_std=1.0),
    'edm2-cifar10-32x32-uncond': _cifar32(),
    'edm2-cifar10-32x32-cond':   _cifar32(),
}

#----------------------------------------------------------------------------
# Data shape of each preset: the encoded training item the network sees.
# img512: 64x64 SD-VAE latents (4 channels); img64: 64x64 RGB pixels.
# base-finetuning: the fork fine-tunes the img512 models.

_LATENT_512 = dict(img_resolution=64, img_channels=4, label_dim=1000)
_PIXEL_64 = dict(img_resolution=64, img_channels=3, label_dim=1000)

DATA_SHAPES: dict[str, dict[str, int]] = {
    **{name: _LATENT_512 for name in TRAINING_PRESETS if name.startswith('edm2-img512-')},
    **{name: _PIXEL_64 for name in TRAINING_PRESETS if name.startswith('edm2-img64-')},
    'base-finetuning': _LATENT_512,
    'edm2-cifar10-32x32-uncond': dict(img_resolution=32, img_channels=3, label_dim=0),
    'edm2-cifar10-32x32-cond':   dict(img_resolution=32, img_channels=3, label_dim=10),
}

# U-Net kwargs that differ from the network defaults and have no CLI option.
NETWORK_EXTRAS: dict[str, dict[str, Any]] = {
    'edm2-cifar10-32x32-uncond': dict(channel_mult=[1, 2, 2, 2], attn_resolutions=[16]),
    'edm2-cifar10-32x32-cond':   dict(channel_mult=[1, 2, 2, 2], attn_resolutions=[16]),
}

#----------------------------------------------------------------------------

class PresetError(ValueError):
    """Unknown preset name, or a preset that cannot build a network."""

def preset_names() -> list[str]:
    return list(TRAINING_PRESETS)

def _check_name(name: str) -> None:
    if name not in TRAINING_PRESETS:
        raise PresetError(f'Invalid configuration preset "{name}"; valid presets: {", ".join(TRAINING_PRESETS)}')

def get_preset(name: str) -> dict[str, Any]:
    """Hyperparameters of a training preset (a fresh copy; keys = CLI option names)."""
    _check_name(name)
    return copy.deepcopy(TRAINING_PRESETS[name])

def data_shape_for_preset(name: str) -> dict[str, int]:
    """`img_resolution`, `img_channels`, `label_dim` of the encoded data a preset is meant for."""
    _check_name(name)
    return dict(DATA_SHAPES[name])

def network_kwargs_for_preset(name: str, *, use_fp16: bool = True, with_data_shape: bool = True, **overrides: Any) -> dict[str, Any]:
    """Constructor kwargs of `Precond` for a preset.

    Returns `{class_name, model_channels, dropout, use_fp16, [extras], [img_resolution, img_channels, label_dim]}`;
    `overrides` replace any entry (e.g. `label_dim=0` for an unconditional net, `model_channels=64`).
    """
    preset = get_preset(name)
    kwargs = dict(class_name=PRECOND_CLASS_NAME, model_channels=preset.get('channels'), dropout=preset['dropout'], use_fp16=use_fp16)
    kwargs.update(copy.deepcopy(NETWORK_EXTRAS.get(name, {})))
    if with_data_shape:
        kwargs.update(data_shape_for_preset(name))
    kwargs.update(overrides)
    if kwargs['model_channels'] is None:
        # Said for count_flops users too, who have no model_channels option: point to what they can pass instead.
        raise PresetError(f'Preset "{name}" defines no network of its own (fine-tuning takes it from --model2finetune);'
                          ' use a network pickle instead, or an edm2-img* preset such as edm2-img512-xs')
    return kwargs

#----------------------------------------------------------------------------

def construct_network_for_preset(name: str, device: Union[str, torch.device] = 'meta', **overrides: Any) -> torch.nn.Module:
    """A freshly initialised network of a preset, in eval mode, built directly on `device`.

    The default `meta` device allocates no memory (shapes only), which is all that
    counting parameters and flops needs.
    """
    kwargs = network_kwargs_for_preset(name, **overrides)
    with torch.device(device):
        net = dnnlib.util.construct_class_by_name(**kwargs)
    return net.eval().requires_grad_(False)

#----------------------------------------------------------------------------
