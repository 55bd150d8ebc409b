"""2D toy example of autoguidance (Karras et al. 2024, autoguidance, 2D toy
example): the fractal two-class ground truth, the small magnitude-preserving MLP
that models its log-density, exact score-matching training, the deterministic
sampler with classifier-free guidance / autoguidance, the 8-panel figure, and
measured sample statistics."""

from __future__ import annotations

import copy
import functools
import math
import os
import warnings

import numpy as np
import torch

from torch_utils import misc
from torch_utils import persistence

#----------------------------------------------------------------------------
# Ground truth: Gaussian mixture and its heat-diffused density.

class GaussianMixture(torch.nn.Module):
    """Mixture of 2D Gaussians; evaluated at noise level sigma by replacing
    each covariance Sigma_k with Sigma_k + sigma^2 I."""

    def __init__(self, phi, mu, Sigma, sample_lut_size: int = 64 << 10):
        super().__init__()
        phi = np.asarray(phi, dtype=np.float64)
        phi = phi / phi.sum()
        L, Q = np.linalg.eigh(np.asarray(Sigma, dtype=np.float64))
        self.register_buffer('phi', torch.tensor(phi, dtype=torch.float32))
        self.register_buffer('mu', torch.tensor(np.asarray(mu), dtype=torch.float32))
        self.register_buffer('Sigma', torch.tensor(np.asarray(Sigma), dtype=torch.float32))
        self.register_buffer('_L', torch.tensor(L, dtype=torch.float32))
        self.register_buffer('_Q', torch.tensor(Q, dtype=torch.float32))
        self.register_buffer('_sample_lut', self._build_lut(phi, sample_lut_size))

    @staticmethod
    def _build_lut(phi: np.ndarray, size: int) -> torch.Tensor:
        # Component k owns entries [int(c_{k-1} * size + 0.5), int(c_k * size + 0.5)).
        ends = (np.cumsum(phi) * size + 0.5).astype(np.int64)
        counts = np.diff(np.concatenate([[0], ends]))
        return torch.tensor(np.repeat(np.arange(len(phi)), counts), dtype=torch.int64)

    def _eigen_terms(self, x: torch.Tensor, sigma: torch.Tensor):
        """Per (point, component): log w_k (evaluated in the log domain)
        and z_k = (Sigma_k + sigma^2 I)^-1 (mu_k - x) in the eigenbasis of Sigma_k.
        The eigen-coordinates j = 0, 1 are kept as two contiguous [N, K] planes."""
        K = self.mu.shape[0]
        Q = self._Q.permute(1, 2, 0).reshape(2, 2 * K)                  # [i, (j, k)] = Q[k, i, j]
        mu_eig = torch.einsum('kij,ki->jk', self._Q, self.mu).reshape(1, 2 * K)
        u = mu_eig - x @ Q                                              # Q_k^T (mu_k - x), [N, 2K]
        inv_var = torch.add(self._L.T.reshape(1, 2 * K), sigma.square()[:, None]).reciprocal_()
        z_eig = u * inv_var
        u0, u1 = u.view(-1, 2, K).unbind(1)
        z0, z1 = z_eig.view(-1, 2, K).unbind(1)
        iv0, iv1 = inv_var.view(-1, 2, K).unbind(1)
        quad = torch.addcmul(u0 * z0, u1, z1)                           # (mu - x)^T z
        log_det = (iv0 * iv1).log_()                                    # -log det(Sigma_k + sigma^2 I)
        logw = (log_det - quad).mul_(0.5).add_(self.phi.log() - math.log(2 * math.pi))
        return logw, z_eig, Q

    def _chunks(self, x, sigma, max_batch_size):
        shape = x.shape[:-1]
        x = x.reshape(-1, 2).to(self.mu.dtype)
        sigma = torch.as_tensor(sigma, dtype=self.mu.dtype, device=x.device).broadcast_to(shape).reshape(-1)
        for begin in range(0, x.shape[0], max_batch_size):
            yield x[begin : begin + max_batch_size], sigma[begin : begin + max_batch_size]

    def logp(self, x: torch.Tensor, sigma=0, max_batch_size: int = 512) -> torch.Tensor:
        """log p(x; sigma) = logsumexp_k log w_k."""
        out = [torch.logsumexp(self._eigen_terms(xc, sc)[0], dim=-1) for xc, sc in self._chunks(x, sigma, max_batch_size)]
        return torch.cat(out).reshape(x.shape[:-1])

    def pdf(self, x: torch.Tensor, sigma=0, max_batch_size: int = 512) -> torch.Tensor:
        """p(x; sigma) = sum_k w_k."""
        return self.logp(x, sigma, max_batch_size).exp()

    def score(self, x: torch.Tensor, sigma=0, max_batch_size: int = 512) -> torch.Tensor:
        """grad_x log p(x; sigma) = sum_k w_k z_k / sum_k w_k."""
        out = []
        for xc, sc in self._chunks(x, sigma, max_batch_size):
            logw, z_eig, Q = self._eigen_terms(xc, sc)
            resp = torch.softmax(logw, dim=-1)                          # w_k / sum_k w_k
            out.append((z_eig.view(-1, 2, resp.shape[1]) * resp[:, None, :]).view(xc.shape[0], -1) @ Q.T)
        return torch.cat(out).reshape(x.shape)

    def responsibilities_argmax(self, x: torch.Tensor, max_batch_size: int = 512) -> torch.Tensor:
        """Index of the component with the largest posterior weight at sigma = 0."""
        out = [self._eigen_terms(xc, sc)[0].argmax(-1) for xc, sc in self._chunks(x, 0, max_batch_size)]
        return torch.cat(out).reshape(x.shape[:-1]) if out else torch.zeros(x.shape[:-1], dtype=torch.int64, device=x.device)

    def sample(self, shape, sigma=0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x ~ p(x; sigma): mu_i + Q_i diag(sqrt(L_i + sigma^2)) Q_i^T eps."""
        shape = torch.Size([shape]) if isinstance(shape, int) else torch.Size(shape)
        device = self.mu.device
        idx = torch.randint(len(self._sample_lut), shape, generator=generator, device=device)
        idx = self._sample_lut[idx]
        eps = torch.randn(shape + (2,), generator=generator, device=device).to(self.mu.dtype)
        sigma = torch.as_tensor(sigma, dtype=self.mu.dtype, device=device)
        L = self._L[idx] + sigma[..., None].square()
        Q = self._Q[idx]
        eps_eig = (Q * eps[..., :, None]).sum(-2) * L.sqrt()            # diag(sqrt(L')) Q^T eps
        return self.mu[idx] + (Q * eps_eig[..., None, :]).sum(-1)


#----------------------------------------------------------------------------
# Ground truth construction.

COMPONENTS_PER_BRANCH = 8
MAX_DEPTH = 7
BRANCHES_PER_CLASS = 2 ** MAX_DEPTH - 1

def _tree_components(rnd, cls, origin, scale):
    """All components (cls, phi, mu, Sigma) of one class tree, depth first."""
    comps = []
    def branch(depth, pos, angle):
        if depth >= MAX_DEPTH:
            return
        direction = np.array([np.cos(angle), np.sin(angle)])
        dist = 0.292 * (0.8 ** depth) * (rnd.randn() * 0.2 + 1)
        thick = 0.2 * (0.8 ** depth) / dist
        size = scale * dist * 0.06
        outer = np.outer(direction, direction)
        Sigma = (outer + (np.eye(2) - outer) * (thick ** 2)) * np.outer(size, size)
        for t in np.linspace(0.07, 0.93, num=COMPONENTS_PER_BRANCH):
            comps.append((cls, dist * (0.5 ** depth), (pos + direction * dist * t) * scale, Sigma))
        for sign in (1, -1):
            child_angle = angle + sign * (0.7 ** depth) * (rnd.randn() * 0.2 + 1)
            branch(depth + 1, pos + direction * dist, child_angle)
    branch(0, np.asarray(origin, dtype=np.float64), np.pi * (1 if cls == 'A' else 5) / 4)
    return comps

@functools.lru_cache(None)
def gt(classes: str = 'A', device=torch.device('cpu'), seed: int = 2,
       origin=(0.0030, 0.0325), scale=(1.3136, 1.3844)) -> GaussianMixture:
    """Ground-truth mixture of the given classes ('A', 'B' or 'AB'), memoised."""
    rnd = np.random.RandomState(seed)
    scale = np.asarray(scale, dtype=np.float64)
    comps = _tree_components(rnd, 'A', origin, scale) + _tree_components(rnd, 'B', origin, scale)
    comps = [c for c in comps if c[0] in classes]
    if not comps:
        raise ValueError(f'gt(): classes must contain "A" and/or "B", got {classes!r}')
    _, phi, mu, Sigma = zip(*comps)
    return GaussianMixture(phi, mu, Sigma).to(device)

#----------------------------------------------------------------------------
# Model: magnitude-preserving MLP that outputs an unnormalised
# log-density; its gradient w.r.t. x is the score.

def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ||x|| / sqrt(M)) over `dim` (default: all but the first)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)

@persistence.persistent_class
class MPSiLU(torch.nn.Module):
    """Magnitude-preserving SiLU: silu(x) / 0.596."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x) / 0.596

@persistence.persistent_class
class MPLinear(torch.nn.Module):
    """Bias-free linear layer with forced weight normalisation (EDM2 paper eqs. 47, 66)."""
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_dim, in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight))
        w = normalize(self.weight) / math.sqrt(self.weight.shape[1])
        return x @ w.to(x.dtype).T

