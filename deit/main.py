"""DeiT training and evaluation with MaxSup (``python -m deit.main``), DeiT's flags on timm 1.0.

Paper recipe (DeiT-S, 8 GPUs x 128 = batch 1024, 300 epochs): see scripts/train_with_MaxSup.sh.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from deit import distributed as du
from deit.checkpoint import (CheckpointError, read_state_dict, restore_rng, rng_state, save_atomic,
                             torch_load)
from deit.datasets import build_dataset
from deit.engine import LossScaler, NonFiniteLossError, evaluate, train_one_epoch
from deit.losses import (HARD_LABEL_LOSSES, LOSSES, SCHEDULED_LOSSES, AlphaSchedule, DistillationLoss,
                         LabelSmoothingLoss, create_criterion)
from deit.models import adapt_state_dict_for_finetune, create_model
from deit.rundir import (RunDirLocked, lock_run_dir, release_run_dir, remove_stale_temp_files, repair_log,
                         set_aside_log)
from deit.samplers import DistributedEvalSampler, RASampler


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('DeiT training and evaluation with MaxSup', add_help=True)
    a = p.add_argument
    a('--batch-size', default=64, type=int, help='per-process batch size')
    a('--epochs', default=300, type=int)
    a('--bce-loss', action='store_true', help='BCE on mixed labels (DeiT III); only with --loss ce')
    a('--unscale-lr', action='store_true', help='use --lr as is, not lr * batch * world / 512')
    # model
    a('--model', default='deit_small_patch16_224', type=str, help='any timm model, or deit_demo_patch4_32')
    a('--input-size', default=224, type=int)
    a('--drop', type=float, default=0.0, help='dropout rate')
    a('--drop-path', type=float, default=0.1, help='stochastic depth rate')
    a('--model-ema', action=argparse.BooleanOptionalAction, default=False)
    a('--model-ema-decay', type=float, default=0.99996)
    a('--model-ema-force-cpu', action='store_true')
    # optimizer / schedule (timm)
    a('--opt', default='adamw', type=str)
    a('--opt-eps', default=1e-8, type=float)
    a('--opt-betas', default=None, type=float, nargs='+')
    a('--clip-grad', type=float, default=None, help='max grad norm (off when unset)')
    a('--momentum', type=float, default=0.9)
    a('--weight-decay', type=float, default=0.05)
    a('--sched', default='cosine', type=str)
    a('--lr', type=float, default=5e-4)
    a('--lr-noise', type=float, nargs='+', default=None)
    a('--lr-noise-pct', type=float, default=0.67)
    a('--lr-noise-std', type=float, default=1.0)
    a('--warmup-lr', type=float, default=1e-6)
    a('--min-lr', type=float, default=1e-5)
    a('--decay-epochs', type=float, default=30)
    a('--warmup-epochs', type=int, default=5)
    a('--cooldown-epochs', type=int, default=10)
    a('--patience-epochs', type=int, default=10)
    a('--decay-rate', '--dr', type=float, default=0.1)
    # augmentation
    a('--color-jitter', type=float, default=0.3)
    a('--aa', type=str, default='rand-m9-mstd0.5-inc1', help='timm auto-augment policy, "none" to disable')
    a('--smoothing', type=float, default=0.0,
      help="DeiT's label smoothing; 0 by default because the regulariser is chosen with --loss")
    a('--train-interpolation', type=str, default='bicubic')
    a('--repeated-aug', action=argparse.BooleanOptionalAction, default=True)
    a('--train-mode', action=argparse.BooleanOptionalAction, default=True)
    a('--ThreeAugment', action='store_true')
    a('--src', action='store_true', help='simple random crop (with --ThreeAugment)')
    a('--reprob', type=float, default=0.25)
    a('--remode', type=str, default='pixel')
    a('--recount', type=int, default=1)
    a('--resplit', action='store_true', default=False, help='accepted for DeiT commands; no effect, as in DeiT')
    a('--mixup', type=float, default=0.8)
    a('--cutmix', type=float, default=1.0)
    a('--cutmix-minmax', type=float, nargs='+', default=None)
    a('--mixup-prob', type=float, default=1.0)
    a('--mixup-switch-prob', type=float, default=0.5)
    a('--mixup-mode', type=str, default='batch', choices=('batch', 'pair', 'elem'))
    # distillation
    a('--teacher-model', default='regnety_160', type=str)
    a('--teacher-path', type=str, default='')
    a('--distillation-type', default='none', choices=['none', 'soft', 'hard'])
    a('--distillation-alpha', default=0.5, type=float)
    a('--distillation-tau', default=1.0, type=float)
    a('--finetune', default='', help='initialise from this checkpoint (head reset / pos-embed resize as needed)')
    # loss family (MaxSup)
    a('--loss', default='maxsup', choices=LOSSES)
    a('--alpha', '--maxsup-alpha', dest='alpha', type=float, default=0.1,
      help='regulariser weight at epoch 0 (maxsup, ls, ls_reg_only, ls_err_only; ols: its initial smoothing)')
    a('--alpha-end', '--maxsup-alpha-end', dest='alpha_end', type=float, default=0.2,
      help='weight at the last epoch, linear in between: the paper schedules MaxSup AND label smoothing '
           '0.1 -> 0.2 by default (Sec. 5.1, App. F)')
    a('--alpha-schedule', choices=('linear', 'constant'), default='linear',
      help="'constant': the weight stays --alpha all run (Table 1; Table 8's fixed column)")
    a('--ols-a', type=float, default=0.5)
    a('--zipf-weight', type=float, default=1.0)
    a('--zipf-power', type=float, default=1.0)
    a('--zipf-loss-mask', action='store_true',
      help="Zipf LS term on correctly classified samples only (the authors' --mask; off by default, as theirs)")
    a('--logit-penalty-beta', type=float, default=2e-3)
    # data
    a('--data-path', default=None, type=str)
    a('--data-set', default='IMNET', choices=['IMNET', 'CIFAR10', 'CIFAR100', 'FOLDER', 'DEMO'])
    a('--cache', action='store_true', help='read IMNET from the in-memory ZIP cache (data/)')
    a('--cache-mode', default='full', choices=['full', 'part'], help="'part': each rank keeps 1/world of it")
    a('--skip-bad-images', action='store_true',
      help='drop unreadable images (ZIP cache or folders) from their batch, counted and logged, instead of failing')
    a('--eval-crop-ratio', default=0.875, type=float)
    # run
    a('--output_dir', '--output-dir', default='', help='where to save checkpoints and logs, empty for none')
    a('--device', default=None, help='cuda or cpu (default: cuda when available)')
    a('--seed', default=0, type=int)
    a('--resume', default='', help='checkpoint to resume from (default: output_dir/checkpoint.pth if present)')
    a('--auto-resume', action=argparse.BooleanOptionalAction, default=True)
    a('--start_epoch', '--start-epoch', default=0, type=int)
    a('--eval', action='store_true', help='evaluate only')
    a('--eval-every', default=1, type=int, help='evaluate every N epochs (and always after the last)')
    a('--dist-eval', action='store_true', help='shard evaluation over ranks (exact)')
    a('--num_workers', '--num-workers', default=10, type=int)
    a('--pin-mem', action=argparse.BooleanOptionalAction, default=True)
    a('--amp', action=argparse.BooleanOptionalAction, default=None, help='mixed precision (default: on for CUDA)')
    a('--print-freq', default=50, type=int)
    a('--max-steps-per-epoch', default=None, type=int, help='cap steps per epoch (smoke tests)')
    return p


def check_args(args) -> None:
    """Reject flag combinations that would silently do something else than asked."""
    if args.loss != 'ce' and args.smoothing > 0:
        raise ValueError(f'--smoothing {args.smoothing} with --loss {args.loss} regularises twice; '
                         f'use --smoothing 0 (the paper recipe) or --loss ce')
    if args.bce_loss and args.loss != 'ce':
        raise ValueError(f'--bce-loss replaces the loss; it only combines with --loss ce, not {args.loss}')
    mixup = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if args.loss in HARD_LABEL_LOSSES and mixup:
        raise ValueError(f'--loss {args.loss} is defined for hard labels; add --mixup 0 --cutmix 0')
    if args.distillation_type != 'none' and args.finetune and not args.eval:
        raise ValueError('finetuning with distillation is not supported (as in DeiT)')
    if args.epochs < 1 and not args.eval:
        raise ValueError(f'--epochs {args.epochs}: train for at least 1 epoch (or pass --eval to only evaluate)')
    if args.eval_every < 1:
        raise ValueError(f'--eval-every {args.eval_every}: must be >= 1')


def build_loaders(args, dataset_train, dataset_val):
    world, rank = du.get_world_size(), du.get_rank()
    if getattr(dataset_train, 'shard', None) is not None:  # ZIP cache_mode='part': each rank its own shard
        from data.zip_cache import ShardSampler
        sampler_train = ShardSampler.for_dataset(dataset_train, world, seed=args.seed)
    elif args.distributed and args.repeated_aug:
        sampler_train = RASampler(dataset_train, world, rank, shuffle=True, seed=args.seed)
    elif args.distributed:
        sampler_train = torch.utils.data.DistributedSampler(dataset_train, world, rank, shuffle=True, seed=args.seed)
    else:
        sampler_train = torch.utils.data.RandomSampler(dataset_train)
    if args.distributed and args.dist_eval:
        sampler_val = DistributedEvalSampler(dataset_val, world, rank)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    common = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and torch.cuda.is_available(),
                  persistent_workers=args.num_workers > 0)

    def collate(ds, keep_even: bool):
        if getattr(ds, 'skip_bad', False):
            from data.zip_cache import collate_skip_bad
            return functools.partial(collate_skip_bad, keep_even=keep_even)
        return None

    loader_train = torch.utils.data.DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size,
                                               drop_last=True, collate_fn=collate(dataset_train, True), **common)
    loader_val = torch.utils.data.DataLoader(dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size),
                                             drop_last=False, collate_fn=collate(dataset_val, False), **common)
    if not args.eval and len(loader_train) == 0:
        raise ValueError(f'--batch-size {args.batch_size} is larger than this rank\'s share of the training set '
                         f'({len(sampler_train)} samples): no full batch to train on')
    return sampler_train, loader_train, loader_val


def load_teacher(args, nb_classes, device):
    teacher = create_model(args.teacher_model, nb_classes, input_size=None)
    if not args.teacher_path:
        raise ValueError('--distillation-type needs --teacher-path (a checkpoint of --teacher-model)')
    teacher.load_state_dict(read_state_dict(args.teacher_path))
    return teacher.to(device).eval()


def parameter_checksum(model) -> str:
    """Exact fingerprint of the weights (sum and sum of squares in float64): equal on every DDP rank."""
    s = sum(p.detach().double().sum() for p in model.parameters())
    s2 = sum(p.detach().double().pow(2).sum() for p in model.parameters())
    return f'{float(s):.12e}/{float(s2):.12e}'


def main(args) -> dict:
    du.init_distributed_mode(args)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(du.cleanup)
        return _run(args, cleanup)


def claim_output_dir(args, cleanup: contextlib.ExitStack) -> Path | None:
    """Create and lock the run folder (rank 0), clear killed saves' temp files; every rank learns the outcome."""
    output_dir = Path(args.output_dir) if args.output_dir else None
    error = None
    if output_dir and du.is_main_process():
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            cleanup.callback(release_run_dir, lock_run_dir(output_dir))
            remove_stale_temp_files(output_dir)
        except (RunDirLocked, OSError) as e:
            error = str(e)
    error = du.broadcast_object(error)  # a refusal on rank 0 must not leave the other ranks waiting
    if error:
        raise RunDirLocked(error)
    return output_dir


