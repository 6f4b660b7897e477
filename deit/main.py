"""DeiT training and evaluation with MaxSup (``python -m deit.main``), DeiT's flags on timm 1.0.

A run in phases: device -> data -> model -> criterion -> optimisation -> run folder and resume -> DDP + EMA
-> epoch loop (train, evaluate, checkpoint, log). Flags: deit/args.py; recipes: recipes/*.yaml (``-c``);
the main command: scripts/train_with_MaxSup.sh.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import inspect
import json
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL
import torch
import yaml
from timm.data import Mixup
from timm.optim import create_optimizer_v2, get_optimizer_info
from timm.scheduler import create_scheduler_v2
from threadpoolctl import threadpool_limits
from timm.utils import ModelEmaV3

from deit import distributed as du
from deit.args import as_recipe, check_args, get_args_parser, parse_args  # noqa: F401  (get_args_parser: API)
from data.io import CheckpointError, save_atomic
from deit.checkpoint import (check_same_run, read_resume_checkpoint, read_state_dict, restore_training_state,
                             restore_weights, rng_state, training_state)
from data.decode import jpeg_decoder
from deit.datasets import build_dataset, check_same_classes, device_rand_augment, normalization
from deit.device_aug import DeviceBatches
from deit.device_decode import DeviceDecoder, collate_encoded
from deit.engine import LossScaler, NonFiniteLossError, evaluate, train_one_epoch
from deit.losses import build_criterion
from deit.models import adapt_state_dict_for_finetune, create_model
from deit.preemption import REQUEUE_EXIT, Preempted, StopSignal, WorkerSignals
from deit.rundir import (RunDirLocked, StdoutCopy, append_summary, lock_run_dir, release_run_dir,
                         remove_stale_temp_files, repair_epoch_files, set_aside_run)
from deit.samplers import DistributedEvalSampler, RASampler, SeededDataset, SeededSampler


def init_loader_worker(signals: WorkerSignals, _worker_id: int) -> None:
    """Each DataLoader worker: stop signals are the trainer's (deit.preemption), and one thread per BLAS pool
    (torch sets its own and OpenMP's to one in workers; OpenBLAS sizes its pool by the machine: 16 threads
    per worker on a 16-core host, for every worker)."""
    signals.install()
    threadpool_limits(1)


def build_loaders(args, dataset_train, dataset_val, workers: WorkerSignals):
    world, rank = du.get_world_size(), du.get_rank()
    if getattr(dataset_train, 'shard', None) is not None:  # ZIP cache_mode='part': each rank its own shard
        from data.zip_cache import ShardSampler
        sampler_train = ShardSampler.for_dataset(dataset_train, world, seed=args.seed)
    elif args.distributed and args.repeated_aug:
        sampler_train = RASampler(dataset_train, world, rank, shuffle=True, seed=args.seed)
    elif args.distributed:
        sampler_train = torch.utils.data.DistributedSampler(dataset_train, world, rank, shuffle=True, seed=args.seed)
    else:  # an order fixed by (seed, epoch), like the distributed samplers: a resume mid-epoch finds it again
        sampler_train = torch.utils.data.DistributedSampler(dataset_train, 1, 0, shuffle=True, seed=args.seed)
    sampler_train = SeededSampler(sampler_train, args.seed, rank)
    if args.distributed and args.dist_eval:
        sampler_val = DistributedEvalSampler(dataset_val, world, rank)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    # generator: the workers' base seed comes from it, not from the training process's torch stream (a new
    # loader iterator after a resume would otherwise shift that stream by one draw)
    common = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and torch.cuda.is_available(),
                  persistent_workers=args.num_workers > 0,
                  worker_init_fn=functools.partial(init_loader_worker, workers),
                  generator=torch.Generator().manual_seed(args.seed))

    def collate(ds, keep_even: bool):
        if ds is dataset_train and args.gpu_decode:  # JPEG bytes + crop/flip draws, decoded on the device
            return functools.partial(collate_encoded, keep_even=keep_even)
        if getattr(ds, 'skip_bad', False):
            from data.zip_cache import collate_skip_bad
            return functools.partial(collate_skip_bad, keep_even=keep_even)
        return None

    loader_train = torch.utils.data.DataLoader(SeededDataset(dataset_train), sampler=sampler_train,
                                               batch_size=args.batch_size,
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
    """Train (or evaluate) as ``args`` say. Raises :class:`Preempted` after saving at a stop signal."""
    du.init_distributed_mode(args)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(du.cleanup)
        stdout = cleanup.enter_context(StdoutCopy()) if du.is_main_process() else None
        workers = WorkerSignals()
        cleanup.callback(workers.release)  # leftover loader workers may then end at exit
        return _run(args, cleanup, cleanup.enter_context(StopSignal()), stdout, workers)


def claim_output_dir(args, cleanup: contextlib.ExitStack) -> Path | None:
    """Create and lock the run folder (rank 0), clear killed saves' temp files; every rank learns the outcome."""
    if args.output_dir is None and not args.eval:  # timm's convention: never no run folder by default
        name = args.experiment or f'{du.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))}-{args.model}-{args.loss}'
        args.output_dir = f'output/train/{name}'
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


