"""Explanations: Grad-CAM localises the object on held-out images, it changes when the weights are
re-initialised (Adebayo et al., 2018), integrated gradients satisfy completeness, the head's input
is the penultimate layer, and a model without a convolution gets one clear line.

The localisation task: a Fashion-MNIST item (Debian's files; sklearn digits upscaled to 24 px when
they are absent) pasted into one random quadrant of a blank 56 x 56 canvas; its class is the label.

``--mode=predict``'s explanation files: one prediction never replaces another's map, and a tagging
run explains each predicted tag (a small digits run and a small run on tiles of digits).
"""
import csv
import functools
import gzip
import json
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image
from scipy import stats

from imgcls_jax import checkpoint_files, explain, inference, predict, steps, train
from imgcls_jax import state as state_lib
from imgcls_jax.data import digits, prepare_fashion_mnist
from imgcls_jax.errors import UserError
from imgcls_jax.models import layers

KEEP = (0, 1, 7, 8)    # Fashion-MNIST T-shirt, trouser, sneaker, bag (or digits 0, 1, 7, 8)
CLASSES = len(KEEP)
CANVAS = 56
TRAIN, HELD_OUT = 512, 128


def _items(n: int) -> tuple[np.ndarray, np.ndarray]:
  """n uint8 items (28 x 28 or 24 x 24) of the first CLASSES classes, and their labels."""
  path = os.path.join(prepare_fashion_mnist.DEBIAN_DIR, 't10k-images-idx3-ubyte.gz')
  if os.path.exists(path):
    with gzip.open(path) as f:
      x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(path.replace('images-idx3', 'labels-idx1')) as f:
      y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int32)
  else:  # no Debian package: sklearn's digits, 8 px -> 24 px
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.kron(d.images * 255 / 16, np.ones((3, 3))).astype(np.uint8)
    y = d.target.astype(np.int32)
  keep = np.flatnonzero(np.isin(y, KEEP))[:n]
  return x[keep], np.searchsorted(KEEP, y[keep]).astype(np.int32)


