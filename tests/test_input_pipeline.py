"""The input pipeline: uint8 workers + device-side steps, simplejpeg / pillow-simd with their fallbacks,
the opt-in JPEG draft decoding and downscaled cache, RandAugment and JPEG decoding on the device."""
from __future__ import annotations

import io
import random
import sys
import zipfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation

import data.decode as decode
from data.build_zip_cache import build, entries_from_map, scan_flat_val, shrink
from data.decode import CorruptImageError, LazyJpeg, decode_image, read_image_file
from data.skip import collate_skip_bad
from data.zip_cache import ZipImageDataset
from deit.args import check_args
from deit.recipes import parse_args
from deit.datasets import build_transform, device_rand_augment
from deit.device_aug import _OPS, DeviceBatches
from deit.device_decode import DeviceDecoder, collate_encoded
from deit.transforms import DraftRandomResizedCrop, EncodedImage
from data.zip_index import CacheError
from tests.conftest import TINY, checksums, make_image, make_imagefolder, run_module


def encoded(img: Image.Image, fmt: str = 'JPEG', **save_kw) -> bytes:
    """The file bytes of ``img`` saved as ``fmt``."""
    out = io.BytesIO()
    img.save(out, fmt, **save_kw)
    return out.getvalue()


def photo(w: int, h: int, quality: int = 90) -> bytes:
    """A JPEG of a real photo (scikit-learn's china.jpg) at w x h."""
    from sklearn.datasets import load_sample_images
    return encoded(Image.fromarray(load_sample_images().images[0]).resize((w, h), Image.BICUBIC), quality=quality)


def recipe(**kw) -> Namespace:
    a = dict(data_set='IMNET', input_size=224, color_jitter=0.3, aa='rand-m9-mstd0.5-inc1', train_interpolation='bicubic',
             reprob=0.0, remode='pixel', recount=1, ThreeAugment=False, src=False, prefetcher=True, jpeg_draft=False,
             device_aug=False, eval_crop_ratio=0.875)
    a.update(kw)
    return Namespace(**a)


def seeded(i: int) -> None:
    random.seed(i)
    np.random.seed(i)
    torch.manual_seed(i)


# ---- decoding --------------------------------------------------------------------------------------------

def test_simplejpeg_decode_is_pil_bit_for_bit_and_pil_is_the_fallback(monkeypatch):
    pytest.importorskip('simplejpeg')
    data = photo(500, 375)
    ref = Image.open(io.BytesIO(data)).convert('RGB')
    fast = decode_image(data, 'a.jpg')
    assert np.array_equal(np.asarray(fast), np.asarray(ref))
    calls = []
    real = decode.simplejpeg.decode_jpeg
    monkeypatch.setattr(decode.simplejpeg, 'decode_jpeg', lambda *a, **k: calls.append(1) or real(*a, **k))
    decode_image(data, 'a.jpg')
    assert calls, 'simplejpeg was not used although installed'
    monkeypatch.setenv('MAXSUP_NO_SIMPLEJPEG', '1')  # switched off: PIL decodes, same pixels
    assert np.array_equal(np.asarray(decode_image(data, 'a.jpg')), np.asarray(ref)) and len(calls) == 1
    assert decode.jpeg_decoder().startswith('PIL')
    monkeypatch.delenv('MAXSUP_NO_SIMPLEJPEG')
    monkeypatch.setattr(decode, 'simplejpeg', None)  # not installed
    assert np.array_equal(np.asarray(decode_image(data, 'a.jpg')), np.asarray(ref))


@pytest.mark.parametrize('lazy', [False, True])
def test_truncated_and_cmyk_jpegs_decode_or_fail_naming_the_image(lazy):
    bad = photo(300, 200)[:-2000]
    with pytest.raises(CorruptImageError, match=r'x\.zip@/n1/b\.jpg: cannot decode'):
        img = decode_image(bad, 'x.zip@/n1/b.jpg', lazy=lazy)
        if isinstance(img, LazyJpeg):
            DraftRandomResizedCrop(64)(img)
    buf = io.BytesIO()
    Image.new('CMYK', (120, 80), (0, 255, 0, 0)).save(buf, 'JPEG')  # simplejpeg refuses CMYK: PIL decodes it
    img = decode_image(buf.getvalue(), 'c.jpg', lazy=lazy)
    out = DraftRandomResizedCrop(64)(img) if lazy else img
    assert out.mode == 'RGB' and out.size == ((64, 64) if lazy else (120, 80))


