"""In-memory ZIP cache of an image data set (the official MaxSup / Swin ``--cache`` format), read fast.

Layout of a cache folder::

    train.zip  val.zip            members stored uncompressed (ZIP_STORED): the JPEG bytes as-is
    train_map.txt                 ``<class_folder>/<image_name>\\t<label>`` per line
    val_map.txt                   ``<image_name>\\t<label>`` per line

A sample is addressed as ``train.zip@/<member path>``.

Reading: the zip is ``mmap``-ed read-only and its central directory parsed once into an offset table
(numpy arrays aligned with the map file). ``__getitem__`` slices the mapping: no file open, no zipfile
lookup, no per-worker copy. All DataLoader workers and all ranks on a node share the same page-cache
pages; after pickling to a worker the dataset re-opens the mapping (mmap objects do not pickle).

Integrity: a map line that names no member, a malformed line, or an undecodable image is an error naming
the file/line/member. With ``skip_bad=True`` undecodable images are dropped from their batch instead (use
:func:`data.skip.collate_skip_bad`) and counted in ``dataset.skipped``; never is another image substituted.
"""
from __future__ import annotations

import mmap
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from data.decode import CorruptImageError, decode_image
from data.map_file import check_labels, check_split_labels, parse_map_file, train_class_index
from data.skip import SkipCounter
from data.zip_index import (CacheError, input_signature, join_names, read_central_directory, read_index,
                            write_index, zip_tail)


class ZipIndex:
    """A cache zip's members (data offsets, sizes, methods, CRCs, names) and one map's rows and labels.

    Arrays come memory-mapped from ``<zip>.idx`` (see data/zip_index.py), or from memory when the index
    could not be stored. Nothing is held per member as a Python object; names are decoded on demand.
    """

    def __init__(self, zip_path, arrays: dict, index_path: Path | None = None):
        self.path, self.index_path = Path(zip_path), index_path
        self._arrays, self._mm, self._belongs = arrays, None, None

    def __getattr__(self, name):  # offsets, sizes, methods, crcs, rows, labels, name_starts, name_blob
        arrays = self.__dict__.get('_arrays')
        if arrays is None and self.__dict__.get('index_path') is not None:  # unpickled in a worker: map again
            arrays = self._arrays = read_index(self.index_path, None, check_inputs=False)
        if arrays is not None and name in arrays:
            return arrays[name]
        raise AttributeError(name)

    def member_name(self, k: int) -> str:
        a, b = int(self.name_starts[k]), int(self.name_starts[k + 1]) - 1  # names are '\n'-separated
        return bytes(self.name_blob[a:b]).decode('utf-8')

    @property
    def names(self) -> list[str]:
        """All member names (decoded now: for tools such as --verify, not for training)."""
        return bytes(self.name_blob).decode('utf-8').split('\n')[:len(self.offsets)] if len(self.offsets) else []

    @property
    def mm(self) -> mmap.mmap:
        if self._mm is None:  # after unpickling in a worker: map the same file again (shared pages)
            with open(self.path, 'rb') as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def read(self, k: int, check_crc: bool = True) -> bytes:
        """Member ``k``'s bytes. The CRC-32 of the central directory is checked (as ``unzip -t`` does): flipped
        bytes inside a JPEG often still decode, into wrong pixels. Cost: ~1.5-2 % of a JPEG decode, <0.5 % of
        decode + DeiT train transform (benchmarks/bench_zip_loader.py)."""
        off, size = int(self.offsets[k]), int(self.sizes[k])
        mm = self.mm
        if off + size > mm.size():  # mm.size() is the file's size now (fstat): reading past it is SIGBUS
            raise CacheError(f'{self.path}: the file shrank to {mm.size()} bytes while in use (member '
                             f'{self.member_name(k)!r} ends at byte {off + size}); was it rewritten or truncated? '
                             f'Restore it, then resume the run')
        raw = mm[off:off + size]
        if self.methods[k] == zipfile.ZIP_DEFLATED:
            raw = zlib.decompress(raw, -15)
        if check_crc and zlib.crc32(raw) != int(self.crcs[k]):
            self.check_belongs_to_zip(k)
            raise CorruptImageError(f'{self.path.name}@/{self.member_name(k)}: CRC-32 mismatch (the stored bytes '
                                    f'are corrupted; rebuild the cache or restore the file)')
        return raw

    def check_belongs_to_zip(self, k: int) -> None:
        """After a CRC mismatch: is member ``k``'s entry (offset, size, CRC) the zip's own? An index copied from
        another zip (same size, mtime and end record) reads every member at the wrong place; that is no bad
        image to skip but a wrong file, and an error. Checked once per process (the first mismatch)."""
        if self._belongs is None:
            table = read_central_directory(self.path)
            ours = (table['offsets'], table['sizes'], table['crcs'])
            theirs = (self.offsets, self.sizes, self.crcs)
            self._belongs = k < len(ours[0]) and all(int(a[k]) == int(b[k]) for a, b in zip(ours, theirs)) and \
                len(ours[0]) == len(theirs[0])
        if not self._belongs:
            where = self.index_path or 'the index in memory'
            raise CacheError(f'{where} does not belong to {self.path}: its member table differs from the zip\'s '
                             f'central directory (copied from another cache?); delete it and it is made again')

    def warm(self, members=None, chunk: int = 64 << 20) -> None:
        """Bring pages into the page cache: the whole file, or only the given member indices.

        The whole file is handed to the kernel's read-ahead (``MADV_WILLNEED``: asynchronous, no copy) where
        the platform has it; member ranges are read once.
        """
        mm = self.mm
        if members is None:
            if hasattr(mmap, 'MADV_WILLNEED'):
                mm.madvise(mmap.MADV_WILLNEED)
            else:
                for off in range(0, len(mm), chunk):
                    mm[off:off + chunk]
            return
        for k in members:
            self.read(int(k), check_crc=False)

    def __getstate__(self):
        st = self.__dict__.copy()
        st['_mm'] = None
        if self.index_path is not None:  # workers map the index file themselves: shared pages, no copy
            st['_arrays'] = None
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)

    def __len__(self) -> int:
        return len(self.offsets)


