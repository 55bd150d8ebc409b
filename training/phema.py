"""Power-function EMA (EDM2, Karras et al. 2024, Sec. 3) and the math of its
post-hoc reconstruction.

A power-function EMA with exponent gamma weights the training trajectory over
time tau in [0, t] by p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1). Its width is
given by the relative standard deviation sigma_rel of that profile. All profile
math is done in float64 NumPy and broadcasts element-wise.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch

#----------------------------------------------------------------------------
# Conversions between exponent gamma and relative standard deviation sigma_rel.

MAX_STD = 0.289  # exp_to_std(0) ~= 0.2887: the widest power-function profile.


def exp_to_std(exp: Any) -> np.ndarray:
    """sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3)))  (EDM2 paper, Sec. 3)."""
    exp = np.float64(exp)
    return np.sqrt((exp + 1) / (exp + 2) ** 2 / (exp + 3))


def std_to_exp(std: Any) -> np.ndarray:
    """Inverse of exp_to_std: the largest real root of
    g^3 + 7 g^2 + (16 - s) g + (12 - s) = 0 with s = sigma_rel^-2  (EDM2 paper, Sec. 3)."""
    std = np.float64(std)
    s = 1 / std ** 2
    flat = [np.roots([1, 7, 16 - si, 12 - si]).real.max() for si in np.ravel(s)]
    return np.float64(flat).reshape(np.shape(std))


#----------------------------------------------------------------------------
# Profiles, their inner products, and the per-step decay.


def power_function_response(ofs: Any, std: Any, len: int, axis: int = 0) -> np.ndarray:
    """Discrete profile over integer times t = 0..len-1 along `axis`, for a
    snapshot at time `ofs`: r(t) = (t/ofs)^g (g+1)/ofs for t <= ofs else 0,
    normalised to sum 1 along `axis`  (EDM2 paper, Sec. 3). Used for analysis/plots."""
    ofs, std = np.broadcast_arrays(np.float64(ofs), np.float64(std))
    exp = np.expand_dims(std_to_exp(std), axis)
    ofs = np.expand_dims(ofs, axis)
    shape = [1] * ofs.ndim
    shape[axis] = len
    t = np.arange(len, dtype=np.float64).reshape(shape)
    with np.errstate(divide='ignore', invalid='ignore'):
        resp = np.where(t <= ofs, (t / ofs) ** exp, 0) * (exp + 1) / ofs
    return resp / np.sum(resp, axis=axis, keepdims=True)


def power_function_correlation(a_ofs: Any, a_std: Any, b_ofs: Any, b_std: Any) -> np.ndarray:
    """Inner product <p_a, p_b> of two continuous profiles ending at a_ofs, b_ofs:
    (ga+1)(gb+1) r^e / ((ga+gb+1) max(a_ofs, b_ofs)), r = a_ofs/b_ofs,
    e = gb if a_ofs < b_ofs else -ga  (EDM2 paper, Sec. 3)."""
    a_ofs, b_ofs = np.float64(a_ofs), np.float64(b_ofs)
    a_exp, b_exp = std_to_exp(a_std), std_to_exp(b_std)
    ratio = a_ofs / b_ofs
    e = np.where(a_ofs < b_ofs, b_exp, -a_exp)
    num = (a_exp + 1) * (b_exp + 1) * ratio ** e
    den = (a_exp + b_exp + 1) * np.maximum(a_ofs, b_ofs)
    return num / den


def power_function_beta(std: Any, t_next: Any, t_delta: Any) -> np.ndarray:
    """Per-update decay beta = (1 - t_delta / t_next)^(g + 1)  (EDM2 paper, Sec. 3)."""
    return _beta_from_exp(std_to_exp(std), t_next, t_delta)


def _beta_from_exp(exp: Any, t_next: Any, t_delta: Any) -> np.ndarray:
    return (1 - np.float64(t_delta) / np.float64(t_next)) ** (np.float64(exp) + 1)


#----------------------------------------------------------------------------
# Post-hoc reconstruction: least squares in the space of profiles.


def _as_column_and_row(in_ofs, in_std, out_ofs, out_std):
    in_ofs, in_std = np.broadcast_arrays(np.float64(in_ofs), np.float64(in_std))
    out_ofs, out_std = np.broadcast_arrays(np.float64(out_ofs), np.float64(out_std))
    col = lambda x: x.reshape(-1, 1)
    row = lambda x: x.reshape(1, -1)
    return col(in_ofs), col(in_std), row(in_ofs), row(in_std), row(out_ofs), row(out_std)


def solve_posthoc_coefficients(in_ofs: Any, in_std: Any, out_ofs: Any, out_std: Any) -> np.ndarray:
    """Coefficients X [n_in, n_out] with theta_out_k = sum_i X[i,k] theta_in_i  (EDM2 paper, Sec. 3):
    solve A X = B with A[i,j] = <p_in_i, p_in_j>, B[i,k] = <p_in_i, p_out_k>,
    then normalise every column to sum to 1."""
    in_ofs_c, in_std_c, in_ofs_r, in_std_r, out_ofs_r, out_std_r = _as_column_and_row(in_ofs, in_std, out_ofs, out_std)
    A = power_function_correlation(in_ofs_c, in_std_c, in_ofs_r, in_std_r)
    B = power_function_correlation(in_ofs_c, in_std_c, out_ofs_r, out_std_r)
    X = np.linalg.solve(A, B)
    return X / np.sum(X, axis=0, keepdims=True)


def posthoc_fit_error(in_ofs: Any, in_std: Any, out_ofs: Any, out_std: Any, coefs: np.ndarray | None = None) -> np.ndarray:
    """Relative L2 error ||sum_i X[i,k] p_in_i - p_out_k|| / ||p_out_k|| of each
    reconstructed profile (not part of the original toolkit). Expanding the norm:
    err^2 = x^T A x - 2 x^T b + c, with c = <p_out, p_out>. 0 = exact; ~1 = useless."""
    in_ofs_c, in_std_c, in_ofs_r, in_std_r, out_ofs_r, out_std_r = _as_column_and_row(in_ofs, in_std, out_ofs, out_std)
    if coefs is None:
        coefs = solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std)
    A = power_function_correlation(in_ofs_c, in_std_c, in_ofs_r, in_std_r)
    B = power_function_correlation(in_ofs_c, in_std_c, out_ofs_r, out_std_r)
    c = power_function_correlation(out_ofs_r, out_std_r, out_ofs_r, out_std_r)[0]
    sq = np.einsum('ik,ij,jk->k', coefs, A, coefs) - 2 * np.einsum('ik,ik->k', coefs, B) + c
    return np.sqrt(np.maximum(sq, 0) / c)


#----------------------------------------------------------------------------
# EMA trackers used by the training loop.


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in module.parameters()]


def _copy_buffers(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    for b_src, b_dst in zip(src.buffers(), dst.buffers()):
        b_dst.copy_(b_src)


class PowerFunctionEMA:
    """Tracks one power-function EMA of `net` per std. `net` is kept
    by reference; each EMA is a deep copy. Buffers are not averaged but copied
    from `net` by get()."""

    def __init__(self, net: torch.nn.Module, stds: Sequence[float] = (0.050, 0.100)):
        self.net = net
        self.stds = list(stds)
        self.emas = [copy.deepcopy(net) for _std in self.stds]
        self._exps = [float(std_to_exp(std)) for std in self.stds]

    @torch.no_grad()
    def reset(self) -> None:
        """Copy the current parameters of `net` into every EMA."""
        net_params = _params(self.net)
        for ema in self.emas:
            torch._foreach_copy_(_params(ema), net_params)

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        """p_ema <- p_ema + (1 - beta) (p_net - p_ema), beta = power_function_beta(std, cur_nimg, batch_size).
        Call after the image counter was incremented (first call: beta = 0)."""
        net_params = _params(self.net)
        for exp, ema in zip(self._exps, self.emas):
            beta = float(_beta_from_exp(exp, cur_nimg, batch_size))
            torch._foreach_lerp_(_params(ema), net_params, 1 - beta)

    @torch.no_grad()
    def get(self) -> list[tuple[torch.nn.Module, str]]:
        """Copy the buffers of `net` into each EMA; return [(ema, '-0.050'), ...]."""
        for ema in self.emas:
            _copy_buffers(self.net, ema)
        return [(ema, f'-{std:.3f}') for std, ema in zip(self.stds, self.emas)]

    def state_dict(self) -> dict:
        return dict(stds=self.stds, emas=[ema.state_dict() for ema in self.emas])

    def load_state_dict(self, state: dict) -> None:
        """Restore stds and EMA weights. A state tracking a different number of
        stds than this object re-creates the EMA copies to match."""
        self.stds = list(state['stds'])
        self._exps = [float(std_to_exp(std)) for std in self.stds]
        if len(self.emas) != len(self.stds):
            self.emas = [copy.deepcopy(self.net) for _std in self.stds]
        for ema, ema_state in zip(self.emas, state['emas']):
            ema.load_state_dict(ema_state)


class TraditionalEMA:
    """Classic exponential EMA with a half-life in Mimg and an optional ramp-up
    (available but unused by default)."""

    def __init__(self, net: torch.nn.Module, halflife_Mimg: float = float('inf'), rampup_ratio: float | None = 0.09):
        self.net = net
        self.halflife_Mimg = halflife_Mimg
        self.rampup_ratio = rampup_ratio
        self.ema = copy.deepcopy(net)

    @torch.no_grad()
    def reset(self) -> None:
        torch._foreach_copy_(_params(self.ema), _params(self.net))

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        """beta = 0.5^(batch / max(h 1e6, 1e-8)), h = min(halflife, cur_nimg/1e6 * rampup_ratio)."""
        halflife = self.halflife_Mimg
        if self.rampup_ratio is not None:
            halflife = min(halflife, cur_nimg / 1e6 * self.rampup_ratio)
        beta = 0.5 ** (batch_size / max(halflife * 1e6, 1e-8))
        torch._foreach_lerp_(_params(self.ema), _params(self.net), 1 - beta)

    @torch.no_grad()
    def get(self) -> torch.nn.Module:
        _copy_buffers(self.net, self.ema)
        return self.ema

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)


class EDM1EMA(TraditionalEMA):
    """The classic EMA of EDM v1 (Karras et al. 2022, Table 7: half-life 0.5 Mimg, 50 Mimg for ImageNet),
    with EDM v1's ramp-up: the half-life is at most `rampup_ratio` times the images seen *before* the step
    (the loop calls update() after counting the step's batch), so the first update copies the network.
    `rampup_ratio=None` (fine-tuning, EDM v1's --transfer) averages with the full half-life from the start.

    The average is computed as EDM v1 writes it, theta_ema <- lerp(theta_net, theta_ema, beta)."""

    def __init__(self, net: torch.nn.Module, halflife_Mimg: float = 0.5, rampup_ratio: float | None = 0.05):
        super().__init__(net, halflife_Mimg=halflife_Mimg, rampup_ratio=rampup_ratio)

    def beta(self, cur_nimg: int, batch_size: int) -> float:
        """beta = 0.5^(batch / max(h, 1e-8)), h = min(halflife, (cur_nimg - batch) rampup_ratio) in images."""
        halflife_nimg = self.halflife_Mimg * 1e6
        if self.rampup_ratio is not None:
            halflife_nimg = min(halflife_nimg, (cur_nimg - batch_size) * self.rampup_ratio)
        return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        beta = self.beta(cur_nimg, batch_size)
        ema_params = _params(self.ema)
        torch._foreach_copy_(ema_params, torch._foreach_lerp(_params(self.net), ema_params, beta))
