"""Shared by segmentation/train.py and test.py: config loading, CPU fallbacks, data checks."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # configs import segmentation.mmseg_ext; the converter imports deit
    sys.path.insert(0, str(ROOT))


def add_runner_args(ap) -> None:
    """Arguments train.py and test.py share (mmseg's tools use the same names)."""
    from mmengine.config import DictAction
    ap.add_argument('--work-dir', default=None)
    ap.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries: key=value')
    ap.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none')
    ap.add_argument('--local_rank', '--local-rank', type=int, default=0)


def allow_mmengine_checkpoints() -> None:
    """Let mmengine load its own checkpoints under torch >= 2.6.

    mmengine 0.10 calls ``torch.load`` without ``weights_only`` and its checkpoints pickle a HistoryBuffer and
    numpy objects, which torch's new weights-only default refuses. This restores the old default for the
    calls that do not choose (mmengine's resume / load_from); the DeiT backbone itself is read through
    deit.checkpoint with weights_only=True. Only load segmentation checkpoints you trust, as with mmseg.
    """
    os.environ.setdefault('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')


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


def set_backbone_checkpoint(cfg, source, use_ema: bool = False) -> Path:
    """Convert any DeiT checkpoint for the config's backbone and point init_cfg at it."""
    from segmentation.deit_to_mmseg import convert_checkpoint
    bb = cfg.model.backbone
    size = bb.get('img_size', 512)
    size = size[0] if isinstance(size, (list, tuple)) else size
    out = Path(cfg.work_dir) / 'backbone_init.pth'
    state = convert_checkpoint(source, out, bb.embed_dims, bb.num_layers, size, use_ema,
                               final_norm=bb.get('final_norm', False))
    bb.init_cfg = dict(type='Pretrained', checkpoint=str(out))
    cfg.model.pretrained = None
    print(f'backbone weights: {source} -> {out} ({len(state)} tensors)')
    return out
