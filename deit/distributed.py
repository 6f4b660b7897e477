"""torch.distributed set-up from torchrun or SLURM, and the few collectives the trainer needs.

This is the one place besides ``main`` that reads environment variables (the launcher contract):
  torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  SLURM (one task per GPU, ``srun python -m deit.main``): SLURM_PROCID, SLURM_STEP_NUM_TASKS / SLURM_NTASKS,
        SLURM_LOCALID; master = first host of the node list unless MASTER_ADDR is set; port = MASTER_PORT or
        one derived from SLURM_JOB_ID (two jobs sharing a node never collide on 29500).

Backends: a GPU run initialises ONE process group with a backend per device type, ``cpu:gloo,cuda:nccl``.
NCCL serves the CUDA tensors (DDP's gradient buckets); gloo serves the small host-side reductions (meters,
evaluation sums, OLS counts, skipped-image counts) and the object collectives (resume decision, RNG states).
An NCCL-only group cannot reduce a CPU tensor ("No backend type associated with device type cpu"); the
alternative, copying every reduced tensor to the GPU first, has to be remembered at every call site, and a
single forgotten one crashes a cluster run at the end of epoch 0 - so the group serves both instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import itertools
import os
import re
import shutil
import socket
import struct
import subprocess
import sys

import torch
import torch.distributed as dist

from deit.rendezvous import slurm_port

CUDA_BACKEND = 'cpu:gloo,cuda:nccl'
CPU_BACKEND = 'gloo'
SLURM_NO_STEP_IDS = {'4294967290', '4294967291', '4294967292', '4294967293', '4294967294', '4294967295',
                     'batch', 'extern', 'interactive'}  # the batch script / extern / interactive steps


def process_group_backend(use_cuda: bool) -> str:
    return CUDA_BACKEND if use_cuda else CPU_BACKEND


def _split_top_level(text: str, sep: str = ',') -> list[str]:
    """Split on ``sep`` outside brackets: ``a[1-2,4]-ib,b3`` -> ``['a[1-2,4]-ib', 'b3']``."""
    parts, depth, cur = [], 0, ''
    for ch in text:
        depth += (ch == '[') - (ch == ']')
        if depth < 0 or depth > 1:
            raise ValueError(f'cannot parse SLURM node list {text!r}: unbalanced brackets')
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ''
        else:
            cur += ch
    if depth:
        raise ValueError(f'cannot parse SLURM node list {text!r}: unbalanced brackets')
    return parts + [cur]


def _expand_range_list(spec: str, nodelist: str) -> list[str]:
    out = []
    for part in spec.split(','):
        lo, _, hi = part.partition('-')
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f'cannot parse SLURM node list {nodelist!r}: bad range {part!r}')
        out += [f'{i:0{len(lo)}d}' for i in range(int(lo), int(hi or lo) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``gpu[01-03,07]-ib,x1000c0s[0-1]b0n[0-1]``) as ``scontrol show hostnames`` does.

    Every bracket group of a host expression is expanded, in order (the last varies fastest), and the text
    around and between the groups is kept.
    """
    hosts = []
    for expr in _split_top_level(nodelist.strip()):
        if not expr:
            continue
        pieces = re.split(r'\[([^\]]*)\]', expr)  # text, ranges, text, ranges, ..., text
        choices = [[p] if i % 2 == 0 else _expand_range_list(p, nodelist) for i, p in enumerate(pieces)]
        hosts += [''.join(c) for c in itertools.product(*choices)]
    if not hosts:
        raise ValueError(f'cannot parse SLURM node list {nodelist!r}')
    return hosts


def first_host(nodelist: str) -> str:
    """First host of a node list: ``scontrol show hostnames`` when SLURM's tools are here, else our parser."""
    if shutil.which('scontrol'):
        try:
            out = subprocess.run(['scontrol', 'show', 'hostnames', nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)[0]


def dist_env(env: dict | None = None) -> dict | None:
    """rank/world/local_rank/master from the environment, or None for a single process.

    SLURM variables count only inside a real job step (``srun``, submitit): a ``python`` started directly in
    a batch script inherits SLURM_PROCID=0 and SLURM_NTASKS>1 but has no peers, and would wait for them
    forever; it runs single-process, with a note.
    """
    env = os.environ if env is None else env
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return {'rank': int(env['RANK']), 'world_size': int(env['WORLD_SIZE']),
                'local_rank': int(env.get('LOCAL_RANK', 0)), 'source': 'torchrun',
                'master_addr': env.get('MASTER_ADDR'), 'master_port': env.get('MASTER_PORT')}
    if 'SLURM_PROCID' not in env:
        return None
    world = int(env.get('SLURM_STEP_NUM_TASKS') or env.get('SLURM_NTASKS') or 1)
    rank = int(env['SLURM_PROCID'])
    step = env.get('SLURM_STEP_ID', env.get('SLURM_STEPID'))
    if world <= 1:
        return None
    if step is None or step in SLURM_NO_STEP_IDS or not 0 <= rank < world:
        print(f'note: SLURM variables found (SLURM_PROCID={rank}, {world} tasks) but this process is not a task '
              f'of a job step (SLURM_STEP_ID={step}): running as a single process. Start multi-process runs '
              f'with srun or torchrun.', flush=True)
        return None
    nodelist = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST') or env.get('SLURM_NODELIST')
    master = env.get('MASTER_ADDR') or (first_host(nodelist) if nodelist else None)
    if master is None:
        raise ValueError('SLURM run without MASTER_ADDR or SLURM_JOB_NODELIST: cannot find the master host')
    return {'rank': rank, 'world_size': world, 'local_rank': int(env.get('SLURM_LOCALID', 0)), 'source': 'slurm',
            'master_addr': master, 'master_port': slurm_port(env)}


def interface_addresses() -> dict[str, str]:
    """IPv4 address of every network interface of this host (``{'lo': '127.0.0.1', 'eth0': ...}``)."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack('256s', name.encode()[:15]))  # SIOCGIFADDR
            except OSError:  # no IPv4 address on it
                continue
            out[name] = socket.inet_ntoa(packed[20:24])
    return out


def route_source_address(host: str, port: int) -> str:
    """The local address the kernel would use to reach ``host`` (a UDP connect sends no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), port))
        return s.getsockname()[0]


