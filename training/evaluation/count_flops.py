"""Parameter, compute and activation-memory counts of a network.

The official tool traces the network with `torch.jit.trace` and walks the
graph. This module records the same forward pass with a `TorchDispatchMode`
instead: every ATen operator that runs is seen together with the shapes of its
inputs and outputs, which also works on the `meta` device (no weights, no
arithmetic), so even the XXL preset is counted in a fraction of a second.

The counting rules are those of the official count_flops.py; operators reach the dispatcher
in their decomposed form, so a few names are mapped back to the names the
official tracer records (`mm`/`bmm` -> `matmul`, `convolution` ->
`_convolution`, `_softmax` -> `softmax`, `_to_copy` -> `to`); the cost of each
is the one the official tool assigns to that name. Convolutions and matrix products are
counted as multiply-accumulates, so totals match the paper's "Gflops".

Activation memory per sample: on CUDA the peak of the allocator during the
forward (as in the official tool); elsewhere the peak total size of the
tensors created by the forward and still alive (storages tracked by weak
reference), which estimates the same quantity.
"""

import contextlib
import math
from collections import defaultdict
from typing import Any, Callable, Optional, Union

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from training.snapshots.loading import load_snapshot

#----------------------------------------------------------------------------
# Cost rules. `out` = shape of the first output, `ins` = shapes of the tensor
# inputs in argument order (non-tensor arguments have shape []).

_ZERO_COST = set("""
    to zeros ones full ones_like reshape flatten slice contiguous t mT unsqueeze unbind tile chunk cat lift_fresh size
    Int detach resolve_conj resolve_neg dropout arange ScalarImplicit view upsample_nearest2d embedding split permute
    transpose empty numel expand expand_as eye repeat select squeeze copy_ pad flip clone gather
    _to_copy _unsafe_view _reshape_alias as_strided alias empty_like empty_strided new_empty new_empty_strided
    new_zeros new_ones new_full zeros_like full_like fill_ fill lift_fresh_copy split_with_sizes unsafe_split
    _local_scalar_dense scalar_tensor detach_ t_ native_dropout constant_pad_nd unsqueeze_ squeeze_
    transpose_ view_as index_select _unsafe_index stack promote_types result_type
""".split())

_ELEMENTWISE = {  # name -> flops per output element
    **{name: 1 for name in """
        add add_ sub sub_ rsub exp exp_ mul mul_ div div_ addcmul addcmul_ floor_divide pow pow_ reciprocal square sqrt
        sqrt_ rsqrt sin cos log eq gt neg neg_ mean sum clamp_min clamp_min_ outer affine_grid_generator
    """.split()},
    **{name: 2 for name in 'lerp lerp_ leaky_relu clamp_ clamp'.split()},
    **{name: 3 for name in 'silu silu_ sigmoid softmax _softmax _safe_softmax'.split()},
    **{name: 4 for name in 'group_norm native_group_norm layer_norm native_layer_norm upsample_bilinear2d'.split()},
    **{name: 14 for name in 'gelu'.split()},
}

# Names as the official (jit-traced) report shows them.
_LABELS = {'mm': 'matmul', 'bmm': 'matmul', 'linear': 'matmul', 'convolution': '_convolution',
    'convolution_overrideable': '_convolution', '_softmax': 'softmax', '_safe_softmax': 'softmax', '_to_copy': 'to',
    'native_group_norm': 'group_norm', 'native_layer_norm': 'layer_norm'}

def _prod(shape: list) -> int:
    return math.prod(shape) if shape else 1

def _op_cost(name: str, out: list, ins: list) -> Optional[int]:
    """Flops of one operator, or None for an operator the rules do not know."""
    if name in _ZERO_COST:
        return 0
    if name in _ELEMENTWISE:
        return _ELEMENTWISE[name] * _prod(out)
    if name in ('linalg_vector_norm', 'avg_pool2d', 'argmin', 'argmax'):
        return _prod(ins[0])
    if name in ('_euclidean_dist', 'cdist', '_cdist_forward'):  # EDM v1 iDDPMPrecond.round_sigma: per distance
        return 3 * _prod(out) * ins[0][-1]                      # and dimension a difference, square and sum
    if name in ('mm', 'bmm', 'matmul', 'linear'):
        return _prod(out) * ins[0][-1]
    if name == 'addmm':  # input, mat1, mat2
        return _prod(out) * (ins[1][-1] + 1)
    if name in ('convolution', '_convolution', 'convolution_overrideable'):  # multiply-accumulates per output element
        return _prod(out) * _prod(ins[1][1:])
    return None

