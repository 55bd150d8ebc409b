"""Post-hoc EMA reconstruction from saved snapshots (EDM2 paper, Sec. 3).

Given snapshots of power-function EMAs taken at several training times, any
other power-function EMA profile (std, time) is approximated by a linear
combination theta_out = sum_i X[i] theta_in_i, X from
training.phema.solve_posthoc_coefficients.

Outputs are snapshot pickles, or with out_format='safetensors' the pickle-free form of
training/snapshots/safetensors_format.py (`convert_from_dir` writes existing snapshots that way).

Streaming: outputs are reconstructed in batches; each batch reads every input
pickle exactly once and keeps one input network plus one float32 accumulator
per output in memory, whatever the number of snapshots. The stream yields the
reconstructed networks in memory (used as they are by `calculate_metrics.py
sweep`); writing them as pickles (`reconstruct_phema.py`) is one consumer of it.
"""

from __future__ import annotations

import copy
import math
import os
import re
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from training import phema
from training.snapshots.loading import check_power_function_snapshot, load_snapshot
from training.snapshots import safetensors_format

# A reconstructed profile whose relative L2 fit error exceeds this is reported as poor.
POOR_FIT_ERROR = 0.10


class PhemaError(ValueError):
    """Bad input to the reconstruction; the message is one line naming the culprit."""


#----------------------------------------------------------------------------
# Std lists: "0.050,0.100" or "0.010,0.015,...,0.250" (docs/differences.md#phema-1).


def _parse_float(token: str) -> float:
    try:
        return float(token)
    except ValueError:
        shown = token.encode('unicode_escape').decode('ascii')  # Keep the error message on one line.
        raise ValueError(f'"{shown}" is not a float') from None


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


MAX_ELLIPSIS_ITEMS = 100_000  # More is a typo; refused before it fills the memory.


def _expand_ellipsis(raw: list[str], i: int) -> list[float]:
    """Values strictly between raw[i-1] and raw[i+1] for the '...' at position i."""
    if i < 2 or not _is_float(raw[i - 1]) or not _is_float(raw[i - 2]):
        raise ValueError("'...' must be preceded by at least two floats")
    if i + 1 >= len(raw) or not _is_float(raw[i + 1]):
        raise ValueError("'...' must be followed by at least one float")
    a, b, end = float(raw[i - 2]), float(raw[i - 1]), float(raw[i + 1])
    if a == b:
        raise ValueError("The floats preceding '...' must not be equal")
    step = b - a
    approx = (end - b) / step - 1
    if not math.isfinite(approx) or approx > MAX_ELLIPSIS_ITEMS:
        raise ValueError(f"'...' would expand to too many values (more than {MAX_ELLIPSIS_ITEMS})")
    num = round(approx)
    if num <= 0:
        raise ValueError("'...' must correspond to a non-empty interval")
    if abs(num - approx) > 1e-4:
        raise ValueError("'...' must correspond to an evenly spaced interval")
    # Round away the float noise of b + step*k so that e.g. 0.035 stays 0.035.
    return [round(b + step * (j + 1), 12) for j in range(num)]


def parse_float_list(s: str) -> list[float]:
    """Parse a comma-separated float list where '...' continues an arithmetic progression
    ('1,1.5,...,3' -> 1, 1.5, 2, 2.5, 3); returns sorted unique values. Raises ValueError with a
    one-line message."""
    raw = [token.strip() for token in str(s).split(',')]
    if raw == ['']:
        raise ValueError('empty list')
    values = []
    for i, token in enumerate(raw):
        values += _expand_ellipsis(raw, i) if token == '...' else [_parse_float(token)]
    return sorted(set(values))


def parse_std_list(s: str | Sequence[float]) -> list[float]:
    """Parse a comma-separated std list where '...' continues an arithmetic
    progression; returns sorted unique values in (0, MAX_STD). Lists pass
    through unchanged. Raises ValueError with a one-line message."""
    if isinstance(s, (list, tuple)):
        return list(s)
    values = parse_float_list(s)
    for v in values:
        if not 0 < v < phema.MAX_STD:
            raise ValueError(f'Relative standard deviation must be positive and less than {phema.MAX_STD} (got {v})')
    return values


