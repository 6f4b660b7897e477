"""Checkpoints of the trainer and the releases: training state and resume, RNG streams, released formats.

File IO (atomic writes, safe reads) lives one floor down, in :mod:`data.io`.
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from data.io import CheckpointError, torch_load
from deit import distributed as du


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
    torch.manual_seed(reseed + rank)
    np.random.seed((reseed + rank) % 2 ** 32)
    random.seed(reseed + rank)
    return f'reseeded (checkpoint has {len(states)} RNG state(s), this run {world} process(es))'


def _numpy_state_to_torch(s):
    # np's state holds an ndarray, which weights_only loading refuses; keep it as a tensor
    return (s[0], torch.from_numpy(s[1].astype(np.int64)), int(s[2]), int(s[3]), float(s[4]))


def _torch_state_to_numpy(s):
    return (s[0], s[1].numpy().astype(np.uint32), s[2], s[3], s[4])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


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


def training_state(args, run, epoch: int, world_size: int, rng: list, log: dict | None, test_stats: dict,
                   step: int = 0) -> dict:
    """Everything a resume needs, in one dict (read back by :func:`restore_training_state`).

    ``epoch``: the last completed epoch (-1: none); ``step``: batches of the NEXT epoch already trained (a
    save at a stop signal, always right after an optimizer step), 0 at an epoch's end. ``rng``: every
    rank's RNG streams (rank order); ``log``: the log.txt record of ``epoch``, so a resume can restore a log
    line a kill lost; ``test_stats``: the last evaluation, printed when a finished run is started again.
    """
    state = {
        'model': run.model_without_ddp.state_dict(), 'optimizer': run.optimizer.state_dict(),
        'lr_scheduler': scheduler_state(run.lr_scheduler), 'scaler': run.loss_scaler.state_dict(),
        'criterion': run.base_criterion.state_dict(), 'epoch': epoch, 'step': step, 'args': args,
        'max_accuracy': run.max_accuracy, 'world_size': world_size, 'rng': rng, 'log': log, 'test_stats': test_stats,
    }
    if run.model_ema is not None:
        state['model_ema'] = run.model_ema.module.state_dict()
    return state


def restore_training_state(args, run, ckpt: dict, path: str, rank: int = 0, world: int = 1) -> None:
    """Optimiser, schedule, scaler, EMA, criterion state and this rank's RNG streams from ``ckpt``
    (written by :func:`training_state`); sets args.start_epoch to the epoch after the checkpoint's and
    run.start_step to the batches of that epoch already trained (a save at a stop signal)."""
    if 'optimizer' in ckpt and 'epoch' in ckpt:
        resume_opt = not getattr(args, 'no_resume_opt', False)  # timm's --no-resume-opt
        if resume_opt:
            run.optimizer.load_state_dict(ckpt['optimizer'])
        else:
            print(f'note: --no-resume-opt: the optimizer and loss-scaler state of {path} are not restored')
        load_scheduler_state(run.lr_scheduler, ckpt['lr_scheduler'])
        args.start_epoch = ckpt['epoch'] + 1
        run.start_step = ckpt.get('step', 0)
        run.last_log = ckpt.get('log')
        if resume_opt and ckpt.get('scaler') and run.loss_scaler.is_enabled():
            run.loss_scaler.load_state_dict(ckpt['scaler'])
        elif resume_opt and run.loss_scaler.is_enabled():  # saved without fp16 AMP (e.g. a CPU run): a fresh scale
            print(f'note: {path} has no loss-scaler state (saved without fp16 AMP); starting a fresh scale')
        if run.model_ema is not None and 'model_ema' in ckpt:
            run.model_ema.module.load_state_dict(ckpt['model_ema'])
        if 'criterion' in ckpt:
            run.base_criterion.load_state_dict(ckpt['criterion'])
        run.max_accuracy = ckpt.get('max_accuracy', 0.0)
        run.last_test_stats = ckpt.get('test_stats') or {}
        done = restore_rng(ckpt.get('rng'), rank, world, reseed=args.seed + 1000 * args.start_epoch)
        if done != 'restored':
            print(f'note: RNG streams {done}')
    if ckpt.get('world_size', world) != world:
        print(f'note: checkpoint written with {ckpt["world_size"]} process(es), resuming with {world}: the '
              f'lr schedule continues from the checkpoint; data order and RNG streams differ')
    at = f', step {run.start_step}' if getattr(run, 'start_step', 0) else ''
    print(f'resumed from {path} (epoch {ckpt.get("epoch", "?")}); starting at epoch {args.start_epoch}{at}')


RUN_ARGS = ('model', 'input_size', 'loss', 'alpha', 'alpha_end', 'alpha_schedule', 'data_set', 'epochs', 'base_lr',
            'opt', 'weight_decay', 'sched', 'warmup_epochs', 'mixup', 'cutmix', 'aa', 'reprob', 'smoothing',
            'drop_path', 'ols_a', 'zipf_weight', 'zipf_power', 'logit_penalty_beta', 'bce_loss',
            'distillation_type', 'unscale_lr')


def check_same_run(args, ckpt: dict, path: str, total_batch: int) -> None:
    """Auto-resume continues THE SAME run: refuse when an argument that defines it differs from the
    checkpoint's (an LS run resumed with --loss ce would otherwise continue silently into one log).
    ``total_batch``: this run's images per optimizer step, compared with the checkpoint's."""
    saved = ckpt.get('args')
    saved = dict(vars(saved) if hasattr(saved, '__dict__') else (saved or {}))
    now = vars(args) | {'total_batch': total_batch}
    if 'batch_size' in saved:
        saved['total_batch'] = saved['batch_size'] * ckpt.get('world_size', 1) * saved.get('accum_iter', 1)
    diffs = [f'{k}: {saved[k]!r} in the checkpoint, {now[k]!r} now' for k in RUN_ARGS + ('total_batch',)
             if k in saved and k in now and saved[k] != now[k]]
    if diffs:
        raise ValueError(f'{path} belongs to another run; refusing to auto-resume it. Differing arguments: '
                         f'{"; ".join(diffs)}. Start fresh with another --output_dir (or --no-auto-resume: that run\'s '
                         f'files are moved to {Path(path).parent}/previous_run first), '
                         f'or continue that checkpoint on purpose with --resume {path}')


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


def state_dict_mismatch(expected: dict, given: dict, show: int = 3) -> str:
    """What keeps ``given`` from loading into a model whose state dict is ``expected``, in one line."""
    def names(keys):
        return ', '.join(keys[:show]) + (f' (+{len(keys) - show} more)' if len(keys) > show else '')
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f'{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)} here' for k in expected
              if k in given and hasattr(given[k], 'shape') and given[k].shape != expected[k].shape]
    parts = [f'{len(keys)} {what}: {names(keys)}' for what, keys in
             (('missing keys', missing), ('unexpected keys', unexpected), ('shapes differ', shapes)) if keys]
    return '; '.join(parts) or 'the weights do not load'


STRIP_PREFIXES = ('module.', '_orig_mod.')  # DDP / torch.compile wrappers
NESTED_KEYS = ('model', 'state_dict', 'module')
LIGHTNING_MODEL_PREFIX = 'model.'  # the official ResNet pipeline's LightningModule keeps the net in .model


def is_lightning(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict) and (
        'pytorch-lightning_version' in obj or 'global_step' in obj)


def extract_state_dict(obj, source: str = '<object>', use_ema: bool = False) -> dict:
    """Find the model weights in a loaded checkpoint and strip wrapper prefixes.

    Accepts a plain state dict, DeiT's ``{'model': ...}`` dict (or ``model_ema`` with ``use_ema``),
    ``{'state_dict': ...}`` nests, and PyTorch Lightning checkpoints (the official ResNet-50 pipeline):
    their ``state_dict`` holds the network under ``model.``; other entries (e.g. ``criterion.`` buffers of
    OLS) are reported and left out.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f'{source}: expected a dict of weights, got {type(obj).__name__}')
    if is_lightning(obj):
        return _lightning_model_weights(obj['state_dict'], source)
    keys = ('model_ema',) + NESTED_KEYS if use_ema else NESTED_KEYS
    if use_ema and 'model_ema' not in obj:
        raise CheckpointError(f'{source}: asked for EMA weights but there is no "model_ema" entry '
                              f'(entries: {sorted(obj)[:10]})')
    for k in keys:
        if isinstance(obj.get(k), dict):
            return extract_state_dict(obj[k], f'{source}[{k!r}]')
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f'{source}: no weights found (entries: {sorted(map(str, obj))[:10]})')
    out = {}
    for k, v in tensors.items():
        for p in STRIP_PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _lightning_model_weights(state: dict, source: str) -> dict:
    model = {k[len(LIGHTNING_MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(LIGHTNING_MODEL_PREFIX)}
    if not model:
        raise CheckpointError(f'{source}: Lightning checkpoint without "model." weights '
                              f'(entries: {sorted(state)[:8]})')
    other = sorted(k for k in state if not k.startswith(LIGHTNING_MODEL_PREFIX))
    if other:
        groups = sorted({k.split('.')[0] for k in other})
        print(f'{source}: Lightning checkpoint; ignoring {len(other)} non-model entries ({", ".join(groups)})')
    return extract_state_dict(model, f'{source}[state_dict/model.]')


def load_file(source: str | os.PathLike, map_location='cpu'):
    """Load a checkpoint object from a path, an http(s) URL, or ``hf-hub:<repo>[/<file>]``."""
    source = os.fspath(source)
    if source.startswith('hf-hub:'):
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError
        spec = source[len('hf-hub:'):]
        repo, _, filename = spec.partition('@')
        candidates = [filename] if filename else ['model.safetensors', 'pytorch_model.bin', 'checkpoint.pth']
        last = None
        for fn in candidates:
            try:
                return load_file(huggingface_hub.hf_hub_download(repo, fn), map_location)
            except LocalEntryNotFoundError:  # the hub cannot be reached: each further name would wait as long
                raise CheckpointError(f'{source}: cannot reach the Hugging Face Hub, and {fn} is not in the local '
                                      f'cache; download the file and pass its path') from None
            except Exception as e:  # EntryNotFoundError etc.: try the next usual file name
                last = e
        raise CheckpointError(f'{source}: none of {candidates} could be fetched: {last}')
    if source.startswith(('http://', 'https://')):
        try:
            return torch.hub.load_state_dict_from_url(source, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f'{source}: not a plain checkpoint: {e}') from e
    if source.endswith('.safetensors'):
        from safetensors.torch import load_file as load_safetensors
        if not Path(source).is_file():
            raise FileNotFoundError(f'checkpoint not found: {source}')
        try:
            return load_safetensors(source, device=str(map_location))
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointError(f'{source}: cannot read safetensors file: {e}') from e
    return torch_load(source, map_location)


def read_state_dict(source: str | os.PathLike, use_ema: bool = False) -> dict:
    """Model weights from any supported checkpoint source (path, URL, hf-hub id, .safetensors)."""
    return extract_state_dict(load_file(source), os.fspath(source), use_ema=use_ema)


def infer_architecture(state: dict) -> tuple[str, int]:
    """(timm model name, num_classes) of a released-kind state dict: DeiT/ViT-S/Ti/B-16 or a ResNet
    (plain, or with the official pipeline's BlurPool wrapping)."""
    from deit.models import vit_shape
    if 'cls_token' in state and 'patch_embed.proj.weight' in state:
        shape = vit_shape(state)
        names = {(192, 12, 16): 'deit_tiny_patch16_224', (384, 12, 16): 'deit_small_patch16_224',
                 (768, 12, 16): 'deit_base_patch16_224'}
        name = names.get((shape['width'], shape['depth'], shape['patch']))
        if name is None:
            raise CheckpointError(f'ViT checkpoint of width {shape["width"]}, depth {shape["depth"]}, patch '
                                  f'{shape["patch"]} matches no known DeiT; pass the model name (--model)')
        if 'dist_token' in state:
            name = name.replace('_patch16', '_distilled_patch16')
        return name, state['head.weight'].shape[0]
    if 'conv1.weight' in state and 'fc.weight' in state and any(k.startswith('layer4.0.') for k in state):
        blocks = [len({k.split('.')[1] for k in state if k.startswith(f'layer{i}.')}) for i in range(1, 5)]
        bottleneck = 'layer1.0.conv3.weight' in state
        names = {((3, 4, 6, 3), True): 'resnet50', ((3, 4, 23, 3), True): 'resnet101',
                 ((3, 8, 36, 3), True): 'resnet152', ((3, 4, 6, 3), False): 'resnet34',
                 ((2, 2, 2, 2), False): 'resnet18'}
        name = names.get((tuple(blocks), bottleneck))
        if name is None:
            raise CheckpointError(f'ResNet checkpoint with blocks {blocks} matches no known ResNet')
        if any(k.endswith('.blur_filter') for k in state):
            name += '_blurpool'
        return name, state['fc.weight'].shape[0]
    raise CheckpointError(f'cannot tell the architecture from the keys (first: {sorted(state)[:5]}); '
                          f'pass the model name (--model)')


def checkpoint_format(obj, source: str) -> str:
    if source.endswith('.safetensors'):
        return 'safetensors'
    if is_lightning(obj):
        return 'lightning'
    if isinstance(obj, dict) and 'model' in obj and 'args' in obj:
        return 'deit'
    if isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in NESTED_KEYS):
        return 'nested'
    return 'state_dict'


def recorded_settings(obj, source: str) -> dict:
    """What a checkpoint says about its run: model, input size, data set, crop ratio, classes (if recorded).

    From a training checkpoint's ``args`` (ours and the official DeiT code's) or the metadata header of a
    .safetensors file written by ``tools.load_checkpoint --export``.
    """
    if source.endswith('.safetensors'):
        meta = safetensors_metadata(source)
        out = {'model': meta.get('model'), 'input_size': meta.get('input_size'),
               'num_classes': meta.get('num_classes'), 'data_set': meta.get('data_set'),
               'eval_crop_ratio': meta.get('eval_crop_ratio')}
        for k in ('input_size', 'num_classes'):
            out[k] = int(out[k]) if out[k] else None
        out['eval_crop_ratio'] = float(out['eval_crop_ratio']) if out['eval_crop_ratio'] else None
        return out
    args = obj.get('args')  # obj: a dict (load_model has extracted its weights already)
    if args is None:
        return {}
    get = (lambda k: args.get(k)) if isinstance(args, dict) else (lambda k: getattr(args, k, None))
    return {'model': get('model'), 'input_size': get('input_size'), 'data_set': get('data_set'),
            'eval_crop_ratio': get('eval_crop_ratio'), 'num_classes': get('nb_classes')}


def safetensors_metadata(path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework='pt') as f:
        return dict(f.metadata() or {})


def load_model(source, model_name: str | None = None, num_classes: int | None = None, reset_head: bool = False,
               use_ema: bool = False, input_size: int | None = None, reset_hint: str = ''):
    """Build the right timm model for a checkpoint and load it strictly.

    The model is ``model_name`` if given, else the one the checkpoint records (official names such as
    ``our_patch16_224`` resolve through deit.models.MODEL_ALIASES), else inferred from the keys - also when
    the recorded name is unknown, with a note. Returns (model, info) with info = {model, num_classes,
    checkpoint_classes, format, missing, unexpected, input_size, recorded, args}. A class-count mismatch is
    an error unless ``reset_head`` (the head is then freshly initialised); ``reset_hint`` ends its message
    where the caller offers a reset (a tool that only evaluates does not).
    """
    from deit.models import HEAD_KEYS, create_model, is_known_model, resolve_model_name
    obj = load_file(source)
    source = os.fspath(source)
    fmt = checkpoint_format(obj, source)
    state = extract_state_dict(obj, source, use_ema=use_ema)
    recorded = recorded_settings(obj, source)
    if model_name:
        name = resolve_model_name(model_name)
    elif recorded.get('model') and is_known_model(recorded['model']):
        name = resolve_model_name(recorded['model'])
    else:
        name, _ = infer_architecture(state)
        if recorded.get('model'):
            print(f'{source}: records model {recorded["model"]!r}, which neither timm nor this project knows; '
                  f'inferred {name} from its keys (pass --model to choose)')
    head_keys = [k for k in HEAD_KEYS if k in state]
    if not head_keys:
        raise CheckpointError(f'{source}: no classifier head (head.* / fc.*) in the checkpoint')
    ckpt_classes = state[head_keys[0]].shape[0]
    classes = num_classes or ckpt_classes
    if classes != ckpt_classes and not reset_head:
        raise CheckpointError(f'{source}: checkpoint has {ckpt_classes} classes, {classes} were asked for'
                              f'{reset_hint or "; its head cannot score other classes: drop --num-classes"}')
    if input_size is None:
        input_size = recorded.get('input_size')
    model = create_model(name, classes, input_size=input_size)
    if classes != ckpt_classes:
        state = {k: v for k, v in state.items() if k not in head_keys}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (classes != ckpt_classes and k in head_keys)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f'{source} does not fit {name}: missing {missing[:8]}, '
                              f'unexpected {list(result.unexpected_keys)[:8]}')
    run_args = obj.get('args') if fmt == 'deit' else None
    info = {'model': name, 'num_classes': classes, 'checkpoint_classes': ckpt_classes, 'format': fmt,
            'missing': list(result.missing_keys), 'unexpected': list(result.unexpected_keys),
            'head_reset': classes != ckpt_classes, 'input_size': _input_size(model, input_size),
            'recorded': recorded, 'args': vars(run_args) if isinstance(run_args, argparse.Namespace) else run_args}
    return model.eval(), info


def _input_size(model, given: int | None = None) -> int:
    pe = getattr(model, 'patch_embed', None)
    if pe is not None and getattr(pe, 'img_size', None):
        return int(pe.img_size[0])
    if given:
        return int(given)
    return int(getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 224, 224))[-1])
