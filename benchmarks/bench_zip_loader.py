"""ZIP cache vs. ImageFolder vs. Swin-style zipfile reads: samples/s and worker memory.

Generates N small JPEGs (default 20k) as an ImageFolder, builds the ZIP cache, then measures in random order
(warm page cache), interleaving the readers round by round:
  raw fetch        bytes of one sample: (a) open/read a file, (b) our mmap offset table,
                   (c) Swin's ZipReader (cached ZipFile handle + ZipFile.read per sample)
  fetch + decode   the same plus PIL decode
  end-to-end       zip fetch + decode + DeiT train transforms, vs decode + transforms from bytes in RAM
  CRC-32           the reader's per-read CRC check, vs decode and decode + transforms of ImageNet-sized
                   JPEGs (500x375, quality 90, from scikit-learn's sample photos)
  memory           PSS/RSS of DataLoader workers (1 vs 4) and the zip mapping's share of it

    python -m benchmarks.bench_zip_loader [--n 20000 --size 64 --workdir /tmp/zipbench]
    python -m benchmarks.bench_zip_loader --members 1281167      # ImageNet-sized index: open time and memory

``--members N`` builds (once, cached in --workdir) a train.zip of N tiny JPEGs in 1000 class folders and its
train_map.txt, then reports, each in a fresh process (one rank): open time and RSS growth of the previous
in-memory path (zipfile.infolist + Python lists per sample) vs this one without and with a stored index, and
the private memory of each of 4 DataLoader workers over one full epoch of random access.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform

from data.build_zip_cache import build
from data.zip_cache import ZipImageDataset


def make_tree(root: Path, n: int, size: int, classes: int = 100) -> None:
    if (root / 'done').exists():
        return
    rng = np.random.default_rng(0)
    for split, count in (('train', n), ('val', classes)):
        for i in range(count):
            c = i % classes
            d = root / split / f'n{c:08d}'
            d.mkdir(parents=True, exist_ok=True)
            arr = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).resize((size, size), Image.BILINEAR).save(d / f'img_{i:06d}.JPEG', quality=85)
    (root / 'done').touch()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert('RGB')


def timed(fn, order) -> float:
    t0 = time.perf_counter()
    for i in order:
        fn(i)
    return len(order) / (time.perf_counter() - t0)


def smaps(pid: int, needle: str) -> tuple[int, int, int, int]:
    """(PSS kB, RSS kB, PSS kB and private kB of the mappings whose path contains needle)."""
    pss = rss = zip_pss = zip_private = 0
    cur = ''
    with open(f'/proc/{pid}/smaps') as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and '-' in parts[0] and ':' in parts[3]:  # mapping header: addr perms off dev inode [path]
                cur = parts[5] if len(parts) > 5 else ''
            elif parts[0] == 'Pss:':
                pss += int(parts[1])
                if needle in cur:
                    zip_pss += int(parts[1])
            elif parts[0] == 'Rss:':
                rss += int(parts[1])
            elif parts[0] in ('Private_Clean:', 'Private_Dirty:') and needle in cur:
                zip_private += int(parts[1])
    return pss, rss, zip_pss, zip_private


def worker_memory(ds, workers: int, zip_path: str) -> dict:
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers, shuffle=True,
                                         collate_fn=lambda b: len(b), persistent_workers=True)
    it = iter(loader)
    for _ in range(min(len(loader) - 1, 150)):
        next(it)
    pids = [w.pid for w in it._workers]
    stats = [smaps(p, zip_path) for p in pids]
    del it, loader
    return {'workers': workers, 'pss_mb': sum(s[0] for s in stats) / 1024, 'rss_mb': sum(s[1] for s in stats) / 1024,
            'zip_pss_mb': sum(s[2] for s in stats) / 1024, 'zip_private_mb': sum(s[3] for s in stats) / 1024}


def realistic_jpegs(n: int = 16) -> list[bytes]:
    """ImageNet-sized JPEGs (500x375, quality 90) cut from the real photos scikit-learn ships."""
    from sklearn.datasets import load_sample_images
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    out = []
    for i in range(n):
        ph = photos[i % len(photos)]
        x, y = (i * 37) % (ph.width - 400), (i * 23) % (ph.height - 300)
        buf = io.BytesIO()
        ph.crop((x, y, x + 400, y + 300)).resize((500, 375), Image.BICUBIC).save(buf, 'JPEG', quality=90)
        out.append(buf.getvalue())
    return out


def crc_cost(tf, rounds: int) -> None:
    import zlib
    blobs = realistic_jpegs()
    crc, dec, full = [], [], []
    for _ in range(rounds):
        crc.append(timed(lambda i: zlib.crc32(blobs[i % 16]), range(2000)))
        dec.append(timed(lambda i: decode(blobs[i % 16]), range(100)))
        full.append(timed(lambda i: tf(decode(blobs[i % 16])), range(100)))
    c, d, f = (1e6 / statistics.median(v) for v in (crc, dec, full))
    print(f'\nCRC-32 per read (checked by the reader and --verify): {c:.1f} us on {len(blobs[0]) // 1024} KiB '
          f'JPEGs = {100 * c / d:.2f} % of decode ({d:.0f} us), {100 * c / f:.2f} % of decode + DeiT transforms '
          f'({f:.0f} us)')


def rss_mb(pid='self') -> float:
    with open(f'/proc/{pid}/status') as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith('VmRSS')) / 1024


def private_mb(pid) -> float:
    with open(f'/proc/{pid}/smaps_rollup') as f:
        return sum(int(ln.split()[1]) for ln in f if ln.startswith(('Private_Clean', 'Private_Dirty'))) / 1024


def make_big_zip(root: Path, members: int, classes: int = 1000) -> Path:
    """train.zip with ``members`` tiny JPEGs (class folders n00000000..) and its map; cached."""
    zp, mp_ = root / 'train.zip', root / 'train_map.txt'
    if (root / f'done-{members}').exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(buf, 'JPEG', quality=90)
        blobs.append(buf.getvalue())
    t0 = time.time()
    with zipfile.ZipFile(zp, 'w', zipfile.ZIP_STORED, allowZip64=True) as zf, open(mp_, 'w') as mf:
        for i in range(members):
            c = i % classes
            name = f'n{c:08d}/n{c:08d}_{i}.JPEG'
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, blobs[i % 16])
            mf.write(f'{name}\t{c}\n')
    (root / f'done-{members}').touch()
    print(f'built {zp} ({members} members, {zp.stat().st_size / 2**30:.2f} GiB) in {time.time() - t0:.0f}s')
    return root


class _Bytes(torch.utils.data.Dataset):
    """Raw member bytes only: the epoch measures the index's memory, not JPEG decoding."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return len(self.ds.read_bytes(i))


