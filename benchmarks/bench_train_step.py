"""Train-step throughput of deit_tiny with plain CE vs MaxSup (the overhead MaxSup adds to training).

Each round runs N steps with CE, then with MaxSup, then with CE again on the same model, optimizer and
batch (interleaved, so drift in machine load hits all); ratios are medians of per-round ratios. The second
CE is the control: its ratio to the first is the measurement's noise floor, so an overhead smaller than
that |ratio - 1| is not resolved by the run.

    python -m benchmarks.bench_train_step [--model deit_tiny_patch16_224 --input-size 64 --batch 64]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2

from deit.losses import MaxSupLoss
from deit.models import create_model


def steps(model, opt, crit, x, t, n, device, scaler=None, dtype=None):
    """n optimizer steps under autocast of ``dtype`` (None: off); ``scaler``: GradScaler (float16 on CUDA)."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = crit(model(x), t)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='deit_tiny_patch16_224')
    ap.add_argument('--input-size', type=int, default=64)
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--classes', type=int, default=1000)
    ap.add_argument('--steps', type=int, default=5)
    ap.add_argument('--rounds', type=int, default=10)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--amp', action='store_true', help='autocast (float16 + GradScaler on CUDA by default)')
    ap.add_argument('--amp-dtype', choices=('float16', 'bfloat16'), default=None,
                    help='default: float16 on CUDA, bfloat16 on the CPU (no GradScaler for bfloat16)')
    ap.add_argument('--torchcompile', nargs='?', const='inductor', default=None, help='torch.compile the model')
    ap.add_argument('--channels-last', action='store_true', help='channels-last model and batch')
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, args.classes, input_size=args.input_size).to(device).train()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=0.05)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)
    x = torch.randn(args.batch, 3, args.input_size, args.input_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    t = torch.nn.functional.one_hot(y, args.classes).float() * 0.9 + 0.1 / args.classes  # Mixup-like soft targets
    crits = {'ce (SoftTargetCrossEntropy)': SoftTargetCrossEntropy(), 'maxsup': MaxSupLoss(0.1),
             'ce again (control)': SoftTargetCrossEntropy()}
    dtype = None
    if args.amp:
        dtype = getattr(torch, args.amp_dtype) if args.amp_dtype else \
            (torch.float16 if device.type == 'cuda' else torch.bfloat16)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    for c in crits.values():  # warm-up (and compilation)
        steps(model, opt, c, x, t, 2, device, scaler, dtype)
    times = {k: [] for k in crits}
    for _ in range(args.rounds):
        for k, c in crits.items():
            times[k].append(steps(model, opt, c, x, t, args.steps, device, scaler, dtype))
    mode = [f'AMP {str(dtype).removeprefix("torch.")}'] if dtype else []
    mode += (['channels-last'] if args.channels_last else []) + \
        ([f'torch.compile({args.torchcompile})'] if args.torchcompile else [])
    print(f'{args.model} @ {args.input_size}px, batch {args.batch}, {args.classes} classes, {device}'
          f'{", " + ", ".join(mode) if mode else ""}, {args.rounds} rounds x {args.steps} steps (interleaved)')
    for k, ts in times.items():
        print(f'  {k:28s} {args.batch * args.steps / statistics.median(ts):9.1f} img/s')
    ce = times['ce (SoftTargetCrossEntropy)']
    ratio = statistics.median(m / c for m, c in zip(times['maxsup'], ce))
    noise = statistics.median(m / c for m, c in zip(times['ce again (control)'], ce))
    print(f'  step-time ratio maxsup / ce: {ratio:.4f}  (overhead {100 * (ratio - 1):+.2f}%; '
          f'noise floor: ce again / ce {100 * (noise - 1):+.2f}%)')


if __name__ == '__main__':
    main()