def _map_arrays(map_path: Path):
    """(names blob in the index layout, labels) of a map file in whole-file passes, or None when a line is
    irregular (empty, no tab, a label that is no non-negative integer): parse_map_file then names it."""
    content = Path(map_path).read_bytes()
    if not content or b'\r' in content:
        return None
    if not content.endswith(b'\n'):
        content += b'\n'
    lines = content.count(b'\n')
    if content.count(b'\t') != lines:
        return None
    labels = re.findall(rb'\t(\d+)\n', content)
    names = re.sub(rb'\t[^\n]*', b'', content)
    if len(labels) != lines or names.startswith(b'\n') or b'\n\n' in names:
        return None
    return names, np.array(labels).astype(np.int64)


def _labels_ok(names: bytes, labels: np.ndarray, folder_labels: bool) -> bool:
    """check_labels' conditions, on whole arrays (False: let check_labels find and name the problem)."""
    if not len(labels) or (np.bincount(labels) == 0).any():
        return False
    if not folder_labels:
        return True
    folders = re.findall(rb'^([^/\n]*)/', names, re.M)
    if len(folders) != len(labels):
        return False
    pairs = set(zip(folders, labels.tolist()))
    return len(pairs) == len({f for f, _ in pairs}) == len({lab for _, lab in pairs})


