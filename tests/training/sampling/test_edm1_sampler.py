"""Tests of training/sampling/edm1_sampler.py: the EDM v1 samplers against the equations, on analytic
denoisers of Gaussian data (where the probability-flow ODE has a closed-form solution)."""

import math

import numpy as np
import pytest
import torch

from tests import tiny_edm1
from training.sampling import edm1_presets
from training.sampling import edm1_sampler as S
from training.sampling.sampler import FixedBatchNet, StackedRandomGenerator

#----------------------------------------------------------------------------
# Data ~ N(0, s^2): D(x; sigma) = x s^2 / (s^2 + sigma^2), and the ODE dx/dsigma = (x - D) / sigma has the
# solution x(sigma) = x(sigma_0) sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)), so x(0) = x(sigma_0) s / sqrt(s^2 + sigma_0^2).


class GaussianDenoiser(torch.nn.Module):
    def __init__(self, data_std=0.5, sigma_min=0.0, sigma_max=float('inf'), grid=None):
        super().__init__()
        self.data_std, self.sigma_min, self.sigma_max, self.grid = data_std, sigma_min, sigma_max, grid
        self.calls = []

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        if self.grid is None:
            return sigma
        index = (sigma.reshape(-1, 1) - self.grid.to(sigma.dtype)).abs().argmin(1)
        return self.grid.to(sigma.dtype)[index].reshape(sigma.shape)

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        self.calls.append((float(sigma), class_labels))
        return x * self.data_std ** 2 / (self.data_std ** 2 + sigma ** 2)


class ExplodingNet(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError('the guiding network must not be evaluated')


def _latents(n=2, seed=0):
    return torch.randn([n, 3, 4, 4], generator=torch.Generator().manual_seed(seed))


def _exact_endpoint(latents, sigma_max, s=0.5):
    return latents.double() * sigma_max * s / math.sqrt(s ** 2 + sigma_max ** 2)


def _errors(run, sigma_max, steps=(16, 32, 64, 128)):
    latents = _latents()
    exact = _exact_endpoint(latents, sigma_max)
    return [float(((run(latents, n) - exact) / exact).abs().max()) for n in steps]


def _orders(errors):
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]

#----------------------------------------------------------------------------
# Convergence to the exact ODE endpoint.


def test_edm1_sampler_is_second_order():
    net = GaussianDenoiser(sigma_min=0.002, sigma_max=80)
    errors = _errors(lambda x, n: S.edm1_sampler(net, x, num_steps=n), 80)
    assert errors[-1] < 1e-3 and all(1.9 < p < 2.3 for p in _orders(errors))
    net.calls.clear()
    S.edm1_sampler(net, _latents(), num_steps=18)
    assert len(net.calls) == 35   # 2N - 1 evaluations


@pytest.mark.parametrize('solver, disc, schedule, scaling, order', [
    ('euler', 'edm', 'linear', 'none', 1),
    ('heun', 'edm', 'linear', 'none', 2),
    ('euler', 'vp', 'vp', 'vp', 1),
    ('heun', 'vp', 'vp', 'vp', 2),     # the VP ODE of Song et al. 2021, solved to second order
    ('heun', 've', 've', 'none', 2),   # the VE ODE
    ('heun', 'edm', 'vp', 'vp', 2),
])
def test_ablation_sampler_orders(solver, disc, schedule, scaling, order):
    net = GaussianDenoiser()
    _, sigma_max = S.ablation_sigma_range(net, disc)
    run = lambda x, n: S.ablation_sampler(net, x, num_steps=n, solver=solver, discretization=disc, schedule=schedule,
                                          scaling=scaling)
    errors = _errors(run, sigma_max, steps=(32, 64, 128))
    assert all(abs(p - order) < 0.3 for p in _orders(errors)), errors
    assert errors[-1] < (0.03 if order == 1 else 0.011)


