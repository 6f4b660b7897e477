"""Datasets and transforms: ImageFolder (ImageNet / CIFAR folder layouts), the ZIP cache, the demo set.

``build_dataset(is_train, args) -> (dataset, nb_classes)``.
  IMNET    ``<data-path>/{train,val}/<class>/<img>``, or with ``--cache`` the ZIP cache in ``<data-path>``
           (``train.zip``, ``val.zip``, ``train_map.txt``, ``val_map.txt``; see ``data/``)
  CIFAR10 / CIFAR100   the official python-pickle archive (data/cifar.py), or the same folder layout as IMNET
                       (``val`` or ``test`` for evaluation)
  CIFAR10_LT / CIFAR100_LT   long-tailed training subset (--imbalance-ratio), balanced test set
  CIFAR10C  CIFAR-10-C's corruptions as the evaluation split (CIFAR-10's archive for training)
  CUB / CARS   CUB-200-2011 and Stanford Cars in their official layouts (train/test splits as released)
  DEMO     scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes) upscaled, with a fixed
           stratified 75/25 split: a real data set that ships inside an installed package.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import datasets, transforms

from data.cifar import (IMBALANCE_RATIO, ArrayImageDataset, archive_folder, long_tailed_indices, read_cifar,
                        read_corruptions)
from data.fine_grained import CARS_CLASSES, CUB_CLASSES, ImageListDataset, cars_samples, cub_samples
from data.skip import SkipCounter
from data.zip_cache import ZipImageDataset
from deit import distributed as du
from deit.device_aug import DeviceRandAugment
from deit.transforms import DraftRandomResizedCrop, defer_decoding

DEMO_SIZE = 32  # digits are 8x8; 4x upscaling keeps strokes visible to a patch-4 ViT
DEMO_MEAN, DEMO_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's digits as RGB PIL images; split 'train' (1347) or 'val' (450), fixed by seed 0."""

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str = 'train', transform=None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ('train', 'val'):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        d = load_digits()
        idx = np.arange(len(d.target))
        tr, va = train_test_split(idx, test_size=0.25, random_state=0, stratify=d.target)
        sel = tr if split == 'train' else va
        imgs = (d.images[sel] * (255.0 / 16.0)).round().astype(np.uint8)  # pixel values are 0..16
        self.images = imgs
        self.targets = d.target[sel].astype(np.int64).tolist()
        self.transform = transform
        self.samples = [(f'digits/{split}/{i}', t) for i, t in zip(sel.tolist(), self.targets)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i], mode='L').resize((DEMO_SIZE, DEMO_SIZE), Image.BICUBIC)
        img = img.convert('RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


class CheckedImageFolder(SkipCounter, datasets.ImageFolder):
    """ImageFolder with the ZIP cache's contract: an unreadable image is an error naming the file, or, with
    ``skip_bad`` (``--skip-bad-images``), dropped from its batch and counted - never replaced."""

    def __init__(self, root, transform=None, skip_bad: bool = False):
        datasets.ImageFolder.__init__(self, root, transform=transform)
        SkipCounter.__init__(self, skip_bad)

    def __getitem__(self, i: int):
        return self._sample_file(*self.samples[i])


def _folder(root: Path, split_names: tuple[str, ...], transform, skip_bad: bool = False) -> datasets.ImageFolder:
    for name in split_names:
        if (root / name).is_dir():
            path = root / name
            break
    else:
        raise FileNotFoundError(f'no {" or ".join(split_names)} folder under {root}')
    try:
        ds = CheckedImageFolder(str(path), transform=transform, skip_bad=skip_bad)
    except FileNotFoundError as e:  # torchvision: "Found no valid file for the classes ..."
        raise FileNotFoundError(f'{path}: {e}') from e
    return ds


def build_dataset(is_train: bool, args, transform=None):
    """The train or val split; ``transform`` overrides the split's default (e.g. eval transforms on train)."""
    transform = transform if transform is not None else build_transform(is_train, args)
    name = args.data_set
    if name == 'DEMO':
        return DigitsDataset('train' if is_train else 'val', transform), 10
    if not args.data_path:
        raise ValueError(f'--data-path is required for --data-set {name} (use --data-set DEMO for the built-in '
                         f'demo set)')
    root = Path(args.data_path)
    skip_bad = getattr(args, 'skip_bad_images', False)
    if not root.is_dir():
        raise FileNotFoundError(f'data path does not exist or is not a folder: {root}')
    if getattr(args, 'cache', False) and name != 'IMNET':
        raise ValueError(f'--cache reads the ImageNet ZIP cache (train.zip, val.zip, *_map.txt); it works with '
                         f'--data-set IMNET, not {name}')
    if name == 'IMNET':
        if getattr(args, 'cache', False):
            split = 'train' if is_train else 'val'
            ds = ZipImageDataset.from_folder(root, split, transform=transform,
                                             cache_mode=getattr(args, 'cache_mode', 'full'),
                                             skip_bad=getattr(args, 'skip_bad_images', False),
                                             rank=du.get_rank(), world_size=du.get_world_size())
            return ds, ds.num_classes
        ds = _folder(root, ('train',) if is_train else ('val',), transform, skip_bad)
    elif name in FINE_GRAINED:
        samples, classes = FINE_GRAINED[name]
        return ImageListDataset(samples(root, is_train), classes, transform, skip_bad), classes
    elif name in CIFAR_ARRAYS or name in ('CIFAR10', 'CIFAR100') and archive_folder(root, name):
        return cifar_arrays(name, root, is_train, transform, getattr(args, 'imbalance_ratio', IMBALANCE_RATIO))
    elif name in ('CIFAR10', 'CIFAR100', 'FOLDER'):
        ds = _folder(root, ('train',) if is_train else ('val', 'test'), transform, skip_bad)
        expected = {'CIFAR10': 10, 'CIFAR100': 100}.get(name)
        if expected and len(ds.classes) != expected:
            raise ValueError(f'{name} expects {expected} class folders, found {len(ds.classes)} in {ds.root}')
    else:
        raise ValueError(f'unknown --data-set {name!r}; choose one of {", ".join(DATA_SETS)}')
    return ds, len(ds.classes)


# data sets read from arrays (data/cifar.py): long-tailed CIFAR (train: the subset of --imbalance-ratio; val: the
# balanced test set) and CIFAR-10-C (val: every corruption and severity; train: CIFAR-10's)
CIFAR_ARRAYS = ('CIFAR10_LT', 'CIFAR100_LT', 'CIFAR10C')
# the official README's fine-grained sets, from their official layouts (data/fine_grained.py)
FINE_GRAINED = {'CUB': (cub_samples, CUB_CLASSES), 'CARS': (cars_samples, CARS_CLASSES)}
DATA_SETS = ('IMNET', 'CIFAR10', 'CIFAR100', *CIFAR_ARRAYS, *FINE_GRAINED, 'FOLDER', 'DEMO')


def cifar_arrays(name: str, root: Path, is_train: bool, transform, imbalance_ratio: float):
    """CIFAR read from the official pickle archives (CIFAR10/CIFAR100 when ``root`` holds one), its long-tailed
    training subsets and CIFAR-10-C: (dataset, nb_classes)."""
    base = 'CIFAR100' if name.startswith('CIFAR100') else 'CIFAR10'
    classes = 100 if base == 'CIFAR100' else 10
    if name == 'CIFAR10C' and not is_train:
        images, labels, _ = read_corruptions(root)
        return ArrayImageDataset(images, labels, classes, transform), classes
    images, labels = read_cifar(root, base, is_train)
    if name.endswith('_LT') and is_train:
        keep = long_tailed_indices(labels, imbalance_ratio)
        images, labels = images[keep], labels[keep]
    return ArrayImageDataset(images, labels, classes, transform), classes


def check_same_classes(train, val) -> None:
    """The val split must have train's classes: ImageFolder numbers class folders by sorted name, so a renamed,
    missing or extra folder would silently shift every label after it. The ZIP cache's val labels are
    checked against the train map when it is opened; there only the counts are compared."""
    a, b = getattr(train, 'classes', None), getattr(val, 'classes', None)
    if a is None or b is None:
        na, nb = getattr(train, 'num_classes', None), getattr(val, 'num_classes', None)
        if na is not None and nb is not None and na != nb:
            raise ValueError(f'train set has {na} classes but val set has {nb}')
        return
    if list(a) != list(b):
        where = f' ({getattr(val, "root", "")} vs {getattr(train, "root", "")})' if hasattr(val, 'root') else ''
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        what = '; '.join(f'{label} {names[:5]}{" ..." if len(names) > 5 else ""}' for label, names in
                         (('missing in val:', missing), ('not in train:', extra)) if names)
        raise ValueError(f'the val classes differ from the train classes{where}: {what or "another order"}; '
                         f'ImageFolder numbers classes by sorted folder name, so the labels would not match')


def eval_data_set(given: str | None, cache: bool, recorded: dict | None = None) -> str:
    """The data set a tool evaluates on: the flag, else IMNET with --cache, else the checkpoint's, else FOLDER."""
    if given:
        return given
    if cache:
        return 'IMNET'
    return (recorded or {}).get('data_set') or 'FOLDER'


def eval_split(data_set: str, data_path, split: str, input_size: int, cache: bool = False,
               crop_ratio: float | None = None):
    """A split with evaluation transforms, for tools (evaluation, analysis): returns (dataset, nb_classes)."""
    from argparse import Namespace
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    args = Namespace(data_set=data_set, data_path=data_path, input_size=input_size, cache=cache,
                     cache_mode='no', skip_bad_images=False, eval_crop_ratio=crop_ratio or DEFAULT_CROP_RATIO)
    return build_dataset(split == 'train', args, transform=build_transform(False, args))


def subset(ds, max_samples: int | None, seed: int = 0):
    """A fixed-seed random subset when the split is larger than max_samples (for speed on ImageNet)."""
    if not max_samples or len(ds) <= max_samples:
        return ds
    idx = np.random.default_rng(seed).choice(len(ds), max_samples, replace=False)
    return torch.utils.data.Subset(ds, np.sort(idx).tolist())


def eval_loader(data_set: str, data_path, split: str, input_size: int, cache: bool = False,
                crop_ratio: float | None = None, batch_size: int = 128, num_workers: int = 2,
                max_samples: int | None = None, seed: int = 0, wrap=None):
    """(loader, nb_classes) of a split with evaluation transforms: the one path tools evaluate through.

    ``max_samples``: a fixed-seed subset; ``wrap``: a dataset wrapper (e.g. a corruption)."""
    ds, nb = eval_split(data_set, data_path, split, input_size, cache, crop_ratio)
    ds = subset(ds, max_samples, seed)
    if wrap is not None:
        ds = wrap(ds)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=False), nb


