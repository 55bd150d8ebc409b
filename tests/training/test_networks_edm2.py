"""Tests for training/networks_edm2.py: layout, invariants, and fast paths vs the plain path."""

import copy

import numpy as np
import pytest
import torch

from training import networks_edm2 as N
from tests.tiny import make_tiny_precond, tiny_kwargs

#----------------------------------------------------------------------------
# Layout: parameter counts and state-dict keys.

# (img_resolution 64, img_channels, label_dim, model_channels) -> millions of parameters, 2 decimals.
PRESET_PARAMS_M = {
    'edm2-img512-xxs': (4, 1000, 64, 31.31),
    'edm2-img512-xs': (4, 1000, 128, 124.71),
    'edm2-img512-s': (4, 1000, 192, 280.21),
    'edm2-img512-m': (4, 1000, 256, 497.81),
    'edm2-img512-l': (4, 1000, 320, 777.50),
    'edm2-img512-xl': (4, 1000, 384, 1119.28),
    'edm2-img512-xxl': (4, 1000, 448, 1523.16),
    'edm2-img64-xs': (3, 1000, 128, 124.71),
    'edm2-img64-s': (3, 1000, 192, 280.21),
    'edm2-img64-m': (3, 1000, 256, 497.80),
    'edm2-img64-l': (3, 1000, 320, 777.49),
    'edm2-img64-xl': (3, 1000, 384, 1119.28),
    'edm2-img512-s-uncond': (4, 0, 192, 279.44),
}


def _meta_precond(img_channels, label_dim, model_channels, **kwargs):
    with torch.device('meta'):
        return N.Precond(64, img_channels, label_dim, model_channels=model_channels, **kwargs)


@pytest.mark.parametrize('preset', sorted(PRESET_PARAMS_M))
def test_preset_parameter_counts(preset):
    img_channels, label_dim, channels, millions = PRESET_PARAMS_M[preset]
    net = _meta_precond(img_channels, label_dim, channels)
    count = sum(p.numel() for p in net.parameters())
    assert round(count / 1e6, 2) == pytest.approx(millions, abs=1e-9)
    assert len(list(net.parameters())) == (199 if label_dim else 198)
    assert len(list(net.buffers())) == 4


def test_exact_parameter_counts_xs_and_xxl():
    assert sum(p.numel() for p in _meta_precond(4, 1000, 128).parameters()) == 124_713_253
    assert sum(p.numel() for p in _meta_precond(4, 1000, 448).parameters()) == 1_523_164_773


def test_encoder_decoder_layout_64():
    net = _meta_precond(4, 1000, 128)
    C = 128
    enc = net.unet.enc
    assert list(enc) == ['64x64_conv', '64x64_block0', '64x64_block1', '64x64_block2',
                         '32x32_down', '32x32_block0', '32x32_block1', '32x32_block2',
                         '16x16_down', '16x16_block0', '16x16_block1', '16x16_block2',
                         '8x8_down', '8x8_block0', '8x8_block1', '8x8_block2']
    dec_expected = [('8x8_in0', 4, 4), ('8x8_in1', 4, 4)]
    dec_expected += [(f'8x8_block{i}', c, 4) for i, c in enumerate([8, 8, 8, 7])]
    dec_expected += [('16x16_up', 4, 4)] + [(f'16x16_block{i}', c, 3) for i, c in enumerate([7, 6, 6, 5])]
    dec_expected += [('32x32_up', 3, 3)] + [(f'32x32_block{i}', c, 2) for i, c in enumerate([5, 4, 4, 3])]
    dec_expected += [('64x64_up', 2, 2)] + [(f'64x64_block{i}', c, 1) for i, c in enumerate([3, 2, 2, 2])]
    assert list(net.unet.dec) == [name for name, _, _ in dec_expected]
    for name, cin, cout in dec_expected:
        block = net.unet.dec[name]
        assert tuple(block.conv_res0.weight.shape) == (cout * C, cin * C, 3, 3), name
        assert (block.conv_skip is not None) == (cin != cout), name
    heads = {name: block.num_heads for name, block in net.unet.dec.items()}
    assert heads['8x8_in0'] == 8 and heads['8x8_in1'] == 0      # deepest in0 always has attention
    assert heads['16x16_block0'] == 6 and heads['32x32_block0'] == 0
    assert net.unet.enc['16x16_down'].num_heads == 0 and net.unet.enc['16x16_block0'].num_heads == 6


