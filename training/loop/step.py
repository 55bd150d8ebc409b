"""One training step (`TrainingStep`) and what it is built from: optimizer, data loader, per-step noise,
gradient checks. The step trains EDM2 networks with `EDM2Loss` and EDM v1 networks with the losses of
`training.loss`, which draw their own noise and take the augmentation pipeline (`draws_own_noise`).

Speed rules (perf-notes): no per-parameter Python loops on the normal path; the
optimizer runs foreach (CPU) or fused (CUDA); gradient norms use one foreach
reduction; the per-parameter `nan_to_num_` runs only on a step whose gradients are
actually non-finite.
"""

import contextlib
import inspect
import signal
from typing import Any, Iterator, Optional, Sequence

import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from training.loop import finetune

#----------------------------------------------------------------------------
# Setup.

def configure_backends(cudnn_benchmark: bool) -> None:
    """cuDNN benchmark per option; TF32 and reduced-precision fp16 reductions off."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


def wrap_ddp(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel wrapper when there are several processes, the network itself otherwise."""
    if dist.get_world_size() == 1:
        return net
    device_ids = [device] if device.type == 'cuda' else None
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids)


def make_optimizer(params: Sequence[torch.nn.Parameter], optimizer_kwargs: dict, device: torch.device) -> torch.optim.Optimizer:
    """Optimizer from `optimizer_kwargs`; Adam gets `fused=True` on CUDA and `foreach=True` elsewhere unless set."""
    kwargs = dict(optimizer_kwargs)
    if kwargs.get('class_name') in ('torch.optim.Adam', torch.optim.Adam) and 'foreach' not in kwargs and 'fused' not in kwargs:
        kwargs['fused' if device.type == 'cuda' else 'foreach'] = True
    if 'betas' in kwargs:
        kwargs['betas'] = tuple(kwargs['betas'])  # JSON configs store lists
    return dnnlib.util.construct_class_by_name(params=list(params), **kwargs)


def make_data_iterator(dataset: Any, sampler: Any, batch_gpu: int, data_loader_kwargs: dict,
                       device: torch.device) -> Iterator:
    """Iterator over a data loader from `data_loader_kwargs`; options that need worker processes or CUDA are
    dropped without them.

    The worker processes start with SIGINT ignored: a Ctrl-C in the terminal reaches every process of the job,
    and only the main process should act on it (it stops after the step and writes a checkpoint).
    """
    kwargs = dict(data_loader_kwargs)
    if kwargs.get('num_workers', 0) == 0:
        kwargs.pop('prefetch_factor', None)
        kwargs.pop('persistent_workers', None)
    if device.type != 'cuda':
        kwargs['pin_memory'] = False
    loader = dnnlib.util.construct_class_by_name(dataset=dataset, sampler=sampler, batch_size=batch_gpu, **kwargs)
    with _sigint_ignored():  # forked and spawned processes inherit an ignored signal
        return iter(loader)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to change
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)

#----------------------------------------------------------------------------
# Noise shared by all ranks: rows of a global-batch draw.

def draws_own_noise(loss_fn: Any) -> bool:
    """Whether `loss_fn` is an EDM v1 loss (training.loss): one that takes the augmentation pipeline and draws
    sigma, the augmentation and the noise itself, from the global generator that every step seeds with (seed,
    rank, images seen). Any other loss gets the step's pre-drawn noise like `EDM2Loss` (`rnd_normal`, `noise`)."""
    return 'augment_pipe' in inspect.signature(loss_fn).parameters


