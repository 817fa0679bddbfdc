"""The exported web page (``config.export.web``, headless Chromium) against ``--mode=predict``
(PIL, ``images.decode``) on the files where a browser's own decoding differs from PIL's: an
orientation stored only in XMP (PIL turns a JPEG or PNG by it, Chromium does not), an EXIF block
PIL cannot parse (both now ignore it, with a warning and a note), and PNGs with transparent pixels
or 16-bit samples (PIL keeps the colour stored under alpha and reduces 16 bits its own way; a
canvas does neither, so the page decodes PNGs itself). For each file the page's model input is
predict's byte for byte and its probabilities predict's within 1e-5 (float32 ONNX in WebAssembly
against XLA on the same bytes, as in test_web_export); where the file holds a known upright image
its decode is checked against that image too, so the oracle is not the code under test alone."""
import io
import logging
import struct
import zlib

import numpy as np
from PIL import Image, PngImagePlugin

from imgcls_jax import predict
from imgcls_jax.data import digits, images
from tests.test_web_export import (DAMAGED_NOTE, _STORED_AS, _classify_with_pixels,  # noqa: F401
                                   page, predictor)   # (page, predictor: fixtures)


def _xmp(orientation: int, element: bool = False) -> str:
  """An XMP packet whose only orientation is tiff:Orientation (as an attribute or an element)."""
  value = (f'><tiff:Orientation>{orientation}</tiff:Orientation></rdf:Description>' if element
           else f' tiff:Orientation="{orientation}"/>')
  return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-'
          'rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/"'
          f'{value}</rdf:RDF></x:xmpmeta>')


def _exif(orientation: int) -> Image.Exif:
  exif = Image.Exif()
  exif[0x0112] = orientation
  return exif


def _png_info(key: str, kind: str, value: str) -> PngImagePlugin.PngInfo:
  """A text chunk of ``kind`` ('tEXt', 'zTXt', 'iTXt' or 'iTXt zipped')."""
  info = PngImagePlugin.PngInfo()
  if kind.startswith('iTXt'):
    info.add_itxt(key, value, zip=kind.endswith('zipped'))
  else:
    info.add_text(key, value, zip=kind == 'zTXt')
  return info


XMP = 'XML:com.adobe.xmp'   # the PNG text keyword of XMP


def _decode(image_or_file) -> np.ndarray:
  """predict's model input (8x8 grey) of a file, or of a PIL image saved losslessly as PNG."""
  if isinstance(image_or_file, Image.Image):
    png = io.BytesIO()
    image_or_file.save(png, 'PNG')
    image_or_file = png.getvalue()
  return images.decode(image_or_file if isinstance(image_or_file, bytes) else str(image_or_file),
                       channels=1, size_hw=(8, 8))


def _agree(page, predictor, browser, files, tmp_path):  # noqa: F811 (the fixtures' values)
  """The page's answers for ``files``, after checking them against predict's: model input byte for
  byte (names of the files that differ, all at once), probabilities within 1e-5, top-1 class."""
  _, _, _, url = page
  answers, skipped = predict.predict_files(predictor, [str(f) for f in files], top=10)
  assert skipped == []
  results, got = _classify_with_pixels(browser, url, files, tmp_path)
  assert [r['file'] for r in results] == [f.name for f in files]
  assert [r.get('error') for r in results] == [None] * len(files)
  assert [f.name for f, g in zip(files, got)
          if not np.array_equal(np.asarray(g, np.uint8).reshape(8, 8, 1), _decode(f))] == []
  for r, a in zip(results, answers):
    by_index = sorted(a['predictions'], key=lambda p: p['index'])
    np.testing.assert_allclose(r['probabilities'], [p['probability'] for p in by_index],
                               atol=1e-5, err_msg=r['file'])
    assert r['top'][0]['class'] == a['predictions'][0]['class'], r['file']
  return results