def gloo_interface(env, hostname_address=None, route=route_source_address, interfaces=interface_addresses):
    """The interface gloo should use, or None to leave gloo's own choice (which is fine on most hosts).

    gloo binds to whatever this host's name resolves to; on many installs that is 127.0.1.1 (Debian's
    /etc/hosts), and a multi-node job then fails at its first barrier with ``connectFullMesh failed``.
    Only then, and only when GLOO_SOCKET_IFNAME is unset and the master is another host: NCCL_SOCKET_IFNAME
    when it names interfaces of this host (NCCL's prefix match, without its ``^``/``=`` forms), else the
    interface that routes to MASTER_ADDR.
    """
    master = env.get('MASTER_ADDR')
    if env.get('GLOO_SOCKET_IFNAME') or not master:
        return None
    try:
        own = hostname_address() if hostname_address else socket.gethostbyname(socket.gethostname())
        master_ip = socket.gethostbyname(master)
    except OSError:
        return None
    if not own.startswith('127.') or master_ip.startswith('127.'):
        return None
    addresses = interfaces()
    nccl = env.get('NCCL_SOCKET_IFNAME', '')
    if nccl and not nccl.startswith(('^', '=')):
        names = [n for prefix in nccl.split(',') for n in sorted(addresses) if prefix and n.startswith(prefix)]
        if names:
            return names[0]
    source = route(master, int(env.get('MASTER_PORT') or 29500))
    return next((n for n, a in addresses.items() if a == source), None)


def cuda_device_index(local_rank: int) -> int:
    """The GPU of this process: local_rank modulo the visible GPUs (a task may see only its own GPU)."""
    return local_rank % max(torch.cuda.device_count(), 1)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process stands: one process by default. ``gpu``: its CUDA device index (the local rank
    modulo the visible GPUs), or its local rank on a CPU run."""
    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    gpu: int = 0
    backend: str | None = None


def init_distributed(device: str | None = None) -> DistInfo:
    """Init the process group when a launcher started several processes; returns this process's place.
    ``device``: the run's --device (a run forced onto the CPU uses gloo alone, also on a GPU host)."""
    info = dist_env()
    if info is None:
        return DistInfo()
    if info['source'] == 'slurm':  # torch's env:// init reads these
        os.environ['MASTER_ADDR'] = info['master_addr']
        os.environ['MASTER_PORT'] = str(info['master_port'])
        os.environ['RANK'], os.environ['WORLD_SIZE'] = str(info['rank']), str(info['world_size'])
        os.environ['LOCAL_RANK'] = str(info['local_rank'])
    use_cuda = torch.cuda.is_available() and (device or 'cuda') != 'cpu'
    place = DistInfo(True, info['rank'], info['world_size'],
                     cuda_device_index(info['local_rank']) if use_cuda else info['local_rank'],
                     process_group_backend(use_cuda))
    if use_cuda:  # before the first collective: NCCL binds the communicator to the current device
        torch.cuda.set_device(place.gpu)
    set_gloo_interface()
    print(f'| distributed init (rank {place.rank}/{place.world_size}, local {info["local_rank"]}, '
          f'{info["source"]}, backend {place.backend})', flush=True)
    dist.init_process_group(backend=place.backend, init_method='env://', world_size=place.world_size,
                            rank=place.rank, timeout=datetime.timedelta(minutes=30))
    dist.barrier()
    return place


def set_gloo_interface(env=None) -> str | None:
    """Export GLOO_SOCKET_IFNAME when :func:`gloo_interface` finds that gloo's own choice would fail."""
    env = os.environ if env is None else env
    name = gloo_interface(env)
    if name:
        env['GLOO_SOCKET_IFNAME'] = name
        print(f'gloo: this host\'s name resolves to a loopback address; using interface {name} '
              f'(set GLOO_SOCKET_IFNAME to choose another)', flush=True)
    return name


@contextlib.contextmanager
def main_rank_output(rank: int):
    """Within it, only rank 0's standard output is shown (DeiT silences print on the other ranks; here the
    stream is redirected for the run instead of replacing print for good). :func:`print_all` still prints."""
    if rank == 0:
        yield
        return
    with open(os.devnull, 'w') as null, contextlib.redirect_stdout(null):
        yield


def print_all(*a) -> None:
    """Print from every rank (the other ranks' output is silenced by :func:`main_rank_output`)."""
    print(*a, file=sys.stdout if get_rank() == 0 else sys.__stdout__, flush=True)


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


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (keeps ranks stepping together)."""
    if not is_dist():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj=None, src: int = 0):
    """rank ``src``'s ``obj`` on every rank (pickled; for small decisions and, rarely, a whole checkpoint)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
