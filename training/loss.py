"""EDM v1 training losses (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Table 1 "Training" rows and eq. 2):

    loss = lambda(sigma) * || D(y + n; sigma) - y ||^2,   n ~ N(0, sigma^2 I),

returned per element (not reduced), with sigma drawn per image from the training distribution p_train
and the weight lambda(sigma) of each formulation:

  VPLoss   sigma = sigma_VP(t), t ~ U(epsilon_t, 1)              lambda = 1 / sigma^2
  VELoss   ln sigma ~ U(ln sigma_min, ln sigma_max)              lambda = 1 / sigma^2
  EDMLoss  ln sigma ~ N(P_mean, P_std^2)                         lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2

Per call the random numbers are drawn in this order: the per-image noise-level variate ([N,1,1,1]),
then whatever the augmentation pipeline draws, then the noise n (like the augmented images).

Class names and constructor arguments are those of the module `training/loss.py` that EDM v1 pickles
store; this file is embedded in them, so it imports only numpy, torch and torch_utils.persistence.
"""

import torch

from torch_utils import persistence


def _denoising_loss(net, images, labels, augment_pipe, sigma, weight):
    """lambda(sigma) * (D(y + n; sigma) - y)^2 per element, y the (augmented) images."""
    y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
    n = torch.randn_like(y) * sigma
    D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    return weight * ((D_yn - y) ** 2)


@persistence.persistent_class
class VPLoss:
    """Variance preserving (Song et al. 2021): t ~ U(epsilon_t, 1), sigma = sigma_VP(t)."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        return _denoising_loss(net, images, labels, augment_pipe, sigma, 1 / sigma ** 2)

    def sigma(self, t):
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()


@persistence.persistent_class
class VELoss:
    """Variance exploding (Song et al. 2021): sigma log-uniform in [sigma_min, sigma_max]."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        return _denoising_loss(net, images, labels, augment_pipe, sigma, 1 / sigma ** 2)


@persistence.persistent_class
class EDMLoss:
    """EDM (Section 5): ln sigma ~ N(P_mean, P_std^2), weight = 1 / c_out(sigma)^2."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return _denoising_loss(net, images, labels, augment_pipe, sigma, weight)
