"""``config.export.web``: the exported page classifies images in a real browser (headless Chromium
driven by selenium, onnxruntime-web's WebAssembly build), offline, from a plain static server.
Oracles: the trainer's own evaluation function on the same pixels (probabilities), PIL's grey
conversion (for a colour upload), and the run's decision rules computed here in numpy."""
import functools
import http.server
import io
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import export, inference, ood, predict
from imgcls_jax.data import digits, images
from imgcls_jax.errors import UserError
from tests.test_multilabel import tagged_run  # noqa: F401,F811 (a fixture)
from tests.test_predict import REPO, trained_run, trainer_probabilities

CHROMIUM = os.environ.get('CHROMIUM_BINARY', '/usr/bin/chromium')
CHROMEDRIVER = os.environ.get('CHROMEDRIVER', '/usr/bin/chromedriver')
RUNTIME = os.environ.get('IMGCLS_ORT_WEB',
                         os.path.join(REPO, '.ci', 'node_modules', 'onnxruntime-web', 'dist'))
selenium = pytest.importorskip('selenium', reason='the browser test needs selenium (test extra)')
pytest.importorskip('tf2onnx', reason="the web page runs the ONNX model: pip install "
                                      "'imgcls_jax[export]'")
if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
  pytest.skip(f'the browser test needs Chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}; '
              'Debian packages chromium and chromium-driver)', allow_module_level=True)
