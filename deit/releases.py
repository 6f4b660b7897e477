"""Released and foreign checkpoints: find the weights in any supported file and build the model they fit.

Formats: our training checkpoints and DeiT's (``{'model': ..., 'args': ...}``), plain and nested state dicts,
PyTorch Lightning checkpoints of the official ResNet pipeline, ``.safetensors``, URLs and ``hf-hub:`` ids.
Used by the tools, segmentation and ``--finetune``/``--teacher-path``; the trainer's own resume state is
:mod:`deit.train_state`. File IO (atomic writes, safe reads) is one floor down, in :mod:`data.io`.
"""
from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import torch

from data.class_map import HEAD_KEYS
from data.io import CheckpointError, torch_load
from deit.models import create_model, is_known_model, resolve_model_name, vit_shape


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