#----------------------------------------------------------------------------
# File names and discovery (docs/formats.md#file-names).

_PICKLE_NAME = re.compile(r'(.*)-(\d+)-(\d+\.\d+)\.pkl')


def kimg_to_nimg(kimg: int) -> int:
    """Snapshot times are multiples of 1024 images and names carry nimg // 1000;
    invert that. Falls back to kimg*1000 when no multiple of 1024 matches."""
    nimg = (kimg * 1000 + 999) // 1024 * 1024
    return nimg if nimg // 1000 == kimg else kimg * 1000


def pickle_path(directory: str, prefix: str, nimg: int, std: float) -> str:
    """<directory>/<prefix>-<kimg:07d>-<std:.3f>.pkl (joined with '/' for URLs)."""
    name = f'{prefix}-{nimg // 1000:07d}-{std:.3f}.pkl'
    if dnnlib.util.is_url(directory):
        return f'{directory.rstrip("/")}/{name}'
    return os.path.join(directory, name)


OUTPUT_FORMATS = ('pkl', 'safetensors')


def output_path(directory: str, prefix: str, nimg: int, std: float, out_format: str = 'pkl') -> str:
    """pickle_path, or for out_format='safetensors' the same name ending in .safetensors."""
    path = pickle_path(directory, prefix, nimg, std)
    return path if out_format == 'pkl' else path[:-len('.pkl')] + safetensors_format.WEIGHTS_SUFFIX


def _output_done(path: str) -> bool:
    """A pickle is written atomically; an export is complete once its .json, written last, exists."""
    if safetensors_format.is_export_path(path):
        path = safetensors_format.export_paths(path)[1]
    return os.path.isfile(path)


def _write_output(data: dict, path: str, nimg: int, std: float, license: str) -> None:
    if not safetensors_format.is_export_path(path):
        persistence.save_pickle(data, path)
        return
    try:
        safetensors_format.save_snapshot_safetensors(data, path, ema_profile=dict(std=std, nimg=nimg), license=license)
    except safetensors_format.ExportError as err:
        raise PhemaError(str(err)) from None


def list_input_pickles(in_dir: str, in_std: Sequence[float] | None = None,
                       in_prefix: str | None = None) -> list[dnnlib.EasyDict]:
    """Snapshots in `in_dir` (non-recursive) named <prefix>-<kimg>-<std>.pkl,
    filtered by exact prefix and by std, sorted by (nimg, std).
    Each item is EasyDict(path, prefix, nimg, std)."""
    if not os.path.isdir(in_dir):
        raise PhemaError(f'Input directory does not exist: {in_dir}')
    found = []
    for entry in os.scandir(in_dir):
        m = _PICKLE_NAME.fullmatch(entry.name)
        if not m or not entry.is_file():
            continue
        prefix, kimg, std = m.group(1), int(m.group(2)), float(m.group(3))
        if in_prefix is not None and prefix != in_prefix:
            continue
        if in_std is not None and not any(abs(std - s) < 5e-7 for s in in_std):
            continue
        found.append(dnnlib.EasyDict(path=entry.path, prefix=prefix, nimg=kimg_to_nimg(kimg), std=std))
    return sorted(found, key=lambda pkl: (pkl.nimg, pkl.std))


#----------------------------------------------------------------------------
# Planning: which inputs, which outputs, in which batches.


