"""From `train_edm2.py` options to a training config, and launching the run.

The config is a plain dict (an `EasyDict`) whose keys are `training_loop()` kwargs, in
the official order, with this project's additions at the end:

    dataset_kwargs, encoder_kwargs, [preload_model], total_nimg, batch_size,
    network_kwargs, loss_kwargs, lr_kwargs, batch_gpu, loss_scaling, cudnn_benchmark,
    status_nimg, snapshot_nimg, checkpoint_nimg, seed, max_grad_norm, freeze_down,
    freeze_attn, data_loader_kwargs, fast_kwargs, nonfinite_limit

and, for the EDM v1 presets (training.loop.edm1_config), optimizer_kwargs, ema_kwargs,
augment_kwargs, snapshot_layout.
"""

import json
import math
import os
import pickle
import re
from typing import Any, Optional, Sequence, Union

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from training.loop import edm1_config
from training.loop import rules
from training.loop import presets
from training.loop.rules import ConfigError
from training.dataset import CategoriesError

#----------------------------------------------------------------------------

_NIMG_UNITS = (('Ki', 10), ('Mi', 20), ('Gi', 30))


def parse_nimg(s: Union[int, str, None]) -> Optional[int]:
    """'128Ki' -> 131072, '8Mi' -> 8388608, '2Gi' -> 2147483648, '4096' -> 4096."""
    if s is None or isinstance(s, int):
        return s
    s = str(s).strip()
    for suffix, shift in _NIMG_UNITS:
        if s.endswith(suffix):
            return int(s[:-len(suffix)]) << shift
    return int(s)


def format_nimg(nimg: int) -> str:
    """An image count in the largest unit parse_nimg reads back exactly: 2147483648 -> '2Gi', 1000 -> '1000'."""
    for suffix, shift in reversed(_NIMG_UNITS):
        if nimg > 0 and nimg % (1 << shift) == 0:
            return f'{nimg >> shift}{suffix}'
    return str(nimg)


def parse_rampup(value: Union[float, str, None]) -> Optional[float]:
    """--rampup in Mimg: an image count with a unit like --duration ('1Mi' -> 1.048576), or a plain number,
    which means Mimg as in the fork ('10' -> 10.0). Raises ValueError for anything else or a negative value."""
    if value is None:
        return None
    text = str(value).strip()
    has_unit = text.endswith(tuple(suffix for suffix, _ in _NIMG_UNITS))
    try:
        mimg = parse_nimg(text) / 1e6 if has_unit else float(text)
    except ValueError:
        mimg = math.nan
    if not (math.isfinite(mimg) and mimg >= 0):
        raise ValueError(f'"{value}" is neither an image count (e.g. 256Ki, 8Mi) nor a non-negative number of Mimg '
                         '(e.g. 10)')
    return mimg


def default_rampup(preset: dict, finetuning: bool) -> float:
    """LR ramp-up in Mimg when --rampup is not given: the preset's, else 0 when fine-tuning
    (the fork's value) and the official 10 Mimg when training from scratch."""
    if preset.get('rampup') is not None:
        return preset['rampup']
    return 0.0 if finetuning else 10.0

#----------------------------------------------------------------------------

_FILTER_KEYS = ('nima_threshold', 'categories', 'top_percent', 'top_per_category', 'max_size')


def _dataset_kwargs(opts: dict) -> dnnlib.EasyDict:
    """ImageFolderDataset, or the fork's FilteredImageDataset when a filter option is given. --categories
    stays the string given (what training_options.json records); the dataset checks it against its categories."""
    filters = {key: opts.get(key) for key in _FILTER_KEYS}
    kwargs = dnnlib.EasyDict(path=opts['data'], use_labels=opts['cond'])
    if opts.get('node_cache'):
        kwargs.node_cache = True # slow network storage: read a node-local copy (training.data_tools.node_cache)
    if all(value is None for value in filters.values()):
        return dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', **kwargs)
    return dnnlib.EasyDict(class_name='training.dataset.FilteredImageDataset', **kwargs, **filters)


def _no_labels_error(path: str) -> ConfigError:
    return ConfigError(f'--cond=True, but no labels found in the dataset {path}: class labels come from its dataset.json '
                       '(metadata.json holds scores, not labels); write one with dataset_tool.py convert (class folders '
                       'become labels) or process-and-encode, or train unconditionally with --cond=0')


