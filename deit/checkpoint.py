"""Checkpoint files: atomic writes, safe reads, RNG state. The one module that opens checkpoints.

Reads use ``torch.load(weights_only=True)`` with ``argparse.Namespace`` allow-listed (DeiT's checkpoints
store ``args`` as a Namespace) instead of turning the safety off.
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a kill never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def torch_load(path: str | os.PathLike, map_location='cpu'):
    """Safe torch.load of a local file with a clear error for truncated / foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if 'Unsupported global' in str(e) or 'weights_only' in str(e):
            raise CheckpointError(f'{path}: not a plain checkpoint (it pickles arbitrary objects; refusing to '
                                  f'execute them): {msg}') from e
        raise CheckpointError(f'{path}: cannot read checkpoint (truncated or not a torch file): {msg}') from e


def rng_state() -> dict:
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


def _numpy_state_to_torch(s):
    # np's state holds an ndarray, which weights_only loading refuses; keep it as a tensor
    return (s[0], torch.from_numpy(s[1].astype(np.int64)), int(s[2]), int(s[3]), float(s[4]))


def _torch_state_to_numpy(s):
    return (s[0], s[1].numpy().astype(np.uint32), s[2], s[3], s[4])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


STRIP_PREFIXES = ('module.', '_orig_mod.')  # DDP / torch.compile wrappers
NESTED_KEYS = ('model', 'state_dict', 'module')


def extract_state_dict(obj, source: str = '<object>', use_ema: bool = False) -> dict:
    """Find the model weights in a loaded checkpoint and strip wrapper prefixes.

    Accepts a plain state dict, DeiT's ``{'model': ...}`` dict (or ``model_ema`` with ``use_ema``), and
    ``{'state_dict': ...}`` nests (e.g. the ffcv ResNet-50 releases).
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f'{source}: expected a dict of weights, got {type(obj).__name__}')
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


def load_file(source: str | os.PathLike, map_location='cpu'):
    """Load a checkpoint object from a path, an http(s) URL, or ``hf-hub:<repo>[/<file>]``."""
    source = os.fspath(source)
    if source.startswith('hf-hub:'):
        from huggingface_hub import hf_hub_download
        spec = source[len('hf-hub:'):]
        repo, _, filename = spec.partition('@') if '@' in spec else (spec, '', '')
        candidates = [filename] if filename else ['model.safetensors', 'pytorch_model.bin', 'checkpoint.pth']
        last = None
        for fn in candidates:
            try:
                return load_file(hf_hub_download(repo, fn), map_location)
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