def _rows_of(member_names: list[str], map_names: list[str], map_path, zip_path) -> np.ndarray:
    """Member index of each map entry (the zip is not in map order); an unknown name is an error naming the
    map line."""
    lookup = {name: k for k, name in enumerate(member_names)}
    rows = np.empty(len(map_names), np.int64)
    for n, name in enumerate(map_names):
        k = lookup.get(name)
        if k is None:
            hint = ''
            prefixed = [p for p in ('train/', 'val/') if p + name in lookup]
            if prefixed:
                hint = (f' (the zip has {prefixed[0] + name!r}: it was built from the folder above '
                        f'{prefixed[0]!r}; members must be relative to the split folder, as the official '
                        f'cache and data.build_zip_cache write them)')
            raise CacheError(f'{map_path}: line {n + 1} names member {name!r}, which is not in {zip_path}{hint}')
        rows[n] = k
    return rows


def open_index(zip_path, map_path, folder_labels: bool, train_map: Path | None = None) -> ZipIndex:
    """The index of (zip, map): ``<zip>.idx`` when it was made from exactly these files, else made now.

    Making it parses the central directory (no ZipInfo per member) and the map, checks the labels (and,
    with ``train_map``, that class-folder members carry their train label), and stores it atomically next
    to the zip; where that folder is not writable the index is kept in memory, with a message.
    """
    zip_path, map_path = Path(zip_path), Path(map_path)
    if not zip_path.is_file():
        raise FileNotFoundError(f'zip file not found: {zip_path}')
    if not map_path.is_file():
        raise FileNotFoundError(f'map file not found: {map_path}')
    idx_path = zip_path.with_name(zip_path.name + '.idx')
    inputs = {'zip': input_signature(zip_path, zip_tail(zip_path)), 'map': input_signature(map_path),
              'folder_labels': folder_labels, 'train_map': input_signature(train_map) if train_map else None}
    if idx_path.is_file():
        arrays = read_index(idx_path, inputs)
        if isinstance(arrays, dict):
            return ZipIndex(zip_path, arrays, idx_path)
        print(f'{idx_path}: {arrays}; making it again')
    table = read_central_directory(zip_path)
    fast = _map_arrays(map_path)
    if fast is None or not _labels_ok(*fast, folder_labels):  # the exact parser names the bad line
        entries = parse_map_file(map_path)
        check_labels(entries, str(map_path), folder_labels)
        fast = join_names([n for n, _ in entries])[0].tobytes(), np.array([lab for _, lab in entries], np.int64)
    map_blob, labels = fast
    if train_map is not None:
        entries = list(zip(map_blob.decode('utf-8').split('\n'), labels.tolist()))
        check_split_labels(entries, train_class_index(train_map), str(map_path))
    if table['name_blob'].tobytes() == map_blob:  # the usual case: the zip was written in map order
        rows = np.arange(len(labels), dtype=np.int64)
    else:
        member_names = table['name_blob'].tobytes().decode('utf-8').split('\n')[:-1]
        rows = _rows_of(member_names, map_blob.decode('utf-8').split('\n')[:-1], map_path, zip_path)
    arrays = {k: table[k] for k in ('offsets', 'sizes', 'methods', 'crcs', 'name_starts', 'name_blob')}
    arrays.update(rows=rows, labels=labels)
    try:
        write_index(idx_path, inputs, arrays)
    except OSError as e:
        print(f'cannot store the index next to {zip_path} ({e.strerror}); keeping it in memory for this run')
        return ZipIndex(zip_path, arrays, None)
    print(f'wrote {idx_path} ({len(arrays["offsets"])} members, {len(labels)} map entries)')
    return ZipIndex(zip_path, read_index(idx_path, inputs), idx_path)


# what a dataset reads ahead into the page cache when it opens: every member; only this rank's fixed shard (Swin's
# 'part', the official --cache sampling); nothing (tools and benchmarks that read a few samples)
CACHE_MODES = ('full', 'part', 'no')


