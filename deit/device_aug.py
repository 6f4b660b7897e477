"""The batch's steps on the training device: uint8 -> [RandAugment] -> normalise -> random erasing.

timm's prefetcher convention (``create_transform(use_prefetcher=True)``): DataLoader workers stop at uint8
tensors, a quarter of float32's bytes to pin and copy, and the per-pixel float work (normalisation, random
erasing) runs once per batch on the device (GPU, or batched on the CPU). :class:`DeviceBatches` is timm's
``PrefetchLoader`` with one more step: with ``--device-aug`` the RandAugment of the workers moves here, and
it must see uint8 pixels, i.e. run *before* normalisation, which timm's loader does first.

:class:`DeviceRandAugment` runs a timm RandAugment policy on the batch. The random draws (ops, apply
probability, magnitude with its noise, sign) are timm's own: each op's ``level_fn`` is called per sample on
the host, so the parameter distribution is the CPU path's by construction. The pixel operations are
re-implemented on tensors: colour/LUT ops follow PIL's integer formulas (within 1 level of PIL); affine ops
use ``grid_sample`` (bicubic with a = -0.75 where PIL's has a = -0.5: a few levels at edges).
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing

_GRAY = (19595 / 65536, 38470 / 65536, 7471 / 65536)  # PIL's "L" conversion weights (ITU-R 601-2)


def to_device(t: torch.Tensor, device, memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """``t.to(device)``, non-blocking only towards an accelerator. A non-blocking copy to the host returns
    before the bytes have arrived (PyTorch's "non_blocking and pin_memory" notes), so a CPU consumer could read
    a half-copied batch; towards the device the stream orders the copy before every kernel that reads it.
    ``memory_format`` (e.g. ``torch.channels_last``) applies to image batches (4-D)."""
    device = torch.device(device)
    t = t.to(device, non_blocking=device.type != 'cpu')
    return t.contiguous(memory_format=memory_format) if memory_format is not None and t.dim() == 4 else t


class DeviceBatches:
    """Wraps a loader of uint8 (B, C, H, W) batches: moves each batch to ``device`` (non-blocking) and runs the
    device-side steps. ``decoder`` (``--gpu-decode``): the loader yields encoded batches that it decodes
    first. ``len()``, ``sampler`` and ``dataset`` are the wrapped loader's."""

    def __init__(self, loader, device, mean, std, re_prob: float = 0.0, re_mode: str = 'pixel', re_count: int = 1,
                 rand_augment=None, decoder=None):
        self.loader, self.device, self.decoder = loader, torch.device(device), decoder
        self.mean = torch.tensor([255 * m for m in mean], device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor([255 * s for s in std], device=self.device).view(1, -1, 1, 1)
        self.random_erasing = (RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=self.device)
                               if re_prob > 0 else None)
        self.rand_augment = rand_augment

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset

    def process(self, images: torch.Tensor) -> torch.Tensor:
        if len(images) == 0:  # every image of the batch was skipped (--skip-bad-images): the engine skips it
            return images.float()
        if images.dtype != torch.uint8:
            raise TypeError(f'DeviceBatches expects uint8 images from the workers, got {images.dtype} (a transform '
                            f'still normalises: build it with the prefetcher setting)')
        if self.rand_augment is not None:
            images = self.rand_augment(images)
        x = images.float().sub_(self.mean).div_(self.std)
        if self.random_erasing is not None:
            x = self.random_erasing(x)  # per sample, on normalised pixels: as timm's transform on the CPU
        return x

    def __iter__(self):
        for batch in self.loader:
            if self.decoder is not None:  # --gpu-decode: JPEG bytes + crop/flip draws (deit.device_decode)
                images, targets = self.decoder(batch)
            else:
                images, targets = batch
            yield self.process(to_device(images, self.device)), to_device(targets, self.device)


class DeviceRandAugment:
    """A timm RandAugment (``timm.data.auto_augment.RandAugment``) applied to a uint8 batch on its device."""

    def __init__(self, timm_rand_augment):
        self.ra = timm_rand_augment
        names = {op.aug_fn.__name__ for op in self.ra.ops}
        missing = sorted(names - set(_OPS))
        if missing:
            raise ValueError(f'--device-aug has no tensor version of {", ".join(missing)}: use a RandAugment '
                             f'policy of {", ".join(sorted(_OPS))}, or drop --device-aug')

    def draws(self, n: int) -> list[list[tuple]]:
        """Per sample, per layer: (op function name, args, kwargs) or None; timm's RandAugment.__call__ and
        AugmentOp.__call__ draw for draw."""
        ra, out = self.ra, []
        for _ in range(n):
            ops = np.random.choice(ra.ops, ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights)
            row = []
            for op in ops:
                if op.prob < 1.0 and random.random() > op.prob:
                    row.append(None)
                    continue
                m = op.magnitude
                if op.magnitude_std == float('inf'):
                    m = random.uniform(0, m)
                elif op.magnitude_std > 0:
                    m = random.gauss(m, op.magnitude_std)
                m = max(0., min(m, op.magnitude_max or 10.))
                args = op.level_fn(m, op.hparams) if op.level_fn is not None else ()
                resample = op.kwargs['resample']
                mode = random.choice(resample) if isinstance(resample, (list, tuple)) else resample
                row.append((op.aug_fn.__name__, args, {'fill': op.kwargs['fillcolor'], 'mode': int(mode)}))
            out.append(row)
        return out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        draws = self.draws(len(images))
        x = images.float()
        for layer in range(self.ra.num_layers):
            groups: dict[tuple, list[int]] = {}
            for i, row in enumerate(draws):
                if row[layer] is not None:
                    name, _, kw = row[layer]
                    groups.setdefault((name, kw['mode'], tuple(kw['fill'])), []).append(i)
            for (name, mode, fill), idx in groups.items():
                # per-sample arguments stay on the host (affine matrices are built there): one small copy each
                args = torch.tensor([draws[i][layer][1] for i in idx], dtype=torch.float32).reshape(len(idx), -1)
                index = to_device(torch.tensor(idx), x.device)
                x[index] = _OPS[name](x[index], args, mode=mode, fill=fill)
        return x.round_().clamp_(0, 255).to(torch.uint8)


# ---- the ops: (n, C, H, W) float in [0, 255] with integer values, per-sample args (n, k) on the host ------

def _per_sample(a, x):
    """Column 0 of the host-side args as an (n, 1, 1, 1) tensor on x's device."""
    return to_device(a[:, 0].view(-1, 1, 1, 1), x.device)


def _blend(degenerate, x, a):  # PIL ImageEnhance -> Image.blend: truncated, clipped
    return torch.floor(degenerate + _per_sample(a, x) * (x - degenerate)).clamp(0, 255)


def _gray(x):
    return torch.floor(sum(w * x[:, c:c + 1] for c, w in enumerate(_GRAY)) + 0.5)


def _color(x, a, **_):
    return _blend(_gray(x).expand_as(x), x, a)


def _contrast(x, a, **_):
    mean = torch.floor(_gray(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean.expand_as(x), x, a)


def _brightness(x, a, **_):
    return _blend(torch.zeros_like(x), x, a)


def _sharpness(x, a, **_):
    k = x.new_ones(x.shape[1], 1, 3, 3)
    k[:, :, 1, 1] = 5
    smooth = F.conv2d(x, k / 13, groups=x.shape[1]).round()  # PIL's SMOOTH filter
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth  # PIL keeps the border pixels
    return _blend(degenerate, x, a)


def _invert(x, a, **_):
    return 255 - x


def _posterize(x, a, **_):
    step = 2 ** (8 - _per_sample(a, x).clamp(0, 8))
    return torch.floor(x / step) * step


def _solarize(x, a, **_):
    return torch.where(x >= _per_sample(a, x), 255 - x, x)


def _solarize_add(x, a, **_):
    return torch.where(x < 128, (x + _per_sample(a, x)).clamp(max=255), x)


def _auto_contrast(x, a, **_):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = 255 / (hi - lo).clamp(min=1)
    return torch.where(hi > lo, torch.floor((x - lo) * scale).clamp(0, 255), x)


def _equalize(x, a, **_):
    """PIL ImageOps.equalize per channel: lut[i] = (step // 2 + count below i) // step."""
    n, c = x.shape[:2]
    flat = x.reshape(n * c, -1).long()
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float))
    last = hist.gather(1, (hist > 0).float().cumsum(1).argmax(1, keepdim=True))  # count of the top level
    step = torch.floor((hist.sum(1, keepdim=True) - last) / 255)
    below = hist.cumsum(1) - hist
    lut = torch.floor((torch.floor(step / 2) + below) / step.clamp(min=1)).clamp(max=255)
    out = lut.gather(1, flat).reshape(x.shape)
    return torch.where((step > 0).view(n, c, 1, 1), out, x)