# ---------------------------------------------------------------------------------------------------------
# phases of a run
# ---------------------------------------------------------------------------------------------------------
def setup_device(args) -> tuple[torch.device, bool]:
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if args.distributed and device.type == 'cuda':
        device = torch.device('cuda', args.gpu)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels (DeiT)
    amp = device.type == 'cuda' if args.amp is None else args.amp
    # all three generators (as timm's random_seed): RandAugment and random erasing draw from python's
    # `random`, so leaving it unseeded made two runs with one --seed differ, and resumes inexact
    seed = args.seed + du.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return device, amp


def build_data(args):
    dataset_train, nb_classes = build_dataset(True, args)
    dataset_val, nb_val = build_dataset(False, args)
    if nb_val != nb_classes:
        raise ValueError(f'train set has {nb_classes} classes but val set has {nb_val}')
    args.nb_classes = nb_classes
    sampler_train, loader_train, loader_val = build_loaders(args, dataset_train, dataset_val)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=nb_classes)
    return SimpleNamespace(train=dataset_train, val=dataset_val, nb_classes=nb_classes, sampler_train=sampler_train,
                           loader_train=loader_train, loader_val=loader_val, mixup_fn=mixup_fn)


def build_model(args, nb_classes: int, device) -> torch.nn.Module:
    model = create_model(args.model, nb_classes, input_size=args.input_size, drop_rate=args.drop,
                         drop_path_rate=args.drop_path)
    if args.finetune:
        state, reset = adapt_state_dict_for_finetune(read_state_dict(args.finetune), model)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in reset]
        if missing or result.unexpected_keys:
            raise CheckpointError(f'--finetune {args.finetune} does not fit {args.model}: missing {missing[:8]}, '
                                  f'unexpected {result.unexpected_keys[:8]}')
        print(f'finetune from {args.finetune}: all weights loaded; new {reset or "nothing"}')
    if args.distillation_type != 'none':
        if not hasattr(model, 'set_distilled_training'):
            raise ValueError(f'--distillation-type {args.distillation_type} needs a distilled model '
                             f'(e.g. deit_small_distilled_patch16_224), not {args.model}')
        model.set_distilled_training(True)
    patch = getattr(getattr(model, 'patch_embed', None), 'patch_size', None)
    if patch is not None and (args.input_size % patch[0] or args.input_size < patch[0]):
        ok = max(patch[0], args.input_size // patch[0] * patch[0])
        raise ValueError(f'--input-size {args.input_size} is not a multiple of {args.model}\'s patch size '
                         f'{patch[0]}: pixels would be cut off; use e.g. --input-size {ok}')
    return model.to(device)


def build_criterion(args, nb_classes: int, mixup_fn, device):
    """(criterion, base_criterion, alpha schedule), on ``device`` (OLS keeps its soft labels in buffers)."""
    base_criterion = create_criterion(args)
    if args.bce_loss:
        base_criterion = torch.nn.BCEWithLogitsLoss()
    elif args.loss == 'ce' and args.smoothing > 0 and mixup_fn is None:
        base_criterion = LabelSmoothingLoss(args.smoothing)
    end = args.alpha if args.alpha_schedule == 'constant' else args.alpha_end
    schedule = AlphaSchedule(args.alpha, end, args.epochs) if args.loss in SCHEDULED_LOSSES else None
    teacher = load_teacher(args, nb_classes, device) if args.distillation_type != 'none' else None
    criterion = DistillationLoss(base_criterion, teacher, args.distillation_type, args.distillation_alpha,
                                 args.distillation_tau).to(device)
    print(f'criterion: {base_criterion}' + (f', {schedule}' if schedule else ''))
    return criterion, base_criterion, schedule


def build_optimization(args, model):
    """(optimizer, lr scheduler); --lr is scaled by the total batch unless --unscale-lr."""
    world = du.get_world_size()
    base_lr = args.lr
    if not args.unscale_lr:
        args.lr = base_lr * args.batch_size * world / 512.0
    print(f'effective batch size {args.batch_size} x {world} = {args.batch_size * world}; '
          f'lr {args.lr:.3g} ({"as given" if args.unscale_lr else f"{base_lr:g} x batch / 512"})')
    opt_kwargs = {'eps': args.opt_eps} if args.opt_eps is not None else {}
    if args.opt_betas:
        opt_kwargs['betas'] = tuple(args.opt_betas)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, **opt_kwargs)
    # timm appends --cooldown-epochs to the schedule; like DeiT we train exactly --epochs
    lr_scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
        noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed)
    return optimizer, lr_scheduler


