"""Snapshots without pickle: `<name>.safetensors` (the tensors) plus `<name>.json` (how to rebuild the objects).

A network pickle stores the source code of its classes, and loading it means unpickling. This form
stores only tensors and plain JSON, so reading it back executes nothing from the files:

* `<name>.safetensors`: the EMA network's state dict under `ema.<key>`, and the array constants of the
  encoder (e.g. the latent scale and bias of `StabilityVAEEncoder`) under `encoder.<attribute>`,
  each tensor in its own dtype (float16 for training snapshots and reconstructions).
* `<name>.json`: `format` / `format_version`, the file name, byte size and sha256 of the
  `.safetensors` (`weights`, `weights_bytes`, `weights_sha256`), `dtype` of the network tensors, `ema`
  and `encoder` (`class_name` with its module, `init_args`, `init_kwargs`: the constructor arguments
  that persistent classes record), `dataset_kwargs`, and `ema_profile` (`std`, `nimg`) or null.
* `README.md` in the same directory: a model card listing every export there.

`load_snapshot_safetensors` returns the dict a snapshot pickle holds (`encoder`, `dataset_kwargs`,
`ema`; the loss function is not exported, sampling does not need it). It only constructs classes on
the safe pickle loader's table (`persistence.safe_class_modules`), and every problem (missing or
corrupted file, unknown class, tensors that do not fit the network) is one line naming the file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from typing import Any

import numpy as np
import safetensors.torch
import torch

import dnnlib
from torch_utils import misc
from torch_utils import persistence

FORMAT_NAME = 'edm2-toolkit-safetensors'
FORMAT_VERSION = 1
WEIGHTS_SUFFIX = '.safetensors'
JSON_SUFFIX = '.json'
CARD_NAME = 'README.md'
LIBRARY_NAME = 'edm2-toolkit'
CARD_TAGS = ('diffusion', 'edm2', 'image-generation', 'safetensors')
NVIDIA_LICENSE = 'cc-by-nc-sa-4.0'   # the license of NVIDIA's published EDM2 weights
_LICENSE_ID = re.compile(r'[a-z0-9][a-z0-9.+-]*')   # Hugging Face license identifiers ('other', 'mit', ...)
_SECTIONS = ('ema', 'encoder')


class ExportError(ValueError):
    """A snapshot cannot be exported; the message is one line naming the culprit."""


class ExportLoadError(persistence.PickleLoadError):
    """An export cannot be loaded; one line naming the file. A PickleLoadError, so every script that
    reports a bad network pickle in one line does the same for a bad export."""


def is_export_path(path: str | os.PathLike) -> bool:
    """True for the paths this module reads: `<name>.safetensors` or its `<name>.json`."""
    return os.fspath(path).endswith((WEIGHTS_SUFFIX, JSON_SUFFIX))


def export_paths(path: str | os.PathLike) -> tuple[str, str]:
    """(`<name>.safetensors`, `<name>.json`) for either of the two paths (or URLs)."""
    path = os.fspath(path)
    for suffix in (WEIGHTS_SUFFIX, JSON_SUFFIX):
        if path.endswith(suffix):
            stem = path[:-len(suffix)]
            return stem + WEIGHTS_SUFFIX, stem + JSON_SUFFIX
    raise ExportError(f'{path}: expected a {WEIGHTS_SUFFIX} or {JSON_SUFFIX} file name')

#----------------------------------------------------------------------------
# Writing.


def _class_entry(obj: Any, what: str) -> dict:
    """{class_name, init_args, init_kwargs} of a persistent object whose class the safe loader knows."""
    name = type(obj).__name__
    module = persistence.safe_class_modules.get(name)
    if module is None or not persistence.is_persistent(obj):
        raise ExportError(f"{what}: {type(obj).__module__}.{name} is not one of this project's persistent classes")
    if getattr(obj, '_init_args', None) is None or getattr(obj, '_init_kwargs', None) is None:
        raise ExportError(f'{what}: {name} did not record its constructor arguments')
    return dict(class_name=f'{module}.{name}', init_args=list(obj.init_args), init_kwargs=dict(obj.init_kwargs))


def _json_value(value: Any) -> Any:
    """json.dumps fallback: numpy scalars and arrays become numbers and lists; anything else is refused."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f'{type(value).__module__}.{type(value).__name__} is not JSON-serialisable')


def _encoder_arrays(encoder: Any) -> dict[str, torch.Tensor]:
    """The encoder's numpy constants, which its constructor derives from its arguments; stored so that
    the loaded encoder holds the very values of the exported one."""
    return {f'encoder.{name}': torch.from_numpy(np.array(value))
            for name, value in vars(encoder).items() if isinstance(value, np.ndarray)}


