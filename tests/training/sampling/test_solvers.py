"""Tests of training/sampling/solvers.py: every solver converges at its order to the closed-form solution of
the probability-flow ODE of Gaussian data (with and without guidance), the default is the official sampler
bit for bit, evaluation counts, time steps and option checks."""

import math

import pytest
import torch

from tests.tiny import make_tiny_precond
from training.sampling import families, sampler, solvers

#----------------------------------------------------------------------------
# Gaussian data N(mu, diag(s^2)): the ideal denoiser is D(x, sigma) = mu + (x - mu) s^2 / (s^2 + sigma^2), and
# the ODE dx/dsigma = (x - D) / sigma moves x - mu by the factor sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)).
# With a Gaussian guide of the same mean and std g, the guided denoiser D_g + w (D_m - D_g) gives the factor
# ((s^2 + sigma^2) / (s^2 + sigma_0^2))^(w/2) ((g^2 + sigma^2) / (g^2 + sigma_0^2))^((1-w)/2).

GEN = torch.Generator().manual_seed(0)
MU = 0.3 * torch.randn([1, 2, 3, 3], generator=GEN, dtype=torch.float64)
STD = 0.2 + 0.8 * torch.rand([1, 2, 3, 3], generator=GEN, dtype=torch.float64)
GUIDE_STD = 1.5 * STD
NOISE = torch.randn([4, 2, 3, 3], generator=GEN, dtype=torch.float64)
SIGMA_MAX = 80.0


class Gaussian:
    """The ideal denoiser of N(MU, diag(std^2)); records the noise level of every call."""

    def __init__(self, std: torch.Tensor):
        self.std = std
        self.sigmas = []

    def __call__(self, x, sigma, labels=None):
        self.sigmas.append(float(sigma))
        var = self.std.to(x.dtype) ** 2
        return MU.to(x.dtype) + (x - MU.to(x.dtype)) * var / (var + sigma.to(x.dtype) ** 2)


class Exploding:
    def __call__(self, *args, **kwargs):
        raise AssertionError('the guiding network must not be evaluated')


def exact_solution(guidance: float) -> torch.Tensor:
    """x(0) from x(SIGMA_MAX) = NOISE * SIGMA_MAX."""
    def factor(std, power):
        return (std ** 2 / (std ** 2 + SIGMA_MAX ** 2)) ** power
    return MU + (NOISE * SIGMA_MAX - MU) * factor(STD, guidance / 2) * factor(GUIDE_STD, (1 - guidance) / 2)


def solve(solver, num_steps, discretization='edm', guidance=1.0, **kwargs):
    return solvers.sample(Gaussian(STD), NOISE, gnet=Gaussian(GUIDE_STD), guidance=guidance, solver=solver,
                          discretization=discretization, num_steps=num_steps, sigma_min=1e-4, dtype=torch.float64,
                          **kwargs)

#----------------------------------------------------------------------------
# Convergence at the theoretical order.

# iPNDM's Adams-Bashforth coefficients assume equal steps; on the unequal EDM and log-SNR steps, and with its
# lower-order start, its global order is 2. DPM-Solver++(3M) converges faster than 3 on log-SNR steps here.
ORDERS = {'euler': 1, 'heun': 2, 'dpm++2m': 2, 'dpm++3m': 3, 'ipndm': 2}


@pytest.mark.parametrize('guidance', [1.0, 2.5])
@pytest.mark.parametrize('discretization', solvers.DISCRETIZATIONS)
@pytest.mark.parametrize('solver', list(ORDERS))
def test_error_falls_at_the_solver_order_as_steps_double(solver, discretization, guidance):
    exact = exact_solution(guidance)
    errors = [float((solve(solver, n, discretization, guidance) - exact).abs().max()) for n in (32, 64, 128)]
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    expected = ORDERS[solver]
    assert all(order > expected - 0.15 for order in orders), (errors, orders)
    if discretization == 'edm':
        assert all(order < expected + 0.35 for order in orders), (errors, orders)


def test_higher_order_solvers_beat_heun_at_equal_evaluations():
    exact = exact_solution(1.0)
    for discretization in solvers.DISCRETIZATIONS:
        heun = float((solve('heun', 8, discretization) - exact).abs().max())  # 15 evaluations
        for solver in ('dpm++2m', 'dpm++3m', 'ipndm'):
            assert float((solve(solver, 15, discretization) - exact).abs().max()) < heun, (solver, discretization)

#----------------------------------------------------------------------------
# The default is the official sampler.


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(num_steps=5, guidance=2.0, guidance_interval=(0.3, 5.0)),
    dict(num_steps=6, S_churn=10, S_min=0.05, S_max=50, randn_like=torch.ones_like),
    dict(num_steps=4, dtype=torch.float64, guide_labels=False, guidance=1.5),
])
def test_default_solver_is_the_edm_sampler_bit_for_bit(kwargs):
    net, gnet = make_tiny_precond(seed=0, label_dim=4), make_tiny_precond(seed=1, label_dim=4)
    noise = torch.randn([2, 3, 16, 16], generator=torch.Generator().manual_seed(1))
    labels = torch.eye(4)[[0, 3]]
    kwargs = {'num_steps': 3, **kwargs}
    with torch.no_grad():
        official = sampler.edm_sampler(net, noise, labels, gnet=gnet, **kwargs)
        assert torch.equal(solvers.sample(net, noise, labels, gnet=gnet, **kwargs), official)
        assert torch.equal(solvers.sample(net, noise, labels, gnet=gnet, solver='heun', discretization='edm',
                                          **kwargs), official)


