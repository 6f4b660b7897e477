"""CIFAR-10 / CIFAR-100 from the official python-pickle archives, their long-tailed subsets, and CIFAR-10-C.

On-disk layouts, as the official archives unpack (``--data-path`` may name the folder or its parent):

    cifar-10-batches-py/   data_batch_1 .. data_batch_5, test_batch   (pickled dicts: b'data' N x 3072 uint8,
                                                                         the R, G and B planes of each 32x32
                                                                         image in turn; b'labels')
    cifar-100-python/      train, test                                  (the same, labels under b'fine_labels')
    CIFAR-10-C/            <corruption>.npy (N x 32 x 32 x 3 uint8: severities 1..5 one after another),
                           labels.npy                                   (Hendrycks & Dietterich, ICLR 2019)

Long-tailed CIFAR (Cao et al., NeurIPS 2019, as the official long-tailed experiment builds it): class ``c``
of ``K`` keeps ``int(n_max * (1 / ratio) ** (c / (K - 1)))`` training images, drawn by a per-class shuffle
of one seeded numpy stream (seed 0); the test set stays balanced.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ARCHIVES = {  # name -> (folder, train files, test files, label key)
    'CIFAR10': ('cifar-10-batches-py', tuple(f'data_batch_{i}' for i in range(1, 6)), ('test_batch',), b'labels'),
    'CIFAR100': ('cifar-100-python', ('train',), ('test',), b'fine_labels'),
}
CORRUPTIONS_FOLDER = 'CIFAR-10-C'
IMBALANCE_RATIO = 100.0  # largest / smallest class: the harder of the official long-tailed table's two


def archive_folder(root: str | Path, name: str) -> Path | None:
    """The unpacked archive of ``name`` at ``root`` or just below it, or None (another layout)."""
    folder, train_files, _, _ = ARCHIVES[name]
    for candidate in (Path(root) / folder, Path(root)):
        if (candidate / train_files[0]).is_file():
            return candidate
    return None


def read_cifar(root: str | Path, name: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 32 x 32 x 3 uint8, labels N int64) of a split; errors name the file and what is wrong."""
    folder = archive_folder(root, name)
    if folder is None:
        raise FileNotFoundError(f'no {ARCHIVES[name][0]}/ archive (python version) under {root}')
    _, train_files, test_files, key = ARCHIVES[name]
    images, labels = [], []
    for file in train_files if train else test_files:
        path = folder / file
        try:
            with open(path, 'rb') as f:
                batch = pickle.load(f, encoding='bytes')
        except FileNotFoundError:
            raise FileNotFoundError(f'{path}: missing from the archive') from None
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise ValueError(f'{path}: not a CIFAR pickle batch ({e})') from None
        if not isinstance(batch, dict) or b'data' not in batch or key not in batch:
            raise ValueError(f'{path}: a CIFAR batch holds b"data" and {key!r}; found {sorted(batch)[:6]}')
        data = np.asarray(batch[b'data'], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch[key]):
            raise ValueError(f'{path}: b"data" is {data.shape} with {len(batch[key])} labels; expected N x 3072')
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def long_tailed_counts(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """Training images kept per class: ``int(n_max * (1 / ratio) ** (c / (K - 1)))`` for class c."""
    if ratio < 1:
        raise ValueError(f'the imbalance ratio (largest / smallest class) must be >= 1, got {ratio}')
    return [int(n_max * (1 / ratio) ** (c / (num_classes - 1))) for c in range(num_classes)]


def long_tailed_indices(labels: np.ndarray, ratio: float, seed: int = 0) -> np.ndarray:
    """Indices of the long-tailed subset of a balanced training set (class order 0..K-1 from head to tail)."""
    num_classes = int(labels.max()) + 1
    counts = long_tailed_counts(len(labels) // num_classes, num_classes, ratio)
    rng = np.random.RandomState(seed)
    keep = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        keep.append(idx[:n])
    return np.concatenate(keep)


class StackedArrays:
    """Arrays of equal row shape read as one, row by row, without a copy (memory maps stay maps: CIFAR-10-C's
    19 corruptions are 2.9 GB)."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.starts[-1]), *arrays[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.starts, i, side='right')) - 1
        return self.arrays[k][i - self.starts[k]]


def read_corruptions(root: str | Path) -> tuple[StackedArrays, np.ndarray, list[str]]:
    """Every corruption of CIFAR-10-C (memory-mapped), its labels repeated per corruption, and the names."""
    folder = Path(root) / CORRUPTIONS_FOLDER if (Path(root) / CORRUPTIONS_FOLDER).is_dir() else Path(root)
    labels_path = folder / 'labels.npy'
    if not labels_path.is_file():
        raise FileNotFoundError(f'no {CORRUPTIONS_FOLDER}/labels.npy under {root}')
    labels = np.load(labels_path).astype(np.int64)
    names = sorted(p.stem for p in folder.glob('*.npy') if p.stem != 'labels')
    if not names:
        raise FileNotFoundError(f'{folder}: no <corruption>.npy files beside labels.npy')
    arrays = []
    for name in names:
        images = np.load(folder / f'{name}.npy', mmap_mode='r')
        if images.shape[1:] != (32, 32, 3) or len(images) != len(labels) or images.dtype != np.uint8:
            raise ValueError(f'{folder / name}.npy: {images.shape} {images.dtype}; expected {len(labels)} x 32 x 32 '
                             f'x 3 uint8, as labels.npy')
        arrays.append(images)
    return StackedArrays(arrays), np.tile(labels, len(names)), names


class ArrayImageDataset(torch.utils.data.Dataset):
    """(transform(PIL image), label) from uint8 images N x H x W x 3 (an array or :class:`StackedArrays`);
    ``class_counts``: images per class."""

    def __init__(self, images: np.ndarray | StackedArrays, labels: np.ndarray, num_classes: int, transform=None):
        self.images, self.labels, self.transform = images, labels, transform
        self.targets = labels.tolist()
        self.classes = [str(c) for c in range(num_classes)]
        self.class_counts = np.bincount(labels, minlength=num_classes).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(np.asarray(self.images[i]))
        return (self.transform(img) if self.transform is not None else img), int(self.labels[i])