def read_resume_checkpoint(args, output_dir: Path | None):
    """(path, checkpoint) to resume from, or (None, None); the same on every rank.

    Rank 0 decides (its --resume, or output_dir/checkpoint.pth); ranks that cannot read that file (an
    output dir that is not shared between nodes) receive rank 0's copy, so no rank silently starts fresh.
    """
    path = args.resume
    if du.is_main_process() and not path and args.auto_resume and output_dir and \
            (output_dir / 'checkpoint.pth').is_file():
        path = str(output_dir / 'checkpoint.pth')
        print(f'auto-resuming from {path}')
    path = du.broadcast_object(path or None)
    if path is None:
        return None, None
    if all(du.all_gather_object(Path(path).is_file())):
        return path, torch_load(path)
    ckpt, error = None, None
    if du.is_main_process():
        try:
            ckpt = torch_load(path)
        except (CheckpointError, FileNotFoundError) as e:
            error = str(e)
    ckpt, error = du.broadcast_object((ckpt, error))
    if error:
        raise CheckpointError(error)
    print(f'{path} is not readable on every rank: rank 0 sent its copy')
    return path, ckpt


def restore_weights(model, ckpt: dict, path: str, name: str) -> None:
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        raise CheckpointError(f'{path}: no "model" entry; not a training checkpoint')
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        raise CheckpointError(f'{path} does not fit {name}: {str(e).splitlines()[0]} ...') from e


