"""EDM v1 runs of `train_edm2.py` (Karras et al. 2022, Sec. 5 and Appendix F): the presets named after the
published models, the options only these runs take (`--arch`, `--precond`, `--augment`, `--ema`), and the
config entries in which such a run differs from an EDM2 one. The loop, data pipeline, checkpoints and
resume are the same (`training.training_loop`); what differs is configuration:

* network: a `training.networks` preconditioner (VP, VE or EDM, Table 1) around DDPM++, NCSN++ or ADM;
* loss: `training.loss.VPLoss`, `VELoss` or `EDMLoss`, the one matching the preconditioner (Table 1);
* augmentation: `training.augment.AugmentPipe` with probability `--augment`, its labels fed to the network
  (Appendix F.2, non-leaking augmentations);
* EMA: the classic exponential average with a half-life of `--ema` Mimg and EDM v1's ramp-up
  (`training.phema.EDM1EMA`);
* optimizer and learning rate: Adam (beta2 = 0.999) at a constant `--lr` after a linear ramp-up over
  `--rampup` (10 Mimg), i.e. `learning_rate_schedule` without decay (Table 7);
* snapshots: `network-snapshot-<kimg:06d>.pkl` in EDM v1's layout (docs/formats.md).
"""

import copy
import math
from typing import Optional

import dnnlib
from torch_utils import distributed as dist
from training.loop import edm1_presets
from training.loop.rules import ConfigError
from training.snapshots.loading import EDM1_NETWORK_MODULE

#----------------------------------------------------------------------------

EDM1_LOSSES = {'VPPrecond': 'VPLoss', 'VEPrecond': 'VELoss', 'EDMPrecond': 'EDMLoss'}  # Table 1, "Training"
EDM1_LR_RAMPUP_MIMG = 10        # Table 7: linear learning-rate ramp-up over the first 10 Mimg.
EDM1_EMA_RAMPUP_RATIO = 0.05    # EDM v1's EMA ramp-up: half-life at most 5% of the images seen.
EDM1_OPTIMIZER_KWARGS = dict(class_name='torch.optim.Adam', betas=[0.9, 0.999], eps=1e-8)

# train_edm2.py options that only EDM v1 runs take.
EDM1_OPTIONS = dict(arch='--arch', precond='--precond', augment='--augment', ema='--ema')


def preset_names() -> list[str]:
    return list(edm1_presets.EDM1_MODELS)


def is_edm1_preset(name: str) -> bool:
    return name in edm1_presets.EDM1_MODELS


def is_edm1_network(network_kwargs: dict) -> bool:
    """Whether `network_kwargs` (with `class_name`) build an EDM v1 network."""
    return network_kwargs['class_name'].rsplit('.', 1)[0] == EDM1_NETWORK_MODULE


def _whole_batches(nimg: float, batch_size: int) -> int:
    """EDM v1 trains until at least `nimg` images are seen: whole batches, rounded up."""
    return math.ceil(nimg / batch_size) * batch_size


def preset_values(name: str) -> dict:
    """The training options of a published model as train_edm2.py option values: durations in images,
    `ema` and `rampup` in Mimg, `decay=0` (constant learning rate after the ramp-up)."""
    options = copy.deepcopy(edm1_presets.EDM1_MODELS[name]['options'])
    batch = options['batch']
    return dict(cond=options['cond'], arch=options['arch'], precond=options['precond'],
                duration=_whole_batches(options['duration'] * 1e6, batch), batch=batch, channels=options['cbase'],
                channel_mult=options['cres'], lr=options['lr'], decay=0, rampup=EDM1_LR_RAMPUP_MIMG,
                dropout=options['dropout'], augment=options['augment'], ema=options['ema'], fp16=options['fp16'],
                ls=options['ls'])

#----------------------------------------------------------------------------
# Checks.

def refuse_edm1_options(opts: dict, preset: str) -> None:
    """An EDM2 preset: the EDM v1 options were given by mistake."""
    for key, flag in EDM1_OPTIONS.items():
        if opts.get(key) is not None:
            raise ConfigError(f'{flag}: applies to EDM v1 runs; preset {preset} trains an EDM2 network (EDM v1 '
                              f'presets: {", ".join(preset_names())})')


def check_data_channels(path: str, channels: int) -> None:
    if channels != 3:
        raise ConfigError(f'--data: EDM v1 networks train on RGB images (3 channels); {path} holds {channels}-channel '
                          'items')


def check_finetune_family(network_kwargs: dict, edm1_run: bool, path: str, preset: str) -> None:
    """The network of --model2finetune and the preset are of the same generation (EDM v1 or EDM2)."""
    class_name = network_kwargs['class_name'].rsplit('.', 1)[-1]
    if is_edm1_network(network_kwargs) and not edm1_run:
        raise ConfigError(f'--model2finetune: {path} holds an EDM v1 network ({class_name}); fine-tune it with an '
                          f'EDM v1 preset (its learning rate, EMA and augmentation), e.g. --preset={preset_names()[0]}')
    if edm1_run and not is_edm1_network(network_kwargs):
        raise ConfigError(f'--preset: {preset} trains EDM v1 networks, but --model2finetune {path} holds an EDM2 '
                          f'network ({class_name}); use an EDM2 preset such as base-finetuning')