def select_inputs(in_pkls: Sequence[Any], out_nimg: int | None) -> tuple[list[Any], int]:
    """The inputs a reconstruction at `out_nimg` (None: the latest input) uses, and that time."""
    if len(in_pkls) == 0:
        raise PhemaError('No input pickles found')
    all_nimg = sorted({pkl.nimg for pkl in in_pkls})
    if out_nimg is None:
        out_nimg = all_nimg[-1]
    if out_nimg > all_nimg[-1]:
        raise PhemaError(f'Reconstruction time kimg {out_nimg // 1000} is beyond the last input pickle (kimg {all_nimg[-1] // 1000})')
    if out_nimg not in all_nimg:
        kimgs = ', '.join(str(n // 1000) for n in all_nimg)
        raise PhemaError(f'Reconstruction time kimg {out_nimg // 1000} must match one of the input pickles (kimg {kimgs})')
    used = [pkl for pkl in in_pkls if 0 < pkl.nimg <= out_nimg]
    if len(used) == 0:
        raise PhemaError('No valid input pickles found (snapshots at kimg 0 are never used)')
    _check_unique(used)
    return used, out_nimg


def _check_unique(in_pkls: Sequence[Any]) -> None:
    seen = {}
    for pkl in in_pkls:
        key = (pkl.nimg, round(pkl.std, 6))
        if key in seen:
            raise PhemaError(f'Two input pickles for kimg {pkl.nimg // 1000}, std {pkl.std:.3f}: '
                             f'{seen[key]} and {pkl.path} (select one set with --inprefix)')
        seen[key] = pkl.path


def _select_outputs(out_std, out_nimg, out_dir, out_prefix, skip_existing, out_format) -> list[float]:
    stds = [float(out_std)] if np.ndim(out_std) == 0 else sorted({float(s) for s in out_std})
    if len(stds) == 0:
        raise PhemaError('No output stds requested')
    for std in stds:
        if not 0 < std < phema.MAX_STD:
            raise PhemaError(f'Output std {std} must be positive and less than {phema.MAX_STD}')
    if skip_existing and out_dir is not None:
        todo = [std for std in stds if not _output_done(output_path(out_dir, out_prefix, out_nimg, std, out_format))]
        stds = todo # may be empty: a finished job re-run with --skip has nothing to do (docs/differences.md#phema-2)
    return stds


def _check_out_dir(out_dir: str, label: str, out_format: str = 'pkl', license: str = 'other') -> None:
    """Fail before the long pass over the inputs when out_dir cannot be used or created, or (safetensors)
    when its model card cannot be written; creates nothing."""
    try:
        misc.check_output_path(out_dir, label, is_dir=True)
        if out_format == 'safetensors':
            safetensors_format.check_model_card(out_dir, license)
    except ValueError as err:
        raise PhemaError(str(err)) from None


def _split_batches(stds: list[float], max_batch_size: int) -> list[list[int]]:
    """Indices of `stds` in nearly equal consecutive chunks (numpy array_split semantics)."""
    num_batches = (len(stds) - 1) // max_batch_size + 1
    return [chunk.tolist() for chunk in np.array_split(np.arange(len(stds)), num_batches)]


#----------------------------------------------------------------------------
# Streaming accumulation.


def _network_signature(net: torch.nn.Module) -> list[tuple[str, tuple]]:
    named = list(net.named_parameters()) + list(net.named_buffers())
    return [(type(net).__name__, ())] + [(name, tuple(t.shape)) for name, t in named]


def _load_input(path: str, reference: dict) -> dict:
    """Load one input snapshot and check it matches the first input's architecture."""
    data = load_snapshot(path, '--indir')
    check_power_function_snapshot(data, path, '--indir')
    signature = _network_signature(data['ema'])
    if 'signature' not in reference:
        reference.update(signature=signature, path=path)
    elif signature != reference['signature']:
        diff = next((a, b) for a, b in zip(signature + [None], reference['signature'] + [None]) if a != b)
        raise PhemaError(f'{path}: network architecture differs from {reference["path"]} '
                         f'({diff[0]} vs {diff[1]})')
    return data


def _params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in net.parameters()]


@torch.no_grad()
def _accumulate(accs: list | None, net: torch.nn.Module, coefs_row: np.ndarray) -> list:
    """theta_out_j += X[i,j] theta_in_i for every output j, in place in float32
    (no full-size temporaries: the float16 input is widened inside the kernel)."""
    params = _params(net)
    if accs is None:
        accs = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _coef in coefs_row]
    for acc, coef in zip(accs, coefs_row):
        torch._foreach_add_(acc, params, alpha=float(coef))
    return accs


