"""Load a released or trained checkpoint into the right timm model; optionally export it.

    python -m tools.load_checkpoint CKPT [--model NAME] [--num-classes K --reset-head] [--use-ema]
        [--export out.safetensors] [--class-map train_map.txt --imagefolder /data/train --direction zip2folder]

CKPT: a path (DeiT release dict, plain / DDP-prefixed / nested state dict, our trainer's checkpoint,
.safetensors), an http(s) URL, or ``hf-hub:<repo>[@<file>]`` (e.g. hf-hub:zhouyuxuanyx/MaxSup-Regularized-ResNet50).
Export writes the weights as .safetensors (mode 0644) whose metadata header holds the model name, classes,
input size, data set and crop ratio - this project reloads it without --model - plus ``<name>.json`` with
the same and the run's args.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from data.class_map import class_permutation, convert_head
from data.cli import one_line_errors
from data.io import CheckpointError, check_writable
from deit.releases import load_model
from tools.common import add_model_args


def export_safetensors(model, info: dict, out: Path) -> Path:
    from safetensors.torch import save_file
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    recorded = info.get('recorded') or {}
    header = {'model': info['model'], 'num_classes': info['num_classes'], 'input_size': info['input_size'],
              'data_set': recorded.get('data_set'), 'eval_crop_ratio': recorded.get('eval_crop_ratio')}
    save_file(state, str(out), metadata={k: str(v) for k, v in header.items() if v is not None})
    os.chmod(out, 0o644)  # a released file: readable by everyone, whatever the umask
    meta = {**header, 'source_format': info['format'],
            'args': {k: v for k, v in (info.get('args') or {}).items()
                     if isinstance(v, (int, float, str, bool, list, type(None)))}}
    out.with_suffix('.json').write_text(json.dumps(meta, indent=2))
    return out


@one_line_errors(CheckpointError, FileNotFoundError, ValueError, KeyError)
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('checkpoint')
    add_model_args(ap)
    ap.add_argument('--reset-head', action='store_true', help='allow a class-count change (new head)')
    ap.add_argument('--export', type=Path, default=None, help='write .safetensors (+ .json) here')
    ap.add_argument('--class-map', type=Path, default=None, help='ZIP train_map.txt for head permutation')
    ap.add_argument('--imagefolder', type=Path, default=None, help='ImageFolder train/ for head permutation')
    ap.add_argument('--direction', choices=('zip2folder', 'folder2zip'), default='zip2folder')
    args = ap.parse_args(argv)
    if args.export:
        check_writable(args.export)
    model, info = load_model(args.checkpoint, args.model, args.num_classes, args.reset_head, args.use_ema,
                             reset_hint='; pass --reset-head to start a new head')
    print(f'{args.checkpoint}: {info["format"]} checkpoint -> {info["model"]} with {info["num_classes"]} classes'
          f'{" (new head)" if info["head_reset"] else ""}; missing keys {info["missing"] or "none"}, '
          f'unexpected keys {info["unexpected"] or "none"}')
    if args.class_map:
        perm = class_permutation(args.class_map, args.imagefolder, args.direction)
        model.load_state_dict(convert_head(model.state_dict(), perm))
        print(f'classifier rows permuted ({args.direction})')
    if args.export:
        print(f'exported {export_safetensors(model, info, args.export)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
