"""Tests for training/phema.py: profile math, the least-squares solve, and the EMA trackers."""

import numpy as np
import pytest
import scipy.integrate
import torch

from training import phema

#----------------------------------------------------------------------------
# Conversions.


def test_std_exp_roundtrip_keeps_shape():
    std = np.array([[0.01, 0.05, 0.10], [0.15, 0.20, 0.28]])
    exp = phema.std_to_exp(std)
    assert exp.shape == std.shape
    np.testing.assert_allclose(phema.exp_to_std(exp), std, rtol=1e-12)
    assert np.all(np.diff(exp.ravel()) < 0)  # narrower profile <=> larger exponent


def test_std_of_exp_zero_is_the_upper_limit():
    assert abs(phema.exp_to_std(0.0) - np.sqrt(1 / 12)) < 1e-15
    assert phema.MAX_STD > phema.exp_to_std(0.0) > phema.MAX_STD - 1e-3


def test_exp_to_std_matches_moments_of_the_profile():
    # p(x) = (g+1) x^g on [0,1]: std = sqrt(E[x^2] - E[x]^2).
    g = 6.94
    mean = (g + 1) / (g + 2)
    second = (g + 1) / (g + 3)
    assert abs(phema.exp_to_std(g) - np.sqrt(second - mean ** 2)) < 1e-12


#----------------------------------------------------------------------------
# Profiles and correlation.


def _profile(ofs, std):
    g = float(phema.std_to_exp(std))
    return lambda t: (g + 1) * t ** g / ofs ** (g + 1) if t <= ofs else 0.0


@pytest.mark.parametrize('a_ofs,a_std,b_ofs,b_std', [
    (100, 0.05, 100, 0.05), (60, 0.05, 100, 0.10), (100, 0.10, 60, 0.05), (30, 0.2, 90, 0.01),
])
def test_correlation_is_the_inner_product_of_profiles(a_ofs, a_std, b_ofs, b_std):
    fa, fb = _profile(a_ofs, a_std), _profile(b_ofs, b_std)
    lo = min(a_ofs, b_ofs)
    expected = scipy.integrate.quad(lambda t: fa(t) * fb(t), 0, lo, epsabs=0, epsrel=1e-11, limit=200)[0]
    got = phema.power_function_correlation(a_ofs, a_std, b_ofs, b_std)
    assert abs(got - expected) < 1e-8 * expected
    assert abs(got - phema.power_function_correlation(b_ofs, b_std, a_ofs, a_std)) < 1e-12 * got


def test_correlation_broadcasts():
    got = phema.power_function_correlation(np.array([[10.0], [20.0]]), 0.05, np.array([[10.0, 20.0, 30.0]]), 0.1)
    assert got.shape == (2, 3)
    assert got[1, 0] == phema.power_function_correlation(20.0, 0.05, 10.0, 0.1)


def test_response_is_a_normalised_truncated_power():
    resp = phema.power_function_response(ofs=[50, 80], std=0.1, len=100, axis=1)
    assert resp.shape == (2, 100)
    np.testing.assert_allclose(resp.sum(axis=1), 1, rtol=1e-12)
    assert np.all(resp[0, 51:] == 0) and resp[0, 50] > 0 and np.all(resp[1, 81:] == 0)
    g = phema.std_to_exp(0.1)
    np.testing.assert_allclose(resp[0, 1:51] / resp[0, 50], (np.arange(1, 51) / 50) ** g, rtol=1e-12)
    np.testing.assert_allclose(phema.power_function_response([50, 80], 0.1, 100, axis=0), resp.T, rtol=1e-14)


def test_beta():
    assert phema.power_function_beta(0.05, t_next=64, t_delta=64) == 0
    g = phema.std_to_exp(0.1)
    assert abs(phema.power_function_beta(0.1, 1000, 10) - 0.99 ** (g + 1)) < 1e-15


#----------------------------------------------------------------------------
# Least-squares solve.


def _grid(num_times=8, stds=(0.05, 0.10), step=1024):
    ofs = np.repeat(np.arange(1, num_times + 1) * step, len(stds))
    return ofs, np.tile(stds, num_times)


