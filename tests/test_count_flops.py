"""Tests of training/evaluation/count_flops.py and the count_flops.py CLI."""

import os
import re

import pytest
import torch
from click.testing import CliRunner

import count_flops as cli
from tests import faults
from tests.tiny import make_tiny_precond, write_tiny_snapshot
from training.evaluation import count_flops as flops
from training.loop import presets

#----------------------------------------------------------------------------
# Counting rules, one operator kind at a time.

class _Lambda(torch.nn.Module):
    def __init__(self, fn, *modules):
        super().__init__()
        self.fn = fn
        self.mods = torch.nn.ModuleList(modules)

    def forward(self, *args):
        return self.fn(self, *args)

def _count(fn, *inputs, modules=()):
    return flops.count_flops(_Lambda(fn, *modules), net_args=inputs, verbose=False)

def _costly(result):
    """Per-op flops without the zero-cost 'Other' row (views, reshapes, copies)."""
    return {op: n for op, n in result['op_flops'].items() if op != 'Other'}

def test_convolution_counts_multiply_accumulates():
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)
    r = _count(lambda m, x: m.mods[0](x), torch.zeros([2, 3, 8, 8]), modules=[conv])
    assert r['op_flops'] == {'aten::_convolution': 2 * 5 * 8 * 8 * (3 * 3 * 3)}
    assert r['op_count'] == {'aten::_convolution': 1}
    assert r['total_params'] == 5 * 3 * 3 * 3

def test_transposed_depthwise_convolution():
    w = torch.ones([4, 1, 2, 2])
    r = _count(lambda m, x: torch.nn.functional.conv_transpose2d(x, w, stride=2, groups=4), torch.zeros([1, 4, 3, 3]))
    assert r['op_flops'] == {'aten::_convolution': 4 * 6 * 6 * 4}

def test_matrix_products():
    a, b = torch.zeros([2, 3, 4, 5]), torch.zeros([2, 3, 5, 6])
    assert _costly(_count(lambda m, x, y: x @ y, a, b)) == {'aten::matmul': 2 * 3 * 4 * 6 * 5}
    x, w = torch.zeros([7, 5]), torch.zeros([3, 5])
    assert _costly(_count(lambda m, x, w: x @ w.t(), x, w)) == {'aten::matmul': 7 * 3 * 5}
    lin = torch.nn.Linear(5, 3)  # with bias: addmm, (K + 1) per output
    r = _count(lambda m, x: m.mods[0](x), x, modules=[lin])
    assert _costly(r) == {'aten::addmm': 7 * 3 * 6} and r['total_params'] == 18
    q, k = torch.zeros([2, 3, 4, 5]), torch.zeros([2, 3, 4, 7])  # the attention einsum of networks_edm2
    assert _costly(_count(lambda m, q, k: torch.einsum('nhcq,nhck->nhqk', q, k), q, k)) == {'aten::matmul': 2 * 3 * 5 * 7 * 4}

@pytest.mark.parametrize('fn, per_element, label', [
    (lambda m, x: x * 2, 1, 'aten::mul'),
    (lambda m, x: x.square(), 1, 'aten::pow'),
    (lambda m, x: torch.nn.functional.silu(x), 3, 'aten::silu'),
    (lambda m, x: x.softmax(dim=1), 3, 'aten::softmax'),
    (lambda m, x: x.sigmoid(), 3, 'aten::sigmoid'),
    (lambda m, x: x.lerp(x, 0.3), 2, 'aten::lerp'),
    (lambda m, x: x.clamp(-1, 1), 2, 'aten::clamp'),
    (lambda m, x: torch.nn.functional.gelu(x), 14, 'aten::gelu'),
    (lambda m, x: torch.nn.functional.group_norm(x, 2), 4, 'aten::group_norm'),
])
def test_elementwise_costs(fn, per_element, label):
    r = _count(fn, torch.zeros([2, 4, 3, 3]))
    assert r['op_flops'] == {label: per_element * 2 * 4 * 3 * 3}

def test_reductions_count_their_input_and_free_ops_go_to_other():
    x = torch.zeros([2, 4, 3, 3])
    r = _count(lambda m, x: torch.linalg.vector_norm(x, dim=[1, 2, 3], keepdim=True), x)
    assert r['op_flops'] == {'aten::linalg_vector_norm': 72}
    r = _count(lambda m, x: torch.cat([x.reshape(2, -1).t(), torch.ones_like(x).flatten(1).t()]), x)
    assert r['total_flops'] == 0 and r['op_flops'] == {'Other': 0} and r['op_count']['Other'] >= 4