class ZipImageDataset(SkipCounter, torch.utils.data.Dataset):
    """(image, label) samples from a zip + map file, decoded with PIL, then ``transform``.

    Labels and member rows are (memory-mapped) numpy arrays; a sample's name is looked up only when an
    error message needs it.
    """

    def __init__(self, zip_path, map_path, transform=None, folder_labels: bool = True, skip_bad: bool = False,
                 cache_mode: str = 'full', rank: int = 0, world_size: int = 1, train_map: Path | None = None):
        if cache_mode not in CACHE_MODES:
            choices = ', '.join(map(repr, CACHE_MODES[:-1])) + f' or {CACHE_MODES[-1]!r}'
            raise ValueError(f'cache_mode must be {choices}, got {cache_mode!r}')
        self.index = open_index(zip_path, map_path, folder_labels, train_map)
        self.rows, self.targets = self.index.rows, self.index.labels
        self.num_classes = int(self.targets.max()) + 1
        self.zip_name = Path(zip_path).name
        SkipCounter.__init__(self, skip_bad)
        self.transform, self.cache_mode = transform, cache_mode
        # Swin's cache_mode='part': this rank only ever reads (and so only holds) every world-th sample
        self.shard = np.arange(rank, len(self.rows), world_size) if cache_mode == 'part' else None
        if cache_mode == 'full':
            self.index.warm()
        elif cache_mode == 'part':
            self.index.warm(self.rows[self.shard])

    @classmethod
    def from_folder(cls, root, split: str, transform=None, cache_mode: str = 'full', skip_bad: bool = False,
                    rank: int = 0, world_size: int = 1):
        """``root/{split}.zip`` + ``root/{split}_map.txt`` (train maps carry class folders; other splits'
        members with class folders must carry their folder's train label). ``rank`` / ``world_size``: this
        process's place in a distributed run (cache_mode 'part' keeps its shard)."""
        root = Path(root)
        train_map = root / 'train_map.txt'
        return cls(root / f'{split}.zip', root / f'{split}_map.txt', transform, folder_labels=(split == 'train'),
                   skip_bad=skip_bad, cache_mode=cache_mode,
                   train_map=train_map if split != 'train' and train_map.is_file() else None,
                   rank=rank, world_size=world_size)

    def __len__(self) -> int:
        return len(self.rows)

    def sample_name(self, i: int) -> str:
        return f'{self.zip_name}@/{self.index.member_name(int(self.rows[i]))}'

    @property
    def samples(self) -> list[tuple[str, int]]:
        """(name, label) of every sample, built on demand (tools and tests; training never needs it)."""
        return [(self.sample_name(i), int(t)) for i, t in enumerate(self.targets)]

    def read_bytes(self, i: int) -> bytes:
        return self.index.read(int(self.rows[i]))

    def load(self, i: int):
        return decode_image(self.read_bytes(i), self.sample_name(i), lazy=self.lazy_decode)

    def __getitem__(self, i: int):
        return self._sample(lambda: self.load(i), int(self.targets[i]))


class ShardSampler(torch.utils.data.Sampler):
    """For cache_mode='part': this rank's fixed shard, reshuffled every epoch by seed + epoch.

    Shards ``arange(rank, N, world)`` differ in length by one when world does not divide N, and with
    ``drop_last`` that can mean different step counts per rank: the last collective of the epoch then waits
    for the rank that stopped early until the timeout. Every rank yields ``ceil(N / world)`` indices; a
    shorter shard repeats its first shuffled samples (as torch's DistributedSampler pads), so nothing is
    dropped and all ranks take the same number of steps.
    """

    def __init__(self, shard, seed: int = 0, num_samples: int | None = None):
        self.shard, self.seed, self.epoch = np.asarray(shard), seed, 0
        self.num_samples = len(self.shard) if num_samples is None else int(num_samples)
        if self.num_samples < len(self.shard) or (self.num_samples and not len(self.shard)):
            raise ValueError(f'shard of {len(self.shard)} samples cannot yield {self.num_samples}')

    @classmethod
    def for_dataset(cls, dataset, world_size: int, seed: int = 0) -> 'ShardSampler':
        return cls(dataset.shard, seed, num_samples=-(-len(dataset) // world_size))

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = self.shard[torch.randperm(len(self.shard), generator=g).numpy()]
        return iter(np.resize(order, self.num_samples).tolist())  # cycles the shard to num_samples

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
