"""Submit deit.main to SLURM with submitit (as DeiT's run_with_submitit.py): one task per GPU.

    python -m tools.run_with_submitit --nodes 1 --ngpus 8 --partition gpu --timeout 4320 -- \
        --data-path /data/imagenet --output_dir output/deit_s_maxsup [deit.main flags ...]

Everything after ``--`` goes to deit.main (a recipe: ``-- -c recipes/deit_s_paper.yaml --data-path ...``).
submitit sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, which deit.distributed reads; the master is the
first host of SLURM_JOB_NODELIST. ``--cluster debug`` (or ``local``) runs the job here and waits for it;
``--dry-run`` prints the resolved deit.main configuration and submits nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from deit.args import UsageError
from deit.recipes import parse_args
from deit.main import main as train_main
from deit.preemption import Preempted


class Trainer:
    """Picklable job running deit.main with ``argv``; :meth:`checkpoint` gives submitit the requeued job.

    The run folder is fixed when the job first starts, as DeiT's launcher does: without ``--output_dir``
    deit.main would make a new timestamped folder, and every requeue would start a fresh run. It is the job's
    own submitit folder (``<job-dir>/<job id>``, the same id after a SLURM requeue).

    Preemption / time limit: submitit's SLURM jobs get USR2 (``slurm_signal_delay_s`` before the limit).
    deit.main takes the signal over, saves at the next optimizer step and raises Preempted; then submitit's
    own handler, restored by then, is called: it asks :meth:`checkpoint` for the job to requeue (the same
    argv, resuming that checkpoint) and requeues it.
    """

    def __init__(self, argv: list[str], folder: str | None = None):
        self.argv, self.folder = list(argv), folder  # folder: the job folder template, with %j

    def __call__(self):
        import signal

        import submitit

        if parse_args(self.argv).output_dir is None:
            folder = self.folder or str(Path('output/submitit') / '%j')
            self.argv += ['--output_dir', folder.replace('%j', str(submitit.JobEnvironment().job_id))]
        try:
            return train_main(parse_args(self.argv))
        except Preempted as e:
            print(e, flush=True)
            handler = signal.getsignal(e.signum) if e.signum is not None else None
            if callable(handler):  # submitit's: checkpoint() + requeue + exit
                handler(e.signum, None)
            return {'preempted': True, 'checkpoint': e.checkpoint}

    def checkpoint(self):
        """The job to requeue: this argv, resuming the run folder's checkpoint when there is one (a --resume
        given at the start would otherwise be resumed again)."""
        import submitit

        argv = [a for i, a in enumerate(self.argv) if a != '--resume' and self.argv[i - 1:i] != ['--resume']]
        output_dir = parse_args(argv).output_dir
        if output_dir and (Path(output_dir) / 'checkpoint.pth').is_file():
            argv += ['--resume', str(Path(output_dir) / 'checkpoint.pth')]
        return submitit.helpers.DelayedSubmission(Trainer(argv, self.folder))


def check_cluster(args) -> None:
    """Without SLURM, submitit's auto choice is its local executor: one node and one task. Say so before any
    folder is made, rather than its "LocalExecutor can use only one node" after."""
    if args.cluster is None:
        import submitit
        if submitit.AutoExecutor.which() != 'slurm' and (args.nodes > 1 or args.ngpus > 1):
            raise UsageError(f'error: no SLURM here (sbatch not found), and --nodes {args.nodes} --ngpus '
                             f'{args.ngpus} need it; --cluster debug runs the job in this process (one task), '
                             f'scripts/train_with_MaxSup.sh runs it on the local GPUs')


def build_executor(args):
    try:
        import submitit
    except ImportError as e:
        raise SystemExit('submitit is not installed: pip install submitit') from e
    folder = Path(args.job_dir) / '%j'
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=30)
    # Slurm >= 22.05: srun no longer inherits --cpus-per-task (1 CPU for every trainer and its loader
    # workers); --kill-on-bad-exit ends the job when one rank fails instead of leaving the others waiting.
    kwargs = {'slurm_srun_args': [f'--cpus-per-task={args.cpus_per_task}', '--kill-on-bad-exit=1']}
    if args.partition:
        kwargs['slurm_partition'] = args.partition
    if args.comment:
        kwargs['slurm_comment'] = args.comment
    executor.update_parameters(mem_gb=40 * args.ngpus, gpus_per_node=args.ngpus, tasks_per_node=args.ngpus,
                               cpus_per_task=args.cpus_per_task, nodes=args.nodes, timeout_min=args.timeout,
                               name=args.job_name, **kwargs)
    return executor


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, train = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--nodes', type=int, default=1)
    ap.add_argument('--ngpus', type=int, default=8, help='GPUs (= tasks) per node')
    ap.add_argument('--cpus-per-task', type=int, default=10)
    ap.add_argument('--timeout', type=int, default=2800, help='minutes')
    ap.add_argument('--partition', default=None)
    ap.add_argument('--comment', default=None)
    ap.add_argument('--job-name', default='maxsup')
    ap.add_argument('--job-dir', default=os.environ.get('SUBMITIT_DIR', 'output/submitit'))
    ap.add_argument('--cluster', default=None, help='None: auto (slurm if present), or "debug"/"local"')
    ap.add_argument('--dry-run', action='store_true', help='print the configuration deit.main would run; submit nothing')
    args = ap.parse_args(ours)
    if '--dry-run' in train:  # anywhere, as the launchers: never a submission
        args.dry_run, train = True, [a for a in train if a != '--dry-run']
    if args.dry_run:
        import yaml

        print('deit.main ' + ' '.join(train))
        print(yaml.safe_dump(vars(parse_args(train)), sort_keys=True), end='')
        return None
    check_cluster(args)
    executor = build_executor(args)
    job = executor.submit(Trainer(train, str(Path(args.job_dir) / '%j')))
    print(f'submitted job {job.job_id}; logs in {args.job_dir}')
    if args.cluster in ('debug', 'local'):  # run it now (submitit's debug jobs run only when waited for)
        result = job.result()
        print(f'job {job.job_id} finished: {result.get("test") if isinstance(result, dict) else result}')
    return job


if __name__ == '__main__':
    main()
