"""The samplers of EDM v1 (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"), with classifier-free guidance and autoguidance added.

edm1_sampler      Algorithm 2: the EDM sampler (2nd-order Heun, time steps of eq. 5, optional churn),
                  computed in float64, noise levels snapped to what the network supports
                  (`net.round_sigma`, `net.sigma_min`/`net.sigma_max`).
ablation_sampler  Algorithm 1 generalised as in Table 1: any time-step discretisation (vp, ve, iddpm,
                  edm), noise schedule sigma(t) (vp, ve, linear), scaling s(t) (vp, none) and solver
                  (euler, or 2nd-order heun with parameter alpha), plus the churn of Algorithm 2.

Both call the network as D(x; sigma) = net(x, sigma, class_labels); with `guidance` != 1 the
denoiser is g + w (D - g), where g = gnet(x, sigma, class_labels) is the guiding network evaluated
like the main one (an unconditional guide gives classifier-free guidance, a weaker version of the
main network autoguidance). The noise-level range and rounding always come from the main network.

Per-seed random streams
-----------------------
The same seed and options give the same image as EDM v1's generate.py (with the network on its plain
path, `net.set_fast(False)`; the fast paths change results by float rounding only), because the
arithmetic is the same and every random number comes from the image's own generator, in the same
order (StackedRandomGenerator of training.sampling.sampler: one torch.Generator per seed on the
compute device, seeded with seed mod 2^32, each draw stacked over the batch):

  1. latents: randn([img_channels, img_resolution, img_resolution]), float32;
  2. conditional networks only: one randint(label_dim), the class label (one-hot); a fixed class
     overwrites the label after the draw, so the stream does not change;
  3. while sampling: at EVERY step i = 0 ... N-1, before the network is called, one
     randn_like(x) of the latent shape in float64 (the churn noise). It is drawn even when churn is
     off at that step (gamma = 0), where it is multiplied by 0 (edm1_sampler) or by
     sqrt(max(sigma(t_hat)^2 - sigma(t_i)^2, 0)), which rounding can leave slightly above 0 for
     the VP and VE schedules (ablation_sampler). Nothing is drawn for the Heun correction.

Images are `to_uint8(x)`: clip(x * 127.5 + 128, 0, 255) truncated, on the float64 result.
"""

from typing import Callable, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from training.networks import iddpm_sigma_table
from training.sampling.sampler import _guided_denoiser, edm_time_steps

#----------------------------------------------------------------------------
# What the sampler needs from the network.


def network_sigma_range(net) -> Tuple[float, float, Callable]:
    """(sigma_min, sigma_max, round_sigma) of the network; a network without them (e.g. EDM2's Precond)
    supports (0, inf) with identity rounding. Wrappers that keep the network as `.net` (FixedBatchNet)
    are looked through."""
    while not hasattr(net, 'round_sigma') and hasattr(net, 'net'):
        net = net.net
    return getattr(net, 'sigma_min', 0), getattr(net, 'sigma_max', float('inf')), getattr(net, 'round_sigma', torch.as_tensor)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8, computed in the dtype of `x` (float64 for the v1 samplers)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


class PixelDecoder:
    """The decoder of EDM v1 networks (pixel space; their snapshots hold no encoder): `to_uint8`, an encoder's
    interface for `generate_images`."""

    def init(self, device: torch.device) -> None:
        pass

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return to_uint8(x)


def _churn_gamma(sigma_cur, num_steps: int, S_churn: float, S_min: float, S_max: float) -> float:
    """gamma_i of Algorithm 2: min(S_churn / N, sqrt(2) - 1) inside [S_min, S_max], else 0."""
    return min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= sigma_cur <= S_max else 0

#----------------------------------------------------------------------------
# EDM sampler (Algorithm 2).