def test_pillow_simd_is_switchable_and_keeps_the_transforms_within_a_level(tmp_path):
    """The .pth of scripts/install_pillow_simd.sh honours MAXSUP_STOCK_PILLOW; the DeiT train transform gives
    the same samples (same draws) with either library: its crops within a fraction of a level on average, the whole transform within
    rounding that a posterize / solarize threshold can amplify in a few pixels."""
    code = ('import sys, numpy as np, PIL; from tests.test_input_pipeline import recipe, photo, seeded; '
            'from deit.datasets import build_transform; from data.decode import decode_image; '
            'img = decode_image(photo(500, 375), "a"); out = []\n'
            'for aa in ("none", "rand-m9-mstd0.5-inc1"):\n tf = build_transform(True, recipe(aa=aa, color_jitter=0))\n'
            ' for i in range(16):\n  seeded(i); out.append(tf(img).numpy())\n'
            'np.save(sys.argv[1], np.stack(out)); print(PIL.__version__)')
    versions = []
    for name, env in (('stock', {'MAXSUP_STOCK_PILLOW': '1'}), ('default', {})):
        r = run_module(['-c', code, str(tmp_path / f'{name}.npy')], env)
        assert r.returncode == 0, r.stderr
        versions.append(r.stdout.strip())
    if (Path(sys.prefix) / 'pillow-simd').is_dir():  # installed by make setup: the switch must take effect
        assert versions[0] != versions[1], versions
    a, b = (np.load(tmp_path / f'{n}.npy').astype(int) for n in ('stock', 'default'))
    crops, full = np.abs(a - b)[:16], np.abs(a - b)[16:]
    # pillow-simd's filters use lower fixed-point precision: measured mean 0.09, max 9 levels on these crops
    assert a.shape == (32, 3, 224, 224) and crops.max() <= 16 and crops.mean() < 0.2, (crops.max(), crops.mean())
    assert full.mean() < 0.5 and (full > 2).mean() < 0.01, (versions, full.mean(), (full > 2).mean())


# ---- uint8 workers + device-side steps --------------------------------------------------------------------

