"""Magnitude-preserving U-Net of EDM2 (config G) and its EDM preconditioner.

The layers follow the official release exactly: module path, class names,
constructor arguments, sub-module names and state-dict keys are those of the
official release, so official weights load one to one (`load_state_dict`).
Every learned layer is bias-free; weights are normalised on every call and, in
training mode, the stored weights are overwritten by their normalised version
(forced weight normalisation, EDM2 paper eq. 66).

Fast paths
----------
Each network carries a dict of switches, ``fast``, read by every layer. They
change results by float rounding only (except ``dtype``, which changes the
arithmetic precision on purpose). Change them with ``Precond.set_fast(...)``
or ``set_fast(module, ...)``; ``set_fast(net, False)`` restores the plain path,
which is the official computation op for op.

=================  =======  ====================================================
switch             default  effect
=================  =======  ====================================================
``fused``          True     weight normalisation, gain and 1/sqrt(fan_in) folded
                            into one per-row scale (custom autograd function in
                            training); the constants of mp_silu / mp_sum folded
                            into the gains of the following convolution; faster
                            activation norms and upsampling on CPU; the clamp
                            to +-clip_act skipped on CPU when nothing exceeds
                            it; in-place activations and preallocated
                            concatenation when no gradient is recorded.
``weight_cache``   True     outside training (eval mode and no gradient needed
                            for the weight) the normalised, scaled, cast weight
                            of every layer is computed once and reused until the
                            parameter changes (its ``_version`` counter or
                            storage changes: optimizer steps, EMA updates,
                            ``load_state_dict``, ``.to()``, swapped tensors).
                            Edits through ``param.data`` bypass the version
                            counter: call ``set_fast`` again after them. Costs
                            one extra copy of the weights in the compute dtype.
``sdpa``           True     attention through
                            ``torch.nn.functional.scaled_dot_product_attention``
                            instead of einsum + softmax.
``dtype``          None     compute dtype of the image path. None = official
                            rule (float16 iff ``use_fp16`` and CUDA, else
                            float32); 'bf16', 'fp16' or 'fp32' override it.
``channels_last``  False    run convolutions on channels-last tensors (with
                            dropout > 0 the masks are drawn in memory order, so
                            they differ from the plain path's, same law).
``compile``        False    call the U-Net through ``torch.compile`` (True =
                            inductor, a string names another backend); the
                            weight cache is bypassed inside compiled code.
=================  =======  ====================================================

The switches and caches are runtime state: they are left out of pickles and of
deep copies (``__getstate__``), so pickles keep the official layout, and a
network rebuilt from a pickle starts with the defaults above.

This file is embedded in network pickles and executed by the official tools,
so it imports nothing beyond numpy, torch and torch_utils.
"""

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import misc
from torch_utils import persistence

#----------------------------------------------------------------------------
# Fast-path switches (see module docstring).

PLAIN = dict(fused=False, weight_cache=False, sdpa=False, dtype=None, channels_last=False, compile=False)
FAST_DEFAULTS = dict(fused=True, weight_cache=True, sdpa=True, dtype=None, channels_last=False, compile=False)
_DTYPES = {None: None, 'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
_RUNTIME_KEYS = ('fast', '_wcache', '_compiled_unet')
_SILU_GAIN = 1 / 0.596   # mp_silu(x) = silu(x) / 0.596


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
        if hasattr(type(module), 'fast'):
            module.fast = config
            module.__dict__.pop('_wcache', None)
            module.__dict__.pop('_compiled_unet', None)
    return config


def _state_without_runtime(module: torch.nn.Module) -> dict:
    state = torch.nn.Module.__getstate__(module)
    for key in _RUNTIME_KEYS:
        state.pop(key, None)
    return state

#----------------------------------------------------------------------------
# Normalize given tensor to unit magnitude with respect to the given
# dimensions. Default = all dimensions except the first.

def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ||x|| / sqrt(M)), the norm taken in float32 over `dim`."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=np.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)

def _normalize_fast(x: torch.Tensor, dim, eps: float = 1e-4) -> torch.Tensor:
    """`normalize` for activations: the float32 norm as sqrt(sum(x*x)), several times faster than
    vector_norm on CPU when `dim` is not the innermost dimension."""
    xf = x.to(torch.float32)
    norm = (xf * xf).sum(dim=dim, keepdim=True).sqrt()
    norm = torch.add(eps, norm, alpha=np.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)

#----------------------------------------------------------------------------
# Upsample or downsample the given tensor with the given filter,
# or keep it as is.

