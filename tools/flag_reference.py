"""Every flag of ``deit.main`` and of the cache builder with its default, values and meaning (``docs/flags.md``).

    python -m tools.flag_reference            # print the reference
    python -m tools.flag_reference --write    # rewrite docs/flags.md

The parsers are the one home of the flags; this page is generated from them. It is committed because a changed
default changes results: the page's diff makes such a change visible in review, and a test fails while the page
is out of date.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from data import build_zip_cache
from deit.args import get_args_parser

PAGE = Path(__file__).resolve().parents[1] / 'docs' / 'flags.md'
HEADER = """# `deit.main` flags

Generated from the parser (`deit/args.py`) by `python -m tools.flag_reference --write`; do not edit by hand.
A recipe (`-c recipes/<name>.yaml`) replaces these defaults with its own, and flags on the command line replace
both. Which flags are timm's or DeiT's, and where a name means something else here:
[timm_and_deit_flags.md](timm_and_deit_flags.md).
"""
BUILDER_HEADER = """# `data.build_zip_cache` flags

Generated from its parser (`data/build_zip_cache.py`) by the same command. Building and checking the cache:
[data.md](data.md).
"""


def cell(text) -> str:
    """Markdown table cell: a pipe would end it."""
    return str(text).replace('|', '\\|')


def code(value) -> str:
    return f'`{value!r}`' if isinstance(value, str) else f'`{value}`'


def names(action: argparse.Action) -> str:
    return ', '.join(f'`{name}`' for name in action.option_strings)


def values(action: argparse.Action) -> str:
    """What the flag takes: a switch, a choice, or a type (with its count and metavar)."""
    if action.nargs == 0:
        return 'switch'
    if action.choices is not None:
        kind = '{' + ', '.join(map(str, action.choices)) + '}'
    else:
        kind = getattr(action.type, '__name__', 'str') if action.type is not None else 'str'
    if action.metavar is not None:
        kind += f' as `{action.metavar}`'
    count = {None: '', '?': ', optional value', '+': ', one or more', '*': ', any number'}.get(
        action.nargs, f', {action.nargs} values')
    optional = f' (bare flag: {code(action.const)})' if action.nargs == '?' else ''
    return kind + count + optional


def reference(parser: argparse.ArgumentParser, header: str = HEADER) -> str:
    usage = ' '.join(parser.format_usage().split()).removeprefix('usage: ')  # one line, as wide as it takes
    lines = [header, f'Usage: `{usage}`', '', f'{parser.description.strip().splitlines()[0].rstrip(".")}.', '']
    for group in parser._action_groups:  # argparse keeps its groups here; no public accessor exists
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        lines += [f'## {group.title}', '', '| flag | default | takes | meaning (dest) |', '|---|---|---|---|']
        for a in actions:
            meaning = f'{a.help or ""} (`{a.dest}`)'.lstrip()
            default = 'required' if a.required else cell(code(a.default))
            lines.append(f'| {names(a)} | {default} | {cell(values(a))} | {cell(meaning)} |')
        lines.append('')
    return '\n'.join(lines)


def page() -> str:
    return reference(get_args_parser()) + '\n' + reference(build_zip_cache.get_parser(), BUILDER_HEADER)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--write', action='store_true', help=f'rewrite {PAGE.relative_to(PAGE.parents[1])}')
    args = p.parse_args(argv)
    text = page()
    if args.write:
        PAGE.write_text(text)
        print(f'wrote {PAGE}')
    else:
        print(text, end='')


if __name__ == '__main__':
    main()