@pytest.mark.parametrize('is_train', [True, False])
def test_uint8_workers_then_device_normalise_equal_the_float_transform(is_train):
    img = decode_image(photo(500, 375), 'a.jpg')
    f32, u8 = build_transform(is_train, recipe(prefetcher=False)), build_transform(is_train, recipe())
    batches = DeviceBatches([], 'cpu', IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    for i in range(4):
        seeded(i)
        ref = f32(img)
        seeded(i)
        raw = u8(img)
        assert raw.dtype == torch.uint8 and raw.shape == ref.shape == (3, 224, 224)
        assert torch.allclose(batches.process(raw[None])[0], ref, atol=1e-5)


def test_device_random_erasing_keeps_the_rate_and_demo_stats():
    torch.manual_seed(0)
    x = torch.full((400, 3, 32, 32), 128, dtype=torch.uint8)
    out = DeviceBatches([], 'cpu', (0.5,) * 3, (0.5,) * 3, re_prob=0.25).process(x)
    erased = (out.flatten(1) != out.flatten(1)[:, :1]).any(1).float().mean().item()
    assert 0.18 < erased < 0.32  # 0.25 +- 4 sigma
    demo = Namespace(data_set='DEMO', input_size=32)
    assert build_transform(False, Namespace(**vars(demo), prefetcher=True))(Image.new('RGB', (8, 8))).dtype == torch.uint8
    with pytest.raises(TypeError, match='expects uint8'):
        DeviceBatches([], 'cpu', (0.5,) * 3, (0.5,) * 3).process(torch.zeros(2, 3, 4, 4))
    empty = collate_skip_bad([None, None])  # every image skipped: passes through for the engine to skip
    assert DeviceBatches([], 'cpu', (0.5,) * 3, (0.5,) * 3).process(empty[0]).numel() == 0


# ---- opt-ins ----------------------------------------------------------------------------------------------

def test_draft_crop_keeps_timms_draws_and_reduces_only_large_crops():
    data = photo(1600, 1200)
    ref_tf = RandomResizedCropAndInterpolation(224, interpolation='bicubic')
    draft_tf = DraftRandomResizedCrop(224, interpolation='bicubic')
    reduced = 0
    for i in range(12):
        seeded(i)
        ref = np.asarray(ref_tf(decode_image(data, 'a'))).astype(int)
        after_ref = random.random()
        seeded(i)
        img = decode_image(data, 'a', lazy=True)
        i_, j_, h, w = RandomResizedCropAndInterpolation.get_params(img.header, ref_tf.scale, ref_tf.ratio)
        seeded(i)
        out = np.asarray(draft_tf(img)).astype(int)
        assert random.random() == after_ref  # the same random calls, in the same order
        if min(h, w) < 448:
            assert np.array_equal(out, ref)  # crop < 2x output: timm's pixels exactly
        else:
            reduced += 1
            assert np.abs(out - ref).mean() < 3.0  # scaled IDCT instead of the bicubic reduction
    assert reduced >= 3


def test_build_cache_max_size_downscales_large_images_only(tmp_path):
    src = make_imagefolder(tmp_path / 'src', n_classes=2, n_train=2, n_val=1, size=40)
    big = src / 'train' / 'class_0' / 'big.jpg'
    big.write_bytes(photo(1200, 800, quality=95))
    build(src, tmp_path / 'out', max_size=500, quality=90)
    with zipfile.ZipFile(tmp_path / 'out' / 'train.zip') as zf:
        shrunk = Image.open(io.BytesIO(zf.read('class_0/big.jpg')))
        assert shrunk.size == (500, 333) and len(zf.read('class_0/big.jpg')) < big.stat().st_size
        small = src / 'train' / 'class_1' / '000.jpg'
        assert zf.read('class_1/000.jpg') == small.read_bytes()  # byte for byte: no second generation loss
    ds = ZipImageDataset(tmp_path / 'out' / 'train.zip', tmp_path / 'out' / 'train_map.txt')
    assert ds.load(0).size  # CRCs of the re-encoded members match
    big.write_bytes(b'not a jpeg')
    with pytest.raises(Exception, match=r'big\.jpg: cannot decode image for --max-size'):
        build(src, tmp_path / 'out2', max_size=500)


@pytest.mark.parametrize('decoder', ['simplejpeg', 'PIL'])
def test_decode_reduced_gives_ceil_of_each_side_over_the_factor(decoder, monkeypatch):
    """Odd sides (most ImageNet photos) round up; with simplejpeg, sides of 1 pixel make each minimum count on
    its own (the other side would allow a smaller scale)."""
    if decoder == 'PIL':
        monkeypatch.setenv('MAXSUP_NO_SIMPLEJPEG', '1')
    elif decode.simplejpeg is None:
        pytest.skip('simplejpeg is not installed')
    rng = np.random.default_rng(0)
    for size in ((37, 23), (500, 375)) + (((64, 1), (1, 64)) if decoder == 'simplejpeg' else ()):
        for mode in ('RGB', 'L'):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            img = Image.fromarray(pixels).convert(mode)
            data = encoded(img, quality=90)
            for reduce in (1, 2, 4, 8):
                out = decode.decode_reduced(LazyJpeg(data, 'x.jpg', None), reduce)
                assert out.mode == 'RGB' and out.size == (-(-size[0] // reduce), -(-size[1] // reduce)), (
                    size, mode, reduce)
    if decoder == 'PIL':  # a side below 2 x the factor: PIL's scale comes from the other side alone
        for size, expect in (((3, 40), (2, 20)), ((40, 3), (20, 2))):
            data = encoded(Image.new('RGB', size, (9, 99, 199)), quality=90)
            assert decode.decode_reduced(LazyJpeg(data, 'x.jpg', None), 2).size == expect
    cmyk = encoded(Image.new('CMYK', (40, 24), (10, 20, 30, 0)), quality=90)  # PIL drafts RGB and grey only
    assert decode.decode_reduced(LazyJpeg(cmyk, 'c.jpg', None), 2).size == ((40, 24) if decoder == 'PIL' else (20, 12))


def test_pixel_limit_is_twice_pils_bomb_limit_from_the_header(monkeypatch):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 50)
    decode.check_pixel_count(10, 10, 'ok.jpg')  # exactly 2 x the limit: allowed, as PIL allows it
    with pytest.raises(CorruptImageError, match=r"^big\.jpg: 10 x 11 pixels is over PIL's decompression-bomb limit "
                                                r"\(100 pixels; PIL\.Image\.MAX_IMAGE_PIXELS\)$"):
        decode.check_pixel_count(10, 11, 'big.jpg')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', None)  # the limit switched off
    decode.check_pixel_count(10**5, 10**5, 'huge.jpg')


def test_a_jpeg_whose_header_is_broken_is_named_when_opened_lazily():
    with pytest.raises(CorruptImageError, match=r'^bad\.jpg: cannot decode image \('):
        decode_image(b'\xff\xd8\xff\xe0 not a JPEG header at all', 'bad.jpg', lazy=True)


def test_non_jpeg_images_decode_to_rgb():
    for mode in ('L', 'P', 'RGBA', 'I;16'):
        img = Image.new(mode, (5, 4))
        assert decode.decode_image(encoded(img, 'PNG'), 'x.png').mode == 'RGB', mode


def test_shrink_keeps_the_limit_size_and_reencodes_with_the_area_filter_at_the_quality_asked(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (64, 96), dtype=np.uint8)  # grey noise: no chroma loss
    noise = Image.fromarray(grey).convert('RGB')
    at_limit = encoded(noise, 'PNG')
    assert shrink(at_limit, tmp_path / 'a.png', 96, 90) == at_limit  # a longer side of max_size: byte for byte
    out = Image.open(io.BytesIO(shrink(at_limit, tmp_path / 'a.png', 48, 100)))
    assert out.format == 'JPEG' and out.size == (48, 32)
    reference = io.BytesIO()
    noise.resize((48, 32), Image.BOX).save(reference, 'JPEG', quality=100)
    assert out.quantization == Image.open(reference).quantization  # quality 100's tables
    got = np.asarray(out, np.float32)
    box = np.asarray(noise.resize((48, 32), Image.BOX), np.float32)
    bicubic = np.asarray(noise.resize((48, 32), Image.BICUBIC), np.float32)
    assert np.abs(got - box).mean() < 2 < 5 < np.abs(got - bicubic).mean()  # the area filter, not the default
    rgba = Image.new('RGBA', (80, 40), (200, 10, 10, 128))
    assert Image.open(io.BytesIO(shrink(encoded(rgba, 'PNG'), tmp_path / 'b.png', 40, 90))).mode == 'RGB'
    for size, expect in (((400, 2), (100, 1)), ((2, 400), (1, 100))):  # a side never rounds to 0, nor up to 2
        thin = encoded(Image.new('RGB', size, (9, 9, 9)), 'PNG')
        assert Image.open(io.BytesIO(shrink(thin, tmp_path / 'c.png', 100, 90))).size == expect


def test_official_map_listing_an_image_twice_is_refused_naming_the_line(tmp_path):
    split = make_imagefolder(tmp_path / 'src', n_classes=2, n_train=2, n_val=1)
    (tmp_path / 'map.txt').write_text('class_0/000.jpg\t0\nclass_1/000.jpg\t1\nclass_0/000.jpg\t0\n')
    with pytest.raises(CacheError, match=r"map\.txt:3: image 'class_0/000\.jpg' listed twice"):
        entries_from_map(split / 'train', tmp_path / 'map.txt')


def test_flat_val_labels_by_name_or_index_and_errors_naming_the_line(tmp_path):
    val = tmp_path / 'val'
    val.mkdir()
    for i in range(3):
        make_image(i, 0).save(val / f'v{i}.JPEG')
    labels = tmp_path / 'labels.txt'
    labels.write_text('v2.JPEG 2\nv0.JPEG b\nv1.JPEG 0\n')  # a class name or a label index
    assert scan_flat_val(val, labels, ['a', 'b', 'c']) == [('v0.JPEG', 1), ('v1.JPEG', 0), ('v2.JPEG', 2)]
    for text, message in (('v0.JPEG a\nv1.JPEG\n', r':2: expected "<image name> <class or label>", got '
                                                    r"'v1\.JPEG\\n'"),
                          ('v0.JPEG a\nv1.JPEG 3\n', r":2: unknown class '3'"),  # one past the last label
                          ('v0.JPEG zebra\n', r":1: unknown class 'zebra'"),
                          ('v0.JPEG a\nv9.JPEG a\n', r":2: image 'v9\.JPEG' not found in .*val")):
        labels.write_text(text)
        with pytest.raises(CacheError, match=r'labels\.txt' + message):
            scan_flat_val(val, labels, ['a', 'b', 'c'])


def test_lazy_dataset_skips_a_truncated_jpeg_found_inside_the_draft_crop(tmp_path):
    src = make_imagefolder(tmp_path / 'src', n_classes=2, n_train=2, n_val=1, size=64)
    bad = src / 'train' / 'class_0' / '001.jpg'
    bad.write_bytes(bad.read_bytes()[:-300])
    build(src, tmp_path / 'out')
    tf = build_transform(True, recipe(jpeg_draft=True, input_size=48, aa='none'))
    paths = (tmp_path / 'out' / 'train.zip', tmp_path / 'out' / 'train_map.txt')
    ds = ZipImageDataset(*paths, transform=tf)
    assert ds.lazy_decode
    with pytest.raises(CorruptImageError, match=r'train\.zip@/class_0/001\.jpg'):
        ds[1]
    ds = ZipImageDataset(*paths, transform=tf, skip_bad=True)
    assert ds[1] is None and ds.pop_skipped() == 1 and ds[0][0].shape == (3, 48, 48)


# ---- JPEG decoding on the device (--gpu-decode; on a CPU the same code decodes on the CPU) ---------------

def deferred_pair(**kw):
    """(default pipeline, --gpu-decode worker transform) for the same recipe."""
    return build_transform(True, recipe(aa='none', color_jitter=0.0, **kw)), \
        build_transform(True, recipe(aa='none', color_jitter=0.0, gpu_decode=True, **kw))


def pixel_gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, int]:
    """mean |a - b|, share of values off by more than 2 levels, max |a - b| (uint8 images)."""
    d = (a.int() - b.int()).abs()
    return d.float().mean().item(), (d > 2).float().mean().item(), d.max().item()


