"""Feature detectors and image scorers used by the metrics.

Every detector has `feature_dim` and maps a batch of uint8 NCHW RGB images (any
resolution, on the compute device) to float features `[N, feature_dim]`. Scorers
(`nima`, `ascore`) also have `max_score = 10` and return one score per image.

| metric      | class                  | weights                                                  |
|-------------|------------------------|----------------------------------------------------------|
| `fid`       | `InceptionV3Detector`  | official StyleGAN3 detector URL (see `load_inception`)   |
| `fd_dinov2` | `DINOv2Detector`       | torch.hub `facebookresearch/dinov2:main` `dinov2_vitl14` |
| `nima`      | `Nima`                 | TorchScript file (fork)                                  |
| `ascore`    | `AestheticPredictor`   | torch.hub `openai/CLIP:main` + LAION MLP head (fork)     |

Safety: the official Inception file is a pickle. Unpickling it with plain `pickle.load`
executes whatever it references, so it is only done with `EDM2_TRUST_PICKLE=1` (the same
opt-in as network pickles). Without it, the file is read by the project's safe loader,
which accepts this project's own `InceptionV3Features` module (pickled or as a state dict)
and TorchScript archives; anything else fails with one line saying how to opt in.
torch.hub models (DINOv2, CLIP) run their repository's `hubconf.py`, as the originals do.

Downloads go through `dnnlib.util.open_url` (cache under `DNNLIB_CACHE_DIR`), torch.hub
uses `dnnlib.make_cache_dir_path('torch_hub')` and CLIP keeps its weights in
`dnnlib.make_cache_dir_path('clip')`; offline, the error names the file to place.
"""

import io
import os
import sys
import warnings
import zipfile
from typing import Any, Callable, Optional

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

import dnnlib
from torch_utils import distributed as dist
from torch_utils import persistence

INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
DINOV2_REPO, DINOV2_ENTRY = 'facebookresearch/dinov2:main', 'dinov2_vitl14'
NIMA_URL = 'https://huggingface.co/Thibaultsoubeste/nimascorer/resolve/main/nima_scorer.pt'
CLIP_REPO, CLIP_ENTRY, CLIP_MODEL = 'openai/CLIP:main', '_load', 'ViT-L/14'  # explicit branch: no network probe
CLIP_WEIGHTS = 'ViT-L-14.pt'  # the file name openai/CLIP's load() gives the ViT-L/14 weights in its download_root
AESTHETIC_HEAD_URL = 'https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/refs/heads/main/sac+logos+ava1-l14-linearMSE.pth'

INCEPTION_FEATURES = 2048  # pool features of the official Inception-v3 (FID)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class DetectorLoadError(OSError):
    """A detector's weights or code could not be obtained; the one-line message says what to do."""

#----------------------------------------------------------------------------
# Inception-v3 (the TF 2015 graph used by FID), built in torch.