def test_state_dict_keys_follow_official_naming():
    net = make_tiny_precond(label_dim=10)
    sd = net.state_dict()
    keys = list(sd)
    assert keys[:5] == ['unet.out_gain', 'unet.emb_fourier.freqs', 'unet.emb_fourier.phases',
                        'unet.emb_noise.weight', 'unet.emb_label.weight']
    assert keys[-4:] == ['unet.out_conv.weight', 'logvar_fourier.freqs', 'logvar_fourier.phases',
                         'logvar_linear.weight']
    assert keys[5] == 'unet.enc.16x16_conv.weight'
    assert tuple(sd['unet.enc.16x16_conv.weight'].shape) == (8, 4, 3, 3)
    assert tuple(sd['unet.emb_label.weight'].shape) == (16, 10)
    assert tuple(sd['logvar_linear.weight'].shape) == (1, 128)
    block_order = ['emb_gain', 'conv_res0.weight', 'emb_linear.weight', 'conv_res1.weight',
                   'conv_skip.weight', 'attn_qkv.weight', 'attn_proj.weight']
    for prefix in ['unet.enc.8x8_block0', 'unet.dec.8x8_in0', 'unet.dec.16x16_block1']:
        sub = [k[len(prefix) + 1:] for k in keys if k.startswith(prefix + '.')]
        assert sub == [k for k in block_order if k in sub]
    assert tuple(sd['unet.enc.8x8_block0.attn_qkv.weight'].shape) == (48, 16, 1, 1)
    assert tuple(sd['unet.enc.8x8_block0.conv_skip.weight'].shape) == (16, 8, 1, 1)
    assert tuple(sd['unet.dec.16x16_block1.conv_res0.weight'].shape) == (8, 16, 3, 3)
    assert 'unet.emb_label.weight' not in make_tiny_precond(label_dim=0).state_dict()


def test_official_init_gives_c_skip_times_x():
    net = make_tiny_precond(out_gain=None)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 2.0])
    D, logvar = net(x, sigma, return_logvar=True)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    assert torch.equal(D, c_skip.reshape(-1, 1, 1, 1) * x)
    assert logvar.shape == (2, 1, 1, 1) and logvar.abs().sum() > 0

#----------------------------------------------------------------------------
# Magnitude-preserving invariants (EDM2 paper, Sec. 2; eqs. 47, 66, 75, 81, 88, 103).

def _rms(x):
    return x.float().square().mean().sqrt().item()


def test_primitives_preserve_magnitude():
    torch.manual_seed(0)
    a, b = torch.randn(64, 32, 16, 16), torch.randn(64, 48, 16, 16)
    assert _rms(N.mp_silu(a)) == pytest.approx(1, abs=0.02)
    assert _rms(N.mp_sum(a, torch.randn_like(a), t=0.3)) == pytest.approx(1, abs=0.02)
    assert _rms(N.mp_cat(a, b, t=0.5)) == pytest.approx(1, abs=0.02)
    assert _rms(N.normalize(3 * a, dim=1)) == pytest.approx(1, abs=1e-3)
    wa, wb = N._mp_cat_coefs(32, 48, 0.7)
    cat = N.mp_cat(a, b, t=0.7)
    assert torch.allclose(cat[:, :32], wa * a) and torch.allclose(cat[:, 32:], wb * b)


