"""Image files without TensorFlow: the one set of image extensions every path accepts.

Training (image folders), ``--mode=predict`` and ``--mode=serve`` all use ``IMAGE_EXTENSIONS``,
compared case-insensitively (``is_image_file``).
"""
from __future__ import annotations

import os

IMAGE_EXTENSIONS = frozenset({'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff',
                              '.ppm', '.pgm', '.pbm', '.pnm'})


def is_image_file(path: str) -> bool:
  """True when ``path`` ends in one of ``IMAGE_EXTENSIONS`` (any case)."""
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS
