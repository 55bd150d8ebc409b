"""Injected faults (docs/reliability.md) for the calculate_metrics.py CLI: a hostile reference file, a torchrun
rank that dies.

Kept apart from tests/test_calculate_metrics.py, which holds this script's other tests."""

import os

import numpy as np
import PIL.Image
import pytest

import calculate_metrics
from tests import detector_standins, faults


@pytest.mark.reliability
def test_calculate_metrics_refuses_hostile_reference(tmp_path):
    files = faults.write_bad_pickles(tmp_path)
    images = tmp_path / 'images'
    images.mkdir()
    PIL.Image.fromarray(np.zeros([16, 16, 3], np.uint8)).save(images / '0.png')
    result = faults.invoke(calculate_metrics.calc, [f'--images={images}', f'--ref={files["hostile"]}', '--num=all',
                                                    '--metrics=fid', '--workers=0'])
    faults.assert_one_line_refusal(result, f"{files['hostile']}: refusing to load global '{os.system.__module__}.system'")
    assert not os.path.exists(files['marker'])


@pytest.mark.reliability
def test_metrics_rank_killed_mid_run_stops_the_job(tmp_path, monkeypatch):
    data16 = tmp_path / 'data16'
    data16.mkdir()
    faults.write_random_images(data16, count=64, size=16)
    cache = tmp_path / 'cache'
    detector_standins.build_standin_cache(str(cache))
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(cache))
    args = ['calculate_metrics.py', 'ref', f'--data={data16}', f'--dest={tmp_path / "ref.pkl"}', '--metrics=fid',
            '--batch=4', '--workers=0']
    returncode, output, _elapsed = faults.torchrun_with_faulty_rank(tmp_path, args, 'die', fail_at=2)
    faults.assert_rank1_killed_reported(returncode, output)
    assert not (tmp_path / 'ref.pkl').exists()
