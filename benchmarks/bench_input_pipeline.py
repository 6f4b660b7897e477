"""Input pipeline images/s per CPU core: the official DeiT/MaxSup pipeline vs this project's, step by step.

    python -m benchmarks.bench_input_pipeline [--images 96 --rounds 5 --workdir /tmp/inputbench]

Data: ImageNet-like JPEGs cut from the real photos scikit-learn ships, quality 90, sizes drawn like
ImageNet-1k train's (Flickr's 500 px; the commonly quoted mean is ~469x387): 85 % at 500 px on the longer
side (4:3, 3:2, 1:1, portrait), 10 % smaller (200-499 px), 5 % larger (600-1600 px, log-uniform); the
printed mean says where the set lands. They go into the ZIP cache (``data.build_zip_cache``), once as they
are and once with the opt-in ``--max-size 500 --quality 90``.

Per core: each pipeline turns every image of the set into a training sample (DeiT-S recipe: RRC 224
bicubic, flip, rand-m9-mstd0.5-inc1, random erasing 0.25 pixel) in one process with one thread. Pipelines
that need another image library run in child processes (``MAXSUP_STOCK_PILLOW`` / ``MAXSUP_NO_SIMPLEJPEG``
hide pillow-simd / simplejpeg), interleaved round by round; the median round counts. Device-side steps
(uint8 -> normalise -> random erasing, batched) are measured separately, on this CPU.

Rows, cumulative: official (Swin/DeiT ZipReader: ZipFile.read per sample, PIL decode, float transform) ->
the mmap ZIP index + CRC check (float transform) -> uint8 workers (prefetcher) ->
simplejpeg -> pillow-simd = the default install; opt-ins: --jpeg-draft, the --max-size 500 cache, both;
and --device-aug (RandAugment moves to the GPU: the CPU keeps decode, crop and flip; its device cost is
measured by benchmarks/gpu_check.sh); last, the workers' half of --gpu-decode (header, crop and flip draws,
the bytes handed over; its pixels are compared after decoding on this CPU). The closing line turns the
per-core rates into cores per GPU at DeiT-S's H100 training rate. Pixel columns compare with the official
output for the same random draws (random erasing off): mean |difference| and the share of values off by
more than 2 levels (0-255);
a 1-level difference of a resize (pillow-simd) can move a pixel across a posterize / solarize threshold,
so the maximum alone says little. Then a DataLoader with 2 workers, end to end.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from argparse import Namespace
from pathlib import Path

import numpy as np

STOCK = {'MAXSUP_STOCK_PILLOW': '1', 'MAXSUP_NO_SIMPLEJPEG': '1'}
# (name, env, pipeline options): cumulative steps; env hides the optional libraries a row does not use
ROWS = [
    ('official (zipfile + PIL, float)', STOCK, dict(reader='official', uint8=False)),
    ('mmap ZIP index + CRC, float', STOCK, dict(uint8=False)),
    ('+ uint8 workers (prefetcher)', STOCK, dict()),
    ('+ simplejpeg decode', {'MAXSUP_STOCK_PILLOW': '1'}, dict()),
    ('+ pillow-simd = DEFAULT', {}, dict()),
    ('opt-in --jpeg-draft', {}, dict(draft=True)),
    ('opt-in cache --max-size 500', {}, dict(cache='small')),
    ('opt-ins on the CPU (draft+max-size)', {}, dict(draft=True, cache='small')),
    ('ALL OPT-INS (+ --device-aug)', {}, dict(draft=True, cache='small', device_aug=True)),
    ('opt-in --gpu-decode (workers\' half)', {}, dict(gpu_decode=True, device_aug=True)),
]
DEFAULT, ALL, GPU_DECODE = 4, 8, 9
FEED_RATE = 3600  # DeiT-S img/s on one H100 (bf16 AMP, batch 128; docs/data.md, "Data loading speed")


def imagenet_like_jpegs(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """(name, JPEG bytes): crops of scikit-learn's sample photos at ImageNet-like sizes, quality 90."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        u = rng.random()
        side = (500 if u < 0.85 else int(rng.integers(200, 500)) if u < 0.95
                else int(np.exp(rng.uniform(np.log(600), np.log(1600)))))
        aspect = [4 / 3, 3 / 2, 1.0, 3 / 4, 2 / 3][int(rng.integers(5))]
        w, h = (side, round(side / aspect)) if aspect >= 1 else (round(side * aspect), side)
        ph = photos[i % len(photos)]
        cw = int(rng.integers(min(200, ph.width), ph.width + 1))
        ch = min(ph.height, round(cw * h / w))
        cw = round(ch * w / h)
        x, y = int(rng.integers(0, ph.width - cw + 1)), int(rng.integers(0, ph.height - ch + 1))
        buf = io.BytesIO()
        ph.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC).save(buf, 'JPEG', quality=90)
        out.append((f'n{i % 10:08d}/img_{i:05d}.JPEG', buf.getvalue()))
    return out


