"""Click parameter types shared by the root scripts (a script never imports another)."""

from __future__ import annotations

from typing import Callable, Optional

import click

from torch_utils.misc import check_device
from training.sampling.solvers import DISCRETIZATIONS, SOLVERS


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


def solver_options(command: Callable) -> Callable:
    """--solver and --disc, the ODE solver options that generate_images.py and calculate_metrics.py gen share
    (validated together with --steps and --S_churn by training.sampling.solvers.check_sampler_options)."""
    command = click.option('--disc', 'discretization', help='Time steps: edm (the EDM schedule, Karras et al. 2022) or logsnr (uniform '
                           'in log-SNR)', metavar='NAME', type=click.Choice(DISCRETIZATIONS), default='edm',
                           show_default=True)(command)
    return click.option('--solver', help='ODE solver: heun (2 network evaluations per step, the last step 1; with '
                        '32 steps the official sampler), euler, dpm++2m, dpm++3m (DPM-Solver++ multistep) or ipndm '
                        '(improved PNDM), 1 evaluation per step', metavar='NAME', type=click.Choice(list(SOLVERS)),
                        default='heun', show_default=True)(command)