def wrap_model(args, model, device):
    """DDP (its constructor broadcasts rank 0's weights), then the EMA from those synced weights.

    Creating the EMA before DDP would start each rank's EMA from its own random init (seed + rank).
    """
    ddp = model
    if args.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == 'cuda'
                                                        else None)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)
    return ddp, model_ema


def run_training(args, run, data, output_dir: Path | None) -> dict:
    """The epoch loop: train, evaluate, checkpoint, log. ``run`` holds the model, optimiser, criterion, ..."""
    tb = open_tensorboard(output_dir)
    dist_sum = args.distributed and args.dist_eval
    print(f'Start training for {args.epochs} epochs (from epoch {args.start_epoch})')
    start_time = time.time()
    test_stats = {}
    for epoch in range(args.start_epoch, args.epochs):
        if hasattr(data.sampler_train, 'set_epoch'):
            data.sampler_train.set_epoch(epoch)
        if run.schedule is not None:
            run.base_criterion.alpha = run.schedule(epoch)
        train_stats = train_one_epoch(
            run.model, run.criterion, data.loader_train, run.optimizer, run.device, epoch, run.loss_scaler,
            amp=run.amp, max_norm=args.clip_grad, model_ema=run.model_ema, mixup_fn=data.mixup_fn,
            bce_loss=args.bce_loss, num_classes=data.nb_classes, print_freq=args.print_freq,
            max_steps=args.max_steps_per_epoch, set_training_mode=args.train_mode,
            batches_may_be_empty=getattr(data.train, 'skip_bad', False))
        if hasattr(run.base_criterion, 'next_epoch'):
            run.base_criterion.next_epoch()
        if getattr(data.train, 'skip_bad', False):
            skipped = int(du.all_reduce_sum(torch.tensor(data.train.pop_skipped())))
            train_stats['skipped_images'] = skipped
            if skipped:
                print(f'epoch {epoch}: skipped {skipped} unreadable training images (--skip-bad-images)')
        run.lr_scheduler.step(epoch + 1)
        alpha = getattr(run.base_criterion, 'alpha', None)
        evaluated = epoch == args.epochs - 1 or (epoch + 1) % args.eval_every == 0
        if evaluated:
            test_stats = evaluate_run(args, run, data, dist_sum)
        is_best = evaluated and test_stats['acc1'] > run.max_accuracy
        if evaluated:
            run.max_accuracy = max(run.max_accuracy, test_stats['acc1'])
            print(f'Max accuracy: {run.max_accuracy:.2f}%')
        log = {'epoch': epoch, 'alpha': alpha, 'lr': train_stats['lr'],
               **{f'train_{k}': v for k, v in train_stats.items()},  # test_* only when measured this epoch
               **({f'test_{k}': v for k, v in test_stats.items()} if evaluated else {}),
               'n_parameters': run.n_parameters}
        if output_dir:
            save_epoch(args, run, epoch, output_dir, is_best, log, tb, test_stats)
        print(f'epoch {epoch}: alpha {alpha}, lr {train_stats["lr"]:.3g}, '
              f'train loss {train_stats.get("loss", float("nan")):.4f}')
    if tb is not None:
        tb.close()
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return test_stats