if not os.path.isfile(os.path.join(RUNTIME, export.web.BUNDLE)):
  pytest.skip(f'the web-export test needs onnxruntime-web in {RUNTIME}: run '
              '`(cd .ci && npm ci)` or set IMGCLS_ORT_WEB to its dist folder',
              allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402

from tests.test_web import screenshot_on_failure  # noqa: E402

NOT_DECODED = 'This file could not be decoded: it is damaged or not an image.'
DAMAGED_NOTE = ('Its EXIF block is damaged and is ignored, as --mode=predict ignores it: if the '
                'image is on its side, turn the file upright.')


@pytest.fixture(scope='module')
def page(tmp_path_factory, tfds_dir):
  """(config, workdir, export record, URL of the exported page served from its folder alone)."""
  config, workdir, _ = trained_run(tmp_path_factory, tfds_dir)
  config = config.copy_and_resolve_references()
  config.export.web = True
  config.export.web_runtime = RUNTIME
  config.export.verify_examples = 32
  config.export.output_dir = str(tmp_path_factory.mktemp('web_export') / 'model')
  record = export.export(config, workdir)
  handler = functools.partial(_Quiet, directory=os.path.join(config.export.output_dir, 'web'))
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield config, workdir, record, f'http://127.0.0.1:{server.server_port}/'
  server.shutdown()


class _Quiet(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


def _wait(predicate, what, timeout=60):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.1)
  raise AssertionError(f'timed out waiting for {what}')


def _classify(driver, url, files):
  """The page's answers for ``files`` (its window.imgclsResults) after loading it afresh."""
  driver.get(url)
  status = driver.find_element(By.ID, 'status')
  _wait(lambda: status.get_attribute('data-state') != 'loading', 'the model to load')
  assert status.get_attribute('data-state') == 'ready', driver.find_element(By.ID, 'status').text
  driver.find_element(By.ID, 'file').send_keys('\n'.join(map(str, files)))
  return _wait(lambda: (lambda r: r if len(r) == len(files) else None)(
      driver.execute_script('return window.imgclsResults || []')), 'the answers')


def _classify_with_pixels(driver, url, files, tmp_path):
  """(the page's answers, the model input it made of each file: window.imgclsPixels)."""
  with screenshot_on_failure(driver, tmp_path):
    results = _classify(driver, url, files)
    pixels = driver.execute_async_script(
        'const done = arguments[arguments.length - 1];'
        "Promise.all([...document.getElementById('file').files].map(window.imgclsPixels))"
        '.then(done, (e) => done(String(e)));')
  return results, pixels


def test_export_writes_a_self_contained_page(page):
  config, _, record, _ = page
  web_dir = os.path.join(config.export.output_dir, 'web')
  assert record['web']['runtime'] == 'onnxruntime-web ' + json.load(
      open(os.path.join(RUNTIME, os.pardir, 'package.json')))['version']
  assert record['web']['files'] == ['bytes.js', 'classify.js', 'decode.js', 'index.html',
                                    'model.json', 'model.onnx', 'orientation.js',
                                    'ort/ort-wasm-simd-threaded.wasm', 'ort/ort.bundle.js',
                                    'pillow.js', 'png.js']
  assert sorted(os.listdir(config.export.output_dir)) == sorted(record['files'] + ['export.json',
                                                                                   'labels.txt'])
  assert 'web' in record['files'] and 'model.onnx' not in record['files']   # onnx was not asked
  v = record['verification']['web']
  assert v['max_abs_prob_diff'] <= 1e-4 and v['top1_agreement'] == 1.0
  meta = json.load(open(os.path.join(web_dir, 'model.json')))
  assert meta['class_names'] == [str(i) for i in range(10)] and meta['input_shape'] == [8, 8, 1]
  assert meta['task'] == 'single_label' and meta['checkpoint_step'] == record['checkpoint_step']
  page_text = ''.join(open(os.path.join(web_dir, n)).read() for n in export.web.PAGE_FILES)
  page_text = page_text.replace('http://ns.adobe.com/xap/1.0/', '')   # XMP's name, not a host
  assert 'http://' not in page_text and 'https://' not in page_text, 'another host is named'


def test_page_gives_the_trainers_probabilities_in_the_browser(page, browser, tmp_path):
  """Grey PNGs at the input size, a colour PNG (grey by PIL's luma) and a file that is no image:
  the page's probabilities are the trainer's evaluation of the same pixels within 1e-5."""
  config, workdir, _, url = page
  x, _ = digits.load_arrays('test')
  files, pixels = [], []
  for i in range(6):
    path = tmp_path / f'digit {i}.png'
    Image.fromarray(x[i, :, :, 0]).save(path)
    files.append(path)
    pixels.append(x[i])
  g = x[6, :, :, 0].astype(np.int32)
  rgb = np.stack([g, g // 2, 255 - g], -1).astype(np.uint8)   # channels differ: the luma counts
  Image.fromarray(rgb).save(tmp_path / 'colour.png')
  files.append(tmp_path / 'colour.png')
  pixels.append(np.asarray(Image.fromarray(rgb).convert('L'))[..., None])
  (tmp_path / 'notes.png').write_bytes(b'not an image at all')
  files.append(tmp_path / 'notes.png')
  with screenshot_on_failure(browser, tmp_path):
    results = _classify(browser, url, files)
    shown = browser.find_elements(By.CSS_SELECTOR, '#results tbody tr')
    assert len(shown) == len(files)
  want = trainer_probabilities(config, workdir, np.stack(pixels))
  assert [r['file'] for r in results] == [f.name for f in files]
  for r, p in zip(results, want):
    np.testing.assert_allclose(r['probabilities'], p, atol=1e-5, err_msg=r['file'])
    assert r['answer'] == str(int(np.argmax(p))) == r['top'][0]['class']
    assert [t['index'] for t in r['top']] == list(np.argsort(-p, kind='stable')[:5])
  assert results[-1]['error'] == NOT_DECODED
  assert NOT_DECODED in shown[-1].text


def test_page_makes_predicts_pixels_from_images_of_any_size(page, browser, tmp_path):
  """Shrunk (box filter), enlarged (bilinear), each axis a different ratio, colour JPEG and PNG,
  an EXIF-rotated JPEG: the page's model input is byte for byte images.decode's (PIL), and its
  probabilities the trainer's for those bytes."""
  config, workdir, _, url = page
  x, _ = digits.load_arrays('test')
  rng = np.random.default_rng(0)
  files = []
  for i, (w, h) in enumerate([(40, 24), (13, 11), (5, 7), (20, 6), (64, 64), (9, 8)]):
    image = Image.fromarray(x[30 + i, :, :, 0]).resize((w, h), Image.Resampling.BICUBIC)
    if i % 2:   # colour, with channels that differ
      noise = rng.integers(0, 60, (h, w, 3))
      image = Image.fromarray(np.clip(np.asarray(image)[..., None] + noise, 0, 255)
                              .astype(np.uint8))
    files.append(tmp_path / f'{i}_{w}x{h}.png')
    image.save(files[-1])
  photo = Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)).resize((90, 60))
  photo.save(tmp_path / 'photo.jpg', quality=90)
  exif = Image.Exif()
  exif[0x0112] = 6   # orientation: rotate 90 degrees clockwise to view
  photo.save(tmp_path / 'rotated.jpg', quality=90, exif=exif)
  files += [tmp_path / 'photo.jpg', tmp_path / 'rotated.jpg']
  results, got = _classify_with_pixels(browser, url, files, tmp_path)
  want = np.stack([images.decode(str(f), channels=1, size_hw=(8, 8)) for f in files])
  for f, g, w in zip(files, got, want):
    np.testing.assert_array_equal(np.asarray(g, np.uint8).reshape(8, 8, 1), w, err_msg=f.name)
  probs = trainer_probabilities(config, workdir, want)
  for r, p in zip(results, probs):
    np.testing.assert_allclose(r['probabilities'], p, atol=1e-5, err_msg=r['file'])


def test_page_says_which_images_it_cannot_read_as_predict_does(page, browser, tmp_path):
  """Where the browser decodes: a transparent pixel's stored colour (PIL keeps it; a canvas keeps
  colours premultiplied by alpha: a WebP) and a 16-bit PNG's reduction to 8 bits (predict: v //
  257; an animated PNG, which the page leaves to the browser) differ: the answer says so. The page
  decodes other PNGs itself, as PIL does: a transparent or 16-bit one is predict's and gets no
  note; nor does an opaque image, even with an alpha channel, nor an 8-bit one."""
  _, _, _, url = page
  x, _ = digits.load_arrays('test')
  grey = x[5, :, :, 0]
  alpha = np.full(grey.shape, 255, np.uint8)
  alpha[:2] = 0                                  # two transparent rows, stored white
  rgba = Image.fromarray(np.dstack([np.maximum(grey, 255 * (alpha == 0))] * 3 + [alpha])
                         .astype(np.uint8), 'RGBA')
  rgba.save(tmp_path / 'transparent.webp', lossless=True, exact=True)   # exact: keeps them white
  rgba.save(tmp_path / 'transparent.png')
  Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)]), 'RGBA').save(
      tmp_path / 'opaque_rgba.png')
  wide = (grey.astype(np.uint16) * 257 + np.arange(grey.size, dtype=np.uint16).reshape(
      grey.shape) % 257).astype(np.uint16)        # 16-bit values that are not 8-bit ones x 257
  Image.fromarray(wide).save(tmp_path / 'deep animated.png', save_all=True,
                             append_images=[Image.fromarray(wide[::-1].copy())])
  Image.fromarray(wide).save(tmp_path / 'deep.png')
  Image.fromarray(grey).save(tmp_path / 'plain.png')
  files = [tmp_path / n for n in ('transparent.webp', 'transparent.png', 'opaque_rgba.png',
                                  'deep animated.png', 'deep.png', 'plain.png')]
  for f in files[3:5]:
    with Image.open(f) as im:
      assert im.mode == 'I;16'                     # (PIL wrote a 16-bit PNG)
  with screenshot_on_failure(browser, tmp_path):
    results = _classify(browser, url, files)
    notes = [[n.text for n in row.find_elements(By.CSS_SELECTOR, '.note')]
             for row in browser.find_elements(By.CSS_SELECTOR, '#results tbody tr')]
    got = browser.execute_async_script(
        'const done = arguments[arguments.length - 1];'
        "Promise.all([...document.getElementById('file').files].map(window.imgclsPixels))"
        '.then(done, (e) => done(String(e)));')
  said = [r['notes'] for r in results]
  assert said == notes
  same = [np.array_equal(np.asarray(g, np.uint8).reshape(8, 8, 1),
                         images.decode(str(f), channels=1, size_hw=(8, 8)))
          for f, g in zip(files, got)]
  assert same == [False, True, True, False, True, True]   # the notes are true: those two differ
  assert said == [
      ["It has transparent pixels, whose stored colour the browser does not give: the answer can "
       "differ from --mode=predict's."], [], [],
      ["It is a 16-bit PNG, which the browser reduces to 8 bits its own way: the answer can differ "
       "slightly from --mode=predict's."], [], []]