def _digit(i: int, colour: bool, rng) -> Image.Image:
  """A test digit at 48x64 (not square: a turn shows), grey or in colour with channels that
  differ (the luma then counts)."""
  x, _ = digits.load_arrays('test')
  image = Image.fromarray(x[50 + i, :, :, 0]).resize((48, 64), Image.Resampling.BICUBIC)
  if not colour:
    return image
  noise = rng.integers(0, 60, (64, 48, 3))
  return Image.fromarray(np.clip(np.asarray(image)[..., None] + noise, 0, 255).astype(np.uint8))


def test_page_turns_a_jpeg_or_png_by_its_xmp_orientation_as_predict_does(
    page, predictor, browser, tmp_path):  # noqa: F811 (fixtures)
  """PIL's exif_transpose takes tiff:Orientation from XMP where EXIF names none (a JPEG's APP1
  XMP, a PNG's iTXt, zTXt or tEXt); Chromium turns by EXIF only, so the page turns those itself,
  and not where an EXIF tag (which the browser applies) overrides the XMP. Also a PNG whose EXIF
  is an ImageMagick 'Raw profile type exif' text, which PIL reads and Chromium does not."""
  rng = np.random.default_rng(4)
  upright, files = {}, []

  def add(name, image, o, **save):
    upright[name] = image
    files.append(tmp_path / name)
    (image.transpose(_STORED_AS[o]) if o > 1 else image).save(files[-1], **save)

  add('xmp 6.jpg', _digit(0, True, rng), 6, quality=95, xmp=_xmp(6).encode())
  add('xmp 6.png', _digit(1, False, rng), 6, pnginfo=_png_info(XMP, 'iTXt', _xmp(6)))
  add('xmp 8 zipped.png', _digit(2, True, rng), 8,
      pnginfo=_png_info(XMP, 'iTXt zipped', _xmp(8, element=True)))
  add('xmp 5 ztxt.png', _digit(3, False, rng), 5,
      pnginfo=_png_info(XMP, 'zTXt', _xmp(5)))
  add('xmp 7 text.png', _digit(4, True, rng), 7,
      pnginfo=_png_info(XMP, 'tEXt', _xmp(7)))
  add('exif 1 xmp 6.jpg', _digit(5, False, rng), 1, quality=95, exif=_exif(1),
      xmp=_xmp(6).encode())                          # EXIF's tag wins: not turned
  add('exif 3 xmp 6.png', _digit(6, True, rng), 3, exif=_exif(3),
      pnginfo=_png_info(XMP, 'iTXt', _xmp(6)))
  raw = _exif(6).tobytes()[6:]                       # (without 'Exif\0\0', as ImageMagick writes)
  add('raw profile 6.png', _digit(7, False, rng), 6, pnginfo=_png_info(
      'Raw profile type exif', 'zTXt', f'\nexif\n{len(raw):8}\n{raw.hex()}\n'))
  for f in files:   # (the files hold what their names say: predict decodes them upright)
    if f.suffix == '.png':
      np.testing.assert_array_equal(_decode(f), _decode(upright[f.name]), err_msg=f.name)
  with Image.open(files[0]) as stored:               # the JPEG: its own pixels, turned
    np.testing.assert_array_equal(_decode(files[0]),
                                  _decode(stored.transpose(Image.Transpose.ROTATE_270)))
  results = _agree(page, predictor, browser, files, tmp_path)
  assert [r['notes'] for r in results] == [[]] * len(files)