class StepNoise:
    """Standard normal draws for a whole global batch, seeded by (seed, cur_nimg).

    `draw()` returns `rnd_normal` [B,1,1,1] (for ln sigma), `noise` [B,C,H,W] and, with
    `posterior`, the VAE posterior sample's noise [B,C,H,W] (else None), drawn last so the
    other two do not depend on it. Sample `i` of the step (global position `cur_nimg + i`
    in the data stream) always gets row `i`, whatever the number of processes or
    accumulation rounds.
    """

    def __init__(self, seed: int, batch_size: int, item_shape: Sequence[int], device: torch.device, posterior: bool = False):
        self.seed = seed
        self.device = device
        self.generator = torch.Generator(device=device)
        self.rnd_normal = torch.empty([batch_size, 1, 1, 1], device=device)
        self.noise = torch.empty([batch_size, *item_shape], device=device)
        self.posterior = torch.empty([batch_size, *item_shape], device=device) if posterior else None

    def draw(self, cur_nimg: int) -> tuple:
        self.generator.manual_seed(hash((self.seed, cur_nimg)) % (1 << 63))
        for buffer in (self.rnd_normal, self.noise, self.posterior):
            if buffer is not None:
                torch.randn(buffer.shape, generator=self.generator, device=self.device, out=buffer)
        return self.rnd_normal, self.noise, self.posterior


def global_rows(rank: int, world_size: int, round_idx: int, batch_gpu: int, device: torch.device) -> torch.Tensor:
    """Positions within the step of this rank's samples in one accumulation round.

    InfiniteSampler gives rank r the stream positions r, r + W, r + 2W, ...; item j of
    round k is the rank's (k * batch_gpu + j)-th item of the step.
    """
    local = torch.arange(batch_gpu, device=device) + round_idx * batch_gpu
    return local * world_size + rank

#----------------------------------------------------------------------------
# Gradient checks.

def gradient_health(grads: Sequence[torch.Tensor], loss_total: torch.Tensor, loss_scaling: float) -> tuple:
    """(global L2 norm of the gradients divided by `loss_scaling`, whether it and the loss are finite).

    One foreach reduction and one host synchronisation per step. After DDP's all-reduce
    every rank holds the same averaged gradients, so this norm is the global one.
    """
    if len(grads) == 0:
        norm = torch.zeros([], device=loss_total.device)
    else:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).to(torch.float32))
    norm = norm / loss_scaling
    finite = bool(torch.stack([norm, loss_total.to(norm.device)]).isfinite().all())
    return norm, finite


def clip_gradients_(grads: Sequence[torch.Tensor], grad_norm: torch.Tensor, max_norm: float) -> None:
    """If grad_norm > max_norm, scale every gradient by max_norm / (grad_norm + 1e-6).

    `grad_norm` is the unscaled norm (docs/differences.md#train-1: the threshold does not depend on --ls).
    """
    coef = torch.where(grad_norm > max_norm, max_norm / (grad_norm + 1e-6), torch.ones_like(grad_norm))
    torch._foreach_mul_(list(grads), coef)


def zero_nonfinite_(grads: Sequence[torch.Tensor]) -> None:
    """Replace NaN/+-Inf gradient entries by 0, in place (only called on steps that need it)."""
    for grad in grads:
        torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)


class HealthMonitor:
    """Counts consecutive steps whose loss or gradients were non-finite."""

    def __init__(self, limit: Optional[int]):
        self.limit = limit or 0
        self.streak = 0

    def update(self, finite: bool) -> bool:
        """Record one step; True when the streak reached the limit (the run should stop)."""
        self.streak = 0 if finite else self.streak + 1
        return self.limit > 0 and self.streak >= self.limit

#----------------------------------------------------------------------------
# The step.