@pytest.fixture(scope='module')
def predictor(page):
  """--mode=predict's classifier of the page's run."""
  return inference.classifier(inference.load(page[1]))


# How an upright image is stored for EXIF orientation o, so that PIL's exif_transpose (predict)
# turns it back upright.
_STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_270}


def test_page_turns_a_webp_upright_as_predict_does(page, browser, predictor, tmp_path):
  """Chromium turns JPEGs and PNGs by their EXIF orientation, but not WebPs: the page turns a
  WebP itself as PIL's exif_transpose does (8 orientations, grey and colour, not square; XMP's
  when there is no EXIF; a chunk only where the VP8X header flags it, as libwebp reads it), and
  not a JPEG or PNG a second time. Its model input is predict's byte for byte, its probabilities
  and answers predict's; a WebP whose EXIF block PIL cannot read (both ignore it) gets a note."""
  _, _, _, url = page
  x, _ = digits.load_arrays('test')
  rng = np.random.default_rng(1)

  def digit(i, colour):
    image = Image.fromarray(x[40 + i, :, :, 0]).resize((48, 64), Image.Resampling.BICUBIC)
    if not colour:
      return image
    noise = rng.integers(0, 60, (64, 48, 3))
    return Image.fromarray(np.clip(np.asarray(image)[..., None] + noise, 0, 255).astype(np.uint8))

  files, upright = [], []   # upright: the image PIL makes of each file (None: lossy)
  for o in range(1, 9):
    exif = Image.Exif()
    exif[0x0112] = o
    image = digit(o, colour=o % 2 == 0)
    files.append(tmp_path / f'orientation {o}.webp')
    (image.transpose(_STORED_AS[o]) if o > 1 else image).save(files[-1], exif=exif,
                                                              lossless=True)
    upright.append(image)
  image = digit(9, colour=False)
  image.transpose(_STORED_AS[8]).save(tmp_path / 'xmp 8.webp', lossless=True, xmp=(
      '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf'
      '-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
      'tiff:Orientation="8"/></rdf:RDF></x:xmpmeta>').encode())
  raw = bytearray(files[5].read_bytes())
  raw[20] &= ~0x08                                    # VP8X no longer flags the EXIF chunk
  (tmp_path / 'unflagged 6.webp').write_bytes(bytes(raw))
  exif = Image.Exif()
  exif[0x0112] = 6
  image.transpose(_STORED_AS[6]).save(tmp_path / 'exif 6.png', exif=exif)
  image.convert('RGB').transpose(_STORED_AS[6]).save(tmp_path / 'exif 6.jpg', exif=exif,
                                                     quality=95)
  files += [tmp_path / n for n in ('xmp 8.webp', 'unflagged 6.webp', 'exif 6.png', 'exif 6.jpg')]
  upright += [image, upright[5].transpose(_STORED_AS[6]), image, None]
  image.save(tmp_path / 'damaged exif.webp', exif=b'not a TIFF block', lossless=True)
  files.append(tmp_path / 'damaged exif.webp')
  upright.append(image)
  results, got = _classify_with_pixels(browser, url, files, tmp_path)
  want = [images.decode(str(f), channels=1, size_hw=(8, 8)) for f in files]
  for f, w, u in zip(files, want, upright):
    if u is not None:   # (the file holds what its name says)
      png = io.BytesIO()
      u.save(png, 'PNG')
      np.testing.assert_array_equal(images.decode(png.getvalue(), channels=1, size_hw=(8, 8)),
                                    w, err_msg=f.name)
  answers, skipped = predict.predict_files(predictor, [str(f) for f in files], top=10)
  assert skipped == []
  # Per file: (name, model input equal to predict's, answer, notes), all at once on failure.
  assert [(r['file'], np.array_equal(np.asarray(g, np.uint8).reshape(8, 8, 1), w), r['answer'],
           r['notes']) for r, g, w in zip(results, got, want)] == [
      (f.name, True, a['predictions'][0]['class'], [DAMAGED_NOTE] if f == files[-1] else [])
      for f, a in zip(files, answers)]
  for r, a in zip(results, answers):
    by_index = sorted(a['predictions'], key=lambda p: p['index'])
    np.testing.assert_allclose(r['probabilities'], [p['probability'] for p in by_index],
                               atol=1e-5, err_msg=r['file'])