#----------------------------------------------------------------------------
# Config entries.

def network_kwargs(opts: dict) -> dnnlib.EasyDict:
    """Constructor kwargs of a fresh network (with `class_name`, without the data shape, which the loop adds),
    assembled as EDM v1's training script does; `--channels`, `--channel-mult`, `--num-blocks` and `--attn-res`
    replace the architecture's model_channels, channel_mult, num_blocks and attn_resolutions."""
    if opts.get('channels_per_head') is not None:
        raise ConfigError('--channels-per-head: EDM v1 architectures fix their attention heads (one head in DDPM++ '
                          'and NCSN++, 64 channels per head in ADM)')
    for key, choices in (('arch', edm1_presets.EDM1_ARCHS), ('precond', edm1_presets.EDM1_PRECONDS)):
        if opts[key] not in choices:
            raise ConfigError(f'--{key}: "{opts[key]}" is none of {", ".join(choices)}')
    kwargs = edm1_presets.edm1_network_kwargs(opts['arch'], opts['precond'], cbase=opts.get('channels'),
                                              cres=opts.get('channel_mult'), dropout=opts['dropout'],
                                              augment=opts['augment'], fp16=opts['fp16'])
    for key in ('img_resolution', 'img_channels', 'label_dim'):
        del kwargs[key]
    if opts.get('num_blocks') is not None:
        kwargs['num_blocks'] = opts['num_blocks']
    if opts.get('attn_res') is not None:
        kwargs['attn_resolutions'] = list(opts['attn_res'])
    return dnnlib.EasyDict(kwargs)


def loss_kwargs(network_kwargs: dict, P_mean: Optional[float], P_std: Optional[float]) -> dnnlib.EasyDict:
    """The loss of the network's formulation (Table 1) with its defaults; --P_mean/--P_std set the noise level
    distribution of the EDM formulation (Sec. 5: ln sigma ~ N(-1.2, 1.2^2))."""
    precond = network_kwargs['class_name'].rsplit('.', 1)[-1]
    if precond not in EDM1_LOSSES:
        raise ConfigError(f'--model2finetune: EDM v1 has no training loss for {precond} (it trains '
                          f'{", ".join(EDM1_LOSSES)})')
    kwargs = dnnlib.EasyDict(class_name=f'training.loss.{EDM1_LOSSES[precond]}')
    noise_options = dict(P_mean=P_mean, P_std=P_std)
    for key, value in noise_options.items():
        if value is not None and precond != 'EDMPrecond':
            raise ConfigError(f'--{key}: sets the noise levels of the EDM formulation (--precond=edm); the {precond} '
                              f'loss draws them its own way (Table 1)')
        if value is not None:
            kwargs[key] = value
    return kwargs


def augment_kwargs(p: float, network_kwargs: dict, explicit: bool, source: Optional[str]) -> Optional[dnnlib.EasyDict]:
    """The augmentation pipeline with probability `p` (None for p = 0). A network without augmentation-label
    input (fine-tuning one trained without augmentation) trains without it; asking for it is an error."""
    if not p:
        return None
    if not network_kwargs.get('augment_dim'):
        if explicit:
            raise ConfigError(f'--augment: the network from {source} has no augmentation-label input (augment_dim=0); '
                              'give --augment=0')
        dist.print0(f'Note: the network from {source} has no augmentation-label input; training without augmentation')
        return None
    return dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=p, **edm1_presets.EDM1_AUGMENT_KWARGS)


def loop_kwargs(opts: dict, network_kwargs: dict, explicit: set) -> dict:
    """The training_loop() kwargs that only EDM v1 runs set: optimizer, EMA, augmentation, snapshot layout.
    Fine-tuning starts the EMA at the loaded weights without a ramp-up, as EDM v1's --transfer does."""
    finetuning = opts.get('model2finetune') is not None
    rampup_ratio = None if finetuning else EDM1_EMA_RAMPUP_RATIO
    return dict(
        optimizer_kwargs=dnnlib.EasyDict(EDM1_OPTIMIZER_KWARGS),
        ema_kwargs=dnnlib.EasyDict(class_name='training.phema.EDM1EMA', halflife_Mimg=opts['ema'],
                                   rampup_ratio=rampup_ratio),
        augment_kwargs=augment_kwargs(opts['augment'], network_kwargs, 'augment' in explicit, opts.get('model2finetune')),
        snapshot_layout='edm1',
    )

#----------------------------------------------------------------------------
