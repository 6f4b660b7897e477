"""Where the paper and the official code set a default, the project follows the documented source."""
from __future__ import annotations

import json
import shlex
import subprocess

import numpy as np
import pytest
import torch

from deit import localization
from deit.analysis import logit_statistics
from deit.args import check_args, get_args_parser
from deit.build import build_model, build_optimization, setup_criterion
from deit.config import resolve_config
from deit.recipes import parse_args
from tests.conftest import ROOT, TINY, make_imagefolder


def _criterion(*flags):
    args = get_args_parser().parse_args(['--mixup', '0', '--cutmix', '0', '--epochs', '300', *flags])
    check_args(args)
    return setup_criterion(resolve_config(args, 10), 10, None, torch.device('cpu'))


@pytest.mark.parametrize('loss', ['maxsup', 'ls', 'ls_reg_only', 'ls_err_only'])
def test_alpha_schedule_is_the_default_for_maxsup_and_the_ls_family(loss):
    """Paper Sec. 5.1 / App. F: 0.1 -> 0.2 'applied to both MaxSup and standard Label Smoothing by default'."""
    _, base, schedule = _criterion('--loss', loss)
    assert [schedule(0), schedule(299)] == pytest.approx([0.1, 0.2])
    _, _, fixed = _criterion('--loss', loss, '--alpha-schedule', 'constant')  # Table 1, Table 8's fixed column
    assert [fixed(0), fixed(150), fixed(299)] == pytest.approx([0.1, 0.1, 0.1])
    _, _, old_names = _criterion('--loss', loss, '--maxsup-alpha', '0.05', '--maxsup-alpha-end', '0.15')
    assert [old_names(0), old_names(299)] == pytest.approx([0.05, 0.15])


def _recipe(recipe: str, ngpus: int = 8) -> dict:
    env = {'PATH': '/usr/bin:/bin', 'PYTHON': 'python3', 'DATA_PATH': '/data/imagenet', 'NGPUS': str(ngpus)}
    if recipe:
        env['RECIPE'] = recipe
    r = subprocess.run(['bash', 'scripts/train_with_MaxSup.sh', '--dry-run'], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout.strip().splitlines()[-1])
    args = parse_args(argv[argv.index('deit.main') + 1:])  # the recipe file, then the flags
    return vars(args) | {'total_batch': args.total_batch_size}


def test_recipe_table_as_parsed():
    paper, official, resnet = _recipe(''), _recipe('official'), _recipe('resnet50')
    # DeiT-S, paper (default): "we also omit CutMix and Mixup" (Sec. 5.1); official code: DeiT's defaults
    assert (paper['mixup'], paper['cutmix']) == (0.0, 0.0)
    assert (official['mixup'], official['cutmix']) == (0.8, 1.0)
    assert (paper['lr_step'], official['lr_step']) == ('timm', 'deit')  # DeiT's main.py: step(epoch)
    for r in (paper, official):
        assert r['model'] == 'deit_small_patch16_224' and r['epochs'] == 300 and r['total_batch'] == 1024
        assert (r['opt'], r['lr'], r['weight_decay'], r['sched'], r['warmup_epochs']) == ('adamw', 5e-4, 0.05,
                                                                                          'cosine', 5)
        assert r['distillation_type'] == 'none' and r['smoothing'] == 0
        assert (r['loss'], r['alpha'], r['alpha_end'], r['alpha_schedule']) == ('maxsup', 0.1, 0.2, 'linear')
    # ResNet-50 (Sec. 5.1): SGD with plain momentum 0.9, lr 0.85, cosine, batch 2048, 200 epochs; BlurPool and
    # torchvision's initialisation as Conv/ffcv
    assert resnet['model'] == 'resnet50_blurpool' and resnet['total_batch'] == 2048 and resnet['epochs'] == 200
    assert (resnet['opt'], resnet['momentum'], resnet['sched'], resnet['weight_decay']) == ('momentum', 0.9,
                                                                                            'cosine', 1e-4)
    assert resnet['lr'] * 2048 / 512 == pytest.approx(0.85) and resnet['model_kwargs'] == {'zero_init_last': False}
    # the official code's values (Conv/ffcv config.toml): 90 epochs, lr 0.8, step 30 / 0.1, SyncBN
    ffcv = _recipe('resnet50_official')
    assert (ffcv['epochs'], ffcv['sched'], ffcv['decay_epochs'], ffcv['decay_rate'], ffcv['sync_bn']) == (
        90, 'step', 30, 0.1, True)
    assert ffcv['lr'] * 2048 / 512 == pytest.approx(0.8) and ffcv['opt'] == 'momentum'
    assert (resnet['mixup'], resnet['cutmix'], resnet['aa']) == (0.0, 0.0, 'none')


