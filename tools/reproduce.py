"""The catalogue of reproducible results (recipes/catalogue.yaml): each with its command, its data and the
number its source reports.

    python -m tools.reproduce --list                   # every entry: id, source row, reported numbers, data
    python -m tools.reproduce --list --ids             # the ids alone, one a line
    python -m tools.reproduce ID --dry-run             # the launcher's command and the resolved configuration
    python -m tools.reproduce ID --data-path PATH [--output-dir DIR] [-- deit.main flags]

A run goes through scripts/train_with_MaxSup.sh (NGPUS / NNODES as there), then prints each measured number
beside the reported one. Flags after ``--`` override the entry's (e.g. a shorter run: ``-- --epochs 1``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from data.cli import one_line_errors
from deit.recipes import as_recipe, parse_args

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / 'recipes' / 'catalogue.yaml'


def load_catalogue(path: Path = CATALOGUE) -> dict[str, dict]:
    """id -> entry; an entry without its fields or with a repeated id is named."""
    entries = (yaml.safe_load(path.read_text()) or {}).get('entries') or []
    out = {}
    for n, entry in enumerate(entries, 1):
        missing = {'id', 'source', 'row', 'reported', 'recipe', 'data'} - set(entry)
        if missing:
            raise ValueError(f'{path}: entry {n} ({entry.get("id", "no id")}) lacks {sorted(missing)}')
        if entry['id'] in out:
            raise ValueError(f'{path}: id {entry["id"]} is given twice')
        out[entry['id']] = entry
    return out


def trainer_argv(entry: dict, data_path: str | None, output_dir: str | None, extra: list[str]) -> list[str]:
    """deit.main's arguments for an entry: its recipe, its flags, the data and run folder (absolute: the
    launcher runs from the repository root), then ``extra``."""
    argv = ['-c', str(ROOT / entry['recipe']), *map(str, entry.get('flags', []))]
    argv += ['--data-path', str(Path(data_path).resolve())] if data_path else []
    argv += ['--output_dir', str(Path(output_dir).resolve())] if output_dir else []
    return argv + extra


def measured(record: dict, metric: str):
    """A reported metric from a log.txt record (``error``: 1 - top-1 / 100, the CIFAR-10-C table's unit)."""
    if metric == 'error':
        return None if record.get('test_acc1') is None else 1 - record['test_acc1'] / 100
    return record.get(metric)


def comparison(entry: dict, record: dict) -> list[str]:
    """One line per reported metric: measured vs reported."""
    lines = []
    for metric, value in entry['reported'].items():
        got = measured(record, metric)
        lines.append(f'  {metric:18s} measured {"-" if got is None else f"{got:.4g}":>8s}   reported {value:g}')
    return lines


def list_entries(entries: dict[str, dict]) -> None:
    for entry in entries.values():
        numbers = ', '.join(f'{k} {v:g}' for k, v in entry['reported'].items())
        print(f'{entry["id"]}\n  {entry["source"]}: {entry["row"]}\n  reported: {numbers}\n  data: {entry["data"]}\n'
              f'  command: python -m tools.reproduce {entry["id"]} --data-path PATH')


def run(entry: dict, argv: list[str], output_dir: str) -> int:
    """The entry through the usual launcher; then measured vs reported from its log."""
    code = subprocess.call(['bash', str(ROOT / 'scripts' / 'train_with_MaxSup.sh'), *argv], cwd=ROOT,
                           env={**os.environ, 'PYTHON': os.environ.get('PYTHON', sys.executable)})
    log = Path(output_dir) / 'log.txt'
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    evaluated = [r for r in records if 'test_acc1' in r]
    if evaluated:
        print(f'{entry["id"]} ({entry["source"]}: {entry["row"]}), epoch {evaluated[-1]["epoch"]}:')
        print('\n'.join(comparison(entry, evaluated[-1])))
    return code


@one_line_errors(ValueError, FileNotFoundError)
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('id', nargs='?')
    ap.add_argument('--list', action='store_true', help='every entry with its source, numbers and data')
    ap.add_argument('--ids', action='store_true', help='with --list: the ids alone')
    ap.add_argument('--dry-run', action='store_true', help="print the command and the resolved configuration")
    ap.add_argument('--data-path', default=None)
    ap.add_argument('--output-dir', default=None, help='default: output/reproduce/<id>')
    args = ap.parse_args(argv[:argv.index('--')] if '--' in argv else argv)
    entries = load_catalogue()
    if args.list and args.ids:
        print('\n'.join(entries))
    elif args.list:
        list_entries(entries)
    if args.list:
        return 0
    if args.id not in entries:
        raise ValueError(f'unknown id {args.id!r}: python -m tools.reproduce --list --ids lists them')
    entry = entries[args.id]
    output_dir = args.output_dir or f'output/reproduce/{args.id}'
    train = trainer_argv(entry, args.data_path, output_dir, extra)
    if args.dry_run:
        print('scripts/train_with_MaxSup.sh ' + shlex.join(train))
        print(yaml.safe_dump(as_recipe(parse_args(train)), sort_keys=True), end='')
        return 0
    return run(entry, train, output_dir)


if __name__ == '__main__':
    sys.exit(main())
