"""The official MaxSup releases, fabricated the way the official code makes them, load with no extra flags.

- DeiT-S: official ``Deit/models.py`` ``our_patch16_224`` (timm's ViT, patch 16, 384 wide, 12 blocks, 6 heads,
  qkv_bias, LayerNorm eps 1e-6), saved as DeiT's main.py saves: a dict with an ``argparse.Namespace`` ``args``.
- ResNet-50: official ``Conv/ffcv/model.py``: a torchvision model inside a LightningModule (``Net.model``),
  every Conv2d with stride > 1 and >= 16 input channels wrapped in BlurPoolConv2d, an OLS criterion with
  buffers; saved by Lightning's Trainer. Also the plain, DDP-prefixed and plain torchvision forms.
"""
from __future__ import annotations

from argparse import Namespace

import argparse
import json
import os
import stat
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
import torchvision

from data.io import CheckpointError, torch_load
from deit.models import create_model
from deit.releases import (_input_size, checkpoint_format, extract_state_dict, infer_architecture, load_file,
                           load_model, read_state_dict, recorded_settings)
from deit.train_state import restore_weights
from tests.conftest import make_imagefolder

NUM_CLASSES = 4


# ---- transcriptions of the official model definitions (not our code) -------------------------------------
def official_our_patch16_224(**kwargs):
    """Official Deit/models.py ``our_patch16_224`` on timm's VisionTransformer."""
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


class OfficialBlurPoolConv2d(nn.Module):
    """Official Conv/ffcv/model.py BlurPoolConv2d."""

    def __init__(self, conv):
        super().__init__()
        default_filter = torch.tensor([[[[1, 2, 1], [2, 4, 2], [1, 2, 1]]]]) / 16.0
        filt = default_filter.repeat(conv.in_channels, 1, 1, 1)
        self.conv = conv
        self.register_buffer('blur_filter', filt.contiguous())

    def forward(self, x):
        blurred = F.conv2d(x.contiguous(), self.blur_filter, stride=1, padding=(1, 1), groups=self.conv.in_channels)
        return self.conv(blurred.contiguous())


def official_apply_blurpool(mod):
    for name, child in mod.named_children():
        if isinstance(child, nn.Conv2d) and (np.max(child.stride) > 1 and child.in_channels >= 16):
            setattr(mod, name, OfficialBlurPoolConv2d(child))
        else:
            official_apply_blurpool(child)


