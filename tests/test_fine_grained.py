"""CUB-200-2011 and Stanford Cars, written here in their official layouts (CUB's id tables, the Cars devkit's
MATLAB annotation structs), read and trained on through deit.main."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.io

from data.fine_grained import cars_samples, cub_samples
from deit.main import cli
from tests.conftest import TINY, make_image


def write_cub(root, classes: int = 3, per_class: int = 6):
    """CUB_200_2011/ as released: images.txt, image_class_labels.txt, train_test_split.txt, images/."""
    base = root / 'CUB_200_2011'
    images, labels, split = [], [], []
    image_id = 0
    for c in range(classes):
        folder = f'{c + 1:03d}.Bird_{c}'
        (base / 'images' / folder).mkdir(parents=True)
        for i in range(per_class):
            image_id += 1
            name = f'{folder}/Bird_{c}_{i:04d}.jpg'
            make_image(c, i).save(base / 'images' / name, quality=90)
            images.append(f'{image_id} {name}')
            labels.append(f'{image_id} {c + 1}')
            split.append(f'{image_id} {int(i < per_class - 2)}')
    for file, lines in (('images.txt', images), ('image_class_labels.txt', labels), ('train_test_split.txt', split)):
        (base / file).write_text('\n'.join(lines) + '\n')
    return base


def write_cars(root, classes: int = 3, per_class: int = 5):
    """stanford_cars/ as the devkit and torchvision lay it out: MATLAB struct arrays of annotations."""
    base = root / 'stanford_cars'
    (base / 'devkit').mkdir(parents=True)
    fields = [('bbox_x1', 'O'), ('bbox_y1', 'O'), ('bbox_x2', 'O'), ('bbox_y2', 'O'), ('class', 'O'), ('fname', 'O')]
    for split, mat in (('train', base / 'devkit' / 'cars_train_annos.mat'),
                       ('test', base / 'cars_test_annos_withlabels.mat')):
        (base / f'cars_{split}').mkdir()
        rows = []
        for c in range(classes):
            for i in range(per_class if split == 'train' else 2):
                fname = f'{len(rows) + 1:05d}.jpg'
                make_image(c, i + 10 * (split == 'test')).save(base / f'cars_{split}' / fname, quality=90)
                rows.append((1, 1, 31, 31, c + 1, fname))
        scipy.io.savemat(str(mat), {'annotations': np.array(rows, dtype=fields).reshape(1, -1)})
    scipy.io.savemat(str(base / 'devkit' / 'cars_meta.mat'),
                     {'class_names': np.array([[f'Car {c}' for c in range(classes)]], dtype=object)})
    return base


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