# the resize differs (torch's antialiased bicubic in float vs PIL's two uint8 passes); measured: mean 0.14,
# 0.01 % over 2 levels, max 10 on 32 ImageNet-sized photos
GPU_DECODE_TOLERANCE = dict(mean=0.3, over_2=0.002, max=24)


@pytest.mark.parametrize('interpolation', ['bicubic', 'random'])
def test_gpu_decode_keeps_timms_crops_and_flips_and_the_default_pixels(interpolation):
    default, deferred = deferred_pair(train_interpolation=interpolation)
    images = [photo(w, h) for w, h in ((500, 375), (375, 500), (333, 500), (640, 480), (200, 150), (500, 500))]
    rrc = default.transforms[0]
    refs, samples = [], []
    for k, data in enumerate(images * 3):
        seeded(k)  # timm's draws, made by hand: crop box, interpolation, flip
        box = RandomResizedCropAndInterpolation.get_params(decode_image(data, 'a'), rrc.scale, rrc.ratio)
        interp = random.choice(rrc.interpolation) if interpolation == 'random' else rrc.interpolation
        flip = bool(torch.rand(1) < 0.5)
        seeded(k)
        enc = deferred(decode_image(data, f'img{k}', lazy=True))
        assert isinstance(enc, EncodedImage) and enc.name == f'img{k}'
        assert (enc.box, enc.interpolation, enc.flip) == (box, interp.value, flip)
        seeded(k)
        refs.append(default(decode_image(data, 'a')))
        samples.append((enc, k))
    assert {s.flip for s, _ in samples} == {True, False}
    images, targets = DeviceDecoder(224, 'cpu')(collate_encoded(samples))
    assert images.dtype == torch.uint8 and targets.tolist() == list(range(len(samples)))
    mean, over_2, worst = pixel_gap(images, torch.stack(refs))
    tol = GPU_DECODE_TOLERANCE
    assert mean < tol['mean'] and over_2 < tol['over_2'] and worst <= tol['max'], (mean, over_2, worst)


