"""Shared by segmentation/train.py and test.py: config loading, CPU fallbacks, data checks."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from data.io import CheckpointError, atomic_open
from deit import distributed as du
from deit.rendezvous import slurm_port
from deit.releases import read_state_dict
from segmentation.deit_to_mmseg import convert_checkpoint



def require_segmentation_stack() -> None:
    """A one-line answer instead of a ModuleNotFoundError when mmcv / mmengine / mmseg are missing."""
    try:
        import mmengine  # noqa: F401
        import mmseg  # noqa: F401
    except ImportError as e:
        raise SystemExit(f'error: the segmentation stack is not installed ({e.name} missing): run `make setup-seg`')


def add_runner_args(ap) -> None:
    """Arguments train.py and test.py share (mmseg's tools use the same names)."""
    from mmengine.config import DictAction
    ap.add_argument('--work-dir', default=None)
    ap.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries: key=value')
    ap.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none')
    ap.add_argument('--local_rank', '--local-rank', type=int, default=0)


def trust_runner_checkpoints(runner) -> None:
    """Let mmengine load ITS OWN checkpoints (resume / ``load_from`` / test.py's checkpoint) under torch >= 2.6.

    mmengine 0.10 calls ``torch.load`` without ``weights_only``, and its runner checkpoints pickle a
    HistoryBuffer and numpy objects, which torch's weights-only default refuses. The old default is restored
    only around ``runner.load_or_resume`` (torch reads TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD at each call); every
    other load - the backbone file of ``init_cfg``, any path in ``--cfg-options`` - stays weights-only, and the
    backbone is read through deit.releases first. Only resume from / test checkpoints you trust, as with mmseg.
    """
    real = runner.load_or_resume

    def load_or_resume(*a, **kw):
        with _env('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1'):
            return real(*a, **kw)

    runner.load_or_resume = load_or_resume


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def load_config(path, cfg_options=None, work_dir=None, launcher='none'):
    from mmengine.config import Config
    cfg = Config.fromfile(str(path))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    cfg.work_dir = str(work_dir or Path('work_dirs') / Path(path).stem)
    if launcher == 'none':
        replace_syncbn(cfg)
    return cfg


def replace_syncbn(cfg) -> int:
    """SyncBN needs a process group (and CUDA); a single-process run uses plain BN. Returns the count."""
    n = 0

    def walk(node):
        nonlocal n
        if isinstance(node, dict):
            if node.get('type') == 'SyncBN':
                node['type'] = 'BN'
                n += 1
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(cfg._cfg_dict)
    return n


def check_data_root(cfg, split: str) -> None:
    """Fail early, naming the folder, when the ADE20K tree is missing or empty."""
    loader = cfg.get(f'{split}_dataloader')
    ds = loader['dataset']
    root = Path(ds.get('data_root', ''))
    prefix = ds.get('data_prefix', {})
    for key in ('img_path', 'seg_map_path'):
        folder = root / prefix.get(key, '')
        if not folder.is_dir():
            raise FileNotFoundError(f'{folder}: missing. Expected the ADEChallengeData2016 layout '
                                    f'(images/{{training,validation}}/*.jpg, annotations/{{training,validation}}/*.png) '
                                    f'under data_root={root}')
        if not any(folder.iterdir()):
            raise FileNotFoundError(f'{folder}: empty (no images / label maps)')


def init_distributed(cfg, launcher: str) -> None:
    """Create the process group now (mmengine's Runner then reuses it), so ranks can coordinate before it.

    ``--launcher slurm``: the port comes from the job id unless MASTER_PORT is set (mmengine's default is
    29500 for every job, so two jobs sharing a node collide); gloo gets a routable interface when this host's
    name resolves to a loopback address (deit.distributed.set_gloo_interface).
    """
    if launcher == 'none':
        return
    from mmengine.dist import init_dist, is_distributed

    kwargs = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    if launcher == 'slurm':
        kwargs.setdefault('port', int(slurm_port(os.environ)))
        nodelist = os.environ.get('SLURM_STEP_NODELIST') or os.environ.get('SLURM_NODELIST')
        if nodelist and 'MASTER_ADDR' not in os.environ:  # mmengine keeps a MASTER_ADDR that is set
            os.environ['MASTER_ADDR'] = du.first_host(nodelist)
    du.set_gloo_interface()
    if not is_distributed():
        init_dist(launcher, **kwargs)


def agree_on_resume(work_dir) -> str | None:
    """The checkpoint every rank resumes from: rank 0's latest (mmengine's ``last_checkpoint``), or None.

    mmengine writes ``last_checkpoint`` on rank 0 only and lets every rank look for itself, so on work dirs
    that are not shared between nodes the other nodes started at iteration 0 while rank 0 resumed, and the
    ranks diverged, then hung. Here rank 0 decides; a rank that cannot read the file receives rank 0's bytes
    and writes them at the same path on its own disk.
    """
    from mmengine.runner import find_latest_checkpoint

    path = find_latest_checkpoint(str(work_dir)) if du.is_main_process() else None
    path = du.broadcast_object(path)
    if path is None or all(du.all_gather_object(Path(path).is_file())):
        return path
    data = du.broadcast_object(Path(path).read_bytes() if du.is_main_process() else None)
    if not Path(path).is_file():
        with atomic_open(path) as f:
            f.write(data)
        print(f'{path}: not on this node; wrote rank 0\'s copy ({len(data) / 2 ** 20:.1f} MiB)', flush=True)
    if du.is_dist():
        import torch.distributed as dist
        dist.barrier()
    return path


def set_batch(cfg, world: int, total_batch_size: int | None = None, auto_scale_lr: bool = False) -> str:
    """Keep the recipe's total batch (16 = 8 GPUs x 2, as mmseg's 8xb2 configs) on any GPU count, or scale the
    lr to the batch that runs (mmengine's ``auto_scale_lr``); returns the line to print.

    Without either, the per-GPU batch of the config times the GPU count runs with the config's lr and
    iterations: on 4 GPUs that is another recipe, which the returned line says.
    """
    base = cfg.get('auto_scale_lr', {}).get('base_batch_size', 16)
    loader = cfg.train_dataloader
    if total_batch_size:
        if total_batch_size % world:
            raise ValueError(f'--total-batch-size {total_batch_size} is not divisible by {world} process(es)')
        loader.batch_size = total_batch_size // world
    total = loader.batch_size * world
    if auto_scale_lr:
        cfg.auto_scale_lr = dict(enable=True, base_batch_size=base)
        return f'batch {loader.batch_size} x {world} = {total}; lr scaled by {total}/{base} (--auto-scale-lr)'
    if total != base:
        return (f'warning: batch {loader.batch_size} x {world} process(es) = {total}, but the config\'s lr and '
                f'schedule are for {base}: pass --total-batch-size {base} to keep the recipe, or '
                f'--auto-scale-lr to scale the lr')
    return f'batch {loader.batch_size} x {world} = {total} (the config\'s)'


def set_backbone_checkpoint(cfg, source, use_ema: bool = False) -> Path:
    """Convert any DeiT checkpoint for the config's backbone and point init_cfg at it.

    Under a launcher, local rank 0 of each node converts (work dirs need not be shared between nodes) while
    the other ranks wait at a barrier; the file is written atomically under a name no other writer uses.
    """
    import torch.distributed as dist
    bb = cfg.model.backbone
    size = bb.get('img_size', 512)
    size = size[0] if isinstance(size, (list, tuple)) else size
    out = Path(cfg.work_dir) / 'backbone_init.pth'
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or int(os.environ.get('LOCAL_RANK', 0)) == 0:
        state = convert_checkpoint(source, out, bb.embed_dims, bb.num_layers, size, use_ema,
                                   final_norm=bb.get('final_norm', False))
        print(f'backbone weights: {source} -> {out} ({len(state)} tensors)')
    if distributed:
        dist.barrier()
    bb.init_cfg = dict(type='Pretrained', checkpoint=str(out))
    cfg.model.pretrained = None
    return out


def check_backbone_weights(cfg) -> None:
    """Strict check of the backbone file named by ``init_cfg`` against the config's backbone, before training.

    mmseg's VisionTransformer loads it with ``strict=False`` and only logs what did not fit (e.g. the DeiT
    patch-embedding bias when ``patch_bias=False``), so a mismatch would train silently without those weights.
    The file is read weights-only. pos_embed may differ in size (mmseg resamples it).
    """
    init = cfg.model.backbone.get('init_cfg') or {}
    if init.get('type') != 'Pretrained':
        return
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    path = init['checkpoint']
    state = read_state_dict(path)
    register_all_modules(init_default_scope=False)
    expected = MODELS.build(dict(cfg.model.backbone, init_cfg=None)).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected)
                    if k != 'pos_embed' and state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f'{path} does not fit the config\'s backbone: missing {missing[:6]}, unexpected '
                              f'{unexpected[:6]}, other shapes {shapes[:6]} (a DeiT checkpoint needs '
                              f'patch_bias=True, as in segmentation/configs)')