class TrainingStep:
    """One optimizer step: loss and gradients over the accumulation rounds, gradient checks and clipping,
    learning rate, optimizer update. The EMA and the image counter are the loop's."""

    def __init__(self, *, net: torch.nn.Module, ddp: torch.nn.Module, params: Sequence[torch.nn.Parameter],
                 loss_fn: Any, optimizer: torch.optim.Optimizer, encoder: Any, data_iterator: Any,
                 noise: Optional[StepNoise], lr_kwargs: dict, seed: int, batch_size: int, batch_gpu: int,
                 loss_scaling: float = 1, max_grad_norm: float = 0, force_finite: bool = True,
                 augment_pipe: Any = None, device: Optional[torch.device] = None):
        """`noise` is None for a loss that draws its own (draws_own_noise); it then gets `augment_pipe`
        (None = no augmentation) and `device` says where the step computes."""
        self.net, self.ddp, self.params = net, ddp, list(params)
        self.loss_fn, self.optimizer, self.encoder, self.augment_pipe = loss_fn, optimizer, encoder, augment_pipe
        self.data_iterator, self.noise, self.lr_kwargs, self.seed = data_iterator, noise, lr_kwargs, seed
        self.device = device if device is not None else noise.device
        self.batch_size, self.batch_gpu = batch_size, batch_gpu
        self.loss_scaling, self.max_grad_norm, self.force_finite = loss_scaling, max_grad_norm, force_finite
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.batch_gpu_total = batch_size // self.world_size
        self.num_rounds = self.batch_gpu_total // batch_gpu

    def run(self, cur_nimg: int) -> bool:
        """The step that starts at image `cur_nimg`; returns whether its loss and gradients were finite."""
        misc.set_random_seed(self.seed, self.rank, cur_nimg)
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = self._accumulate_gradients(cur_nimg)
        return self._update_weights(cur_nimg, loss_total)

    def _accumulate_gradients(self, cur_nimg: int) -> torch.Tensor:
        """Forward and backward over the accumulation rounds (DDP syncs on the last); returns the summed loss."""
        drawn = self.noise.draw(cur_nimg) if self.noise is not None else None
        device = self.device
        loss_total = torch.zeros([], device=device)
        for round_idx in range(self.num_rounds):
            with misc.ddp_sync(self.ddp, (round_idx == self.num_rounds - 1)):
                images, labels = next(self.data_iterator)
                rows = global_rows(self.rank, self.world_size, round_idx, self.batch_gpu, device)
                images = self._encode(images.to(device), rows, drawn)
                labels = finetune.match_label_dim(labels.to(device), self.net.label_dim)
                loss = self._loss(images, labels, rows, drawn)
                training_stats.report('Loss/loss', loss)
                loss.sum().mul(self.loss_scaling / self.batch_gpu_total).backward()
                loss_total += loss.detach().sum()
        return loss_total

    def _encode(self, images: torch.Tensor, rows: torch.Tensor, drawn: Optional[tuple]) -> torch.Tensor:
        posterior = drawn[2] if drawn is not None else None
        if posterior is None:
            return self.encoder.encode_latents(images)
        return self.encoder.encode_latents(images, posterior[rows])  # the posterior noise exists only for our VAE encoder class

    def _loss(self, images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, drawn: Optional[tuple]) -> torch.Tensor:
        if drawn is None:  # an EDM v1 loss: sigma, augmentation and noise from the step's seeded global generator
            return self.loss_fn(net=self.ddp, images=images, labels=labels, augment_pipe=self.augment_pipe)
        rnd_normal, noise, _posterior = drawn
        return self.loss_fn(net=self.ddp, images=images, labels=labels, rnd_normal=rnd_normal[rows], noise=noise[rows])

    def _update_weights(self, cur_nimg: int, loss_total: torch.Tensor) -> bool:
        """Check and clip the gradients, set the learning rate, zero non-finite entries, run the optimizer."""
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm, finite = gradient_health(grads, loss_total, self.loss_scaling)
        training_stats.report('Loss/grad_norm', grad_norm)
        training_stats.report('Loss/nonfinite_grads', 0.0 if finite else 1.0)
        if self.max_grad_norm > 0 and finite:
            clip_gradients_(grads, grad_norm, self.max_grad_norm)
        lr = dnnlib.util.call_func_by_name(cur_nimg=cur_nimg, batch_size=self.batch_size, **self.lr_kwargs)
        training_stats.report('Loss/learning_rate', lr)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        if self.force_finite and not finite:
            zero_nonfinite_(grads)
        self.optimizer.step()
        return finite

#----------------------------------------------------------------------------
