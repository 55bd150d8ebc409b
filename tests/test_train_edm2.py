"""Tests of the train_edm2.py command line: options, errors, resume after SIGKILL, SIGTERM, torchrun, outputs."""

import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import dnnlib
import train_edm2
from tests import faults
from tests.faults import png_bytes, write_files
from tests.training.test_training_loop import tiny_config, write_dataset
from torch_utils import distributed as dist
from tests.procs import child_env
from tests.tiny import make_tiny_precond, write_tiny_snapshot
from training.loop.train_edm2 import _write_options, default_rampup, format_nimg, parse_nimg, parse_rampup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)

# 8x8 images, batch 64: a checkpoint interval of 1024 images is only 16 steps.
TINY_ARGS = ['--cond=1', '--preset=edm2-cifar10-32x32-cond', '--channels=8', '--channel-mult=1,2', '--num-blocks=1',
             '--attn-res=4', '--channels-per-head=8', '--dropout=0', '--lr=0.01', '--rampup=0', '--fp16=0',
             '--workers=0', '--device=cpu', '--batch=64', '--status=1024', '--snapshot=1Ki', '--checkpoint=1Ki']


@pytest.fixture(scope='module')
def data8(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp('data') / 'tiny8'), resolution=8)


def cli(outdir, data, *extra):
    return [sys.executable, os.path.join(REPO, 'train_edm2.py'), f'--outdir={outdir}', f'--data={data}', *TINY_ARGS, *extra]


def run(cmd, timeout=120):
    return subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def without(*prefixes):
    return [arg for arg in TINY_ARGS if not arg.startswith(prefixes)]


def load_state(path):
    return torch.load(path, map_location='cpu', weights_only=False)

#----------------------------------------------------------------------------
# Options.

def test_parse_nimg_units():
    assert parse_nimg('128Ki') == 128 << 10 and parse_nimg('8Mi') == 8 << 20 and parse_nimg('2Gi') == 2 << 30
    assert parse_nimg('4096') == 4096 and parse_nimg(7) == 7 and parse_nimg(None) is None
    with pytest.raises(ValueError):
        parse_nimg('1.5Mi')


def test_rampup_defaults():
    assert default_rampup({'rampup': 3.0}, finetuning=True) == 3.0
    assert default_rampup({}, finetuning=False) == 10.0   # official
    assert default_rampup({}, finetuning=True) == 0.0     # fork


def test_dry_run_prints_resolved_options(data8, tmp_path):
    dist.init(device='cpu')
    outdir = tmp_path / 'dry'
    result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={outdir}', f'--data={data8}', '--preset=edm2-img512-xs',
                                                     '--cond=0', '--channels=16', '--batch=64', '--duration=1Mi', '-n'])
    assert result.exit_code == 0, result.output
    assert 'Dry run; exiting.' in result.output and not outdir.exists()
    config = json.loads(result.output.split('Training config:')[1].split('\n\n')[0])
    assert config['total_nimg'] == 1 << 20 and config['batch_size'] == 64
    assert config['network_kwargs']['model_channels'] == 16 and config['lr_kwargs']['ref_lr'] == 0.012
    assert config['lr_kwargs']['rampup_Mimg'] == 10.0 and config['max_grad_norm'] == 0 and config['freeze_down'] is False
    assert config['dataset_kwargs']['class_name'] == 'training.dataset.ImageFolderDataset'
    assert config['encoder_kwargs']['class_name'] == 'training.encoders.StandardRGBEncoder'


@pytest.mark.parametrize('args, message', [
    (['--preset=nope'], 'Invalid configuration preset "nope"'),
    (['--duration=1000'], '--duration'),
    (['--batch=1.5Ki'], 'is not an image count'),
    (['--categories=0,9'], 'out of range'),
    (['--categories=0,x'], 'Error: --categories: invalid item "x"'),
    (['--categories='], 'Error: --categories: invalid item ""'),
    (['--categories=2-0'], 'start exceeds end'),
    (['--channel-mult='], "'--channel-mult': needs at least one multiplier"),
    (['--channel-mult=1,0'], "'--channel-mult': \"1,0\" must be a comma-separated list of positive integers"),
    (['--attn-res=-4'], "'--attn-res': \"-4\" must be a comma-separated"),
    (['--device=foo'], "Invalid value for '--device': \"foo\" is not a torch device"),
    (['--model2finetune=nofile.pkl', '-n'], '--model2finetune: nofile.pkl does not exist'),
    (['--channel-mult=1,2,2,2,2', '-n'], '--data: {data}: resolution 8 is not divisible by 2^(len(channel_mult)-1) = 16'),
])
def test_bad_options_give_one_line_errors(data8, tmp_path, args, message):
    dist.init(device='cpu')
    result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "bad"}', f'--data={data8}', *TINY_ARGS[1:], *args])
    assert result.exit_code != 0 and message.format(data=data8) in result.output, result.output
    assert 'Traceback' not in result.output and result.exc_info[0] is SystemExit
    assert not (tmp_path / 'bad').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU-only refusal')