def test_heun_alpha_changes_the_intermediate_point():
    net = GaussianDenoiser()
    latents = _latents()
    exact = _exact_endpoint(latents, 80)
    for alpha in (0.5, 1.0, 2.0):   # every alpha gives a 2nd-order method
        errors = [float(((S.ablation_sampler(net, latents, num_steps=n, alpha=alpha) - exact) / exact).abs().max())
                  for n in (32, 64)]
        assert errors[0] / errors[1] > 3.5 and errors[1] < 0.02
    net.calls.clear()
    S.ablation_sampler(net, latents, num_steps=3, alpha=0.5)
    t = S.edm_time_steps(3, 0.002, 80, 7, dtype=torch.float64)
    expected = [t[0], t[0] + 0.5 * (t[1] - t[0]), t[1], t[1] + 0.5 * (t[2] - t[1]), t[2]]
    np.testing.assert_allclose([c[0] for c in net.calls], expected, rtol=1e-12)


def test_edm1_sampler_equals_ablation_heun_edm_linear_none():
    net = GaussianDenoiser(sigma_min=0.002, sigma_max=80)
    latents = _latents()
    a = S.edm1_sampler(net, latents, num_steps=12)
    b = S.ablation_sampler(net, latents, num_steps=12)
    assert a.dtype == b.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

#----------------------------------------------------------------------------
# Time steps and noise levels.


def test_discretisations_follow_table_1():
    N, smin, smax, eps = 7, 0.01, 50.0, 1e-3
    i = np.arange(N)
    edm = (smax ** (1 / 7) + i / (N - 1) * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    np.testing.assert_allclose(S.ablation_sigma_steps('edm', N, smin, smax).numpy(), edm, rtol=1e-12)
    ve = smax * (smin / smax) ** (i / (N - 1))   # geometric sequence
    np.testing.assert_allclose(S.ablation_sigma_steps('ve', N, smin, smax).numpy(), ve, rtol=1e-12)
    # VP: sigma_VP(t) at t = 1 ... epsilon_s, with betas chosen so that the ends hit sigma_max and sigma_min.
    beta_d, beta_min = S.vp_betas(smin, smax, eps)
    sigma_vp = lambda t: np.sqrt(np.exp(0.5 * beta_d * t ** 2 + beta_min * t) - 1)
    assert sigma_vp(eps) == pytest.approx(smin, rel=1e-10) and sigma_vp(1.0) == pytest.approx(smax, rel=1e-10)
    vp = sigma_vp(1 + i / (N - 1) * (eps - 1))
    np.testing.assert_allclose(S.ablation_sigma_steps('vp', N, smin, smax, epsilon_s=eps).numpy(), vp, rtol=1e-12)
    # iDDPM: N evenly spaced entries of the u table within the range.
    u = S.iddpm_sigma_table(dtype=torch.float64).numpy()
    inside = u[(u >= smin) & (u <= smax)]
    picks = inside[np.round((len(inside) - 1) / (N - 1) * i).astype(int)]
    np.testing.assert_array_equal(S.ablation_sigma_steps('iddpm', N, smin, smax).numpy(), picks)
    assert picks[0] == inside[0] and picks[-1] == inside[-1]


def test_schedules_and_scalings():
    t = torch.tensor([0.05, 0.4, 1.0], dtype=torch.float64)
    for sched in (S.vp_schedule(19.9, 0.1), S.VE_SCHEDULE, S.LINEAR_SCHEDULE):
        torch.testing.assert_close(sched.sigma_inv(sched.sigma(t)), t)
        h = 1e-6   # sigma'(t) against a central difference
        numeric = (sched.sigma(t + h) - sched.sigma(t - h)) / (2 * h)
        torch.testing.assert_close(torch.as_tensor(sched.sigma_deriv(t), dtype=torch.float64).expand_as(t), numeric,
                                   rtol=1e-6, atol=1e-6)
        scale = S.vp_scaling(sched)
        numeric = (scale.s(t + h) - scale.s(t - h)) / (2 * h)
        torch.testing.assert_close(scale.s_deriv(t), numeric, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(scale.s(t), 1 / (1 + sched.sigma(t) ** 2).sqrt())


def test_default_noise_ranges_and_network_clamp():
    free = GaussianDenoiser()
    vp_min, vp_max = S.ablation_sigma_range(free, 'vp')
    assert vp_min == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 * 1e-6 + 0.1 * 1e-3) - 1))
    assert vp_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1))
    assert S.ablation_sigma_range(free, 've') == (0.02, 100)
    assert S.ablation_sigma_range(free, 'iddpm') == (0.002, 81)
    assert S.ablation_sigma_range(free, 'edm') == (0.002, 80)
    narrow = GaussianDenoiser(sigma_min=0.01, sigma_max=20)
    assert S.ablation_sigma_range(narrow, 'edm') == (0.01, 20)
    assert S.ablation_sigma_range(narrow, 'edm', sigma_min=0.05, sigma_max=10) == (0.05, 10)
    t = S.edm1_time_steps(narrow, num_steps=5)
    assert float(t[0]) == pytest.approx(20) and float(t[4]) == pytest.approx(0.01) and t[5] == 0 and t.dtype == torch.float64


