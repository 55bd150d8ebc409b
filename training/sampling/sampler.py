"""The EDM sampler and what it needs: per-seed random numbers, the time-step schedule, the guided
denoiser, and batch-size-independent network evaluation (Karras et al. 2022 (EDM), Alg. 2; guidance:
Karras et al. 2024, autoguidance)."""

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch

#----------------------------------------------------------------------------
# Per-seed random numbers (docs/differences.md#keep-5).


class StackedRandomGenerator:
    """One `torch.Generator` per seed, on the compute device; each draw stacks one
    tensor per generator, so a sample's random numbers depend only on its own seed."""

    def __init__(self, device: Union[str, torch.device], seeds: Sequence[int]):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size: Sequence[int], **kwargs) -> torch.Tensor:
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size: Sequence[int], **kwargs) -> torch.Tensor:
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])

#----------------------------------------------------------------------------
# EDM sampler (Karras et al. 2022 (EDM), Alg. 2).


def edm_time_steps(num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7,
                   dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
    """Noise levels t_0 > ... > t_{N-1}, followed by t_N = 0 (Karras et al. 2022 (EDM), eq. 5):
    t_i = (sigma_max^(1/rho) + i/(N-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

    Deviation (docs/differences.md#sample-2): for N = 1 the original divides by zero; here the single step
    starts at sigma_max.
    """
    step_indices = torch.arange(num_steps, dtype=dtype, device=device)
    max_inv_rho = sigma_max ** (1 / rho)
    min_inv_rho = sigma_min ** (1 / rho)
    t_steps = (max_inv_rho + step_indices / max(num_steps - 1, 1) * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


def _guided_denoiser(net: Callable, gnet: Optional[Callable], labels: Optional[torch.Tensor], guidance: float,
                     guidance_interval: Optional[tuple], guide_labels: bool, dtype: torch.dtype) -> Callable:
    """Guided denoiser D(x, t) (Karras et al. 2024, autoguidance): D_m if no guidance at t, else
    lerp(D_g, D_m, w) = D_g + w (D_m - D_g)."""
    gnet = net if gnet is None else gnet

    def guidance_active(t: torch.Tensor) -> bool:
        if guidance == 1:
            return False
        return guidance_interval is None or guidance_interval[0] <= float(t) <= guidance_interval[1]

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        D_main = net(x, t, labels).to(dtype)
        if not guidance_active(t):
            return D_main
        D_guide = (gnet(x, t, labels) if guide_labels else gnet(x, t)).to(dtype)
        return D_guide.lerp(D_main, guidance)

    return denoise


def heun_solve(denoise: Callable, x: torch.Tensor, t_steps: torch.Tensor, second_order: bool = True,
               S_churn: float = 0, S_min: float = 0, S_max: float = float('inf'), S_noise: float = 1,
               randn_like: Callable = torch.randn_like) -> torch.Tensor:
    """Integrate dx/dsigma = (x - D(x, sigma)) / sigma from x at t_steps[0] through t_steps[1:]
    (Karras et al. 2022, Alg. 2): Heun's 2nd-order method, its correction skipped on the last step;
    Euler's method with `second_order=False`. Churn raises the noise level before each step where
    S_min <= t_i <= S_max, drawing fresh noise with `randn_like` there only."""
    num_steps = len(t_steps) - 1
    x_next = x
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level to t_hat = t_i (1 + gamma) with fresh noise.
        if S_churn > 0 and S_min <= t_cur <= S_max:
            gamma = min(S_churn / num_steps, math.sqrt(2) - 1)
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        else:
            t_hat = t_cur
            x_hat = x_cur

        # Euler step: d = (x_hat - D(x_hat, t_hat)) / t_hat.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun correction, all steps but the last: average the slopes at both ends.
        if second_order and i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def edm_sampler(net: Callable, noise: torch.Tensor, labels: Optional[torch.Tensor] = None,
                gnet: Optional[Callable] = None, num_steps: int = 32, sigma_min: float = 0.002,
                sigma_max: float = 80, rho: float = 7, guidance: float = 1, S_churn: float = 0, S_min: float = 0,
                S_max: float = float('inf'), S_noise: float = 1, dtype: torch.dtype = torch.float32,
                randn_like: Callable = torch.randn_like, guidance_interval: Optional[tuple] = None,
                guide_labels: bool = True) -> torch.Tensor:
    """EDM 2nd-order Heun sampler with optional churn and guidance (Karras et al. 2022 (EDM), Alg. 2).

    Extensions (defaults reproduce the official sampler bit for bit):
      guidance_interval -- (lo, hi): guide only where lo <= sigma <= hi, else use D_m alone.
      guide_labels      -- False calls the guide without labels (the fork's sampler, docs/differences.md#sample-1).
    Returns the final latents x_N in `dtype`. `training.sampling.solvers.sample` adds other solvers
    and time steps.
    """
    denoise = _guided_denoiser(net, gnet, labels, guidance, guidance_interval, guide_labels, dtype)
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    x = noise.to(dtype) * t_steps[0]  # x_0 = noise * t_0
    return heun_solve(denoise, x, t_steps, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise,
                      randn_like=randn_like)

#----------------------------------------------------------------------------
# Batch-size-independent network evaluation (extension).


class FixedBatchNet:
    """Call `net` on groups of exactly `size` images, padding the last group by repeating
    its last image, and return the outputs of the real images only.

    CPU (oneDNN/MKL) and CUDA libraries pick convolution and matrix kernels by batch size,
    so one image can round differently in batches of different sizes (observed: 1-ulp
    differences that flip a few uint8 pixels). An image's result does not depend on its
    position or its neighbours in a batch of a given size, so with fixed-size groups an
    image no longer depends on --batch or on the number of processes, bit for bit.
    """

    def __init__(self, net: Callable, size: int):
        if size < 1:
            raise ValueError(f'network batch size must be >= 1, got {size}')
        self.net = net
        self.size = size

    def _group(self, value: Optional[torch.Tensor], start: int, num: int) -> Optional[torch.Tensor]:
        """Rows start...start+num-1 of a per-image tensor, padded to `size` rows; others pass through."""
        if value is None or value.ndim == 0 or value.shape[0] != num:
            return value
        group = value[start:start + self.size]
        pad = self.size - group.shape[0]
        return torch.cat([group, group[-1:].expand(pad, *group.shape[1:])]) if pad else group

    def __call__(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor] = None, **kwargs):
        num = x.shape[0]
        outputs = []
        for start in range(0, num, self.size):
            group = [self._group(v, start, num) for v in (x, sigma, class_labels)]
            outputs.append(self.net(*group, **kwargs)[:min(self.size, num - start)])
        return torch.cat(outputs)
