"""The trainer's resumable state: :class:`TrainingState` (``state_dict()`` / ``load_state_dict()``), the RNG
streams of every rank, and the rules for finding and accepting a checkpoint to resume.

A training checkpoint is ``TrainingState.state_dict()`` plus the run configuration (``args``), the world
size and every rank's RNG streams (:func:`checkpoint_dict`); its keys are DeiT's (``model``, ``optimizer``,
``lr_scheduler``, ``epoch``, ``model_ema``, ``args``, ...), so the official tools read it too. Released
checkpoints are read by :mod:`deit.releases`.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch

from data.io import CheckpointError, torch_load
from deit import distributed as du
from deit.criterion import loss_options
from deit.releases import state_dict_mismatch


class TrainingState:
    """The model, optimiser, schedule, loss scaler, criterion (OLS keeps statistics) and EMA of a run, with
    where it stands: ``epoch`` (the last completed epoch, -1 before the first), ``step`` (batches of the next
    epoch already trained: non-zero only in a save at a stop signal), the best top-1 so far, and the last
    epoch's log record and evaluation (a resume restores a log line a kill lost; a finished run started
    again prints where it ended)."""

    def __init__(self, model, optimizer, lr_scheduler, loss_scaler, criterion, model_ema=None,
                 start_epoch: int = 0):
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.loss_scaler, self.criterion, self.model_ema = loss_scaler, criterion, model_ema
        self.epoch, self.step = start_epoch - 1, 0
        self.max_accuracy = float('-inf')
        self.last_log: dict | None = None
        self.last_test_stats: dict = {}

    @property
    def start_epoch(self) -> int:
        """The epoch the loop starts (or continues) at."""
        return self.epoch + 1

    def state_dict(self) -> dict:
        state = {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                 'lr_scheduler': scheduler_state(self.lr_scheduler), 'scaler': self.loss_scaler.state_dict(),
                 'criterion': self.criterion.state_dict(), 'epoch': self.epoch, 'step': self.step,
                 'max_accuracy': self.max_accuracy, 'log': self.last_log, 'test_stats': self.last_test_stats}
        if self.model_ema is not None:
            state['model_ema'] = self.model_ema.module.state_dict()
        return state

    def load_state_dict(self, ckpt: dict, path: str = '<checkpoint>', resume_opt: bool = True) -> None:
        """Everything but the model's weights (restored before DDP wraps the model: see restore_weights).
        A weights-only checkpoint (no optimizer or epoch) leaves the state as built. ``resume_opt`` False:
        timm's --no-resume-opt, a fresh optimizer and loss scale."""
        if 'optimizer' not in ckpt or 'epoch' not in ckpt:
            return
        if resume_opt:
            self.optimizer.load_state_dict(ckpt['optimizer'])
        else:
            print(f'note: --no-resume-opt: the optimizer and loss-scaler state of {path} are not restored')
        load_scheduler_state(self.lr_scheduler, ckpt['lr_scheduler'])
        self.epoch, self.step = ckpt['epoch'], ckpt.get('step', 0)
        self.last_log = ckpt.get('log')
        if resume_opt and ckpt.get('scaler') and self.loss_scaler.is_enabled():
            self.loss_scaler.load_state_dict(ckpt['scaler'])
        elif resume_opt and self.loss_scaler.is_enabled():  # saved without fp16 AMP (e.g. a CPU run)
            print(f'note: {path} has no loss-scaler state (saved without fp16 AMP); starting a fresh scale')
        if self.model_ema is not None and 'model_ema' in ckpt:
            self.model_ema.module.load_state_dict(ckpt['model_ema'])
        if 'criterion' in ckpt:
            self.criterion.load_state_dict(ckpt['criterion'])
        self.max_accuracy = ckpt.get('max_accuracy', 0.0)
        self.last_test_stats = ckpt.get('test_stats') or {}


