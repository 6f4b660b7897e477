"""The catalogue of reproducible results (tools.reproduce): every entry resolves to a configuration, and one
entry per data format trains one CPU epoch through the launcher and prints measured beside reported."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
import yaml

from deit.recipes import parse_args
from tests.conftest import ROOT, make_imagefolder, run_module
from tests.data_formats import write_cars, write_cifar10, write_cifar100, write_cub
from tools.reproduce import comparison, load_catalogue, main

SMALL = ['--epochs', '1', '--warmup-epochs', '0', '--batch-size', '8', '--num_workers', '0', '--no-pin-mem',
         '--print-freq', '0']


def test_the_list_and_the_ids(capsys):
    entries = load_catalogue()
    assert main(['--list', '--ids']) == 0
    assert capsys.readouterr().out.split() == list(entries)
    assert main(['--list']) == 0
    out = capsys.readouterr().out
    assert all(f'python -m tools.reproduce {i} --data-path PATH' in out for i in entries)
    assert 'reported: test_acc1 81.4, test_many_acc1 82.3, test_medium_acc1 73.4' in out  # the README's LT row
    assert main(['no-such-id']) == 2 and 'unknown id' in capsys.readouterr().err


@pytest.mark.parametrize('entry_id', list(load_catalogue()))
def test_every_entry_resolves_with_dry_run(entry_id, capsys):
    entry = load_catalogue()[entry_id]
    assert main([entry_id, '--dry-run', '--data-path', '/data']) == 0
    out = capsys.readouterr().out
    then = 'then: python -m tools.analyze ' + ' '.join(entry['analysis']) if 'analysis' in entry else 'then:'
    assert out.rstrip().endswith(then) == ('analysis' in entry) and out.count('then:') == ('analysis' in entry)
    command, config = out.removesuffix(then + '\n').split('\n', 1)
    assert command.startswith('scripts/train_with_MaxSup.sh -c ') and entry_id in command
    config = yaml.safe_load(config)
    recipe = yaml.safe_load((ROOT / entry['recipe']).read_text())
    flags = entry.get('flags', [])
    model = flags[flags.index('--model') + 1] if '--model' in flags else recipe['model']
    assert config['model'] == model and config['data_path'] == '/data'
    assert config['loss'] == flags[flags.index('--loss') + 1]
    assert parse_args(['-c', str(ROOT / entry['recipe']), *map(str, flags)]).epochs == recipe['epochs']


def test_the_catalogue_names_bad_entries(tmp_path):
    bad = tmp_path / 'c.yaml'
    bad.write_text('entries:\n  - {id: a, source: s, row: r, reported: {test_acc1: 1}, recipe: x, data: d}\n'
                   '  - {id: a, source: s, row: r, reported: {test_acc1: 1}, recipe: x, data: d}\n  - {id: b}\n')
    with pytest.raises(ValueError, match='id a is given twice'):
        load_catalogue(bad)
    bad.write_text('entries:\n  - {id: b, source: s}\n')
    with pytest.raises(ValueError, match=r"entry 1 \(b\) lacks \['data', 'recipe', 'reported', 'row'\]"):
        load_catalogue(bad)


@pytest.mark.parametrize('entry_id, write, shrink', [
    ('lt-cifar10-r50-maxsup', lambda root: write_cifar10(root, per_class_train=200), []),  # many, medium and few
    ('cifar10c-resnet50-ls', write_cifar10, ['--model', 'resnet32_cifar']),
    ('cub-resnet50-maxsup', write_cub, ['--model', 'resnet18', '--input-size', '32']),
    ('cars-resnet50-zipf', write_cars, ['--model', 'resnet18', '--input-size', '32']),
    ('cifar100-mobilenetv2-maxsup', write_cifar100, [])])
def test_one_epoch_per_data_format_through_the_launcher(entry_id, write, shrink, tmp_path):
    write(tmp_path / 'data')
    if entry_id.startswith('cifar10c'):  # CIFAR-10-C beside the archive: 2 corruptions of the 30 test images
        folder = tmp_path / 'data' / 'CIFAR-10-C'
        folder.mkdir()
        np.save(folder / 'labels.npy', np.repeat(np.arange(10), 3).astype(np.uint8))
        for name in ('fog', 'snow'):
            np.save(folder / f'{name}.npy', np.random.default_rng(2).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8))
    r = run_module(['-m', 'tools.reproduce', entry_id, '--data-path', str(tmp_path / 'data'), '--output-dir',
                    str(tmp_path / 'run'), '--', *SMALL, *shrink], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    reported = load_catalogue()[entry_id]['reported']
    summary = r.stdout[r.stdout.index(f'{entry_id} ('):]
    assert all(f'reported {v:g}' in summary for v in reported.values()) and 'measured        -' not in summary


def test_entries_without_a_filed_number_say_why_and_print_what_they_measured(capsys):
    entries = load_catalogue()
    unfiled = [e for e in entries.values() if not e['reported']]
    assert {e['source'] for e in unfiled} >= {'paper, Table 4 (ImageNet)', 'paper, Table 4 (CIFAR-100)'}
    assert main(['--list']) == 0
    out = capsys.readouterr().out
    assert all(f'{e["id"]}\n  {e["source"]}: {e["row"]}\n  reported: - ({e["note"]})' in out for e in unfiled)
    assert comparison(unfiled[0], {'test_acc1': 71.25}) == [
        '  test_acc1          measured    71.25   reported not filed']


@pytest.fixture(scope='module')
def released_resnet50(tmp_path_factory):
    """The ResNet-50 release's form: torchvision's resnet50 state_dict (a small head here)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('release') / 'resnet50_maxsup.pth'
    torch.save(torchvision.models.resnet50(num_classes=4).state_dict(), path)
    return path


