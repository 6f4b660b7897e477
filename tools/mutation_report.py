"""Mutation score per core module from mutmut's results (``mutants/**/*.meta``), as Markdown.

    make mutation                                    # runs mutmut, then this, into docs/mutation.md
    python -m tools.mutation_report [--out docs/mutation.md] [--survivors 40]

Killed = a test failed or timed out with the mutant in place. Equivalent mutants (no behaviour a test can
observe) are listed in ``docs/mutation_equivalent.txt`` (``<mutant name>  <reason>``) and leave the
denominator. An equivalent entry names a mutant by its number within its function, and mutmut renumbers a
function's mutants when the function changes: review its entries then (a name that no longer exists is an
error here).
"""
from __future__ import annotations

import argparse
import json
import math
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the core modules: mutmut's own list, so the report and the run cannot disagree
MODULES = tuple(tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['mutmut']['only_mutate'])
WHY = ('Why mutmut: it runs on plain pytest with no test changes, mutates at the function level and maps every '
       'function to the tests that execute it, so each mutant runs only those tests (cosmic-ray needs a session '
       'database and runs a whole test command per mutant; pytest-gremlins is young). Its fork-based workers keep '
       'the imported torch stack warm between mutants. Tests marked `slow` are left out of the runs; a mutant '
       'reached only by a subprocess (the CLI end-to-end tests) shows as "no tests".')
KILLED = {1: 'killed', 3: 'killed', 36: 'timeout', -24: 'timeout', 24: 'timeout', 152: 'timeout', 255: 'timeout'}
LABELS = {0: 'survived', 5: 'no tests', 33: 'no tests', None: 'not run', 34: 'skipped'}


def load_equivalent(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.startswith('#'):
            key, _, reason = line.partition(' ')
            if not reason.strip():
                raise ValueError(f'{path}:{n}: "<mutant name>  <reason>" expected, got {line!r}')
            out[key] = reason.strip()
    return out


def module_rows(mutants: Path, equivalent: dict) -> list[dict]:
    rows = []
    for module in MODULES:
        meta = mutants / f'{module}.meta'
        if not meta.is_file():
            rows.append({'module': module, 'missing': True})
            continue
        codes = json.loads(meta.read_text())['exit_code_by_key']
        status = Counter()
        survivors = []
        for key, code in sorted(codes.items()):
            if key in equivalent:
                status['equivalent'] += 1
            elif code in KILLED:
                status['killed'] += 1
            else:
                status[LABELS.get(code, 'suspicious')] += 1
                if code is not None:  # not run yet: not a survivor
                    survivors.append(f'{key} ({LABELS.get(code, code)})')
        counted = sum(status.values()) - status['equivalent'] - status['not run']
        rows.append({'module': module, 'status': status, 'counted': counted, 'survivors': survivors,
                     'score': 100.0 * status['killed'] / counted if counted else float('nan'),
                     'names': set(codes)})
    stale = sorted(set(equivalent) - set().union(*(r.get('names', set()) for r in rows)))
    if stale and not any(r.get('missing') for r in rows):
        raise SystemExit(f'docs/mutation_equivalent.txt names mutants that do not exist (renumbered after a '
                         f'change?): {", ".join(stale)}')
    return rows


def previous_rows(text: str) -> dict[str, str]:
    """Each module's latest measured row in an earlier report: from its own table, else from the rows it kept of
    the reports before it (so a string of partial runs loses no measurement)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith('| `') and not line.rstrip().endswith(('not run yet |', '| | | | | | |')):
            rows.setdefault(line.split('`')[1], line)
    return rows


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a proportion k/n, in percent: the score of a module whose mutants ran only in part,
    when what ran is a uniform sample (``tools.mutation_sample``)."""
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return 100 * (mid - half), 100 * (mid + half)


def render(rows: list[dict], equivalent: dict, command: str, max_survivors: int,
           previous: dict[str, str] | None = None) -> str:
    out = ['# Mutation testing', '', f'Produced by `{command}` (mutmut 3, `tools/mutation_report.py`).', '',
           WHY, '',
           '| module | mutants | killed | survived | no tests | not run | equivalent | score |',
           '|---|---|---|---|---|---|---|---|']
    for r in rows:
        if r.get('missing'):
            out.append(f'| `{r["module"]}` | not mutated in this run | | | | | | |')
            continue
        s = r['status']
        score = f'{r["score"]:.1f} %' if r['counted'] else 'not run yet'
        if r['counted'] and s['not run']:
            score += ' (95 %: {:.0f}–{:.0f} %)'.format(*wilson(s['killed'], r['counted']))
        out.append(f'| `{r["module"]}` | {sum(s.values())} | {s["killed"]} | {s["survived"]} | '
                   f'{s["no tests"]} | {s["not run"]} | {s["equivalent"]} | {score} |')
    out += ['', 'Score = killed / (mutants - equivalent - not run); a timeout counts as killed. Where only part of '
                'a module ran, the interval is the 95 % Wilson interval of its score, which holds when what ran is a '
                'uniform sample of its mutants (`tools.mutation_sample`). Results accumulate in `mutants/` over '
                'runs: a mutant runs again when its function changes, or when named on the command line (how '
                'survivors were re-checked after new tests).', '']
    whole = {r['module'] for r in rows if r.get('counted') and not r['status']['not run']}
    kept = [line for module, line in (previous or {}).items() if module not in whole]
    if kept:
        out += ['## Earlier measurements', '', 'Modules not measured in full in this run, as the latest earlier '
                'report measured them, under the module names of its time:', '',
                '| module | mutants | killed | survived | no tests | not run | equivalent | score |',
                '|---|---|---|---|---|---|---|---|', *kept, '']
    for r in rows:
        if r.get('survivors'):
            out += [f'## Surviving mutants of `{r["module"]}`', '']
            out += [f'- `{k}`' for k in r['survivors'][:max_survivors]]
            if len(r['survivors']) > max_survivors:
                out.append(f'- ... and {len(r["survivors"]) - max_survivors} more (`mutmut results`)')
            out.append('')
    if equivalent:
        out += ['## Equivalent mutants', '']
        out += [f'- `{k}`: {v}' for k, v in sorted(equivalent.items())]
    return '\n'.join(out) + '\n'


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--mutants', type=Path, default=Path('mutants'))
    ap.add_argument('--equivalent', type=Path, default=Path('docs/mutation_equivalent.txt'))
    ap.add_argument('--out', type=Path, default=None)
    ap.add_argument('--command', default='make mutation')
    ap.add_argument('--survivors', type=int, default=40, help='survivors listed per module')
    ap.add_argument('--previous', type=Path, default=None,
                    help="an earlier report: its measurements are kept for the modules this run did not "
                         "measure in full")
    a = ap.parse_args(argv)
    equivalent = load_equivalent(a.equivalent)
    previous = previous_rows(a.previous.read_text()) if a.previous and a.previous.is_file() else None
    text = render(module_rows(a.mutants, equivalent), equivalent, a.command, a.survivors, previous)
    if a.out:
        a.out.write_text(text)
    print(text)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