def _check_dataset(dataset_kwargs: dict, cond: bool, batch_size: Optional[int] = None) -> tuple:
    """Open the dataset once (printing what its filters kept); return its item shape [C, H, W] and its number
    of images."""
    try:
        dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
        if hasattr(dataset_obj, 'summary'):
            dist.print0(dataset_obj.summary())
        dist.print0(f'Number of images in the dataset: {len(dataset_obj)}')
        if cond and not dataset_obj.has_labels:
            raise _no_labels_error(dataset_kwargs['path'])
        _warn_batch_exceeds_dataset(batch_size, len(dataset_obj))
        return dataset_obj.image_shape, len(dataset_obj)
    except CategoriesError as err:
        raise ConfigError(f'--categories: {err}') from None
    except (IOError, NotImplementedError) as err:
        raise ConfigError(f'--data: {err}') from None
    except KeyError as err:
        # dataset.json without labels for some images (docs/user-files.md#datasetjson); str() would add quotes.
        raise ConfigError(f'--data: {err.args[0] if err.args else err}') from None


def _warn_batch_exceeds_dataset(batch_size: Optional[int], num_images: int) -> None:
    """A batch larger than the dataset repeats every image within each batch: legal, but rarely meant."""
    if batch_size is not None and batch_size > num_images:
        dist.print0(f'Warning: --batch {batch_size} is larger than the dataset ({dnnlib.util.count_of(num_images, "image")}):'
                    f' every image appears about {batch_size // num_images} times in each batch')


def _check_image_shape(path: str, shape: list, channel_mult: Optional[list]) -> None:
    """Square items whose side the U-Net can halve len(channel_mult)-1 times."""
    try:
        rules.check_image_shape(shape, channel_mult)
    except ValueError as err:
        raise ConfigError(f'--data: {path}: {err}') from None


# Network options that have no effect with --model2finetune: the network comes from the pickle
# (docs/differences.md#train-5).
_NETWORK_OPTIONS = dict(channels='--channels', channel_mult='--channel-mult', num_blocks='--num-blocks',
                        attn_res='--attn-res', channels_per_head='--channels-per-head', dropout='--dropout',
                        arch='--arch', precond='--precond')


def _warn_ignored_network_options(opts: dict) -> None:
    """Rank 0: one warning per network option given together with --model2finetune."""
    for key, flag in _NETWORK_OPTIONS.items():
        if opts.get(key) is not None:
            dist.print0(f'Warning: {flag} is ignored with --model2finetune: the network (its shape and dropout) '
                        f'comes from {opts["model2finetune"]}')


def _finetune_network_kwargs(path: str) -> dnnlib.EasyDict:
    """Open --model2finetune as the loop will, so that a file which is not a snapshot fails before anything is
    written (dry runs included); return the kwargs describing its network, for training_options.json."""
    from training.loop import finetune
    try:
        source = finetune.load_finetune_source(path)
    except (OSError, ValueError, pickle.UnpicklingError) as err:
        message = str(err)  # the loader's own errors name the option already
        if not message.startswith('--model2finetune'):
            message = f'--model2finetune: {message}'
        raise ConfigError(message) from None
    return dnnlib.EasyDict(finetune.network_kwargs_of(source.net))


def check_level_list(name: str, values: Sequence[int]) -> None:
    """Rule for channel_mult / attn_resolutions (CLI callbacks and library alike): positive integers;
    channel_mult needs at least one level, while an empty attn_resolutions means no attention."""
    if values and min(values) < 1:
        raise ValueError(f'"{",".join(str(v) for v in values)}" must be a comma-separated list of positive integers')
    if not values and name == 'channel_mult':
        raise ValueError('needs at least one multiplier, e.g. 1,2,2')


def _check_level_options(opts: dict) -> None:
    for key, name, flag in (('channel_mult', 'channel_mult', '--channel-mult'),
                            ('attn_res', 'attn_resolutions', '--attn-res')):
        try:
            if opts.get(key) is not None:
                check_level_list(name, opts[key])
        except ValueError as err:
            raise ConfigError(f'{flag}: {err}') from None


