"""Bad pickles and stats through every command that loads one (issue "Reliability").

Truncated, wrong type, hostile (code on load) and wrong-architecture files are refused with
one clear line and a non-zero exit; the hostile payload never runs.
"""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests import tiny
from tests.procs import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Hostile:
    """Unpickling this runs a shell command that creates `marker` (if the loader lets it)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def _write(path, obj=None, data: bytes = None) -> str:
    with open(path, 'wb') as f:
        f.write(pickle.dumps(obj) if data is None else data)
    return str(path)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Good and bad pickles shared by the CLI tests; `marker` must never appear."""
    root = tmp_path_factory.mktemp('pickles')
    marker = str(root / 'PWNED')
    good = str(root / 'good.pkl')
    tiny.write_tiny_snapshot(good)
    with open(good, 'rb') as f:
        good_bytes = f.read()
    paths = dict(
        good=good,
        hostile=_write(root / 'hostile.pkl', dict(ema=_Hostile(marker))),
        truncated=_write(root / 'truncated.pkl', data=good_bytes[:len(good_bytes) // 2]),
        empty=_write(root / 'empty.pkl', data=b''),
        wrong_type=_write(root / 'wrong_type.pkl', [1, 2, 3]),
        no_ema=_write(root / 'no_ema.pkl', dict(net=None)),
        torch_save=str(root / 'state.pt'),
        other_res=str(root / 'other_res.pkl'),
        text=_write(root / 'text.pkl', data=b'hello, I am not a pickle\n'),
    )
    torch.save(dict(net=torch.zeros(3)), paths['torch_save'])
    tiny.write_tiny_snapshot(paths['other_res'], net=tiny.make_tiny_precond(img_resolution=8))
    paths['marker'] = marker
    return paths


def _cli(*args, timeout=120, env=None) -> subprocess.CompletedProcess:
    full_env = child_env(**(env or {}))
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def _assert_one_line_refusal(result: subprocess.CompletedProcess, name: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and name in errors[0], result.stderr

#----------------------------------------------------------------------------
# Library level: one loader, one error type.


@pytest.mark.parametrize('kind', ['hostile', 'truncated', 'empty', 'wrong_type', 'no_ema', 'torch_save', 'text'])
def test_snapshot_loader_refuses_bad_files(files, kind):
    from training.snapshots.loading import SnapshotError, load_snapshot
    with pytest.raises(SnapshotError) as info:
        load_snapshot(files[kind], '--net')
    message = str(info.value)
    assert message.startswith(f'--net: {files[kind]}') and '\n' not in message
    assert not os.path.exists(files['marker'])


@pytest.mark.parametrize('kind', ['hostile', 'truncated', 'wrong_type', 'no_ema', 'torch_save'])
def test_finetune_source_refuses_bad_files(files, kind):
    from training.loop import finetune
    from training.snapshots.loading import SnapshotError
    with pytest.raises(SnapshotError) as info:
        finetune.load_finetune_source(files[kind])
    assert str(info.value).startswith(f'--model2finetune: {files[kind]}')
    assert not os.path.exists(files['marker'])


@pytest.mark.parametrize('kind', ['hostile', 'truncated', 'wrong_type', 'torch_save', 'text'])
def test_reference_stats_refuse_bad_files(files, kind):
    from training.evaluation import calculate_metrics as metrics
    with pytest.raises(metrics.MetricsError) as info:
        metrics.load_stats(files[kind], verbose=False)
    assert files[kind] in str(info.value) and '\n' not in str(info.value)
    assert not os.path.exists(files['marker'])


def test_reference_stats_npz_with_objects_is_refused(tmp_path):
    from training.evaluation import calculate_metrics as metrics
    path = str(tmp_path / 'ref.npz')
    np.savez(path, mu=np.array([object()], dtype=object), sigma=np.eye(2))
    with pytest.raises(metrics.MetricsError, match='ref.npz'):
        metrics.load_stats(path, verbose=False)


def test_guide_with_other_architecture_is_refused(files):
    from training.sampling import generate_images as sampling
    from training.snapshots.loading import load_snapshot
    net, gnet = load_snapshot(files['good'], '--net').ema, load_snapshot(files['other_res'], '--gnet').ema
    with pytest.raises(ValueError, match='--gnet does not match --net: img_resolution'):
        sampling.check_guide_compatible(net, gnet)

#----------------------------------------------------------------------------
# Command lines (one subprocess each; the tiny files load in well under a second).


def _invoke(cmd, args: list) -> subprocess.CompletedProcess:
    """Run a click command in-process (much faster than a subprocess); same shape of result."""
    from click.testing import CliRunner
    result = CliRunner().invoke(cmd, args)
    return subprocess.CompletedProcess(args, result.exit_code, stdout='', stderr=result.output)


@pytest.mark.parametrize('kind', ['hostile', 'truncated', 'no_ema'])
def test_generate_images_refuses_bad_net(files, tmp_path, kind):
    import generate_images
    result = _invoke(generate_images.cmdline, [f'--net={files[kind]}', f'--outdir={tmp_path}', '--seeds=0',
                                               '--steps=2', '--device=cpu'])
    _assert_one_line_refusal(result, files[kind])
    assert not os.path.exists(files['marker']) and os.listdir(tmp_path) == []


def test_generate_images_refuses_guide_of_other_architecture(files, tmp_path):
    import generate_images
    result = _invoke(generate_images.cmdline, [f'--net={files["good"]}', f'--gnet={files["other_res"]}',
                                               '--guidance=2', f'--outdir={tmp_path}', '--seeds=0', '--steps=2',
                                               '--device=cpu'])
    _assert_one_line_refusal(result, '--gnet')
    assert os.listdir(tmp_path) == []


def test_count_flops_refuses_hostile_pickle(files):
    _assert_one_line_refusal(_cli('count_flops.py', files['hostile']), files['hostile'])
    assert not os.path.exists(files['marker'])


def test_reconstruct_phema_refuses_hostile_and_truncated_inputs(files, tmp_path):
    indir = tmp_path / 'in'
    indir.mkdir()
    with open(files['hostile'], 'rb') as f:
        (indir / 'snap-0000010-0.050.pkl').write_bytes(f.read())
    with open(files['truncated'], 'rb') as f:
        (indir / 'snap-0000020-0.050.pkl').write_bytes(f.read())
    result = _cli('reconstruct_phema.py', f'--indir={indir}', f'--outdir={tmp_path / "out"}', '--outstd=0.1')
    _assert_one_line_refusal(result, 'snap-00000')
    assert not os.path.exists(files['marker'])
    assert not (tmp_path / 'out').exists() or os.listdir(tmp_path / 'out') == []


def test_calculate_metrics_refuses_hostile_reference(files, tmp_path):
    import PIL.Image
    images = tmp_path / 'images'
    images.mkdir()
    PIL.Image.fromarray(np.zeros([16, 16, 3], np.uint8)).save(images / '0.png')
    import calculate_metrics
    result = _invoke(calculate_metrics.calc, [f'--images={images}', f'--ref={files["hostile"]}', '--num=all',
                                              '--metrics=fid', '--workers=0'])
    _assert_one_line_refusal(result, files['hostile'])
    assert not os.path.exists(files['marker'])


def test_train_refuses_hostile_model2finetune(files, tmp_path):
    import PIL.Image
    data = tmp_path / 'data'
    data.mkdir()
    for i in range(2):
        PIL.Image.fromarray(np.zeros([16, 16, 3], np.uint8)).save(data / f'{i}.png')
    result = _cli('train_edm2.py', f'--outdir={tmp_path / "run"}', f'--data={data}', '--cond=0',
                  '--preset=base-finetuning', f'--model2finetune={files["hostile"]}', '--batch=2', '--duration=4',
                  '--device=cpu', '--workers=0')
    _assert_one_line_refusal(result, files['hostile'])
    assert not os.path.exists(files['marker'])


def test_trusted_mode_is_opt_in_and_does_run_code(files, tmp_path):
    """Control: the hostile file really is hostile (the refusals above are not vacuous)."""
    from torch_utils import persistence
    marker = files['marker']
    try:
        persistence.load_pickle(files['hostile'], trust=True)
        assert os.path.exists(marker)
    finally:
        if os.path.exists(marker):
            os.remove(marker)
