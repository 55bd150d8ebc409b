"""Tests of training/encoders.py with a tiny VAE built in the test (no download)."""

import inspect
import io
import os
import pickle

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import persistence
from training import encoders

VAE_NAME = 'stabilityai/sd-vae-ft-mse'
COMMIT = '0123456789abcdef0123456789abcdef01234567'

#----------------------------------------------------------------------------
# StandardRGBEncoder.

def test_rgb_encoder_maps_pixels_to_unit_range():
    enc = encoders.StandardRGBEncoder()
    x = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8).reshape(1, 6, 1, 1)
    assert torch.equal(enc.encode_pixels(x), x)
    y = enc.encode(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.flatten(), x.flatten().float() / 127.5 - 1)
    assert y.min() == -1 and y.max() == 1

def test_rgb_encoder_decode_inverts_encode_and_clips():
    enc = encoders.StandardRGBEncoder()
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(enc.decode(enc.encode(x)), x)  # x + 0.5, truncated
    out = enc.decode(torch.tensor([-3.0, -1.0, 0.0, 0.999, 1.0, 5.0]))
    assert out.dtype == torch.uint8
    assert out.tolist() == [0, 0, 128, 255, 255, 255]

def test_base_encoder_is_abstract():
    enc = encoders.Encoder()
    enc.init('cpu')
    with pytest.raises(NotImplementedError):
        enc.encode(torch.zeros([1, 3, 4, 4]))
    with pytest.raises(NotImplementedError):
        enc.decode(torch.zeros([1, 3, 4, 4]))

#----------------------------------------------------------------------------
# StabilityVAEEncoder without a VAE: constants, latent sampling, pickling.

def test_vae_encoder_constants_match_official():
    enc = encoders.StabilityVAEEncoder()
    raw_mean, raw_std = [5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28]
    assert enc.vae_name == VAE_NAME and enc.batch_size == 8 and enc._vae is None
    assert enc.scale.dtype == np.float32 and enc.bias.dtype == np.float32
    np.testing.assert_array_equal(enc.scale, np.float32(0.5) / np.float32(raw_std))
    np.testing.assert_array_equal(enc.bias, np.float32(0) - np.float32(raw_mean) * enc.scale)

def test_encode_latents_normalises_each_channel():
    enc = encoders.StabilityVAEEncoder(final_mean=0.25, final_std=2.0)
    raw_mean, raw_std = np.array([5.81, 3.25, 0.12, -2.15]), np.array([4.17, 4.62, 3.71, 3.28])
    mean = torch.randn([2, 4, 3, 3], dtype=torch.float64) * 4
    raw = torch.cat([mean, torch.zeros_like(mean)], dim=1)  # zero std: deterministic sample
    final = enc.encode_latents(raw)
    expected = (mean - torch.tensor(raw_mean).reshape(1, 4, 1, 1)) * 2.0 / torch.tensor(raw_std).reshape(1, 4, 1, 1) + 0.25
    assert final.dtype == torch.float32 and final.shape == (2, 4, 3, 3)
    torch.testing.assert_close(final.double(), expected, rtol=1e-5, atol=1e-5)

def test_encode_latents_draws_fresh_posterior_samples_from_global_rng():
    enc = encoders.StabilityVAEEncoder()
    raw = torch.cat([torch.zeros([64, 4, 8, 8]), torch.full([64, 4, 8, 8], 3.0)], dim=1)
    torch.manual_seed(1)
    a = enc.encode_latents(raw)
    b = enc.encode_latents(raw)
    torch.manual_seed(1)
    assert torch.equal(enc.encode_latents(raw), a)
    assert not torch.equal(a, b)
    # z = 0 + N(0,1) * 3, then * scale: per-channel std of the final latents = 3 * scale.
    std = a.transpose(0, 1).reshape(4, -1).std(dim=1)
    torch.testing.assert_close(std, torch.tensor(3 * enc.scale), rtol=0.05, atol=0)

def test_vae_encoder_pickles_without_vae(tmp_path):
    enc = encoders.StabilityVAEEncoder(batch_size=5)
    enc._vae = torch.nn.Linear(2, 2)  # stands in for a loaded VAE
    assert persistence.is_persistent(enc)
    path = str(tmp_path / 'enc.pkl')
    persistence.save_pickle(dict(encoder=enc), path)
    for trust in (False, True):
        loaded = persistence.load_pickle(path, trust=trust)['encoder']
        assert loaded._vae is None and loaded.batch_size == 5 and loaded.vae_name == VAE_NAME
        np.testing.assert_array_equal(loaded.scale, enc.scale)
        np.testing.assert_array_equal(loaded.bias, enc.bias)
    assert enc._vae is not None  # pickling left the live object alone
    reduced = enc.__reduce__()
    assert reduced[1][0]['state']['_vae'] is None