def test_cuda_device_refused_at_parse_time_on_cpu_only_torch(data8, tmp_path):
    result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "o"}', f'--data={data8}', *without('--device', '--fp16'),
                                                     '--device=cuda', '-n'])
    assert result.exit_code == 2 and 'CUDA is not available' in result.output and not (tmp_path / 'o').exists()


def test_non_square_images_refused_before_the_run_directory(tmp_path):
    dist.init(device='cpu')
    data = tmp_path / 'rect'
    data.mkdir()
    for i in range(2):
        PIL.Image.new('RGB', (16, 12)).save(data / f'{i}.png')
    result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "o"}', f'--data={data}', '--cond=0', *TINY_ARGS[1:]])
    assert result.exit_code == 1 and f'Error: --data: {data}: images are 16x12 (width x height)' in result.output
    assert not (tmp_path / 'o').exists()


def test_outdir_that_is_not_a_directory(data8, tmp_path):
    dist.init(device='cpu')
    (tmp_path / 'afile').write_text('x')
    for outdir, message in ((tmp_path / 'afile', f'{tmp_path}/afile is a file, not a directory'),
                            (tmp_path / 'afile' / 'sub', f'cannot create {tmp_path}/afile/sub: {tmp_path}/afile is a file, not a directory')):
        result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={outdir}', f'--data={data8}', *TINY_ARGS])
        assert result.exit_code == 1 and 'Error: --outdir: ' in result.output and message in result.output, result.output
        assert 'Number of images' not in result.output  # checked before the dataset scan


def test_score_filter_on_flat_score_only_metadata_dry_run(tmp_path):
    dist.init(device='cpu')
    data = write_dataset(str(tmp_path / 'flat'), num_images=6, resolution=8)
    with open(os.path.join(data, 'metadata.json'), 'w') as f:
        json.dump({'metadata': {f'img{i:03d}': {'nima': i} for i in range(6)}}, f)  # score_dataset.py, flat folder
    result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "o"}', f'--data={data}', '--cond=0',
                                                     *TINY_ARGS[1:], '--nima-threshold=4', '-n'])
    assert result.exit_code == 0 and 'After filtration there are 2 images' in result.output, result.output


def _write_scored(data: str, metadata: dict) -> None:
    with open(os.path.join(data, 'metadata.json'), 'w') as f:
        json.dump({'metadata': metadata}, f)


def test_scores_of_a_converted_dataset_keep_its_ten_classes(tmp_path):
    # Issue #15, 1: metadata.json written for convert output ("labels": the shard folder) must not make it 1 class.
    dist.init(device='cpu')
    data = str(tmp_path / 'conv')
    os.makedirs(os.path.join(data, '00000'))
    for i in range(20):
        PIL.Image.new('RGB', (8, 8), (10 * i, 0, 0)).save(os.path.join(data, '00000', f'img{i:08d}.png'))
    with open(os.path.join(data, 'dataset.json'), 'w') as f:
        json.dump({'labels': [[f'00000/img{i:08d}.png', i % 10] for i in range(20)]}, f)
    _write_scored(data, {f'00000/img{i:08d}': {'nima': float(i), 'labels': '00000'} for i in range(20)})
    result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "o"}', f'--data={data}', *TINY_ARGS,
                                                     '--categories=3', '-n'])
    assert result.exit_code == 0 and 'After filtration there are 2 images' in result.output, result.output
    ds = dnnlib.util.construct_class_by_name(**tiny_config(data, max_size=1000).dataset_kwargs)  # what the loop builds
    assert ds.label_dim == 10 and [int(ds.get_label(i).argmax()) for i in range(20)] == [i % 10 for i in range(20)]