@persistence.persistent_class
class ToyModel(torch.nn.Module):
    """G(x; sigma) = mean(y^2) * gain / sigma - ||x*||^2 / 2 with
    y = MLP([x*, ln(sigma) / 4, 1]) and x* = x / sqrt(sigma_data^2 + sigma^2)."""

    def __init__(self, in_dim: int = 2, num_layers: int = 4, hidden_dim: int = 64, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.layers = torch.nn.Sequential()
        self.layers.append(MPLinear(in_dim + 2, hidden_dim))
        for _ in range(num_layers):
            self.layers.append(MPSiLU())
            self.layers.append(MPLinear(hidden_dim, hidden_dim))
        self.gain = torch.nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor, sigma=0) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).broadcast_to(x.shape[:-1])[..., None]
        x = x / (self.sigma_data ** 2 + sigma.square()).sqrt()
        y = self.layers(torch.cat([x, sigma.log() / 4, torch.ones_like(sigma)], dim=-1))
        return y.square().mean(-1) * self.gain / sigma[..., 0] - 0.5 * x.square().sum(-1)

    def logp(self, x: torch.Tensor, sigma=0) -> torch.Tensor:
        return self(x, sigma)

    def pdf(self, x: torch.Tensor, sigma=0) -> torch.Tensor:
        logp = self.logp(x, sigma)
        return (logp - logp.max()).exp()

    def score(self, x: torch.Tensor, sigma=0, graph: bool = False) -> torch.Tensor:
        """grad_x sum(logp); with `graph` the result stays differentiable."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            return torch.autograd.grad(self.logp(x, sigma).sum(), [x], create_graph=graph)[0]

#----------------------------------------------------------------------------
# Training: exact score matching against the ground truth.

def learning_rate(i: int, lr_ref: float, lr_iter: int) -> float:
    """lr = lr_ref / sqrt(max(i / lr_iter, 1))."""
    return lr_ref / math.sqrt(max(i / lr_iter, 1))

def score_matching_loss(net: ToyModel, gt_model: GaussianMixture, batch_size: int,
                        P_mean: float = -2.3, P_std: float = 1.5) -> torch.Tensor:
    """mean_batch( sigma^2 * mean_dims( (score_gt - score_net)^2 ) ), sigma ~ LogNormal(P_mean, P_std)."""
    device = gt_model.mu.device
    sigma = (torch.randn(batch_size, device=device) * P_std + P_mean).exp()
    x = gt_model.sample(batch_size, sigma)
    score_gt = gt_model.score(x, sigma)
    score_net = net.score(x, sigma, graph=True)
    return (sigma.square() * (score_gt - score_net).square().mean(-1)).mean()

def ema_betas(ema_std: float, total_iter: int) -> list[float]:
    """Power-function EMA decay per iteration: power_function_beta(std, t_next=i+1, t_delta=1)."""
    from training.phema import power_function_beta
    return np.asarray(power_function_beta(std=ema_std, t_next=np.arange(1, total_iter + 1), t_delta=1)).tolist()

def save_snapshot(ema: ToyModel, path: str) -> None:
    """Pickle a CPU copy of the EMA model itself (not a dict), atomically."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    persistence.save_pickle(copy.deepcopy(ema).cpu(), path)

