"""Converting between image pixels and the representation the network sees.

Vocabulary: raw pixels (uint8 NCHW) -> `encode_pixels` -> raw latents (what a
dataset stores) -> `encode_latents` -> final latents (network input);
`decode` goes from final latents straight back to raw pixels.

* `StandardRGBEncoder`: pixel-space models; final latents are pixels scaled to [-1, 1].
* `StabilityVAEEncoder`: latent-space models through the Stable Diffusion VAE
  (`stabilityai/sd-vae-ft-mse`); raw latents are the 8 channels [mean, std] of
  the VAE posterior, final latents a sample of it, normalised per channel.

This file is embedded in network pickles and executed by the official tools, so
it imports nothing beyond the standard library, numpy, torch, torch_utils and
dnnlib; `diffusers` is imported only when a VAE is actually loaded.
"""

import os
import warnings

import numpy as np
import torch

import dnnlib
from torch_utils import misc
from torch_utils import persistence

warnings.filterwarnings('ignore', 'torch.utils._pytree._register_pytree_node is deprecated.')
warnings.filterwarnings('ignore', '`resume_download` is deprecated')
warnings.filterwarnings('ignore', 'The `local_dir_use_symlinks` argument is deprecated')  # newer huggingface_hub

#----------------------------------------------------------------------------
# Abstract base class for encoders/decoders that convert back and forth
# between raw pixel data and latents used by the diffusion backbone.

@persistence.persistent_class
class Encoder:
    def __init__(self):
        pass

    def init(self, device: torch.device) -> None:  # force lazy init to happen now
        pass

    def __getstate__(self) -> dict:
        return self.__dict__

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # raw pixels => final latents
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:  # raw pixels => raw latents
        raise NotImplementedError  # to be overridden by subclass

    def encode_latents(self, x: torch.Tensor, noise: torch.Tensor = None) -> torch.Tensor:  # raw latents => final latents
        raise NotImplementedError  # to be overridden by subclass; `noise`: the posterior draw, if any

    def decode(self, x: torch.Tensor) -> torch.Tensor:  # final latents => raw pixels
        raise NotImplementedError  # to be overridden by subclass

#----------------------------------------------------------------------------
# Pixel-space models: final latents = pixels / 127.5 - 1.

@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    def __init__(self):
        super().__init__()

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode_latents(self, x: torch.Tensor, noise: torch.Tensor = None) -> torch.Tensor:  # deterministic: no noise
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        # x * 127.5 + 128 maps [-1, 1] to [0.5, 255.5]; the uint8 cast truncates, i.e. rounds.
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------
# Latent-space models: the Stable Diffusion VAE, loaded lazily on first use.
# Per channel: final = (raw - raw_mean) * final_std / raw_std + final_mean = raw * scale + bias.

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    def __init__(self,
        vae_name: str = 'stabilityai/sd-vae-ft-mse',   # Name of the VAE (Hugging Face id or local directory).
        raw_mean: list = [5.81, 3.25, 0.12, -2.15],     # Assumed mean of the raw latents.
        raw_std: list = [4.17, 4.62, 3.71, 3.28],       # Assumed standard deviation of the raw latents.
        final_mean: float = 0,                          # Desired mean of the final latents.
        final_std: float = 0.5,                         # Desired standard deviation of the final latents.
        batch_size: int = 8,                            # Batch size to use when running the VAE.
    ):
        super().__init__()
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None

    def init(self, device: torch.device) -> None:
        super().init(device)
        if self._vae is None:
            self._vae = load_stability_vae(self.vae_name, device=device)
        else:
            self._vae.to(device)

    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), _vae=None)  # do not pickle the VAE

    def _run_vae_encoder(self, x: torch.Tensor) -> torch.Tensor:
        d = self._vae.encode(x)['latent_dist']
        return torch.cat([d.mean, d.std], dim=1)

    def _run_vae_decoder(self, x: torch.Tensor) -> torch.Tensor:
        return self._vae.decode(x)['sample']

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:  # raw pixels => raw latents
        self.init(x.device)
        # The VAE sees [0, 1]; raw_mean/raw_std were measured that way (docs/differences.md#keep-1).
        x = x.to(torch.float32) / 255
        return torch.cat([self._run_vae_encoder(batch) for batch in x.split(self.batch_size)])

    def encode_latents(self, x: torch.Tensor, noise: torch.Tensor = None) -> torch.Tensor:  # raw latents => final latents
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        noise = torch.randn_like(mean) if noise is None else noise.to(mean.dtype)
        x = mean + noise * std  # a fresh sample of the posterior on every call
        x = x * misc.const_like(x, self.scale).reshape(1, -1, 1, 1)
        x = x + misc.const_like(x, self.bias).reshape(1, -1, 1, 1)
        return x

    def decode(self, x: torch.Tensor) -> torch.Tensor:  # final latents => raw pixels
        self.init(x.device)
        x = x.to(torch.float32)
        x = x - misc.const_like(x, self.bias).reshape(1, -1, 1, 1)
        x = x / misc.const_like(x, self.scale).reshape(1, -1, 1, 1)
        x = torch.cat([self._run_vae_decoder(batch) for batch in x.split(self.batch_size)])
        return x.clamp(0, 1).mul(255).to(torch.uint8)

