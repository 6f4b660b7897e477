"""The project's floors, read from its source: data/ below deit/, deit/ below tools/, segmentation/ and
benchmarks/; no import circles and none hidden inside functions; no sys.path edits; short modules and
functions in the library floors."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.static

PACKAGES = ('data', 'deit', 'tools', 'segmentation', 'benchmarks')
LIBRARY = ('data', 'deit')  # the floors the rest builds on
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def _modules() -> dict[str, Path]:
    """Every project module by dotted name (mmseg configs are data read by mmengine, not modules)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob('*.py')):
            if 'configs' in path.relative_to(ROOT).parts:
                continue
            name = '.'.join(path.relative_to(ROOT).with_suffix('').parts)
            out[name.removesuffix('.__init__')] = path
    return out


def _project_module(name: str, modules: dict) -> str | None:
    """The project module an imported name lives in (``deit.losses.MaxSupLoss`` -> ``deit.losses``)."""
    while name and name not in modules:
        name = name.rpartition('.')[0]
    return name or None


def _imports(path: Path, modules: dict) -> list[tuple[str, int, bool]]:
    """(project module, line, inside a function) of every import of a project module in ``path``."""
    functions = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef,
                                                                                   ast.AsyncFunctionDef))]
    inner = {id(n) for f in functions for n in ast.walk(f)}
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
        else:
            continue
        found = {_project_module(n, modules) for n in names} - {None}
        out += [(m, node.lineno, id(node) in inner) for m in sorted(found)]
    return out


def _graph(modules: dict) -> dict[str, set[str]]:
    """Every project module -> the project modules it imports, at any depth."""
    return {m: {d for d, _, _ in _imports(p, modules) if d != m and not m.startswith(d + '.')}
            for m, p in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (the modules in order), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = 'open'
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 'open':
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 'done'
        stack.pop()
        return None
    return next((c for m in sorted(graph) if m not in state and (c := visit(m))), None)


def test_the_cycle_finder_finds_a_circle_and_only_one():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert _cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_data_is_the_floor_below_the_trainer():
    """data/ (IO, decoding, the ZIP cache, datasets' readers) imports nothing from deit/, tools/, segmentation/
    or benchmarks/, not even inside a function: the arrows point down only."""
    modules = _modules()
    wrong = [f'{p.relative_to(ROOT)}:{line} imports {m}' for name, p in modules.items() if name.startswith('data')
             for m, line, _ in _imports(p, modules) if not m.startswith('data')]
    assert not wrong, wrong


def test_no_import_circles_and_the_library_builds_on_nothing_above_it():
    modules = _modules()
    graph = _graph(modules)
    assert _cycle(graph) is None, f'import circle: {" -> ".join(_cycle(graph))}'
    upward = [f'{m} imports {d}' for m in graph if m.split('.')[0] == 'deit' for d in graph[m]
              if d.split('.')[0] not in LIBRARY]
    assert not upward, upward


def test_no_module_imports_another_inside_a_function():
    """A function-level import can hide a circle. benchmarks/ may: its child processes choose the image
    library through the environment before the pipeline is imported."""
    modules = _modules()
    hidden = [f'{p.relative_to(ROOT)}:{line} imports {m}' for name, p in modules.items()
              if not name.startswith('benchmarks') for m, line, inside in _imports(p, modules) if inside]
    assert not hidden, hidden


def test_no_sys_path_edits():
    """Modules are run as modules (``python -m segmentation.train``) from the repository root."""
    edits = [f'{p.relative_to(ROOT)}:{n.lineno}' for p in sorted(ROOT.glob('*/**/*.py'))
             if p.relative_to(ROOT).parts[0] in PACKAGES + ('tests',)
             for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Attribute)
             and n.attr in ('insert', 'append') and isinstance(n.value, ast.Attribute) and n.value.attr == 'path'
             and isinstance(n.value.value, ast.Name) and n.value.value.id == 'sys']
    assert not edits, edits


def test_library_modules_and_functions_are_short():
    modules = _modules()
    long_modules, long_functions = [], []
    for name, path in modules.items():
        if name.split('.')[0] not in LIBRARY:
            continue
        text = path.read_text()
        if text.count('\n') > MAX_MODULE_LINES:
            long_modules.append(f'{path.relative_to(ROOT)}: {text.count(chr(10))} lines')
        long_functions += [f'{path.relative_to(ROOT)}:{n.lineno} {n.name}: {n.end_lineno - n.lineno + 1} lines'
                           for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                           and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long_modules and not long_functions, long_modules + long_functions
