"""Evaluate a checkpoint: top-1/top-5, NLL, ECE (15 bins) and a reliability diagram. Deterministic, no TTA.

    python -m tools.evaluate CKPT --data-path /data/imagenet [--cache] [--split val] [--out eval_out]
    python -m tools.evaluate CKPT --data-set DEMO
Model, input size, data set and crop ratio come from the checkpoint when it records them (flags override);
--cache implies --data-set IMNET. Writes metrics.json and reliability.png into --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data.cli import one_line_errors
from data.io import CheckpointError, check_writable
from deit.datasets import eval_data_set, eval_loader
from deit.engine import evaluate
from deit.releases import load_model
from tools.common import EVAL_BATCH_SIZE, EVAL_WORKERS, add_eval_data_args, add_model_args, report_names
from tools.plots import reliability_diagram


def run(checkpoint, data_set=None, data_path=None, split='val', cache=False, out='eval_out',
        input_size=None, batch_size=EVAL_BATCH_SIZE, num_workers=EVAL_WORKERS, use_ema=False, model_name=None,
        num_classes=None) -> dict:
    model, info = load_model(checkpoint, model_name, num_classes, use_ema=use_ema, input_size=input_size)
    size = input_size or info['input_size']
    data_set = eval_data_set(data_set, cache, info['recorded'])
    loader, nb = eval_loader(data_set, data_path, split, size, cache, info['recorded'].get('eval_crop_ratio'),
                             batch_size, num_workers)
    if nb != info['num_classes']:
        raise ValueError(f'{data_path or data_set} has {nb} classes, the checkpoint {info["num_classes"]}')
    stats = report_names(evaluate(loader, model, torch.device('cpu'), n_bins=15, print_freq=0, reliability=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reliability_diagram(stats['reliability'], out / 'reliability.png',
                        f'{info["model"]}: ECE {stats["ece"]:.4f}, top-1 {stats["acc1"]:.2f}%')
    stats.update({'checkpoint': str(checkpoint), 'model': info['model'], 'split': split, 'input_size': size,
                  'data_set': data_set})
    (out / 'metrics.json').write_text(json.dumps(stats, indent=2))
    return stats


@one_line_errors(CheckpointError, FileNotFoundError, ValueError)
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('checkpoint')
    add_eval_data_args(ap)
    add_model_args(ap)
    ap.add_argument('--out', default='eval_out')
    a = ap.parse_args(argv)
    check_writable(a.out, folder=True)
    s = run(a.checkpoint, a.data_set, a.data_path, a.split, a.cache, a.out, a.input_size, a.batch_size,
            a.num_workers, a.use_ema, a.model, a.num_classes)
    print(f'top-1 {s["acc1"]:.2f}%  top-5 {s["acc5"]:.2f}%  NLL {s["nll"]:.4f}  ECE {s["ece"]:.4f}  -> {a.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
