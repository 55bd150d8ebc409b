"""training.evaluation.sweep without networks: grid, results file, resume bookkeeping, report and plots."""

import json
import os

import numpy as np
import PIL.Image
import pytest

from training.evaluation import sweep


def ema(std, kimg=8):
    return dict(ema=std, kimg=kimg)


def test_grid_expansion():
    points = sweep.expand_grid([ema(0.05), ema(0.1), dict(pkl='a.pkl')], [ema(0.1, 4), dict(pkl='g.pkl')],
                               [1, 2.0], [None, (0.3, 2.9)], dict(num_steps=[16, 32], solver=['heun']), repeats=2)
    # Guidance 1: guide and interval do not matter, one point per net x sampler setting; else the full product.
    assert len(points) == 3 * 2 * 2 + 3 * (2 * 2 * 2) * 2
    unguided = [p for p in points if p['guidance'] == 1]
    assert all(p['guide'] is None and p['guidance_interval'] is None for p in unguided) and len(unguided) == 12
    assert len({sweep.point_key(p) for p in points}) == len(points)
    assert points[0] == dict(net=ema(0.05), guide=None, guidance=1, guidance_interval=None,
                             sampler=dict(num_steps=16, solver='heun'), repeat=0)
    assert [p['net'] for p in points[:len(points) // 3]] == [ema(0.05)] * (len(points) // 3)  # net outermost
    assert {tuple(p['guidance_interval'] or ()) for p in points} == {(), (0.3, 2.9)}


def test_config_points_and_seeds():
    source = sweep.EmaSource(indir='/run', in_pkls=[], nimg=8192)
    cfg = sweep.SweepConfig(out='x', metrics=['fid'], num=10, seed=5, repeats=3, main_ema=[0.05, 0.1],
                            ema_source=source, guidance=[1, 2])
    assert len(cfg.points()) == 2 * 2 * 3 and cfg.points()[0]['net'] == dict(ema=0.05, kimg=8)
    assert [list(cfg.seeds(r)) for r in range(3)] == [list(range(5, 15)), list(range(15, 25)), list(range(25, 35))]
    assert cfg.setup(dict(b=1, a=2)) == dict(num=10, seed=5, metrics=['fid'], refs=['a', 'b'], indir='/run',
                                             guide_indir=None)


def record(point, values, num=8, metrics=('fid', 'nima'), repeat=0):
    results = dict(fid=dict(ref=values[0]), nima=dict(mu=values[1], sigma=0.1, variance=0.01, histogram=[]))
    if len(values) > 2:
        results['precision_inception'] = dict(ref=values[2])
    return dict(point=dict(point, repeat=repeat), setup=dict(num=num, seed=0, metrics=list(metrics), refs=['ref']),
                results=results)


def grid_records(repeats=1, num=8):
    """3 EMA lengths x 2 guidance weights, fid = 10 * |ema - 0.1| + guidance + repeat / 10."""
    records = []
    for std in (0.05, 0.1, 0.15):
        for weight in (1, 2):
            point = dict(net=ema(std), guide=None, guidance=weight, guidance_interval=None, sampler=dict(num_steps=32))
            for r in range(repeats):
                fid = 10 * abs(std - 0.1) + weight + r / 10
                records.append(record(point, [fid, 5 - fid, 0.5 + std], num=num, repeat=r))
    return records


def test_results_file_append_read_repair(tmp_path):
    path = str(tmp_path / 'sub' / 'sweep.jsonl')
    results = sweep.ResultsFile(path)
    assert results.read() == [] and not results.repair()
    for rec in grid_records()[:2]:
        results.append(rec)
    assert results.read() == grid_records()[:2]
    with open(path, 'ab') as f:  # a kill during the append
        f.write(b'{"point": {"net"')
    assert results.read() == grid_records()[:2]  # the partial line is not a result
    assert results.repair() and not results.repair()
    assert open(path, 'rb').read().endswith(b'}\n') and len(results.read()) == 2
    with open(path, 'ab') as f:
        f.write(b'garbage\n')
    with pytest.raises(sweep.SweepError, match='line 3 is not JSON'):
        results.read()


def test_setup_must_agree(tmp_path):
    records = grid_records()
    setup = dict(records[0]['setup'], indir='/run')
    sweep.check_setup(records, setup, 'r.jsonl')  # a field set on one side only does not conflict
    with pytest.raises(sweep.SweepError, match='r.jsonl holds results computed with num=8, this run has 16'):
        sweep.check_setup(records, dict(setup, num=16), 'r.jsonl')
    assert len(sweep.finished_keys(records)) == 6


def test_summary_statistics():
    rows = sweep.summarize(grid_records(repeats=3))
    assert len(rows) == 6 and all(row['repeats'] == 3 for row in rows)
    fid = rows[0]['columns']['fid:ref']  # ema 0.05, guidance 1: 1.5, 1.6, 1.7
    assert fid['mean'] == pytest.approx(1.6) and fid['min'] == pytest.approx(1.5) and fid['best'] == fid['min']
    assert fid['std'] == pytest.approx(np.std([1.5, 1.6, 1.7], ddof=1))
    nima = rows[0]['columns']['nima']  # higher is better: best = max
    assert nima['best'] == nima['max'] == pytest.approx(3.5)
    best = sweep.best_rows(rows)
    assert best['fid:ref']['point']['net'] == ema(0.1) and best['fid:ref']['point']['guidance'] == 1
    assert best['precision_inception:ref']['point']['net'] == ema(0.15)


def test_report_text():
    text = sweep.format_report(grid_records(repeats=2), 'r.jsonl')
    lines = text.splitlines()
    assert lines[1].split() == ['net', 'guidance', 'fid:ref', 'nima', 'precision_inception:ref']
    assert lines[0].endswith('fixed: guide main (no labels), interval all, num_steps 32')
    assert '  fid:ref = 1.05 ±0.071 (min 1) at net ema 0.100, guidance 1' in lines
    assert 'minimum' in text and 'not comparable with published numbers' in text
    one = sweep.format_report(grid_records(num=50000), 'r.jsonl')
    assert 'not comparable' not in one and '±' not in one and 'minimum' not in one
    assert sweep.format_report([], 'r.jsonl') == 'No finished evaluations in r.jsonl yet.'


def test_plots(tmp_path):
    base = str(tmp_path / 'sweep')
    written = sweep.write_plots(grid_records(repeats=2), base)
    names = sorted(os.path.basename(path) for path in written)
    assert names == sorted(f'sweep-{c}-{kind}.png' for c in ('fid-ref', 'nima', 'precision_inception-ref')
                           for kind in ('vs-ema', 'heatmap'))
    for path in written:
        with PIL.Image.open(path) as image:
            assert image.format == 'PNG'
    # Three varying axes: no heatmap; one EMA length: no line plot.
    three = grid_records() + [record(dict(net=ema(0.05), guide=dict(pkl='g.pkl'), guidance=2, guidance_interval=None,
                                          sampler=dict(num_steps=32)), [1, 2])]
    assert not any('fid-ref-heatmap' in path for path in sweep.write_plots(three, base + '3'))
    assert sweep.write_plots(grid_records()[:2], base + '1') == []


def test_results_are_json_lines(tmp_path):
    path = str(tmp_path / 'r.jsonl')
    for rec in grid_records():
        sweep.ResultsFile(path).append(rec)
    with open(path) as f:
        assert [json.loads(line) for line in f] == grid_records()