def _shape(x: Any) -> list:
    return list(x.shape) if isinstance(x, torch.Tensor) else []

#----------------------------------------------------------------------------
# Live-tensor tracking for the memory estimate.

class _LiveBytes:
    def __init__(self):
        self.live = {}  # storage cdata -> (StorageWeakRef, nbytes)
        self.current = 0
        self.peak = 0

    def add(self, tensors: list) -> None:
        for t in tensors:
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata not in self.live:
                self.live[ref.cdata] = (ref, storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        self._sweep()

    def _sweep(self) -> None:
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes

#----------------------------------------------------------------------------

class OpCounterMode(TorchDispatchMode):
    """Records the cost of every ATen operator that runs inside the context."""

    def __init__(self):
        super().__init__()
        self.op_count = defaultdict(int)
        self.op_flops = defaultdict(int)
        self.unknown_ops = {}  # name -> example '(outputs) <- (inputs)' description
        self.memory = _LiveBytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        outputs = [x for x in (result if isinstance(result, (tuple, list)) else [result]) if isinstance(x, torch.Tensor)]
        self._record(func.overloadpacket.__name__, outputs, list(args) + list(kwargs.values()))
        self.memory.add(outputs)
        return result

    def _record(self, name: str, outputs: list, inputs: list) -> None:
        out = _shape(outputs[0]) if outputs else []
        ins = [_shape(x) for x in inputs]
        flops = _op_cost(name, out, ins)
        if flops is None:
            self.unknown_ops.setdefault(name, f'outputs {[_shape(x) for x in outputs]} inputs {ins}')
            return
        label = 'Other' if flops == 0 else 'aten::' + _LABELS.get(name, name)
        self.op_count[label] += 1
        self.op_flops[label] += flops

#----------------------------------------------------------------------------
# Attention through the fused kernel is counted as its explicit formula
# softmax(Q K^T / sqrt(d)) V.

def _explicit_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None or dropout_p != 0 or is_causal or enable_gqa:
        raise ValueError('count_flops: scaled_dot_product_attention with mask, dropout, causal or GQA is not supported')
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    weights = (query @ key.transpose(-2, -1)).mul(scale).softmax(dim=-1)
    return weights @ value

@contextlib.contextmanager
def _explicit_attention():
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _explicit_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original

@contextlib.contextmanager
def _plain_path(net: torch.nn.Module):
    """Count the official computation: switch off this project's fast paths (networks_edm2 `set_fast`) meanwhile."""
    set_fast, saved = getattr(net, 'set_fast', None), getattr(net, 'fast', None)
    if set_fast is None or not isinstance(saved, dict):
        yield
        return
    set_fast(False)
    try:
        yield
    finally:
        set_fast(True, **saved)

@contextlib.contextmanager
def _exact_cuda_math(device: torch.device):
    """cuDNN benchmark and TF32 / reduced-precision reductions off while counting."""
    if device.type != 'cuda':
        yield
        return
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction)
    torch.backends.cudnn.benchmark = torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction) = saved

#----------------------------------------------------------------------------

def default_counting_device() -> torch.device:
    """CUDA when present (real memory figures), else the meta device (shapes only, instant)."""
    return torch.device('cuda' if torch.cuda.is_available() else 'meta')

def load_network(src: str, verbose: bool = True) -> torch.nn.Module:
    """The `ema` network of the snapshot at `src` (path or URL; count_flops.py's PKL|URL argument)."""
    if verbose:
        print(f'Loading network from {src} ...')
    return load_snapshot(src, 'PKL|URL')['ema']

