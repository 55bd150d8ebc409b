"""Tests for training.snapshots.loading: the one network-snapshot loader and its one-line errors."""

import os
import re

import pytest
import torch

import dnnlib
from tests import faults
from tests.tiny import write_tiny_snapshot
from torch_utils import distributed as dist
from torch_utils import persistence
from training.snapshots.loading import (SnapshotError, check_power_function_snapshot, is_edm1_snapshot,
                                        load_snapshot)


@pytest.fixture(autouse=True)
def _safe_by_default(monkeypatch):
    monkeypatch.delenv('EDM2_TRUST_PICKLE', raising=False)


def test_snapshot_loads_from_path_and_url(tmp_path):
    path = tmp_path / 'network-snapshot-0000001-0.100.pkl'
    saved = write_tiny_snapshot(str(path))
    for src in (path, str(path), path.as_uri()):
        data = load_snapshot(src, '--net')
        assert list(data) == list(saved) and type(data) is dnnlib.EasyDict
        assert torch.equal(data.ema.unet.out_conv.weight, saved.ema.unet.out_conv.weight)


def test_training_state_given_as_network_names_the_file_to_use(tmp_path):
    path = str(tmp_path / 'training-state-0000001.pt')
    dist.CheckpointIO(state=dnnlib.EasyDict(cur_nimg=1)).save(path, verbose=False)
    with pytest.raises(SnapshotError) as info:
        load_snapshot(path, '--net')
    assert str(info.value) == (f'--net: {path} is a zip archive (a torch.save file such as a training state), not a '
                               'network snapshot; give a network-snapshot-*.pkl or a post-hoc reconstruction')


@pytest.mark.parametrize('content, found', [
    (dict(net=1, loss_fn=None), 'found a dict with keys [loss_fn, net]'),
    (dict(ema='not a network'), 'found an "ema" entry of type str'),
    ([1, 2], 'found a list'),
    ({f'key{i:02d}': i for i in range(12)}, 'found a dict with keys [key00, key01, key02, key03, key04, key05, key06, '
                                             'key07, ...]'),
])
def test_other_pickles_say_what_was_found(tmp_path, content, found):
    path = str(tmp_path / 'other.pkl')
    persistence.save_pickle(content, path)
    with pytest.raises(SnapshotError) as info:
        load_snapshot(path, '--model2finetune')
    assert str(info.value) == (f'--model2finetune: {path}: not a network snapshot (expected a dict with an "ema" '
                               f'network, {found})')


def test_unreadable_and_refused_files_name_option_and_file(tmp_path):
    truncated = tmp_path / 'truncated.pkl'
    write_tiny_snapshot(str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(SnapshotError, match=rf'^--gnet: {re.escape(str(truncated))}: truncated or not a pickle \(') as info:
        load_snapshot(truncated, '--gnet')
    assert isinstance(info.value.__cause__, persistence.PickleLoadError)
    foreign = tmp_path / 'foreign.pkl'
    persistence.save_pickle(dict(ema=torch.nn.Linear(1, 1), hook=os.getcwd), str(foreign))
    with pytest.raises(SnapshotError, match=rf"^PKL\|URL: {re.escape(str(foreign))}: refusing to load global '{os.getcwd.__module__}.getcwd'"):
        load_snapshot(foreign, 'PKL|URL')


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf'^--net: {re.escape(str(tmp_path / "missing.pkl"))} does not exist \(expected a network'):
        load_snapshot(tmp_path / 'missing.pkl', '--net')
    with pytest.raises(FileNotFoundError, match=rf'^--indir: {re.escape(str(tmp_path))} is a directory'):
        load_snapshot(tmp_path, '--indir')


def test_invalid_trust_setting_is_its_own_error(tmp_path, monkeypatch):
    path = tmp_path / 'net.pkl'
    write_tiny_snapshot(str(path))
    monkeypatch.setenv('EDM2_TRUST_PICKLE', 'perhaps')
    with pytest.raises(persistence.TrustSettingError, match="EDM2_TRUST_PICKLE='perhaps'"):
        load_snapshot(path, '--net')


def test_edm1_snapshots_are_told_apart_from_power_function_ones(tmp_path):
    from tests.tiny_edm1 import write_edm1_snapshot
    write_tiny_snapshot(str(tmp_path / 'edm2.pkl'))
    write_edm1_snapshot(str(tmp_path / 'edm1.pkl'))
    edm2, edm1 = (load_snapshot(tmp_path / name, '--indir') for name in ('edm2.pkl', 'edm1.pkl'))
    assert not is_edm1_snapshot(edm2) and is_edm1_snapshot(edm1)
    check_power_function_snapshot(edm2, tmp_path / 'edm2.pkl', '--indir')
    with pytest.raises(SnapshotError) as info:
        check_power_function_snapshot(edm1, tmp_path / 'edm1.pkl', '--indir')
    assert str(info.value) == (f'--indir: {tmp_path / "edm1.pkl"} holds an EDM v1 network (EDMPrecond) with a classic '
                               'EMA, not a power-function EMA profile; post-hoc EMA reconstruction needs EDM2 snapshots '
                               '(network-snapshot-<kimg>-<std>.pkl)')


#----------------------------------------------------------------------------
# Injected faults (docs/reliability.md): every bad file gives the one loader error, and hostile code never runs.


@pytest.fixture(scope='module')
def bad_pickles(tmp_path_factory):
    return faults.write_bad_pickles(tmp_path_factory.mktemp('pickles'))


@pytest.mark.reliability
@pytest.mark.parametrize('kind', ['hostile', 'truncated', 'empty', 'wrong_type', 'no_ema', 'torch_save', 'text'])
def test_snapshot_loader_refuses_bad_files(bad_pickles, kind):
    with pytest.raises(SnapshotError) as info:
        load_snapshot(bad_pickles[kind], '--net')
    message = str(info.value)
    assert message.startswith(f'--net: {bad_pickles[kind]}') and '\n' not in message
    assert not os.path.exists(bad_pickles['marker'])