def keep_freed_memory(pad_bytes: int = 1 << 30) -> bool:
    """Ask glibc to keep freed memory in the process instead of returning it to
    the OS after every large tensor (perf-notes: page faults dominated the toy
    trainer). Process-wide and harmless elsewhere; returns False off glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, min(pad_bytes, 1 << 25)) == 1   # glibc caps this at 32 MiB
        ok &= libc.mallopt(M_TRIM_THRESHOLD, pad_bytes) == 1
        ok &= libc.mallopt(M_TOP_PAD, 1 << 26) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False

def do_train(classes: str = 'A', num_layers: int = 4, hidden_dim: int = 64, batch_size: int = 4096,
             total_iter: int = 4096, seed: int = 0, P_mean: float = -2.3, P_std: float = 1.5,
             sigma_data: float = 0.5, lr_ref: float = 1e-2, lr_iter: int = 512, ema_std: float = 0.010,
             pkl_pattern: str | None = None, pkl_iter: int = 256, viz_iter: int | None = 32,
             device=None, progress: bool = True) -> ToyModel:
    """Train a ToyModel on gt(classes); returns the EMA model (eval mode, CPU copy)."""
    from tqdm import tqdm
    device = torch.device(device) if device is not None else misc.default_device()
    keep_freed_memory()
    torch.manual_seed(seed)
    gt_model = gt(classes, device)
    net = ToyModel(num_layers=num_layers, hidden_dim=hidden_dim, sigma_data=sigma_data).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), betas=(0.9, 0.99), foreach=True)
    net_params, ema_params = list(net.parameters()), list(ema.parameters())
    betas = ema_betas(ema_std, total_iter)
    viz = TrainingViz(classes, device) if viz_iter else None
    bar = tqdm(range(total_iter), desc=f'Training cls{classes} dim{hidden_dim}', disable=not progress, mininterval=1)
    for i in bar:
        for group in opt.param_groups:
            group['lr'] = learning_rate(i, lr_ref, lr_iter)
        opt.zero_grad(set_to_none=True)
        loss = score_matching_loss(net, gt_model, batch_size, P_mean, P_std)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, net_params, 1 - betas[i])   # p_ema += (1 - beta)(p_net - p_ema)
        if i % 64 == 0:
            bar.set_postfix(loss=f'{loss.item():.4f}', refresh=False)
        # Also keep the final model when --iters is not a multiple of pkl_iter (4096 = 16 x 256 is unaffected).
        if pkl_pattern is not None and ((i + 1) % pkl_iter == 0 or i + 1 == total_iter):
            save_snapshot(ema, pkl_pattern % (i + 1))
        if viz is not None and (i + 1) % viz_iter == 0:
            viz.update(ema)
    return copy.deepcopy(ema).cpu()

class TrainingViz:
    """Interactive window showing the ground-truth outline and the EMA model's samples."""

    def __init__(self, classes: str, device):
        import matplotlib
        import matplotlib.pyplot as plt
        self.plt = plt
        self.enabled = matplotlib.get_backend().lower() not in ('agg', 'pdf', 'svg', 'ps', 'cairo', 'template')
        if not self.enabled:
            warnings.warn('No interactive matplotlib display; training visualisation disabled (use --viz=False).')
            return
        self.device = device
        self.fig = plt.figure(figsize=[12, 12], dpi=75)
        self.fig.canvas.toolbar_visible = False
        self.ax = self.fig.add_axes([0, 0, 1, 1])
        do_plot(elems={'gt_uncond', 'gt_outline'}, device=device, ax=self.ax, **VIEW_A)
        self.dots = None

    def update(self, ema: ToyModel) -> None:
        if not self.enabled:
            return
        if self.dots is not None:
            self.dots.remove()
        samples = sample_from_model(ema, num_samples=2048, seed=1, device=self.device)
        self.dots = self.ax.scatter(*samples.cpu().numpy().T, s=15, c='black', alpha=0.25, edgecolors='none')
        self.plt.pause(0.001)