def test_unknown_ops_are_reported_and_skipped(capsys):
    x = torch.zeros([3, 4])
    r = flops.count_flops(_Lambda(lambda m, x: torch.cumsum(x, 0) * 2), net_args=(x,))
    assert r['op_flops'] == {'aten::mul': 12} and 'cumsum' in r['unknown_ops']
    assert 'Unknown op skipped: aten::cumsum' in capsys.readouterr().out

def test_fused_attention_counted_as_explicit_formula():
    q = torch.zeros([1, 2, 6, 4])  # [batch, heads, tokens, head width]
    r = _count(lambda m, q: torch.nn.functional.scaled_dot_product_attention(q, q, q), q)
    scores = 1 * 2 * 6 * 6
    assert _costly(r) == {'aten::matmul': 2 * scores * 4, 'aten::mul': scores, 'aten::softmax': 3 * scores}

def test_memory_estimate_tracks_live_intermediates():
    x = torch.zeros([1, 1000])
    r = _count(lambda m, x: (x * 2) * 3, x)  # peak: x*2 and its product alive together
    assert r['mem_per_sample'] == 2 * 4000

#----------------------------------------------------------------------------
# Whole networks.

# EDM2 paper, Table 2: Gflops per sample of the img512 models (64x64x4 latents).
@pytest.mark.parametrize('name, paper_gflops', [('edm2-img512-xs', 46), ('edm2-img512-s', 102), ('edm2-img512-xxl', 552)])
def test_preset_gflops_match_paper(name, paper_gflops):
    net = presets.construct_network_for_preset(name)
    r = flops.count_flops(net, verbose=False)
    assert r['total_flops'] / 1e9 == pytest.approx(paper_gflops, rel=0.02)
    assert r['op_flops']['aten::_convolution'] > 0.97 * r['total_flops']
    assert not r['unknown_ops']
    assert r['mem_per_sample'] > 0

def test_count_is_device_independent_and_uses_plain_path():
    net = make_tiny_precond(label_dim=4)
    fast_before = dict(net.fast)
    on_cpu = flops.count_flops(net, verbose=False)
    assert dict(net.fast) == fast_before  # fast-path switches restored
    net.set_fast(False)
    plain = flops.count_flops(net, verbose=False)
    on_meta = flops.count_flops(net.to('meta'), verbose=False)
    costly_counts = lambda r: {op: n for op, n in r['op_count'].items() if op != 'Other'}
    for r in (plain, on_meta):
        assert (r['op_flops'], costly_counts(r), r['total_params']) == (on_cpu['op_flops'], costly_counts(on_cpu), on_cpu['total_params'])
    assert on_cpu['total_params'] == sum(p.numel() for p in make_tiny_precond(label_dim=4).parameters())

def test_report_format():
    result = dict(total_params=124_713_253, total_flops=45_500_000_000, mem_per_sample=3 << 28,
        op_count={'aten::_convolution': 129, 'Other': 678, 'aten::mul': 241},
        op_flops={'aten::_convolution': 44_570_000_000, 'Other': 0, 'aten::mul': 140_000_000})
    assert flops.format_flops(result).split('\n') == [
        '',
        'Parameters  124.71  M',
        'Compute     45.50   Gflops/sample',
        'GPU memory  0.75    GB/sample',
        '',
        'Op                        Count  Gflops',
        'aten::_convolution        129    44.57',
        'aten::mul                 241    0.14',
        'Other                     678    0.00',
        'Total                     1048   45.50',
        '',
    ]

def test_report_of_a_small_network_keeps_significant_digits():
    # Issue #15, 12: a small network's ops printed 0.00 each.
    result = dict(total_params=1_234, total_flops=56_700, mem_per_sample=3 << 10,
                  op_count={'aten::_convolution': 4, 'aten::mul': 9, 'Other': 7},
                  op_flops={'aten::_convolution': 56_000, 'aten::mul': 700, 'Other': 0})
    lines = flops.format_flops(result).split('\n')
    assert lines[1:3] == ['Parameters  0.00123 M', 'Compute     0.0000567Gflops/sample']
    assert lines[6:10] == ['aten::_convolution        4      0.0000560', 'aten::mul                 9      0.000000700',
                           'Other                     7      0.00', 'Total                     20     0.0000567']
    assert [flops.figure(v) for v in (45.5, 0.14, 0.0999, 0)] == ['45.50', '0.14', '0.0999', '0.00']


#----------------------------------------------------------------------------
# Command line.

