"""Status lines, `stats.jsonl`, TensorBoard scalars and network snapshots of a training run
(docs/formats.md#run-directory).

`stats.jsonl` has one strict-JSON object per status point: every collected statistic's
mean (non-finite means are written as `null`, not the official bare `NaN`, docs/differences.md#io-5),
then `timestamp`. TensorBoard scalars are written beside it when the `tensorboard`
package is installed (imported lazily; silently skipped otherwise).
"""

import copy
import json
import math
import os
import time
from typing import Any, Optional

import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import persistence
from torch_utils import training_stats

#----------------------------------------------------------------------------

def format_stats_line(means: dict, timestamp: float) -> str:
    """One strict-JSON line: '"name": value' per stat (official number formats), then timestamp."""
    fields = [f'{json.dumps(name)}: {_format_number(name, value)}' for name, value in means.items()]
    fields.append(f'"timestamp": {timestamp:.3f}')
    return '{' + ', '.join(fields) + '}\n'


def _format_number(name: str, value: float) -> str:
    if not math.isfinite(value):
        return 'null'
    if name == 'Progress/kimg':
        return f'{value:.3f}'
    if name == 'Progress/tick':
        return f'{value:.0f}'
    return f'{value:g}'


def _cpu_memory_bytes() -> int:
    """Resident memory of this process and all its children."""
    process = psutil.Process(os.getpid())
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # child exited meanwhile
            pass
    return total


def _open_tensorboard(run_dir: str) -> Optional[Any]:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(run_dir)

#----------------------------------------------------------------------------

def loss_field(collector: training_stats.Collector, tick_nimg: int) -> str:
    """'loss <mean of the tick>'; 'loss -' when no step ran since the last status (the first line of a run).

    A tick that ran steps but whose losses were all non-finite (report() drops them) still reads 'loss nan':
    that is the warning sign the README describes."""
    if tick_nimg == 0:
        return 'loss -'
    loss = collector.mean('Loss/loss') if 'Loss/loss' in collector.names() else float('nan')
    return f'loss {loss:<8.4f}'

def finish_estimate(cur_nimg: int, stop_nimg: int, sec_per_image: float) -> str:
    """'Estimated time to finish: ...' for the images left at the speed of the last tick (wall clock)."""
    seconds = (stop_nimg - cur_nimg) * sec_per_image
    return (f'Estimated time to finish ({stop_nimg // 1000} kimg): {dnnlib.util.format_time(seconds)} '
            f'at {sec_per_image * 1e3:.3f} sec/kimg')

#----------------------------------------------------------------------------

class StatusReporter:
    """Prints status lines and appends `stats.jsonl` (and TensorBoard scalars) on rank 0; after the first status
    that follows training steps, an estimate of the time to reach `stop_nimg`."""

    def __init__(self, run_dir: str, device: torch.device, stop_nimg: int):
        self.run_dir = run_dir
        self.device = torch.device(device)
        self.stop_nimg = stop_nimg
        self.estimated = False
        self.tensorboard = True  # until the package turns out to be missing
        self.rank0 = (dist.get_rank() == 0)
        self._stats_file = None
        self._tb_writer = None

    def report(self, state: Any, tick_time: float, training_time: float, tick_nimg: int) -> None:
        """One status point (collective: all ranks must call it at the same step)."""
        cuda = self.device.type == 'cuda'
        gib = 2 ** 30
        values = {
            'Progress/kimg': state.cur_nimg / 1e3,
            'Timing/total_sec': state.total_elapsed_time,
            'Timing/sec_per_tick': tick_time,
            'Timing/sec_per_kimg': training_time / max(tick_nimg, 1) * 1e3,
            'Timing/maintenance_sec': tick_time - training_time,
            'Resources/cpu_mem_gb': _cpu_memory_bytes() / gib,
            'Resources/peak_gpu_mem_gb': torch.cuda.max_memory_allocated(self.device) / gib if cuda else 0.0,
            'Resources/peak_gpu_mem_reserved_gb': torch.cuda.max_memory_reserved(self.device) / gib if cuda else 0.0,
        }
        for name, value in values.items():
            training_stats.report0(name, value)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        training_stats.default_collector.update()
        if self.rank0:
            self._print_line(state, values, tick_nimg)
            self._write_stats(state.cur_nimg)
        if self.rank0 and tick_nimg > 0 and not self.estimated:
            self.estimated = True
            print(finish_estimate(state.cur_nimg, self.stop_nimg, tick_time / tick_nimg), flush=True)

    def _print_line(self, state: Any, v: dict, tick_nimg: int) -> None:
        print(f'Status: kimg {v["Progress/kimg"]:<9.1f} time {dnnlib.util.format_time(state.total_elapsed_time):<12s} '
              f'sec/tick {v["Timing/sec_per_tick"]:<8.2f} sec/kimg {v["Timing/sec_per_kimg"]:<7.3f} '
              f'maintenance {v["Timing/maintenance_sec"]:<7.2f} cpumem {v["Resources/cpu_mem_gb"]:<6.2f} '
              f'gpumem {v["Resources/peak_gpu_mem_gb"]:<6.2f} reserved {v["Resources/peak_gpu_mem_reserved_gb"]:<6.2f} '
              f'{loss_field(training_stats.default_collector, tick_nimg)}', flush=True)

    def _write_stats(self, cur_nimg: int) -> None:
        collector = training_stats.default_collector
        means = {name: collector.mean(name) for name in collector.names()}
        if self._stats_file is None:
            self._stats_file = open(os.path.join(self.run_dir, 'stats.jsonl'), 'at')
        self._stats_file.write(format_stats_line(means, time.time()))
        self._stats_file.flush()
        if self.tensorboard and self._tb_writer is None:
            self._tb_writer = _open_tensorboard(self.run_dir)
            self.tensorboard = self._tb_writer is not None
        if self._tb_writer is not None:
            for name, value in means.items():
                if math.isfinite(value):
                    self._tb_writer.add_scalar(name, value, global_step=cur_nimg)
            self._tb_writer.flush()

    def close(self) -> None:
        if self._stats_file is not None:
            self._stats_file.close()
            self._stats_file = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None

