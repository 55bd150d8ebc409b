"""One acceptance command for a machine with a GPU: numerics and speed of this code on CUDA in a few minutes.

A sequence of named checks, each with its own time budget; a failing check prints one FAIL line (the first
line of its error) and the next check runs, so one broken check never hides the others. At the end a
summary table (check, result, seconds, key figures); exit code 0 only if every check passed. `--out FILE`
writes the same results as JSON (rewritten atomically after every check, so a run cut short still leaves
what it measured; tracebacks of failures are there too).

Checks, in the order they run:
  environment  torch / CUDA / cuDNN / NCCL / Triton versions, GPU name, memory, bf16 support.
  parity       the EDM2 network's forward output and parameter gradients on the device vs on the CPU,
               same weights and inputs, float32 (the network computes in float32 at most): the plain and
               the fast path with TF32 off, the fast path with TF32 on; max abs and max relative diff.
  precision    edm_sampler (generate_images) with the fast path in fp32 vs fp16 vs bf16 (the dtypes the
               network and the GPU support), max / mean pixel diff in uint8 after StandardRGBEncoder.
  training     training images/s and model FLOP utilisation (torch.utils.flop_counter, peak by GPU name
               or --peak-tflops) of an edm2-img512-xs-shaped network at batch 32: plain (official fp16)
               vs fast path in bf16.
  sampling     generate_images() images/s, plain vs fast path, and per solver (the SOLVERS table).
  multi_gpu    with >= 2 GPUs: `torchrun --standalone --nproc_per_node=2` running TrainingStep under DDP
               with NCCL (this file's --ddp-worker mode) for a few steps: every rank must end with the same
               weights; NCCL all-reduce bus bandwidth. With fewer GPUs (and on the CPU) the same run with
               Gloo on the CPU at tiny size.
  compile      torch.compile (set_fast(compile=...)) of the denoiser (network forward, eval) and of the
               training step (forward + backward): graph breaks, unique graphs, compile time, steady-state
               speed-up vs eager. It runs last: its time depends most on the machine (cold inductor cache).

Sizes: on CUDA the edm2-img512-xs shape (64x64x4 latents, model_channels 128, 1000 classes); `--quick`
(the default on the CPU) uses a tiny net (16x16x4, model_channels 16) and a few steps everywhere. On the CPU
in --quick mode the networks are compiled with the 'eager' backend (dynamo graph capture: graph breaks are
counted the same, no code generation) and inductor compiles one very small function.

    python bench/gpu_acceptance.py --out=gpu-acceptance.json              # on a GPU machine: < 8 minutes
    python bench/gpu_acceptance.py --device=cpu --quick                    # CPU, tiny sizes (~1 minute)
    python bench/gpu_acceptance.py --checks=parity,compile                 # rerun some checks only
"""

import contextlib
import copy
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

import click
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench import common  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from torch_utils import misc  # noqa: E402
from training.encoders import StandardRGBEncoder  # noqa: E402
from training.loop import step as train_step  # noqa: E402
from training.sampling import solvers  # noqa: E402
from training.sampling.sampler import edm_sampler  # noqa: E402
from training.training_loop import EDM2Loss  # noqa: E402

#----------------------------------------------------------------------------
# Solvers timed by the sampling check: (name, sampler_fn for generate_images, sampler kwargs).
# One line per solver; with --quick, num_steps is replaced by the quick step count.

SOLVERS = [   # the official sampler and the low-NFE settings of bench/solver_quality.py that match its quality
    ('heun-32', edm_sampler, dict(num_steps=32)),
    ('dpm++2m-logsnr-12', solvers.sample, dict(solver='dpm++2m', discretization='logsnr', num_steps=12)),
    ('dpm++3m-logsnr-16', solvers.sample, dict(solver='dpm++3m', discretization='logsnr', num_steps=16)),
    ('ipndm-16', solvers.sample, dict(solver='ipndm', num_steps=16)),
]

#----------------------------------------------------------------------------
# Sizes.

FULL = dict(
    net=dict(resolution=64, channels=128),          # edm2-img512-xs: 64x64x4 latents, 1000 classes
    parity_batch=4,
    precision_batch=8, precision_steps=32,
    train_batch=32, train_steps=10, train_reps=3,
    sample_batch=64, sample_steps=32, sample_rounds=2,
    compile_batch=32, compile_calls=10, compile_train_steps=5, compile_rounds=3,
    ddp_net=dict(resolution=32, channels=64), ddp_batch=16, ddp_steps=4, allreduce_mib=256,
)
QUICK = dict(
    net=dict(resolution=16, channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
             channels_per_head=16, label_dim=10),
    parity_batch=4,
    precision_batch=2, precision_steps=4,
    train_batch=4, train_steps=2, train_reps=2,
    sample_batch=2, sample_steps=4, sample_rounds=1,
    compile_batch=2, compile_calls=3, compile_train_steps=2, compile_rounds=2,
    ddp_net=None, ddp_batch=2, ddp_steps=2, allreduce_mib=1,   # ddp_net None = net
)

# Parity limits: forward = max |device - cpu| / max |cpu| of the output D (and of logvar); grad = L2 norm of
# the difference of all parameter gradients / L2 norm of the CPU gradients. The largest per-tensor
# max |diff| / max |cpu| is reported too (scalar gains can show cancellation there), without a limit.
PARITY_LIMITS = {
    'fp32': dict(forward=1e-4, grad=1e-3),      # TF32 off (IEEE float32 everywhere): rounding-order differences only
    'tf32': dict(forward=5e-2, grad=1e-1),      # TF32 on: 10-bit mantissas in convolutions and matmuls (~1e-3 a layer)
}
# Mean |diff| in uint8 levels of reduced-precision sampling vs fp32, same seeds (measured on random-weight
# XS-layout nets: fp16 ~0.05, bf16 ~0.25-0.6; limits with a wide margin, the sampler ODE amplifies rounding).
PRECISION_MEAN_LIMIT = {'fp16': 2.0, 'bf16': 4.0}

