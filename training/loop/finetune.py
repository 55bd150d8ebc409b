"""Fine-tuning support: the fork's `--model2finetune`, `--freeze-down`, `--freeze-attn`
(docs/differences.md#train-3 to #train-5).

* `load_finetune_source`: the EMA network (as float32) and encoder of a snapshot pickle,
  read by the one snapshot loader (training.snapshots.loading).
* `check_compatible` / `match_label_dim`: the dataset must fit the loaded network; its
  label vectors are zero-padded to the network's `label_dim` (the fork breaks when a
  filtered dataset has fewer classes, docs/differences.md#data-11).
* `freeze_parameters` / `hold_frozen_weights`: frozen tensors get no gradient, stay out of
  the optimizer, and - unlike the fork, where forced weight normalisation still rewrites
  them - keep their exact values.
"""

from typing import Any

import torch

import dnnlib
from torch_utils import persistence
from training.snapshots.loading import load_snapshot

#----------------------------------------------------------------------------

def load_finetune_source(path: str) -> dnnlib.EasyDict:
    """EasyDict(net=<float32 EMA network>, encoder=<encoder>) from a snapshot pickle (path or URL)."""
    data = load_snapshot(path, '--model2finetune')
    net = data['ema'].to(torch.float32)
    encoder = data.get('encoder', None)
    if encoder is None:
        if getattr(net, 'img_channels', None) != 3:
            raise ValueError(f'--model2finetune: {path} has no encoder and its network is not a 3-channel pixel model')
        from training.encoders import StandardRGBEncoder
        encoder = StandardRGBEncoder()
    return dnnlib.EasyDict(net=net, encoder=encoder)


def check_compatible(net: torch.nn.Module, ref_latents: torch.Tensor, ref_label: Any, source: str) -> None:
    """Raise ValueError if the encoded dataset items or labels do not fit the loaded network."""
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    if list(ref_latents.shape[1:]) != shape:
        raise ValueError(f'--data: dataset items encode to {list(ref_latents.shape[1:])}, but the network from '
                         f'{source} expects {shape}')
    label_dim = int(ref_label.shape[-1]) if hasattr(ref_label, 'shape') and len(ref_label.shape) else 0
    if label_dim > net.label_dim:
        raise ValueError(f'--data: the dataset has {label_dim} classes, but the network from {source} has '
                         f'label_dim={net.label_dim}')


def match_label_dim(labels: torch.Tensor, label_dim: int) -> torch.Tensor:
    """Zero-pad [N, L] label vectors to [N, label_dim] (L <= label_dim)."""
    labels = labels.reshape(labels.shape[0], -1).to(torch.float32)
    missing = label_dim - labels.shape[1]
    if missing == 0:
        return labels
    if missing < 0:
        raise ValueError(f'labels have {labels.shape[1]} entries but the network expects {label_dim}')
    return torch.nn.functional.pad(labels, (0, missing))


# Constructor kwargs that the training data set, not the architecture.
_INTERFACE_KWARGS = ('img_resolution', 'img_channels', 'label_dim')


def network_kwargs_of(net: torch.nn.Module) -> dict:
    """`network_kwargs` describing a network loaded from a pickle, as a fresh run records them: its class and
    constructor kwargs (without the interface ones), with the `dropout` and `use_fp16` it really has."""
    kwargs = dict(class_name=f'{persistence.safe_class_modules.get(type(net).__name__, type(net).__module__)}.'
                             f'{type(net).__name__}')  # a trusted load runs the class from the pickle's own copy
    init_kwargs = getattr(net, '_init_kwargs', None) or {}
    kwargs.update((key, value) for key, value in init_kwargs.items() if key not in _INTERFACE_KWARGS)
    dropouts = {module.dropout for module in net.modules() if isinstance(getattr(module, 'dropout', None), (int, float))}
    if len(dropouts) == 1:
        kwargs['dropout'] = dropouts.pop()
    if hasattr(net, 'use_fp16'):
        kwargs['use_fp16'] = bool(net.use_fp16)
    return kwargs

#----------------------------------------------------------------------------

# Names of attention weights: EDM2 blocks have attn_qkv / attn_proj, EDM v1 blocks (training.networks) qkv / proj.
_ATTENTION_NAMES = ('attn', '.qkv.', '.proj.')


def freeze_parameters(net: torch.nn.Module, freeze_down: bool = False, freeze_attn: bool = False) -> list:
    """Set requires_grad=False on U-Net parameters whose name (relative to `net.unet`, or to an EDM v1 `net`)
    contains 'down' (freeze_down) or names an attention weight (freeze_attn); return their names."""
    unet = getattr(net, 'unet', net)
    frozen = []
    for name, param in unet.named_parameters():
        attention = any(part in name for part in _ATTENTION_NAMES)
        if (freeze_down and 'down' in name) or (freeze_attn and attention):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def freeze_augment_input(net: torch.nn.Module) -> list:
    """Set requires_grad=False on the augmentation-label input of an EDM v1 network (`model.map_augment`) and
    return the names. Training without augmentation never runs that layer (the network gets no labels), so its
    weights would get no gradient anyway; frozen, they stay exact and DistributedDataParallel does not wait for
    their gradients."""
    layer = getattr(getattr(net, 'model', None), 'map_augment', None)
    if layer is None:
        return []
    layer.requires_grad_(False)
    return [f'model.map_augment.{name}' for name, _param in layer.named_parameters()]


def hold_frozen_weights(net: torch.nn.Module) -> int:
    """Put every leaf layer whose parameters are all frozen in eval mode; return how many.

    In training mode an MPConv overwrites its weight by its normalised version on every
    call (forced weight normalisation, eq. 66); in eval mode it does not, so a frozen
    layer keeps its exact weights while computing the same function. Call after `net.train()`.
    """
    count = 0
    for module in net.modules():
        params = list(module.parameters(recurse=False))
        if len(list(module.children())) == 0 and params and not any(p.requires_grad for p in params):
            module.train(False)
            count += 1
    return count

#----------------------------------------------------------------------------
