"""Cluster faults that cost GPU-hours, imitated on CPU: stop signals and requeues, DataLoader workers across a
resume, a non-finite loss on one rank, ranks that disagree, file systems without flock, multi-node plumbing."""
from __future__ import annotations

import ast
import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deit import distributed as du
from deit import rundir
from data.io import torch_load
from deit.preemption import REQUEUE_EXIT
from tests.conftest import (ROOT, TINY, checksums, corrupt_first_member, make_imagefolder, ok, run_module,
                            without)

HARNESS = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node={n}', '-m', 'tests.dist_harness']
def _harness(n: int, opts=(), args=(), **kw):
    return run_module([a.format(n=n) for a in HARNESS] + list(opts) + ['--'] + list(args), **kw)


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / 'log.txt').read_text().splitlines()]


def _stream_until(cmd, env_extra, marker: str, action, timeout: float = 300):
    """Run ``cmd``; call ``action(proc)`` once a line starts with ``marker``; return (exit code, output)."""
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', **env_extra}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, fired = [], False
    for line in proc.stdout:
        seen.append(line)
        if not fired and line.startswith(marker):
            action(proc)
            fired = True
    proc.wait(timeout=timeout)
    assert fired, ''.join(seen[-30:])
    return proc.returncode, ''.join(seen)


@pytest.fixture(scope='module')
def folder64(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp('p') / 'data', n_classes=3, n_train=32, n_val=4)


# ------------------------------------------------------------------------------------------------------------
# stop signal -> save at the next step -> exit 75 -> resume at that step, bit-identically
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigusr1_saves_mid_epoch_exits_for_requeue_and_resumes_bit_identically(folder64, tmp_path):
    common = TINY + ['--data-set', 'FOLDER', '--data-path', str(folder64), '--epochs', '2', '--batch-size', '8',
                     '--print-freq', '1', '--num_workers', '2', '--mixup', '0.8', '--aa', 'rand-m9-mstd0.5',
                     '--reprob', '0.25', '--model-ema', '--model-ema-decay', '0.9', '--drop-path', '0.1']
    out = tmp_path / 'stopped'
    rc, text = _stream_until([sys.executable, '-m', 'deit.main', *common, '--output_dir', str(out)], {},
                             'Epoch: [1] [ 3/', lambda p: p.send_signal(signal.SIGUSR1))
    assert rc == REQUEUE_EXIT, text[-3000:]
    assert 'received SIGUSR1: saving at the next optimizer step' in text
    ckpt = torch_load(out / 'checkpoint.pth')
    assert ckpt['epoch'] == 0 and 4 <= ckpt['step'] < 12, (ckpt['epoch'], ckpt['step'])
    assert ckpt['log']['epoch'] == 0 and [r['epoch'] for r in _log(out)] == [0]
    assert f'saved {out / "checkpoint.pth"} at epoch 1, step {ckpt["step"]}' in text
    resumed = ok(run_module(['-m', 'deit.main', *common, '--output_dir', str(out)]))
    assert f'starting at epoch 1, step {ckpt["step"]}' in resumed
    full = ok(run_module(['-m', 'deit.main', *common, '--output_dir', str(tmp_path / 'full')]))
    for what in ('parameter', 'ema'):
        assert checksums(resumed, what) == checksums(full, what), what
    assert [r['epoch'] for r in _log(out)] == [0, 1]


def test_stop_signal_is_a_flag_and_handlers_come_back():
    from deit.preemption import StopSignal
    before = signal.getsignal(signal.SIGUSR2)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing, and does not end the process
        assert stop.requested and stop.signum == signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) is before


def test_loader_workers_ignore_the_step_wide_signals_until_released_and_use_one_blas_thread():
    code = ('import json, os, signal, threadpoolctl; from deit.build import init_loader_worker, WorkerSignals; '
            'w = WorkerSignals(); init_loader_worker(w, 0); '
            'os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGUSR1); '
            'print(json.dumps({p["internal_api"]: p["num_threads"] for p in threadpoolctl.threadpool_info()}), '
            'flush=True); w.release(); os.kill(os.getpid(), signal.SIGTERM); print("not ended")')
    r = run_module(['-c', code], env_extra={'OMP_NUM_THREADS': '2'})
    assert r.returncode == 0, r.stderr  # released: SIGTERM ends the worker as multiprocessing expects
    pools = json.loads(r.stdout.strip().splitlines()[-1])
    assert pools and set(pools.values()) == {1}, pools
    assert 'not ended' not in r.stdout