#----------------------------------------------------------------------------
# Check machinery.


class CheckTimeout(BaseException):
    """A check ran past its time budget (a BaseException: `except Exception` inside a check does not swallow it)."""


class Context:
    """What every check gets: device, sizes, options, and where to put its figures and problems."""

    def __init__(self, device: torch.device, quick: bool, peak: Optional[float], compile_backend: Optional[str]):
        self.device = device
        self.cuda = device.type == 'cuda'
        self.quick = quick
        self.sizes = QUICK if quick else FULL
        self.peak = peak
        self.compile_backend = compile_backend or ('eager' if (quick and not self.cuda) else 'inductor')
        self.figures: dict = {}
        self.problems: list = []
        self.summary = ''
        self.status = 'pass'

    def log(self, text: str) -> None:
        print(f'    {text}', flush=True)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.log(f'problem: {text}')

    def make_net(self, weights: str = 'fp32', key: str = 'net', **overrides) -> torch.nn.Module:
        """edm2-img512-xs-layout net at this run's size, on the CPU, eval mode, no gradients."""
        kwargs = dict(self.sizes[key] or self.sizes['net'])
        kwargs.update(overrides)
        return common.make_xs_net('cpu', weights=weights, **kwargs)

    def sync(self) -> None:
        common.cuda_sync(self.device)


CHECKS: list = []   # (name, budget_s on CUDA, budget_s with --quick, function)


def check(name: str, budget: float, quick_budget: float) -> Callable:
    def register(fn: Callable) -> Callable:
        CHECKS.append((name, budget, quick_budget, fn))
        return fn
    return register


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise CheckTimeout in the main thread after `seconds` (SIGALRM; no limit where there is none)."""
    if not hasattr(signal, 'SIGALRM'):
        yield
        return

    def on_alarm(signum, frame):
        raise CheckTimeout(f'timed out after {seconds:.0f} s (the time budget of the check)')
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def backends(tf32: bool = False, benchmark: bool = False):
    """TF32 (matmul and cuDNN) and cuDNN benchmark set for the duration, restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark)
    matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = tf32, tf32, benchmark
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = saved


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f'{type(error).__name__}: {text[0] if text else ""}'.rstrip(': ')


def run_check(name: str, fn: Callable, ctx: Context, budget: float) -> dict:
    print(f'\n== {name} (budget {budget:.0f} s)', flush=True)
    start = time.perf_counter()
    error, tb = None, None
    try:
        with time_limit(budget):
            fn(ctx)
    except (Exception, CheckTimeout) as exc:  # one broken check must not hide the others
        error, tb = first_line(exc), traceback.format_exc(limit=-8)
    seconds = time.perf_counter() - start
    if ctx.status == 'skip' and error is None:
        status = 'skip'
    else:
        status = 'fail' if (error is not None or ctx.problems) else 'pass'
    message = error or (ctx.problems[0] if ctx.problems else None)
    if status == 'fail':
        print(f'FAIL {name} ({seconds:.1f} s): {message}', flush=True)
    else:
        print(f'{status.upper()} {name} ({seconds:.1f} s): {ctx.summary}', flush=True)
    if ctx.cuda:
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    return dict(status=status, seconds=round(seconds, 2), summary=ctx.summary, figures=ctx.figures,
                error=message, problems=ctx.problems, traceback=tb)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if value == value and abs(value) != float('inf') else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_json(path: Optional[str], data: dict) -> None:
    if path is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with misc.atomic_open(path, 'w', encoding='utf-8') as f:
        json.dump(jsonable(data), f, indent=2)
        f.write('\n')


def median_ratio(base: list, other: list) -> float:
    return statistics.median(b / o for b, o in zip(base, other))


def fmt(value: float, digits: int = 3) -> str:
    return f'{value:.{digits}g}'

#----------------------------------------------------------------------------
# 1. Environment.


@check('environment', 20, 60)
def check_environment(ctx: Context) -> None:
    f = ctx.figures
    f.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
             cuda_available=torch.cuda.is_available(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
             threads=torch.get_num_threads(), device=str(ctx.device), quick=ctx.quick)
    with contextlib.suppress(Exception):
        f['cudnn'] = torch.backends.cudnn.version()
    with contextlib.suppress(Exception):
        import triton
        f['triton'] = triton.__version__
    if not ctx.cuda:
        ctx.summary = f'torch {f["torch"]}, CPU ({f["cpu_capability"]}, {f["threads"]} threads), no GPU used'
        return
    if not torch.cuda.is_available():
        raise RuntimeError(f'--device={ctx.device} but torch.cuda.is_available() is False '
                           f'(torch {torch.__version__}, built for CUDA {torch.version.cuda})')
    props = torch.cuda.get_device_properties(ctx.device)
    free, total = torch.cuda.mem_get_info(ctx.device)
    f.update(gpu_count=torch.cuda.device_count(), gpu=props.name, capability=f'{props.major}.{props.minor}',
             memory_gib=round(total / 2**30, 1), memory_free_gib=round(free / 2**30, 1),
             multiprocessors=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
    with contextlib.suppress(Exception):
        version = torch.cuda.nccl.version()
        f['nccl'] = '.'.join(str(v) for v in version) if isinstance(version, tuple) else str(version)
    f['peak_tflops'] = ctx.peak
    for i in range(f['gpu_count']):
        ctx.log(f'GPU {i}: {torch.cuda.get_device_name(i)}')
    a = torch.randn(1024, 1024, device=ctx.device, dtype=torch.bfloat16 if f['bf16'] else torch.float16)
    if not bool((a @ a).float().isfinite().all()):
        ctx.problem('a 1024x1024 matmul on the GPU gave non-finite values')
    ctx.summary = (f'{f["gpu_count"]}x {f["gpu"]} ({f["memory_gib"]} GiB, sm {f["capability"]}), torch {f["torch"]}, '
                   f'CUDA {f["cuda"]}, cuDNN {f.get("cudnn")}, NCCL {f.get("nccl")}, bf16 {f["bf16"]}')

#----------------------------------------------------------------------------
# 2. Parity: device vs CPU.


def _parity_inputs(net: torch.nn.Module, batch: int) -> tuple:
    g = torch.Generator().manual_seed(1)
    shape = [batch, net.img_channels, net.img_resolution, net.img_resolution]
    x = torch.randn(shape, generator=g)
    sigma = torch.logspace(-1.7, 1.6, batch)          # 0.02 ... 40: every regime of the preconditioning
    labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, [batch], generator=g)] if net.label_dim else None
    upstream = torch.randn(shape, generator=g)        # d loss / d D
    return x, sigma, labels, upstream


