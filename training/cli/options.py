"""Click parameter types shared by the root scripts (a script never imports another)."""

from __future__ import annotations

from typing import Optional

import click

from torch_utils.misc import check_device


class DeviceType(click.ParamType):
    """--device: a torch device name, checked when the command line is parsed. The value
    stays a string (None when omitted) so that defaults can be chosen per script."""

    name = 'device'

    def __init__(self, allow_meta: bool = False):
        self.allow_meta = allow_meta

    def convert(self, value: Optional[str], param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Optional[str]:
        if value is None:
            return None
        try:  # the messages are option-neutral; self.fail names --device
            check_device(str(value), self.allow_meta)
        except ValueError as err:
            self.fail(str(err), param, ctx)
        return str(value)


DEVICE = DeviceType()
