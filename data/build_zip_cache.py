"""Build (or verify) the ZIP cache of an ImageNet-style folder.

    python -m data.build_zip_cache --src /path/ImageNet --dst data/ImageNet
    python -m data.build_zip_cache --src /path/ImageNet --dst data/ImageNet --train-map train_map.txt --val-map val_map.txt
    python -m data.build_zip_cache --dst data/ImageNet --verify

``--src`` holds ``train/<class>/.../<img>`` and ``val/``: either class folders too, or flat images plus
``--val-labels FILE`` (lines ``<image name> <class folder or label>``). Labels follow ImageFolder's order
(sorted class folders), so a model trained on the cache and on the folders agree. With the official
release's ``--train-map`` / ``--val-map`` the members, their order and their labels come from the maps
instead (every listed image must exist under ``--src``), so the cache matches the released checkpoints'
class numbering. ``--max-size 500 --quality 90`` (opt-in, FFCV's setting) stores large images downscaled.
Output is deterministic (fixed timestamps, ZIP_STORED) and atomic (temp files renamed at the end).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from data.cli import report
from data.map_file import check_labels, check_split_labels, class_folder, parse_map_file, write_map_file
from data.zip_cache import ZipImageDataset, open_index
from data.zip_index import CacheError
from data.io import CheckpointError, atomic_open, check_writable


def _images_under(folder: Path) -> list[str]:
    """Image files below folder (recursively), as sorted '/'-joined relative paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for fn in filenames:
            if fn.lower().endswith(IMG_EXTENSIONS):
                out.append(Path(dirpath, fn).relative_to(folder).as_posix())
    for name in out:  # zip names are UTF-8; a Latin-1 file name decodes to surrogates, which have none
        try:
            name.encode('utf-8')
        except UnicodeEncodeError:
            raw = os.fsencode(folder / name)
            raise CacheError(f'{raw.decode("utf-8", "replace")}: file name is not valid UTF-8 ({raw!r}); rename '
                             f'it (e.g. convmv -f latin1 -t utf8) and build again') from None
    return sorted(out)


def scan_class_folders(split_dir: Path) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise CacheError(f'{split_dir}: no class folders')
    entries = []
    for label, c in enumerate(classes):
        files = _images_under(split_dir / c)
        if not files:
            raise CacheError(f'{split_dir / c}: class folder without images')
        entries += [(f'{c}/{f}', label) for f in files]
    return entries, classes


def entries_from_map(split_dir: Path, map_file: Path) -> list[tuple[str, int]]:
    """Members and labels of an official map file, in its order; every listed image must exist."""
    entries = parse_map_file(map_file)
    present = set(_images_under(split_dir))
    seen = set()
    for n, (name, _) in enumerate(entries, 1):
        if name not in present:
            raise CacheError(f'{map_file}:{n}: image {name!r} not found in {split_dir}')
        if name in seen:
            raise CacheError(f'{map_file}:{n}: image {name!r} listed twice')
        seen.add(name)
    return entries


def scan_flat_val(val_dir: Path, labels_file: Path, classes: list[str]) -> list[tuple[str, int]]:
    if any(d.is_dir() for d in val_dir.iterdir()):
        raise CacheError(f'{val_dir} has class folders (val/<class>/<image>): --val-labels is not needed, '
                         f'the labels come from the folders')
    index = {c: i for i, c in enumerate(classes)}
    present = set(_images_under(val_dir))
    entries = []
    with open(labels_file, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) != 2:
                raise CacheError(f'{labels_file}:{n}: expected "<image name> <class or label>", got {line!r}')
            name, cls = parts
            label = index.get(cls, int(cls) if cls.isdigit() else None)
            if label is None or not 0 <= label < len(classes):
                raise CacheError(f'{labels_file}:{n}: unknown class {cls!r}')
            if name not in present:
                raise CacheError(f'{labels_file}:{n}: image {name!r} not found in {val_dir}')
            entries.append((name, label))
    return sorted(entries)


def shrink(data: bytes, path: Path, max_size: int, quality: int) -> bytes:
    """``--max-size/--quality`` (opt-in; the official ResNet FFCV pipeline's 500 px / quality 90): an image
    whose longer side exceeds ``max_size`` is downscaled (area filter, as FFCV's INTER_AREA) and re-encoded
    as a JPEG of ``quality``; any other image is stored byte for byte (no second generation loss)."""
    try:
        img = Image.open(io.BytesIO(data))
        if max(img.size) <= max_size:
            return data
        img = img.convert('RGB')
    except (OSError, SyntaxError, ValueError) as e:
        raise CacheError(f'{path}: cannot decode image for --max-size ({e})') from e
    scale = max_size / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    out = io.BytesIO()
    img.resize(size, Image.BOX).save(out, 'JPEG', quality=quality)
    return out.getvalue()


def write_zip(src_dir: Path, entries, zip_path: Path, desc: str, max_size: int | None, quality: int) -> None:
    with atomic_open(zip_path) as f, zipfile.ZipFile(f, 'w') as zf:  # zipfile's defaults: stored, ZIP64 as needed
        for name, _ in tqdm(entries, desc=desc, unit='img', mininterval=1.0):
            info = zipfile.ZipInfo(name)  # its timestamp is fixed (1980-01-01): two builds are byte-identical
            info.compress_type = zipfile.ZIP_STORED  # JPEGs do not compress; a stored member is read in place
            info.external_attr = 0o644 << 16
            data = (src_dir / name).read_bytes()
            zf.writestr(info, data if max_size is None else shrink(data, src_dir / name, max_size, quality))