def amp_dtype(args, device: torch.device) -> torch.dtype:
    """--amp-dtype, else timm's default float16 on CUDA; the CPU's autocast is bfloat16."""
    if args.amp_dtype:
        return getattr(torch, args.amp_dtype)
    return torch.float16 if device.type == 'cuda' else torch.bfloat16


def build_data(args, device, workers: WorkerSignals):
    dataset_train, nb_classes = build_dataset(True, args)
    dataset_val, _ = build_dataset(False, args)
    check_same_classes(dataset_train, dataset_val)
    args.nb_classes = nb_classes
    sampler_train, loader_train, loader_val = build_loaders(args, dataset_train, dataset_val, workers)
    if args.prefetcher:  # uint8 from the workers; normalise, erase (and --device-aug) on the device, batched
        mean, std = normalization(args)
        decoder = DeviceDecoder(args.input_size, device, dataset_train) if args.gpu_decode else None
        loader_train = DeviceBatches(loader_train, device, mean, std, args.reprob, args.remode, args.recount,
                                     rand_augment=device_rand_augment(args) if args.device_aug else None,
                                     decoder=decoder)
        loader_val = DeviceBatches(loader_val, device, mean, std)
    decode = 'torchvision.io.decode_jpeg on the device (training), ' if args.gpu_decode else ''
    print(f'input pipeline: JPEG decode by {decode}{jpeg_decoder()}, transforms by PIL {PIL.__version__}, '
          f'{"uint8 workers + device-side normalise/erase" if args.prefetcher else "float workers"}'
          f'{", RandAugment on the device" if args.device_aug else ""}'
          f'{", JPEG draft decoding" if args.jpeg_draft else ""}')
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=nb_classes)
    return SimpleNamespace(train=dataset_train, val=dataset_val, nb_classes=nb_classes, sampler_train=sampler_train,
                           loader_train=loader_train, loader_val=loader_val, mixup_fn=mixup_fn)


def build_model(args, nb_classes: int, device) -> torch.nn.Module:
    model = create_model(args.model, nb_classes, input_size=args.input_size,
                         **{'drop_rate': args.drop, 'drop_path_rate': args.drop_path, **args.model_kwargs})
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
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)


def setup_criterion(args, nb_classes: int, mixup_fn, device):
    """deit.losses.build_criterion with the distillation teacher loaded; printed and moved to ``device``."""
    teacher = load_teacher(args, nb_classes, device) if args.distillation_type != 'none' else None
    criterion, base, schedule = build_criterion(args, nb_classes, mixup_fn is not None, teacher)
    print(f'criterion: {base}' + (f', {schedule}' if schedule else ''))
    return criterion.to(device), base, schedule


def resolve_batch(args) -> int:
    """Per-process batch from --total-batch-size (one recipe for any world size); returns the total."""
    world = du.get_world_size()
    per_step = world * args.accum_iter
    if args.total_batch_size:
        if args.total_batch_size % per_step:
            raise ValueError(f'--total-batch-size {args.total_batch_size} is not divisible by {world} process(es) '
                             f'x --accum-iter {args.accum_iter}')
        args.batch_size = args.total_batch_size // per_step
    return args.batch_size * per_step