def test_class_folders_need_dataset_json_for_cond_with_and_without_filters(tmp_path):
    # Issue #15, 2: one rule for labels; the error says how to get them.
    dist.init(device='cpu')
    data = str(tmp_path / 'folders')
    for c in range(3):
        os.makedirs(os.path.join(data, f'class{c}'))
        for i in range(2):
            PIL.Image.new('RGB', (8, 8), (c, i, 0)).save(os.path.join(data, f'class{c}', f'{i}.png'))
    _write_scored(data, {f'class{c}/{i}': {'nima': 5.0, 'labels': f'class{c}'} for c in range(3) for i in range(2)})
    outputs = []
    for extra in ([], ['--max-size=1000']):
        result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "o"}', f'--data={data}', *TINY_ARGS,
                                                         *extra, '-n'])
        assert result.exit_code == 1, result.output
        outputs.append(next(line for line in result.output.splitlines() if line.startswith('Error: ')))
    assert outputs[0] == outputs[1]
    assert all(hint in outputs[0] for hint in ('no labels found', 'dataset.json', 'dataset_tool.py convert', '--cond=0'))


def test_batch_larger_than_the_dataset_warns(tmp_path):
    # Issue #15, 8: each image repeated in every batch.
    dist.init(device='cpu')
    data = write_dataset(str(tmp_path / 'six'), num_images=6, resolution=8)
    result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "o"}', f'--data={data}', *TINY_ARGS, '-n'])
    assert result.exit_code == 0, result.output
    assert ('Warning: --batch 64 is larger than the dataset (6 images): every image appears about 10 times in each batch'
            in result.output)


def test_finetune_warns_about_ignored_network_options_and_prints_compute_dtype(data8, tmp_path):
    dist.init(device='cpu')
    write_tiny_snapshot(str(tmp_path / 'src.pkl'))
    result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "o"}', f'--data={data8}', '--cond=0',
        '--preset=base-finetuning', f'--model2finetune={tmp_path / "src.pkl"}', '--channels=64', '--dropout=0.5',
        '--dtype=bf16', '-n'])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if 'is ignored with --model2finetune' in line]
    assert [line.split()[1] for line in warnings] == ['--channels', '--dropout']
    assert 'Compute dtype:           bfloat16' in result.output and 'Mixed-precision' not in result.output
    result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "o"}', f'--data={data8}', *without('--device', '--fp16'),
                                                     '--fp16=1', '-n'])
    assert 'Compute dtype:           float32' in result.output  # fp16 only on CUDA


def test_training_options_rewritten_until_a_training_state_exists(tmp_path, capsys):
    run_dir = str(tmp_path / 'run')
    _write_options(run_dir, {'preload_model': 'nofile.pkl'})
    _write_options(run_dir, {'preload_model': 'good.pkl'})  # the failed first try left only the options
    stored = json.load(open(os.path.join(run_dir, 'training_options.json')))
    assert stored == {'preload_model': 'good.pkl'} and 'resuming' not in capsys.readouterr().out
    open(os.path.join(run_dir, 'training-state-0000001.pt'), 'wb').close()
    _write_options(run_dir, {'preload_model': 'other.pkl'})
    assert 'resuming with the new values' in capsys.readouterr().out
    assert json.load(open(os.path.join(run_dir, 'training_options.json'))) == stored


def dry_run(*args):
    """CliRunner result and the printed config of `train_edm2.py -n` with `args`."""
    dist.init(device='cpu')
    result = CliRunner().invoke(train_edm2.cmdline, [*args, '-n'])
    assert result.exit_code == 0, result.output
    return result, json.loads(result.output.split('Training config:')[1].split('\n\n')[0])


def test_rampup_units():
    assert parse_rampup('1Mi') == (1 << 20) / 1e6 and parse_rampup('10') == 10.0 and parse_rampup(0.5) == 0.5
    assert parse_rampup(None) is None
    for bad in ('1.5Ki', '-1', 'nan', 'x'):
        with pytest.raises(ValueError):
            parse_rampup(bad)
    assert [format_nimg(n) for n in (2 << 30, 3 << 20, 1024, 1000, 0)] == ['2Gi', '3Mi', '1Ki', '1000', '0']