def odd_images(root: Path) -> Path:
    """One class folder with the images the device decoder cannot take, named by kind, and two it can."""
    d = root / 'train' / 'a'
    d.mkdir(parents=True)
    rgb = photo(160, 120)
    gray, cmyk, png = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.open(io.BytesIO(rgb)).convert('L').save(gray, 'JPEG', quality=90)
    Image.open(io.BytesIO(rgb)).convert('CMYK').save(cmyk, 'JPEG', quality=90)
    Image.open(io.BytesIO(rgb)).save(png, 'PNG')
    sos = rgb.index(b'\xff\xda')  # header intact, scan data broken, end marker present: only decoding finds out
    broken = rgb[:sos + 20] + b'\xff\x55' * ((len(rgb) - sos - 22) // 2) + b'\xff\xd9'
    for name, data in (('0_rgb.jpg', rgb), ('1_broken.jpg', broken), ('2_gray.jpg', gray.getvalue()),
                       ('3_cmyk.jpg', cmyk.getvalue()), ('4_png.png', png.getvalue()),
                       ('5_truncated.jpg', rgb[:-400])):
        (d / name).write_bytes(data)
    return root / 'train'


def test_gpu_decode_waits_for_the_queued_work_before_the_cuda_decoder_writes(tmp_path, monkeypatch):
    """torchvision's CUDA decoder writes from a stream that does not wait for the caller's (pytorch/vision
    PR 9606): the stream is synchronised first. Imitated on the CPU: the order of the two calls."""
    import deit.device_decode as dd
    calls = []

    class Stream:
        def synchronize(self):
            calls.append('synchronize')

    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: Stream())
    monkeypatch.setattr(dd, 'decode_jpeg', lambda jpegs, mode, device: calls.append('decode') or
                        [torch.zeros(3, 8, 8, dtype=torch.uint8) for _ in jpegs])
    from deit.datasets import CheckedImageFolder
    ds = CheckedImageFolder(str(odd_images(tmp_path)), transform=deferred_pair(input_size=64)[1])
    batch = collate_encoded([ds[0], ds[2]])  # two JPEGs handed over as bytes
    assert len(dd.DeviceDecoder(64, 'cuda').decode(batch)) == 2 and calls == ['synchronize', 'decode']
    calls.clear()
    dd.DeviceDecoder(64, 'cpu').decode(batch)
    assert calls == ['decode']  # nothing to wait for on the CPU


