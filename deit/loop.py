"""The epoch loop of a run: train, evaluate, checkpoint, log; and the save at a stop signal.

One epoch is :func:`deit.engine.train_one_epoch` (the steps) and :func:`deit.engine.evaluate`; this module
decides which epochs are evaluated, what is saved when, and keeps every rank in step while doing it.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import time
from pathlib import Path

import numpy as np
import torch

from data.io import save_atomic
from deit import distributed as du
from deit.build import Data
from deit.engine import NonFiniteLossError, evaluate, train_one_epoch
from deit.preemption import REQUEUE_EXIT, Preempted, StopSignal
from deit.rundir import open_tensorboard, write_log
from deit.train_state import TrainingState, checkpoint_dict, rng_state


@dataclasses.dataclass
class Run:
    """The model side of a run: what the training step calls (``model``: DDP and torch.compile applied),
    where and in which precision, the criterion (distillation wrapper included) and its alpha schedule,
    and the resumable :class:`TrainingState` (the plain model, optimiser, ..., EMA)."""
    model: torch.nn.Module
    device: torch.device
    amp: bool
    amp_dtype: torch.dtype
    criterion: torch.nn.Module
    schedule: object
    state: TrainingState
    memory_format: torch.memory_format | None = None
    tb_resume: tuple | None = None  # (epoch, record) of the checkpoint resumed: TensorBoard is repaired from it

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.state.model.parameters() if p.requires_grad)


def run_training(cfg, run: Run, data: Data, output_dir: Path | None, stop_signal: StopSignal | None = None) -> dict:
    """The epoch loop. At a stop signal the epoch in flight ends after its next optimizer step, which is
    saved with :func:`save_stop`; :class:`Preempted` is raised then."""
    state = run.state
    tb = open_tensorboard(output_dir, run.tb_resume)
    print(f'Start training for {cfg.epochs} epochs (from epoch {state.start_epoch})')
    start_time = time.time()
    test_stats = {}
    for epoch in range(state.start_epoch, cfg.epochs):
        train_stats = train_epoch(cfg, run, data, epoch, output_dir, stop_signal)
        final = epoch == cfg.epochs - 1
        evaluated = final or (epoch + 1) % cfg.eval_every == 0
        if evaluated:
            test_stats = evaluate_run(cfg, run, data, final=final)
        check_finite(state, epoch, test_stats if evaluated else {}, output_dir)
        # timm's plateau schedule watches the metric it is given (as timm's train.py); without it DeiT's call
        # never lowers the lr. Time-based schedules ignore it.
        state.lr_scheduler.step(schedule_index(cfg, epoch + 1), test_stats['acc1'] if evaluated else None)
        is_best = evaluated and test_stats['acc1'] > state.max_accuracy
        if evaluated:
            state.max_accuracy = max(state.max_accuracy, test_stats['acc1'])
            print(f'Max accuracy: {state.max_accuracy:.2f}%')
        alpha = getattr(state.criterion, 'alpha', None)
        log = {'epoch': epoch, 'alpha': alpha, 'lr': train_stats['lr'],
               **{f'train_{k}': v for k, v in train_stats.items()},  # test_* only when measured this epoch
               **({f'test_{k}': v for k, v in test_stats.items()} if evaluated else {}),
               'n_parameters': run.n_parameters}
        state.epoch, state.last_log, state.last_test_stats = epoch, log, test_stats
        if output_dir:
            save_epoch(cfg, state, output_dir, is_best, tb)
        print(f'epoch {epoch}: alpha {alpha}, lr {train_stats["lr"]:.3g}, '
              f'train loss {train_stats.get("loss", float("nan")):.4f}')
    if tb is not None:
        tb.close()
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return test_stats


def schedule_index(cfg, epoch: int) -> int:
    """The schedule index whose lr ``epoch`` trains at: ``epoch`` (timm's train.py, which steps with epoch + 1
    after each epoch) or, with ``--lr-step deit``, one behind (DeiT's main.py steps with epoch)."""
    return epoch if cfg.lr_step == 'timm' else max(epoch - 1, 0)


def train_epoch(cfg, run: Run, data: Data, epoch: int, output_dir: Path | None,
                stop_signal: StopSignal | None) -> dict:
    """One epoch's steps from where the state stands (a resume mid-epoch skips the batches already trained),
    the criterion's epoch hook (OLS) and the skipped-image count."""
    state = run.state
    data.sampler_train.set_epoch(epoch)
    if run.schedule is not None:
        state.criterion.alpha = run.schedule(epoch)
    start_step, state.step = state.step, 0
    data.sampler_train.skip(start_step * cfg.batch_size)
    skip_bad = getattr(data.train, 'skip_bad', False)
    train_stats = train_one_epoch(
        run.model, run.criterion, data.loader_train, state.optimizer, run.device, epoch, state.loss_scaler,
        amp=run.amp, amp_dtype=run.amp_dtype, memory_format=run.memory_format, max_norm=cfg.clip_grad,
        clip_mode=cfg.clip_mode, model_ema=state.model_ema, mixup_fn=data.mixup_fn, print_freq=cfg.print_freq,
        max_steps=cfg.max_steps_per_epoch, set_training_mode=cfg.train_mode, batches_may_be_empty=skip_bad,
        accum_iter=cfg.accum_iter, start_step=start_step, stop_signal=stop_signal)
    if 'stopped_at_step' in train_stats:
        save_stop(cfg, state, train_stats['stopped_at_step'], output_dir, stop_signal.signum)
    if hasattr(state.criterion, 'next_epoch'):
        state.criterion.next_epoch()
    if skip_bad:
        skipped = int(du.all_reduce_sum(torch.tensor(data.train.pop_skipped())))
        train_stats['skipped_images'] = skipped
        if skipped:
            print(f'epoch {epoch}: skipped {skipped} unreadable training images (--skip-bad-images)')
    return train_stats


def check_finite(state: TrainingState, epoch: int, test_stats: dict, output_dir: Path | None) -> None:
    """Stop before saving an epoch whose weights (or EMA) or evaluation are not finite: with a too high lr the
    training loss can stay finite while the weights blow up, and saving would make every resume start from
    the wreck. Weights are identical on every rank and the numbers are rank 0's: all ranks stop together."""
    models = [state.model] + ([state.model_ema.module] if state.model_ema is not None else [])
    weights_ok = all(bool(torch.stack([torch.isfinite(p).all() for p in m.parameters()]).all())
                     for m in models)  # per model: an EMA kept on the CPU lives on another device
    bad = [k for k in ('loss', 'ece', 'ema_loss') if k in test_stats and not np.isfinite(test_stats[k])]
    if weights_ok and not bad:
        return
    what = ', '.join((['weights'] if not weights_ok else []) + [f'evaluation {k} {test_stats[k]}' for k in bad])
    kept = f'{output_dir / "checkpoint.pth"} (epoch {epoch - 1}) stays the resume point' if output_dir and \
        epoch > 0 else 'nothing was saved'
    raise NonFiniteLossError(f'epoch {epoch} diverged (not finite: {what}); it was not saved and {kept} '
                             f'(try a lower --lr, --clip-grad, or --no-amp)')


def evaluate_run(cfg, run: Run, data: Data, final: bool = True, ema: bool = True) -> dict:
    """The model's (and with ``ema``, the EMA's) validation numbers, identical on every rank.

    An EMA kept on the CPU (--model-ema-force-cpu) is evaluated only after the last epoch, on a copy on the
    training device: evaluating it on the CPU every epoch idled every GPU for minutes (timm skips it). Without
    --dist-eval every rank evaluates the whole set and rank 0's numbers are taken (a plateau schedule reading
    each rank's own top-1 could lower the lr on some ranks only).
    """
    dist_sum = cfg.distributed and cfg.dist_eval
    kw = dict(amp=run.amp and run.device.type == 'cuda', amp_dtype=run.amp_dtype, distributed_sum=dist_sum,
              print_freq=cfg.print_freq, class_counts=imbalanced_class_counts(data.train))
    stats = evaluate(data.loader_val, run.model, memory_format=run.memory_format, **kw)
    passes = 1
    model_ema = run.state.model_ema if ema else None
    if model_ema is not None and (final or not cfg.model_ema_force_cpu):
        module = model_ema.module
        if cfg.model_ema_force_cpu and run.device.type != 'cpu':
            module = copy.deepcopy(module).to(run.device)
        stats.update({f'ema_{k}': v for k, v in evaluate(data.loader_val, module, **kw).items()})
        passes = 2
    if getattr(data.val, 'skip_bad', False):  # --skip-bad-images: say over how many images accuracy was taken
        skipped = torch.tensor(data.val.pop_skipped())
        skipped = int(du.all_reduce_sum(skipped) if dist_sum else skipped) // passes  # each rank saw all
        stats['skipped_images'] = skipped
        if skipped:
            print(f'evaluation skipped {skipped} unreadable image(s): accuracy is over the other {stats["n"]}')
    return stats if dist_sum else du.broadcast_object(stats)


def imbalanced_class_counts(train) -> list[int] | None:
    """Training images per class of a long-tailed set (its evaluation adds many/medium/few-shot top-1)."""
    counts = getattr(train, 'class_counts', None)
    return counts if counts and max(counts) > min(counts) else None


def save_epoch(cfg, state: TrainingState, output_dir: Path, is_best: bool, tb) -> None:
    """Every rank contributes its RNG state; rank 0 writes best_checkpoint.pth, the log line, checkpoint.pth.

    checkpoint.pth is written last (see deit/rundir.py): whatever kills the run, the resume point and
    the files behind it agree.
    """
    rng = du.all_gather_object(rng_state())
    if not du.is_main_process():
        return
    ckpt = checkpoint_dict(state, cfg, cfg.world_size, rng)
    if is_best:
        save_atomic(ckpt, output_dir / 'best_checkpoint.pth')
    write_log(output_dir, tb, state.last_log, state.epoch)
    save_atomic(ckpt, output_dir / 'checkpoint.pth')


def save_stop(cfg, state: TrainingState, step: int, output_dir: Path | None, signum: int | None) -> None:
    """After a stop signal: checkpoint.pth of ``step`` batches into the epoch after ``state.epoch`` (every
    rank's RNG streams, the last completed epoch's log record), then raise :class:`Preempted` on every rank."""
    rng = du.all_gather_object(rng_state())
    path = output_dir / 'checkpoint.pth' if output_dir else None
    state.step = step
    if path is not None and du.is_main_process():
        save_atomic(checkpoint_dict(state, cfg, cfg.world_size, rng), path)
    saved = f'saved {path} at epoch {state.start_epoch}, step {step}' if path else 'no --output_dir: nothing saved'
    raise Preempted(f'stopped by a signal: {saved}; run the same command again to resume (exit {REQUEUE_EXIT} '
                    f'asks a requeue)', signum, str(path) if path else None)


def parameter_checksum(model) -> str:
    """Exact fingerprint of the weights (sum and sum of squares in float64): equal on every DDP rank."""
    s = sum(p.detach().double().sum() for p in model.parameters())
    s2 = sum(p.detach().double().pow(2).sum() for p in model.parameters())
    return f'{float(s):.12e}/{float(s2):.12e}'
