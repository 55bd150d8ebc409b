"""Benchmark of post-hoc EMA reconstruction: wall time and peak RSS.

Writes synthetic float16 snapshots of a ~23M-parameter EDM2 Precond (kimg
1, 2, ... with stds 0.050 and 0.100), then reconstructs 8 profiles from the
first 4 and from all 16 snapshots at --batch=8 (one pass), and 2 of them at
--batch=1 (two passes; fewer outputs keep the runtime modest, memory does not
depend on the output count at --batch=1). Each run is a fresh subprocess so that its peak RSS (getrusage ru_maxrss) is its own.
Streaming means the peak depends on the batch size, not on the number of
snapshots. Usage: python bench/phema.py [--snapshots=16] [--channels=64]
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import click
import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib  # noqa: E402
from torch_utils import persistence  # noqa: E402
from training.snapshots import reconstruct_phema as phema_reconstruct  # noqa: E402
from training.networks_edm2 import Precond  # noqa: E402

OUT_STDS = '0.030,0.060,...,0.240'  # 8 profiles


def make_net(channels: int) -> torch.nn.Module:
    return Precond(img_resolution=32, img_channels=4, label_dim=0, model_channels=channels, channel_mult=[1, 2, 3, 3])


@torch.no_grad()
def write_snapshots(directory: str, num: int, channels: int) -> int:
    """`num` snapshots (num/2 times x 2 stds); returns the parameter count."""
    net = make_net(channels).eval().requires_grad_(False)
    ema = make_net(channels).eval().requires_grad_(False).half()
    for i in range(num):
        kimg, std = i // 2 + 1, [0.050, 0.100][i % 2]
        for p, p0 in zip(ema.parameters(), net.parameters()):
            p.copy_(p0 * (1 + 1e-3 * i))
        data = dnnlib.EasyDict(encoder=None, dataset_kwargs=dnnlib.EasyDict(), loss_fn=None, ema=ema)
        persistence.save_pickle(data, phema_reconstruct.pickle_path(directory, 'snap', kimg * 1024, std))
    return sum(p.numel() for p in net.parameters())


def worker(indir: str, num: int, batch: int, outputs: int) -> dict:
    """Reconstruct `outputs` of OUT_STDS from the first `num` snapshots; measure this process."""
    in_pkls = phema_reconstruct.list_input_pickles(indir)[:num]
    out_stds = phema_reconstruct.parse_std_list(OUT_STDS)[::8 // outputs][:outputs]
    base_rss = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory(dir=indir) as out_dir:
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _record in phema_reconstruct.reconstruct_phema(in_pkls, out_stds, out_dir=out_dir, max_batch_size=batch,
                                                           verbose=False):
            pass
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(snapshots=num, batch=batch, seconds=seconds, cpu_seconds=cpu_seconds, base_rss=base_rss, peak_rss=peak)


def run_worker(indir: str, num: int, batch: int, outputs: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f'--worker={indir}', f'--snapshots={num}', f'--batch={batch}',
           f'--outputs={outputs}']
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@click.command()
@click.option('--snapshots', help='Number of synthetic snapshots (even)', type=click.IntRange(min=4), default=16,
              show_default=True)
@click.option('--channels', help='model_channels of the synthetic net (64 -> 22.6M params)', type=int, default=64,
              show_default=True)
@click.option('--worker', help='Internal: run one measurement on this directory', type=str, default=None)
@click.option('--batch', help='Internal: batch size of the worker', type=int, default=8)
@click.option('--outputs', help='Internal: number of output profiles of the worker', type=int, default=8)
def main(snapshots, channels, worker, batch, outputs):
    """Measure wall time and peak RSS of reconstruct_phema."""
    if worker is not None:
        print(json.dumps(globals()['worker'](worker, snapshots, batch, outputs)))
        return
    with tempfile.TemporaryDirectory() as indir:
        t0 = time.perf_counter()
        num_params = write_snapshots(indir, snapshots, channels)
        net_mb = num_params * 4 / 2**20
        print(f'{snapshots} snapshots of a {num_params / 1e6:.1f}M-parameter net written in '
              f'{time.perf_counter() - t0:.1f} s; float32 net = {net_mb:.0f} MiB')
        print(f'{"snapshots":>9s} {"outputs":>7s} {"batch":>5s} {"passes":>6s} {"wall s":>7s} {"cpu s":>7s} '
              f'{"cpu s/output":>12s} {"base MiB":>8s} {"peak MiB":>8s} {"(peak-base)/net":>15s}')
        for num, b, outs in [(4, 8, 8), (snapshots, 8, 8), (4, 1, 2), (snapshots, 1, 2)]:
            r = run_worker(indir, num, b, outs)
            extra = (r['peak_rss'] - r['base_rss']) / 2**20
            print(f'{num:9d} {outs:7d} {b:5d} {-(-outs // b):6d} {r["seconds"]:7.2f} {r["cpu_seconds"]:7.2f} '
                  f'{r["cpu_seconds"] / outs:12.2f} {r["base_rss"] / 2**20:8.0f} {r["peak_rss"] / 2**20:8.0f} '
                  f'{extra / net_mb:15.2f}')


if __name__ == '__main__':
    main()
