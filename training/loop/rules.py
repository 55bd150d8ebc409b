"""Rules a training configuration must satisfy, checked by the config step (`training.loop.train_edm2`, before
anything is written) and by `training.training_loop.training_loop()` (for library callers) with the same functions.
"""

import inspect
from typing import Optional, Sequence

import numpy as np

#----------------------------------------------------------------------------

class ConfigError(ValueError):
    """Bad option value; the message names the option."""


def check_batch_settings(batch_size: int, batch_gpu: Optional[int], world_size: int, total_nimg: Optional[int],
                         slice_nimg: Optional[int] = None, status_nimg: Optional[int] = None,
                         snapshot_nimg: Optional[int] = None, checkpoint_nimg: Optional[int] = None) -> tuple:
    """Validate batch sizes and intervals; return (batch_gpu, num_accumulation_rounds).

    Raises ValueError naming the offending setting (with its train_edm2.py option).
    """
    if batch_size <= 0 or batch_size % world_size != 0:
        raise ValueError(f'batch_size (--batch) = {batch_size} must be a positive multiple of the number of processes '
                         f'({world_size})')
    batch_gpu_total = batch_size // world_size
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    if batch_gpu <= 0 or batch_gpu_total % batch_gpu != 0:
        raise ValueError(f'batch_size (--batch) / processes = {batch_gpu_total} must be a multiple of batch_gpu '
                         f'(--batch-gpu) = {batch_gpu}')
    multiples = [('total_nimg (--duration)', total_nimg, batch_size), ('slice_nimg', slice_nimg, batch_size),
                 ('status_nimg (--status)', status_nimg, batch_size),
                 ('snapshot_nimg (--snapshot)', snapshot_nimg, np.lcm(batch_size, 1024)),
                 ('checkpoint_nimg (--checkpoint)', checkpoint_nimg, np.lcm(batch_size, 1024))]
    for name, value, unit in multiples:
        if value is not None and (value <= 0 or value % unit != 0):
            raise ValueError(f'{name} = {value} must be a positive multiple of {unit}'
                             + (' (the batch size and 1024)' if unit != batch_size else ' (the batch size)'))
    return batch_gpu, batch_gpu_total // batch_gpu


def check_image_shape(shape: Sequence[int], channel_mult: Optional[Sequence[int]] = None) -> None:
    """Raise ValueError unless the items ([..., H, W]) are square and, when `channel_mult` is given,
    their side can be halved len(channel_mult)-1 times by the U-Net's encoder."""
    height, width = int(shape[-2]), int(shape[-1])
    if height != width:
        raise ValueError(f'images are {width}x{height} (width x height); EDM2 networks need square images')
    if channel_mult is not None:
        factor = 2 ** (len(channel_mult) - 1)
        if height % factor != 0:
            raise ValueError(f'resolution {height} is not divisible by 2^(len(channel_mult)-1) = {factor} '
                             f'(channel_mult {list(channel_mult)}); use a power-of-two resolution or fewer levels')


def network_channel_mult(network_kwargs: dict) -> list:
    """channel_mult of the network `network_kwargs` build: their own, else the U-Net's default."""
    if network_kwargs.get('channel_mult') is not None:
        return list(network_kwargs['channel_mult'])
    from training.networks_edm2 import UNet
    constructor = UNet.__base__.__init__  # persistent_class subclasses the class as written
    return list(inspect.signature(constructor).parameters['channel_mult'].default)

#----------------------------------------------------------------------------
