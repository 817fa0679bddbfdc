"""--mode=predict: image files / folders in, top-k class names out; unreadable files skipped.

``trained_run`` (one tiny digits training per test session) is shared with test_export / test_serve.
"""
import csv
import io
import json
import os
import re
import stat
import struct
import subprocess
import sys
import threading
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import inference, predict, train
from imgcls_jax.data import digits, images
from imgcls_jax.errors import UserError
from tests.conftest import REPO, subprocess_env

_RUNS: dict = {}


def small_config(tfds_dir):
  """The default digits config, shrunk: a narrow CNN trained for 30 steps."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from configs import default
  c = default.tfds_digits(default.get_config())
  c.data.data_dir = tfds_dir
  c.model.widths = (8, 16)
  c.batch_size = c.eval_batch_size = 64
  c.num_train_steps = 30
  c.optim.warmup_steps = 3
  c.eval_every_epochs = c.checkpoint_every_epochs = -1.0
  c.progress_bar = c.tensorboard = False
  return c


def trained_run(tmp_path_factory, tfds_dir):
  """(config, workdir) of a digits run trained once per session (and per tfds_dir)."""
  if tfds_dir not in _RUNS:
    config = small_config(tfds_dir)
    workdir = str(tmp_path_factory.mktemp('trained_run'))
    metrics = train.train_and_evaluate(config, workdir)
    _RUNS[tfds_dir] = (config, workdir, metrics)
  return _RUNS[tfds_dir]


def trainer_probabilities(config, workdir, images_NxHxWxC):
  """Class probabilities computed the way the trainer evaluates: the full train state restored by
  the trainer's Checkpointer, then ``eval_steps.log_probs_fn`` (the eval step's own prediction). An
  oracle independent of ``inference`` (its loading, merging and jitting)."""
  import jax
  from imgcls_jax import checkpoint, eval_steps, run as run_lib
  from imgcls_jax import state as state_lib
  s = run_lib.setup(config)
  target, _ = state_lib.abstract_state(s.model_fn, s.tx, config.seed, s.mesh, s.placement)
  with checkpoint.Checkpointer(workdir) as ckpt:
    state, _ = ckpt.restore(target)
  log_probs = jax.jit(lambda st, x: eval_steps.log_probs_fn(st, x, model_def=s.model_def,
                                                            cfg=s.step_cfg))
  n = len(images_NxHxWxC)
  padded = np.zeros((-(-n // 8) * 8,) + images_NxHxWxC.shape[1:], np.uint8)  # 8 fake devices
  padded[:n] = images_NxHxWxC
  return np.exp(np.asarray(jax.device_get(log_probs(state, padded))))[:n]


@pytest.fixture(scope='module')
def run(tmp_path_factory, tfds_dir):
  return trained_run(tmp_path_factory, tfds_dir)


@pytest.fixture(scope='module')
def clf(run):
  config, workdir, _ = run
  return inference.classifier(inference.load(workdir, config))


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """Digits test images saved in assorted modes, sizes and formats, plus two unreadable files."""
  root = tmp_path_factory.mktemp('images')
  (root / 'nested').mkdir()
  x, y = digits.load_arrays('test')
  expected = {}
  for i in range(12):
    p = root / f'grey_{i}.png'
    Image.fromarray(x[i, :, :, 0]).save(p)
    expected[str(p)] = ('exact', i)
  big = Image.fromarray(x[12, :, :, 0]).resize((96, 96), Image.NEAREST)
  big.convert('RGB').save(root / 'nested' / 'rgb_96px.jpg', quality=98)
  big.convert('RGBA').save(root / 'nested' / 'rgba_96px.png')
  Image.fromarray(x[13, :, :, 0]).convert('P').save(root / 'palette.gif')
  good = (root / 'grey_0.png').read_bytes()
  (root / 'truncated.png').write_bytes(good[:len(good) // 2])
  (root / 'not_an_image.png').write_text('just text')
  (root / 'README.txt').write_text('ignored: not an image extension')
  return str(root), expected, x, y


def test_prepare_any_size_and_mode(clf, image_folder):
  root, _, x, _ = image_folder
  assert clf.image_shape == (8, 8, 1) and clf.trained.native_hw == (8, 8)
  np.testing.assert_array_equal(clf.prepare(os.path.join(root, 'grey_3.png')), x[3])
  for name in ('nested/rgb_96px.jpg', 'nested/rgba_96px.png', 'palette.gif'):
    arr = clf.prepare(os.path.join(root, name))
    assert arr.shape == (8, 8, 1) and arr.dtype == np.uint8
  # A 96 px upscale of an 8 px digit comes back close to the original digit.
  assert np.abs(clf.prepare(os.path.join(root, 'nested/rgba_96px.png')).astype(int) -
                x[12].astype(int)).mean() < 12
  with pytest.raises(images.UnreadableImage, match=r'not a readable image \(PIL cannot identify '
                                                   r'it: damaged, or not in a format it reads'):
    clf.prepare(b'\x89PNG\r\n\x1a\n broken')     # (was PIL's "... image file the upload")
  with pytest.raises(images.ImageTooLarge):
    buf = io.BytesIO()
    Image.new('L', (300, 300)).save(buf, 'PNG')
    clf.prepare(buf.getvalue(), max_pixels=10_000)


def bomb_png(width: int, height: int) -> bytes:
  """A black 1-bit PNG of width x height (20000 x 20000: ~50 KB, made in ~0.2 s without
  holding its pixels; PIL refuses it as a decompression bomb)."""
  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  z = zlib.compressobj(9)
  row = bytes(1 + (width + 7) // 8)   # filter byte 0, then one bit per pixel
  idat = b''.join(z.compress(row) for _ in range(height)) + z.flush()
  header = struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0)  # 1-bit grey
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', idat)
          + chunk(b'IEND', b''))


def _outcome(data, **kw):
  try:
    images.decode(data, channels=1, **kw)
    return 'decoded'
  except images.UnreadableImage as e:
    return type(e).__name__


def test_max_pixels_decides_past_pils_decompression_bomb_limit(clf, tmp_path, monkeypatch):
  bomb = bomb_png(20000, 20000)   # 400 M pixels: PIL's own limit is 2 x 89,478,485
  with pytest.raises(images.ImageTooLarge, match=r"^an image of 20000x20000 pixels, more than "
                                                 r"PIL's decompression-bomb limit of 178956970$"):
    images.decode(bomb, channels=1)     # None: PIL's limit, reported as too large
  with pytest.raises(images.ImageTooLarge,
                     match='20000x20000 pixels, more than the limit of 100000000$'):
    images.decode(bomb, channels=1, max_pixels=10**8)
  # predict (no limit given) names such a file too large; the readable one is still predicted.
  (tmp_path / 'bomb.png').write_bytes(bomb)
  good = tmp_path / 'good.png'
  Image.new('L', (8, 8)).save(good)
  results, skipped = predict.predict_files(clf, [str(good), str(tmp_path / 'bomb.png')])
  assert [r['file'] for r in results] == [str(good)]
  assert len(skipped) == 1 and 'an image of 20000x20000 pixels, more than' in skipped[0][1]
  # A limit of 0 (none) or above PIL's lifts PIL's for that image, and PIL's global is restored.
  # (PIL's limit lowered to 1,000 here: decoding a 400 M pixel image would take 1 GB.)
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)
  small_bomb = bomb_png(100, 100)   # past 2 x 1,000: PIL refuses it
  with pytest.raises(images.ImageTooLarge, match="100x100 pixels, more than PIL's .* of 2000$"):
    images.decode(small_bomb, channels=1)
  with pytest.raises(images.ImageTooLarge, match='100x100 pixels, more than the limit of 9999$'):
    images.decode(small_bomb, channels=1, max_pixels=9999)
  for limit in (0, 10_000):
    array = images.decode(small_bomb, channels=3, max_pixels=limit)
    assert array.shape == (100, 100, 3) and not array.any()
  np.testing.assert_array_equal(clf.prepare(small_bomb, max_pixels=0), np.zeros((8, 8, 1)))
  with warnings.catch_warnings():   # PIL's warning (past 1 x its limit) raised as an error
    warnings.simplefilter('error')
    assert images.decode(bomb_png(40, 40), channels=1, max_pixels=0).shape == (40, 40, 1)
  # Threads lifting PIL's limit (0) beside threads keeping it (None): each gets its own answer.
  wrong = []

  def decode_many(max_pixels):
    expected = 'decoded' if max_pixels == 0 else 'ImageTooLarge'
    wrong.extend(got for got in (_outcome(small_bomb, max_pixels=max_pixels) for _ in range(50))
                 if got != expected)
  threads = [threading.Thread(target=decode_many, args=(m,)) for m in (0, None, 0, None)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not wrong and Image.MAX_IMAGE_PIXELS == 1000, wrong[:3]
  # Deterministically: a decode keeping PIL's limit, started while another thread has it lifted
  # (the lock held, the global None), waits and then applies it (it would otherwise see no limit).
  result = []
  with images._LIFT_PIL_LIMIT:
    Image.MAX_IMAGE_PIXELS = None
    t = threading.Thread(target=lambda: result.append(_outcome(small_bomb)))
    t.start()
    t.join(0.5)
    Image.MAX_IMAGE_PIXELS = 1000
  t.join()
  assert result == ['ImageTooLarge'], result


def test_predict_folder_jsonl_matches_model_and_skips_bad_files(run, clf, image_folder, caplog):
  config, workdir, _ = run
  root, expected, x, _ = image_folder
  config = config.copy_and_resolve_references()
  config.predict.inputs = root
  config.predict.top_k = 3
  config.predict.batch_size = 4           # several batches, the last one partial
  config.predict.output = os.path.join(root, '..', 'out', 'preds.jsonl')
  results = predict.predict(config, workdir)
  with open(config.predict.output) as f:
    lines = [json.loads(line) for line in f]
  assert lines == results
  files = [r['file'] for r in results]
  assert len(files) == 15 and files == sorted(files)          # 12 grey + jpg + rgba + gif
  assert not any('truncated' in f or 'not_an_image' in f or 'README' in f for f in files)
  skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Skipped')]
  assert len(skipped) == 2 and any('truncated.png' in m for m in skipped)
  # The probabilities are the trained model's on exactly those pixels (trainer-side oracle).
  probs = trainer_probabilities(config, workdir, x[:12])
  for r in results:
    if r['file'] in expected:
      p = probs[expected[r['file']][1]]
      top = r['predictions']
      assert [t['index'] for t in top] == list(np.argsort(-p)[:3])
      assert top[0]['class'] == clf.class_names[top[0]['index']]
      np.testing.assert_allclose([t['probability'] for t in top], np.sort(p)[::-1][:3], rtol=1e-5)


def test_predict_csv(run, image_folder, tmp_path):
  config, workdir, _ = run
  root = image_folder[0]
  config = config.copy_and_resolve_references()
  config.predict.inputs = f'{root}/grey_0.png,{root}/grey_1.png'
  config.predict.format = 'csv'
  config.predict.top_k = 2
  config.predict.output = str(tmp_path / 'p.csv')
  predict.predict(config, workdir)
  rows = list(csv.DictReader(open(config.predict.output)))
  assert [(r['file'].endswith('grey_0.png'), r['rank']) for r in rows] == [
      (True, '1'), (True, '2'), (False, '1'), (False, '2')]
  assert all(r['class'] in [str(i) for i in range(10)] and 0 <= float(r['probability']) <= 1
             for r in rows)


def test_predict_user_errors(run, tmp_path):
  config, workdir, _ = run
  config = config.copy_and_resolve_references()
  with pytest.raises(UserError, match='No inputs: set config.predict.inputs'):
    predict.predict(config, workdir)
  config.predict.inputs = str(tmp_path / 'nope')
  with pytest.raises(UserError, match='does not exist'):
    predict.predict(config, workdir)
  config.predict.format = 'xml'
  with pytest.raises(UserError, match='format must be one of'):
    predict.predict(config, workdir)
  config.predict.format = 'jsonl'
  config.predict.inputs = str(tmp_path)
  with pytest.raises(UserError, match='No checkpoint|No finished checkpoint'):
    predict.predict(config, str(tmp_path / 'empty_run'))


def test_inputs_without_image_files_are_a_user_error(tmp_path):
  empty, notes = tmp_path / 'empty', tmp_path / 'notes'
  empty.mkdir()
  notes.mkdir()
  (notes / 'README.txt').write_text('not an image extension')
  for spec in (str(empty), f'{empty},{notes}'):
    with pytest.raises(UserError, match=re.escape(f'No image files in config.predict.inputs='
                                                  f'{spec}; give image files')):
      images.list_inputs(spec)


def test_predict_fails_and_writes_nothing_when_no_input_image_can_be_read(run, image_folder,
                                                                        tmp_path, caplog):
  """One line naming both files; no 'Skipped' warning per file before it (was: the same problem
  as a warning, then again as the error)."""
  config, workdir, _ = run
  root = image_folder[0]
  c = config.copy_and_resolve_references()
  c.predict.inputs = f'{root}/truncated.png,{root}/not_an_image.png'
  c.predict.output = str(tmp_path / 'preds.jsonl')
  earlier = '{"file": "x.png", "predictions": []}\n'   # an earlier output: predict may replace it
  (tmp_path / 'preds.jsonl').write_text(earlier)
  with caplog.at_level('WARNING'), pytest.raises(
      UserError, match=('None of the 2 input file.s. in config.predict.inputs is a readable image '
                        r'\(.*truncated.png \(.*\); .*not_an_image.png \(.*\)\); give image '
                        'files')):
    predict.predict(c, workdir)
  assert not [r for r in caplog.records if r.getMessage().startswith('Skipped')]
  assert (tmp_path / 'preds.jsonl').read_text() == earlier   # nothing lost


def test_cli_predict_on_a_folder_prints_class_names(run, image_folder):
  config, workdir, _ = run
  root = image_folder[0]
  out = subprocess.run(
      [sys.executable, '-m', 'imgcls_jax.main', '--mode=predict',
       f'--config={REPO}/configs/default.py', f'--workdir={workdir}',
       f'--config.predict.inputs={root}', '--config.predict.top_k=1'],
      capture_output=True, text=True, env=subprocess_env(1), timeout=300, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [json.loads(line) for line in out.stdout.splitlines()]
  assert len(lines) == 15
  assert all(line['predictions'][0]['class'] in [str(i) for i in range(10)] for line in lines)
  assert 'Skipped' in out.stderr and 'not_an_image.png' in out.stderr


def test_predictions_on_the_eval_split_give_the_trainers_accuracy(run, tmp_path):
  """The oracle is the trainer's own final evaluation, not the classifier: every test image saved
  as a PNG and predicted from files must give the accuracy the run reported on the same split."""
  config, workdir, final = run
  x, y = digits.load_arrays('test')
  for i in range(len(x)):
    Image.fromarray(x[i, :, :, 0]).save(tmp_path / f'{i:04d}.png')
  c = config.copy_and_resolve_references()
  c.predict.inputs = str(tmp_path)
  c.predict.top_k = 1
  c.predict.output = str(tmp_path.parent / f'{tmp_path.name}.jsonl')
  results = predict.predict(c, workdir)
  assert len(results) == final['count'] == len(y)
  top1 = np.array([int(r['predictions'][0]['class']) for r in results])
  index = np.array([int(os.path.basename(r['file'])[:4]) for r in results])
  accuracy = float(np.mean(top1 == y[index]))
  assert accuracy == pytest.approx(final['accuracy'], abs=1e-9), (accuracy, final['accuracy'])


def test_predict_writes_one_explanation_overlay_per_readable_image(run, clf, image_folder,
                                                                  tmp_path):
  """Each overlay is the Grad-CAM of that very file's top-1 class (recomputed here from the
  classifier's weights, outside predict's batching)."""
  import jax
  from imgcls_jax import explain
  config, workdir, _ = run
  root = image_folder[0]
  c = config.copy_and_resolve_references()
  c.predict.inputs = root
  c.predict.batch_size = 4
  c.predict.explain = 'gradcam'
  c.predict.output = str(tmp_path / 'preds.jsonl')
  results = predict.predict(c, workdir)
  pngs = sorted(os.listdir(tmp_path / 'explanations'))
  assert len(results) == len(pngs) == 15                    # the 2 unreadable files: none
  assert sorted(os.path.basename(r['explanation']) for r in results) == pngs
  for r in results[:3]:
    assert r['explained'] == r['predictions'][0]['class']     # the class its map is of
    image = clf.prepare(r['file'])
    top1 = np.array([r['predictions'][0]['index']])
    heat = jax.device_get(explain.gradcam(clf.variables, image[None], top1,
                                          model_def=clf.model_def, cfg=clf.step_cfg))['heatmap']
    with Image.open(r['explanation']) as im:
      got = np.asarray(im)
    assert got.shape == (224, 224, 3)  # 8 px digits upscaled 28x
    np.testing.assert_allclose(got.astype(int), explain.overlay(image, heat[0]).astype(int), atol=2)
  c.predict.explain = 'integrated_gradients'
  c.predict.inputs = f'{root}/grey_0.png,{root}/grey_1.png'
  c.predict.explain_dir = str(tmp_path / 'ig')
  predict.predict(c, workdir)
  assert sorted(os.listdir(tmp_path / 'ig')) == ['grey_0.integrated_gradients.png',
                                                 'grey_1.integrated_gradients.png']
  c.predict.explain = 'lime'
  with pytest.raises(UserError, match="Unknown explanation method 'lime'; use one of gradcam"):
    predict.predict(c, workdir)


def test_an_output_that_would_replace_another_file_is_refused_before_predicting(run,
                                                                                image_folder,
                                                                                tmp_path, capfd):
  """predict.output overwrote whatever it named: the run's config.json (the run then failed to
  load), its metrics, a manifest, the input image itself. Now only a new file, an empty one or an
  earlier prediction file is written, and a refusal leaves every file as it was."""
  config, workdir, _ = run
  root = image_folder[0]
  image = f'{root}/grey_0.png'
  manifest = tmp_path / 'labels.csv'
  manifest.write_text('path,label\na.png,cat\n')
  (tmp_path / 'a_file').write_text('x')
  before = {p: open(p, 'rb').read() for p in (image, str(manifest),
                                               os.path.join(workdir, 'config.json'))}
  config = config.copy_and_resolve_references()
  config.predict.inputs = image
  cases = [(os.path.join(workdir, 'config.json'), 'is not an earlier prediction file'),
           (str(manifest), 'is not an earlier prediction file'),
           (image, 'is also one of config.predict.inputs'),
           (str(tmp_path), r'is a folder; give a file to write, e\.g\. .*predictions\.csv'),
           (str(tmp_path / 'a_file' / 'p.csv'), r'a_file is a file, not a folder')]
  for output, message in cases:
    config.predict.output = output
    with pytest.raises(UserError, match=message):
      predict.predict(config, workdir)
  assert {p: open(p, 'rb').read() for p in before} == before
  assert inference.load(workdir, None).run.model.name == config.model.name   # still loads
  for fmt in ('csv', 'jsonl'):   # an earlier output of either format is replaced, whole
    config.predict.format = fmt
    config.predict.output = str(tmp_path / f'p.{fmt}')
    for _ in range(2):
      predict.predict(config, workdir)
    text = open(config.predict.output).read()
    assert text.count('grey_0.png') == (5 if fmt == 'csv' else 1)
    assert not os.path.exists(config.predict.output + '.incomplete')
  # A link stays a link (its target is replaced); a FIFO is written to, not replaced by a file.
  target = config.predict.output
  open(target, 'w').close()                                  # empty: written through the link
  os.chmod(target, 0o640)
  os.symlink(target, tmp_path / 'link.jsonl')
  config.predict.output = str(tmp_path / 'link.jsonl')
  predict.predict(config, workdir)
  assert os.readlink(tmp_path / 'link.jsonl') == target and 'grey_0.png' in open(target).read()
  assert os.stat(target).st_mode & 0o777 == 0o640            # the earlier file's permissions
  fifo = str(tmp_path / 'fifo')
  os.mkfifo(fifo)
  got = []
  reader = threading.Thread(target=lambda: got.append(open(fifo).read()), daemon=True)
  reader.start()
  config.predict.output = fifo
  predict.predict(config, workdir)
  reader.join(timeout=60)
  assert 'grey_0.png' in got[0] and stat.S_ISFIFO(os.stat(fifo).st_mode)
  # /dev/stdout (here pytest's capture file behind fd 1) is written to, never replaced.
  capfd.readouterr()
  config.predict.output = '/dev/stdout'
  predict.predict(config, workdir)
  assert 'grey_0.png' in capfd.readouterr().out and not os.path.exists('/dev/stdout.incomplete')
