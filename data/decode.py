"""Image decoding for the datasets: one function, two optional speed-ups.

``decode_image(data, name)`` decodes fully and at once (a truncated JPEG fails here, naming ``name``, not
inside a transform) and returns an RGB PIL image.

* ``simplejpeg`` (optional extra, ``requirements/fast.txt``): when it is installed, JPEGs are decoded by it
  instead of PIL. Both call libjpeg-turbo's default (ISLOW) IDCT and fancy upsampling, so the pixels are
  the same (``benchmarks/bench_input_pipeline.py`` checks max |difference| = 0); it is faster because it
  skips PIL's incremental decoder. Anything it cannot read (CMYK, broken files) falls back to PIL, which
  decides whether the image is corrupt. ``MAXSUP_NO_SIMPLEJPEG=1`` switches it off.
* ``lazy=True`` (``--jpeg-draft``): a JPEG comes back undecoded (:class:`LazyJpeg`); the first transform,
  :class:`deit.transforms.DraftRandomResizedCrop`, chooses the DCT scale from the crop it samples and
  then calls :func:`decode_reduced`.
"""
from __future__ import annotations

import io
import os
from typing import NamedTuple

from PIL import Image

from data.zip_index import CacheError

try:
    import simplejpeg
except ImportError:  # the optional extra is not installed: PIL decodes everything
    simplejpeg = None

JPEG_MAGIC = b'\xff\xd8'


class CorruptImageError(CacheError):
    pass


def jpeg_decoder() -> str:
    """Which library decodes JPEGs in this process (logged at start, so a run says what produced it)."""
    if _use_simplejpeg():
        return f'simplejpeg {simplejpeg.__version__}'
    return f'PIL {Image.__version__}'


# what PIL raises on bytes it cannot use; DecompressionBombError (over 2 x Image.MAX_IMAGE_PIXELS) is none of
# the others, and escaped --skip-bad-images
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_image_file(path) -> bytes:
    """A file's bytes; a file that cannot be read (permissions, a broken link, a vanished file) is an
    unreadable image like a corrupt one: an error naming it, or skipped with --skip-bad-images."""
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:
        raise CorruptImageError(f'{path}: cannot read the file ({e.strerror or e})') from None


def check_pixel_count(width: int, height: int, name: str) -> None:
    """PIL's decompression-bomb limit, applied from the header before any decoder allocates the image (a
    20000 x 20000 JPEG took 3.5 GB in simplejpeg before PIL's check could run)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > 2 * limit:
        raise CorruptImageError(f'{name}: {width} x {height} pixels is over PIL\'s decompression-bomb limit '
                                f'({2 * limit} pixels; PIL.Image.MAX_IMAGE_PIXELS)')


def _pil_decode(data: bytes, name: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert('RGB')
    except DECODE_ERRORS as e:
        raise CorruptImageError(f'{name}: cannot decode image ({e})') from e


class LazyJpeg(NamedTuple):
    """A JPEG not decoded yet (``--jpeg-draft``): its bytes, its name for errors, its parsed header."""
    data: bytes
    name: str
    header: Image.Image  # opened, not loaded: size and mode only


def _use_simplejpeg() -> bool:
    return simplejpeg is not None and not os.environ.get('MAXSUP_NO_SIMPLEJPEG')


def decode_image(data: bytes, name: str, lazy: bool = False) -> Image.Image | LazyJpeg:
    """RGB image of ``data``; errors name ``name``. ``lazy``: a JPEG comes back as :class:`LazyJpeg`."""
    if data[:2] == JPEG_MAGIC:
        if lazy:
            try:
                return LazyJpeg(data, name, Image.open(io.BytesIO(data)))
            except DECODE_ERRORS as e:
                raise CorruptImageError(f'{name}: cannot decode image ({e})') from e
        return decode_reduced(LazyJpeg(data, name, None), 1)
    return _pil_decode(data, name)


def decode_reduced(jpeg: LazyJpeg, reduce: int) -> Image.Image:
    """Decode at 1/``reduce`` of the size (1, 2, 4 or 8) with libjpeg's scaled IDCT, as RGB.

    Each side becomes ceil(side / reduce), as both decoders scale (PIL: sides of at least ``reduce`` pixels);
    the cost falls roughly with the pixels."""
    if _use_simplejpeg():
        if jpeg.header is not None:  # opened by PIL (--jpeg-draft), whose Image.open applied the bomb limit
            w, h = jpeg.header.size
        else:
            try:
                h, w = simplejpeg.decode_jpeg_header(jpeg.data)[:2]
            except ValueError:  # not a header it can read: PIL decides below (and applies the same limit)
                h = w = 0
            check_pixel_count(w, h, jpeg.name)
        try:  # it picks the smallest scale (n/8) keeping these minimums: exactly 1/reduce
            return Image.fromarray(simplejpeg.decode_jpeg(jpeg.data, colorspace='RGB', min_width=-(-w // reduce),
                                                          min_height=-(-h // reduce)))
        except ValueError:  # strict: truncated or unsupported (CMYK, arithmetic coding): PIL decides
            pass
    try:
        img = jpeg.header if jpeg.header is not None else Image.open(io.BytesIO(jpeg.data))
        if reduce > 1 and img.mode in ('RGB', 'L'):  # PIL takes the scale min(side // asked side): ask floors
            img.draft(img.mode, (max(1, img.width // reduce), max(1, img.height // reduce)))
        img.load()
        return img.convert('RGB')
    except DECODE_ERRORS as e:
        raise CorruptImageError(f'{jpeg.name}: cannot decode image ({e})') from e
