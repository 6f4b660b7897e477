"""torch.distributed set-up from torchrun or SLURM, and the few collectives the trainer needs.

This is the one place besides ``main`` that reads environment variables (the launcher contract):
  torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  SLURM (one task per GPU, ``srun python -m deit.main``): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
        master = first host of SLURM_JOB_NODELIST unless MASTER_ADDR is set.
"""
from __future__ import annotations

import builtins
import datetime
import os
import re

import torch
import torch.distributed as dist


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as ``gpu[01-03,07],cpu5`` into host names (as ``scontrol show hostnames``)."""
    hosts = []
    for group in re.findall(r'[^,\[]+(?:\[[^\]]*\])?', nodelist):
        m = re.fullmatch(r'([^\[]+)\[([^\]]+)\]', group)
        if not m:
            hosts.append(group)
            continue
        prefix, ranges = m.groups()
        for part in ranges.split(','):
            if '-' in part:
                lo, hi = part.split('-')
                hosts += [f'{prefix}{i:0{len(lo)}d}' for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(prefix + part)
    if not hosts:
        raise ValueError(f'cannot parse SLURM node list {nodelist!r}')
    return hosts


def dist_env(env: dict | None = None) -> dict | None:
    """rank/world/local_rank/master from the environment, or None for a single process."""
    env = os.environ if env is None else env
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return {'rank': int(env['RANK']), 'world_size': int(env['WORLD_SIZE']),
                'local_rank': int(env.get('LOCAL_RANK', 0)), 'source': 'torchrun',
                'master_addr': env.get('MASTER_ADDR'), 'master_port': env.get('MASTER_PORT')}
    if 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
        nodelist = env.get('SLURM_JOB_NODELIST') or env.get('SLURM_NODELIST')
        master = env.get('MASTER_ADDR') or (expand_nodelist(nodelist)[0] if nodelist else None)
        if master is None:
            raise ValueError('SLURM run without MASTER_ADDR or SLURM_JOB_NODELIST: cannot find the master host')
        return {'rank': int(env['SLURM_PROCID']), 'world_size': int(env['SLURM_NTASKS']),
                'local_rank': int(env.get('SLURM_LOCALID', 0)), 'source': 'slurm',
                'master_addr': master, 'master_port': env.get('MASTER_PORT', '29500')}
    return None


def init_distributed_mode(args) -> None:
    """Fill args.{distributed, rank, world_size, gpu, dist_backend} and init the process group if needed."""
    info = dist_env()
    if info is None:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        args.dist_backend = None
        return
    if info['source'] == 'slurm':  # torch's env:// init reads these
        os.environ['MASTER_ADDR'] = info['master_addr']
        os.environ['MASTER_PORT'] = str(info['master_port'])
        os.environ['RANK'], os.environ['WORLD_SIZE'] = str(info['rank']), str(info['world_size'])
        os.environ['LOCAL_RANK'] = str(info['local_rank'])
    args.distributed, args.rank, args.world_size = True, info['rank'], info['world_size']
    args.gpu = info['local_rank']
    use_cuda = torch.cuda.is_available() and getattr(args, 'device', 'cuda') != 'cpu'
    args.dist_backend = 'nccl' if use_cuda else 'gloo'
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    print(f'| distributed init (rank {args.rank}/{args.world_size}, local {args.gpu}, '
          f'{info["source"]}, backend {args.dist_backend})', flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method='env://', world_size=args.world_size,
                            rank=args.rank, timeout=datetime.timedelta(minutes=30))
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def setup_for_distributed(is_master: bool) -> None:
    """Silence print() on non-master ranks (``print(..., force=True)`` still prints)."""
    builtin_print = builtins.print

    def print_(*a, **kw):
        if kw.pop('force', False) or is_master:
            builtin_print(*a, **kw)

    builtins.print = print_


def print_all(*a) -> None:
    """Print from every rank (bypasses the master-only print of distributed runs)."""
    if is_dist():
        print(*a, force=True, flush=True)
    else:
        print(*a, flush=True)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (no-op for one process). Returns the same tensor."""
    if is_dist():
        dist.all_reduce(t)
    return t