def resample(x: torch.Tensor, f=[1, 1], mode: str = 'keep') -> torch.Tensor:
    """Depthwise down/up-sampling by 2 with the separable filter `f`."""
    if mode == 'keep':
        return x
    f = np.float32(f)
    assert f.ndim == 1 and len(f) % 2 == 0
    pad = (len(f) - 1) // 2
    f = f / f.sum()
    f = np.outer(f, f)[np.newaxis, np.newaxis, :, :]
    f = misc.const_like(x, f)
    c = x.shape[1]
    if mode == 'down':
        return F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    assert mode == 'up'
    return F.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))


def _resample_fast(x: torch.Tensor, f, mode: str) -> torch.Tensor:
    """Same result as `resample`. The depthwise (transposed) convolution is the fastest way on CPU
    in float32 (faster than avg_pool2d / interpolate), but the transposed one is slow in reduced
    precision, where nearest upsampling by [1,1] runs as repeat_interleave (bitwise equal)."""
    if mode == 'up' and list(f) == [1, 1] and x.device.type == 'cpu' and x.dtype != torch.float32:
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return resample(x, f, mode)

#----------------------------------------------------------------------------
# Magnitude-preserving SiLU (Equation 81).

def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """silu(x) / 0.596: unit-variance input gives unit-variance output (eq. 81)."""
    return F.silu(x) / 0.596

#----------------------------------------------------------------------------
# Magnitude-preserving sum (Equation 88).

def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1-t) a + t b) / sqrt((1-t)^2 + t^2) (eq. 88)."""
    return a.lerp(b, t) / np.sqrt((1 - t) ** 2 + t ** 2)


def _mp_sum_coefs(t: float) -> tuple:
    """Weights (wa, wb) with mp_sum(a, b, t) = wa a + wb b, as Python floats."""
    scale = float(np.sqrt((1 - t) ** 2 + t ** 2))
    return (1 - t) / scale, t / scale

#----------------------------------------------------------------------------
# Magnitude-preserving concatenation (Equation 103).

def _mp_cat_coefs(na: int, nb: int, t: float) -> tuple:
    """Weights (wa, wb) of the two parts of mp_cat (eq. 103)."""
    C = np.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return float(C / np.sqrt(na) * (1 - t)), float(C / np.sqrt(nb) * t)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenate [wa a, wb b] along `dim`, preserving magnitude and balancing by `t` (eq. 103)."""
    wa, wb = _mp_cat_coefs(a.shape[dim], b.shape[dim], t)
    return torch.cat([wa * a, wb * b], dim=dim)


def _mp_cat_fast(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mp_cat along dim 1 writing both scaled parts straight into one buffer when no grad is recorded."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return mp_cat(a, b, dim=1, t=t)
    na, nb = a.shape[1], b.shape[1]
    wa, wb = _mp_cat_coefs(na, nb, t)
    shape = [a.shape[0], na + nb, *a.shape[2:]]
    out = torch.empty(shape, dtype=torch.result_type(a, b), device=a.device,
                      memory_format=_memory_format_of(a))
    torch.mul(a, wa, out=out[:, :na])
    torch.mul(b, wb, out=out[:, na:])
    return out


def _memory_format_of(x: torch.Tensor):
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format

def _is_compiling() -> bool:
    compiler = getattr(torch, 'compiler', None)
    return bool(compiler is not None and hasattr(compiler, 'is_compiling') and compiler.is_compiling())


def _clip_fast(x: torch.Tensor, limit: float) -> torch.Tensor:
    """x.clip_(-limit, limit); on CPU skipped when nothing exceeds the limit (saves the clamp's backward)."""
    if x.device.type == 'cpu' and not _is_compiling():
        lo, hi = torch.aminmax(x.detach())
        if -limit <= lo.item() and hi.item() <= limit:
            return x
    return x.clip_(-limit, limit)

#----------------------------------------------------------------------------
# Fused weight normalisation: w * gain / (sqrt(fan_in) * (eps + ||w_o|| / sqrt(M)))
# per output row o, one multiply forward and two passes backward.

class _NormalizedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, gain, norm, eps, out_dtype):
        w = weight.to(torch.promote_types(weight.dtype, torch.float32))
        dims = list(range(1, w.ndim))
        fan_in = w[0].numel()
        if norm is None:
            norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True, dtype=w.dtype)
        rms = eps + norm / np.sqrt(fan_in)
        unit_scale = 1 / (rms * np.sqrt(fan_in))    # scale for gain = 1
        scale = (gain / np.sqrt(fan_in)) / rms      # gain / sqrt(fan_in) rounded in the gain's dtype, as the plain path
        ctx.save_for_backward(w, norm, unit_scale, scale)
        ctx.gain_is_tensor = isinstance(gain, torch.Tensor)
        ctx.weight_dtype = weight.dtype
        ctx.gain_dtype = gain.dtype if ctx.gain_is_tensor else None
        return (w * scale).to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        w, norm, unit_scale, scale = ctx.saved_tensors
        g = grad_out.to(w.dtype)
        dims = list(range(1, w.ndim))
        dot = (g * w).sum(dim=dims, keepdim=True)                   # <g_o, w_o>
        # scale = gain / (eps sqrt(fan_in) + norm), so d scale / d norm = -scale * unit_scale and
        # grad_w = scale g + w (d scale / d norm) <g, w> / norm.
        coef = dot * scale * unit_scale / norm.clamp_min(1e-30)   # norm = 0 only if w = 0, then dot = 0
        grad_w = (g * scale).sub_(w * coef).to(ctx.weight_dtype)
        grad_gain = None
        if ctx.gain_is_tensor and ctx.needs_input_grad[1]:
            grad_gain = (dot * unit_scale).sum().to(ctx.gain_dtype)
        return grad_w, grad_gain, None, None, None