def test_rampup_takes_image_counts_and_warns_when_longer_than_the_run(data8, tmp_path):
    outdir = f'--outdir={tmp_path / "o"}'
    result, config = dry_run(outdir, f'--data={data8}', *without('--rampup'), '--rampup=1Ki', '--duration=4Ki')
    assert config['lr_kwargs']['rampup_Mimg'] == 1024 / 1e6 and 'ramp-up' not in result.output
    result, config = dry_run(outdir, f'--data={data8}', *without('--rampup'), '--rampup=1000', '--duration=1Ki')
    assert config['lr_kwargs']['rampup_Mimg'] == 1000.0  # a plain number stays Mimg
    warnings = [line for line in result.output.splitlines() if 'ramp-up' in line]
    assert warnings == ['Warning: the learning-rate ramp-up (--rampup=1000 Mimg = 1000000000 images) is longer than '
                        'the run (--duration=1Ki), so the learning rate never reaches --lr; --rampup takes images '
                        'like --duration (e.g. 64Ki) or a plain number in Mimg']
    result = CliRunner().invoke(train_edm2.cmdline, [outdir, f'--data={data8}', *without('--rampup'), '--rampup=1.5Ki'])
    assert result.exit_code == 2 and "Invalid value for '--rampup': \"1.5Ki\" is neither an image count" in result.output


def test_finetune_options_record_the_network_that_trains(data8, tmp_path):
    write_tiny_snapshot(str(tmp_path / 'src.pkl'), net=make_tiny_precond(dropout=0.13, channels_per_head=8))
    _, config = dry_run(f'--outdir={tmp_path / "o"}', f'--data={data8}', '--cond=0', '--preset=base-finetuning',
                        f'--model2finetune={tmp_path / "src.pkl"}', '--batch=64', '--duration=64Ki')
    assert config['network_kwargs'] == dict(class_name='training.networks_edm2.Precond', use_fp16=False,
                                            model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                                            channels_per_head=8, dropout=0.13)


def test_start_prints_the_length_and_warns_about_epochs_and_noise_settings(data8, tmp_path):
    write_tiny_snapshot(str(tmp_path / 'src.pkl'))
    args = [f'--outdir={tmp_path / "o"}', f'--data={data8}', '--cond=0', '--preset=base-finetuning',
            f'--model2finetune={tmp_path / "src.pkl"}']
    result, _ = dry_run(*args)  # the preset's defaults on a 32-image pixel dataset
    assert 'Duration:                2Gi images = 8388608 steps\n' in result.output
    warnings = [line for line in result.output.splitlines() if line.startswith('Warning')]
    assert warnings == [
        'Warning: --batch 256 is larger than the dataset (32 images): every image appears about 8 times in each batch',
        'Warning: the noise settings of preset base-finetuning (--P_mean=-0.4 --P_std=1.0) are meant for VAE latents, '
        'but --data holds RGB pixels; give --P_mean and --P_std (preset edm2-img64-xs uses --P_mean=-0.8 --P_std=1.6)',
        'Warning: --duration=2Gi is 67108864 epochs of the 32-image dataset (8388608 steps of --batch=256); the '
        'official recipes train for a few thousand epochs at most: give a shorter --duration']
    result, _ = dry_run(*args, '--P_mean=-0.8', '--P_std=1.6', '--duration=256Ki', '--batch=64')
    assert 'Duration:                256Ki images = 4096 steps\n' in result.output
    assert [line for line in result.output.splitlines() if line.startswith('Warning')] == [
        'Warning: --batch 64 is larger than the dataset (32 images): every image appears about 2 times in each batch']


def test_model2finetune_must_be_a_snapshot_before_anything_is_written(data8, tmp_path):
    dist.init(device='cpu')
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'stats.jsonl').write_text('{"Loss/loss": 1.0}\n')
    write_tiny_snapshot(str(run_dir / 'network-snapshot-0000001-0.100.pkl'))
    for source, message in (
            (run_dir, f'--model2finetune: {run_dir} is a directory, not a network snapshot; did you mean '
                      f'{run_dir}/network-snapshot-0000001-0.100.pkl?'),
            (tmp_path, f'--model2finetune: {tmp_path} is a directory, not a network snapshot (expected a network '
                       'snapshot .pkl)'),
            (run_dir / 'stats.jsonl', f'--model2finetune: {run_dir}/stats.jsonl: truncated or not a pickle')):
        for dry in ([], ['-n']):
            result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "o"}', f'--data={data8}',
                                        '--cond=0', '--preset=base-finetuning', f'--model2finetune={source}', *dry])
            errors = [line for line in result.output.splitlines() if line.startswith('Error')]
            assert result.exit_code == 1 and len(errors) == 1 and errors[0].startswith(f'Error: {message}'), result.output
            assert not (tmp_path / 'o').exists()