class OfficialOLS(nn.Module):
    """Stand-in for the official OnlineLabelSmoothing: its state lives in buffers (saved as criterion.*)."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer('supervise', torch.eye(n))
        self.register_buffer('update', torch.zeros(n, n))

    def forward(self, out, y):
        return F.cross_entropy(out, y)


def _lightning_net():
    import lightning as L

    class Net(L.LightningModule):  # official Conv/ffcv/model.py Net, the parts that shape the checkpoint
        def __init__(self):
            super().__init__()
            self.model = torchvision.models.get_model('resnet50', weights=None, num_classes=NUM_CLASSES)
            official_apply_blurpool(self.model)
            self.criterion = OfficialOLS(NUM_CLASSES)
            self.val_criterion = nn.CrossEntropyLoss()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.criterion(self.model(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
            return {'optimizer': opt, 'lr_scheduler': {'scheduler': torch.optim.lr_scheduler.StepLR(opt, 30),
                                                       'interval': 'epoch'}}

    return Net()


# ---- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp('rel'), n_classes=NUM_CLASSES, n_train=2, n_val=2, size=64)


@pytest.fixture(scope='module')
def deit_release(tmp_path_factory):
    """The DeiT-S release as the official main.py writes it (args.model = 'our_patch16_224')."""
    torch.manual_seed(0)
    model = official_our_patch16_224(num_classes=NUM_CLASSES).eval()
    opt = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(model='our_patch16_224', input_size=224, data_set='IMNET', batch_size=128,
                              epochs=300, nb_classes=NUM_CLASSES, eval_crop_ratio=0.875, lr=5e-4)
    path = tmp_path_factory.mktemp('deit') / 'checkpoint.pth'
    torch.save({'model': model.state_dict(), 'optimizer': opt.state_dict(), 'lr_scheduler': {'t': 1},
                'epoch': 299, 'model_ema': model.state_dict(), 'scaler': {}, 'args': args}, path)
    return path, model


@pytest.fixture(scope='module')
def resnet_releases(tmp_path_factory):
    """The ResNet-50 release in every form the official pipeline can produce."""
    import lightning as L
    out = tmp_path_factory.mktemp('resnet')
    torch.manual_seed(0)
    net = _lightning_net()
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 64, 64), torch.arange(4) % NUM_CLASSES)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator='cpu',
                        default_root_dir=str(out))
    trainer.fit(net, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(out / 'maxsup.ckpt')
    blur = net.model.eval()
    torch.save(blur.state_dict(), out / 'blurpool_plain.pth')
    torch.save(nn.DataParallel(blur).state_dict(), out / 'blurpool_ddp.pth')  # 'module.' as DDP writes it
    torch.manual_seed(1)
    plain = torchvision.models.resnet50(num_classes=NUM_CLASSES).eval()
    torch.save(plain.state_dict(), out / 'torchvision_plain.pth')
    torch.save(nn.DataParallel(plain).state_dict(), out / 'torchvision_ddp.pth')
    return out, blur, plain


def _logits_match(model, reference, size):
    torch.manual_seed(2)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-4


# ---- tests ---------------------------------------------------------------------------------------------------
def test_deit_release_loads_by_its_official_name(deit_release, capsys):
    path, original = deit_release
    model, info = load_model(path)
    assert info['model'] == 'deit_small_patch16_224' and info['format'] == 'deit'
    assert info['recorded']['data_set'] == 'IMNET' and info['input_size'] == 224
    _logits_match(model, original, 224)
    ema, _ = load_model(path, use_ema=True)
    _logits_match(ema, original, 224)


def test_unknown_recorded_model_falls_back_to_the_keys(deit_release, tmp_path, capsys):
    path, original = deit_release
    ckpt = torch.load(path, weights_only=False)
    ckpt['args'].model = 'their_custom_vit'
    torch.save(ckpt, tmp_path / 'renamed.pth')
    model, info = load_model(tmp_path / 'renamed.pth')
    assert info['model'] == 'deit_small_patch16_224'
    assert "records model 'their_custom_vit'" in capsys.readouterr().out
    _logits_match(model, original, 224)


@pytest.mark.parametrize('name, expect_model', [
    ('maxsup.ckpt', 'resnet50_blurpool'), ('blurpool_plain.pth', 'resnet50_blurpool'),
    ('blurpool_ddp.pth', 'resnet50_blurpool'), ('torchvision_plain.pth', 'resnet50'),
    ('torchvision_ddp.pth', 'resnet50')])
def test_resnet_releases_load_with_the_same_logits(resnet_releases, name, expect_model, capsys):
    out, blur, plain = resnet_releases
    model, info = load_model(out / name)
    assert info['model'] == expect_model
    _logits_match(model, blur if 'blurpool' in expect_model else plain, 64)
    if name.endswith('.ckpt'):
        assert info['format'] == 'lightning'
        assert 'ignoring 2 non-model entries (criterion)' in capsys.readouterr().out


def test_cli_tools_take_releases_without_flags(deit_release, resnet_releases, folder, tmp_path):
    from tools import analyze, evaluate
    from tools.load_checkpoint import main as load_main
    path, original = deit_release
    out = tmp_path / 'deit.safetensors'
    assert load_main([str(path), '--export', str(out)]) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    model, info = load_model(out)  # no --model: the metadata header says which
    assert info['model'] == 'deit_small_patch16_224' and info['recorded']['data_set'] == 'IMNET'
    _logits_match(model, original, 224)
    # the checkpoint records IMNET; the folder tree is ImageNet-shaped, so no --data-set is needed
    stats = evaluate.run(path, data_path=folder, out=tmp_path / 'ev', num_workers=0)
    assert stats['model'] == 'deit_small_patch16_224' and stats['n'] == 2 * NUM_CLASSES
    assert stats['data_set'] == 'IMNET' and stats['input_size'] == 224
    res, _, _ = resnet_releases
    assert evaluate.main([str(res / 'maxsup.ckpt'), '--data-path', str(folder), '--input-size', '64',
                          '--num-workers', '0', '--out', str(tmp_path / 'ev2')]) == 0
    assert json.loads((tmp_path / 'ev2' / 'metrics.json').read_text())['model'] == 'resnet50_blurpool'
    assert analyze.main(['logits', '--ckpt', f'r={res / "maxsup.ckpt"}', '--data-path', str(folder),
                         '--input-size', '64', '--num-workers', '0', '--out', str(tmp_path / 'an')]) == 0
    # overrides exist for every tool
    assert analyze.main(['logits', '--ckpt', str(res / 'torchvision_plain.pth'), '--model', 'resnet50',
                         '--num-classes', str(NUM_CLASSES), '--data-path', str(folder), '--input-size', '64',
                         '--num-workers', '0', '--out', str(tmp_path / 'an2')]) == 0


def test_cache_flag_is_not_silently_ignored(deit_release, folder, capsys):
    from tools import evaluate
    path, _ = deit_release
    assert evaluate.main([str(path), '--data-set', 'FOLDER', '--data-path', str(folder), '--cache']) == 2
    assert '--cache reads the ImageNet ZIP cache' in capsys.readouterr().err


def test_release_weights_for_segmentation_and_finetuning(deit_release, resnet_releases, folder, tmp_path):
    from deit.main import cli
    from segmentation.deit_to_mmseg import convert_checkpoint
    path, original = deit_release
    state = convert_checkpoint(path, tmp_path / 'seg.pth', 384, 12, 512)
    assert torch.equal(state['patch_embed.projection.bias'], original.state_dict()['patch_embed.proj.bias'])
    res, _, _ = resnet_releases
    out = tmp_path / 'ft'
    assert cli(['--model', 'resnet50_blurpool', '--finetune', str(res / 'maxsup.ckpt'), '--data-set', 'FOLDER',
                '--data-path', str(folder), '--input-size', '64', '--epochs', '1', '--batch-size', '4',
                '--num_workers', '0', '--mixup', '0', '--cutmix', '0', '--aa', 'none', '--reprob', '0',
                '--print-freq', '0', '--warmup-epochs', '0', '--no-pin-mem', '--output_dir', str(out)]) == 0
    assert json.loads((out / 'log.txt').read_text())['test_n'] == 2 * NUM_CLASSES
    # --resume --eval of the official release with its official model name
    assert cli(['--model', 'our_patch16_224', '--resume', str(path), '--eval', '--data-set', 'IMNET',
                '--data-path', str(folder), '--batch-size', '4', '--num_workers', '0', '--no-pin-mem',
                '--print-freq', '0']) == 0


@pytest.fixture(scope='module')
def official_tree(tmp_path_factory):
    """An ImageNet-like tree (synset folders, flat val/) and maps in the official release's numbering."""
    root = tmp_path_factory.mktemp('official')
    synsets = ['n01440764', 'n01443537', 'n01484850', 'n01491361']
    make_imagefolder(root / 'tree', n_classes=4, n_train=4, n_val=2, names=synsets)
    perm = [2, 0, 3, 1]  # the authors' label of each synset (not ImageFolder's sorted order)
    train_lines, val_lines = [], []
    for c, syn in enumerate(synsets):
        for f in sorted((root / 'tree' / 'train' / syn).iterdir()):
            train_lines.append(f'{syn}/{f.name}\t{perm[c]}')
        for i, f in enumerate(sorted((root / 'tree' / 'val' / syn).iterdir())):
            name = f'ILSVRC2012_val_{c * 10 + i:08d}.JPEG'
            f.rename(root / 'tree' / 'val' / name)
            val_lines.append(f'{name}\t{perm[c]}')
        (root / 'tree' / 'val' / syn).rmdir()
    (root / 'train_map.txt').write_text('\n'.join(train_lines) + '\n')
    (root / 'val_map.txt').write_text('\n'.join(val_lines) + '\n')
    return root


