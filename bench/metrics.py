"""Benchmark of the metrics code: Inception-v3 feature extraction and the Fréchet distance.

Prints feature-extraction images/s of the full-size Inception-v3 architecture
(`training.evaluation.detectors.InceptionV3Features`, random weights: speed does not depend on them)
for uint8 inputs at a given resolution (resized to 299x299 inside, as for FID), measured
over several rounds (median), plus the accumulation of float64 statistics. Then times the
2048-d Fréchet distance (scipy sqrtm path vs the eigen/nuclear-norm fallback).

On CUDA it also measures channels_last and TF32.

Examples:
    python bench/metrics.py                      # CPU, < ~2 min
    python bench/metrics.py --batch=32 --rounds=5 --device=cuda
"""

import os
import statistics
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.evaluation import detectors  # noqa: E402
from training.evaluation import calculate_metrics as metrics  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def images_per_second(model: torch.nn.Module, images: torch.Tensor, rounds: int, accumulate: bool) -> float:
    device = images.device
    dim = model.feature_dim
    s1 = torch.zeros([dim], dtype=torch.float64, device=device)
    s2 = torch.zeros([dim, dim], dtype=torch.float64, device=device)
    with torch.no_grad():
        model(images)  # warm-up (kernel selection, allocations)
        _sync(device)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            features = model(images)
            if accumulate:
                f = features.to(torch.float64)
                s1 += f.sum(0)
                s2 += f.T @ f
            _sync(device)
            times.append(time.perf_counter() - start)
    return images.shape[0] / statistics.median(times)


def bench_fd(dim: int) -> None:
    rng = np.random.RandomState(0)
    a, b = rng.randn(dim, 2 * dim), rng.randn(dim, 2 * dim)
    sigma1, sigma2 = a @ a.T / a.shape[1], b @ b.T / b.shape[1]
    mu = np.zeros(dim)
    for name, what, fn in (('scipy sqrtm', 'tr sqrt(S1 S2)', lambda: metrics._trace_sqrt_product_sqrtm(sigma1, sigma2)),
                           ('eigen/nuclear', 'tr sqrt(S1 S2)', lambda: metrics._trace_sqrt_product_eig(sigma1, sigma2)),
                           ('frechet_distance', 'FD', lambda: metrics.frechet_distance(mu, sigma1, mu, sigma2))):
        start = time.perf_counter()
        value = fn()
        print(f'  {name:18s} {time.perf_counter() - start:7.2f} s   ({what} = {value:.6f})')


@click.command()
@click.option('--device', type=str, default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--batch', type=int, default=8, show_default=True, help='Images per batch')
@click.option('--resolution', type=int, default=64, show_default=True, help='Input resolution (resized to 299 inside)')
@click.option('--rounds', type=int, default=3, show_default=True, help='Timed batches per variant (median)')
@click.option('--fd-dim', type=int, default=512, show_default=True, help='Fréchet distance dimension (2048 for FID; 0 = skip)')
def main(device: str, batch: int, resolution: int, rounds: int, fd_dim: int) -> None:
    """Feature-extraction throughput of the Inception-v3 architecture and FD timing."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = detectors.InceptionV3Features().eval().requires_grad_(False).to(device)
    images = torch.randint(0, 256, [batch, 3, resolution, resolution], dtype=torch.uint8, device=device)
    print(f'Inception-v3 features on {device} ({torch.get_num_threads()} threads), batch {batch}, '
          f'{resolution}x{resolution} -> 299x299:')
    print(f'  fp32                      {images_per_second(model, images, rounds, False):8.1f} img/s')
    print(f'  fp32 + float64 statistics {images_per_second(model, images, rounds, True):8.1f} img/s')
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        print(f'  tf32                      {images_per_second(model, images, rounds, False):8.1f} img/s')
        model = model.to(memory_format=torch.channels_last)
        print(f'  tf32 + channels_last      {images_per_second(model, images, rounds, False):8.1f} img/s')
    if fd_dim > 0:
        print(f'Fréchet distance, {fd_dim}-d covariances:')
        bench_fd(fd_dim)


if __name__ == '__main__':
    main()