def normalization(args) -> tuple[tuple, tuple]:
    """(mean, std) of the data set's inputs: applied by the transform, or on the device with --prefetcher."""
    return (DEMO_MEAN, DEMO_STD) if args.data_set == 'DEMO' else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def _to_tensor(args, uint8: bool) -> list:
    if uint8:  # timm's prefetcher convention: normalisation happens on the device (deit.device_aug)
        return [transforms.PILToTensor()]
    return [transforms.ToTensor(), transforms.Normalize(*normalization(args))]


def three_augment(args, uint8: bool = False):
    """DeiT III's 3-Augment: RRC + flip + one of {grayscale, solarize, blur} + colour jitter."""
    t = [transforms.RandomResizedCrop(args.input_size, scale=(0.08, 1.0),
                                      interpolation=transforms.InterpolationMode.BICUBIC)
         if not args.src else transforms.Compose([
             transforms.Resize(args.input_size, interpolation=transforms.InterpolationMode.BICUBIC),
             transforms.RandomCrop(args.input_size, padding=4, padding_mode='reflect')]),
         transforms.RandomHorizontalFlip(),
         transforms.RandomChoice([transforms.RandomGrayscale(p=1.0),
                                  transforms.RandomSolarize(threshold=128, p=1.0),
                                  transforms.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))])]
    if args.color_jitter:
        t.append(transforms.ColorJitter(args.color_jitter, args.color_jitter, args.color_jitter))
    return transforms.Compose(t + _to_tensor(args, uint8))


