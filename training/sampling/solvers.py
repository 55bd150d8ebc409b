"""A family of solvers for the EDM probability-flow ODE, dx/dsigma = (x - D(x, sigma)) / sigma, behind one
entry point, `sample()`, usable as the `sampler_fn` of `generate_images()`.

Every solver is a short function `solver(denoise, x, t_steps) -> x` that integrates from x at t_steps[0]
through the noise levels t_steps[1:] (the last one 0), calling the (guided) denoiser D(x, sigma):

  heun     Karras et al. 2022, Alg. 1/2: 2nd order, 2 evaluations per step (the last step 1); the default,
           with 32 EDM time steps exactly the official sampler;
  euler    the same without the correction: 1st order, 1 evaluation per step;
  dpm++2m  Lu et al. 2022, "DPM-Solver++", Alg. 2: multistep exponential integrator of the data-prediction
           ODE in lambda = -log(sigma); 2nd order, 1 evaluation per step;
  dpm++3m  the same with a 3rd-order Taylor term from the last three outputs;
  ipndm    Zhang & Chen 2023, "DEIS", improved PNDM: Adams-Bashforth in sigma on the slopes
           (x - D) / sigma with the equal-step coefficients of orders 1-4, 1 evaluation per step; with
           its lower-order start and on unequal steps its global order is 2, but its error constant is small.

Time steps (`discretization`): 'edm' (Karras et al. 2022, eq. 5: rho-spaced, the default) or 'logsnr'
(uniform in lambda = -log(sigma), i.e. in log-SNR, as in Lu et al. 2022, "DPM-Solver").

`check_sampler_options()` validates the options (one-line ValueErrors naming the command-line option).
Which sampler a network gets, and the number of network evaluations per image: `training.sampling.families`.
"""

import math
from typing import Callable, Optional, Union

import torch

from training.sampling.sampler import _guided_denoiser, edm_time_steps, heun_solve

#----------------------------------------------------------------------------
# Time steps.


def logsnr_time_steps(num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80,
                      dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
    """sigma_0 > ... > sigma_{N-1} uniform in lambda = -log(sigma) from sigma_max to sigma_min (Lu et al. 2022,
    "DPM-Solver", uniform log-SNR steps), followed by 0. A single step starts at sigma_max."""
    fractions = torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)
    t_steps = (math.log(sigma_max) + fractions * (math.log(sigma_min) - math.log(sigma_max))).exp()
    return torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)]).to(dtype=dtype, device=device)


def time_steps(discretization: str = 'edm', num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80,
               rho: float = 7, dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
    """The N + 1 noise levels of a run, the last one 0, for --disc edm or logsnr."""
    if discretization == 'logsnr':
        return logsnr_time_steps(num_steps, sigma_min, sigma_max, dtype=dtype, device=device)
    return edm_time_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=device)

#----------------------------------------------------------------------------
# Solvers: (denoise, x at t_steps[0], t_steps) -> x at t_steps[-1].


def heun(denoise: Callable, x: torch.Tensor, t_steps: torch.Tensor, **churn) -> torch.Tensor:
    """Karras et al. 2022, Alg. 2 (Alg. 1 without churn)."""
    return heun_solve(denoise, x, t_steps, second_order=True, **churn)


def euler(denoise: Callable, x: torch.Tensor, t_steps: torch.Tensor, **churn) -> torch.Tensor:
    """Euler's method in sigma: x_{i+1} = x_i + (t_{i+1} - t_i) (x_i - D(x_i, t_i)) / t_i."""
    return heun_solve(denoise, x, t_steps, second_order=False, **churn)


def _exponential_integrals(h: float) -> tuple:
    """I_k(h) = int_0^h exp(u - h) u^k / k! du for k = 0, 1, 2: the weights of D and of its first two
    lambda-derivatives in the exact solution x_t = (sigma_t / sigma_s) x_s + sigma_t int e^lambda D dlambda of
    the data-prediction ODE (Lu et al. 2022, "DPM-Solver++", with alpha = 1), D expanded around lambda_s."""
    i0 = -math.expm1(-h)
    return i0, h - i0, h * h / 2 - h + i0


def _dpmpp_step(x: torch.Tensor, sigma: float, sigma_next: float, outputs: list, lambdas: list) -> torch.Tensor:
    """One DPM-Solver++ step from sigma to sigma_next > 0, of order len(outputs), with the newest-first
    outputs D_i, D_{i-1}, ... of the denoiser at lambda_i, lambda_{i-1}, ..."""
    h = math.log(sigma / sigma_next)
    i0, i1, i2 = _exponential_integrals(h)
    x = (sigma_next / sigma) * x + i0 * outputs[0]  # 1st order (DDIM): D constant over the step
    if len(outputs) == 1:
        return x
    h1 = lambdas[0] - lambdas[1]
    if len(outputs) == 2:  # Alg. 2: D' ~ (D_i - D_{i-1}) / h_{i-1}, weighted (1 - exp(-h)) h / 2
        return x + (i0 * h / (2 * h1)) * (outputs[0] - outputs[1])
    # 3rd order: D' and D'' at lambda_i of the quadratic through the last three outputs (Newton's divided
    # differences d01 = D[lambda_i, lambda_{i-1}], d012 = D[lambda_i, lambda_{i-1}, lambda_{i-2}]).
    h2 = lambdas[1] - lambdas[2]
    d01 = (outputs[0] - outputs[1]) / h1
    d012 = (d01 - (outputs[1] - outputs[2]) / h2) / (h1 + h2)
    return x + i1 * (d01 + h1 * d012) + (2 * i2) * d012