def test_ctrl_c_is_one_line_naming_the_resume_point(tmp_path):
    out = tmp_path / 'run'
    # a terminal's Ctrl-C: SIGINT at its default. A child inherits an ignored SIGINT (a test runner's worker may
    # ignore it, as a shell does for background jobs), and Python then rightly leaves it ignored.
    p = subprocess.Popen([sys.executable, '-m', 'deit.main', *TINY, '--data-set', 'DEMO', '--epochs', '30',
                          '--num_workers', '2', '--output_dir', str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / 'checkpoint.pth').is_file() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == f'interrupted: the same command resumes from {out / "checkpoint.pth"} ' \
                                           f'(its last completed epoch)'


def test_an_error_with_loader_workers_ends_the_process(tmp_path):
    """An unreadable image found by a worker mid-epoch: one line, exit 2, and the process ends (its workers
    ignored the SIGTERM of multiprocessing's exit handler, which then waited for them forever)."""
    root = make_imagefolder(tmp_path / 'data', n_classes=2, n_train=8, n_val=2)
    bad = root / 'train' / 'class_0' / '003.jpg'
    bad.write_bytes(bad.read_bytes()[:200])
    r = run_module(['-m', 'deit.main', *TINY, '--data-set', 'FOLDER', '--data-path', str(root), '--batch-size', '4',
                    '--epochs', '1', '--num_workers', '2', '--output_dir', ''], timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f'error: {bad}: cannot decode image (Truncated File Read)'
    assert 'Traceback' not in r.stderr


@pytest.mark.slow
def test_sbatch_script_forwards_the_time_limit_signal_and_requeues(folder64, tmp_path):
    """SLURM imitated: USR1 to the batch script -> scancel --signal=TERM to the step -> the trainer saves and
    exits 75 -> scontrol requeue; the requeued script resumes the same OUTPUT_DIR and finishes."""
    bin_ = tmp_path / 'bin'
    bin_.mkdir()
    calls = tmp_path / 'calls.txt'
    (bin_ / 'srun').write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                               f'echo $$ > {tmp_path}/step.pid\nexec "$@"\n')
    (bin_ / 'scancel').write_text(f'#!/usr/bin/env bash\necho "scancel $*" >> {calls}\n'
                                  f'kill -"${{1#--signal=}}" "$(cat {tmp_path}/step.pid)"\n')
    (bin_ / 'scontrol').write_text(f'#!/usr/bin/env bash\nif [[ $1 == requeue ]]; then echo "scontrol $*" >> {calls}; '
                                   'else echo node1; fi\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {'PATH': f'{bin_}:{os.environ["PATH"]}', 'SLURM_JOB_ID': '4242', 'SLURM_JOB_NODELIST': 'node1',
           'NGPUS': '1', 'DATA_PATH': str(folder64), 'OUTPUT_DIR': str(tmp_path / 'run'),
           'PYTHON': sys.executable}
    args = without(TINY, '--batch-size') + [
        '--data-set', 'FOLDER', '--model', 'deit_demo_patch4_32', '--input-size', '32', '--total-batch-size', '8',
        '--epochs', '2', '--print-freq', '1', '--warmup-epochs', '0', '--dist-eval', '--drop-path', '0']
    cmd = ['bash', 'scripts/slurm_train.sbatch', *args]

    def usr1_to_the_batch_script(proc):
        proc.send_signal(signal.SIGUSR1)

    rc, text = _stream_until(cmd, env, 'Epoch: [0] [ 3/', usr1_to_the_batch_script)
    assert rc == REQUEUE_EXIT, text[-3000:]
    assert calls.read_text().splitlines() == ['scancel --signal=TERM 4242', 'scontrol requeue 4242']
    ckpt = torch_load(tmp_path / 'run' / 'checkpoint.pth')
    assert ckpt['epoch'] == -1 and ckpt['step'] >= 4
    calls.unlink()
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1', **env}, capture_output=True,
                       text=True, timeout=600)  # the requeued job: same script, same environment
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f'starting at epoch 0, step {ckpt["step"]}' in r.stdout and not calls.exists()
    assert [e['epoch'] for e in _log(tmp_path / 'run')] == [0, 1]