def checkpoint_dict(state: TrainingState, config, world_size: int, rng: list) -> dict:
    """What checkpoint.pth holds: the state, the run configuration (as an argparse.Namespace, as DeiT's),
    the world size and ``rng``, every rank's RNG streams in rank order."""
    return {**state.state_dict(), 'args': argparse.Namespace(**vars(config)), 'world_size': world_size,
            'rng': rng}


def resume(state: TrainingState, ckpt: dict, path: str, seed: int, rank: int = 0, world: int = 1,
           resume_opt: bool = True) -> None:
    """Restore ``state`` and this rank's RNG streams from ``ckpt`` (:func:`checkpoint_dict`); say what was done."""
    state.load_state_dict(ckpt, path, resume_opt)
    if 'optimizer' in ckpt and 'epoch' in ckpt:
        done = restore_rng(ckpt.get('rng'), rank, world, reseed=seed + 1000 * state.start_epoch)
        if done != 'restored':
            print(f'note: RNG streams {done}')
    if ckpt.get('world_size', world) != world:
        print(f'note: checkpoint written with {ckpt["world_size"]} process(es), resuming with {world}: the '
              f'lr schedule continues from the checkpoint; data order and RNG streams differ')
    at = f', step {state.step}' if state.step else ''
    print(f'resumed from {path} (epoch {ckpt.get("epoch", "?")}); starting at epoch {state.start_epoch}{at}')


