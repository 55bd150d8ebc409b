"""Evaluate a grid of networks x guidance x sampler settings: the library behind `calculate_metrics.py sweep`.

The grid (`SweepConfig.points`, `expand_grid`) has the axes
* main network: post-hoc EMA profiles (EDM2 paper, Karras et al. 2024, Sec. 3 and Appendix) reconstructed
  in memory from power-function EMA snapshots, `{'ema': std, 'kimg': time}`, and/or network pickles,
  `{'pkl': path}`;
* guide: EMA profiles of (other) snapshots, pickles, or None (without a guide, guidance uses the main
  network called without labels, as `calculate_metrics.py gen` does);
* guidance weight and guidance interval; a weight of 1 makes guide and interval irrelevant, so such points
  keep guide None and interval None and are evaluated once;
* sampler options (`num_steps`, ...): each is one more axis, passed to the sampler as a keyword argument;
* repeat r = 0 .. K-1, generating from the disjoint seed sets seed + r*num ... seed + (r+1)*num - 1.

The EMA profiles come from `training.snapshots.reconstruct_phema`'s stream, `ema_batch` profiles per pass
over the snapshots, and each batch is evaluated and dropped before the next pass; memory holds one
snapshot, one batch of profiles and the reconstructed guides (kept, they are few), as
`reconstruct_phema.py --batch` does. Pickles (`--net`, `--gnet`) are loaded by `generate_images` as for
`gen`. Images are generated on the fly (split across ranks under torchrun) and scored with
`calculate_stats_for_network`, `calculate_results` and `precision_recall.calculate_pr_results`.

Results file BASE.jsonl (`ResultsFile`): one JSON object per line and per finished evaluation, appended
(and flushed to disk) as soon as it is finished:

    {"point": {"net": {"ema": 0.1, "kimg": 8}, "guide": null, "guidance": 2.0, "guidance_interval": null,
               "sampler": {"num_steps": 32}, "repeat": 0},
     "setup": {"num": 8, "seed": 0, "metrics": ["fid", "pr"], "refs": ["img512"], "indir": "...", "guide_indir": null},
     "seeds": [0, 7], "num_images": 8, "results": {"fid": {"img512": 3.2}, "precision_inception": {"img512": 0.7}},
     "seconds": 12.5, "finished": "2025-01-31T12:00:00"}

`point` is the key: a rerun skips the points it finds, so a killed sweep loses only the evaluation in
progress (a line cut short by the kill is dropped). `setup` must agree with the current run's on every field
that both set, else the file is refused. `format_report` and `write_plots` turn the file into the table,
the best point per metric, and plots: metric vs EMA length (one line per guidance weight and other setting)
and, for grids of two varying axes, a heatmap.
"""

import dataclasses
import itertools
import json
import math
import os
import re
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from training.evaluation import calculate_metrics as metrics_lib
from training.evaluation import detectors
from training.evaluation import precision_recall as pr_lib
from training.snapshots import reconstruct_phema as phema_lib

PUBLISHED_NUM_IMAGES = 50000  # FID and FD_DINOv2 in the papers: 50,000 generated images
LOWER_IS_BETTER = ('fid', 'fd_dinov2')


class SweepError(metrics_lib.MetricsError):
    """Bad input to a sweep; the message is one line naming the option or file at fault."""

#----------------------------------------------------------------------------
# Configuration and grid.


@dataclasses.dataclass
class EmaSource:
    """Power-function EMA snapshots and the training time at which profiles are reconstructed from them."""
    indir: str
    in_pkls: list
    nimg: int

    @property
    def kimg(self) -> int:
        return self.nimg // 1000


def open_ema_source(indir: str, inprefix: Optional[str] = None, instd: Optional[Sequence[float]] = None,
                    kimg: Optional[int] = None, option: str = '--indir') -> EmaSource:
    """The snapshots of `indir` (as `reconstruct_phema.py --indir` takes them) and the reconstruction time
    (`kimg`, default the latest); errors name `option`."""
    try:
        in_pkls = phema_lib.find_snapshots(indir, inprefix, instd, option=option.replace('indir', 'inprefix'))
        used, nimg = phema_lib.select_inputs(in_pkls, None if kimg is None else phema_lib.kimg_to_nimg(kimg))
    except phema_lib.PhemaError as err:
        raise SweepError(f'{option}: {err}') from None
    return EmaSource(indir=os.path.abspath(indir), in_pkls=used, nimg=nimg)


