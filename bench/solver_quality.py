"""Quality versus network evaluations (NFE) of the sampling solvers of training/sampling/solvers.py.

A small class-conditional EDM2 model of scikit-learn's handwritten digits is trained once with the
toolkit's own command lines (dataset_tool.py convert, train_edm2.py, reconstruct_phema.py) and cached.
Quality is a Frechet distance (FD) in the feature space of a small digits classifier (a CNN trained once,
deterministically, on the same real digits, and cached): the FD between the features of the generated
digits and those of all real digits. Every configuration (solver, time steps, NFE, guidance) samples the
same --sets disjoint seed sets of --num images each; the spread of FD across the sets is the noise of the
measurement, and the pixel RMSE against Heun with 63 NFE on the same seeds shows the discretisation error
directly. Guided rows use autoguidance: the guide is a model of half the width trained for a quarter of
the time. images/s is the sampling speed of each configuration (generation and decoding, no feature
extraction), measured in the same run.

Writes <out>.json (every measurement, the targets, the settings) and <out>.png (FD vs NFE, one line per
solver), and prints the table and the targets: at <= 32 NFE the best solver other than Heun within the
seed-set noise of Heun at 63 NFE, at <= 16 NFE within 25 % of it.

The CPU defaults (8x8 digits, 250 images per set) take about 30 minutes on 2 idle cores once the models
are trained (about 10 minutes, once); on a busy machine OMP_NUM_THREADS=1 avoids threads waiting on each
other. The rows are saved to <out>.json as they are measured.

Examples:
    OMP_NUM_THREADS=1 python bench/solver_quality.py          # CPU defaults
    python bench/solver_quality.py --device=cuda              # 16x16 digits, a wider model, 5000 images per set
    python bench/solver_quality.py --num=100 --nfe=8,16,63 --unguided=heun,ipndm/logsnr --guided=   # a quick look
"""

import json
import os
import subprocess
import sys
import time
from typing import Optional

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dnnlib  # noqa: E402
from dnnlib.util import parse_int_list  # noqa: E402
from torch_utils import persistence  # noqa: E402
from training.data_tools import demo_digits  # noqa: E402
from training.dataset import ImageFolderDataset  # noqa: E402
from training.evaluation.calculate_metrics import frechet_distance  # noqa: E402
from training.sampling.generate_images import generate_images  # noqa: E402
from training.sampling.families import count_evaluations  # noqa: E402
from training.sampling.solvers import check_sampler_options  # noqa: E402

# Model and measurement sizes per device: the CPU ones finish in about 30 minutes on 2 idle cores.
DEFAULTS = {
    'cpu': dict(resolution=8, channels=32, kimg=96, num=250, batch=250),
    'cuda': dict(resolution=16, channels=64, kimg=1024, num=5000, batch=1000),
}
REFERENCE = dict(solver='heun', discretization='edm', nfe=63)

#----------------------------------------------------------------------------
# The digits model, trained once with the toolkit's command lines.


def run_tool(args: list, cwd: str) -> None:
    """Run a toolkit script (args[0], next to bench/) with this Python; stop with its output if it fails."""
    cmd = [sys.executable, os.path.join(ROOT, args[0]), *args[1:]]
    print('$ python ' + ' '.join(args), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f'{args[0]} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}')


def digits_dataset(cache: str, resolution: int) -> str:
    """scikit-learn's digits, upscaled to resolution x resolution by dataset_tool.py convert."""
    src, dest = os.path.join(cache, 'digits-src'), os.path.join(cache, f'digits-{resolution}x{resolution}.zip')
    if not os.path.isfile(os.path.join(src, 'dataset.json')):
        demo_digits.export_digits(src)
    if not os.path.isfile(dest):
        run_tool(['dataset_tool.py', 'convert', f'--source={src}', f'--dest={dest}',
                  f'--resolution={resolution}x{resolution}'], cache)
    return dest


