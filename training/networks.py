"""EDM v1 networks: the DDPM++, NCSN++ and ADM U-Nets and the four preconditioners of
Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM).

Architectures (EDM paper, Appendix F.2):
  SongUNet      DDPM++ (positional noise embedding, standard encoder) and NCSN++ (Fourier
                embedding, residual encoder, [1,3,3,1] resampling) of Song et al. 2021,
                "Score-Based Generative Modeling through Stochastic Differential Equations".
  DhariwalUNet  ADM of Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis".

Preconditioners (EDM paper, Table 1): the denoiser is
    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F((c_in(sigma) x); c_noise(sigma))
  VPPrecond     variance preserving (Song et al. 2021), sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
  VEPrecond     variance exploding (Song et al. 2021)
  iDDPMPrecond  improved DDPM (Nichol & Dhariwal 2021): discrete noise levels u_j, cosine schedule
  EDMPrecond    the EDM design (sigma_data = 0.5)

Class names, constructor arguments and defaults, sub-module names, attributes and state-dict keys
are those of the module `training/networks.py` that EDM v1 pickles store, so official weights load
one to one and our pickles of these classes load in EDM v1's own tools. This file is embedded in
those pickles and executed there, so it imports only numpy, torch and torch_utils.persistence.

Fast paths
----------
Every preconditioner and U-Net block reads a dict of switches, ``fast``; ``set_fast(net, ...)`` or
``net.set_fast(...)`` changes it for the whole network, ``set_fast(net, False)`` restores the plain
path (the original computation op for op).

  sdpa           True   attention through torch.nn.functional.scaled_dot_product_attention instead
                        of einsum + float32 softmax (float rounding only)
  dtype          None   compute dtype of the U-Net: None = float16 iff use_fp16 and CUDA, else float32;
                        'fp32', 'fp16' or 'bf16' override it
  channels_last  False  run the U-Net on channels-last tensors (float rounding only)

The switches are runtime state: they are left out of pickles and deep copies.
"""

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence

#----------------------------------------------------------------------------
# Fast-path switches (module docstring).