def test_page_says_why_it_cannot_decode_a_file(page, browser, predictor, tmp_path):
  """Chromium decodes no TIFF (little- or big-endian, 8-bit, 16-bit or float) nor PNM, which
  predict reads: the row says so in one line and names the fix. A PNG that is damaged is said to
  be damaged or not an image."""
  _, _, _, url = page
  x, _ = digits.load_arrays('test')
  grey = x[7, :, :, 0]
  Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / 'float.tif')
  Image.fromarray(grey).save(tmp_path / 'grey.tiff')
  Image.frombytes('I;16B', (8, 8), (grey.astype('>u2') * 257).tobytes()).save(
      tmp_path / 'deep.tif')                      # big-endian: 'MM'
  Image.fromarray(grey).save(tmp_path / 'grey.pgm')
  png = io.BytesIO()
  Image.fromarray(grey).save(png, 'PNG')
  (tmp_path / 'damaged.png').write_bytes(png.getvalue()[:33] + bytes(range(256)))  # after IHDR
  files = [tmp_path / n for n in ('float.tif', 'grey.tiff', 'deep.tif', 'grey.pgm',
                                  'damaged.png')]
  assert [open(f, 'rb').read(4) for f in files[:3]] == [b'II*\0', b'II*\0', b'MM\0*']
  with screenshot_on_failure(browser, tmp_path):
    results = _classify(browser, url, files)
    shown = [row.find_element(By.CSS_SELECTOR, 'td.error').text
             for row in browser.find_elements(By.CSS_SELECTOR, '#results tbody tr')]
  cannot = ('This browser cannot decode {} images: convert the file to PNG or JPEG, or classify '
            'it with --mode=predict or --mode=serve, which read them.')
  want = [cannot.format('TIFF')] * 3 + [cannot.format('PNM (PBM, PGM, PPM)'), NOT_DECODED]
  assert [r['error'] for r in results] == shown == want
  answers, skipped = predict.predict_files(predictor, [str(f) for f in files])
  assert [a['file'] for a in answers] == [str(f) for f in files[:4]]   # as the line says
  assert [s for s, _ in skipped] == [str(files[4])]


