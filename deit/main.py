"""DeiT training and evaluation with MaxSup (``python -m deit.main``), DeiT's flags on timm 1.0.

A run in phases: process group -> data sets -> the resolved configuration (deit/config.py) -> device,
loaders, model, criterion, optimisation (deit/build.py) -> run folder and resume (deit/train_state.py,
deit/rundir.py) -> DDP + EMA -> the epoch loop (deit/loop.py). Flags: deit/args.py; recipes: recipes/*.yaml
(``-c``); the main command: scripts/train_with_MaxSup.sh.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from data.cli import USAGE_ERROR
from deit import distributed as du
from deit.args import check_args
from deit.build import (Data, amp_dtype, build_data, build_model, build_optimization, loss_scaler, setup_criterion,
                        setup_device, wrap_model)
from deit.config import RunConfig, recipe_text, resolve_config
from deit.datasets import build_dataset, check_same_classes
from deit.engine import NonFiniteLossError
from deit.loop import Run, evaluate_run, parameter_checksum, run_training, schedule_index
from deit.preemption import REQUEUE_EXIT, Preempted, StopSignal, WorkerSignals
from deit.recipes import parse_args
from deit.rundir import (RunDirLocked, StdoutCopy, lock_run_dir, release_run_dir, remove_stale_temp_files,
                         repair_epoch_files, set_aside_run)
from deit.train_state import (TrainingState, check_same_run, read_resume_checkpoint, restore_weights, resume,
                              seed_all)


def main(args, place: du.DistInfo | None = None) -> dict:
    """Train (or evaluate) as ``args`` (the parsed flags, left unchanged) say. ``place``: this process's place
    in the job when the caller has initialised it. Raises :class:`Preempted` after saving at a stop signal."""
    place = place or du.init_distributed(args.device)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(du.cleanup)
        cleanup.enter_context(du.main_rank_output(place.rank))
        stdout = cleanup.enter_context(StdoutCopy()) if place.rank == 0 else None
        workers = WorkerSignals()
        cleanup.callback(workers.release)  # leftover loader workers may then end at exit
        return _run(args, place, cleanup, cleanup.enter_context(StopSignal()), stdout, workers)


def claim_output_dir(cfg: RunConfig, cleanup: contextlib.ExitStack) -> Path | None:
    """Create and lock the run folder (rank 0), clear killed saves' temp files; every rank learns the outcome."""
    output_dir = Path(cfg.output_dir) if cfg.output_dir else None
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


