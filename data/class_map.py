"""Class-index orders: a ZIP map file's labels vs. ImageFolder's sorted class folders.

ImageFolder numbers classes by sorted folder name; a released ``train_map.txt`` may number them otherwise.
``perm[zip_label] = folder_label``. Converting a classifier head from ZIP order to folder order moves row
``zip_label`` to row ``perm[zip_label]``; predictions (logits) convert the same way along the class axis.

    python -m data.class_map --map train_map.txt --imagefolder /data/imagenet/train \\
        [--checkpoint in.pth --out out.pth --direction zip2folder]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from data.cli import report
from data.io import save_atomic, torch_load
from data.map_file import check_labels, class_folder, parse_map_file
from data.zip_index import CacheError

# the state-dict entries whose rows are the classes (DeiT head, distilled head, ResNet fc)
HEAD_KEYS = ('head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias', 'fc.weight', 'fc.bias')


def class_permutation(map_file, imagefolder_root, direction: str = 'zip2folder') -> torch.Tensor:
    """perm[zip_label] = ImageFolder index of the same class folder ('folder2zip': the inverse)."""
    if direction not in ('zip2folder', 'folder2zip'):
        raise ValueError(f"direction must be 'zip2folder' or 'folder2zip', got {direction!r}")
    entries = parse_map_file(map_file)
    K = check_labels(entries, str(map_file), folder_labels=True)
    folder_of = {lab: class_folder(name) for name, lab in entries}
    folders = sorted(d.name for d in Path(imagefolder_root).iterdir() if d.is_dir())
    if sorted(folder_of.values()) != folders:
        diff = sorted(set(folders) ^ set(folder_of.values()))
        raise CacheError(f'{map_file} and {imagefolder_root} name different classes, e.g. {diff[:5]}')
    index = {f: i for i, f in enumerate(folders)}
    perm = torch.tensor([index[folder_of[z]] for z in range(K)])
    return perm if direction == 'zip2folder' else invert(perm)


def invert(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    return inv


def convert_predictions(logits: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """(N, K) scores in ZIP order -> folder order (pass ``invert(perm)`` for the other way)."""
    out = torch.empty_like(logits)
    out[:, perm] = logits
    return out


def convert_head(state_dict: dict, perm: torch.Tensor) -> dict:
    """Permute the classifier rows of a state dict from ZIP order to folder order (or inverse perm)."""
    out = dict(state_dict)
    found = [k for k in HEAD_KEYS if k in out]
    if not found:
        raise KeyError(f'no classifier head among {HEAD_KEYS} in the state dict')
    for k in found:
        if out[k].shape[0] != len(perm):
            raise ValueError(f'{k} has {out[k].shape[0]} classes, the permutation {len(perm)}')
        new = torch.empty_like(out[k])
        new[perm] = out[k]
        out[k] = new
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--map', required=True, type=Path, help='train_map.txt of the ZIP cache')
    ap.add_argument('--imagefolder', required=True, type=Path, help='ImageFolder train/ root')
    ap.add_argument('--checkpoint', type=Path, help='checkpoint whose classifier head to convert')
    ap.add_argument('--out', type=Path, help='where to write the converted checkpoint')
    ap.add_argument('--direction', choices=('zip2folder', 'folder2zip'), default='zip2folder')
    args = ap.parse_args(argv)
    try:
        perm = class_permutation(args.map, args.imagefolder, args.direction)
        moved = int((perm != torch.arange(len(perm))).sum())
        print(f'{len(perm)} classes, {moved} change index ({args.direction})')
        src, dst = ('zip', 'folder') if args.direction == 'zip2folder' else ('folder', 'zip')
        for i, j in enumerate(perm.tolist()):  # the permutation itself, one class per line
            print(f'{src} {i} -> {dst} {j}')
        if args.checkpoint:
            if not args.out:
                ap.error('--checkpoint needs --out')
            ckpt = torch_load(args.checkpoint)
            if isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict):
                ckpt['model'] = convert_head(ckpt['model'], perm)
            else:
                ckpt = convert_head(ckpt, perm)
            save_atomic(ckpt, args.out)
            print(f'wrote {args.out}')
    except (CacheError, KeyError, ValueError, FileNotFoundError) as e:
        return report(e)
    return 0


if __name__ == '__main__':
    sys.exit(main())