@dataclasses.dataclass
class SweepConfig:
    out: str                                        # Results base path: BASE.jsonl, BASE-<metric>-*.png.
    metrics: list                                   # Detector metrics, plus 'pr' for precision/recall.
    num: int = 50000                                # Images per evaluation.
    seed: int = 0                                   # First seed of repeat 0.
    repeats: int = 1                                # Disjoint seed sets per point.
    main_ema: list = dataclasses.field(default_factory=list)     # EMA stds reconstructed from ema_source.
    main_nets: list = dataclasses.field(default_factory=list)    # Network pickles.
    ema_source: Optional[EmaSource] = None
    guide_ema: list = dataclasses.field(default_factory=list)
    guide_nets: list = dataclasses.field(default_factory=list)
    guide_source: Optional[EmaSource] = None
    guidance: list = dataclasses.field(default_factory=lambda: [1.0])
    intervals: list = dataclasses.field(default_factory=lambda: [None])  # (lo, hi) or None = every sigma.
    sampler_axes: dict = dataclasses.field(default_factory=lambda: dict(num_steps=[32]))  # kwarg -> values.
    max_batch_size: int = 32                        # Generation batch.
    ema_batch: int = 8                              # EMA profiles per pass over the snapshots.
    save_nets: Optional[str] = None                 # Also write the reconstructed pickles here.

    def main_axis(self) -> list:
        emas = [dict(ema=std, kimg=self.ema_source.kimg) for std in self.main_ema]
        return emas + [_pickle_entry(path) for path in self.main_nets]

    def guide_axis(self) -> list:
        emas = [dict(ema=std, kimg=self.guide_source.kimg) for std in self.guide_ema]
        return (emas + [_pickle_entry(path) for path in self.guide_nets]) or [None]

    def points(self) -> list:
        return expand_grid(self.main_axis(), self.guide_axis(), self.guidance, self.intervals, self.sampler_axes,
                           self.repeats)

    def setup(self, refs: dict) -> dict:
        """What the values depend on besides the point (a rerun must agree); `refs` by name."""
        return dict(num=self.num, seed=self.seed, metrics=list(self.metrics), refs=sorted(refs),
                    indir=self.ema_source.indir if self.ema_source else None,
                    guide_indir=self.guide_source.indir if self.guide_source else None)

    def seeds(self, repeat: int) -> range:
        first = self.seed + repeat * self.num
        return range(first, first + self.num)


def _pickle_entry(path: str) -> dict:
    """{'pkl': absolute path or URL}: the same pickle gives the same key from any working directory."""
    return dict(pkl=path if dnnlib.util.is_url(path) else os.path.abspath(path))


def check_config(cfg: SweepConfig, refs: dict) -> None:
    """Fail before any work: something to evaluate, references for what needs them."""
    if not cfg.main_ema and not cfg.main_nets:
        raise SweepError('give the main networks: --ema (EMA lengths reconstructed from --indir) and/or --net')
    fd_metrics = [m for m in cfg.metrics if m in pr_lib.FEATURE_SPACES]
    if fd_metrics and not refs:
        raise SweepError(f'--ref: give at least one reference for {", ".join(fd_metrics)}')
    pr_lib.check_references(refs, cfg.metrics)
    for option, paths in (('--net', cfg.main_nets), ('--gnet', cfg.guide_nets)):
        missing = [path for path in paths if not dnnlib.util.is_url(path) and not os.path.isfile(path)]
        if missing:
            raise SweepError(f'{option}: {missing[0]} does not exist')
    if cfg.save_nets is not None:
        try:
            misc.check_output_path(cfg.save_nets, '--save-nets', is_dir=True)
        except ValueError as err:
            raise SweepError(str(err)) from None