def evaluate_run(args, run, data, dist_sum: bool) -> dict:
    amp = run.amp and run.device.type == 'cuda'
    stats = evaluate(data.loader_val, run.model, amp=amp, distributed_sum=dist_sum, print_freq=args.print_freq)
    if run.model_ema is not None:  # on the EMA's own device (CPU with --model-ema-force-cpu)
        ema_stats = evaluate(data.loader_val, run.model_ema.module, amp=amp, distributed_sum=dist_sum,
                             print_freq=args.print_freq)
        stats.update({f'ema_{k}': v for k, v in ema_stats.items()})
    if getattr(data.val, 'skip_bad', False):  # --skip-bad-images: say over how many images accuracy was taken
        passes = 2 if run.model_ema is not None else 1
        skipped = int(du.all_reduce_sum(torch.tensor(data.val.pop_skipped()))) // passes
        stats['skipped_images'] = skipped
        if skipped:
            print(f'evaluation skipped {skipped} unreadable image(s): accuracy is over the other {stats["n"]}')
    return stats


def save_epoch(args, run, epoch: int, output_dir: Path, is_best: bool, log: dict, tb, test_stats: dict) -> None:
    """Every rank contributes its RNG state; rank 0 writes best_checkpoint.pth, the log line, checkpoint.pth.

    checkpoint.pth is written last (see deit/rundir.py): whatever kills the run, the resume point and
    the files behind it agree.
    """
    rng = du.all_gather_object(rng_state())
    if not du.is_main_process():
        return
    state = {
        'model': run.model_without_ddp.state_dict(), 'optimizer': run.optimizer.state_dict(),
        'lr_scheduler': run.lr_scheduler.state_dict(), 'scaler': run.loss_scaler.state_dict(),
        'epoch': epoch, 'args': args, 'max_accuracy': run.max_accuracy, 'world_size': du.get_world_size(),
        'alpha': {'value': getattr(run.base_criterion, 'alpha', None),
                  'schedule': run.schedule.state_dict() if run.schedule else None},
        'criterion': run.base_criterion.state_dict(), 'rng': rng, 'log': log, 'test_stats': test_stats,
    }
    if run.model_ema is not None:
        state['model_ema'] = run.model_ema.module.state_dict()
    if is_best:
        save_atomic(state, output_dir / 'best_checkpoint.pth')
    write_log(output_dir, tb, log, epoch)
    save_atomic(state, output_dir / 'checkpoint.pth')