def build_optimization(args, model, total: int):
    """(optimizer, lr scheduler); --lr is scaled by the effective batch ``total`` (per process x world x
    accum-iter, from resolve_batch) unless --unscale-lr."""
    world = du.get_world_size()
    args.base_lr = args.lr
    if not args.unscale_lr:
        args.lr = args.base_lr * total / 512.0
    print(f'effective batch size {args.batch_size} x {world}'
          f'{f" x {args.accum_iter} accumulation steps" if args.accum_iter > 1 else ""} = {total}; '
          f'lr {args.lr:.3g} ({"as given" if args.unscale_lr else f"{args.base_lr:g} x batch / 512"})')
    opt_kwargs = {'eps': args.opt_eps} if args.opt_eps is not None else {}
    if args.opt_betas:
        opt_kwargs['betas'] = tuple(args.opt_betas)
    if args.fused_opt:
        opt_kwargs['fused'] = True
        opt_class = get_optimizer_info(args.opt).opt_class
        if 'fused' not in inspect.signature(opt_class).parameters:
            raise ValueError(f'--fused-opt: torch has no fused kernel for --opt {args.opt} ({opt_class.__name__}); '
                             f'use adam, adamw, sgd or momentum, or drop --fused-opt')
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay,
                                    **{**opt_kwargs, **args.opt_kwargs})
    lr_scheduler, _ = create_scheduler_v2(  # like DeiT, a run trains exactly --epochs (no cooldown appended)
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
        noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed)
    return optimizer, lr_scheduler


def wrap_model(args, model, device):
    """DDP (its constructor broadcasts rank 0's weights), torch.compile, then the EMA from the synced weights.

    Creating the EMA before DDP would start each rank's EMA from its own random init (seed + rank).
    """
    if args.sync_bn and args.distributed:  # timm's --sync-bn: before DDP, so DDP syncs the converted model
        if device.type != 'cuda':
            raise ValueError('--sync-bn: torch synchronises BatchNorm between CUDA devices only; drop it on the CPU')
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.sync_bn:
        print('note: --sync-bn has nothing to synchronise in one process')
    ddp = model
    if args.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == 'cuda'
                                                        else None)
    if args.torchcompile:  # after DDP, as timm; the EMA and the saved weights stay the plain module
        ddp = torch.compile(ddp, backend=args.torchcompile)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)
    return ddp, model_ema


def run_training(args, run, data, output_dir: Path | None, stop_signal: StopSignal | None = None) -> dict:
    """The epoch loop: train, evaluate, checkpoint, log. ``run`` holds the model, optimiser, criterion, ...

    At a stop signal the epoch in flight ends after its next optimizer step, which is saved with
    :func:`save_stop`; :class:`Preempted` is raised then.
    """
    tb = open_tensorboard(output_dir, run.tb_resume)
    dist_sum = args.distributed and args.dist_eval
    print(f'Start training for {args.epochs} epochs (from epoch {args.start_epoch})')
    start_time = time.time()
    test_stats = {}
    for epoch in range(args.start_epoch, args.epochs):
        if hasattr(data.sampler_train, 'set_epoch'):
            data.sampler_train.set_epoch(epoch)
        if run.schedule is not None:
            run.base_criterion.alpha = run.schedule(epoch)
        start_step, run.start_step = run.start_step, 0
        data.sampler_train.skip(start_step * args.batch_size)
        train_stats = train_one_epoch(
            run.model, run.criterion, data.loader_train, run.optimizer, run.device, epoch, run.loss_scaler,
            amp=run.amp, amp_dtype=run.amp_dtype, memory_format=run.memory_format, max_norm=args.clip_grad,
            clip_mode=args.clip_mode,
            model_ema=run.model_ema, mixup_fn=data.mixup_fn,
            print_freq=args.print_freq,
            max_steps=args.max_steps_per_epoch, set_training_mode=args.train_mode,
            batches_may_be_empty=getattr(data.train, 'skip_bad', False), accum_iter=args.accum_iter,
            start_step=start_step, stop_signal=stop_signal)
        if 'stopped_at_step' in train_stats:
            save_stop(args, run, epoch, train_stats['stopped_at_step'], output_dir, stop_signal.signum)
        if hasattr(run.base_criterion, 'next_epoch'):
            run.base_criterion.next_epoch()
        if getattr(data.train, 'skip_bad', False):
            skipped = int(du.all_reduce_sum(torch.tensor(data.train.pop_skipped())))
            train_stats['skipped_images'] = skipped
            if skipped:
                print(f'epoch {epoch}: skipped {skipped} unreadable training images (--skip-bad-images)')
        alpha = getattr(run.base_criterion, 'alpha', None)
        final = epoch == args.epochs - 1
        evaluated = final or (epoch + 1) % args.eval_every == 0
        if evaluated:
            test_stats = evaluate_run(args, run, data, dist_sum, final=final)
        check_finite(run, epoch, test_stats if evaluated else {}, output_dir)
        # timm's plateau schedule watches the metric it is given (as timm's train.py); without it DeiT's call
        # never lowers the lr. Time-based schedules ignore it.
        run.lr_scheduler.step(epoch + 1, test_stats['acc1'] if evaluated else None)
        is_best = evaluated and test_stats['acc1'] > run.max_accuracy
        if evaluated:
            run.max_accuracy = max(run.max_accuracy, test_stats['acc1'])
            print(f'Max accuracy: {run.max_accuracy:.2f}%')
        log = {'epoch': epoch, 'alpha': alpha, 'lr': train_stats['lr'],
               **{f'train_{k}': v for k, v in train_stats.items()},  # test_* only when measured this epoch
               **({f'test_{k}': v for k, v in test_stats.items()} if evaluated else {}),
               'n_parameters': run.n_parameters}
        run.last_log, run.last_test_stats = log, test_stats
        if output_dir:
            save_epoch(args, run, epoch, output_dir, is_best, log, tb, test_stats)
        print(f'epoch {epoch}: alpha {alpha}, lr {train_stats["lr"]:.3g}, '
              f'train loss {train_stats.get("loss", float("nan")):.4f}')
    if tb is not None:
        tb.close()
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return test_stats