def _network_kwargs(preset_name: str, opts: dict) -> dnnlib.EasyDict:
    kwargs = dnnlib.EasyDict(class_name=presets.PRECOND_CLASS_NAME, model_channels=opts['channels'],
                             dropout=opts['dropout'], use_fp16=opts['fp16'])
    kwargs.update(presets.NETWORK_EXTRAS.get(preset_name, {}))
    _check_level_options(opts)
    knobs = dict(channel_mult=opts.get('channel_mult'), num_blocks=opts.get('num_blocks'),
                 attn_resolutions=opts.get('attn_res'), channels_per_head=opts.get('channels_per_head'))
    kwargs.update({key: value for key, value in knobs.items() if value is not None})
    return kwargs


# Defaults of options whose click default is None because the EDM v1 presets set them.
_OPTION_DEFAULTS = dict(cond=True, fp16=True, ls=1)


def _preset_values(preset: str) -> dict:
    if edm1_config.is_edm1_preset(preset):
        return edm1_config.preset_values(preset)
    try:
        return presets.get_preset(preset)
    except presets.PresetError as err:
        raise ConfigError(f'--preset: {err}, {", ".join(edm1_config.preset_names())}') from None


def _resolve_options(preset: str, opts: dict) -> tuple:
    """(options with the preset's values and the defaults filled in, the names of the options given explicitly)."""
    opts = dnnlib.EasyDict(opts)
    preset_values = _preset_values(preset)
    explicit = {key for key, value in opts.items() if value is not None}
    finetuning = opts.get('model2finetune') is not None
    if not edm1_config.is_edm1_preset(preset):
        edm1_config.refuse_edm1_options(opts, preset)
    if finetuning:
        _warn_ignored_network_options(opts) # before the preset fills in its values: only explicit options warn
    for key, value in [*preset_values.items(), *_OPTION_DEFAULTS.items()]:  # the preset's values first
        if opts.get(key) is None:
            opts[key] = value
    opts.rampup = _mimg_option('--rampup', opts.get('rampup'), default_rampup(preset_values, finetuning))
    opts.ema = _mimg_option('--ema', opts.get('ema'), None)
    return opts, explicit


def setup_training_config(preset: str = 'edm2-img512-s', **opts: Any) -> dnnlib.EasyDict:
    """Resolve options (None = take the preset's value) into a training config; raises ConfigError.
    Prints (rank 0) warnings about settings that are legal but probably not meant. An EDM v1 preset
    configures the same loop for EDM v1 networks (training.loop.edm1_config)."""
    opts, explicit = _resolve_options(preset, opts)
    edm1 = edm1_config.is_edm1_preset(preset)
    finetuning = opts.get('model2finetune') is not None
    if opts.channels is None and not finetuning and not edm1:
        raise ConfigError(f'--channels: preset "{preset}" defines no network; give --channels or --model2finetune')

    c = dnnlib.EasyDict()
    c.dataset_kwargs = _dataset_kwargs(opts)
    network_kwargs = None if finetuning else _fresh_network_kwargs(preset, opts, edm1)
    shape, num_images = _check_dataset(c.dataset_kwargs, opts.cond, parse_nimg(opts.batch))
    # A fine-tuned network has its own levels; check_compatible() compares its resolution at load time.
    _check_image_shape(opts.data, shape, None if finetuning else rules.network_channel_mult(network_kwargs))
    encoders = {3: 'training.encoders.StandardRGBEncoder', 8: 'training.encoders.StabilityVAEEncoder'}
    if shape[0] not in encoders:
        raise ConfigError(f'--data: Unsupported channel count {shape[0]}')
    if edm1:
        edm1_config.check_data_channels(opts.data, shape[0])
    c.encoder_kwargs = dnnlib.EasyDict(class_name=encoders[shape[0]])
    if finetuning:
        c.preload_model = opts.model2finetune
        network_kwargs = _finetune_network_kwargs(opts.model2finetune)
        edm1_config.check_finetune_family(network_kwargs, edm1, opts.model2finetune, preset)
    c.total_nimg = parse_nimg(opts.duration)
    c.batch_size = parse_nimg(opts.batch)
    c.network_kwargs = network_kwargs
    if edm1:
        c.loss_kwargs = edm1_config.loss_kwargs(network_kwargs, opts.P_mean, opts.P_std)
    else:
        c.loss_kwargs = dnnlib.EasyDict(class_name='training.training_loop.EDM2Loss', P_mean=opts.P_mean, P_std=opts.P_std)
    c.lr_kwargs = dnnlib.EasyDict(func_name='training.training_loop.learning_rate_schedule', ref_lr=opts.lr,
                                  ref_batches=opts.decay, rampup_Mimg=opts.rampup)
    c.batch_gpu = parse_nimg(opts.get('batch_gpu')) or None
    c.loss_scaling = opts.get('ls', 1)
    c.cudnn_benchmark = opts.get('bench', True)
    c.status_nimg = parse_nimg(opts.get('status', 128 << 10)) or None
    c.snapshot_nimg = parse_nimg(opts.get('snapshot', 8 << 20)) or None
    c.checkpoint_nimg = parse_nimg(opts.get('checkpoint', 128 << 20)) or None
    c.seed = opts.get('seed', 0)
    c.max_grad_norm = opts.get('max_grad_norm') or 0
    c.freeze_down = bool(opts.get('freeze_down'))
    c.freeze_attn = bool(opts.get('freeze_attn'))
    workers = opts.get('workers', 2)
    c.data_loader_kwargs = dnnlib.EasyDict(class_name='torch.utils.data.DataLoader', pin_memory=True,
                                           num_workers=workers, prefetch_factor=2 if workers > 0 else None)
    c.fast_kwargs = _fast_kwargs(opts.get('plain', False), opts.get('dtype'))
    c.nonfinite_limit = opts.get('nonfinite_limit', 100)
    if edm1:
        c.update(edm1_config.loop_kwargs(opts, network_kwargs, explicit))
    elif not {'P_mean', 'P_std'} & explicit:
        _warn_about_noise_settings(preset, c.loss_kwargs, data_channels=shape[0])
    _warn_about_run_length(c, num_images)
    return c