def restore_training_state(args, run, ckpt: dict, path: str) -> None:
    """Optimiser, schedule, scaler, EMA, criterion state and this rank's RNG streams from ``ckpt``."""
    world = du.get_world_size()
    if 'optimizer' in ckpt and 'epoch' in ckpt:
        run.optimizer.load_state_dict(ckpt['optimizer'])
        run.lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
        args.start_epoch = ckpt['epoch'] + 1
        if ckpt.get('scaler') and run.loss_scaler.is_enabled():
            run.loss_scaler.load_state_dict(ckpt['scaler'])
        elif run.loss_scaler.is_enabled():  # saved without fp16 AMP (e.g. a CPU run): fresh dynamic scale
            print(f'note: {path} has no loss-scaler state (saved without fp16 AMP); starting a fresh scale')
        if run.model_ema is not None and 'model_ema' in ckpt:
            run.model_ema.module.load_state_dict(ckpt['model_ema'])
        if 'criterion' in ckpt:
            run.base_criterion.load_state_dict(ckpt['criterion'])
        run.max_accuracy = ckpt.get('max_accuracy', 0.0)
        run.last_test_stats = ckpt.get('test_stats') or {}
        if getattr(args, 'output_dir', None) and du.is_main_process():
            repair_log(Path(args.output_dir), ckpt['epoch'], ckpt.get('log'))
        done = restore_rng(ckpt.get('rng'), du.get_rank(), world, reseed=args.seed + 1000 * args.start_epoch)
        if done != 'restored':
            print(f'note: RNG streams {done}')
    if ckpt.get('world_size', world) != world:
        print(f'note: checkpoint written with {ckpt["world_size"]} process(es), resuming with {world}: the '
              f'lr schedule continues from the checkpoint; data order and RNG streams differ')
    print(f'resumed from {path} (epoch {ckpt.get("epoch", "?")}); starting at epoch {args.start_epoch}')