PLAIN = dict(sdpa=False, dtype=None, channels_last=False)
FAST_DEFAULTS = dict(sdpa=True, dtype=None, channels_last=False)
_DTYPES = {None: None, 'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def make_fast_config(enabled: bool = True, **flags) -> dict:
    """Switch dict: FAST_DEFAULTS (or PLAIN when not enabled) updated with `flags`."""
    config = dict(FAST_DEFAULTS if enabled else PLAIN)
    for key, value in flags.items():
        if key not in config:
            raise ValueError(f'Unknown fast-path switch "{key}"; expected one of {", ".join(config)}')
        config[key] = value
    if config['dtype'] not in _DTYPES:
        raise ValueError(f'Invalid fast-path dtype "{config["dtype"]}"; expected None, "fp32", "fp16" or "bf16"')
    return config


def set_fast(net: torch.nn.Module, enabled: bool = True, **flags) -> dict:
    """Set the fast-path switches of `net` and all its layers; returns the new switch dict."""
    config = make_fast_config(enabled, **flags)
    for module in net.modules():
        if isinstance(module, _FastSwitches):
            module.fast = config
    return config


class _FastSwitches:
    """Mixin: a class-level default `fast` dict, kept out of the pickled state."""
    fast = FAST_DEFAULTS

    def __getstate__(self):
        state = torch.nn.Module.__getstate__(self)
        state.pop('fast', None)
        return state

#----------------------------------------------------------------------------
# Weight initialisation: Glorot & Bengio 2010 (xavier) and He et al. 2015 (kaiming) in the
# uniform and normal variants used by the DDPM++/NCSN++ and ADM code bases.


def weight_init(shape, mode, fan_in, fan_out):
    if mode == 'xavier_uniform':
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Invalid init mode "{mode}"')

#----------------------------------------------------------------------------
# Layers.


@persistence.persistent_class
class Linear(torch.nn.Module):
    """y = x W^T + b, weights cast to the input dtype."""

    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """Convolution with optional 2x up- or downsampling by the separable FIR filter `resample_filter`.

    kernel=0 gives a pure resampling layer without weights. Unfused, the image is resampled first and
    convolved after; fused (NCSN++ residual encoder), upsampling and convolution, or convolution and
    downsampling, share one padding so the pair costs one pass less.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=[1, 1], fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        assert not (up and down)
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()   # outer product, unit DC gain
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and w is not None and self.up:
            x = _upsample(x, f, self.in_channels, padding=max(f_pad - w_pad, 0))
            x = torch.nn.functional.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and w is not None and self.down:
            x = torch.nn.functional.conv2d(x, w, padding=w_pad + f_pad)
            x = _downsample(x, f, self.out_channels, padding=0)
        else:
            if self.up:
                x = _upsample(x, f, self.in_channels, padding=f_pad)
            if self.down:
                x = _downsample(x, f, self.in_channels, padding=f_pad)
            if w is not None:
                x = torch.nn.functional.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x


def _upsample(x, f, channels, padding):
    """Zero-stuffing 2x upsampling followed by the FIR filter (gain 4 keeps the mean)."""
    return torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([channels, 1, 1, 1]), groups=channels, stride=2,
                                                padding=padding)


def _downsample(x, f, channels, padding):
    """FIR filter followed by 2x decimation."""
    return torch.nn.functional.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalisation with at most `num_groups` groups of at least `min_channels_per_group` channels."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                                              bias=self.bias.to(x.dtype), eps=self.eps)


class AttentionOp(torch.autograd.Function):
    """Attention weights softmax_k(q . k / sqrt(c)) for q, k of shape [batch*heads, c, pixels],
    computed in float32 whatever the input dtype, gradients in float32 as well."""

    @staticmethod
    def forward(ctx, q, k):
        scale = 1 / np.sqrt(k.shape[1])
        logits = torch.einsum('ncq,nck->nqk', q.to(torch.float32), (k * scale).to(torch.float32))
        w = logits.softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, dw):
        q, k, w = ctx.saved_tensors
        w32 = w.to(torch.float32)
        dw32 = dw.to(torch.float32)
        dlogits = w32 * (dw32 - (dw32 * w32).sum(dim=2, keepdim=True))   # softmax Jacobian-vector product
        scale = 1 / np.sqrt(k.shape[1])
        dq = torch.einsum('nck,nqk->ncq', k.to(torch.float32), dlogits).to(q.dtype) * scale
        dk = torch.einsum('ncq,nqk->nck', q.to(torch.float32), dlogits).to(k.dtype) * scale
        return dq, dk

#----------------------------------------------------------------------------
# U-Net block: two 3x3 convolutions with the noise/label embedding injected in between (as a bias,
# or as scale and shift with adaptive_scale as in ADM), a skip connection, and optional
# self-attention after it.


@persistence.persistent_class
class UNetBlock(_FastSwitches, torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
                 resample_filter=[1, 1], resample_proj=False, adaptive_scale=True,
                 init=dict(), init_zero=dict(init_weight=0), init_attn=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        x = self._residual(x, emb)
        if self.num_heads:
            x = self._attention(x)
        return x

    def _residual(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        return x * self.skip_scale

    def _attention(self, x):
        # Channels are laid out [head, channel, (q, k, v)] in the qkv projection's output.
        qkv = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1)
        q, k, v = qkv.unbind(2)
        if self.fast['sdpa']:
            a = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                 v.transpose(1, 2)).transpose(1, 2)
        else:
            w = AttentionOp.apply(q, k)
            a = torch.einsum('nqk,nck->ncq', w, v)
        x = self.proj(a.reshape(*x.shape)).add_(x)
        return x * self.skip_scale

#----------------------------------------------------------------------------
# Noise-level embeddings.


@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Transformer sinusoidal embedding [cos(x w_i), sin(x w_i)] with w_i = max_positions^(-i/n),
    i = 0..n-1 (n = num_channels/2), the exponent divided by n-1 instead of n with `endpoint`."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2 pi x f_i), sin(2 pi x f_i)], f_i ~ N(0, scale^2) (NCSN++)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.ger((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

#----------------------------------------------------------------------------
# DDPM++ / NCSN++ (Song et al. 2021), as configured in the EDM paper, Appendix F.2.


def _drop_labels(labels, p, training, batch, device):
    """Label dropout for classifier-free guidance training: zero each sample's label with probability p."""
    if not (training and p):
        return labels
    keep = torch.rand([batch, 1], device=device) >= p
    return labels * keep.to(labels.dtype)


@persistence.persistent_class
class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ U-Net F(x; noise_labels, class_labels).

    Levels: one per entry of `channel_mult` (width model_channels * mult, resolution halved from one
    level to the next), `num_blocks` residual blocks each, self-attention at the resolutions in
    `attn_resolutions`. The embedding vector (model_channels * channel_mult_emb wide) sums the noise
    embedding (model_channels * channel_mult_noise wide; 'positional' sinusoids or random 'fourier'
    features), the class label (label_dim > 0; dropped with probability `label_dropout` in training,
    for classifier-free guidance) and the augmentation label (augment_dim > 0). The encoder feeds the
    input image to every level as well with encoder_type 'skip' (resampled and projected) or
    'residual' (NCSN++); the decoder emits an output at every level with decoder_type 'skip'.
    DDPM++: positional, standard encoder, [1,1] resampling filter; NCSN++: fourier, channel_mult_noise=2,
    residual encoder, [1,3,3,1] filter.
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], dropout=0.10,
                 label_dropout=0, embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                 decoder_type='standard', resample_filter=[1, 1]):
        assert embedding_type in ['fourier', 'positional']
        assert encoder_type in ['standard', 'skip', 'residual']
        assert decoder_type in ['standard', 'skip']
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
                            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping: noise level (+ class label, + augmentation label) -> embedding vector.
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        # Encoder. caux = channels of the auxiliary (input-image) path of the skip/residual encoders.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(in_channels=caux, out_channels=caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(in_channels=caux, out_channels=cout, kernel=3,
                                                                   down=True, resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout,
                                                                attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attention,
                                                                **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels,
                                                             kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3,
                                                           **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embedding(x, noise_labels, class_labels, augment_labels)
        skips = self._encode(x, emb)
        return self._decode(skips[-1], skips, emb)

    def _embedding(self, x, noise_labels, class_labels, augment_labels):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)   # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training, x.shape[0], x.device)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        return silu(self.map_layer1(emb))

    def _encode(self, x, emb):
        """Outputs of every main-path layer (the skip connections); the last one is the encoder's output."""
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        return skips

    def _decode(self, x, skips, emb):
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:   # the blocks that take a skip connection
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

