"""Click parameter types shared by the root scripts (a script never imports another)."""

from __future__ import annotations

from typing import Optional

import click
import torch


def check_device(name: str, allow_meta: bool = False) -> torch.device:
    """torch.device(name), refusing names torch does not know and devices this machine lacks."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'"{name}" is not a torch device (e.g. cuda, cuda:1, cpu)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('CUDA is not available on this machine; use --device=cpu')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f'{name}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    if device.type == 'meta' and not allow_meta:
        raise ValueError('the meta device computes nothing; use cpu or cuda')
    if device.type not in ('cpu', 'cuda', 'meta'):
        raise ValueError(f'{name}: only cpu and cuda devices are supported')
    return device


class DeviceType(click.ParamType):
    """--device: a torch device name, checked when the command line is parsed. The value
    stays a string (None when omitted) so that defaults can be chosen per script."""

    name = 'device'

    def __init__(self, allow_meta: bool = False):
        self.allow_meta = allow_meta

    def convert(self, value: Optional[str], param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Optional[str]:
        if value is None:
            return None
        try:
            check_device(str(value), self.allow_meta)
        except ValueError as err:
            self.fail(str(err), param, ctx)
        return str(value)


DEVICE = DeviceType()