# ---- RNG streams ---------------------------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    """Seed torch, python and numpy (as timm's random_seed): RandAugment and random erasing draw from python's
    ``random``, so leaving it unseeded makes two runs with one --seed differ. numpy takes 32 bits."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def rng_state() -> dict:
    """This process's RNG streams (torch, python, numpy, and CUDA when present)."""
    st = {'torch': torch.get_rng_state(), 'python': random.getstate(),
          'numpy': _numpy_state_to_torch(np.random.get_state())}
    if torch.cuda.is_available():
        st['cuda'] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st['torch'])
    random.setstate(_to_tuple(st['python']))
    np.random.set_state(_torch_state_to_numpy(st['numpy']))
    if 'cuda' in st and torch.cuda.is_available() and len(st['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st['cuda'])


def restore_rng(saved, rank: int, world: int, reseed: int) -> str:
    """Restore this rank's own RNG streams from a checkpoint's ``rng`` entry; returns what was done.

    ``saved`` is a list with one state per rank (a dict in single-process checkpoints of older versions).
    Restoring rank 0's state on every rank would make the repeated-augmentation copies of a sample
    pixel-identical across ranks, so with another world size every rank is reseeded with ``reseed + rank``.
    """
    states = [saved] if isinstance(saved, dict) else list(saved or [])
    if len(states) == world:
        set_rng_state(states[rank])
        return 'restored'
    seed_all(reseed + rank)
    return f'reseeded (checkpoint has {len(states)} RNG state(s), this run {world} process(es))'


def _numpy_state_to_torch(s):
    # np's state holds an ndarray, which weights_only loading refuses; keep it as a tensor
    return (s[0], torch.from_numpy(s[1].astype(np.int64)), int(s[2]), int(s[3]), float(s[4]))


def _torch_state_to_numpy(s):
    return (s[0], s[1].numpy().astype(np.uint32), s[2], s[3], s[4])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---- the lr schedule -----------------------------------------------------------------------------------------
def scheduler_state(scheduler) -> dict:
    """timm's scheduler state, plus torch's ReduceLROnPlateau counters for ``--sched plateau``: timm's own
    state_dict keeps only its best metric, so a resumed run would restart its patience and cooldown."""
    state = scheduler.state_dict()
    inner = getattr(scheduler, 'lr_scheduler', None)
    if isinstance(inner, torch.optim.lr_scheduler.ReduceLROnPlateau):
        state = {**state, 'plateau': inner.state_dict()}
    return state


def load_scheduler_state(scheduler, state: dict) -> None:
    state = dict(state)
    plateau = state.pop('plateau', None)
    scheduler.load_state_dict(state)
    if plateau is not None:
        scheduler.lr_scheduler.load_state_dict(plateau)


# ---- which checkpoint to resume, and whether it is this run's ------------------------------------------------
# The arguments that define a run; every loss's own options come from the loss registry (one home).
RUN_ARGS = ('model', 'input_size', 'loss', 'alpha', 'alpha_end', 'alpha_schedule', 'data_set', 'epochs', 'base_lr',
            'opt', 'weight_decay', 'sched', 'warmup_epochs', 'mixup', 'cutmix', 'aa', 'reprob', 'smoothing',
            'drop_path', 'bce_loss', 'distillation_type', 'unscale_lr', 'lr_step',
            *(option.dest for option, _ in loss_options()))


def check_same_run(config, ckpt: dict, path: str) -> None:
    """Auto-resume continues THE SAME run: refuse when an argument that defines it differs from the
    checkpoint's (an LS run resumed with --loss ce would otherwise continue silently into one log), the
    images per optimizer step (``total_batch``) included."""
    saved = ckpt.get('args')
    saved = dict(vars(saved) if hasattr(saved, '__dict__') else (saved or {}))
    now = vars(config)
    if 'batch_size' in saved:
        saved['total_batch'] = saved['batch_size'] * ckpt.get('world_size', 1) * saved.get('accum_iter', 1)
    diffs = [f'{k}: {saved[k]!r} in the checkpoint, {now[k]!r} now' for k in RUN_ARGS + ('total_batch',)
             if k in saved and k in now and saved[k] != now[k]]
    if diffs:
        raise ValueError(f'{path} belongs to another run; refusing to auto-resume it. Differing arguments: '
                         f'{"; ".join(diffs)}. Start fresh with another --output_dir (or --no-auto-resume: that run\'s '
                         f'files are moved to {Path(path).parent}/previous_run first), '
                         f'or continue that checkpoint on purpose with --resume {path}')


def read_resume_checkpoint(config, output_dir: Path | None):
    """(path, checkpoint) to resume from, or (None, None); the same on every rank.

    Rank 0 decides (its --resume, or output_dir/checkpoint.pth); ranks that cannot read that file (an
    output dir that is not shared between nodes) receive rank 0's copy, so no rank silently starts fresh.
    """
    path = config.resume
    if du.is_main_process() and not path and config.auto_resume and output_dir and \
            (output_dir / 'checkpoint.pth').is_file():
        path = str(output_dir / 'checkpoint.pth')
        print(f'auto-resuming from {path}')
    path = du.broadcast_object(path or None)
    if path is None:
        return None, None
    if all(du.all_gather_object(Path(path).is_file())):
        return path, _resumable(torch_load(path), path)
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
    return path, _resumable(ckpt, path)


def _resumable(ckpt, path: str) -> dict:
    """A checkpoint to resume is a dict (whose ``model`` restore_weights checks); anything else is named."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path}: a {type(ckpt).__name__}, not a checkpoint (a dict with "model": ...); '
                              f'resume from a training checkpoint or start from weights with --finetune')
    return ckpt


def restore_weights(model, ckpt: dict, path: str, name: str) -> None:
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        raise CheckpointError(f'{path}: no "model" entry; not a training checkpoint')
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError:
        saved = ckpt.get('args')
        saved = vars(saved) if hasattr(saved, '__dict__') else saved if isinstance(saved, dict) else {}
        hint = (f'; it was trained as --model {saved["model"]} --input-size {saved.get("input_size")}'
                f'{" with " + str(saved["nb_classes"]) + " classes" if saved.get("nb_classes") else ""}'
                if saved.get('model') else '')
        raise CheckpointError(f'{path} does not fit {name}: {state_dict_mismatch(model.state_dict(), ckpt["model"])}'
                              f'{hint}') from None
