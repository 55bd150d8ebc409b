"""Benchmark: peak memory of `calculate_metrics.py sweep` over N EMA lengths vs `reconstruct_phema.py --batch`.

Writes synthetic float16 snapshots of an edm2-img512-xs-shaped network (64x64x4 latents, 1000 classes,
model_channels 128: 124.7M parameters; kimg 1, 2, ... with stds 0.050 and 0.100), then measures in fresh
subprocesses (peak RSS = getrusage ru_maxrss, so each figure is its own process's):

* reconstruct: `reconstruct_phema` writing N profiles as pickles, --batch=B;
* sweep:       `run_sweep` over the same N profiles reconstructed in memory, --ema-batch=B, generating 2 images
               per profile (1 sampling step) and scoring them with the stand-in NIMA scorer of the tests
               (real detector weights are a download; a real detector adds its own constant size);
* sweep, --ema-batch=N: all profiles in one pass, to show that memory follows the batch, not N.

Streaming means the sweep's peak stays near reconstruct_phema's at the same batch size, whatever N.
Usage: python bench/sweep_memory.py [--emas=8] [--batch=4] [--snapshots=6] [--channels=128]
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
from training.evaluation import sweep as sweep_lib  # noqa: E402
from training.networks_edm2 import Precond  # noqa: E402
from training.snapshots import reconstruct_phema as phema_lib  # noqa: E402

STDS = '0.030,0.040,...,0.200'


def make_net(channels: int) -> torch.nn.Module:
    return Precond(img_resolution=64, img_channels=4, label_dim=1000, model_channels=channels)


@torch.no_grad()
def write_snapshots(directory: str, num: int, channels: int) -> int:
    """`num` snapshots (num/2 times x 2 stds) sharing one network with scaled weights; returns the parameter count."""
    net = make_net(channels).eval().requires_grad_(False)
    ema = make_net(channels).eval().requires_grad_(False).half()
    for i in range(num):
        kimg, std = i // 2 + 1, [0.050, 0.100][i % 2]
        for p, p0 in zip(ema.parameters(), net.parameters()):
            p.copy_(p0 * (1 + 1e-3 * i))
        data = dnnlib.EasyDict(encoder=None, dataset_kwargs=dnnlib.EasyDict(), loss_fn=None, ema=ema)
        persistence.save_pickle(data, phema_lib.pickle_path(directory, 'snap', kimg * 1024, std))
    return sum(p.numel() for p in net.parameters())


def out_stds(num: int) -> list:
    return phema_lib.parse_std_list(STDS)[:num]


def measure(fn) -> dict:
    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    fn()
    return dict(seconds=time.perf_counter() - t0, base_rss=base,
                peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def reconstruct_worker(indir: str, num: int, batch: int) -> dict:
    in_pkls = phema_lib.list_input_pickles(indir)
    with tempfile.TemporaryDirectory(dir=indir) as out_dir:
        return measure(lambda: [None for _ in phema_lib.reconstruct_phema(in_pkls, out_stds(num), out_dir=out_dir,
                                                                           max_batch_size=batch, verbose=False)])


def sweep_worker(indir: str, num: int, batch: int) -> dict:
    from tests import detector_standins
    with tempfile.TemporaryDirectory(dir=indir) as tmp:
        os.environ['DNNLIB_CACHE_DIR'] = detector_standins.build_standin_cache(os.path.join(tmp, 'cache'))
        cfg = sweep_lib.SweepConfig(out=os.path.join(tmp, 'sweep'), metrics=['nima'], num=2, main_ema=out_stds(num),
                                    ema_source=sweep_lib.open_ema_source(indir), sampler_axes=dict(num_steps=[1]),
                                    max_batch_size=2, ema_batch=batch)
        sweep_lib.prepare_results(cfg, {}, verbose=False)
        result = measure(lambda: sweep_lib.run_sweep(cfg, {}, device='cpu', verbose=False))
        result['evaluations'] = len(sweep_lib.ResultsFile(sweep_lib.results_path(cfg.out)).read())
        return result


def run_worker(kind: str, indir: str, num: int, batch: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f'--worker={kind}', f'--indir={indir}', f'--emas={num}',
           f'--batch={batch}']
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@click.command()
@click.option('--emas', help='Number of EMA lengths (profiles)', type=click.IntRange(min=1, max=18), default=8,
              show_default=True)
@click.option('--batch', help='Profiles per pass (--batch / --ema-batch)', type=click.IntRange(min=1), default=4,
              show_default=True)
@click.option('--snapshots', help='Number of synthetic snapshots (even)', type=click.IntRange(min=2), default=6,
              show_default=True)
@click.option('--channels', help='model_channels (128 = edm2-img512-xs)', type=int, default=128, show_default=True)
@click.option('--worker', help='Internal: run one measurement', type=click.Choice(['reconstruct', 'sweep']),
              default=None)
@click.option('--indir', help='Internal: snapshot directory of the worker', type=str, default=None)
def main(emas, batch, snapshots, channels, worker, indir):
    """Peak RSS of a sweep over N EMA lengths vs reconstruct_phema with the same batch size."""
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    if worker is not None:
        fn = reconstruct_worker if worker == 'reconstruct' else sweep_worker
        print(json.dumps(fn(indir, emas, batch)))
        return
    with tempfile.TemporaryDirectory() as indir:
        num_params = write_snapshots(indir, snapshots, channels)
        net_mb = num_params * 4 / 2**20
        print(f'{snapshots} snapshots of a {num_params / 1e6:.1f}M-parameter net; float32 net = {net_mb:.0f} MiB; '
              f'{emas} EMA lengths')
        print(f'{"run":<34s} {"passes":>6s} {"wall s":>7s} {"base MiB":>8s} {"peak MiB":>8s} {"(peak-base)/net":>15s}')
        for label, kind, b in [(f'reconstruct_phema.py --batch={batch}', 'reconstruct', batch),
                               (f'sweep --ema-batch={batch}', 'sweep', batch),
                               (f'sweep --ema-batch={emas}', 'sweep', emas)]:
            r = run_worker(kind, indir, emas, b)
            extra = (r['peak_rss'] - r['base_rss']) / 2**20
            print(f'{label:<34s} {-(-emas // b):6d} {r["seconds"]:7.1f} {r["base_rss"] / 2**20:8.0f} '
                  f'{r["peak_rss"] / 2**20:8.0f} {extra / net_mb:15.2f}')


if __name__ == '__main__':
    main()
