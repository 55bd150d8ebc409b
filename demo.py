"""End-to-end demo on embedded data, no download: the README's first command runs it.

Runs the toolkit's own command lines one after the other (each is printed, so it can be copied):
  1. toy_example.py demo           -- the 2D autoguidance figure, with measured figures per panel;
  2. dataset_tool.py convert       -- scikit-learn's 8x8 digits, upscaled, into a training archive;
  3. train_edm2.py                 -- a short class-conditional pixel-space run;
  4. reconstruct_phema.py          -- a post-hoc EMA profile from the run's snapshots;
  5. generate_images.py            -- ten samples of every class, tiled into one grid;
  6. an offline quality figure     -- how many samples a digit classifier reads as the requested class.
Every step resumes: run the same command again after an interruption.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import click
import numpy as np
import PIL.Image

from training.data_tools import demo_digits
from training.cli.options import DEVICE

# The toolkit's scripts sit next to this file; running them by absolute path lets the demo start from any
# directory (Python puts a script's own folder first on sys.path, so their imports still resolve).
SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))

#----------------------------------------------------------------------------

def script_path(name: str) -> str:
    """A toolkit script by absolute path, shown relative to the current directory when it lies inside it."""
    path = os.path.join(SCRIPT_DIR, name)
    relative = os.path.relpath(path)
    return path if relative.startswith('..') else relative

def run_step(title: str, args: list[str], env: dict | None = None) -> None:
    """Run one toolkit command (args[0]: a script next to demo.py), echoing it; stop the demo with its exit
    code if it fails."""
    args = [script_path(args[0]), *args[1:]]
    print(f'\n=== {title}\n$ python {" ".join(args)}', flush=True)
    start = time.time()
    result = subprocess.run([sys.executable, *args], env=env)
    if result.returncode != 0:
        raise click.ClickException(f'step "{title}" failed with exit code {result.returncode}; '
                                   'fix the cause and run the demo again to resume')
    print(f'--- {title}: done in {time.time() - start:.0f}s', flush=True)

def newest_file(directory: str, prefix: str) -> str:
    names = sorted(name for name in os.listdir(directory) if name.startswith(prefix) and name.endswith('.pkl'))
    if len(names) == 0:
        raise click.ClickException(f'no {prefix}*.pkl in {directory}')
    return os.path.join(directory, names[-1])

def class_sample_dirs(outdir: str, net: str) -> list[str]:
    """samples/<network file stem>/class<N>: samples are kept per network, so a run with another --kimg (another
    network) never shows the old network's images, while a resumed run finds its own (--skip-existing)."""
    stem = os.path.splitext(os.path.basename(net))[0]
    return [os.path.join(outdir, 'samples', stem, f'class{label}') for label in range(10)]

