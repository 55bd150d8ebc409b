"""Unit tests of training/sampling.py: option parsing, presets, per-seed RNG, time steps,
and the EDM sampler with guidance, checked against closed-form denoisers."""

import math

import numpy as np
import pytest
import torch

import dnnlib
from training.sampling import generate_images, presets, sampler

#----------------------------------------------------------------------------
# Analytic denoisers: for data ~ N(0, s^2) the ideal denoiser is D(x, sigma) = x s^2 / (s^2 + sigma^2),
# and the probability-flow ODE dx/dsigma = (x - D) / sigma has the exact solution
# x(sigma) = x(sigma_0) * sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)).


class GaussianDenoiser(torch.nn.Module):
    def __init__(self, data_std: float, label_dim: int = 0, label_shift: float = 0.0):
        super().__init__()
        self.data_std = data_std
        self.label_dim = label_dim
        self.label_shift = label_shift
        self.calls = []  # (sigma, labels) of every call

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((float(sigma), class_labels))
        var = self.data_std ** 2
        D = x * var / (var + sigma.to(torch.float32) ** 2)
        if class_labels is not None and self.label_shift:
            D = D + self.label_shift * class_labels.argmax(dim=1).reshape(-1, 1, 1, 1).to(D.dtype)
        return D


class ExplodingNet(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError('the guiding network must not be evaluated')


def _noise(n=4, c=3, r=8, seed=0):
    return torch.randn([n, c, r, r], generator=torch.Generator().manual_seed(seed))

#----------------------------------------------------------------------------
# Option parsing and presets.


def test_parse_int_list_expands_ranges_and_passes_lists_through():
    assert dnnlib.util.parse_int_list('1,2,5-7') == [1, 2, 5, 6, 7]
    assert dnnlib.util.parse_int_list('16-19') == [16, 17, 18, 19]
    assert dnnlib.util.parse_int_list('3') == [3]
    assert dnnlib.util.parse_int_list([4, 5]) == [4, 5]
    assert dnnlib.util.parse_int_list(range(2)) == [0, 1]
    assert dnnlib.util.parse_int_list(None) is None


@pytest.mark.parametrize('bad', ['', 'a', '1,,2', '5-3', '1-2-3', '1.5', '3-'])
def test_parse_int_list_rejects_malformed_items(bad):
    with pytest.raises(ValueError, match='invalid'):
        dnnlib.util.parse_int_list(bad)


def test_parse_interval():
    assert presets.parse_interval('0.28,5.42') == (0.28, 5.42)
    assert presets.parse_interval(None) is None
    for bad in ['1', '1,2,3', 'a,b', '3,1', '-1,2']:
        with pytest.raises(ValueError):
            presets.parse_interval(bad)


def test_presets_table():
    assert len(presets.config_presets) == 36
    for name, preset in presets.config_presets.items():
        assert preset['net'].startswith(presets.model_root + '/edm2-img') and preset['net'].endswith('.pkl')
        guided = '-guid-' in name or '-autog-' in name
        assert ('gnet' in preset) == guided
        if guided:
            assert preset['guidance'] > 1
    s_autog = presets.config_presets['edm2-img512-s-autog-fid']
    assert s_autog['net'].endswith('/edm2-img512-s-2147483-0.070.pkl')
    assert s_autog['gnet'].endswith('/edm2-img512-xs-0134217-0.125.pkl')
    assert s_autog['guidance'] == 2.10


def test_resolve_options_rules():
    preset = presets.config_presets['edm2-img512-s-guid-fid']
    assert presets.resolve_options('edm2-img512-s-guid-fid') == dict(net=preset['net'], gnet=preset['gnet'], guidance=1.4)
    # Explicit values win; explicit --guidance=1 drops the preset's guide.
    assert presets.resolve_options('edm2-img512-s-guid-fid', net='a.pkl')['net'] == 'a.pkl'
    assert presets.resolve_options('edm2-img512-s-guid-fid', guidance=1) == dict(net=preset['net'], gnet=None, guidance=1)
    assert presets.resolve_options(net='a.pkl', gnet='b.pkl') == dict(net='a.pkl', gnet=None, guidance=1)
    with pytest.raises(ValueError, match='Invalid configuration preset "nope".*edm2-img64-s-fid'):
        presets.resolve_options('nope')
    with pytest.raises(ValueError, match='Please specify either --preset or --net'):
        presets.resolve_options()
    with pytest.raises(ValueError, match='Please specify --gnet when using guidance'):
        presets.resolve_options(net='a.pkl', guidance=2)

#----------------------------------------------------------------------------
# Per-seed random numbers.


def test_stacked_generator_depends_only_on_each_seed():
    both = sampler.StackedRandomGenerator('cpu', [3, 7])
    noise = both.randn([2, 3, 4, 4])
    labels = both.randint(10, size=[2])
    for row, seed in enumerate([3, 7]):
        gen = torch.Generator().manual_seed(seed)
        assert torch.equal(noise[row], torch.randn([3, 4, 4], generator=gen))
        assert torch.equal(labels[row], torch.randint(10, size=[], generator=gen))
    assert labels.shape == (2,) and labels.dtype == torch.int64
    # Seeds are taken mod 2^32.
    wrapped = sampler.StackedRandomGenerator('cpu', [(1 << 32) + 3]).randn([1, 3, 4, 4])
    assert torch.equal(wrapped[0], noise[0])


def test_stacked_generator_randn_like_keeps_dtype_and_shape():
    rnd = sampler.StackedRandomGenerator('cpu', [1, 2, 3])
    x = torch.zeros([3, 2, 5, 5], dtype=torch.float64)
    out = rnd.randn_like(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    with pytest.raises(AssertionError):
        rnd.randn([2, 1])

#----------------------------------------------------------------------------
# Time steps.


def test_time_steps_follow_the_edm_formula():
    N, smin, smax, rho = 7, 0.002, 80.0, 7.0
    t = sampler.edm_time_steps(N, smin, smax, rho)
    assert t.dtype == torch.float32 and t.shape == (N + 1,)
    i = np.arange(N)
    ref = (smax ** (1 / rho) + i / (N - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    np.testing.assert_allclose(t[:-1].numpy(), ref, rtol=1e-5)
    assert t[-1] == 0 and torch.all(t[:-1] > t[1:])


def test_single_step_does_not_divide_by_zero():
    t = sampler.edm_time_steps(1)
    assert torch.isfinite(t).all() and float(t[0]) == pytest.approx(80.0) and t[1] == 0
    x = sampler.edm_sampler(GaussianDenoiser(0.5), _noise(), num_steps=1)
    assert torch.isfinite(x).all()

#----------------------------------------------------------------------------
# Sampler.


def test_heun_sampler_matches_the_exact_ode_solution():
    s, smax = 0.5, 80.0
    noise = _noise(n=2, r=4)
    exact = noise.double() * smax * math.sqrt(s ** 2 / (s ** 2 + smax ** 2))
    errors = []
    for num_steps in [32, 64, 128]:
        x = sampler.edm_sampler(GaussianDenoiser(s), noise, num_steps=num_steps, sigma_max=smax, dtype=torch.float64)
        errors.append(float(((x - exact) / exact).abs().max()))
    assert errors[0] < 0.02 and errors[2] < 1e-3
    # Heun is second order: doubling the steps divides the error by about 4.
    assert 3.5 < errors[0] / errors[1] < 4.5 and 3.5 < errors[1] / errors[2] < 4.5
    # Evaluations: 2N - 1.
    net = GaussianDenoiser(s)
    sampler.edm_sampler(net, noise, num_steps=5)
    assert len(net.calls) == 9


def test_guidance_one_never_evaluates_the_guide():
    noise = _noise()
    plain = sampler.edm_sampler(GaussianDenoiser(0.5), noise, num_steps=6)
    guided = sampler.edm_sampler(GaussianDenoiser(0.5), noise, gnet=ExplodingNet(), guidance=1.0, num_steps=6)
    assert torch.equal(plain, guided)


def test_guidance_extrapolates_from_guide_to_main():
    noise = _noise()
    net, gnet, w = GaussianDenoiser(0.5), GaussianDenoiser(0.2), 2.5

    class Combined(torch.nn.Module):
        def forward(self, x, sigma, labels=None):
            return gnet(x, sigma, labels).lerp(net(x, sigma, labels), w)  # D_g + w (D_m - D_g)

    guided = sampler.edm_sampler(net, noise, gnet=gnet, guidance=w, num_steps=6)
    assert torch.equal(guided, sampler.edm_sampler(Combined(), noise, num_steps=6))
    plain = sampler.edm_sampler(net, noise, num_steps=6)
    assert not torch.allclose(guided, plain)
    # The guide sees the same noise levels as the main net.
    assert [c[0] for c in net.calls[-11:]] == [c[0] for c in gnet.calls[-11:]]


def test_guidance_interval_covering_everything_equals_plain_guidance():
    noise = _noise()
    kwargs = dict(gnet=GaussianDenoiser(0.2), guidance=2.0, num_steps=6)
    plain = sampler.edm_sampler(GaussianDenoiser(0.5), noise, **kwargs)
    full = sampler.edm_sampler(GaussianDenoiser(0.5), noise, guidance_interval=(0.0, float('inf')), **kwargs)
    assert torch.equal(plain, full)
    none = sampler.edm_sampler(GaussianDenoiser(0.5), noise, guidance_interval=(500.0, 600.0), **kwargs)
    assert torch.equal(none, sampler.edm_sampler(GaussianDenoiser(0.5), noise, num_steps=6))


def test_guidance_interval_limits_guide_calls_to_the_interval():
    gnet = GaussianDenoiser(0.2)
    lo, hi = 0.3, 5.0
    sampler.edm_sampler(GaussianDenoiser(0.5), _noise(), gnet=gnet, guidance=2.0, num_steps=12,
                         guidance_interval=(lo, hi))
    t = sampler.edm_time_steps(12)
    expected = sum(1 for i in range(12) if lo <= float(t[i]) <= hi) + sum(1 for i in range(11) if lo <= float(t[i + 1]) <= hi)
    assert len(gnet.calls) == expected > 0
    assert all(lo <= sigma <= hi for sigma, _ in gnet.calls)


def test_guide_receives_class_labels_unless_disabled():
    labels = torch.eye(4)[[1, 3]]
    net, gnet = GaussianDenoiser(0.5, 4, 0.1), GaussianDenoiser(0.2, 4, 0.1)
    sampler.edm_sampler(net, _noise(n=2), labels=labels, gnet=gnet, guidance=2.0, num_steps=3)
    assert all(lab is labels for _, lab in net.calls) and all(lab is labels for _, lab in gnet.calls)
    fork_gnet = GaussianDenoiser(0.2, 4, 0.1)
    sampler.edm_sampler(net, _noise(n=2), labels=labels, gnet=fork_gnet, guidance=2.0, num_steps=3, guide_labels=False)
    assert all(lab is None for _, lab in fork_gnet.calls)


def test_churn_draws_noise_only_where_active():
    draws = []

    def randn_like(x):
        draws.append(x.shape)
        return torch.ones_like(x)

    noise = _noise()
    deterministic = sampler.edm_sampler(GaussianDenoiser(0.5), noise, num_steps=8, randn_like=randn_like)
    assert draws == []
    t = sampler.edm_time_steps(8)
    S_min, S_max = 0.05, 10.0
    stochastic = sampler.edm_sampler(GaussianDenoiser(0.5), noise, num_steps=8, randn_like=randn_like,
                                      S_churn=40, S_min=S_min, S_max=S_max)
    assert len(draws) == sum(1 for v in t[:-1].tolist() if S_min <= v <= S_max) > 0
    assert all(shape == noise.shape for shape in draws)
    assert not torch.equal(deterministic, stochastic)


def test_churn_raises_the_noise_level_by_gamma():
    net = GaussianDenoiser(0.5)
    N, S_churn = 4, 0.8
    sampler.edm_sampler(net, _noise(), num_steps=N, S_churn=S_churn, randn_like=torch.zeros_like)
    gamma = min(S_churn / N, math.sqrt(2) - 1)
    t = sampler.edm_time_steps(N)
    assert net.calls[0][0] == pytest.approx(float(t[0]) * (1 + gamma), rel=1e-6)
    assert net.calls[1][0] == pytest.approx(float(t[1]), rel=1e-6)


def test_sampler_runs_in_requested_dtype():
    x = sampler.edm_sampler(GaussianDenoiser(0.5), _noise(), num_steps=4, dtype=torch.float64)
    assert x.dtype == torch.float64

#----------------------------------------------------------------------------
# Seed splitting and file naming.


@pytest.mark.parametrize('num_seeds,batch,world', [(10, 4, 1), (10, 4, 2), (3, 32, 4), (0, 8, 1), (65, 32, 2)])
def test_split_seeds_covers_every_seed_once(num_seeds, batch, world):
    chunks = [generate_images.split_seeds(num_seeds, batch, rank, world) for rank in range(world)]
    assert len({len(c) for c in chunks}) == 1  # every rank sees the same number of batches
    flat = sorted(int(i) for rank_chunks in chunks for chunk in rank_chunks for i in chunk)
    assert flat == list(range(num_seeds))
    assert all(len(chunk) <= batch for rank_chunks in chunks for chunk in rank_chunks)


def test_image_path_layout(tmp_path):
    assert generate_images.image_path('out', 12345, subdirs=True) == 'out/012000/012345.png'
    assert generate_images.image_path('out', 7) == 'out/000007.png'
    assert generate_images.image_path('out', 1234567) == 'out/1234567.png'


def test_ignored_gnet_warning_only_when_guidance_is_off():
    for guidance in (None, 1, 1.0):
        assert presets.ignored_gnet_warning('g.pkl', guidance) == '--gnet is ignored without guidance (--guidance 1)'
    assert presets.ignored_gnet_warning('g.pkl', 2.0) is None
    assert presets.ignored_gnet_warning(None, 1) is None