def probe(kind: str, root: Path) -> dict:
    """One rank's view, in this fresh process: open time, RSS growth, and (kind 'epoch') worker memory."""
    zp, mp_ = root / 'train.zip', root / 'train_map.txt'
    before = rss_mb()
    t0 = time.perf_counter()
    if kind == 'old':  # the previous path: a ZipInfo per member, then three Python lists per sample
        from data.map_file import parse_map_file
        with zipfile.ZipFile(zp) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
        names = [i.filename for i in infos]
        lookup = {n: k for k, n in enumerate(names)}
        entries = parse_map_file(mp_)
        keep = (infos, names, [lookup[n] for n, _ in entries], [lab for _, lab in entries],
                [(f'train.zip@/{n}', lab) for n, lab in entries])
        out = {'open_s': time.perf_counter() - t0, 'rss_mb': rss_mb() - before, 'n': len(keep[2])}
        del lookup
        return out
    ds = ZipImageDataset(zp, mp_, cache_mode='no')
    out = {'open_s': time.perf_counter() - t0, 'rss_mb': rss_mb() - before, 'n': len(ds)}
    if kind == 'epoch':
        loader = torch.utils.data.DataLoader(_Bytes(ds), batch_size=512, num_workers=4, shuffle=True,
                                             persistent_workers=True, collate_fn=len)
        it = iter(loader)
        next(it)
        pids = [w.pid for w in it._workers]
        start = [private_mb(p) for p in pids]
        t0 = time.perf_counter()
        for _ in it:
            pass
        out.update(epoch_s=time.perf_counter() - t0, worker_private_start_mb=start,
                   worker_private_end_mb=[private_mb(p) for p in pids])
    return out