def _forward_backward(net0: torch.nn.Module, inputs: tuple, device: torch.device, fast: bool) -> tuple:
    """Training-mode forward + backward of a copy of `net0` on `device`; (D, logvar, {name: grad}) on the CPU."""
    net = copy.deepcopy(net0).train().requires_grad_(True).to(device)
    net.set_fast(fast, dtype='fp32')
    x, sigma, labels, upstream = (t.to(device) if t is not None else None for t in inputs)
    D, logvar = net(x, sigma, labels, return_logvar=True)
    ((D * upstream).sum() + logvar.sum()).backward()
    grads = {name: p.grad.detach().cpu() for name, p in net.named_parameters() if p.grad is not None}
    return D.detach().cpu(), logvar.detach().cpu(), grads


def _max_rel(a: torch.Tensor, ref: torch.Tensor) -> tuple:
    diff = (a.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return diff, diff / scale if scale > 0 else (0.0 if diff == 0 else float('inf'))


@check('parity', 60, 120)
def check_parity(ctx: Context) -> None:
    net0 = ctx.make_net()
    inputs = _parity_inputs(net0, ctx.sizes['parity_batch'])
    cpu = torch.device('cpu')
    ref_D, ref_logvar, ref_grads = _forward_backward(net0, inputs, cpu, fast=False)
    ctx.log(f'reference: CPU float32, plain path, batch {len(inputs[0])}, {len(ref_grads)} parameter tensors')
    if ctx.cuda:
        variants = [('plain fp32 TF32 off', False, False), ('fast fp32 TF32 off', True, False),
                    ('fast fp32 TF32 on', True, True)]
    else:   # CPU vs CPU: the fast path against the plain one (the plain path against itself is trivially 0)
        variants = [('fast fp32', True, False)]
    worst = []
    for label, fast, tf32 in variants:
        with backends(tf32=tf32):
            D, logvar, grads = _forward_backward(net0, inputs, ctx.device, fast)
        fwd_abs, fwd_rel = _max_rel(D, ref_D)
        lv_abs, lv_rel = _max_rel(logvar, ref_logvar)
        if set(grads) != set(ref_grads):
            ctx.problem(f'{label}: gradients for {sorted(set(grads) ^ set(ref_grads))[:3]} only on one side')
        names = [name for name in ref_grads if name in grads]
        diff_sq = sum((grads[n].double() - ref_grads[n].double()).square().sum().item() for n in names)
        ref_sq = sum(ref_grads[n].double().square().sum().item() for n in names)
        grad_l2 = (diff_sq / ref_sq) ** 0.5 if ref_sq > 0 else float('inf')
        grad_abs = max(_max_rel(grads[n], ref_grads[n])[0] for n in names)
        tensor_rel, tensor_name = max((_max_rel(grads[n], ref_grads[n])[1], n) for n in names)
        limits = PARITY_LIMITS['tf32' if tf32 else 'fp32']
        ctx.figures[label.replace(' ', '_')] = dict(
            forward_max_abs=fwd_abs, forward_max_rel=fwd_rel, logvar_max_rel=lv_rel, grad_l2_rel=grad_l2,
            grad_max_abs=grad_abs, grad_tensor_max_rel=tensor_rel, grad_tensor_worst=tensor_name, limits=limits)
        ctx.log(f'{label}: forward max abs {fmt(fwd_abs)}, rel {fmt(fwd_rel)} (limit {limits["forward"]:g}); '
                f'gradients L2 rel {fmt(grad_l2)} (limit {limits["grad"]:g}), max abs {fmt(grad_abs)}, '
                f'worst tensor {tensor_name} max rel {fmt(tensor_rel)}')
        if not (fwd_rel <= limits['forward'] and lv_rel <= limits['forward']):
            ctx.problem(f'{label}: forward max rel diff {fmt(max(fwd_rel, lv_rel))} > {limits["forward"]:g}')
        if not grad_l2 <= limits['grad']:
            ctx.problem(f'{label}: gradient L2 rel diff {fmt(grad_l2)} > {limits["grad"]:g}')
        worst.append(f'{label}: fwd {fmt(fwd_rel, 2)}, grad {fmt(grad_l2, 2)}')
    limits = ', '.join(f'{k}: forward {v["forward"]:g}, grad {v["grad"]:g}' for k, v in PARITY_LIMITS.items())
    ctx.figures['thresholds'] = ('forward: max |device - cpu| / max |cpu|; grad: L2 |device - cpu| / L2 |cpu| of all '
                                 f'parameter gradients; {limits}')
    ctx.summary = 'rel diff vs CPU fp32 plain: ' + '; '.join(worst)

#----------------------------------------------------------------------------
# 3. Reduced-precision sampling.


@check('precision', 60, 120)
def check_precision(ctx: Context) -> None:
    net = ctx.make_net()
    batch, steps = ctx.sizes['precision_batch'], ctx.sizes['precision_steps']
    device = str(ctx.device)
    with backends(tf32=False):
        seconds, ref = common.sample_once(net, dict(enabled=True, dtype='fp32'), batch, device, num_steps=steps)
    ctx.log(f'reference: fast path fp32 (TF32 off), batch {batch}, {steps} Heun steps: {seconds:.2f} s, '
            f'image std {ref.float().std().item():.1f} levels')
    if ref.float().std().item() == 0:
        ctx.problem('the fp32 reference images are constant')
    parts = []
    for dtype in ('fp16', 'bf16'):
        try:
            net.set_fast(dtype=dtype)
        except ValueError as exc:
            ctx.figures[dtype] = f'not supported by the network: {first_line(exc)}'
            ctx.log(f'{dtype}: {ctx.figures[dtype]}')
            continue
        if ctx.cuda and dtype == 'bf16' and not torch.cuda.is_bf16_supported():
            ctx.figures[dtype] = 'not supported by this GPU'
            ctx.log(f'{dtype}: not supported by this GPU')
            continue
        try:
            seconds, images = common.sample_once(net, dict(enabled=True, dtype=dtype), batch, device, num_steps=steps)
        except Exception as exc:
            if ctx.cuda:
                raise
            ctx.figures[dtype] = f'unsupported on this CPU: {first_line(exc)}'
            ctx.log(f'{dtype}: {ctx.figures[dtype]}')
            continue
        diff = (images.int() - ref.int()).abs().float()
        figures = dict(max_abs=int(diff.max()), mean_abs=round(diff.mean().item(), 3),
                       changed_percent=round((diff > 0).float().mean().item() * 100, 2), seconds=round(seconds, 3),
                       mean_limit=PRECISION_MEAN_LIMIT[dtype])
        ctx.figures[dtype] = figures
        ctx.log(f'{dtype}: max |diff| {figures["max_abs"]} levels, mean {figures["mean_abs"]}, '
                f'{figures["changed_percent"]}% of values changed, {seconds:.2f} s')
        if not figures['mean_abs'] <= PRECISION_MEAN_LIMIT[dtype]:
            ctx.problem(f'{dtype}: mean |diff| {figures["mean_abs"]} levels > {PRECISION_MEAN_LIMIT[dtype]}')
        parts.append(f'{dtype} max {figures["max_abs"]} mean {figures["mean_abs"]}')
    ctx.summary = 'uint8 diff vs fp32: ' + (', '.join(parts) if parts else 'no reduced precision supported')

#----------------------------------------------------------------------------
# 5. Training throughput and MFU.


def _training_batch(net: torch.nn.Module, batch: int, device: torch.device) -> tuple:
    g = torch.Generator().manual_seed(2)
    images = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], generator=g) * 0.5
    labels = torch.nn.functional.one_hot(torch.arange(batch) % net.label_dim, net.label_dim).float()
    return images.to(device), labels.to(device)