def test_near_zero_logits_are_proportions_at_the_official_threshold():
    z = torch.tensor([[0.005, -0.009, 0.02, 5.0], [0.0, 0.05, -0.2, 1.0]])
    s = logit_statistics(z)
    assert s['threshold'] == 0.01
    assert s['per_sample']['near_zero_fraction'] == pytest.approx([0.5, 0.25])
    assert s['near_zero_fraction_mean'] == pytest.approx(0.375)


def test_cam_precision_recall_on_a_hand_made_map_and_box():
    cam = np.zeros((10, 10))
    cam[2:6, 2:6] = 1.0  # 16 active pixels
    cam[0, 0] = 0.4  # below the threshold
    # box over x 4..8, y 2..6: 16 pixels, 8 of them active
    assert localization.cam_precision_recall(cam, [(4, 2, 8, 6)], 0.5) == pytest.approx((0.5, 0.5))
    assert localization.cam_precision_recall(cam, [(2, 2, 6, 6)], 0.5) == pytest.approx((1.0, 1.0))
    assert localization.cam_precision_recall(cam, [(0, 0, 10, 10)], 0.3) == pytest.approx((1.0, 0.17))
    # the eval transform: shorter side 500 -> 256 (224 / 0.875), centre crop 224
    (b,) = localization.boxes_in_crop([(100.0, 50.0, 400.0, 300.0)], 750, 500, 224, 0.875)
    scale = 256 / 500
    off_x, off_y = (750 * scale - 224) / 2, (500 * scale - 224) / 2
    assert b == pytest.approx((0.0, 50 * scale - off_y, 400 * scale - off_x, 300 * scale - off_y))  # x0 clipped
    assert 100 * scale - off_x < 0


def test_boxes_from_loc_csv_and_xml(tmp_path):
    (tmp_path / 'LOC_val_solution.csv').write_text(
        'ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 30 40 n01751748 5 6 7 8 \n')
    assert localization.read_boxes(tmp_path / 'LOC_val_solution.csv') == {
        'ILSVRC2012_val_00000001': [(1.0, 2.0, 30.0, 40.0), (5.0, 6.0, 7.0, 8.0)]}
    xml = tmp_path / 'xml'
    xml.mkdir()
    (xml / 'ILSVRC2012_val_00000002.xml').write_text(
        '<annotation><size><width>50</width><height>40</height></size><object><name>n01</name><bndbox>'
        '<xmin>3</xmin><ymin>4</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object></annotation>')
    assert localization.read_boxes(xml) == {'ILSVRC2012_val_00000002': [(3.0, 4.0, 20.0, 30.0)]}
    (tmp_path / 'bad.csv').write_text('a,b\n1,2\n')
    with pytest.raises(ValueError, match='ImageId,PredictionString'):
        localization.read_boxes(tmp_path / 'bad.csv')