#----------------------------------------------------------------------------
# ADM (Dhariwal & Nichol 2021), as configured in the EDM paper, Appendix F.2.


@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    """ADM U-Net F(x; noise_labels, class_labels).

    Levels: one per entry of `channel_mult` (width model_channels * mult), `num_blocks` residual
    blocks each, multi-head self-attention (64 channels per head) at the resolutions in
    `attn_resolutions`; the blocks apply the embedding as a per-channel scale and shift. The embedding
    (model_channels * channel_mult_emb wide) is the MLP of the positional noise embedding plus the
    class label (label_dim > 0, dropped with probability `label_dropout` in training) and the
    augmentation label (augment_dim > 0).
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
                 channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10,
                 label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False,
                                  init_mode='kaiming_normal', init_weight=np.sqrt(augment_dim)) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False,
                                init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout,
                                                                attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout,
                                                                attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embedding(x, noise_labels, class_labels, augment_labels)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:   # the blocks that take a skip connection
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))

    def _embedding(self, x, noise_labels, class_labels, augment_labels):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training, x.shape[0], x.device))
        return silu(emb)

#----------------------------------------------------------------------------
# Preconditioning (EDM paper, Table 1 and Section 5):
#   D(x; sigma) = c_skip(sigma) x + c_out(sigma) F((c_in(sigma) x); c_noise(sigma)).
# Every preconditioner exposes img_resolution, img_channels, label_dim, use_fp16, sigma_min,
# sigma_max, the wrapped U-Net `model` and round_sigma() (the noise levels it supports).


class _Precond(_FastSwitches, torch.nn.Module):
    """The forward pass shared by the four preconditioners; subclasses define scalings()."""

    def _build_model(self, model_type, img_resolution, img_channels, label_dim, out_channels, model_kwargs):
        model_classes = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}
        if model_type not in model_classes:
            raise ValueError(f'Invalid model_type "{model_type}"; expected one of {", ".join(model_classes)}')
        model_class = model_classes[model_type]
        return model_class(img_resolution=img_resolution, in_channels=img_channels, out_channels=out_channels,
                           label_dim=label_dim, **model_kwargs)

    def set_fast(self, enabled: bool = True, **flags) -> dict:
        """Choose fast paths (module docstring); set_fast(False) = the original plain path."""
        return set_fast(self, enabled, **flags)

    def compute_dtype(self, x, force_fp32=False):
        override = _DTYPES[self.fast['dtype']]
        if override is not None:
            return override
        return torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = self.compute_dtype(x, force_fp32)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        model_in = (c_in * x).to(dtype)
        if self.fast['channels_last']:
            model_in = model_in.contiguous(memory_format=torch.channels_last)
        F_x = self.model(model_in, c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


def vp_sigma(t, beta_d, beta_min):
    """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM paper, Table 1)."""
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma, beta_d, beta_min):
    """Inverse of vp_sigma: t = (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d."""
    sigma = torch.as_tensor(sigma)
    return ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d


def iddpm_alpha_bar(j, M, C_2):
    """Cosine schedule of Nichol & Dhariwal 2021 (eq. 17): alpha_bar(j) = sin^2(pi/2 * j / (M (C_2 + 1)))."""
    j = torch.as_tensor(j)
    return (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2


def iddpm_sigma_table(M=1000, C_1=0.001, C_2=0.008, dtype=torch.float32, device=None):
    """Noise levels u_0 > u_1 > ... > u_M = 0 of the iDDPM discretisation (EDM paper, Table 1):
    u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1).

    Computed with 0-dim tensors on `device`, alpha_bar in float32, the table in `dtype`: torch rounds
    divisions by a 0-dim tensor differently on CPU (multiplication by the reciprocal) and CUDA, so the
    same tensor operations are what reproduces the table bit for bit.
    """
    u = torch.zeros(M + 1, dtype=dtype, device=device)
    for j in range(M, 0, -1):
        j_prev, j_cur = torch.as_tensor(j - 1, device=device), torch.as_tensor(j, device=device)
        ratio = iddpm_alpha_bar(j_prev, M, C_2) / iddpm_alpha_bar(j_cur, M, C_2)
        u[j - 1] = ((u[j] ** 2 + 1) / ratio.clip(min=C_1) - 1).sqrt()
    return u


@persistence.persistent_class
class VPPrecond(_Precond):
    """Variance preserving: c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2 + 1), c_noise = (M - 1) t(sigma)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type='SongUNet', **model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))
        self.model = self._build_model(model_type, img_resolution, img_channels, label_dim, img_channels, model_kwargs)

    def scalings(self, sigma):
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return 1, -sigma, c_in, c_noise

    def sigma(self, t):
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)


