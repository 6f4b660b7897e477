"""The paper's analyses over one or more checkpoints, side by side (no GPU needed).

    python -m tools.analyze logits     --ckpt ce=a.pth --ckpt maxsup=b.pth --data-path /data/imagenet --out viz
    python -m tools.analyze features   --ckpt ... [--max-samples 10000]          # d_within, R^2 (Table 2)
    python -m tools.analyze transfer   --ckpt ... --transfer-data /data/cifar10  # linear probe (an ImageFolder,
                                       [--transfer-set CIFAR10|CIFAR100]         # or the python archive)
    python -m tools.analyze gradcam    --ckpt ... [--num-images 6]               # Figure 3 grid
    python -m tools.analyze projection --ckpt ... --classes 0 1 2                # Mueller et al. 2019
    python -m tools.analyze cam-boxes  --ckpt ... --boxes LOC_val_solution.csv   # Grad-CAM vs boxes (Sec. 5.4)
Data: ``--data-set FOLDER|IMNET|DEMO --data-path P [--cache]``. Every subcommand writes PNG + JSON into --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from data.cli import one_line_errors
from data.io import CheckpointError, check_writable
from deit import analysis, localization
from deit.datasets import DEFAULT_CROP_RATIO, eval_data_set, eval_loader, eval_split, normalization
from deit.metrics import feature_variation
from deit.releases import load_model
from tools import plots
from tools.common import add_eval_data_args, add_model_args


def parse_ckpts(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        name, sep, path = it.partition('=')
        if not sep:
            name, path = Path(it).stem, it
        if name in out:
            raise ValueError(f'two checkpoints named {name!r}; use name=path')
        out[name] = path
    return out


def outputs(model, args, split: str, features=True, data_set=None, data_path=None, name=''):
    cache = args.cache and data_set is None  # --cache is for the main data set, not the transfer folder
    loader, _ = eval_loader(data_set or args.data_set, data_path or args.data_path, split, args.input_size, cache,
                            batch_size=args.batch_size, num_workers=args.num_workers,
                            max_samples=args.max_samples, seed=args.seed)
    return analysis.collect_outputs(model, loader, features=features, progress=f'{name} {split}')


def cmd_logits(models, args, out: Path) -> dict:
    stats, logits = {}, {}
    for name, model in models.items():
        o = outputs(model, args, args.split, features=False, name=name)
        logits[name] = o['logits']
        stats[name] = analysis.logit_statistics(o['logits'], o['labels'], args.threshold)
    densities = analysis.logit_densities(logits)
    plots.logit_figures(stats, densities, out / 'logits.png')
    (out / 'logit_density.json').write_text(json.dumps(densities))
    (out / 'logits_per_sample.json').write_text(json.dumps({k: v['per_sample'] for k, v in stats.items()}))
    return {k: {m: x for m, x in v.items() if m != 'per_sample'} for k, v in stats.items()}


def cmd_features(models, args, out: Path) -> dict:
    table = {}
    for name, model in models.items():
        table[name] = {}
        for split in ('train', 'val'):
            o = outputs(model, args, split, name=name)
            table[name][split] = feature_variation(o['features'], o['labels'])
    lines = ['| checkpoint | d_within train | R² train | d_within val | R² val |', '|---|---|---|---|---|']
    for name, t in table.items():
        lines.append(f'| {name} | {t["train"]["d_within"]:.4f} | {t["train"]["r2"]:.4f} | '
                     f'{t["val"]["d_within"]:.4f} | {t["val"]["r2"]:.4f} |')
    (out / 'features.md').write_text('\n'.join(lines) + '\n')
    plots.feature_figure(table, out / 'features.png')
    return table


def cmd_transfer(models, args, out: Path) -> dict:
    if not args.transfer_data:
        raise ValueError('transfer needs --transfer-data (an ImageFolder with train/ and val/, or with '
                         '--transfer-set CIFAR10|CIFAR100 the python archive)')
    res = {}
    for name, model in models.items():
        tr, te = (outputs(model, args, split, data_set=args.transfer_set, data_path=args.transfer_data, name=name)
                  for split in ('train', 'val'))
        res[name] = analysis.linear_probe(tr['features'].numpy(), tr['labels'].numpy(), te['features'].numpy(),
                                          te['labels'].numpy(), seed=args.seed)
    plots.bar_table({k: [100 * v['test_accuracy']] for k, v in res.items()}, 'linear-probe top-1 (%)',
                    out / 'transfer.png', 'linear probe on frozen features')
    return res


def _images(args, ds, idx):
    x = torch.stack([ds[i][0] for i in idx])
    labels = [int(ds[i][1]) for i in idx]
    mean, std = (torch.tensor(v)[:, None, None] for v in normalization(args))
    return x, labels, (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _predictions(model, x) -> list[tuple[int, float]]:
    with torch.no_grad():
        p = model(x).float().softmax(1)
    conf, pred = p.max(1)
    return list(zip(pred.tolist(), conf.tolist()))


def cmd_gradcam(models, args, out: Path) -> dict:
    ds, _ = eval_split(args.data_set, args.data_path, args.split, args.input_size, args.cache)
    idx = list(range(min(args.num_images, len(ds))))
    x, labels, imgs = _images(args, ds, idx)
    targets = labels if args.cam_target == 'label' else None
    maps = {name: analysis.gradcam_maps(m, x.clone(), targets) for name, m in models.items()}
    preds = {name: _predictions(m, x) for name, m in models.items()}
    plots.gradcam_grid(imgs, maps, out / 'gradcam.png', labels, preds)
    np.savez_compressed(out / 'gradcam_maps.npz', **maps)
    return {'images': idx, 'labels': labels, 'predictions': preds,
            'mean_activation': {k: float(v.mean()) for k, v in maps.items()}}


def _image_id_and_size(ds, i) -> tuple[str, tuple[int, int]]:
    """(file stem, original (width, height)) of sample i of an image folder or the ZIP cache."""
    import io

    from PIL import Image
    if hasattr(ds, 'sample_name'):  # ZIP cache
        name = ds.sample_name(i).split('@/', 1)[1]
        return Path(name).stem, Image.open(io.BytesIO(ds.read_bytes(i))).size
    path = ds.samples[i][0]
    with Image.open(path) as im:
        return Path(path).stem, im.size


def cmd_cam_boxes(models, args, out: Path) -> dict:
    """Sec. 5.4: precision / recall of each model's thresholded Grad-CAM against the val boxes."""
    if not args.boxes:
        raise ValueError('cam-boxes needs --boxes (LOC_val_solution.csv or a folder of ILSVRC val XML files)')
    boxes = localization.read_boxes(args.boxes)
    ds, _ = eval_split(args.data_set, args.data_path, args.split, args.input_size, args.cache)
    picked = []
    for i in range(len(ds)):
        key, (w, h) = _image_id_and_size(ds, i)
        if key in boxes:
            picked.append((i, localization.boxes_in_crop(boxes[key], w, h, args.input_size, DEFAULT_CROP_RATIO)))
        if len(picked) == args.num_images:
            break
    if not picked:
        raise ValueError(f'no image of {args.data_path} ({args.split}) has a box in {args.boxes}')
    x, labels, _ = _images(args, ds, [i for i, _ in picked])
    res = {}
    for name, model in models.items():
        maps = analysis.gradcam_maps(model, x.clone(), labels if args.cam_target == 'label' else None)
        pr = [localization.cam_precision_recall(m, b, args.cam_threshold) for m, (_, b) in zip(maps, picked)]
        res[name] = {'precision': float(np.mean([p for p, _ in pr])), 'recall': float(np.nanmean([r for _, r in pr])),
                     'per_image': pr}
    plots.grouped_bars({k: {'precision': v['precision'], 'recall': v['recall']} for k, v in res.items()},
                       'fraction (mean over images)', out / 'cam_boxes.png',
                       f'Grad-CAM >= {args.cam_threshold} vs boxes, {len(picked)} images')
    return {'threshold': args.cam_threshold, 'images': len(picked), 'models': res}


