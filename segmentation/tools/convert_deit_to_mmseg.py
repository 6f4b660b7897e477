"""Convert a DeiT checkpoint (our trainer's, the DeiT-S MaxSup release, .safetensors) for mmseg.

    python -m segmentation.tools.convert_deit_to_mmseg deit_s_maxsup.pth pretrain/deit_s_maxsup_mmseg.pth \
        [--img-size 512 --width 384 --depth 12] [--use-ema]
"""
from __future__ import annotations

import argparse
import sys

from data.cli import report
from data.io import CheckpointError, check_writable
from segmentation.deit_to_mmseg import convert_checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('src')
    ap.add_argument('dst')
    ap.add_argument('--img-size', type=int, default=512, help='crop size: pos_embed is resampled to it')
    ap.add_argument('--width', type=int, default=384, help='expected embedding width (DeiT-S: 384)')
    ap.add_argument('--depth', type=int, default=12)
    ap.add_argument('--use-ema', action='store_true')
    a = ap.parse_args(argv)
    try:
        check_writable(a.dst)
        state = convert_checkpoint(a.src, a.dst, a.width, a.depth, a.img_size, a.use_ema)
    except (CheckpointError, FileNotFoundError) as e:
        return report(e)
    print(f'wrote {a.dst}: {len(state)} tensors, pos_embed {tuple(state["pos_embed"].shape)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