@torch.no_grad()
def _finish_output(first: dict, data: dict, acc: list[torch.Tensor], reuse_net: bool) -> dict:
    """Snapshot dict for one output (docs/formats.md#post-hoc-ema-reconstructions): the first input's entries (`encoder`,
    `dataset_kwargs`, `loss_fn`, ...), with an `ema` built from the last input's network
    (so the last input's buffers win) carrying the accumulated parameters in float16."""
    net = data['ema'] if reuse_net else copy.deepcopy(data['ema'])
    net.to(torch.float16)
    torch._foreach_copy_(_params(net), acc)
    return type(first)((key, net if key == 'ema' else copy.deepcopy(value)) for key, value in first.items())


def _reconstruct_batch(in_pkls, coefs, batch_stds, out_nimg, step0, num_steps):
    """One pass over the inputs for one batch of outputs; yields progress records, the last one
    carrying the reconstructed outputs (in memory; `_save_outputs` writes them)."""
    accs, data, first, reference = None, None, None, {}
    for i, pkl in enumerate(in_pkls):
        data = None  # drop the previous input before loading the next one
        data = _load_input(pkl.path, reference)
        if first is None:  # everything but the network is small: keep the first input's entries
            first = type(data)((key, None if key == 'ema' else copy.deepcopy(value)) for key, value in data.items())
        accs = _accumulate(accs, data['ema'], coefs[i])
        if i < len(in_pkls) - 1:
            yield dnnlib.EasyDict(step_idx=step0 + i, num_steps=num_steps, out=[])
    out = []
    for j, std in enumerate(batch_stds):
        pkl_data = _finish_output(first, data, accs[j], reuse_net=(j == len(batch_stds) - 1))
        accs[j] = None
        out.append(dnnlib.EasyDict(net=pkl_data['ema'], nimg=out_nimg, std=std, pkl_data=pkl_data, pkl_path=None))
    yield dnnlib.EasyDict(step_idx=step0 + len(in_pkls) - 1, num_steps=num_steps, out=out)


def _save_outputs(records: Iterator[dnnlib.EasyDict], out_dir: str, out_prefix: str, out_format: str,
                  license: str) -> Iterator[dnnlib.EasyDict]:
    """Consumer of the reconstruction stream: write every output as <out_dir>/<prefix>-<kimg>-<std>.pkl (or
    .safetensors + .json) and fill in its `pkl_path`; the records are passed on."""
    for r in records:
        for out in r.out:
            out.pkl_path = output_path(out_dir, out_prefix, out.nimg, out.std, out_format)
            try:
                os.makedirs(out_dir, exist_ok=True)
            except OSError as err:  # checked up front; this covers a directory changed during the pass
                raise PhemaError(f'Cannot create output directory {out_dir}: {err.strerror}') from None
            _write_output(out.pkl_data, out.pkl_path, out.nimg, out.std, license)
        yield r


def _print_plan(in_pkls, out_stds, batches, fit_errors, out_dir, out_prefix, out_nimg, out_format) -> None:
    print(f'Loading {len(in_pkls)} input pickles...')
    for pkl in in_pkls:
        print('    ' + pkl.path)
    print(f'Reconstructing {len(out_stds)} output pickles in {len(batches)} batches...')
    for batch_idx, batch in enumerate(batches):
        for j in batch:
            where = output_path(out_dir, out_prefix, out_nimg, out_stds[j], out_format) if out_dir is not None else '<yield>'
            print(f'    batch {batch_idx}: {where}  (fit error {fit_errors[j]:.2%})')
    for warning in fit_warnings(in_pkls, out_stds, fit_errors):
        print(warning)


def fit_warnings(in_pkls: Sequence[Any], out_stds: Sequence[float], fit_errors: Sequence[float]) -> list[str]:
    """One warning line per output whose profile the inputs represent poorly."""
    lo, hi = min(pkl.std for pkl in in_pkls), max(pkl.std for pkl in in_pkls)
    warnings = []
    for std, err in zip(out_stds, fit_errors):
        if err > POOR_FIT_ERROR:
            span = f'inputs track std {lo:.3f}' + (f'-{hi:.3f}' if hi != lo else '')
            warnings.append(f'Warning: std {std:.3f} is poorly represented by the input pickles '
                            f'(relative fit error {err:.1%}; {span})')
    return warnings