def test_gpu_decode_falls_back_per_image_as_the_cpu_path(tmp_path):
    from deit.datasets import CheckedImageFolder
    default, deferred = deferred_pair(input_size=64)
    folder = odd_images(tmp_path)
    ds = CheckedImageFolder(str(folder), transform=deferred)
    kinds = [type(ds[i][0]).__name__ for i in (0, 2, 3, 4)]
    assert kinds == ['EncodedImage', 'EncodedImage', 'Tensor', 'Tensor']  # RGB and gray to the device
    with pytest.raises(CorruptImageError, match='5_truncated.jpg'):  # no end marker: the worker's decoder decides
        ds[5]
    assert isinstance(ds[1][0], EncodedImage)  # looks complete: found out on the device
    with pytest.raises(CorruptImageError, match='1_broken.jpg'):
        DeviceDecoder(64, 'cpu', ds)(collate_encoded([ds[0], ds[1]]))

    good = [0, 2, 3, 4]
    samples, refs = [], []
    for k in good:
        seeded(k)
        samples.append(ds[k])
        seeded(k)
        refs.append(default(decode_image(read_image_file(ds.samples[k][0]), 'a')))
    images, _ = DeviceDecoder(64, 'cpu', ds)(collate_encoded(samples))
    assert pixel_gap(images, torch.stack(refs))[1] < GPU_DECODE_TOLERANCE['over_2']
    assert torch.equal(images[2:], torch.stack(refs[2:]))  # decoded in the worker: the default path itself

    ds = CheckedImageFolder(str(folder), transform=deferred, skip_bad=True)
    batch = [ds[k] for k in (0, 1, 2, 5)]  # the truncated one is None already; the broken one fails on the device
    assert batch[3] is None and ds.pop_skipped() == 1
    images, targets = DeviceDecoder(64, 'cpu', ds)(collate_encoded(batch))
    assert len(images) == len(targets) == 2 and ds.pop_skipped() == 1  # [rgb, gray]: even, the broken one counted