def make_caches(root: Path, n: int) -> dict:
    """ImageFolder tree -> ZIP cache as is (``full``) and with --max-size 500 --quality 90 (``small``)."""
    from data.build_zip_cache import build
    done = root / f'done-{n}'
    if not done.exists():
        for split in ('train', 'val'):
            for name, data in imagenet_like_jpegs(n):
                p = root / 'tree' / split / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
        build(root / 'tree', root / 'full')
        build(root / 'tree', root / 'small', max_size=500, quality=90)
        done.touch()
    sizes = [len(d) for _, d in imagenet_like_jpegs(n)]
    return {'mean_kb': statistics.mean(sizes) / 1024, 'large': sum(s > 150_000 for s in sizes)}


def recipe_args(**kw) -> Namespace:
    """The DeiT-S training recipe's data flags."""
    a = dict(data_set='IMNET', input_size=224, color_jitter=0.3, aa='rand-m9-mstd0.5-inc1',
             train_interpolation='bicubic', reprob=0.25, remode='pixel', recount=1, ThreeAugment=False, src=False,
             prefetcher=True, jpeg_draft=False, device_aug=False, gpu_decode=False, cache=True, cache_mode='no',
             skip_bad_images=False)
    a.update(kw)
    return Namespace(**a)


class OfficialZipReader:
    """Swin/DeiT-cache style: one cached ZipFile handle, ``ZipFile.read(member)`` per sample, PIL decode."""

    def __init__(self, zip_path: Path, transform):
        self.path, self.zf, self.transform = zip_path, None, transform
        with zipfile.ZipFile(zip_path) as zf:
            self.names = [i.filename for i in zf.infolist() if not i.is_dir()]

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        from PIL import Image
        if self.zf is None:  # opened in each worker, as Swin's zip_bank (a handle shared across fork corrupts reads)
            self.zf = zipfile.ZipFile(self.path)
        img = Image.open(io.BytesIO(self.zf.read(self.names[i]))).convert('RGB')
        return self.transform(img), 0


def make_dataset(root: Path, reader: str = 'ours', uint8: bool = True, draft: bool = False, cache: str = 'full',
                 device_aug: bool = False, gpu_decode: bool = False, re_prob: float = 0.25):
    from data.zip_cache import ZipImageDataset
    from deit.datasets import build_transform
    args = recipe_args(prefetcher=uint8, jpeg_draft=draft, device_aug=device_aug, gpu_decode=gpu_decode,
                       reprob=re_prob)
    tf = build_transform(True, args)
    folder = root / cache
    if reader == 'official':
        return OfficialZipReader(folder / 'train.zip', tf)
    return ZipImageDataset(folder / 'train.zip', folder / 'train_map.txt', transform=tf, cache_mode='no')


def as_pixels(x) -> np.ndarray:
    """A sample as 0-255 CHW floats (float outputs are un-normalised; --gpu-decode's decoded on this CPU)."""
    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from deit.device_decode import DeviceDecoder, collate_encoded
    from deit.transforms import EncodedImage
    if isinstance(x, EncodedImage):
        x = DeviceDecoder(224, 'cpu')(collate_encoded([(x, 0)]))[0][0]
    if x.dtype == torch.uint8:
        return x.numpy().astype(np.float32)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return ((x * std + mean) * 255).numpy()


def seeded(i: int) -> None:
    import torch
    random.seed(i)
    np.random.seed(i)
    torch.manual_seed(i)