def _network_dtype(tensors: dict[str, torch.Tensor]) -> str:
    dtypes = {str(t.dtype).removeprefix('torch.') for key, t in tensors.items()
              if key.startswith('ema.') and t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else 'mixed'


def _snapshot_dict(data_or_net: Any) -> dict:
    if isinstance(data_or_net, torch.nn.Module):
        return dict(ema=data_or_net, encoder=None, dataset_kwargs=None)
    if not isinstance(data_or_net, dict) or not isinstance(data_or_net.get('ema'), torch.nn.Module):
        raise ExportError('expected a network or a snapshot dict with an "ema" network')
    return data_or_net


def save_snapshot_safetensors(data_or_net: Any, path: str | os.PathLike, ema_profile: dict | None = None,
                              license: str = 'other', model_card: bool = True) -> tuple[str, str]:
    """Write a snapshot dict (or a bare network) as `path` (`<name>.safetensors`) plus `<name>.json`
    and rewrite the directory's model card, creating the directory. `ema_profile` = dict(std, nimg)
    of the EMA, if known. Each file is written atomically, the `.json` last: an interrupted export
    has no `.json` and does not load. Returns the two paths."""
    weights_path, json_path = export_paths(path)
    if not os.fspath(path).endswith(WEIGHTS_SUFFIX):
        raise ExportError(f'{path}: the weights file name must end in {WEIGHTS_SUFFIX}')
    directory = os.path.dirname(os.path.abspath(weights_path))
    if model_card:
        check_model_card(directory, license)
    data = _snapshot_dict(data_or_net)
    ema, encoder = data['ema'], data.get('encoder')
    meta = dict(ema=_class_entry(ema, 'ema'), encoder=None if encoder is None else _class_entry(encoder, 'encoder'),
                dataset_kwargs=data.get('dataset_kwargs'),
                ema_profile=None if ema_profile is None else dict(std=float(ema_profile['std']),
                                                                  nimg=int(ema_profile['nimg'])))
    tensors = {f'ema.{key}': t.detach().cpu().contiguous() for key, t in ema.state_dict().items()}
    if encoder is not None:
        tensors.update(_encoder_arrays(encoder))
    blob = safetensors.torch.save(tensors, metadata=dict(format='pt'))
    meta = dict(format=FORMAT_NAME, format_version=FORMAT_VERSION, weights=os.path.basename(weights_path),
                weights_bytes=len(blob), weights_sha256=hashlib.sha256(blob).hexdigest(),
                dtype=_network_dtype(tensors), **meta)
    try:
        text = json.dumps(meta, indent=2, allow_nan=False, default=_json_value) + '\n'
    except (TypeError, ValueError) as err:
        raise ExportError(f'{json_path}: cannot write the snapshot description as JSON ({err})') from None
    os.makedirs(directory, exist_ok=True)
    with misc.atomic_open(weights_path, 'wb') as f:
        f.write(blob)
    with misc.atomic_open(json_path, 'w', encoding='utf-8') as f:
        f.write(text)
    if model_card:
        write_model_card(directory, license)
    return weights_path, json_path

#----------------------------------------------------------------------------
# Model card.


def check_model_card(directory: str, license: str) -> None:
    """Refuse a license that would break the card's metadata block, or a README.md this module did not write."""
    if not _LICENSE_ID.fullmatch(license):
        raise ExportError(f'license {license!r}: expected a license identifier such as other or {NVIDIA_LICENSE}')
    card = os.path.join(directory, CARD_NAME)
    if os.path.isfile(card):
        with open(card, encoding='utf-8', errors='replace') as f:
            if f'library_name: {LIBRARY_NAME}\n' not in f.read():
                raise ExportError(f'{card} exists and is not a model card written by this toolkit; '
                                  'export into another directory')


def _read_export_meta(path: str) -> dict | None:
    """The parsed `.json` of an export, None for any other JSON file."""
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get('format') == FORMAT_NAME else None


def _card_row(meta: dict) -> str:
    kwargs = (meta.get('ema') or {}).get('init_kwargs') or {}
    res, channels = kwargs.get('img_resolution'), kwargs.get('img_channels')
    shape = f'{res}x{res}x{channels}' if res is not None and channels is not None else '-'
    profile = meta.get('ema_profile') or {}
    std = f'{profile["std"]:.3f}' if 'std' in profile else '-'
    nimg = f'{profile["nimg"]:,}' if 'nimg' in profile else '-'
    encoder = (meta.get('encoder') or {}).get('class_name', '-').rpartition('.')[2]
    return (f'| `{meta.get("weights")}` | `{meta["ema"]["class_name"]}` | {shape} | '
            f'{kwargs.get("label_dim", "-")} | {encoder} | {std} | {nimg} | {meta.get("dtype")} |')


def model_card(exports: list[dict], license: str) -> str:
    """README.md text: the metadata block (license, library_name, tags), what the files are, how to use them."""
    tags = ''.join(f'- {tag}\n' for tag in CARD_TAGS)
    rows = '\n'.join(_card_row(meta) for meta in exports)
    example = exports[0]['weights'] if exports else f'<name>{WEIGHTS_SUFFIX}'
    return f"""---
license: {license}
library_name: {LIBRARY_NAME}
tags:
{tags}---

# EDM2 diffusion network weights

Networks of *Analyzing and Improving the Training Dynamics of Diffusion Models* (Karras et al., CVPR 2024),
exported by the EDM2 toolkit without pickle: each `<name>{WEIGHTS_SUFFIX}` holds the tensors (the EMA
network under `ema.`, the encoder's constants under `encoder.`), and the `<name>{JSON_SUFFIX}` next to it the
network and encoder classes with their constructor arguments, the dataset settings, the EMA profile and
the sha256 of the weights. Loading them runs no code from these files.

| weights | network | image | classes | encoder | EMA std | training images | dtype |
|---|---|---|---|---|---|---|---|
{rows}

License: `{license}`. The weights carry the license of the model and data they come from; NVIDIA's
published EDM2 models are `{NVIDIA_LICENSE}`.

## Use with the EDM2 toolkit

```bash
python generate_images.py --net={example} --outdir=out --seeds=0-15
```

```python
from training.snapshots.safetensors_format import load_snapshot_safetensors
data = load_snapshot_safetensors('{example}')   # dict: encoder, dataset_kwargs, ema
```
"""


def write_model_card(directory: str, license: str = 'other') -> str:
    """(Re)write `<directory>/README.md` for every export in the directory, atomically; returns its path."""
    check_model_card(directory, license)
    exports = [meta for name in sorted(os.listdir(directory)) if name.endswith(JSON_SUFFIX)
               if (meta := _read_export_meta(os.path.join(directory, name))) is not None]
    path = os.path.join(directory, CARD_NAME)
    with misc.atomic_open(path, 'w', encoding='utf-8') as f:
        f.write(model_card(exports, license))
    return path

#----------------------------------------------------------------------------
# Reading.


def _read_bytes(path: str, what: str) -> bytes:
    """Contents of a local path or URL (downloaded once into the dnnlib cache)."""
    if not dnnlib.util.is_url(path, allow_file_urls=True) and not os.path.isfile(path):
        raise ExportLoadError(path, f'missing ({what})')
    with dnnlib.util.open_url(path) as f:
        return f.read()


def _read_meta(json_path: str, weights_path: str) -> dict:
    text = _read_bytes(json_path, f'the description written next to {os.path.basename(weights_path)}')
    try:
        meta = json.loads(text.decode('utf-8'))
    except (UnicodeDecodeError, ValueError) as err:
        raise ExportLoadError(json_path, f'not valid JSON ({err})') from None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT_NAME:
        raise ExportLoadError(json_path, f'not a {FORMAT_NAME} description (no "format": "{FORMAT_NAME}")')
    if not isinstance(meta.get('format_version'), int) or meta['format_version'] > FORMAT_VERSION:
        raise ExportLoadError(json_path, f'format_version {meta.get("format_version")!r} is not supported '
                              f'(this toolkit reads up to {FORMAT_VERSION})')
    for key, kind in [('weights_bytes', int), ('weights_sha256', str), ('ema', dict)]:
        if not isinstance(meta.get(key), kind):
            raise ExportLoadError(json_path, f'field "{key}" is missing or not a {kind.__name__}')
    return meta


def _read_tensors(weights_path: str, json_path: str, meta: dict) -> dict[str, torch.Tensor]:
    """The tensors, after checking size and sha256 against the description."""
    blob = _read_bytes(weights_path, f'the weights described by {os.path.basename(json_path)}')
    if len(blob) < meta['weights_bytes']:
        raise ExportLoadError(weights_path, f'truncated ({len(blob)} of {meta["weights_bytes"]} bytes)')
    if len(blob) != meta['weights_bytes'] or hashlib.sha256(blob).hexdigest() != meta['weights_sha256']:
        raise ExportLoadError(weights_path, f'contents do not match the sha256 in {os.path.basename(json_path)} '
                              '(corrupted, or the two files come from different exports)')
    try:
        return safetensors.torch.load(blob)
    except Exception as err:   # the library's SafetensorError and friends
        raise ExportLoadError(weights_path, f'not a valid safetensors file ({err})') from None


def _allowed_class(class_name: Any, json_path: str) -> type:
    """The class named `module.Name`, only if the safe pickle loader's table maps Name to that module."""
    module, _, name = class_name.rpartition('.') if isinstance(class_name, str) else ('', '', '')
    if not module or persistence.safe_class_modules.get(name) != module:
        raise ExportLoadError(json_path, f"class {class_name!r} is not one of this project's persistent classes")
    cls = getattr(importlib.import_module(module), name, None)
    if cls is None or not persistence.is_persistent(cls):
        raise ExportLoadError(json_path, f'{class_name} is missing or not a persistent class')
    return cls


def _construct(entry: Any, json_path: str, what: str) -> Any:
    """Build the object an `ema` / `encoder` entry describes; the global RNG is left untouched
    (constructors draw random initial weights, which the loaded tensors then replace)."""
    if not isinstance(entry, dict) or not isinstance(entry.get('init_args'), list) \
            or not isinstance(entry.get('init_kwargs'), dict):
        raise ExportLoadError(json_path, f'"{what}" needs class_name, init_args (list) and init_kwargs (object)')
    cls = _allowed_class(entry.get('class_name'), json_path)
    try:
        with torch.random.fork_rng(devices=[]):
            return cls(*entry['init_args'], **entry['init_kwargs'])
    except Exception as err:
        raise ExportLoadError(json_path, f'cannot construct {entry["class_name"]} from its constructor arguments '
                              f'({type(err).__name__}: {err})') from None


def _state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], prefix: str) -> str | None:
    """The first tensor, in the network's order, that is missing, has another shape, or is not expected."""
    for key, ref in expected.items():
        if key not in found:
            return f'tensor {prefix}{key} is missing'
        if tuple(found[key].shape) != tuple(ref.shape):
            return f'tensor {prefix}{key} has shape {list(found[key].shape)}, the network expects {list(ref.shape)}'
    extra = [key for key in found if key not in expected]
    return f'tensor {prefix}{extra[0]} is not part of the network' if extra else None


