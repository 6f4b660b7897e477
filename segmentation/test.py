"""Test a segmentation checkpoint: mIoU single-scale, or multi-scale + flip (--tta, the paper's numbers).

    python -m segmentation.test CONFIG work_dirs/.../iter_160000.pth [--tta] [--work-dir DIR]
"""
from __future__ import annotations

import argparse
import numbers
import sys
from pathlib import Path

from data.cli import report
from segmentation.common import (
    require_segmentation_stack,
    add_runner_args, check_data_root, load_config, trust_runner_checkpoints)


def main(argv=None) -> dict | int:
    require_segmentation_stack()
    from mmengine.runner import Runner
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('config')
    ap.add_argument('checkpoint')
    ap.add_argument('--tta', action='store_true', help='multi-scale (0.5-1.75) + flip test')
    add_runner_args(ap)
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.config, a.cfg_options, a.work_dir, a.launcher)
        check_data_root(cfg, 'test')
        if not Path(a.checkpoint).is_file():
            raise FileNotFoundError(f'checkpoint not found: {a.checkpoint}')
    except (FileNotFoundError, ValueError) as e:
        return report(e)
    cfg.load_from = a.checkpoint
    cfg.model.backbone.init_cfg = None  # every weight comes from the checkpoint
    if a.tta:
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    runner = Runner.from_cfg(cfg)
    trust_runner_checkpoints(runner)
    metrics = runner.test()
    print(f'{"multi-scale+flip" if a.tta else "single-scale"} test: '
          + ', '.join(f'{k} {float(v):.2f}' for k, v in metrics.items() if isinstance(v, numbers.Number)))
    return metrics


if __name__ == '__main__':
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
