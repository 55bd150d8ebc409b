"""`generate_images()`: the library function behind `generate_images.py`, also used by the metrics code
(output files: docs/formats.md#generated-images).

It loads the networks, splits the seeds over ranks and batches, samples (by default with
`training.sampling.solvers.sample`: the official Heun sampler or another ODE solver), decodes, and
(optionally) writes PNGs atomically. The official script's names (`config_presets`, `edm_sampler`,
`StackedRandomGenerator`, ...) are re-exported by the root `generate_images.py`.
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
from training.sampling.edm1_sampler import PixelDecoder
from training.sampling.families import check_option_names, describe_sampler, resolve_sampler
from training.sampling.sampler import FixedBatchNet, StackedRandomGenerator
from training.sampling.solvers import sample
from training.snapshots.loading import is_edm1_network, load_snapshot

#----------------------------------------------------------------------------
# Network loading and checks.


def _load_snapshot(src: Union[str, os.PathLike], what: str, option: str, verbose: bool) -> dict:
    if verbose:
        dist.print0(f'Loading {what} from {src} ...')
    return load_snapshot(src, option)


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


def _default_encoder(net: torch.nn.Module) -> Any:
    """EDM v1 networks work in pixels and their snapshots hold no encoder; EDM2 pixel-space pickles neither."""
    if is_edm1_network(net):
        return PixelDecoder()
    return dnnlib.util.construct_class_by_name(class_name='training.encoders.StandardRGBEncoder')

#----------------------------------------------------------------------------
# Output files (docs/formats.md#generated-images).


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

#----------------------------------------------------------------------------
# Seed splitting.


def split_seeds(num_seeds: int, max_batch_size: int, rank: int = 0, world_size: int = 1) -> list:
    """Index chunks of this rank: num_batches = max((n-1) // (B*world) + 1, 1) * world nearly
    equal consecutive chunks (numpy array_split); rank r takes chunks r, r+world, ..."""
    num_batches = max((num_seeds - 1) // (max_batch_size * world_size) + 1, 1) * world_size
    return np.array_split(np.arange(num_seeds), num_batches)[rank::world_size]

#----------------------------------------------------------------------------
# generate_images().


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
    """Main net (+ its encoder), guide, encoder."""
    if isinstance(net, (str, os.PathLike)):
        data = _load_snapshot(net, 'main network', '--net', verbose)
        net = data['ema']
        if encoder is None:
            encoder = data.get('encoder')
    if net is None:
        raise ValueError('generate_images: no main network given')
    net = _prepare(net, device, fast_path)
    if isinstance(gnet, (str, os.PathLike)):
        gnet = _load_snapshot(gnet, 'guiding network', '--gnet', verbose)['ema']
    gnet = net if gnet is None else _prepare(gnet, device, fast_path)
    if gnet is not net:
        check_guide_compatible(net, gnet)
    encoder = _default_encoder(net) if encoder is None else encoder
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
    sampler_fn: Union[str, Callable] = sample,  # The default: the sampler of the network's family (families.py).
    fast_path: Optional[dict] = None,   # Network fast-path switches (set_fast kwargs); None keeps the network's.
    net_batch_size: Optional[int] = None,   # Evaluate the nets on fixed-size groups (FixedBatchNet); None = whole batch.
    **sampler_kwargs,                   # solver, num_steps, discretization, sigma_*, rho, guidance, S_*, guidance_interval,
                                        # schedule, scaling, alpha (EDM v1 networks), ...; None = the family's default.
) -> ImageIterable:
    """Load the networks and return an iterable over this rank's batches of generated images.

    With the default `sampler_fn`, `families.resolve_sampler` picks the sampler from the main network: the
    ODE solvers of `solvers.sample` for EDM2 networks, EDM v1's samplers and defaults for EDM v1 networks.

    All loading and validation happens before the iterable is returned, so bad input never
    leaves partial output; `outdir` is checked by the callers (misc.check_output_path), which name
    their option. Rank 0 loads first (downloads happen once), then the others.
    """
    device = torch.device(device)
    seeds = list(seeds)
    family_sampler = sampler_fn is sample
    if family_sampler:
        check_option_names(**sampler_kwargs)  # what can be checked before the networks load
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
    sampler_line = None
    if family_sampler:
        sampler_fn, sampler_kwargs = resolve_sampler(net, **sampler_kwargs)
        sampler_line = describe_sampler(sampler_fn, **sampler_kwargs)
    if isinstance(sampler_fn, str):
        sampler_fn = dnnlib.util.get_obj_by_name(sampler_fn)
    world_size = dist.get_world_size()
    all_chunks = [split_seeds(len(seeds), max_batch_size, rank, world_size) for rank in range(world_size)]
    chunks = all_chunks[dist.get_rank()]
    if verbose and sampler_line is not None:
        dist.print0(sampler_line)
    if verbose:
        dist.print0(f'Generating {len(seeds)} images...')
    run = dnnlib.EasyDict(net=net, gnet=gnet, encoder=encoder, outdir=outdir, subdirs=subdirs, seeds=seeds,
                          class_idx=class_idx, device=device, sampler_fn=sampler_fn, sampler_kwargs=sampler_kwargs,
                          net_batch_size=net_batch_size)
    return ImageIterable(run, chunks, [sum(len(c[i]) for c in all_chunks) for i in range(len(chunks))])

#----------------------------------------------------------------------------
# Helpers for callers that want to skip work already done.


def missing_seeds(seeds: Sequence[int], outdir: str, subdirs: bool = False) -> list:
    """Seeds whose PNG is not in `outdir` yet (PNGs are written atomically, so an existing
    file is complete). Images depend only on their seed, so skipping the others is exact."""
    return [seed for seed in seeds if not os.path.isfile(image_path(outdir, seed, subdirs))]