def test_cache_from_tree_and_official_maps_trains(official_tree, tmp_path):
    from data.build_zip_cache import main as build
    from data.map_file import parse_map_file
    from deit.main import cli
    dst = tmp_path / 'cache'
    assert build(['--src', str(official_tree / 'tree'), '--dst', str(dst), '--train-map',
                  str(official_tree / 'train_map.txt'), '--val-map', str(official_tree / 'val_map.txt')]) == 0
    # labels and order from the maps; val written in the official flat format
    assert parse_map_file(dst / 'train_map.txt') == parse_map_file(official_tree / 'train_map.txt')
    assert (dst / 'val_map.txt').read_text() == (official_tree / 'val_map.txt').read_text()
    assert build(['--dst', str(dst), '--verify']) == 0
    out = tmp_path / 'run'
    assert cli(['--model', 'deit_demo_patch4_32', '--input-size', '32', '--data-set', 'IMNET', '--data-path',
                str(dst), '--cache', '--epochs', '1', '--batch-size', '4', '--num_workers', '0', '--mixup', '0',
                '--cutmix', '0', '--aa', 'none', '--reprob', '0', '--print-freq', '0', '--warmup-epochs', '0',
                '--no-pin-mem', '--output_dir', str(out)]) == 0
    assert json.loads((out / 'log.txt').read_text())['test_n'] == 8