def test_noise_levels_are_rounded_by_the_network():
    grid = torch.logspace(-3, 2, 40, dtype=torch.float64)
    net = GaussianDenoiser(sigma_min=float(grid[0]), sigma_max=float(grid[-1]), grid=grid)
    for sampler, kwargs in ((S.edm1_sampler, dict(S_churn=30)), (S.ablation_sampler, dict(S_churn=30)),
                            (S.ablation_sampler, dict(discretization='ve', schedule='ve'))):
        net.calls.clear()
        sampler(net, _latents(), num_steps=8, **kwargs)
        on_grid = [min(abs(sigma - g) / g for g in grid.tolist()) < 1e-9 for sigma, _ in net.calls]
        assert all(on_grid), (sampler.__name__, kwargs)

#----------------------------------------------------------------------------
# Churn and the per-step noise stream.


class CountingNoise:
    def __init__(self, value=None):
        self.shapes, self.value = [], value

    def __call__(self, x):
        self.shapes.append((tuple(x.shape), x.dtype))
        return torch.full_like(x, self.value) if self.value is not None else torch.randn_like(x)


VP_ODE = dict(solver='euler', discretization='vp', schedule='vp', scaling='vp')


@pytest.mark.parametrize('sampler, kwargs, exact', [(S.edm1_sampler, {}, True), (S.ablation_sampler, {}, True),
                                                    (S.ablation_sampler, VP_ODE, False)])
def test_noise_is_drawn_at_every_step(sampler, kwargs, exact):
    net = GaussianDenoiser(sigma_min=0.002, sigma_max=80)
    latents = _latents()
    noise = CountingNoise(value=1e6 if exact else 1.0)
    out = sampler(net, latents, randn_like=noise, num_steps=6, **kwargs)
    assert noise.shapes == [(tuple(latents.shape), torch.float64)] * 6
    quiet = sampler(net, latents, randn_like=CountingNoise(value=0.0), num_steps=6, **kwargs)
    if exact:   # gamma = 0: the noise is multiplied by exactly 0
        assert torch.equal(out, quiet)
    else:       # sigma(t(sigma)) rounds, so sqrt(max(sigma(t_hat)^2 - sigma(t_i)^2, 0)) can be slightly above 0
        torch.testing.assert_close(out, quiet, rtol=1e-6, atol=1e-6)