def test_rgb_encoder_pickle_round_trip():
    buf = io.BytesIO()
    pickle.dump(encoders.StandardRGBEncoder(), buf)
    buf.seek(0)
    enc = persistence.load_pickle(buf)
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert type(enc).__name__ == 'StandardRGBEncoder'
    assert torch.equal(enc.decode(enc.encode(x)), x)

def test_module_source_only_needs_the_official_environment():
    assert persistence.check_module_src_imports(inspect.getsource(encoders), extra_allowed=['diffusers']) == []

#----------------------------------------------------------------------------
# The VAE path, with a tiny randomly initialised AutoencoderKL.

@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty dnnlib cache in tmp_path, Hugging Face forced offline, env restored afterwards."""
    hub = pytest.importorskip('huggingface_hub', reason='diffusers/huggingface_hub not installed')
    pytest.importorskip('diffusers', reason='diffusers not installed')
    monkeypatch.setattr(hub.constants, 'HF_HUB_OFFLINE', True)  # never touch the network
    for key in ('HF_HOME', 'HF_HUB_DISABLE_SYMLINKS_WARNING', 'HF_HUB_DISABLE_PROGRESS_BARS'):
        monkeypatch.setenv(key, os.environ.get(key, ''))
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    dnnlib.util.set_cache_dir(None)
    return tmp_path / 'cache'

def _tiny_vae():
    import diffusers
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16).eval()

def _seed_hf_cache(cache_root, vae, name=VAE_NAME):
    """Store `vae` where Hugging Face keeps a downloaded model: <cache>/models--org--name/{refs/main,snapshots/<commit>}."""
    repo = os.path.join(str(cache_root), 'diffusers', 'models--' + name.replace('/', '--'))
    vae.save_pretrained(os.path.join(repo, 'snapshots', COMMIT))
    os.makedirs(os.path.join(repo, 'refs'))
    with open(os.path.join(repo, 'refs', 'main'), 'w') as f:
        f.write(COMMIT)

def test_vae_loaded_lazily_from_cache_encodes_and_decodes(offline_cache):
    vae = _tiny_vae()
    _seed_hf_cache(offline_cache, vae)
    enc = encoders.StabilityVAEEncoder(batch_size=3)
    assert enc._vae is None
    pixels = torch.randint(0, 256, [5, 3, 16, 16], dtype=torch.uint8)
    raw = enc.encode_pixels(pixels)
    assert enc._vae is not None and not enc._vae.training
    assert not any(p.requires_grad for p in enc._vae.parameters())
    assert os.environ['HF_HOME'] == str(offline_cache / 'diffusers')
    assert raw.shape == (5, 8, 8, 8) and raw.dtype == torch.float32

    with torch.no_grad():  # reference: the VAE on [0, 1] pixels, whole batch at once
        dist = vae.encode(pixels.float() / 255)['latent_dist']
    torch.testing.assert_close(raw, torch.cat([dist.mean, dist.std], dim=1), rtol=1e-4, atol=1e-5)

    torch.manual_seed(2)
    final = enc.encode_latents(raw)
    torch.manual_seed(2)
    z = dist.mean + torch.randn_like(dist.mean) * dist.std
    scale, bias = torch.tensor(enc.scale).reshape(1, 4, 1, 1), torch.tensor(enc.bias).reshape(1, 4, 1, 1)
    torch.testing.assert_close(final, z * scale + bias, rtol=1e-4, atol=1e-5)

    decoded = enc.decode(final)
    assert decoded.shape == (5, 3, 16, 16) and decoded.dtype == torch.uint8
    with torch.no_grad():
        ref = vae.decode((final - bias) / scale)['sample'].clamp(0, 1).mul(255)
    assert (decoded.int() - ref.to(torch.uint8).int()).abs().max() <= 1  # truncation of nearly equal floats
    assert (decoded.float() - ref).abs().max() < 1.01

def test_vae_from_local_directory(offline_cache, tmp_path):
    vae = _tiny_vae()
    vae.save_pretrained(str(tmp_path / 'my-vae'))
    enc = encoders.StabilityVAEEncoder(vae_name=str(tmp_path / 'my-vae'), batch_size=2)
    enc.init(torch.device('cpu'))
    pixels = torch.full([3, 3, 16, 16], 200, dtype=torch.uint8)
    assert enc.encode(pixels).shape == (3, 4, 8, 8)
    enc.init(torch.device('cpu'))  # second init keeps the loaded VAE

def test_vae_missing_offline_gives_one_clear_error(offline_cache):
    with pytest.raises(OSError) as info:
        encoders.load_stability_vae(VAE_NAME)
    message = str(info.value)
    assert '\n' not in message
    assert VAE_NAME in message and str(offline_cache / 'diffusers') in message
    if hasattr(dnnlib.util, 'DownloadError'):
        assert isinstance(info.value, dnnlib.util.DownloadError)

#----------------------------------------------------------------------------