def digits_model(cache: str, data: str, channels: int, kimg: int, device: str) -> str:
    """A class-conditional model trained with the demo's recipe for `kimg` Ki images, then post-hoc EMA
    (std 0.100) at the end of training; returns its pickle."""
    name = f'{os.path.splitext(os.path.basename(data))[0]}-c{channels}-{kimg}Ki'
    run_dir, phema_dir = os.path.join(cache, name), os.path.join(cache, f'{name}-phema')
    path = os.path.join(phema_dir, f'phema-{kimg * 1024 // 1000:07d}-0.100.pkl')
    if os.path.isfile(path):
        return path
    interval = f'{max(kimg // 4, 1)}Ki'
    run_tool(['train_edm2.py', f'--outdir={run_dir}', f'--data={data}', '--cond=1', '--preset=edm2-cifar10-32x32-cond',
              f'--channels={channels}', '--channel-mult=1,2', '--num-blocks=1', '--attn-res=', '--batch=64',
              '--lr=0.01', '--decay=1000', '--rampup=0', '--dropout=0', f'--duration={kimg}Ki', f'--status={interval}',
              f'--snapshot={interval}', f'--checkpoint={interval}', '--workers=0', f'--device={device}'], cache)
    run_tool(['reconstruct_phema.py', f'--indir={run_dir}', f'--outdir={phema_dir}', '--outstd=0.100', '--skip'], cache)
    if not os.path.isfile(path):
        raise click.ClickException(f'reconstruct_phema.py did not write {path}')
    return path

#----------------------------------------------------------------------------
# The feature space: a small CNN digits classifier, trained once, deterministically.