def check_finite(run, epoch: int, test_stats: dict, output_dir: Path | None) -> None:
    """Stop before saving an epoch whose weights (or EMA) or evaluation are not finite: with a too high lr the
    training loss can stay finite while the weights blow up, and saving would make every resume start from
    the wreck. Weights are identical on every rank and the numbers are rank 0's: all ranks stop together."""
    models = [run.model_without_ddp] + ([run.model_ema.module] if run.model_ema is not None else [])
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


def evaluate_run(args, run, data, dist_sum: bool, final: bool = True) -> dict:
    """The model's (and the EMA's) validation numbers, identical on every rank.

    An EMA kept on the CPU (--model-ema-force-cpu) is evaluated only after the last epoch, on a copy on the
    training device: evaluating it on the CPU every epoch idled every GPU for minutes (timm skips it). Without
    --dist-eval every rank evaluates the whole set and rank 0's numbers are taken (a plateau schedule reading
    each rank's own top-1 could lower the lr on some ranks only).
    """
    amp = run.amp and run.device.type == 'cuda'
    kw = dict(amp=amp, amp_dtype=run.amp_dtype, distributed_sum=dist_sum, print_freq=args.print_freq)
    stats = evaluate(data.loader_val, run.model, memory_format=run.memory_format, **kw)
    passes = 1
    if run.model_ema is not None and (final or not args.model_ema_force_cpu):
        ema = run.model_ema.module
        if args.model_ema_force_cpu and run.device.type != 'cpu':
            ema = copy.deepcopy(ema).to(run.device)
        ema_stats = evaluate(data.loader_val, ema, **kw)
        stats.update({f'ema_{k}': v for k, v in ema_stats.items()})
        passes = 2
    if getattr(data.val, 'skip_bad', False):  # --skip-bad-images: say over how many images accuracy was taken
        skipped = torch.tensor(data.val.pop_skipped())
        skipped = int(du.all_reduce_sum(skipped) if dist_sum else skipped) // passes  # each rank saw all
        stats['skipped_images'] = skipped
        if skipped:
            print(f'evaluation skipped {skipped} unreadable image(s): accuracy is over the other {stats["n"]}')
    return stats if dist_sum else du.broadcast_object(stats)