def test_sbatch_script_asks_for_a_signal_and_requeue():
    text = (ROOT / 'scripts' / 'slurm_train.sbatch').read_text()
    assert re.search(r'^#SBATCH --signal=B:USR1@\d+$', text, re.M)
    assert re.search(r'^#SBATCH --requeue$', text, re.M) and re.search(r'^#SBATCH --open-mode=append$', text, re.M)


# ------------------------------------------------------------------------------------------------------------
# submitit: the requeued job continues the job's own folder
# ------------------------------------------------------------------------------------------------------------
def test_submitit_requeue_continues_the_same_folder_at_the_next_step(tmp_path, monkeypatch):
    pytest.importorskip('submitit')
    import deit.loop
    from tools.run_with_submitit import main
    real, sent = deit.loop.train_one_epoch, []

    def preempted_in_epoch_1(*a, **kw):  # submitit's SLURM jobs get USR2 before the time limit
        if a[5] == 1 and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGUSR2))
        return real(*a, **kw)

    monkeypatch.setattr(deit.loop, 'train_one_epoch', preempted_in_epoch_1)
    job = main(['--cluster', 'debug', '--ngpus', '1', '--job-dir', str(tmp_path / 'jobs'), '--'] + TINY +
               ['--data-set', 'DEMO', '--epochs', '2', '--max-steps-per-epoch', '3', '--resume', ''])
    first = job.result()
    folder = tmp_path / 'jobs' / str(job.job_id)
    assert first == {'preempted': True, 'checkpoint': str(folder / 'checkpoint.pth')}
    ckpt = torch_load(folder / 'checkpoint.pth')
    assert (ckpt['epoch'], ckpt['step']) == (0, 1)
    requeued = job.submission().function.checkpoint()
    assert requeued.function.argv[-2:] == ['--resume', str(folder / 'checkpoint.pth')]
    assert requeued.function.argv.count('--resume') == 1
    second = requeued.result()
    assert second['test']['n'] == 450 and [r['epoch'] for r in _log(folder)] == [0, 1]
    assert not list(tmp_path.glob('output*')) and not (ROOT / 'output' / 'submitit' / str(job.job_id)).exists()


# ------------------------------------------------------------------------------------------------------------
# DataLoader workers: the augmentations of a sample do not depend on workers or resumes
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('nproc', [1, 2])
def test_kill_after_epoch_0_with_workers_resumes_to_the_uninterrupted_weights(nproc, tiny_imagefolder, tmp_path):
    common = TINY + ['--data-set', 'FOLDER', '--data-path', str(tiny_imagefolder), '--batch-size', '4',
                     '--epochs', '2', '--num_workers', '2', '--aa', 'rand-m9-mstd0.5', '--reprob', '0.25',
                     '--mixup', '0.8']
    full = ok(_harness(nproc, args=common + ['--output_dir', str(tmp_path / 'full')]))
    out = tmp_path / 'requeued'
    assert _harness(nproc, ['--stop-at-epoch', '1'], common + ['--output_dir', str(out)]).returncode == 0
    resumed = ok(_harness(nproc, args=common + ['--output_dir', str(out)]))
    assert 'starting at epoch 1' in resumed
    a, b = checksums(full), checksums(resumed)
    assert set(a) == {str(r) for r in range(nproc)} and a == b