def _canvas(items: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(N x 56 x 56 x 1 uint8 canvases, the quadrant 0..3 holding each item)."""
  rng = np.random.RandomState(seed)
  n, s = items.shape[0], items.shape[1]
  quadrant = rng.randint(0, 4, n)
  out = np.zeros((n, CANVAS, CANVAS, 1), np.uint8)
  half = CANVAS // 2
  for i in range(n):
    top, left = (quadrant[i] // 2) * half, (quadrant[i] % 2) * half
    dy, dx = rng.randint(0, half - s + 1, 2)
    out[i, top + dy:top + dy + s, left + dx:left + dx + s, 0] = items[i]
  return out, quadrant


class SmallCNN(nnx.Module):
  """conv3x3(16)-ReLU-pool-conv3x3(32)-ReLU-global average-linear, without biases or BatchNorm:
  with mean 0 a blank region stays exactly 0 up to the head, so the map measures the item alone.

  (The table's ``cnn`` has BatchNorm: its shift makes blank regions a constant feature, which the
  model may use as evidence for a class of small items, e.g. sneakers; Grad-CAM then rightly
  spreads over the blank canvas, and the quadrant share says little about the implementation.)
  """

  def __init__(self, *, num_classes, in_channels, rngs, dtype='float32'):
    self.conv1 = layers.conv(in_channels, 16, 3, dtype=jnp.float32, rngs=rngs)
    self.conv2 = layers.conv(16, 32, 3, dtype=jnp.float32, rngs=rngs)
    self.head = layers.dense(32, num_classes, dtype=jnp.float32, rngs=rngs)

  def __call__(self, x, *, train=False):
    x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    return self.head(nnx.relu(self.conv2(x)).mean(axis=(1, 2)))


def train_task(epochs: int = 8, lr: float = 3e-3) -> dict:
  """A small CNN trained on the quadrant task, and held-out canvases."""
  x, y = _items(TRAIN + HELD_OUT)
  images, quadrant = _canvas(x, seed=0)
  model_fn = functools.partial(SmallCNN, num_classes=CLASSES, in_channels=1)
  cfg = steps.StepConfig(num_classes=CLASSES, mean=(0.0,), std=(0.3,))
  model = model_fn(rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, opt, xb, yb):
    def loss_fn(m):
      logits = m(steps.normalize(xb, cfg), train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  rng = np.random.RandomState(1)
  tr_x, tr_y = images[:TRAIN], y[:TRAIN]
  for _ in range(epochs):
    order = rng.permutation(TRAIN)
    for s in range(0, TRAIN, 32):
      train_step(model, opt, tr_x[order[s:s + 32]], tr_y[order[s:s + 32]])
  _, params, stats_, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  variables = state_lib.InferenceState(params=nnx.to_pure_dict(params),
                                       batch_stats=nnx.to_pure_dict(stats_))
  fresh = model_fn(rngs=nnx.Rngs(123))
  _, p2, s2, _ = nnx.split(fresh, nnx.Param, nnx.BatchStat, ...)
  random_vars = state_lib.InferenceState(params=nnx.to_pure_dict(p2),
                                         batch_stats=nnx.to_pure_dict(s2))
  return dict(model_def=state_lib.model_def(model_fn), cfg=cfg, variables=variables,
              random=random_vars, x=images[TRAIN:], y=y[TRAIN:], quadrant=quadrant[TRAIN:])


@pytest.fixture(scope='module')
def task():
  return train_task()


def _quadrant_mass(maps_NxHxW: np.ndarray, quadrant_N: np.ndarray) -> np.ndarray:
  half = maps_NxHxW.shape[1] // 2
  out = []
  for m, q in zip(maps_NxHxW, quadrant_N):
    top, left = (q // 2) * half, (q % 2) * half
    total = m.sum()
    out.append(m[top:top + half, left:left + half].sum() / total if total > 0 else 0.0)
  return np.array(out)


def test_gradcam_localises_the_item_on_held_out_images(task):
  fn = jax.jit(functools.partial(explain.gradcam, model_def=task['model_def'], cfg=task['cfg']))
  res = jax.device_get(fn(task['variables'], task['x']))
  heat = np.asarray(res['heatmap'])
  assert heat.shape == (HELD_OUT, CANVAS, CANVAS) and heat.min() >= 0 and heat.max() <= 1
  accuracy = np.mean(np.asarray(res['class_index']) == task['y'])
  assert accuracy > 0.6, accuracy  # the model learned the task (chance: 0.25)
  mass = _quadrant_mass(heat, task['quadrant'])
  # A uniform map would put 25% in the item's quadrant.
  assert mass.mean() >= 0.7, mass.mean()


def _spearman(a_NxHxW, b_NxHxW, masks_NxHxW=None) -> float:
  """Mean over images of the Spearman rank correlation of two maps (over the masked pixels)."""
  rho = []
  for i, (a, b) in enumerate(zip(a_NxHxW, b_NxHxW)):
    m = np.ones(a.shape, bool) if masks_NxHxW is None else masks_NxHxW[i]
    if np.ptp(a[m]) > 0 and np.ptp(b[m]) > 0:  # undefined for a constant map: left out
      rho.append(stats.spearmanr(a[m], b[m])[0])
  assert len(rho) >= len(a_NxHxW) // 2, f'only {len(rho)} maps are not constant'
  return float(np.mean(rho))


def test_gradcam_passes_the_model_randomisation_check(task):
  """Adebayo et al. (2018): maps must depend on the learned weights. Measured here: head
  re-initialised 0.29 over whole maps; every layer re-initialised 0.10 over the item's pixels
  (0.70 over whole maps: a bias-free model is exactly 0 on the blank canvas whatever its weights,
  so there the maps share the item's silhouette, the paper's edge-detector caveat)."""
  fn = jax.jit(functools.partial(explain.gradcam, model_def=task['model_def'], cfg=task['cfg']))
  target = jnp.asarray(task['y'])
  trained = np.asarray(fn(task['variables'], task['x'], target)['heatmap'])
  v, r = task['variables'], task['random']
  head_reset = state_lib.InferenceState(params={**v.params, 'head': r.params['head']},
                                        batch_stats=v.batch_stats)
  assert _spearman(trained, np.asarray(fn(head_reset, task['x'], target)['heatmap'])) < 0.5
  ink = task['x'][..., 0] > 0
  assert _spearman(trained, np.asarray(fn(r, task['x'], target)['heatmap']), ink) < 0.5
  # The check can fail: maps of the same weights computed twice agree exactly.
  assert _spearman(trained, np.asarray(fn(v, task['x'], target)['heatmap']), ink) > 0.99


def test_integrated_gradients_satisfy_completeness(task):
  v, md, cfg = task['variables'], task['model_def'], task['cfg']
  x = task['x'][:8]
  res = jax.jit(functools.partial(explain.integrated_gradients, model_def=md, cfg=cfg,
                                  num_steps=64))(v, x)
  model = md.merge(v.params, v.batch_stats)
  logits = np.asarray(model(steps.normalize(jnp.asarray(x), cfg), train=False))
  black = np.asarray(model(steps.normalize(jnp.zeros_like(jnp.asarray(x)), cfg), train=False))
  t = np.asarray(res['class_index'])
  expected = logits[np.arange(8), t] - black[np.arange(8), t]
  got = np.asarray(res['attribution']).reshape(8, -1).sum(-1)
  # Midpoint quadrature of a piecewise-linear (ReLU) path integral: small relative error.
  np.testing.assert_allclose(got, expected, rtol=0.05, atol=0.05 * np.abs(expected).max())
  heat = np.asarray(res['heatmap'])
  assert heat.shape == (8, CANVAS, CANVAS) and heat.max() == pytest.approx(1.0)
  # Blank canvas pixels are 0 in x, so their attribution (x - baseline) * gradient is exactly 0.
  assert np.all(heat[x[..., 0] == 0] == 0)


def test_penultimate_is_the_heads_input(task):
  v, md, cfg = task['variables'], task['model_def'], task['cfg']
  x = task['x'][:16]
  feats = np.asarray(jax.jit(functools.partial(explain.penultimate, model_def=md, cfg=cfg))(v, x))
  assert feats.shape == (16, 32)  # the last stage's width, after global average pooling
  model = md.merge(v.params, v.batch_stats)
  logits = np.asarray(model(steps.normalize(jnp.asarray(x), cfg), train=False))
  head = v.params['head']
  np.testing.assert_allclose(feats @ np.asarray(head['kernel']) + np.asarray(head['bias']), logits,
                             rtol=1e-4, atol=1e-4)


class _MLP(nnx.Module):
  def __init__(self, *, num_classes, in_channels, rngs, dtype='float32'):
    self.hidden = nnx.Linear(8 * 8 * in_channels, 16, rngs=rngs)
    self.out = nnx.Linear(16, num_classes, rngs=rngs)

  def __call__(self, x, *, train=False):
    return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))


def test_gradcam_of_a_model_without_convolution_is_one_clear_line(tmp_path):
  model_fn = functools.partial(_MLP, num_classes=3, in_channels=1)
  md = state_lib.model_def(model_fn)
  _, p, s, _ = nnx.split(model_fn(rngs=nnx.Rngs(0)), nnx.Param, nnx.BatchStat, ...)
  v = state_lib.InferenceState(params=nnx.to_pure_dict(p), batch_stats=nnx.to_pure_dict(s))
  cfg = steps.StepConfig(num_classes=3)
  x = np.zeros((2, 8, 8, 1), np.uint8)
  with pytest.raises(UserError,
                     match=r'Grad-CAM needs a convolutional model.*integrated_gradients'):
    explain.gradcam(v, x, model_def=md, cfg=cfg)
  # The explainer predict and serve use names the model in its one line.
  clf = types.SimpleNamespace(variables=v, image_shape=(8, 8, 1), model_def=md,
                              run=types.SimpleNamespace(model=types.SimpleNamespace(name='mlp')))
  with pytest.raises(UserError, match="Grad-CAM needs a convolutional model, but 'mlp' has no "):
    explain.explainer(clf, 'gradcam')
  with pytest.raises(UserError, match="Unknown explanation method 'cam'"):
    explain.explainer(clf, 'cam')
  with pytest.raises(UserError, match=r'config.predict.ig_steps=0 must be >= 1'):  # was a NaN map
    explain.explainer(clf, 'integrated_gradients', ig_steps=0)
  # Integrated gradients and the penultimate features work for it.
  ig = jax.jit(functools.partial(explain.integrated_gradients, model_def=md, cfg=cfg, num_steps=4))
  assert ig(v, x)['heatmap'].shape == (2, 8, 8)
  assert jax.jit(functools.partial(explain.penultimate, model_def=md, cfg=cfg))(v, x).shape == (2, 16)


def test_overlay_png_is_a_readable_image_of_the_upscaled_size(tmp_path):
  from PIL import Image
  image = np.zeros((8, 8, 1), np.uint8)
  heat = np.zeros((8, 8), np.float32)
  heat[:4, :4] = 1.0
  path = str(tmp_path / 'o.png')
  explain.overlay_png(image, heat, path, min_size=64)
  with Image.open(path) as im:
    arr = np.asarray(im)
  assert arr.shape == (64, 64, 3)
  # 'jet' at 1 is dark red, at 0 dark blue: the hot corner is redder than the cold one.
  assert arr[5, 5, 0] > arr[5, 5, 2] and arr[60, 60, 2] > arr[60, 60, 0]


# ---- --mode=predict's explanation files ----

@pytest.fixture(scope='module')
def digits_run(tmp_path_factory, tfds_dir):
  from tests.test_predict import trained_run   # the digits run test_predict trains (shared)
  return trained_run(tmp_path_factory, tfds_dir)


@pytest.fixture(scope='module')
def tagged_run(tmp_path_factory):
  """A multi-label run on 16 px tiles of 1-2 digits (test_multilabel's task, shorter), its
  thresholds chosen on the validation split; (config, workdir, tiles folder, test tiles)."""
  from tests.test_multilabel import _config, _digit_tiles
  root = str(tmp_path_factory.mktemp('tiles'))
  truth = _digit_tiles(root, counts=(('train', 480), ('validation', 160), ('test', 16)))
  config = _config(os.path.join(root, 'manifest.csv'))
  config.num_epochs = 10.0
  workdir = str(tmp_path_factory.mktemp('tagged_run'))
  train.train_and_evaluate(config, workdir)
  return config, workdir, root, [os.path.join(root, rel) for rel, _ in truth['test']]


def _png(path: str) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im).astype(int)


_ONE_IMAGE_GRADCAM: dict[int, tuple] = {}   # id(clf) -> (clf, jitted explain.gradcam)


def _gradcam_overlay(clf, file: str, target: int) -> np.ndarray:
  """The overlay of the Grad-CAM of ``target`` for that one image, outside predict's batching
  (``explain.gradcam`` jitted for one image: compiled once per classifier, not op by op)."""
  if id(clf) not in _ONE_IMAGE_GRADCAM:
    _ONE_IMAGE_GRADCAM[id(clf)] = (clf, jax.jit(functools.partial(
        explain.gradcam, model_def=clf.model_def, cfg=clf.step_cfg)))
  image = clf.prepare(file)
  heat = jax.device_get(_ONE_IMAGE_GRADCAM[id(clf)][1](clf.variables, image[None],
                                                       np.array([target])))['heatmap']
  return explain.overlay(image, heat[0]).astype(int)


def test_explanations_of_separate_predictions_never_replace_each_other(digits_run, tmp_path,
                                                                       monkeypatch, capsys):
  """camA/IMG_0001.png and camB/IMG_0001.png (different digits) predicted into camA.jsonl, then
  camB.jsonl, both named explanations/IMG_0001.gradcam.png: camB's map replaced camA's, so camA's
  output pointed at another image's map. Only a rerun's own earlier maps may be replaced."""
  config, workdir, _ = digits_run
  clf = inference.classifier(inference.load(workdir, config))
  x, _ = digits.load_arrays('test')
  for cam, i in (('camA', 0), ('camB', 1)):
    (tmp_path / cam).mkdir()
    Image.fromarray(x[i, :, :, 0]).save(tmp_path / cam / 'IMG_0001.png')
  outs = tmp_path / 'outs'
  maps = outs / 'explanations'
  c = config.copy_and_resolve_references()
  c.predict.explain = 'gradcam'

  def run(cam: str, fmt: str = 'jsonl', output: bool = True) -> dict:
    c.predict.inputs, c.predict.format = str(tmp_path / cam), fmt
    c.predict.output = str(outs / f'{cam}.{fmt}') if output else ''
    (result,) = predict.predict(c, workdir)
    return result

  a = run('camA')
  a_bytes = open(a['explanation'], 'rb').read()
  b = run('camB')
  assert a['explanation'] != b['explanation']
  assert open(a['explanation'], 'rb').read() == a_bytes              # camA's map is untouched
  for r in (a, b):   # each names its own image's map, and the class it explains
    assert r['explained'] == r['predictions'][0]['class']
    np.testing.assert_allclose(_png(r['explanation']),
                               _gradcam_overlay(clf, r['file'], r['predictions'][0]['index']),
                               atol=2)
  assert np.abs(_png(a['explanation']) - _png(b['explanation'])).max() > 64   # two digits
  for cam, r in (('camA', a), ('camB', b)):   # as the output files say
    (line,) = (outs / f'{cam}.jsonl').read_text().splitlines()
    assert json.loads(line)['explanation'] == r['explanation']
  b_bytes = open(b['explanation'], 'rb').read()
  # A rerun replaces its own map (the one its earlier output names): no new file.
  before = sorted(os.listdir(maps))
  assert run('camA')['explanation'] == a['explanation'] and sorted(os.listdir(maps)) == before
  # Printed output records nothing to replace: each such call adds a map, replacing none.
  monkeypatch.chdir(outs)                      # its maps go to ./explanations: the same folder
  printed = [run('camA', output=False)['explanation'] for _ in range(2)]
  capsys.readouterr()
  assert len(set(printed) | set(before)) == len(before) + 2
  assert sorted(os.listdir(maps)) == sorted(before + [os.path.basename(p) for p in printed])
  # CSV: the map on the explained (rank 1) row; a rerun replaces its own, as with JSON lines.
  for _ in range(2):
    r = run('camB', fmt='csv')
    with open(outs / 'camB.csv', newline='') as f:
      rows = list(csv.DictReader(f))
    assert [row['explanation'] for row in rows] == [r['explanation']] + [''] * (len(rows) - 1)
  assert len(os.listdir(maps)) == len(before) + 3
  np.testing.assert_array_equal(_png(r['explanation']), _png(b['explanation']))
  assert open(a['explanation'], 'rb').read() == a_bytes
  assert open(b['explanation'], 'rb').read() == b_bytes


def test_a_tagged_run_explains_each_predicted_tag_and_names_it(tagged_run, tmp_path):
  """A tagging run explained np.argmax(probs) alone, and for an image with no predicted tag a tag
  the model had rejected; the output did not say which class a map was of. Now: one map per tag
  at or above the run's threshold, named in ``explained`` / ``explanation`` (lists)."""
  config, workdir, _, files = tagged_run
  clf = inference.classifier(inference.load(workdir))
  names = clf.class_names
  # The run's thresholds as its checkpoint saved them (chosen on validation, not all 0.5).
  thresholds = checkpoint_files.read_weights(workdir, -1).meta['thresholds']['values']
  assert len(thresholds) == len(names) and set(thresholds) != {0.5}
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / 'blank.png')
  c = config.copy_and_resolve_references()
  c.predict.inputs = ','.join(files + [str(tmp_path / 'blank.png')])
  c.predict.explain, c.predict.top_k = 'gradcam', len(names)
  c.predict.output = str(tmp_path / 'tags.jsonl')
  results = predict.predict(c, workdir)
  assert results[-1]['tags'] == []   # a blank tile: no tag predicted, so nothing explained
  assert results[-1]['explained'] == results[-1]['explanation'] == []
  pairs = 0
  for r in results:
    probs = {p['class']: p['probability'] for p in r['predictions']}   # every class (top_k = K)
    above = {n for n, t in zip(names, thresholds) if np.float32(probs[n]) >= np.float32(t)}
    assert set(r['explained']) == above and len(r['explained']) == len(r['explanation'])
    for tag, path in zip(r['explained'], r['explanation']):
      np.testing.assert_allclose(_png(path), _gradcam_overlay(clf, r['file'], names.index(tag)),
                                 atol=2)
    if len(r['explanation']) >= 2:   # one image's maps of two tags are two different maps
      pairs += 1
      assert np.abs(_png(r['explanation'][0]) - _png(r['explanation'][1])).max() > 64
  assert pairs >= 2, pairs
  paths = [p for r in results for p in r['explanation']]
  assert len(set(paths)) == len(paths) == len(os.listdir(tmp_path / 'explanations'))
  lines = [json.loads(line) for line in (tmp_path / 'tags.jsonl').read_text().splitlines()]
  assert [(d['explained'], d['explanation']) for d in lines] == [
      (r['explained'], r['explanation']) for r in results]
  # CSV: one row per predicted tag, each with that tag's map; the untagged image's row has none.
  c.predict.format, c.predict.output = 'csv', str(tmp_path / 'tags.csv')
  again = predict.predict(c, workdir)
  with open(tmp_path / 'tags.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert [(row['file'], row['tag'], row['explanation']) for row in rows] == [
      (r['file'], tag, path) for r in again
      for tag, path in (zip(r['explained'], r['explanation']) if r['tags'] else [('', '')])]
  for r, first in zip(again, results):   # new files (the JSON lines' are not replaced), same maps
    for path, earlier in zip(r['explanation'], first['explanation']):
      assert path != earlier
      np.testing.assert_array_equal(_png(path), _png(earlier))


def test_a_rerun_on_fewer_images_removes_the_maps_its_output_no_longer_names(digits_run, tmp_path):
  """predict into out.jsonl on three images, then again on one: the two dropped images' maps
  were left in explanations/ beside an output that named only one map. Now the rerun removes
  the maps of the replaced output that it does not name, except one changed after that output
  was written; another output's maps are untouched."""
  config, workdir, _ = digits_run
  x, _ = digits.load_arrays('test')
  (tmp_path / 'imgs').mkdir()
  for i in range(3):
    Image.fromarray(x[i, :, :, 0]).save(tmp_path / 'imgs' / f'd{i}.png')
  c = config.copy_and_resolve_references()
  c.predict.explain = 'gradcam'

  def run(inputs: str, output: str) -> list[dict]:
    c.predict.inputs, c.predict.output = inputs, str(tmp_path / output)
    return predict.predict(c, workdir)

  other = run(str(tmp_path / 'imgs' / 'd2.png'), 'other.jsonl')[0]['explanation']
  first = [r['explanation'] for r in run(str(tmp_path / 'imgs'), 'out.jsonl')]
  assert len(set(first + [other])) == 4
  edited = first[1]
  os.utime(edited, (time.time() + 60, time.time() + 60))   # the user touched it afterwards
  (again,) = run(str(tmp_path / 'imgs' / 'd0.png'), 'out.jsonl')
  assert again['explanation'] == first[0]
  assert not os.path.exists(first[2])                    # no longer named: removed
  assert os.path.exists(edited) and os.path.exists(other)
  assert sorted(os.listdir(tmp_path / 'explanations')) == sorted(
      os.path.basename(p) for p in (first[0], edited, other))
  c.predict.explain = ''                                 # a rerun without explanations
  (plain,) = run(str(tmp_path / 'imgs' / 'd0.png'), 'out.jsonl')
  assert 'explanation' not in plain and not os.path.exists(first[0])
  assert os.path.exists(edited) and os.path.exists(other)