def expand_grid(mains: Sequence[dict], guides: Sequence[Optional[dict]], guidance: Sequence[float],
                intervals: Sequence[Optional[tuple]], sampler_axes: dict, repeats: int = 1) -> list:
    """Every combination, main network outermost (evaluated together after one reconstruction), repeat
    innermost; points with guidance 1 drop guide and interval, duplicates are removed."""
    points, seen = [], set()
    sampler_names = list(sampler_axes)
    for net, guide, weight, interval, values, repeat in itertools.product(
            mains, guides, guidance, intervals, itertools.product(*sampler_axes.values()), range(repeats)):
        guided = weight != 1
        point = dict(net=net, guide=guide if guided else None, guidance=weight,
                     guidance_interval=list(interval) if guided and interval is not None else None,
                     sampler=dict(zip(sampler_names, values)), repeat=repeat)
        key = point_key(point)
        if key not in seen:
            seen.add(key)
            points.append(point)
    return points


def point_key(point: dict) -> str:
    return json.dumps(point, sort_keys=True)


def _without_repeat(point: dict) -> dict:
    return {k: v for k, v in point.items() if k != 'repeat'}

#----------------------------------------------------------------------------
# Results file.


def results_path(base: str) -> str:
    return f'{base}.jsonl'


class ResultsFile:
    """Append-only JSON lines, one per finished evaluation (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path

    def _data(self) -> bytes:
        if not os.path.isfile(self.path):
            return b''
        with open(self.path, 'rb') as f:
            return f.read()

    def read(self) -> list:
        """The finished evaluations; a last line without its newline (a kill during the append) is left out."""
        records = []
        for number, line in enumerate(self._data().split(b'\n')[:-1], start=1):
            try:
                record = json.loads(line)
            except ValueError:
                raise SweepError(f'{self.path}: line {number} is not JSON; move the file away') from None
            if not isinstance(record, dict) or not isinstance(record.get('point'), dict):
                raise SweepError(f'{self.path}: line {number} is not a sweep result; move the file away')
            records.append(record)
        return records

    def repair(self) -> bool:
        """Cut off a last line left incomplete by a kill; True if there was one."""
        data = self._data()
        if data == b'' or data.endswith(b'\n'):
            return False
        os.truncate(self.path, data.rfind(b'\n') + 1)
        return True

    def append(self, record: dict) -> None:
        """One line, appended and flushed to disk before the next evaluation starts (a line cut short by a
        kill is dropped by `repair`)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, 'ab') as f:
            f.write((json.dumps(record) + '\n').encode('utf-8'))
            f.flush()
            os.fsync(f.fileno())


def check_setup(records: Sequence[dict], setup: dict, path: str) -> None:
    """Refuse results computed with other settings: every field set on both sides must be equal."""
    for record in records:
        for name, value in setup.items():
            old = record.get('setup', {}).get(name)
            if old is not None and value is not None and old != value:
                raise SweepError(f'{path} holds results computed with {name}={json.dumps(old)}, this run has '
                                 f'{json.dumps(value)}; use another --out or the same options')


def finished_keys(records: Sequence[dict]) -> set:
    return {point_key(record['point']) for record in records}


def prepare_results(cfg: SweepConfig, refs: dict, verbose: bool = True) -> None:
    """Rank 0, before any work: results file writable, incomplete last line dropped, same setup."""
    path = results_path(cfg.out)
    try:
        misc.check_output_path(path, '--out')
    except ValueError as err:
        raise SweepError(str(err)) from None
    results = ResultsFile(path)
    if results.repair() and verbose:
        print(f'{path}: dropped an incomplete last line (a sweep killed while writing it)')
    check_setup(results.read(), _json(cfg.setup(refs)), path)


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def pending_points(cfg: SweepConfig) -> list:
    """The points not in the results file yet, in grid order."""
    done = finished_keys(ResultsFile(results_path(cfg.out)).read())
    return [point for point in cfg.points() if point_key(_json(point)) not in done]

#----------------------------------------------------------------------------
# Networks: reconstructed profiles and pickles.