def test_sample_seeds_depend_on_position_not_on_workers_or_skips():
    from deit.samplers import SeededDataset, SeededSampler

    class Draw(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            import random

            import numpy as np
            return torch.tensor([i, torch.rand(()).item(), random.random(), np.random.rand()])

    def run(workers, skip=0, epoch=0, rank=0):
        sampler = SeededSampler(torch.utils.data.SequentialSampler(range(12)), seed=5, rank=rank)
        sampler.set_epoch(epoch)
        sampler.skip(skip)
        loader = torch.utils.data.DataLoader(SeededDataset(Draw()), sampler=sampler, batch_size=3,
                                             num_workers=workers, generator=torch.Generator())
        return torch.cat(list(loader))

    base = run(0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert torch.equal(run(0), base)
    assert torch.equal(torch.get_rng_state(), state)  # loading in this process leaves its streams alone
    assert torch.equal(run(2), base)
    assert torch.equal(run(2, skip=6), base[6:])
    assert not torch.equal(run(0, epoch=1)[:, 1:], base[:, 1:])
    assert not torch.equal(run(0, rank=1)[:, 1:], base[:, 1:])
    assert len(base[:, 1:].flatten().unique()) == 36


# ------------------------------------------------------------------------------------------------------------
# one rank's fault stops every rank together; every rank reports the same numbers
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_nan_loss_on_one_rank_stops_both_at_once_with_one_message(tiny_imagefolder, tmp_path):
    exits = tmp_path / 'exits'
    exits.mkdir()
    args = TINY + ['--data-set', 'FOLDER', '--data-path', str(tiny_imagefolder), '--batch-size', '4',
                   '--epochs', '2', '--output_dir', str(tmp_path / 'run')]
    start = time.monotonic()
    r = _harness(2, ['--nan-loss', '1:2'], args, env_extra={'EXIT_LOG': str(exits)}, timeout=300)
    elapsed = time.monotonic() - start
    assert r.returncode != 0 and elapsed < 120
    message = 'loss is not finite on rank 1 at epoch 0, step 2: stopping training on every rank'
    assert [(exits / f'rank{k}.error').read_text().split(' (')[0] for k in (0, 1)] == \
        [f'NonFiniteLossError: {message}'] * 2
    assert f'error: {message}' in r.stdout + r.stderr
    assert not (tmp_path / 'run' / 'checkpoint.pth').exists()


def test_step_status_names_every_non_finite_rank_and_the_stop_request():
    from deit.engine import step_status
    assert step_status(torch.tensor(2.5), False) == (2.5, [], False)
    loss, bad, stop = step_status(torch.tensor(float('inf')), True)
    assert bad == [0] and stop and loss != loss


@pytest.mark.slow
def test_ranks_agree_on_skipped_val_images_and_on_the_plateau_metric(tmp_path):
    from data.build_zip_cache import main as build_zip
    src = make_imagefolder(tmp_path / 'src', n_classes=3, n_train=8, n_val=5)
    assert build_zip(['--src', str(src), '--dst', str(tmp_path / 'cache')]) == 0
    corrupt_first_member(tmp_path / 'cache' / 'val.zip')
    args = TINY + ['--data-set', 'IMNET', '--data-path', str(tmp_path / 'cache'), '--cache', '--skip-bad-images',
                   '--batch-size', '4', '--epochs', '4', '--no-repeated-aug', '--sched', 'plateau',
                   '--warmup-epochs', '1', '--patience-epochs', '0', '--decay-rate', '0.1',
                   '--output_dir', str(tmp_path / 'run')]
    # rank 1 'sees' its top-1 rise every epoch, rank 0 sees it fall: read per rank, the plateau schedule
    # would lower the lr on rank 0 only and the weights would part
    text = ok(_harness(2, ['--eval-trend', '1:10'], args))
    logs = _log(tmp_path / 'run')
    assert [r['test_skipped_images'] for r in logs] == [1] * 4  # without --dist-eval: not x world size
    assert logs[3]['lr'] < logs[2]['lr']  # rank 0's falling top-1 lowered the lr
    sums = checksums(text)
    assert set(sums) == {'0', '1'} and sums['0'] == sums['1']


# ------------------------------------------------------------------------------------------------------------
# EMA: no device-to-host copy that may still be running; no CPU evaluation every epoch
# ------------------------------------------------------------------------------------------------------------
def _non_blocking_calls(tree) -> list[int]:
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.keyword) and n.arg == 'non_blocking']


def test_no_copy_in_the_trainer_is_non_blocking_towards_the_host(monkeypatch):
    for path in sorted((ROOT / 'deit').glob('*.py')) + sorted((ROOT / 'data').glob('*.py')):
        lines = _non_blocking_calls(ast.parse(path.read_text()))
        allowed = path.name == 'device_aug.py' and len(lines) == 1  # the one helper, to_device
        assert not lines or allowed, f'{path.name}:{lines}: use deit.device_aug.to_device'
    from deit.device_aug import DeviceBatches
    from deit.engine import evaluate
    real, seen = torch.Tensor.to, []

    def to(self, *a, **kw):
        dest = torch.device(a[0]) if a and isinstance(a[0], (str, torch.device)) else None
        if kw.get('non_blocking') and dest is not None and dest.type == 'cpu':
            raise AssertionError('non-blocking copy towards the host')
        seen.append(dest)
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, 'to', to)
    batches = [(torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2))
    loader = DeviceBatches(batches, 'cpu', (0.5,) * 3, (0.2,) * 3)
    stats = evaluate(loader, model, device=torch.device('cpu'), print_freq=0)
    assert stats['n'] == 4 and torch.device('cpu') in seen