def save_epoch(args, run, epoch: int, output_dir: Path, is_best: bool, log: dict, tb, test_stats: dict) -> None:
    """Every rank contributes its RNG state; rank 0 writes best_checkpoint.pth, the log line, checkpoint.pth.

    checkpoint.pth is written last (see deit/rundir.py): whatever kills the run, the resume point and
    the files behind it agree.
    """
    rng = du.all_gather_object(rng_state())
    if not du.is_main_process():
        return
    state = training_state(args, run, epoch, du.get_world_size(), rng, log, test_stats)
    if is_best:
        save_atomic(state, output_dir / 'best_checkpoint.pth')
    write_log(output_dir, tb, log, epoch)
    save_atomic(state, output_dir / 'checkpoint.pth')


def save_stop(args, run, epoch: int, step: int, output_dir: Path | None, signum: int | None) -> None:
    """After a stop signal: checkpoint.pth of ``step`` batches into ``epoch`` (every rank's RNG streams, the
    last completed epoch's log record), then raise :class:`Preempted` on every rank."""
    rng = du.all_gather_object(rng_state())
    path = output_dir / 'checkpoint.pth' if output_dir else None
    if path is not None and du.is_main_process():
        save_atomic(training_state(args, run, epoch - 1, du.get_world_size(), rng, run.last_log,
                                   run.last_test_stats, step=step), path)
    saved = f'saved {path} at epoch {epoch}, step {step}' if path else 'no --output_dir: nothing saved'
    raise Preempted(f'stopped by a signal: {saved}; run the same command again to resume (exit {REQUEUE_EXIT} '
                    f'asks a requeue)', signum, str(path) if path else None)


def open_tensorboard(output_dir: Path | None, resume: tuple[int, dict | None] | None = None):
    """TensorBoard's writer for ``output_dir/tb``. ``resume`` (the checkpoint's epoch and record): the steps from
    that epoch on are purged (TensorBoard's ``purge_step``: an epoch trained again appears once) and the
    checkpoint's record is written again, as the other per-epoch files are repaired."""
    if not output_dir or not du.is_main_process():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in requirements.txt; keep training without it
        print('tensorboard not installed: no TensorBoard scalars')
        return None
    if resume is None:
        return SummaryWriter(str(output_dir / 'tb'))
    epoch, record = resume
    tb = SummaryWriter(str(output_dir / 'tb'), purge_step=epoch if record is not None else epoch + 1)
    if record is not None:
        tb_scalars(tb, record, epoch)
    return tb


def tb_scalars(tb, log: dict, epoch: int) -> None:
    for k, v in log.items():
        group, _, name = k.partition('_')
        if group in ('train', 'test') and isinstance(v, (int, float)) and name not in ('n', 'skipped_images'):
            tb.add_scalar(f'{group}/{name}', v, epoch)
    if log.get('alpha') is not None:
        tb.add_scalar('train/alpha', log['alpha'], epoch)
    tb.flush()


def write_log(output_dir: Path, tb, log: dict, epoch: int) -> None:
    """The epoch's record: log.txt (DeiT's JSON lines), summary.csv (timm's: one row per epoch), TensorBoard
    train/ and test/ (deit.rundir: write order and repair)."""
    with open(output_dir / 'log.txt', 'a') as f:
        f.write(json.dumps(log) + '\n')
        f.flush()
        os.fsync(f.fileno())
    append_summary(output_dir, log)
    if tb is not None:
        tb_scalars(tb, log, epoch)


