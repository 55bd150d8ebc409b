"""Image generation with EDM2 networks (spec sampling.md).

Contents, in the order a sampling run uses them:

* `config_presets` -- the official sampling presets (sampling.md §5) and
  `resolve_options()`, the CLI's rules for combining them with explicit options (§1).
* `parse_int_list()` / `parse_interval()` -- option parsing (`--seeds=1,2,5-10`).
* `StackedRandomGenerator` -- one generator per seed, so that an image depends only
  on its seed (§4).
* `edm_time_steps()` / `edm_sampler()` -- the EDM Heun sampler with optional churn and
  guidance (§3), plus two extensions: a guidance interval (Kynkaanniemi et al. 2024)
  and an option to call the guide without labels (the fork's behaviour, quirk F1).
* `FixedBatchNet` -- evaluates a network on fixed-size groups so that images are bit-identical
  for any batch size or number of processes (kernels are chosen by batch size).
* `generate_images()` -- the library function shared by `generate_images.py` and the
  metrics code: loads networks, splits seeds over ranks and batches, samples, decodes
  and (optionally) writes PNGs atomically (§2, §6, §7).
"""

import math
import os
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from dnnlib.util import parse_int_list  # noqa: F401 (re-exported: --seeds, as in the official script)
from torch_utils import persistence

# ----------------------------------------------------------------------------
# Presets (sampling.md §5). Keys filled from a preset: net, gnet, guidance.

model_root = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions'


def _preset(net: str, gnet: Optional[str] = None, guidance: Optional[float] = None) -> dict:
    preset = dict(net=f'{model_root}/{net}.pkl')
    if gnet is not None:
        preset.update(gnet=f'{model_root}/{gnet}.pkl', guidance=guidance)
    return preset


