"""Run ``deit.main`` under torchrun as a GPU cluster run would, on CPU.

The process group is made from the backend specification a CUDA run uses, with the CUDA backend swapped
for gloo (``cpu:gloo,cuda:nccl`` -> ``cpu:gloo,cuda:gloo``; an NCCL-only ``nccl`` -> ``cuda:gloo``), so a
collective on a tensor whose device type has no backend in that specification fails here exactly as it
would under NCCL. Every collective call is recorded (the innermost project function that made it) into
``$COLLECTIVE_LOG/rank<r>.json``.

    torchrun --nproc_per_node=2 -m tests.dist_harness [options] -- <deit.main arguments>   (from the repo root)

Options: ``--legacy-spec SPEC`` the GPU backend spec to imitate (default: the project's); ``--stop-at-epoch E``
every rank exits when it enters epoch E (a requeue after epoch E-1, deterministically); ``--kill-after-write N``
the process dies (exit 137, as SIGKILL) right after its N-th run-folder write (checkpoint saves and log
lines, in order); ``--rank-local-output``
ranks > 0 get ``<output_dir>.rank<r>`` (an output dir that is not shared between nodes); ``--nan-loss R:N`` the
loss of rank R's N-th criterion call (from 0) is NaN; ``--eval-trend R:D`` the n-th evaluation reports top-1
50 + n D on rank R and 50 - n D on the others (ranks that disagree, as GPUs may, in opposite directions);
``--signal-at R:N`` rank R sends itself SIGUSR1 during its N-th criterion call (a stop signal seen by one
rank). With ``$EXIT_LOG`` set, each rank writes the error that ends its training
loop, when raised (before torchrun's teardown can kill it), to ``$EXIT_LOG/rank<r>.error``.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

from deit import distributed as du

ROOT = Path(__file__).resolve().parents[1]

HELPERS = {'all_reduce_sum', 'any_rank', 'broadcast_object', 'all_gather_object'}
COLLECTIVES = ('all_reduce', 'broadcast', 'broadcast_object_list', 'all_gather', 'all_gather_object',
               'gather_object', 'reduce', 'barrier', 'all_gather_into_tensor', 'reduce_scatter')


def simulated_spec(gpu_spec: str) -> str:
    """The GPU run's backend spec with every CUDA backend replaced by gloo."""
    if ':' not in gpu_spec:  # one backend for all devices: NCCL serves CUDA tensors only
        return 'cuda:gloo' if gpu_spec == 'nccl' else gpu_spec
    pairs = [p.split(':') for p in gpu_spec.split(',')]
    return ','.join(f'{dev}:{"gloo" if dev == "cuda" else be}' for dev, be in pairs)


def caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename).resolve()
        if ROOT in path.parents and path.parent.name != 'tests' and frame.name not in HELPERS:
            return f'{path.relative_to(ROOT).as_posix()}:{frame.name}'
    return '<outside the project>'


def record_collectives(log: dict, path: Path | None) -> None:
    """Record (calling function, collective) pairs; each new pair rewrites ``path`` at once (atomically), so the
    file is complete even when torchrun's teardown kills this rank on its way out."""
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def wrapped(*a, _real=real, _name=name, **kw):
            seen = log.setdefault(caller(), set())
            if _name not in seen:
                seen.add(_name)
                if path is not None:
                    tmp = path.with_suffix('.tmp')
                    tmp.write_text(json.dumps({k: sorted(v) for k, v in log.items()}))
                    os.replace(tmp, path)
            return _real(*a, **kw)

        setattr(dist, name, wrapped)


def stop_at_epoch(epoch: int) -> None:
    import deit.loop
    real = deit.loop.train_one_epoch

    def train_one_epoch(*a, **kw):
        if a[5] == epoch:
            sys.stdout.flush()
            os._exit(0)
        return real(*a, **kw)

    deit.loop.train_one_epoch = train_one_epoch


