"""Training EDM v1 networks with train_edm2.py: presets, options, real runs (snapshots in EDM v1's layout, resume
after SIGKILL, fine-tuning an EDM v1 snapshot)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

import train_edm2
from tests.procs import REPO, child_env
from tests.test_train_edm2 import dry_run, load_state
from tests.tiny_edm1 import make_tiny_edm1, write_edm1_snapshot
from tests.training.test_networks import PUBLISHED_COUNTS
from tests.training.test_training_loop import read_stats, write_dataset
from torch_utils import distributed as dist
from training import augment, loss, networks
from training.loop import edm1_presets
from training.loop.train_edm2 import ConfigError, setup_training_config
from training.snapshots.loading import is_edm1_snapshot, load_snapshot

# 8x8 images, batch 64, a checkpoint every 16 steps; augmentation and dropout on, so resuming must restore the
# random streams they draw from.
TINY_ARGS = ['--preset=edm-cifar10-32x32-cond-vp', '--channels=8', '--channel-mult=1,2', '--num-blocks=1',
             '--attn-res=4', '--dropout=0.1', '--lr=0.01', '--rampup=0', '--workers=0', '--device=cpu', '--batch=64',
             '--status=1024', '--snapshot=1Ki', '--checkpoint=1Ki']


@pytest.fixture(scope='module')
def data8(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp('data') / 'tiny8'), resolution=8)


def cli(outdir, data, *extra):
    return [sys.executable, os.path.join(REPO, 'train_edm2.py'), f'--outdir={outdir}', f'--data={data}', *TINY_ARGS,
            *extra]


def run(cmd, timeout=180):
    return subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def cli_error(*args):
    dist.init(device='cpu')
    result = CliRunner().invoke(train_edm2.cmdline, list(args))
    assert result.exit_code != 0, result.output
    return result.output

#----------------------------------------------------------------------------
# Presets and options.

def _write_dataset(path, resolution, labels):
    """`len(labels)` black images; class labels as given (None: no dataset.json)."""
    write_dataset(path, num_images=len(labels), resolution=resolution, num_classes=1)
    if labels[0] is None:
        os.remove(os.path.join(path, 'dataset.json'))
        return path
    with open(os.path.join(path, 'dataset.json'), 'w') as f:
        json.dump({'labels': [[f'img{i:03d}.png', label] for i, label in enumerate(labels)]}, f)
    return path


@pytest.fixture(scope='module')
def published_data(tmp_path_factory):
    """Datasets with the shapes of the published models (a few images each)."""
    root = tmp_path_factory.mktemp('published')
    return {'cifar10': _write_dataset(str(root / 'cifar10'), 32, list(range(10))),
            'ffhq': _write_dataset(str(root / 'ffhq'), 64, [None, None]),
            'afhqv2': _write_dataset(str(root / 'afhqv2'), 64, [None, None]),
            'imagenet': _write_dataset(str(root / 'imagenet'), 64, [0, 999])}


@pytest.mark.parametrize('name', list(PUBLISHED_COUNTS))
def test_presets_build_the_published_networks(name, published_data, tmp_path):
    data = published_data[name.split('-')[1]]
    _, config = dry_run(f'--outdir={tmp_path / "o"}', f'--data={data}', f'--preset={name}')
    label_dim = {'cifar10': 10, 'imagenet': 1000}.get(name.split('-')[1], 0) if '-cond-' in name else 0
    interface = dict(img_resolution=int(name.split('-')[2].split('x')[0]), img_channels=3, label_dim=label_dim)
    net = edm1_presets.construct_edm1_network(dict(config['network_kwargs'], **interface), device='meta')
    assert sum(p.numel() for p in net.parameters()) == PUBLISHED_COUNTS[name][0]
    assert type(net) is networks.EDMPrecond and config['loss_kwargs'] == {'class_name': 'training.loss.EDMLoss'}
    options = edm1_presets.EDM1_MODELS[name]['options']
    assert config['batch_size'] == options['batch'] and config['lr_kwargs']['ref_lr'] == options['lr']
    assert config['lr_kwargs']['ref_batches'] == 0 and config['lr_kwargs']['rampup_Mimg'] == 10
    assert config['ema_kwargs'] == dict(class_name='training.phema.EDM1EMA', halflife_Mimg=options['ema'],
                                        rampup_ratio=0.05)
    assert (config['augment_kwargs'] or {}).get('p', 0) == options['augment']
    assert config['optimizer_kwargs'] == dict(class_name='torch.optim.Adam', betas=[0.9, 0.999], eps=1e-8)
    assert config['loss_scaling'] == options['ls'] and config['snapshot_layout'] == 'edm1'
    assert config['dataset_kwargs']['use_labels'] == options['cond']


def test_imagenet_preset_trains_whole_batches(published_data, tmp_path):
    _, config = dry_run(f'--outdir={tmp_path / "o"}', f'--data={published_data["imagenet"]}',
                        '--preset=edm-imagenet-64x64-cond-adm')
    assert config['total_nimg'] == 610352 * 4096  # 2500 Mimg in batches of 4096, the last one completed
    assert config['augment_kwargs'] is None and config['network_kwargs']['use_fp16'] is True
    assert 'augment_dim' not in config['network_kwargs']


def test_arch_and_precond_choose_the_network_and_its_loss(data8, tmp_path):
    _, config = dry_run(f'--outdir={tmp_path / "o"}', f'--data={data8}', *TINY_ARGS, '--arch=ncsnpp', '--precond=ve',
                        '--augment=0', '--ema=64Ki')
    kwargs = config['network_kwargs']
    assert kwargs['class_name'] == 'training.networks.VEPrecond' and kwargs['embedding_type'] == 'fourier'
    assert kwargs['model_channels'] == 8 and kwargs['channel_mult'] == [1, 2] and kwargs['attn_resolutions'] == [4]
    assert config['loss_kwargs'] == {'class_name': 'training.loss.VELoss'} and config['augment_kwargs'] is None
    assert 'augment_dim' not in kwargs and config['ema_kwargs']['halflife_Mimg'] == 65536 / 1e6
    _, config = dry_run(f'--outdir={tmp_path / "o"}', f'--data={data8}', *TINY_ARGS, '--P_mean=-1', '--P_std=1.5')
    assert config['loss_kwargs'] == dict(class_name='training.loss.EDMLoss', P_mean=-1.0, P_std=1.5)
    assert config['augment_kwargs'] == dict(class_name='training.augment.AugmentPipe', p=0.12,
                                            **edm1_presets.EDM1_AUGMENT_KWARGS)


@pytest.mark.parametrize('args, message', [
    (['--preset=edm2-img64-xs', '--arch=adm'], '--arch: applies to EDM v1 runs; preset edm2-img64-xs trains an EDM2'),
    (['--preset=edm2-img64-xs', '--ema=0.5'], '--ema: applies to EDM v1 runs'),
    ([*TINY_ARGS, '--precond=vp', '--P_mean=-1'], '--P_mean: sets the noise levels of the EDM formulation'),
    ([*TINY_ARGS, '--channels-per-head=8'], '--channels-per-head: EDM v1 architectures fix their attention heads'),
    (['--preset=edm-cifar10-32x32-cond-vq'], 'valid presets: edm2-img512-xxs'),
])
def test_bad_options_give_one_line_errors(data8, tmp_path, args, message):
    output = cli_error(f'--outdir={tmp_path / "o"}', f'--data={data8}', *args, '-n')
    assert message in output and not (tmp_path / 'o').exists()
    if 'valid presets' in message:
        assert 'edm-imagenet-64x64-cond-adm' in output

def test_library_callers_get_the_cli_wording(data8):
    with pytest.raises(ConfigError, match='^--channel-mult: "1,0" must be a comma-separated list of positive'):
        setup_training_config(preset='edm-cifar10-32x32-cond-vp', data=data8, channel_mult=[1, 0])
    with pytest.raises(ConfigError, match='^--arch: "unet" is none of ddpmpp, ncsnpp, adm$'):
        setup_training_config(preset='edm-cifar10-32x32-cond-vp', data=data8, arch='unet')
    with pytest.raises(ConfigError, match='^--ema: "-1" is neither an image count'):
        setup_training_config(preset='edm-cifar10-32x32-cond-vp', data=data8, ema='-1')

#----------------------------------------------------------------------------
# Real runs in subprocesses.

@pytest.fixture(scope='module')
def reference_run(data8, tmp_path_factory):
    """An uninterrupted 2 kimg run."""
    outdir = str(tmp_path_factory.mktemp('ref') / 'run')
    result = run(cli(outdir, data8, '--duration=2048'))
    assert result.returncode == 0, result.stderr[-2000:]
    return outdir


def test_run_writes_edm1_snapshots_and_the_loss_falls(reference_run):
    names = sorted(name for name in os.listdir(reference_run) if name.startswith('network-snapshot-'))
    assert names == ['network-snapshot-000000.pkl', 'network-snapshot-000001.pkl', 'network-snapshot-000002.pkl']
    data = load_snapshot(os.path.join(reference_run, names[-1]), '--net')
    assert type(data) is dict and list(data) == ['ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs']
    assert is_edm1_snapshot(data) and type(data['ema']) is networks.EDMPrecond and not data['ema'].training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in data['ema'].parameters())
    assert type(data['loss_fn']) is loss.EDMLoss and type(data['augment_pipe']) is augment.AugmentPipe
    assert data['augment_pipe'].p == 0.12 and data['ema'].model.map_augment is not None
    assert type(data['dataset_kwargs']) is dict and data['dataset_kwargs']['use_labels'] is True
    losses = [line['Loss/loss'] for line in read_stats(reference_run) if 'Loss/loss' in line]
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    first = load_snapshot(os.path.join(reference_run, names[0]), '--net')['ema'].state_dict()
    last = data['ema'].state_dict()
    assert any(not torch.equal(value, last[key]) for key, value in first.items())


def test_sigkill_then_same_command_resumes_to_identical_weights(data8, reference_run, tmp_path):
    outdir = str(tmp_path / 'killed')
    cmd = cli(outdir, data8, '--duration=2048')
    proc = subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state1 = os.path.join(outdir, 'training-state-0000001.pt')
    deadline = time.time() + 120
    while not os.path.exists(state1) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'run finished before it could be killed'
    assert not os.path.exists(os.path.join(outdir, 'training-state-0000002.pt'))

    result = run(cmd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'Training from 1 kimg to 2 kimg' in open(os.path.join(outdir, 'log.txt')).read()
    resumed = load_state(os.path.join(outdir, 'training-state-0000002.pt'))
    reference = load_state(os.path.join(reference_run, 'training-state-0000002.pt'))
    assert resumed['state']['cur_nimg'] == 2048
    for name in ('net', 'ema'):
        for key, value in reference[name].items():
            assert torch.equal(value, resumed[name][key]), f'{name}.{key}'
    snapshot = 'network-snapshot-000002.pkl'
    ema = load_snapshot(os.path.join(outdir, snapshot), '--net')['ema'].state_dict()
    ref_ema = load_snapshot(os.path.join(reference_run, snapshot), '--net')['ema'].state_dict()
    assert all(torch.equal(value, ema[key]) for key, value in ref_ema.items())


def test_finetune_an_edm1_snapshot_with_the_loss_of_its_formulation(tmp_path):
    data = write_dataset(str(tmp_path / 'data16'), num_images=16, resolution=16)
    source = make_tiny_edm1('VPPrecond', 'ddpmpp', dropout=0.0)
    write_edm1_snapshot(str(tmp_path / 'vp.pkl'), source, loss.VPLoss(), augment.AugmentPipe(p=0.12))
    outdir = str(tmp_path / 'ft')
    result = run([sys.executable, 'train_edm2.py', f'--outdir={outdir}', f'--data={data}',
                  '--preset=edm-cifar10-32x32-cond-vp', f'--model2finetune={tmp_path / "vp.pkl"}', '--lr=0.001',
                  '--rampup=0', '--workers=0', '--device=cpu', '--batch=16', '--duration=64', '--status=32',
                  '--snapshot=1Ki', '--checkpoint=1Ki', '--freeze-attn=1'])
    assert result.returncode == 0, result.stderr[-2000:]
    options = json.load(open(os.path.join(outdir, 'training_options.json')))
    assert options['network_kwargs']['class_name'] == 'training.networks.VPPrecond'
    assert options['loss_kwargs'] == {'class_name': 'training.loss.VPLoss'}
    assert options['ema_kwargs']['rampup_ratio'] is None  # the EMA starts at the loaded weights
    assert 'Frozen parameter: model.enc.8x8_block0.qkv.weight' in result.stdout
    start = load_snapshot(os.path.join(outdir, 'network-snapshot-000000.pkl'), '--net')
    assert type(start['loss_fn']) is loss.VPLoss and type(start['ema']) is networks.VPPrecond
    assert all(torch.equal(value, start['ema'].state_dict()[key]) for key, value in source.state_dict().items())
    trained = load_state(os.path.join(outdir, 'training-state-0000000.pt'))
    assert trained['state']['cur_nimg'] == 64
    changed = [key for key, value in source.state_dict().items() if not torch.equal(value, trained['net'][key])]
    assert changed and not [key for key in changed if '.qkv.' in key or '.proj.' in key]
    losses = [line['Loss/loss'] for line in read_stats(outdir) if 'Loss/loss' in line]
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))


def test_finetune_refuses_a_mismatched_generation_or_augmentation(data8, tmp_path):
    from tests.tiny import write_tiny_snapshot
    write_tiny_snapshot(str(tmp_path / 'edm2.pkl'))
    write_edm1_snapshot(str(tmp_path / 've.pkl'), make_tiny_edm1('VEPrecond', 'ncsnpp', augment_dim=0))
    write_edm1_snapshot(str(tmp_path / 'iddpm.pkl'), make_tiny_edm1('iDDPMPrecond', 'adm'))
    common = [f'--outdir={tmp_path / "o"}', f'--data={data8}', '--cond=0', '-n']
    output = cli_error(*common, '--preset=base-finetuning', f'--model2finetune={tmp_path / "ve.pkl"}')
    assert f'--model2finetune: {tmp_path / "ve.pkl"} holds an EDM v1 network (VEPrecond); fine-tune it with an EDM ' \
           'v1 preset' in output
    output = cli_error(*common, '--preset=edm-cifar10-32x32-uncond-ve', f'--model2finetune={tmp_path / "edm2.pkl"}')
    assert 'holds an EDM2 network (Precond); use an EDM2 preset' in output
    output = cli_error(*common, '--preset=edm-cifar10-32x32-uncond-ve', f'--model2finetune={tmp_path / "ve.pkl"}',
                       '--augment=0.2')
    assert '--augment: the network from' in output and 'has no augmentation-label input' in output
    output = cli_error(*common, '--preset=edm-cifar10-32x32-uncond-ve', f'--model2finetune={tmp_path / "iddpm.pkl"}')
    assert '--model2finetune: EDM v1 has no training loss for iDDPMPrecond' in output
    result, config = dry_run(*common[:-1], '--preset=edm-cifar10-32x32-uncond-ve',
                             f'--model2finetune={tmp_path / "ve.pkl"}')
    assert 'training without augmentation' in result.output and config['augment_kwargs'] is None
    assert config['loss_kwargs'] == {'class_name': 'training.loss.VELoss'}


def test_torchrun_finetunes_without_augmentation(tmp_path):
    """Two processes (DistributedDataParallel): a network with an augmentation-label input trained without
    augmentation keeps that input's weights frozen, so no process waits for their gradients."""
    data = write_dataset(str(tmp_path / 'data16'), num_images=16, resolution=16)
    source = make_tiny_edm1('EDMPrecond', 'ddpmpp', dropout=0.0)
    write_edm1_snapshot(str(tmp_path / 'edm.pkl'), source)
    outdir = str(tmp_path / 'ft')
    result = run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train_edm2.py',
                  f'--outdir={outdir}', f'--data={data}', '--preset=edm-cifar10-32x32-cond-vp', '--augment=0',
                  f'--model2finetune={tmp_path / "edm.pkl"}', '--rampup=0', '--workers=0', '--device=cpu', '--batch=16',
                  '--duration=32', '--status=16', '--snapshot=1Ki', '--checkpoint=1Ki'])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert 'Frozen parameter: model.map_augment.weight' in result.stdout
    trained = load_state(os.path.join(outdir, 'training-state-0000000.pt'))
    assert trained['state']['cur_nimg'] == 32
    assert torch.equal(trained['net']['model.map_augment.weight'], source.state_dict()['model.map_augment.weight'])
    assert not torch.equal(trained['net']['model.map_layer0.weight'], source.state_dict()['model.map_layer0.weight'])
