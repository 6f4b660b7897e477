"""The run folder (``--output_dir``): one writer at a time, nothing half-written left behind.

Write order of an epoch (rank 0): ``best_checkpoint.pth`` (when best) -> ``log.txt`` line -> ``checkpoint.pth``.
``checkpoint.pth`` is what a resume reads, so it is written last: a kill before it leaves the previous epoch
as the resume point, and :func:`repair_log` drops the log lines of the epoch that is then trained again.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from deit.checkpoint import atomic_open

LOCK_NAME = '.lock'


class RunDirLocked(ValueError):
    """Another live process holds the run folder."""


# flock's answers on file systems that cannot lock (Lustre mounted noflock: ENOSYS; some NFS: ENOLCK)
CANNOT_LOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}


def lock_run_dir(output_dir: Path):
    """Hold an exclusive lock on ``output_dir`` for this process's lifetime; returns the open lock file.

    flock locks die with their process, so the lock of a killed run is simply taken over (with a note).
    Where the file system cannot flock at all, :func:`_exclusive_lock_file` stands in.
    """
    path = Path(output_dir) / LOCK_NAME
    f = open(path, 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in CANNOT_LOCK:
            f.close()
            return _exclusive_lock_file(Path(output_dir), e)
        f.seek(0)
        owner = f.read().strip() or 'another process'
        f.close()
        raise RunDirLocked(f'{output_dir} is in use by a running training ({owner}); wait for it to finish or '
                           f'choose another --output_dir') from None
    f.seek(0)
    previous = f.read().strip()
    if previous:
        print(f'note: taking over {path} from a run that is no longer alive ({previous})')
    f.seek(0)
    f.truncate()
    f.write(f'host {socket.gethostname()}, pid {os.getpid()}\n')
    f.flush()
    return f


class _OwnedLockFile:
    """The lock of :func:`_exclusive_lock_file`: removing the file releases it."""

    def __init__(self, path: Path):
        self.path = path

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def _exclusive_lock_file(output_dir: Path, why: OSError) -> _OwnedLockFile:
    """``.lock.owner`` created with O_EXCL (atomic on every file system), holding host and pid. A file left by
    a process of this host that no longer runs is taken over; one of another host cannot be checked from here
    and is named in the refusal."""
    path = output_dir / (LOCK_NAME + '.owner')
    me = f'host {socket.gethostname()}, pid {os.getpid()}'
    print(f'note: {output_dir} cannot be flock-ed ({os.strerror(why.errno)}); using {path.name} as the lock')
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = path.read_text().strip()
            host, _, pid = owner.removeprefix('host ').partition(', pid ')
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                print(f'note: taking over {path} from a run that is no longer alive ({owner})')
                path.unlink(missing_ok=True)
                continue
            raise RunDirLocked(f'{output_dir} is in use by a running training ({owner or "unknown owner"}, per '
                               f'{path}); wait for it to finish, choose another --output_dir, or delete {path} '
                               f'if that run is gone') from None
        with os.fdopen(fd, 'w') as f:
            f.write(me + '\n')
        return _OwnedLockFile(path)
    raise RunDirLocked(f'{path}: another run took the lock at the same moment; choose another --output_dir')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_run_dir(lock_file) -> None:
    if isinstance(lock_file, _OwnedLockFile):
        lock_file.release()
    elif lock_file is not None:
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.close()


def remove_stale_temp_files(output_dir: Path) -> list[str]:
    """Temp files of saves that were killed (``.<name>.tmp-<host>-<pid>-<token>``); safe under the lock."""
    removed = []
    for p in Path(output_dir).glob('.*.tmp-*'):
        p.unlink(missing_ok=True)
        removed.append(p.name)
    if removed:
        print(f'removed {len(removed)} temp file(s) of interrupted saves in {output_dir}: {removed[:3]}')
    return removed


def _log_records(path: Path, lines: list[str]) -> list[dict]:
    """The JSON records of log.txt's lines. A torn last line (an append cut short by a kill or a full disk)
    is dropped with a note; a bad line before it is not ours to guess at: an error naming it."""
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
            if record is not None and not isinstance(record, dict):
                raise ValueError(f'a JSON {type(record).__name__}, not an epoch record')
        except ValueError as e:
            if n == len(lines):
                print(f'note: {path}:{n}: dropping a torn last line ({e})')
                records.append(None)
                continue
            raise ValueError(f'{path}:{n}: not a log record ({e}); fix or remove that line, then resume') from None
        records.append(record)
    return records


def repair_log(output_dir: Path, epoch: int, record: dict | None) -> None:
    """Make ``log.txt`` end at ``epoch``: drop lines of later (re-trained) epochs, restore a missing line."""
    path = Path(output_dir) / 'log.txt'
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [ln for ln, r in zip(lines, _log_records(path, lines)) if r is not None and r.get('epoch', -1) <= epoch]
    if record is not None and not any(json.loads(ln).get('epoch') == epoch for ln in kept):
        kept.append(json.dumps(record))
    if kept != lines:
        with atomic_open(path, 'w') as f:
            f.write(''.join(ln + '\n' for ln in kept))
        print(f'repaired {path}: now ends at epoch {epoch} ({len(lines)} -> {len(kept)} lines)')


def set_aside_log(output_dir: Path) -> Path | None:
    """A run that starts fresh in a folder with a log (of a run that never checkpointed, or one started again
    with --no-auto-resume) keeps that log as ``log.txt.prev[N]`` instead of appending to it."""
    path = Path(output_dir) / 'log.txt'
    if not path.is_file() or not path.stat().st_size:
        return None
    n, dest = 1, path.with_name('log.txt.prev')
    while dest.exists():
        n += 1
        dest = path.with_name(f'log.txt.prev{n}')
    os.replace(path, dest)
    print(f'starting fresh: the existing {path.name} (no checkpoint to resume it from) was moved to {dest.name}')
    return dest
