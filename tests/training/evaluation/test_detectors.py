"""Detectors: our Inception-v3 architecture, the loading paths (safe pickle, state dict, TorchScript,
trusted pickle, refusal, offline), torch.hub models and the fork's scorers, on stand-ins from
tests/detector_standins.py seeded into a private dnnlib cache."""

import io
import os
import pickle

import numpy as np
import pytest
import torch

import dnnlib
from tests import detector_standins as standins
from torch_utils import persistence
from training.evaluation import detectors




@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n=4, size=20, seed=0):
    return torch.from_numpy(np.random.RandomState(seed).randint(0, 256, [n, 3, size, size]).astype(np.uint8))

#----------------------------------------------------------------------------
# Inception-v3.


def test_inception_full_size_architecture():
    model = detectors.InceptionV3Features()
    # Inception-v3 without its classifier: 21.8M parameters, 2048 pool features.
    assert model.feature_dim == 2048
    assert sum(p.numel() for p in model.parameters()) == 21_785_568
    block_channels = [block.out_channels for block in model.blocks]
    assert block_channels == [256, 288, 288, 768, 768, 768, 768, 768, 1280, 2048, 2048]


def test_inception_resizes_any_resolution_and_is_per_image():
    model = standins.make_standin_inception()
    x = images(3, size=24)
    with torch.no_grad():
        batch = model(x)
        single = model(x[1:2])
        resized = model(torch.nn.functional.interpolate(x.float(), size=(299, 299), mode='bilinear'))
    assert batch.shape == (3, model.feature_dim)
    torch.testing.assert_close(batch[1:2], single, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch, resized, rtol=1e-4, atol=1e-5)  # 299x299 input is used as is
    with pytest.raises(ValueError, match='return_features'):
        model(x, return_features=False)


def test_load_inception_safe_pickle_matches_module(cache):
    reference = standins.make_standin_inception()
    detector = detectors.get_detector('fid', verbose=False)
    assert detector.feature_dim == reference.feature_dim
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(detector(x), reference(x), rtol=1e-4, atol=1e-4)
    assert detectors.get_detector('fid') is detector  # cached per metric


