"""training/cli/options.py: the shared --device type (over torch_utils.misc.check_device)."""

import click
import pytest
import torch
from click.testing import CliRunner

from torch_utils.misc import check_device
from training.cli.options import DEVICE, DeviceType


@click.command()
@click.option('--device', type=DEVICE, default=None)
def _show(device):
    click.echo(repr(device))


def _run(*args):
    return CliRunner().invoke(_show, list(args))


def test_valid_device_passes_through_as_string():
    assert _run('--device=cpu').output.strip() == "'cpu'"
    assert _run().output.strip() == 'None'


@pytest.mark.parametrize('value, message', [
    ('bogus', 'is not a torch device'),
    ('meta', 'meta device computes nothing'),
])
def test_bad_device_is_a_usage_error_naming_the_option(value, message):
    result = _run(f'--device={value}')
    assert result.exit_code == 2
    assert '--device' in result.output and message in result.output
    assert 'Traceback' not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message on a machine without CUDA')
def test_cuda_without_cuda_is_refused():
    result = _run('--device=cuda')
    assert result.exit_code == 2 and 'CUDA is not available' in result.output


def test_meta_allowed_when_asked():
    assert check_device('meta', allow_meta=True) == torch.device('meta')
    assert DeviceType(allow_meta=True).convert('meta', None, None) == 'meta'