def test_gpu_decode_takes_the_host_decoder_when_the_device_one_rejects_an_image(monkeypatch):
    """An image nvJPEG cannot decode (e.g. arithmetic coding) is decoded by the host: the same pixels."""
    import deit.device_decode as dd
    _, deferred = deferred_pair()
    samples = []
    for k, (w, h) in enumerate(((500, 375), (300, 400), (640, 480))):
        seeded(k)
        samples.append((deferred(decode_image(photo(w, h), f'img{k}', lazy=True)), k))
    batch = collate_encoded(samples)
    expected, _ = DeviceDecoder(224, 'cpu')(batch)
    real, rejected = dd.decode_jpeg, len(batch.data[batch.offsets[1]:batch.offsets[2]])

    def picky(jpegs, **kw):  # fails on image 1, alone or in a batched call
        if any(len(j) == rejected for j in (jpegs if isinstance(jpegs, list) else [jpegs])):
            raise RuntimeError('nvjpeg: unsupported JPEG')
        return real(jpegs, **kw)
    monkeypatch.setattr(dd, 'decode_jpeg', picky)
    images, targets = DeviceDecoder(224, 'cpu')(batch)
    assert targets.tolist() == [0, 1, 2] and torch.equal(images, expected)


def test_gpu_decode_flags_are_checked_and_train_end_to_end_with_workers(tmp_path):
    for flags, msg in ((['--no-prefetcher'], 'needs --prefetcher'), ([], 'add --device-aug'),
                       (['--aa', 'none', '--color-jitter', '0.4'], 'add --color-jitter 0'),
                       (['--device-aug', '--jpeg-draft'], 'choose one'),
                       (['--device-aug', '--input-size', '32'], 'padded and cropped'),
                       (['--device-aug', '--train-interpolation', 'lanczos'], 'bicubic, bilinear')):
        with pytest.raises(ValueError, match=msg):
            check_args(parse_args(['--data-path', 'x', '--gpu-decode', *flags]))
    with pytest.raises(ValueError, match='DEMO'):
        check_args(parse_args(['--data-set', 'DEMO', '--gpu-decode', '--device-aug']))
    src = make_imagefolder(tmp_path / 'src', n_classes=2, n_train=8, n_val=2, size=64)
    build(src, tmp_path / 'cache')
    flags = [f for f in TINY if f not in ('none',)]
    flags[flags.index('--aa') + 1:flags.index('--aa') + 1] = ['rand-m9-mstd0.5-inc1']
    runs = {}
    for workers, data in ((0, ['--cache', '--data-path', str(tmp_path / 'cache')]),
                          (2, ['--cache', '--data-path', str(tmp_path / 'cache')]),
                          (2, ['--data-path', str(src)])):
        out = tmp_path / f'run{len(runs)}'
        r = run_module(['-m', 'deit.main', '--data-set', 'IMNET', *data, *flags, '--input-size', '48',
                        '--epochs', '1', '--device-aug', '--gpu-decode', '--reprob', '0.25',
                        '--num_workers', str(workers), '--output_dir', str(out)])
        assert r.returncode == 0, r.stderr[-3000:]
        assert 'JPEG decode by torchvision.io.decode_jpeg on the device' in r.stdout
        runs[len(runs)] = checksums(r.stdout)
    # per-sample seeds: the same crops and flips with or without workers, from the cache or the folder
    assert runs[0] == runs[1] == runs[2] and runs[0]


# ---- RandAugment on the device ----------------------------------------------------------------------------