def child(root: Path, rows: list[int], out: Path, check: int, passes: int) -> None:
    """Time the given rows (``passes`` times over every image of the set), save their first ``check`` samples."""
    import torch
    torch.set_num_threads(1)
    res = {}
    for r in rows:
        opts = ROWS[r][2]
        ds = make_dataset(root, **opts)
        order = list(range(len(ds))) * passes
        ds[0]  # warm caches and lazy imports
        t0 = time.perf_counter()
        for i in order:
            ds[i]
        res[r] = len(order) / (time.perf_counter() - t0)
        ds = make_dataset(root, **opts, re_prob=0.0)
        if check:
            samples = []
            for i in range(check):
                seeded(i)
                samples.append(as_pixels(ds[i][0]))
            np.save(out.parent / f'{out.stem}-{r}.npy', np.stack(samples))
    out.write_text(json.dumps(res))


def row_env(env: dict) -> dict:
    """This process's environment with a row's library switches (and only those) set."""
    out = {k: v for k, v in os.environ.items() if k not in ('MAXSUP_STOCK_PILLOW', 'MAXSUP_NO_SIMPLEJPEG')}
    return {**out, **env}


def run_child(root: Path, rows: list[int], env: dict, check: int, passes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'res.json'
        subprocess.run([sys.executable, '-m', 'benchmarks.bench_input_pipeline', '--child', str(root),
                        '--rows', ','.join(map(str, rows)), '--out', str(out), '--check', str(check),
                        '--passes', str(passes)],
                       env=row_env(env), check=True)
        res = {int(k): v for k, v in json.loads(out.read_text()).items()}
        samples = {r: np.load(Path(tmp) / f'res-{r}.npy') for r in rows if check}
    return res, samples


def device_side_cost(n: int = 64) -> float:
    """µs per image of DeviceBatches.process (normalise + random erasing, batched) on this CPU, one thread."""
    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from deit.device_aug import DeviceBatches
    torch.set_num_threads(1)
    db = DeviceBatches([], 'cpu', IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, re_prob=0.25)
    x = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8)
    db.process(x)
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        db.process(x)
        t.append(time.perf_counter() - t0)
    return statistics.median(t) / n * 1e6


def loader_rate(root: Path, opts: dict, workers: int, batches: int, device: str | None = 'cpu',
                batch_size: int = 32) -> float:
    """images/s of a DataLoader with ``workers`` workers and, for uint8 rows, the device-side steps on
    ``device`` (with ``device_aug``: RandAugment there too; None: the loader alone)."""
    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from deit.datasets import device_rand_augment
    from deit.device_aug import DeviceBatches
    from deit.device_decode import DeviceDecoder, collate_encoded
    ds = make_dataset(root, **opts)
    decode = opts.get('gpu_decode') and device is not None
    # one epoch longer than the measurement: with a small set (96 images = 3 batches of 32; the GPU check's
    # 1,024 = 8 batches of 128) every epoch's end drains the pipeline and a worker beyond the epoch's batch
    # count has nothing to do, which made workers look up to 3x slower when many run
    # the warm-up also drains the batches the workers queued while starting (prefetch_factor 2 per worker):
    # measured from a full queue, a short run reports the queue, not the workers (a 14-worker loader read
    # 24 batches at up to 1.6x its rate)
    warm = 3 * workers if workers else 1
    sampler = torch.utils.data.RandomSampler(ds, replacement=True,
                                             num_samples=(batches + warm + 2 * workers + 2) * batch_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         drop_last=True, persistent_workers=True,
                                         pin_memory=device not in ('cpu', None),
                                         collate_fn=collate_encoded if opts.get('gpu_decode') else None)
    if opts.get('uint8', True) and device is not None:
        ra = device_rand_augment(recipe_args()) if opts.get('device_aug') else None
        loader = DeviceBatches(loader, device, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, re_prob=0.25,
                               rand_augment=ra, decoder=DeviceDecoder(224, device, ds) if decode else None)
    it = iter(loader)
    for _ in range(warm):  # every worker started and delivering, the start-up queue drained
        next(it)
    sync = torch.cuda.synchronize if device not in ('cpu', None) else (lambda: None)
    t0, seen = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(it)
        seen += len(x)
    sync()
    return seen / (time.perf_counter() - t0)


