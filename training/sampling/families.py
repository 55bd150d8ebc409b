"""Which sampler a network gets (docs/edm1.md#sampling-from-the-command-line).

EDM2 networks: the ODE solvers of `solvers.sample` (default: heun, 32 EDM time steps, the official
sampler). EDM v1 networks (`training.networks`, Karras et al. 2022): EDM v1 generate.py's samplers with its
defaults (18 steps; the EDM sampler, or the ablation sampler as soon as any of --solver, --disc, --schedule,
--scaling, --alpha is given); with --solver dpm++2m|dpm++3m|ipndm or --disc logsnr they get the same ODE
solvers as EDM2 networks, over the network's noise-level range.

Sampler options arrive as keyword arguments where None means "not given"; `resolve_sampler` returns the
sampler function (signature of `solvers.sample`) and the keyword arguments it is called with.
"""

from typing import Callable, Optional, Tuple

import torch

from training.sampling import edm1_sampler as edm1
from training.sampling.solvers import DISCRETIZATIONS, SOLVERS, check_sampler_options, sample
from training.snapshots.loading import is_edm1_network

EDM1_DISCRETIZATIONS = tuple(name for name in edm1.DISCRETIZATION_CHOICES if name not in DISCRETIZATIONS)  # vp, ve, iddpm
ALL_DISCRETIZATIONS = DISCRETIZATIONS + EDM1_DISCRETIZATIONS
ABLATION_ONLY = tuple(key for key in edm1.ABLATION_KEYS if key not in ('solver', 'discretization'))  # schedule, scaling, alpha
ODE_ONLY_SOLVERS = tuple(name for name in SOLVERS if name not in edm1.SOLVER_CHOICES)
EDM1_DEFAULT_STEPS = 18

#----------------------------------------------------------------------------
# EDM v1 samplers behind the signature of solvers.sample.


def edm1_sample(net: Callable, noise: torch.Tensor, labels: Optional[torch.Tensor] = None, gnet: Optional[Callable] = None,
                randn_like: Callable = torch.randn_like, **options) -> torch.Tensor:
    """EDM v1 generate.py: `choose_sampler`'s rule picks edm1_sampler or ablation_sampler; returns float64."""
    sampler, kwargs = edm1.choose_sampler(**options)
    return sampler(net, noise, labels, randn_like=randn_like, gnet=gnet, **kwargs)

#----------------------------------------------------------------------------
# Checks.


def check_option_names(solver: Optional[str] = None, discretization: Optional[str] = None,
                       num_steps: Optional[int] = None, S_churn: Optional[float] = None, **_) -> None:
    """What holds for every network (run before any network is loaded): known names, at least one step,
    churn only for heun and euler. One-line ValueErrors naming the option. The ablation sampler's time steps
    are checked as 'edm' here; whether the network's family has them is resolve_sampler's concern."""
    check_sampler_options(solver or 'heun', 'edm' if discretization in EDM1_DISCRETIZATIONS else discretization or 'edm',
                          1 if num_steps is None else num_steps, S_churn or 0)


def _ode_kwargs(given: dict) -> dict:
    """Refuse the ablation sampler's options for the ODE solvers; `sample` itself checks the rest."""
    for name in ABLATION_ONLY:
        if name in given:
            raise ValueError(f'--{name} belongs to the EDM v1 ablation sampler (EDM v1 networks with --solver euler or heun)')
    if given.get('discretization') in EDM1_DISCRETIZATIONS:
        raise ValueError(f'--disc={given["discretization"]} belongs to the EDM v1 ablation sampler (EDM v1 networks with '
                         f'--solver euler or heun); here choose from {", ".join(DISCRETIZATIONS)}')
    return given

#----------------------------------------------------------------------------
# The rule.


def resolve_sampler(net: torch.nn.Module, **options) -> Tuple[Callable, dict]:
    """(sampler_fn, kwargs) for the main network `net`; options left at None are dropped. ValueError (one line,
    naming the option) for a combination the network's family does not have."""
    given = {key: value for key, value in options.items() if value is not None}
    if not is_edm1_network(net):
        return sample, _ode_kwargs(given)
    given.setdefault('num_steps', EDM1_DEFAULT_STEPS)
    if given.get('solver') in ODE_ONLY_SOLVERS or given.get('discretization') == 'logsnr':
        net_min, net_max, _ = edm1.network_sigma_range(net)
        given['sigma_min'] = max(given.get('sigma_min', 0.002), net_min)
        given['sigma_max'] = min(given.get('sigma_max', 80), net_max)
        return sample, _ode_kwargs(given)
    if 'dtype' in given:
        raise ValueError("dtype: the EDM v1 samplers compute in float64 (a network's compute dtype is set with --dtype)")
    return edm1_sample, given


#----------------------------------------------------------------------------
# Network evaluations per image.


class _CallCounter:
    """A stand-in network that counts its calls and returns zeros."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.calls += 1
        return torch.zeros_like(x)


def count_evaluations(sampler_fn: Callable = sample, **sampler_kwargs) -> dict:
    """dict(main=, guide=): network evaluations per image of `sampler_fn(**sampler_kwargs)`, found by running it
    on a one-pixel stand-in (the noise levels a sampler visits do not depend on the images)."""
    main, guide = _CallCounter(), _CallCounter()
    sampler_fn(main, torch.zeros([1, 1, 1, 1]), gnet=guide, randn_like=torch.zeros_like, **sampler_kwargs)
    return dict(main=main.calls, guide=guide.calls)


def describe_sampler(sampler_fn: Callable = sample, **kwargs) -> str:
    """One line for the log, e.g. 'Sampler: dpm++3m, 16 steps, edm time steps; network evaluations per image:
    16 main + 10 guide' or 'Sampler: EDM v1 EDM sampler (Alg. 2), 18 steps; ...'."""
    nfe = count_evaluations(sampler_fn, **kwargs)
    guide = f' + {nfe["guide"]} guide' if nfe['guide'] else ''
    steps = kwargs.get('num_steps', 32 if sampler_fn is sample else EDM1_DEFAULT_STEPS)
    if sampler_fn is sample:
        name = f'{kwargs.get("solver", "heun")}, {steps} steps, {kwargs.get("discretization", "edm")} time steps'
    elif edm1.choose_sampler(**kwargs)[0] is edm1.edm1_sampler:
        name = f'EDM v1 EDM sampler (Alg. 2), {steps} steps'
    else:
        name = (f'EDM v1 ablation sampler: {kwargs.get("solver", "heun")} (alpha {kwargs.get("alpha", 1):g}), {steps} '
                f'steps, {kwargs.get("discretization", "edm")} time steps, schedule {kwargs.get("schedule", "linear")}, '
                f'scaling {kwargs.get("scaling", "none")}')
    return f'Sampler: {name}; network evaluations per image: {nfe["main"]} main{guide}'