config_presets = {
    # EDM2 paper, Table 2 (fid) and Table 5 (fd_dinov2), no guidance.
    'edm2-img512-xs-fid':   _preset('edm2-img512-xs-2147483-0.135'),   # fid 3.53
    'edm2-img512-xs-dino':  _preset('edm2-img512-xs-2147483-0.200'),   # fd_dinov2 103.39
    'edm2-img512-s-fid':    _preset('edm2-img512-s-2147483-0.130'),    # fid 2.56
    'edm2-img512-s-dino':   _preset('edm2-img512-s-2147483-0.190'),    # fd_dinov2 68.64
    'edm2-img512-m-fid':    _preset('edm2-img512-m-2147483-0.100'),    # fid 2.25
    'edm2-img512-m-dino':   _preset('edm2-img512-m-2147483-0.155'),    # fd_dinov2 58.44
    'edm2-img512-l-fid':    _preset('edm2-img512-l-1879048-0.085'),    # fid 2.06
    'edm2-img512-l-dino':   _preset('edm2-img512-l-1879048-0.155'),    # fd_dinov2 52.25
    'edm2-img512-xl-fid':   _preset('edm2-img512-xl-1342177-0.085'),   # fid 1.96
    'edm2-img512-xl-dino':  _preset('edm2-img512-xl-1342177-0.155'),   # fd_dinov2 45.96
    'edm2-img512-xxl-fid':  _preset('edm2-img512-xxl-0939524-0.070'),  # fid 1.91
    'edm2-img512-xxl-dino': _preset('edm2-img512-xxl-0939524-0.150'),  # fd_dinov2 42.84
    # EDM2 paper, Table 3.
    'edm2-img64-s-fid':     _preset('edm2-img64-s-1073741-0.075'),     # fid 1.58
    'edm2-img64-m-fid':     _preset('edm2-img64-m-2147483-0.060'),     # fid 1.43
    'edm2-img64-l-fid':     _preset('edm2-img64-l-1073741-0.040'),     # fid 1.33
    'edm2-img64-xl-fid':    _preset('edm2-img64-xl-0671088-0.040'),    # fid 1.33
    # EDM2 paper, Table 2: classifier-free guidance (unconditional XS guide).
    'edm2-img512-xs-guid-fid':   _preset('edm2-img512-xs-2147483-0.045', 'edm2-img512-xs-uncond-2147483-0.045', 1.40),   # fid 2.91
    'edm2-img512-xs-guid-dino':  _preset('edm2-img512-xs-2147483-0.150', 'edm2-img512-xs-uncond-2147483-0.150', 1.70),   # fd_dinov2 79.94
    'edm2-img512-s-guid-fid':    _preset('edm2-img512-s-2147483-0.025', 'edm2-img512-xs-uncond-2147483-0.025', 1.40),    # fid 2.23
    'edm2-img512-s-guid-dino':   _preset('edm2-img512-s-2147483-0.085', 'edm2-img512-xs-uncond-2147483-0.085', 1.90),    # fd_dinov2 52.32
    'edm2-img512-m-guid-fid':    _preset('edm2-img512-m-2147483-0.030', 'edm2-img512-xs-uncond-2147483-0.030', 1.20),    # fid 2.01
    'edm2-img512-m-guid-dino':   _preset('edm2-img512-m-2147483-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 2.00),    # fd_dinov2 41.98
    'edm2-img512-l-guid-fid':    _preset('edm2-img512-l-1879048-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 1.20),    # fid 1.88
    'edm2-img512-l-guid-dino':   _preset('edm2-img512-l-1879048-0.035', 'edm2-img512-xs-uncond-2147483-0.035', 1.70),    # fd_dinov2 38.20
    'edm2-img512-xl-guid-fid':   _preset('edm2-img512-xl-1342177-0.020', 'edm2-img512-xs-uncond-2147483-0.020', 1.20),   # fid 1.85
    'edm2-img512-xl-guid-dino':  _preset('edm2-img512-xl-1342177-0.030', 'edm2-img512-xs-uncond-2147483-0.030', 1.70),   # fd_dinov2 35.67
    'edm2-img512-xxl-guid-fid':  _preset('edm2-img512-xxl-0939524-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 1.20),  # fid 1.81
    'edm2-img512-xxl-guid-dino': _preset('edm2-img512-xxl-0939524-0.015', 'edm2-img512-xs-uncond-2147483-0.015', 1.70),  # fd_dinov2 33.09
    # Autoguidance paper, Table 1.
    'edm2-img512-s-autog-fid':          _preset('edm2-img512-s-2147483-0.070', 'edm2-img512-xs-0134217-0.125', 2.10),                # fid 1.34
    'edm2-img512-s-autog-dino':         _preset('edm2-img512-s-2147483-0.120', 'edm2-img512-xs-0134217-0.165', 2.45),                # fd_dinov2 36.67
    'edm2-img512-xxl-autog-fid':        _preset('edm2-img512-xxl-0939524-0.075', 'edm2-img512-m-0268435-0.155', 2.05),               # fid 1.25
    'edm2-img512-xxl-autog-dino':       _preset('edm2-img512-xxl-0939524-0.130', 'edm2-img512-m-0268435-0.205', 2.30),               # fd_dinov2 24.18
    'edm2-img512-s-uncond-autog-fid':   _preset('edm2-img512-s-uncond-2147483-0.070', 'edm2-img512-xs-uncond-0134217-0.110', 2.85),  # fid 3.86
    'edm2-img512-s-uncond-autog-dino':  _preset('edm2-img512-s-uncond-2147483-0.090', 'edm2-img512-xs-uncond-0134217-0.125', 2.90),  # fd_dinov2 90.39
    'edm2-img64-s-autog-fid':           _preset('edm2-img64-s-1073741-0.045', 'edm2-img64-xs-0134217-0.110', 1.70),                  # fid 1.01
    'edm2-img64-s-autog-dino':          _preset('edm2-img64-s-1073741-0.105', 'edm2-img64-xs-0134217-0.175', 2.20),                  # fd_dinov2 31.85
}


def resolve_options(preset: Optional[str] = None, net: Optional[str] = None, gnet: Optional[str] = None,
                    guidance: Optional[float] = None) -> dict:
    """Combine `--preset` with explicit options (sampling.md §1); returns dict(net, gnet, guidance).

    Explicit values win over the preset; guidance None or 1 disables the guide.
    Raises ValueError with a one-line message on inconsistent input.
    """
    if preset is not None:
        if preset not in config_presets:
            raise ValueError(f'Invalid configuration preset "{preset}"; valid presets: {", ".join(config_presets)}')
        defaults = config_presets[preset]
        net = defaults['net'] if net is None else net
        gnet = defaults.get('gnet') if gnet is None else gnet
        guidance = defaults.get('guidance') if guidance is None else guidance
    if net is None:
        raise ValueError('Please specify either --preset or --net')
    if guidance is None or guidance == 1:
        return dict(net=net, gnet=None, guidance=1)
    if gnet is None:
        raise ValueError('Please specify --gnet when using guidance')
    return dict(net=net, gnet=gnet, guidance=guidance)


def ignored_gnet_warning(gnet: Any, guidance: Optional[float]) -> Optional[str]:
    """The warning (without 'Warning: ') for a guiding network given while guidance is off (None or 1, as in
    resolve_options), else None."""
    if gnet is not None and (guidance is None or guidance == 1):
        return '--gnet is ignored without guidance (--guidance 1)'
    return None

# ----------------------------------------------------------------------------
# Option parsing.

def parse_interval(s: Union[str, Sequence[float], None]) -> Optional[tuple]:
    """Parse 'LO,HI' into a (lo, hi) tuple of floats with 0 <= lo <= hi; None stays None."""
    if s is None:
        return None
    parts = str(s).split(',') if isinstance(s, str) else list(s)
    try:
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f'expected two numbers LO,HI, got "{s}"') from None
    if not 0 <= lo <= hi:
        raise ValueError(f'expected 0 <= LO <= HI, got "{s}"')
    return (lo, hi)

# ----------------------------------------------------------------------------
# Per-seed random numbers (sampling.md §4).


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

# ----------------------------------------------------------------------------
# EDM sampler (sampling.md §3).


def edm_time_steps(num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7,
                   dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
    """Noise levels t_0 > ... > t_{N-1}, followed by t_N = 0 (sampling.md §3.3):
    t_i = (sigma_max^(1/rho) + i/(N-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

    Deviation (quirk E6): for N = 1 the original divides by zero; here the single step
    starts at sigma_max.
    """
    step_indices = torch.arange(num_steps, dtype=dtype, device=device)
    max_inv_rho = sigma_max ** (1 / rho)
    min_inv_rho = sigma_min ** (1 / rho)
    t_steps = (max_inv_rho + step_indices / max(num_steps - 1, 1) * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


def _guided_denoiser(net: Callable, gnet: Optional[Callable], labels: Optional[torch.Tensor], guidance: float,
                     guidance_interval: Optional[tuple], guide_labels: bool, dtype: torch.dtype) -> Callable:
    """D(x, t) of sampling.md §3.1: D_m if no guidance at t, else lerp(D_g, D_m, w) = D_g + w (D_m - D_g)."""
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


def edm_sampler(net: Callable, noise: torch.Tensor, labels: Optional[torch.Tensor] = None,
                gnet: Optional[Callable] = None, num_steps: int = 32, sigma_min: float = 0.002,
                sigma_max: float = 80, rho: float = 7, guidance: float = 1, S_churn: float = 0, S_min: float = 0,
                S_max: float = float('inf'), S_noise: float = 1, dtype: torch.dtype = torch.float32,
                randn_like: Callable = torch.randn_like, guidance_interval: Optional[tuple] = None,
                guide_labels: bool = True) -> torch.Tensor:
    """EDM 2nd-order Heun sampler with optional churn and guidance (sampling.md §3.4).

    Extensions (defaults reproduce the official sampler bit for bit):
      guidance_interval -- (lo, hi): guide only where lo <= sigma <= hi, else use D_m alone.
      guide_labels      -- False calls the guide without labels (the fork's sampler, quirk F1).
    Returns the final latents x_N in `dtype`.
    """
    denoise = _guided_denoiser(net, gnet, labels, guidance, guidance_interval, guide_labels, dtype)
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    x_next = noise.to(dtype) * t_steps[0]  # x_0 = noise * t_0
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
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

# ----------------------------------------------------------------------------
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

# ----------------------------------------------------------------------------
# Network loading and checks.


def load_network(src: str, what: str = 'network', verbose: bool = True) -> tuple:
    """Load `src` (path or URL) with the safe loader; return (data, ema network)."""
    if verbose:
        dist.print0(f'Loading {what} from {src} ...')
    data = persistence.load_pickle(src)
    if not isinstance(data, dict) or data.get('ema') is None:
        found = f'keys {sorted(map(str, data))}' if isinstance(data, dict) else f'a {type(data).__name__}'
        raise ValueError(f'{src}: not a network snapshot: expected a dict with an "ema" entry, found {found}')
    return data, data['ema']


def check_guide_compatible(net: torch.nn.Module, gnet: torch.nn.Module) -> None:
    """The guide must produce outputs of the same shape as the main network; its label
    dimension must equal the main one or be 0 (unconditional guide, as in the CFG presets)."""
    for attr in ('img_resolution', 'img_channels'):
        if getattr(gnet, attr, None) != getattr(net, attr, None):
            raise ValueError(f'--gnet does not match --net: {attr} {getattr(gnet, attr, None)} != {getattr(net, attr, None)}')
    gdim, mdim = getattr(gnet, 'label_dim', 0), getattr(net, 'label_dim', 0)
    if gdim not in (0, mdim):
        raise ValueError(f'--gnet does not match --net: label_dim {gdim} is neither 0 nor {mdim}')


def _prepare(module: torch.nn.Module, device: torch.device, fast_path: Optional[dict]) -> torch.nn.Module:
    """Eval mode, no gradients, on `device`; `fast_path` = kwargs of the network's `set_fast()`
    (e.g. dict(enabled=False) for the official op-for-op path, dict(dtype='bf16'))."""
    module = module.eval().requires_grad_(False).to(device)
    if fast_path is not None and hasattr(module, 'set_fast'):
        module.set_fast(**fast_path)
    return module


def _default_encoder() -> Any:
    return dnnlib.util.construct_class_by_name(class_name='training.encoders.StandardRGBEncoder')

# ----------------------------------------------------------------------------
# Output files (sampling.md §6).


def image_path(outdir: str, seed: int, subdirs: bool = False) -> str:
    """out/000123.png, or with subdirs out/012000/012345.png."""
    image_dir = os.path.join(outdir, f'{seed // 1000 * 1000:06d}') if subdirs else outdir
    return os.path.join(image_dir, f'{seed:06d}.png')


def save_png(image: np.ndarray, path: str) -> None:
    """Write an HWC uint8 array (1 or 3 channels) as PNG, atomically."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    pil_image = PIL.Image.fromarray(image[:, :, 0], 'L') if image.shape[2] == 1 else PIL.Image.fromarray(image, 'RGB')
    with misc.atomic_open(path, 'wb') as f:
        pil_image.save(f, format='PNG')


def save_image_grid(images: torch.Tensor, path: str) -> None:
    """Tile an NCHW uint8 batch into a near-square grid (black padding) and save it as PNG."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.zeros([rows * cols, c, h, w], dtype=torch.uint8)
    canvas[:n] = images.cpu()
    grid = canvas.reshape(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    save_png(grid.numpy(), path)

# ----------------------------------------------------------------------------
# Seed splitting (sampling.md §2 step 5).


def split_seeds(num_seeds: int, max_batch_size: int, rank: int = 0, world_size: int = 1) -> list:
    """Index chunks of this rank: num_batches = max((n-1) // (B*world) + 1, 1) * world nearly
    equal consecutive chunks (numpy array_split); rank r takes chunks r, r+world, ..."""
    num_batches = max((num_seeds - 1) // (max_batch_size * world_size) + 1, 1) * world_size
    return np.array_split(np.arange(num_seeds), num_batches)[rank::world_size]

# ----------------------------------------------------------------------------
# generate_images() (sampling.md §2).


def _draw_noise_and_labels(net: torch.nn.Module, seeds: list, class_idx: Optional[int],
                           device: torch.device) -> tuple:
    """Per image, from its own generator: noise first, then (conditional nets) one label draw."""
    rnd = StackedRandomGenerator(device, seeds)
    noise = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = None
    if net.label_dim > 0:
        labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)], device=device)]
        if class_idx is not None:  # the draw above still happens, so the RNG stream is unchanged
            labels[:, :] = 0
            labels[:, class_idx] = 1
    return rnd, noise, labels


class ImageIterable:
    """Iterable over this rank's batches; each item is an EasyDict with images (uint8 NCHW on
    the device), labels, noise, batch_idx, num_batches, indices, seeds. Empty chunks yield
    images=None. `num_images` is the number of images this rank generates; `batch_totals[i]` the
    number that all ranks generate in their batch i, and `total_images` their sum (progress bars)."""

    def __init__(self, run: dnnlib.EasyDict, chunks: list, batch_totals: Optional[list] = None):
        self.run = run
        self.chunks = chunks
        self.num_images = sum(len(chunk) for chunk in chunks)
        self.batch_totals = [len(chunk) for chunk in chunks] if batch_totals is None else list(batch_totals)
        self.total_images = sum(self.batch_totals)

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[dnnlib.EasyDict]:
        for batch_idx, indices in enumerate(self.chunks):
            r = dnnlib.EasyDict(images=None, labels=None, noise=None, batch_idx=batch_idx,
                                num_batches=len(self.chunks), indices=indices)
            r.seeds = [self.run.seeds[idx] for idx in indices]
            if len(r.seeds) > 0:
                self._generate(r)
            dist.barrier()  # keep the ranks in step, also for empty chunks
            yield r

    def _generate(self, r: dnnlib.EasyDict) -> None:
        run = self.run
        rnd, r.noise, r.labels = _draw_noise_and_labels(run.net, r.seeds, run.class_idx, run.device)
        net, gnet = run.net, run.gnet
        if run.net_batch_size is not None:
            net, gnet = FixedBatchNet(net, run.net_batch_size), FixedBatchNet(gnet, run.net_batch_size)
        with torch.no_grad():
            latents = run.sampler_fn(net=net, noise=r.noise, labels=r.labels, gnet=gnet,
                                     randn_like=rnd.randn_like, **run.sampler_kwargs)
            r.images = run.encoder.decode(latents)
        if run.outdir is not None:
            for seed, image in zip(r.seeds, r.images.permute(0, 2, 3, 1).cpu().numpy()):
                save_png(image, image_path(run.outdir, seed, run.subdirs))


def _load_networks(net: Any, gnet: Any, encoder: Any, device: torch.device, verbose: bool,
                   fast_path: Optional[dict]) -> tuple:
    """Steps 2-4 of sampling.md §2: main net (+ its encoder), guide, encoder."""
    if isinstance(net, (str, os.PathLike)):
        data, net = load_network(os.fspath(net), 'main network', verbose)
        if encoder is None:
            encoder = data.get('encoder')
    if net is None:
        raise ValueError('generate_images: no main network given')
    net = _prepare(net, device, fast_path)
    if isinstance(gnet, (str, os.PathLike)):
        gnet = load_network(os.fspath(gnet), 'guiding network', verbose)[1]
    gnet = net if gnet is None else _prepare(gnet, device, fast_path)
    if gnet is not net:
        check_guide_compatible(net, gnet)
    encoder = _default_encoder() if encoder is None else encoder
    return net, gnet, encoder


def generate_images(
    net: Any,                           # Main network: path, URL or module.
    gnet: Any = None,                   # Guiding network: path, URL or module; None = the main network.
    encoder: Any = None,                # Latent decoder; None = the pickle's encoder, else StandardRGBEncoder.
    outdir: Optional[str] = None,       # Where to save PNGs; None = do not save.
    subdirs: bool = False,              # One sub-directory per 1000 seeds.
    seeds: Sequence[int] = range(16, 24),
    class_idx: Optional[int] = None,    # Fixed class label; None = random per seed.
    max_batch_size: int = 32,
    encoder_batch_size: Optional[int] = 4,  # VAE decode chunk; None keeps the encoder's own.
    verbose: bool = True,
    device: Union[str, torch.device] = 'cuda',
    sampler_fn: Union[str, Callable] = edm_sampler,
    fast_path: Optional[dict] = None,   # Network fast-path switches (set_fast kwargs); None keeps the network's.
    net_batch_size: Optional[int] = None,   # Evaluate the nets on fixed-size groups (FixedBatchNet); None = whole batch.
    **sampler_kwargs,                   # num_steps, sigma_min, sigma_max, rho, guidance, S_*, guidance_interval, ...
) -> ImageIterable:
    """Load the networks and return an iterable over this rank's batches of generated images.

    All loading and validation happens before the iterable is returned, so bad input never
    leaves partial output; `outdir` is checked by the callers (misc.check_output_path), which name
    their option. Rank 0 loads first (downloads happen once), then the others.
    """
    device = torch.device(device)
    seeds = list(seeds)
    if net_batch_size is not None and net_batch_size < 1:
        raise ValueError(f'net_batch_size must be >= 1, got {net_batch_size}')
    if dist.get_rank() != 0:
        dist.barrier()  # rank 0 goes first
    try:
        net, gnet, encoder = _load_networks(net, gnet, encoder, device, verbose, fast_path)
        if class_idx is not None and net.label_dim > 0 and not 0 <= class_idx < net.label_dim:
            raise ValueError(f'--class={class_idx} is out of range: the network has {net.label_dim} classes')
        if verbose:
            dist.print0(f'Setting up {type(encoder).__name__}...')
        encoder.init(device)
        if encoder_batch_size is not None and hasattr(encoder, 'batch_size'):
            encoder.batch_size = encoder_batch_size
    finally:
        if dist.get_rank() == 0:
            dist.barrier()  # the other ranks follow
    if isinstance(sampler_fn, str):
        sampler_fn = dnnlib.util.get_obj_by_name(sampler_fn)
    world_size = dist.get_world_size()
    all_chunks = [split_seeds(len(seeds), max_batch_size, rank, world_size) for rank in range(world_size)]
    chunks = all_chunks[dist.get_rank()]
    if verbose:
        dist.print0(f'Generating {len(seeds)} images...')
    run = dnnlib.EasyDict(net=net, gnet=gnet, encoder=encoder, outdir=outdir, subdirs=subdirs, seeds=seeds,
                          class_idx=class_idx, device=device, sampler_fn=sampler_fn, sampler_kwargs=sampler_kwargs,
                          net_batch_size=net_batch_size)
    return ImageIterable(run, chunks, [sum(len(c[i]) for c in all_chunks) for i in range(len(chunks))])

# ----------------------------------------------------------------------------
# Helpers for callers that want to skip work already done.


def missing_seeds(seeds: Sequence[int], outdir: str, subdirs: bool = False) -> list:
    """Seeds whose PNG is not in `outdir` yet (PNGs are written atomically, so an existing
    file is complete). Images depend only on their seed, so skipping the others is exact."""
    return [seed for seed in seeds if not os.path.isfile(image_path(outdir, seed, subdirs))]


__all__ = ['config_presets', 'model_root', 'resolve_options', 'parse_int_list', 'parse_interval',
           'StackedRandomGenerator', 'edm_time_steps', 'edm_sampler', 'FixedBatchNet', 'load_network', 'check_guide_compatible',
           'ignored_gnet_warning', 'image_path', 'save_png', 'save_image_grid', 'split_seeds', 'ImageIterable', 'generate_images',
           'missing_seeds']