def test_cond_without_labels_is_rejected(tmp_path):
    dist.init(device='cpu')
    data = write_dataset(str(tmp_path / 'nolabels'), num_images=4, resolution=8)
    os.remove(os.path.join(data, 'dataset.json'))
    result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "o"}', f'--data={data}', *TINY_ARGS])
    assert result.exit_code == 1 and '--cond=True, but no labels found in the dataset' in result.output

#----------------------------------------------------------------------------
# Real runs in subprocesses.

@pytest.fixture(scope='module')
def reference_run(data8, tmp_path_factory):
    """An uninterrupted 3 kimg run."""
    outdir = str(tmp_path_factory.mktemp('ref') / 'run')
    result = run(cli(outdir, data8, '--duration=3072'))
    assert result.returncode == 0, result.stderr[-2000:]
    return outdir


def test_sigkill_then_same_command_resumes_to_identical_weights(data8, reference_run, tmp_path):
    outdir = str(tmp_path / 'killed')
    cmd = cli(outdir, data8, '--duration=3072')
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state1 = os.path.join(outdir, 'training-state-0000001.pt')
    deadline = time.time() + 90
    while not os.path.exists(state1) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'run finished before it could be killed'
    assert not os.path.exists(os.path.join(outdir, 'training-state-0000003.pt'))

    result = run(cmd)
    assert result.returncode == 0, result.stderr[-2000:]
    log = open(os.path.join(outdir, 'log.txt')).read()
    assert 'Loading' in log and ('Training from 1 kimg to 3 kimg' in log or 'Training from 2 kimg to 3 kimg' in log)
    resumed = load_state(os.path.join(outdir, 'training-state-0000003.pt'))
    reference = load_state(os.path.join(reference_run, 'training-state-0000003.pt'))
    assert resumed['state']['cur_nimg'] == 3072
    for key, value in reference['net'].items():
        assert torch.equal(value, resumed['net'][key]), key
    for ref_ema, res_ema in zip(reference['ema']['emas'], resumed['ema']['emas']):
        assert all(torch.equal(v, res_ema[k]) for k, v in ref_ema.items())
    assert len([line for line in open(os.path.join(outdir, 'stats.jsonl'))]) >= 3
    assert json.load(open(os.path.join(outdir, 'training_options.json')))['total_nimg'] == 3072


def test_snapshots_load_in_generate_images_and_reconstruct_phema(reference_run, tmp_path):
    from training.snapshots.reconstruct_phema import reconstruct_from_dir
    from training.sampling.generate_images import generate_images
    snapshot = os.path.join(reference_run, 'network-snapshot-0000003-0.100.pkl')
    images = [r.images for r in generate_images(net=snapshot, seeds=[0, 1], num_steps=4, device='cpu', verbose=False)]
    assert images[0].shape == (2, 3, 8, 8) and images[0].dtype == torch.uint8
    paths = reconstruct_from_dir(indir=reference_run, outdir=str(tmp_path / 'phema'), outstd=[0.07], inprefix='network-snapshot')
    assert len(paths) == 1 and os.path.isfile(paths[0])
    result = run([sys.executable, 'generate_images.py', f'--net={paths[0]}', f'--outdir={tmp_path / "img"}', '--seeds=0',
                  '--steps=4', '--device=cpu'])
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.isfile(tmp_path / 'img' / '000000.png')


def test_sigterm_writes_a_checkpoint_and_exits(data8, tmp_path):
    outdir = str(tmp_path / 'term')
    proc = subprocess.Popen(cli(outdir, data8, '--duration=64Ki', '--checkpoint=64Ki', '--snapshot=64Ki'), env=ENV,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while not os.path.exists(os.path.join(outdir, 'stats.jsonl')) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-2000:]
    assert 'Stopped by signal' in output
    states = [n for n in os.listdir(outdir) if n.startswith('training-state-')]
    assert len(states) == 1
    assert 0 < load_state(os.path.join(outdir, states[0]))['state']['cur_nimg'] < 64 << 10


def test_ctrl_c_writes_a_checkpoint_and_exits(data8, tmp_path):
    """Ctrl-C reaches the whole process group, data loader workers included."""
    outdir = str(tmp_path / 'ctrl-c')
    proc = subprocess.Popen(cli(outdir, data8, '--duration=64Ki', '--checkpoint=64Ki', '--snapshot=64Ki', '--workers=1'),
                            env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 90
    while not os.path.exists(os.path.join(outdir, 'stats.jsonl')) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-2000:]
    assert 'Received signal SIGINT' in output and 'Stopped by signal' in output and 'Traceback' not in output
    states = [n for n in os.listdir(outdir) if n.startswith('training-state-')]
    assert len(states) == 1
    assert 0 < load_state(os.path.join(outdir, states[0]))['state']['cur_nimg'] < 64 << 10


