"""What a timm/DeiT user expects of the trainer: recipe files in every launcher, a run folder, safe
auto-resume, gradient accumulation, grouped --help."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from deit.main import cli, parse_args
from tests.conftest import ROOT, SRUN_EXEC, TINY, fake_slurm_bin, make_imagefolder, without

PAPER = ROOT / 'recipes' / 'deit_s_paper.yaml'


def _deit_argv(stdout: str) -> list[str]:
    """The deit.main arguments of the last command line a launcher printed."""
    line = next(ln for ln in reversed(stdout.strip().splitlines()) if 'deit.main' in ln)
    argv = shlex.split(line)
    return argv[argv.index('deit.main') + 1:]


def _check_paper_recipe(argv: list[str]) -> None:
    args = parse_args(argv)
    assert (args.model, args.total_batch_size, args.epochs) == ('deit_small_patch16_224', 1024, 300)
    assert (args.mixup, args.cutmix, args.alpha, args.alpha_end) == (0.0, 0.0, 0.1, 0.2)
    assert args.data_path == '/data/imagenet'


def test_every_launcher_applies_the_recipe_file(tmp_path):
    env = {'PATH': f'{os.environ["PATH"]}', 'PYTHON': 'python3', 'DRY_RUN': '1', 'DATA_PATH': '/data/imagenet'}
    run = lambda cmd, **kw: subprocess.run(cmd, cwd=ROOT, env={**env, **kw}, capture_output=True,  # noqa: E731
                                           text=True, check=True).stdout
    # the main command, one process and one node of 8, --dry-run anywhere
    _check_paper_recipe(_deit_argv(run(['bash', 'scripts/train_with_MaxSup.sh', '--epochs', '300', '--dry-run'])))
    _check_paper_recipe(_deit_argv(run(['bash', 'scripts/train_with_MaxSup.sh'], NGPUS='8')))
    # torchrun launcher with the recipe file
    out = run(['bash', 'scripts/distributed_train.sh', '-c', str(PAPER), '--data-path', '/data/imagenet',
               '--dry-run'], NGPUS='8')
    _check_paper_recipe(_deit_argv(out))
    # SLURM: srun runs the main command on each node (a stand-in srun that runs its command)
    bin_ = fake_slurm_bin(tmp_path, SRUN_EXEC)
    out = run(['bash', 'scripts/slurm_train.sbatch'], PATH=f'{bin_}:{env["PATH"]}', SLURM_JOB_NODELIST='node-a',
              SLURM_JOB_ID='5', SLURM_SUBMIT_DIR=str(ROOT), NGPUS='8')
    _check_paper_recipe(_deit_argv(out))
    # submitit
    from tools.run_with_submitit import main as submitit_main
    assert submitit_main(['--dry-run', '--', '-c', str(PAPER), '--data-path', '/data/imagenet']) is None
    assert submitit_main(['--', '-c', str(PAPER), '--dry-run', '--data-path', '/data/imagenet']) is None  # anywhere


def test_submitit_without_slurm_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    submitit = pytest.importorskip('submitit')
    from tools.run_with_submitit import main as submitit_main
    monkeypatch.setattr(submitit.AutoExecutor, 'which', staticmethod(lambda: 'local'))
    with pytest.raises(SystemExit) as e:
        submitit_main(['--job-dir', str(tmp_path / 'jobs'), '--', '--data-set', 'DEMO'])
    assert e.value.code == 2 and 'no SLURM here' in capsys.readouterr().err
    assert not (tmp_path / 'jobs').exists()


def test_a_users_recipe_replaces_the_launchers_and_keeps_its_own_values(tmp_path):
    mine = tmp_path / 'my.yaml'
    mine.write_text(f'loss: ls\nepochs: 3\ndata_path: /data/mine\noutput_dir: {tmp_path / "out"}\n')
    env = {'PATH': os.environ['PATH'], 'PYTHON': sys.executable, 'DRY_RUN': '1', 'DATA_PATH': '/data/imagenet'}
    run = lambda cmd, **kw: subprocess.run(cmd, cwd=ROOT, env={**env, **kw}, capture_output=True,  # noqa: E731
                                           text=True, check=True).stdout
    bin_ = fake_slurm_bin(tmp_path, SRUN_EXEC)
    for out in (run(['bash', 'scripts/train_with_MaxSup.sh', '-c', str(mine)]),
                run(['bash', 'scripts/train_with_MaxSup.sh', '-c', str(mine)], NGPUS='8'),
                run(['bash', 'scripts/slurm_train.sbatch', '-c', str(mine)], PATH=f'{bin_}:{env["PATH"]}',
                    SLURM_JOB_NODELIST='node-a', SLURM_JOB_ID='5', SLURM_SUBMIT_DIR=str(ROOT), NGPUS='8')):
        argv = _deit_argv(out)
        assert 'recipes/deit_s_paper.yaml' not in ' '.join(argv)
        args = parse_args(argv)
        assert (args.loss, args.epochs, args.data_path, args.output_dir) == ('ls', 3, '/data/mine',
                                                                            str(tmp_path / 'out'))
    # an explicit LOSS, or flags, still override the user's recipe, as flags override any recipe
    args = parse_args(_deit_argv(run(['bash', 'scripts/train_with_MaxSup.sh', '-c', str(mine)], LOSS='maxsup')))
    assert args.loss == 'maxsup'
    args = parse_args(_deit_argv(run(['bash', 'scripts/train_with_MaxSup.sh', '-c', str(mine), '--epochs', '5'])))
    assert (args.loss, args.epochs) == ('ls', 5)


def test_recipe_keys_are_checked(tmp_path):
    bad = tmp_path / 'r.yaml'
    bad.write_text('model: deit_tiny_patch16_224\nlearning_rate: 0.1\n')
    with pytest.raises(SystemExit, match=r"unknown keys \['learning_rate'\]"):
        parse_args(['-c', str(bad)])
    assert parse_args(['-c', str(PAPER), '--mixup', '0.8']).mixup == 0.8  # flags override the file


def test_run_folder_and_refused_resume_of_another_run(tmp_path, capsys):
    out = tmp_path / 'run'
    base = TINY + ['--data-set', 'DEMO', '--max-steps-per-epoch', '2', '--output_dir', str(out)]
    assert cli(base + ['--epochs', '1', '--loss', 'ls']) == 0
    names = {p.name for p in out.iterdir()}
    assert {'args.yaml', 'log.txt', 'summary.csv', 'stdout.log', 'checkpoint.pth', 'tb'} <= names
    assert 'configuration:' in (out / 'stdout.log').read_text()
    import yaml
    assert yaml.safe_load((out / 'args.yaml').read_text())['loss'] == 'ls'
    again = parse_args(['-c', str(out / 'args.yaml')])  # the resolved configuration is itself a recipe
    assert (again.loss, again.lr, again.epochs, again.data_set) == ('ls', 2e-3, 1, 'DEMO')
    assert (out / 'summary.csv').read_text().splitlines()[0].startswith('epoch,')
    capsys.readouterr()
    # auto-resume with another loss and epoch count: refused, naming each argument, nothing appended
    assert cli(base + ['--epochs', '2', '--loss', 'ce']) == 2
    err = capsys.readouterr().err
    assert "loss: 'ls' in the checkpoint, 'ce' now" in err and "epochs: 1 in the checkpoint, 2 now" in err
    assert '--no-auto-resume' in err and f'--resume {out / "checkpoint.pth"}' in err
    assert len((out / 'log.txt').read_text().splitlines()) == 1
    # on purpose: --resume continues it
    assert cli(base + ['--epochs', '2', '--loss', 'ls', '--resume', str(out / 'checkpoint.pth')]) == 0
    assert [json.loads(x)['epoch'] for x in (out / 'log.txt').read_text().splitlines()] == [0, 1]


def test_default_run_folder_is_never_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(TINY + ['--data-set', 'DEMO', '--epochs', '1', '--max-steps-per-epoch', '1']) == 0
    (run,) = list((tmp_path / 'output' / 'train').iterdir())
    assert run.name.endswith('-deit_demo_patch4_32-maxsup') and (run / 'checkpoint.pth').is_file()


def _grads_after(batches, accum):
    from deit.engine import LossScaler, train_one_epoch
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    start = [p.detach().clone() for p in model.parameters()]
    crit = lambda x, out, y: torch.nn.functional.cross_entropy(out, y)  # noqa: E731
    train_one_epoch(model, crit, batches, opt, torch.device('cpu'), 0, LossScaler('cpu', False), print_freq=0,
                    accum_iter=accum)
    return [s - p.detach() for s, p in zip(start, model.parameters())]  # = lr * gradient of the one step


def test_accumulation_2x32_equals_1x64():
    torch.manual_seed(1)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    one = _grads_after([(x, y)], 1)
    two = _grads_after([(x[:32], y[:32]), (x[32:], y[32:])], 2)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one, two))
    plain = _grads_after([(x[:32], y[:32]), (x[32:], y[32:])], 1)  # two steps: not the same
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one, plain))


def test_accumulation_skips_ddp_sync_on_inner_steps():
    from contextlib import contextmanager

    from deit.engine import LossScaler, train_one_epoch

    class FakeDDP(torch.nn.Linear):
        syncs_skipped = 0

        @contextmanager
        def no_sync(self):
            FakeDDP.syncs_skipped += 1
            yield

    model = FakeDDP(4, 2)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1]))] * 7
    train_one_epoch(model, lambda x, o, y: torch.nn.functional.cross_entropy(o, y), batches,
                    torch.optim.SGD(model.parameters(), lr=0.1), torch.device('cpu'), 0, LossScaler('cpu', False),
                    print_freq=0, accum_iter=3)
    assert FakeDDP.syncs_skipped == 4  # steps 0, 1, 3, 4 skip; 2, 5 and the last (6) sync and step


def test_lr_scales_with_the_effective_batch(capsys):
    args = ['--data-set', 'DEMO', '--model', 'deit_demo_patch4_32', '--input-size', '32', '--epochs', '1',
            '--warmup-epochs', '0', '--num_workers', '0', '--max-steps-per-epoch', '1', '--output_dir', '',
            '--lr', '1e-3', '--total-batch-size', '64', '--accum-iter', '2']
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert 'effective batch size 32 x 1 x 2 accumulation steps = 64; lr 0.000125' in out


def test_a_batch_on_the_command_line_overrides_the_recipes_total(tmp_path, capsys):
    args = parse_args(['-c', str(PAPER), '--batch-size', '8'])
    assert (args.batch_size, args.total_batch_size) == (8, None)
    assert parse_args(['-c', str(PAPER)]).total_batch_size == 1024  # the recipe's, when no batch is given
    with pytest.raises(SystemExit):
        parse_args(['-c', str(PAPER), '--batch-size', '8', '--total-batch-size', '64'])
    assert 'both given: choose one' in capsys.readouterr().err
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('total_batch_size: 32\n')
    out = tmp_path / 'run'
    assert cli(without(TINY, '--batch-size') + ['--data-set', 'DEMO', '-c', str(recipe), '--max-steps-per-epoch',
                                                '1', '--epochs', '1', '--output_dir', str(out)]) == 0
    assert 'effective batch size 32 x 1 = 32' in capsys.readouterr().out
    saved = yaml.safe_load((out / 'args.yaml').read_text())
    assert (saved['batch_size'], saved['total_batch_size']) == (32, 32)  # the per-process batch that ran


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        parse_args(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert text.startswith('usage: python -m deit.main [-c RECIPE.yaml] [flags]')
    assert '(default: cuda when available)' in text
    assert not re.search(r'default[^()]*\) \(default: ', text)  # "(default: x) (default: None)"


def test_val_classes_must_be_train_classes_by_name(tmp_path, capsys):
    root = make_imagefolder(tmp_path / 'data', n_classes=3, n_train=4, n_val=2)
    base = TINY + ['--data-set', 'FOLDER', '--data-path', str(root), '--epochs', '1', '--output_dir', '']
    (root / 'val' / 'class_1').rename(root / 'val' / 'class_9')  # renamed: same count, shifted labels
    assert cli(base) == 2
    err = capsys.readouterr().err
    assert "missing in val: ['class_1']" in err and "not in train: ['class_9']" in err
    shutil.rmtree(root / 'val' / 'class_9')
    assert cli(base) == 2
    assert "missing in val: ['class_1']" in capsys.readouterr().err


def test_a_first_evaluation_at_zero_top1_is_still_the_best(tmp_path, monkeypatch):
    import deit.loop
    real = deit.loop.evaluate_run
    monkeypatch.setattr(deit.loop, 'evaluate_run', lambda *a, **k: {**real(*a, **k), 'acc1': 0.0})
    out = tmp_path / 'run'
    assert cli(TINY + ['--data-set', 'DEMO', '--epochs', '1', '--max-steps-per-epoch', '1', '--output_dir',
                       str(out)]) == 0
    assert torch.load(out / 'best_checkpoint.pth', weights_only=False)['epoch'] == 0


def test_cooldown_epochs_are_refused_not_ignored(capsys):
    assert cli(TINY + ['--data-set', 'DEMO', '--epochs', '3', '--cooldown-epochs', '10']) == 2
    assert '--cooldown-epochs 10: not supported; a run trains exactly --epochs' in capsys.readouterr().err


def test_warmup_longer_than_the_run_is_refused(capsys):
    assert cli(TINY + ['--data-set', 'DEMO', '--epochs', '3', '--warmup-epochs', '3']) == 2
    assert '--warmup-epochs 3 >= --epochs 3' in capsys.readouterr().err


def test_help_is_grouped_with_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(['--help'])
    text = capsys.readouterr().out
    for group in ('model:', 'optimizer:', 'schedule:', 'augmentation:', 'loss:', 'data:', 'run:'):
        assert f'\n{group}\n' in text, group
    flat = ' '.join(text.split())
    assert '(default: 0.99996)' in flat and '(default: maxsup)' in flat
    # every flag has help text
    from deit.args import get_args_parser
    assert all(a.help for a in get_args_parser()._actions)


def test_segmentation_without_its_stack_says_how_to_install(monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, 'mmseg', None)  # as if mmseg were not installed
    from segmentation import train
    with pytest.raises(SystemExit, match='make setup-seg'):
        train.main(['--help'])


def test_bce_loss_is_on_the_mixed_label_set():
    from deit.baselines import BCEOnMixedLabels
    z = torch.randn(4, 5)
    soft = torch.tensor([[0.6, 0.4, 0, 0, 0]] * 4)
    want = torch.nn.functional.binary_cross_entropy_with_logits(z, torch.tensor([[1., 1, 0, 0, 0]] * 4))
    assert torch.allclose(BCEOnMixedLabels()(z, soft), want)
    hard = torch.tensor([0, 1, 2, 3])
    assert torch.allclose(BCEOnMixedLabels()(z, hard),
                          torch.nn.functional.binary_cross_entropy_with_logits(z, torch.eye(5)[hard]))


def test_pip_install_puts_no_generic_top_level_modules():
    import tomllib
    cfg = tomllib.loads((ROOT / 'pyproject.toml').read_text())
    assert cfg['tool']['setuptools']['packages'] == []  # data/ and tools/ would collide in site-packages


def test_class_map_prints_the_permutation(tmp_path, capsys):
    from data.class_map import main
    for c in ('n02', 'n01'):
        (tmp_path / 'train' / c).mkdir(parents=True)
    (tmp_path / 'map.txt').write_text('n02/a.JPEG\t0\nn01/b.JPEG\t1\n')
    assert main(['--map', str(tmp_path / 'map.txt'), '--imagefolder', str(tmp_path / 'train')]) == 0
    out = capsys.readouterr().out
    assert 'zip 0 -> folder 1' in out and 'zip 1 -> folder 0' in out


def test_every_recipe_file_parses_and_passes_the_checks():
    """recipes/*.yaml are deit.main recipes (the catalogue of results beside them is read by tools.reproduce)."""
    from deit.args import check_args
    files = sorted(p for p in (ROOT / 'recipes').glob('*.yaml') if p.name != 'catalogue.yaml')
    assert len(files) >= 8
    for path in files:
        args = parse_args(['-c', str(path), '--data-path', '/data'])
        assert check_args(args) is None, path.name