def test_page_applies_the_runs_gates_as_predict_does(page, browser, tmp_path):
  """With a confidence threshold and an unknown-input threshold in model.json, each answer is
  "not sure" / "none of the classes" exactly where the numpy rules (selective's float32 >= and
  ood.gate) say so."""
  config, _, _, url = page
  meta_path = os.path.join(config.export.output_dir, 'web', 'model.json')
  original = open(meta_path).read()
  x, _ = digits.load_arrays('test')
  files = []
  for i in range(10, 22):
    files.append(tmp_path / f'{i}.png')
    Image.fromarray(x[i, :, :, 0]).save(files[-1])
  first = _classify(browser, url, files)
  logits = np.array([r['logits'] for r in first], np.float32)
  probs = np.array([r['probabilities'] for r in first], np.float32)
  energy = ood.energy(logits)
  meta = json.loads(original)
  meta['min_confidence'] = float(np.median(probs.max(-1)))
  meta['unknown_below'] = float(np.sort(energy)[2:4].mean())   # the 3 lowest are unknown
  try:
    with open(meta_path, 'w') as f:
      json.dump(meta, f)
    with screenshot_on_failure(browser, tmp_path):
      gated = _classify(browser, url, files)
  finally:
    with open(meta_path, 'w') as f:
      f.write(original)
  for r, p, lg in zip(gated, probs, logits):
    unknown = ood.gate(lg, meta['unknown_below'])['unknown']
    abstained = not np.float32(p.max()) >= np.float32(meta['min_confidence'])
    assert (r['unknown'], r['abstained']) == (unknown, abstained), r['file']
    assert r['answer'] == ('none of the classes' if unknown else
                           f"not sure ({r['top'][0]['class']}?)" if abstained else
                           r['top'][0]['class'])
  assert sum(r['unknown'] for r in gated) == 3
  assert 0 < sum(r['abstained'] for r in gated) < len(files)