def test_coefficients_sum_to_one_and_fit_in_set_profiles_exactly():
    in_ofs, in_std = _grid()
    out_std = [0.03, 0.05, 0.07, 0.10, 0.15]
    X = phema.solve_posthoc_coefficients(in_ofs, in_std, in_ofs[-1], out_std)
    assert X.shape == (len(in_ofs), len(out_std))
    np.testing.assert_allclose(X.sum(axis=0), 1, rtol=1e-12)
    # Profiles in the input set are reproduced by a one-hot column.
    np.testing.assert_allclose(X[:, 1], np.eye(len(in_ofs))[-2], atol=1e-8)
    np.testing.assert_allclose(X[:, 3], np.eye(len(in_ofs))[-1], atol=1e-8)
    err = phema.posthoc_fit_error(in_ofs, in_std, in_ofs[-1], out_std, coefs=X)
    assert err[1] < 1e-6 and err[3] < 1e-6
    assert 1e-3 < err[2] < 0.05  # between the tracked stds: good but not exact


def test_fit_error_grows_outside_the_tracked_span():
    in_ofs, in_std = _grid(num_times=16)
    err = phema.posthoc_fit_error(in_ofs, in_std, in_ofs[-1], [0.005, 0.02, 0.07, 0.15, 0.28])
    assert err[2] < err[3] < err[0] and err[2] < err[1] < err[0]
    assert err[0] > 0.3 and err[2] < 0.01
    # The error is the true L2 distance of the profiles: check one against quadrature.
    X = phema.solve_posthoc_coefficients(in_ofs, in_std, in_ofs[-1], 0.15)[:, 0]
    ps = [_profile(o, s) for o, s in zip(in_ofs, in_std)]
    target = _profile(in_ofs[-1], 0.15)
    diff = lambda t: (sum(x * p(t) for x, p in zip(X, ps)) - target(t)) ** 2
    bounds = np.concatenate([[0], np.unique(in_ofs)])
    sq = sum(scipy.integrate.quad(diff, a, b, epsabs=0, epsrel=1e-10)[0] for a, b in zip(bounds[:-1], bounds[1:]))
    norm = scipy.integrate.quad(lambda t: target(t) ** 2, 0, in_ofs[-1], epsabs=0, epsrel=1e-10)[0]
    assert abs(np.sqrt(sq / norm) - phema.posthoc_fit_error(in_ofs, in_std, in_ofs[-1], 0.15)[0]) < 1e-4


#----------------------------------------------------------------------------
# PowerFunctionEMA / TraditionalEMA.


class _NetWithBuffer(torch.nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(dim))
        self.register_buffer('counter', torch.zeros([]))


def _set(net, value):
    with torch.no_grad():
        net.weight.fill_(value)


def test_first_update_copies_the_net_and_buffers_are_not_averaged():
    net = _NetWithBuffer()
    ema = phema.PowerFunctionEMA(net)
    assert ema.stds == [0.050, 0.100] and ema.emas[0] is not net
    _set(net, 3.0)
    net.counter.fill_(7)
    ema.update(cur_nimg=32, batch_size=32)  # beta = 0
    assert all(torch.equal(e.weight, net.weight) for e in ema.emas)
    assert all(e.counter.item() == 0 for e in ema.emas)
    got = ema.get()
    assert [suffix for _net, suffix in got] == ['-0.050', '-0.100']
    assert all(e.counter.item() == 7 for e, _suffix in got)


def test_update_follows_the_power_function_profile():
    # theta(t) = t / T, one image per step: the EMA is the profile mean (g+1)/(g+2) up to O(1/T).
    net = _NetWithBuffer(dim=1)
    stds = [0.05, 0.10, 0.20]
    ema = phema.PowerFunctionEMA(net, stds=stds)
    steps = 4000
    for k in range(1, steps + 1):
        _set(net, k / steps)
        ema.update(cur_nimg=k, batch_size=1)
    g = phema.std_to_exp(stds)
    got = np.array([e.weight.item() for e in ema.emas])
    np.testing.assert_allclose(got, (g + 1) / (g + 2), atol=2e-3)
    assert got[0] > got[1] > got[2]


