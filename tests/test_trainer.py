"""End-to-end trainer tests on a tiny synthetic ImageFolder (CPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from data.io import CheckpointError, torch_load
from deit.args import get_args_parser
from deit.criterion import HARD_LABEL_LOSSES, LOSSES
from deit.main import cli, main
from deit.recipes import parse_args
from deit.models import adapt_state_dict_for_finetune, create_model
from tests.conftest import ROOT, TINY, make_imagefolder, run_module, without


def read_log(out):
    return [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]


def test_end_to_end_mixup_cutmix_maxsup(tiny_imagefolder, tmp_path, capsys):
    out = tmp_path / 'run'
    rc = cli(TINY + ['--data-set', 'FOLDER', '--data-path', str(tiny_imagefolder), '--epochs', '4',
                     '--mixup', '0.8', '--cutmix', '1.0', '--loss', 'maxsup', '--output_dir', str(out)])
    assert rc == 0
    log = read_log(out)
    assert [r['epoch'] for r in log] == [0, 1, 2, 3]
    assert log[-1]['train_loss'] < log[0]['train_loss']
    # alpha 0.1 -> 0.2 linearly over 4 epochs, logged and checkpointed
    assert [r['alpha'] for r in log] == pytest.approx([0.1, 0.1 + 0.1 / 3, 0.1 + 0.2 / 3, 0.2])
    ck = torch_load(out / 'checkpoint.pth')
    assert ck['epoch'] == 3 and ck['log']['alpha'] == pytest.approx(0.2)
    assert {'model', 'optimizer', 'lr_scheduler', 'scaler', 'args', 'rng', 'criterion'} <= set(ck)
    assert (out / 'best_checkpoint.pth').is_file()
    assert any(p.name.startswith('events.out.tfevents') for p in (out / 'tb').iterdir())
    n_parameters = sum(p.numel() for p in create_model('deit_demo_patch4_32', num_classes=4).parameters())
    assert f'model deit_demo_patch4_32: {n_parameters / 1e6:.2f}M parameters, 4 classes\n' in capsys.readouterr().out
    # --eval on the saved checkpoint reproduces the logged test accuracy and reports ECE
    stats = main(get_args_parser().parse_args(TINY + ['--data-set', 'FOLDER', '--data-path', str(tiny_imagefolder),
                                                      '--eval', '--resume', str(out / 'checkpoint.pth')]))
    assert stats['acc1'] == pytest.approx(log[-1]['test_acc1'])
    assert 0 <= stats['ece'] <= 1 and stats['n'] == 24
    printed = capsys.readouterr().out
    assert 'Acc@1' in printed and f'evaluating {out / "checkpoint.pth"} (epoch 3)\n' in printed
    assert f'Accuracy of the network on the 24 test images: {stats["acc1"]:.2f}%\n' in printed  # DeiT's line
    # without --model / --input-size: the checkpoint's own (recorded in its args), said in one line
    bare = without(without(TINY, '--model'), '--input-size')
    stats = main(parse_args(bare + ['--data-set', 'FOLDER', '--data-path', str(tiny_imagefolder), '--eval',
                                    '--resume', str(out / 'checkpoint.pth')]))
    assert stats['acc1'] == pytest.approx(log[-1]['test_acc1'])
    assert ('--eval: ' + str(out / 'checkpoint.pth') + ' was trained with --model deit_demo_patch4_32, --input-size 32; '
            'evaluating it so') in capsys.readouterr().out
    # chosen on the command line: kept, and a misfit is one error naming what the checkpoint was trained as
    with pytest.raises(CheckpointError, match='trained as --model deit_demo_patch4_32 --input-size 32'):
        main(parse_args(bare + ['--model', 'deit_tiny_patch16_224', '--data-set', 'FOLDER', '--data-path',
                                str(tiny_imagefolder), '--eval', '--resume', str(out / 'checkpoint.pth')]))


@pytest.mark.parametrize('loss', LOSSES)
def test_loss_matrix_smoke(loss, tiny_imagefolder, tmp_path):
    mix = ['--mixup', '0', '--cutmix', '0'] if loss in HARD_LABEL_LOSSES else []
    rc = cli(TINY + ['--data-set', 'FOLDER', '--data-path', str(tiny_imagefolder), '--epochs', '1', '--loss', loss,
                     '--max-steps-per-epoch', '2', '--output_dir', str(tmp_path)] + mix)
    assert rc == 0
    assert read_log(tmp_path)[0]['train_loss'] > 0


def test_demo_dataset_trains(tmp_path):
    rc = cli(TINY + ['--data-set', 'DEMO', '--epochs', '1', '--max-steps-per-epoch', '3',
                     '--output_dir', str(tmp_path)])
    assert rc == 0
    assert read_log(tmp_path)[0]['test_n'] == 450


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path):
    data = make_imagefolder(tmp_path / 'data', n_classes=3, n_train=64, n_val=4)
    common = TINY + ['--data-set', 'FOLDER', '--data-path', str(data), '--epochs', '4', '--batch-size', '8',
                     '--print-freq', '1', '--seed', '3', '--warmup-epochs', '1', '--mixup', '0.8']
    full, killed = tmp_path / 'full', tmp_path / 'killed'
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}  # as run_module, but streamed
    proc = subprocess.Popen([sys.executable, '-m', 'deit.main', *common, '--output_dir', str(killed)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    # wait until epoch 2 is under way (epochs 0 and 1 checkpointed), then SIGKILL mid-epoch
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith('Epoch: [2] [ 5/'):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, ''.join(seen[-20:])
    assert [r['epoch'] for r in read_log(killed)] == [0, 1]
    assert torch_load(killed / 'checkpoint.pth')['epoch'] == 1
    assert not list(killed.glob('.*tmp*'))  # no torn temp files left behind
    # auto-resume from output_dir/checkpoint.pth
    r = run_module(['-m', 'deit.main', *common, '--output_dir', str(killed)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'auto-resuming' in r.stdout
    r = run_module(['-m', 'deit.main', *common, '--output_dir', str(full)])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = read_log(full), read_log(killed)
    assert [x['epoch'] for x in b] == [0, 1, 2, 3]
    for x, y in zip(a, b):
        assert x['lr'] == pytest.approx(y['lr'], rel=1e-9) and x['alpha'] == pytest.approx(y['alpha'])
    ca, cb = torch_load(full / 'checkpoint.pth'), torch_load(killed / 'checkpoint.pth')
    assert ca['epoch'] == cb['epoch'] == 3
    assert ca['log']['alpha'] == cb['log']['alpha']
    assert ca['optimizer']['param_groups'][0]['lr'] == pytest.approx(cb['optimizer']['param_groups'][0]['lr'])
    # same seed, RNG restored, single-threaded loading: the resumed run reproduces the weights
    for k in ca['model']:
        assert torch.allclose(ca['model'][k], cb['model'][k], atol=1e-5), k


def test_distillation_smoke(tiny_imagefolder, tmp_path):
    teacher = create_model('deit_demo_patch4_32', 4, input_size=32)
    torch.save({'model': teacher.state_dict()}, tmp_path / 'teacher.pth')
    for kind in ('soft', 'hard'):
        out = tmp_path / kind
        rc = cli(TINY + ['--data-set', 'FOLDER', '--data-path', str(tiny_imagefolder), '--epochs', '1',
                         '--model', 'deit_tiny_distilled_patch16_224', '--max-steps-per-epoch', '2',
                         '--teacher-model', 'deit_demo_patch4_32', '--teacher-path', str(tmp_path / 'teacher.pth'),
                         '--distillation-type', kind, '--output_dir', str(out)])
        assert rc == 0
        assert read_log(out)[0]['train_loss'] > 0


def test_finetune_with_different_input_size_and_classes(tiny_imagefolder, tmp_path):
    src = tmp_path / 'src'
    assert cli(TINY + ['--data-set', 'DEMO', '--epochs', '1', '--max-steps-per-epoch', '2',
                       '--output_dir', str(src)]) == 0
    state = torch_load(src / 'checkpoint.pth')['model']
    # unit: head reset on class mismatch, pos_embed resampled 8x8 -> 12x12
    model = create_model('deit_demo_patch4_32', 4, input_size=48)
    adapted, reset = adapt_state_dict_for_finetune(state, model)
    assert set(reset) == {'head.weight', 'head.bias'}
    assert adapted['pos_embed'].shape == model.pos_embed.shape == (1, 1 + 144, 128)
    assert torch.equal(adapted['pos_embed'][:, 0], state['pos_embed'][:, 0])  # class token untouched
    # end to end: finetune at 48px on the 4-class folder
    out = tmp_path / 'ft'
    assert cli(TINY + ['--data-set', 'FOLDER', '--data-path', str(tiny_imagefolder), '--epochs', '1',
                       '--input-size', '48', '--finetune', str(src / 'checkpoint.pth'),
                       '--max-steps-per-epoch', '2', '--output_dir', str(out)]) == 0
    assert read_log(out)[0]['test_n'] == 24


@pytest.mark.parametrize('extra,msg', [
    (['--data-set', 'FOLDER', '--data-path', '/nonexistent/data'], 'data path does not exist'),
    (['--data-set', 'IMNET'], '--data-path is required'),
    (['--data-set', 'DEMO', '--model', 'no_such_model_xyz'], "unknown model 'no_such_model_xyz'"),
    (['--data-set', 'DEMO', '--model', 'hf-hub:timm/deit_tiny_patch16_224.fb_in1k'], 'hub models are not downloaded'),
    (['--data-set', 'DEMO', '--smoothing', '0.1'], 'regularises twice'),
    (['--data-set', 'DEMO', '--loss', 'ls_reg_only'], 'hard labels'),
])
def test_bad_input_clear_errors(extra, msg, capsys):
    assert cli(TINY + ['--epochs', '1'] + extra) == 2
    assert msg in capsys.readouterr().err


def test_empty_class_folder_and_unknown_loss(tmp_path, capsys):
    root = make_imagefolder(tmp_path / 'd', n_classes=2, n_train=2, n_val=2)
    (root / 'train' / 'empty_class').mkdir()
    assert cli(TINY + ['--epochs', '1', '--data-set', 'FOLDER', '--data-path', str(root)]) == 2
    err = capsys.readouterr().err
    assert 'empty_class' in err and str(root / 'train') in err
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(['--loss', 'poly'])
    assert "invalid choice: 'poly'" in capsys.readouterr().err


def test_paper_randaugment_pipeline_survives_every_magnitude():
    """timm's posterize at magnitude 10 asks for 0 bits; Pillow 13 raises there (we pin Pillow 12)."""
    import random

    from PIL import Image, ImageOps
    from timm.data import create_transform
    ImageOps.posterize(Image.new('RGB', (8, 8)), 0)
    tf = create_transform(32, is_training=True, auto_augment='rand-m10-mstd1.0-inc1', re_prob=0.25)
    img = Image.new('RGB', (40, 40), (120, 30, 200))
    random.seed(0)
    torch.manual_seed(0)
    for _ in range(300):
        assert tf(img).shape == (3, 32, 32)


def test_finetune_or_resume_from_a_foreign_architecture_is_refused(tmp_path, capsys):
    import torchvision
    torch.save({'model': torchvision.models.resnet18().state_dict()}, tmp_path / 'r18.pth')
    for flag in ('--finetune', '--resume'):
        assert cli(TINY + ['--data-set', 'DEMO', '--epochs', '1', flag, str(tmp_path / 'r18.pth'),
                           '--output_dir', str(tmp_path / flag.strip('-'))]) == 2
        assert 'does not fit deit_demo_patch4_32' in capsys.readouterr().err


def test_the_run_is_seeded_before_its_data_sets_are_built(tmp_path, monkeypatch):
    """The data sets may draw from the global streams (a split, a transform): they draw from the seeded ones,
    so one --seed gives one run whatever the order of the phases after it."""
    import deit.main as dm
    seen, real = [], dm.build_dataset
    monkeypatch.setattr(dm, 'build_dataset', lambda train, args: seen.append(torch.initial_seed()) or real(train, args))
    assert cli(TINY + ['--data-set', 'DEMO', '--epochs', '1', '--max-steps-per-epoch', '1', '--seed', '7321',
                       '--output_dir', str(tmp_path)]) == 0
    assert seen == [7321, 7321]
