"""Tests for the 2D toy example (training/toy.py, toy_example.py)."""

import copy
import math
import os

import matplotlib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

matplotlib.use('Agg')

import toy_example  # noqa: E402
from tests import faults  # noqa: E402
from torch_utils import persistence  # noqa: E402
from training import toy  # noqa: E402

#----------------------------------------------------------------------------
# Helpers.

def reference_logp_and_score(gm, x, sigma):
    """Textbook evaluation of the diffused mixture (explicit 2x2 solves), float64."""
    S = gm.Sigma.double()[None] + sigma ** 2 * torch.eye(2, dtype=torch.float64)
    d = gm.mu.double()[None] - x.double()[:, None]                       # mu_k - x
    z = torch.linalg.solve(S.expand(len(x), -1, -1, -1), d[..., None])[..., 0]
    w = gm.phi.double() * torch.exp(-0.5 * (d * z).sum(-1)) / torch.sqrt((2 * math.pi) ** 2 * torch.linalg.det(S))
    return w.sum(1).log(), (w[..., None] * z).sum(1) / w.sum(1)[:, None]

@pytest.fixture(scope='module', autouse=True)
def single_thread():
    """These tensors are tiny: one intra-op thread is as fast and immune to oversubscribed CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture(scope='module')
def gt64():
    return copy.deepcopy(toy.gt('A')).double()

@pytest.fixture(scope='module')
def trained_pair(tmp_path_factory):
    """A tiny main model and a tiny, earlier guide, trained for a few iterations and pickled."""
    root = tmp_path_factory.mktemp('toy_models')
    paths = {}
    for name, dim, iters in [('net', 16, 24), ('gnet', 8, 8)]:
        net = toy.do_train(hidden_dim=dim, num_layers=2, batch_size=256, total_iter=iters, viz_iter=None,
                           device='cpu', progress=False)
        paths[name] = str(root / f'{name}.pkl')
        toy.save_snapshot(net, paths[name])
    return paths

#----------------------------------------------------------------------------
# Ground truth.

def test_gt_structure():
    a, ab = toy.gt('A'), toy.gt('AB')
    assert a.mu.shape == (1016, 2) and ab.mu.shape == (2032, 2) and toy.gt('B').mu.shape == (1016, 2)
    assert torch.equal(ab.mu[:1016], a.mu)                                # A first, then B from the same stream
    assert toy.gt('A') is a                                                # memoised
    assert abs(a.phi.sum().item() - 1) < 1e-5
    lut = a._sample_lut
    assert len(lut) == 65536 and bool((lut[1:] >= lut[:-1]).all()) and lut[-1] == 1015
    # Component weights phi = dist * 0.5^depth: the 8 components of a branch share one weight.
    assert torch.allclose(a.phi[:8], a.phi[0].expand(8))
    x = ab.sample(200000, generator=torch.Generator().manual_seed(0))
    assert x.mean(0).abs().max() < 0.02 and (x.std(0) - 0.5).abs().max() < 0.02   # the toy distribution: mean ~0, std ~0.5
    with pytest.raises(ValueError, match='classes'):
        toy.gt('C')

@pytest.mark.parametrize('sigma', [0.0, 0.05, 0.5])
def test_gt_logp_and_score_match_reference(gt64, sigma):
    x = gt64.sample(300, sigma=max(sigma, 0.02), generator=torch.Generator().manual_seed(1))
    logp_ref, score_ref = reference_logp_and_score(gt64, x, sigma)
    # The eigendecomposition is stored in float32, hence ~1e-6 relative agreement.
    assert torch.allclose(gt64.logp(x, sigma), logp_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gt64.score(x, sigma), score_ref, rtol=1e-4, atol=1e-4 * score_ref.abs().max().item())
    assert torch.allclose(toy.gt('A').logp(x.float(), sigma).double(), logp_ref, rtol=1e-4, atol=1e-3)   # float32 path

@pytest.mark.parametrize('classes', ['A', 'AB'])
def test_gt_density_integrates_to_one(classes):
    sigma, h = 0.1, 0.025                        # grid step well below the smallest std (sigma)
    xs = torch.arange(-2.5, 2.5, h)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing='xy'), -1)
    assert abs(toy.gt(classes).pdf(grid, sigma).double().sum().item() * h * h - 1) < 2e-3

@pytest.mark.parametrize('sigma', [0.01, 0.2])
def test_gt_score_matches_finite_difference(gt64, sigma):
    x = gt64.sample(64, sigma=sigma, generator=torch.Generator().manual_seed(2))
    h = 1e-6 * max(sigma, 0.01)
    fd = torch.stack([(gt64.logp(x + h * e, sigma) - gt64.logp(x - h * e, sigma)) / (2 * h)
                      for e in torch.eye(2, dtype=torch.float64)], -1)
    score = gt64.score(x, sigma)
    assert torch.allclose(score, fd, rtol=1e-5, atol=1e-5 * score.abs().max().item())

def test_gt_sample_moments_match_mixture():
    gm, sigma = toy.gt('A'), 0.3
    x = gm.sample(200000, sigma, generator=torch.Generator().manual_seed(3)).double()
    phi, mu, cov = gm.phi.double(), gm.mu.double(), gm.Sigma.double() + sigma ** 2 * torch.eye(2, dtype=torch.float64)
    mean = (phi[:, None] * mu).sum(0)
    second = (phi[:, None, None] * (cov + mu[:, :, None] * mu[:, None, :])).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=5e-3)
    assert torch.allclose(torch.cov(x.T), second - torch.outer(mean, mean), atol=5e-3)

#----------------------------------------------------------------------------
# Model.

def test_toy_model_layout_and_zero_gain_score():
    net = toy.ToyModel()
    keys = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert keys == {'layers.0.weight': (64, 4), 'layers.2.weight': (64, 64), 'layers.4.weight': (64, 64),
                    'layers.6.weight': (64, 64), 'layers.8.weight': (64, 64), 'gain': ()}
    x, sigma = torch.randn(10, 2), torch.rand(10) + 0.1
    # gain = 0: G = -||x*||^2 / 2, hence score = -x / (sigma_data^2 + sigma^2).
    assert torch.allclose(net.score(x, sigma), -x / (0.25 + sigma[:, None] ** 2), atol=1e-6)
    with torch.no_grad():
        net.gain.fill_(0.7)
    y = net.layers(torch.cat([x / (0.25 + sigma[:, None] ** 2).sqrt(), sigma[:, None].log() / 4, torch.ones(10, 1)], -1))
    expected = y.square().mean(-1) * 0.7 / sigma - 0.5 * (x ** 2 / (0.25 + sigma[:, None] ** 2)).sum(-1)
    assert torch.allclose(net.logp(x, sigma), expected, atol=1e-5)

def test_mplinear_forced_weight_normalisation():
    layer = toy.MPLinear(3, 5)
    with torch.no_grad():
        layer.weight.mul_(7)
    stored = layer.weight.detach().clone()
    x = torch.randn(4, 3)
    y_eval = layer.eval()(x)
    assert torch.equal(layer.weight, stored)                                                # untouched in eval
    y_train = layer.train()(x)
    assert torch.allclose(layer.weight.square().mean(1), torch.ones(5), atol=1e-3)        # unit RMS rows stored
    assert torch.allclose(y_eval, y_train, rtol=1e-3, atol=1e-5)                                    # output scale-invariant

#----------------------------------------------------------------------------
# Training.

def test_short_training_lowers_loss():
    def loss_of(model):
        torch.manual_seed(123)
        return toy.score_matching_loss(model, toy.gt('A'), 2048).item()
    torch.manual_seed(0)
    initial = loss_of(toy.ToyModel(num_layers=2, hidden_dim=16))
    ema = toy.do_train(num_layers=2, hidden_dim=16, batch_size=512, total_iter=40, viz_iter=None, device='cpu', progress=False)
    assert loss_of(ema) < 0.8 * initial          # measured: 0.236 -> 0.166

def test_training_writes_snapshots_and_is_deterministic(tmp_path):
    kwargs = dict(num_layers=1, hidden_dim=8, batch_size=64, total_iter=4, pkl_iter=2, viz_iter=None, device='cpu', progress=False)
    a = toy.do_train(pkl_pattern=str(tmp_path / 'run' / 'iter%04d.pkl'), **kwargs)
    b = toy.do_train(**kwargs)
    assert sorted(os.listdir(tmp_path / 'run')) == ['iter0002.pkl', 'iter0004.pkl']
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    last = toy.load_toy_net(str(tmp_path / 'run' / 'iter0004.pkl'), 'cpu')
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), last.state_dict().values()))

def test_training_saves_the_final_model_when_iters_is_not_a_multiple(tmp_path):
    kwargs = dict(num_layers=1, hidden_dim=8, batch_size=32, pkl_iter=4, viz_iter=None, device='cpu', progress=False)
    net = toy.do_train(total_iter=6, pkl_pattern=str(tmp_path / 'a' / 'iter%04d.pkl'), **kwargs)
    assert sorted(os.listdir(tmp_path / 'a')) == ['iter0004.pkl', 'iter0006.pkl']
    last = toy.load_toy_net(str(tmp_path / 'a' / 'iter0006.pkl'), 'cpu')
    assert all(torch.equal(p, q) for p, q in zip(net.state_dict().values(), last.state_dict().values()))
    toy.do_train(total_iter=3, pkl_pattern=str(tmp_path / 'b' / 'iter%04d.pkl'), **kwargs)   # fewer than pkl_iter
    assert os.listdir(tmp_path / 'b') == ['iter0003.pkl']

def test_learning_rate_and_ema_schedule():
    assert toy.learning_rate(0, 1e-2, 512) == 1e-2 and toy.learning_rate(2048, 1e-2, 512) == pytest.approx(5e-3)
    betas = toy.ema_betas(0.010, 4)
    assert betas[0] == 0 and 0 < betas[1] < betas[2] < betas[3] < 1

#----------------------------------------------------------------------------
# Persistence.

def test_pickle_roundtrip_safe_and_trusted(tmp_path):
    torch.manual_seed(5)
    net = toy.ToyModel(hidden_dim=8).eval()
    with torch.no_grad():
        net.gain.fill_(0.3)
    path = str(tmp_path / 'm.pkl')
    toy.save_snapshot(net, path)
    x, sigma = torch.randn(16, 2), torch.rand(16) + 0.05
    safe = persistence.load_pickle(path)
    assert type(safe) is toy.ToyModel and persistence.is_persistent(safe)
    trusted = persistence.load_pickle(path, trust=True)                 # official plain pickle.load
    for other in (safe, trusted):
        assert torch.equal(other.logp(x, sigma), net.logp(x, sigma))
        assert torch.equal(other.score(x, sigma), net.score(x, sigma))

def test_embedded_source_imports_only_official_environment():
    problems = persistence.check_module_src_imports(toy.ToyModel._orig_module_src, include_functions=False)
    assert problems == []

#----------------------------------------------------------------------------
# Sampling and measurements.

def test_sampler_maps_noise_to_gaussian_and_guidance_sharpens():
    s = 0.3
    narrow = toy.GaussianMixture([1.0], [[0.0, 0.0]], [np.eye(2) * s ** 2])
    wide = toy.GaussianMixture([1.0], [[0.0, 0.0]], [np.eye(2) * (2 * s) ** 2])
    x_init = narrow.sample(20000, 5, generator=torch.Generator().manual_seed(0))
    final = toy.do_sample(narrow, x_init)[-1]
    assert abs(final.std().item() - s) < 0.01
    traj = toy.do_sample(narrow, x_init, guidance=2, gnet=narrow, num_steps=8)
    assert traj.shape == (9, 20000, 2) and torch.allclose(traj[-1], toy.do_sample(narrow, x_init, num_steps=8)[-1], atol=1e-5)
    # Guiding with a wider version extrapolates the score towards a narrower Gaussian.
    assert toy.do_sample(narrow, x_init, guidance=2, gnet=wide)[-1].std().item() < 0.9 * s

def test_sample_stats_ground_truth_vs_noise():
    gm = toy.gt('A')
    good = toy.sample_stats(gm.sample(16384, generator=torch.Generator().manual_seed(4)))
    assert good['in_support'] > 0.9 and good['branches'] == good['num_branches'] == 127 and good['far_off'] < 0.01
    assert good['tips'] == good['num_tips'] == 64 and np.bincount(toy.branch_depths()).tolist() == [2 ** d for d in range(7)]
    bad = toy.sample_stats(torch.randn(4096, 2) * 0.05 + torch.tensor([-0.8, -0.8]))   # class-B region
    assert bad['in_support'] < 0.01 and bad['branches'] <= 2 and bad['mean_logp'] < good['mean_logp'] - 10
    assert bad['far_off'] == 1.0  # every sample of the class-B region is far off the class-A tree
    table = toy.format_stats_table([('gt', good), ('bad', bad)])
    assert '127 / 127' in table and '64 / 64' in table and len(table.splitlines()) == 3

def test_coverage_rule_and_floored_mean_on_points_placed_on_branches():
    """Points at the middle component of each branch, in proportion to its ground-truth share; one tip
    left empty and one given a single point, below 10% of its share of all samples; two points far off."""
    gm, shares = toy.gt('A'), toy.branch_shares()
    assert abs(shares.sum() - 1) < 1e-6 and np.all(shares > 0)
    counts = np.round(shares * 12000).astype(int)
    tips = np.flatnonzero(toy.branch_depths() == 6)
    counts[tips[0]], counts[tips[1]] = 0, 1
    others = np.delete(np.arange(toy.BRANCHES_PER_CLASS), tips[:2])
    num_samples = counts.sum() + 2
    assert 1 < 0.1 * shares[tips[1]] * num_samples and np.all(counts[others] > 0.5 * shares[others] * num_samples)
    on_tree = gm.mu[np.repeat(np.arange(toy.BRANCHES_PER_CLASS) * toy.COMPONENTS_PER_BRANCH + 3, counts)]
    far = torch.tensor([[3.0, -3.0], [-2.5, 2.0]])
    stats = toy.sample_stats(torch.cat([on_tree, far]))
    assert np.array_equal(toy.branch_counts(on_tree), counts)   # each point lands on its own branch
    assert stats['in_support'] == pytest.approx(counts.sum() / num_samples, abs=1e-6)
    assert (stats['branches'], stats['tips']) == (126, 63)
    assert (stats['branches_covered'], stats['tips_covered']) == (125, 62)
    assert gm.logp(far).max() < toy.LOGP_FLOOR
    expected = (gm.logp(on_tree).double().sum().item() + 2 * toy.LOGP_FLOOR) / num_samples
    assert abs(stats['mean_logp_floored'] - expected) < 1e-4
    assert stats['mean_logp'] < expected - 0.01                  # the unfloored mean is pulled down by the two
    # The threshold itself: exactly 10% of a branch's share of the samples is enough, one sample less is not.
    at_threshold = np.ceil(0.1 * shares * 50000).astype(int)
    assert len(toy.covered_branches(at_threshold, 50000)) == 127
    at_threshold[5] -= 1
    assert 5 not in toy.covered_branches(at_threshold, 50000) and len(toy.covered_branches(at_threshold, 50000)) == 126

#----------------------------------------------------------------------------
# Command line.

def test_cli_plot_saves_png_and_prints_table(trained_pair, tmp_path):
    out = tmp_path / 'figs' / 'toy.png'
    result = CliRunner().invoke(toy_example.cmdline, [
        'plot', '--net', trained_pair['net'], '--gnet', trained_pair['gnet'], '--cfg-gnet', trained_pair['gnet'],
        '--save', str(out), '--grid', '24', '--samples-scale', '0.02', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert [f for f in os.listdir(out.parent)] == ['toy.png']            # no temp files left behind
    for label in ['Ground truth', 'no guidance', 'guide (w=3)', 'CFG guide (w=3)', '/ 127']:
        assert label in result.output
    assert 'Done.' in result.output

def test_cli_demo_resumes_from_snapshots(tmp_path):
    args = ['demo', '--outdir', str(tmp_path), '--main-iter', '3', '--guide-iter', '2', '--device', 'cpu',
            '--grid', '16', '--samples-scale', '0.01']
    first = CliRunner().invoke(toy_example.cmdline, args)
    assert first.exit_code == 0, first.output
    assert (tmp_path / 'toy-example.png').is_file() and (tmp_path / 'clsAB-layers04-dim32' / 'iter0002.pkl').is_file()
    second = CliRunner().invoke(toy_example.cmdline, args)
    assert second.exit_code == 0 and second.output.count('Reusing') == 3

@pytest.mark.parametrize('content', [None, b'not a pickle at all'])
def test_cli_plot_bad_net_is_one_clear_error(tmp_path, content, trained_pair):
    bad = tmp_path / 'bad.pkl'
    if content is not None:
        bad.write_bytes(content)
    result = CliRunner().invoke(toy_example.cmdline, ['plot', '--net', str(bad), '--gnet', trained_pair['gnet'],
                                                      '--save', str(tmp_path / 'x.png')])
    assert result.exit_code != 0 and not (tmp_path / 'x.png').exists()
    error = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(error) == 1 and '--net' in error[0] and 'bad.pkl' in error[0]

def test_cli_refuses_torchrun(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    result = CliRunner().invoke(toy_example.cmdline, ['train', '--viz', 'False', '--iters', '1'])
    assert result.exit_code == 1 and 'Distributed execution is not supported (WORLD_SIZE=2)' in result.output
    assert 'toy_example.py runs as a single process' in result.output

def test_cli_single_process_world_size_with_spaces_is_accepted(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', ' 1')  # one process for torch_utils.distributed.init() too
    result = CliRunner().invoke(toy_example.cmdline, ['train', '--viz', 'False', '--iters', '1', '--batch', '8',
                                                      '--layers', '1', '--dim', '8', '--device', 'cpu'])
    assert result.exit_code == 0 and 'Done.' in result.output, result.output

def test_training_viz_without_display_warns_and_trains():
    with pytest.warns(UserWarning, match='visualisation disabled'):
        net = toy.do_train(num_layers=1, hidden_dim=8, batch_size=32, total_iter=2, viz_iter=1, device='cpu', progress=False)
    # The same training as without visualisation, and really trained (not the initial weights).
    plain = toy.do_train(num_layers=1, hidden_dim=8, batch_size=32, total_iter=2, viz_iter=None, device='cpu',
                         progress=False)
    torch.manual_seed(0)
    initial = toy.ToyModel(num_layers=1, hidden_dim=8)
    for name, value in net.state_dict().items():
        assert torch.equal(value, plain.state_dict()[name]), name
        assert not torch.equal(value, initial.state_dict()[name]), name

@pytest.mark.parametrize('command', [['train', '--viz', 'False', '--iters', '1'], ['plot', '--save', 'x.png'], ['demo']])
@pytest.mark.parametrize('device', ['bogus', 'cuda:99'])
def test_cli_bad_device_is_refused_at_parse_time(tmp_path, monkeypatch, command, device):
    monkeypatch.chdir(tmp_path)   # nothing may be written (e.g. demo's default toy-demo/)
    result = CliRunner().invoke(toy_example.cmdline, [*command, '--device', device], catch_exceptions=False)
    assert result.exit_code == 2 and '--device' in result.output and 'Traceback' not in result.output
    assert os.listdir(tmp_path) == []

def test_cli_plot_unsupported_save_format_fails_before_loading(tmp_path):
    # --net does not exist: if the models were loaded first, the error would name --net instead.
    result = CliRunner().invoke(toy_example.cmdline, ['plot', '--net', str(tmp_path / 'missing.pkl'),
                                                      '--save', str(tmp_path / 'fig.xyz')])
    error = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert result.exit_code == 1 and len(error) == 1, result.output
    assert '--save' in error[0] and '.xyz' in error[0] and 'png' in error[0] and 'Loading' not in result.output
    assert os.listdir(tmp_path) == []
    assert toy.figure_format('a/b.PDF') == 'pdf' and toy.figure_format('noext') == 'png'


@pytest.mark.reliability
def test_toy_figure_full_disk(tmp_path, full_disk):
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(1, 1))
    path = str(tmp_path / 'toy.png')
    try:
        faults.check_previous_kept(path, lambda: toy.save_figure(fig, path), full_disk)
    finally:
        plt.close(fig)
