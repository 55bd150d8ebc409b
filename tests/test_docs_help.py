"""docs/*-help.txt must match the scripts' --help (regenerate with `python docs/make_help.py`)."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('make_help', os.path.join(ROOT, 'docs', 'make_help.py'))
make_help = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_help)


@pytest.mark.parametrize('stem', sorted(make_help.HELP_FILES))
def test_help_file_matches_cli(stem):
    path = make_help.help_path(stem)
    assert os.path.isfile(path), f'{path} missing: run python docs/make_help.py'
    expected = make_help.render_help(make_help.HELP_FILES[stem])
    with open(path, encoding='utf-8') as f:
        assert f.read() == expected, f'{path} is out of date: run python docs/make_help.py'