def tile_class_grid(sample_dirs: list[str], dest: str) -> tuple[np.ndarray, np.ndarray]:
    """One row per class; returns (images [N, C, H, W] uint8, labels [N])."""
    images, labels = [], []
    for label, directory in enumerate(sample_dirs):
        for name in sorted(os.listdir(directory)):
            if name.endswith('.png'):
                images.append(np.asarray(PIL.Image.open(os.path.join(directory, name)).convert('RGB')))
                labels.append(label)
    images = np.stack(images) # [N, H, W, C]
    rows = len(sample_dirs)
    cols = len(images) // rows
    framed = np.pad(images[:rows * cols], [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=96) # thin grey frame
    h, w = framed.shape[1:3]
    grid = framed.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
    scale = max(1, 128 // w) # show small images large enough to read
    grid_image = PIL.Image.fromarray(grid).resize((cols * w * scale, rows * h * scale), PIL.Image.NEAREST)
    tmp = dest + '.tmp.png'
    grid_image.save(tmp)
    os.replace(tmp, dest)
    return images.transpose(0, 3, 1, 2), np.asarray(labels)

#----------------------------------------------------------------------------

@click.command(epilog='Example:\n\n\b\n  python demo.py --outdir=demo-out')
@click.option('--outdir', help='Where to put everything', metavar='DIR', type=str, default='demo-out', show_default=True)
@click.option('--kimg', help='Training duration of the digits model, in thousands (Ki = 1024) of images', metavar='INT',
              type=click.IntRange(min=1), default=96, show_default=True)
@click.option('--resolution', help='Training resolution of the digits', metavar='INT',
              type=click.Choice(['16', '32']), default='16', show_default=True)
@click.option('--toy/--no-toy', help='Include the 2D toy example', default=True, show_default=True)
@click.option('--device', help='Compute device  [default: cuda if available, else cpu]', metavar='STR', type=DEVICE)
def main(outdir: str, kimg: int, resolution: str, toy: bool, device: str | None) -> None:
    """Run the toolkit end to end on embedded data (no download): toy autoguidance figure, then a small
    class-conditional digits model trained, EMA-reconstructed, sampled and checked."""
    start = time.time()
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    device_args = [f'--device={device}'] if device else []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', str(min(os.cpu_count() or 1, 2))))
    res = int(resolution)

    toy_dir = os.path.join(outdir, 'toy')
    if toy:
        run_step('Toy example: autoguidance in 2D', ['toy_example.py', 'demo', f'--outdir={toy_dir}', '--main-iter=2048',
                                                       *device_args], env) # half the official 4096: keeps the demo short

    src_dir = os.path.join(outdir, 'digits-src')
    if not os.path.isfile(os.path.join(src_dir, 'dataset.json')):
        print(f'\n=== Exporting scikit-learn digits to {src_dir}')
        print(f'{demo_digits.export_digits(src_dir)} images written')
    data_zip = os.path.join(outdir, f'digits-{res}x{res}.zip')
    if not os.path.isfile(data_zip):
        run_step('Dataset', ['dataset_tool.py', 'convert', f'--source={src_dir}', f'--dest={data_zip}',
                             f'--resolution={res}x{res}'], env)

    run_dir = os.path.join(outdir, 'training-run')
    snapshot = f'{max(kimg // 4, 1)}Ki'
    run_step('Training (class-conditional, pixel space)', [
        'train_edm2.py', f'--outdir={run_dir}', f'--data={data_zip}', '--cond=1', '--preset=edm2-cifar10-32x32-cond',
        '--channels=32', '--channel-mult=1,2', '--num-blocks=1', '--attn-res=', '--batch=64', '--lr=0.01',
        '--decay=1000', '--rampup=0', '--dropout=0', f'--duration={kimg}Ki', '--status=4Ki',
        f'--snapshot={snapshot}', f'--checkpoint={snapshot}', '--workers=0', *device_args], env)

    phema_dir = os.path.join(outdir, 'phema')
    run_step('Post-hoc EMA reconstruction', ['reconstruct_phema.py', f'--indir={run_dir}', f'--outdir={phema_dir}',
                                             '--outstd=0.100', '--skip'], env)
    net = newest_file(phema_dir, 'phema-')

    sample_dirs = class_sample_dirs(outdir, net)
    for label, sample_dir in enumerate(sample_dirs):
        run_step(f'Sampling class {label}', ['generate_images.py', f'--net={net}', f'--outdir={sample_dir}',
                                             f'--class={label}', '--seeds=0-9', '--batch=10', '--skip-existing',
                                             *device_args], env)
    grid_path = os.path.join(outdir, 'samples-per-class.png')
    images, labels = tile_class_grid(sample_dirs, grid_path)

    print('\n=== Offline quality check')
    rate = demo_digits.digit_recognition_rate(images, labels)
    print(f'A digit classifier trained on the real digits reads {rate:.0%} of the samples as the requested class '
          '(real digits: ~97%, random images: ~10%).')
    print('FID and FD_DINOv2 need detector weights from the internet; run calculate_metrics.py where they can be '
          'downloaded (or put them in the cache it names).')

    print(f'\n=== Demo finished in {time.time() - start:.0f}s. What was produced:')
    if toy:
        print(f'  toy figure:          {os.path.join(toy_dir, "toy-example.png")}')
    print(f'  dataset:             {data_zip}')
    print(f'  training run:        {run_dir}  (log.txt, stats.jsonl, network-snapshot-*.pkl, training-state-*.pt)')
    print(f'  post-hoc EMA:        {net}')
    print(f'  samples:             {os.path.dirname(sample_dirs[0])}/class*/*.png')
    print(f'  grid (row = class):  {grid_path}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
