"""The import layering the README's architecture section states, checked on the source tree:

* scripts (the root *.py files and the benchmarks in bench/) -> training -> torch_utils -> dnnlib, never upwards;
* no script imports another script, and library code never imports a script;
* no import cycles between the project's modules (imports inside functions included).
"""
import ast
import os

import pytest

from tests.procs import REPO

LAYERS = ('dnnlib', 'torch_utils', 'training')  # each may import itself and the layers before it


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-len('.py')].replace(os.sep, '.')
    return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def _python_files() -> list:
    files = [os.path.join(REPO, name) for name in os.listdir(REPO) if name.endswith('.py')]
    for package in (*LAYERS, 'bench'):
        for root, _dirs, names in os.walk(os.path.join(REPO, package)):
            files += [os.path.join(root, name) for name in names if name.endswith('.py')]
    return sorted(files)


SCRIPTS = {_module_name(path) for path in _python_files() if os.path.dirname(path) == REPO}
BENCHMARKS = {_module_name(path) for path in _python_files() if _module_name(path).startswith('bench.')}
MODULES = {_module_name(path) for path in _python_files()}


def _resolve(name: str) -> str:
    """The project module an imported dotted name refers to (the longest known prefix), or ''."""
    parts = name.split('.')
    for end in range(len(parts), 0, -1):
        candidate = '.'.join(parts[:end])
        if candidate in MODULES:
            return candidate
    return ''


def _imports(path: str) -> set:
    """Project modules imported anywhere in the file (top level or inside functions)."""
    module = _module_name(path)
    package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read(), path)):
        if isinstance(node, ast.Import):
            found.update(_resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            found.add(_resolve(base))
            found.update(_resolve(f'{base}.{alias.name}') for alias in node.names)
    return {name for name in found if name and name != module}


GRAPH = {_module_name(path): _imports(path) for path in _python_files()}


def _layer(module: str) -> str:
    return 'scripts' if module in SCRIPTS | BENCHMARKS else module.split('.')[0]


def test_the_tree_has_scripts_and_all_three_layers():
    assert {'train_edm2', 'generate_images', 'calculate_metrics', 'reconstruct_phema', 'dataset_tool'} <= SCRIPTS
    assert {_layer(module) for module in MODULES} == {'scripts', *LAYERS}


@pytest.mark.parametrize('module', sorted(SCRIPTS | BENCHMARKS))
def test_no_script_imports_another_script(module):
    assert GRAPH[module] & SCRIPTS == set()


@pytest.mark.parametrize('layer', LAYERS)
def test_library_imports_only_its_own_layer_and_those_below(layer):
    allowed = set(LAYERS[:LAYERS.index(layer) + 1])
    violations = {module: sorted(imported for imported in GRAPH[module] if _layer(imported) not in allowed)
                  for module in MODULES if _layer(module) == layer}
    assert {module: bad for module, bad in violations.items() if bad} == {}


def _find_cycle(graph: dict) -> list:
    """One import cycle as [a, b, ..., a], or [] (depth-first search with an explicit stack)."""
    state = {}  # module -> 'open' while on the current path, 'done' after
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 'open'
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 'done'
                stack.pop()
            elif state.get(child) == 'open':
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 'open'
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return []


def test_no_import_cycles():
    assert _find_cycle(GRAPH) == []


def test_cycle_finder_reports_a_cycle():
    assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert _find_cycle({'a': {'b'}, 'b': set()}) == []
