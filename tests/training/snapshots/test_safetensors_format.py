"""Tests for training/snapshots/safetensors_format.py: snapshots as .safetensors + .json without pickle."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from tests.tiny import make_tiny_precond, write_tiny_snapshot
from torch_utils import persistence
from training.encoders import StabilityVAEEncoder
from training.sampling import generate_images as sampling
from training.snapshots import safetensors_format as sf


@pytest.fixture
def exported(tmp_path):
    """A class-conditional tiny snapshot pickle, loaded safely, and its export next to it."""
    pkl = str(tmp_path / 'network-snapshot-0000008-0.100.pkl')
    write_tiny_snapshot(pkl, net=make_tiny_precond(label_dim=4))
    data = persistence.load_pickle(pkl)
    weights, meta = sf.save_snapshot_safetensors(data, tmp_path / 'export' / 'net.safetensors',
                                                 ema_profile=dict(std=0.1, nimg=8192))
    return pkl, data, weights, meta


def _images(net, encoder):
    run = sampling.generate_images(net, encoder=encoder, seeds=[0, 1, 2], device='cpu', num_steps=3, verbose=False)
    return torch.cat([batch.images for batch in run])


def test_export_loads_bit_identical_and_samples_the_same(exported):
    pkl, data, weights, meta = exported
    loaded = sf.load_snapshot_safetensors(weights)
    assert list(loaded) == ['encoder', 'dataset_kwargs', 'ema']
    assert type(loaded.ema) is type(data.ema) and type(loaded.encoder) is type(data.encoder)
    assert loaded.dataset_kwargs == data.dataset_kwargs
    assert not loaded.ema.training and not any(p.requires_grad for p in loaded.ema.parameters())
    ref, got = data.ema.state_dict(), loaded.ema.state_dict()
    assert list(got) == list(ref)
    for key in ref:
        assert got[key].dtype == ref[key].dtype == torch.float16 and torch.equal(got[key], ref[key]), key
    assert sorted(vars(loaded.ema)) == sorted(vars(data.ema))
    # The .json path, or a URL of either file, loads the same export; images equal the pickle's, bit for bit.
    for other in (meta, f'file://{os.path.abspath(weights)}'):
        assert torch.equal(sf.load_snapshot_safetensors(other).ema.unet.out_gain, data.ema.unet.out_gain)
    assert torch.equal(_images(loaded.ema, loaded.encoder), _images(pkl, None))


def test_json_describes_the_export(exported):
    _, data, weights, meta = exported
    with open(meta) as f:
        desc = json.load(f)
    assert desc['format'] == sf.FORMAT_NAME and desc['format_version'] == sf.FORMAT_VERSION
    assert desc['weights'] == 'net.safetensors' and desc['weights_bytes'] == os.path.getsize(weights)
    assert desc['ema'] == dict(class_name='training.networks_edm2.Precond', init_args=[],
                               init_kwargs=json.loads(json.dumps(data.ema.init_kwargs)))
    assert desc['encoder'] == dict(class_name='training.encoders.StandardRGBEncoder', init_args=[], init_kwargs={})
    assert desc['ema_profile'] == dict(std=0.1, nimg=8192) and desc['dtype'] == 'float16'


def test_loading_never_unpickles(exported, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('unpickling while loading an export')
    for name in ('load', 'loads', 'Unpickler'):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, 'load', refuse)
    monkeypatch.setattr(persistence, 'load_pickle', refuse)
    ema = sf.load_snapshot_safetensors(exported[2]).ema
    expected = exported[1].ema.state_dict()
    assert type(ema).__name__ == 'Precond' and list(ema.state_dict()) == list(expected)
    assert all(torch.equal(value, expected[name]) for name, value in ema.state_dict().items())


def test_encoder_constants_and_rng_are_preserved(tmp_path):
    encoder = StabilityVAEEncoder(raw_mean=[1.5, 2.5, 0.25, -1.0], final_std=0.25)
    sf.save_snapshot_safetensors(dict(ema=make_tiny_precond().eval(), encoder=encoder), tmp_path / 'vae.safetensors')
    torch.manual_seed(7)
    state = torch.get_rng_state()
    loaded = sf.load_snapshot_safetensors(tmp_path / 'vae.safetensors')
    assert torch.equal(torch.get_rng_state(), state)   # constructing the network drew no global random numbers
    assert loaded.encoder.init_kwargs == encoder.init_kwargs and loaded.dataset_kwargs is None
    for name in ('scale', 'bias'):
        assert isinstance(getattr(loaded.encoder, name), np.ndarray)
        np.testing.assert_array_equal(getattr(loaded.encoder, name), getattr(encoder, name))
        assert getattr(loaded.encoder, name).dtype == np.float32


def _edit_json(meta, **changes):
    with open(meta) as f:
        desc = json.load(f)
    for path, value in changes.items():
        *parents, last = path.split('__')
        node = desc
        for key in parents:
            node = node[key]
        node[last] = value
    with open(meta, 'w') as f:
        json.dump(desc, f)


def _fails(path, message):
    with pytest.raises(persistence.PickleLoadError) as info:
        sf.load_snapshot_safetensors(path)
    text = str(info.value)
    assert '\n' not in text and message in text, text
    return text


def test_bad_exports_fail_with_one_line(exported, tmp_path):
    _, data, weights, meta = exported
    good_weights, good_meta = open(weights, 'rb').read(), open(meta).read()

    def restore():
        open(weights, 'wb').write(good_weights)
        open(meta, 'w').write(good_meta)

    os.remove(meta)
    assert _fails(weights, 'missing').startswith(meta)
    restore()
    open(weights, 'wb').write(good_weights[:-100])
    assert _fails(weights, f'truncated ({len(good_weights) - 100} of {len(good_weights)} bytes)').startswith(weights)
    flipped = bytearray(good_weights)
    flipped[-5] ^= 1
    open(weights, 'wb').write(bytes(flipped))
    _fails(weights, 'do not match the sha256 in net.json')
    restore()
    open(meta, 'w').write(good_meta[:-10])
    assert _fails(weights, 'not valid JSON').startswith(meta)
    for bad_class in ('builtins.eval', 'training.toy.Precond', None):
        restore()
        _edit_json(meta, ema__class_name=bad_class)
        _fails(weights, "is not one of this project's persistent classes")
    # The description of another network: the first tensor whose shape differs is named.
    restore()
    _edit_json(meta, ema__init_kwargs__model_channels=16)
    wider = make_tiny_precond(label_dim=4, model_channels=16).state_dict()
    first = next(key for key, t in data.ema.state_dict().items() if t.shape != wider[key].shape)
    assert _fails(weights, f'tensor ema.{first} has shape').startswith(weights)
    restore()
    _edit_json(meta, ema__init_kwargs__no_such_argument=1)
    _fails(weights, 'cannot construct training.networks_edm2.Precond')
    # Weights and description of two different exports.
    restore()
    other, _ = sf.save_snapshot_safetensors(make_tiny_precond(seed=1), tmp_path / 'other' / 'net.safetensors')
    open(weights, 'wb').write(open(other, 'rb').read())
    _fails(weights, 'sha256')


def test_saving_refuses_bad_input(tmp_path):
    with pytest.raises(sf.ExportError, match="not one of this project's persistent classes"):
        sf.save_snapshot_safetensors(torch.nn.Linear(2, 2), tmp_path / 'a.safetensors')
    with pytest.raises(sf.ExportError, match='must end in .safetensors'):
        sf.save_snapshot_safetensors(make_tiny_precond(), tmp_path / 'a.json')
    with pytest.raises(sf.ExportError, match='license'):
        sf.save_snapshot_safetensors(make_tiny_precond(), tmp_path / 'a.safetensors', license='Not: yaml')
    (tmp_path / 'README.md').write_text('# my notes\n')
    with pytest.raises(sf.ExportError, match='README.md exists and is not a model card'):
        sf.save_snapshot_safetensors(make_tiny_precond(), tmp_path / 'a.safetensors')
    assert sorted(os.listdir(tmp_path)) == ['README.md']


def _front_matter(card):
    lines = card.splitlines()
    assert lines[0] == '---'
    block = lines[1:lines.index('---', 1)]
    fields = {line.split(':')[0]: line.split(':', 1)[1].strip() for line in block if not line.startswith('- ')}
    fields['tags'] = [line[2:] for line in block if line.startswith('- ')]
    return fields


def test_model_card_lists_every_export(tmp_path):
    for std in ('0.050', '0.100'):
        sf.save_snapshot_safetensors(make_tiny_precond(), tmp_path / f'phema-0000008-{std}.safetensors',
                                     ema_profile=dict(std=float(std), nimg=8192), license=sf.NVIDIA_LICENSE)
    card = (tmp_path / 'README.md').read_text()
    assert _front_matter(card) == dict(license='cc-by-nc-sa-4.0', library_name='edm2-toolkit',
                                       tags=['diffusion', 'edm2', 'image-generation', 'safetensors'])
    assert '| `phema-0000008-0.050.safetensors` | `training.networks_edm2.Precond` | 16x16x3 | 0 | - | 0.050 |' in card
    assert '| `phema-0000008-0.100.safetensors` |' in card
    assert 'generate_images.py --net=phema-0000008-0.050.safetensors' in card


def test_every_option_that_takes_a_network_accepts_the_export(exported, tmp_path):
    """The one snapshot loader dispatches on the suffix, so the CLIs take the export where they take a pickle."""
    from click.testing import CliRunner

    import generate_images
    from training.snapshots.loading import SnapshotError, load_snapshot
    pkl, data, weights, meta = exported
    assert torch.equal(load_snapshot(meta, '--net').ema.unet.out_gain, data.ema.unet.out_gain)
    outputs = {}
    for name, net in (('pkl', pkl), ('safetensors', weights)):
        outdir = tmp_path / name
        result = CliRunner().invoke(generate_images.cmdline, [f'--net={net}', f'--outdir={outdir}', '--seeds=0-1',
                                                              '--steps=3', '--device=cpu'])
        assert result.exit_code == 0, result.output
        outputs[name] = [(outdir / f'00000{i}.png').read_bytes() for i in range(2)]
    assert outputs['pkl'] == outputs['safetensors']
    with open(weights, 'r+b') as f:
        f.seek(-1, os.SEEK_END)
        f.write(b'\0')
    with pytest.raises(SnapshotError, match=r'^--gnet: .*net\.safetensors'):
        load_snapshot(weights, '--gnet')
