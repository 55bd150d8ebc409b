"""Kill-and-resume trials for train_edm2.py (issue "Reliability", see docs/reliability.md).

Each trial starts a tiny CPU training run, SIGKILLs it once or twice at a random moment
(or exactly while a checkpoint or snapshot temp file is being written), checks that every
`training-state-*.pt` visible under its final name is complete, then reruns the same
command to the end and compares the final training state with an uninterrupted run of
the same length, bit for bit (network, optimizer, EMA).

    python bench/kill_resume.py --trials 12 --out /tmp/kill_resume
"""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import click
import numpy as np
import PIL.Image
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from torch_utils import persistence  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
DURATION = 4096  # 4 kimg = 64 steps of batch 64; checkpoints and snapshots every 1 kimg.
ARGS = ['--cond=1', '--preset=edm2-cifar10-32x32-cond', '--channels=8', '--channel-mult=1,2', '--num-blocks=1',
        '--attn-res=4', '--channels-per-head=8', '--dropout=0', '--lr=0.01', '--rampup=0', '--fp16=0',
        '--workers=0', '--device=cpu', '--batch=64', '--status=1024', '--snapshot=1Ki', '--checkpoint=1Ki',
        f'--duration={DURATION}']
FINAL = f'training-state-{DURATION // 1000:07d}.pt'


def write_dataset(path: str, num_images: int = 32, resolution: int = 8) -> str:
    os.makedirs(path, exist_ok=True)
    rng = np.random.RandomState(0)
    labels = []
    for i in range(num_images):
        image = rng.randint(0, 256, size=[resolution, resolution, 3]).astype(np.uint8)
        PIL.Image.fromarray(image).save(os.path.join(path, f'{i:03d}.png'))
        labels.append([f'{i:03d}.png', i % 4])
    with open(os.path.join(path, 'dataset.json'), 'w') as f:
        json.dump({'labels': labels}, f)
    return path


def command(outdir: str, data: str) -> list:
    return [sys.executable, os.path.join(REPO, 'train_edm2.py'), f'--outdir={outdir}', f'--data={data}', *ARGS]


def kill_when(proc: subprocess.Popen, outdir: str, mode: str, delay: float, kimg: int) -> str:
    """SIGKILL `proc` after `delay` s (mode 'time') or as soon as the temp file of the checkpoint
    or snapshot of `kimg` appears (mode 'checkpoint' / 'snapshot'); return what happened."""
    pattern = {'checkpoint': f'.training-state-{kimg:07d}.pt.tmp-*',
               'snapshot': f'.network-snapshot-{kimg:07d}-*.tmp-*'}.get(mode)
    start = time.time()
    while proc.poll() is None:
        if pattern is None and time.time() - start >= delay:
            break
        if pattern is not None and glob.glob(os.path.join(outdir, pattern)):
            break
        time.sleep(0.0005)
    if proc.poll() is not None:
        return 'finished before the kill'
    tmp = [os.path.basename(p) for p in glob.glob(os.path.join(outdir, '.*.tmp-*'))]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f'killed at {time.time() - start:.2f}s' + (f' while writing {tmp[0]}' if tmp else '')


def check_states(outdir: str) -> tuple:
    """(readable states, unreadable states) among files with a final name."""
    good, bad = [], []
    for path in sorted(glob.glob(os.path.join(outdir, 'training-state-*.pt'))):
        try:
            persistence.load_torch_file(path)
            good.append(os.path.basename(path))
        except persistence.PickleLoadError as err:  # a torn file
            bad.append(f'{os.path.basename(path)}: {err.reason}')
    return good, bad


def resumed_from(outdir: str) -> list:
    with open(os.path.join(outdir, 'log.txt')) as f:
        return [line.strip() for line in f if line.startswith('Loading') and 'training-state' in line]


def code_version() -> float:
    """Newest modification time of the code a run executes (other people may edit it meanwhile)."""
    files = glob.glob(os.path.join(REPO, '*', '*.py')) + [os.path.join(REPO, 'train_edm2.py')]
    return max(os.path.getmtime(f) for f in files if '/tests/' not in f and '/bench/' not in f)


