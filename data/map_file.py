"""The ZIP cache's map files (the official format): ``<member>\\t<label>`` per line, read and written, and
the label rules a cache must follow (labels 0..K-1, one per class folder, val labels of the train classes).
"""
from __future__ import annotations

import os
from pathlib import Path

from data.io import atomic_open
from data.zip_index import CacheError


def parse_map_file(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Read ``<member>\\t<label>`` lines (the official maps; a single space also separates, as the official
    converter's ``split()`` accepts); errors name the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'map file not found: {path}')
    out = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip('\n').rstrip('\r')
            parts = line.split('\t') if '\t' in line else line.rsplit(' ', 1)
            if len(parts) != 2 or not parts[0]:
                raise CacheError(f'{path}:{n}: expected "<member>\\t<label>", got {line!r}')
            try:
                label = int(parts[1])
            except ValueError:
                raise CacheError(f'{path}:{n}: label {parts[1]!r} is not an integer') from None
            if label < 0:
                raise CacheError(f'{path}:{n}: negative label {label}')
            out.append((parts[0], label))
    if not out:
        raise CacheError(f'{path}: no entries')
    return out


def write_map_file(path: str | os.PathLike, entries) -> None:
    """``<member>\\t<label>`` lines, written atomically."""
    with atomic_open(path, 'w', encoding='utf-8', newline='\n') as f:
        for name, label in entries:
            if '\t' in name or '\n' in name:
                raise CacheError(f'member name {name!r} contains a tab or newline; cannot be written to a map file')
            f.write(f'{name}\t{label}\n')


def class_folder(name: str) -> str | None:
    """A member's class folder: its first path component, as ImageFolder's class (None for a flat name)."""
    head, sep, _ = name.partition('/')
    return head if sep else None


def check_labels(entries: list[tuple[str, int]], source: str, folder_labels: bool) -> int:
    """Labels must be 0..K-1 with every class present; with ``folder_labels`` one label per class folder.

    Returns K.
    """
    labels = sorted({lab for _, lab in entries})
    K = labels[-1] + 1
    if len(labels) != K:
        missing = sorted(set(range(K)) - set(labels))
        raise CacheError(f'{source}: labels must cover 0..{K - 1}; missing {missing[:10]}'
                         f'{" ..." if len(missing) > 10 else ""}')
    if folder_labels:
        by_folder, by_label = {}, {}
        for name, lab in entries:
            folder = class_folder(name)
            if folder is None:
                raise CacheError(f'{source}: entry {name!r} has no class folder')
            if by_folder.setdefault(folder, lab) != lab:
                raise CacheError(f'{source}: class folder {folder!r} has labels {by_folder[folder]} and {lab}')
            if by_label.setdefault(lab, folder) != folder:
                raise CacheError(f'{source}: label {lab} is used by folders {by_label[lab]!r} and {folder!r}')
    return K


def check_split_labels(entries, class_index: dict[str, int], source: str) -> None:
    """Every entry's label must be its class folder's (when it has one) and within the train classes."""
    for n, (name, label) in enumerate(entries, 1):
        folder = class_folder(name)
        if folder is not None and folder not in class_index:
            raise CacheError(f'{source}:{n}: class folder {folder!r} of {name!r} is not a train class')
        if folder is not None and class_index[folder] != label:
            raise CacheError(f'{source}:{n}: {name!r} has label {label}, but class folder {folder!r} is label '
                             f'{class_index[folder]} in train')
        if not 0 <= label < len(class_index):
            raise CacheError(f'{source}:{n}: label {label} outside the {len(class_index)} train classes')


def train_class_index(train_map: Path) -> dict[str, int]:
    """class folder -> label, from a train map (whose labels check_labels has tied to folders)."""
    return {folder: label for name, label in parse_map_file(train_map) if (folder := class_folder(name)) is not None}
