"""The rendezvous port of a SLURM job, without torch, so the shell launchers ask the same function as the trainer:
``python -m deit.rendezvous`` prints it (scripts/_env.sh: job_port)."""
from __future__ import annotations

import os


def slurm_port(env) -> str:
    """MASTER_PORT, else a port in [15000, 35000) derived from the job id (as DeiT/Swin's launchers), so two
    jobs sharing a node never both take 29500; else 29500."""
    if env.get('MASTER_PORT'):
        return str(env['MASTER_PORT'])
    job = env.get('SLURM_JOB_ID') or env.get('SLURM_JOBID')
    return str(15000 + int(job) % 20000) if job and job.isdigit() else '29500'


if __name__ == '__main__':
    print(slurm_port(os.environ))