class ScriptedDetector(torch.nn.Module):
    """TorchScript detector taking return_features, like the StyleGAN2-ADA .pt file."""

    def __init__(self, core):
        super().__init__()
        self.core = core

    def forward(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return self.core(images)


def test_load_inception_state_dict_and_torchscript(tmp_path):
    reference = standins.make_standin_inception()
    x = images(2)
    with torch.no_grad():
        expected = reference(x)
    state_path = tmp_path / 'inception-state.pt'
    torch.save(reference.state_dict(), state_path)
    script_path = tmp_path / 'inception-script.pt'
    torch.jit.save(torch.jit.script(ScriptedDetector(torch.jit.trace(reference, (x,)))), script_path)
    for path in (state_path, script_path):
        model = detectors.load_inception(str(path), verbose=False)
        with torch.no_grad():
            torch.testing.assert_close(model(x, return_features=True), expected, rtol=1e-4, atol=1e-5)


def test_detector_marker_names_the_weights_not_the_file_format(tmp_path):
    # Issue #15, 12: the same weights as a state dict or a pickle give the same marker; other weights do not.
    reference = standins.make_standin_inception()
    torch.save(reference.state_dict(), tmp_path / 'a.pt')
    persistence.save_pickle(reference, tmp_path / 'b.pkl')
    torch.save(standins.make_standin_inception(seed=1).state_dict(), tmp_path / 'c.pt')
    markers = [detectors.detector_marker(detectors.InceptionV3Detector(str(tmp_path / name), verbose=False), 'cpu')
               for name in ('a.pt', 'b.pkl', 'c.pt')]
    assert markers[0]['feature_dim'] == 64 and len(markers[0]['probe']) == 2 * detectors.PROBE_FEATURES
    assert detectors.same_detector(markers[0], markers[1]) and not detectors.same_detector(markers[0], markers[2])


class ForeignModule(torch.nn.Module):  # pickled by reference: not on the safe list
    def forward(self, images, return_features=True):
        return images.float().mean(dim=(2, 3))


def test_foreign_pickle_needs_trust(tmp_path, monkeypatch):
    path = str(tmp_path / 'foreign.pkl')
    with open(path, 'wb') as f:
        pickle.dump(ForeignModule(), f)
    monkeypatch.delenv('EDM2_TRUST_PICKLE', raising=False)
    with pytest.raises(detectors.DetectorLoadError) as info:
        detectors.load_inception(path, verbose=False)
    message = str(info.value)
    assert '\n' not in message and path in message and 'EDM2_TRUST_PICKLE=1' in message
    monkeypatch.setenv('EDM2_TRUST_PICKLE', '1')
    model = detectors.load_inception(path, verbose=False)  # the official plain pickle.load
    assert model(images(2)).shape == (2, 3)


def test_inception_bad_files(tmp_path):
    truncated = tmp_path / 'truncated.pkl'
    with open(truncated, 'wb') as f:
        f.write(pickle.dumps(standins.make_standin_inception())[:100])
    with pytest.raises(detectors.DetectorLoadError, match='truncated.pkl'):
        detectors.load_inception(str(truncated), verbose=False)
    wrong = tmp_path / 'wrong.pt'
    torch.save({'foo': torch.zeros(1)}, wrong)
    with pytest.raises(detectors.DetectorLoadError, match='not an InceptionV3Features state dict'):
        detectors.load_inception(str(wrong), verbose=False)


def test_offline_download_names_cache_path(tmp_path, monkeypatch):
    empty = tmp_path / 'empty-cache'
    standins.use_cache(monkeypatch, str(empty))
    monkeypatch.setattr(detectors, 'NIMA_URL', 'http://127.0.0.1:9/nima_scorer.pt')  # nothing listens on port 9
    with pytest.raises(dnnlib.util.DownloadError) as info:
        detectors.Nima(url=detectors.NIMA_URL, verbose=False)
    assert str(empty) in str(info.value)
    with pytest.raises(detectors.DetectorLoadError, match='put the repository at .*facebookresearch_dinov2_nonexistent-branch'):
        detectors.load_from_hub('facebookresearch/dinov2:nonexistent-branch', 'dinov2_vitl14')

def test_offline_clip_error_names_the_weights_file_under_the_cache(tmp_path, monkeypatch):
    empty = tmp_path / 'empty-cache'
    standins.use_cache(monkeypatch, str(empty))
    calls = []

    def offline_hub_load(repo, entry, *args, **kwargs):
        calls.append(kwargs)
        raise OSError('Temporary failure in name resolution')

    monkeypatch.setattr(torch.hub, 'load', offline_hub_load)
    weights = os.path.join(str(empty), 'clip', 'ViT-L-14.pt')
    with pytest.raises(detectors.DetectorLoadError) as info:
        detectors.AestheticPredictor(verbose=False)
    assert calls[0]['download_root'] == os.path.dirname(weights)  # not CLIP's default ~/.cache/clip
    assert f'its weights at {weights}' in str(info.value) and 'openai_CLIP_main' in str(info.value)

#----------------------------------------------------------------------------
# DINOv2 and the fork's scorers.


def test_dinov2_through_torch_hub(cache):
    detector = detectors.get_detector('fd_dinov2', verbose=False)
    assert detector.feature_dim == 16
    x = images(3, size=40)
    features = detector(x)
    assert features.shape == (3, 16) and features.dtype == torch.float32
    # The hub entry point loaded its weights from the hub checkpoint cache.
    weights = torch.load(os.path.join(cache, 'torch_hub', 'checkpoints', 'dinov2_vitl14_pretrain.pth'))
    torch.testing.assert_close(detector.model.head.weight, weights['head.weight'])
    pil = detectors.DINOv2Detector(resize_mode='pil', verbose=False)(x)
    assert (pil - features).abs().max() < 0.05 * features.abs().max()  # PIL vs torch bicubic: close, not equal
    with pytest.raises(ValueError, match='resize_mode'):
        detectors.DINOv2Detector(resize_mode='nearest')


def test_nima_expected_rating(cache):
    nima = detectors.get_detector('nima', verbose=False)
    assert nima.feature_dim == 1 and nima.max_score == 10 and detectors.is_scorer('nima')
    x = images(5)
    scores = nima(x)
    prepared = detectors._resize_normalize(x, detectors.IMAGENET_MEAN, detectors.IMAGENET_STD)
    probs = standins.TinyNima()(prepared)
    expected = (probs * torch.arange(1, 11, dtype=torch.float32)).sum(dim=1, keepdim=True)
    torch.testing.assert_close(scores, expected)
    assert torch.all((scores >= 1) & (scores <= 10))


def test_aesthetic_predictor(cache):
    ascore = detectors.get_detector('ascore', verbose=False)
    x = images(3)
    scores = ascore(x)
    prepared = detectors._resize_normalize(x, detectors.CLIP_MEAN, detectors.CLIP_STD)
    emb = ascore.clip.encode_image(prepared)
    head = detectors.AestheticHead(768)
    head.load_state_dict(torch.load(standins.cache_file(cache, detectors.AESTHETIC_HEAD_URL)))
    expected = head.eval()(emb / emb.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(scores, expected)
    assert sorted(head.state_dict())[:2] == ['layers.0.bias', 'layers.0.weight']
    assert {k.split('.')[1] for k in head.state_dict()} == {'0', '2', '4', '6', '7'}


def test_unknown_metric():
    with pytest.raises(ValueError, match='Invalid metric "kid"'):
        detectors.get_detector('kid')


def test_state_dict_round_trip_via_bytes():
    reference = standins.make_standin_inception()
    buf = io.BytesIO()
    torch.save(reference.state_dict(), buf)
    model = detectors.inception_from_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert model.width == reference.width and model.feature_dim == reference.feature_dim


def test_torch_module_at_cache_path_needs_trust(tmp_path, monkeypatch):
    # The safe loader rebuilds plain torch modules; a wrong one must not pass as the detector.
    path = str(tmp_path / 'inception.pkl')
    with open(path, 'wb') as f:
        pickle.dump(torch.nn.Conv2d(3, 4, 3), f)
    monkeypatch.delenv('EDM2_TRUST_PICKLE', raising=False)
    with pytest.raises(detectors.DetectorLoadError) as info:
        detectors.load_inception(path, verbose=False)
    message = str(info.value)
    assert '\n' not in message and path in message and 'Conv2d' in message and 'EDM2_TRUST_PICKLE=1' in message
    monkeypatch.setenv('EDM2_TRUST_PICKLE', '1')
    assert isinstance(detectors.load_inception(path, verbose=False), torch.nn.Conv2d)
