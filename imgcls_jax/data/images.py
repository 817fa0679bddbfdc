"""Image files without TensorFlow: the one set of image extensions every path accepts, the PIL
decoder that prediction and serving use, and the listing and batched reading of the files a user
names (``list_inputs`` / ``image_batches``: predict, and evaluate's out-of-distribution images).

Training (image folders), ``--mode=predict`` and ``--mode=serve`` all use ``IMAGE_EXTENSIONS``,
compared case-insensitively (``is_image_file``).
"""
from __future__ import annotations

import concurrent.futures
import glob
import io
import logging
import os
import re
import struct
import threading
from typing import Any, Callable, Iterator

import numpy as np

from imgcls_jax.data import file_walk
from imgcls_jax.errors import UserError

IMAGE_EXTENSIONS = frozenset({'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff',
                              '.ppm', '.pgm', '.pbm', '.pnm'})


def is_image_file(path: str) -> bool:
  """True when ``path`` ends in one of ``IMAGE_EXTENSIONS`` (any case)."""
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


class UnreadableImage(Exception):
  """A file or upload that is not a decodable image (reported and skipped, never fatal)."""


class ImageTooLarge(UnreadableImage):
  """An image with more pixels than allowed."""


_LIFT_PIL_LIMIT = threading.Lock()   # held while PIL's global limit is lifted (``_open``)


