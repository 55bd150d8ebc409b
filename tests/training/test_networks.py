"""Tests of training/networks.py (EDM v1): published parameter counts, state-dict layout, layers and
preconditioners against the equations, pickles in both directions, fast paths."""

import copy
import importlib
import inspect
import io
import math
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests import tiny_edm1
from tests.procs import REPO
from torch_utils import persistence
from training import networks
from training.loop import edm1_presets


@pytest.fixture(autouse=True)
def _safe_by_default(monkeypatch):
    monkeypatch.delenv('EDM2_TRUST_PICKLE', raising=False)


def _inputs(net, n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn([n, net.img_channels, net.img_resolution, net.img_resolution], generator=gen)
    sigma = torch.tensor([0.01, 0.7, 25.0][:n], dtype=torch.float32)
    labels = torch.eye(net.label_dim)[torch.arange(n) % net.label_dim] if net.label_dim else None
    return x, sigma, labels

#----------------------------------------------------------------------------
# Published configurations.

# (all parameters, parameters the official training log's module summary reports). The summary counts
# only layers that a forward pass without augmentation labels runs, so it leaves out map_augment
# (9 x noise channels: 9 x 128 for DDPM++, 9 x 256 for NCSN++); ImageNet is trained without augmentation.
PUBLISHED_COUNTS = {
    'edm-cifar10-32x32-cond-vp':    (55_735_299, 55_734_147),
    'edm-cifar10-32x32-cond-ve':    (56_400_643, 56_398_339),
    'edm-ffhq-64x64-uncond-vp':     (61_805_571, 61_804_419),
    'edm-afhqv2-64x64-uncond-vp':   (61_805_571, 61_804_419),
    'edm-imagenet-64x64-cond-adm':  (295_899_267, 295_899_267),
}


@pytest.mark.parametrize('name', list(PUBLISHED_COUNTS))
def test_published_parameter_counts(name):
    net = edm1_presets.construct_edm1_network(edm1_presets.edm1_model_network_kwargs(name), device='meta')
    total = sum(p.numel() for p in net.parameters())
    summary = sum(p.numel() for n, p in net.named_parameters() if not n.startswith('model.map_augment.'))
    assert (total, summary) == PUBLISHED_COUNTS[name]
    assert type(net) is networks.EDMPrecond


def test_published_model_options():
    cifar = edm1_presets.edm1_model_network_kwargs('edm-cifar10-32x32-cond-ve')
    assert cifar['class_name'] == 'training.networks.EDMPrecond' and cifar['model_type'] == 'SongUNet'
    assert cifar['embedding_type'] == 'fourier' and cifar['encoder_type'] == 'residual' and cifar['label_dim'] == 10
    assert cifar['augment_dim'] == 9 and cifar['dropout'] == 0.13 and cifar['resample_filter'] == [1, 3, 3, 1]
    imagenet = edm1_presets.edm1_model_network_kwargs('edm-imagenet-64x64-cond-adm')
    assert 'augment_dim' not in imagenet and imagenet['use_fp16'] and imagenet['label_dim'] == 1000
    afhq = edm1_presets.edm1_model_network_kwargs('edm-afhqv2-64x64-uncond-ve')
    assert afhq['channel_mult'] == [1, 2, 2, 2] and afhq['dropout'] == 0.25 and afhq['label_dim'] == 0
    vp = edm1_presets.edm1_network_kwargs('ddpmpp', 'vp', cbase=32, cres=[1, 2])
    assert vp['class_name'] == 'training.networks.VPPrecond' and vp['model_channels'] == 32
    with pytest.raises(ValueError, match='Invalid arch'):
        edm1_presets.edm1_network_kwargs('unet')

#----------------------------------------------------------------------------
# State-dict layout.


def test_state_dict_names_follow_the_layout():
    song = tiny_edm1.make_tiny_edm1('VPPrecond', 'ddpmpp')
    keys = set(song.state_dict())
    for key in ('model.map_label.weight', 'model.map_augment.weight', 'model.map_layer0.bias', 'model.map_layer1.weight',
                'model.enc.16x16_conv.weight', 'model.enc.8x8_down.skip.weight', 'model.enc.8x8_down.conv0.resample_filter',
                'model.enc.8x8_block0.qkv.weight', 'model.dec.8x8_in0.proj.bias', 'model.dec.16x16_up.skip.resample_filter',
                'model.dec.16x16_aux_norm.weight', 'model.dec.16x16_aux_conv.weight'):
        assert key in keys, key
    assert 'model.map_augment.bias' not in keys and 'model.dec.8x8_in1.qkv.weight' not in keys
    assert 'model.dec.8x8_block0.qkv.weight' not in keys and 'model.dec.8x8_block1.qkv.weight' in keys
    assert song.state_dict()['model.enc.8x8_block0.qkv.weight'].shape == (96, 32, 1, 1)

    ncsn = tiny_edm1.make_tiny_edm1('VEPrecond', 'ncsnpp')
    assert ncsn.state_dict()['model.map_noise.freqs'].shape == (16,)   # 2 x 16 noise channels, half cos half sin
    assert ncsn.state_dict()['model.enc.8x8_aux_residual.weight'].shape == (16, 3, 3, 3)
    assert ncsn.state_dict()['model.enc.8x8_down.skip.resample_filter'].shape == (1, 1, 4, 4)

    adm = tiny_edm1.make_tiny_edm1('iDDPMPrecond', 'adm')
    keys = set(adm.state_dict())
    assert 'model.map_label.bias' not in keys and 'model.enc.8x8_down.skip.weight' not in keys   # resampling only
    assert adm.state_dict()['model.out_conv.weight'].shape == (6, 32, 3, 3)   # mean and variance channels
    assert adm.state_dict()['u'].shape == (1001,)
    assert adm.state_dict()['model.enc.16x16_block0.affine.weight'].shape == (64, 128)   # scale and shift

    skip = tiny_edm1.make_tiny_edm1('EDMPrecond', 'skip')
    for key in ('model.enc.8x8_aux_skip.weight', 'model.enc.8x8_aux_down.resample_filter',
                'model.dec.16x16_aux_up.resample_filter', 'model.dec.8x8_aux_conv.weight'):
        assert key in skip.state_dict(), key


@pytest.mark.parametrize('precond, arch', [('VPPrecond', 'ddpmpp'), ('iDDPMPrecond', 'adm')])
def test_state_dict_loads_one_to_one(precond, arch):
    source = tiny_edm1.make_tiny_edm1(precond, arch, seed=3)
    target = getattr(networks, precond)(**tiny_edm1.tiny_kwargs(arch)).eval()
    assert [(k, v.shape) for k, v in target.state_dict().items()] == [(k, v.shape) for k, v in source.state_dict().items()]
    target.load_state_dict(source.state_dict(), strict=True)
    x, sigma, labels = _inputs(source)
    assert torch.equal(target(x, sigma, labels), source(x, sigma, labels))
    assert target.init_kwargs == tiny_edm1.tiny_kwargs(arch)

#----------------------------------------------------------------------------
# Layers against closed forms.


def test_positional_and_fourier_embeddings():
    x = torch.tensor([0.0, 1.5, -3.0])
    for endpoint, denominator in ((False, 4), (True, 3)):
        emb = networks.PositionalEmbedding(num_channels=8, endpoint=endpoint)(x)
        freqs = np.array([(1 / 10000) ** (i / denominator) for i in range(4)])
        angles = np.outer(x.numpy(), freqs)
        np.testing.assert_allclose(emb.numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1), rtol=1e-6, atol=1e-6)
    fourier = networks.FourierEmbedding(num_channels=6, scale=16)
    angles = 2 * np.pi * np.outer(x.numpy(), fourier.freqs.numpy())
    np.testing.assert_allclose(fourier(x).numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1), rtol=1e-5, atol=1e-4)