def test_page_and_predict_both_answer_a_file_whose_exif_block_is_damaged(
    page, predictor, browser, tmp_path, caplog):  # noqa: F811 (fixtures)
  """An EXIF block PIL cannot parse (no TIFF header) in a JPEG (with JFIF dpi, where PIL's open
  does not swallow the failure), a PNG and a WebP: its pixels are there, so predict reads the file
  as stored with a one-line warning (it refused it), and the page answers the same with a note
  saying so; where XMP has an orientation, both turn the file by it (EXIF counts as absent)."""
  rng = np.random.default_rng(5)
  junk = b'Exif\x00\x00not a TIFF block'
  stored = [_digit(i, i % 2 == 1, rng) for i in range(4)]
  stored[0].save(tmp_path / 'damaged exif.jpg', quality=95, dpi=(72, 72), exif=junk)
  stored[1].save(tmp_path / 'damaged exif.png', exif=junk)
  stored[2].save(tmp_path / 'damaged exif.webp', exif=junk, lossless=True)
  stored[3].transpose(_STORED_AS[8]).save(
      tmp_path / 'damaged exif xmp 8.png', exif=junk,
      pnginfo=_png_info(XMP, 'iTXt', _xmp(8)))
  files = [tmp_path / n for n in ('damaged exif.jpg', 'damaged exif.png', 'damaged exif.webp',
                                  'damaged exif xmp 8.png')]
  with Image.open(files[0]) as im:
    assert im.info['exif'] == junk and im.info['jfif_unit'] == 1
  with caplog.at_level(logging.WARNING):
    results = _agree(page, predictor, browser, files, tmp_path)
  warned = sorted(r.getMessage() for r in caplog.records if 'EXIF block' in r.getMessage())
  assert warned == sorted(
      f"{f}: its EXIF block is damaged (not a TIFF file (header b'not a TI' not valid)) and is "
      'ignored; if the image is on its side, turn the file upright.' for f in files)
  for f, image in zip(files[:3], stored):   # as stored (the JPEG: its own pixels)
    with Image.open(f) as im:
      want = _decode(im.convert('RGB') if f.suffix == '.jpg' else image)
    np.testing.assert_array_equal(_decode(f), want, err_msg=f.name)
  np.testing.assert_array_equal(_decode(files[3]), _decode(stored[3]))   # upright by XMP
  assert [r['notes'] for r in results] == [[DAMAGED_NOTE]] * len(files)