def decode(data: bytes | str, *, channels: int, size_hw: tuple[int, int] | None = None,
           max_pixels: int | None = None) -> np.ndarray:
  """Image bytes or a file path -> uint8 HxWx``channels``, upright (EXIF orientation applied, else
  XMP's; an EXIF block PIL cannot parse is ignored with a warning, ``_upright``).

  Any mode (grey, RGB, RGBA, palette) is converted: grey is replicated for 3 channels, alpha is
  dropped. With ``size_hw`` the image is resized to it (area-average when shrinking,
  bilinear when enlarging). Raises UnreadableImage, and ImageTooLarge (from the header, before
  decoding) for an image of more than ``max_pixels`` (width x height; 0 = no limit, None = the
  size PIL refuses as a decompression bomb, twice ``PIL.Image.MAX_IMAGE_PIXELS``).
  """
  from PIL import Image
  if max_pixels is None:
    with _LIFT_PIL_LIMIT:   # not None for a moment while another thread's _open lifts it
      limit, whose = 2 * (Image.MAX_IMAGE_PIXELS or 0), "PIL's decompression-bomb limit"
  else:
    limit, whose = max_pixels, 'the limit'
  try:
    with _open(data) as img:
      if limit and img.width * img.height > limit:
        raise ImageTooLarge(f'an image of {img.width}x{img.height} pixels, more than {whose} '
                            f'of {limit}')
      img = _upright(img, data if isinstance(data, str) else None)
      if img.mode.startswith('I;16'):  # 16-bit grey (scans, medical): full range to 8 bits
        img = Image.fromarray((np.asarray(img, np.uint32) // 257).astype(np.uint8))
      elif img.mode == 'I':   # 32-bit integer grey: 0-255 as 8-bit values, else 16-bit ones
        a = np.asarray(img, np.int64)
        if a.min(initial=0) < 0 or a.max(initial=0) > 65535:
          raise UnreadableImage('a 32-bit integer image with values outside 0-65535; save it '
                                'as 8- or 16-bit')
        img = Image.fromarray((a // 257 if a.max(initial=0) > 255 else a).astype(np.uint8))
      elif img.mode == 'F':   # float grey (TIFF): values in [0, 1] to 0-255; others are refused
        a = np.asarray(img, np.float64)
        if not (np.isfinite(a).all() and a.min(initial=0) >= 0 and a.max(initial=0) <= 1):
          raise UnreadableImage('a floating-point image with values outside [0, 1] (its range '
                                'is not known); save it with values in [0, 1] or as 8-bit')
        img = Image.fromarray(np.rint(a * 255).astype(np.uint8))
      mode = 'L' if channels == 1 else 'RGB'
      if img.mode == 'P' or (img.mode in ('PA', 'LA') and mode == 'RGB'):
        img = img.convert('RGBA')   # (a palette straight to grey: the same bytes, and a warning)
      img = img.convert(mode)
      if size_hw and (img.height, img.width) != tuple(size_hw):
        h, w = size_hw
        shrink = img.height >= h and img.width >= w
        img = img.resize((w, h), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
      array = np.asarray(img, np.uint8)
  except UnreadableImage:
    raise
  except Image.DecompressionBombError as e:  # PIL's check of a later frame or crop (GIF, ICO)
    raise ImageTooLarge(f'an image with a part larger than PIL decodes ({e})') from None
  except Image.UnidentifiedImageError:   # PIL's text names the file object: say what it means
    raise UnreadableImage('not a readable image (PIL cannot identify it: damaged, or not in a '
                          'format it reads, such as JPEG, PNG, GIF, BMP, TIFF, WebP)') from None
  except (OSError, ValueError, SyntaxError) as e:
    detail = re.sub(r'<_io\.BytesIO object at 0x[0-9a-f]+>', 'the upload',
                    (str(e).splitlines() or [''])[0][:160])
    raise UnreadableImage(f'not a readable image ({type(e).__name__}: {detail})') from None
  return array[..., None] if array.ndim == 2 else array


# Where PIL keeps a JPEG's, PNG's or WebP's EXIF block (``Image.getexif`` reads it from there).
_EXIF_KEYS = ('exif', 'Raw profile type exif')
_WARNED_DAMAGED_EXIF: set[str] = set()   # files warned about (training reads each every epoch)
_EXIF_ERRORS = (SyntaxError, ValueError, TypeError, struct.error)   # PIL's for a damaged block


def _exif_of(info: dict[str, Any]) -> tuple[Any, Exception | None]:
  """(PIL's ``Exif`` of an image whose ``info`` this is, parsed afresh: its EXIF block, XMP's
  tiff:Orientation where the block has none; the error a damaged block raised, which is then
  left out). Parsed afresh because a JPEG's open swallows that error."""
  from PIL import Image
  probe = Image.new('1', (0, 0))
  probe.info = dict(info)
  try:
    return probe.getexif(), None
  except _EXIF_ERRORS as e:
    probe = Image.new('1', (0, 0))
    probe.info = {k: v for k, v in info.items() if k not in _EXIF_KEYS}
    return probe.getexif(), e


def _upright(img: Any, path: str | None) -> Any:
  """``ImageOps.exif_transpose(img)``, except that an EXIF block PIL cannot parse counts as absent
  (a warning, once per file; XMP's tiff:Orientation, which PIL reads where EXIF gives none, then
  decides) instead of refusing the file: its pixels are there, and a browser shows it so."""
  from PIL import ImageOps
  img.load()   # (a PNG's chunks after the image data, an eXIf among them, are read now)
  block = {k: img.info[k] for k in _EXIF_KEYS if k in img.info}
  e = _exif_of(block)[1] if block else None   # (most files have none: nothing parsed)
  if e is not None:
    if path is None or path not in _WARNED_DAMAGED_EXIF:
      if path is not None:
        _WARNED_DAMAGED_EXIF.add(path)
      logging.warning('%s: its EXIF block is damaged (%s) and is ignored; if the image is on '
                      'its side, turn the file upright.', path or 'An upload',
                      (str(e).splitlines() or [''])[0][:120] or type(e).__name__)
    img = img.copy()   # a plain image, which forgets PIL's parse of the block
    for k in _EXIF_KEYS:
      img.info.pop(k, None)
  return ImageOps.exif_transpose(img)


def orientation(img: Any) -> int:
  """The orientation (1-8) ``decode`` applies to the opened PIL image ``img`` beyond its size, from
  its header: EXIF's tag, else XMP's tiff:Orientation (as PIL reads them); a damaged EXIF block
  counts as absent, as ``_upright`` ignores it. For header-only readers (``file_probe.probe``;
  a PNG's eXIf after its pixels is not read without decoding them)."""
  if hasattr(img, 'tag_v2'):   # TIFF: its tags are the EXIF
    try:
      got = img.getexif().get(0x0112, 1)
    except _EXIF_ERRORS:
      got = 1
    if img.size != (img.tag_v2.get(256), img.tag_v2.get(257)):
      got = 1   # PIL's own TIFF reader turned it already (newer Pillow: its size is upright)
  else:
    got = _exif_of(img.info)[0].get(0x0112, 1)
  return int(got) if isinstance(got, int) else 1


def decode_recipe(channels: int, size_hw: tuple[int, int] | None) -> dict[str, Any]:
  """What ``decode`` does, in words, for a client that must make the same pixels elsewhere (a
  resize with another filter changes them: bilinear for box moved 2% of the digits test images'
  top-1)."""
  return {
      'decode': ('Pillow; the first frame; EXIF orientation applied (ImageOps.exif_transpose: '
                 "XMP's tiff:Orientation where EXIF gives none; an EXIF block Pillow cannot "
                 'parse is ignored); '
                 '16-bit grey floor-divided by 257 (32-bit integer grey too when above 255), '
                 'float grey in [0, 1] times 255, rounded; alpha dropped, not composited (the '
                 'colour stored under transparent pixels is kept)'),
      'color': ("'L' (Pillow's ITU-R 601-2 luma: L = (299 R + 587 G + 114 B) / 1000)"
                if channels == 1 else "'RGB' (grey replicated to 3 channels)"),
      'resize_to': list(size_hw) if size_hw else None,
      'resize': (None if not size_hw else "Pillow's BOX filter (area average) when the image is "
                 'at least as large on both sides, else BILINEAR; nothing when it is already '
                 f'{size_hw[0]}x{size_hw[1]}')}


def _open(data: bytes | str) -> Any:
  """``PIL.Image.open`` (lazy: it reads the header) without PIL's decompression-bomb check, so
  that ``decode``'s ``max_pixels`` decides, also past PIL's ``MAX_IMAGE_PIXELS``.

  PIL reads its limit from a module global: only an image that PIL refuses (or warns about, where
  warnings are errors) is opened again with the global lifted, for that header read only and
  under a lock; other images leave it alone.
  """
  from PIL import Image
  source = lambda: io.BytesIO(data) if isinstance(data, bytes) else data
  try:
    return Image.open(source())
  except (Image.DecompressionBombError, Image.DecompressionBombWarning):
    pass
  with _LIFT_PIL_LIMIT:
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
      return Image.open(source())
    finally:
      Image.MAX_IMAGE_PIXELS = limit


def comma_paths(spec: str) -> list[str]:
  """The comma-separated paths of ``spec``; a comma inside the name of an existing file or
  folder (``scan 3,4.png``) stays in it: a part that does not exist is joined with the parts after
  it while the longer name does."""
  parts, out, i = (spec or '').split(','), [], 0
  while i < len(parts):
    j = i + 1
    if not os.path.exists(parts[i].strip()):
      j = next((k for k in range(len(parts), i + 1, -1)
                if os.path.exists(','.join(parts[i:k]).strip())), j)
    path = ','.join(parts[i:j]).strip()
    if path:
      out.append(path)
    i = j
  return out


def list_inputs(spec: str, key: str = 'predict.inputs') -> list[str]:
  """Files named in the comma-separated ``spec`` (the value of ``config.<key>``; ``comma_paths``):
  files, folders (their image files, recursively) and glob patterns (``photos/*.jpg``, ``**``
  recursive)."""
  paths = comma_paths(spec)
  if not paths:
    raise UserError(f'No inputs: set config.{key} to image files and/or folders, '
                    f'e.g. --config.{key}=photos/.')
  files, empty = [], []
  for p in paths:
    if os.path.isdir(p):
      found = _image_files(p)
      if not found:
        empty.append(p)
      files.extend(found)
    elif os.path.exists(p):
      files.append(p)
    elif any(ch in p for ch in '*?['):
      found = sorted(f for f in glob.glob(p, recursive=True)
                     if os.path.isfile(f) and is_image_file(f))
      if not found:
        hint = (" ('[...]' in a pattern matches one character: write a bracket in a file or "
                "folder name as [[] or []], as Python's glob.escape does)" if '[' in p else '')
        raise UserError(f'No image file matches {p} (from config.{key}); check the pattern'
                        f'{hint}.')
      files.extend(found)
    else:
      raise UserError(f'Input {p} (from config.{key}) does not exist; check the path.')
  if not files:
    raise UserError(f'No image files in config.{key}={spec}; give image files or '
                    f"folders holding them ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
  for p in empty:
    logging.warning('No image files in folder %s.', p)
  return files


def _image_files(folder: str) -> list[str]:
  """The non-hidden image files under ``folder`` (hidden sub-folders skipped too), sorted, links to
  folders and files followed; each real file once: a second link to a folder or file read
  already, or a link to a folder above (a loop), is passed over, with one warning."""
  passed: list[tuple[str, str]] = []
  found = sorted(os.path.join(folder, rel) for rel in file_walk.walk(folder, '', passed)
                 if is_image_file(rel))   # paths as the folder was given ('./imgs/a.png')
  if passed:
    logging.warning('Read each image under %s once: passed over %d link(s) to a folder or file '
                    'read already, or to a folder above (e.g. %s).', folder, len(passed),
                    os.path.join(folder, passed[0][0]))
  return found


def image_batches(files: list[str], prepare: Callable[[str], np.ndarray], batch_size: int,
                  skipped: list[tuple[str, str]]) -> Iterator[tuple[list[str], np.ndarray]]:
  """(files, uint8 images) batches, each file read by ``prepare`` (e.g. ``inference.prepare``) in
  a thread pool one batch ahead; unreadable files are added to ``skipped`` and logged, from the
  first readable one on (until then they are held back: when no file is readable the caller's
  one error line names them, ``unreadable_summary``)."""
  def load(path):
    try:
      return prepare(path)
    except UnreadableImage as e:
      return e

  readable = False
  with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    pending = [pool.map(load, chunks[0])] if chunks else []
    for i, chunk in enumerate(chunks):
      if i + 1 < len(chunks):
        pending.append(pool.map(load, chunks[i + 1]))
      good, arrays = [], []
      for path, result in zip(chunk, pending.pop(0)):
        if isinstance(result, UnreadableImage):
          skipped.append((path, str(result)))
          if readable:
            logging.warning('Skipped %s: %s.', path, result)
        else:
          good.append(path)
          arrays.append(result)
      if good:
        if not readable:   # the files skipped so far, now that some file is readable
          for path, why in skipped:
            logging.warning('Skipped %s: %s.', path, why)
        readable = True
        yield good, np.stack(arrays)


def unreadable_summary(skipped: list[tuple[str, str]], shown: int = 3) -> str:
  """``a.png (why); b.png (why); and 4 more``: the files of ``skipped`` for one error line."""
  listed = '; '.join(f'{path} ({why})' for path, why in skipped[:shown])
  return listed + (f'; and {len(skipped) - shown} more' if len(skipped) > shown else '')