@check('training', 60, 120)
def check_training(ctx: Context) -> None:
    s = ctx.sizes
    base = ctx.make_net()
    images, labels = _training_batch(base, s['train_batch'], ctx.device)
    params = sum(p.numel() for p in base.parameters())
    with backends(tf32=False, benchmark=True):  # as train_edm2.py sets them
        variants = {'plain': common.Variant(copy.deepcopy(base), False, {}, ctx.device),
                    'fast_bf16': common.Variant(base, True, dict(dtype='bf16'), ctx.device)}
        ctx.log(f'{params / 1e6:.2f}M params, batch {s["train_batch"]}, plain = official path '
                f'({"fp16" if ctx.cuda else "fp32"}), fast_bf16 = fast path in bf16')
        for variant in variants.values():   # warm-up: cuDNN autotuning, allocator
            common.time_steps(variant, images, labels, 2, ctx.device)
        times = {name: [] for name in variants}
        for _ in range(s['train_reps']):
            for name, variant in variants.items():
                times[name].append(common.time_steps(variant, images, labels, s['train_steps'], ctx.device))
        flops = common.step_flops(variants['fast_bf16'], images, labels)
    for name, variant in variants.items():
        if not all(bool(p.isfinite().all()) for p in variant.params):
            ctx.problem(f'{name}: non-finite weights after training steps')
    ctx.figures.update(params=params, batch=s['train_batch'], model_flops_per_step=flops,
                       model_gflops_per_image=round(flops / s['train_batch'] / 1e9, 3), peak_tflops=ctx.peak)
    for name, ts in times.items():
        t = statistics.median(ts)
        fig = dict(images_per_s=round(s['train_batch'] / t, 3), step_ms=round(t * 1e3, 3),
                   model_tflops=float(fmt(flops / t / 1e12, 4)))
        fig['mfu_percent'] = round(100 * fig['model_tflops'] / ctx.peak, 2) if ctx.peak else None
        ctx.figures[name] = fig
        mfu = f'MFU {fig["mfu_percent"]}% of {ctx.peak:g}' if ctx.peak else 'MFU n/a (no --peak-tflops)'
        ctx.log(f'{name:10s} {fig["images_per_s"]:9.1f} img/s, {fig["step_ms"]:.1f} ms/step, '
                f'{fmt(fig["model_tflops"])} TFLOP/s model, {mfu}')
        if not fig['images_per_s'] > 0:
            ctx.problem(f'{name}: no throughput measured')
    speedup = median_ratio(times['plain'], times['fast_bf16'])
    ctx.figures['speedup_fast_vs_plain'] = round(speedup, 3)
    fast = ctx.figures['fast_bf16']
    mfu = f', MFU {fast["mfu_percent"]}%' if ctx.peak else ''
    ctx.summary = (f'fast bf16 {fast["images_per_s"]:.1f} img/s{mfu}, plain {ctx.figures["plain"]["images_per_s"]:.1f} '
                   f'img/s, x{speedup:.2f} (batch {s["train_batch"]})')

