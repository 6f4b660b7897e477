"""The fine-grained sets of the official README, from their official layouts.

CUB-200-2011 (``--data-path`` names ``CUB_200_2011/`` or its parent)::

    images.txt                <id> <class folder>/<file>.jpg
    image_class_labels.txt    <id> <class 1..200>
    train_test_split.txt      <id> <1: train, 0: test>
    images/<class folder>/<file>.jpg

Stanford Cars (the devkit's MATLAB annotations, as torchvision lays them out; ``--data-path`` names
``stanford_cars/`` or its parent)::

    devkit/cars_train_annos.mat           struct array ``annotations``: fname, class (1..196), bbox_*
    cars_test_annos_withlabels.mat        the same for the test images
    cars_train/<fname>  cars_test/<fname>
"""
from __future__ import annotations

from pathlib import Path

import scipy.io
import torch

from data.skip import SkipCounter

CUB_CLASSES, CARS_CLASSES = 200, 196


def _root(root: str | Path, folder: str, marker: str) -> Path:
    for candidate in (Path(root) / folder, Path(root)):
        if (candidate / marker).exists():
            return candidate
    raise FileNotFoundError(f'no {folder}/{marker} under {root} (the official layout: see data/fine_grained.py)')


def _table(path: Path, columns: int = 2) -> dict[str, list[str]]:
    """``<id> <value> ...`` lines of a CUB metadata file, by id; errors name the file and line."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != columns:
            raise ValueError(f'{path}:{n}: expected {columns} fields, got {line!r}')
        out[parts[0]] = parts[1:]
    return out


def cub_samples(root: str | Path, train: bool) -> list[tuple[str, int]]:
    """(image path, label 0..199) of CUB-200-2011's official train or test split."""
    base = _root(root, 'CUB_200_2011', 'images.txt')
    images = _table(base / 'images.txt')
    labels = _table(base / 'image_class_labels.txt')
    split = _table(base / 'train_test_split.txt')
    wanted = '1' if train else '0'
    samples = []
    for image_id, (rel,) in images.items():
        if image_id not in labels or image_id not in split:
            raise ValueError(f'{base}: image {image_id} ({rel}) has no label or no split entry')
        if split[image_id][0] == wanted:
            label = int(labels[image_id][0]) - 1
            if not 0 <= label < CUB_CLASSES:
                raise ValueError(f'{base / "image_class_labels.txt"}: image {image_id} has class {label + 1}, '
                                 f'outside 1..{CUB_CLASSES}')
            samples.append((str(base / 'images' / rel), label))
    return samples


def cars_samples(root: str | Path, train: bool) -> list[tuple[str, int]]:
    """(image path, label 0..195) of Stanford Cars' train or test split, from the devkit annotations."""
    base = _root(root, 'stanford_cars', 'devkit')
    mat = base / 'devkit' / 'cars_train_annos.mat' if train else base / 'cars_test_annos_withlabels.mat'
    folder = base / ('cars_train' if train else 'cars_test')
    if not mat.is_file():
        raise FileNotFoundError(f'{mat}: missing (the devkit annotations of the {"train" if train else "test"} split)')
    try:
        annotations = scipy.io.loadmat(str(mat), squeeze_me=True)['annotations']
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{mat}: not a Stanford Cars annotation file ({e})') from None
    samples = []
    for a in annotations.reshape(-1):
        label = int(a['class']) - 1
        if not 0 <= label < CARS_CLASSES:
            raise ValueError(f'{mat}: {a["fname"]} has class {label + 1}, outside 1..{CARS_CLASSES}')
        samples.append((str(folder / str(a['fname'])), label))
    return samples


class ImageListDataset(SkipCounter, torch.utils.data.Dataset):
    """(transform(image), label) from (path, label) pairs, with the skip contract of the other sets."""

    def __init__(self, samples: list[tuple[str, int]], num_classes: int, transform=None, skip_bad: bool = False):
        self.samples, self.transform = samples, transform
        self.targets = [label for _, label in samples]
        self.classes = [str(c) for c in range(num_classes)]
        SkipCounter.__init__(self, skip_bad)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self._sample_file(*self.samples[i])