#----------------------------------------------------------------------------
# Sampling: deterministic Heun sampler with EDM time steps.

def guided_denoiser(net, gnet=None, guidance: float = 1):
    """D(x; sigma) = x + sigma^2 * score, score = score_g + w (score_net - score_g) with a guide."""
    def denoise(x, sigma):
        score = net.score(x, sigma)
        if gnet is not None:
            score_g = gnet.score(x, sigma)
            score = score_g + guidance * (score - score_g)
        return x + sigma ** 2 * score
    return denoise

def do_sample(net, x_init: torch.Tensor, guidance: float = 1, gnet=None, num_steps: int = 32,
              sigma_min: float = 0.002, sigma_max: float = 5, rho: float = 7) -> torch.Tensor:
    """Integrate the probability-flow ODE from x_init (at sigma_max); returns the
    trajectory [num_steps + 1, ..., 2]. `net`/`gnet` are ToyModels or GaussianMixtures."""
    from training.sampling.sampler import edm_time_steps   # not at module level: the pickled source must load in the official tools
    denoise = guided_denoiser(net, gnet, guidance)
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, device=x_init.device)
    x = x_init.to(torch.float32)
    trajectory = [x]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        d_cur = (x - denoise(x, t_cur)) / t_cur                       # Euler step
        x_next = x + (t_next - t_cur) * d_cur
        if i < num_steps - 1:                                          # Heun correction
            d_next = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (d_cur + d_next) / 2
        x = x_next.detach()
        trajectory.append(x)
    return torch.stack(trajectory)

def initial_points(num_samples: int, sigma_max: float, seed: int, sample_distance: float = 0, device=None) -> torch.Tensor:
    """gt('A') diffused to sigma_max, drawn with a generator seeded `seed`; optionally thinned
    greedily so that kept points are at least `sample_distance` apart."""
    device = torch.device(device) if device is not None else misc.default_device()
    generator = torch.Generator(device).manual_seed(seed)
    x = gt('A', device).sample(num_samples, sigma_max, generator=generator)
    if sample_distance <= 0:
        return x
    keep = []
    for point in x:
        if not keep or (torch.stack(keep) - point).norm(dim=-1).min() >= sample_distance:
            keep.append(point)
    return torch.stack(keep)