#----------------------------------------------------------------------------
# 6. Sampling throughput.


class CallCounter:
    """Counts the calls of a module (network evaluations) through a forward pre-hook."""

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1


@check('sampling', 75, 120)
def check_sampling(ctx: Context) -> None:
    s = ctx.sizes
    net = ctx.make_net(weights='fp16')    # published pickles store fp16 weights
    batch, device = s['sample_batch'], str(ctx.device)
    counter = CallCounter(net)
    runs = {'plain': (common.FAST_PATHS['plain'], edm_sampler, dict(num_steps=s['sample_steps'])),
            'fast': (common.FAST_PATHS['fast'], edm_sampler, dict(num_steps=s['sample_steps']))}
    for name, sampler_fn, kwargs in SOLVERS:
        kwargs = dict(kwargs)
        if ctx.quick and 'num_steps' in kwargs:
            kwargs['num_steps'] = s['sample_steps']
        runs[f'solver:{name}'] = (common.FAST_PATHS['fast'], sampler_fn, kwargs)
    ctx.log(f'batch {batch}, plain/fast: {s["sample_steps"]} Heun steps; solvers on the fast path')
    calls, images = {}, {}
    with backends(tf32=False, benchmark=True):
        for name, (fast_path, sampler_fn, kwargs) in runs.items():   # warm-up, network calls, images
            counter.count = 0
            _, images[name] = common.sample_once(net, fast_path, batch, device, sampler_fn=sampler_fn, **kwargs)
            calls[name] = counter.count
        times = {name: [] for name in runs}
        for _ in range(s['sample_rounds']):
            for name, (fast_path, sampler_fn, kwargs) in runs.items():
                seconds, _ = common.sample_once(net, fast_path, batch, device, sampler_fn=sampler_fn, **kwargs)
                times[name].append(seconds)
    counter.handle.remove()
    for name in runs:
        t = statistics.median(times[name])
        fig = dict(images_per_s=round(batch / t, 3), seconds_per_batch=round(t, 3), network_calls=calls[name],
                   sampler_kwargs=runs[name][2],
                   change_vs_plain=common.image_change(images[name], images['plain']).strip())
        ctx.figures[name] = fig
        ctx.log(f'{name:18s} {fig["images_per_s"]:9.2f} img/s, {calls[name]:3d} network calls, '
                f'{fig["change_vs_plain"]}  {fig["sampler_kwargs"]}')
        if not fig['images_per_s'] > 0 or calls[name] == 0:
            ctx.problem(f'{name}: no throughput measured')
    speedup = median_ratio(times['plain'], times['fast'])
    ctx.figures.update(batch=batch, speedup_fast_vs_plain=round(speedup, 3), solvers=[n for n, _, _ in SOLVERS])
    solver_text = ', '.join(f'{n} {ctx.figures[f"solver:{n}"]["images_per_s"]:.1f}' for n, _, _ in SOLVERS)
    fast, plain = ctx.figures['fast']['images_per_s'], ctx.figures['plain']['images_per_s']
    ctx.summary = (f'fast {fast:.1f} img/s, plain {plain:.1f} img/s, x{speedup:.2f}; solvers (img/s): {solver_text} '
                   f'(batch {batch})')

#----------------------------------------------------------------------------
# 7. Several processes: DDP training step under torchrun.

_TORCHRUN_VARS = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT',
                  'GROUP_RANK', 'ROLE_RANK', 'TORCHELASTIC_RUN_ID')


@check('multi_gpu', 120, 240)
def check_multi_gpu(ctx: Context) -> None:
    gpus = torch.cuda.device_count() if ctx.cuda else 0
    nccl = ctx.cuda and gpus >= 2
    if ctx.cuda and not nccl:
        ctx.log(f'{gpus} GPU: NCCL needs 2; running the same job with Gloo on the CPU at tiny size instead')
    ctx.figures.update(gpus=gpus, backend='nccl' if nccl else 'gloo')
    with tempfile.TemporaryDirectory(prefix='edm2-acceptance-') as tmp:
        out = os.path.join(tmp, 'worker.json')
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               os.path.abspath(__file__), '--ddp-worker', f'--out={out}',
               '--device=cuda' if nccl else '--device=cpu', '--quick' if (ctx.quick or not nccl) else '--full']
        env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
        env.update(PYTHONPATH=REPO, EDM2_DIST_TIMEOUT='120')
        if not nccl:
            env['OMP_NUM_THREADS'] = '1'
        ctx.log(' '.join(cmd[1:5]) + ' bench/gpu_acceptance.py ' + ' '.join(cmd[6:]))
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate()
        except BaseException:   # the check's time limit: stop torchrun and its workers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        ctx.figures['wall_seconds'] = round(time.perf_counter() - start, 2)
        ctx.figures['returncode'] = proc.returncode
        if proc.returncode != 0:
            tail = [line for line in output.strip().splitlines() if line.strip()][-12:]
            for line in tail:
                ctx.log(f'| {line}')
            errors = [line for line in tail if 'Error' in line or 'error' in line]
            raise RuntimeError(f'torchrun exited with {proc.returncode}: {(errors or tail or [""])[-1].strip()}')
        with open(out, encoding='utf-8') as f:
            result = json.load(f)
    ctx.figures.update(result)
    ctx.log(f'{result["world_size"]} ranks ({result["backend"]}, {", ".join(result["devices"])}): '
            f'{result["steps"]} TrainingStep steps, {result["step_ms"]:.1f} ms/step, max weight diff between ranks '
            f'{result["max_rank_diff"]:g}, weights moved by {result["weights_moved"]:.3g}; all-reduce '
            f'{result["allreduce_mib"]} MiB: bus bandwidth {result["allreduce_busbw_gbs"]:.2f} GB/s')
    if result['world_size'] != 2:
        ctx.problem(f'world size {result["world_size"]}, expected 2')
    if not result['all_finite']:
        ctx.problem('non-finite loss or gradients in a step')
    if not result['max_rank_diff'] <= 1e-6:
        ctx.problem(f'ranks disagree: max weight diff {result["max_rank_diff"]:g}')
    if not result['weights_moved'] > 0:
        ctx.problem('the weights did not change')
    ctx.summary = (f'{result["backend"]} x{result["world_size"]}: ranks agree '
                   f'({"bit-identical" if result["max_rank_diff"] == 0 else result["max_rank_diff"]}), '
                   f'{result["step_ms"]:.0f} ms/step, all-reduce {result["allreduce_busbw_gbs"]:.1f} GB/s')
    if ctx.cuda and not nccl:
        ctx.summary = f'NCCL not run ({gpus} GPU); ' + ctx.summary