def _outputs(records: Iterator[dnnlib.EasyDict]) -> Iterator[dnnlib.EasyDict]:
    """The reconstructed outputs one at a time, each taken out of its record (so that it is freed once the
    consumer drops it, before the next pass over the snapshots)."""
    for r in records:
        while r.out:
            yield r.out.pop(0)


def _reconstruct(source: EmaSource, stds: list, batch: int, out_dir: Optional[str], verbose: bool) -> Iterator:
    """The reconstructed profiles `stds` one at a time; a bad snapshot met on the way is a SweepError."""
    try:
        yield from _outputs(phema_lib.reconstruct_phema(source.in_pkls, stds, source.nimg, out_dir=out_dir,
                                                        max_batch_size=batch, verbose=verbose))
    except phema_lib.PhemaError as err:
        raise SweepError(str(err)) from None


def _unique(entries: Iterator) -> list:
    return list({point_key(e): e for e in entries if e is not None}.values())


def main_networks(cfg: SweepConfig, points: Sequence[dict], verbose: bool = True) -> Iterator[tuple]:
    """(net entry, network, encoder) for every main network the points use: EMA profiles from the
    streaming reconstruction, `cfg.ema_batch` per pass, each dropped before the next pass; then pickles,
    as (entry, path, None): `generate_images` loads them (with their encoder) as for `gen --net`."""
    needed = _unique(point['net'] for point in points)
    by_std = {entry['ema']: entry for entry in needed if 'ema' in entry}
    if by_std:
        for out in _reconstruct(cfg.ema_source, sorted(by_std), cfg.ema_batch, cfg.save_nets, verbose):
            entry, net, encoder = by_std[out.std], out.net, out.pkl_data.get('encoder')
            del out
            yield entry, net, encoder
            del net, encoder
    for entry in needed:
        if 'pkl' in entry:
            yield entry, entry['pkl'], None


def guide_networks(cfg: SweepConfig, points: Sequence[dict], verbose: bool = True) -> dict:
    """{point_key(guide entry): network} for every guide the points use: EMA profiles reconstructed in one
    pass and kept; pickles as their paths, loaded by `generate_images` as for `gen --gnet`."""
    needed = _unique(point['guide'] for point in points)
    stds = sorted(entry['ema'] for entry in needed if 'ema' in entry)
    guides = dict()
    if stds:
        for out in _reconstruct(cfg.guide_source, stds, len(stds), None, verbose):
            guides[point_key(dict(ema=out.std, kimg=cfg.guide_source.kimg))] = out.net
    for entry in needed:
        if 'pkl' in entry:
            guides[point_key(entry)] = entry['pkl']
    return guides

#----------------------------------------------------------------------------
# Evaluation.


def evaluate_point(net: Any, encoder: Any, gnet: Any, point: dict, cfg: SweepConfig, refs: dict, device: Any,
                   verbose: bool = True) -> Optional[dict]:
    """Collective: generate the point's images on all ranks and score them; rank 0 returns the results
    line (the others None). `net`/`gnet`: modules or pickle paths; guide None with guidance != 1: the main
    network without labels guides."""
    seeds = cfg.seeds(point['repeat'])
    detector_metrics = [m for m in cfg.metrics if m != pr_lib.PR_METRIC]
    interval = point['guidance_interval']
    start = time.time()
    records = metrics_lib.calculate_stats_for_network(
        net, seeds=seeds, gnet=gnet, max_batch_size=cfg.max_batch_size, verbose=False, metrics=detector_metrics,
        device=device, keep_features=pr_lib.feature_metrics(cfg.metrics), encoder=encoder,
        guidance=point['guidance'], guidance_interval=None if interval is None else tuple(interval),
        guide_labels=(gnet is not None), **point['sampler'])
    stats = metrics_lib.run_with_progress(records, verbose=verbose)
    if dist.get_rank() != 0:
        return None
    results = metrics_lib.calculate_results(stats, refs, detector_metrics, verbose=False)['metrics']
    results.update(pr_lib.calculate_pr_results(stats, refs, cfg.metrics, device=device))
    return _json(dict(point=point, setup=cfg.setup(refs), seeds=[seeds[0], seeds[-1]],
                      num_images=stats['num_images'], results=results, seconds=round(time.time() - start, 3),
                      finished=time.strftime('%Y-%m-%dT%H:%M:%S')))