@persistence.persistent_class
class VEPrecond(_Precond):
    """Variance exploding: c_skip = 1, c_out = sigma, c_in = 1, c_noise = log(sigma / 2)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type='SongUNet', **model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = self._build_model(model_type, img_resolution, img_channels, label_dim, img_channels, model_kwargs)

    def scalings(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


@persistence.persistent_class
class iDDPMPrecond(_Precond):
    """Improved DDPM: c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2 + 1), c_noise = M - 1 - j, where u_j
    is the table entry nearest to sigma. The U-Net predicts 2 * img_channels outputs (mean and variance
    in Nichol & Dhariwal 2021); only the first half is used."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                 model_type='DhariwalUNet', **model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self.model = self._build_model(model_type, img_resolution, img_channels, label_dim, img_channels * 2,
                                       model_kwargs)
        self.register_buffer('u', iddpm_sigma_table(M, C_1, C_2))
        self.sigma_min = float(self.u[M - 1])
        self.sigma_max = float(self.u[0])

    def scalings(self, sigma):
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, c_in, c_noise

    def alpha_bar(self, j):
        return iddpm_alpha_bar(j, self.M, self.C_2)

    def round_sigma(self, sigma, return_index=False):
        """The nearest entry of the table u (or its index); same shape and device as `sigma`."""
        sigma = torch.as_tensor(sigma)
        distance = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1))
        index = distance.argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


@persistence.persistent_class
class EDMPrecond(_Precond):
    """EDM (Section 5, eq. 7): c_skip = sd^2/(sigma^2 + sd^2), c_out = sigma sd/sqrt(sigma^2 + sd^2),
    c_in = 1/sqrt(sigma^2 + sd^2), c_noise = log(sigma)/4, with sd = sigma_data."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = self._build_model(model_type, img_resolution, img_channels, label_dim, img_channels, model_kwargs)

    def scalings(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4