def _section(tensors: dict[str, torch.Tensor], section: str) -> dict[str, torch.Tensor]:
    return {key[len(section) + 1:]: t for key, t in tensors.items() if key.startswith(f'{section}.')}


def _load_network(meta: dict, tensors: dict, weights_path: str, json_path: str) -> torch.nn.Module:
    net = _construct(meta['ema'], json_path, 'ema')
    state = _section(tensors, 'ema')
    problem = _state_mismatch(net.state_dict(), state, 'ema.')
    if problem is not None:
        raise ExportLoadError(weights_path, f'{problem} (the network described in {os.path.basename(json_path)} '
                              'does not fit these weights)')
    net.load_state_dict(state, assign=True)   # assign: each tensor keeps its stored dtype (float16 snapshots)
    return net.eval().requires_grad_(False)   # as the EMA is stored in snapshots


def _load_encoder(meta: dict, tensors: dict, weights_path: str, json_path: str) -> Any:
    if meta.get('encoder') is None:
        return None
    encoder = _construct(meta['encoder'], json_path, 'encoder')
    for name, value in _section(tensors, 'encoder').items():
        current = getattr(encoder, name, None)
        if not isinstance(current, np.ndarray) or current.shape != tuple(value.shape):
            raise ExportLoadError(weights_path, f'tensor encoder.{name} does not fit '
                                  f'{meta["encoder"]["class_name"]}')
        setattr(encoder, name, value.numpy())
    return encoder


def load_snapshot_safetensors(path: str | os.PathLike) -> dnnlib.EasyDict:
    """Load `<name>.safetensors` + `<name>.json` (path or URL of either) into the dict a snapshot
    pickle holds: EasyDict(encoder, dataset_kwargs, ema). Never unpickles; ExportLoadError (one line)
    on any problem."""
    weights_path, json_path = export_paths(path)
    meta = _read_meta(json_path, weights_path)
    tensors = _read_tensors(weights_path, json_path, meta)
    unknown = [key for key in tensors if key.split('.', 1)[0] not in _SECTIONS]
    if unknown:
        raise ExportLoadError(weights_path, f'tensor {unknown[0]} is neither ema.* nor encoder.*')
    dataset_kwargs = meta.get('dataset_kwargs')
    return dnnlib.EasyDict(encoder=_load_encoder(meta, tensors, weights_path, json_path),
                           dataset_kwargs=None if dataset_kwargs is None else dnnlib.EasyDict(dataset_kwargs),
                           ema=_load_network(meta, tensors, weights_path, json_path))