#----------------------------------------------------------------------------

def load_stability_vae(vae_name: str = 'stabilityai/sd-vae-ft-mse', device: torch.device = torch.device('cpu')) -> torch.nn.Module:
    """Load a diffusers `AutoencoderKL` in eval mode without gradients.

    `vae_name` is a Hugging Face model id, looked up first in the cache
    `dnnlib.make_cache_dir_path('diffusers')` (DNNLIB_CACHE_DIR moves it) and
    downloaded there otherwise, or a local directory holding the model
    (`config.json` + weights, as written by `save_pretrained`).
    """
    cache_dir = dnnlib.make_cache_dir_path('diffusers')
    os.environ['HF_HUB_DISABLE_SYMLINKS_WARNING'] = '1'
    os.environ['HF_HUB_DISABLE_PROGRESS_BARS'] = '1'
    os.environ['HF_HOME'] = cache_dir
    try:
        import diffusers  # pip install diffusers # pyright: ignore [reportMissingImports]
    except ImportError as err:
        raise ImportError(f'Loading the VAE "{vae_name}" needs the diffusers package: pip install diffusers accelerate') from err
    try:
        vae = diffusers.models.AutoencoderKL.from_pretrained(vae_name, cache_dir=cache_dir, local_files_only=True)
    except Exception:  # not in the cache: download it, unless there is no network to download from
        offline = _hub_offline_reason()
        if offline is not None:
            raise _vae_load_error(vae_name, cache_dir, offline) from None
        try:
            vae = diffusers.models.AutoencoderKL.from_pretrained(vae_name, cache_dir=cache_dir)
        except Exception as err:
            raise _vae_load_error(vae_name, cache_dir, str(err)) from err
    return vae.eval().requires_grad_(False).to(device)

def _hub_offline_reason(timeout: float = 5) -> str:
    """Why the Hugging Face hub cannot be reached (offline mode, no DNS, no route), or None if it can.
    One quick connection attempt: the hub client would otherwise retry for tens of seconds, then report
    a missing config.json."""
    import socket
    import urllib.parse
    if os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on'):
        return 'HF_HUB_OFFLINE is set'
    url = urllib.parse.urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co'))
    host, port = url.hostname or 'huggingface.co', url.port or (80 if url.scheme == 'http' else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f'no network connection to {host} ({err.strerror or type(err).__name__})'
    return None

def _vae_load_error(vae_name: str, cache_dir: str, reason: str) -> OSError:
    reason = reason.strip().splitlines()[0] if reason.strip() else 'unknown error'
    error_class = getattr(dnnlib.util, 'DownloadError', OSError)  # the official dnnlib has no DownloadError
    return error_class(f'Cannot load the VAE "{vae_name}": not found in the cache {cache_dir} and the download failed ({reason}); '
        f'put the model there while online (e.g. `huggingface-cli download {vae_name} --cache-dir {cache_dir}`) or set DNNLIB_CACHE_DIR to a cache that has it')

#----------------------------------------------------------------------------