def ddp_worker(device_name: str, quick: bool, out: str) -> None:
    """One rank of the multi_gpu check: TrainingStep under DDP, then compare the weights of all ranks."""
    dist.init(device=device_name)
    device = dist.get_device()
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = QUICK if quick else FULL
    cuda = device.type == 'cuda'
    kwargs = dict(sizes['ddp_net'] or sizes['net'])
    net = common.make_xs_net('cpu', **kwargs).train().requires_grad_(True).to(device)   # same seed on every rank
    net.set_fast(True, dtype='bf16' if cuda else None)
    ddp = train_step.wrap_ddp(net, device)
    params = list(net.parameters())
    optimizer = train_step.make_optimizer(params, dict(class_name='torch.optim.Adam', betas=(0.9, 0.99)), device)
    batch_gpu = sizes['ddp_batch']
    shape = [net.img_channels, net.img_resolution, net.img_resolution]

    def data():   # each rank its own images: the all-reduce has something to do
        g = torch.Generator().manual_seed(1000 + rank)
        while True:
            images = torch.randint(0, 256, [batch_gpu, *shape], generator=g, dtype=torch.uint8)
            labels = torch.nn.functional.one_hot(torch.randint(net.label_dim, [batch_gpu], generator=g), net.label_dim)
            yield images, labels

    step = train_step.TrainingStep(
        net=net, ddp=ddp, params=params, loss_fn=EDM2Loss(), optimizer=optimizer, encoder=StandardRGBEncoder(),
        data_iterator=data(), noise=train_step.StepNoise(0, batch_gpu * world, shape, device),
        lr_kwargs=dict(func_name='training.training_loop.learning_rate_schedule', ref_lr=1e-2, ref_batches=1e3,
                       rampup_Mimg=0),
        seed=0, batch_size=batch_gpu * world, batch_gpu=batch_gpu)
    initial = torch.cat([p.detach().float().flatten() for p in params])
    finite, nimg = True, 0
    finite &= step.run(nimg)   # warm-up (DDP buckets, cuDNN)
    nimg += batch_gpu * world
    common.cuda_sync(device)
    start = time.perf_counter()
    for _ in range(sizes['ddp_steps']):
        finite &= step.run(nimg)
        nimg += batch_gpu * world
    common.cuda_sync(device)
    step_s = (time.perf_counter() - start) / sizes['ddp_steps']
    weights = torch.cat([p.detach().float().flatten() for p in params])
    gathered = [torch.empty_like(weights) for _ in range(world)]
    torch.distributed.all_gather(gathered, weights)
    max_rank_diff = max((g - gathered[0]).abs().max().item() for g in gathered)
    flags = [None] * world
    name = torch.cuda.get_device_name(device) if cuda else 'cpu'
    torch.distributed.all_gather_object(flags, (bool(finite), f'{name} (rank {rank})'))

    numel = sizes['allreduce_mib'] * 2**20 // 4
    buffer = torch.ones(numel, device=device)
    for _ in range(2):
        torch.distributed.all_reduce(buffer)
    common.cuda_sync(device)
    reps = 5
    start = time.perf_counter()
    for _ in range(reps):
        torch.distributed.all_reduce(buffer)
    common.cuda_sync(device)
    seconds = (time.perf_counter() - start) / reps
    busbw = numel * 4 / seconds * 2 * (world - 1) / world / 1e9
    if rank == 0:
        result = dict(world_size=world, backend=torch.distributed.get_backend(), devices=[d for _, d in flags],
                      steps=sizes['ddp_steps'], batch_per_rank=batch_gpu, step_ms=step_s * 1e3,
                      all_finite=all(f for f, _ in flags), max_rank_diff=max_rank_diff,
                      weights_moved=(weights - initial.to(weights.device)).abs().max().item(),
                      allreduce_mib=sizes['allreduce_mib'], allreduce_busbw_gbs=busbw)
        write_json(out, result)
    dist.shutdown()

#----------------------------------------------------------------------------
# 4. torch.compile.


def _compile_available(ctx: Context) -> Optional[str]:
    """None if torch.compile works here, else why not."""
    try:
        fn = torch.compile(lambda t: t * 2 + 1, backend='eager')
        fn(torch.ones(3))
    except Exception as exc:
        return first_line(exc)
    return None


def _graph_stats() -> dict:
    from torch._dynamo.utils import counters
    breaks = counters['graph_break']
    return dict(graph_breaks=sum(breaks.values()), unique_graphs=counters['stats']['unique_graphs'],
                break_reasons=[str(reason).splitlines()[0][:200] for reason in list(breaks)[:3]])


def _reset_dynamo() -> None:
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()


