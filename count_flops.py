"""Count parameters, compute and activation memory of an EDM2 or EDM v1 network.

Thin CLI over `training.evaluation.count_flops`. `count_flops` and `print_flops`
are re-exported for scripts that import them from here, as with the original.
"""

import click

from torch_utils import distributed as dist
from training.evaluation import count_flops as flops
from training.loop import edm1_presets, presets
from training.cli.options import DeviceType
from training.evaluation.count_flops import count_flops, print_flops

__all__ = ['count_flops', 'print_flops', 'cmdline']

#----------------------------------------------------------------------------

def _count_preset(name: str, device: str) -> dict:
    if name in edm1_presets.EDM1_MODELS:  # a published EDM v1 model, as its training builds it
        kwargs = edm1_presets.edm1_model_network_kwargs(name)
        net = edm1_presets.construct_edm1_network(kwargs, device=device).eval().requires_grad_(False)
        return count_flops(net, device=device)
    try:
        net = presets.construct_network_for_preset(name, device=device)  # use_fp16=True as in training
    except presets.PresetError as err:
        raise click.BadParameter(f'{err}, {", ".join(edm1_presets.EDM1_MODELS)}', param_hint='--preset') from None
    return count_flops(net, device=device)

def _count_pickle(src: str, device: str) -> dict:
    try:
        return count_flops(src, device=device)
    except (OSError, ValueError) as err:  # ValueError: SnapshotError, TrustSettingError, not an image network
        raise click.ClickException(f'{src}: {err}' if src not in str(err) else str(err)) from None

@click.command(epilog="""
\b
Examples:
  python count_flops.py https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-s-2147483-0.130.pkl
  python count_flops.py --preset=edm2-img512-xs
  python count_flops.py --preset=edm-cifar10-32x32-cond-vp
""")
@click.argument('net', metavar='PKL|URL', required=False)
@click.option('--preset', help='Count a freshly built network of this training preset (EDM2, or an EDM v1 model such as edm-cifar10-32x32-cond-vp) instead of a pickle.', metavar='NAME')
@click.option('--device', help='Device for the forward pass. On "meta" nothing is computed: counts come from shapes and memory is estimated from tensor sizes.  [default: cuda if available, else meta]', metavar='STR', type=DeviceType(allow_meta=True))
def cmdline(net: str, preset: str, device: str) -> None:
    """Print parameters, Gflops per sample and activation memory per sample of a network.

    PKL|URL is a network pickle (its "ema" network is counted). Convolutions and
    matrix products count as multiply-accumulates, which is how the EDM2 paper
    reports compute (e.g. edm2-img512-xs: 46 Gflops).
    """
    try:
        dist.check_single_process('count_flops.py')
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    if (net is None) == (preset is None):
        raise click.UsageError('Give exactly one of PKL|URL or --preset')
    device = device or str(flops.default_counting_device())
    result = _count_preset(preset, device) if preset is not None else _count_pickle(net, device)
    print_flops(result)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cmdline()

#----------------------------------------------------------------------------