def test_conv2d_resampling():
    x = torch.randn(2, 3, 8, 8)
    down = networks.Conv2d(3, 3, kernel=0, down=True)   # [1,1] filter: 2x2 box average
    torch.testing.assert_close(down(x), torch.nn.functional.avg_pool2d(x, 2))
    up = networks.Conv2d(3, 3, kernel=0, up=True)       # [1,1] filter: nearest neighbour
    torch.testing.assert_close(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert not [p for p in down.parameters()]
    smooth = networks.Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    f = torch.tensor([1.0, 3, 3, 1]) / 8
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, [1, 1, 1, 1]), torch.outer(f, f).expand(3, 1, 4, 4),
                                     groups=3, stride=2)
    torch.testing.assert_close(smooth(x), ref)
    conv = networks.Conv2d(3, 5, kernel=3, init_bias=1)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))


def test_group_norm_group_rule():
    assert networks.GroupNorm(256).num_groups == 32 and networks.GroupNorm(48).num_groups == 12
    norm = networks.GroupNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 4, 4)
    groups = x.reshape(2, 2, -1)
    ref = ((groups - groups.mean(2, keepdim=True)) / (groups.var(2, unbiased=False, keepdim=True) + 1e-6).sqrt())
    ref = ref.reshape(2, 8, 4, 4) * norm.weight.reshape(1, -1, 1, 1) + norm.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), ref)