def _affine(x, m, mode, fill):
    """PIL ``Image.transform(AFFINE)``: output pixel centre (u, v) samples input (a u + b v + c, d u + e v + f),
    in pixel units; outside the image is ``fill``. ``m``: (n, 6) PIL coefficients on the host."""
    n, _, h, w = x.shape
    full = torch.cat([m.view(n, 2, 3), torch.tensor([0., 0., 1.]).expand(n, 1, 3)], 1)
    # normalised output coords -> pixel coords -> PIL matrix -> normalised input coords (built on the host)
    to_px = torch.tensor([[w / 2, 0, w / 2], [0, h / 2, h / 2], [0, 0, 1]])
    to_norm = torch.tensor([[2 / w, 0, -1], [0, 2 / h, -1]])
    theta = to_device(to_norm @ full @ to_px, x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    sampled = F.grid_sample(torch.cat([x, torch.ones_like(x[:, :1])], 1), grid, padding_mode='zeros',
                            mode={0: 'nearest', 3: 'bicubic'}.get(mode, 'bilinear'), align_corners=False)
    inside = sampled[:, -1:].clamp(0, 1)  # 1 inside the source image, 0 outside, blended at its edge
    fill_t = to_device(torch.tensor(fill, dtype=x.dtype).view(1, -1, 1, 1), x.device)
    return (sampled[:, :-1] * inside + fill_t * (1 - inside)).clamp(0, 255).round()


def _rows(a, *cols):
    """(n, 6) affine coefficients: each column a per-sample (n,) tensor or a constant."""
    return torch.stack([torch.as_tensor(c, dtype=torch.float32).expand(len(a)) for c in cols], 1)


def _rotate(x, a, mode, fill):
    """PIL ``rotate(deg)``: counter-clockwise about the centre (w/2, h/2)."""
    h, w = x.shape[2:]
    t = -a[:, 0] * math.pi / 180
    cos, sin = torch.cos(t), torch.sin(t)
    cx, cy = w / 2, h / 2
    return _affine(x, _rows(a, cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy), mode, fill)


def _shear_x(x, a, mode, fill):
    return _affine(x, _rows(a, 1., a[:, 0], 0., 0., 1., 0.), mode, fill)


def _shear_y(x, a, mode, fill):
    return _affine(x, _rows(a, 1., 0., 0., a[:, 0], 1., 0.), mode, fill)


def _translate_x_abs(x, a, mode, fill):
    return _affine(x, _rows(a, 1., 0., a[:, 0], 0., 1., 0.), mode, fill)


def _translate_y_abs(x, a, mode, fill):
    return _affine(x, _rows(a, 1., 0., 0., 0., 1., a[:, 0]), mode, fill)


def _translate_x_rel(x, a, mode, fill):
    return _translate_x_abs(x, a * x.shape[3], mode, fill)


def _translate_y_rel(x, a, mode, fill):
    return _translate_y_abs(x, a * x.shape[2], mode, fill)


_OPS = {'auto_contrast': _auto_contrast, 'equalize': _equalize, 'invert': _invert, 'rotate': _rotate,
        'posterize': _posterize, 'solarize': _solarize, 'solarize_add': _solarize_add, 'color': _color,
        'contrast': _contrast, 'brightness': _brightness, 'sharpness': _sharpness, 'shear_x': _shear_x,
        'shear_y': _shear_y, 'translate_x_rel': _translate_x_rel, 'translate_y_rel': _translate_y_rel,
        'translate_x_abs': _translate_x_abs, 'translate_y_abs': _translate_y_abs}
