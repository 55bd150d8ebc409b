"""One safe loader for every kind of file: EDM2_TRUST_PICKLE means the same for network snapshots, training
states, statistics files, toy models and detector pickles, and each of their readers refuses a hostile payload
with the one refusal line."""

import os

import numpy as np
import pytest
import torch

import dnnlib
from tests import detector_standins, tiny
from torch_utils import distributed as dist
from torch_utils import persistence
from training import toy
from training.evaluation import calculate_metrics as metrics
from training.evaluation import detectors
from training.snapshots.loading import SnapshotError, load_snapshot


def _touch(path: str, value: int) -> int:
    """What a probe runs when a loader resolves it: creates `path`, returns `value`."""
    with open(path, 'w'):
        pass
    return value


class _Probe:
    """Pickles as a call of _touch: a global outside the safe list, whose effect shows that it ran."""

    def __init__(self, marker: str, value: int = 2):
        self.marker, self.value = marker, value

    def __reduce__(self):
        return _touch, (self.marker, self.value)


class _Hostile:
    """Pickles as os.system('touch marker')."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def _write_snapshot(path: str, payload: object) -> None:
    persistence.save_pickle(dnnlib.EasyDict(ema=tiny.make_tiny_precond(), extra=payload), path)


def _write_training_state(path: str, payload: object) -> None:
    torch.save(dict(state=dict(cur_nimg=1), extra=payload), path)


def _write_statistics(path: str, payload: object) -> None:
    persistence.save_pickle(dict(num_images=payload, fid=dict(mu=np.zeros(2), sigma=np.eye(2))), path)


def _write_toy_model(path: str, payload: object) -> None:
    net = toy.ToyModel(num_layers=1, hidden_dim=4)
    net.extra = payload
    persistence.save_pickle(net, path)


def _write_detector(path: str, payload: object) -> None:
    model = detectors.InceptionV3Features(width=detector_standins.INCEPTION_WIDTH)
    model.extra = payload
    persistence.save_pickle(model, path)


# kind of file -> (writer, the reader the toolkit uses for it)
KINDS = {
    'network snapshot': (_write_snapshot, lambda path: load_snapshot(path, '--net')),
    'training state': (_write_training_state,
                       lambda path: dist.CheckpointIO(state=dnnlib.EasyDict()).load(path, verbose=False)),
    'statistics': (_write_statistics, lambda path: metrics.load_stats(path, verbose=False)),
    'toy model': (_write_toy_model, lambda path: toy.load_toy_net(path, 'cpu')),
    'detector pickle': (_write_detector, lambda path: detectors.load_inception(path, verbose=False)),
}
# The one error each reader documents for a file it refuses, and for an invalid EDM2_TRUST_PICKLE.
REFUSAL_ERROR = {
    'network snapshot': SnapshotError,
    'training state': persistence.UnsafePickleError,
    'statistics': metrics.MetricsError,
    'toy model': persistence.UnsafePickleError,
    'detector pickle': detectors.DetectorLoadError,
}
INVALID_SETTING_ERROR = {
    'network snapshot': persistence.TrustSettingError,
    'training state': persistence.TrustSettingError,
    'statistics': metrics.MetricsError,
    'toy model': persistence.TrustSettingError,
    'detector pickle': detectors.DetectorLoadError,
}
READ_ERRORS = tuple({*REFUSAL_ERROR.values(), *INVALID_SETTING_ERROR.values()})


def _write_all(folder, payload_for) -> dict:
    folder.mkdir()
    paths = {}
    for kind, (write, _read) in KINDS.items():
        paths[kind] = str(folder / kind.replace(' ', '-'))
        write(paths[kind], payload_for(folder))
    return paths


@pytest.fixture(scope='module')
def probed(tmp_path_factory):
    """One file of each kind holding a probe; the probe's marker path."""
    root = tmp_path_factory.mktemp('probed')
    marker = str(root / 'probe-ran')
    return _write_all(root / 'files', lambda folder: _Probe(marker)), marker


@pytest.fixture(scope='module')
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp('hostile')
    marker = str(root / 'PWNED')
    return _write_all(root / 'files', lambda folder: _Hostile(marker)), marker


def _outcome(kind: str, path: str, marker: str, value: str) -> str:
    """'trusted' (the probe ran and the file loaded), 'refused' (the one refusal line), 'invalid setting'."""
    try:
        KINDS[kind][1](path)
    except READ_ERRORS as err:
        message = str(err)
        ran = os.path.exists(marker)
        if "refusing to load global 'tests.torch_utils.test_safe_loading._touch'" in message and not ran \
                and path in message and 'set EDM2_TRUST_PICKLE=1' in message and '\n' not in message \
                and isinstance(err, REFUSAL_ERROR[kind]):
            return 'refused'
        if f'EDM2_TRUST_PICKLE={value!r}: expected 1, true, yes, on' in message and not ran and '\n' not in message \
                and isinstance(err, INVALID_SETTING_ERROR[kind]):
            return 'invalid setting'
        return f'unexpected error: {type(err).__name__}: {message}'
    ran = os.path.exists(marker)
    if ran:
        os.remove(marker)
    return 'trusted' if ran else 'loaded without running the probe'


@pytest.mark.parametrize('value, expected', [
    (None, 'refused'), ('', 'refused'), ('0', 'refused'), ('false', 'refused'), ('No', 'refused'), (' off ', 'refused'),
    ('1', 'trusted'), ('true', 'trusted'), ('YES', 'trusted'), ('on', 'trusted'),
    ('2', 'invalid setting'), ('maybe', 'invalid setting'), ('ture', 'invalid setting'),
])
def test_trust_setting_means_the_same_for_every_kind_of_file(probed, monkeypatch, value, expected):
    paths, marker = probed
    if value is None:
        monkeypatch.delenv('EDM2_TRUST_PICKLE', raising=False)
    else:
        monkeypatch.setenv('EDM2_TRUST_PICKLE', value)
    outcomes = {kind: _outcome(kind, path, marker, value) for kind, path in paths.items()}
    assert outcomes == dict.fromkeys(KINDS, expected)


@pytest.mark.parametrize('kind', list(KINDS))
def test_hostile_payload_is_refused_by_every_reader(hostile, monkeypatch, kind):
    paths, marker = hostile
    monkeypatch.delenv('EDM2_TRUST_PICKLE', raising=False)
    with pytest.raises(REFUSAL_ERROR[kind]) as info:
        KINDS[kind][1](paths[kind])
    message = str(info.value)
    assert f"{paths[kind]}: refusing to load global '{os.system.__module__}.system', which is not on the " \
           'safe-loading list; if you trust this file, set EDM2_TRUST_PICKLE=1' in message
    assert '\n' not in message and not os.path.exists(marker)


def test_the_hostile_payload_is_live(hostile):
    """Control for the test above: trusted, the same file does run the command."""
    paths, marker = hostile
    try:
        persistence.load_torch_file(paths['training state'], trust=True)
        assert os.path.exists(marker)
    finally:
        if os.path.exists(marker):
            os.remove(marker)


def test_trust_argument_overrides_the_environment(probed, monkeypatch):
    paths, marker = probed
    monkeypatch.setenv('EDM2_TRUST_PICKLE', 'maybe')  # not even read when the caller decides
    with pytest.raises(persistence.UnsafePickleError):
        persistence.load_pickle(paths['statistics'], trust=False)
    assert not os.path.exists(marker)
    assert persistence.load_pickle(paths['statistics'], trust=True)['num_images'] == 2
    os.remove(marker)