def sample_from_model(net=None, gnet=None, guidance: float = 1, num_samples: int = 8192, seed: int = 1,
                      sigma_max: float = 5, device=None) -> torch.Tensor:
    """Final samples of do_sample (ground truth gt('A') as the model when net is None)."""
    device = torch.device(device) if device is not None else misc.default_device()
    x_init = initial_points(num_samples, sigma_max, seed, device=device)
    net = gt('A', device) if net is None else net
    return do_sample(net, x_init, guidance=guidance, gnet=gnet, sigma_max=sigma_max)[-1]

#----------------------------------------------------------------------------
# Measured figures (beyond the original): how well samples match class A.

SUPPORT_LEVEL = 2.12     # the figure's outline: -sqrt(max log p - log p) >= -2.12

@functools.lru_cache(None)
def support_threshold(device=torch.device('cpu')) -> float:
    """log p_A above which a point lies inside the drawn class-A outline; the
    maximum of log p_A is approximated by its value at the component means."""
    gt_model = gt('A', device)
    return gt_model.logp(gt_model.mu).max().item() - SUPPORT_LEVEL ** 2

def branch_depths() -> np.ndarray:
    """Depth (0 = trunk, 6 = tip) of each branch of one class tree, in component order (depth first)."""
    depths = []
    def visit(depth):
        if depth < MAX_DEPTH:
            depths.append(depth)
            visit(depth + 1)
            visit(depth + 1)
    visit(0)
    return np.array(depths)

FAR_OFF_LOGP = -50 # a sample below this ground-truth log-density is far off the tree (it dominates the mean)
LOGP_FLOOR = -10    # mean_logp_floored clamps log p_A here, so that a few far-off samples cannot decide it
COVERED_SHARE = 0.1 # a branch is covered when it gets, inside the outline, this fraction of its ground-truth share

def branch_shares() -> np.ndarray:
    """Ground-truth share of each class-A branch: the summed mixture weight of its components (sums to 1)."""
    return gt('A').phi.double().cpu().numpy().reshape(BRANCHES_PER_CLASS, COMPONENTS_PER_BRANCH).sum(1)

def branch_counts(samples: torch.Tensor) -> np.ndarray:
    """Number of samples on each class-A branch: each sample goes to the branch of its most
    responsible component."""
    branch = gt('A', samples.device).responsibilities_argmax(samples) // COMPONENTS_PER_BRANCH
    return np.bincount(branch.cpu().numpy(), minlength=BRANCHES_PER_CLASS)

def covered_branches(counts: np.ndarray, num_samples: int, min_share: float = COVERED_SHARE) -> np.ndarray:
    """Branches that receive, inside the outline (`counts`), at least `min_share` of their ground-truth
    share of all `num_samples` samples. (Of the readings of this rule, measuring the share against all
    samples rather than those inside the outline is the one that reproduces the original toy code's
    figures; docs/toy-results.md.)"""
    return np.flatnonzero(counts >= min_share * branch_shares() * num_samples)

def sample_stats(samples: torch.Tensor) -> dict:
    """Mean ground-truth log-density of the samples (also with log p_A floored at LOGP_FLOOR),
    fraction inside the class-A outline, fraction far off the tree (log p < FAR_OFF_LOGP: a few
    such samples decide the mean), and how many of the 127 class-A branches (and of their 64
    tips) receive a sample inside the outline ("hit") or, inside it, at least COVERED_SHARE of
    their ground-truth share of the samples ("covered")."""
    gt_model = gt('A', samples.device)
    logp = gt_model.logp(samples)
    far_off = (logp < FAR_OFF_LOGP).float().mean().item()
    inside = logp >= support_threshold(samples.device)
    counts = branch_counts(samples[inside])
    hit, covered = np.flatnonzero(counts), covered_branches(counts, len(samples))
    is_tip = branch_depths() == MAX_DEPTH - 1
    return dict(mean_logp=logp.mean().item(), median_logp=logp.median().item(), far_off=far_off,
                mean_logp_floored=logp.clamp(min=LOGP_FLOOR).mean().item(),
                in_support=inside.float().mean().item(), branches=len(hit), num_branches=BRANCHES_PER_CLASS,
                tips=int(is_tip[hit].sum()), num_tips=int(is_tip.sum()),
                branches_covered=len(covered), tips_covered=int(is_tip[covered].sum()))