def kill_after_write(n: int) -> None:
    import deit.loop
    count = [0]

    def counted(real):
        def write(*a, **kw):
            out = real(*a, **kw)
            count[0] += 1
            if count[0] == n:
                sys.stdout.flush()
                os._exit(137)
            return out
        return write

    deit.loop.save_atomic = counted(deit.loop.save_atomic)
    deit.loop.write_log = counted(deit.loop.write_log)


def at_criterion_call(rank: int, call: int, act) -> None:
    """``act(loss)`` replaces the loss of rank ``rank``'s ``call``-th criterion call (from 0)."""
    import deit.main
    real = deit.main.setup_criterion

    def setup_criterion(*a, **kw):
        criterion, base, schedule = real(*a, **kw)
        if du.get_rank() != rank:
            return criterion, base, schedule
        calls = [0]

        def wrapped(*ca, **ckw):
            loss = criterion(*ca, **ckw)
            calls[0] += 1
            return act(loss) if calls[0] - 1 == call else loss
        return wrapped, base, schedule

    deit.main.setup_criterion = setup_criterion


def nan_loss(loss):
    return loss * float('nan')


def signal_self(loss):
    os.kill(os.getpid(), signal.SIGUSR1)
    return loss


def eval_trend(rank: int, delta: float) -> None:
    import deit.loop
    real, calls = deit.loop.evaluate, [0]

    def evaluate(*a, **kw):
        calls[0] += 1
        sign = 1 if du.get_rank() == rank else -1
        return {**real(*a, **kw), 'acc1': 50 + sign * calls[0] * delta}

    deit.loop.evaluate = evaluate


def record_training_errors(folder: Path) -> None:
    import deit.loop
    real = deit.loop.train_one_epoch

    def train_one_epoch(*a, **kw):
        try:
            return real(*a, **kw)
        except Exception as e:
            Path(folder, f'rank{du.get_rank()}.error').write_text(f'{type(e).__name__}: {e}')
            raise

    deit.loop.train_one_epoch = train_one_epoch


def hide_folder(folder: Path) -> None:
    """Make files below ``folder`` invisible to this process (another node's local disk)."""
    real_is_file = Path.is_file

    def is_file(self, *a, **kw):
        return False if folder in Path(os.path.abspath(self)).parents else real_is_file(self, *a, **kw)

    Path.is_file = is_file


def main(argv: list[str]) -> int:
    opts = argv[:argv.index('--')] if '--' in argv else []
    argv = argv[len(opts) + 1:] if '--' in argv else argv
    legacy = opts[opts.index('--legacy-spec') + 1] if '--legacy-spec' in opts else None
    if '--stop-at-epoch' in opts:
        stop_at_epoch(int(opts[opts.index('--stop-at-epoch') + 1]))
    if '--kill-after-write' in opts:
        kill_after_write(int(opts[opts.index('--kill-after-write') + 1]))
    for opt, act in (('--nan-loss', nan_loss), ('--signal-at', signal_self)):
        if opt in opts:
            r, n = opts[opts.index(opt) + 1].split(':')
            at_criterion_call(int(r), int(n), act)
    if '--eval-trend' in opts:
        r, d = opts[opts.index('--eval-trend') + 1].split(':')
        eval_trend(int(r), float(d))
    rank = int(os.environ.get('RANK', '0'))
    if '--rank-local-output' in opts and rank > 0:
        i = argv.index('--output_dir') + 1
        hide_folder(Path(argv[i]).resolve())
        argv[i] = f'{argv[i]}.rank{rank}'
    gpu_spec = legacy or du.process_group_backend(True)
    du.process_group_backend = lambda use_cuda: simulated_spec(gpu_spec)
    out = os.environ.get('COLLECTIVE_LOG')
    record_collectives({}, Path(out, f'rank{rank}.json') if out else None)
    if os.environ.get('EXIT_LOG'):
        record_training_errors(Path(os.environ['EXIT_LOG']))
    from deit.main import cli
    return cli(argv)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
