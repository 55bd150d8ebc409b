"""Small stand-ins for the metric detectors' downloads, in the real formats, for offline tests.

`build_standin_cache(root)` fills a dnnlib cache root (what DNNLIB_CACHE_DIR points to) with:

* `downloads/<md5>_<url>` for the Inception URL: a persistence pickle of a narrow
  `InceptionV3Features` (same architecture, width 1/32, random weights);
* `downloads/...` for the NIMA URL: a TorchScript model giving a distribution over 10 ratings;
* `downloads/...` for the LAION head URL: a random `AestheticHead(768)` state dict (torch.save);
* `torch_hub/facebookresearch_dinov2_main/hubconf.py` (+ weights in `torch_hub/checkpoints/`)
  and `torch_hub/openai_CLIP_main/hubconf.py`: tiny hub repositories with the official entry points.
"""

import os
import shutil
import textwrap

import torch

import dnnlib
from torch_utils import persistence
from training.evaluation import detectors

INCEPTION_WIDTH = 1 / 32
DINO_WEIGHTS_URL = 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth'

DINO_HUBCONF = """
import torch

dependencies = ['torch']


class TinyViT(torch.nn.Module):
    embed_dim = 16

    def __init__(self):
        super().__init__()
        self.patch_embed = torch.nn.Conv2d(3, 16, 14, stride=14)
        self.head = torch.nn.Linear(16, 16)

    def forward(self, x):
        assert x.shape[2:] == (224, 224)
        return self.head(torch.tanh(self.patch_embed(x)).mean(dim=(2, 3)))


def dinov2_vitl14(pretrained=True, **kwargs):
    model = TinyViT()
    if pretrained:
        model.load_state_dict(torch.hub.load_state_dict_from_url({url!r}, map_location='cpu'))
    return model
"""

CLIP_HUBCONF = """
import torch

dependencies = ['torch']


class TinyCLIP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.visual = torch.nn.Conv2d(3, 768, 32, stride=32)

    def encode_image(self, x):
        assert x.shape[2:] == (224, 224)
        return self.visual(x).mean(dim=(2, 3))


def _load(name, device='cpu', jit=False, **kwargs):
    assert name == 'ViT-L/14'
    return TinyCLIP().eval(), (lambda image: image)
"""


class TinyNima(torch.nn.Module):
    """Softmax over 10 ratings driven by mean colour, so brighter images score higher."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(-2.0, 2.0, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = x.mean(dim=(1, 2, 3)).unsqueeze(1)
        return torch.softmax(brightness * self.scale.unsqueeze(0), dim=1)


def cache_file(root: str, url: str) -> str:
    path = dnnlib.util.expected_cache_path(url, os.path.join(root, 'downloads'))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def make_standin_inception(seed: int = 0) -> detectors.InceptionV3Features:
    """Random narrow Inception whose batch-norm statistics are calibrated on random images, so
    that activations keep unit scale through the ~90 layers (features of order 1)."""
    torch.manual_seed(seed)
    model = detectors.InceptionV3Features(width=INCEPTION_WIDTH)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        model.train()(torch.randint(0, 256, [8, 3, 32, 32], dtype=torch.uint8))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    return model.eval()


def build_standin_cache(root: str) -> str:
    """Write every stand-in under `root`; returns `root`."""
    persistence.save_pickle(make_standin_inception(), cache_file(root, detectors.INCEPTION_URL))
    torch.jit.save(torch.jit.script(TinyNima()), cache_file(root, detectors.NIMA_URL))
    torch.manual_seed(1)
    torch.save(detectors.AestheticHead(768).state_dict(), cache_file(root, detectors.AESTHETIC_HEAD_URL))
    hub = os.path.join(root, 'torch_hub')
    for repo, source in (('facebookresearch_dinov2_main', DINO_HUBCONF.format(url=DINO_WEIGHTS_URL)),
                         ('openai_CLIP_main', CLIP_HUBCONF)):
        os.makedirs(os.path.join(hub, repo), exist_ok=True)
        with open(os.path.join(hub, repo, 'hubconf.py'), 'w') as f:
            f.write(textwrap.dedent(source))
    os.makedirs(os.path.join(hub, 'checkpoints'), exist_ok=True)
    torch.manual_seed(2)
    weights = torch.nn.ModuleDict(dict(patch_embed=torch.nn.Conv2d(3, 16, 14, stride=14), head=torch.nn.Linear(16, 16)))
    torch.save(weights.state_dict(), os.path.join(hub, 'checkpoints', os.path.basename(DINO_WEIGHTS_URL)))
    return root


def shared_standin_cache(tmp_path_factory) -> str:
    """One stand-in cache per pytest session (built on first use, shared by the test modules)."""
    root = tmp_path_factory.getbasetemp() / 'detector-standins'
    marker = root / 'complete'
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        build_standin_cache(str(root))
        marker.write_text('ok')
    return str(root)


def use_cache(monkeypatch, root: str) -> None:
    """Point dnnlib (env and override) at `root` and forget detectors built from another cache."""
    monkeypatch.setenv('DNNLIB_CACHE_DIR', root)
    monkeypatch.setattr(dnnlib.util, '_dnnlib_cache_dir', None)
    monkeypatch.delenv('EDM2_TRUST_PICKLE', raising=False)
    detectors.clear_detector_cache()


def write_images(path: str, count: int, size: int = 16, seed: int = 0, folders: int = 0) -> list:
    """`count` random RGB PNGs (in `folders` class folders when > 0); returns relative names."""
    import numpy as np
    import PIL.Image
    rng = np.random.RandomState(seed)
    names = []
    for i in range(count):
        name = f'c{i % folders}/img{i:03d}.png' if folders else f'img{i:03d}.png'
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        level = rng.randint(0, 256)
        pixels = np.clip(rng.randint(-40, 40, size=(size, size, 3)) + level, 0, 255).astype(np.uint8)
        PIL.Image.fromarray(pixels, 'RGB').save(os.path.join(path, name))
        names.append(name)
    return names