def _run(args, place: du.DistInfo, cleanup: contextlib.ExitStack, stop_signal: StopSignal,
         stdout: StdoutCopy | None, workers: WorkerSignals) -> dict:
    check_args(args)
    seed_all(args.seed + place.rank)  # before the data sets: what they draw is part of the run's stream
    dataset_train, nb_classes = build_dataset(True, args)
    dataset_val, _ = build_dataset(False, args)
    check_same_classes(dataset_train, dataset_val)
    cfg = resolve_config(args, nb_classes, place)
    try:
        return execute(args, cfg, dataset_train, dataset_val, cleanup, stop_signal, stdout, workers)
    except KeyboardInterrupt:
        raise Interrupted(cfg.output_dir) from None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the run folder it hit (the default one is only named once the configuration is resolved)."""

    def __init__(self, output_dir: str | None):
        super().__init__(output_dir)
        self.output_dir = output_dir


def execute(args, cfg: RunConfig, dataset_train, dataset_val, cleanup: contextlib.ExitStack,
            stop_signal: StopSignal, stdout: StdoutCopy | None, workers: WorkerSignals) -> dict:
    """The run of a resolved configuration, from the loaders to the final accuracy."""
    device, amp = setup_device(cfg)
    data = build_data(cfg, dataset_train, dataset_val, device, workers)
    run = build_run(cfg, data, device, amp)
    output_dir = claim_output_dir(cfg, cleanup)
    resume_path, ckpt = read_resume_checkpoint(cfg, output_dir)
    if ckpt is not None and not cfg.resume and not cfg.eval:
        check_same_run(cfg, ckpt, resume_path)
    if ckpt is None and output_dir and not cfg.eval and du.is_main_process():
        set_aside_run(output_dir)  # a fresh start never writes into another run's files
    if output_dir and stdout is not None:
        stdout.attach(output_dir / 'stdout.log')
    config = recipe_text(args, cfg)
    if output_dir and du.is_main_process():
        (output_dir / 'args.yaml').write_text(config)  # a recipe: `-c args.yaml` runs the same configuration
    print('configuration:\n' + config, end='')
    if ckpt is not None:  # weights before DDP: its constructor then broadcasts them
        restore_weights(run.state.model, ckpt, resume_path, cfg.model)
    run.model, run.state.model_ema = wrap_model(cfg, run.state.model, device)
    if ckpt is not None:
        resume_run(cfg, run, ckpt, resume_path)
        del ckpt
    run.state.lr_scheduler.step(schedule_index(cfg, run.state.start_epoch))
    if cfg.eval:  # --eval measures the weights it was given, not an EMA
        stats = evaluate_run(cfg, run, data, ema=False)
        print(f'Accuracy of the network on the {stats["n"]} test images: {stats["acc1"]:.2f}%')
        return stats
    return finish(cfg, run, data, output_dir, stop_signal, resume_path)


def build_run(cfg: RunConfig, data: Data, device: torch.device, amp: bool) -> Run:
    """Model, criterion, optimisation and the training state around them (before DDP and the EMA)."""
    model = build_model(cfg, data.nb_classes, device)
    criterion, base_criterion, schedule = setup_criterion(cfg, data.nb_classes, data.mixup_fn, device, model)
    optimizer, lr_scheduler = build_optimization(cfg, model)
    dtype = amp_dtype(cfg, device)
    state = TrainingState(model, optimizer, lr_scheduler, loss_scaler(device, amp, dtype), base_criterion,
                          start_epoch=cfg.start_epoch)
    run = Run(model, device, amp, dtype, criterion, schedule, state,
              memory_format=torch.channels_last if cfg.channels_last else None)
    extras = [name for name, on in ((f'AMP {str(dtype).removeprefix("torch.")}', amp),
                                    ('channels-last', cfg.channels_last),
                                    (f'torch.compile({cfg.torchcompile})', cfg.torchcompile),
                                    ('fused optimizer', cfg.fused_opt)) if on]
    print(f'model {cfg.model}: {run.n_parameters / 1e6:.2f}M parameters, {data.nb_classes} classes'
          f'{"; " + ", ".join(extras) if extras else ""}')
    return run


def resume_run(cfg: RunConfig, run: Run, ckpt: dict, path: str) -> None:
    """The checkpoint's training state (not for --eval, which only measures its weights); the per-epoch files
    are made to end where the checkpoint does."""
    if cfg.eval:
        print(f'evaluating {path} (epoch {ckpt.get("epoch", "?")})')
        return
    resume(run.state, ckpt, path, cfg.seed, cfg.rank, cfg.world_size, resume_opt=not cfg.no_resume_opt)
    if 'epoch' in ckpt and cfg.output_dir and du.is_main_process():
        repair_epoch_files(Path(cfg.output_dir), ckpt['epoch'], ckpt.get('log'))
        run.tb_resume = (ckpt['epoch'], ckpt.get('log'))


def finish(cfg: RunConfig, run: Run, data: Data, output_dir: Path | None, stop_signal: StopSignal,
           resume_path: str | None) -> dict:
    """Train the epochs left (none when a finished run is started again: say where it ended), then print the
    weights' checksums and the final accuracy."""
    state = run.state
    if state.start_epoch >= cfg.epochs:
        print(f'{resume_path}: training already finished ({cfg.epochs} epochs); nothing to do')
        test_stats = state.last_test_stats
    else:
        test_stats = run_training(cfg, run, data, output_dir, stop_signal)
    checksum = parameter_checksum(state.model)
    du.print_all(f'[rank {du.get_rank()}] parameter checksum {checksum}')
    if state.model_ema is not None:
        du.print_all(f'[rank {du.get_rank()}] ema checksum {parameter_checksum(state.model_ema.module)}')
    if test_stats:
        print(f'Final accuracy: top-1 {test_stats["acc1"]:.2f}%  top-5 {test_stats["acc5"]:.2f}%  '
              f'ECE {test_stats["ece"]:.4f}  (best top-1 {state.max_accuracy:.2f}%)')
    return {'test': test_stats, 'max_accuracy': state.max_accuracy, 'param_checksum': checksum}


def error_line(e: BaseException) -> str:
    """The message of ``e``; for an error a DataLoader worker raised, the worker's own message (torch re-raises
    it as "Caught X in DataLoader worker process N" followed by the worker's whole traceback)."""
    text = str(e).strip()
    if 'Original Traceback' in text:
        text = text.splitlines()[-1].split(': ', 1)[-1]
    return text


def cli(argv=None) -> int:
    """``python -m deit.main``: the run, with one line (rank 0's) for what stopped it and the exit status."""
    args = parse_args(argv)
    place = None
    try:
        place = du.init_distributed(args.device)
        main(args, place)
    except (ValueError, OSError, NonFiniteLossError) as e:  # OSError: e.g. no space left for log.txt
        if place is None or place.rank == 0:
            print(f'error: {error_line(e)}', file=sys.stderr, flush=True)
        return USAGE_ERROR if not isinstance(e, NonFiniteLossError) else 3
    except Preempted as e:
        if place.rank == 0:
            print(str(e), flush=True)
        return REQUEUE_EXIT
    except KeyboardInterrupt as e:  # Ctrl-C: no traceback, and where the run stands
        if place is not None and place.rank != 0:
            return 130
        output_dir = getattr(e, 'output_dir', args.output_dir)
        ckpt = Path(output_dir) / 'checkpoint.pth' if output_dir else None
        where = (f': the same command resumes from {ckpt} (its last completed epoch)' if ckpt and ckpt.is_file()
                 else ': no checkpoint was written yet')
        print(f'\ninterrupted{where}', file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(cli())
