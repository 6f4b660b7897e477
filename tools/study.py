"""Check the paper's claims: train a {losses} x {seeds} grid with the project's trainer, analyse every run,
and write a Markdown report (mean +- std tables, plots, an automatic check of each claim) plus a CSV.

    python -m tools.study                       # digits, 6 losses x 5 seeds, ~20-30 min on 2 CPU cores
    python -m tools.study --quick               # 2 losses x 1 seed x 1 epoch (smoke test)
    python -m tools.study --out output/study    # report: output/study/results.md (+ .csv, plots)

Resumable: a run whose analysis.json exists is reused; an interrupted run resumes from its checkpoint.

ImageNet scale (one grid cell per job, each distributed over 8 GPUs; same analysis and report):
    python -m tools.study --data-set IMNET --data-path /data/imagenet --cache --model deit_small_patch16_224 \
        --input-size 224 --epochs 300 --batch-size 128 --nproc 8 --seeds 0 --losses ce ls maxsup \
        --train-args "--mixup 0.8 --cutmix 1.0 --aa rand-m9-mstd0.5-inc1 --reprob 0.25 --lr 5e-4 --warmup-epochs 5"
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from deit import analysis
from data.io import torch_load
from deit.releases import load_model
from deit.datasets import eval_loader
from deit.args import get_args_parser
from deit.main import main as train_main
from deit.metrics import classification_summary, feature_variation
from tools.common import report_names
from tools.plots import bar_table

# Grid cells: a loss, or a loss with its alpha held constant. LS and MaxSup share the paper's default
# schedule 0.1 -> 0.2 (Sec. 5.1, App. F); '*_fixed' is Table 8's fixed column; the Table 1 ablations
# (reg-only / err-only) use a fixed alpha as Table 1 does, next to ls_fixed.
DEFAULT_LOSSES = ['ce', 'maxsup', 'ls', 'maxsup_fixed', 'ls_fixed', 'ls_reg_only', 'ls_err_only', 'logit_penalty']
CONSTANT_ALPHA = ('maxsup_fixed', 'ls_fixed', 'ls_reg_only', 'ls_err_only')
ROOT = Path(__file__).resolve().parents[1]


class GaussianNoise(torch.utils.data.Dataset):
    """Corrupted copy of a (normalised-tensor) dataset: fixed per-index Gaussian noise of std ``sigma``."""

    def __init__(self, ds, sigma: float):
        self.ds, self.sigma = ds, sigma

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        g = torch.Generator().manual_seed(10_000 + i)
        return x + self.sigma * torch.randn(x.shape, generator=g), y


def train_args(a, loss: str, seed: int, out: Path) -> list[str]:
    args = ['--data-set', a.data_set, '--model', a.model, '--input-size', str(a.input_size), '--epochs',
            str(a.epochs), '--batch-size', str(a.batch_size), '--loss', loss.removesuffix('_fixed'),
            '--alpha-schedule', 'constant' if loss in CONSTANT_ALPHA else 'linear', '--seed', str(seed),
            '--output_dir', str(out), '--print-freq', '0', '--num_workers', str(a.num_workers)]
    if a.data_path:
        args += ['--data-path', a.data_path]
    if a.cache:
        args += ['--cache']
    return args + shlex.split(a.train_args)


def run_training(a, loss: str, seed: int, out: Path) -> None:
    argv = train_args(a, loss, seed, out)
    if a.nproc > 1:
        env = {**os.environ, 'NGPUS': str(a.nproc)}
        subprocess.run(['bash', str(ROOT / 'scripts' / 'distributed_train.sh'), *argv], check=True, env=env, cwd=ROOT)
    else:
        train_main(get_args_parser().parse_args(argv))


def finished(out: Path, epochs: int) -> bool:
    ck = out / 'checkpoint.pth'
    return ck.is_file() and torch_load(ck).get('epoch') == epochs - 1


def analyse(a, ckpt: Path) -> dict:
    model, info = load_model(ckpt)
    res = {}
    for split in ('train', 'val'):
        split_at = dict(data_set=a.data_set, data_path=a.data_path, split=split, input_size=info['input_size'],
                        cache=a.cache, batch_size=256, num_workers=a.num_workers, max_samples=a.max_samples)
        o = analysis.collect_outputs(model, eval_loader(**split_at)[0])
        fv = feature_variation(o['features'], o['labels'])
        res[f'{split}_d_within'], res[f'{split}_r2'] = fv['d_within'], fv['r2']
        if split == 'val':
            res.update(report_names(classification_summary(o['logits'], o['labels'])))
            lg = analysis.logit_statistics(o['logits'], o['labels'], a.threshold)
            res.update({'near_zero_mean': lg['near_zero_fraction_mean'], 'logit_range_mean': lg['logit_range_mean']})
            noisy = eval_loader(**split_at, wrap=lambda ds: GaussianNoise(ds, a.noise))[0]
            oc = analysis.collect_outputs(model, noisy, features=False)
            c = report_names(classification_summary(oc['logits'], oc['labels']))
            res.update({'corrupt_acc1': c['acc1'], 'corrupt_nll': c['nll'], 'corrupt_ece': c['ece']})
    return res


METRICS = [('acc1', 'top-1 (%)', True), ('nll', 'NLL', False), ('ece', 'ECE', False),
           ('corrupt_acc1', 'noisy top-1 (%)', True), ('corrupt_ece', 'noisy ECE', False),
           ('train_d_within', 'd_within train', True), ('train_r2', 'R² train', False),
           ('val_d_within', 'd_within val', True), ('val_r2', 'R² val', False),
           ('near_zero_mean', 'near-zero logit proportion', None), ('logit_range_mean', 'logit range', None)]


def _ms(v):
    return (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)


def compare(rows, metric, a, b, higher_better: bool) -> tuple[bool, str]:
    """Does ``a`` beat ``b`` on metric? Verdict with a Welch t statistic as the noise yardstick; none from a
    single seed (no noise estimate)."""
    va, vb = [r[metric] for r in rows[a]], [r[metric] for r in rows[b]]
    (ma, sa), (mb, sb) = _ms(va), _ms(vb)
    if min(len(va), len(vb)) < 2:
        return False, f'{a} {ma:.4g} vs {b} {mb:.4g} → single seed: no verdict'
    se = (sa ** 2 / len(va) + sb ** 2 / len(vb)) ** 0.5
    t = (ma - mb) / se if se > 0 else (0.0 if ma == mb else float('inf'))
    held = (ma > mb) if higher_better else (ma < mb)
    strength = 'clear (|t| > 2)' if abs(t) > 2 else 'within seed noise (|t| <= 2)'
    return held, f'{a} {ma:.4g} ± {sa:.2g} vs {b} {mb:.4g} ± {sb:.2g} → {"held" if held else "NOT held"}, {strength}'


def claims(rows) -> list[str]:
    out = []
    need = {'ls', 'maxsup'}
    if need <= set(rows):
        out.append('- MaxSup more accurate than LS: ' + compare(rows, 'acc1', 'maxsup', 'ls', True)[1])
        out.append('- MaxSup keeps more intra-class variation than LS (Table 2, d_within train): ' +
                   compare(rows, 'train_d_within', 'maxsup', 'ls', True)[1])
        out.append('- MaxSup better calibrated than LS on noisy data (ECE): ' +
                   compare(rows, 'corrupt_ece', 'maxsup', 'ls', False)[1])
    for loss in ('maxsup', 'ls'):
        if {loss, f'{loss}_fixed'} <= set(rows):
            out.append(f'- Table 8: the 0.1 -> 0.2 schedule helps {loss} over a fixed alpha 0.1: ' +
                       compare(rows, 'acc1', loss, f'{loss}_fixed', True)[1])
    ls_t1 = 'ls_fixed' if 'ls_fixed' in rows else 'ls'  # Table 1 compares at a fixed alpha
    if {'ls_err_only', ls_t1} <= set(rows):
        out.append('- error-enhancement alone hurts (Table 1: LS beats CE + err-only): ' +
                   compare(rows, 'acc1', ls_t1, 'ls_err_only', True)[1])
    if {'ls_reg_only', ls_t1} <= set(rows):
        held, txt = compare(rows, 'acc1', 'ls_reg_only', ls_t1, True)
        out.append('- regularization-only is at least as good as LS (Table 1): ' + txt)
    others = [k for k in rows if k != 'maxsup']
    if 'maxsup' in rows and others:  # against the strongest other loss, with the same noise yardstick
        best = max(others, key=lambda k: _ms([r['acc1'] for r in rows[k]])[0])
        out.append('- MaxSup has the best mean top-1 of all losses (vs the best other): '
                   + compare(rows, 'acc1', 'maxsup', best, True)[1])
    return out


def write_report(results: list[dict], report: Path, a, elapsed: float) -> None:
    report.parent.mkdir(parents=True, exist_ok=True)
    img_dir = report.with_suffix('')
    img_dir.mkdir(parents=True, exist_ok=True)
    csv_path = report.with_suffix('.csv')
    keys = ['loss', 'seed'] + [m for m, _, _ in METRICS] + ['acc5', 'corrupt_nll']
    with open(csv_path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction='ignore')
        w.writeheader()
        w.writerows(results)
    rows = {}
    for r in results:
        rows.setdefault(r['loss'], []).append(r)
    seeds = sorted({r['seed'] for r in results})
    lines = [f'# MaxSup at laptop scale: {a.data_set} ({a.model} @ {a.input_size}px)', '',
             f'Generated by `python -m tools.study {" ".join(a.argv)}`'.rstrip(), '',
             f'{len(rows)} losses × {len(seeds)} seeds ({seeds}), {a.epochs} epochs each, the project trainer '
             f'(`deit.main`) for every run; {len(results)} runs, {elapsed / 60:.1f} min in this invocation. '
             f'Images: {a.input_size}x{a.input_size} px inputs. Flags of every run: `{a.train_args}`; alpha '
             f'0.1 -> 0.2 (paper App. F) for maxsup and ls, constant 0.1 for the `*_fixed`, `ls_reg_only` and '
             f'`ls_err_only` cells (Tables 1 and 8). '
             f'Values: mean ± std over seeds. "noisy": the val set with Gaussian noise σ={a.noise} '
             f'(normalised units). d_within / R²: cosine, penultimate features (Kornblith et al. 2021). '
             f'Every run: `{csv_path.name}`.', '', '## Results', '',
             '| loss | ' + ' | '.join(t for _, t, _ in METRICS) + ' |', '|---' * (len(METRICS) + 1) + '|']
    for loss, rs in rows.items():
        cells = []
        for m, _, _ in METRICS:
            mean, std = _ms([r[m] for r in rs])
            cells.append(f'{mean:.4g} ± {std:.2g}')
        lines.append(f'| {loss} | ' + ' | '.join(cells) + ' |')
    lines += ['', '## The paper\'s claims at this scale (computed from the table above)', ''] + claims(rows)
    lines += ['', '## Plots', '']
    for m, title, _ in METRICS[:6]:
        p = bar_table({k: [r[m] for r in v] for k, v in rows.items()}, title, img_dir / f'{m}.png', title)
        lines.append(f'![{title}]({img_dir.name}/{p.name})')
    report.write_text('\n'.join(lines) + '\n')


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--losses', nargs='+', default=DEFAULT_LOSSES)
    ap.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument('--epochs', type=int, default=20)
    ap.add_argument('--data-set', default='DEMO')
    ap.add_argument('--data-path', default=None)
    ap.add_argument('--cache', action='store_true')
    ap.add_argument('--model', default='deit_demo_patch4_32')
    ap.add_argument('--input-size', type=int, default=16)
    ap.add_argument('--batch-size', type=int, default=64)
    ap.add_argument('--num-workers', type=int, default=0)
    ap.add_argument('--nproc', type=int, default=1, help='processes per run (torchrun) for GPU clusters')
    ap.add_argument('--train-args', default='--lr 2e-3 --unscale-lr --min-lr 1e-5 --warmup-epochs 2 '
                                            '--mixup 0 --cutmix 0 --drop-path 0.1 --weight-decay 0.05',
                    help='extra deit.main flags for every run (hard labels by default: Table 1 needs them)')
    ap.add_argument('--noise', type=float, default=0.5, help='std of the Gaussian corruption (normalised units)')
    ap.add_argument('--threshold', type=float, default=analysis.NEAR_ZERO_THRESHOLD,
                    help='near-zero logit threshold (official: 0.01)')
    ap.add_argument('--max-samples', type=int, default=20000, help='subset size for analysis of large splits')
    ap.add_argument('--out', type=Path, default=Path('output/study'))
    ap.add_argument('--report', type=Path, default=None, help='default: <out>/results.md')
    ap.add_argument('--quick', action='store_true', help='2 losses x 1 seed x 1 epoch')
    a = ap.parse_args(argv)
    a.argv = argv
    if a.quick:
        a.losses, a.seeds, a.epochs = a.losses[:2], a.seeds[:1], 1
        a.train_args += ' --warmup-epochs 0'  # one epoch: no room for warm-up
    report = a.report or a.out / 'results.md'
    t0 = time.time()
    results, trained, reused = [], 0, 0
    grid = [(loss, seed) for seed in a.seeds for loss in a.losses]
    for k, (loss, seed) in enumerate(grid, 1):
        out = a.out / f'{loss}_s{seed}'
        done = out / 'analysis.json'
        if done.is_file() and finished(out, a.epochs):
            results.append(json.loads(done.read_text()))
            reused += 1
            print(f'[{k}/{len(grid)}] {loss} seed {seed}: reused', flush=True)
            continue
        print(f'[{k}/{len(grid)}] {loss} seed {seed}: training {a.epochs} epochs -> {out}', flush=True)
        t = time.time()
        run_training(a, loss, seed, out)
        res = {'loss': loss, 'seed': seed, **analyse(a, out / 'checkpoint.pth')}
        done.write_text(json.dumps(res, indent=2))
        results.append(res)
        trained += 1
        print(f'[{k}/{len(grid)}] {loss} seed {seed}: top-1 {res["acc1"]:.2f}% ECE {res["ece"]:.4f} '
              f'd_within {res["train_d_within"]:.4f} ({time.time() - t:.0f}s)', flush=True)
    write_report(results, report, a, time.time() - t0)
    print(f'study: {trained} trained, {reused} reused; report {report}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