def scaling_table(root: Path, workers: list[int], batches: int, batch_size: int = 32) -> None:
    """The default pipeline's DataLoader alone (workers -> uint8 batches, nothing after) for each worker count:
    img/s and img/s per worker, against one worker. A per-worker rate that falls as workers are added is the
    host's limit (shared cores, hyper-threads, memory bandwidth, clocks under all-core load), not the code's."""
    print(f'\nworker scaling, default pipeline, loader alone (batch {batch_size}; {os.cpu_count()} logical CPUs):')
    print(f'  {"workers":>7s} {"img/s":>8s} {"per worker":>10s} {"vs 1 worker":>11s}')
    first = None
    for w in workers:
        code = (f'import json; from benchmarks.bench_input_pipeline import loader_rate, ROWS; '
                f'from pathlib import Path; print(json.dumps(loader_rate(Path({str(root)!r}), ROWS[{DEFAULT}][2], '
                f'{w}, {batches}, None, {batch_size})))')
        rate = float(subprocess.run([sys.executable, '-c', code], env=row_env(ROWS[DEFAULT][1]), check=True,
                                    capture_output=True, text=True).stdout.strip().splitlines()[-1])
        first = first or rate / w
        print(f'  {w:7d} {rate:8.0f} {rate / w:10.0f} {rate / w / first:10.2f}x', flush=True)


def gpu_report(root: Path, batches: int) -> None:
    """On a CUDA machine: every core feeding the GPU, default vs --device-aug, and the GPU's own cost."""
    import torch

    from deit.datasets import device_rand_augment
    workers = max(1, (os.cpu_count() or 2) - 2)
    print(f'DataLoader on {workers} workers -> {torch.cuda.get_device_name()}, batch 128, device-side steps on '
          f'the GPU (img/s):')
    for r in (0, DEFAULT, ALL - 1, ALL, GPU_DECODE):
        print(f'  {ROWS[r][0]:34s} {loader_rate(root, ROWS[r][2], workers, batches, "cuda", 128):8.0f}')
    ra = device_rand_augment(recipe_args())
    x = torch.randint(0, 256, (128, 3, 224, 224), dtype=torch.uint8, device='cuda')
    ra(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        ra(x)
    torch.cuda.synchronize()
    print(f'  --device-aug RandAugment alone on the GPU: {1280 / (time.perf_counter() - t0):.0f} img/s')
    main_us = device_decode_cost(root)
    res, _ = run_child(root, [DEFAULT, GPU_DECODE], {}, 0, 2)
    official, _ = run_child(root, [0], STOCK, 0, 2)
    cores_per_gpu({**official, **res}, main_us)


def device_decode_cost(root: Path, n: int = 128, rounds: int = 5) -> float:
    """--gpu-decode's device half on the GPU, batch ``n``: prints its img/s; returns the training process's
    CPU time per image (µs) that it takes (kernel launches, the per-image crop loop)."""
    import torch

    from deit.device_decode import DeviceDecoder, collate_encoded
    ds = make_dataset(root, **ROWS[GPU_DECODE][2])
    batch = collate_encoded([ds[i % len(ds)] for i in range(n)])
    decoder = DeviceDecoder(224, 'cuda')
    decoder(batch)
    torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        decoder(batch)
    torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f'  --gpu-decode device half alone: {n * rounds / wall:.0f} img/s, {1e6 * cpu / (n * rounds):.0f} us of '
          f'the training process\'s CPU per image')
    return 1e6 * cpu / (n * rounds)


