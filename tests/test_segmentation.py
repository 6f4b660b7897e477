"""UperNet + DeiT on a fabricated ADE20K tree (CPU), every shipped config, and the converter."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, TINY, make_image, run_ranks

pytest.importorskip('mmseg', reason='segmentation stack not installed (make setup-seg)')
pytestmark = pytest.mark.segmentation

from data.io import CheckpointError
from deit.releases import read_state_dict  # noqa: E402
from segmentation.deit_to_mmseg import mmseg_to_timm, timm_to_mmseg  # noqa: E402

CONFIGS = sorted((ROOT / 'segmentation' / 'configs').rglob('*.py'))
TINY_CFG = ROOT / 'tests' / 'configs' / 'seg_tiny.py'


def make_ade(root: Path, n_train=4, n_val=2) -> Path:
    """ADEChallengeData2016 layout: JPEG images + PNG label maps with values 0..150 (0 = 'other')."""
    rng = np.random.default_rng(0)
    for split, n in (('training', n_train), ('validation', n_val)):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'annotations' / split).mkdir(parents=True)
        for i in range(n):
            name = f'ADE_{split[:5]}_{i:08d}'
            make_image(i % 4, i, 64).save(root / 'images' / split / f'{name}.jpg')
            seg = np.zeros((64, 64), np.uint8)
            seg[:32] = rng.integers(1, 151)
            seg[32:, :32] = rng.integers(1, 151)
            seg[40:50, 40:50] = 150
            Image.fromarray(seg).save(root / 'annotations' / split / f'{name}.png')
    return root


@pytest.fixture(scope='module')
def demo_ckpt(tmp_path_factory):
    from deit.main import cli
    out = tmp_path_factory.mktemp('deit')
    assert cli(TINY + ['--data-set', 'DEMO', '--epochs', '1', '--max-steps-per-epoch', '2',
                       '--output_dir', str(out)]) == 0
    return out / 'checkpoint.pth'


def test_converter_round_trip_and_errors(demo_ckpt):
    src = read_state_dict(demo_ckpt)
    conv = timm_to_mmseg(src, expected_width=128, expected_depth=4)
    assert 'layers.3.attn.attn.in_proj_weight' in conv and 'patch_embed.projection.weight' in conv
    assert not any(k.startswith(('head', 'norm')) for k in conv)
    back = mmseg_to_timm(conv)
    assert set(back) == {k for k in src if not k.startswith(('head', 'norm.'))}
    assert all(torch.equal(back[k], src[k]) for k in back)
    assert 'ln1.weight' in timm_to_mmseg(src, final_norm=True)
    big = timm_to_mmseg(src, img_size=64)  # 8x8 grid -> 16x16
    assert big['pos_embed'].shape == (1, 1 + 256, 128)
    with pytest.raises(CheckpointError, match='width 128, the backbone expects 384'):
        timm_to_mmseg(src, expected_width=384, expected_depth=12)
    import torchvision
    with pytest.raises(CheckpointError, match='ResNet'):
        timm_to_mmseg(torchvision.models.resnet18().state_dict())


@pytest.mark.slow
def test_train_test_single_and_multiscale_from_deit_checkpoint(demo_ckpt, tmp_path, capsys):
    from segmentation import test as seg_test
    from segmentation import train as seg_train
    ade = make_ade(tmp_path / 'ADEChallengeData2016')
    work = tmp_path / 'work'
    opts = ['--cfg-options', f'train_dataloader.dataset.data_root={ade}', f'val_dataloader.dataset.data_root={ade}',
            f'test_dataloader.dataset.data_root={ade}']
    assert seg_train.main([str(TINY_CFG), '--work-dir', str(work), '--backbone-checkpoint', str(demo_ckpt)]
                          + opts) == 0
    ckpt = work / 'iter_4.pth'
    assert ckpt.is_file()
    scalars = [json.loads(x) for x in next(work.rglob('scalars.json')).read_text().splitlines()]
    losses = [s['loss'] for s in scalars if 'loss' in s]
    assert len(losses) == 4 and all(np.isfinite(losses))
    # the backbone started from the DeiT checkpoint: 4 small AdamW steps keep it within 1e-3 of the source
    src = read_state_dict(demo_ckpt)['blocks.0.attn.qkv.weight']
    trained = torch.load(ckpt, map_location='cpu', weights_only=False)['state_dict'][
        'backbone.layers.0.attn.attn.in_proj_weight']
    assert (trained - src).abs().max() < 1e-3
    from mmseg.registry import MODELS
    from segmentation.common import load_config
    cfg = load_config(TINY_CFG)
    cfg.model.backbone.init_cfg = None
    fresh = MODELS.build(cfg.model.backbone).state_dict()['layers.0.attn.attn.in_proj_weight']
    assert (fresh - trained).abs().max() > 1e-2  # not mmseg's own random init
    bias = trained_bias = torch.load(ckpt, map_location='cpu', weights_only=False)['state_dict'][
        'backbone.patch_embed.projection.bias']
    assert (trained_bias - read_state_dict(demo_ckpt)['patch_embed.proj.bias']).abs().max() < 1e-3, bias
    for tta in (False, True):
        metrics = seg_test.main([str(TINY_CFG), str(ckpt), '--work-dir', str(tmp_path / f'test{tta}')]
                                + (['--tta'] if tta else []) + opts)
        assert isinstance(metrics, dict) and 0 <= metrics['mIoU'] <= 100
    assert 'multi-scale+flip test: aAcc' in capsys.readouterr().out


def test_missing_or_empty_data_root_is_a_clear_error(tmp_path, capsys):
    from segmentation import train as seg_train
    assert seg_train.main([str(TINY_CFG), '--work-dir', str(tmp_path / 'w'), '--cfg-options',
                           f'train_dataloader.dataset.data_root={tmp_path / "nope"}']) == 2
    assert 'missing. Expected the ADEChallengeData2016 layout' in capsys.readouterr().err
    (tmp_path / 'ade' / 'images' / 'training').mkdir(parents=True)
    (tmp_path / 'ade' / 'annotations' / 'training').mkdir(parents=True)
    assert seg_train.main([str(TINY_CFG), '--work-dir', str(tmp_path / 'w'), '--cfg-options',
                           f'train_dataloader.dataset.data_root={tmp_path / "ade"}']) == 2
    assert 'empty' in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize('config', CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_builds_full_deit_s_and_gives_150_class_logits(config):
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    from segmentation.common import load_config
    register_all_modules()
    cfg = load_config(config)
    assert cfg.model.backbone.embed_dims == 384 and cfg.model.backbone.num_layers == 12
    assert cfg.model.backbone.num_heads == 6 and cfg.model.backbone.out_indices == (2, 5, 8, 11)
    assert cfg.model.decode_head.num_classes == 150 and cfg.model.auxiliary_head.num_classes == 150
    assert cfg.model.backbone.patch_bias is True  # DeiT's patch embedding has a bias (mmseg's stock: False)
    if 'layerdecay' in config.name:  # the clearly named variant
        assert cfg.optim_wrapper.constructor == 'ViTLayerDecayOptimizerConstructor'
        assert cfg.optim_wrapper.paramwise_cfg.decay_rate == 0.65
    else:  # the paper fine-tunes with mmseg's own DeiT-S UperNet optimiser: plain AdamW
        assert 'constructor' not in cfg.optim_wrapper
        assert cfg.optim_wrapper.optimizer == {'type': 'AdamW', 'lr': 6e-5, 'betas': (0.9, 0.999),
                                               'weight_decay': 0.01}
        assert {k: v.decay_mult for k, v in cfg.optim_wrapper.paramwise_cfg.custom_keys.items()} == \
            {'pos_embed': 0.0, 'cls_token': 0.0, 'norm': 0.0}
    kind = next((k for k in ('baseline', 'ls', 'maxsup') if f'_{k}_' in config.name), None)
    if kind:  # the three fine-tuning configs differ only in the backbone checkpoint
        assert cfg.model.backbone.init_cfg == {'type': 'Pretrained', 'checkpoint': f'pretrain/deit_s_{kind}_mmseg.pth'}
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 512, 512), mode='tensor')
    assert out.shape == (1, 150, 128, 128) and torch.isfinite(out).all()


def test_layer_decay_constructor_scales_lr_by_depth():
    from mmengine.optim import build_optim_wrapper
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    from segmentation.common import load_config
    import segmentation.mmseg_ext  # noqa: F401
    register_all_modules()
    cfg = load_config(TINY_CFG)
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    variant = load_config(ROOT / 'segmentation' / 'configs' /
                          'upernet_deit-s16_maxsup-layerdecay0.65_8xb2-160k_ade20k-512x512.py')
    optim_cfg = variant.optim_wrapper
    optim_cfg.paramwise_cfg.num_layers = 4  # the tiny backbone
    optim = build_optim_wrapper(model, optim_cfg)
    lrs = {g['lr_scale'] for g in optim.optimizer.param_groups}
    # 4 blocks + embeddings + heads: 6 distinct scales 0.65^5 ... 0.65^0
    assert sorted(lrs) == pytest.approx(sorted(0.65 ** k for k in range(6)))
    by_param = {id(p): g for g in optim.optimizer.param_groups for p in g['params']}
    assert by_param[id(model.backbone.pos_embed)]['weight_decay'] == 0.0
    assert by_param[id(model.backbone.layers[0].attn.attn.in_proj_weight)]['lr_scale'] == pytest.approx(0.65 ** 4)
    assert by_param[id(model.decode_head.conv_seg.weight)]['lr_scale'] == pytest.approx(1.0)


def _converted(demo_ckpt, tmp_path, drop=()):
    from segmentation.deit_to_mmseg import convert_checkpoint
    out = tmp_path / 'bb.pth'
    convert_checkpoint(demo_ckpt, out, 128, 4, 32)
    if drop:
        obj = torch.load(out, weights_only=True)
        for k in drop:
            del obj['state_dict'][k]
        torch.save(obj, out)
    return out


def test_backbone_weights_are_checked_strictly_before_training(demo_ckpt, tmp_path, capsys):
    """mmseg loads init_cfg with strict=False; a DeiT bias left behind only showed in a log."""
    from data.io import CheckpointError
    from segmentation.common import check_backbone_weights, load_config
    cfg = load_config(TINY_CFG)
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=str(_converted(demo_ckpt, tmp_path)))
    check_backbone_weights(cfg)  # the converted DeiT fits exactly
    cfg.model.backbone.patch_bias = False  # mmseg's stock setting
    with pytest.raises(CheckpointError, match=r"unexpected \['patch_embed.projection.bias'\]"):
        check_backbone_weights(cfg)
    cfg.model.backbone.patch_bias = True
    cfg.model.backbone.init_cfg['checkpoint'] = str(_converted(demo_ckpt, tmp_path, drop=['layers.1.ln2.weight']))
    with pytest.raises(CheckpointError, match=r"missing \['layers.1.ln2.weight'\]"):
        check_backbone_weights(cfg)
    from segmentation import train as seg_train
    ade = make_ade(tmp_path / 'ade')
    child = tmp_path / 'child.py'
    child.write_text(f"_base_ = [{str(TINY_CFG)!r}]\nmodel = dict(backbone=dict(init_cfg=dict(_delete_=True, type='Pretrained', "
                     f"checkpoint={cfg.model.backbone.init_cfg['checkpoint']!r})))\n")
    rc = seg_train.main([str(child), '--work-dir', str(tmp_path / 'w'), '--cfg-options',
                         f'train_dataloader.dataset.data_root={ade}'])
    assert rc == 2 and 'does not fit the config' in capsys.readouterr().err


class _NotAWeight:
    pass


def test_unsafe_loading_is_limited_to_runner_checkpoints(demo_ckpt, tmp_path):
    """only mmengine's own checkpoints are unpickled with weights_only=False."""
    import os

    from data.io import CheckpointError
    from segmentation.common import check_backbone_weights, load_config, trust_runner_checkpoints
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'x': _NotAWeight()}, evil)
    cfg = load_config(TINY_CFG)
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=str(evil))
    with pytest.raises(CheckpointError, match='refusing to execute'):
        check_backbone_weights(cfg)
    seen = []

    class Runner:
        def load_or_resume(self):
            seen.append(os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'))

    r = Runner()
    trust_runner_checkpoints(r)
    assert os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD') is None
    r.load_or_resume()
    assert seen == ['1'] and os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD') is None


def _convert_rank(rank, init_file, work_dir, demo_ckpt, calls_file, result):
    """One rank of a 2-rank job on one node: every rank asks for the backbone, only local rank 0 converts."""
    import os

    import torch.distributed as dist
    os.environ['LOCAL_RANK'] = str(rank)
    os.getpid = lambda: 4242  # per-node PID namespaces: equal PIDs on different ranks
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        import segmentation.common as common
        from segmentation.common import load_config, set_backbone_checkpoint
        real = common.convert_checkpoint

        def counted(*a, **kw):
            with open(calls_file, 'a') as f:
                f.write(f'{rank}\n')
            return real(*a, **kw)

        common.convert_checkpoint = counted
        cfg = load_config(TINY_CFG, work_dir=work_dir)
        out = set_backbone_checkpoint(cfg, demo_ckpt)
        # a file, not an mp.Queue: a queue's feeder thread may not have flushed when the process ends
        Path(result, f'rank{rank}.json').write_text(json.dumps([out.is_file(), cfg.model.backbone.init_cfg['checkpoint']]))
    finally:
        dist.destroy_process_group()


def test_backbone_is_converted_once_per_node_and_ranks_wait(demo_ckpt, tmp_path):
    """every rank converted to the same file with PID-keyed temp names."""
    calls = tmp_path / 'calls.txt'
    out = run_ranks(_convert_rank, 2, tmp_path, tmp_path / 'init', tmp_path / 'work', demo_ckpt, calls)
    assert calls.read_text().split() == ['0']
    assert [o[0] for o in out] == [True, True] and out[0][1] == out[1][1]
    assert not list((tmp_path / 'work').glob('.*tmp*'))


# ------------------------------------------------------------------------------------------------------------
# multi-node: the resume point, the SLURM port, the batch on another GPU count
# ------------------------------------------------------------------------------------------------------------
def _resume_rank(rank, world, base, out_dir):
    """One 'node' per rank (its own folder as cwd); only node 0 has the checkpoint mmengine saved."""
    import os

    import torch.distributed as dist

    from segmentation.common import agree_on_resume
    dist.init_process_group('gloo', init_method=f'file://{base}/pg', rank=rank, world_size=world)
    node = Path(base) / f'node{rank}'
    os.chdir(node)
    path = agree_on_resume('work_dirs/cfg')
    data = Path(path).read_bytes() if path else None
    dist.destroy_process_group()
    Path(out_dir, f'rank{rank}.json').write_text(json.dumps({'path': path, 'size': len(data or b''),
                                                              'same': data == Path(base, 'ckpt').read_bytes()}))


def test_resume_point_is_rank_0s_on_work_dirs_not_shared_between_nodes(tmp_path):
    for r in (0, 1):
        (tmp_path / f'node{r}' / 'work_dirs' / 'cfg').mkdir(parents=True)
    ckpt = tmp_path / 'node0' / 'work_dirs' / 'cfg' / 'iter_8.pth'
    torch.save({'meta': {'iter': 8}, 'state_dict': {'w': torch.arange(5.0)}}, ckpt)
    (tmp_path / 'ckpt').write_bytes(ckpt.read_bytes())
    (ckpt.parent / 'last_checkpoint').write_text('work_dirs/cfg/iter_8.pth')  # as mmengine's CheckpointHook
    out = tmp_path / 'out'
    out.mkdir()
    results = run_ranks(_resume_rank, 2, out, 2, str(tmp_path))
    assert [r['path'] for r in results] == ['work_dirs/cfg/iter_8.pth'] * 2
    assert all(r['same'] for r in results)
    assert (tmp_path / 'node1' / 'work_dirs' / 'cfg' / 'iter_8.pth').read_bytes() == ckpt.read_bytes()


def test_nothing_to_resume_starts_every_rank_fresh(tmp_path):
    from segmentation.common import agree_on_resume
    assert agree_on_resume(tmp_path) is None


def test_segmentation_slurm_launcher_port_per_job_and_master_host(monkeypatch):
    import os

    import mmengine.dist

    from segmentation.common import init_distributed, load_config
    seen = {}
    monkeypatch.setattr(mmengine.dist, 'is_distributed', lambda: False)
    monkeypatch.setattr(mmengine.dist, 'init_dist', lambda launcher, **kw: seen.update(launcher=launcher, **kw))
    env = {'SLURM_JOB_ID': '123456', 'SLURM_NODELIST': 'gpu[07-08]', 'SLURM_PROCID': '0', 'PATH': '/usr/bin:/bin'}
    monkeypatch.setattr(os, 'environ', env)
    init_distributed(load_config(CONFIGS[-1], launcher='slurm'), 'slurm')
    assert seen['launcher'] == 'slurm' and seen['port'] == 15000 + 123456 % 20000
    assert env['MASTER_ADDR'] == 'gpu07'
    env['MASTER_PORT'] = '1234'
    init_distributed(load_config(CONFIGS[-1], launcher='slurm'), 'slurm')
    assert seen['port'] == 1234


def test_segmentation_batch_keeps_the_recipe_or_scales_the_lr():
    from segmentation.common import load_config, set_batch
    cfg = load_config(CONFIGS[-1])
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=16)
    line = set_batch(cfg, 4)
    assert line.startswith('warning: batch 2 x 4 process(es) = 8') and '--total-batch-size 16' in line
    assert 'x 4 = 16' in set_batch(cfg, 4, total_batch_size=16) and cfg.train_dataloader.batch_size == 4
    cfg = load_config(CONFIGS[-1])
    assert 'scaled by 8/16' in set_batch(cfg, 4, auto_scale_lr=True)
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
    with pytest.raises(ValueError, match='not divisible by 3'):
        set_batch(cfg, 3, total_batch_size=16)
    assert set_batch(load_config(CONFIGS[-1]), 8) == 'batch 2 x 8 = 16 (the config\'s)'


def test_train_resume_continues_from_the_checkpoint_rank_0_chose(demo_ckpt, tmp_path, capsys):
    from segmentation import train as seg_train
    ade = make_ade(tmp_path / 'ADEChallengeData2016')
    work = tmp_path / 'work'
    opts = ['--work-dir', str(work), '--backbone-checkpoint', str(demo_ckpt), '--cfg-options',
            f'train_dataloader.dataset.data_root={ade}', f'val_dataloader.dataset.data_root={ade}']
    assert seg_train.main([str(TINY_CFG), '--resume'] + opts) == 0  # nothing to resume yet: a fresh start
    assert (work / 'iter_4.pth').is_file()
    assert seg_train.main([str(TINY_CFG), '--resume'] + opts + ['train_cfg.max_iters=6',
                                                                 'default_hooks.checkpoint.interval=2']) == 0
    assert (work / 'iter_6.pth').is_file() and not (work / 'iter_2.pth').exists()  # went on from iteration 4
    meta = torch.load(work / 'iter_6.pth', map_location='cpu', weights_only=False)['meta']
    assert meta['iter'] == 6
    assert 'warning: batch 2 x 1 process(es) = 2' in capsys.readouterr().out