def _fresh_network_kwargs(preset: str, opts: dict, edm1: bool) -> dnnlib.EasyDict:
    if edm1:
        _check_level_options(opts)
        return edm1_config.network_kwargs(opts)
    return _network_kwargs(preset, opts)


def _mimg_option(flag: str, value: Union[float, str, None], default: Optional[float]) -> Optional[float]:
    """--rampup, --ema: Mimg from an image count or a plain number (parse_rampup); `default` when not given."""
    if value is None:
        return default
    try:
        return parse_rampup(value)
    except ValueError as err:
        raise ConfigError(f'{flag}: {err}') from None

#----------------------------------------------------------------------------
# Warnings about settings that are legal but probably not meant.

# The official recipes see each image at most a few thousand times (img512: 2Gi images of ImageNet's 1.28M).
MANY_EPOCHS = 10000

_DATA_KINDS = {3: 'RGB pixels', 4: 'VAE latents', 8: 'VAE latents'}  # by channels of the presets and datasets


def _warn_about_noise_settings(preset: str, loss_kwargs: dict, data_channels: int) -> None:
    """Rank 0: the preset's P_mean/P_std were tuned for latents and the data are pixels, or the other way round."""
    preset_kind = _DATA_KINDS[presets.data_shape_for_preset(preset)['img_channels']]
    data_kind = _DATA_KINDS[data_channels]
    if preset_kind == data_kind:
        return
    example = next(name for name in presets.preset_names()
                   if _DATA_KINDS[presets.data_shape_for_preset(name)['img_channels']] == data_kind)
    values = presets.get_preset(example)
    dist.print0(f'Warning: the noise settings of preset {preset} (--P_mean={loss_kwargs["P_mean"]} '
                f'--P_std={loss_kwargs["P_std"]}) are meant for {preset_kind}, but --data holds {data_kind}; '
                f'give --P_mean and --P_std (preset {example} uses --P_mean={values["P_mean"]} --P_std={values["P_std"]})')


def _warn_about_run_length(c: dict, num_images: int) -> None:
    """Rank 0: a learning-rate ramp-up longer than the run, and a run of very many epochs (a small dataset)."""
    if c['batch_size'] <= 0:  # check_config() refuses it
        return
    rampup_nimg = c['lr_kwargs']['rampup_Mimg'] * 1e6
    if rampup_nimg > c['total_nimg']:
        dist.print0(f'Warning: the learning-rate ramp-up (--rampup={c["lr_kwargs"]["rampup_Mimg"]:g} Mimg = '
                    f'{rampup_nimg:.0f} images) is longer than the run (--duration={format_nimg(c["total_nimg"])}), '
                    f'so the learning rate never reaches --lr; --rampup takes images like --duration (e.g. 64Ki) '
                    f'or a plain number in Mimg')
    epochs = c['total_nimg'] / max(num_images, 1)
    if epochs > MANY_EPOCHS:
        dist.print0(f'Warning: --duration={format_nimg(c["total_nimg"])} is {epochs:.0f} epochs of the '
                    f'{num_images}-image dataset ({c["total_nimg"] // c["batch_size"]} steps of --batch='
                    f'{c["batch_size"]}); the official recipes train for a few thousand epochs at most: '
                    f'give a shorter --duration')

