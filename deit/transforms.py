"""Transforms the stock libraries lack: the drafted RandomResizedCrop (``--jpeg-draft``) and the workers'
half of ``--gpu-decode`` (timm's crop and flip draws for a JPEG the device decodes, see deit/device_decode.py).

``DraftRandomResizedCrop`` samples exactly timm's RandomResizedCropAndInterpolation crop (same random calls,
same order) on the full-size image, then decodes the JPEG at 1/r of its size, r the largest of 8, 4, 2
with the crop >= r x the output (else fully), and resizes the crop's box (in the reduced image's
coordinates, sub-pixel exact) to the output. Documented deviation (opt-in): the reduction happens in
libjpeg's scaled IDCT instead of the bicubic filter, so pixels differ from the reference by a few levels
where a crop is >= 2x the output (``benchmarks/bench_input_pipeline.py`` reports the difference); the crop
geometry and every random draw are unchanged.
"""
from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import torch
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision.transforms import ColorJitter, Compose, RandomHorizontalFlip
from torchvision.transforms import functional as F

from data.decode import LazyJpeg, decode_reduced


def draw_interpolation(rrc: RandomResizedCropAndInterpolation):
    """timm's per-sample interpolation draw ('random': one of its tuple), after its crop draw, as timm makes it."""
    return random.choice(rrc.interpolation) if isinstance(rrc.interpolation, (tuple, list)) else rrc.interpolation


class DraftRandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's RandomResizedCrop that decodes a :class:`data.decode.LazyJpeg` at a reduced DCT scale."""

    def __call__(self, img):
        if not isinstance(img, LazyJpeg):  # decoded already (not a JPEG): timm's path
            return super().__call__(img)
        i, j, h, w = self.get_params(img.header, self.scale, self.ratio)  # timm's draws, on the full size
        interpolation = draw_interpolation(self)
        out_h, out_w = self.size
        reduce = next((r for r in (8, 4, 2) if h >= r * out_h and w >= r * out_w), 1)  # crop >= r x output
        pic = decode_reduced(img, reduce)
        if reduce == 1:  # exactly timm's pixels
            return F.resized_crop(pic, i, j, h, w, self.size, interpolation)
        sx, sy = pic.width / img.header.width, pic.height / img.header.height
        box = (j * sx, i * sy, (j + w) * sx, (i + h) * sy)  # the same crop in the reduced image, sub-pixel exact
        return pic.resize((out_w, out_h), F.pil_modes_mapping[interpolation], box=box)


class EncodedImage(NamedTuple):
    """A JPEG a worker hands to the device undecoded (``--gpu-decode``), with timm's random draws for it."""
    data: torch.Tensor  # the file's bytes, uint8
    name: str  # for errors
    box: tuple[int, int, int, int]  # timm's RandomResizedCrop (top, left, height, width) on the full image
    interpolation: str  # 'bicubic' / 'bilinear' / ...: timm's choice for this sample
    flip: bool = False  # timm's RandomHorizontalFlip draw


def device_decodable(img) -> bool:
    """A JPEG the device decoder takes: RGB or grayscale (nvJPEG has no CMYK/YCCK), and complete (ends with the
    EOI marker: nvJPEG does not reject every truncated file, so those go to the host decoder, which decides)."""
    return isinstance(img, LazyJpeg) and img.header.mode in ('RGB', 'L') and img.data.endswith(b'\xff\xd9')


class DeferredRandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's RandomResizedCrop that, for a :class:`data.decode.LazyJpeg` the device can decode, draws the
    crop exactly as timm does (same calls, same order, on the header's size) and returns an
    :class:`EncodedImage`; anything else (PNG, CMYK, incomplete JPEGs) is decoded here and cropped by timm."""

    def __call__(self, img):
        if not device_decodable(img):
            return super().__call__(decode_reduced(img, 1) if isinstance(img, LazyJpeg) else img)
        box = self.get_params(img.header, self.scale, self.ratio)
        interpolation = draw_interpolation(self)
        data = torch.from_numpy(np.frombuffer(img.data, np.uint8).copy())
        return EncodedImage(data, img.name, box, interpolation.value)


class DeferredHorizontalFlip(RandomHorizontalFlip):
    """torchvision's RandomHorizontalFlip (the same ``torch.rand(1) < p`` draw); an EncodedImage records it."""

    def forward(self, img):
        if isinstance(img, EncodedImage):
            return img._replace(flip=bool(torch.rand(1) < self.p))
        return super().forward(img)


class DeferredToTensor(MaybePILToTensor):
    def __call__(self, pic):
        return pic if isinstance(pic, EncodedImage) else super().__call__(pic)


def _no_op(t) -> bool:
    """timm adds ColorJitter(0) for ``--color-jitter 0``: it changes no pixel."""
    return isinstance(t, ColorJitter) and not any((t.brightness, t.contrast, t.saturation, t.hue))


def defer_decoding(tf: Compose, interpolation: str) -> Compose:
    """timm's training transform (RandomResizedCrop, flip, to uint8 tensor: the prefetcher pipeline with
    RandAugment moved to the device) with the JPEG decoding deferred to the device. Any other step would
    need decoded pixels in the worker, so it is refused by name."""
    steps = [t for t in tf.transforms if not _no_op(t)]
    if [type(t) for t in steps] != [RandomResizedCropAndInterpolation, RandomHorizontalFlip, MaybePILToTensor]:
        extra = [type(t).__name__ for t in steps[1:] if type(t) not in (RandomHorizontalFlip, MaybePILToTensor)]
        raise ValueError(f'--gpu-decode defers decoding past crop and flip; {", ".join(extra) or "this pipeline"} '
                         f'would need the decoded image in the worker (use --device-aug for RandAugment, '
                         f'--color-jitter 0 without it)')
    rrc, flip, _ = steps
    out = Compose([DeferredRandomResizedCrop(rrc.size, rrc.scale, rrc.ratio, interpolation),
                   DeferredHorizontalFlip(flip.p), DeferredToTensor()])
    out.decodes_lazily = True  # the datasets then only open JPEGs (data.decode)
    return out
