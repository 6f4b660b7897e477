"""CUB-200-2011 and Stanford Cars, written here in their official layouts (CUB's id tables, the Cars devkit's
MATLAB annotation structs), read and trained on through deit.main."""
from __future__ import annotations

import json

import pytest

from data.fine_grained import cars_samples, cub_samples
from deit.main import cli
from tests.conftest import TINY
from tests.data_formats import write_cars, write_cub


def test_cub_splits_follow_the_official_tables(tmp_path):
    base = write_cub(tmp_path)
    train, test = cub_samples(tmp_path, True), cub_samples(base, False)  # the parent or the folder itself
    assert len(train) == 12 and len(test) == 6
    assert train[0] == (str(base / 'images' / '001.Bird_0' / 'Bird_0_0000.jpg'), 0) and test[-1][1] == 2
    (base / 'train_test_split.txt').write_text('1 1\n2\n')
    with pytest.raises(ValueError, match=r'train_test_split.txt:2: expected 2 fields'):
        cub_samples(tmp_path, True)
    (base / 'train_test_split.txt').write_text('1 1\n')
    with pytest.raises(ValueError, match='image 2 .* has no label or no split entry'):
        cub_samples(tmp_path, True)


def test_cars_splits_come_from_the_devkit_annotations(tmp_path):
    base = write_cars(tmp_path)
    train, test = cars_samples(tmp_path, True), cars_samples(base, False)
    assert len(train) == 15 and len(test) == 6
    assert train[0] == (str(base / 'cars_train' / '00001.jpg'), 0)
    assert test[-1] == (str(base / 'cars_test' / '00006.jpg'), 2)
    (base / 'cars_test_annos_withlabels.mat').unlink()
    with pytest.raises(FileNotFoundError, match='cars_test_annos_withlabels.mat: missing'):
        cars_samples(tmp_path, False)


@pytest.mark.parametrize('name, write', [('CUB', write_cub), ('CARS', write_cars)])
def test_fine_grained_sets_train_one_epoch(name, write, tmp_path):
    write(tmp_path / 'data')
    out = tmp_path / 'run'
    assert cli(TINY + ['--data-set', name, '--data-path', str(tmp_path / 'data'), '--epochs', '1', '--batch-size', '4',
                       '--output_dir', str(out)]) == 0
    log = json.loads((out / 'log.txt').read_text())
    assert log['test_n'] == 6 and log['train_loss'] > 0