def test_torchrun_two_processes_match_one(data8, tmp_path):
    args = ['--duration=256']
    one = run(cli(str(tmp_path / 'one'), data8, *args, '--batch-gpu=16'))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               *cli(str(tmp_path / 'two'), data8, *args)[1:]])
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    state_one = load_state(str(tmp_path / 'one' / 'training-state-0000000.pt'))
    state_two = load_state(str(tmp_path / 'two' / 'training-state-0000000.pt'))
    assert state_two['state']['cur_nimg'] == 256
    for key, value in state_one['net'].items():
        torch.testing.assert_close(state_two['net'][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert float(state_one['net']['unet.out_gain']) != 0  # the weights did move

#----------------------------------------------------------------------------


def test_node_cache_option_reaches_the_dataset(data8, tmp_path):
    dist.init(device='cpu')
    result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "nc"}', f'--data={data8}', '--cond=0',
                                                     '--preset=edm2-img512-xs', '--channels=16', '--node-cache=1', '-n'])
    assert result.exit_code == 0, result.output
    config = json.loads(result.output.split('Training config:')[1].split('\n\n')[0])
    assert config['dataset_kwargs']['node_cache'] is True


def test_empty_attn_res_means_no_attention(data8, tmp_path):
    dist.init(device='cpu')
    args = [a for a in TINY_ARGS[1:] if not a.startswith('--attn-res')]
    result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "run"}', f'--data={data8}', *args, '--attn-res=', '-n'])
    assert result.exit_code == 0, result.output
    assert '"attn_resolutions": []' in result.output, result.output


def test_unusable_node_cache_falls_back_to_the_data(data8, tmp_path, monkeypatch):
    dist.init(device='cpu')
    archive = shutil.make_archive(str(tmp_path / 'tiny8'), 'zip', data8)
    blocker = tmp_path / 'file'
    blocker.write_bytes(b'')
    monkeypatch.setenv('EDM2_DATASET_CACHE', str(blocker / 'cache'))  # cannot be created
    result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "nc"}', f'--data={archive}',
                                                     *TINY_ARGS, '--node-cache=1', '-n'])
    assert result.exit_code == 0, result.output
    assert 'Node-local dataset cache unusable ([Errno ' in result.output and '--data' not in result.output
    assert f'; reading {archive} directly\n' in result.output and 'Dry run; exiting.' in result.output


def test_labels_missing_for_some_images_is_one_line_about_data(tmp_path):
    dist.init(device='cpu')
    data = write_dataset(str(tmp_path / 'partial'), num_images=4, resolution=8)
    with open(os.path.join(data, 'dataset.json'), 'w') as f:
        json.dump({'labels': [['img000.png', 0], ['img001.png', 1]]}, f)
    result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path / "o"}', f'--data={data}', *TINY_ARGS, '-n'])
    assert result.exit_code == 1 and not isinstance(result.exception, KeyError), result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert errors == [f'Error: --data: dataset.json of {data} has no label for img002.png (2 images unlabeled)']


