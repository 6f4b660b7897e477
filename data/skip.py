"""The ``--skip-bad-images`` contract, shared by the datasets and the loaders' collate functions: an unreadable
image is an error naming it, or (skipping) ``None``, which the collate step drops and the dataset counts.
Never is another image substituted.
"""
from __future__ import annotations

import multiprocessing as mp

import torch

from data.decode import CorruptImageError, decode_image, read_image_file


class SkipCounter:
    """The ``--skip-bad-images`` contract of the datasets: an unreadable image is an error naming it, or
    (``skip_bad``) ``None`` for collate_skip_bad to drop, counted across DataLoader workers (a shared
    mp.Value). Never is another image substituted."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.skipped = mp.Value('q', 0) if skip_bad else None

    def count_skip(self) -> None:
        with self.skipped.get_lock():
            self.skipped.value += 1

    @property
    def lazy_decode(self) -> bool:
        """The transform decodes (``--jpeg-draft``: it picks the DCT scale from its crop), so JPEGs are only
        opened here; a decode error then surfaces inside the transform, still as CorruptImageError."""
        return getattr(self.transform, 'decodes_lazily', False)

    def _sample(self, load, target: int):
        """(transform(load()), target), or None for an unreadable image when skipping."""
        try:
            img = load()
            return (self.transform(img) if self.transform is not None else img), target
        except CorruptImageError:
            if not self.skip_bad:
                raise
            self.count_skip()
            return None

    def _sample_file(self, path: str, target: int):
        """:meth:`_sample` of an image file (the folder-like sets: ImageFolder, CUB, Cars)."""
        return self._sample(lambda: decode_image(read_image_file(path), path, lazy=self.lazy_decode), target)

    def pop_skipped(self) -> int:
        """Images skipped since the last call (all workers together)."""
        if self.skipped is None:
            return 0
        with self.skipped.get_lock():
            n, self.skipped.value = self.skipped.value, 0
        return n


def kept_count(kept: int, size: int, keep_even: bool = True) -> int:
    """How many of the ``kept`` readable samples of a batch of ``size`` to use. ``keep_even`` (training):
    keep the batch even (timm's Mixup needs pairs) by dropping the last sample when a skip made it odd.
    Evaluation passes False: every readable image is counted."""
    return kept - 1 if keep_even and kept != size and kept % 2 and size % 2 == 0 else kept


def drop_skipped(batch: list, keep_even: bool = True) -> list:
    """The samples of ``batch`` a skip_bad dataset did not return as None (see :func:`kept_count`)."""
    kept = [b for b in batch if b is not None]
    return kept[:kept_count(len(kept), len(batch), keep_even)]


def collate_skip_bad(batch, keep_even: bool = True):
    """default_collate of :func:`drop_skipped`'s samples."""
    kept = drop_skipped(batch, keep_even)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.utils.data.default_collate(kept)