def _filtered(rows: list[bytes], bpp: int) -> bytes:
  """PNG rows, row i with filter type i % 5 (None, Sub, Up, Average, Paeth), as a decoder must
  undo them."""
  out, prior = [], bytes(len(rows[0]) if rows else 0)
  for i, row in enumerate(rows):
    kind, f = i % 5, bytearray(len(row))
    for j, x in enumerate(row):
      a = row[j - bpp] if j >= bpp else 0
      b = prior[j]
      c = prior[j - bpp] if j >= bpp else 0
      p = a + b - c
      paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else (
          b if abs(p - b) <= abs(p - c) else c)
      f[j] = (x - (0, a, b, (a + b) // 2, paeth)[kind]) % 256
    out.append(bytes([kind]) + bytes(f))
    prior = row
  return b''.join(out)


def _png(samples: np.ndarray, colour_type: int, depth: int, *, interlaced: bool = False,
         palette: bytes = b'', trns: bytes = b'') -> bytes:
  """A PNG of ``samples`` (H x W x samples-per-pixel, values of ``depth`` bits) written here, as
  PIL does not: interlaced (Adam7), any depth, every filter type."""
  h, w, n = samples.shape

  def pack(block):   # one row of values -> bytes
    if depth == 16:
      return block.astype('>u2').tobytes()
    if depth == 8:
      return block.astype(np.uint8).tobytes()
    bits = np.unpackbits(block.astype(np.uint8).reshape(-1, 1), axis=1)[:, 8 - depth:]
    return np.packbits(bits.reshape(-1)).tobytes()

  passes = ([(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
             (0, 1, 1, 2)] if interlaced else [(0, 0, 1, 1)])
  data = b''
  for x0, y0, dx, dy in passes:
    sub = samples[y0::dy, x0::dx]
    if sub.size:
      data += _filtered([pack(r) for r in sub], max(1, n * depth // 8))

  def chunk(kind, body):
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
  return (b'\x89PNG\r\n\x1a\n' +
          chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, depth, colour_type, 0, 0, int(interlaced)))
          + (chunk(b'PLTE', palette) if palette else b'') + (chunk(b'tRNS', trns) if trns else b'')
          + chunk(b'IDAT', zlib.compress(data)) + chunk(b'IEND', b''))


def test_page_decodes_a_png_as_predict_does_transparent_or_16_bit(
    page, predictor, browser, tmp_path):  # noqa: F811 (fixtures)
  """PIL drops alpha and keeps the colour stored under it (a transparent pixel's hidden colour
  counts: images.decode_recipe says so); a canvas premultiplies by alpha, losing it. PIL reduces
  16-bit grey as v // 257 (images.decode) and other 16-bit samples to their high byte. The page
  decodes PNGs itself so: RGBA, grey+alpha, palette with tRNS (PIL's and written here at 1-8 bits,
  an index past the palette black as in PIL), 16-bit grey, RGB(+tRNS) and RGBA, interlaced or not,
  every filter type, small enough that some Adam7 passes are empty; the model input is
  predict's, and no note says it may differ."""
  rng = np.random.default_rng(6)
  x, _ = digits.load_arrays('test')
  g = np.asarray(Image.fromarray(x[60, :, :, 0]).resize((24, 20), Image.Resampling.BICUBIC),
                 np.int64)
  colour = np.clip(g[..., None] + rng.integers(0, 80, (20, 24, 3)), 0, 255).astype(np.uint8)
  alpha = rng.integers(1, 255, (20, 24)).astype(np.uint8)   # partly transparent ...
  alpha[:8, :10] = 0                                       # ... and hidden, stored bright
  colour[:8, :10] = (250, 200, 30)
  alpha[12:, 12:] = 255
  files = {}

  def add(name, data):
    files[name] = tmp_path / name
    files[name].write_bytes(data) if isinstance(data, bytes) else data.save(files[name])

  add('rgba.png', Image.fromarray(np.dstack([colour, alpha]), 'RGBA'))
  add('grey alpha.png', Image.fromarray(np.dstack([colour[..., 0], alpha]), 'LA'))
  indices = (colour[..., 0] // 32).astype(np.uint8)        # 8 colours, index 0 transparent
  p = Image.fromarray(indices, 'P')
  p.putpalette([250, 200, 30] + [v for i in range(1, 8) for v in (32 * i, 255 - 32 * i, 100)])
  p.info['transparency'] = 0
  add('palette trns.png', p)
  wide = (colour.astype(np.uint16) * 257 + rng.integers(0, 257, colour.shape)).astype(np.uint16)
  add('grey 16.png', _png(wide[..., :1], 0, 16))
  add('rgba 16 interlaced.png', _png(np.dstack([wide, alpha.astype(np.uint16) * 257]), 6, 16,
                                     interlaced=True))
  add('rgb 16 trns.png', _png(wide, 2, 16, trns=wide[0, 0].astype('>u2').tobytes()))
  add('grey alpha 16.png', _png(np.dstack([wide[..., :1], wide[..., 1:2]]), 4, 16))
  add('rgba interlaced.png', _png(np.dstack([colour, alpha]), 6, 8, interlaced=True))
  for depth in (1, 2, 4):
    add(f'grey {depth} interlaced.png', _png((g >> (8 - depth))[..., None], 0, depth,
                                             interlaced=True))
  add('rgb 3x5 interlaced.png', _png(colour[:5, :3], 2, 8, interlaced=True))   # empty passes
  add('grey 1x1 interlaced.png', _png(g[:1, :1, None], 0, 8, interlaced=True))
  palette = bytes([250, 200, 30, 0, 0, 255, 10, 240, 90])   # 3 entries; index 3 is past it
  add('palette 2 trns.png', _png((g >> 6)[..., None], 3, 2, palette=palette, trns=b'\x00\x80'))
  files = list(files.values())
  with Image.open(files[0]) as im:
    assert im.mode == 'RGBA' and im.getpixel((0, 0)) == (250, 200, 30, 0)
  with Image.open(files[3]) as im:
    assert im.mode == 'I;16'
  # The rule: alpha dropped, the stored colour kept (not composited onto black, a canvas's).
  np.testing.assert_array_equal(_decode(files[0]), _decode(Image.fromarray(colour)))
  over_black = (colour * (alpha[..., None] / 255.0)).round().astype(np.uint8)
  assert not np.array_equal(_decode(files[0]), _decode(Image.fromarray(over_black)))
  results = _agree(page, predictor, browser, files, tmp_path)
  assert [r['notes'] for r in results] == [[]] * len(files)