def build(src: Path, dst: Path, val_labels: Path | None = None, train_map: Path | None = None,
          val_map: Path | None = None, max_size: int | None = None, quality: int = 90) -> dict:
    src, dst = Path(src), Path(dst)
    for split in ('train', 'val'):
        if not (src / split).is_dir():
            raise FileNotFoundError(f'{src / split}: missing (expected ImageFolder train/ and val/)')
    if val_map and val_labels:
        raise CacheError('give --val-map (official map) or --val-labels, not both')
    if train_map:
        train = entries_from_map(src / 'train', Path(train_map))
        check_labels(train, str(train_map), folder_labels=True)
        folders = {class_folder(name): label for name, label in train}
        classes = [c for c, _ in sorted(folders.items(), key=lambda kv: kv[1])]
    else:
        train, classes = scan_class_folders(src / 'train')
    class_index = {c: i for i, c in enumerate(classes)}
    if val_map:
        val = entries_from_map(src / 'val', Path(val_map))
        check_split_labels(val, class_index, str(val_map))
    elif val_labels:
        val = scan_flat_val(src / 'val', Path(val_labels), classes)
    elif train_map:
        val, val_classes = scan_class_folders(src / 'val')
        unknown = sorted(set(val_classes) - set(class_index))
        if unknown:
            raise CacheError(f'{src / "val"}: class folders {unknown[:5]} are not classes of {train_map}')
        val = [(name, class_index[class_folder(name)]) for name, _ in val]
    else:
        val, val_classes = scan_class_folders(src / 'val')
        if val_classes != classes:
            raise CacheError(f'{src / "val"}: class folders differ from train/ '
                             f'({sorted(set(val_classes) ^ set(classes))[:5]} ...)')
    dst.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be good
    for split, entries in (('train', train), ('val', val)):
        write_zip(src / split, entries, dst / f'{split}.zip', f'{split}.zip', max_size, quality)
        write_map_file(dst / f'{split}_map.txt', entries)
    for split in ('train', 'val'):  # <split>.zip.idx: ranks and workers open the cache from it in ~1 s
        open_index(dst / f'{split}.zip', dst / f'{split}_map.txt', folder_labels=(split == 'train'),
                   train_map=dst / 'train_map.txt' if split == 'val' else None)
    return {'classes': len(classes), 'train': len(train), 'val': len(val)}


def verify(dst: Path) -> list[str]:
    """Decode every member of both splits; return the bad ones as 'zip@/member: reason'."""
    bad = []
    for split in ('train', 'val'):
        ds = ZipImageDataset.from_folder(dst, split, cache_mode='no')
        for i in tqdm(range(len(ds)), desc=f'verify {split}', unit='img', mininterval=1.0):
            try:
                ds.load(i)
            except CacheError as e:
                bad.append(str(e))
        names = {n for n, _ in parse_map_file(Path(dst) / f'{split}_map.txt')}
        extra = [n for n in ds.index.names if n not in names]
        bad += [f'{split}.zip@/{n}: member not listed in {split}_map.txt' for n in extra]
    return bad


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='python -m data.build_zip_cache', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--src', type=Path, help='ImageFolder root with train/ and val/')
    ap.add_argument('--dst', type=Path, required=True, help='cache folder to write / verify')
    ap.add_argument('--val-labels', type=Path, default=None, help='labels for a flat val/ folder')
    ap.add_argument('--train-map', type=Path, default=None,
                    help="official train_map.txt: members and labels from it (the release's class numbering)")
    ap.add_argument('--val-map', type=Path, default=None, help='official val_map.txt (flat or with class folders)')
    ap.add_argument('--max-size', type=int, default=None,
                    help='opt-in: downscale images whose longer side exceeds this (e.g. 500, as FFCV) ...')
    ap.add_argument('--quality', type=int, default=90, help='... and re-encode them at this JPEG quality')
    ap.add_argument('--verify', action='store_true', help='decode every member and report bad ones')
    return ap


def main(argv=None) -> int:
    ap = get_parser()
    args = ap.parse_args(argv)
    if args.max_size is not None and args.max_size < 1 or not 1 <= args.quality <= 100:
        ap.error(f'--max-size must be >= 1 and --quality within 1..100 (got {args.max_size}, {args.quality})')
    try:
        if args.src:
            check_writable(args.dst, folder=True, create=False)  # now, not after reading the whole tree
            stats = build(args.src, args.dst, args.val_labels, args.train_map, args.val_map, args.max_size,
                          args.quality)
            print(f'wrote {args.dst}: {stats["classes"]} classes, {stats["train"]} train, {stats["val"]} val images')
        elif not args.verify:
            ap.error('give --src to build, or --verify to check an existing cache')
        if args.verify:
            bad = verify(args.dst)
            for b in bad:
                print(f'BAD {b}')
            print(f'verify: {len(bad)} bad member(s)')
            return 1 if bad else 0
    except (CacheError, CheckpointError, OSError) as e:  # OSError: e.g. the disk filled up while writing
        return report(e)
    return 0


if __name__ == '__main__':
    sys.exit(main())
