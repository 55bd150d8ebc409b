"""Tests of training/augment.py (EDM v1 AugmentPipe): the wavelet filter, each transformation against
its closed form, labels, the EDM training configuration, and pickles."""

import io
import math
import pickle

import numpy as np
import pytest
import torch

from torch_utils import persistence
from training import augment

EDM_OPTIONS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def _smooth_images(n=2, c=3, size=16):
    """Band-limited test images, so resampling them is close to exact."""
    x = torch.linspace(-1, 1, size)
    base = torch.sin(2 * x)[None, :] * torch.cos(1.5 * x)[:, None]
    return torch.stack([base * (k + 1) / (c * n) + 0.1 * k for k in range(n * c)]).reshape(n, c, size, size)


def test_symlet6_filter_is_an_orthonormal_wavelet():
    h = np.asarray(augment.SYM6)
    assert h.sum() == pytest.approx(math.sqrt(2), abs=1e-12) and (h * h).sum() == pytest.approx(1, abs=1e-11)
    for k in range(1, 6):
        assert abs((h[:-2 * k] * h[2 * k:]).sum()) < 1e-11   # orthogonal to its even shifts
    g = h[::-1] * (-1) ** np.arange(12)                       # the matching high-pass filter
    for p in range(6):
        assert abs((g * np.arange(12) ** p).sum()) < 1e-7 * 12 ** p   # 6 vanishing moments


def test_constructor_state_and_pickles():
    pipe = augment.AugmentPipe(p=0.12, **EDM_OPTIONS)
    assert pipe.p == 0.12 and pipe.xflip == 1e8 and pipe.hue == 0.0 and pipe.scale_std == 0.2
    assert all(isinstance(v, float) for k, v in pipe.__dict__.items() if not k.startswith('_'))
    loaded = persistence.load_pickle(io.BytesIO(pickle.dumps(dict(augment_pipe=pipe))))['augment_pipe']
    assert type(loaded) is augment.AugmentPipe and loaded.__dict__ == pipe.__dict__
    images = _smooth_images()
    torch.manual_seed(0)
    expected = pipe(images)
    torch.manual_seed(0)
    for a, b in zip(loaded(images), expected):
        assert torch.equal(a, b)


def test_probability_zero_changes_nothing():
    images = _smooth_images()
    out, labels = augment.AugmentPipe(p=0, xflip=1, rotate_int=1, translate_int=1, brightness=1, saturation=1)(images)
    assert torch.equal(out, images) and labels.shape == (2, 7) and not labels.any()
    out, labels = augment.AugmentPipe(p=0, **EDM_OPTIONS)(images)
    assert labels.shape == (2, 9) and not labels[:, 1:].any()
    # The identity map through 2x wavelet upsampling, resampling and downsampling reconstructs the images.
    geometric_only = augment.AugmentPipe(p=0, scale=1, rotate_frac=1)(images)[0]
    torch.testing.assert_close(geometric_only, images, rtol=0, atol=1e-5)


def test_flips_and_quarter_turns():
    images = torch.randn(64, 3, 4, 4)
    out, labels = augment.AugmentPipe(p=1, xflip=1e8)(images)
    flipped = labels[:, 0].bool()
    assert torch.equal(out[flipped], images[flipped].flip(3)) and torch.equal(out[~flipped], images[~flipped])
    assert 10 < int(flipped.sum()) < 54   # a fair coin even with xflip * p >= 1

    out, labels = augment.AugmentPipe(p=1, rotate_int=1)(images)
    for image, result, (a, b) in zip(images, out, labels):
        k = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}[(int(a), int(b))]   # quarter turns, counterclockwise
        assert torch.equal(result, torch.rot90(image, k, dims=(1, 2)))


def test_integer_translation_mirrors_at_the_borders():
    images = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    out, labels = augment.AugmentPipe(p=1, translate_int=1, translate_int_max=0.25)(images)
    for image, result, (lx, ly) in zip(images, out, labels):
        tx, ty = round(float(lx) * 2), round(float(ly) * 2)
        mirror = lambda i: 7 - abs(7 - i % 14)
        expected = torch.stack([torch.stack([image[0, mirror(y + ty), mirror(x - tx)] for x in range(8)]) for y in range(8)])
        assert torch.equal(result[0], expected)