def test_mpconv_and_block_preserve_magnitude_at_init():
    torch.manual_seed(0)
    x = torch.randn(16, 32, 16, 16)
    conv = N.MPConv(32, 24, [3, 3])
    assert _rms(conv(x)) == pytest.approx(1, abs=0.1)
    linear = N.MPConv(32, 24, [])
    assert _rms(linear(torch.randn(256, 32))) == pytest.approx(1, abs=0.1)
    emb = N.mp_silu(torch.randn(16, 64))
    for kwargs in [dict(flavor='enc'), dict(flavor='dec', attention=True, channels_per_head=8),
                   dict(flavor='enc', resample_mode='down'), dict(flavor='dec', resample_mode='up')]:
        block = N.Block(32, 32, 64, **kwargs)
        assert _rms(block(x, emb)) == pytest.approx(1, abs=0.15), kwargs


def test_forced_weight_normalisation_in_training_mode_only():
    for enabled in [False, True]:
        net = make_tiny_precond(train=False)
        net.set_fast(enabled)
        convs = [m for m in net.modules() if isinstance(m, N.MPConv)]
        before = [c.weight.detach().clone() for c in convs]
        net(torch.randn(2, 3, 16, 16), torch.ones(2))
        assert all(torch.equal(b, c.weight) for b, c in zip(before, convs))   # eval: untouched
        net.train()
        net(torch.randn(2, 3, 16, 16), torch.ones(2), return_logvar=True)
        for conv in convs:
            w = conv.weight.detach()
            rms = w.flatten(1).square().mean(dim=1).sqrt()
            assert torch.allclose(rms, torch.ones_like(rms), atol=2e-4), conv


