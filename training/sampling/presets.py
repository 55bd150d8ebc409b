"""Sampling presets of the published EDM2 models and the rules for combining a preset (EDM2 or EDM v1,
`edm1_presets`) with explicit `--net`/`--gnet`/`--guidance`/`--guidance-interval` and sampler options."""

from typing import Any, Optional, Sequence, Union

from training.sampling.edm1_presets import edm1_presets

#----------------------------------------------------------------------------
# Presets. Keys filled from an EDM2 preset: net, gnet, guidance.

model_root = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions'


def _preset(net: str, gnet: Optional[str] = None, guidance: Optional[float] = None) -> dict:
    preset = dict(net=f'{model_root}/{net}.pkl')
    if gnet is not None:
        preset.update(gnet=f'{model_root}/{gnet}.pkl', guidance=guidance)
    return preset


config_presets = {
    # EDM2 paper, Table 2 (fid) and Table 5 (fd_dinov2), no guidance.
    'edm2-img512-xs-fid':   _preset('edm2-img512-xs-2147483-0.135'),   # fid 3.53
    'edm2-img512-xs-dino':  _preset('edm2-img512-xs-2147483-0.200'),   # fd_dinov2 103.39
    'edm2-img512-s-fid':    _preset('edm2-img512-s-2147483-0.130'),    # fid 2.56
    'edm2-img512-s-dino':   _preset('edm2-img512-s-2147483-0.190'),    # fd_dinov2 68.64
    'edm2-img512-m-fid':    _preset('edm2-img512-m-2147483-0.100'),    # fid 2.25
    'edm2-img512-m-dino':   _preset('edm2-img512-m-2147483-0.155'),    # fd_dinov2 58.44
    'edm2-img512-l-fid':    _preset('edm2-img512-l-1879048-0.085'),    # fid 2.06
    'edm2-img512-l-dino':   _preset('edm2-img512-l-1879048-0.155'),    # fd_dinov2 52.25
    'edm2-img512-xl-fid':   _preset('edm2-img512-xl-1342177-0.085'),   # fid 1.96
    'edm2-img512-xl-dino':  _preset('edm2-img512-xl-1342177-0.155'),   # fd_dinov2 45.96
    'edm2-img512-xxl-fid':  _preset('edm2-img512-xxl-0939524-0.070'),  # fid 1.91
    'edm2-img512-xxl-dino': _preset('edm2-img512-xxl-0939524-0.150'),  # fd_dinov2 42.84
    # EDM2 paper, Table 3.
    'edm2-img64-s-fid':     _preset('edm2-img64-s-1073741-0.075'),     # fid 1.58
    'edm2-img64-m-fid':     _preset('edm2-img64-m-2147483-0.060'),     # fid 1.43
    'edm2-img64-l-fid':     _preset('edm2-img64-l-1073741-0.040'),     # fid 1.33
    'edm2-img64-xl-fid':    _preset('edm2-img64-xl-0671088-0.040'),    # fid 1.33
    # EDM2 paper, Table 2: classifier-free guidance (unconditional XS guide).
    'edm2-img512-xs-guid-fid':   _preset('edm2-img512-xs-2147483-0.045', 'edm2-img512-xs-uncond-2147483-0.045', 1.40),   # fid 2.91
    'edm2-img512-xs-guid-dino':  _preset('edm2-img512-xs-2147483-0.150', 'edm2-img512-xs-uncond-2147483-0.150', 1.70),   # fd_dinov2 79.94
    'edm2-img512-s-guid-fid':    _preset('edm2-img512-s-2147483-0.025', 'edm2-img512-xs-uncond-2147483-0.025', 1.40),    # fid 2.23
    'edm2-img512-s-guid-dino':   _preset('edm2-img512-s-2147483-0.085', 'edm2-img512-xs-uncond-2147483-0.085', 1.90),    # fd_dinov2 52.32
    'edm2-img512-m-guid-fid':    _preset('edm2-img512-m-2147483-0.030', 'edm2-img512-xs-uncond-2147483-0.030', 1.20),    # fid 2.01
    'edm2-img512-m-guid-dino':   _preset('edm2-img512-m-2147483-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 2.00),    # fd_dinov2 41.98
    'edm2-img512-l-guid-fid':    _preset('edm2-img512-l-1879048-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 1.20),    # fid 1.88
    'edm2-img512-l-guid-dino':   _preset('edm2-img512-l-1879048-0.035', 'edm2-img512-xs-uncond-2147483-0.035', 1.70),    # fd_dinov2 38.20
    'edm2-img512-xl-guid-fid':   _preset('edm2-img512-xl-1342177-0.020', 'edm2-img512-xs-uncond-2147483-0.020', 1.20),   # fid 1.85
    'edm2-img512-xl-guid-dino':  _preset('edm2-img512-xl-1342177-0.030', 'edm2-img512-xs-uncond-2147483-0.030', 1.70),   # fd_dinov2 35.67
    'edm2-img512-xxl-guid-fid':  _preset('edm2-img512-xxl-0939524-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 1.20),  # fid 1.81
    'edm2-img512-xxl-guid-dino': _preset('edm2-img512-xxl-0939524-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 1.70),  # fd_dinov2 33.09
    # Autoguidance paper, Table 1.
    'edm2-img512-s-autog-fid':          _preset('edm2-img512-s-2147483-0.070', 'edm2-img512-xs-0134217-0.125', 2.10),                # fid 1.34
    'edm2-img512-s-autog-dino':         _preset('edm2-img512-s-2147483-0.120', 'edm2-img512-xs-0134217-0.165', 2.45),                # fd_dinov2 36.67
    'edm2-img512-xxl-autog-fid':        _preset('edm2-img512-xxl-0939524-0.075', 'edm2-img512-m-0268435-0.155', 2.05),               # fid 1.25
    'edm2-img512-xxl-autog-dino':       _preset('edm2-img512-xxl-0939524-0.130', 'edm2-img512-m-0268435-0.205', 2.30),               # fd_dinov2 24.18
    'edm2-img512-s-uncond-autog-fid':   _preset('edm2-img512-s-uncond-2147483-0.070', 'edm2-img512-xs-uncond-0134217-0.110', 2.85),  # fid 3.86
    'edm2-img512-s-uncond-autog-dino':  _preset('edm2-img512-s-uncond-2147483-0.090', 'edm2-img512-xs-uncond-0134217-0.125', 2.90),  # fd_dinov2 90.39
    'edm2-img64-s-autog-fid':           _preset('edm2-img64-s-1073741-0.045', 'edm2-img64-xs-0134217-0.110', 1.70),                  # fid 1.01
    'edm2-img64-s-autog-dino':          _preset('edm2-img64-s-1073741-0.105', 'edm2-img64-xs-0134217-0.175', 2.20),                  # fd_dinov2 31.85
}


def resolve_options(preset: Optional[str] = None, net: Optional[str] = None, gnet: Optional[str] = None,
                    guidance: Optional[float] = None) -> dict:
    """Combine `--preset` with explicit options; returns dict(net, gnet, guidance).

    Explicit values win over the preset; guidance None or 1 disables the guide.
    Raises ValueError with a one-line message on inconsistent input.
    """
    if preset is not None:
        defaults = _lookup(preset)
        net = defaults['net'] if net is None else net
        gnet = defaults.get('gnet') if gnet is None else gnet
        guidance = defaults.get('guidance') if guidance is None else guidance
    if net is None:
        raise ValueError('Please specify either --preset or --net')
    if guidance is None or guidance == 1:
        return dict(net=net, gnet=None, guidance=1)
    if gnet is None:
        raise ValueError('Please specify --gnet when using guidance')
    return dict(net=net, gnet=gnet, guidance=guidance)


def _lookup(preset: str) -> dict:
    if preset in config_presets:
        return config_presets[preset]
    if preset in edm1_presets:
        return edm1_presets[preset]
    raise ValueError(f'Invalid configuration preset "{preset}"; valid presets: {", ".join(config_presets)}, '
                     f'and for EDM v1 networks {", ".join(edm1_presets)}')


def preset_sampler_options(preset: Optional[str]) -> dict:
    """The sampler options a preset recommends (EDM v1 presets: num_steps and churn), to apply where the command
    line leaves them unset; {} for EDM2 presets and no preset."""
    if preset is None:
        return {}
    return {key: value for key, value in _lookup(preset).items() if key not in ('net', 'gnet', 'guidance')}


def ignored_gnet_warning(gnet: Any, guidance: Optional[float]) -> Optional[str]:
    """The warning (without 'Warning: ') for a guiding network given while guidance is off (None or 1, as in
    resolve_options), else None."""
    if gnet is not None and (guidance is None or guidance == 1):
        return '--gnet is ignored without guidance (--guidance 1)'
    return None

#----------------------------------------------------------------------------
# Option parsing.

def parse_interval(s: Union[str, Sequence[float], None]) -> Optional[tuple]:
    """Parse 'LO,HI' into a (lo, hi) tuple of floats with 0 <= lo <= hi; None stays None."""
    if s is None:
        return None
    parts = str(s).split(',') if isinstance(s, str) else list(s)
    try:
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f'expected two numbers LO,HI, got "{s}"') from None
    if not 0 <= lo <= hi:
        raise ValueError(f'expected 0 <= LO <= HI, got "{s}"')
    return (lo, hi)
