"""Stop at a safe point when the cluster says so: save, exit with REQUEUE_EXIT, resume on requeue.

SLURM warns a job before its time limit with the signal asked for in ``#SBATCH --signal`` (our sbatch
script: USR1, forwarded to the trainers as TERM), and before a preemption with SIGTERM; submitit asks for
USR2. Killing the trainer there would lose everything since the last epoch's checkpoint. Instead the
handler only raises a flag; the training loop reads it after the next optimizer step (all ranks agree in the
per-step status all-reduce, so no rank stops alone), saves a checkpoint of that step and raises
:class:`Preempted`. The process then exits with :data:`REQUEUE_EXIT` (75, ``EX_TEMPFAIL``: "try again") and
the requeued job auto-resumes from the same output folder, at the same step.

Repeated signals are ignored: SLURM signals every process of a step and torchrun forwards its own SIGTERM,
so a trainer may be told twice. SIGINT (Ctrl-C) is left alone. If no safe point comes in time, SLURM's or
torchrun's SIGKILL ends the process and the last checkpoint stays the resume point.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading

REQUEUE_EXIT = 75
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class Preempted(Exception):
    """The run saved a checkpoint at a safe point after a stop signal; rerun (requeue) to continue."""

    def __init__(self, message: str, signum: int | None, checkpoint: str | None):
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint


class StopSignal:
    """Context manager: while active, SIGUSR1/SIGUSR2/SIGTERM set :attr:`signum` instead of ending the process.

    The handlers installed before (e.g. submitit's requeue handler) are restored on exit, so a launcher can
    chain to them once the state is saved. Outside the main thread signals cannot be caught; the object then
    stays inactive.
    """

    def __init__(self, signals=SIGNALS):
        self.signals, self.signum, self.previous = tuple(signals), None, {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            print(f'received {signal.Signals(signum).name}: saving at the next optimizer step, then exiting with '
                  f'code {REQUEUE_EXIT} for a requeue', flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}
        return False


class WorkerSignals:
    """The stop signals in DataLoader workers. SLURM signals every process of a job step, loader workers
    included; a worker that died of it would crash the trainer (torch's SIGCHLD check) before it reaches its
    safe point, so workers ignore SIGUSR1/SIGUSR2 and SIGTERM. But multiprocessing's exit handler ends
    leftover daemonic children with SIGTERM and then waits for them: a worker ignoring it for good hangs the
    trainer's exit forever (workers are left over when an error ends the run mid-epoch). So SIGTERM ends a
    worker once the trainer has :meth:`release`-d it (a shared flag, set when the run is over).

    A worker hands each batch over as file descriptors that the trainer fetches from the worker's
    resource_sharer thread. Ctrl-C in the middle of a fetch drops the connection, and that thread reports
    the broken pipe through ``sys.excepthook`` as a traceback under the trainer's one "interrupted" line; in
    a worker, a connection the trainer dropped is reported by the trainer, not there."""

    def __init__(self):
        self.released = mp.Value('b', 0, lock=False)

    def install(self) -> None:
        """In each worker (its ``worker_init_fn``)."""
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)
        sys.excepthook = _quiet_about_dropped_connections(sys.excepthook)

    def _on_term(self, signum, frame) -> None:
        if self.released.value:
            os._exit(0)

    def release(self) -> None:
        """In the trainer, when it is done with its loaders."""
        self.released.value = 1


def _quiet_about_dropped_connections(hook):
    def excepthook(kind, value, traceback):
        if not issubclass(kind, (EOFError, ConnectionError)):
            hook(kind, value, traceback)
    return excepthook
