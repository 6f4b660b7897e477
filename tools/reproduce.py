"""The catalogue of reproducible results (recipes/catalogue.yaml): each with its command, its data and the
number its source reports.

    python -m tools.reproduce --list                   # every entry: id, source row, reported numbers, data
    python -m tools.reproduce --list --ids             # the ids alone, one a line
    python -m tools.reproduce ID --dry-run             # the launcher's command and the resolved configuration
    python -m tools.reproduce ID --data-path PATH [--output-dir DIR] [-- deit.main flags]
    python -m tools.reproduce ID --checkpoint CK --data-path PATH [-- tools.analyze flags]    # analysis entries
    python -m tools.reproduce ID --checkpoint maxsup=A ls=B --data-path PATH                  # figure entries

A run goes through scripts/train_with_MaxSup.sh (NGPUS / NNODES as there), then prints each measured number
beside the reported one. Flags after ``--`` override the entry's (e.g. a shorter run: ``-- --epochs 1``).
An analysis entry (feature metrics, linear transfer) trains its checkpoint the same way, then runs
``tools.analyze`` on it; with ``--checkpoint`` (e.g. a released one) it skips the training, and the flags after
``--`` go to the analysis. A figure entry draws the checkpoints it is given side by side. An entry whose
source number is not filed here runs the same and prints what it measured.
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
from tools import analyze

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / 'recipes' / 'catalogue.yaml'


def load_catalogue(path: Path = CATALOGUE) -> dict[str, dict]:
    """id -> entry; an entry without its fields or with a repeated id is named."""
    try:
        entries = (yaml.safe_load(path.read_text()) or {}).get('entries') or []
    except yaml.YAMLError as e:
        raise ValueError(f'{path}: not YAML: {" ".join(str(e).split())}') from None
    out = {}
    for n, entry in enumerate(entries, 1):
        missing = {'id', 'source', 'row', 'reported', 'recipe', 'data'} - set(entry)
        if missing:
            raise ValueError(f'{path}: entry {n} ({entry.get("id", "no id")}) lacks {sorted(missing)}')
        if not entry['reported'] and not entry.get('note'):
            raise ValueError(f'{path}: entry {n} ({entry["id"]}) reports no number and has no note saying why')
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


def analysis_record(command: str, result: dict) -> dict:
    """tools.analyze's JSON for one checkpoint as catalogue metrics: features -> d_within_<split>, r2_<split>;
    transfer -> transfer_acc1 (percent, as the README's table)."""
    (numbers,) = result.values()
    if command == 'features':
        return {f'{m}_{split}': numbers[split][m] for split in ('train', 'val') for m in ('d_within', 'r2')}
    return {'transfer_acc1': 100 * numbers['test_accuracy']}


def comparison(entry: dict, record: dict) -> list[str]:
    """One line per reported metric: measured vs reported (top-1 alone where the number is not filed)."""
    lines = []
    for metric, value in (entry['reported'] or {'test_acc1': None}).items():
        got = measured(record, metric)
        lines.append(f'  {metric:18s} measured {"-" if got is None else f"{got:.4g}":>8s}   reported '
                     f'{"not filed" if value is None else f"{value:g}"}')
    return lines


def list_entries(entries: dict[str, dict]) -> None:
    for entry in entries.values():
        numbers = ', '.join(f'{k} {v:g}' for k, v in entry['reported'].items()) or f'- ({entry["note"]})'
        command = f'python -m tools.reproduce {entry["id"]} --data-path PATH'
        if entry.get('figure'):
            command = f'python -m tools.reproduce {entry["id"]} --data-path PATH --checkpoint NAME=CK ...'
        elif 'analysis' in entry:
            command += f'  (or --checkpoint CK{" --transfer-data CIFAR" if entry["analysis"][0] == "transfer" else ""})'
        print(f'{entry["id"]}\n  {entry["source"]}: {entry["row"]}\n  reported: {numbers}\n  data: {entry["data"]}\n'
              f'  command: {command}')


def report(entry: dict, record: dict, where: str) -> None:
    print(f'{entry["id"]} ({entry["source"]}: {entry["row"]}), {where}:')
    print('\n'.join(comparison(entry, record)))


def train(entry: dict, argv: list[str], output_dir: str) -> tuple[int, dict | None]:
    """The entry through the usual launcher: its exit code and the last evaluated record of its log."""
    code = subprocess.call(['bash', str(ROOT / 'scripts' / 'train_with_MaxSup.sh'), *argv], cwd=ROOT,
                           env={**os.environ, 'PYTHON': os.environ.get('PYTHON', sys.executable)})
    log = Path(output_dir) / 'log.txt'
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    evaluated = [r for r in records if 'test_acc1' in r]
    return code, evaluated[-1] if evaluated else None


def run_analysis(entry: dict, checkpoints: list[str], data_path: str | None, transfer_data: str | None,
                 output_dir: str, extra: list[str]) -> int:
    """tools.analyze with the entry's command and flags; then measured vs reported (a figure: where it is)."""
    command, *flags = entry['analysis']
    named = [c if '=' in c else f'{entry["id"]}={c}' for c in checkpoints]
    argv = [command, *(a for c in named for a in ('--ckpt', c)), '--out', str(Path(output_dir) / 'analysis'), *flags]
    argv += ['--data-path', data_path] if data_path else []
    argv += ['--transfer-data', transfer_data] if transfer_data else []
    code = analyze.main(argv + extra)
    if code == 0 and entry.get('figure'):
        print(f'{entry["id"]} ({entry["source"]}): {Path(output_dir) / "analysis" / command}/ beside the source\'s '
              f'figure')
    elif code == 0:
        result = json.loads((Path(output_dir) / 'analysis' / command / f'{command}.json').read_text())
        report(entry, analysis_record(command, result), f'analysis of {checkpoints[0]}')
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
    ap.add_argument('--checkpoint', nargs='+', default=None, metavar='[NAME=]CK',
                    help='analysis entries: analyse this checkpoint (figures: one or more), no training')
    ap.add_argument('--transfer-data', default=None, help='transfer entries: the CIFAR-10 python archive')
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
    if args.checkpoint and 'analysis' not in entry:
        raise ValueError(f'{args.id} trains and evaluates; --checkpoint is for analysis entries (--list says which)')
    if entry.get('figure') and not (args.checkpoint or args.dry_run):
        raise ValueError(f'{args.id} draws the models of a figure side by side: give them with --checkpoint '
                         f'NAME=CK ... (e.g. maxsup=... ls=... baseline=...)')
    if args.checkpoint and len(args.checkpoint) > 1 and not entry.get('figure'):
        raise ValueError(f'{args.id} measures one model: give one --checkpoint')
    output_dir = args.output_dir or f'output/reproduce/{args.id}'
    argv = trainer_argv(entry, args.data_path, output_dir, [] if args.checkpoint else extra)
    if args.dry_run:
        print('scripts/train_with_MaxSup.sh ' + shlex.join(argv))
        print(yaml.safe_dump(as_recipe(parse_args(argv)), sort_keys=True), end='')
        if 'analysis' in entry:
            print('then: python -m tools.analyze ' + shlex.join(entry['analysis']))
        return 0
    if args.checkpoint:
        return run_analysis(entry, args.checkpoint, args.data_path, args.transfer_data, output_dir, extra)
    code, record = train(entry, argv, output_dir)
    if 'analysis' in entry:
        return code or run_analysis(entry, [str(Path(output_dir) / 'checkpoint.pth')], args.data_path,
                                    args.transfer_data, output_dir, [])
    if record is not None:
        report(entry, record, f'epoch {record["epoch"]}')
    return code


if __name__ == '__main__':
    sys.exit(main())
