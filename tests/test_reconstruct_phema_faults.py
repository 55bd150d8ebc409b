"""Injected faults (docs/reliability.md) for the reconstruct_phema.py CLI: hostile and truncated input snapshots.

Kept apart from tests/test_reconstruct_phema.py, which holds this script's other tests."""

import os

import pytest

from tests import faults


@pytest.mark.reliability
def test_reconstruct_phema_refuses_hostile_and_truncated_inputs(tmp_path):
    (tmp_path / 'files').mkdir()
    files = faults.write_bad_pickles(tmp_path / 'files')
    indir = tmp_path / 'in'
    indir.mkdir()
    with open(files['hostile'], 'rb') as f:
        (indir / 'snap-0000010-0.050.pkl').write_bytes(f.read())
    with open(files['truncated'], 'rb') as f:
        (indir / 'snap-0000020-0.050.pkl').write_bytes(f.read())
    result = faults.run_script('reconstruct_phema.py', f'--indir={indir}', f'--outdir={tmp_path / "out"}',
                               '--outstd=0.1')
    faults.assert_one_line_refusal(result, 'snap-00000')
    assert not os.path.exists(files['marker'])
    assert not (tmp_path / 'out').exists()  # The inputs are read before the output directory is created.