#----------------------------------------------------------------------------

def save_snapshots(run_dir: str, cur_nimg: int, ema: Any, encoder: Any, dataset_kwargs: dict, loss_fn: Any,
                   augment_pipe: Any = None, layout: str = 'edm2') -> list:
    """Write the network snapshots of `cur_nimg` in the `layout` of a run, 'edm2' or 'edm1' (atomic); return
    the paths."""
    if layout == 'edm1':
        return [save_edm1_snapshot(run_dir, cur_nimg, ema.get(), loss_fn, augment_pipe, dataset_kwargs)]
    if layout != 'edm2':
        raise ValueError(f'Invalid snapshot layout "{layout}"; expected "edm2" or "edm1"')
    return save_edm2_snapshots(run_dir, cur_nimg, ema, encoder, dataset_kwargs, loss_fn)


def save_edm2_snapshots(run_dir: str, cur_nimg: int, ema: Any, encoder: Any, dataset_kwargs: dict, loss_fn: Any) -> list:
    """Write `network-snapshot-<kimg:07d><suffix>.pkl` for every EMA profile (atomic); return the paths.

    Layout (official): EasyDict(encoder, dataset_kwargs, loss_fn, ema) with `ema` a float16,
    eval-mode, no-grad CPU copy.
    """
    ema_list = ema.get()
    ema_list = ema_list if isinstance(ema_list, list) else [(ema_list, '')]
    paths = []
    for ema_net, ema_suffix in ema_list:
        data = dnnlib.EasyDict(encoder=encoder, dataset_kwargs=dnnlib.EasyDict(dataset_kwargs), loss_fn=loss_fn)
        data.ema = copy.deepcopy(ema_net).cpu().eval().requires_grad_(False).to(torch.float16)
        path = os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:07d}{ema_suffix}.pkl')
        print(f'Saving {os.path.basename(path)} ... ', end='', flush=True)
        persistence.save_pickle(data, path)
        print('done')
        paths.append(path)
    return paths


def save_edm1_snapshot(run_dir: str, cur_nimg: int, ema_net: torch.nn.Module, loss_fn: Any, augment_pipe: Any,
                       dataset_kwargs: dict) -> str:
    """Write `network-snapshot-<kimg:06d>.pkl` in EDM v1's layout (atomic; docs/formats.md) and return its path:
    a plain dict(ema, loss_fn, augment_pipe, dataset_kwargs), `ema` an eval-mode, no-grad float32 CPU copy."""
    data = dict(ema=copy.deepcopy(ema_net).cpu().eval().requires_grad_(False).to(torch.float32), loss_fn=loss_fn,
                augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs))
    path = os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:06d}.pkl')
    print(f'Saving {os.path.basename(path)} ... ', end='', flush=True)
    persistence.save_pickle(data, path)
    print('done')
    return path

#----------------------------------------------------------------------------
