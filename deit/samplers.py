"""Samplers for distributed training and exact distributed evaluation."""
from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


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
