"""File IO the project shares: atomic writes, safe checkpoint reads, file sniffing (the data floor).

Writes go through :func:`atomic_open` / :func:`save_atomic` (temp name + fsync + rename: a kill never leaves a
torn file). Reads use ``torch.load(weights_only=True)`` with ``argparse.Namespace`` allow-listed (DeiT's
checkpoints store ``args`` as a Namespace) instead of turning the safety off, after the zip container's
CRCs are checked.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import socket
import zipfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = 'wb', file_mode: int | None = None, **open_kw):
    """A file that replaces ``path`` only once complete: written under a temp name in the same folder,
    fsync-ed, then renamed, so a kill never leaves a torn file; on an error the temp file is removed.
    ``file_mode``: permissions of the result (e.g. 0o644 for a file others read, whatever the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if file_mode is not None:
            os.chmod(tmp, file_mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class SaveError(CheckpointError):
    """A checkpoint could not be written (full disk, quota, read-only folder); the previous file is intact."""


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save through :func:`atomic_open`. A failed write (e.g. a full disk: torch reports it as an
    ``enforce fail at inline_container.cc``) is one :class:`SaveError` line with the space numbers."""
    path = Path(path)
    try:
        with atomic_open(path) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:
        cause = next((c for c in _chain(e) if isinstance(c, OSError) and c.errno), None)
        why = os.strerror(cause.errno) if cause else str(e).splitlines()[0]
        try:
            free = f'{shutil.disk_usage(path.parent).free / 2 ** 20:.0f} MiB free there'
        except OSError:
            free = 'free space unknown'
        raise SaveError(f'{path}: could not write the checkpoint ({why}); it needs about '
                        f'{_tensor_bytes(obj) / 2 ** 20:.0f} MiB, {free}. The previous {path.name} (if any) is '
                        f'unchanged') from None


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def check_writable(path: str | os.PathLike, folder: bool = False, create: bool = True) -> Path:
    """Fail now, in one line, if ``path`` (a file to write, or with ``folder`` a folder to write into) cannot
    be written, instead of after the work that produces it. ``create=False``: make no folder; the nearest
    existing one is probed (a failed run then leaves nothing behind)."""
    path = Path(path)
    target = path if folder else path.parent
    try:
        if create:
            target.mkdir(parents=True, exist_ok=True)
        else:
            while not target.exists() and target != target.parent:
                target = target.parent
            if not target.is_dir():
                raise NotADirectoryError(20, 'Not a directory', str(target))
        probe = temp_path(target / '.write-test')
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f'{path}: cannot write there ({e.strerror or e})') from None
    return path


def temp_path(path: Path) -> Path:
    """A temp name next to ``path`` no other writer can pick: host, PID and a random token.

    PIDs alone repeat across nodes and in per-node PID namespaces (containers), where two ranks writing the
    same file would delete or rename each other's temp file.
    """
    return path.with_name(f'.{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}')


def torch_load(path: str | os.PathLike, map_location='cpu'):
    """Safe torch.load of a local file; a file that is no checkpoint gets one line saying what it is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    kind = sniff_file(path)
    if kind:
        raise CheckpointError(f'{path}: {kind}, not a PyTorch checkpoint (torch.save output or .safetensors)')
    verify_container(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, IndexError... on foreign bytes
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if 'Unsupported global' in str(e) or 'weights_only' in str(e):
            raise CheckpointError(f'{path}: not a plain checkpoint (it pickles arbitrary objects; refusing to '
                                  f'execute them): {msg}') from e
        raise CheckpointError(f'{path}: cannot read checkpoint (truncated or corrupted torch file): '
                              f'{type(e).__name__}: {msg}') from e


def verify_container(path: Path) -> None:
    """Check the CRC-32 of every member of a torch.save zip (one sequential read, ~1 s per GB): a flipped byte
    in a weight otherwise loads silently. Files saved with torch's CRCs switched off (all zero) are skipped;
    anything zipfile cannot open (the legacy pickle format, a truncated file) is left to torch.load."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return  # no readable container at all (e.g. truncated): torch.load says what it finds
    try:
        with zf:
            if not any(m.CRC for m in zf.infolist() if m.file_size):
                return
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f'{path}: cannot read checkpoint (truncated or corrupted torch file): {e}') from None
    if bad is not None:
        raise CheckpointError(f'{path}: member {bad} fails its CRC-32 check: the file is corrupted (restore it or '
                              f'use an earlier checkpoint)')


def sniff_file(path: Path) -> str | None:
    """What a file is when it cannot be a torch.save file (zip 'PK' or pickle protocol 2+), else None."""
    with open(path, 'rb') as f:
        head = f.read(512)
    if head.startswith(b'PK\x03\x04') or head[:1] == b'\x80':
        return None
    if not head:
        return 'an empty file'
    text = head.lstrip()
    try:
        text.decode('utf-8')
    except UnicodeDecodeError:
        return 'a binary file of unknown format'
    if text[:1] in (b'{', b'['):
        return 'a JSON file'
    return 'a text file'