def _guide_of(point: dict, guides: dict) -> Any:
    if point['guidance'] == 1 or point['guide'] is None:
        return None
    return guides[point_key(point['guide'])]


def run_sweep(cfg: SweepConfig, refs: dict, device: Any, verbose: bool = True) -> int:
    """Collective: evaluate every point missing from the results file, appending each result at once (rank 0);
    returns the number of evaluations made. `prepare_results` must have run (rank 0)."""
    todo = pending_points(cfg)
    total = len(cfg.points())
    if verbose:
        dist.print0(f'Sweep: {total} evaluations ({total // cfg.repeats} points x {cfg.repeats} seed sets of '
                    f'{cfg.num} images); {total - len(todo)} finished, {len(todo)} to do')
    if not todo:
        return 0
    results = ResultsFile(results_path(cfg.out))
    guides = guide_networks(cfg, todo, verbose)
    done = 0
    for entry, net, encoder in main_networks(cfg, todo, verbose):
        for point in [p for p in todo if p['net'] == entry]:
            done += 1
            if verbose:
                dist.print0(f'[{total - len(todo) + done}/{total}] {describe_point(point)}')
            record = evaluate_point(net, encoder, _guide_of(point, guides), point, cfg, refs, device, verbose)
            if record is not None:
                results.append(record)
                if verbose:
                    print('    ' + ', '.join(f'{c} = {v:g}' for c, v in flatten_results(record['results']).items()))
        del net, encoder
    dist.barrier()
    return done

#----------------------------------------------------------------------------
# Report.


def net_label(entry: dict) -> str:
    """'ema 0.100' for a reconstructed profile, the file name for a pickle."""
    if 'ema' in entry:
        return f'ema {entry["ema"]:.3f}'
    return os.path.basename(entry['pkl'])


NOT_APPLICABLE = '-'  # guide and interval of an unguided point
LABEL_FREE_GUIDE = 'main (no labels)'  # guidance without a guide network


def _axis_values(point: dict) -> dict:
    """Axis name -> display label of one point, in table order."""
    interval, guided = point['guidance_interval'], point['guidance'] != 1
    guide = NOT_APPLICABLE if not guided else LABEL_FREE_GUIDE if point['guide'] is None else net_label(point['guide'])
    labels = dict(net=net_label(point['net']), guide=guide,
                  guidance=f'{point["guidance"]:g}', interval=NOT_APPLICABLE if not guided else
                  'all' if interval is None else f'{interval[0]:g}-{interval[1]:g}')
    labels.update({name: str(value) for name, value in point['sampler'].items()})
    return labels


def _describe(labels: dict, axes: Optional[Sequence[str]] = None) -> str:
    """'net ema 0.100, guidance 2' for the `axes` (default all) that apply."""
    return ', '.join(f'{name} {value}' for name, value in labels.items()
                     if value != NOT_APPLICABLE and (axes is None or name in axes))


def describe_point(point: dict) -> str:
    return f'{_describe(_axis_values(point))}, seed set {point["repeat"]}'


def flatten_results(results: dict) -> dict:
    """{column: value}: 'fid:img512' for a metric against a reference, 'nima' for a scorer's mean."""
    columns = dict()
    for metric, entry in results.items():
        if metric in detectors.detector_classes and detectors.is_scorer(metric):
            columns[metric] = entry['mu']
        else:
            columns.update({f'{metric}:{ref}': value for ref, value in entry.items()})
    return columns


def lower_is_better(column: str) -> bool:
    return column.split(':')[0] in LOWER_IS_BETTER