def test_churn_raises_the_noise_level():
    net = GaussianDenoiser(sigma_min=0.002, sigma_max=80)
    N, S_churn, S_min, S_max, S_noise = 6, 1.2, 0.1, 10, 1.5
    gamma = S_churn / N
    latents = torch.zeros([1, 1, 2, 2])
    S.edm1_sampler(net, latents, randn_like=CountingNoise(value=1.0), num_steps=N, S_churn=S_churn, S_min=S_min,
                   S_max=S_max, S_noise=S_noise)
    t = S.edm1_time_steps(net, N).tolist()
    euler_sigmas = [net.calls[2 * i][0] for i in range(N)]
    for t_i, t_hat in zip(t, euler_sigmas):
        assert t_hat == pytest.approx(t_i * (1 + gamma) if S_min <= t_i <= S_max else t_i, rel=1e-12)
    # One step from x = 0 at sigma_max = 2: x_hat = sqrt(t_hat^2 - 2^2) S_noise eps, then Euler to sigma = 0
    # lands on D(x_hat; t_hat). gamma = min(S_churn / N, sqrt(2) - 1).
    for churn, gamma in ((0.3, 0.3), (40, math.sqrt(2) - 1)):
        x = S.edm1_sampler(net, latents, randn_like=CountingNoise(value=1.0), num_steps=1, sigma_max=2, S_churn=churn,
                           S_max=3, S_noise=S_noise)
        t_hat = 2 * (1 + gamma)
        x_hat = math.sqrt(t_hat ** 2 - 4) * S_noise
        torch.testing.assert_close(x, torch.full_like(x, x_hat * 0.25 / (0.25 + t_hat ** 2), dtype=torch.float64))


#----------------------------------------------------------------------------
# Guidance.


class LinearDenoiser(torch.nn.Module):
    """D(x; sigma) = x c(sigma) for a given c: the guided combination of two Gaussian denoisers."""

    def __init__(self, coef):
        super().__init__()
        self.coef = coef

    def forward(self, x, sigma, class_labels=None):
        return x * self.coef(torch.as_tensor(sigma, dtype=torch.float64))


@pytest.mark.parametrize('sampler', [S.edm1_sampler, S.ablation_sampler])
def test_guidance_interpolates_from_guide_to_main(sampler):
    w, main_std, guide_std = 2.5, 0.5, 0.3
    gauss = lambda s: (lambda sigma: s ** 2 / (s ** 2 + sigma ** 2))
    combined = LinearDenoiser(lambda sigma: gauss(guide_std)(sigma) + w * (gauss(main_std)(sigma) - gauss(guide_std)(sigma)))
    latents = _latents()
    guided = sampler(GaussianDenoiser(main_std), latents, gnet=GaussianDenoiser(guide_std), guidance=w, num_steps=8)
    torch.testing.assert_close(guided, sampler(combined, latents, num_steps=8), rtol=1e-12, atol=1e-12)
    plain = sampler(GaussianDenoiser(main_std), latents, num_steps=8)
    assert torch.equal(sampler(GaussianDenoiser(main_std), latents, gnet=ExplodingNet(), guidance=1, num_steps=8), plain)


def test_guide_receives_the_class_labels_unless_disabled():
    labels = torch.eye(3)[[0, 2]]
    guide = GaussianDenoiser(0.3)
    S.edm1_sampler(GaussianDenoiser(), _latents(), labels, gnet=guide, guidance=2, num_steps=3)
    assert all(call[1] is labels for call in guide.calls) and len(guide.calls) == 5
    guide.calls.clear()
    S.ablation_sampler(GaussianDenoiser(), _latents(), labels, gnet=guide, guidance=2, num_steps=3, guide_labels=False)
    assert all(call[1] is None for call in guide.calls)

#----------------------------------------------------------------------------
# Per-seed random streams (module docstring).


def test_per_seed_streams_reproduce_by_hand():
    net = GaussianDenoiser(sigma_min=0.002, sigma_max=80)
    seeds, shape = [5, 9], [3, 4, 4]
    rnd = StackedRandomGenerator('cpu', seeds)
    latents = rnd.randn([2] + shape)
    batch = S.edm1_sampler(net, latents, randn_like=rnd.randn_like, num_steps=5, S_churn=10, S_min=0.5, S_max=20)
    # Seed 9 alone: latents, then one float64 normal tensor per step from the same generator.
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(shape, generator=gen)[None]
    alone = S.edm1_sampler(net, x, randn_like=lambda y: torch.randn(y.shape[1:], generator=gen, dtype=y.dtype)[None],
                           num_steps=5, S_churn=10, S_min=0.5, S_max=20)
    assert torch.equal(batch[1:], alone)


