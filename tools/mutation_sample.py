"""A seeded uniform sample of each module's mutants, as the names ``make mutation SAMPLE=...`` runs.

    make mutation SAMPLE='60 deit/main.py data/zip_index.py'
    python -m tools.mutation_sample --per-module 60 deit/main.py    # the names only

A full run of a large module takes hours on 2 cores, and a run stopped part-way has run the mutants of the
functions whose tests are fastest, which says little about the rest. A uniform sample of the module's
mutants is an unbiased estimate of its score: the report gives the 95 % interval of a partly run module.
The names are mutmut's own (its mutation of the source, no files written), so the sample is the same on
every machine for the same source and seed; equivalent mutants (``docs/mutation_equivalent.txt``) are
left out, as the score leaves them out.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from mutmut.mutation.file_mutation import mutate_file_contents
from mutmut.utils.format_utils import get_mutant_name

from tools.mutation_report import MODULES, ROOT, load_equivalent


def mutant_names(module: str) -> list[str]:
    """Every mutant mutmut makes of ``module`` (a path relative to the repository root), in its order."""
    mutated = mutate_file_contents(module, (ROOT / module).read_text())
    return [get_mutant_name(Path(module), name) for name in mutated.mutant_names]


def sample(modules, per_module: int, seed: int, equivalent: dict) -> list[str]:
    """Each module's draw depends on the seed and the module only, so modules sampled one run at a time get the same
    mutants as when sampled together."""
    out = []
    for module in modules:
        names = [n for n in mutant_names(module) if n not in equivalent]
        out += sorted(random.Random(f'{seed}:{module}').sample(names, min(per_module, len(names))))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('modules', nargs='+', metavar='MODULE', help=f'one of: {" ".join(MODULES)}')
    ap.add_argument('--per-module', type=int, required=True, help='mutants drawn from each module')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--equivalent', type=Path, default=ROOT / 'docs' / 'mutation_equivalent.txt')
    a = ap.parse_args(argv)
    unknown = [m for m in a.modules if m not in MODULES]
    if unknown:
        ap.error(f'not a mutated module: {" ".join(unknown)} (pyproject.toml [tool.mutmut] only_mutate)')
    if a.per_module < 1:
        ap.error(f'--per-module must be at least 1, got {a.per_module}')
    print(' '.join(sample(a.modules, a.per_module, a.seed, load_equivalent(a.equivalent))))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
