"""Forward+backward time of the MaxSup loss vs. the official formulation and torch's label smoothing.

Candidates run interleaved (A B C A B C ...) so machine noise hits all alike; ratios are medians of
per-round ratios against ``F.cross_entropy(label_smoothing=0.1)``.

    python -m benchmarks.bench_loss [--batch 256 --classes 1000 --rounds 30 --iters 20 --device cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from deit.losses import MaxSupLoss


def official_maxsup(z, t, alpha=0.1):
    """The official DeiT engine's 4 lines: soft CE + alpha * mean(top1 - mean)."""
    top1 = z.topk(1, -1)[0]
    reg = top1 - z.mean(-1, keepdim=True)
    ce = torch.sum(-t * F.log_softmax(z, dim=-1), dim=-1).mean()
    return ce + alpha * reg.mean()


def candidates(B, K, device):
    g = torch.Generator(device='cpu').manual_seed(0)
    z = torch.randn(B, K, generator=g).to(device)
    y = torch.randint(0, K, (B,), generator=g).to(device)
    t = F.one_hot(y, K).float()
    fused = MaxSupLoss(0.1)
    fused_nocheck = MaxSupLoss(0.1, validate=False)
    return z, {
        'torch_ce_ls0.1 (hard)': lambda x: F.cross_entropy(x, y, label_smoothing=0.1),
        'maxsup_fused (hard)': lambda x: fused(x, y),
        'maxsup_fused (soft)': lambda x: fused(x, t),
        'maxsup_fused no-check (hard)': lambda x: fused_nocheck(x, y),
        'official_maxsup (soft)': lambda x: official_maxsup(x, t),
    }


def time_one(fn, z, iters, device):
    x = z.detach().requires_grad_()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x).backward()
        x.grad = None
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def run(B, K, rounds, iters, device):
    z, cands = candidates(B, K, device)
    for fn in cands.values():  # warm-up
        time_one(fn, z, 3, device)
    times = {k: [] for k in cands}
    for _ in range(rounds):
        for k, fn in cands.items():
            times[k].append(time_one(fn, z, iters, device))
    base = 'torch_ce_ls0.1 (hard)'
    result = {}
    for k, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, times[base]))
        result[k] = {'median_us': statistics.median(ts) * 1e6, 'ratio_vs_torch_ls': ratio}
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--classes', type=int, default=1000)
    ap.add_argument('--rounds', type=int, default=30)
    ap.add_argument('--iters', type=int, default=20)
    ap.add_argument('--device', default=None, help='cpu, cuda, or both when unset and CUDA is present')
    ap.add_argument('--json', default=None, help='also write the results here')
    args = ap.parse_args()
    devices = [args.device] if args.device else ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    out = {}
    for dev in devices:
        res = run(args.batch, args.classes, args.rounds, args.iters, torch.device(dev))
        out[dev] = res
        print(f'\n[{dev}] B={args.batch} K={args.classes} float32, forward+backward, '
              f'{args.rounds} interleaved rounds x {args.iters} iters')
        print(f'{"candidate":32s} {"median us":>10s} {"ratio vs torch LS":>18s}')
        for k, v in res.items():
            print(f'{k:32s} {v["median_us"]:10.1f} {v["ratio_vs_torch_ls"]:18.3f}')
        fused, official = res['maxsup_fused (soft)']['median_us'], res['official_maxsup (soft)']['median_us']
        print(f'fused/official (soft targets): {fused / official:.3f}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=2)


if __name__ == '__main__':
    main()