def test_device_ops_follow_pil():
    """Colour/LUT ops within 1 level of timm's PIL ops; affine ops geometrically exact (nearest)."""
    from timm.data.auto_augment import rand_augment_transform
    img = decode_image(photo(224, 224), 'a')
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
    ra = rand_augment_transform('rand-m9-mstd0.5-inc1', {'img_mean': (124, 116, 104), 'interpolation': Image.BICUBIC})
    for op in ra.ops:
        random.seed(3)
        args = op.level_fn(7.0, op.hparams) if op.level_fn else ()
        ref = np.asarray(op.aug_fn(img, *args, **op.kwargs)).astype(int)
        out = _OPS[op.aug_fn.__name__](x.clone(), torch.tensor([args], dtype=torch.float32).reshape(1, -1),
                                       mode=3, fill=(124, 116, 104))[0].permute(1, 2, 0).numpy().astype(int)
        d = np.abs(out - ref)
        if op.aug_fn.__name__ in ('rotate', 'shear_x', 'shear_y', 'translate_x_rel', 'translate_y_rel'):
            assert d.mean() < 1.5, op.name  # bicubic a=-0.75 (torch) vs -0.5 (PIL)
        else:
            assert d.max() <= 1, (op.name, d.max())
    for deg in (90.0, 30.0, -17.0):
        ref = np.asarray(img.rotate(deg, resample=Image.NEAREST, fillcolor=(1, 2, 3))).astype(int)
        out = _OPS['rotate'](x.clone(), torch.tensor([[deg]]), mode=0, fill=(1, 2, 3))[0].permute(1, 2, 0).numpy()
        assert (np.abs(out - ref) > 0).mean() < 0.002, deg  # ties of nearest-pixel rounding only
    ref = np.asarray(img.transform(img.size, Image.AFFINE, (1, 0, 31, 0, 1, -12), fillcolor=(9, 9, 9))).astype(int)
    out = _OPS['translate_x_abs'](_OPS['translate_y_abs'](x.clone(), torch.tensor([[-12.]]), mode=0, fill=(9, 9, 9)),
                                  torch.tensor([[31.]]), mode=0, fill=(9, 9, 9))
    assert np.array_equal(out[0].permute(1, 2, 0).numpy().astype(int), ref)


def test_device_rand_augment_draws_like_timm_and_changes_images_as_much():
    """Same draw distribution (ops, 50 % apply, magnitude noise) and a like-sized effect on real images."""
    args = recipe()
    dra = device_rand_augment(args)
    seeded(0)
    draws = dra.draws(4000)
    applied = [d for row in draws for d in row if d is not None]
    assert 0.47 < len(applied) / 8000 < 0.53
    counts = np.bincount([sorted({d[0] for d in applied}).index(d[0]) for d in applied])
    assert len(counts) == 15 and counts.min() > 0.8 * counts.mean()
    levels = [d[1][0] for d in applied if d[0] == 'rotate']
    assert 20 < np.mean(np.abs(levels)) < 34 and 0.4 < np.mean(np.array(levels) > 0) < 0.6  # 27 deg, +-
    img = decode_image(photo(224, 224), 'a')
    base = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    cpu = dra.ra  # timm's PIL RandAugment with create_transform's hparams: the CPU path's
    seeded(1)
    cpu_change = np.mean([np.abs(np.array(cpu(img)).astype(int) - np.array(img).astype(int)).mean() for _ in range(200)])
    seeded(1)
    out = dra(base.expand(200, -1, -1, -1).contiguous())
    assert out.dtype == torch.uint8 and out.shape == (200, 3, 224, 224)
    dev_change = (out.int() - base.int()).abs().float().mean().item()
    assert abs(dev_change - cpu_change) < 0.15 * cpu_change, (dev_change, cpu_change)


def test_prefetcher_flags_are_checked_and_train_end_to_end(tmp_path):
    for flags, msg in ((['--device-aug', '--no-prefetcher'], 'needs --prefetcher'),
                       (['--device-aug', '--aa', 'none'], 'has none to move'),
                       (['--jpeg-draft', '--ThreeAugment'], '3-Augment')):
        with pytest.raises(ValueError, match=msg):
            check_args(parse_args(['--data-set', 'DEMO', *flags]))
    src = make_imagefolder(tmp_path / 'src', n_classes=2, n_train=8, n_val=2, size=48)
    build(src, tmp_path / 'cache')
    flags = [f for f in TINY if f not in ('none',)]
    flags[flags.index('--aa') + 1:flags.index('--aa') + 1] = ['rand-m9-mstd0.5-inc1']
    r = run_module(['-m', 'deit.main', '--data-set', 'IMNET', '--cache', '--data-path', str(tmp_path / 'cache'),
                    *flags, '--input-size', '48', '--epochs', '1', '--device-aug', '--jpeg-draft', '--reprob', '0.25', '--output_dir',
                    str(tmp_path / 'run')])
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'RandAugment on the device, JPEG draft decoding' in r.stdout and 'Final accuracy' in r.stdout
