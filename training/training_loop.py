"""Main training loop of EDM2: loss, learning-rate schedule, loop.

This file is embedded in every snapshot pickle (the `loss_fn` entry is an `EDM2Loss`),
so what runs at import time uses only what the official toolkit provides: the standard
library, numpy, torch, psutil, dnnlib and the official torch_utils modules. The loop's
helpers (`training.loop.rules`, `training.loop.step`, `training.loop.status`,
`training.loop.finetune`) are imported inside `training_loop()`.

The same loop trains the EDM v1 networks (`training.networks`, Karras et al. 2022) when the config
says so: their losses (`training.loss`, which draw their own noise and take the augmentation pipeline
of `augment_kwargs`), the classic EMA (`training.phema.EDM1EMA`), a constant learning rate after the
ramp-up (`learning_rate_schedule` with `ref_batches=0`) and EDM v1's snapshot layout
(`snapshot_layout='edm1'`).

Differences from the official loop (all documented in `train_edm2.py --help`):
* The noise levels and noise of a step (and, for latent datasets, the VAE posterior
  sample) are drawn for the whole global batch from a generator seeded by
  (seed, cur_nimg), and every rank takes the rows of its own samples. With dropout 0, results therefore do not depend on the number of
  processes or on `batch_gpu` (up to float rounding); dropout masks still come from
  each rank's own generator per accumulation round, so with dropout > 0 they do.
  A resumed run continues the same streams either way.
* Non-finite gradients are counted (`Loss/nonfinite_grads`); a run whose loss or
  gradients stay non-finite for `nonfinite_limit` steps stops with an error.
* A stop signal (SIGTERM / SIGUSR1, and Ctrl-C under train_edm2.py) writes a training
  state at the current step and ends the loop.
* Frozen parameters are left out of the optimizer and keep their exact values.
"""

import os
import time

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence

#----------------------------------------------------------------------------
# Uncertainty-based loss function (Equations 14, 15, 16, 21) proposed in the
# paper "Analyzing and Improving the Training Dynamics of Diffusion Models".

@persistence.persistent_class
class EDM2Loss:
    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, rnd_normal=None, noise=None):
        """Per-element loss, same shape as `images`.

        `rnd_normal` ([N,1,1,1]) and `noise` (shape of `images`) are standard normal draws;
        when omitted they are drawn here, sigma first (official order).
        """
        if rnd_normal is None:
            rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()                   # ln(sigma) ~ N(P_mean, P_std^2)
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2  # lambda(sigma), eq. 16
        if noise is None:
            noise = torch.randn_like(images)
        denoised, logvar = net(images + noise * sigma, sigma, labels, return_logvar=True)
        loss = (weight / logvar.exp()) * ((denoised - images) ** 2) + logvar   # eq. 21
        return loss

#----------------------------------------------------------------------------
# Learning rate decay schedule used in the paper "Analyzing and Improving
# the Training Dynamics of Diffusion Models".

def learning_rate_schedule(cur_nimg, batch_size, ref_lr=100e-4, ref_batches=70e3, rampup_Mimg=10):
    """alpha_ref / sqrt(max(n / (t_ref B), 1)) * min(n / (R 1e6), 1): the EDM2 paper's inverse square-root
    decay after t_ref batches, with a linear ramp-up over R Mimg."""
    lr = ref_lr
    if ref_batches > 0:
        lr /= np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return lr

#----------------------------------------------------------------------------
# Errors.

class TrainingDivergedError(RuntimeError):
    """The loss or the gradients stayed non-finite for too many consecutive steps."""


class ResumeMismatchError(ValueError):
    """The training state in the run directory was saved for a different network or freeze setting."""

#----------------------------------------------------------------------------
# Main training loop.