def default_inputs(net: torch.nn.Module, device: torch.device) -> tuple:
    """Batch of one: zero image, zero sigma, zero labels."""
    missing = [name for name in ('img_resolution', 'img_channels', 'label_dim') if not hasattr(net, name)]
    if missing:
        raise ValueError(f'{type(net).__name__} has no {", ".join(missing)}: not an image network; pass net_args explicitly')
    res, ch, label_dim = net.img_resolution, net.img_channels, net.label_dim
    return (torch.zeros([1, ch, res, res], device=device), torch.zeros([1], device=device), torch.zeros([1, label_dim], device=device))

def count_flops(
    net: Union[str, torch.nn.Module],
    net_args: Optional[tuple] = None,
    net_kwargs: Optional[dict] = None,
    verbose: bool = True,
    device: Union[str, torch.device, None] = None,
) -> dict:
    """Count parameters, flops and activation memory of one forward pass of `net`.

    `net` is a module or a pickle path/URL (its `ema` is used). The module is moved
    to `device` (default: CUDA if available, else `meta`; a module passed in is
    counted where it is unless `device` is given). Returns
    `{op_count, op_flops, total_params, total_flops, mem_per_sample, unknown_ops}`.
    """
    if isinstance(net, str):
        net = load_network(net, verbose=verbose)
        device = torch.device(device) if device is not None else default_counting_device()
    elif device is None:
        device = next(net.parameters(), torch.zeros([])).device
    device = torch.device(device)
    net = net.requires_grad_(False).to(device)
    net_args = default_inputs(net, device) if net_args is None else net_args
    net_kwargs = net_kwargs or {}

    counter = OpCounterMode()
    with _plain_path(net), _exact_cuda_math(device), _explicit_attention(), torch.no_grad():
        mem_before = _cuda_reset_peak(device)
        with counter:
            net(*net_args, **net_kwargs)
        mem_cuda = _cuda_peak(device) - mem_before if device.type == 'cuda' else None

    if verbose:
        for name, example in counter.unknown_ops.items():
            print(f'Unknown op skipped: aten::{name} ({example})')
    return dict(
        op_count=dict(counter.op_count),
        op_flops=dict(counter.op_flops),
        total_params=sum(p.numel() for p in net.parameters()),
        total_flops=sum(counter.op_flops.values()),
        mem_per_sample=mem_cuda if mem_cuda is not None else counter.memory.peak,
        unknown_ops=dict(counter.unknown_ops),
    )

def _cuda_reset_peak(device: torch.device) -> int:
    if device.type != 'cuda':
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)

def _cuda_peak(device: torch.device) -> int:
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)

#----------------------------------------------------------------------------

def figure(value: float) -> str:
    """Two decimals as the official report, but at least three significant digits below 0.1, so that
    the ops of a small network do not all print as 0.00."""
    if value == 0 or abs(value) >= 0.1:
        return f'{value:.2f}'
    return f'{value:.{2 - math.floor(math.log10(abs(value)))}f}'


def format_flops(result: dict) -> str:
    """The printed report, as one string."""
    lines = [
        '',
        f'Parameters  {figure(result["total_params"] / 1e6):<8s}M',
        f'Compute     {figure(result["total_flops"] / 1e9):<8s}Gflops/sample',
        f'GPU memory  {figure(result["mem_per_sample"] / 2**30):<8s}GB/sample',
        '',
        f'{"Op":<26s}{"Count":<7s}Gflops',
    ]
    ops = sorted(result['op_flops'], key=lambda op: -result['op_flops'][op])
    for op in ops:
        lines.append(f'{op:<26s}{result["op_count"][op]:<7d}{figure(result["op_flops"][op] / 1e9)}')
    lines.append(f'{"Total":<26s}{sum(result["op_count"].values()):<7d}{figure(result["total_flops"] / 1e9)}')
    lines.append('')
    return '\n'.join(lines)

def print_flops(result: dict, print_fn: Callable[[str], Any] = print) -> None:
    print_fn(format_flops(result))

#----------------------------------------------------------------------------