def _attention_reference(block, x):
    """Multi-head self-attention of the block's qkv output (channels ordered [head, channel, q/k/v])."""
    n, c, h, w = x.shape
    heads = block.num_heads
    qkv = block.qkv(block.norm2(x)).reshape(n, heads, c // heads, 3, h * w).double()
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    weights = torch.softmax(torch.einsum('nhcq,nhck->nhqk', q, k) / math.sqrt(c // heads), dim=3)
    a = torch.einsum('nhqk,nhck->nhcq', weights, v).reshape(n, c, h, w).float()
    return (block.proj(a) + x) * block.skip_scale


@pytest.mark.parametrize('sdpa', [False, True])
def test_attention_matches_multi_head_softmax(sdpa):
    torch.manual_seed(0)
    block = networks.UNetBlock(16, 16, emb_channels=8, attention=True, channels_per_head=8, init_zero=dict())
    tiny_edm1.randomize(block)
    networks.set_fast(block, sdpa=sdpa)
    x = torch.randn(2, 16, 4, 4)
    assert block.num_heads == 2
    torch.testing.assert_close(block._attention(x), _attention_reference(block, x), rtol=1e-5, atol=1e-5)


def test_attention_op_gradient():
    q = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    dw = torch.randn(3, 5, 6, dtype=torch.float64)
    torch.autograd.backward(networks.AttentionOp.apply(q.float(), k.float()), dw.float())
    grads = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    torch.autograd.backward(torch.einsum('ncq,nck->nqk', q, k / 2).softmax(dim=2), dw)
    torch.testing.assert_close(grads[0], q.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], k.grad, rtol=1e-4, atol=1e-5)

#----------------------------------------------------------------------------
# Preconditioners against Table 1.


def _vp_sigma(t, beta_d=19.9, beta_min=0.1):
    return np.sqrt(np.exp(0.5 * beta_d * t ** 2 + beta_min * t) - 1)


def _iddpm_table(M=1000, C_1=0.001, C_2=0.008):
    alpha_bar = lambda j: np.sin(0.5 * np.pi * j / M / (C_2 + 1)) ** 2
    u = np.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C_1) - 1)
    return u


def _scalings(net, sigma):
    """(c_skip, c_out, c_in, c_noise) of Table 1, float64."""
    name = type(net).__name__
    if name == 'VPPrecond':
        t = (np.sqrt(0.1 ** 2 + 2 * 19.9 * np.log(1 + sigma ** 2)) - 0.1) / 19.9
        return 1, -sigma, 1 / np.sqrt(sigma ** 2 + 1), 999 * t
    if name == 'VEPrecond':
        return 1, sigma, 1, np.log(sigma / 2)
    if name == 'iDDPMPrecond':
        index = np.abs(sigma[:, None] - _iddpm_table()[None, :]).argmin(1)
        return 1, -sigma, 1 / np.sqrt(sigma ** 2 + 1), 999 - index
    sd = 0.5
    return sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / np.sqrt(sigma ** 2 + sd ** 2), 1 / np.sqrt(sigma ** 2 + sd ** 2), np.log(sigma) / 4


def _reference_denoiser(net, x, sigma, labels):
    """D = c_skip x + c_out F(c_in x; c_noise), F = the wrapped U-Net's raw output (first img_channels)."""
    c_skip, c_out, c_in, c_noise = [torch.tensor(np.broadcast_to(c, sigma.shape)).reshape(-1, 1, 1, 1)
                                    for c in _scalings(net, sigma.double().numpy())]
    F = net.model((c_in * x.double()).float(), c_noise.flatten().float(), class_labels=labels)
    return (c_skip * x.double() + c_out * F[:, :net.img_channels].double()).float()


CASES = [('VPPrecond', 'ddpmpp'), ('VEPrecond', 'ncsnpp'), ('iDDPMPrecond', 'adm'), ('EDMPrecond', 'adm'),
         ('EDMPrecond', 'ddpmpp'), ('EDMPrecond', 'skip')]