#----------------------------------------------------------------------------
# Magnitude-preserving Fourier features (Equation 75).

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    """Random Fourier features sqrt(2) cos(2 pi (f x + phi)) with unit magnitude (eq. 75)."""
    fast = FAST_DEFAULTS

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32)
        y = y.ger(self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        y = y.cos() * np.sqrt(2)
        return y.to(x.dtype)

    def __getstate__(self):
        return _state_without_runtime(self)

#----------------------------------------------------------------------------
# Magnitude-preserving convolution or fully-connected layer (Equation 47)
# with force weight normalization (Equation 66).

@persistence.persistent_class
class MPConv(torch.nn.Module):
    """Bias-free conv (kernel [k,k]) or linear layer (kernel []) with normalised weights (eq. 47, 66)."""
    fast = FAST_DEFAULTS

    def __init__(self, in_channels: int, out_channels: int, kernel: list):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        if self.fast['fused'] or self.fast['weight_cache']:
            w = self._fast_weight(x, gain)
        else:
            w = self._plain_weight(x, gain)
        if w.ndim == 2:
            return x @ w.t()
        assert w.ndim == 4
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))

    def _plain_weight(self, x: torch.Tensor, gain) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))   # forced weight normalization (eq. 66)
        w = normalize(w)                          # traditional weight normalization
        w = w * (gain / np.sqrt(w[0].numel()))    # magnitude-preserving scaling (eq. 47)
        return w.to(x.dtype)

    def _fast_weight(self, x: torch.Tensor, gain) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (self.weight.requires_grad or isinstance(gain, torch.Tensor) and gain.requires_grad)
        if self.fast['weight_cache'] and not self.training and not needs_grad and not self.fast['compile']:
            return self._cached_weight(x, gain)
        if not self.fast['fused']:
            return self._plain_weight(x, gain)
        norm = self._force_normalize() if self.training else None
        return _NormalizedWeight.apply(self.weight, gain, norm, 1e-4, x.dtype)

    @torch.no_grad()
    def _force_normalize(self) -> torch.Tensor:
        """Overwrite the weight by normalize(weight) (eq. 66); returns the row norms afterwards."""
        w = self.weight
        fan_in = w[0].numel()
        norm = torch.linalg.vector_norm(w, dim=list(range(1, w.ndim)), keepdim=True, dtype=torch.float32)
        denom = 1e-4 + norm / np.sqrt(fan_in)
        if w.dtype == torch.float32:
            w.div_(denom)
        else:
            w.copy_(w.to(torch.float32) / denom)
        return norm / denom

    def _cached_weight(self, x: torch.Tensor, gain) -> torch.Tensor:
        w = self.weight
        gain_key = (gain.data_ptr(), gain._version, gain.dtype) if isinstance(gain, torch.Tensor) else float(gain)
        key = (w.data_ptr(), w._version, w.dtype, w.device, x.dtype, gain_key,
               torch.is_inference_mode_enabled(), self.fast['channels_last'])
        cache = self.__dict__.get('_wcache')
        if cache is not None and cache[0] == key:
            return cache[1]
        # The cache holds the storages it was computed from, so no other tensor can take their address
        # while the entry lives (swapped-in weights, torch.func.functional_call, load_state_dict(assign=True)).
        storages = (w.untyped_storage(), gain.untyped_storage() if isinstance(gain, torch.Tensor) else None)
        with torch.no_grad():
            if self.fast['fused']:
                value = _NormalizedWeight.apply(w, gain, None, 1e-4, x.dtype)
            else:
                value = self._plain_weight(x, gain)
            if value.ndim == 4 and self.fast['channels_last']:
                value = value.contiguous(memory_format=torch.channels_last)
        self.__dict__['_wcache'] = (key, value, storages)
        return value

    def __getstate__(self):
        return _state_without_runtime(self)