def test_official_map_errors_name_the_line(official_tree, tmp_path, capsys):
    from data.build_zip_cache import main as build
    bad = tmp_path / 'train_map.txt'
    lines = (official_tree / 'train_map.txt').read_text().splitlines()
    bad.write_text('\n'.join(lines + ['n01440764/missing.JPEG\t2']) + '\n')
    assert build(['--src', str(official_tree / 'tree'), '--dst', str(tmp_path / 'c'), '--train-map', str(bad),
                  '--val-map', str(official_tree / 'val_map.txt')]) == 2
    assert f"{bad}:{len(lines) + 1}: image 'n01440764/missing.JPEG' not found" in capsys.readouterr().err
    assert not (tmp_path / 'c').exists()  # a failed build leaves nothing behind
    # a val label that contradicts its class folder is refused
    tree = make_imagefolder(tmp_path / 'std', n_classes=2, n_train=2, n_val=1)
    vm = tmp_path / 'vm.txt'
    vm.write_text('class_0/000.jpg\t1\nclass_1/000.jpg\t1\n')
    assert build(['--src', str(tree), '--dst', str(tmp_path / 'c2'), '--val-map', str(vm)]) == 2
    assert "has label 1, but class folder 'class_0' is label 0" in capsys.readouterr().err
    # --val-labels with a standard val/<class>/ layout: not needed, said so
    assert build(['--src', str(tree), '--dst', str(tmp_path / 'c3'), '--val-labels', str(vm)]) == 2
    assert '--val-labels is not needed' in capsys.readouterr().err


def test_zip_with_split_prefixed_members_gets_a_hint(tmp_path):
    import zipfile

    from data.zip_cache import ZipImageDataset

    from data.zip_index import CacheError
    with zipfile.ZipFile(tmp_path / 'train.zip', 'w') as zf:
        zf.writestr('train/n01/a.JPEG', b'x')
    (tmp_path / 'train_map.txt').write_text('n01/a.JPEG\t0\n')
    with pytest.raises(CacheError, match="the zip has 'train/n01/a.JPEG'"):
        ZipImageDataset(tmp_path / 'train.zip', tmp_path / 'train_map.txt', cache_mode='no')


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'deit_small_patch16_224', 'deit_base_patch16_224',
                                  'deit_tiny_distilled_patch16_224', 'deit_base_distilled_patch16_224'])
def test_infer_architecture_names_every_released_deit_size(name):
    with torch.device('meta'):  # shapes only: timm's own model definitions, no memory or init time
        state = timm.create_model(name, num_classes=7).state_dict()
    assert infer_architecture(state) == (name, 7)


def test_infer_architecture_refuses_what_it_cannot_name():
    with torch.device('meta'):
        state = timm.create_model('vit_small_patch16_224', depth=6).state_dict()
    with pytest.raises(CheckpointError, match=r'^ViT checkpoint of width 384, depth 6, patch 16 matches no known '
                                              r'DeiT; pass the model name \(--model\)$'):
        infer_architecture(state)
    with pytest.raises(CheckpointError, match=r"^cannot tell the architecture from the keys \(first: "
                                              r"\['patch_embed.proj.weight'\]\)"):
        infer_architecture({'patch_embed.proj.weight': torch.zeros(1)})  # a patch embedding alone is no DeiT