def _compile_denoiser(ctx: Context) -> dict:
    s = ctx.sizes
    net = ctx.make_net()
    eager = copy.deepcopy(net)
    eager.set_fast(True)
    net.set_fast(True, compile=ctx.compile_backend)
    g = torch.Generator().manual_seed(3)
    batch = s['compile_batch']
    x = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], generator=g).to(ctx.device)
    labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, [batch], generator=g)].to(ctx.device)
    sigmas = [torch.full([batch], value, device=ctx.device) for value in (0.5, 2.0)]
    _reset_dynamo()
    with torch.no_grad(), backends(tf32=False, benchmark=True):
        ref = eager(x, sigmas[0], labels)
        ctx.sync()
        start = time.perf_counter()
        out = net(x, sigmas[0], labels)
        ctx.sync()
        compile_s = time.perf_counter() - start
        net(x, sigmas[1], labels)   # another noise level must not recompile
        stats = _graph_stats()
        diff = (out - ref).abs().max().item() / ref.abs().max().item()

        def calls(model):
            return lambda: [model(x, sigmas[i % 2], labels) for i in range(s['compile_calls'])]
        times = _alternate({'eager': calls(eager), 'compiled': calls(net)}, s['compile_rounds'], ctx)
    speedup = median_ratio(times['eager'], times['compiled'])
    return dict(stats, compile_s=round(compile_s, 2), speedup=round(speedup, 3), max_rel_diff_vs_eager=diff,
                eager_ms_per_call=round(statistics.median(times['eager']) / s['compile_calls'] * 1e3, 3),
                compiled_ms_per_call=round(statistics.median(times['compiled']) / s['compile_calls'] * 1e3, 3),
                batch=batch)


def _compile_training(ctx: Context) -> dict:
    s = ctx.sizes
    base = ctx.make_net()
    images, labels = _training_batch(base, s['compile_batch'], ctx.device)
    dtype = 'bf16' if ctx.cuda else None
    with backends(tf32=False, benchmark=True):
        eager = common.Variant(copy.deepcopy(base), True, dict(dtype=dtype), ctx.device)
        compiled = common.Variant(base, True, dict(dtype=dtype, compile=ctx.compile_backend), ctx.device)
        _reset_dynamo()
        ctx.sync()
        start = time.perf_counter()
        compiled.step(images, labels)   # forward and backward graphs compiled here
        ctx.sync()
        compile_s = time.perf_counter() - start
        compiled.step(images, labels)
        stats = _graph_stats()
        common.time_steps(eager, images, labels, 2, ctx.device)
        steps = s['compile_train_steps']
        runs = {'eager': lambda: common.time_steps(eager, images, labels, steps, ctx.device),
                'compiled': lambda: common.time_steps(compiled, images, labels, steps, ctx.device)}
        times = _alternate(runs, s['compile_rounds'], ctx)
    finite = all(bool(p.isfinite().all()) for p in compiled.params)
    speedup = median_ratio(times['eager'], times['compiled'])
    return dict(stats, compile_s=round(compile_s, 2), speedup=round(speedup, 3), weights_finite=finite,
                dtype=dtype or 'fp32', batch=s['compile_batch'],
                eager_ms_per_step=round(statistics.median(times['eager']) / steps * 1e3, 3),
                compiled_ms_per_step=round(statistics.median(times['compiled']) / steps * 1e3, 3))


