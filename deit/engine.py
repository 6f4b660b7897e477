"""One training epoch and one evaluation pass (DeiT's engine.py on timm 1.0 / torch.amp)."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable

import torch
import torch.nn.functional as F
from timm.utils import NativeScaler

from deit.device_aug import to_device
from deit.distributed import all_reduce_sum, any_rank, get_rank, get_world_size, is_dist
from deit.logger import MetricLogger, SmoothedValue
from deit.metrics import CalibrationBins, shot_accuracy, summary, topk_correct


class LossScaler(NativeScaler):
    """timm's NativeScaler, switched off (plain backward/step) unless fp16 AMP on CUDA needs scaling."""

    def __init__(self, device_type: str = 'cuda', enabled: bool = True):
        self._scaler = torch.amp.GradScaler(device_type, enabled=enabled)

    def is_enabled(self) -> bool:
        return self._scaler.is_enabled()


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; carries where it happened."""


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype | None = None):
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype or (torch.float16 if device.type == 'cuda'
                                                                   else torch.bfloat16))


def step_status(loss: torch.Tensor, stop: bool) -> tuple[float, list[int], bool]:
    """(loss, ranks whose loss is not finite, stop requested on any rank), the same on every rank.

    One small all-reduce per micro-batch on the loss's device (NCCL on a GPU; it replaces the host sync of
    ``loss.item()``): a check made per rank would let a rank with a NaN loss stop alone while the others wait
    in DDP's gradient all-reduce until the 30-minute timeout. The loss returned is the mean over ranks.
    """
    world = get_world_size()
    status = torch.zeros(world + 2, device=loss.device, dtype=torch.float32)
    value = loss.detach().float()
    finite = torch.isfinite(value)
    status[0] = torch.where(finite, value, torch.zeros_like(value))
    status[1 + get_rank()] = (~finite).float()
    status[-1] = float(stop)
    if is_dist():
        all_reduce_sum(status)
    out = status.tolist()
    bad = [r for r in range(world) if out[1 + r]]
    return (float('nan') if bad else out[0] / world), bad, bool(out[-1])


def train_one_epoch(model, criterion, data_loader: Iterable, optimizer, device, epoch: int, loss_scaler,
                    amp: bool = False, max_norm: float | None = None, clip_mode: str = 'norm', model_ema=None,
                    mixup_fn=None,
                    print_freq: int = 50,
                    max_steps: int | None = None, set_training_mode: bool = True,
                    batches_may_be_empty: bool = False, accum_iter: int = 1, start_step: int = 0,
                    stop_signal=None, amp_dtype: torch.dtype | None = None,
                    memory_format: torch.memory_format | None = None) -> dict:
    """Train one epoch. ``criterion(inputs, outputs, targets)`` is a DistillationLoss wrapper. A NaN/inf loss
    on any rank raises NonFiniteLossError on every rank, naming ranks, epoch and step (as DeiT: it would
    spread through weights and EMA).
    ``batches_may_be_empty`` (``--skip-bad-images``): a batch whose images were all unreadable is skipped on
    EVERY rank together (one tiny all-reduce per step): a rank that skipped its step alone would leave the
    others waiting in DDP's gradient all-reduce until the 30-minute timeout.
    ``accum_iter`` N (DeiT III / MAE): the optimizer steps every N micro-batches (and at the epoch's end) on
    the mean of their losses (each divided by N); DDP syncs gradients only on the stepping micro-batch.
    ``start_step``: steps of this epoch trained before a requeue (the loader already leaves them out).
    ``stop_signal`` (deit.preemption.StopSignal): once requested on any rank, every rank stops after the next
    optimizer step and the stats carry ``stopped_at_step`` (the steps of this epoch now trained).
    ``max_norm`` / ``clip_mode``: timm's gradient clipping (``--clip-grad`` / ``--clip-mode``: norm, value, agc).
    ``amp_dtype``: autocast's dtype (default: float16 on CUDA, bfloat16 on the CPU); ``memory_format``:
    e.g. ``torch.channels_last`` for the batches (``--channels-last``).
    """
    model.train(set_training_mode)  # DeiT's --no-train-mode keeps dropout / drop-path off while training
    logger = MetricLogger()
    logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = f'Epoch: [{epoch}]'
    skipped_steps = 0
    total = start_step + len(data_loader)
    last = min(total, max_steps if max_steps is not None else total) - 1
    stopped_at = None
    optimizer.zero_grad(set_to_none=True)
    batches = logger.log_every(data_loader, print_freq, header, batch_size_fn=lambda b: len(b[1]), start=start_step,
                               total=last + 1)
    for step, (samples, targets) in enumerate(batches, start=start_step):
        if max_steps is not None and step >= max_steps:
            break
        if batches_may_be_empty and any_rank(len(targets) == 0):
            skipped_steps += 1
            continue
        samples, targets = to_device(samples, device, memory_format), to_device(targets, device)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        update = (step + 1) % accum_iter == 0 or step == last
        loss_value, stop = train_step(model, criterion, samples, targets, optimizer, loss_scaler, update, device=device,
                                      amp=amp, amp_dtype=amp_dtype, accum_iter=accum_iter, max_norm=max_norm,
                                      clip_mode=clip_mode, stop_signal=stop_signal, where=f'epoch {epoch}, step {step}')
        if update:
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None:
                model_ema.update(model)
        logger.update(loss=loss_value, n=len(targets))
        logger.update(lr=optimizer.param_groups[0]['lr'])
        if update and stop:
            stopped_at = step + 1
            break
    return epoch_stats(logger, optimizer, epoch, stopped_at, skipped_steps if batches_may_be_empty else None)


def train_step(model, criterion, samples, targets, optimizer, loss_scaler, update: bool, *, device, amp: bool,
               amp_dtype, accum_iter: int, max_norm, clip_mode: str, stop_signal, where: str) -> tuple[float, bool]:
    """One micro-batch: forward, loss, every rank's status, backward (and the optimizer step when ``update``).
    Returns (the loss averaged over ranks, a stop requested on any rank). The stop request is read after the
    loss, so a signal that came during this step's forward stops after this step."""
    second_order = getattr(optimizer, 'is_second_order', False)
    no_sync = model.no_sync() if not update and hasattr(model, 'no_sync') else nullcontext()
    with no_sync:  # the forward too: DDP prepares its gradient all-reduce there
        with autocast(device, amp, amp_dtype):
            outputs = model(samples)
            loss = criterion(samples, outputs, targets)
        loss_value, bad_ranks, stop = step_status(loss, stop_signal is not None and stop_signal.requested)
        if bad_ranks:
            what = (f'not finite on rank {", ".join(map(str, bad_ranks))}' if is_dist() else loss.item())
            raise NonFiniteLossError(f'loss is {what} at {where}: stopping training'
                                     f'{" on every rank" if is_dist() else ""} (try a lower --lr, '
                                     f'--clip-grad, or --no-amp)')
        loss_scaler(loss / accum_iter, optimizer, clip_grad=max_norm, clip_mode=clip_mode,
                    parameters=model.parameters(), create_graph=second_order, need_update=update)
    return loss_value, stop


def epoch_stats(logger: MetricLogger, optimizer, epoch: int, stopped_at: int | None,
                skipped_steps: int | None) -> dict:
    """The epoch's averages over all ranks, its final lr, where a stop signal ended it and (``--skip-bad-images``)
    the steps every rank skipped."""
    logger.synchronize_between_processes()
    print('Averaged stats:', logger, flush=True)
    stats = {k: m.global_avg for k, m in logger.meters.items()}
    stats['lr'] = optimizer.param_groups[0]['lr']
    if stopped_at is not None:
        stats['stopped_at_step'] = stopped_at
    if skipped_steps is not None:
        stats['skipped_steps'] = skipped_steps
        if skipped_steps:
            print(f'epoch {epoch}: {skipped_steps} step(s) skipped on all ranks (a rank had no readable image)')
    return stats


@torch.no_grad()
def evaluate(data_loader: Iterable, model, device=None, amp: bool = False, n_bins: int = 15,
             distributed_sum: bool = False, print_freq: int = 50, reliability: bool = False,
             amp_dtype: torch.dtype | None = None, memory_format: torch.memory_format | None = None,
             class_counts: list[int] | None = None) -> dict:
    """Top-1/top-5 accuracy (%), mean CE loss and ECE (n_bins equal-width bins); with ``class_counts`` (training
    images per class: a long-tailed set) also the many/medium/few-shot top-1 (deit.metrics.shot_accuracy).

    With ``distributed_sum`` every rank evaluates its own disjoint shard and the *sums* are all-reduced,
    so the result equals single-process evaluation exactly. ``device`` defaults to the model's own device
    (an EMA kept on the CPU with --model-ema-force-cpu is evaluated there, not on the training GPU).
    """
    device = device or next(model.parameters()).device
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss_sum, correct1, correct5, n
    bins = CalibrationBins(n_bins)
    per_class = torch.zeros(2, len(class_counts) if class_counts else 0, dtype=torch.float64)  # correct, seen
    logger = MetricLogger()
    for images, target in logger.log_every(data_loader, print_freq, 'Test:', batch_size_fn=lambda b: len(b[1])):
        if len(target) == 0:
            continue
        # a blocking copy when it goes to the host (an EMA kept on the CPU): a non-blocking device-to-host
        # copy may still be running when the model reads it (PyTorch's docs); to_device blocks there
        images, target = to_device(images, device, memory_format), to_device(target, device)
        with autocast(device, amp, amp_dtype):
            output = model(images)
        output = output.float()
        c1, c5 = topk_correct(output, target, (1, 5))
        sums += torch.tensor([float(F.cross_entropy(output, target, reduction='sum')), c1, c5, len(target)],
                             dtype=torch.float64)
        bins.update(output.softmax(1), target)
        if class_counts:
            labels, hit = target.cpu(), (output.argmax(1) == target).double().cpu()
            per_class[0].index_add_(0, labels, hit)
            per_class[1].index_add_(0, labels, torch.ones_like(hit))
    if distributed_sum:
        all_reduce_sum(sums)
        bins.load_tensor(all_reduce_sum(bins.as_tensor()))
        if class_counts:
            all_reduce_sum(per_class)
    stats = summary(*sums.tolist(), bins)
    if class_counts:
        stats.update(shot_accuracy(per_class[0], per_class[1], class_counts))
    if reliability:
        stats['reliability'] = bins.reliability()
    print(f'* Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f} '
          f'ECE {stats["ece"]:.4f} (n={stats["n"]})', flush=True)
    return stats