def test_restore_weights_names_the_file_and_every_kind_of_mismatch_in_one_line():
    model = nn.Linear(3, 2)
    for ckpt in ({'state_dict': model.state_dict()}, [model.state_dict()]):
        with pytest.raises(CheckpointError, match='^ck.pth: no "model" entry; not a training checkpoint$'):
            restore_weights(model, ckpt, 'ck.pth', 'linear')
    bad = {'weight': torch.zeros(5, 3), 'bias': torch.zeros(5)}
    with pytest.raises(CheckpointError) as e:
        restore_weights(model, {'model': bad, 'args': Namespace(model='lin5', input_size=3, nb_classes=5)},
                        'ck.pth', 'linear')
    assert str(e.value) == ('ck.pth does not fit linear: 2 shapes differ: weight (5, 3) vs (2, 3) here, bias (5,) vs '
                            '(2,) here; it was trained as --model lin5 --input-size 3 with 5 classes')
    other = {f'layer{i}.weight': torch.zeros(1) for i in range(5)}
    with pytest.raises(CheckpointError) as e:
        restore_weights(model, {'model': other}, 'ck.pth', 'linear')
    assert str(e.value) == ('ck.pth does not fit linear: 2 missing keys: weight, bias; 5 unexpected keys: '
                            'layer0.weight, layer1.weight, layer2.weight (+2 more)')
    restore_weights(model, {'model': {k: v + 1 for k, v in model.state_dict().items()}}, 'ck.pth', 'linear')


@pytest.mark.parametrize('name', ['resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnet50_blurpool'])
def test_infer_architecture_names_every_resnet_depth(name):
    with torch.device('meta'):
        state = create_model(name, num_classes=7).state_dict()
    assert infer_architecture(state) == (name, 7)


def test_infer_architecture_needs_a_whole_resnet():
    stem_and_head = {k: torch.zeros(1) for k in ('conv1.weight', 'fc.weight', 'bn1.weight', 'bn1.bias', 'fc.bias',
                                                  'layer1.0.conv1.weight')}
    with pytest.raises(CheckpointError, match=r"^cannot tell the architecture from the keys \(first: \['bn1.bias', "
                                              r"'bn1.weight', 'conv1.weight', 'fc.bias', 'fc.weight'\]\); pass the "
                                              r"model name \(--model\)$"):
        infer_architecture(stem_and_head)
    with pytest.raises(CheckpointError, match=r'^cannot tell'):
        infer_architecture({'layer4.0.conv1.weight': torch.zeros(1), 'fc.weight': torch.zeros(1)})
    odd = {**stem_and_head, 'layer4.0.conv1.weight': torch.zeros(1)}
    with pytest.raises(CheckpointError,
                       match=r'^ResNet checkpoint with blocks \[1, 0, 0, 1\] matches no known ResNet$'):
        infer_architecture(odd)


def test_lightning_and_state_dict_errors_name_where_they_looked(tmp_path, capsys):
    t = torch.zeros(1)
    others = {f'criterion.buf{i}': t for i in range(9)}
    with pytest.raises(CheckpointError) as e:
        extract_state_dict({'state_dict': others, 'pytorch-lightning_version': '2.6.6'}, 'r50.ckpt')
    assert str(e.value) == (f'r50.ckpt: Lightning checkpoint without "model." weights (entries: '
                            f'{sorted(others)[:8]})')
    with pytest.raises(CheckpointError, match=r"^r50.ckpt\[state_dict/model.\]: no weights found \(entries: "
                                              r"\['note'\]\)$"):
        extract_state_dict({'state_dict': {'model.note': 'text'}, 'global_step': 3}, 'r50.ckpt')
    lightning = {'state_dict': {'model.fc.weight': t, 'criterion.supervise': t, 'ema.x': t, 'ema.y': t},
                 'global_step': 3}
    assert list(extract_state_dict(lightning, 'r50.ckpt')) == ['fc.weight']
    assert capsys.readouterr().out == 'r50.ckpt: Lightning checkpoint; ignoring 3 non-model entries (criterion, ema)\n'
    torch.save({'note': 'no tensors'}, tmp_path / 'x.pth')
    with pytest.raises(CheckpointError, match=f"^{tmp_path}/x.pth: no weights found \\(entries: \\['note'\\]\\)$"):
        read_state_dict(tmp_path / 'x.pth')


