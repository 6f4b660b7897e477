"""The catalogue of reproducible results (tools.reproduce): every entry resolves to a configuration, and one
entry per data format trains one CPU epoch through the launcher and prints measured beside reported."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from deit.recipes import parse_args
from tests.conftest import ROOT, run_module
from tests.data_formats import write_cars, write_cifar10, write_cub
from tools.reproduce import load_catalogue, main

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
    command, config = capsys.readouterr().out.split('\n', 1)
    assert command.startswith('scripts/train_with_MaxSup.sh -c ') and entry_id in command
    config = yaml.safe_load(config)
    recipe = yaml.safe_load((ROOT / entry['recipe']).read_text())
    flags = entry.get('flags', [])
    assert config['model'] == recipe['model'] and config['data_path'] == '/data'
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
    ('cars-resnet50-zipf', write_cars, ['--model', 'resnet18', '--input-size', '32'])])
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