@persistence.persistent_class
class BasicConv(torch.nn.Module):
    """Conv (no bias) + batch norm (eps 1e-3, eval statistics) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Any, stride: int = 1, padding: Any = 0):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=False)
        self.bn = torch.nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _scaler(width: float) -> Callable[[int], int]:
    """Channel count of the real network -> channel count at `width`."""
    return lambda c: max(1, int(round(c * width)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's 3x3 'SAME' average pool divides by the number of valid pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


@persistence.persistent_class
class InceptionA(torch.nn.Module):
    def __init__(self, cin: int, pool: int, width: float):
        w = _scaler(width)
        super().__init__()
        self.b1 = BasicConv(cin, w(64), 1)
        self.b5 = torch.nn.Sequential(BasicConv(cin, w(48), 1), BasicConv(w(48), w(64), 5, padding=2))
        self.b3 = torch.nn.Sequential(BasicConv(cin, w(64), 1), BasicConv(w(64), w(96), 3, padding=1),
                                      BasicConv(w(96), w(96), 3, padding=1))
        self.bp = BasicConv(cin, pool, 1)
        self.out_channels = w(64) + w(64) + w(96) + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b5(x), self.b3(x), self.bp(_avg_pool(x))], dim=1)


@persistence.persistent_class
class InceptionB(torch.nn.Module):
    def __init__(self, cin: int, width: float):
        w = _scaler(width)
        super().__init__()
        self.b3 = BasicConv(cin, w(384), 3, stride=2)
        self.b3d = torch.nn.Sequential(BasicConv(cin, w(64), 1), BasicConv(w(64), w(96), 3, padding=1),
                                       BasicConv(w(96), w(96), 3, stride=2))
        self.out_channels = w(384) + w(96) + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b3(x), self.b3d(x), F.max_pool2d(x, 3, stride=2)], dim=1)


@persistence.persistent_class
class InceptionC(torch.nn.Module):
    def __init__(self, cin: int, c7: int, width: float):
        w = _scaler(width)
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.b1 = BasicConv(cin, w(192), 1)
        self.b7 = torch.nn.Sequential(BasicConv(cin, c7, 1), BasicConv(c7, c7, **row), BasicConv(c7, w(192), **col))
        self.b7d = torch.nn.Sequential(BasicConv(cin, c7, 1), BasicConv(c7, c7, **col), BasicConv(c7, c7, **row),
                                       BasicConv(c7, c7, **col), BasicConv(c7, w(192), **row))
        self.bp = BasicConv(cin, w(192), 1)
        self.out_channels = 4 * w(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b7(x), self.b7d(x), self.bp(_avg_pool(x))], dim=1)


@persistence.persistent_class
class InceptionD(torch.nn.Module):
    def __init__(self, cin: int, width: float):
        w = _scaler(width)
        super().__init__()
        self.b3 = torch.nn.Sequential(BasicConv(cin, w(192), 1), BasicConv(w(192), w(320), 3, stride=2))
        self.b7 = torch.nn.Sequential(BasicConv(cin, w(192), 1), BasicConv(w(192), w(192), (1, 7), padding=(0, 3)),
                                      BasicConv(w(192), w(192), (7, 1), padding=(3, 0)),
                                      BasicConv(w(192), w(192), 3, stride=2))
        self.out_channels = w(320) + w(192) + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b3(x), self.b7(x), F.max_pool2d(x, 3, stride=2)], dim=1)


@persistence.persistent_class
class InceptionE(torch.nn.Module):
    """`max_pool=True` in the last block: the TF graph's Mixed_7c pools with max, not average."""

    def __init__(self, cin: int, width: float, max_pool: bool):
        w = _scaler(width)
        super().__init__()
        self.max_pool = max_pool
        self.b1 = BasicConv(cin, w(320), 1)
        self.b3 = BasicConv(cin, w(384), 1)
        self.b3a = BasicConv(w(384), w(384), (1, 3), padding=(0, 1))
        self.b3b = BasicConv(w(384), w(384), (3, 1), padding=(1, 0))
        self.b3d = torch.nn.Sequential(BasicConv(cin, w(448), 1), BasicConv(w(448), w(384), 3, padding=1))
        self.b3da = BasicConv(w(384), w(384), (1, 3), padding=(0, 1))
        self.b3db = BasicConv(w(384), w(384), (3, 1), padding=(1, 0))
        self.bp = BasicConv(cin, w(192), 1)
        self.out_channels = w(320) + 4 * w(384) + w(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y3, yd = self.b3(x), self.b3d(x)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.b1(x), self.b3a(y3), self.b3b(y3), self.b3da(yd), self.b3db(yd), self.bp(pooled)], dim=1)