def summarize(records: Sequence[dict]) -> list:
    """One row per point (seed sets pooled): {'point', 'repeats', 'columns': {column: {mean, std, min, max, best}}}
    with the sample standard deviation (0 for one seed set) and `best` = min, or max where higher is better."""
    groups = dict()
    for record in records:
        point = _without_repeat(record['point'])
        group = groups.setdefault(point_key(point), dict(point=point, values=dict()))
        for column, value in flatten_results(record['results']).items():
            group['values'].setdefault(column, []).append(value)
    rows = []
    for group in groups.values():
        columns = dict()
        for column, values in group['values'].items():
            v = np.asarray(values, dtype=np.float64)
            columns[column] = dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if v.size > 1 else 0.0,
                                   min=float(v.min()), max=float(v.max()), count=int(v.size))
            columns[column]['best'] = columns[column]['min' if lower_is_better(column) else 'max']
        rows.append(dict(point=group['point'], repeats=max(c['count'] for c in columns.values()), columns=columns))
    return rows


def _axis_labels(rows: Sequence[dict]) -> dict:
    """Axis name -> the distinct labels it takes in `rows` (not-applicable ones left out)."""
    labels = dict()
    for row in rows:
        for name, value in _axis_values(row['point']).items():
            values = labels.setdefault(name, [])
            if value != NOT_APPLICABLE and value not in values:
                values.append(value)
    return labels


def _varying_axes(rows: Sequence[dict]) -> list:
    return [name for name, values in _axis_labels(rows).items() if len(values) > 1]


def _cell(stats: dict, column: str) -> str:
    """'mean' for one seed set; 'mean ±std (min best)' for several (max where higher is better)."""
    if stats['count'] == 1:
        return f'{stats["mean"]:.4g}'
    extreme = 'min' if lower_is_better(column) else 'max'
    return f'{stats["mean"]:.4g} ±{stats["std"]:.2g} ({extreme} {stats["best"]:.4g})'


def _table(rows: Sequence[dict], axes: list, columns: list) -> list:
    header = axes + columns
    body = [[_axis_values(row['point'])[a] for a in axes] +
            [_cell(row['columns'][c], c) if c in row['columns'] else '-' for c in columns]
            for row in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *body)]
    return ['  '.join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header] + body]


def report_columns(rows: Sequence[dict]) -> list:
    return list(dict.fromkeys(c for row in rows for c in row['columns']))


def best_rows(rows: Sequence[dict]) -> dict:
    """Column -> the row with the best mean over its seed sets."""
    best = dict()
    for column in report_columns(rows):
        candidates = [row for row in rows if column in row['columns']]
        sign = 1 if lower_is_better(column) else -1
        best[column] = min(candidates, key=lambda row: sign * row['columns'][column]['mean'])
    return best


def format_report(records: Sequence[dict], path: str = '') -> str:
    """The table (one row per point), the best point per metric, and notes on noise and comparability."""
    if not records:
        return f'No finished evaluations in {path} yet.'
    rows = summarize(records)
    setup = records[0].get('setup', {})
    axes = _varying_axes(rows) or ['net']
    fixed = {name: values[0] for name, values in _axis_labels(rows).items() if name not in axes and values}
    repeats = max(row['repeats'] for row in rows)
    lines = [f'Sweep results {path}: {len(records)} evaluations, {len(rows)} points, {setup.get("num")} images each'
             + (f'; fixed: {", ".join(f"{k} {v}" for k, v in fixed.items())}' if fixed else '')]
    lines += _table(rows, axes, report_columns(rows))
    lines += ['', 'Best point per metric (by the mean over its seed sets):']
    for column, row in best_rows(rows).items():
        where = _describe(_axis_values(row['point']), axes)
        lines.append(f'  {column} = {_cell(row["columns"][column], column)} at {where}')
    lines += [''] + _notes(setup, repeats)
    return '\n'.join(lines)


