"""docs/flags.md, the flag reference generated from the parser."""
from __future__ import annotations

import argparse

from tools import flag_reference


def test_flag_reference_page_is_current():
    """docs/flags.md is generated from the parsers: a changed flag, default or help text must show in its diff."""
    assert flag_reference.PAGE.read_text() == flag_reference.page(), \
        'docs/flags.md is out of date: python -m tools.flag_reference --write'


def test_flag_reference_renders_each_kind_of_flag():
    p = argparse.ArgumentParser(prog='prog', description='what it does')
    g = p.add_argument_group('things').add_argument
    g('--ratio', '-r', type=float, default=0.5, help='a | b')
    g('--mode', choices=('a', 'b'), default='a', help='which')
    g('--backend', nargs='?', const='inductor', default=None, metavar='NAME', help='compile')
    g('--ema', action=argparse.BooleanOptionalAction, default=True, help='keep an EMA')
    g('--sizes', type=int, nargs='+', default=[1, 2], help='')
    g('--dst', required=True, help='where')
    rows = [line for line in flag_reference.reference(p).splitlines() if line.startswith('| `')]
    assert rows == [
        "| `--ratio`, `-r` | `0.5` | float | a \\| b (`ratio`) |",
        "| `--mode` | `'a'` | {a, b} | which (`mode`) |",
        "| `--backend` | `None` | str as `NAME`, optional value (bare flag: `'inductor'`) | compile (`backend`) |",
        "| `--ema`, `--no-ema` | `True` | switch | keep an EMA (`ema`) |",
        "| `--sizes` | `[1, 2]` | int, one or more | (`sizes`) |",
        "| `--dst` | required | str | where (`dst`) |",
    ]
    assert '## things' in flag_reference.reference(p) and 'what it does.' in flag_reference.reference(p)
