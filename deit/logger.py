"""DeiT-style MetricLogger: smoothed meters, periodic lines with throughput (img/s) and ETA."""
from __future__ import annotations

import datetime
import itertools
import time
from collections import defaultdict, deque

import torch

from deit.distributed import all_reduce_sum, is_dist


class SmoothedValue:
    """Window median/avg for display plus an exact global average (sum/count) for the epoch."""

    def __init__(self, window_size: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})'):
        self.deque, self.total, self.count, self.fmt = deque(maxlen=window_size), 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        if not is_dist():
            return
        t = all_reduce_sum(torch.tensor([self.count, self.total], dtype=torch.float64))
        self.count, self.total = int(t[0]), float(t[1])

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median()) if self.deque else float('nan')

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else float('nan')

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    def __init__(self, delimiter: str = '  '):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n: int = 1, **kwargs) -> None:
        for k, v in kwargs.items():
            self.meters[k].update(float(v), n)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def synchronize_between_processes(self) -> None:
        for m in self.meters.values():
            m.synchronize_between_processes()

    def __str__(self) -> str:
        return self.delimiter.join(f'{k}: {m}' for k, m in self.meters.items())

    def log_every(self, iterable, print_freq: int, header: str = '', batch_size_fn=None, start: int = 0,
                  total: int | None = None):
        """Yield from iterable; every print_freq steps print meters, img/s, data/step time and ETA.

        Steps are numbered from ``start`` (a resumed epoch) up to ``total`` (default: start + len(iterable));
        iteration ends there (e.g. ``--max-steps-per-epoch``), so the progress line counts the steps that run."""
        total = start + len(iterable) if total is None else total
        steps = max(total - start, 0)
        begin = last = time.time()
        seen_since = 0
        width = len(str(total))
        for i, obj in enumerate(itertools.islice(iterable, steps)):
            yield obj
            seen_since += batch_size_fn(obj) if batch_size_fn else 1
            if print_freq and (i % print_freq == 0 or i == steps - 1):
                now = time.time()
                per_step = (now - begin) / (i + 1)
                eta = datetime.timedelta(seconds=int(per_step * (steps - i - 1)))
                rate = seen_since / max(now - last, 1e-9)
                print(f'{header} [{start + i:{width}d}/{total}]  eta: {eta}  {self}  {rate:.1f} img/s', flush=True)
                last, seen_since = now, 0
        total_time = datetime.timedelta(seconds=int(time.time() - begin))
        print(f'{header} Total time: {total_time} ({(time.time() - begin) / max(steps, 1):.4f} s / it)', flush=True)