def _notes(setup: dict, repeats: int) -> list:
    notes = []
    if repeats > 1:
        notes.append(f'Cells: mean ±standard deviation over {repeats} disjoint seed sets, then the best of them '
                     '(min for FID/FD_DINOv2). The EDM2 and Autoguidance papers report the minimum over their '
                     'evaluations; the standard deviation is the seed noise to compare differences against.')
    num = setup.get('num')
    if num is not None and num < PUBLISHED_NUM_IMAGES:
        notes.append(f'{num} images per evaluation (fewer than {PUBLISHED_NUM_IMAGES:,}): the values are proxies, '
                     'biased by the sample size, and not comparable with published numbers.')
    if pr_lib.PR_METRIC in setup.get('metrics', []):
        notes.append(f'Precision/recall: Kynkaanniemi et al. 2019, k-NN manifolds with k = {pr_lib.DEFAULT_K}.')
    return notes

#----------------------------------------------------------------------------
# Plots.


def _file_name(column: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.-]+', '-', column)


def _save_figure(fig: Any, path: str) -> str:
    import matplotlib.pyplot as plt
    try:
        with misc.atomic_open(path, 'wb') as f:
            fig.savefig(f, format='png', bbox_inches='tight')
    finally:
        plt.close(fig)
    return path


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_vs_ema(rows: Sequence[dict], column: str, path: str) -> Optional[str]:
    """Metric vs main EMA length, one line per setting of the other varying axes (guidance weight first);
    error bars = standard deviation over the seed sets. None if fewer than two EMA lengths have values."""
    rows = [row for row in rows if 'ema' in row['point']['net'] and column in row['columns']]
    if len({row['point']['net']['ema'] for row in rows}) < 2:
        return None
    others = [a for a in _varying_axes(rows) if a != 'net']
    lines = dict()
    for row in sorted(rows, key=lambda r: r['point']['net']['ema']):
        label = _describe(_axis_values(row['point']), others) or column
        lines.setdefault(label, []).append(row)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, line in lines.items():
        stats = [row['columns'][column] for row in line]
        ax.errorbar([row['point']['net']['ema'] for row in line], [s['mean'] for s in stats],
                    yerr=[s['std'] for s in stats], marker='o', capsize=3, label=label)
    ax.set_xlabel('EMA length (relative standard deviation)')
    ax.set_ylabel(column)
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
    return _save_figure(fig, path)


def plot_heatmap(rows: Sequence[dict], column: str, path: str) -> Optional[str]:
    """Mean metric over a grid of exactly two varying axes (the first down, the second across); else None."""
    rows = [row for row in rows if column in row['columns']]
    axes = _varying_axes(rows)
    if len(axes) != 2:
        return None
    labels = [_axis_values(row['point']) for row in rows]
    ys, xs = (list(dict.fromkeys(label[a] for label in labels)) for a in axes)
    grid = np.full([len(ys), len(xs)], np.nan)
    for row, label in zip(rows, labels):
        grid[ys.index(label[axes[0]]), xs.index(label[axes[1]])] = row['columns'][column]['mean']
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 0.5 * len(ys) + 2))
    image = ax.imshow(grid, cmap='viridis_r' if lower_is_better(column) else 'viridis', aspect='auto')
    for (i, j), value in np.ndenumerate(grid):
        if not math.isnan(value):
            ax.text(j, i, f'{value:.3g}', ha='center', va='center', fontsize='small',
                    bbox=dict(facecolor='white', alpha=0.6, linewidth=0))
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(axes[1])
    ax.set_ylabel(axes[0])
    ax.set_title(column)
    fig.colorbar(image, ax=ax)
    return _save_figure(fig, path)


def write_plots(records: Sequence[dict], base: str) -> list:
    """BASE-<column>-vs-ema.png and BASE-<column>-heatmap.png for every metric column where they apply."""
    rows = summarize(records)
    written = []
    for column in report_columns(rows):
        name = _file_name(column)
        written.append(plot_vs_ema(rows, column, f'{base}-{name}-vs-ema.png'))
        written.append(plot_heatmap(rows, column, f'{base}-{name}-heatmap.png'))
    return [path for path in written if path is not None]


def report(base: str) -> str:
    """Rank 0: print the report of the results file BASE.jsonl so far and write its plots; returns the text."""
    records = ResultsFile(results_path(base)).read()
    text = format_report(records, results_path(base))
    print(text)
    for path in write_plots(records, base) if records else []:
        print(f'Saved {path}')
    return text