def test_euler_with_churn_follows_the_same_noise_levels_as_heun():
    net = Gaussian(STD)
    solvers.sample(net, NOISE, solver='euler', num_steps=4, S_churn=0.8, randn_like=torch.zeros_like)
    t = sampler.edm_time_steps(4)
    gamma = min(0.8 / 4, math.sqrt(2) - 1)
    assert net.sigmas == pytest.approx([float(t[i]) * (1 + gamma) for i in range(4)], rel=1e-6)

#----------------------------------------------------------------------------
# Guidance and evaluation counts.


@pytest.mark.parametrize('solver', list(solvers.SOLVERS))
def test_guidance_one_never_evaluates_the_guide(solver):
    plain = solvers.sample(Gaussian(STD), NOISE, solver=solver, num_steps=6)
    assert torch.equal(solvers.sample(Gaussian(STD), NOISE, gnet=Exploding(), solver=solver, num_steps=6), plain)


@pytest.mark.parametrize('solver', list(solvers.SOLVERS))
@pytest.mark.parametrize('discretization', solvers.DISCRETIZATIONS)
def test_counted_evaluations_match_the_calls_of_a_run(solver, discretization):
    interval = (0.3, 5.0)
    kwargs = dict(solver=solver, discretization=discretization, num_steps=10, guidance=2.0, guidance_interval=interval)
    net, gnet = Gaussian(STD), Gaussian(GUIDE_STD)
    solvers.sample(net, NOISE, gnet=gnet, **kwargs)
    assert len(net.sigmas) == (19 if solver == 'heun' else 10)
    assert 0 < len(gnet.sigmas) < len(net.sigmas) and all(interval[0] <= s <= interval[1] for s in gnet.sigmas)
    assert families.count_evaluations(**kwargs) == dict(main=len(net.sigmas), guide=len(gnet.sigmas))
    line = families.describe_sampler(**kwargs)
    assert line == (f'Sampler: {solver}, 10 steps, {discretization} time steps; network evaluations per image: '
                    f'{len(net.sigmas)} main + {len(gnet.sigmas)} guide')


def test_default_run_takes_63_evaluations():
    assert families.count_evaluations() == dict(main=63, guide=0)
    assert families.describe_sampler().endswith('network evaluations per image: 63 main')


@pytest.mark.parametrize('solver', list(solvers.SOLVERS))
def test_every_solver_takes_one_step_and_keeps_the_dtype(solver):
    x = solvers.sample(Gaussian(STD), NOISE.float(), solver=solver, num_steps=1)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    # One step into sigma = 0 is the denoised start for every solver (Euler, and x = D for DPM-Solver++).
    torch.testing.assert_close(x, Gaussian(STD)(NOISE.float() * 80, torch.tensor(80.0)), rtol=1e-4, atol=1e-4)
    assert solvers.sample(Gaussian(STD), NOISE, solver=solver, num_steps=3, dtype=torch.float64).dtype == torch.float64

#----------------------------------------------------------------------------
# Time steps and options.


def test_logsnr_time_steps_are_uniform_in_log_sigma():
    t = solvers.time_steps('logsnr', 9, 0.002, 80.0, dtype=torch.float64)
    assert t.shape == (10,) and t[-1] == 0
    assert float(t[0]) == pytest.approx(80.0) and float(t[-2]) == pytest.approx(0.002)
    ratios = t[1:-1] / t[:-2]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (0.002 / 80) ** (1 / 8)))
    assert float(solvers.time_steps('logsnr', 1)[0]) == pytest.approx(80.0)
    assert torch.equal(solvers.time_steps('edm', 7), sampler.edm_time_steps(7))


@pytest.mark.parametrize('kwargs,message', [
    (dict(solver='rk4'), '--solver: unknown solver "rk4"; choose from heun, euler, dpm++2m, dpm++3m, ipndm'),
    (dict(discretization='vp'), '--disc: unknown time-step discretization "vp"; choose from edm, logsnr'),
    (dict(num_steps=0), '--steps must be at least 1, got 0'),
    (dict(solver='dpm++2m', S_churn=1), '--S_churn is only defined for --solver=heun or euler, not dpm++2m'),
    (dict(solver='ipndm', S_churn=1), '--S_churn is only defined for --solver=heun or euler, not ipndm'),
])
def test_inconsistent_options_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError) as err:
        solvers.check_sampler_options(**kwargs)
    assert str(err.value) == message
    with pytest.raises(ValueError, match='^--'):
        solvers.sample(Gaussian(STD), NOISE, **kwargs)