def dpmpp_multistep(denoise: Callable, x: torch.Tensor, t_steps: torch.Tensor, order: int = 2) -> torch.Tensor:
    """DPM-Solver++(2M) / (3M) (Lu et al. 2022, "DPM-Solver++", Alg. 2 and its 3rd-order extension), in the
    EDM parametrisation alpha = 1, lambda = -log(sigma). The first steps use the lower orders that the
    available outputs allow; the step into sigma = 0 is the 1st-order one, which gives x = D there."""
    outputs, lambdas = [], []
    for sigma, sigma_next in zip(t_steps[:-1], t_steps[1:]):
        D = denoise(x, sigma)
        if sigma_next == 0:
            return D
        outputs, lambdas = [D, *outputs[:order - 1]], [-math.log(sigma), *lambdas[:order - 1]]
        x = _dpmpp_step(x, float(sigma), float(sigma_next), outputs, lambdas)
    return x


def dpmpp_2m(denoise: Callable, x: torch.Tensor, t_steps: torch.Tensor) -> torch.Tensor:
    return dpmpp_multistep(denoise, x, t_steps, order=2)


def dpmpp_3m(denoise: Callable, x: torch.Tensor, t_steps: torch.Tensor) -> torch.Tensor:
    return dpmpp_multistep(denoise, x, t_steps, order=3)


# Adams-Bashforth coefficients of orders 1-4, newest slope first.
ADAMS_BASHFORTH = ((1,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm(denoise: Callable, x: torch.Tensor, t_steps: torch.Tensor) -> torch.Tensor:
    """Improved PNDM (iPNDM, Zhang & Chen 2023, "DEIS"): for EDM's alpha = 1 the exponential
    integrator with noise prediction is Euler in sigma, and iPNDM replaces its slope with the Adams-Bashforth
    combination of the last four slopes d_j = (x_j - D(x_j, t_j)) / t_j, warming up with orders 1-3:
    x_{i+1} = x_i + (t_{i+1} - t_i) sum_j c_j d_{i-j}."""
    slopes = []
    for sigma, sigma_next in zip(t_steps[:-1], t_steps[1:]):
        slopes = [(x - denoise(x, sigma)) / sigma, *slopes[:len(ADAMS_BASHFORTH) - 1]]
        slope = sum(c * d for c, d in zip(ADAMS_BASHFORTH[len(slopes) - 1], slopes))
        x = x + (sigma_next - sigma) * slope
    return x


SOLVERS = {'heun': heun, 'euler': euler, 'dpm++2m': dpmpp_2m, 'dpm++3m': dpmpp_3m, 'ipndm': ipndm}
CHURN_SOLVERS = ('heun', 'euler')  # stochastic churn (Karras et al. 2022, Alg. 2) is defined for these only
DISCRETIZATIONS = ('edm', 'logsnr')

#----------------------------------------------------------------------------
# Options.


def check_sampler_options(solver: str = 'heun', discretization: str = 'edm', num_steps: int = 32,
                          S_churn: float = 0) -> None:
    """Raise a one-line ValueError, naming the command-line option, for an unknown or inconsistent
    combination of sampler options."""
    if solver not in SOLVERS:
        raise ValueError(f'--solver: unknown solver "{solver}"; choose from {", ".join(SOLVERS)}')
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f'--disc: unknown time-step discretization "{discretization}"; '
                         f'choose from {", ".join(DISCRETIZATIONS)}')
    if num_steps < 1:
        raise ValueError(f'--steps must be at least 1, got {num_steps}')
    if S_churn > 0 and solver not in CHURN_SOLVERS:
        raise ValueError(f'--S_churn is only defined for --solver={" or ".join(CHURN_SOLVERS)}, not {solver}')

#----------------------------------------------------------------------------
# The entry point.


def sample(net: Callable, noise: torch.Tensor, labels: Optional[torch.Tensor] = None, gnet: Optional[Callable] = None,
           solver: str = 'heun', num_steps: int = 32, discretization: str = 'edm', sigma_min: float = 0.002,
           sigma_max: float = 80, rho: float = 7, guidance: float = 1, guidance_interval: Optional[tuple] = None,
           guide_labels: bool = True, S_churn: float = 0, S_min: float = 0, S_max: float = float('inf'),
           S_noise: float = 1, dtype: torch.dtype = torch.float32,
           randn_like: Callable = torch.randn_like) -> torch.Tensor:
    """Sample from the probability-flow ODE with the guided denoiser D = D_g + w (D_m - D_g) of `net`, `gnet`
    (guidance w, optionally only for sigma in guidance_interval) and the chosen solver and time steps.

    With the defaults (heun, 32 steps, edm time steps) this is `edm_sampler`, bit for bit. Churn (S_*) is
    only defined for heun and euler. Returns the final latents in `dtype`.
    """
    check_sampler_options(solver, discretization, num_steps, S_churn)
    denoise = _guided_denoiser(net, gnet, labels, guidance, guidance_interval, guide_labels, dtype)
    t_steps = time_steps(discretization, num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    x = noise.to(dtype) * t_steps[0]  # x_0 = noise * t_0
    if solver in CHURN_SOLVERS:
        churn = dict(S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, randn_like=randn_like)
        return SOLVERS[solver](denoise, x, t_steps, **churn)
    return SOLVERS[solver](denoise, x, t_steps)
