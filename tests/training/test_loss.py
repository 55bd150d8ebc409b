"""Tests of training/loss.py (EDM v1): loss values against Table 1 of the EDM paper, with a fixed
generator, a denoiser with a known output, and the documented order of random draws."""

import io
import pickle

import numpy as np
import pytest
import torch

from torch_utils import persistence
from training import augment, loss


class ShrinkNet:
    """D(x; sigma) = 0.3 x; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        self.calls.append(dict(x=x, sigma=sigma, labels=labels, augment_labels=augment_labels))
        return 0.3 * x


def _images(n=4, seed=5):
    return torch.randn([n, 3, 4, 4], generator=torch.Generator().manual_seed(seed))


def _expected(images, sigma, weight, seed_draws):
    """lambda (D(y + n) - y)^2 with n drawn after the sigma variate, as the loss draws them."""
    noise = seed_draws(images) * torch.as_tensor(sigma, dtype=torch.float32)
    return weight * ((0.3 * (images + noise) - images) ** 2)


def _sigma_and_weight(loss_fn, variate):
    """Table 1: sigma and lambda(sigma) of each formulation from its random variate (float64)."""
    if isinstance(loss_fn, loss.VPLoss):
        t = 1 + variate * (1e-5 - 1)
        sigma = np.sqrt(np.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1)
        return sigma, 1 / sigma ** 2
    if isinstance(loss_fn, loss.VELoss):
        sigma = 0.02 * (100 / 0.02) ** variate
        return sigma, 1 / sigma ** 2
    sigma = np.exp(variate * 1.2 - 1.2)
    c_out = sigma * 0.5 / np.sqrt(sigma ** 2 + 0.25)
    return sigma, 1 / c_out ** 2


@pytest.mark.parametrize('loss_class, draw', [(loss.VPLoss, torch.rand), (loss.VELoss, torch.rand),
                                              (loss.EDMLoss, torch.randn)])
def test_loss_follows_table_1(loss_class, draw):
    loss_fn, net, images = loss_class(), ShrinkNet(), _images()
    labels = torch.eye(4)
    torch.manual_seed(7)
    value = loss_fn(net, images, labels)
    torch.manual_seed(7)
    variate = draw([4, 1, 1, 1]).double().numpy()
    sigma, weight = _sigma_and_weight(loss_fn, variate)
    expected = _expected(images.double(), sigma, torch.as_tensor(weight), lambda y: torch.randn_like(y.float()).double())
    assert value.shape == images.shape and value.dtype == torch.float32
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-6)
    call, = net.calls
    np.testing.assert_allclose(call['sigma'].numpy(), sigma, rtol=1e-5)
    assert call['labels'] is labels and call['augment_labels'] is None and call['sigma'].shape == (4, 1, 1, 1)


def test_noise_level_ranges():
    images = torch.zeros([4096, 1, 1, 1])
    for loss_fn, lo, hi in ((loss.VPLoss(), 2 ** -10, 152.0), (loss.VELoss(), 0.02, 100)):
        net = ShrinkNet()
        loss_fn(net, images)
        sigma = net.calls[0]['sigma']
        assert lo * 0.999 <= float(sigma.min()) and float(sigma.max()) <= hi * 1.001
        assert float(sigma.max()) > hi * 0.9
    assert float(sigma.min()) < 0.02 * 1.5   # VE: log-uniform, so the low end is as likely as the high end
    net = ShrinkNet()
    loss.EDMLoss(P_mean=-1.2, P_std=1.2)(net, images)
    log_sigma = net.calls[0]['sigma'].log()
    assert abs(float(log_sigma.mean()) + 1.2) < 0.08 and abs(float(log_sigma.std()) - 1.2) < 0.08


def test_augmented_images_and_labels_reach_the_network():
    images = _images(n=2)
    pipe = augment.AugmentPipe(p=1, xflip=1e8, brightness=1)
    net = ShrinkNet()
    torch.manual_seed(3)
    value = loss.EDMLoss()(net, images, None, augment_pipe=pipe)
    # Same stream by hand: sigma variate, then the pipe's draws, then the noise.
    torch.manual_seed(3)
    sigma = (torch.randn([2, 1, 1, 1]) * 1.2 - 1.2).exp()
    y, labels = pipe(images)
    n = torch.randn_like(y) * sigma
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(value, weight * ((0.3 * (y + n) - y) ** 2))
    torch.testing.assert_close(net.calls[0]['augment_labels'], labels)
    assert labels.shape == (2, 2)


def test_losses_pickle_and_load_safely():
    for obj in (loss.VPLoss(beta_d=10, epsilon_t=1e-4), loss.VELoss(sigma_max=50), loss.EDMLoss(P_std=1.0)):
        loaded = persistence.load_pickle(io.BytesIO(pickle.dumps(obj)))
        assert type(loaded) is type(obj) and loaded.__dict__ == obj.__dict__
        assert loaded.init_kwargs == obj.init_kwargs
