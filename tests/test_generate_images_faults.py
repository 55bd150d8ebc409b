"""Injected faults (docs/reliability.md) for the generate_images.py CLI: fuzzed --seeds, a full disk, bad and
hostile network pickles, a torchrun rank that dies.

Kept apart from tests/test_generate_images.py, which holds this script's other tests."""

import os
import tempfile

import PIL.Image
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import dnnlib
import generate_images
from tests import faults, tiny
from torch_utils import misc


@pytest.fixture(scope='module')
def bad_pickles(tmp_path_factory):
    return faults.write_bad_pickles(tmp_path_factory.mktemp('pickles'))


# Text made of the characters the parsers care about, plus some noise.
PARSER_ALPHABET = st.sampled_from(list('0123456789,-.eE+ KMGi') + ['...', 'inf', 'nan', 'x', '\n'])


@pytest.mark.reliability
@settings(max_examples=15, deadline=2000)
@given(st.lists(PARSER_ALPHABET, max_size=20).map(''.join) | st.text(max_size=20))
def test_generate_images_seeds_option_is_a_clean_usage_error(text):
    # --seeds is parsed before anything is loaded: a value the parser refuses is exit code 2 with its one-line
    # message; a value it accepts goes on to fail cleanly on the missing network.
    outdir = os.path.join(tempfile.gettempdir(), 'edm2-fuzz-never-written')
    result = CliRunner().invoke(generate_images.cmdline, ['--outdir', outdir, '--net', 'x.pkl', '--seeds', text,
                                                          '--steps=1', '--device=cpu'])
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    try:
        dnnlib.util.parse_int_list(text)
    except ValueError as err:
        assert result.exit_code == 2 and errors == [f"Error: Invalid value for '--seeds': {err}"], result.output
    else:
        assert result.exit_code == 1, result.output
        assert errors == ['Error: --net: x.pkl does not exist (expected a network snapshot .pkl)'], result.output
    assert not os.path.exists(outdir)


@pytest.mark.reliability
def test_generate_images_cli_reports_full_disk(tmp_path, monkeypatch):
    """End to end: the CLI exits 1 with one line naming the PNG; images written before stay."""
    net = str(tmp_path / 'net.pkl')
    tiny.write_tiny_snapshot(net)
    outdir = tmp_path / 'out'
    outdir.mkdir()
    (outdir / '000001.png').write_bytes(faults.PREVIOUS)
    monkeypatch.setattr(misc.os, 'replace', faults.enospc)
    result = CliRunner().invoke(generate_images.cmdline, [f'--net={net}', f'--outdir={outdir}', '--seeds=0-1',
                                                          '--steps=2', '--device=cpu', '--batch=2'])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert errors == [f"Error: [Errno 28] No space left on device: '{outdir / '000000.png'}'"], result.output
    assert (outdir / '000001.png').read_bytes() == faults.PREVIOUS
    assert sorted(os.listdir(outdir)) == ['000001.png']


@pytest.mark.reliability
@pytest.mark.parametrize('kind', ['hostile', 'truncated', 'no_ema'])
def test_generate_images_refuses_bad_net(bad_pickles, tmp_path, kind):
    result = faults.invoke(generate_images.cmdline, [f'--net={bad_pickles[kind]}', f'--outdir={tmp_path}',
                                                     '--seeds=0', '--steps=2', '--device=cpu'])
    faults.assert_one_line_refusal(result, bad_pickles[kind])
    assert not os.path.exists(bad_pickles['marker']) and os.listdir(tmp_path) == []


@pytest.mark.reliability
def test_generate_images_refuses_guide_of_other_architecture(bad_pickles, tmp_path):
    result = faults.invoke(generate_images.cmdline, [f'--net={bad_pickles["good"]}',
                                                     f'--gnet={bad_pickles["other_res"]}', '--guidance=2',
                                                     f'--outdir={tmp_path}', '--seeds=0', '--steps=2', '--device=cpu'])
    faults.assert_one_line_refusal(result, '--gnet does not match --net: img_resolution 8 != 16')
    assert os.listdir(tmp_path) == []


@pytest.mark.reliability
def test_generation_rank_killed_mid_run_stops_the_job(tmp_path):
    net = str(tmp_path / 'net.pkl')
    tiny.write_tiny_snapshot(net)
    args = ['generate_images.py', f'--net={net}', f'--outdir={tmp_path / "out"}', '--seeds=0-63', '--batch=2',
            '--steps=4', '--device=cpu']
    returncode, output, _elapsed = faults.torchrun_with_faulty_rank(tmp_path, args, 'die', fail_at=3)
    faults.assert_rank1_killed_reported(returncode, output)
    written = sorted(os.listdir(tmp_path / 'out'))
    assert len(written) < 64
    for name in written:  # Each PNG written before the job ended is complete.
        with PIL.Image.open(tmp_path / 'out' / name) as image:
            image.load()
            assert image.size == (16, 16)
