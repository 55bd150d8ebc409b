"""Click parameter types shared by the root scripts (a script never imports another)."""

from __future__ import annotations

from typing import Callable, Optional

import click

from torch_utils.misc import check_device
from training.sampling.edm1_sampler import SCALING_CHOICES, SCHEDULE_CHOICES
from training.sampling.families import ALL_DISCRETIZATIONS
from training.sampling.solvers import SOLVERS


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
    """--solver, --disc, --steps and the EDM v1 ablation options, which generate_images.py and calculate_metrics.py
    gen share. Left unset they mean the default of the network's family (training.sampling.families, which also
    checks the combination)."""
    options = [
        click.option('--solver', help='ODE solver: heun (2 network evaluations per step, the last step 1; with 32 steps the '
                     'official EDM2 sampler), euler, dpm++2m, dpm++3m (DPM-Solver++ multistep) or ipndm (improved PNDM), '
                     "1 evaluation per step. EDM v1 networks: euler or heun select EDM v1's ablation sampler  "
                     "[default: heun; EDM v1 networks: EDM v1's EDM sampler]", metavar='NAME',
                     type=click.Choice(list(SOLVERS)), default=None),
        click.option('--disc', 'discretization', help='Time steps: edm (the EDM schedule, Karras et al. 2022) or logsnr '
                     '(uniform in log-SNR); EDM v1 networks also vp, ve, iddpm (the ablation sampler)  [default: edm]',
                     metavar='NAME', type=click.Choice(list(ALL_DISCRETIZATIONS)), default=None),
        click.option('--steps', 'num_steps', help='Number of solver steps  [default: 32; EDM v1 networks 18]', metavar='INT',
                     type=click.IntRange(min=1), default=None),
        click.option('--schedule', help='EDM v1 ablation sampler: noise schedule sigma(t)  [default: linear]',
                     metavar='NAME', type=click.Choice(list(SCHEDULE_CHOICES)), default=None),
        click.option('--scaling', help='EDM v1 ablation sampler: signal scaling s(t)  [default: none]', metavar='NAME',
                     type=click.Choice(list(SCALING_CHOICES)), default=None),
        click.option('--alpha', help='EDM v1 ablation sampler: where heun evaluates its second slope, t + alpha h  '
                     '[default: 1]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None),
    ]
    for option in reversed(options):
        command = option(command)
    return command
