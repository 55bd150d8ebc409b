"""Tests of training.loop.rules: the checks shared by the config step and the training loop."""

import pytest

from training.loop.rules import check_batch_settings, check_image_shape, network_channel_mult


def test_check_batch_settings_names_the_option():
    assert check_batch_settings(64, 16, 2, 1024) == (16, 2)
    assert check_batch_settings(64, None, 1, 1024) == (64, 1)
    with pytest.raises(ValueError, match='--duration'):
        check_batch_settings(64, None, 1, 1000)
    with pytest.raises(ValueError, match='--snapshot'):
        check_batch_settings(64, None, 1, 1024, snapshot_nimg=64 * 3)
    with pytest.raises(ValueError, match='--batch-gpu'):
        check_batch_settings(64, 24, 1, 1024)


def test_check_image_shape_needs_square_halvable_items():
    check_image_shape([3, 32, 32], [1, 2, 2, 2])
    check_image_shape([4, 12, 12], [1, 2, 2])  # 12 -> 6 -> 3
    with pytest.raises(ValueError, match='16x12 .* need square images'):
        check_image_shape([3, 12, 16])
    with pytest.raises(ValueError, match=r'resolution 15 is not divisible by 2\^\(len\(channel_mult\)-1\) = 2'):
        check_image_shape([3, 15, 15], [1, 2])


def test_network_channel_mult_is_the_given_one_else_the_unet_default():
    from training.networks_edm2 import UNet
    assert network_channel_mult(dict(channel_mult=(1, 2))) == [1, 2]
    net = UNet(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, num_blocks=1, attn_resolutions=[])
    resolutions = {name.split('_')[0] for name in net.enc}  # '8x8_conv', '4x4_down', ...
    assert len(network_channel_mult(dict(channel_mult=None))) == len(resolutions) == 4
