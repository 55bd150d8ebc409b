"""Tests of training/loop/presets.py."""

import pytest
import torch

from training.loop import presets

Mi = 1 << 20

def test_all_official_presets_present():
    expected = [f'edm2-img512-{s}' for s in ('xxs', 'xs', 's', 'm', 'l', 'xl', 'xxl')]
    expected += [f'edm2-img64-{s}' for s in ('xs', 's', 'm', 'l', 'xl')]
    expected += ['base-finetuning', 'edm2-cifar10-32x32-uncond', 'edm2-cifar10-32x32-cond']
    assert presets.preset_names() == expected

@pytest.mark.parametrize('name, duration_kimg, channels, lr, decay, dropout, P_mean, P_std', [
    ('edm2-img512-xs', 2147483, 128, 0.0120, 70000, 0.00, -0.4, 1.0),
    ('edm2-img512-m', 2147483, 256, 0.0090, 70000, 0.10, -0.4, 1.0),
    ('edm2-img512-l', 1879048, 320, 0.0080, 70000, 0.10, -0.4, 1.0),
    ('edm2-img512-xl', 1342177, 384, 0.0070, 70000, 0.10, -0.4, 1.0),
    ('edm2-img512-xxl', 939524, 448, 0.0065, 70000, 0.10, -0.4, 1.0),
    ('edm2-img64-s', 1073741, 192, 0.0100, 35000, 0.00, -0.8, 1.6),
    ('edm2-img64-m', 2147483, 256, 0.0090, 35000, 0.10, -0.8, 1.6),
    ('edm2-img64-xl', 671088, 384, 0.0070, 35000, 0.10, -0.8, 1.6),
])
def test_official_hyperparameters(name, duration_kimg, channels, lr, decay, dropout, P_mean, P_std):
    p = presets.get_preset(name)
    assert p['duration'] // 1000 == duration_kimg and p['batch'] == 2048
    assert (p['channels'], p['lr'], p['decay'], p['dropout'], p['P_mean'], p['P_std']) == (channels, lr, decay, dropout, P_mean, P_std)

def test_fork_preset_has_no_channels():
    p = presets.get_preset('base-finetuning')
    assert 'channels' not in p
    assert (p['duration'], p['batch'], p['lr'], p['decay'], p['dropout']) == (2048 * Mi, 256, 0.001, 70000, 0.0)
    with pytest.raises(presets.PresetError, match='--model2finetune') as info:
        presets.network_kwargs_for_preset('base-finetuning')
    assert 'network pickle' in str(info.value) and 'edm2-img512-xs' in str(info.value)
    assert 'model_channels' not in str(info.value)  # not an option of count_flops.py, the CLI that shows it
    assert presets.network_kwargs_for_preset('base-finetuning', model_channels=64)['model_channels'] == 64

def test_cifar_presets_follow_training_md_appendix():
    p = presets.get_preset('edm2-cifar10-32x32-uncond')
    assert (p['batch'], p['channels'], p['lr'], p['dropout'], p['P_mean'], p['P_std']) == (512, 128, 0.02, 0.13, -1.2, 1.2)
    assert p['decay'] * p['batch'] == pytest.approx(400 * 50000)  # t_ref = 400 epochs, in batches
    assert p['rampup'] == pytest.approx(10.0)  # 200 epochs, in Mimg
    kwargs = presets.network_kwargs_for_preset('edm2-cifar10-32x32-uncond')
    assert kwargs['channel_mult'] == [1, 2, 2, 2] and kwargs['attn_resolutions'] == [16]
    assert (kwargs['img_resolution'], kwargs['img_channels'], kwargs['label_dim']) == (32, 3, 0)
    assert presets.data_shape_for_preset('edm2-cifar10-32x32-cond')['label_dim'] == 10

def test_unknown_preset_lists_valid_names():
    for fn in (presets.get_preset, presets.data_shape_for_preset, presets.network_kwargs_for_preset):
        with pytest.raises(ValueError) as info:
            fn('edm2-img512-huge')
        assert 'edm2-img512-huge' in str(info.value) and 'edm2-img512-xs, edm2-img512-s' in str(info.value)

def test_returned_dicts_are_copies():
    presets.get_preset('edm2-img512-s')['lr'] = 1.0
    presets.network_kwargs_for_preset('edm2-cifar10-32x32-cond')['channel_mult'].append(9)
    presets.data_shape_for_preset('edm2-img64-s')['label_dim'] = 0
    assert presets.get_preset('edm2-img512-s')['lr'] == 0.0100
    assert presets.network_kwargs_for_preset('edm2-cifar10-32x32-cond')['channel_mult'] == [1, 2, 2, 2]
    assert presets.data_shape_for_preset('edm2-img64-s')['label_dim'] == 1000

def test_network_kwargs_layout():
    kwargs = presets.network_kwargs_for_preset('edm2-img512-m', use_fp16=False, label_dim=0)
    assert kwargs == dict(class_name='training.networks_edm2.Precond', model_channels=256, dropout=0.10, use_fp16=False,
        img_resolution=64, img_channels=4, label_dim=0)
    assert list(presets.network_kwargs_for_preset('edm2-img64-s', with_data_shape=False)) == \
        ['class_name', 'model_channels', 'dropout', 'use_fp16']

# Parameter counts of the published EDM2 models (conditional, L=1000): exact where published, else in millions.
@pytest.mark.parametrize('name, params', [
    ('edm2-img512-xxs', '31.31'), ('edm2-img512-xs', 124_713_253), ('edm2-img64-xs', '124.71'),
    ('edm2-img512-s', '280.21'), ('edm2-img512-m', '497.81'), ('edm2-img64-m', '497.80'),
    ('edm2-img512-l', '777.50'), ('edm2-img64-l', '777.49'), ('edm2-img512-xl', '1119.28'),
    ('edm2-img512-xxl', 1_523_164_773),
])
def test_networks_built_on_meta_have_published_parameter_counts(name, params):
    net = presets.construct_network_for_preset(name)
    assert not net.training
    assert all(p.device.type == 'meta' and not p.requires_grad for p in net.parameters())
    count = sum(p.numel() for p in net.parameters())
    assert (count if isinstance(params, int) else f'{count / 1e6:.2f}') == params

def test_unconditional_override_and_real_device():
    net = presets.construct_network_for_preset('edm2-img512-s', label_dim=0)
    assert f'{sum(p.numel() for p in net.parameters()) / 1e6:.2f}' == '279.44'
    tiny = presets.construct_network_for_preset('edm2-cifar10-32x32-cond', device='cpu', model_channels=8, img_resolution=16,
        channels_per_head=8, use_fp16=False)
    assert tiny.unet.dec['2x2_in0'].num_heads == 2 and tiny.unet.enc['16x16_block0'].num_heads == 1  # attn_resolutions=[16]
    x = torch.randn([2, 3, 16, 16])
    assert tiny(x, torch.ones([2]), torch.eye(10)[:2]).shape == (2, 3, 16, 16)