def cmd_projection(models, args, out: Path) -> dict:
    proj, res = {}, {}
    for name, model in models.items():
        o = outputs(model, args, args.split, name=name)
        p = analysis.template_projection(o['features'], o['labels'], model.get_classifier().weight.detach(),
                                         tuple(args.classes))
        proj[name] = p
        res[name] = {'classes': p['classes'], 'n_points': len(p['points'])}
    plots.projection_figure(proj, out / 'projection.png')
    return res


COMMANDS = {'logits': cmd_logits, 'features': cmd_features, 'transfer': cmd_transfer, 'gradcam': cmd_gradcam,
            'projection': cmd_projection, 'cam-boxes': cmd_cam_boxes}


@one_line_errors(CheckpointError, FileNotFoundError, ValueError)
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('command', choices=sorted(COMMANDS))
    ap.add_argument('--ckpt', action='append', required=True, help='[name=]checkpoint, repeat for several')
    add_eval_data_args(ap)
    ap.add_argument('--max-samples', type=int, default=None, help='fixed-seed subset of each split')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--threshold', type=float, default=analysis.NEAR_ZERO_THRESHOLD,
                    help='|z| below this counts as near zero (official viz/logits.py: 0.01; the official notebook '
                         "viz/logits_viz.ipynb's figures use 0.001 for most models)")
    ap.add_argument('--transfer-data', default=None)
    ap.add_argument('--transfer-set', default='FOLDER', choices=('FOLDER', 'CIFAR10', 'CIFAR100'),
                    help='transfer: what --transfer-data holds (CIFAR*: the python archive; the paper probes CIFAR-10)')
    ap.add_argument('--num-images', type=int, default=6)
    ap.add_argument('--boxes', default=None, help='cam-boxes: LOC_val_solution.csv or a folder of val XML files')
    ap.add_argument('--cam-target', choices=('label', 'prediction'), default='label',
                    help="gradcam, cam-boxes: the class Grad-CAM explains: the image's label, or the model's "
                         "prediction (the official Deit/evaluate.py: targets=None)")
    ap.add_argument('--cam-threshold', type=float, default=localization.CAM_THRESHOLD,
                    help='cam-boxes: pixels with normalised Grad-CAM >= this are "active"')
    ap.add_argument('--classes', type=int, nargs=3, default=(0, 1, 2))
    add_model_args(ap, ema=False, model_help="for every checkpoint (default: each one's own, or inferred)")
    ap.add_argument('--out', type=Path, default=Path('analysis_out'))
    args = ap.parse_args(argv)
    check_writable(args.out / args.command, folder=True)
    ckpts = parse_ckpts(args.ckpt)
    loaded = {n: load_model(p, args.model, args.num_classes, input_size=args.input_size) for n, p in ckpts.items()}
    args.data_set = eval_data_set(args.data_set, args.cache, next(iter(loaded.values()))[1]['recorded'])
    models = {n: m for n, (m, _) in loaded.items()}
    sizes = {info['input_size'] for _, info in loaded.values()}
    if args.input_size is None:
        if len(sizes) != 1:
            raise ValueError(f'checkpoints expect different input sizes {sorted(sizes)}; pass --input-size')
        args.input_size = sizes.pop()
    out = args.out / args.command
    out.mkdir(parents=True, exist_ok=True)
    result = COMMANDS[args.command](models, args, out)
    (out / f'{args.command}.json').write_text(json.dumps(result, indent=2, default=float))
    print(f'{args.command}: wrote {", ".join(sorted(p.name for p in out.iterdir()))} to {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
