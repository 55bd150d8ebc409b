"""The one loader of network snapshots: every option that takes a network (`--net`, `--gnet`,
`--model2finetune`, count_flops.py's PKL|URL, reconstruct_phema.py's inputs) reads it with `load_snapshot`.

A network snapshot is what training writes as `network-snapshot-*.pkl` and what the official toolkit
publishes: a dict whose `ema` entry is the network, next to `encoder`, `loss_fn` and `dataset_kwargs`.
It is read by the project's safe loader (torch_utils.persistence), or, for a `.safetensors`/`.json` export
(training.snapshots.safetensors_format), without any unpickling; a wrong file fails with one line that
names the option, the file and what was found instead.
"""

import glob
import os
from typing import Union

import torch

import dnnlib
from torch_utils import persistence
from training.snapshots import safetensors_format

#----------------------------------------------------------------------------


class SnapshotError(ValueError):
    """A file given as a network snapshot is not one; the message names the option and the file."""


def load_snapshot(src: Union[str, os.PathLike], option: str) -> dict:
    """The snapshot dict stored at `src` (path or URL); its `ema` entry is a torch.nn.Module.

    `option` is what the user gave the file as (e.g. '--net'), for the messages. Raises SnapshotError for
    a file that is not a network snapshot (unreadable, refused by the safe loader, a torch.save archive,
    another kind of pickle), FileNotFoundError for a missing local file, dnnlib.util.DownloadError when a
    URL cannot be fetched, persistence.TrustSettingError for an invalid EDM2_TRUST_PICKLE.
    """
    src = os.fspath(src)
    if '://' not in src and not os.path.isfile(src):
        raise FileNotFoundError(f'{option}: {_missing_file_message(src)}')
    if safetensors_format.is_export_path(src):
        try:
            return safetensors_format.load_snapshot_safetensors(src)
        except persistence.PickleLoadError as err:
            raise SnapshotError(f'{option}: {err}') from err
    with dnnlib.util.open_url(src) as f:
        if f.read(len(persistence.ZIP_MAGIC)) == persistence.ZIP_MAGIC:
            raise SnapshotError(f'{option}: {src} is a zip archive (a torch.save file such as a training state), '
                                'not a network snapshot; give a network-snapshot-*.pkl or a post-hoc reconstruction')
        f.seek(0)
        try:
            data = persistence.load_pickle(f, name=src)
        except persistence.PickleLoadError as err:
            raise SnapshotError(f'{option}: {err}') from err
    if not isinstance(data, dict) or not isinstance(data.get('ema', None), torch.nn.Module):
        raise SnapshotError(f'{option}: {src}: not a network snapshot (expected a dict with an "ema" network, '
                            f'found {_describe(data)})')
    return data


EDM1_NETWORK_MODULE = 'training.networks'  # the module of the EDM v1 networks (Karras et al. 2022) in pickles


def network_module(net: torch.nn.Module) -> str:
    """The module a network's class is stored under in pickles, e.g. 'training.networks_edm2' (EDM2) or
    'training.networks' (EDM v1); also for a network that a trusted load built from the pickle's own source."""
    return persistence.safe_class_modules.get(type(net).__name__, type(net).__module__)


def is_edm1_network(net: torch.nn.Module) -> bool:
    """Whether `net` is an EDM v1 network (a class of `training.networks`)."""
    return network_module(net) == EDM1_NETWORK_MODULE


def is_edm1_snapshot(data: dict) -> bool:
    """Whether a snapshot (load_snapshot's dict) holds an EDM v1 network."""
    return is_edm1_network(data['ema'])


def check_power_function_snapshot(data: dict, src: Union[str, os.PathLike], option: str) -> None:
    """Raise SnapshotError for a snapshot whose weights are not a power-function EMA profile (EDM2 paper,
    Sec. 3), which post-hoc reconstruction needs: EDM v1 snapshots carry a classic exponential EMA."""
    if is_edm1_snapshot(data):
        raise SnapshotError(f'{option}: {os.fspath(src)} holds an EDM v1 network ({type(data["ema"]).__name__}) with a '
                            'classic EMA, not a power-function EMA profile; post-hoc EMA reconstruction needs EDM2 '
                            'snapshots (network-snapshot-<kimg>-<std>.pkl)')


def _missing_file_message(path: str) -> str:
    if not os.path.isdir(path):
        return f'{path} does not exist (expected a network snapshot .pkl)'
    pickles = sorted(glob.glob(os.path.join(glob.escape(path), '*.pkl')))
    hint = f'; did you mean {pickles[-1]}?' if pickles else ' (expected a network snapshot .pkl)'
    return f'{path} is a directory, not a network snapshot{hint}'


def _describe(data: object) -> str:
    if not isinstance(data, dict):
        return f'a {type(data).__name__}'
    if 'ema' in data:
        return f'an "ema" entry of type {type(data["ema"]).__name__}'
    keys = sorted(map(str, data))
    shown = ', '.join(keys[:8]) + (', ...' if len(keys) > 8 else '')
    return f'a dict with keys [{shown}]'

#----------------------------------------------------------------------------