#----------------------------------------------------------------------------
# U-Net encoder/decoder block with optional self-attention (Figure 21).

@persistence.persistent_class
class Block(torch.nn.Module):
    """Residual encoder ('enc') or decoder ('dec') block with optional self-attention (Figure 21)."""
    fast = FAST_DEFAULTS

    def __init__(self,
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        emb_channels,                   # Number of embedding channels.
        flavor              = 'enc',    # Flavor: 'enc' or 'dec'.
        resample_mode       = 'keep',   # Resampling: 'keep', 'up', or 'down'.
        resample_filter     = [1,1],    # Resampling filter.
        attention           = False,    # Include self-attention?
        channels_per_head   = 64,       # Number of channels per attention head.
        dropout             = 0,        # Dropout probability.
        res_balance         = 0.3,      # Balance between main branch (0) and residual branch (1).
        attn_balance        = 0.3,      # Balance between main branch (0) and self-attention (1).
        clip_act            = 256,      # Clip output activations. None = do not clip.
    ):
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = resample_filter
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads != 0 else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads != 0 else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.fast['fused']:
            return self._forward_fused(x, emb)
        return self._forward_plain(x, emb)

    def _forward_plain(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Main branch.
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # Residual branch.
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        # Connect the branches.
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Self-attention.
        if self.num_heads != 0:
            y = self._attention_values(x)
            y = self.attn_proj(y)
            x = mp_sum(x, y, t=self.attn_balance)

        # Clip activations.
        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x

    def _forward_fused(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Same equations as _forward_plain; constant factors ride on the conv gains.
        inplace = not torch.is_grad_enabled()
        x = _resample_fast(x, self.resample_filter, self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = _normalize_fast(x, dim=1)
        y = self.conv_res0(F.silu(x), gain=_SILU_GAIN)
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = y * c.unsqueeze(2).unsqueeze(3).to(y.dtype)
        y = F.silu(y, inplace=inplace)
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        wx, wy = _mp_sum_coefs(self.res_balance)
        y = self.conv_res1(y, gain=_SILU_GAIN * wy)
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = y.add_(x, alpha=wx) if inplace else torch.add(y, x, alpha=wx)
        if self.num_heads != 0:
            y = self._attention_values(x)
            wx, wy = _mp_sum_coefs(self.attn_balance)
            y = self.attn_proj(y, gain=wy)
            x = y.add_(x, alpha=wx) if inplace else torch.add(y, x, alpha=wx)
        if self.clip_act is not None:
            x = _clip_fast(x, self.clip_act)
        return x

    def _attention_values(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention output before attn_proj, shape [B, C, H, W].
        attn_qkv channels are ordered (head, channel d, q/k/v)."""
        y = self.attn_qkv(x)
        y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])   # [B, heads, d, 3, HW]
        if self.fast['sdpa']:
            return self._attention_sdpa(y, x)
        y = _normalize_fast(y, dim=2) if self.fast['fused'] else normalize(y, dim=2)  # pixel norm & split
        q, k, v = y.unbind(3)    # each [B, heads, d, HW]
        w = torch.einsum('nhcq,nhck->nhqk', q, k / np.sqrt(q.shape[2])).softmax(dim=3)
        y = torch.einsum('nhqk,nhck->nhcq', w, v)
        return y.reshape(*x.shape)

    def _attention_sdpa(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Same attention through the fused kernel, with q, k, v laid out [B, heads, HW, d] (d innermost)."""
        y = y.permute(0, 1, 3, 4, 2).contiguous()          # [B, heads, 3, HW, d]
        y = _normalize_fast(y, dim=4)                       # pixel norm over d
        q, k, v = y.unbind(2)
        y = F.scaled_dot_product_attention(q, k, v)         # softmax(q k^T / sqrt(d)) v
        y = y.permute(0, 1, 3, 2).reshape(*x.shape)         # channel index h * d + c
        return y.contiguous(memory_format=_memory_format_of(x))

    def __getstate__(self):
        return _state_without_runtime(self)

#----------------------------------------------------------------------------
# EDM2 U-Net model (Figure 21).

@persistence.persistent_class
class UNet(torch.nn.Module):
    """EDM2 magnitude-preserving U-Net, config G (EDM2 paper, Figure 21)."""
    fast = FAST_DEFAULTS

    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Image channels.
        label_dim,                          # Class label dimensionality. 0 = unconditional.
        model_channels      = 192,          # Base multiplier for the number of channels.
        channel_mult        = [1,2,3,4],    # Per-resolution multipliers for the number of channels.
        channel_mult_noise  = None,         # Multiplier for noise embedding dimensionality. None = select based on channel_mult.
        channel_mult_emb    = None,         # Multiplier for final embedding dimensionality. None = select based on channel_mult.
        num_blocks          = 3,            # Number of residual blocks per resolution.
        attn_resolutions    = [16,8],       # List of resolutions with self-attention.
        label_balance       = 0.5,          # Balance between noise embedding (0) and class embedding (1).
        concat_balance      = 0.5,          # Balance between skip connections (0) and main path (1).
        **block_kwargs,                     # Arguments for Block.
    ):
        super().__init__()
        cblock = [model_channels * x for x in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = channels
                self.enc[f'{res}x{res}_conv'] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f'{res}x{res}_down'] = Block(cout, cout, cemb, flavor='enc', resample_mode='down', **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = channels
                self.enc[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='enc',
                                                            attention=(res in attn_resolutions), **block_kwargs)

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f'{res}x{res}_in0'] = Block(cout, cout, cemb, flavor='dec', attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = Block(cout, cout, cemb, flavor='dec', **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = Block(cout, cout, cemb, flavor='dec', resample_mode='up', **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = channels
                self.dec[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='dec',
                                                            attention=(res in attn_resolutions), **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels) -> torch.Tensor:
        fused_cat = self.fast['fused'] and not self.fast['compile']   # out= views break dynamo graphs
        # Embedding.
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        # Encoder.
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if 'conv' in name else block(x, emb)
            skips.append(x)

        # Decoder.
        for name, block in self.dec.items():
            if 'block' in name:
                skip = skips.pop()
                x = _mp_cat_fast(x, skip, self.concat_balance) if fused_cat else mp_cat(x, skip, t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)

    def __getstate__(self):
        return _state_without_runtime(self)

#----------------------------------------------------------------------------
# Preconditioning and uncertainty estimation.

@persistence.persistent_class
class Precond(torch.nn.Module):
    """EDM preconditioning D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with a log-variance head
    (Karras et al. 2022 (EDM), eq. 7; log-variance: EDM2 paper eq. 21)."""
    fast = FAST_DEFAULTS

    def __init__(self,
        img_resolution,         # Image resolution.
        img_channels,           # Image channels.
        label_dim,              # Class label dimensionality. 0 = unconditional.
        use_fp16        = True, # Run the model at FP16 precision?
        sigma_data      = 0.5,  # Expected standard deviation of the training data.
        logvar_channels = 128,  # Intermediate dimensionality for uncertainty estimation.
        **unet_kwargs,          # Keyword arguments for UNet.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def set_fast(self, enabled: bool = True, **flags) -> dict:
        """Choose fast paths (module docstring); `set_fast(False)` = official plain path."""
        return set_fast(self, enabled, **flags)

    def compute_dtype(self, x: torch.Tensor, force_fp32: bool = False) -> torch.dtype:
        """dtype of the image path: the `dtype` switch if set, else float16 iff use_fp16 on CUDA."""
        override = _DTYPES[self.fast['dtype']]
        if force_fp32:
            return torch.float32
        if override is not None:
            return override
        return torch.float16 if (self.use_fp16 and x.device.type == 'cuda') else torch.float32

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = self.compute_dtype(x, force_fp32)

        # Preconditioning weights.
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        # Run the model.
        x_in = (c_in * x).to(dtype)
        if self.fast['channels_last']:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        F_x = self._unet_callable()(x_in, c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)

        # Estimate uncertainty if requested.
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar  # u(sigma) in Equation 21
        return D_x

    def _unet_callable(self):
        if not self.fast['compile']:
            return self.unet
        compiled = self.__dict__.get('_compiled_unet')
        if compiled is None:
            backend = self.fast['compile'] if isinstance(self.fast['compile'], str) else 'inductor'
            compiled = torch.compile(self.unet, backend=backend)
            self.__dict__['_compiled_unet'] = compiled
        return compiled

    def __getstate__(self):
        return _state_without_runtime(self)

#----------------------------------------------------------------------------