def training_loop(
    dataset_kwargs      = dict(class_name='training.dataset.ImageFolderDataset', path=None),
    encoder_kwargs      = dict(class_name='training.encoders.StabilityVAEEncoder'),
    data_loader_kwargs  = dict(class_name='torch.utils.data.DataLoader', pin_memory=True, num_workers=2, prefetch_factor=2),
    network_kwargs      = dict(class_name='training.networks_edm2.Precond'),
    loss_kwargs         = dict(class_name='training.training_loop.EDM2Loss'),
    optimizer_kwargs    = dict(class_name='torch.optim.Adam', betas=(0.9, 0.99)),
    lr_kwargs           = dict(func_name='training.training_loop.learning_rate_schedule'),
    ema_kwargs          = dict(class_name='training.phema.PowerFunctionEMA'),
    augment_kwargs      = None,     # Augmentation pipeline of the EDM v1 losses (training.augment.AugmentPipe); None = off.
    snapshot_layout     = 'edm2',   # Network snapshot layout: 'edm2', or 'edm1' (EDM v1's, for its networks; docs/formats.md).
    run_dir             = '.',      # Output directory.
    preload_model       = None,     # [FORK] Network pickle to fine-tune (its EMA network and encoder); None = fresh network.
    seed                = 0,        # Global random seed.
    batch_size          = 2048,     # Total batch size for one training iteration.
    batch_gpu           = None,     # Limit batch size per GPU. None = no limit.
    total_nimg          = 8<<30,    # Train for a total of N training images.
    slice_nimg          = None,     # Train for a maximum of N training images in one invocation. None = no limit.
    status_nimg         = 128<<10,  # Report status every N training images. None = disable.
    snapshot_nimg       = 8<<20,    # Save network snapshot every N training images. None = disable.
    checkpoint_nimg     = 128<<20,  # Save state checkpoint every N training images. None = disable.
    loss_scaling        = 1,        # Loss scaling factor for reducing FP16 under/overflows.
    force_finite        = True,     # Get rid of NaN/Inf gradients before feeding them to the optimizer.
    cudnn_benchmark     = True,     # Enable torch.backends.cudnn.benchmark?
    device              = None,     # Compute device; None = the one chosen by dist.init().
    max_grad_norm       = 0,        # [FORK] Clip the global gradient norm (unscaled by loss_scaling) to this; 0 = off.
    freeze_down         = False,    # [FORK] Freeze the parameters of the U-Net's downsampling blocks.
    freeze_attn         = False,    # [FORK] Freeze the attention weights.
    fast_kwargs         = None,     # Network fast-path switches (Precond.set_fast kwargs); None = network defaults.
    nonfinite_limit     = 100,      # Stop after this many consecutive steps with non-finite loss/gradients; 0 = never.
):
    """Train (or fine-tune) an EDM2 or EDM v1 network; returns 'done', 'stopped' (signal) or 'suspended' (slice)."""
    from training import encoders
    from training.loop import finetune
    from training.loop import rules
    from training.loop import status as train_status
    from training.loop import step as train_step
    prev_status_time = time.time()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(device) if device is not None else dist.get_device()
    misc.set_random_seed(seed, rank)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
    train_step.configure_backends(cudnn_benchmark)

    # Validate batch size and intervals.
    batch_gpu, _ = rules.check_batch_settings(batch_size, batch_gpu, world_size, total_nimg, slice_nimg, status_nimg,
                                              snapshot_nimg, checkpoint_nimg)

    # Setup dataset, encoder, and network.
    dist.print0('Loading dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    ref_image, ref_label = dataset_obj[0]
    source = finetune.load_finetune_source(preload_model) if preload_model is not None else None
    dist.print0('Setting up encoder...')
    encoder = source.encoder if source is not None else dnnlib.util.construct_class_by_name(**encoder_kwargs)
    ref_image = encoder.encode_latents(torch.as_tensor(ref_image).to(device).unsqueeze(0))
    dist.print0('Constructing network...')
    if source is not None:
        net = source.net
        finetune.check_compatible(net, ref_image, ref_label, preload_model)
    else:
        rules.check_image_shape(ref_image.shape, rules.network_channel_mult(network_kwargs))
        interface_kwargs = dict(img_resolution=ref_image.shape[-1], img_channels=ref_image.shape[1], label_dim=ref_label.shape[-1])
        net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs)
    net.train().requires_grad_(True).to(device)
    if fast_kwargs is not None:
        net.set_fast(**fast_kwargs)

    # Print network summary (eval mode: no forced weight normalisation on rank 0 only).
    if rank == 0:
        with torch.no_grad():
            misc.print_module_summary(net.eval(), [
                torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device),
                torch.ones([batch_gpu], device=device),
                torch.zeros([batch_gpu, net.label_dim], device=device),
            ], max_nesting=2)
        net.train()

    # [FORK] Freeze parameters; frozen weights are held exactly (no forced re-normalisation).
    frozen = finetune.freeze_parameters(net, freeze_down=freeze_down, freeze_attn=freeze_attn)
    if augment_kwargs is None:
        frozen += finetune.freeze_augment_input(net)
    for name in frozen:
        dist.print0(f'Frozen parameter: {name}')
    finetune.hold_frozen_weights(net)
    trainable = [p for p in net.parameters() if p.requires_grad]

    # Setup training state.
    dist.print0('Setting up training state...')
    state = dnnlib.EasyDict(cur_nimg=0, total_elapsed_time=0)
    ddp = train_step.wrap_ddp(net, device)
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = train_step.make_optimizer(trainable, optimizer_kwargs, device)
    ema = dnnlib.util.construct_class_by_name(net=net, **ema_kwargs) if ema_kwargs is not None else None
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None

    # Load previous checkpoint and decide how long to train.
    checkpoint = dist.CheckpointIO(state=state, net=net, loss_fn=loss_fn, optimizer=optimizer, ema=ema)
    try:
        checkpoint.load_latest(run_dir)
    except dist.CheckpointMismatchError as err:
        raise ResumeMismatchError(f'{err.path} was saved with a different network or --freeze-* setting ({err.name}: '
            f'{err.detail}); resume with the original options, or use a new --outdir') from None
    stop_at_nimg = total_nimg
    if slice_nimg is not None:
        granularity = checkpoint_nimg if checkpoint_nimg is not None else snapshot_nimg if snapshot_nimg is not None else batch_size
        slice_end_nimg = (state.cur_nimg + slice_nimg) // granularity * granularity  # round down
        stop_at_nimg = min(stop_at_nimg, slice_end_nimg)
    if stop_at_nimg <= state.cur_nimg:
        dist.print0(f'Nothing to do: training already reached {state.cur_nimg // 1000} kimg.')
        return 'done'
    dist.print0(f'Training from {state.cur_nimg // 1000} kimg to {stop_at_nimg // 1000} kimg:')
    dist.print0()

    # Main training loop.
    dataset_sampler = misc.InfiniteSampler(dataset=dataset_obj, rank=rank, num_replicas=world_size, seed=seed, start_idx=state.cur_nimg)
    dataset_iterator = train_step.make_data_iterator(dataset_obj, dataset_sampler, batch_gpu, data_loader_kwargs, device)
    noise_source = None
    if not train_step.draws_own_noise(loss_fn):
        noise_source = train_step.StepNoise(seed, batch_size, ref_image.shape[1:], device,
                                            posterior=isinstance(encoder, encoders.StabilityVAEEncoder))
    reporter = train_status.StatusReporter(run_dir, device, stop_at_nimg)
    step = train_step.TrainingStep(net=net, ddp=ddp, params=trainable, loss_fn=loss_fn, optimizer=optimizer,
        encoder=encoder, data_iterator=dataset_iterator, noise=noise_source, lr_kwargs=lr_kwargs, seed=seed,
        batch_size=batch_size, batch_gpu=batch_gpu, loss_scaling=loss_scaling, max_grad_norm=max_grad_norm,
        force_finite=force_finite, augment_pipe=augment_pipe, device=device)
    health = train_step.HealthMonitor(nonfinite_limit)
    prev_status_nimg = state.cur_nimg
    cumulative_training_time = 0
    start_nimg = state.cur_nimg
    outcome = 'done'
    try:
        while True:
            done = (state.cur_nimg >= stop_at_nimg)
            stop_requested = dist.any_rank(dist.should_stop())
            at_resume_point = (state.cur_nimg == start_nimg != 0)  # the run we resumed reported and saved it

            # Report status.
            if status_nimg is not None and (done or stop_requested or state.cur_nimg % status_nimg == 0) and not at_resume_point:
                cur_time = time.time()
                state.total_elapsed_time += cur_time - prev_status_time
                reporter.report(state, cur_time - prev_status_time, cumulative_training_time, state.cur_nimg - prev_status_nimg)
                cumulative_training_time = 0
                prev_status_nimg = state.cur_nimg
                prev_status_time = time.time()
                dist.update_progress(state.cur_nimg // 1000, stop_at_nimg // 1000)
                if state.cur_nimg == stop_at_nimg and state.cur_nimg < total_nimg:
                    dist.request_suspend()

            # Save network snapshot.
            if snapshot_nimg is not None and state.cur_nimg % snapshot_nimg == 0 and not at_resume_point and rank == 0 and ema is not None:
                train_status.save_snapshots(run_dir, state.cur_nimg, ema, encoder, dataset_kwargs, loss_fn,
                                            augment_pipe=augment_pipe, layout=snapshot_layout)

            # Save state checkpoint.
            checkpoint_due = checkpoint_nimg is not None and (done or state.cur_nimg % checkpoint_nimg == 0)
            if (checkpoint_due or stop_requested) and state.cur_nimg != start_nimg:
                checkpoint.save(os.path.join(run_dir, f'training-state-{state.cur_nimg//1000:07d}.pt'))
                if world_size > 1:
                    misc.check_ddp_consistency(net)

            # Done?
            if stop_requested:
                dist.print0(f'Stopped by signal at {state.cur_nimg // 1000} kimg; run the same command again to resume.')
                outcome = 'stopped'
            elif dist.should_suspend() and not done:
                outcome = 'suspended'
            if done or outcome != 'done':
                break

            # Run one optimizer step.
            batch_start_time = time.time()
            finite = step.run(state.cur_nimg)

            # Update EMA and training state.
            state.cur_nimg += batch_size
            if ema is not None:
                ema.update(cur_nimg=state.cur_nimg, batch_size=batch_size)
            cumulative_training_time += time.time() - batch_start_time
            if health.update(finite):
                raise TrainingDivergedError(f'loss or gradients non-finite in the last {health.streak} steps (until '
                    f'{state.cur_nimg // 1000} kimg); stopping without further snapshots. Resume from an earlier '
                    f'training state with a lower --lr or --ls, or another --seed.')
    finally:
        reporter.close()
    return outcome

#----------------------------------------------------------------------------
