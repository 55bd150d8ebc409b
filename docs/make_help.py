"""Regenerate docs/*-help.txt from the scripts' --help output.

    python docs/make_help.py          # rewrite the files
    python docs/make_help.py --check  # exit 1 if any file is out of date (the tests do this)
"""

import importlib
import os
import sys

import click
import click.testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 100 # fixed, so the text does not depend on the terminal

# docs file stem -> script module (the first three are the official names)
HELP_FILES = {
    'train': 'train_edm2',
    'phema': 'reconstruct_phema',
    'toy': 'toy_example',
    'generate': 'generate_images',
    'metrics': 'calculate_metrics',
    'dataset': 'dataset_tool',
    'flops': 'count_flops',
    'score': 'score_dataset',
    'demo': 'demo',
}

def _find_command(module) -> click.Command:
    commands = [obj for obj in vars(module).values() if isinstance(obj, click.Command)]
    groups = [cmd for cmd in commands if isinstance(cmd, click.Group)]
    top = groups or commands
    if len(top) == 0:
        raise RuntimeError(f'{module.__name__}.py defines no click command')
    return max(top, key=lambda cmd: len(getattr(cmd, 'commands', {}))) # the group holding the subcommands

def _help_of(command: click.Command, args: list[str], prog: str) -> str:
    result = click.testing.CliRunner().invoke(command, args + ['--help'], prog_name=prog, terminal_width=WIDTH)
    if result.exit_code != 0:
        raise RuntimeError(f'{prog} {" ".join(args)} --help failed: {result.output}')
    return result.output

def render_help(script: str) -> str:
    """The help text of one script; for a click group, the group's help followed by each subcommand's."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    command = _find_command(importlib.import_module(script))
    prog = f'{script}.py'
    parts = [_help_of(command, [], prog)]
    for name in sorted(getattr(command, 'commands', {})):
        parts.append(f'\n{"=" * WIDTH}\n{prog} {name}\n{"=" * WIDTH}\n\n' + _help_of(command, [name], prog))
    return ''.join(parts)

def help_path(stem: str) -> str:
    return os.path.join(ROOT, 'docs', f'{stem}-help.txt')

def main(check: bool) -> int:
    stale = []
    for stem, script in HELP_FILES.items():
        text = render_help(script)
        path = help_path(stem)
        current = open(path, encoding='utf-8').read() if os.path.isfile(path) else None
        if current == text:
            continue
        stale.append(path)
        if not check:
            with open(path, 'w', encoding='utf-8') as f:
                f.write(text)
    for path in stale:
        print(f'{"out of date" if check else "updated"}: {os.path.relpath(path, ROOT)}')
    return 1 if (check and stale) else 0

if __name__ == '__main__':
    sys.exit(main(check='--check' in sys.argv[1:]))
