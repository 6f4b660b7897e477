"""Small copies of outside data sets in their real on-disk formats, written the way their releases lay them
out: the CIFAR-10 and CIFAR-100 python archives, CUB-200-2011's tables and the Stanford Cars devkit's MATLAB
annotations."""
from __future__ import annotations

import pickle

import numpy as np
import scipy.io

from tests.conftest import make_image


def write_cifar10(root, per_class_train: int = 10, per_class_test: int = 3):
    """cifar-10-batches-py/ as the official archive unpacks: five training batches and a test batch, each a
    pickled dict with bytes keys (b'data': N x 3072 uint8 as R, G, B planes; b'labels'; b'filenames')."""
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(labels, name):
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / name, 'wb') as f:
            pickle.dump({b'batch_label': name.encode(), b'labels': list(labels), b'data': data,
                         b'filenames': [f'{i}.png'.encode() for i in range(len(labels))]}, f, protocol=2)
        return data

    train = np.repeat(np.arange(10), per_class_train)
    rng.shuffle(train)
    for i, part in enumerate(np.array_split(train, 5), 1):
        batch(part.tolist(), f'data_batch_{i}')
    first_test = batch(np.repeat(np.arange(10), per_class_test).tolist(), 'test_batch')
    return first_test


def write_cifar100(root, per_class_train: int = 1, per_class_test: int = 1):
    """cifar-100-python/ as the official archive unpacks: one pickled dict each for train and test, labels under
    b'fine_labels' (and the 20 superclasses under b'coarse_labels'), plus the meta file with the names."""
    folder = root / 'cifar-100-python'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per_class in (('train', per_class_train), ('test', per_class_test)):
        labels = np.repeat(np.arange(100), per_class)
        with open(folder / name, 'wb') as f:
            pickle.dump({b'filenames': [f'{i}.png'.encode() for i in range(len(labels))],
                         b'batch_label': f'{name}ing batch 1 of 1'.encode(), b'fine_labels': labels.tolist(),
                         b'coarse_labels': (labels // 5).tolist(),
                         b'data': rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)}, f, protocol=2)
    with open(folder / 'meta', 'wb') as f:
        pickle.dump({b'fine_label_names': [f'class_{c}'.encode() for c in range(100)],
                     b'coarse_label_names': [f'super_{c}'.encode() for c in range(20)]}, f, protocol=2)


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
