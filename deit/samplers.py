"""Samplers for distributed training and exact distributed evaluation; per-sample seeds for augmentation."""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info


class RASampler(Sampler):
    """Repeated-augmentation sampler (Hoffer et al. 2020; DeiT's RASampler, reseedable).

    Each epoch: shuffle the dataset with ``seed + epoch``, repeat every index ``num_repeats`` times
    consecutively, and deal the list round-robin to ranks, so the copies of one sample land on different
    ranks (different augmentations) and the ranks' shards are disjoint positions of one list. As in DeiT,
    each rank then keeps only ``floor(N / 256) * 256 / world`` indices so an epoch has as many steps as
    without repetition (``selected_round=0`` keeps ``ceil(N / world)``).
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 num_repeats: int = 3, seed: int = 0, selected_round: int = 256):
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} outside [0, {num_replicas})')
        if num_repeats < 1:
            raise ValueError(f'num_repeats must be >= 1, got {num_repeats}')
        self.n = len(dataset)
        self.num_replicas, self.rank, self.shuffle = num_replicas, rank, shuffle
        self.num_repeats, self.seed, self.epoch = int(num_repeats), int(seed), 0
        self.num_samples = math.ceil(self.n * self.num_repeats / num_replicas)
        self.total_size = self.num_samples * num_replicas
        if selected_round and self.n >= selected_round:
            self.num_selected = self.n // selected_round * selected_round // num_replicas
        else:
            self.num_selected = math.ceil(self.n / num_replicas)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.n, generator=g)
        else:
            indices = torch.arange(self.n)
        indices = indices.repeat_interleave(self.num_repeats).tolist()
        indices += indices[:self.total_size - len(indices)]  # pad so every rank has num_samples
        return iter(indices[self.rank:self.total_size:self.num_replicas][:self.num_selected])

    def __len__(self) -> int:
        return self.num_selected

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class DistributedEvalSampler(Sampler):
    """Rank r sees indices r, r + world, r + 2*world, ...: no padding, no duplicates.

    torch's DistributedSampler pads the last batch with repeated samples, which biases accuracy (DeiT warns
    about it). Unpadded shards have unequal lengths, so evaluation must all-reduce *sums* (correct counts,
    loss sums, sample counts), never per-rank means. Every sample is seen exactly once over all ranks.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        self.n, self.num_replicas, self.rank = len(dataset), num_replicas, rank

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


class SeededSampler(Sampler):
    """Wraps a training sampler: yields ``(index, seed)``, the seed a function of (run seed, epoch, rank, the
    sample's position in this rank's epoch) only, for :class:`SeededDataset` to seed the augmentation with.

    Without it each DataLoader worker draws from its own stream, which depends on how many workers there are,
    on ``persistent_workers`` keeping streams across epochs, and on where a resumed run starts: a requeued run
    drew other crops and flips than the uninterrupted one. With it the draws of every sample are fixed by its
    position, so any worker count, a resume at an epoch boundary, and :meth:`skip` (a resume in the middle of
    an epoch) give the augmentations of the uninterrupted run.
    """

    def __init__(self, sampler, seed: int, rank: int = 0):
        self.sampler, self.seed, self.rank, self.epoch, self._skip = sampler, int(seed), int(rank), 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def skip(self, n: int) -> None:
        """Leave out the first ``n`` samples of the next epoch's order (they were trained before a requeue)."""
        self._skip = int(n)

    def __iter__(self):
        base = int(np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1, np.uint64)[0])
        start, self._skip = self._skip, 0
        positions = itertools.count(start)
        return ((i, (base, p)) for i, p in zip(itertools.islice(iter(self.sampler), start, None), positions))

    def __len__(self) -> int:
        return max(len(self.sampler) - self._skip, 0)


class SeededDataset(Dataset):
    """Wraps a dataset for :class:`SeededSampler`: seeds python's ``random``, numpy and torch from the sample's
    seed, then returns ``dataset[index]`` (timm's transforms draw from all three).

    In a DataLoader worker the seeded streams simply move on. Without workers the transforms run in the
    training process, whose streams (dropout, Mixup, random erasing) are saved and restored around the sample,
    so loading leaves them as they were."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, (base, position) = item
        seed = splitmix64(base + position)
        seed = (seed, splitmix64(seed))
        if get_worker_info() is not None:
            return self._seeded(index, seed)
        states = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            return self._seeded(index, seed)
        finally:
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])

    def _seeded(self, index, seed):
        torch.random.default_generator.manual_seed(seed[0])  # the CPU generator only: workers have no GPU
        random.seed(seed[1])
        np.random.seed(seed[1] & 0xFFFFFFFF)
        return self.dataset[index]


def splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al. 2014): consecutive inputs give well-mixed, independent-looking
    64-bit seeds, ~1 us in Python where numpy's SeedSequence takes ~17 us (per sample, in every worker)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


_MASK64 = (1 << 64) - 1
