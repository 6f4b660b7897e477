"""Numbers that the GPU check asserts (benchmarks/gpu_check.sh); each exits non-zero when its check fails.

    python -m benchmarks.gpu_asserts maxsup-amp [--device cuda]
        fused MaxSup on logits made under autocast (fp16 on CUDA, bf16 on the CPU) equals the fp32
        reference formulation: loss and gradient
    python -m benchmarks.gpu_asserts gpu-decode CACHE_DIR [--device cuda]
        --gpu-decode's batch decoded by nvJPEG on the device is the same code's batch decoded by libjpeg-turbo
        on the CPU (the path the CPU tests check against timm's pipeline), within a few levels: the IDCT and
        chroma upsampling of the two decoders differ
    python -m benchmarks.gpu_asserts ema RUN_DIR --data-path DATA [--cache]
        the EMA metrics the trainer logged (evaluated on the training device after the last epoch) equal
        those of the checkpoint's EMA evaluated again on the CPU with blocking copies (tools.evaluate)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from deit.losses import MaxSupLoss, MaxSupLossReference
from deit.engine import autocast


def maxsup_under_autocast(device: torch.device, batch: int = 128, classes: int = 1000, features: int = 384) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, features, generator=g).to(device)
    w = torch.randn(features, classes, generator=g).div_(features ** 0.5).to(device)
    target = torch.randint(classes, (batch,), generator=g).to(device)
    with autocast(device, True):
        logits = x @ w  # low precision, as a head under AMP
    results = {}
    for name, crit in (('fused', MaxSupLoss(alpha=0.2)), ('reference', MaxSupLossReference(alpha=0.2))):
        z = logits.detach().clone().requires_grad_(True)
        with autocast(device, True):
            loss = crit(z, target)
        loss.backward()
        results[name] = (loss.detach().float(), z.grad.float())
    (lf, gf), (lr, gr) = results['fused'], results['reference']
    out = {'logits_dtype': str(logits.dtype), 'loss_fused': float(lf), 'loss_reference': float(lr),
           'loss_abs_diff': float((lf - lr).abs()), 'grad_max_abs_diff': float((gf - gr).abs().max()),
           'loss_dtype': str(lf.dtype)}
    out['ok'] = out['loss_abs_diff'] <= 1e-4 * max(1.0, abs(out['loss_reference'])) and \
        out['grad_max_abs_diff'] <= 1e-5
    return out


def gpu_decode_matches_the_cpu(cache_dir: Path, device: torch.device, n: int = 128) -> dict:
    from benchmarks.bench_input_pipeline import recipe_args, seeded
    from data.zip_cache import ZipImageDataset
    from deit.datasets import build_transform
    from deit.device_decode import DeviceDecoder, collate_encoded
    tf = build_transform(True, recipe_args(gpu_decode=True, device_aug=True))
    ds = ZipImageDataset(cache_dir / 'train.zip', cache_dir / 'train_map.txt', transform=tf, cache_mode='no')
    samples = []
    for i in range(min(n, len(ds))):
        seeded(i)
        samples.append(ds[i])
    batch = collate_encoded(samples)
    on_cpu, _ = DeviceDecoder(224, 'cpu')(batch)
    on_device, _ = DeviceDecoder(224, device)(batch)
    d = (on_device.cpu().int() - on_cpu.int()).abs().float()
    out = {'images': len(samples), 'device': str(device), 'mean_abs_diff': d.mean().item(),
           'share_over_8_levels': (d > 8).float().mean().item(), 'max_abs_diff': d.max().item()}
    out['ok'] = out['mean_abs_diff'] < 1.5 and out['share_over_8_levels'] < 0.01
    return out


def ema_matches_a_blocking_evaluation(run_dir: Path, data_path: str, cache: bool, tolerance: float) -> dict:
    from tools.evaluate import run
    logged = json.loads((run_dir / 'log.txt').read_text().splitlines()[-1])
    if 'test_ema_acc1' not in logged:
        raise SystemExit(f'{run_dir}/log.txt: the last epoch has no EMA metrics (test_ema_acc1)')
    again = run(run_dir / 'checkpoint.pth', data_path=data_path, cache=cache, use_ema=True,
                out=run_dir / 'ema_eval', num_workers=4)
    out = {'logged_ema_acc1': logged['test_ema_acc1'], 'blocking_ema_acc1': again['acc1'],
           'logged_ema_loss': logged['test_ema_loss'], 'blocking_ema_nll': again['nll'], 'n': again['n']}
    out['ok'] = abs(out['logged_ema_acc1'] - out['blocking_ema_acc1']) <= tolerance and \
        abs(out['logged_ema_loss'] - out['blocking_ema_nll']) <= 1e-2 * max(1.0, out['blocking_ema_nll'])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='check', required=True)
    m = sub.add_parser('maxsup-amp')
    m.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g = sub.add_parser('gpu-decode')
    g.add_argument('cache_dir', type=Path)
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    e = sub.add_parser('ema')
    e.add_argument('run_dir', type=Path)
    e.add_argument('--data-path', default=None, help="default: the run's own data set (e.g. DEMO)")
    e.add_argument('--cache', action='store_true')
    e.add_argument('--tolerance', type=float, default=0.2,
                   help='top-1 points: fp16 AMP on the device vs fp32 on the CPU may flip an image or two')
    a = ap.parse_args(argv)
    if a.check == 'maxsup-amp':
        out = maxsup_under_autocast(torch.device(a.device))
    elif a.check == 'gpu-decode':
        out = gpu_decode_matches_the_cpu(a.cache_dir, torch.device(a.device))
    else:
        out = ema_matches_a_blocking_evaluation(a.run_dir, a.data_path, a.cache, a.tolerance)
    print(json.dumps(out))
    print(f'{a.check}: {"OK" if out["ok"] else "FAILED"}')
    return 0 if out['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
