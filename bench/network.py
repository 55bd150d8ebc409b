"""Benchmark of training/networks_edm2.py: plain (official) path vs fast paths.

Prints training images/s (forward + backward + Adam step) and sampling
images/s (32 Heun steps = 63 network calls) for the plain path and the fast
paths, measured alternately (A B A B ...) in the same process so that machine
noise hits every variant alike; ratios are medians of the per-round ratios.
Sampling in bf16 also reports how far the sampled images move (max abs
difference vs the float32 plain path, same noise).

On CUDA it benchmarks an edm2-img512-xs-shaped network (64x64x4 latents,
C=128, 1000 classes) at batch 64 with fp16 (official) and bf16, with model
FLOP utilisation from torch.utils.flop_counter.FlopCounterMode.

Examples:
    python bench/network.py                       # CPU, small latent-shaped net (16x16x4, 23M params)
    python bench/network.py --resolution=32 --img-channels=3 --model-channels=32 --mult=1,2,2,2 --batch-train=16
    python bench/network.py --rounds=5 --batch-train=32
    python bench/network.py --device=cuda
"""

import copy
import ctypes
import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import networks_edm2  # noqa: E402

#----------------------------------------------------------------------------
# Workloads.


def make_net(device, resolution, img_channels, model_channels, channel_mult, num_blocks, label_dim, use_fp16):
    torch.manual_seed(0)
    net = networks_edm2.Precond(resolution, img_channels, label_dim, use_fp16=use_fp16, model_channels=model_channels,
                                channel_mult=channel_mult, num_blocks=num_blocks, attn_resolutions=[resolution // 4])
    with torch.no_grad():   # trained-looking gains so every branch contributes
        for name, p in net.named_parameters():
            if name.endswith('gain'):
                p.fill_(0.7)
    return net.to(device)


def make_batch(net, batch, device, seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], generator=g, device=device)
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim, device=device)[torch.randint(net.label_dim, [batch], generator=g, device=device)]
    return x, labels


def train_step(net, opt, images, labels, P_mean=-0.4, P_std=1.0):
    """One EDM2 loss step (EDM2 paper eq. 21) + Adam."""
    sigma = (torch.randn([images.shape[0], 1, 1, 1], device=images.device) * P_std + P_mean).exp()
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    noisy = images + torch.randn_like(images) * sigma
    D, logvar = net(noisy, sigma, labels, return_logvar=True)
    loss = (weight / logvar.exp()) * (D - images) ** 2 + logvar
    opt.zero_grad(set_to_none=True)
    loss.sum().mul(1 / images.shape[0]).backward()
    opt.step()


def heun_sample(net, noise, labels, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7):
    """Deterministic EDM Heun sampler (Karras et al. 2022 (EDM), Alg. 1): 2 * num_steps - 1 network calls."""
    i = torch.arange(num_steps, dtype=torch.float64, device=noise.device)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros_like(t[:1])])
    x = noise.to(torch.float64) * t[0]
    for k in range(num_steps):
        d = (x - net(x, t[k], labels).to(torch.float64)) / t[k]
        x_next = x + (t[k + 1] - t[k]) * d
        if k < num_steps - 1:
            d2 = (x_next - net(x_next, t[k + 1], labels).to(torch.float64)) / t[k + 1]
            x_next = x + (t[k + 1] - t[k]) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x

#----------------------------------------------------------------------------
# Alternating measurement.


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


CLOCK = [time.perf_counter]


def timed(fn, device):
    sync(device)
    start = CLOCK[0]()
    result = fn()
    sync(device)
    return CLOCK[0]() - start, result


def alternate(variants, rounds, device):
    """variants: {name: fn() -> result}. Runs A B C A B C ... `rounds` times after one warm-up each."""
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    results = {}
    for _ in range(rounds):
        for name, fn in variants.items():
            seconds, results[name] = timed(fn, device)
            times[name].append(seconds)
    return times, results


def report(title, times, images_per_call, baseline):
    print(f'\n{title}')
    base = times[baseline]
    for name, ts in times.items():
        ratio = statistics.median(b / t for b, t in zip(base, ts))
        print(f'  {name:<22} {images_per_call / statistics.median(ts):9.2f} img/s   x{ratio:.2f} vs {baseline}')