def test_update_matches_explicit_lerp_and_reset():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    ema = phema.PowerFunctionEMA(net, stds=[0.07])
    expected = [p.detach().clone() for p in net.parameters()]
    for cur in [8, 16, 24]:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(cur_nimg=cur, batch_size=8)
        beta = phema.power_function_beta(0.07, cur, 8)
        expected = [e + (1 - beta) * (p.detach() - e) for e, p in zip(expected, net.parameters())]
    for e, got in zip(expected, ema.emas[0].parameters()):
        torch.testing.assert_close(got, e, rtol=1e-6, atol=1e-6)
    ema.reset()
    assert all(torch.equal(a, b) for a, b in zip(ema.emas[0].parameters(), net.parameters()))


def test_state_dict_roundtrip():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = phema.PowerFunctionEMA(net, stds=[0.05, 0.1])
    with torch.no_grad():
        net.weight.mul_(2)
    ema.update(cur_nimg=100, batch_size=10)
    state = ema.state_dict()
    assert set(state) == {'stds', 'emas'} and state['stds'] == [0.05, 0.1] and len(state['emas']) == 2
    other = phema.PowerFunctionEMA(net, stds=[0.2])  # different stds: restored from the state
    other.load_state_dict(state)
    assert other.stds == [0.05, 0.1] and len(other.emas) == 2
    for a, b in zip(other.emas, ema.emas):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    with torch.no_grad():
        net.weight.add_(1)
    other.update(cur_nimg=110, batch_size=10)  # the decay follows the restored stds
    ema.update(cur_nimg=110, batch_size=10)
    for a, b in zip(other.emas, ema.emas):
        assert torch.equal(a.weight, b.weight)


def test_traditional_ema_halflife():
    net = _NetWithBuffer(dim=2)
    ema = phema.TraditionalEMA(net, halflife_Mimg=1.0, rampup_ratio=None)
    _set(net, 1.0)
    ema.update(cur_nimg=10 ** 6, batch_size=10 ** 6)  # beta = 0.5
    assert torch.allclose(ema.ema.weight, torch.full([2], 0.5))
    net.counter.fill_(3)
    assert ema.get() is ema.ema and ema.ema.counter.item() == 3
    ramp = phema.TraditionalEMA(_NetWithBuffer(dim=2), halflife_Mimg=1.0, rampup_ratio=0.09)
    _set(ramp.net, 1.0)
    ramp.update(cur_nimg=1000, batch_size=1000)  # h = 90 images: beta = 0.5^(1000/90)
    assert abs(ramp.ema.weight[0].item() - (1 - 0.5 ** (1000 / 90))) < 1e-6
    ema2 = phema.TraditionalEMA(_NetWithBuffer(dim=2))
    ema2.load_state_dict(ema.state_dict())
    assert torch.equal(ema2.ema.weight, ema.ema.weight)


def test_edm1_ema_ramps_up_over_the_images_seen_before_the_step():
    net = _NetWithBuffer(dim=2)
    ema = phema.EDM1EMA(net)  # half-life 0.5 Mimg, ramp-up ratio 0.05
    assert ema.beta(cur_nimg=512, batch_size=512) == 0  # first step: nothing seen before it, the EMA copies the net
    assert ema.beta(cur_nimg=1024, batch_size=512) == 0.5 ** (512 / (512 * 0.05))
    assert ema.beta(cur_nimg=20 * 10 ** 6, batch_size=512) == 0.5 ** (512 / 0.5e6)  # ramp-up over
    _set(net, 2.0)
    ema.update(cur_nimg=512, batch_size=512)
    assert torch.equal(ema.ema.weight, torch.full([2], 2.0))
    _set(net, 4.0)
    beta = ema.beta(cur_nimg=1024, batch_size=512)
    ema.update(cur_nimg=1024, batch_size=512)
    assert torch.equal(ema.ema.weight, torch.full([2], 4.0).lerp(torch.full([2], 2.0), beta))  # EDM v1's arithmetic
    no_ramp = phema.EDM1EMA(_NetWithBuffer(dim=2), halflife_Mimg=1.0, rampup_ratio=None)  # fine-tuning
    assert no_ramp.beta(cur_nimg=10 ** 6, batch_size=10 ** 6) == 0.5
    restored = phema.EDM1EMA(_NetWithBuffer(dim=2))
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.ema.weight, ema.ema.weight) and ema.get() is ema.ema
