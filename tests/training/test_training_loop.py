"""Tests of the training library: loss, LR schedule, step pieces, fine-tuning, and short real runs."""

import json
import math
import os
import re
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import persistence
from training.loop import finetune
from training.loop import status as train_status
from training.loop import step as train_step
from training.loop.train_edm2 import setup_training_config
from training.training_loop import (EDM2Loss, ResumeMismatchError, TrainingDivergedError, learning_rate_schedule,
                                    training_loop)
from tests import faults
from tests.tiny import make_tiny_precond, write_tiny_snapshot
from training.snapshots.loading import SnapshotError

#----------------------------------------------------------------------------
# Shared helpers (also used by test_train_edm2.py).

def write_dataset(path: str, num_images: int = 32, resolution: int = 16, num_classes: int = 4) -> str:
    """A folder of RGB PNGs with dataset.json class labels: class c = colour c plus a random square."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.RandomState(0)
    labels = []
    for i in range(num_images):
        c = i % num_classes
        img = np.zeros([resolution, resolution, 3], dtype=np.uint8)
        img[..., c % 3] = 200
        lo, hi = resolution // 4, resolution * 3 // 4
        img[lo:hi, lo:hi, (c + 1) % 3] = rng.randint(0, 255)
        PIL.Image.fromarray(img).save(os.path.join(path, f'img{i:03d}.png'))
        labels.append([f'img{i:03d}.png', c])
    with open(os.path.join(path, 'dataset.json'), 'w') as f:
        json.dump({'labels': labels}, f)
    return path


TINY_OPTS = dict(preset='edm2-cifar10-32x32-cond', channels=8, channel_mult=[1, 2], num_blocks=1, attn_res=[8],
                 channels_per_head=8, dropout=0.0, batch=16, workers=0, lr=0.01, rampup=0, fp16=False)


def tiny_config(data: str, **overrides) -> dnnlib.EasyDict:
    opts = dict(TINY_OPTS, data=data, cond=True, duration=256, status=64, snapshot=None, checkpoint=None)
    opts.update(overrides)
    return setup_training_config(**opts)


def read_stats(run_dir: str) -> list:
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def dataset_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp('data') / 'tiny16'))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run much faster on one thread of a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init(device='cpu')
    yield
    torch.set_num_threads(threads)

#----------------------------------------------------------------------------
# Loss and learning rate.

def test_learning_rate_schedule_decay_and_rampup():
    assert learning_rate_schedule(0, 256, ref_lr=0.01, ref_batches=100, rampup_Mimg=0) == 0.01
    assert learning_rate_schedule(400 * 256, 256, ref_lr=0.01, ref_batches=100, rampup_Mimg=0) == pytest.approx(0.005)
    assert learning_rate_schedule(0, 256, ref_lr=0.01, ref_batches=100) == 0  # official 10 Mimg ramp-up: first step lr 0
    assert learning_rate_schedule(2_500_000, 256, ref_lr=0.01, ref_batches=0, rampup_Mimg=10) == pytest.approx(0.0025)


class _FixedNet(torch.nn.Module):
    """D(x) = 0.5 x, u = 0.3: a network whose loss is known in closed form."""
    def forward(self, x, sigma, labels=None, return_logvar=False):
        return 0.5 * x, torch.full([x.shape[0], 1, 1, 1], 0.3)


def test_edm2_loss_matches_equation():
    loss_fn = EDM2Loss(P_mean=-0.4, P_std=1.2, sigma_data=0.5)
    images = torch.randn(3, 2, 4, 4)
    rnd_normal = torch.randn(3, 1, 1, 1)
    noise = torch.randn_like(images)
    loss = loss_fn(_FixedNet(), images, rnd_normal=rnd_normal, noise=noise)
    sigma = torch.exp(rnd_normal * 1.2 - 0.4)
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    expected = weight / math.exp(0.3) * (0.5 * (images + noise * sigma) - images) ** 2 + 0.3
    torch.testing.assert_close(loss, expected)
    torch.manual_seed(1)
    drawn = loss_fn(_FixedNet(), images)
    torch.manual_seed(1)
    assert torch.equal(drawn, loss_fn(_FixedNet(), images, rnd_normal=torch.randn(3, 1, 1, 1), noise=torch.randn_like(images)))


#----------------------------------------------------------------------------
# Step pieces.

def test_step_noise_rows_do_not_depend_on_process_count():
    noise = train_step.StepNoise(seed=3, batch_size=8, item_shape=[1, 2, 2], device=torch.device('cpu'))
    rnd, full, posterior = noise.draw(cur_nimg=64)
    rnd, full = rnd.clone(), full.clone()
    assert posterior is None
    # Two ranks, two rounds of 2: every global row is used exactly once, by the rank whose sampler yields it.
    rows = [train_step.global_rows(rank, 2, k, 2, torch.device('cpu')) for rank in range(2) for k in range(2)]
    assert sorted(torch.cat(rows).tolist()) == list(range(8))
    assert train_step.global_rows(1, 2, 1, 2, torch.device('cpu')).tolist() == [5, 7]  # positions 1 + 2 * (2 + j)
    again = noise.draw(cur_nimg=64)
    assert torch.equal(again[0], rnd) and torch.equal(again[1], full)
    assert not torch.equal(noise.draw(cur_nimg=72)[1], full)


def test_clip_gradients_uses_unscaled_norm():
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0, 4.0]])]  # norm 5
    norm, finite = train_step.gradient_health(grads, torch.tensor(1.0), loss_scaling=2.0)
    assert finite and float(norm) == pytest.approx(2.5)  # --ls divided out
    train_step.clip_gradients_(grads, norm, max_norm=1.0)
    scale = 1.0 / (2.5 + 1e-6)
    torch.testing.assert_close(grads[0], torch.tensor([3.0 * scale, 0.0]))
    torch.testing.assert_close(grads[1], torch.tensor([[0.0, 4.0 * scale]]))
    untouched = [torch.tensor([0.3, 0.4])]
    train_step.clip_gradients_(untouched, torch.tensor(0.5), max_norm=1.0)
    assert untouched[0].tolist() == pytest.approx([0.3, 0.4])


def test_nonfinite_gradients_detected_and_zeroed():
    grads = [torch.tensor([1.0, float('nan')]), torch.tensor([float('inf'), 2.0])]
    _, finite = train_step.gradient_health(grads, torch.tensor(0.0), 1.0)
    assert not finite
    train_step.zero_nonfinite_(grads)
    assert grads[0].tolist() == [1.0, 0.0] and grads[1].tolist() == [0.0, 2.0]
    _, finite = train_step.gradient_health([torch.ones(2)], torch.tensor(float('nan')), 1.0)
    assert not finite  # a non-finite loss counts too
    monitor = train_step.HealthMonitor(limit=2)
    assert [monitor.update(f) for f in (False, True, False, False)] == [False, False, False, True]


def test_finish_estimate_extrapolates_the_last_tick():
    assert train_status.finish_estimate(1000, 3601000, 0.001) == \
        'Estimated time to finish (3601 kimg): 1h 00m 00s at 1.000 sec/kimg'


def test_stats_line_is_strict_json():
    line = train_status.format_stats_line({'Progress/kimg': 1.5, 'Loss/loss': float('nan'), 'Loss/lr': 1e-4}, 12.0)
    assert json.loads(line) == {'Progress/kimg': 1.5, 'Loss/loss': None, 'Loss/lr': 1e-4, 'timestamp': 12.0}

#----------------------------------------------------------------------------
# Fine-tuning helpers.

def test_freeze_names_match_fork_rules():
    net = make_tiny_precond(channels_per_head=8)
    frozen = finetune.freeze_parameters(net, freeze_down=True, freeze_attn=True)
    assert frozen and all('down' in n or 'attn' in n for n in frozen)
    assert {n for n, p in net.unet.named_parameters() if not p.requires_grad} == set(frozen)
    assert any('attn_qkv' in n for n in frozen) and any(n.startswith('enc.8x8_down') for n in frozen)
    assert net.logvar_linear.weight.requires_grad


def test_match_label_dim_pads_and_rejects():
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert finetune.match_label_dim(labels, 4).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert finetune.match_label_dim(torch.zeros(2, 0), 0).shape == (2, 0)
    with pytest.raises(ValueError):
        finetune.match_label_dim(labels, 1)


def test_load_finetune_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.pkl'):  # the config step says which option
        finetune.load_finetune_source(str(tmp_path / 'missing.pkl'))
    persistence.save_pickle(dnnlib.EasyDict(foo=1), str(tmp_path / 'bad.pkl'))
    with pytest.raises(SnapshotError, match=f'^--model2finetune: {re.escape(str(tmp_path))}/bad.pkl: not a network snapshot'):
        finetune.load_finetune_source(str(tmp_path / 'bad.pkl'))


@pytest.fixture(scope='module')
def bad_pickles(tmp_path_factory):
    return faults.write_bad_pickles(tmp_path_factory.mktemp('pickles'))


@pytest.mark.reliability
@pytest.mark.parametrize('kind', ['hostile', 'truncated', 'wrong_type', 'no_ema', 'torch_save'])
def test_finetune_source_refuses_bad_files(bad_pickles, kind):
    with pytest.raises(SnapshotError) as info:
        finetune.load_finetune_source(bad_pickles[kind])
    assert str(info.value).startswith(f'--model2finetune: {bad_pickles[kind]}') and '\n' not in str(info.value)
    assert not os.path.exists(bad_pickles['marker'])

#----------------------------------------------------------------------------
# Real (tiny) runs.

def test_loss_falls_and_outputs_are_written(dataset_dir, tmp_path, capsys):
    run_dir = str(tmp_path / 'run')
    c = tiny_config(dataset_dir, duration=1024, status=256, snapshot=1024, checkpoint=1024)
    assert training_loop(run_dir=run_dir, device='cpu', **c) == 'done'
    output = capsys.readouterr().out.splitlines()
    status = [line for line in output if line.startswith('Status:')]
    assert len(status) == 5 and status[0].endswith(' loss -')  # no step yet: no loss, not "loss nan"
    estimates = [i for i, line in enumerate(output) if line.startswith('Estimated time to finish (1 kimg): ')]
    assert len(estimates) == 1 and output[estimates[0] - 1] == status[1]  # once, after the first steps
    assert all(float(line.split(' loss ')[1]) > 0 for line in status[1:])  # finite losses: 'nan' would fail
    stats = read_stats(run_dir)
    losses = [s['Loss/loss'] for s in stats if s.get('Loss/loss') is not None]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    assert stats[-1]['Progress/kimg'] == pytest.approx(1.024)
    assert all(s['Loss/nonfinite_grads'] == 0 for s in stats if 'Loss/nonfinite_grads' in s)
    names = sorted(os.listdir(run_dir))
    assert 'network-snapshot-0000001-0.100.pkl' in names and 'training-state-0000001.pt' in names
    snap = persistence.load_pickle(os.path.join(run_dir, 'network-snapshot-0000001-0.050.pkl'))
    assert list(snap.keys()) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema']
    assert snap.ema.unet.out_conv.weight.dtype == torch.float16 and not snap.ema.training
    assert isinstance(snap.loss_fn, EDM2Loss) and snap.dataset_kwargs.path == dataset_dir
    state = torch.load(os.path.join(run_dir, 'training-state-0000001.pt'), weights_only=True)  # plain torch reads it
    assert state['state']['cur_nimg'] == 1024 and type(state['optimizer']['param_groups'][0]['lr']) is float


def test_finetune_keeps_frozen_weights_bit_identical(dataset_dir, tmp_path):
    source = make_tiny_precond(label_dim=4, channels_per_head=8)
    write_tiny_snapshot(str(tmp_path / 'source.pkl'), net=source)
    before = persistence.load_pickle(str(tmp_path / 'source.pkl')).ema.state_dict()
    run_dir = str(tmp_path / 'ft')
    c = tiny_config(dataset_dir, duration=1024, snapshot=1024, model2finetune=str(tmp_path / 'source.pkl'),
                    freeze_down=True, freeze_attn=True, max_grad_norm=0.5)
    assert c.max_grad_norm == 0.5 and c.preload_model.endswith('source.pkl')
    training_loop(run_dir=run_dir, device='cpu', **c)
    after = persistence.load_pickle(os.path.join(run_dir, 'network-snapshot-0000001-0.100.pkl')).ema.state_dict()
    frozen = [k for k in before if 'down' in k or 'attn' in k]
    assert frozen
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before['unet.out_conv.weight'], after['unet.out_conv.weight'])
    stats = read_stats(run_dir)
    assert all(s['Loss/grad_norm'] > 0 for s in stats if s.get('Loss/grad_norm') is not None)


def test_resume_with_another_network_or_freeze_setting_is_one_clear_error(dataset_dir, tmp_path):
    run_dir = str(tmp_path / 'run')
    training_loop(run_dir=run_dir, device='cpu', **tiny_config(dataset_dir, duration=16, checkpoint=1024))
    state = os.path.join(run_dir, 'training-state-0000000.pt')
    assert os.path.isfile(state)
    for overrides, culprit in ((dict(channels=16), 'net: size mismatch'), (dict(freeze_attn=True), 'optimizer: ')):
        c = tiny_config(dataset_dir, duration=32, checkpoint=1024, **overrides)
        with pytest.raises(ResumeMismatchError) as info:
            training_loop(run_dir=run_dir, device='cpu', **c)
        message = str(info.value)
        assert message.startswith(f'{state} was saved with a different network or --freeze-* setting')
        assert culprit in message and 'use a new --outdir' in message and '\n' not in message


def test_nonfinite_loss_stops_the_run(dataset_dir, tmp_path):
    run_dir = str(tmp_path / 'nan')
    c = tiny_config(dataset_dir, duration=1024, snapshot=1024, P_mean=1000.0, nonfinite_limit=3)
    with pytest.raises(TrainingDivergedError, match='non-finite in the last 3 steps'):
        training_loop(run_dir=run_dir, device='cpu', **c)
    assert not any(name.startswith('network-snapshot-0000001') for name in os.listdir(run_dir))


def test_tensorboard_scalars_when_available(dataset_dir, tmp_path, monkeypatch):
    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir
        def add_scalar(self, name, value, global_step):
            written.append((name, global_step))
        def flush(self):
            pass
        def close(self):
            pass

    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', types.SimpleNamespace(SummaryWriter=FakeWriter))
    training_loop(run_dir=str(tmp_path / 'tb'), device='cpu', **tiny_config(dataset_dir, duration=64, status=32, batch=32))
    assert ('Loss/loss', 64) in written and ('Progress/kimg', 0) in written

#----------------------------------------------------------------------------


def test_step_noise_posterior_is_drawn_last():
    """Adding the VAE posterior draw leaves the noise levels and noise of pixel runs unchanged."""
    pixel = train_step.StepNoise(seed=3, batch_size=8, item_shape=[4, 2, 2], device=torch.device('cpu'))
    latent = train_step.StepNoise(seed=3, batch_size=8, item_shape=[4, 2, 2], device=torch.device('cpu'), posterior=True)
    a, b = pixel.draw(cur_nimg=64), latent.draw(cur_nimg=64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert b[2].shape == (8, 4, 2, 2) and not torch.equal(b[2], b[1])


def test_vae_latents_use_the_given_posterior_noise():
    from training.encoders import StabilityVAEEncoder
    encoder = StabilityVAEEncoder()
    raw = torch.randn(3, 8, 2, 2)
    noise = torch.randn(3, 4, 2, 2)
    first = encoder.encode_latents(raw, noise)
    torch.manual_seed(123)  # the global generator is not consulted
    assert torch.equal(encoder.encode_latents(raw, noise), first)
    mean, std = raw.chunk(2, dim=1)
    scale = torch.as_tensor(encoder.scale, dtype=torch.float32).reshape(1, -1, 1, 1)
    bias = torch.as_tensor(encoder.bias, dtype=torch.float32).reshape(1, -1, 1, 1)
    torch.testing.assert_close(first, (mean + noise * std) * scale + bias)