def test_cam_boxes_cli(tmp_path):
    from deit.main import cli
    from tools.analyze import main as analyze
    data = make_imagefolder(tmp_path / 'd', n_classes=2, n_train=4, n_val=2)
    run = tmp_path / 'run'
    assert cli(TINY + ['--data-set', 'FOLDER', '--data-path', str(data), '--epochs', '1', '--batch-size', '4',
                       '--output_dir', str(run)]) == 0
    (tmp_path / 'loc.csv').write_text('ImageId,PredictionString\n000,n0 0 0 16 32\n001,n0 8 8 24 24\n')
    assert analyze(['cam-boxes', '--ckpt', f'a={run / "checkpoint.pth"}', '--data-path', str(data),
                    '--boxes', str(tmp_path / 'loc.csv'), '--num-images', '3', '--out', str(tmp_path / 'an'),
                    '--num-workers', '0']) == 0
    res = json.loads((tmp_path / 'an' / 'cam-boxes' / 'cam-boxes.json').read_text())
    assert res['images'] == 3 and res['threshold'] == 0.5
    assert 0 <= res['models']['a']['precision'] <= 1 and 0 <= res['models']['a']['recall'] <= 1


def test_the_resnet_recipe_builds_plain_momentum_and_torchvisions_initialisation():
    """timm's 'sgd' is Nesterov and its ResNets zero the last BatchNorm of each block; the paper (and FFCV's
    torchvision model) use plain momentum and BatchNorm weights of one."""
    args = parse_args(['-c', str(ROOT / 'recipes' / 'resnet50_paper.yaml'), '--model', 'resnet18_blurpool',
                       '--data-path', '.'])
    cfg = resolve_config(args, 10)
    model = build_model(cfg, 10, torch.device('cpu'))
    assert all(bool((block.bn2.weight == 1).all()) for layer in (model.layer1, model.layer4) for block in layer)
    optimizer, _ = build_optimization(cfg, model)
    group = optimizer.param_groups[0]
    assert group['nesterov'] is False and group['momentum'] == 0.9 and group['lr'] == pytest.approx(0.85)


@pytest.mark.parametrize('recipe, model, weight_decay, lr', [
    ('resnet50_torchvision_v1.yaml', 'resnet18', 1e-4, 0.1), ('mobilenetv2_torchvision.yaml', None, 4e-5, 0.045)])
def test_torchvision_recipes_decay_every_parameter_at_their_own_lr(recipe, model, weight_decay, lr):
    """torchvision's reference trainer applies weight decay to BatchNorm and biases too (timm's and DeiT's
    default leaves 1-d parameters out), and its lr is given for the recipe's batch, not scaled by batch / 512."""
    args = parse_args(['-c', str(ROOT / 'recipes' / recipe), *(['--model', model] if model else []),
                       '--input-size', '32', '--data-path', '.'])
    cfg = resolve_config(args, 10)
    built = build_model(cfg, 10, torch.device('cpu'))
    optimizer, _ = build_optimization(cfg, built)
    assert [g['weight_decay'] for g in optimizer.param_groups] == [weight_decay]
    assert sum(p.numel() for p in optimizer.param_groups[0]['params']) == sum(p.numel() for p in built.parameters())
    assert optimizer.param_groups[0]['nesterov'] is False and optimizer.param_groups[0]['lr'] == pytest.approx(lr)


def test_zipf_dense_trains_a_cnn_and_refuses_a_vit_in_one_line(tmp_path, capsys):
    from deit.main import cli
    flags = [*TINY, '--data-set', 'DEMO', '--epochs', '1', '--max-steps-per-epoch', '3', '--mixup', '0',
             '--cutmix', '0', '--loss', 'zipf', '--zipf-dense', '--zipf-weight', '0.1']
    assert cli([*flags, '--model', 'resnet32_cifar', '--output_dir', str(tmp_path / 'cnn')]) == 0
    out = capsys.readouterr().out
    assert 'criterion: ZipfLabelSmoothing(weight=0.1, power=1.0, loss_mask=False, dense voting)' in out
    assert cli([*flags, '--output_dir', str(tmp_path / 'vit')]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --zipf-dense votes with the classifier at each location of a CNN's last feature map; "
        "VisionTransformer has no global_pool module feeding a linear classifier"]