def test_checkpoint_formats_and_recorded_settings_in_every_release_form(tmp_path):
    from safetensors.torch import save_file
    from tools.load_checkpoint import export_safetensors
    model = create_model('deit_demo_patch4_32', 10)
    sd = model.state_dict()
    args = argparse.Namespace(model='deit_demo_patch4_32', input_size=32, data_set='DIGITS', eval_crop_ratio=1.0,
                              nb_classes=10)
    assert checkpoint_format({'model': sd, 'args': args}, 'ck.pth') == 'deit'
    assert checkpoint_format({'model': sd}, 'ck.pth') == 'nested'
    assert checkpoint_format(sd, 'ck.pth') == 'state_dict'
    assert recorded_settings({'model': sd, 'args': args}, 'ck.pth') == {
        'model': 'deit_demo_patch4_32', 'input_size': 32, 'data_set': 'DIGITS', 'eval_crop_ratio': 1.0,
        'num_classes': 10}
    assert recorded_settings({'model': sd, 'args': vars(args)}, 'ck.pth')['input_size'] == 32  # args as a dict
    assert recorded_settings(sd, 'ck.pth') == {}
    info = {'model': 'deit_demo_patch4_32', 'num_classes': 10, 'input_size': 32, 'format': 'deit',
            'recorded': {'data_set': 'DIGITS', 'eval_crop_ratio': 0.875}}
    out = export_safetensors(model, info, tmp_path / 'demo.safetensors')
    assert checkpoint_format({}, str(out)) == 'safetensors'
    assert recorded_settings(None, str(out)) == {'model': 'deit_demo_patch4_32', 'input_size': 32, 'num_classes': 10,
                                                 'data_set': 'DIGITS', 'eval_crop_ratio': 0.875}
    save_file(sd, str(tmp_path / 'hub.safetensors'), metadata={'format': 'pt'})  # as the hub's files are written
    assert recorded_settings(None, str(tmp_path / 'hub.safetensors')) == {
        'model': None, 'input_size': None, 'num_classes': None, 'data_set': None, 'eval_crop_ratio': None}


def test_input_size_of_a_loaded_model_vit_grid_then_given_then_its_config():
    from types import SimpleNamespace as NS
    vit = NS(patch_embed=NS(img_size=(48, 64)), pretrained_cfg={'input_size': (3, 224, 224)})
    assert _input_size(vit) == 48 and _input_size(vit, 96) == 48  # a ViT's position grid fixes its input size
    assert _input_size(NS(patch_embed=NS(img_size=None)), 96) == 96
    assert _input_size(NS(patch_embed=NS()), 96) == 96  # a patch embedding that does not record a size
    cnn = NS(pretrained_cfg={'input_size': (3, 160, 160)})
    assert _input_size(cnn) == 160 and _input_size(cnn, 96) == 96  # a CNN takes any size: the asked one first
    assert _input_size(NS()) == 224  # nothing recorded anywhere: timm's default


def _deit_file(tmp_path, name='deit_tiny_patch16_224', input_size=224, classes=10, **entries):
    model = create_model(name, classes, input_size=input_size)
    args = argparse.Namespace(model=name, input_size=input_size, nb_classes=classes, data_set='IMNET')
    path = tmp_path / f'{name}-{input_size}.pth'
    torch.save({'model': model.state_dict(), 'args': args, **entries}, path)
    return path, model


def test_load_model_builds_the_recorded_input_size_and_reports_it(tmp_path):
    path, model = _deit_file(tmp_path, input_size=64)  # a 4x4 position grid: only a 64-px model fits it
    loaded, info = load_model(path)
    assert info['input_size'] == 64 and loaded.pos_embed.shape == model.pos_embed.shape
    resnet = create_model('resnet18', 10)
    torch.save({'model': resnet.state_dict(), 'args': argparse.Namespace(model='resnet18', input_size=160)},
               tmp_path / 'r18.pth')
    assert load_model(tmp_path / 'r18.pth')[1]['input_size'] == 160  # a CNN: the size it was trained at
    assert load_model(tmp_path / 'r18.pth', input_size=128)[1]['input_size'] == 128