def reconstruct_phema(in_pkls: Sequence[Any], out_std: float | Sequence[float], out_nimg: int | None = None,
                      out_dir: str | None = None, out_prefix: str = 'phema', skip_existing: bool = False,
                      max_batch_size: int = 8, verbose: bool = True, out_format: str = 'pkl',
                      license: str = 'other') -> Iterator[dnnlib.EasyDict]:
    """Reconstruct post-hoc EMA profiles `out_std` at time `out_nimg` (default:
    latest input) from `in_pkls` (items with .path, .nimg, .std, e.g. from
    list_input_pickles). Validates eagerly (PhemaError), then returns an iterator
    of records EasyDict(step_idx, num_steps, out); `out` lists
    EasyDict(net, nimg, std, pkl_data, pkl_path) when a batch finishes.
    `out_format` 'safetensors' writes each output as .safetensors + .json with a
    model card under `license` (safetensors_format.save_snapshot_safetensors)."""
    if out_format not in OUTPUT_FORMATS:
        raise PhemaError(f'Output format {out_format!r} is not one of {", ".join(OUTPUT_FORMATS)}')
    if out_dir is not None:
        _check_out_dir(out_dir, 'Output directory', out_format, license)
    return _plan_and_iterate(in_pkls, out_std, out_nimg, out_dir, out_prefix, skip_existing, max_batch_size, verbose,
                             out_format, license)


def _plan_and_iterate(in_pkls, out_std, out_nimg, out_dir, out_prefix, skip_existing, max_batch_size, verbose,
                      out_format, license):
    """reconstruct_phema after its out_dir check (which reconstruct_from_dir makes itself, naming --outdir)."""
    if max_batch_size < 1:
        raise PhemaError(f'Batch size must be at least 1 (got {max_batch_size})')
    in_pkls, out_nimg = select_inputs(in_pkls, out_nimg)
    out_stds = _select_outputs(out_std, out_nimg, out_dir, out_prefix, skip_existing, out_format)
    if len(out_stds) == 0:
        if verbose:
            print(f'All requested output pickles already exist in {out_dir} (--skip); nothing to do')
        return iter(())
    batches = _split_batches(out_stds, max_batch_size)
    in_nimg = [pkl.nimg for pkl in in_pkls]
    in_std = [pkl.std for pkl in in_pkls]
    # All coefficients in one solve, so the result does not depend on the batching.
    coefs = phema.solve_posthoc_coefficients(in_nimg, in_std, out_nimg, out_stds)
    fit_errors = phema.posthoc_fit_error(in_nimg, in_std, out_nimg, out_stds, coefs=coefs)
    if verbose:
        _print_plan(in_pkls, out_stds, batches, fit_errors, out_dir, out_prefix, out_nimg, out_format)
    records = _iterate_batches(in_pkls, coefs, out_stds, batches, out_nimg)
    return records if out_dir is None else _save_outputs(records, out_dir, out_prefix, out_format, license)


def _iterate_batches(in_pkls, coefs, out_stds, batches, out_nimg):
    num_steps = len(batches) * len(in_pkls)
    for batch_idx, batch in enumerate(batches):
        yield from _reconstruct_batch(in_pkls, coefs[:, batch], [out_stds[j] for j in batch], out_nimg,
                                      batch_idx * len(in_pkls), num_steps)


#----------------------------------------------------------------------------
# Command-line driver used by reconstruct_phema.py.


def _check_single_prefix(in_pkls: Sequence[Any], indir: str, option: str = '--inprefix') -> None:
    """Refuse a mix such as network-snapshot-* and phema-*: earlier reconstructions are only
    approximations of power-function EMAs, and entering them as exact ones distorts the fit."""
    prefixes = sorted({pkl.prefix for pkl in in_pkls})
    if len(prefixes) > 1:
        raise PhemaError(f'{indir} holds input pickles with {len(prefixes)} prefixes ({", ".join(prefixes)}); '
                         f'choose one with {option} (usually network-snapshot; reconstructions are not '
                         'power-function EMAs and would distort the fit)')