def run_probe(kind: str, root: Path) -> dict:
    r = subprocess.run([sys.executable, '-m', 'benchmarks.bench_zip_loader', '--probe', kind, '--workdir', str(root)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def scale(members: int, workdir: Path) -> None:
    root = make_big_zip(workdir / f'big{members}', members)
    idx = root / 'train.zip.idx'
    old = run_probe('old', root)
    idx.unlink(missing_ok=True)
    first = run_probe('new', root)  # parses the central directory and stores the index
    stored = [run_probe('new', root) for _ in range(3)]
    epoch = run_probe('epoch', root)
    best = min(stored, key=lambda r: r['open_s'])
    print(f'\n{members} members, one rank each (fresh process):')
    print(f'  previous path (zipfile.infolist + lists): open {old["open_s"]:.2f} s, RSS +{old["rss_mb"]:.0f} MB')
    print(f'  without an index (made and stored):        open {first["open_s"]:.2f} s, RSS +{first["rss_mb"]:.0f} MB')
    print(f'  with the stored index (best of 3):         open {best["open_s"]:.3f} s, RSS +{best["rss_mb"]:.0f} MB '
          f'(index file {idx.stat().st_size / 2**20:.0f} MiB, shared page cache)')
    print(f'  speed-up of open: {old["open_s"] / best["open_s"]:.0f}x with the index, '
          f'{old["open_s"] / first["open_s"]:.1f}x without; RSS {old["rss_mb"] / max(best["rss_mb"], 1):.0f}x less')
    grow = [e - s for s, e in zip(epoch['worker_private_start_mb'], epoch['worker_private_end_mb'])]
    print(f'  4 workers, one full epoch of random access ({epoch["epoch_s"]:.0f} s): private memory per worker '
          f'{", ".join(f"{s:.0f}->{e:.0f}" for s, e in zip(epoch["worker_private_start_mb"], epoch["worker_private_end_mb"]))} MB '
          f'(growth at most {max(grow):+.1f} MB)')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n', type=int, default=20000)
    ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--workdir', type=Path, default=Path('/tmp/zipbench'))
    ap.add_argument('--sample', type=int, default=5000, help='samples per timing round')
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--members', type=int, default=None, help='ImageNet-scale index benchmark with N members')
    ap.add_argument('--probe', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.workdir)))
        return
    if args.members:
        scale(args.members, args.workdir)
        return
    src, dst = args.workdir / 'src', args.workdir / 'cache'
    t0 = time.time()
    make_tree(src, args.n, args.size)
    if not (dst / 'train.zip').exists():
        build(src, dst)
    print(f'{args.n} JPEGs of {args.size}px ready in {time.time() - t0:.0f}s; zip {(dst / "train.zip").stat().st_size / 2**20:.1f} MiB')

    ds = ZipImageDataset(dst / 'train.zip', dst / 'train_map.txt')
    names = [n.split('@/', 1)[1] for n, _ in ds.samples]
    paths = [str(src / 'train' / n) for n in names]
    zf = zipfile.ZipFile(dst / 'train.zip')  # Swin keeps one open ZipFile per zip and reads by name

    def folder_raw(i):
        with open(paths[i], 'rb') as f:
            return f.read()

    readers = {'imagefolder': folder_raw, 'zip_cache': ds.read_bytes, 'swin_zipfile': lambda i: zf.read(names[i])}
    rng = random.Random(0)
    for r in readers.values():  # warm the page cache for everyone
        for i in range(len(ds)):
            r(i)
    res = {f'{k} {m}': [] for m in ('raw', 'decode') for k in readers}
    for _ in range(args.rounds):
        order = rng.sample(range(len(ds)), min(args.sample, len(ds)))
        for k, r in readers.items():
            res[f'{k} raw'].append(timed(r, order))
        for k, r in readers.items():
            res[f'{k} decode'].append(timed(lambda i: decode(r(i)), order[:args.sample // 5]))
    med = {k: statistics.median(v) for k, v in res.items()}
    print('\nrandom order, warm page cache (median of rounds)')
    for m in ('raw', 'decode'):
        for k in readers:
            print(f'  {k + " " + m:22s} {med[k + " " + m]:12.0f} samples/s  {1e6 / med[k + " " + m]:8.2f} us/sample')
    print(f'  raw fetch: zip_cache / imagefolder = {med["zip_cache raw"] / med["imagefolder raw"]:.1f}x, '
          f'zip_cache / swin_zipfile = {med["zip_cache raw"] / med["swin_zipfile raw"]:.1f}x')
    print(f'  fetch+decode: zip_cache / imagefolder = {med["zip_cache decode"] / med["imagefolder decode"]:.2f}x')

    tf = create_transform(224, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25,
                          interpolation='bicubic', color_jitter=0.3)
    blobs = [ds.read_bytes(i) for i in range(len(ds))]
    e2e, pure = [], []
    for _ in range(args.rounds):
        order = rng.sample(range(len(ds)), min(1000, len(ds)))
        torch.manual_seed(0), random.seed(0)  # RandAugment draws from `random`, RandomErasing from torch
        e2e.append(timed(lambda i: tf(ds.load(i)), order))
        torch.manual_seed(0), random.seed(0)
        pure.append(timed(lambda i: tf(decode(blobs[i])), order))
    ratio = statistics.median(p / e for e, p in zip(e2e, pure))
    print(f'\nend-to-end (decode + DeiT train transforms at 224): zip {statistics.median(e2e):.0f}/s, '
          f'bytes-in-RAM {statistics.median(pure):.0f}/s; zip loading overhead {100 * (ratio - 1):+.1f}%')

    crc_cost(tf, args.rounds)

    print('\nDataLoader worker memory (after ~150 random batches)')
    ds_nt = ZipImageDataset(dst / 'train.zip', dst / 'train_map.txt', transform=None)
    mem = {w: worker_memory(ds_nt, w, str(dst / 'train.zip')) for w in (1, 4)}
    for w, m in mem.items():
        print(f'  {w} worker(s): PSS {m["pss_mb"]:.0f} MiB total ({m["pss_mb"] / w:.0f}/worker), '
              f'RSS {m["rss_mb"]:.0f} MiB; zip mapping: PSS {m["zip_pss_mb"]:.1f} MiB (shared page cache, '
              f'split among the processes that map it), private {m["zip_private_mb"]:.2f} MiB')
    extra = (mem[4]['zip_private_mb'] - mem[1]['zip_private_mb']) / 3
    print(f'  zip data private to each extra worker: {extra:+.2f} MiB; interpreter/torch per extra worker: '
          f'{(mem[4]["pss_mb"] - mem[1]["pss_mb"]) / 3:.0f} MiB PSS')


if __name__ == '__main__':
    main()
