"""Image files without TensorFlow: the one set of image extensions every path accepts, and the
PIL decoder that prediction and serving use.

Training (image folders), ``--mode=predict`` and ``--mode=serve`` all use ``IMAGE_EXTENSIONS``,
compared case-insensitively (``is_image_file``).
"""
from __future__ import annotations

import io
import os
import re

import numpy as np

IMAGE_EXTENSIONS = frozenset({'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff',
                              '.ppm', '.pgm', '.pbm', '.pnm'})


def is_image_file(path: str) -> bool:
  """True when ``path`` ends in one of ``IMAGE_EXTENSIONS`` (any case)."""
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


class UnreadableImage(Exception):
  """A file or upload that is not a decodable image (reported and skipped, never fatal)."""


class ImageTooLarge(UnreadableImage):
  """An image with more pixels than allowed."""


def decode(data: bytes | str, *, channels: int, size_hw: tuple[int, int] | None = None,
           max_pixels: int = 0) -> np.ndarray:
  """Image bytes or a file path -> uint8 HxWx``channels``, upright (EXIF orientation applied).

  Any mode (grey, RGB, RGBA, palette) is converted: grey is replicated for 3 channels, alpha is
  dropped. With ``size_hw`` the image is resized to it (area-average when shrinking,
  bilinear when enlarging). Raises UnreadableImage (ImageTooLarge past ``max_pixels``).
  """
  from PIL import Image, ImageOps
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
      if max_pixels and img.width * img.height > max_pixels:
        raise ImageTooLarge(f'an image of {img.width}x{img.height} pixels, more than the limit '
                            f'of {max_pixels}')
      img = ImageOps.exif_transpose(img)
      if img.mode.startswith('I;16'):  # 16-bit grey (scans, medical): full range to 8 bits
        img = Image.fromarray((np.asarray(img, np.uint32) // 257).astype(np.uint8))
      mode = 'L' if channels == 1 else 'RGB'
      if img.mode in ('P', 'PA', 'LA') and mode == 'RGB':
        img = img.convert('RGBA')
      img = img.convert(mode)
      if size_hw and (img.height, img.width) != tuple(size_hw):
        h, w = size_hw
        shrink = img.height >= h and img.width >= w
        img = img.resize((w, h), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
      array = np.asarray(img, np.uint8)
  except UnreadableImage:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    detail = re.sub(r'<_io\.BytesIO object at 0x[0-9a-f]+>', 'the upload',
                    (str(e).splitlines() or [''])[0][:160])
    raise UnreadableImage(f'not a readable image ({type(e).__name__}: {detail})') from None
  return array[..., None] if array.ndim == 2 else array