def find_snapshots(indir: str, inprefix: str | None = None, instd: Sequence[float] | None = None,
                   option: str = '--inprefix') -> list[dnnlib.EasyDict]:
    """The power-function EMA snapshots of `indir` (list_input_pickles), refusing an empty selection
    and a mix of prefixes (`option` is the option that selects one)."""
    in_pkls = list_input_pickles(indir, in_std=instd, in_prefix=inprefix)
    if len(in_pkls) == 0:
        filters = ''.join([f' with prefix "{inprefix}"' if inprefix is not None else '',
                           f' with std in {list(instd)}' if instd is not None else ''])
        raise PhemaError(f'No input pickles named <prefix>-<kimg>-<std>.pkl found in {indir}{filters}')
    _check_single_prefix(in_pkls, indir, option)
    return in_pkls


def _find_inputs(indir: str, inprefix: str | None, instd: Sequence[float] | None) -> list[dnnlib.EasyDict]:
    """find_snapshots for a command line run, which is a single process."""
    try:
        dist.check_single_process('reconstruct_phema.py')
    except ValueError as err:
        raise PhemaError(str(err)) from None
    return find_snapshots(indir, inprefix, instd)


def _with_progress(records: Iterator[dnnlib.EasyDict], desc: str) -> list[str]:
    """Drain progress records behind a progress bar; returns the written paths."""
    written, bar = [], None
    try:
        for r in records:
            bar = bar or tqdm.tqdm(total=r.num_steps, unit='step', desc=desc)
            bar.update(1)
            written += [out.pkl_path for out in r.out]
    finally:
        if bar is not None:
            bar.close()
    print('Done.')
    return written


def reconstruct_from_dir(indir: str, outdir: str, outstd: Sequence[float], inprefix: str | None = None,
                         instd: Sequence[float] | None = None, outprefix: str = 'phema', outkimg: int | None = None,
                         skip: bool = False, batch: int = 8, out_format: str = 'pkl',
                         license: str = 'other') -> list[str]:
    """Discover snapshots in `indir`, reconstruct `outstd` at `outkimg` into
    `outdir` (as `out_format`) with a progress bar; returns the written paths."""
    in_pkls = _find_inputs(indir, inprefix, instd)
    # Before the first pass over the inputs, which can take hours.
    _check_out_dir(outdir, '--outdir', out_format, license)
    out_nimg = None if outkimg is None else kimg_to_nimg(outkimg)
    records = _plan_and_iterate(in_pkls, outstd, out_nimg, outdir, outprefix, skip, batch, True, out_format, license)
    return _with_progress(records, 'Reconstructing')


def _convert_records(in_pkls: Sequence[Any], outdir: str, skip: bool, license: str) -> Iterator[dnnlib.EasyDict]:
    for i, pkl in enumerate(in_pkls):
        path = os.path.join(outdir, os.path.basename(pkl.path)[:-len('.pkl')] + safetensors_format.WEIGHTS_SUFFIX)
        out = []
        if not (skip and _output_done(path)):
            _write_output(_load_input(pkl.path, {}), path, pkl.nimg, pkl.std, license)
            out = [dnnlib.EasyDict(pkl_path=path)]
        yield dnnlib.EasyDict(step_idx=i, num_steps=len(in_pkls), out=out)


def convert_from_dir(indir: str, outdir: str, inprefix: str | None = None, instd: Sequence[float] | None = None,
                     skip: bool = False, license: str = 'other') -> list[str]:
    """Write each snapshot pickle found in `indir` (filtered as for a reconstruction) as
    <outdir>/<same name>.safetensors + .json, its EMA profile taken from the name, without
    reconstruction; with `skip`, complete exports are kept. Returns the written paths."""
    in_pkls = _find_inputs(indir, inprefix, instd)
    _check_out_dir(outdir, '--outdir', 'safetensors', license)
    print(f'Converting {len(in_pkls)} input pickles to {outdir}...')
    return _with_progress(_convert_records(in_pkls, outdir, skip, license), 'Converting')
