"""The run folder (``--output_dir``): one writer at a time, one run per folder, nothing half-written left behind.

Write order of an epoch (rank 0): ``best_checkpoint.pth`` (when best) -> the epoch's record (``log.txt`` line,
``summary.csv`` row, TensorBoard scalars) -> ``checkpoint.pth``. ``checkpoint.pth`` is what a resume reads,
so it is written last: a kill before it leaves the previous epoch as the resume point, and every per-epoch
file is then made to end at that epoch with its record (:func:`repair_epoch_files`; TensorBoard by its
``purge_step``), so the epoch trained again appears once.

A fresh start in a folder that holds another run's files moves them aside first (:func:`set_aside_run`).
"""
from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import socket
import sys
from pathlib import Path

from data.io import atomic_open
from deit.distributed import is_main_process

LOCK_NAME = '.lock'
# what a run writes into its folder: a fresh start moves all of it aside together
RUN_FILES = ('checkpoint.pth', 'best_checkpoint.pth', 'log.txt', 'summary.csv', 'tb', 'args.yaml', 'stdout.log')


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


def repair_epoch_files(output_dir: Path, epoch: int, record: dict | None) -> None:
    """Make ``log.txt`` and ``summary.csv`` end at ``epoch`` (the checkpoint's): drop the rows of later, re-trained
    epochs and restore the checkpoint's own record where a kill left it out."""
    repair_log(output_dir, epoch, record)
    repair_summary(output_dir, epoch, record)


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


def append_summary(output_dir: Path, record: dict) -> None:
    """One ``summary.csv`` row (timm's file: the columns of the first record, in its order)."""
    path = Path(output_dir) / 'summary.csv'
    header = _summary_rows(path)[0] if path.is_file() and path.stat().st_size else list(record)
    with open(path, 'a', newline='') as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction='ignore')
        if not f.tell():
            w.writeheader()
        w.writerow(record)


def _summary_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if not rows or 'epoch' not in rows[0]:
        raise ValueError(f'{path}: not a summary.csv of this trainer (no "epoch" column in its header); move it '
                         f'away, then resume')
    return rows[0], rows[1:]


def repair_summary(output_dir: Path, epoch: int, record: dict | None) -> None:
    """``summary.csv`` by :func:`repair_log`'s rule: rows of epochs after ``epoch`` and a torn last row (fewer
    fields than the header) dropped, the checkpoint's record restored when missing."""
    path = Path(output_dir) / 'summary.csv'
    if not path.is_file() or not path.stat().st_size:
        return
    header, rows = _summary_rows(path)
    col, kept = header.index('epoch'), []
    for n, row in enumerate(rows, 2):
        if len(row) != len(header) and n == len(rows) + 1:
            print(f'note: {path}:{n}: dropping a torn last row')
            continue
        try:
            if int(row[col]) <= epoch:
                kept.append(row)
        except (ValueError, IndexError):
            raise ValueError(f'{path}:{n}: not an epoch row ({",".join(row)[:80]!r}); fix or remove that line, then '
                             f'resume') from None
    if record is not None and not any(int(r[col]) == epoch for r in kept):
        kept.append([str(record.get(h, '')) for h in header])
    if kept != rows:
        text = io.StringIO()
        csv.writer(text, lineterminator='\r\n').writerows([header] + kept)
        with atomic_open(path, 'w', newline='') as f:
            f.write(text.getvalue())
        print(f'repaired {path}: now ends at epoch {epoch} ({len(rows)} -> {len(kept)} rows)')


def set_aside_run(output_dir: Path) -> Path | None:
    """A fresh start in a folder that holds another run's files (a run that never checkpointed, or a run
    started again with --no-auto-resume) first moves all of them into ``previous_run[N]/``: nothing of that
    run is overwritten, appended to, or left behind to be mistaken for the new run's."""
    output_dir = Path(output_dir)
    present = [name for name in RUN_FILES if (output_dir / name).exists()]
    if not present:
        return None
    n, dest = 1, output_dir / 'previous_run'
    while dest.exists():
        n += 1
        dest = output_dir / f'previous_run{n}'
    dest.mkdir()
    for name in present:
        os.replace(output_dir / name, dest / name)
    print(f'starting fresh: the files of the run already in {output_dir} ({", ".join(present)}) were moved to '
          f'{dest}')
    return dest


class StdoutCopy:
    """A copy of this process's stdout in the run folder's ``stdout.log`` (timm and DeiT users look for it
    there), from the first line: what is printed before the folder is known and claimed (the input pipeline,
    batch and lr, criterion, parameter count) is held and written when :meth:`attach` names the file."""

    def __init__(self):
        self.real, self.held, self.file = sys.stdout, io.StringIO(), None

    def write(self, s: str) -> int:
        self.real.write(s)
        return (self.file or self.held).write(s)

    def flush(self) -> None:
        self.real.flush()
        if self.file is not None:
            self.file.flush()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def attach(self, path: Path) -> None:
        self.file = open(path, 'a', buffering=1)
        self.file.write(self.held.getvalue())
        self.held = None

    def __enter__(self):
        sys.stdout = self
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout = self.real
        if self.file is not None:
            self.file.close()


def open_tensorboard(output_dir: Path | None, resume: tuple[int, dict | None] | None = None):
    """TensorBoard's writer for ``output_dir/tb``. ``resume`` (the checkpoint's epoch and record): the steps from
    that epoch on are purged (TensorBoard's ``purge_step``: an epoch trained again appears once) and the
    checkpoint's record is written again, as the other per-epoch files are repaired."""
    if not output_dir or not is_main_process():
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