def test_load_model_ema_weights_head_reset_and_what_does_not_fit(tmp_path):
    path, model = _deit_file(tmp_path)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({**torch.load(path, weights_only=False), 'model_ema': ema}, path)
    loaded, _ = load_model(path, use_ema=True)
    assert torch.equal(loaded.head.bias, ema['head.bias'])
    (tmp_path / 'plain').mkdir()
    plain, _ = _deit_file(tmp_path / 'plain')
    with pytest.raises(CheckpointError, match=f'^{plain}: asked for EMA weights but there is no "model_ema" entry'):
        load_model(plain, use_ema=True)
    _, info = load_model(path, num_classes=5, reset_head=True)
    assert (info['num_classes'], info['checkpoint_classes'], info['head_reset']) == (5, 10, True)
    sd = model.state_dict()
    for bad, msg in (({k: v for k, v in sd.items() if not k.startswith('head')}, 'no classifier head'),
                     ({k: v for k, v in sd.items() if k != 'head.bias'},
                      "missing \\['head.bias'\\], unexpected \\[\\]"),
                     ({**sd, **{f'extra.{i}': torch.zeros(1) for i in range(10)}},
                      "missing \\[\\], unexpected \\['extra.0', 'extra.1', 'extra.2', 'extra.3', 'extra.4', "
                      "'extra.5', 'extra.6', 'extra.7'\\]$")):
        torch.save(bad, tmp_path / 'bad.pth')
        with pytest.raises(CheckpointError, match=msg) as e:
            load_model(tmp_path / 'bad.pth', model_name='deit_tiny_patch16_224')
        assert str(e.value).startswith(f'{tmp_path}/bad.pth')


def test_extract_state_dict_errors_name_the_entry_they_looked_in():
    with pytest.raises(CheckpointError, match='^<object>: expected a dict of weights, got list$'):
        extract_state_dict([1])
    entries = {f'k{i:02d}': 1 for i in range(12)}
    with pytest.raises(CheckpointError) as e:
        extract_state_dict(entries, 'ck.pth', use_ema=True)
    assert str(e.value) == (f'ck.pth: asked for EMA weights but there is no "model_ema" entry (entries: '
                            f'{sorted(entries)[:10]})')
    with pytest.raises(CheckpointError, match=r"^ck.pth\['state_dict'\]: no weights found \(entries: \['x'\]\)$"):
        extract_state_dict({'state_dict': {'x': 'text'}}, 'ck.pth')


def test_load_model_reports_a_vits_own_size_and_lists_what_is_missing(tmp_path):
    demo = create_model('deit_demo_patch4_32', 10).state_dict()
    torch.save(demo, tmp_path / 'demo.pth')  # no recorded size: the ViT's own 32-px grid
    assert load_model(tmp_path / 'demo.pth', model_name='deit_demo_patch4_32')[1]['input_size'] == 32
    blocks = [k for k in demo if k.startswith('blocks.0.')]  # in the model's order, as torch lists them
    torch.save({k: v for k, v in demo.items() if k not in blocks}, tmp_path / 'cut.pth')
    for reset in (False, True):  # a new head does not excuse missing body weights
        with pytest.raises(CheckpointError) as e:
            load_model(tmp_path / 'cut.pth', model_name='deit_demo_patch4_32', num_classes=5 if reset else None,
                       reset_head=reset)
        assert f'missing {blocks[:8]}, unexpected []' in str(e.value) and len(blocks) > 8
    entries = {f'k{i:02d}': 'text' for i in range(12)}
    with pytest.raises(CheckpointError, match=f"^ck: no weights found \\(entries: {sorted(entries)[:10]}\\)$".replace(
            '[', '\\[').replace(']', '\\]')):
        extract_state_dict(entries, 'ck')