def test_cli_counts_a_snapshot_pickle(tmp_path):
    path = str(tmp_path / 'network-snapshot-0000000-0.100.pkl')
    data = write_tiny_snapshot(path)
    result = CliRunner().invoke(cli.cmdline, [path], env={'WORLD_SIZE': '1'})
    assert result.exit_code == 0, result.output
    assert f'Loading network from {path} ...' in result.output
    params = sum(p.numel() for p in data.ema.parameters())
    assert f'Parameters  {flops.figure(params / 1e6):<8s}M' in result.output
    reference = flops.count_flops(make_tiny_precond(), verbose=False)
    assert re.search(rf'^Total +\d+ +{flops.figure(reference["total_flops"] / 1e9)}$', result.output, re.M)

def test_cli_counts_a_preset():
    result = CliRunner().invoke(cli.cmdline, ['--preset=edm2-img512-xs', '--device=meta'])
    assert result.exit_code == 0, result.output
    assert 'Parameters  124.71  M' in result.output
    assert re.search(r'^Compute     45\.\d\d +Gflops/sample$', result.output, re.M)

def test_cli_counts_an_edm1_preset():
    result = CliRunner().invoke(cli.cmdline, ['--preset=edm-cifar10-32x32-cond-vp', '--device=meta'])
    assert result.exit_code == 0, result.output
    assert 'Parameters  55.74   M' in result.output  # 55,735,299 (tests/training/test_networks.py)
    assert re.search(r'^Compute     21\.\d\d +Gflops/sample$', result.output, re.M)

@pytest.mark.parametrize('precond, arch', [('VPPrecond', 'ddpmpp'), ('VEPrecond', 'ncsnpp'), ('iDDPMPrecond', 'adm'),
                                           ('EDMPrecond', 'adm')])
def test_cli_counts_an_edm1_snapshot(tmp_path, precond, arch):
    from tests.tiny_edm1 import make_tiny_edm1, write_edm1_snapshot
    net = make_tiny_edm1(precond, arch)
    write_edm1_snapshot(str(tmp_path / 'edm1.pkl'), net)
    result = CliRunner().invoke(cli.cmdline, [str(tmp_path / 'edm1.pkl'), '--device=cpu'])
    assert result.exit_code == 0 and 'Unknown op' not in result.output, result.output
    assert f'Parameters  {flops.figure(sum(p.numel() for p in net.parameters()) / 1e6):<8s}M' in result.output
    reference = flops.count_flops(net, verbose=False)
    assert reference['total_flops'] > 0 and not reference['unknown_ops']
    assert re.search(rf'^Total +\d+ +{flops.figure(reference["total_flops"] / 1e9)}$', result.output, re.M)

@pytest.mark.parametrize('args, env, message', [
    (['--preset=edm2-img512-xs'], {'WORLD_SIZE': '2'}, 'Distributed execution is not supported'),
    (['--preset=edm2-img512-xs'], {'WORLD_SIZE': 'x'}, 'WORLD_SIZE="x" is not an integer'),
    ([], {}, 'Give exactly one of PKL|URL or --preset'),
    (['--preset=nope'], {}, 'Invalid configuration preset "nope"; valid presets: edm2-img512-xxs'),
    (['--preset=nope'], {}, 'edm2-cifar10-32x32-cond, edm-cifar10-32x32-cond-vp'),
    (['--preset=base-finetuning'], {}, '--model2finetune'),
    (['--preset=edm2-img512-xs', '--device=gpu0'], {}, 'is not a torch device'),
])
def test_cli_usage_errors(args, env, message):
    result = CliRunner().invoke(cli.cmdline, args, env=env)
    assert result.exit_code != 0 and message in result.output

def test_cli_bad_pickles_give_one_line_errors(tmp_path):
    truncated = tmp_path / 'truncated.pkl'
    write_tiny_snapshot(str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:100])
    no_ema = tmp_path / 'no-ema.pkl'
    write_tiny_snapshot(str(no_ema), ema=None)
    for path in (truncated, no_ema, tmp_path / 'missing.pkl'):
        result = CliRunner().invoke(cli.cmdline, [str(path)])
        assert result.exit_code == 1, result.output
        error_lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
        assert len(error_lines) == 1 and str(path) in error_lines[0]

#----------------------------------------------------------------------------

def test_cli_refuses_a_pickle_whose_ema_is_not_an_image_network(tmp_path):
    path = tmp_path / 'mlp.pkl'
    write_tiny_snapshot(str(path), ema=torch.nn.Linear(2, 2))
    result = CliRunner().invoke(cli.cmdline, [str(path)])
    assert result.exit_code == 1 and 'not an image network' in result.output


@pytest.mark.reliability
def test_count_flops_refuses_hostile_pickle(tmp_path):
    files = faults.write_bad_pickles(tmp_path)
    faults.assert_one_line_refusal(faults.run_script('count_flops.py', files['hostile']), files['hostile'])
    assert not os.path.exists(files['marker'])