def reference_run(out: str, data: str) -> tuple:
    ref_dir = os.path.join(out, 'reference')
    shutil.rmtree(ref_dir, ignore_errors=True)
    version, start = code_version(), time.time()
    result = subprocess.run(command(ref_dir, data), env=ENV, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return ref_dir, time.time() - start, version


def compare(reference: str, resumed: str) -> list:
    """Names of state entries that differ (empty = bit-identical)."""
    ref = persistence.load_torch_file(reference)
    res = persistence.load_torch_file(resumed)
    diffs = []

    def walk(a, b, name):
        if isinstance(a, torch.Tensor):
            if not (isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)):
                diffs.append(name)
        elif isinstance(a, dict):
            for key in a:
                if key in ('total_elapsed_time',):
                    continue
                walk(a[key], b.get(key) if isinstance(b, dict) else None, f'{name}.{key}')
        elif isinstance(a, (list, tuple)):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f'{name}[{i}]')
        elif a != b:
            diffs.append(name)
    walk(ref, res, 'state')
    return diffs


@click.command()
@click.option('--trials', type=int, default=12, show_default=True)
@click.option('--out', type=str, default='/tmp/kill_resume', show_default=True)
@click.option('--seed', type=int, default=0, show_default=True)
def main(trials: int, out: str, seed: int) -> None:
    shutil.rmtree(out, ignore_errors=True)
    data = write_dataset(os.path.join(out, 'data'))
    rng = random.Random(seed)

    t0 = time.time()
    ref_dir, ref_time, version = reference_run(out, data)
    print(f'reference run: {ref_time:.1f}s')

    modes = ['checkpoint', 'time', 'snapshot', 'time']
    failures = middle = 0
    trial = 0
    while trial < trials:
        if code_version() != version:  # Code edited since the reference: the comparison would be void.
            ref_dir, ref_time, version = reference_run(out, data)
            print(f'code changed: new reference run ({ref_time:.1f}s)', flush=True)
        outdir = os.path.join(out, f'trial{trial:02d}')
        shutil.rmtree(outdir, ignore_errors=True)
        cmd = command(outdir, data)
        events = []
        num_kills = 1 + (trial % 3 == 2)
        for kill_idx in range(num_kills):
            mode = modes[(trial + kill_idx) % len(modes)]
            proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            delay, kimg = rng.uniform(0.25, 0.75) * ref_time, rng.randint(1, DURATION // 1024 - 1)
            events.append(f'{mode}: ' + kill_when(proc, outdir, mode, delay, kimg))
            good, bad = check_states(outdir)
            if bad:
                events.append(f'TORN visible state files: {bad}')
        leftovers = len(glob.glob(os.path.join(outdir, '.*.tmp-*')))
        final = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True)
        loads = resumed_from(outdir) if os.path.exists(os.path.join(outdir, 'log.txt')) else []
        if code_version() != version:
            print(f'trial {trial:2d}: code changed during the trial; repeating it', flush=True)
            continue
        diffs = compare(os.path.join(ref_dir, FINAL), os.path.join(outdir, FINAL)) if final.returncode == 0 else ['run failed']
        ok = final.returncode == 0 and not diffs and not any('TORN' in e for e in events)
        failures += not ok
        middle += any(FINAL not in line for line in loads)
        print(f'trial {trial:2d}: {"OK  " if ok else "FAIL"} {"; ".join(events)}; temp files left by the kill: '
              f'{leftovers}; resumed from: {[s.split()[1] for s in loads] or "scratch"}; '
              f'final state {"bit-identical" if not diffs else "differs in " + ", ".join(diffs[:5])}', flush=True)
        if final.returncode != 0:
            print(final.stderr[-1500:])
        trial += 1
    print(f'{trials - failures}/{trials} trials resumed to a bit-identical final state '
          f'({middle} of them from a checkpoint before the end); total {time.time() - t0:.0f}s')
    sys.exit(1 if failures else 0)


if __name__ == '__main__':
    main()