def test_v1_networks_sample_with_guidance_and_fixed_batches():
    net = tiny_edm1.make_tiny_edm1('EDMPrecond', 'ddpmpp', seed=1)
    guide = tiny_edm1.make_tiny_edm1('VPPrecond', 'ddpmpp', seed=2, label_dim=0)
    rnd = StackedRandomGenerator('cpu', [0, 1, 2])
    latents = rnd.randn([3, 3, 16, 16])
    labels = torch.eye(4)[rnd.randint(4, size=[3])]
    with torch.no_grad():
        kwargs = dict(num_steps=3, gnet=guide, guidance=1.5)
        full = S.edm1_sampler(net, latents, labels, **kwargs)
        fixed = S.edm1_sampler(FixedBatchNet(net, 3), latents, labels, gnet=FixedBatchNet(guide, 3), num_steps=3,
                               guidance=1.5)
        assert torch.equal(fixed, full)   # the wrapper is looked through for the noise range and rounding
        ablation = S.ablation_sampler(net, latents, labels, num_steps=3, solver='euler', discretization='vp',
                                      schedule='vp', scaling='vp', gnet=guide, guidance=1.5)
    images = S.to_uint8(full)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 16, 16) and torch.isfinite(ablation).all()
    assert S.network_sigma_range(FixedBatchNet(guide, 1))[:2] == (guide.sigma_min, guide.sigma_max)

#----------------------------------------------------------------------------
# Helpers for the command line.


def test_choose_sampler_follows_generate_py():
    sampler, kwargs = S.choose_sampler(num_steps=18, sigma_min=None, solver=None, S_churn=0)
    assert sampler is S.edm1_sampler and kwargs == dict(num_steps=18, S_churn=0)
    sampler, kwargs = S.choose_sampler(num_steps=18, scaling='vp')
    assert sampler is S.ablation_sampler and kwargs == dict(num_steps=18, scaling='vp')
    with pytest.raises(ValueError, match='Invalid discretization "foo"'):
        S.ablation_sampler(GaussianDenoiser(), _latents(), discretization='foo')


def test_to_uint8_rounds_in_the_sampler_precision():
    x = torch.tensor([(127.999999999 - 128) / 127.5, -2.0, 2.0, 0.0], dtype=torch.float64)
    assert S.to_uint8(x).tolist() == [127, 0, 255, 128]
    assert (x.float() * 127.5 + 128).clip(0, 255).to(torch.uint8).tolist()[0] == 128   # float32 would round up


def test_network_sigma_range_defaults():
    assert S.network_sigma_range(torch.nn.Identity())[:2] == (0, float('inf'))
    assert torch.equal(S.network_sigma_range(torch.nn.Identity())[2](torch.tensor([0.3])), torch.tensor([0.3]))


def test_presets_name_the_published_models():
    assert set(edm1_presets.edm1_presets) == {
        'edm-cifar10-32x32-cond-vp', 'edm-cifar10-32x32-cond-ve', 'edm-cifar10-32x32-uncond-vp',
        'edm-cifar10-32x32-uncond-ve', 'edm-ffhq-64x64-uncond-vp', 'edm-ffhq-64x64-uncond-ve',
        'edm-afhqv2-64x64-uncond-vp', 'edm-afhqv2-64x64-uncond-ve', 'edm-imagenet-64x64-cond-adm'}
    for name, preset in edm1_presets.edm1_presets.items():
        assert preset['net'] == f'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/{name}.pkl'
        assert preset['num_steps'] == (18 if '32x32' in name else 256 if 'imagenet' in name else 40)
    assert edm1_presets.edm1_presets['edm-imagenet-64x64-cond-adm'] == dict(
        net='https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl', num_steps=256,
        S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