def edm1_time_steps(net, num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7,
                    device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
    """t_0 > ... > t_{N-1} of eq. 5 in float64 within the network's range, rounded by the network; t_N = 0."""
    net_min, net_max, round_sigma = network_sigma_range(net)
    sigma_min = max(sigma_min, net_min)
    sigma_max = min(sigma_max, net_max)
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64, device=device)
    return torch.cat([round_sigma(t_steps[:-1]), t_steps[-1:]])


def edm1_sampler(net: Callable, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                 randn_like: Callable = torch.randn_like, num_steps: int = 18, sigma_min: float = 0.002,
                 sigma_max: float = 80, rho: float = 7, S_churn: float = 0, S_min: float = 0,
                 S_max: float = float('inf'), S_noise: float = 1, gnet: Optional[Callable] = None,
                 guidance: float = 1, guidance_interval: Optional[tuple] = None,
                 guide_labels: bool = True) -> torch.Tensor:
    """EDM sampler of EDM v1 (Algorithm 2) in float64; returns x_N (float64).

    guidance_interval -- (lo, hi): guide only where lo <= sigma <= hi.
    guide_labels      -- False calls the guide without class labels.
    For num_steps = 1 the single step starts at sigma_max (EDM v1 divides by zero there).
    """
    _, _, round_sigma = network_sigma_range(net)
    denoise = _guided_denoiser(net, gnet, class_labels, guidance, guidance_interval, guide_labels, torch.float64)
    t_steps = edm1_time_steps(net, num_steps, sigma_min, sigma_max, rho, device=latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level to t_hat = t_i (1 + gamma); the noise is drawn even for gamma = 0.
        gamma = _churn_gamma(t_cur, num_steps, S_churn, S_min, S_max)
        t_hat = round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step, d = (x - D(x; t)) / t.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun correction (all steps but the last): average the slopes at both ends.
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

#----------------------------------------------------------------------------
# Ablation sampler (Table 1 and Algorithm 1): noise schedule sigma(t), scaling s(t), discretisation.


SOLVER_CHOICES = ('euler', 'heun')
DISCRETIZATION_CHOICES = ('vp', 've', 'iddpm', 'edm')
SCHEDULE_CHOICES = ('vp', 've', 'linear')
SCALING_CHOICES = ('vp', 'none')
ABLATION_KEYS = ('solver', 'discretization', 'schedule', 'scaling', 'alpha')  # alpha: ours, not in EDM v1's CLI


class Schedule(NamedTuple):
    sigma: Callable        # sigma(t)
    sigma_deriv: Callable  # sigma'(t)
    sigma_inv: Callable    # t(sigma)


class Scaling(NamedTuple):
    s: Callable            # s(t)
    s_deriv: Callable      # s'(t)


def vp_schedule(beta_d: float, beta_min: float) -> Schedule:
    """VP (Table 1): sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1); works on floats and tensors."""
    sigma = lambda t: (np.e ** (0.5 * beta_d * (t ** 2) + beta_min * t) - 1) ** 0.5
    sigma_deriv = lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))
    sigma_inv = lambda sigma: ((beta_min ** 2 + 2 * beta_d * (sigma ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    return Schedule(sigma, sigma_deriv, sigma_inv)


VE_SCHEDULE = Schedule(lambda t: t.sqrt(), lambda t: 0.5 / t.sqrt(), lambda sigma: sigma ** 2)   # sigma(t) = sqrt(t)
LINEAR_SCHEDULE = Schedule(lambda t: t, lambda t: 1, lambda sigma: sigma)                          # sigma(t) = t
NO_SCALING = Scaling(lambda t: 1, lambda t: 0)


def vp_scaling(schedule: Schedule) -> Scaling:
    """VP scaling (Table 1): s(t) = 1 / sqrt(1 + sigma(t)^2), s'(t) = -sigma(t) sigma'(t) s(t)^3."""
    s = lambda t: 1 / (1 + schedule.sigma(t) ** 2).sqrt()
    s_deriv = lambda t: -schedule.sigma(t) * schedule.sigma_deriv(t) * (s(t) ** 3)
    return Scaling(s, s_deriv)


_DEFAULT_VP = vp_schedule(beta_d=19.9, beta_min=0.1)


def ablation_sigma_range(net, discretization: str, sigma_min: Optional[float] = None,
                         sigma_max: Optional[float] = None, epsilon_s: float = 1e-3) -> Tuple[float, float]:
    """Noise-level range: the discretisation's default where not given (vp sigma_VP(epsilon_s) ...
    sigma_VP(1) with beta_d = 19.9, beta_min = 0.1; ve 0.02 ... 100; iddpm 0.002 ... 81; edm
    0.002 ... 80), then clamped to the network's range."""
    if sigma_min is None:
        sigma_min = {'vp': _DEFAULT_VP.sigma(epsilon_s), 've': 0.02, 'iddpm': 0.002, 'edm': 0.002}[discretization]
    if sigma_max is None:
        sigma_max = {'vp': _DEFAULT_VP.sigma(1), 've': 100, 'iddpm': 81, 'edm': 80}[discretization]
    net_min, net_max, _ = network_sigma_range(net)
    return max(sigma_min, net_min), min(sigma_max, net_max)


def vp_betas(sigma_min: float, sigma_max: float, epsilon_s: float) -> Tuple[float, float]:
    """(beta_d, beta_min) such that sigma_VP(epsilon_s) = sigma_min and sigma_VP(1) = sigma_max."""
    beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    return beta_d, beta_min


def ablation_sigma_steps(discretization: str, num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7,
                         epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000,
                         device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
    """Noise levels sigma_0 > ... > sigma_{N-1} (float64) of a time-step discretisation (Table 1):
      vp     sigma_VP(1 + i/(N-1) (epsilon_s - 1)), betas from vp_betas()
      ve     sqrt(sigma_max^2 (sigma_min^2 / sigma_max^2)^(i/(N-1)))
      iddpm  N evenly spaced (rounded) entries of the u table within [sigma_min, sigma_max]
      edm    (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    """
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    if discretization == 'vp':
        orig_t_steps = 1 + step_indices / (num_steps - 1) * (epsilon_s - 1)
        return vp_schedule(*vp_betas(sigma_min, sigma_max, epsilon_s)).sigma(orig_t_steps)
    if discretization == 've':
        orig_t_steps = (sigma_max ** 2) * ((sigma_min ** 2 / sigma_max ** 2) ** (step_indices / (num_steps - 1)))
        return VE_SCHEDULE.sigma(orig_t_steps)
    if discretization == 'iddpm':
        u = iddpm_sigma_table(M, C_1, C_2, dtype=torch.float64, device=device)
        u_filtered = u[torch.logical_and(u >= sigma_min, u <= sigma_max)]
        return u_filtered[((len(u_filtered) - 1) / (num_steps - 1) * step_indices).round().to(torch.int64)]
    assert discretization == 'edm'
    return (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def ablation_schedule_and_scaling(schedule: str, scaling: str, sigma_min: float, sigma_max: float,
                                  epsilon_s: float = 1e-3) -> Tuple[Schedule, Scaling]:
    """sigma(t) and s(t) by name; the vp schedule uses the betas of the noise-level range."""
    sched = {'vp': lambda: vp_schedule(*vp_betas(sigma_min, sigma_max, epsilon_s)), 've': lambda: VE_SCHEDULE,
             'linear': lambda: LINEAR_SCHEDULE}[schedule]()
    scale = vp_scaling(sched) if scaling == 'vp' else NO_SCALING
    return sched, scale


def _ode_slope(sched: Schedule, scale: Scaling, x: torch.Tensor, t, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dt = (sigma'/sigma + s'/s) x - sigma' s / sigma D(x/s; sigma) (EDM paper, eq. 4)."""
    sigma, sigma_deriv, s, s_deriv = sched.sigma(t), sched.sigma_deriv(t), scale.s(t), scale.s_deriv(t)
    return (sigma_deriv / sigma + s_deriv / s) * x - sigma_deriv * s / sigma * denoised


def ablation_sampler(net: Callable, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                     randn_like: Callable = torch.randn_like, num_steps: int = 18, sigma_min: Optional[float] = None,
                     sigma_max: Optional[float] = None, rho: float = 7, solver: str = 'heun',
                     discretization: str = 'edm', schedule: str = 'linear', scaling: str = 'none',
                     epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, alpha: float = 1,
                     S_churn: float = 0, S_min: float = 0, S_max: float = float('inf'), S_noise: float = 1,
                     gnet: Optional[Callable] = None, guidance: float = 1, guidance_interval: Optional[tuple] = None,
                     guide_labels: bool = True) -> torch.Tensor:
    """Generalised sampler of EDM v1 (Table 1, Algorithms 1-2) in float64; returns x_N (float64).

    Heun with parameter alpha evaluates the slope again at t_hat + alpha h and steps with
    (1 - 1/(2 alpha)) d + 1/(2 alpha) d' (alpha = 1: trapezoidal Heun); the last step is always Euler.
    Guidance, guidance_interval and guide_labels as in edm1_sampler().
    """
    for name, value, allowed in (('solver', solver, SOLVER_CHOICES), ('discretization', discretization, DISCRETIZATION_CHOICES),
                                 ('schedule', schedule, SCHEDULE_CHOICES), ('scaling', scaling, SCALING_CHOICES)):
        if value not in allowed:
            raise ValueError(f'Invalid {name} "{value}"; expected one of {", ".join(allowed)}')
    sigma_min, sigma_max = ablation_sigma_range(net, discretization, sigma_min, sigma_max, epsilon_s)
    sched, scale = ablation_schedule_and_scaling(schedule, scaling, sigma_min, sigma_max, epsilon_s)
    sigma, s = sched.sigma, scale.s
    _, _, round_sigma = network_sigma_range(net)
    denoise = _guided_denoiser(net, gnet, class_labels, guidance, guidance_interval, guide_labels, torch.float64)

    # Time steps t_i = t(sigma_i) of the network's rounded noise levels; t_N = 0.
    sigma_steps = ablation_sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho, epsilon_s, C_1, C_2, M,
                                       device=latents.device)
    t_steps = sched.sigma_inv(round_sigma(sigma_steps))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

    x_next = latents.to(torch.float64) * (sigma(t_steps[0]) * s(t_steps[0]))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level to sigma(t_hat) = sigma(t_i) (1 + gamma); the noise is drawn every step.
        gamma = _churn_gamma(sigma(t_cur), num_steps, S_churn, S_min, S_max)
        t_hat = sched.sigma_inv(round_sigma(sigma(t_cur) + gamma * sigma(t_cur)))
        noise_std = (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt() * s(t_hat)
        x_hat = s(t_hat) / s(t_cur) * x_cur + noise_std * S_noise * randn_like(x_cur)

        # Euler step from t_hat to t_next.
        h = t_next - t_hat
        d_cur = _ode_slope(sched, scale, x_hat, t_hat, denoise(x_hat / s(t_hat), sigma(t_hat)))
        if solver == 'euler' or i == num_steps - 1:
            x_next = x_hat + h * d_cur
            continue

        # 2nd-order correction with the slope at t_hat + alpha h.
        x_prime = x_hat + alpha * h * d_cur
        t_prime = t_hat + alpha * h
        d_prime = _ode_slope(sched, scale, x_prime, t_prime, denoise(x_prime / s(t_prime), sigma(t_prime)))
        x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next


def choose_sampler(**sampler_kwargs) -> Tuple[Callable, dict]:
    """EDM v1 generate.py's rule: options left at None are dropped; the ablation sampler is used if any of
    solver/discretization/schedule/scaling (or alpha, which only it has) remains, else the EDM sampler.
    Returns (sampler, kwargs)."""
    kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
    sampler = ablation_sampler if any(key in kwargs for key in ABLATION_KEYS) else edm1_sampler
    return sampler, kwargs