def cores_per_gpu(per_core: dict, main_us: float = 0.0, rate: int = FEED_RATE) -> None:
    """The closing line: cores to feed DeiT-S at ``rate`` img/s, from one-thread img/s per core of the
    workers, plus for --gpu-decode the training process's CPU time per image for the device half
    (``main_us``, measured on a GPU host)."""
    gpu = rate / per_core[GPU_DECODE] + rate * main_us * 1e-6
    print(f'\ncores per GPU to feed DeiT-S at {rate} img/s: official {rate / per_core[0]:.1f}, default '
          f'{rate / per_core[DEFAULT]:.1f}, gpu-decode {gpu:.1f}'
          f'{"" if main_us else " (workers only: the device half is measured with --gpu)"}')


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--images', type=int, default=96)
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--passes', type=int, default=2, help='passes over the set per row and round')
    ap.add_argument('--check', type=int, default=16, help='samples compared pixel by pixel with the official')
    ap.add_argument('--loader-batches', type=int, default=24)
    ap.add_argument('--workdir', type=Path, default=Path(tempfile.gettempdir()) / 'inputbench')
    ap.add_argument('--gpu', action='store_true', help='only the DataLoader -> CUDA report (benchmarks/gpu_check.sh)')
    ap.add_argument('--scaling', type=int, nargs='*', default=None, metavar='WORKERS',
                    help='only the worker-scaling table, for these worker counts (default: 1, 2, 4, ... up to the '
                         'logical CPUs less one)')
    ap.add_argument('--child', type=Path, help=argparse.SUPPRESS)
    ap.add_argument('--rows', help=argparse.SUPPRESS)
    ap.add_argument('--out', type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child, [int(r) for r in a.rows.split(',')], a.out, a.check, a.passes)

    import PIL
    root = a.workdir
    root.mkdir(parents=True, exist_ok=True)
    info = make_caches(root, a.images)
    if a.scaling is not None:
        cpus = os.cpu_count() or 2
        counts = a.scaling or sorted({min(2 ** k, max(cpus - 1, 1)) for k in range(8) if 2 ** k < 2 * cpus})
        return scaling_table(root, counts, a.loader_batches)
    if a.gpu:
        gpu_report(root, a.loader_batches)
        return scaling_table(root, [1, 2, 4, 8, max(1, (os.cpu_count() or 2) - 2)], a.loader_batches, 128)
    print(f'{a.images} ImageNet-like JPEGs (mean {info["mean_kb"]:.0f} KB, {info["large"]} over 150 KB), '
          f'{os.cpu_count()} cores, PIL here {PIL.__version__}; {a.rounds} interleaved rounds, median')
    by_env: dict[tuple, list[int]] = {}
    for r, (_, env, _) in enumerate(ROWS):
        by_env.setdefault(tuple(sorted(env.items())), []).append(r)
    rates: dict[int, list[float]] = {r: [] for r in range(len(ROWS))}
    samples = {}
    for rnd in range(a.rounds):
        for env, rows in by_env.items():
            res, smp = run_child(root, rows, dict(env), a.check if rnd == 0 else 0, a.passes)
            for r, v in res.items():
                rates[r].append(v)
            samples.update(smp)
        print(f'  round {rnd + 1}/{a.rounds} done', flush=True)
    med = {r: statistics.median(v) for r, v in rates.items()}
    ref = samples[0]
    print(f'\n{"pipeline (per core, 1 thread)":34s} {"img/s":>7s} {"ms/img":>7s} {"vs official":>11s} {"step":>6s} '
          f'{"mean diff":>9s} {">2 levels":>9s}')
    for r, (name, _, _) in enumerate(ROWS):
        prev = med[DEFAULT] if r in (5, 6, 7, GPU_DECODE) else med[r - 1] if r else med[0]
        d = np.abs(samples[r] - ref)
        diff = (f'{d.mean():9.3f} {100 * (d > 2).mean():8.3f}%' if not ROWS[r][2].get('device_aug')
                else f'{"(RA on device)":>19s}')
        print(f'{name:34s} {med[r]:7.0f} {1e3 / med[r]:7.2f} {med[r] / med[0]:10.2f}x {med[r] / prev:5.2f}x {diff}')
    dev = device_side_cost()
    print(f'\ndevice-side steps on this CPU (uint8 -> normalise -> random erasing, batch 64): {dev:.0f} us/img '
          f'(on a GPU they leave the CPU; counted in the DataLoader rows below)')
    print('\nDataLoader, 2 workers, batch 32, device-side steps on this CPU (img/s, end to end; --device-aug is '
          'left out: its RandAugment would run on this CPU):')
    lr = {}
    for r in (0, DEFAULT, ALL - 1):
        code = (f'import json,sys; from benchmarks.bench_input_pipeline import loader_rate, ROWS; '
                f'from pathlib import Path; print(json.dumps(loader_rate(Path({str(root)!r}), ROWS[{r}][2], 2, '
                f'{a.loader_batches})))')
        out = subprocess.run([sys.executable, '-c', code], env=row_env(ROWS[r][1]), check=True, capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
        lr[r] = float(out)
        print(f'  {ROWS[r][0]:34s} {lr[r]:7.0f} img/s  {lr[r] / lr.get(0, lr[r]):5.2f}x')
    print(f'\nspeedup per core: default {med[DEFAULT] / med[0]:.2f}x, all opt-ins {med[ALL] / med[0]:.2f}x, '
          f'--gpu-decode\'s workers {med[GPU_DECODE] / med[0]:.2f}x (vs official)')
    cores_per_gpu(med)


if __name__ == '__main__':
    main()