def format_stats_table(rows: list[tuple[str, dict]]) -> str:
    """Plain-text table, one row per (label, sample_stats(...))."""
    lines = [f'{"samples":<36} {"mean logp":>10} {"median logp":>12} {"in A-support":>13} {"far off":>8} '
             f'{"branches hit":>13} {"tips hit":>9}']
    for label, s in rows:
        lines.append(f'{label:<36} {s["mean_logp"]:10.3f} {s["median_logp"]:12.3f} {s["in_support"] * 100:12.2f}% '
                     f'{s["far_off"] * 100:7.2f}% {s["branches"]:>7d} / {s["num_branches"]} {s["tips"]:>4d} / {s["num_tips"]}')
    return '\n'.join(lines)

#----------------------------------------------------------------------------
# Plotting.

VIEW_A = dict(view_x=0.30, view_y=0.30, view_size=1.2, num_samples=1 << 14)
VIEW_B = dict(view_x=0.45, view_y=1.22, view_size=0.3, num_samples=4096, sample_distance=0.045, sigma_max=0.03)

def _grid(view_x, view_y, view_size, resolution, device):
    xs = torch.linspace(view_x - view_size, view_x + view_size, resolution, device=device)
    ys = torch.linspace(view_y - view_size, view_y + view_size, resolution, device=device)
    gx, gy = torch.meshgrid(xs, ys, indexing='xy')
    return gx, gy, torch.stack([gx, gy], dim=-1)

def _contours(ax, gx, gy, values, levels, linewidths=2.5, fill=None, lines=None, cmap=None, line_alpha=1.0, fill_alpha=1.0):
    """Filled contours plus contour lines of -sqrt(max(values) - values)."""
    values = -(values.max() - values).clamp(min=0).sqrt()
    gx, gy, values = (t.cpu().numpy() for t in (gx, gy, values))
    ax.contourf(gx, gy, values, levels=levels, colors=fill, cmap=cmap, alpha=fill_alpha, antialiased=True, extend='max')
    ax.contour(gx, gy, values, levels=levels, colors=lines, cmap=None if lines is not None else cmap,
               alpha=line_alpha, linewidths=linewidths)

def _levels(lo, hi, count):
    """`count` evenly spaced levels in [lo, hi] without the end points."""
    return np.linspace(lo, hi, count + 2)[1:-1]

def _draw_densities(ax, elems, net, gnet, grid, sigma_max, device):
    gx, gy, points = grid
    with torch.no_grad():
        if 'p_net' in elems:
            _contours(ax, gx, gy, net.logp(points, sigma_max), _levels(-2.5, 2.5, 20), cmap='Greens', line_alpha=0.2)
        if 'p_gnet' in elems:
            _contours(ax, gx, gy, gnet.logp(points, sigma_max), _levels(-2.5, 3.5, 20), cmap='Reds', line_alpha=0.2)
        if 'p_ratio' in elems:
            ratio = net.logp(points, sigma_max) - gnet.logp(points, sigma_max)
            _contours(ax, gx, gy, ratio, _levels(-2.2, 1.0, 20), cmap='Blues', line_alpha=0.2)
        if 'gt_uncond' in elems:
            _contours(ax, gx, gy, gt('AB', device).logp(points), [-2.12, 0], linewidths=1.5, fill=[[0.9] * 3], lines=[[0.7] * 3])
        if 'gt_outline' in elems:
            _contours(ax, gx, gy, gt('A', device).logp(points), [-2.12, 0], linewidths=1.5, fill=[(1.0, 0.8, 0.6)], lines=[(0.8, 0.6, 0.5)])
        if 'gt_smax' in elems:
            _contours(ax, gx, gy, gt('A', device).logp(points, sigma_max), [-1.41, 0], fill=['C1'], lines=['C1'], fill_alpha=0.2, line_alpha=0.2)
        if 'gt_shaded' in elems:
            _contours(ax, gx, gy, gt('A', device).logp(points), _levels(-2.5, 3.07, 15), cmap='Oranges', line_alpha=0.2)

def _draw_points(ax, elems, net, gnet, x_init, trajectory, sigma_max, arrow_len):
    from matplotlib.collections import LineCollection
    if 'trajectories' in elems:
        segments = trajectory.transpose(0, 1).cpu().numpy()
        ax.add_collection(LineCollection(segments, colors='C0', linewidths=5, capstyle='butt', alpha=0.3))
    arrows = {'scores_net': (lambda: net.score(x_init, sigma_max), 'C2'),
              'scores_gnet': (lambda: gnet.score(x_init, sigma_max), 'C3'),
              'scores_ratio': (lambda: net.score(x_init, sigma_max) - gnet.score(x_init, sigma_max), 'C0')}
    for name, (score_fn, color) in arrows.items():
        if name in elems:
            x, v = x_init.cpu().numpy(), score_fn().cpu().numpy() * arrow_len
            ax.quiver(x[:, 0], x[:, 1], v[:, 0], v[:, 1], angles='xy', scale_units='xy', scale=1, color=color)
    for name, points, size, alpha in [('samples', trajectory, 15, 0.25), ('samples_before', x_init, 30, 1.0),
                                      ('samples_after', trajectory, 30, 1.0)]:
        if name in elems and points is not None:
            points = points[-1] if points.ndim == 3 else points
            ax.scatter(*points.cpu().numpy().T, s=size, c='black', alpha=alpha, edgecolors='none')