def tune_allocator():
    """Keep freed memory in the process (glibc): fewer page faults from large temporaries."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 31))

#----------------------------------------------------------------------------
# Benchmarks.


def bench_training(net, variants, batch, steps, rounds, device):
    x, labels = make_batch(net, batch, device)
    runs = {}
    for name, flags in variants.items():
        model = copy.deepcopy(net).train()
        model.set_fast(**flags)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)

        def run(model=model, opt=opt):
            for _ in range(steps):
                train_step(model, opt, x, labels)
        runs[name] = run
    times, _ = alternate(runs, rounds, device)
    report(f'Training: batch {batch}, {steps} steps per round, {rounds} rounds', times, batch * steps, next(iter(runs)))


def bench_sampling(net, variants, batch, num_steps, rounds, device):
    noise, labels = make_batch(net, batch, device, seed=2)
    runs = {}
    for name, flags in variants.items():
        model = copy.deepcopy(net).eval().requires_grad_(False)
        model.set_fast(**flags)
        runs[name] = lambda model=model: heun_sample(model, noise, labels, num_steps)
    with torch.no_grad():
        times, results = alternate(runs, rounds, device)
    report(f'Sampling: batch {batch}, {num_steps} Heun steps ({2 * num_steps - 1} calls), {rounds} rounds',
           times, batch, next(iter(runs)))
    ref = results[next(iter(runs))]
    for name, images in results.items():
        print(f'  {name:<22} max |image - {next(iter(runs))}| = {(images - ref).abs().max().item():.3g}'
              f'   (image std {ref.std().item():.3g})')


def flops_per_sample(net, device, batch=2, train=False):
    from torch.utils.flop_counter import FlopCounterMode
    x, labels = make_batch(net, batch, device)
    model = copy.deepcopy(net).train(train)
    with FlopCounterMode(display=False) as counter:
        D = model(x, torch.ones(batch, device=device), labels)
        if train:
            D.sum().backward()
    return counter.get_total_flops() / batch

#----------------------------------------------------------------------------
# Command line.


@click.command()
@click.option('--device', help='cpu or cuda (default: cuda if available)', default=None)
@click.option('--resolution', help='CPU net: image resolution', type=int, default=16, show_default=True)
@click.option('--model-channels', help='CPU net: model_channels', type=int, default=64, show_default=True)
@click.option('--mult', help='CPU net: channel_mult', default='1,2,3,4', show_default=True)
@click.option('--img-channels', help='CPU net: image channels', type=int, default=4, show_default=True)
@click.option('--blocks', help='CPU net: num_blocks', type=int, default=2, show_default=True)
@click.option('--batch-train', help='CPU training batch', type=int, default=8, show_default=True)
@click.option('--batch-sample', help='CPU sampling batch', type=int, default=4, show_default=True)
@click.option('--train-steps', help='training steps per round', type=int, default=2, show_default=True)
@click.option('--sample-steps', help='Heun steps per sample', type=int, default=32, show_default=True)
@click.option('--rounds', help='alternating rounds per variant', type=int, default=3, show_default=True)
@click.option('--threads', help='torch CPU threads (0 = default)', type=int, default=0)
@click.option('--malloc-tune/--no-malloc-tune', help='keep freed memory in the process (glibc mallopt)', default=False)
@click.option('--clock', help='wall time, or process CPU time (steadier on a loaded machine with --threads=1)',
              type=click.Choice(['wall', 'cpu']), default='wall', show_default=True)
@click.option('--what', help='training, sampling or both', type=click.Choice(['training', 'sampling', 'both']), default='both')
def main(device, resolution, model_channels, mult, img_channels, blocks, batch_train, batch_sample, train_steps, sample_steps, rounds,
         threads, malloc_tune, clock, what):
    """Plain vs fast paths of the EDM2 network: training and sampling images/s, alternately measured."""
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if threads:
        torch.set_num_threads(threads)
    if clock == 'cpu':
        CLOCK[0] = time.process_time
    if malloc_tune:
        print(f'glibc allocator tuned: {tune_allocator()}')
    print(f'torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, '
          f'CPU capability {torch.backends.cpu.get_cpu_capability()}')
    if device.type == 'cuda':
        return bench_cuda(device, rounds, what)
    channel_mult = [int(m) for m in mult.split(',')]
    net = make_net(device, resolution, img_channels, model_channels, channel_mult, blocks, 0, use_fp16=False)
    params = sum(p.numel() for p in net.parameters())
    print(f'CPU net: {resolution}x{resolution}x{img_channels}, C={model_channels}, mult {channel_mult}, '
          f'{blocks} blocks, {params / 1e6:.2f}M params')
    plain, fast = dict(enabled=False), dict(enabled=True)
    if what in ('training', 'both'):
        bench_training(net, {'plain fp32': plain, 'fast fp32': fast}, batch_train, train_steps, rounds, device)
    if what in ('sampling', 'both'):
        bench_sampling(net, {'plain fp32': plain, 'fast fp32': fast, 'fast bf16': dict(enabled=True, dtype='bf16')},
                       batch_sample, sample_steps, rounds, device)


def bench_cuda(device, rounds, what):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net = networks_edm2.Precond(64, 4, 1000, use_fp16=True, model_channels=128).to(device)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith('gain'):
                p.fill_(0.7)
    params = sum(p.numel() for p in net.parameters())
    print(f'CUDA net: edm2-img512-xs layout, {params / 1e6:.2f}M params, {torch.cuda.get_device_name(device)}')
    fwd = flops_per_sample(net, device)
    train_flops = flops_per_sample(net, device, train=True)
    print(f'FLOPs per sample: forward {fwd / 1e9:.1f} G, train step {train_flops / 1e9:.1f} G')
    peak = peak_tflops(device)
    variants = {'plain fp16': dict(enabled=False), 'fast fp16': dict(enabled=True),
                'fast bf16': dict(enabled=True, dtype='bf16')}
    batch = 64
    if what in ('training', 'both'):
        times = bench_cuda_training(net, variants, batch, rounds, device)
        for name, ts in times.items():
            tflops = train_flops * batch * 4 / statistics.median(ts) / 1e12
            print(f'  {name:<22} {tflops:7.1f} TFLOP/s model, MFU {100 * tflops / peak:.1f}% of {peak:.0f}')
    if what in ('sampling', 'both'):
        noise, labels = make_batch(net, batch, device, seed=2)
        runs = {}
        for name, flags in variants.items():
            model = copy.deepcopy(net).eval().requires_grad_(False)
            model.set_fast(**flags)
            runs[name] = lambda model=model: heun_sample(model, noise, labels, 32)
        with torch.no_grad():
            times, results = alternate(runs, rounds, device)
        report(f'Sampling: batch {batch}, 32 Heun steps, {rounds} rounds', times, batch, 'plain fp16')
        for name, ts in times.items():
            tflops = fwd * batch * 63 / statistics.median(ts) / 1e12
            diff = (results[name] - results['plain fp16']).abs().max().item()
            print(f'  {name:<22} {tflops:7.1f} TFLOP/s model, MFU {100 * tflops / peak:.1f}%, max |diff| {diff:.3g}')


def bench_cuda_training(net, variants, batch, rounds, device):
    x, labels = make_batch(net, batch, device)
    runs = {}
    for name, flags in variants.items():
        model = copy.deepcopy(net).train()
        model.set_fast(**flags)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)

        def run(model=model, opt=opt):
            for _ in range(4):
                train_step(model, opt, x, labels)
        runs[name] = run
    times, _ = alternate(runs, rounds, device)
    report(f'Training: batch {batch}, 4 steps per round, {rounds} rounds', times, batch * 4, 'plain fp16')
    return times


def peak_tflops(device):
    name = torch.cuda.get_device_name(device)
    for key, value in [('H200', 989.0), ('H100', 989.0), ('A100', 312.0), ('L40', 362.0), ('A10', 125.0)]:
        if key in name:
            return value   # dense fp16/bf16 tensor-core peak
    return 100.0


if __name__ == '__main__':
    main()