@persistence.persistent_class
class InceptionV3Features(torch.nn.Module):
    """Inception-v3 up to the 2048-d pool features (the FID variant of the TF 2015 graph).

    Input: uint8-valued NCHW RGB at any resolution; resized bilinearly to 299x299 and
    mapped to [-1, 1) by (x - 128) / 128, as the TF graph does. `width` scales every
    channel count (1 = the real network; small values give fast stand-ins for tests).
    """

    def __init__(self, width: float = 1.0):
        super().__init__()
        width = self.width = float(width)
        w = _scaler(self.width)
        self.stem = torch.nn.Sequential(
            BasicConv(3, w(32), 3, stride=2), BasicConv(w(32), w(32), 3), BasicConv(w(32), w(64), 3, padding=1),
            torch.nn.MaxPool2d(3, stride=2), BasicConv(w(64), w(80), 1), BasicConv(w(80), w(192), 3),
            torch.nn.MaxPool2d(3, stride=2))
        blocks, c = [], w(192)
        for make in (lambda c: InceptionA(c, w(32), width), lambda c: InceptionA(c, w(64), width),
                     lambda c: InceptionA(c, w(64), width), lambda c: InceptionB(c, width),
                     lambda c: InceptionC(c, w(128), width), lambda c: InceptionC(c, w(160), width),
                     lambda c: InceptionC(c, w(160), width), lambda c: InceptionC(c, w(192), width),
                     lambda c: InceptionD(c, width), lambda c: InceptionE(c, width, max_pool=False),
                     lambda c: InceptionE(c, width, max_pool=True)):
            blocks.append(make(c))
            c = blocks[-1].out_channels
        self.blocks = torch.nn.Sequential(*blocks)
        self.feature_dim = c

    def forward(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        if not return_features:
            raise ValueError('InceptionV3Features only computes pool features (return_features=True)')
        x = images.to(torch.float32)
        if x.shape[2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        x = (x - 128) / 128
        x = self.blocks(self.stem(x))
        return x.mean(dim=(2, 3))


# The safe loader rebuilds these classes from a pickle without executing its embedded source.
for _name in ('BasicConv', 'InceptionA', 'InceptionB', 'InceptionC', 'InceptionD', 'InceptionE', 'InceptionV3Features'):
    persistence.register_safe_class(_name, 'training.evaluation.detectors')


def inception_from_state_dict(state: dict) -> InceptionV3Features:
    """Our Inception module with the width implied by the state dict (stem conv has 32*width channels)."""
    first = state.get('stem.0.conv.weight', None)
    if not isinstance(first, torch.Tensor):
        raise ValueError('not an InceptionV3Features state dict (no stem.0.conv.weight)')
    model = InceptionV3Features(width=first.shape[0] / 32)
    model.load_state_dict(state)
    return model


def _is_torchscript_archive(data: bytes) -> bool:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return any(name.endswith('constants.pkl') or '/code/' in name for name in archive.namelist())


def load_inception(url: str = INCEPTION_URL, verbose: bool = True) -> torch.nn.Module:
    """The Inception feature network from `url` (path or URL), eval mode.

    Formats: TorchScript archive (torch.jit.load); torch.save'd state dict of
    `InceptionV3Features`; pickle (official). Both go through the project's safe loader
    (`persistence.load_torch_file`, `persistence.load_pickle`); EDM2_TRUST_PICKLE=1 gives the official,
    code-executing loaders.
    """
    path = dnnlib.util.open_url(url, verbose=verbose, return_filename=True)  # the cache file for a URL
    with open(path, 'rb') as f:
        data = f.read()
    try:
        if data[:4] == persistence.ZIP_MAGIC and _is_torchscript_archive(data):
            model = torch.jit.load(io.BytesIO(data), map_location='cpu')
        elif data[:4] == persistence.ZIP_MAGIC:
            model = inception_from_state_dict(persistence.load_torch_file(io.BytesIO(data), name=url))
        else:
            model = persistence.load_pickle(io.BytesIO(data), name=url)
    except persistence.PickleLoadError as err:
        raise DetectorLoadError(f'Inception detector: {err}') from err
    except (RuntimeError, ValueError, zipfile.BadZipFile) as err:
        reason = dnnlib.util.first_line(err, with_type=True)
        raise DetectorLoadError(f'{url}: cannot load the Inception detector ({reason})') from err
    if not callable(model):
        raise DetectorLoadError(f'{url}: Inception detector: expected a module, found a {type(model).__name__}')
    if not isinstance(model, (InceptionV3Features, torch.jit.ScriptModule)) and not persistence.is_trusted():
        # The safe loader also rebuilds plain torch modules; only ours computes the features.
        raise DetectorLoadError(f'{path}: Inception detector: found a {type(model).__name__}, not an '
                                'InceptionV3Features module or TorchScript archive; if this is the official '
                                f'detector pickle and you trust it, set {persistence.TRUST_ENV_VAR}=1')
    if isinstance(model, torch.nn.Module):
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
    return model


#----------------------------------------------------------------------------
# Shared helpers.


def _resize_normalize(images: torch.Tensor, mean: tuple, std: tuple, size: int = 224) -> torch.Tensor:
    """Bicubic antialiased resize on float values, /255, per-channel mean/std."""
    x = images.to(torch.float32)
    x = F.interpolate(x, size=(size, size), mode='bicubic', antialias=True, align_corners=False)
    x = x / 255
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - mean_t) / std_t


def _pil_resize(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Reference resize: PIL bicubic per image on uint8 RGB."""
    out = []
    for image in images.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
        resized = PIL.Image.fromarray(image, 'RGB').resize((size, size), PIL.Image.BICUBIC)
        out.append(torch.from_numpy(np.array(resized)).permute(2, 0, 1))
    return torch.stack(out).to(images.device)


def hub_dir() -> str:
    return dnnlib.make_cache_dir_path('torch_hub')


def clip_weights_path() -> str:
    """Where CLIP's load() looks for (and downloads) the ViT-L/14 weights: under the dnnlib cache, not ~/.cache/clip."""
    return os.path.join(dnnlib.make_cache_dir_path('clip'), CLIP_WEIGHTS)


def load_from_hub(repo: str, entry: str, *args: Any, weights_path: Optional[str] = None, **kwargs: Any) -> Any:
    """torch.hub.load with the dnnlib hub cache; offline failures become one clear line.

    `kwargs` go to the entry point; `weights_path` names the weights file for the offline message when the
    entry point keeps them outside torch.hub's checkpoint directory."""
    torch.hub.set_dir(hub_dir())
    owner_name, _, branch = repo.partition(':')
    repo_dir = os.path.join(hub_dir(), f'{owner_name.replace("/", "_")}_{branch or "main"}')
    weights = f'at {weights_path}' if weights_path else f'under {os.path.join(hub_dir(), "checkpoints")}'
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='xFormers is not available')
        try:
            return torch.hub.load(repo, entry, *args, trust_repo=True, verbose=False, skip_validation=True, **kwargs)
        except Exception as err:
            raise DetectorLoadError(f'cannot load {repo} {entry} through torch.hub ({type(err).__name__}: '
                                    f'{dnnlib.util.first_line(err)}); offline, put the repository at {repo_dir} and its '
                                    f'weights {weights}') from err


def _open_weights(url: str, verbose: bool) -> bytes:
    with dnnlib.util.open_url(url, verbose=verbose) as f:
        return f.read()

#----------------------------------------------------------------------------
# Detectors.


class Detector:
    """Base: `feature_dim`; `__call__(images uint8 NCHW RGB) -> [N, feature_dim]` float."""
    feature_dim = 0
    max_score = None  # Scorers: upper end of the score range (histograms).

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class InceptionV3Detector(Detector):
    def __init__(self, url: str = INCEPTION_URL, verbose: bool = True):
        self.model = load_inception(url, verbose=verbose)
        self.feature_dim = detector_marker(self, torch.device('cpu'))['feature_dim']  # measured: any format
        if self.feature_dim != INCEPTION_FEATURES:
            # Any Inception-shaped file at the weights path loads (e.g. a narrow test stand-in); say it is not the real one.
            dist.print0(f'Warning: {url}: this Inception detector gives {self.feature_dim} features, not the '
                        f'{INCEPTION_FEATURES} of the official Inception-v3; its FID is not comparable with published '
                        'values or official reference statistics', file=sys.stderr, flush=True)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # The model resizes and normalises raw uint8 images itself.
        with torch.no_grad():
            return self.model.to(images.device)(images, return_features=True)


class DINOv2Detector(Detector):
    def __init__(self, resize_mode: str = 'torch', verbose: bool = True):
        if resize_mode not in ('torch', 'pil'):
            raise ValueError(f'DINOv2Detector: resize_mode must be "torch" or "pil", not {resize_mode!r}')
        self.resize_mode = resize_mode
        self.model = load_from_hub(DINOV2_REPO, DINOV2_ENTRY).eval().requires_grad_(False)
        self.feature_dim = int(getattr(self.model, 'embed_dim', 1024))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.resize_mode == 'pil':
            images = _pil_resize(images)
        x = _resize_normalize(images, IMAGENET_MEAN, IMAGENET_STD)
        with torch.no_grad():
            return self.model.to(x.device)(x)


class Nima(Detector):
    """[FORK] NIMA: expected rating sum_k k * p_k over the 10 rating bins (Talebi & Milanfar 2018)."""
    feature_dim = 1
    max_score = 10

    def __init__(self, url: str = NIMA_URL, verbose: bool = True):
        try:
            self.model = torch.jit.load(io.BytesIO(_open_weights(url, verbose)), map_location='cpu').eval()
        except RuntimeError as err:
            raise DetectorLoadError(f'{url}: not a TorchScript NIMA model ({dnnlib.util.first_line(err)})') from err

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _resize_normalize(images, IMAGENET_MEAN, IMAGENET_STD)
        with torch.no_grad():
            probs = self.model.to(x.device)(x).to(torch.float32)
        ratings = torch.arange(1, probs.shape[1] + 1, dtype=probs.dtype, device=probs.device)
        return (probs * ratings).sum(dim=1, keepdim=True)


class AestheticHead(torch.nn.Module):
    """LAION improved aesthetic predictor MLP (no activations, as published)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticPredictor(Detector):
    """[FORK] head(L2-normalised CLIP ViT-L/14 image embedding) (LAION improved aesthetic predictor)."""
    feature_dim = 1
    max_score = 10

    def __init__(self, url: str = AESTHETIC_HEAD_URL, verbose: bool = True):
        # openai/CLIP's load(name, device, jit, download_root) would otherwise keep its weights in ~/.cache/clip.
        weights = clip_weights_path()
        loaded = load_from_hub(CLIP_REPO, CLIP_ENTRY, CLIP_MODEL, weights_path=weights,
                               download_root=os.path.dirname(weights))
        self.clip = (loaded[0] if isinstance(loaded, (tuple, list)) else loaded).eval().requires_grad_(False)
        try:
            state = persistence.load_torch_file(io.BytesIO(_open_weights(url, verbose)), name=url)
            self.head = AestheticHead(768)
            self.head.load_state_dict(state)
        except persistence.PickleLoadError as err:
            raise DetectorLoadError(f'aesthetic head: {err}') from err
        except (RuntimeError, ValueError, TypeError) as err:
            raise DetectorLoadError(f'{url}: not an aesthetic head state dict ({dnnlib.util.first_line(err)})') from err
        self.head.eval().requires_grad_(False)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _resize_normalize(images, CLIP_MEAN, CLIP_STD)
        clip = self.clip.to(x.device)
        dtype = next(clip.parameters()).dtype
        with torch.no_grad():
            emb = clip.encode_image(x.to(dtype)).to(torch.float32)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            return self.head.to(x.device)(emb)

#----------------------------------------------------------------------------
# Metric table and cached construction.


detector_classes = {
    'fid': InceptionV3Detector,
    'fd_dinov2': DINOv2Detector,
    'nima': Nima,
    'ascore': AestheticPredictor,
}

_detector_cache = dict()


def is_scorer(metric: str) -> bool:
    """Scorer metrics (one score per image, histogram, no reference) vs Fréchet-distance metrics."""
    return detector_classes[metric].max_score is not None


def get_detector(metric: str, verbose: bool = True) -> Detector:
    """The detector of `metric`, built once per process; rank 0 first (downloads), then the others."""
    if metric not in detector_classes:
        raise ValueError(f'Invalid metric "{metric}"')
    if metric not in _detector_cache:
        cls = detector_classes[metric]
        if dist.get_rank() != 0:
            dist.barrier()
        try:
            if verbose:
                dist.print0(f'Setting up {cls.__name__}...')
            _detector_cache[metric] = cls(verbose=verbose)
        finally:
            if dist.get_rank() == 0:
                dist.barrier()
    return _detector_cache[metric]


def clear_detector_cache() -> None:
    _detector_cache.clear()

#----------------------------------------------------------------------------
# Detector markers: which weights produced a set of statistics.

PROBE_FEATURES = 4  # features kept per probe image


def probe_images() -> torch.Tensor:
    """Two fixed 64x64 uint8 RGB images (smooth ramps, no random numbers): the same pixels everywhere."""
    y, x = torch.meshgrid(torch.arange(64), torch.arange(64), indexing='ij')
    ramps = [(x * 4) % 256, (y * 4) % 256, (x + y) * 2 % 256]
    first = torch.stack(ramps)
    return torch.stack([first, first.flip(1, 2)]).to(torch.uint8)


def detector_marker(detector: Detector, device: torch.device) -> dict:
    """{'detector': class name, 'feature_dim', 'probe': first features of `probe_images()`}, stored with the
    statistics it computes. The probe identifies the weights whatever their file format (pickle, state dict,
    TorchScript) and survives device rounding when compared with a tolerance (`same_detector`)."""
    if getattr(detector, '_marker', None) is None:
        features = detector(probe_images().to(device)).to(torch.float64).reshape(2, -1)
        detector._marker = dict(detector=type(detector).__name__, feature_dim=int(features.shape[1]),
                                probe=[float(v) for v in features[:, :PROBE_FEATURES].reshape(-1).cpu()])
    return dict(detector._marker)


def same_detector(a: dict, b: dict) -> bool:
    """Do two markers come from the same weights (equal feature dimension, probe features within 2 %)?"""
    if a.get('feature_dim') != b.get('feature_dim'):
        return False
    pa, pb = np.asarray(a.get('probe', []), np.float64), np.asarray(b.get('probe', []), np.float64)
    if pa.shape != pb.shape:
        return False
    scale = max(float(np.abs(pa).max(initial=0)), float(np.abs(pb).max(initial=0)), 1e-12)
    return bool(np.all(np.abs(pa - pb) <= 0.02 * np.abs(pb) + 1e-3 * scale))


def describe_marker(marker: dict) -> str:
    return f'{marker.get("detector", "unknown detector")}, {dnnlib.util.count_of(marker.get("feature_dim", 0), "feature")}'