#----------------------------------------------------------------------------

def _fast_kwargs(plain: bool, dtype: Optional[str]) -> Optional[dict]:
    if plain and dtype is not None:
        raise ConfigError('--dtype cannot be combined with --plain')
    if plain:
        return dict(enabled=False)
    return None if dtype is None else dict(dtype=dtype)


def check_config(c: dict, world_size: int) -> None:
    """Batch sizes and intervals fit together (raises ConfigError naming the option)."""
    try:
        rules.check_batch_settings(c['batch_size'], c['batch_gpu'], world_size, c['total_nimg'], None,
                                   c['status_nimg'], c['snapshot_nimg'], c['checkpoint_nimg'])
    except ValueError as err:
        raise ConfigError(str(err)) from None

#----------------------------------------------------------------------------

def compute_dtype_description(c: dict, device: Any) -> str:
    """The dtype the network computes in (Precond.compute_dtype): --dtype, else float16 iff use_fp16 on CUDA."""
    dtype = (c.get('fast_kwargs') or {}).get('dtype')
    if dtype is not None:
        return dict(fp32='float32', fp16='float16', bf16='bfloat16')[dtype]
    on_cuda = str(device).startswith('cuda')
    return 'float16' if on_cuda and c['network_kwargs'].get('use_fp16') else 'float32'


def print_training_config(run_dir: str, c: dict, device: Any = None) -> None:
    device = device if device is not None else dist.get_device()
    dist.print0()
    dist.print0('Training config:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    dist.print0(f'Output directory:        {run_dir}')
    dist.print0(f'Dataset path:            {c["dataset_kwargs"]["path"]}')
    dist.print0(f'Class-conditional:       {c["dataset_kwargs"].get("use_labels", False)}')
    dist.print0(f'Number of GPUs:          {dist.get_world_size()}')
    dist.print0(f'Batch size:              {c["batch_size"]}')
    dist.print0(f'Duration:                {format_nimg(c["total_nimg"])} images = '
                f'{c["total_nimg"] // max(c["batch_size"], 1)} steps')
    dist.print0(f'Compute dtype:           {compute_dtype_description(c, device)}')
    if c.get('preload_model') is not None:
        dist.print0(f'Fine-tuning from:        {c["preload_model"]}')
    dist.print0()


def _has_training_state(run_dir: str) -> bool:
    return any(re.fullmatch(r'training-state-\d+\.pt', name) for name in os.listdir(run_dir))


def _write_options(run_dir: str, c: dict) -> None:
    """Rank 0: create the run directory and write training_options.json until a training state exists
    (so a corrected command is what gets recorded); once one does, warn about options that differ."""
    path = os.path.join(run_dir, 'training_options.json')
    if os.path.isfile(path):
        with open(path, 'rt') as f:
            stored = json.load(f)
        current = json.loads(json.dumps(c))
        changed = sorted(key for key in set(stored) | set(current) if stored.get(key) != current.get(key))
        if not changed:
            return
        if _has_training_state(run_dir):
            print(f'Warning: options differ from {path} in: {", ".join(changed)}; resuming with the new values')
            return
        print(f'Note: no training state in {run_dir} yet; rewriting {path} (changed: {", ".join(changed)})')
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as err:
        raise ConfigError(f'--outdir: cannot create directory {run_dir} ({err.strerror})') from None
    with misc.atomic_open(path, 'wt') as f:
        json.dump(c, f, indent=2)


def launch_training(run_dir: str, c: dict, device: Any = None) -> str:
    """Write training_options.json, mirror the console to log.txt, run `training_loop`; return its outcome."""
    from training.training_loop import training_loop
    if dist.get_rank() == 0:
        _write_options(run_dir, c)
    dist.barrier()
    # Only rank 0 writes log.txt (docs/differences.md#io-4).
    log_file = os.path.join(run_dir, 'log.txt') if dist.get_rank() == 0 else None
    logger = dnnlib.util.Logger(file_name=log_file, file_mode='a', should_flush=True)
    try:
        return training_loop(run_dir=run_dir, device=device, **c)
    finally:
        logger.close()

#----------------------------------------------------------------------------
