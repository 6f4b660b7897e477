"""Fine-tune UperNet + DeiT on ADE20K with mmengine's Runner.

    python -m segmentation.train segmentation/configs/upernet_deit-s16_maxsup_8xb2-160k_ade20k-512x512.py
    python -m segmentation.train CONFIG --backbone-checkpoint output/deit_small_maxsup/checkpoint.pth
    scripts/dist_train_seg.sh CONFIG 8 [...]                       # 8 GPUs (launcher pytorch)
--backbone-checkpoint converts our trainer's / the released DeiT checkpoint on the fly (pos-embed resized
to the crop). Single-process runs (CPU included) use BN instead of SyncBN.
"""
from __future__ import annotations

import argparse
import sys

from data.cli import report
from deit.distributed import get_world_size
from segmentation.common import (
    require_segmentation_stack,
    add_runner_args, agree_on_resume, check_backbone_weights, check_data_root, init_distributed, load_config,
    set_backbone_checkpoint, set_batch, trust_runner_checkpoints)


def main(argv=None) -> int:
    require_segmentation_stack()
    from mmengine.runner import Runner
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('config')
    ap.add_argument('--backbone-checkpoint', default=None, help='DeiT checkpoint to initialise the backbone')
    ap.add_argument('--use-ema', action='store_true', help='take the EMA weights of a training checkpoint')
    ap.add_argument('--resume', action='store_true', help='resume from the latest checkpoint in work-dir')
    ap.add_argument('--amp', action='store_true')
    ap.add_argument('--total-batch-size', type=int, default=None,
                    help='images per iteration over all GPUs (per-GPU batch = this / GPUs); the configs\' '
                         'recipe is 16')
    ap.add_argument('--auto-scale-lr', action='store_true',
                    help='scale the lr by (GPUs x per-GPU batch) / 16 (mmengine auto_scale_lr, as mmseg\'s flag)')
    add_runner_args(ap)
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.config, a.cfg_options, a.work_dir, a.launcher)
        check_data_root(cfg, 'train')
        init_distributed(cfg, a.launcher)
        print(set_batch(cfg, get_world_size(), a.total_batch_size, a.auto_scale_lr))
        if a.resume and not cfg.get('load_from'):  # rank 0 decides; None: nothing yet, all ranks start fresh
            cfg.load_from = agree_on_resume(cfg.work_dir)
            a.resume = cfg.load_from is not None
        if a.backbone_checkpoint:
            set_backbone_checkpoint(cfg, a.backbone_checkpoint, a.use_ema)
        check_backbone_weights(cfg)
    except (FileNotFoundError, ValueError) as e:
        return report(e)
    if a.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    cfg.resume = a.resume
    runner = Runner.from_cfg(cfg)
    trust_runner_checkpoints(runner)
    runner.train()
    return 0


if __name__ == '__main__':
    sys.exit(main())