def test_incomplete_torchrun_environment_is_one_line(data8, tmp_path):
    result = subprocess.run(cli(str(tmp_path / 'o'), data8, '-n'), env=child_env(WORLD_SIZE='2'), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    assert result.stderr.strip() == ('Error: Incomplete distributed environment (WORLD_SIZE=2): RANK is not set; start '
                                     'multi-process jobs with torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT')


@pytest.mark.parametrize('opts, message', [
    (dict(channel_mult=[]), '--channel-mult: needs at least one multiplier, e.g. 1,2,2'),
    (dict(channel_mult=[1, 0]), '--channel-mult: "1,0" must be a comma-separated list of positive integers'),
    (dict(attn_res=[-4]), '--attn-res: "-4" must be a comma-separated list of positive integers'),
])
def test_library_refuses_bad_level_lists_with_the_cli_wording(opts, message):
    from training.loop.train_edm2 import ConfigError, _network_kwargs
    with pytest.raises(ConfigError) as info:
        _network_kwargs('edm2-img64-xs', dict(channels=8, dropout=0, fp16=False, **opts))
    assert str(info.value) == message

#----------------------------------------------------------------------------
# Injected faults (docs/reliability.md): fuzzed image counts, a full disk under training_options.json, a
# dataset without labels, a hostile --model2finetune, SIGKILL during a checkpoint write plus a torn newest
# checkpoint, a loss that stays non-finite, a torchrun rank that dies or hangs. The 12-trial version of the
# kill test with random kill times is bench/kill_resume.py.

NIMG_UNITS = {'': 0, 'Ki': 10, 'Mi': 20, 'Gi': 30}


@pytest.mark.reliability
@settings(max_examples=60, deadline=500)
@given(st.lists(st.sampled_from(list('0123456789,-.eE+ KMGi') + ['...', 'inf', 'nan', 'x', '\n']),
                max_size=20).map(''.join) | st.text(max_size=20))
def test_parse_nimg_returns_int_or_value_error(text):
    try:
        value = parse_nimg(text)
    except ValueError as err:
        assert '\n' not in str(err)
        return
    # Accepted: an integer with an optional unit Ki, Mi or Gi (a power of two), read back by format_nimg.
    stripped = text.strip()
    unit = next((unit for unit in ('Ki', 'Mi', 'Gi') if stripped.endswith(unit)), '')
    assert type(value) is int and value == int(stripped[:len(stripped) - len(unit)]) << NIMG_UNITS[unit]
    assert parse_nimg(format_nimg(value)) == value


@pytest.mark.reliability
@settings(max_examples=60, deadline=500)
@given(st.integers(0, 10**6), st.sampled_from(list(NIMG_UNITS)))
def test_parse_nimg_units_fuzzed(number, unit):
    assert parse_nimg(f'{number}{unit}') == number << NIMG_UNITS[unit]
    assert parse_nimg(format_nimg(number << NIMG_UNITS[unit])) == number << NIMG_UNITS[unit]


@pytest.mark.reliability
def test_training_options_json_full_disk(tmp_path, full_disk):
    # _write_options keeps an existing file (resume), so the failing write is the first one.
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    full_disk()
    with pytest.raises(OSError) as info:
        _write_options(str(run_dir), dict(batch_size=2))
    assert info.value.errno == errno.ENOSPC and 'training_options.json' in str(info.value)
    assert os.listdir(run_dir) == []


def _run_child(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)


@pytest.mark.reliability
def test_train_cond_without_labels_is_refused(tmp_path):
    data = write_files(tmp_path / 'ds', {'a.png': png_bytes(16), 'b.png': png_bytes(16)})
    result = faults.run_script('train_edm2.py', f'--outdir={tmp_path / "run"}', f'--data={data}', '--cond=1',
                               '--preset=edm2-img512-xs', '--batch=2', '--duration=4', '--dry-run')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and '--cond=True, but no labels found in the dataset' in errors[0], result.stderr
    assert not (tmp_path / 'run').exists()


@pytest.mark.reliability
def test_train_refuses_hostile_model2finetune(tmp_path):
    files = faults.write_bad_pickles(tmp_path)
    data = write_files(tmp_path / 'data', {'0.png': png_bytes(16), '1.png': png_bytes(16)})
    result = faults.run_script('train_edm2.py', f'--outdir={tmp_path / "run"}', f'--data={data}', '--cond=0',
                               '--preset=base-finetuning', f'--model2finetune={files["hostile"]}', '--batch=2',
                               '--duration=4', '--device=cpu', '--workers=0')
    faults.assert_one_line_refusal(result, f"--model2finetune: {files['hostile']}: refusing to load global")
    assert not os.path.exists(files['marker']) and not (tmp_path / 'run').exists()


@pytest.mark.reliability
def test_kill_during_checkpoint_write_and_torn_file_resume_bit_exact(data8, tmp_path):
    reference = _run_child(cli(tmp_path / 'ref', data8, '--duration=2048'))
    assert reference.returncode == 0, reference.stderr[-2000:]

    # 1. SIGKILL exactly while training-state-0000002.pt is being written (its temp file exists).
    outdir = tmp_path / 'killed'
    cmd = cli(outdir, data8, '--duration=2048')
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if glob.glob(str(outdir / '.training-state-0000002.pt.tmp-*')):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before the checkpoint write could be interrupted'
    assert not (outdir / 'training-state-0000002.pt').exists()  # Never a torn file under the final name.
    load_state(outdir / 'training-state-0000001.pt')  # The previous checkpoint is complete.
    assert glob.glob(str(outdir / '.training-state-0000002.pt.tmp-*'))  # SIGKILL leaves the temp file...

    # 2. Worse: a torn file with the newest name (e.g. a non-atomic copy) must be skipped, not loaded.
    complete = (outdir / 'training-state-0000001.pt').read_bytes()
    (outdir / 'training-state-0000002.pt').write_bytes(complete[:len(complete) // 3])

    resumed = _run_child(cmd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = (outdir / 'log.txt').read_text()
    assert 'Skipping unreadable checkpoint' in resumed.stderr + log
    assert not glob.glob(str(outdir / '.*.tmp-*'))  # ...which the resumed run removes.
    assert 'training-state-0000001.pt' in log and 'Training from 1 kimg to 2 kimg' in log
    # On CPU the resumed run equals the uninterrupted one bit for bit (net, optimizer, EMA).
    ref_state = load_state(tmp_path / 'ref' / 'training-state-0000002.pt')
    res_state = load_state(outdir / 'training-state-0000002.pt')
    for key, value in ref_state['net'].items():
        assert torch.equal(value, res_state['net'][key]), key
    for ref_ema, res_ema in zip(ref_state['ema']['emas'], res_state['ema']['emas'], strict=True):
        assert all(torch.equal(v, res_ema[k]) for k, v in ref_ema.items())
    ref_moments, res_moments = ref_state['optimizer']['state'], res_state['optimizer']['state']
    assert len(ref_moments) == len(res_moments) > 0
    for ref_p, res_p in zip(ref_moments.values(), res_moments.values()):
        assert all(torch.equal(ref_p[k], res_p[k]) for k in ref_p)


@pytest.mark.reliability
def test_persistent_nonfinite_loss_stops_without_garbage_snapshots(data8, tmp_path):
    outdir = tmp_path / 'nan'
    # P_mean=1000 makes sigma overflow to inf, so every loss and gradient is non-finite.
    result = _run_child(cli(outdir, data8, '--duration=4Ki', '--status=64', '--P_mean=1000', '--nonfinite-limit=3'))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and 'non-finite' in errors[0], result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    names = os.listdir(outdir)
    assert not [n for n in names if n.startswith('training-state-')]
    assert not [n for n in names if n.startswith('network-snapshot-') and not n.startswith('network-snapshot-0000000')]
    stats = [json.loads(line) for line in (outdir / 'stats.jsonl').read_text().splitlines()]  # Strict JSON (docs/differences.md#io-5).
    counted = [s['Loss/nonfinite_grads'] for s in stats if 'Loss/nonfinite_grads' in s]
    assert counted and all(value == 1.0 for value in counted)


@pytest.fixture(scope='module')
def data16(tmp_path_factory):
    return faults.write_random_images(tmp_path_factory.mktemp('data16'), count=64, size=16)


def _rank_fault_train_args(tmp_path, data16) -> list:
    return ['train_edm2.py', f'--outdir={tmp_path / "run"}', f'--data={data16}', '--cond=0',
            '--preset=edm2-cifar10-32x32-uncond', '--channels=8', '--channel-mult=1,2', '--num-blocks=1',
            '--attn-res=8', '--channels-per-head=8', '--fp16=0', '--workers=0', '--device=cpu', '--batch=16',
            '--duration=64Ki', '--status=1Ki', '--snapshot=64Ki', '--checkpoint=64Ki']


@pytest.mark.reliability
def test_training_rank_killed_mid_run_stops_the_job(tmp_path, data16):
    returncode, output, elapsed = faults.torchrun_with_faulty_rank(tmp_path, _rank_fault_train_args(tmp_path, data16),
                                                                   'die', fail_at=8)
    faults.assert_rank1_killed_reported(returncode, output)
    assert elapsed < 90


@pytest.mark.reliability
def test_training_rank_hung_mid_run_times_out(tmp_path, data16):
    # Rank 1 stops taking part without dying: rank 0 must give up after EDM2_DIST_TIMEOUT.
    returncode, output, elapsed = faults.torchrun_with_faulty_rank(tmp_path, _rank_fault_train_args(tmp_path, data16),
                                                                   'hang', fail_at=8, timeout_env='5')
    assert returncode != 0, output[-3000:]
    # Rank 0's collective times out after the 5 s of EDM2_DIST_TIMEOUT; it exits with 1 and torchrun stops rank 1.
    assert 'Timed out waiting 5000ms' in output, output[-3000:]
    assert re.search(r'rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: 1 ', faults.torchrun_root_cause(output)), output[-3000:]
    assert elapsed < 90
