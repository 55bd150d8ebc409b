"""Reconstruct post-hoc EMA profiles from saved power-function EMA snapshots
(EDM2 paper, Sec. 3). Logic: training/snapshots/reconstruct_phema.py."""

import click

from torch_utils import persistence
from training.snapshots.loading import SnapshotError
from training.snapshots.reconstruct_phema import (OUTPUT_FORMATS, PhemaError, convert_from_dir, kimg_to_nimg,
                                                  list_input_pickles, parse_std_list, pickle_path,
                                                  reconstruct_from_dir, reconstruct_phema)

# The library API, re-exported for scripts that used the official module directly.
__all__ = ['kimg_to_nimg', 'list_input_pickles', 'parse_std_list', 'pickle_path', 'reconstruct_phema', 'cmdline']

HELP_EXAMPLES = """
Examples:

\b
# Download raw snapshots for the pre-trained edm2-img512-xs model
rclone copy --progress --http-url https://nvlabs-fi-cdn.nvidia.com/edm2 \\
    :http:raw-snapshots/edm2-img512-xs/ raw-snapshots/edm2-img512-xs/

\b
# Reconstruct a new EMA profile with std=0.150
python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs \\
    --outdir=out --outstd=0.150

\b
# Sweep 49 EMA profiles (0.010, 0.015, ..., 0.250), streaming over the
# input snapshots 7 times (8 outputs per pass)
python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs \\
    --outdir=out --outstd=0.010,0.015,...,0.250 --batch=8

\b
# Reconstruct from the snapshots of a training run
python reconstruct_phema.py \\
    --indir=training-runs/00000-edm2-img512-xs \\
    --inprefix=network-snapshot --outdir=out --outstd=0.150

\b
# The same reconstruction without pickle: .safetensors + .json + README.md
python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs \\
    --outdir=out --outstd=0.150 --format=safetensors --license=cc-by-nc-sa-4.0

\b
# Convert existing snapshot pickles (e.g. official reconstructions) as they are
python reconstruct_phema.py --indir=downloads --outdir=out --convert

Input pickles are files <prefix>-<kimg>-<std>.pkl; each output is written as
<outdir>/<outprefix>-<kimg>-<std>.pkl, a snapshot loadable by generate_images.py.
For each output the relative fit error of its profile is printed; a large
error (e.g. a std far outside the stds tracked during training) means the
snapshots cannot represent that profile well.

With --format=safetensors an output is <outdir>/<outprefix>-<kimg>-<std>.safetensors
(the EMA network's tensors) plus a .json of the same name (classes, constructor
arguments, EMA profile, sha256 of the weights), and <outdir>/README.md is a model
card listing the exports there; loading that form unpickles nothing. --convert
writes the selected input pickles in that form under their own names, without
reconstruction.
"""


def _std_list(ctx: click.Context, param: click.Parameter, value):
    if value is None:
        return None
    try:
        return parse_std_list(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None


@click.command(epilog=HELP_EXAMPLES)
@click.option('--indir', help='Directory containing the input pickles', metavar='DIR', type=str, required=True)
@click.option('--inprefix', help='Use only inputs whose file-name prefix equals this (needed when --indir holds several prefixes)', metavar='STR', type=str)
@click.option('--instd', help='Use only inputs with these stds, e.g. 0.050,0.100', metavar='LIST',
              type=str, callback=_std_list)
@click.option('--outdir', help='Where to save the reconstructed network pickles', metavar='DIR', type=str,
              required=True)
@click.option('--outprefix', help='Output file-name prefix', metavar='STR', type=str, default='phema',
              show_default=True)
@click.option('--outstd', help='Stds to reconstruct: a,b,c or a range a,b,...,z  [required unless --convert]',
              metavar='LIST', type=str, callback=_std_list)
@click.option('--outkimg', help='Training time of the reconstruction  [default: latest input]', metavar='KIMG',
              type=click.IntRange(min=1))
@click.option('--skip', help='Skip outputs that already exist', is_flag=True)
@click.option('--batch', help='Maximum simultaneous reconstructions (outputs per pass over the inputs)',
              metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--format', 'out_format', help='Output format: network pickles, or .safetensors + .json without pickle',
              type=click.Choice(OUTPUT_FORMATS), default='pkl', show_default=True)
@click.option('--convert', help='Write the input pickles as .safetensors + .json as they are (no reconstruction)',
              is_flag=True)
@click.option('--license', 'license_id', help='License in the model card of a safetensors export, e.g. cc-by-nc-sa-4.0 '
              "for NVIDIA's models", metavar='ID', type=str, default='other', show_default=True)
def cmdline(indir, inprefix, instd, outdir, outprefix, outstd, outkimg, skip, batch, out_format, convert, license_id):
    """Perform post-hoc EMA reconstruction."""
    if convert and outstd is not None:
        raise click.UsageError('--convert writes the input pickles as they are; it takes no --outstd')
    if not convert and outstd is None:
        raise click.UsageError("Missing option '--outstd'.")
    try:
        if convert:
            convert_from_dir(indir=indir, outdir=outdir, inprefix=inprefix, instd=instd, skip=skip, license=license_id)
        else:
            reconstruct_from_dir(indir=indir, outdir=outdir, outstd=outstd, inprefix=inprefix, instd=instd,
                                 outprefix=outprefix, outkimg=outkimg, skip=skip, batch=batch, out_format=out_format,
                                 license=license_id)
    except (PhemaError, SnapshotError, persistence.TrustSettingError, OSError) as err:  # OSError: DownloadError, ...
        raise click.ClickException(str(err)) from None


if __name__ == '__main__':
    cmdline()
