"""What a timm or DeiT user reaches for: timm's flag names with timm's meaning, or one line saying why not."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

import deit.build as build
import deit.main as dm
from deit.args import check_args
from deit.recipes import parse_args
from deit.config import resolve_config
from deit.distributed import DistInfo
from deit.main import cli
from deit.train_state import resume
from tests.conftest import TINY, trained_checkpoint, training_state


def test_timm_aliases_mean_what_they_mean_in_timm(tmp_path):
    args = parse_args(['-b', '8', '-j', '2', '--img-size', '160', '--crop-pct', '0.9', '--initial-checkpoint', 'w.pth'])
    assert (args.batch_size, args.num_workers, args.input_size, args.eval_crop_ratio, args.finetune) == \
        (8, 2, 160, 0.9, 'w.pth')
    assert parse_args(['--input-size', '3', '96', '96']).input_size == 96  # timm's C H W
    assert parse_args(['--input-size', '96']).input_size == 96  # DeiT's side
    for bad in (['3', '96', '64'], ['1', '96', '96'], ['96', '96']):
        with pytest.raises(SystemExit):
            parse_args(['--input-size', *bad])
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('input_size: [3, 64, 64]\nmodel_kwargs: {qkv_bias: false}\nopt_kwargs: {foreach: false}\n')
    args = parse_args(['-c', str(recipe)])
    assert (args.input_size, args.model_kwargs, args.opt_kwargs) == (64, {'qkv_bias': False}, {'foreach': False})
    recipe.write_text('input_size: [3, 64, 32]\n')
    with pytest.raises(SystemExit, match=r'input_size: \[3, 64, 32\] is not an int \(or \[3, S, S\]\)'):
        parse_args(['-c', str(recipe)])


@pytest.mark.parametrize('flags, msg', [
    (['--pretrained'], '--pretrained: not supported; a run starts from a file'),
    (['--checkpoint-hist', '3'], '--checkpoint-hist 3: not supported; a run keeps checkpoint.pth and best_'),
    (['--log-wandb'], '--log-wandb: not supported; the scalars are in <run>/tb and summary.csv')])
def test_timm_flags_without_a_counterpart_are_refused_in_one_line(flags, msg, capsys):
    assert cli(TINY + ['--data-set', 'DEMO', '--epochs', '1', *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'error: {msg}'), err


def test_the_best_checkpoint_metric_is_top1(capsys):
    assert check_args(parse_args(['--data-set', 'DEMO', '--eval-metric', 'top1'])) is None
    with pytest.raises(SystemExit):
        parse_args(['--eval-metric', 'loss'])  # the best checkpoint is picked by top-1, as DeiT
    assert "invalid choice: 'loss'" in capsys.readouterr().err


def test_model_and_optimizer_kwargs_and_layer_decay_reach_timm():
    args = parse_args(['--data-set', 'DEMO', '--model', 'deit_demo_patch4_32', '--input-size', '32',
                       '--model-kwargs', 'qkv_bias=False', '--opt-kwargs', 'foreach=False', '--layer-decay', '0.5'])
    cfg = resolve_config(args, 10)
    model = build.build_model(cfg, 10, torch.device('cpu'))
    assert model.blocks[0].attn.qkv.bias is None
    optimizer, _ = build.build_optimization(cfg, model)
    assert optimizer.defaults['foreach'] is False
    scales = sorted({g['lr_scale'] for g in optimizer.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0 and scales[0] < 0.1  # 0.5 per layer from the head down


def test_clip_mode_reaches_the_clipping(monkeypatch):
    import timm.utils.cuda
    calls = []
    monkeypatch.setattr(timm.utils.cuda, 'dispatch_clip_grad', lambda params, value, mode: calls.append((value, mode)))
    from deit.engine import LossScaler, train_one_epoch
    model = torch.nn.Linear(4, 3)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1]))]
    train_one_epoch(model, lambda x, o, y: torch.nn.functional.cross_entropy(o, y), batches,
                    torch.optim.SGD(model.parameters(), lr=0.1), torch.device('cpu'), 0, LossScaler('cpu', False),
                    print_freq=0, max_norm=0.5, clip_mode='value')
    assert calls == [(0.5, 'value')]


def test_sync_bn_converts_batchnorm_before_ddp(monkeypatch, capsys):
    args = parse_args(['--model', 'resnet18', '--sync-bn'])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    wrapped, _ = build.wrap_model(resolve_config(args, 4), model, torch.device('cpu'))
    assert isinstance(wrapped[1], torch.nn.BatchNorm2d) and 'nothing to synchronise' in capsys.readouterr().out
    cfg = resolve_config(args, 4, DistInfo(distributed=True, world_size=2))
    with pytest.raises(ValueError, match='--sync-bn: torch synchronises BatchNorm between CUDA devices only'):
        build.wrap_model(cfg, model, torch.device('cpu'))
    seen = []  # a GPU run, imitated: what DDP is given
    monkeypatch.setattr(torch.nn.parallel, 'DistributedDataParallel', lambda m, device_ids: seen.append(m) or m)
    build.wrap_model(cfg, model, torch.device('cuda', 0))
    assert isinstance(seen[0][1], torch.nn.SyncBatchNorm) and seen[0][1].num_features == 4


def test_no_resume_opt_keeps_a_fresh_optimizer_and_continues_the_epochs(capsys):
    src, ckpt, _ = trained_checkpoint()
    dst = training_state(1)
    resume(dst, ckpt, 'ck.pth', seed=0, resume_opt=not parse_args(['--no-resume-opt']).no_resume_opt)
    assert dst.optimizer.state_dict()['state'] == {} and dst.start_epoch == 4
    assert dst.lr_scheduler.state_dict() == src.lr_scheduler.state_dict()
    assert 'optimizer and loss-scaler state of ck.pth are not restored' in capsys.readouterr().out


def test_experiment_names_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_args(['--experiment', 'maxsup-a'])
    with contextlib.ExitStack() as cleanup:
        assert dm.claim_output_dir(resolve_config(args, 10), cleanup) == Path('output/train/maxsup-a')  # under the working directory
    assert (tmp_path / 'output' / 'train' / 'maxsup-a').is_dir()


def test_multistep_milestones_and_rate_reach_the_schedule():
    """timm's --decay-milestones / --decay-rate: the lr is multiplied by the rate at each milestone, in timm's
    convention: milestone m is in effect from the epoch numbered m - 1 (torch's MultiStepLR: from epoch m)."""
    args = parse_args(['--data-set', 'DEMO', '--epochs', '6', '--warmup-epochs', '0', '--lr', '0.1', '--unscale-lr',
                       '--sched', 'multistep', '--decay-milestones', '2', '4', '--decay-rate', '0.5'])
    optimizer, scheduler = build.build_optimization(resolve_config(args, 10), torch.nn.Linear(2, 2))
    lrs = []
    for epoch in range(6):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]['lr'])
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025, 0.025])


def test_deits_lr_step_runs_one_epoch_behind_timms(tmp_path):
    """--lr-step deit: epoch e trains at the schedule's lr(e - 1), as DeiT's main.py (step(epoch) after each
    epoch); timm's (default) at lr(e). Read from the lr each epoch logged."""
    lrs = {}
    for mode in ('timm', 'deit'):
        out = tmp_path / mode
        assert cli(TINY + ['--data-set', 'DEMO', '--epochs', '4', '--warmup-epochs', '2', '--max-steps-per-epoch', '1',
                           '--eval-every', '4', '--lr-step', mode, '--output_dir', str(out)]) == 0
        lrs[mode] = [json.loads(line)['lr'] for line in (out / 'log.txt').read_text().splitlines()]
    assert lrs['timm'][0] < lrs['timm'][1] < lrs['timm'][2]  # warm-up, then the cosine
    assert lrs['deit'] == pytest.approx([lrs['timm'][0]] + lrs['timm'][:3])