def _alternate(runs: dict, rounds: int, ctx: Context) -> dict:
    """Seconds of each run per round, A B A B ..."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            ctx.sync()
            start = time.perf_counter()
            fn()
            ctx.sync()
            times[name].append(time.perf_counter() - start)
    return times


def _inductor_smoke(ctx: Context) -> dict:
    """Inductor code generation on a very small function (--quick on the CPU, where the nets use 'eager')."""
    def fn(a, b):
        return torch.nn.functional.silu(a * b + 1).sum(dim=1)
    a, b = torch.randn(64, 256), torch.randn(64, 256)
    _reset_dynamo()
    start = time.perf_counter()
    out = torch.compile(fn, backend='inductor')(a, b)
    compile_s = time.perf_counter() - start
    ref = fn(a, b)
    return dict(compile_s=round(compile_s, 2), max_rel_diff=(out - ref).abs().max().item() / ref.abs().max().item())


@check('compile', 330, 300)
def check_compile(ctx: Context) -> None:
    why = _compile_available(ctx)
    if why is not None:
        if ctx.cuda:
            raise RuntimeError(f'torch.compile is unavailable: {why}')
        ctx.status = 'skip'
        ctx.summary = f'skipped on CPU: torch.compile is unavailable ({why})'
        ctx.log(ctx.summary)
        return
    ctx.figures['backend'] = ctx.compile_backend
    if ctx.compile_backend != 'inductor':
        ctx.log(f'networks compiled with backend "{ctx.compile_backend}" (graph capture only, no code generation)')
    parts = []
    for part, fn in (('denoiser', _compile_denoiser), ('training_step', _compile_training)):
        try:
            fig = fn(ctx)
        except Exception as exc:   # the other part still runs
            ctx.figures[part] = dict(error=first_line(exc), traceback=traceback.format_exc(limit=-8))
            ctx.problem(f'{part}: {first_line(exc)}')
            parts.append(f'{part} FAILED')
            continue
        ctx.figures[part] = fig
        unit = 'call' if part == 'denoiser' else 'step'
        diff = f', max rel diff vs eager {fmt(fig["max_rel_diff_vs_eager"])}' if part == 'denoiser' else ''
        ctx.log(f'{part:13s} {fig["graph_breaks"]} graph breaks, {fig["unique_graphs"]} graphs, compile '
                f'{fig["compile_s"]:.1f} s, eager {fig[f"eager_ms_per_{unit}"]:.2f} ms/{unit} vs compiled '
                f'{fig[f"compiled_ms_per_{unit}"]:.2f}: x{fig["speedup"]:.2f}{diff}')
        if fig['graph_breaks']:
            reason = fig['break_reasons'][0] if fig['break_reasons'] else '?'
            ctx.problem(f'{part}: {fig["graph_breaks"]} graph breaks (first: {reason})')
        if part == 'denoiser':
            limit = 1e-4 if ctx.compile_backend == 'eager' else 5e-2   # inductor: other fp16/bf16 rounding
            if not fig['max_rel_diff_vs_eager'] <= limit:
                ctx.problem(f'denoiser: compiled output differs from eager by {fmt(fig["max_rel_diff_vs_eager"])} '
                            f'(max |diff| / max |eager|, limit {limit:g})')
        elif not fig['weights_finite']:
            ctx.problem('training_step: non-finite weights after compiled steps')
        parts.append(f'{part} {fig["graph_breaks"]} breaks/{fig["unique_graphs"]} graphs, '
                     f'{fig["compile_s"]:.0f} s, x{fig["speedup"]:.2f}')
    if ctx.compile_backend != 'inductor':
        try:
            fig = _inductor_smoke(ctx)
            ctx.figures['inductor_small_function'] = fig
            ctx.log(f'inductor on a small function: compile {fig["compile_s"]:.1f} s, '
                    f'max rel diff {fmt(fig["max_rel_diff"])}')
            if not fig['max_rel_diff'] <= 1e-5:
                ctx.problem(f'inductor: small function differs from eager by {fmt(fig["max_rel_diff"])} (rel)')
            parts.append(f'inductor fn {fig["compile_s"]:.0f} s')
        except Exception as exc:   # no C++ compiler etc.: the GPU path does not depend on it
            ctx.figures['inductor_small_function'] = f'unavailable on CPU: {first_line(exc)}'
            ctx.log(ctx.figures['inductor_small_function'])
            parts.append('inductor unavailable on CPU')
    ctx.summary = f'{ctx.compile_backend}: ' + '; '.join(parts)

#----------------------------------------------------------------------------
# Command line.


def print_table(results: dict) -> None:
    print('\nSummary')
    print(f'{"check":12s} {"result":6s} {"seconds":>8s}  key figures')
    for name, r in results.items():
        text = r['summary'] if r['status'] != 'fail' else r['error']
        print(f'{name:12s} {r["status"].upper():6s} {r["seconds"]:8.1f}  {text}')


@click.command()
@click.option('--device', help='cuda or cpu  [default: cuda if available]', default=None)
@click.option('--quick/--full', default=None,
              help='Tiny sizes (default on the CPU) or the edm2-img512-xs shape (default on CUDA)')
@click.option('--out', help='Write the results as JSON to this file (atomically, after every check)', default=None)
@click.option('--budget-s', type=float, default=None,
              help='Total time budget in seconds  [default: 420 on CUDA, 900 on the CPU]')
@click.option('--checks', 'only', help='Comma-separated checks to run  [default: all]', default=None)
@click.option('--peak-tflops', type=float, default=None,
              help='Dense bf16 peak TFLOP/s for MFU  [default: by GPU name: H100/H200 989, A100 312]')
@click.option('--compile-backend', default=None,
              help='torch.compile backend for the nets  [default: inductor; eager on the CPU with --quick]')
@click.option('--ddp-worker', is_flag=True, hidden=True, help='Internal: one rank of the multi_gpu check')
def main(device, quick, out, budget_s, only, peak_tflops, compile_backend, ddp_worker):
    """EDM2 acceptance on one GPU: parity, reduced precision, compile, training MFU, sampling speed, NCCL."""
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    quick = (device.type != 'cuda') if quick is None else quick
    if ddp_worker:
        return ddp_worker_main(device, quick, out)
    names = [name for name, *_ in CHECKS]
    selected = names if only is None else [n.strip() for n in only.split(',') if n.strip()]
    unknown = sorted(set(selected) - set(names))
    if unknown:
        raise click.BadParameter(f'unknown check(s) {", ".join(unknown)}; expected {", ".join(names)}',
                                 param_hint='--checks')
    budget_s = budget_s or (420.0 if device.type == 'cuda' else 900.0)
    peak = peak_tflops
    if peak is None and device.type == 'cuda' and torch.cuda.is_available():
        peak = common.peak_tflops(torch.cuda.get_device_name(device))
    start = time.perf_counter()
    print(f'EDM2 acceptance: device {device}, {"quick (tiny sizes)" if quick else "full (edm2-img512-xs shape)"}, '
          f'budget {budget_s:.0f} s, checks {", ".join(selected)}', flush=True)
    report = dict(device=str(device), quick=quick, budget_s=budget_s, argv=sys.argv[1:],
                  started=datetime.datetime.now().isoformat(timespec='seconds'), complete=False, checks={})
    results = report['checks']
    for name, budget, quick_budget, fn in CHECKS:
        if name not in selected:
            continue
        left = budget_s - (time.perf_counter() - start)
        if left < 5:
            results[name] = dict(status='fail', seconds=0.0, summary='', figures={}, problems=[], traceback=None,
                                 error=f'not run: total budget of {budget_s:.0f} s spent')
            print(f'\nFAIL {name}: not run, total budget of {budget_s:.0f} s spent', flush=True)
        else:
            ctx = Context(device, quick, peak, compile_backend)
            results[name] = run_check(name, fn, ctx, min(quick_budget if quick else budget, left))
        report['elapsed_s'] = round(time.perf_counter() - start, 2)
        write_json(out, report)
    passed = all(r['status'] in ('pass', 'skip') for r in results.values())
    report.update(complete=True, passed=passed, elapsed_s=round(time.perf_counter() - start, 2))
    write_json(out, report)
    print_table(results)
    where = f'; results in {out}' if out else ''
    print(f'\n{"ALL PASSED" if passed else "FAILED"} in {report["elapsed_s"]:.0f} s{where}')
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if passed else 1)   # no waiting on leftover compile workers or CUDA teardown


def ddp_worker_main(device: torch.device, quick: bool, out: str) -> None:
    ddp_worker(device.type, quick, out)


if __name__ == '__main__':
    main()