def test_feature_entry_analyses_a_given_checkpoint(released_resnet50, tmp_path, capsys):
    data = make_imagefolder(tmp_path / 'imagenet')
    out = tmp_path / 'run'
    assert main(['features-resnet50-maxsup', '--checkpoint', str(released_resnet50), '--data-path', str(data),
                 '--output-dir', str(out), '--', '--max-samples', '8', '--input-size', '64', '--num-workers', '0']) == 0
    table = json.loads((out / 'analysis' / 'features' / 'features.json').read_text())['features-resnet50-maxsup']
    summary = capsys.readouterr().out.split('features-resnet50-maxsup (official README, Table 1')[1]
    for split in ('train', 'val'):
        for metric, reported in (('d_within', {'train': 0.2926, 'val': 0.2998}), ('r2', {'train': 0.5188,
                                                                                         'val': 0.4972})):
            line = f'  {metric + "_" + split:18s} measured {table[split][metric]:>8.4g}   reported {reported[split]:g}'
            assert line in summary, summary
    assert not (out / 'log.txt').exists()  # no training


def test_transfer_entry_probes_the_cifar10_archive(released_resnet50, tmp_path, capsys):
    write_cifar10(tmp_path / 'cifar')
    out = tmp_path / 'run'
    assert main(['transfer-resnet50-ls', '--checkpoint', str(released_resnet50), '--transfer-data',
                 str(tmp_path / 'cifar'), '--output-dir', str(out), '--', '--input-size', '32',
                 '--num-workers', '0']) == 0
    probe = json.loads((out / 'analysis' / 'transfer' / 'transfer.json').read_text())['transfer-resnet50-ls']
    assert probe['test_accuracy'] * 30 == pytest.approx(round(probe['test_accuracy'] * 30))  # of 30 test images
    assert (f'  transfer_acc1      measured {100 * probe["test_accuracy"]:>8.4g}   reported 74.58'
            in capsys.readouterr().out)


def test_checkpoint_is_refused_for_an_entry_that_trains(released_resnet50, capsys):
    assert main(['cub-resnet50-ls', '--checkpoint', str(released_resnet50)]) == 2
    assert '--checkpoint is for analysis entries' in capsys.readouterr().err


def test_figure_entry_draws_the_checkpoints_it_is_given_side_by_side(released_resnet50, tmp_path, capsys):
    data = make_imagefolder(tmp_path / 'imagenet')
    out = tmp_path / 'run'
    assert main(['figure-logits-resnet50', '--data-path', str(data), '--output-dir', str(out)]) == 2
    assert 'give them with --checkpoint NAME=CK' in capsys.readouterr().err
    assert main(['figure-logits-resnet50', '--checkpoint', f'maxsup={released_resnet50}', f'ls={released_resnet50}',
                 '--data-path', str(data), '--output-dir', str(out), '--', '--max-samples', '8', '--input-size', '64',
                 '--num-workers', '0']) == 0
    stats = json.loads((out / 'analysis' / 'logits' / 'logits.json').read_text())
    assert sorted(stats) == ['ls', 'maxsup'] and (out / 'analysis' / 'logits' / 'logits.png').stat().st_size > 0
    assert stats['ls']['threshold'] == 0.001  # the entry's threshold, the official notebook's
    assert f'figure-logits-resnet50 (official README, Figure 3 (logit distribution, LS vs MaxSup)): {out}' in (
        capsys.readouterr().out)
    assert main(['features-resnet50-ls', '--checkpoint', 'a.pth', 'b.pth']) == 2
    assert 'measures one model: give one --checkpoint' in capsys.readouterr().err