class DigitsClassifier(torch.nn.Module):
    """Three convolutions, average-pooled to 2x2 (the 256 features, like Inception-v3's pool features for FID),
    then two fully connected layers; `features()` takes uint8 images [N, C, H, W]."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
        self.head = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        gray = images.to(torch.float32).mean(dim=1, keepdim=True) / 127.5 - 1
        return self.convs(gray)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def real_digits(data: str) -> tuple:
    """(images uint8 [N, C, H, W], labels int64 [N]) of the training archive."""
    dataset = ImageFolderDataset(data, use_labels=True)
    images = torch.from_numpy(np.stack([dataset[i][0] for i in range(len(dataset))]))
    labels = torch.from_numpy(np.stack([dataset[i][1] for i in range(len(dataset))]).argmax(axis=1))
    return images, labels


def train_classifier(classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, epochs: int) -> None:
    """Adam, batches of 64 in a seeded order, one thread: the same weights on every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    with torch.enable_grad():
        for epoch in range(epochs):
            for batch in torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch)).split(64):
                loss = torch.nn.functional.cross_entropy(classifier(images[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    torch.set_num_threads(threads)


def digits_classifier(cache: str, data: str, resolution: int, epochs: int = 30) -> tuple:
    """(classifier, held-out accuracy): trained on 80 % of the real digits with a fixed seed and one thread, so
    that the same weights come out every time; cached."""
    path = os.path.join(cache, f'classifier-{resolution}x{resolution}.pt')
    images, labels = real_digits(data)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, held_out = order[:len(order) * 4 // 5], order[len(order) * 4 // 5:]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        classifier = DigitsClassifier()
    if os.path.isfile(path):
        classifier.load_state_dict(torch.load(path, weights_only=True))
    else:
        train_classifier(classifier, images[train], labels[train], epochs)
        torch.save(classifier.state_dict(), path)
    classifier.eval().requires_grad_(False)
    accuracy = float((classifier(images[held_out]).argmax(dim=1) == labels[held_out]).float().mean())
    return classifier, accuracy


def feature_stats(classifier: DigitsClassifier, images: torch.Tensor) -> tuple:
    features = torch.cat([classifier.features(chunk.cpu()) for chunk in images.split(500)]).double().numpy()
    return features.mean(axis=0), np.cov(features, rowvar=False)

#----------------------------------------------------------------------------
# Configurations and measurements.


def steps_for(solver: str, nfe: int) -> int:
    """Steps that give at most `nfe` evaluations of the main network (heun: 2 per step, the last step 1)."""
    return max((nfe + 1) // 2, 1) if solver == 'heun' else nfe


def parse_lines(text: str) -> list:
    """'heun,dpm++3m/logsnr' -> [('heun', 'edm'), ('dpm++3m', 'logsnr')]: solver[/time steps]."""
    return [tuple((item + '/edm').split('/')[:2]) for item in text.split(',') if item]


def configurations(unguided: list, guided: list, guidances: list, nfes: list) -> list:
    """One sampler configuration per (guidance, solver, time steps, NFE)."""
    lines = [(1.0, solver, disc) for solver, disc in unguided]
    lines += [(guidance, solver, disc) for guidance in guidances for solver, disc in guided]
    return [dict(solver=solver, discretization=disc, num_steps=steps_for(solver, nfe), guidance=guidance)
            for guidance, solver, disc in lines for nfe in nfes]


def generate(nets: tuple, seeds: list, device: str, batch: int, config: dict) -> tuple:
    """(uint8 images of `seeds`, seconds spent sampling and decoding)."""
    net, gnet = nets
    start = time.perf_counter()
    image_iter = generate_images(net, gnet=gnet if config['guidance'] != 1 else None, seeds=seeds, max_batch_size=batch,
                                 device=device, verbose=False, **config)
    images = torch.cat([r.images.cpu() for r in image_iter])
    if device == 'cuda':
        torch.cuda.synchronize()
    return images, time.perf_counter() - start


def measure(nets: tuple, classifier: DigitsClassifier, reference: tuple, seed_sets: list, device: str, batch: int,
            config: dict, heun63: dict) -> tuple:
    """(row, images per seed set): FD per seed set, pixel RMSE against Heun-63 on the same seeds, images/s."""
    fds, rmses, seconds, all_images = [], [], 0.0, []
    for seeds in seed_sets:
        images, elapsed = generate(nets, seeds, device, batch, config)
        seconds += elapsed
        fds.append(frechet_distance(*feature_stats(classifier, images), *reference))
        all_images.append(images)
        if config['guidance'] in heun63:
            diff = images.float() - heun63[config['guidance']][len(all_images) - 1].float()
            rmses.append(float(diff.square().mean().sqrt()))
    nfe = count_evaluations(**{k: v for k, v in config.items()})
    return dict(**config, nfe=nfe['main'], nfe_guide=nfe['guide'], fd=fds, fd_mean=float(np.mean(fds)),
                fd_std=float(np.std(fds, ddof=1)) if len(fds) > 1 else 0.0,
                rmse=float(np.mean(rmses)) if rmses else None,
                images_per_s=sum(len(s) for s in seed_sets) / seconds), all_images

def alternating_speed(nets: tuple, seeds: list, device: str, batch: int, configs: list, rounds: int = 3) -> list:
    """images/s of each configuration, timed in turns (A B C A B C ...) so that changes in the machine's load hit
    all of them alike; the median over the rounds."""
    seconds = [[] for _ in configs]
    for _round in range(rounds):
        for config, times in zip(configs, seconds):
            times.append(generate(nets, seeds, device, batch, config)[1])
    return [len(seeds) / float(np.median(times)) for times in seconds]


def time_targets(results: list, nets: tuple, seeds: list, device: str, batch: int) -> None:
    """Replace the speed-ups of the targets (taken from the sweep, whose rows ran at different moments) by ones
    timed in turns against Heun-63 with the same guidance."""
    heun63 = [dict(solver='heun', discretization='edm', num_steps=32, guidance=t['guidance']) for t in results]
    picked = [c['config'] for t in results for c in (t['best'], t['fewest']) if c is not None]
    configs = [dict(items) for items in dict.fromkeys(tuple(c.items()) for c in heun63 + picked)]
    speeds = dict(zip((tuple(c.items()) for c in configs), alternating_speed(nets, seeds, device, batch, configs)))
    for t, reference in zip(results, heun63):
        t['heun63_images_per_s'] = speeds[tuple(reference.items())]
        for c in (t['best'], t['fewest']):
            if c is not None:
                c['images_per_s'] = speeds[tuple(c['config'].items())]
                c['speedup'] = c['images_per_s'] / t['heun63_images_per_s']

#----------------------------------------------------------------------------
# Targets, table, plot.


def is_reference(row: dict) -> bool:
    return all(row[k] == v for k, v in REFERENCE.items())


def noise(row: dict, reference: dict) -> float:
    """The seed-set noise of a comparison: the larger standard deviation over the seed sets."""
    return max(reference['fd_std'], row['fd_std'])


def meets(row: dict, reference: dict, rule: str) -> bool:
    """'noise': FD within the seed-set noise of the reference; '25%': FD at most 1.25 times the reference's."""
    if rule == 'noise':
        return abs(row['fd_mean'] - reference['fd_mean']) <= noise(row, reference)
    return row['fd_mean'] <= 1.25 * reference['fd_mean']


def config_of(row: dict) -> dict:
    return {key: row[key] for key in ('solver', 'discretization', 'num_steps', 'guidance')}


def comparison(row: dict, reference: dict, rule: str) -> dict:
    """How `row` compares with Heun-63: FD, the per-set (paired) differences, the target, the speed-up."""
    paired = np.subtract(row['fd'], reference['fd'])
    return dict(config=config_of(row), line=label(row), nfe=row['nfe'], fd=row['fd_mean'], fd_std=row['fd_std'], met=meets(row, reference, rule),
                paired_difference=float(paired.mean()), paired_std=float(paired.std(ddof=1)) if len(paired) > 1 else 0.0,
                rmse=row['rmse'], speedup=row['images_per_s'] / reference['images_per_s'])


def targets(rows: list) -> list:
    """Per guidance weight and target (<= 32 NFE: within the seed-set noise of Heun-63; <= 16 NFE: within 25 %):
    the solver other than Heun with the lowest FD in the budget, and the one that meets the target with the
    fewest NFE (None if none does)."""
    results = []
    for guidance in sorted({row['guidance'] for row in rows}):
        group = [row for row in rows if row['guidance'] == guidance]
        reference = next((row for row in group if is_reference(row)), None)
        for budget, rule in ((32, 'noise'), (16, '25%')):
            candidates = sorted((row for row in group if row['solver'] != 'heun' and row['nfe'] <= budget),
                                key=lambda row: (row['nfe'], row['fd_mean']))
            if reference is None or not candidates:
                continue
            met = [row for row in candidates if meets(row, reference, rule)]
            results.append(dict(guidance=guidance, budget=budget, rule=rule, heun63_fd=reference['fd_mean'],
                                heun63_fd_std=reference['fd_std'],
                                best=comparison(min(candidates, key=lambda row: row['fd_mean']), reference, rule),
                                fewest=comparison(met[0], reference, rule) if met else None))
    return results


def label(row: dict) -> str:
    """solver[/time steps], as in --unguided and --guided."""
    return row['solver'] if row['discretization'] == 'edm' else f'{row["solver"]}/{row["discretization"]}'


def format_table(rows: list) -> str:
    lines = [f'{"guidance":>8} {"solver":<16} {"steps":>5} {"NFE":>7} {"FD (mean +- std over sets)":>27} '
             f'{"per set":>24} {"RMSE vs Heun-63":>15} {"img/s":>8}']
    for row in rows:
        nfe = f'{row["nfe"]}+{row["nfe_guide"]}' if row['nfe_guide'] else f'{row["nfe"]}'
        sets = ' '.join(f'{fd:.2f}' for fd in row['fd'])
        rmse = '-' if row['rmse'] is None else f'{row["rmse"]:.2f}'
        lines.append(f'{row["guidance"]:>8g} {label(row):<16} {row["num_steps"]:>5} {nfe:>7} '
                     f'{row["fd_mean"]:>18.2f} +- {row["fd_std"]:<5.2f} {sets:>24} {rmse:>15} '
                     f'{row["images_per_s"]:>8.1f}')
    return '\n'.join(lines)


def format_targets(results: list) -> str:
    lines = []
    for t in results:
        rule = 'within the seed-set noise of' if t['rule'] == 'noise' else 'within 25% of'
        lines.append(f'guidance {t["guidance"]:g}, <= {t["budget"]} NFE, FD {rule} Heun-63 '
                     f'({t["heun63_fd"]:.2f} +- {t["heun63_fd_std"]:.2f}): {"MET" if t["best"]["met"] else "MISSED"}')
        for what, c in (('lowest FD', t['best']), ('fewest NFE', t['fewest'])):
            if c is not None:
                lines.append(f'  {what:<10}: {c["line"]} at {c["nfe"]} NFE: FD {c["fd"]:.2f} +- {c["fd_std"]:.2f}, '
                             f'per-set difference {c["paired_difference"]:+.2f} +- {c["paired_std"]:.2f}, '
                             f'RMSE {c["rmse"]:.2f}, {c["speedup"]:.1f}x the images/s of Heun-63')
    return '\n'.join(lines)


def format_matrix(rows: list) -> str:
    """FD (mean +- std over the seed sets) and, in brackets, the RMSE against Heun-63 per line and NFE, one block
    per guidance weight, as markdown; heun's odd NFE (7, 11, ...) go in the column just above."""
    columns = sorted({row['nfe'] for row in rows if row['solver'] != 'heun'} | {63})
    blocks = []
    for guidance in sorted({row['guidance'] for row in rows}):
        group = [row for row in rows if row['guidance'] == guidance]
        title = 'no guidance' if guidance == 1 else f'autoguidance w={guidance:g}'
        lines = [f'| {title} | ' + ' | '.join(f'{nfe} NFE' for nfe in columns) + ' |',
                 '|---|' + '---:|' * len(columns)]
        for name in dict.fromkeys(label(row) for row in group):
            cells = {min(c for c in columns if c >= row['nfe']): f'{row["fd_mean"]:.1f} ± {row["fd_std"]:.1f}'
                     + ('' if row['rmse'] is None else f' ({row["rmse"]:.1f})') for row in group if label(row) == name}
            lines.append(f'| {name} | ' + ' | '.join(cells.get(nfe, '') for nfe in columns) + ' |')
        blocks.append('\n'.join(lines))
    return '\n\n'.join(blocks)


def report(rows: list, out: str, results: list) -> None:
    """Print the table, the per-NFE matrix and the targets; plot."""
    rows.sort(key=lambda row: (row['guidance'], row['solver'], row['discretization'], row['nfe']))
    plot(rows, f'{out}.png')
    print(f'\n{format_table(rows)}\n\n{format_matrix(rows)}\n\n{format_targets(results)}')


def plot(rows: list, path: str) -> None:
    """One column per guidance weight: FD against NFE (top; the grey band is Heun-63 +- the seed-set noise, points
    above twice Heun-63's FD are cut off) and the pixel RMSE against Heun-63 (bottom), one line per solver."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    guidances = sorted({row['guidance'] for row in rows})
    colors = {name: f'C{i}' for i, name in enumerate(dict.fromkeys(label(row) for row in rows))}
    fig, axes = plt.subplots(2, len(guidances), figsize=(3.8 * len(guidances), 5.4), squeeze=False, sharex=True)
    for column, guidance in enumerate(guidances):
        group = [row for row in rows if row['guidance'] == guidance]
        fd_ax, rmse_ax = axes[0][column], axes[1][column]
        for name in dict.fromkeys(label(row) for row in group):
            line = sorted((row for row in group if label(row) == name), key=lambda row: row['nfe'])
            fd_ax.errorbar([r['nfe'] for r in line], [r['fd_mean'] for r in line], yerr=[r['fd_std'] for r in line],
                           marker='o', markersize=3, capsize=2, label=name, color=colors[name])
            line = [r for r in line if r['rmse']]
            rmse_ax.plot([r['nfe'] for r in line], [r['rmse'] for r in line], marker='o', markersize=3,
                         color=colors[name])
        reference = next((row for row in group if is_reference(row)), None)
        if reference is not None:
            fd_ax.axhspan(reference['fd_mean'] - reference['fd_std'], reference['fd_mean'] + reference['fd_std'],
                          color='gray', alpha=0.2, lw=0)
            fd_ax.set_ylim(0.8 * reference['fd_mean'], 2 * reference['fd_mean'])
        fd_ax.set_title('no guidance' if guidance == 1 else f'autoguidance w={guidance:g}', fontsize=10)
        fd_ax.legend(fontsize=7)
        rmse_ax.set_yscale('log')
        rmse_ax.set_xscale('log', base=2)
        rmse_ax.set_xticks([8, 16, 32, 63], labels=['8', '16', '32', '63'])
        rmse_ax.set_xlabel('network evaluations per image (main net)')
        for ax in (fd_ax, rmse_ax):
            ax.grid(True, which='both', alpha=0.3)
    axes[0][0].set_ylabel('FD')
    axes[1][0].set_ylabel('RMSE vs Heun-63 (0-255)')
    fig.tight_layout()
    fig.savefig(path, dpi=64)
    plt.close(fig)

#----------------------------------------------------------------------------


@click.command()
@click.option('--cache', help='Where the dataset, the trained models and the classifier are kept', metavar='DIR',
              default='bench-cache/solver-quality', show_default=True)
@click.option('--out', help='Write OUT.json and OUT.png  [default: CACHE/solver-quality-DEVICE]', metavar='PATH')
@click.option('--device', help='Compute device', type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True)
@click.option('--unguided', help='Lines without guidance: solver[/time steps], time steps edm or logsnr', metavar='LIST',
              default='heun,euler,dpm++2m,dpm++2m/logsnr,dpm++3m,dpm++3m/logsnr,ipndm,ipndm/logsnr', show_default=True)
@click.option('--guided', help='Lines with autoguidance, at every --guidance weight', metavar='LIST',
              default='heun,dpm++2m/logsnr,dpm++3m/logsnr,ipndm/logsnr', show_default=True)
@click.option('--guidance', 'guidances', help='Autoguidance weights; empty for none', metavar='LIST', default='1.25,2',
              show_default=True)
@click.option('--nfe', help='Network evaluations per image (heun: the odd number just below)', metavar='LIST',
              default='8,12,16,24,32,63', show_default=True)
@click.option('--num', help='Images per seed set  [default: 250 on CPU, 5000 on CUDA]', metavar='INT', type=int)
@click.option('--sets', help='Disjoint seed sets', metavar='INT', type=click.IntRange(min=1), default=3,
              show_default=True)
@click.option('--report', 'report_json', help='Only print and plot the rows of an earlier (or unfinished) run', metavar='JSON')
@click.option('--kimg', help='Training duration of the digits model in Ki images  [default: 96 on CPU, 1024 on CUDA]',
              metavar='INT', type=int)
def main(cache: str, out: str, device: str, unguided: str, guided: str, guidances: str, nfe: str, num: int, sets: int,
         report_json: Optional[str], kimg: int) -> None:
    """Measure FD against network evaluations for every solver on a small digits model."""
    if report_json is not None:
        with open(report_json) as f:
            data = json.load(f)
        report(data['rows'], out or os.path.splitext(report_json)[0], data['targets'] or targets(data['rows']))
        return
    sizes = dict(DEFAULTS[device], **{k: v for k, v in dict(num=num, kimg=kimg).items() if v is not None})
    os.makedirs(cache, exist_ok=True)
    out = out or os.path.join(cache, f'solver-quality-{device}')
    torch.set_grad_enabled(False)
    start = time.time()

    configs = configurations(parse_lines(unguided), parse_lines(guided), [float(g) for g in guidances.split(',') if g],
                             parse_int_list(nfe))
    try:
        for config in configs:
            check_sampler_options(config['solver'], config['discretization'], config['num_steps'])
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    setup = prepare(cache, sizes, device)
    settings = dict(sizes, device=device, sets=sets, classifier_accuracy=setup.accuracy, models=setup.models)
    seed_sets = [list(range(i * sizes['num'], (i + 1) * sizes['num'])) for i in range(sets)]
    configs.sort(key=lambda c: not (c['solver'] == 'heun' and c['num_steps'] == 32))  # Heun-63 first: RMSE needs it
    rows, heun63 = [], {}
    for config in configs:
        row, images = measure(setup.nets, setup.classifier, setup.reference, seed_sets, device, sizes['batch'], config,
                              heun63)
        if is_reference(row):
            heun63[row['guidance']] = images
            row['rmse'] = 0.0
        rows.append(row)
        print(format_table([row]).splitlines()[1], flush=True)
        save_json(f'{out}.json', settings, rows, start)

    results = targets(rows)
    print('\nTiming the targets against Heun-63 in turns ...', flush=True)
    time_targets(results, setup.nets, seed_sets[0][:sizes['batch']], device, sizes['batch'])
    report(rows, out, results)
    save_json(f'{out}.json', settings, rows, start, results)
    print(f'\nWrote {out}.json and {out}.png in {(time.time() - start) / 60:.0f} min')


def prepare(cache: str, sizes: dict, device: str) -> dnnlib.EasyDict:
    """Dataset, main and guiding networks, classifier and the real digits' feature statistics, cached."""
    data = digits_dataset(cache, sizes['resolution'])
    # Autoguidance (Karras et al. 2024): the guide is a smaller model trained for a quarter of the time.
    paths = (digits_model(cache, data, sizes['channels'], sizes['kimg'], device),
             digits_model(cache, data, sizes['channels'] // 2, sizes['kimg'] // 4, device))
    classifier, accuracy = digits_classifier(cache, data, sizes['resolution'])
    print(f'Digits classifier: {accuracy:.1%} held-out accuracy', flush=True)
    return dnnlib.EasyDict(nets=tuple(persistence.load_pickle(path)['ema'] for path in paths), classifier=classifier,
                           accuracy=accuracy, reference=feature_stats(classifier, real_digits(data)[0]),
                           models=[os.path.relpath(path, cache) for path in paths])


def save_json(path: str, settings: dict, rows: list, start: float, results: Optional[list] = None) -> None:
    with open(path, 'w') as f:
        json.dump(dict(settings=dict(settings, minutes=round((time.time() - start) / 60, 1)), rows=rows,
                       targets=results), f, indent=1)


if __name__ == '__main__':
    main()