def test_geometric_maps_match_their_closed_forms():
    pipe = augment.AugmentPipe()
    images = _smooth_images(n=1, size=24)
    # Shift by 2 pixels to the right: output(x) = input(x - 2), exact up to the reflected border.
    shifted = pipe._apply_geometric(images, augment.translate2d_inv(torch.tensor([2.0]), torch.tensor([0.0])))
    torch.testing.assert_close(shifted[..., 4:-4, 4:-2], images[..., 4:-4, 2:-4], rtol=0, atol=2e-3)
    # A quarter turn about the centre: grid points map to grid points, but the Symlet filter is not symmetric
    # and the turn reverses one axis, so the wavelet round trip is exact only up to about 1%.
    turned = pipe._apply_geometric(images, augment.rotate2d_inv(torch.tensor([math.pi / 2])))
    expected = torch.rot90(images, -1, dims=(2, 3))
    torch.testing.assert_close(turned[..., 3:-3, 3:-3], expected[..., 3:-3, 3:-3], rtol=0, atol=0.02)
    assert float((turned - torch.rot90(images, 1, dims=(2, 3))).abs().max()) > 1   # not the other way round


def test_color_transforms_match_their_closed_forms():
    images = _smooth_images(n=8)
    luma = images.mean(dim=1, keepdim=True)
    out, labels = augment.AugmentPipe(p=1, brightness=1, brightness_std=0.3)(images)
    torch.testing.assert_close(out, images + 0.3 * labels.reshape(-1, 1, 1, 1))
    out, labels = augment.AugmentPipe(p=1, contrast=1)(images)
    torch.testing.assert_close(out, images * (0.5 * labels).exp2().reshape(-1, 1, 1, 1))
    out, labels = augment.AugmentPipe(p=1, lumaflip=1)(images)
    flip = labels.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out, images - 2 * luma * flip, rtol=1e-5, atol=1e-5)   # mirrored along the gray axis
    out, labels = augment.AugmentPipe(p=1, saturation=1)(images)
    torch.testing.assert_close(out, luma + (images - luma) * labels.exp2().reshape(-1, 1, 1, 1), rtol=1e-5, atol=1e-5)
    out, labels = augment.AugmentPipe(p=1, hue=1)(images)
    torch.testing.assert_close(out.mean(dim=1, keepdim=True), luma, rtol=1e-5, atol=1e-5)   # rotation about gray
    torch.testing.assert_close(out.square().sum(dim=1), images.square().sum(dim=1), rtol=1e-5, atol=1e-5)
    chroma_in, chroma_out = images - luma, out - luma
    cos = (chroma_in * chroma_out).sum(dim=1) / (chroma_in.norm(dim=1) * chroma_out.norm(dim=1))
    torch.testing.assert_close(cos, (labels[:, 0] + 1).reshape(-1, 1, 1).expand_as(cos), rtol=1e-4, atol=1e-4)


def test_color_on_gray_images_and_other_channel_counts():
    gray = _smooth_images(c=1)
    out, labels = augment.AugmentPipe(p=1, brightness=1, brightness_std=0.5)(gray)
    torch.testing.assert_close(out, gray + 0.5 * labels.reshape(-1, 1, 1, 1))
    with pytest.raises(ValueError, match='RGB'):
        augment.AugmentPipe(p=1, contrast=1)(torch.zeros(1, 2, 4, 4))


def test_edm_training_configuration():
    torch.manual_seed(1)
    images = _smooth_images(n=16)
    out, labels = augment.AugmentPipe(p=1, **EDM_OPTIONS)(images)
    assert out.shape == images.shape and labels.shape == (16, 9) and labels.dtype == torch.float32
    assert torch.isfinite(out).all() and not torch.equal(out, images)
    # Labels: xflip, yflip, log2 scale / 0.2, cos - 1 and sin of the rotation, aniso (2), translation (2).
    assert set(labels[:, 0].tolist()) <= {0.0, 1.0} and set(labels[:, 1].tolist()) <= {0.0, 1.0}
    torch.testing.assert_close((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2, torch.ones(16))