@pytest.mark.parametrize('precond, arch', CASES)
def test_preconditioner_follows_table_1(precond, arch):
    net = tiny_edm1.make_tiny_edm1(precond, arch)
    x, sigma, labels = _inputs(net)
    D = net(x, sigma, labels)
    torch.testing.assert_close(D, _reference_denoiser(net, x, sigma, labels), rtol=1e-4, atol=1e-4)
    assert D.dtype == torch.float32 and D.shape == x.shape
    assert not torch.allclose(net(x, sigma, labels[[1, 2, 0]]), D)   # the labels matter
    # No labels: an all-zero label vector, whatever the batch size.
    torch.testing.assert_close(net(x, sigma), net(x, sigma, torch.zeros_like(labels)))


def test_noise_ranges_and_rounding():
    vp = networks.VPPrecond(16, 3, model_type='SongUNet', **{k: v for k, v in tiny_edm1.TINY_ARCHS['ddpmpp'].items()
                                                            if k != 'model_type'})
    # Evaluated in float32 like the original: exp(1e-6) - 1 rounds to 2^-20, so sigma_min = 2^-10, not 1.0005e-3.
    assert vp.sigma_min == 2 ** -10 and _vp_sigma(1e-5) == pytest.approx(1.0005e-3, rel=1e-4)
    assert vp.sigma_max == pytest.approx(_vp_sigma(1), rel=1e-6)
    t = torch.tensor([1e-3, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(vp.sigma_inv(vp.sigma(t)), t)
    assert torch.equal(vp.round_sigma(t), t)

    iddpm = tiny_edm1.make_tiny_edm1('iDDPMPrecond', 'adm')
    table = _iddpm_table()
    np.testing.assert_allclose(iddpm.u.numpy(), table, rtol=1e-3)   # float32 recurrence, as in the original
    assert iddpm.u[-1] == 0 and bool((iddpm.u[:-1] > iddpm.u[1:]).all())
    assert iddpm.sigma_min == float(iddpm.u[999]) and iddpm.sigma_max == float(iddpm.u[0])
    sigma = torch.tensor([[50.0, 1.0], [0.02, 1e-4]], dtype=torch.float64)
    rounded = iddpm.round_sigma(sigma)
    nearest = np.abs(sigma.numpy()[..., None] - table).argmin(-1)
    assert rounded.dtype == torch.float64 and rounded.shape == sigma.shape
    np.testing.assert_allclose(rounded.numpy(), table[nearest], rtol=1e-3)
    assert torch.equal(iddpm.round_sigma(sigma, return_index=True), torch.as_tensor(nearest))

#----------------------------------------------------------------------------
# Pickles.


def _snapshot_objects(net):
    from training import augment, loss
    return tiny_edm1.edm1_snapshot(net, loss_fn=loss.EDMLoss(P_mean=-1.0),
                                   augment_pipe=augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1))


@pytest.mark.parametrize('precond, arch', CASES[:4])
def test_v1_pickle_loads_safely_into_our_classes(precond, arch, tmp_path):
    """A v1-layout pickle whose embedded sources are not ours (and would write a marker if executed)."""
    marker = tmp_path / 'marker'
    net = tiny_edm1.make_tiny_edm1(precond, arch)
    foreign = lambda meta: f'open({str(marker)!r}, "w").write("executed")\n' + meta['module_src']
    blob = tiny_edm1.dumps_with_foreign_source(_snapshot_objects(net), foreign)
    data = persistence.load_pickle(io.BytesIO(blob))
    assert not marker.exists()
    assert type(data) is dict and sorted(data) == ['augment_pipe', 'dataset_kwargs', 'ema', 'loss_fn']
    assert type(data['ema']) is getattr(networks, precond) and type(data['ema'].model).__module__ == 'training.networks'
    assert type(data['loss_fn']).__module__ == 'training.loss' and data['loss_fn'].P_mean == -1.0
    assert type(data['augment_pipe']).__module__ == 'training.augment' and data['augment_pipe'].yflip == 1.0
    x, sigma, labels = _inputs(net)
    D = data['ema'](x, sigma, labels)
    assert torch.equal(D, net(x, sigma, labels))
    torch.testing.assert_close(D, _reference_denoiser(data['ema'], x, sigma, labels), rtol=1e-4, atol=1e-4)
    # Re-saved, it embeds our own sources and loads again.
    again = persistence.load_pickle(io.BytesIO(pickle.dumps(data)))
    assert torch.equal(again['ema'](x, sigma, labels), D)
    assert again['augment_pipe'].__dict__ == data['augment_pipe'].__dict__


def test_hostile_v1_pickles_are_refused(tmp_path):
    marker = tmp_path / 'marker'
    net = tiny_edm1.make_tiny_edm1('EDMPrecond', 'ddpmpp')

    def renamed(obj):
        fields = list(obj.__reduce__())
        fields[1] = (dict(fields[1][0], class_name='EvilPrecond'),)
        return tuple(fields)

    class Renaming(tiny_edm1.ForeignSourcePickler):
        def reducer_override(self, obj):
            return renamed(obj) if obj is net else NotImplemented

    buffer = io.BytesIO()
    Renaming(buffer, None).dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    with pytest.raises(persistence.PickleLoadError, match="refusing to load persistent class 'EvilPrecond', which is not one of this project's classes") as info:
        persistence.load_pickle(io.BytesIO(buffer.getvalue()))
    assert '\n' not in str(info.value)

    class System:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    path = tmp_path / 'network-snapshot-000000.pkl'
    path.write_bytes(pickle.dumps(dict(ema=net, loss_fn=None, augment_pipe=System(), dataset_kwargs={})))
    with pytest.raises(persistence.PickleLoadError, match=r"refusing to load global '(posix|nt)\.system'") as info:
        persistence.load_pickle(path)
    assert str(info.value).startswith(f'{path}: ') and '\n' not in str(info.value)
    assert not marker.exists()


def test_official_tools_load_our_pickles(tmp_path):
    """Fresh interpreter without our training package: plain pickle.load runs the embedded sources."""
    from training import augment, loss
    net = tiny_edm1.make_tiny_edm1('iDDPMPrecond', 'adm')
    tiny_edm1.write_edm1_snapshot(str(tmp_path / 'snapshot.pkl'), net, loss_fn=loss.VPLoss(),
                                  augment_pipe=augment.AugmentPipe(p=0.5, xflip=1e8))
    x, sigma, labels = _inputs(net)
    torch.save(dict(args=(x, sigma, labels), D=net(x, sigma, labels).detach()), tmp_path / 'expected.pt')
    script = textwrap.dedent("""
        import os, pickle, sys, torch
        sys.modules['training'] = None   # only torch_utils and dnnlib, as in the original toolkit
        with open(os.path.join(sys.argv[1], 'snapshot.pkl'), 'rb') as f:
            data = pickle.load(f)
        assert type(data['ema']).__module__.startswith('_imported_module_'), type(data['ema']).__module__
        assert type(data['ema']).__name__ == 'iDDPMPrecond' and type(data['loss_fn']).__name__ == 'VPLoss'
        expected = torch.load(os.path.join(sys.argv[1], 'expected.pt'))
        assert torch.equal(data['ema'](*expected['args']), expected['D'])
        images, labels = data['augment_pipe'](torch.zeros(2, 3, 8, 8))
        assert labels.shape == (2, 1)
        print('ok')
    """)
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE='1')
    result = subprocess.run([sys.executable, '-c', script, str(tmp_path)], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-3000:]