def test_web_export_without_the_runtime_is_one_line_before_any_work(page, tmp_path,
                                                                    monkeypatch):
  config, workdir, _, _ = page
  c = config.copy_and_resolve_references()
  c.export.output_dir = str(tmp_path / 'model')
  c.export.web_runtime = str(tmp_path / 'nowhere')
  with pytest.raises(UserError, match=r'config.export.web_runtime=.*nowhere holds no '
                                      r'onnxruntime-web files .*npm install onnxruntime-web'):
    export.export(c, workdir)
  c.export.web_runtime = ''
  monkeypatch.chdir(tmp_path)   # no ./node_modules here
  with pytest.raises(UserError, match=r'No config.export.web_runtime is set and ./node_modules'):
    export.export(c, workdir)
  assert not os.path.exists(c.export.output_dir)
  # Its package folder, or a folder holding node_modules, is found as well as dist itself.
  assert export.web.find_runtime(os.path.dirname(RUNTIME)) == RUNTIME


def test_page_of_a_tagged_run_shows_the_tags_predict_gives(tagged_run, browser,  # noqa: F811
                                                           tmp_path):
  """Multi-label: the page's probabilities are predict's sigmoids and its tags are predict's (each
  tag at its own threshold from the run's validation split)."""
  config, workdir, root, truth, _ = tagged_run
  out = str(tmp_path / 'export')
  record = export.export(None, workdir, overrides={
      'export.output_dir': out, 'export.web': True, 'export.web_runtime': RUNTIME,
      'export.tflite': False, 'export.verify_examples': 32})
  meta = json.load(open(os.path.join(out, 'web', 'model.json')))
  assert meta['task'] == 'multilabel' and meta['thresholds'] == record['thresholds']
  files = [os.path.join(root, rel) for rel, _ in truth['test'][:10]]
  clf = inference.classifier(inference.load(workdir))
  want, _ = predict.predict_files(clf, files)
  server = http.server.ThreadingHTTPServer(
      ('127.0.0.1', 0), functools.partial(_Quiet, directory=os.path.join(out, 'web')))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    with screenshot_on_failure(browser, tmp_path):
      got = _classify(browser, f'http://127.0.0.1:{server.server_port}/', files)
  finally:
    server.shutdown()
  for g, w in zip(got, want):
    by_index = sorted(w['predictions'], key=lambda p: p['index'])
    np.testing.assert_allclose(g['probabilities'], [p['probability'] for p in by_index],
                               atol=1e-5)
    assert g['tags'] == [t['class'] for t in w['tags']], g['file']
    assert g['answer'] == (', '.join(g['tags']) or '(no tag)')
  assert any(len(g['tags']) > 1 for g in got)


def test_a_model_exported_again_is_read_afresh_by_the_page(page, browser, tmp_path):
  """The page fetched model.json (and model.onnx) through the browser's cache: with no
  Cache-Control a file last modified long ago is 'fresh' by heuristic for hours, so after an
  export into the same folder a reload kept the old model's rules (seen as a flaky test whose
  rewritten model.json was not read). Both are now revalidated on every load."""
  config, _, _, url = page
  meta_path = os.path.join(config.export.output_dir, 'web', 'model.json')
  original = open(meta_path).read()
  day_ago = time.time() - 86400
  os.utime(meta_path, (day_ago, day_ago))
  image = tmp_path / 'one.png'
  Image.fromarray(digits.load_arrays('test')[0][3, :, :, 0]).save(image)
  _classify(browser, url, [image])   # the browser now holds model.json, 'fresh' for hours
  meta = json.loads(original)
  meta['title'] = 'Exported again'
  try:
    with open(meta_path, 'w') as f:
      json.dump(meta, f)
    _classify(browser, url, [image])
    assert browser.find_element(By.ID, 'title').text == 'Exported again'
  finally:
    with open(meta_path, 'w') as f:
      f.write(original)