def test_an_ema_kept_on_the_cpu_is_evaluated_once_after_the_last_epoch(tmp_path, monkeypatch):
    import deit.loop
    import deit.main as dm
    from deit.args import get_args_parser
    calls = []
    real = deit.loop.evaluate

    def counting(loader, model, **kw):
        calls.append(model)
        return real(loader, model, **kw)

    monkeypatch.setattr(deit.loop, 'evaluate', counting)
    args = dm.parse_args(TINY + ['--data-set', 'DEMO', '--epochs', '2', '--max-steps-per-epoch', '2',
                                 '--model-ema', '--model-ema-force-cpu', '--output_dir', str(tmp_path)])
    dm.main(args)
    logs = _log(tmp_path)
    assert 'test_ema_acc1' not in logs[0] and 'test_acc1' in logs[0]
    assert 'test_ema_acc1' in logs[1] and len(calls) == 3  # model, model, model + EMA
    assert 'evaluated only after the last epoch' in ' '.join(get_args_parser().format_help().split())


# ------------------------------------------------------------------------------------------------------------
# run-folder lock on file systems that cannot flock
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('code', [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def test_no_flock_falls_back_to_an_exclusive_lock_file(code, tmp_path, monkeypatch, capsys):
    def no_flock(*a):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(rundir.fcntl, 'flock', no_flock)
    lock = rundir.lock_run_dir(tmp_path)
    assert 'cannot be flock-ed' in capsys.readouterr().out
    owner = tmp_path / '.lock.owner'
    assert owner.read_text() == f'host {socket.gethostname()}, pid {os.getpid()}\n'
    with pytest.raises(rundir.RunDirLocked, match=r'in use by a running training \(host .*, per .*\.lock\.owner\)'):
        rundir.lock_run_dir(tmp_path)  # held by a live process: refused
    rundir.release_run_dir(lock)
    assert not owner.exists()
    owner.write_text(f'host {socket.gethostname()}, pid 999999999\n')  # left by a run that died
    lock = rundir.lock_run_dir(tmp_path)
    assert 'taking over' in capsys.readouterr().out
    rundir.release_run_dir(lock)
    owner.write_text('host another-node, pid 1\n')  # cannot be checked from here
    with pytest.raises(rundir.RunDirLocked, match='delete .*lock.owner if that run is gone'):
        rundir.lock_run_dir(tmp_path)


def test_lock_file_edge_cases(tmp_path, monkeypatch, capsys):
    """Its mode; an empty owner line; a dead owner whose file another run removes first; a race lost twice; a
    release after the file is gone; an owner pid of another user counts as alive."""
    def no_flock(*a):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(rundir.fcntl, 'flock', no_flock)
    owner = tmp_path / '.lock.owner'
    old_umask = os.umask(0o022)
    try:
        lock = rundir.lock_run_dir(tmp_path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(owner.stat().st_mode) == 0o644
    owner.unlink()
    rundir.release_run_dir(lock)  # already gone: nothing to do
    owner.write_text('')  # another node's run between creating and writing the file
    with pytest.raises(rundir.RunDirLocked, match=r'in use by a running training \(unknown owner, per '):
        rundir.lock_run_dir(tmp_path)
    owner.write_text(f'host {socket.gethostname()}, pid 999999999\n')

    def dead_and_taken_over(pid):  # another run removes the dead owner's file first
        owner.unlink()
        return False
    monkeypatch.setattr(rundir, '_alive', dead_and_taken_over)
    rundir.release_run_dir(rundir.lock_run_dir(tmp_path))
    monkeypatch.setattr(rundir, '_alive', lambda pid: False)
    real_open = os.open

    def always_taken(path, *a, **kw):  # every attempt finds a file again: the race is lost
        if str(path).endswith('.lock.owner'):
            Path(path).write_text(f'host {socket.gethostname()}, pid 999999999\n')
            raise FileExistsError(path)
        return real_open(path, *a, **kw)
    monkeypatch.setattr(os, 'open', always_taken)
    with pytest.raises(rundir.RunDirLocked, match=r'lock\.owner: another run took the lock at the same moment; '
                                                  r'choose another --output_dir'):
        rundir.lock_run_dir(tmp_path)
    monkeypatch.undo()
    assert rundir._alive(os.getpid()) and not rundir._alive(999999999)


def test_an_owner_pid_of_another_user_is_alive(monkeypatch):
    def eperm(pid, sig):
        raise PermissionError(errno.EPERM, 'Operation not permitted')
    monkeypatch.setattr(rundir.os, 'kill', eperm)
    assert rundir._alive(1)


def test_stdout_copy_is_stdout_for_everything_else():
    copy = rundir.StdoutCopy()
    assert copy.encoding == sys.stdout.encoding and copy.fileno == sys.stdout.fileno


def test_a_flock_held_by_another_process_is_still_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', 'import time; from pathlib import Path; '
                               'from deit.rundir import lock_run_dir; '
                               f'held = lock_run_dir(Path({str(tmp_path)!r})); print("ok", flush=True); '
                               'time.sleep(60)'], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'ok'
        with pytest.raises(rundir.RunDirLocked, match=rf'in use by a running training \(host '
                                                      rf'{re.escape(socket.gethostname())}, pid {holder.pid}\)'):
            rundir.lock_run_dir(tmp_path)  # names the holder its lock file records
    finally:
        holder.kill()
        holder.wait()  # reaped here, not by whoever waits for any child later (mutmut's worker pool does)


# ------------------------------------------------------------------------------------------------------------
# multi-node plumbing: gloo's interface, the segmentation launcher
# ------------------------------------------------------------------------------------------------------------
def test_gloo_interface_is_chosen_only_where_gloo_would_bind_loopback():
    ifaces = lambda: {'lo': '127.0.0.1', 'ib0': '10.1.0.5', 'eth0': '192.0.2.7'}  # noqa: E731
    route = lambda host, port: '10.1.0.5'  # noqa: E731
    choose = lambda env, own='127.0.1.1': du.gloo_interface(  # noqa: E731
        env, hostname_address=lambda: own, route=route, interfaces=ifaces)
    env = {'MASTER_ADDR': '10.1.0.1', 'MASTER_PORT': '29500'}
    assert choose(env) == 'ib0'  # the interface that routes to the master
    assert choose({**env, 'NCCL_SOCKET_IFNAME': 'eth'}) == 'eth0'  # NCCL's prefix, an interface of this host
    assert choose({**env, 'NCCL_SOCKET_IFNAME': '^docker'}) == 'ib0'  # exclusion lists are NCCL's only
    assert choose({**env, 'GLOO_SOCKET_IFNAME': 'eth0'}) is None  # the user's choice stands
    assert choose(env, own='10.1.0.5') is None  # the host name resolves to a routable address: gloo is fine
    assert choose({'MASTER_ADDR': '127.0.0.1'}) is None  # one node
    assert du.interface_addresses().get('lo') == '127.0.0.1'  # the real table of this host


def test_gloo_interface_routes_to_the_masters_port_and_reads_nccl_lists_as_nccl_does():
    addresses = {'lo': '127.0.0.1', 'ib0': '10.1.0.5', 'ib1': '10.2.0.5', 'eth0': '192.0.2.7'}
    routed, source = [], ['10.1.0.5']
    route = lambda host, port: routed.append((host, port)) or source[0]  # noqa: E731
    choose = lambda env: du.gloo_interface(env, hostname_address=lambda: '127.0.1.1', route=route,  # noqa: E731
                                           interfaces=lambda: addresses)
    env = {'MASTER_ADDR': '10.1.0.1', 'MASTER_PORT': '29600'}
    assert choose(env) == 'ib0' and routed == [('10.1.0.1', 29600)]
    assert choose({'MASTER_ADDR': '10.1.0.1'}) == 'ib0' and routed[-1] == ('10.1.0.1', 29500)  # torch's default
    assert choose({**env, 'NCCL_SOCKET_IFNAME': 'xx,ib1'}) == 'ib1'  # a comma list of prefixes
    assert choose({**env, 'NCCL_SOCKET_IFNAME': '^docker,eth'}) == 'ib0'  # '^' excludes the whole list
    assert choose({**env, 'NCCL_SOCKET_IFNAME': '=ib1,eth0'}) == 'ib0'  # '=' exact names: left to the route
    source[0] = '10.9.9.9'
    assert choose(env) is None  # no interface of this host has the routed address


def test_route_source_address_asks_the_kernel():
    assert du.route_source_address('localhost', 9) == '127.0.0.1'


def test_interface_addresses_skip_interfaces_without_ipv4(monkeypatch):
    """SIOCGIFADDR answers a struct ifreq: the name, then a sockaddr_in whose address is at bytes 20-24."""
    table = {b'lo': '127.0.0.1', b'ib0': '10.1.0.5'}

    def ioctl(fd, request, ifreq):
        name = ifreq.rstrip(b'\0')
        if request != 0x8915 or name not in table:
            raise OSError(99, 'Cannot assign requested address')
        return ifreq[:20] + du.socket.inet_aton(table[name]) + ifreq[24:]
    monkeypatch.setattr(du.socket, 'if_nameindex', lambda: [(1, 'lo'), (2, 'noip0'), (3, 'ib0')])
    monkeypatch.setattr(du.fcntl, 'ioctl', ioctl)
    assert du.interface_addresses() == {'lo': '127.0.0.1', 'ib0': '10.1.0.5'}


def test_set_gloo_interface_exports_the_choice(monkeypatch, capsys):
    monkeypatch.setattr(du, 'gloo_interface', lambda env: 'ib0')
    env = {}
    assert du.set_gloo_interface(env) == 'ib0' and env == {'GLOO_SOCKET_IFNAME': 'ib0'}
    assert capsys.readouterr().out == ("gloo: this host's name resolves to a loopback address; using interface ib0 "
                                       "(set GLOO_SOCKET_IFNAME to choose another)\n")
    monkeypatch.setattr(du, 'gloo_interface', lambda env: None)
    env = {}
    assert du.set_gloo_interface(env) is None and env == {} and capsys.readouterr().out == ''


def test_segmentation_launcher_refuses_multi_node_without_rendezvous():
    env = {'PATH': '/usr/bin:/bin', 'PYTHON': 'python3', 'DRY_RUN': '1', 'NNODES': '2'}
    run = lambda **kw: subprocess.run(['bash', 'scripts/dist_train_seg.sh', 'cfg.py', '8'], cwd=ROOT,  # noqa
                                      env={**env, **kw}, capture_output=True, text=True)
    r = run()
    assert r.returncode != 0 and 'set MASTER_ADDR' in r.stderr and 'torch.distributed.run' not in r.stdout
    r = run(MASTER_ADDR='node0')
    assert r.returncode != 0 and 'set NODE_RANK' in r.stderr
    r = run(MASTER_ADDR='node0', NODE_RANK='1')
    assert r.returncode == 0 and '--node_rank=1' in r.stdout and '--master_addr=node0' in r.stdout


# ------------------------------------------------------------------------------------------------------------
# the GPU check's assertions, run on the CPU
# ------------------------------------------------------------------------------------------------------------
def test_gpu_check_assertions_pass_on_good_numbers_and_fail_on_bad(tmp_path):
    r = run_module(['-m', 'benchmarks.gpu_asserts', 'maxsup-amp', '--device', 'cpu'])
    assert r.returncode == 0 and 'maxsup-amp: OK' in r.stdout, r.stderr
    assert json.loads(r.stdout.splitlines()[0])['logits_dtype'] == 'torch.bfloat16'
    run_dir = tmp_path / 'run'
    ok(run_module(['-m', 'deit.main', *TINY, '--data-set', 'DEMO', '--epochs', '1', '--max-steps-per-epoch', '2',
                    '--model-ema', '--model-ema-decay', '0.5', '--output_dir', str(run_dir)]))
    r = run_module(['-m', 'benchmarks.gpu_asserts', 'ema', str(run_dir)])
    assert r.returncode == 0 and 'ema: OK' in r.stdout, r.stdout + r.stderr
    log = json.loads((run_dir / 'log.txt').read_text())
    (run_dir / 'log.txt').write_text(json.dumps({**log, 'test_ema_acc1': log['test_ema_acc1'] + 1.0}) + '\n')
    r = run_module(['-m', 'benchmarks.gpu_asserts', 'ema', str(run_dir)])
    assert r.returncode == 1 and 'ema: FAILED' in r.stdout


# ------------------------------------------------------------------------------------------------------------
# timm's GPU training flags: bf16 autocast, torch.compile, channels-last, a fused optimizer
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bf16_compile_channels_last_fused_train_stop_and_resume(tmp_path):
    args = TINY + ['--data-set', 'DEMO', '--epochs', '2', '--max-steps-per-epoch', '2', '--amp', '--amp-dtype',
                   'bfloat16', '--torchcompile', '--channels-last', '--fused-opt', '--output_dir', str(tmp_path)]
    first = _harness(1, ['--stop-at-epoch', '1'], args, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert 'AMP bfloat16, channels-last, torch.compile(inductor), fused optimizer' in first.stdout
    ckpt = torch_load(tmp_path / 'checkpoint.pth')
    assert ckpt['epoch'] == 0 and not any(k.startswith(('_orig_mod.', 'module.')) for k in ckpt['model'])
    assert ckpt['optimizer']['param_groups'][0]['fused'] is True
    recorded = (tmp_path / 'args.yaml').read_text()
    for line in ('amp_dtype: bfloat16', 'torchcompile: inductor', 'channels_last: true', 'fused_opt: true'):
        assert line in recorded.splitlines()
    resumed = ok(_harness(1, args=['-c', str(tmp_path / 'args.yaml'), '--output_dir', str(tmp_path)], timeout=900))
    assert 'starting at epoch 1' in resumed and [r['epoch'] for r in _log(tmp_path)] == [0, 1]


def test_fused_opt_is_refused_where_torch_has_no_fused_kernel():
    from deit.recipes import parse_args
    from deit.build import build_optimization
    from deit.config import resolve_config
    cfg = resolve_config(parse_args(TINY + ['--opt', 'lamb', '--fused-opt']), 2)
    with pytest.raises(ValueError, match='--fused-opt: torch has no fused kernel for --opt lamb'):
        build_optimization(cfg, torch.nn.Linear(2, 2))


@pytest.mark.parametrize('name', ['ce', 'ls', 'maxsup', 'ls_reg_only', 'ls_err_only', 'ols', 'zipf', 'logit_penalty'])
def test_every_loss_computes_in_float32_under_bf16_autocast(name):
    from deit.engine import autocast
    from deit.criterion import create_criterion
    torch.manual_seed(0)
    logits = (torch.randn(16, 10) * 3).bfloat16()
    target = torch.randint(10, (16,))
    crit = create_criterion(loss=name, nb_classes=10)
    reference = crit(logits.float(), target)
    with autocast(torch.device('cpu'), True, torch.bfloat16):
        low = crit(logits, target)
    assert low.dtype == torch.float32
    assert torch.allclose(low, reference, rtol=1e-5, atol=1e-6), (float(low), float(reference))


def test_a_loader_worker_stays_quiet_when_the_trainer_drops_a_batch_handover():
    """Batches reach the trainer as file descriptors, which it fetches from the worker's resource_sharer
    thread. Ctrl-C in the middle of a fetch drops that connection, and the thread printed a traceback
    (listener.accept ... EOFError) below the trainer's one 'interrupted' line."""
    code = ('import os, socket, time; from multiprocessing import resource_sharer; '
            'from deit.build import init_loader_worker, WorkerSignals; '
            'init_loader_worker(WorkerSignals(), 0); '
            'r, _ = os.pipe(); handover = resource_sharer.DupFd(r); '  # as torch shares a batch's storage
            's = socket.socket(socket.AF_UNIX); s.connect(handover._id[0]); '
            's.close(); time.sleep(1); '  # the trainer, interrupted before the handshake
            'print("serving", resource_sharer._resource_sharer._thread.is_alive()); import sys; '
            'sys.excepthook(ValueError, ValueError("other errors are still reported"), None)')
    r = run_module(['-c', code])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == 'serving True'
    assert r.stderr == 'ValueError: other errors are still reported\n'