def open_tensorboard(output_dir: Path | None):
    if not output_dir or not du.is_main_process():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(output_dir / 'tb'))
    except ImportError:  # tensorboard is in requirements.txt; keep training without it
        print('tensorboard not installed: no TensorBoard scalars')
        return None


def write_log(output_dir: Path, tb, log: dict, epoch: int) -> None:
    with open(output_dir / 'log.txt', 'a') as f:
        f.write(json.dumps(log) + '\n')
        f.flush()
        os.fsync(f.fileno())
    if tb is not None:
        for k, v in log.items():
            if isinstance(v, (int, float)) and v is not None and k != 'epoch':
                tb.add_scalar(k, v, epoch)
        tb.flush()


def _run(args, cleanup: contextlib.ExitStack) -> dict:
    check_args(args)
    device, amp = setup_device(args)
    data = build_data(args)
    model = build_model(args, data.nb_classes, device)
    criterion, base_criterion, schedule = build_criterion(args, data.nb_classes, data.mixup_fn, device)
    optimizer, lr_scheduler = build_optimization(args, model)
    run = SimpleNamespace(model_without_ddp=model, device=device, amp=amp, criterion=criterion,
                          base_criterion=base_criterion, schedule=schedule, optimizer=optimizer,
                          lr_scheduler=lr_scheduler, max_accuracy=0.0, last_test_stats={},
                          loss_scaler=LossScaler(device.type, enabled=amp and device.type == 'cuda'),
                          n_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
    print(f'model {args.model}: {run.n_parameters / 1e6:.2f}M parameters, {data.nb_classes} classes')
    output_dir = claim_output_dir(args, cleanup)
    resume_path, ckpt = read_resume_checkpoint(args, output_dir)
    if ckpt is None and output_dir and not args.eval and du.is_main_process():
        set_aside_log(output_dir)
    if ckpt is not None:  # weights before DDP: its constructor then broadcasts them
        restore_weights(model, ckpt, resume_path, args.model)
    run.model, run.model_ema = wrap_model(args, model, device)
    if ckpt is not None:
        if args.eval:
            print(f'evaluating {resume_path} (epoch {ckpt.get("epoch", "?")})')
        else:
            restore_training_state(args, run, ckpt, resume_path)
        del ckpt
    lr_scheduler.step(args.start_epoch)
    if args.eval:
        run.model_ema = None  # --eval measures the weights it was given
        stats = evaluate_run(args, run, data, args.distributed and args.dist_eval)
        print(f'Accuracy of the network on the {stats["n"]} test images: {stats["acc1"]:.2f}%')
        return stats
    if args.start_epoch >= args.epochs:  # a finished run started again: say where it ended
        print(f'{resume_path}: training already finished ({args.epochs} epochs); nothing to do')
        test_stats = run.last_test_stats
    else:
        test_stats = run_training(args, run, data, output_dir)
    checksum = parameter_checksum(model)
    du.print_all(f'[rank {du.get_rank()}] parameter checksum {checksum}')
    if run.model_ema is not None:
        du.print_all(f'[rank {du.get_rank()}] ema checksum {parameter_checksum(run.model_ema.module)}')
    if test_stats:
        print(f'Final accuracy: top-1 {test_stats["acc1"]:.2f}%  top-5 {test_stats["acc5"]:.2f}%  '
              f'ECE {test_stats["ece"]:.4f}  (best top-1 {run.max_accuracy:.2f}%)')
    return {'test': test_stats, 'max_accuracy': run.max_accuracy, 'param_checksum': checksum}


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2 if not isinstance(e, NonFiniteLossError) else 3
    return 0


if __name__ == '__main__':
    sys.exit(cli())