def do_plot(net=None, guidance: float = 1, gnet=None, elems=('gt_uncond', 'gt_outline', 'samples'),
            view_x: float = 0, view_y: float = 0, view_size: float = 1.6, grid_resolution: int = 400,
            arrow_len: float = 0.002, num_samples: int = 8192, seed: int = 1, sample_distance: float = 0,
            sigma_max: float = 5, device=None, ax=None) -> torch.Tensor | None:
    """Draw the requested elements on `ax` (default: current axes).
    Returns the final sample positions when samples/trajectories were drawn."""
    import matplotlib.pyplot as plt
    ax = plt.gca() if ax is None else ax
    device = torch.device(device) if device is not None else misc.default_device()
    elems = set(elems)
    x_init = trajectory = None
    if any(e.startswith(('samples', 'trajectories', 'scores')) for e in elems):
        x_init = initial_points(num_samples, sigma_max, seed, sample_distance, device)
    if any(e.startswith(('samples', 'trajectories')) for e in elems):
        model = gt('A', device) if net is None else net
        trajectory = do_sample(model, x_init, guidance=guidance, gnet=gnet, sigma_max=sigma_max)
    grid = _grid(view_x, view_y, view_size, grid_resolution, device)
    _draw_densities(ax, elems, net, gnet, grid, sigma_max, device)
    _draw_points(ax, elems, net, gnet, x_init, trajectory, sigma_max, arrow_len)
    ax.set_xlim(view_x - view_size, view_x + view_size)
    ax.set_ylim(view_y - view_size, view_y + view_size)
    ax.set_aspect('equal')
    ax.set_axis_off()
    return None if trajectory is None else trajectory[-1]

def figure_panels() -> list[tuple[str, str, set, dict]]:
    """(title, models, elems, view) of the 8 panels."""
    dist = {'gt_uncond', 'gt_outline', 'samples'}
    return [
        ('Ground truth distribution', 'gt', dist, VIEW_A),
        ('Sample distribution without guidance', 'net', dist, VIEW_A),
        ('Sample distribution with guidance', 'net+gnet', dist, VIEW_A),
        ('Trajectories without guidance', 'net', {'gt_shaded', 'trajectories', 'samples_after'}, VIEW_B),
        ('PDF of main model', 'net', {'p_net', 'gt_smax', 'scores_net', 'samples_before'}, VIEW_B),
        ('PDF of guiding model', 'gnet', {'p_gnet', 'gt_smax', 'scores_gnet', 'samples_before'}, VIEW_B),
        ('PDF ratio (main / guiding)', 'net,gnet', {'p_ratio', 'gt_smax', 'scores_ratio', 'samples_before'}, VIEW_B),
        ('Trajectories with guidance', 'net+gnet', {'gt_shaded', 'trajectories', 'samples_after'}, VIEW_B),
    ]

def _panel_models(which: str, net, gnet, guidance: float) -> dict:
    """do_plot model arguments: 'gt' samples the ground truth, 'net+gnet' is guided sampling."""
    return {'gt': dict(net=None), 'net': dict(net=net), 'gnet': dict(gnet=gnet), 'net,gnet': dict(net=net, gnet=gnet),
            'net+gnet': dict(net=net, gnet=gnet, guidance=guidance)}[which]

def plot_figure(net, gnet, guidance: float = 3, device=None, grid_resolution: int = 400,
                samples_scale: float = 1.0, progress: bool = True):
    """The 2x4 figure of `toy_example.py plot`. Returns (figure, [(panel title, sample_stats)])
    with statistics for the panels that sample the whole tree (view A)."""
    import matplotlib.pyplot as plt
    from tqdm import tqdm
    stats = []
    with plt.rc_context({'font.size': 28}):
        fig, axes = plt.subplots(2, 4, figsize=[48, 25], dpi=40)
        for ax, (title, which, elems, view) in tqdm(list(zip(axes.flat, figure_panels())), desc='Panels', disable=not progress):
            num_samples = max(int(view['num_samples'] * samples_scale), 1)
            samples = do_plot(**_panel_models(which, net, gnet, guidance), elems=elems, grid_resolution=grid_resolution,
                              device=device, ax=ax, **dict(view, num_samples=num_samples))
            ax.set_title(title)
            if view is VIEW_A and samples is not None:
                stats.append((title, sample_stats(samples)))
        fig.tight_layout()
    return fig, stats