def test_resample_filters():
    x = torch.randn(2, 5, 8, 8)
    assert torch.allclose(N.resample(x, mode='down'), torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)
    assert torch.equal(N.resample(x, mode='up'), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    for dtype in [torch.float32, torch.bfloat16]:
        xd = x.to(dtype)
        assert torch.equal(N._resample_fast(xd, [1, 1], 'up'), N.resample(xd, mode='up'))
        assert torch.equal(N._resample_fast(xd, [1, 1], 'down'), N.resample(xd, mode='down'))
    smooth = N.resample(x, f=[1, 3, 3, 1], mode='down')
    assert smooth.shape == (2, 5, 4, 4)
    assert torch.allclose(smooth.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.2)

#----------------------------------------------------------------------------
# Fast paths equal the plain path (float32, CPU).

FAST_CASES = {
    'defaults': {},
    'fused_only': dict(weight_cache=False, sdpa=False),
    'cache_only': dict(fused=False, sdpa=False),
    'sdpa_only': dict(fused=False, weight_cache=False),
    'channels_last': dict(channels_last=True),
}


def _inputs(label_dim, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 16, 16, generator=g)
    sigma = torch.rand(batch, generator=g) * 5 + 0.02
    labels = torch.nn.functional.one_hot(torch.arange(batch) % max(label_dim, 1), max(label_dim, 1)).float()
    return x, sigma, (labels if label_dim else None)


def _run(net, x, sigma, labels, train):
    torch.manual_seed(7)   # same dropout masks
    net.zero_grad(set_to_none=True)
    D, logvar = net(x, sigma, labels, return_logvar=True)
    if not train:
        return D, logvar, {}
    (D.square().sum() + logvar.sum()).backward()
    return D, logvar, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('case', sorted(FAST_CASES))
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('label_dim,give_labels', [(0, False), (4, False), (4, True)],
                         ids=['uncond', 'cond-nolabel', 'cond'])
def test_fast_path_matches_plain(case, train, label_dim, give_labels):
    # channels_last draws dropout masks in memory order (same distribution, other elements): no dropout there.
    dropout = 0.1 if train and case != 'channels_last' else 0
    base = make_tiny_precond(label_dim=label_dim, train=train, dropout=dropout)
    x, sigma, labels = _inputs(label_dim)
    labels = labels if give_labels else None
    plain, fast = copy.deepcopy(base), copy.deepcopy(base)
    plain.set_fast(False)
    fast.set_fast(True, **FAST_CASES[case])
    for _ in range(2):   # second round: weights after forced normalisation / from the cache
        D0, u0, g0 = _run(plain, x, sigma, labels, train)
        D1, u1, g1 = _run(fast, x, sigma, labels, train)
        assert (D0 - D1).abs().max().item() <= 1e-5
        assert (u0 - u1).abs().max().item() <= 1e-5
        assert g0.keys() == g1.keys()
        for name in g0:   # gradients are long sums (scalar gains: over whole activations): relative 1e-4
            scale = max(1.0, g0[name].abs().max().item())
            assert (g0[name] - g1[name]).abs().max().item() <= 1e-4 * scale, name
        for p0, p1 in zip(plain.parameters(), fast.parameters()):
            assert (p0 - p1).abs().max().item() <= 1e-5


def test_fused_normalized_weight_gradcheck():
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    gain = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    fn = lambda w, g: N._NormalizedWeight.apply(w, g, None, 1e-4, torch.float64)
    assert torch.autograd.gradcheck(fn, (w, gain))
    w32, gain32 = w.detach().float(), gain.detach().float()
    plain = N.normalize(w32) * (gain32 / np.sqrt(27))
    assert torch.allclose(N._NormalizedWeight.apply(w32, gain32, None, 1e-4, torch.float32), plain, atol=1e-6)


def test_bf16_compute_dtype_is_close_to_fp32():
    net = make_tiny_precond(label_dim=4)
    x, sigma, labels = _inputs(4)
    with torch.no_grad():
        ref = net(x, sigma, labels)
        net.set_fast(dtype='bf16')
        assert net.compute_dtype(x) == torch.bfloat16 and net.compute_dtype(x, force_fp32=True) == torch.float32
        out = net(x, sigma, labels)
    assert out.dtype == torch.float32
    assert 0 < (out - ref).abs().max().item() < 0.1


def test_compile_flag_traces_whole_net_in_one_graph():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    net = make_tiny_precond(label_dim=4)
    x, sigma, labels = _inputs(4)
    with torch.no_grad():
        ref = net(x, sigma, labels)
        net.set_fast(compile='eager')   # dynamo tracing without inductor code generation (fast to test)
        out = net(x, sigma, labels)
    assert (out - ref).abs().max().item() <= 1e-5
    assert sum(counters['graph_break'].values()) == 0, dict(counters['graph_break'])
    assert counters['stats']['unique_graphs'] == 1


def test_unknown_switch_is_rejected():
    with pytest.raises(ValueError, match='warp'):
        make_tiny_precond().set_fast(warp=True)
    with pytest.raises(ValueError, match='fp8'):
        make_tiny_precond().set_fast(dtype='fp8')

#----------------------------------------------------------------------------
# Weight cache: reuse and invalidation.

def _plain_reference(net, x, sigma):
    ref = copy.deepcopy(net)
    ref.set_fast(False)
    with torch.no_grad():
        return ref(x, sigma)


def test_weight_cache_is_reused_between_calls():
    net = make_tiny_precond()
    x, sigma, _ = _inputs(0)
    with torch.no_grad():
        net(x, sigma)
        cached = net.unet.out_conv.__dict__['_wcache'][1]
        net(x, sigma)
    assert net.unet.out_conv.__dict__['_wcache'][1] is cached


def test_weight_cache_invalidated_by_optimizer_step_and_ema():
    net = make_tiny_precond()
    x, sigma, _ = _inputs(0)
    with torch.no_grad():
        before = net(x, sigma)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    net(x, sigma).square().mean().backward()
    opt.step()
    net.eval()
    with torch.no_grad():
        after = net(x, sigma)
        assert (after - before).abs().max() > 1e-3
        assert (after - _plain_reference(net, x, sigma)).abs().max().item() <= 1e-5
        other = make_tiny_precond(seed=3)
        for p, q in zip(net.parameters(), other.parameters()):
            p.lerp_(q, 0.5)   # EMA-style in-place update
        assert (net(x, sigma) - _plain_reference(net, x, sigma)).abs().max().item() <= 1e-5


def test_weight_cache_invalidated_by_load_state_dict_and_dtype_change():
    net, other = make_tiny_precond(seed=0), make_tiny_precond(seed=5)
    x, sigma, _ = _inputs(0)
    with torch.no_grad():
        net(x, sigma)
        net.load_state_dict(other.state_dict())
        assert (net(x, sigma) - other(x, sigma)).abs().max().item() <= 1e-5
        half = net.to(torch.float16)
        expected = _plain_reference(half, x, sigma)
        assert (half(x, sigma) - expected).abs().max().item() <= 1e-5


def test_cache_not_used_when_weight_gradients_are_needed():
    net = make_tiny_precond()
    x, sigma, _ = _inputs(0)
    with torch.no_grad():
        net(x, sigma)
    net(x, sigma).sum().backward()   # eval mode but grad enabled
    assert net.unet.out_conv.weight.grad is not None and net.unet.out_conv.weight.grad.abs().sum() > 0

#----------------------------------------------------------------------------
# Precond conventions (Karras et al. 2022 (EDM), eq. 7 and Table 1; log-variance: EDM2 paper eq. 21)
# and runtime state outside pickles.

def test_precond_label_and_sigma_conventions():
    net = make_tiny_precond(label_dim=4)
    x, sigma, labels = _inputs(4)
    with torch.no_grad():
        no_label = net(x, sigma)
        zeros = net(x, sigma, torch.zeros(3, 4))
        assert torch.allclose(no_label, zeros, atol=1e-6)
        assert (net(x, sigma, labels) - no_label).abs().max() > 1e-3
        scalar = net(x, torch.tensor(1.5))
        assert torch.allclose(scalar, net(x, torch.full([3], 1.5)), atol=1e-6)
        uncond = make_tiny_precond(label_dim=0)
        assert torch.equal(uncond(x, sigma, labels), uncond(x, sigma))
        assert net.compute_dtype(x) == torch.float32   # use_fp16 applies only on CUDA
        assert make_tiny_precond(use_fp16=True).compute_dtype(x) == torch.float32


def test_runtime_state_not_pickled_and_deepcopy_resets_switches():
    net = make_tiny_precond()
    net.set_fast(sdpa=False)
    with torch.no_grad():
        net(*_inputs(0)[:2])
    conv = net.unet.out_conv
    assert '_wcache' in conv.__dict__
    assert not {'fast', '_wcache'} & set(conv.__getstate__())
    assert 'fast' not in net.__getstate__()
    clone = copy.deepcopy(net)
    assert clone.unet.out_conv.fast == N.FAST_DEFAULTS and '_wcache' not in clone.unet.out_conv.__dict__
    assert dict(net.init_kwargs) == tiny_kwargs()   # persistence records constructor kwargs only


def test_persistent_pickle_roundtrip(tmp_path):
    from torch_utils import persistence
    net = make_tiny_precond(label_dim=4)
    with torch.no_grad():
        ref = net(*_inputs(4)[:2])
    path = tmp_path / 'net.pkl'
    persistence.save_pickle(net, str(path))
    loaded = persistence.load_pickle(str(path))
    assert type(loaded).__name__ == 'Precond' and persistence.is_persistent(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(*_inputs(4)[:2]), ref)


def test_weight_cache_never_serves_weights_of_freed_tensors():
    # Swapping in new tensors (assign=True) frees the old ones; a new tensor allocated at a freed
    # address with version 0 must not hit the old cache entry.
    torch.manual_seed(0)
    net = make_tiny_precond(train=False, label_dim=0)
    x, sigma = torch.randn(2, net.img_channels, net.img_resolution, net.img_resolution), torch.tensor([1.0, 2.0])

    def random_state():
        return {k: torch.randn_like(v) if k.endswith(('weight', 'gain')) else v.clone() for k, v in net.state_dict().items()}

    for _ in range(5):
        net.load_state_dict(random_state(), assign=True)
        with torch.no_grad():
            net(x, sigma)                                 # fills the cache
        net.load_state_dict(random_state(), assign=True)  # frees the cached tensors' originals
        net.load_state_dict(random_state(), assign=True)  # may be allocated at their addresses
        with torch.no_grad():
            fast = net(x, sigma)
            N.set_fast(net, False)
            plain = net(x, sigma)
            N.set_fast(net, True)
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
