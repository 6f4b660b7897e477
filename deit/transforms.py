"""Transforms the stock libraries lack: the drafted RandomResizedCrop (``--jpeg-draft``).

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

from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import functional as F

from data.decode import LazyJpeg, decode_reduced

class DraftRandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's RandomResizedCrop that decodes a :class:`data.decode.LazyJpeg` at a reduced DCT scale."""

    def __call__(self, img):
        if not isinstance(img, LazyJpeg):  # decoded already (not a JPEG): timm's path
            return super().__call__(img)
        i, j, h, w = self.get_params(img.header, self.scale, self.ratio)  # timm's draws, on the full size
        interpolation = (random.choice(self.interpolation) if isinstance(self.interpolation, (tuple, list))
                         else self.interpolation)
        out_h, out_w = self.size
        reduce = next((r for r in (8, 4, 2) if h >= r * out_h and w >= r * out_w), 1)  # crop >= r x output
        pic = decode_reduced(img, reduce)
        if reduce == 1:  # exactly timm's pixels
            return F.resized_crop(pic, i, j, h, w, self.size, interpolation)
        sx, sy = pic.width / img.header.width, pic.height / img.header.height
        box = (j * sx, i * sy, (j + w) * sx, (i + h) * sy)  # the same crop in the reduced image, sub-pixel exact
        return pic.resize((out_w, out_h), F.pil_modes_mapping[interpolation], box=box)