def figure_format(path: str) -> str:
    """The matplotlib format for path's extension (png if none); ValueError if matplotlib
    cannot write it. Checked before drawing, which takes minutes at the default settings."""
    from matplotlib.backend_bases import FigureCanvasBase
    fmt = os.path.splitext(path)[1].lstrip('.').lower() or 'png'
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f'{path}: matplotlib cannot write .{fmt} files (use one of: {", ".join(sorted(supported))})')
    return fmt

def save_figure(fig, path: str) -> None:
    """Write the figure atomically (format from the extension), creating directories."""
    from torch_utils.misc import atomic_open
    fmt = figure_format(path)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with atomic_open(path, 'wb') as f:
        fig.savefig(f, format=fmt, dpi=80)

#----------------------------------------------------------------------------
# Loading trained models.

def load_toy_net(src: str, device=None) -> ToyModel:
    """Load a toy model pickle (path or URL) with the safe loader; eval mode, no grad."""
    net = persistence.load_pickle(src)
    if not isinstance(net, torch.nn.Module) or not hasattr(net, 'score'):
        raise TypeError(f'{src}: expected a pickled ToyModel, got {type(net).__name__}')
    device = torch.device(device) if device is not None else misc.default_device()
    return net.eval().requires_grad_(False).to(device)

#----------------------------------------------------------------------------
# Guidance comparison and the quick demo.

def guided_stats(net, gnet=None, guidance: float = 1, num_samples: int = VIEW_A['num_samples'], device=None) -> dict:
    """sample_stats of view-A samples (same initial noise as the figure's first row)."""
    return sample_stats(sample_from_model(net, gnet, guidance, num_samples=num_samples, device=device))

def snapshot_path(outdir: str, classes: str, num_layers: int, hidden_dim: int, total_iter: int) -> str:
    """Official layout: <outdir>/cls<C>-layers<LL>-dim<D>/iter<NNNN>.pkl."""
    return os.path.join(outdir, f'cls{classes}-layers{num_layers:02d}-dim{hidden_dim}', f'iter{total_iter:04d}.pkl')

def train_or_load(outdir: str, classes: str, hidden_dim: int, total_iter: int, device=None, progress: bool = True,
                  **train_kwargs) -> ToyModel:
    """Reuse the snapshot left by an earlier (interrupted) demo run, else train and save it."""
    path = snapshot_path(outdir, classes, 4, hidden_dim, total_iter)
    if os.path.isfile(path):
        print(f'Reusing {path}')
        return load_toy_net(path, device)
    net = do_train(classes=classes, hidden_dim=hidden_dim, total_iter=total_iter, viz_iter=None, device=device,
                   progress=progress, **train_kwargs)
    save_snapshot(net, path)
    print(f'Saved {path}')
    return net.to(device if device is not None else misc.default_device())

def run_demo(outdir: str, main_iter: int = 4096, guide_iter: int = 512, guidance: float = 3, device=None,
             grid_resolution: int = 400, samples_scale: float = 1.0, progress: bool = True) -> str:
    """Train the main model (class A, 64 wide), the autoguidance guide (class A, 32 wide,
    early) and a CFG guide (classes AB, 32 wide, early); save the figure to
    <outdir>/toy-example.png and return the statistics table (no guidance / autoguidance / CFG)."""
    net = train_or_load(outdir, 'A', 64, main_iter, device, progress)
    gnet = train_or_load(outdir, 'A', 32, guide_iter, device, progress)
    cfg_gnet = train_or_load(outdir, 'AB', 32, guide_iter, device, progress)
    fig, rows = plot_figure(net, gnet, guidance, device, grid_resolution, samples_scale, progress)
    save_figure(fig, os.path.join(outdir, 'toy-example.png'))
    num_samples = max(int(VIEW_A['num_samples'] * samples_scale), 1)
    rows = [(label_for_panel(title, guidance), s) for title, s in rows]
    rows.append((f'CFG, AB guide (w={guidance:g})', guided_stats(net, cfg_gnet, guidance, num_samples, device)))
    return format_stats_table(rows)

def label_for_panel(title: str, guidance: float) -> str:
    """Short table labels for the figure's sample panels."""
    return {'Ground truth distribution': 'Ground truth (exact score)',
            'Sample distribution without guidance': 'Main model, no guidance',
            'Sample distribution with guidance': f'Main model + guide (w={guidance:g})'}.get(title, title)