@pytest.mark.parametrize('module_name', ['training.networks', 'training.loss', 'training.augment'])
def test_embedded_modules_import_only_what_edm1_provides(module_name):
    src = inspect.getsource(importlib.import_module(module_name))
    assert persistence.check_module_src_imports(src) == []
    assert module_name in persistence.safe_class_modules.values()

#----------------------------------------------------------------------------
# Fast paths.


def test_fast_paths_change_rounding_only():
    net = tiny_edm1.make_tiny_edm1('EDMPrecond', 'ddpmpp')
    x, sigma, labels = _inputs(net)
    plain_config = net.set_fast(False)
    assert plain_config == networks.PLAIN and all(m.fast == networks.PLAIN for m in net.modules() if hasattr(m, 'fast'))
    plain = net(x, sigma, labels)
    for flags, tol in ((dict(), 1e-5), (dict(channels_last=True), 1e-5), (dict(dtype='bf16'), 0.1)):
        net.set_fast(True, **flags)
        out = net(x, sigma, labels)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, plain, rtol=tol, atol=tol)
    net.set_fast(True, dtype='bf16')
    state = net.__reduce__()[1][0]['state']
    assert 'fast' not in state and 'fast' not in copy.deepcopy(net).__dict__
    assert copy.deepcopy(net).fast == networks.FAST_DEFAULTS
    with pytest.raises(ValueError, match='Unknown fast-path switch "fused"'):
        net.set_fast(fused=True)
    with pytest.raises(ValueError, match='Invalid fast-path dtype'):
        net.set_fast(dtype='fp8')