def test_hub_and_url_sources_try_the_usual_files_in_order(tmp_path, monkeypatch):
    """No network in tests: huggingface_hub's download and torch.hub's URL loader are imitated."""
    import pickle
    import huggingface_hub
    torch.save({'w': torch.ones(2)}, tmp_path / 'pytorch_model.bin')
    asked = []

    def download(repo, filename):
        asked.append((repo, filename))
        if not (tmp_path / filename).is_file():
            raise FileNotFoundError(f'404 {filename}')
        return str(tmp_path / filename)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', download)
    got = load_file('hf-hub:org/deit-s', 'meta')
    assert got['w'].device.type == 'meta'
    assert asked == [('org/deit-s', 'model.safetensors'), ('org/deit-s', 'pytorch_model.bin')]
    asked.clear()
    with pytest.raises(CheckpointError) as e:
        load_file('hf-hub:org/deit-s@ema.pth')  # an explicit file: only that one
    assert asked == [('org/deit-s', 'ema.pth')]
    assert str(e.value) == "hf-hub:org/deit-s@ema.pth: none of ['ema.pth'] could be fetched: 404 ema.pth"
    with pytest.raises(CheckpointError, match=r"^hf-hub:org/none: none of \['model.safetensors', 'pytorch_model.bin', "
                                              r"'checkpoint.pth'\] could be fetched: 404 checkpoint.pth$"):
        (tmp_path / 'pytorch_model.bin').unlink()
        load_file('hf-hub:org/none')
    from huggingface_hub.errors import LocalEntryNotFoundError
    asked.clear()

    def offline(repo, filename):  # no network, nothing cached: huggingface_hub's own retries took ~25 s per name
        asked.append(filename)
        raise LocalEntryNotFoundError('cannot find the requested files in the local cache')
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', offline)
    with pytest.raises(CheckpointError, match=r'^hf-hub:org/deit-s: cannot reach the Hugging Face Hub, and '
                                              r'model.safetensors is not in the local cache; download the file'):
        load_file('hf-hub:org/deit-s')
    assert asked == ['model.safetensors']  # one wait, not one per usual file name
    urls = []

    def from_url(url, map_location=None, weights_only=False):
        urls.append((url, map_location, weights_only))
        if url.endswith('evil.pth'):
            raise pickle.UnpicklingError('Weights only load failed')
        return {'w': torch.zeros(1)}
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', from_url)
    assert load_file('https://x.org/a.pth', 'meta') == {'w': torch.zeros(1)}
    assert urls == [('https://x.org/a.pth', 'meta', True)]  # never unpickles arbitrary objects
    with pytest.raises(CheckpointError, match='^http://x.org/evil.pth: not a plain checkpoint: Weights only'):
        load_file('http://x.org/evil.pth')


class _Arbitrary:  # any pickled object that is not a tensor, a container or an allow-listed type
    pass


def test_checkpoints_load_safely_even_when_the_environment_turns_torchs_default_off(tmp_path, monkeypatch):
    torch.save({'obj': _Arbitrary()}, tmp_path / 'evil.pth')
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')  # what mmengine's resume needs (segmentation)
    with pytest.raises(CheckpointError, match='not a plain checkpoint'):
        torch_load(tmp_path / 'evil.pth')
    good = tmp_path / 'good.pth'
    torch.save({'w': torch.ones(3)}, good)
    good.write_bytes(good.read_bytes()[:-30])  # truncated: the zip's central directory is gone
    with pytest.raises(Exception) as raw:
        torch.load(good, weights_only=True)
    with pytest.raises(CheckpointError) as e:
        torch_load(good)
    assert str(e.value) == (f'{good}: cannot read checkpoint (truncated or corrupted torch file): '
                            f'{type(raw.value).__name__}: {str(raw.value).splitlines()[0]}')
    with pytest.raises(FileNotFoundError, match=f'^checkpoint not found: {tmp_path}/none.safetensors$'):
        load_file(tmp_path / 'none.safetensors')


def test_sniff_reads_only_the_head_and_names_json_with_leading_space(tmp_path, monkeypatch):
    import builtins
    import data.io as ck
    (tmp_path / 'cfg.pth').write_text('\n  {"model": "deit"}' + ' ' * 4096)
    reads = []

    def recording_open(*args, **kw):
        f = builtins.open(*args, **kw)
        real_read = f.read
        f.read = lambda n=-1: reads.append(n) or real_read(n)
        return f
    monkeypatch.setattr(ck, 'open', recording_open, raising=False)
    assert ck.sniff_file(tmp_path / 'cfg.pth') == 'a JSON file'
    assert reads == [512]  # torch_load sniffs every checkpoint: only its head, never the whole file
    (tmp_path / 'list.pth').write_text('[1, 2]')
    assert ck.sniff_file(tmp_path / 'list.pth') == 'a JSON file'
    def load_fails(*args, **kw):
        raise EOFError()
    monkeypatch.setattr(torch, 'load', load_fails)
    torch.save({}, tmp_path / 'ok.pth')
    with pytest.raises(ck.CheckpointError, match=r'^.*ok.pth: cannot read checkpoint \(truncated or corrupted torch '
                                                 r'file\): EOFError: EOFError$'):
        ck.torch_load(tmp_path / 'ok.pth')  # an error without a message is named by its type
