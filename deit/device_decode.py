"""The device's half of ``--gpu-decode``: JPEG bytes + timm's crop/flip draws -> a uint8 batch on the device.

The workers (deit/transforms.py: ``defer_decoding``) only read a JPEG's header, draw timm's RandomResizedCrop
box and flip for it and hand over the compressed bytes: about 1/20 of a default sample's CPU time. The
device decodes, crops, resizes and flips; RandAugment (``--device-aug``), normalisation and random erasing
follow in :class:`deit.device_aug.DeviceBatches` as for every other batch.

Library: ``torchvision.io.decode_jpeg(list, device='cuda')``, nvJPEG behind torchvision's pinned API,
batched (one call per batch). No new dependency, and the crops stay timm's draws for the same seed
by construction. NVIDIA DALI would add the A100/H100 hardware JPEG engine, but it is a second pipeline
with its own readers, augmentation operators and random streams; matching timm's augmentations there would
mean re-implementing them. On a CPU device the same code decodes with torchvision's libjpeg-turbo (the
same pixels as PIL's decoder), so the path runs and is tested without a GPU.

Pixels: the crop is resized by ``F.interpolate(..., antialias=True)`` (bicubic with PIL's a = -0.5 and
PIL's filter support when downscaling) instead of PIL's ``resize`` in timm's transform. Measured against
the default pipeline for the same draws: mean |difference| under 0.5 levels of 255, a few levels at most
on edges (``tests/test_input_pipeline.py`` asserts the bounds).

Per image, the host path decides as it does by default: a JPEG the worker cannot hand over (PNG, CMYK,
no end-of-image marker) is decoded and cropped in the worker by timm's transform; one the device decoder
rejects is decoded on the host by ``data.decode`` (PIL), which returns an image or raises
CorruptImageError naming the member. With ``--skip-bad-images`` that sample is dropped from its batch and
counted, as in ``data.skip.collate_skip_bad``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from data.decode import CorruptImageError, decode_image
from data.skip import drop_skipped, kept_count
from deit.device_aug import to_device
from deit.transforms import EncodedImage

INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest')  # timm's names that are also F.interpolate modes


@dataclass
class EncodedBatch:
    """A training batch as the workers send it: few tensors (one shared-memory block each), not one per image."""
    data: torch.Tensor  # uint8: the encoded JPEGs' bytes, concatenated
    offsets: torch.Tensor  # (n + 1,): JPEG k is data[offsets[k]:offsets[k + 1]]
    boxes: torch.Tensor  # (n, 4): timm's (top, left, height, width)
    flips: torch.Tensor  # (n,) bool
    interpolations: list[str]
    names: list[str]
    encoded_at: torch.Tensor  # (n,): the JPEGs' positions in the batch
    decoded: torch.Tensor  # (m, 3, S, S) uint8: samples a worker decoded (not a JPEG the device takes)
    decoded_at: torch.Tensor  # (m,)
    targets: torch.Tensor  # (n + m,)
    size: int  # the batch as sampled, with the samples a skip_bad dataset returned as None
    keep_even: bool

    def __len__(self) -> int:
        return len(self.targets)

    def pin_memory(self):  # DataLoader(pin_memory=True) calls this: the two bulk tensors, one pin each
        self.data, self.decoded = self.data.pin_memory(), self.decoded.pin_memory()
        return self


def collate_encoded(batch, keep_even: bool = True) -> EncodedBatch:
    """The DataLoader's collate_fn for ``--gpu-decode``: EncodedImage and uint8 tensor samples, in batch order.
    Samples a skip_bad dataset returned as None are dropped; ``keep_even`` applies after decoding, when the
    device has dropped what it could not decode either (as collate_skip_bad's rule, once per batch)."""
    kept = drop_skipped(batch, keep_even=False)
    enc = [(k, s) for k, (s, _) in enumerate(kept) if isinstance(s, EncodedImage)]
    dec = [(k, s) for k, (s, _) in enumerate(kept) if not isinstance(s, EncodedImage)]
    sizes = torch.tensor([0] + [len(s.data) for _, s in enc])
    return EncodedBatch(
        data=torch.cat([s.data for _, s in enc]) if enc else torch.empty(0, dtype=torch.uint8),
        offsets=sizes.cumsum(0),
        boxes=torch.tensor([s.box for _, s in enc], dtype=torch.long).reshape(-1, 4),
        flips=torch.tensor([s.flip for _, s in enc], dtype=torch.bool),
        interpolations=[s.interpolation for _, s in enc], names=[s.name for _, s in enc],
        encoded_at=torch.tensor([k for k, _ in enc], dtype=torch.long),
        decoded=torch.stack([s for _, s in dec]) if dec else torch.empty(0, 3, 1, 1, dtype=torch.uint8),
        decoded_at=torch.tensor([k for k, _ in dec], dtype=torch.long),
        targets=torch.tensor([t for _, t in kept], dtype=torch.long), size=len(batch), keep_even=keep_even)


class DeviceDecoder:
    """EncodedBatch -> (uint8 images (B, 3, S, S), targets) on ``device``.

    ``dataset``: the training set (its ``skip_bad`` and skip counter)."""

    def __init__(self, size: int, device, dataset=None):
        self.size, self.device, self.dataset = size, torch.device(device), dataset

    def decode(self, batch: EncodedBatch) -> list[torch.Tensor | None]:
        """(3, H, W) uint8 per JPEG, on the device; None where the device decoder failed."""
        o = batch.offsets.tolist()
        jpegs = [batch.data[a:b] for a, b in zip(o[:-1], o[1:])]
        if not jpegs:
            return []
        if self.device.type == 'cuda':
            # torchvision's CUDA decoder allocates its outputs on this stream but writes them from a stream of its
            # own that does not wait for this one, so it can be handed a block that queued kernels still read
            # (pytorch/vision PR 9606): a loss went NaN in 2 of 3 bf16 runs on an H200. Nothing queued, no hazard.
            torch.cuda.current_stream(self.device).synchronize()
        try:  # nvJPEG decodes the whole list in one batched call
            return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad file fails the batched call: find it, image by image
            out = []
            for j in jpegs:
                try:
                    out.append(decode_jpeg(j, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def host_decode(self, batch: EncodedBatch, k: int) -> torch.Tensor | None:
        """JPEG k decoded by the host's decoder (the default path's); None when skipped, else its error."""
        o0, o1 = int(batch.offsets[k]), int(batch.offsets[k + 1])
        try:
            img = decode_image(batch.data[o0:o1].numpy().tobytes(), batch.names[k])
        except CorruptImageError:
            if not getattr(self.dataset, 'skip_bad', False):
                raise
            self.dataset.count_skip()
            return None
        return to_device(pil_to_tensor(img), self.device)

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.size
        out = torch.empty(len(batch), 3, s, s, device=self.device)
        keep = torch.ones(len(batch), dtype=torch.bool)
        boxes = batch.boxes.tolist()
        for k, img in enumerate(self.decode(batch)):
            img = img if img is not None else self.host_decode(batch, k)
            pos = int(batch.encoded_at[k])
            if img is None:
                keep[pos] = False
                continue
            if img.shape[0] == 1:  # grayscale: PIL's convert('RGB') repeats the channel
                img = img.expand(3, -1, -1)
            top, left, h, w = boxes[k]
            mode = batch.interpolations[k]
            crop = img[None, :, top:top + h, left:left + w].float()
            out[pos] = F.interpolate(crop, size=(s, s), mode=mode, antialias=mode != 'nearest',
                                     **({} if mode == 'nearest' else {'align_corners': False}))[0]
        if len(batch.decoded_at):
            out[to_device(batch.decoded_at, self.device)] = to_device(batch.decoded, self.device).float()
        flip = batch.encoded_at[batch.flips]
        if len(flip):
            index = to_device(flip, self.device)
            out[index] = out[index].flip(-1)
        images = out.round_().clamp_(0, 255).to(torch.uint8)
        targets = batch.targets
        kept = keep.nonzero().flatten().tolist()
        kept = kept[:kept_count(len(kept), batch.size, batch.keep_even)]
        if len(kept) != len(batch):
            images, targets = images[to_device(torch.tensor(kept, dtype=torch.long), self.device)], targets[kept]
        return images, targets