def _run(args, cleanup: contextlib.ExitStack, stop_signal: StopSignal, stdout: StdoutCopy | None,
         workers: WorkerSignals) -> dict:
    check_args(args)
    total_batch = resolve_batch(args)  # the per-process batch that runs, so args.yaml records it
    config = yaml.safe_dump(as_recipe(args), sort_keys=True)  # before any run-time value changes args
    device, amp = setup_device(args)
    data = build_data(args, device, workers)
    model = build_model(args, data.nb_classes, device)
    criterion, base_criterion, schedule = setup_criterion(args, data.nb_classes, data.mixup_fn, device)
    optimizer, lr_scheduler = build_optimization(args, model, total_batch)
    dtype = amp_dtype(args, device)
    run = SimpleNamespace(model_without_ddp=model, device=device, amp=amp, amp_dtype=dtype, criterion=criterion,
                          base_criterion=base_criterion, schedule=schedule, optimizer=optimizer,
                          lr_scheduler=lr_scheduler, max_accuracy=float('-inf'), last_test_stats={}, last_log=None,
                          tb_resume=None,
                          start_step=0,
                          memory_format=torch.channels_last if args.channels_last else None,
                          # loss scaling only where float16 needs it (bfloat16 has float32's range)
                          loss_scaler=LossScaler(device.type, enabled=amp and device.type == 'cuda' and
                                                 dtype == torch.float16),
                          n_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
    extras = [name for name, on in ((f'AMP {str(dtype).removeprefix("torch.")}', amp),
                                    ('channels-last', args.channels_last),
                                    (f'torch.compile({args.torchcompile})', args.torchcompile),
                                    ('fused optimizer', args.fused_opt)) if on]
    print(f'model {args.model}: {run.n_parameters / 1e6:.2f}M parameters, {data.nb_classes} classes'
          f'{"; " + ", ".join(extras) if extras else ""}')
    output_dir = claim_output_dir(args, cleanup)
    resume_path, ckpt = read_resume_checkpoint(args, output_dir)
    if ckpt is not None and not args.resume and not args.eval:
        check_same_run(args, ckpt, resume_path, total_batch)
    if ckpt is None and output_dir and not args.eval and du.is_main_process():
        set_aside_run(output_dir)  # a fresh start never writes into another run's files
    if output_dir and stdout is not None:
        stdout.attach(output_dir / 'stdout.log')
    if output_dir and du.is_main_process():
        (output_dir / 'args.yaml').write_text(config)  # a recipe: `-c args.yaml` runs the same configuration
    print('configuration:\n' + config, end='')
    if ckpt is not None:  # weights before DDP: its constructor then broadcasts them
        restore_weights(model, ckpt, resume_path, args.model)
    run.model, run.model_ema = wrap_model(args, model, device)
    if ckpt is not None:
        if args.eval:
            print(f'evaluating {resume_path} (epoch {ckpt.get("epoch", "?")})')
        else:
            restore_training_state(args, run, ckpt, resume_path, du.get_rank(), du.get_world_size())
            if 'epoch' in ckpt and args.output_dir and du.is_main_process():  # the logs end where the ckpt does
                repair_epoch_files(Path(args.output_dir), ckpt['epoch'], ckpt.get('log'))
                run.tb_resume = (ckpt['epoch'], ckpt.get('log'))
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
        test_stats = run_training(args, run, data, output_dir, stop_signal)
    checksum = parameter_checksum(model)
    du.print_all(f'[rank {du.get_rank()}] parameter checksum {checksum}')
    if run.model_ema is not None:
        du.print_all(f'[rank {du.get_rank()}] ema checksum {parameter_checksum(run.model_ema.module)}')
    if test_stats:
        print(f'Final accuracy: top-1 {test_stats["acc1"]:.2f}%  top-5 {test_stats["acc5"]:.2f}%  '
              f'ECE {test_stats["ece"]:.4f}  (best top-1 {run.max_accuracy:.2f}%)')
    return {'test': test_stats, 'max_accuracy': run.max_accuracy, 'param_checksum': checksum}


def error_line(e: BaseException) -> str:
    """The message of ``e``; for an error a DataLoader worker raised, the worker's own message (torch re-raises
    it as "Caught X in DataLoader worker process N" followed by the worker's whole traceback)."""
    text = str(e).strip()
    if 'Original Traceback' in text:
        text = text.splitlines()[-1].split(': ', 1)[-1]
    return text


def cli(argv=None) -> int:
    args = parse_args(argv)
    try:
        main(args)
    except (ValueError, OSError, NonFiniteLossError) as e:  # OSError: e.g. no space left for log.txt
        print(f'error: {error_line(e)}', file=sys.stderr, flush=True)
        return 2 if not isinstance(e, NonFiniteLossError) else 3
    except Preempted as e:
        print(str(e), flush=True)
        return REQUEUE_EXIT
    except KeyboardInterrupt:  # Ctrl-C: no traceback, and where the run stands
        ckpt = Path(args.output_dir) / 'checkpoint.pth' if args.output_dir else None
        where = (f': the same command resumes from {ckpt} (its last completed epoch)' if ckpt and ckpt.is_file()
                 else ': no checkpoint was written yet')
        print(f'\ninterrupted{where}', file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(cli())