def device_rand_augment(args):
    """The RandAugment that ``--device-aug`` runs on the device: timm's, with create_transform's hparams."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    mean = normalization(args)[0]
    hparams = dict(translate_const=int(args.input_size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean))
    if args.train_interpolation and args.train_interpolation != 'random':
        hparams['interpolation'] = str_to_pil_interp(args.train_interpolation)
    return DeviceRandAugment(rand_augment_transform(args.aa, hparams))


DEFAULT_CROP_RATIO = DEFAULT_CROP_PCT  # timm's (and DeiT's) evaluation centre crop, 0.875


def auto_augment(args) -> str | None:
    """The --aa policy, or None when it is off ('none', empty or unset)."""
    return None if args.aa in (None, '', 'none') else args.aa


def mixup_active(args) -> bool:
    """Mixup or CutMix is on: the targets are soft (timm's Mixup with these flags, as DeiT)."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def eval_resize(size: int, crop_ratio: float) -> int:
    """Shorter side before the evaluation centre crop of ``size`` (small inputs are not cropped)."""
    return int(size / crop_ratio) if size > 32 else size


def build_transform(is_train: bool, args, uint8: bool | None = None):
    """The split's transform. ``uint8`` (default: ``args.prefetcher``): end with uint8 tensors and leave
    normalisation and random erasing to the device (deit.device_aug.DeviceBatches)."""
    uint8 = getattr(args, 'prefetcher', False) if uint8 is None else uint8
    size = args.input_size
    if args.data_set == 'DEMO':
        # digits: no flips (a mirrored 2 is no 2) and no colour; small crops only
        t = [transforms.Resize(size)]
        if is_train:
            t.append(transforms.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.15)))
        return transforms.Compose(t + _to_tensor(args, uint8))
    if is_train:
        if args.ThreeAugment:
            return three_augment(args, uint8)
        on_device = getattr(args, 'device_aug', False)  # RandAugment runs on the batch instead (no colour jitter)
        aa = None if on_device else auto_augment(args)
        tf = create_transform(input_size=size, is_training=True, auto_augment=aa,
                              color_jitter=None if on_device else args.color_jitter,
                              interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
                              re_count=args.recount, use_prefetcher=uint8)
        if size <= 32:  # small images: replace RandomResizedCrop by pad + random crop (as DeiT); an image
            # smaller than the crop is padded up to it (DeiT's RandomCrop would fail on it)
            tf.transforms[0] = transforms.RandomCrop(size, padding=4, pad_if_needed=True)
        elif getattr(args, 'gpu_decode', False):
            tf = defer_decoding(tf, args.train_interpolation)
        elif getattr(args, 'jpeg_draft', False):
            rrc = tf.transforms[0]
            tf.transforms[0] = DraftRandomResizedCrop(size, rrc.scale, rrc.ratio, args.train_interpolation)
            tf.decodes_lazily = True  # the datasets then only open JPEGs (data.decode)
        return tf
    resize = eval_resize(size, getattr(args, 'eval_crop_ratio', DEFAULT_CROP_RATIO))
    interpolation = transforms.InterpolationMode.BICUBIC if size > 32 else transforms.InterpolationMode.BILINEAR
    t = [transforms.Resize(resize, interpolation=interpolation), transforms.CenterCrop(size)]
    return transforms.Compose(t + _to_tensor(args, uint8))
