"""The speed features of issue 18, each against an oracle that does not share its code:
steps per dispatch, device-side flips / translations, flip + translate test-time augmentation,
Lookahead, per-group learning rates, patch whitening, im2col convolutions, cheaper evaluations, the
compilation cache.

The trainer-level runs use tfds's mock Fashion-MNIST (64 random 28x28 images, mirror-safe) and a
tiny fast_cnn with every feature on at once; they compare k steps per dispatch with one, an
interrupted-and-resumed run with an uninterrupted one (bitwise), and 1 device with 2.
"""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from configs import default
from imgcls_jax import (checkpoint, device_augment, dispatch, eval_steps, models, optim,
                        preemption, run, sharding, steps, train, whitening)
from imgcls_jax import state as state_lib
from imgcls_jax import weights as weights_lib
from imgcls_jax.data import pipeline
from imgcls_jax.errors import UserError
from imgcls_jax.models import fast_cnn
from tests.conftest import REPO, subprocess_env


# ------------------------------------------------------------------------ steps per dispatch

def test_plan_groups_k_steps_between_boundaries_only():
  """Groups of k start at multiples of k and never contain an evaluation / checkpoint step
  strictly inside; the rest are single steps; together they cover start..total exactly once."""
  assert list(dispatch.plan(0, 12, 4, (20,))) == [4, 4, 4]
  assert list(dispatch.plan(0, 14, 4, (10,))) == [4, 4, 1, 1, 1, 1, 1, 1]
  assert list(dispatch.plan(5, 13, 4, ())) == [1, 1, 1, 4, 1]
  assert list(dispatch.plan(0, 7, 1, (3,))) == [1] * 7
  for start, total, k, periods in [(0, 40, 4, (6, 20)), (3, 37, 8, (10,)), (7, 50, 3, (5, 12))]:
    sizes = list(dispatch.plan(start, total, k, periods))
    assert start + sum(sizes) == total
    step = start
    for n in sizes:
      assert n in (1, k)
      if n == k:
        assert step % k == 0
        assert not any((step + i) % p == 0 for p in periods for i in range(1, k))
      step += n


def _tiny_setup():
  cfg = default.get_config()
  mesh = sharding.make_mesh(2)
  lr = optim.schedule(cfg.optim, batch_size=16, total_steps=8, warmup_steps=2)
  tx = optim.build(cfg.optim, lr)
  model_fn = functools.partial(models.get, 'cnn', num_classes=10, in_channels=1, widths=(8, 16),
                               convs_per_stage=1)
  state, shardings = state_lib.create(model_fn, tx, 0, mesh)
  step = functools.partial(steps.train_step, model_def=state_lib.model_def(model_fn), tx=tx,
                           lr_schedule=lr, cfg=steps.StepConfig(num_classes=10, device_ops=(
                               ('translate', 1, 'constant'),)))
  single = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)))
  multi = jax.jit(dispatch.scan_steps(step),
                  in_shardings=(shardings, dispatch.stacked_sharding(mesh)),
                  out_shardings=(shardings, sharding.replicated(mesh)))
  return state, single, multi, mesh


def test_k_steps_in_one_dispatch_equal_k_single_steps():
  """8 steps as 8 calls and as 2 calls of 4 (lax.scan): same parameters and per-step metrics.

  Tolerance: XLA compiles the step inside the loop body as its own computation and fuses it
  differently (float32 reassociation, ~1e-7 relative per step); measured max |difference| after
  8 steps: 2.4e-7 with two convs per stage (AMD EPYC), 1.2e-7 with this one-conv-per-stage CNN
  (Intel Xeon)."""
  rng = np.random.default_rng(0)
  batches = [{'image': rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8),
              'label': rng.integers(0, 10, (16,), dtype=np.int32)} for _ in range(8)]
  state, single, multi, mesh = _tiny_setup()
  a, metrics_a = state, []
  for b in batches:
    a, m = single(a, sharding.put_batch(b, sharding.batch_sharding(mesh)))
    metrics_a.append(jax.device_get(m))
  b_state, metrics_b = state, []
  for group in dispatch.device_batches(iter(batches), [4, 4], mesh):
    b_state, m = multi(b_state, group)
    metrics_b += dispatch.unstack(jax.device_get(m), 4)
  assert int(b_state.step) == 8
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, jax.device_get((a.params, a.batch_stats)),
               jax.device_get((b_state.params, b_state.batch_stats)))
  jax.tree.map(close, metrics_a, metrics_b)


# ------------------------------------------------------------------------ device augmentation

def test_parse_device_ops():
  assert device_augment.parse('') == ()
  assert device_augment.parse('flip_alternate|translate(pad=2)') == (
      ('flip_alternate',), ('translate', 2, 'constant'))
  assert device_augment.parse("translate(pad=3, mode='reflect')|flip_lr") == (
      ('translate', 3, 'reflect'), ('flip_lr',))
  assert device_augment.parse('flip_alternate|erase(prob=0.3, area_max=0.25, fill=zero)') == (
      ('flip_alternate',), ('erase', 0.3, 0.02, 0.25, 'zero'))
  assert device_augment.parse('erase') == (('erase', 0.5, 0.02, 0.33, 'noise'),)
  for bad in ('pad_crop', 'translate(pad=0)', 'translate(pad=2,mode=wrap)',
              'flip_lr|flip_alternate', 'flip_lr(p=1)', 'erase(prob=2)', 'erase(p=0.5)',
              'erase(area_min=0.5, area_max=0.2)', 'erase(fill=gray)', 'erase|erase'):
    with pytest.raises(Exception, match='not a device-side op'):
      device_augment.parse(bad)
  # flip_alternate's coin hashes the pixels: after a random op it would not alternate. A run
  # saved so still parses (it is evaluated and served); training refuses it, keeping the args.
  spec = "erase(prob=0.2)|flip_alternate|translate(pad=1, mode='reflect')"
  ops = device_augment.parse(spec)
  with pytest.raises(UserError, match=r"puts flip_alternate after erase: it must come first .* "
                     r"e\.g\. 'flip_alternate\|erase\(prob=0\.2\)\|translate\(pad=1, "
                     r"mode='reflect'\)'\.$"):
    device_augment.check_alternation(spec, ops)
  device_augment.check_alternation('flip_alternate|translate(pad=1)',
                                   device_augment.parse('flip_alternate|translate(pad=1)'))
  with pytest.raises(UserError, match=r"train_preprocess's random pad_crop, rotate change every "
                     r'epoch .* use flip_lr instead'):
    device_augment.check_alternation('flip_alternate', device_augment.parse('flip_alternate'),
                                     ['pad_crop', 'rotate'])


def test_host_ops_that_change_with_the_seed_are_found_by_running_them():
  """flip_alternate is refused after a random host op: which ones are random is measured (the
  same noise image under 16 seeds), so a deterministic op of one's own and an op set to do
  nothing (pad_crop(pad=0), rotate(degrees=0), random_erasing(prob=0)) pass."""
  from imgcls_jax.data.pp import registry
  spec = ('resize(size=8)|pad_crop(pad=0)|center_crop(size=16)|rotate(degrees=0)|'
          'random_erasing(prob=0)|randaugment(num_ops=0)|pad_crop(pad=2)|flip_lr|'
          'random_resized_crop(size=16)|rotate(degrees=10)|random_erasing(prob=0.5)|randaugment')
  assert registry.seed_dependent(spec, 1) == ['pad_crop', 'flip_lr', 'random_resized_crop',
                                              'rotate', 'random_erasing', 'randaugment']
  assert registry.seed_dependent(spec, 3)[:2] == ['pad_crop', 'flip_lr']


def test_run_setup_lays_flip_alternates_epochs_out_from_the_whole_split(digits_config,
                                                                         monkeypatch):
  """The layout run.setup gives the step: 2 processes on the 1347 training digits made it 2 x
  673 = 1346 examples an epoch (their shares times their count), so rows drifted into the wrong
  epoch. And training refuses flip_alternate after a random host op."""
  from imgcls_jax import run
  from imgcls_jax.data import info as info_lib
  c = digits_config.copy_and_resolve_references()
  c.data.device_preprocess, c.data.train_preprocess = 'flip_alternate', ''
  monkeypatch.setattr(info_lib, 'NO_FLIP_DATASETS', frozenset())   # (only the layout matters)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  s = run.setup(c)
  assert (s.step_cfg.epoch_examples, s.step_cfg.epoch_chunk) == (1347, c.batch_size)
  c.data.name = 'sklearn_digits'   # (tf.data: arrays refuse host ops)
  c.data.train_preprocess = 'pad_crop(pad=1)'
  with pytest.raises(UserError, match=r"train_preprocess's random pad_crop change every epoch"):
    run.setup(c)


def test_a_shift_on_the_host_and_on_the_device_is_warned_about(digits_config, caplog):
  """configs/default.py's one-pixel device shift, kept under one's own host crop, is named."""
  twice = device_augment.twice_shifted
  assert twice('', device_augment.parse('translate(pad=1)')) is None
  assert twice('pad_crop(pad=4)|flip_lr', device_augment.parse('flip_lr')) is None
  assert twice('rotate(degrees=5)', device_augment.parse('translate(pad=1)')) is None
  got = twice("random_resized_crop(size=16)|flip_lr|pad_crop(pad=2)",
              device_augment.parse('flip_alternate|translate(pad=3)'))
  assert '(random_resized_crop, pad_crop)' in got and '(pad=3)' in got
  assert "set --config.data.device_preprocess=''" in got
  digits_config.data.device_preprocess = 'translate(pad=1)'   # the tfds digits: pad_crop(pad=1)
  with caplog.at_level('WARNING'):
    run.setup(digits_config)
  assert "shifts the images on the host (pad_crop)" in caplog.text
  caplog.clear()
  with caplog.at_level('WARNING'):
    run.setup(digits_config, training=False)   # evaluation and inference never augment
  assert 'shifts the images' not in caplog.text


@pytest.mark.parametrize('mode', ['constant', 'reflect'])
def test_translate_is_a_numpy_pad_and_crop_at_the_drawn_offsets(mode):
  images = np.random.default_rng(1).integers(0, 256, (32, 7, 9, 2), dtype=np.uint8)
  key = jax.random.key(5)
  out = np.asarray(device_augment.translate(key, jnp.asarray(images), 2, mode))
  dy, dx = map(np.asarray, device_augment.translate_offsets(key, 32, 2))
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode=mode)
  for i in range(32):
    np.testing.assert_array_equal(out[i], padded[i, dy[i]:dy[i] + 7, dx[i]:dx[i] + 9])
  assert set(dy) == set(dx) == set(range(5))   # every shift -2..2 occurs (32 draws of 5 values)
  np.testing.assert_array_equal(out, device_augment.translate(key, jnp.asarray(images), 2, mode))
  assert not np.array_equal(out, device_augment.translate(jax.random.key(6), images, 2, mode))


def test_erase_fills_one_rectangle_of_the_drawn_area_in_the_drawn_share_of_images():
  """On white images with fill=zero every erased pixel shows: per image the changed pixels are
  empty or exactly one axis-aligned rectangle whose area fraction is in range (up to rounding of
  its sides) and whose aspect ratio is at most the clipped 0.3..3.3; about prob of the images
  are erased, at every position; noise fills draw 0..255."""
  h, w, n = 20, 24, 4000
  white = jnp.full((n, h, w, 1), 255, jnp.uint8)
  out = np.asarray(jax.jit(device_augment.erase, static_argnums=(2, 3, 4, 5))(
      jax.random.key(0), white, 0.3, 0.05, 0.4, 'zero'))[..., 0]
  erased, tops, lefts = 0, set(), set()
  for img in out:
    rows, cols = np.nonzero(img == 0)
    if not len(rows):
      continue
    erased += 1
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert len(rows) == (bottom - top) * (right - left)          # one full rectangle
    eh, ew = bottom - top, right - left
    area = eh * ew / (h * w)
    # each side is rounded (<= 0.5 px) and clipped to the image: bounds with that slack
    longest = (np.sqrt(0.4 * h * w * 3.34) + 0.5) * (np.sqrt(0.4 * h * w / 0.3) + 0.5)
    assert 0.05 * 0.6 <= area <= longest / (h * w)
    if eh < h and ew < w:                                          # not clipped
      assert (np.sqrt(0.05 * h * w) - 1) ** 2 <= eh * ew
      assert eh * ew <= (np.sqrt(0.4 * h * w) + 1) ** 2 * 1.2
      assert 0.3 * 0.6 <= eh / ew <= 3.34 / 0.6
    tops.add(top)
    lefts.add(left)
  assert abs(erased / n - 0.3) < 0.03
  assert 0 in tops and 0 in lefts and max(tops) >= h - 4 and max(lefts) >= w - 4
  noisy = np.asarray(device_augment.erase(jax.random.key(0), white, 0.3, 0.05, 0.4, 'noise'))
  changed = noisy != 255
  assert 0.2 < changed.any(axis=(1, 2, 3)).mean() < 0.4
  assert noisy[changed].min() < 20
  assert noisy.astype(int)[changed].mean() == pytest.approx(125, abs=10)
  assert np.array_equal(np.asarray(device_augment.erase(jax.random.key(0), white, 0.0, 0.05, 0.4)),
                        np.asarray(white))                          # prob 0: untouched


@pytest.mark.parametrize('shards, processes', [(1, 1), (2, 1), (1, 2)])
def test_flip_alternate_mirrors_each_example_in_alternate_epochs(digits_config, shards, processes):
  """The real training stream (digits, 1347 images, batch 64: epochs end inside batches) for
  2.5 epochs: each image's k-th appearance is mirrored iff its first one was XOR k is odd. With
  2 processes (their rows of each global batch put together) the layout was computed from their
  shares, 2 x 673 = 1346 examples an epoch, and rows drifted into the wrong epoch."""
  data = digits_config.data
  data.read_shards = shards
  data.train_preprocess = ''      # the pixels identify the example (no random host crop)
  batch = 64
  streams = [pipeline.train_dataset(data, seed=0, local_batch_size=batch // processes,
                                    process_index=i, process_count=processes)[0].as_numpy_iterator()
             for i in range(processes)]
  layout = device_augment.epoch_layout(batch, shards, pipeline.examples_per_process(
      data, data.train_split, 0, 1))
  run_key = jax.random.key(3)
  flip = jax.jit(functools.partial(device_augment.alternate_flip, chunk=layout['epoch_chunk'],
                                   examples=layout['epoch_examples']))
  seen: dict[bytes, list[bool]] = {}
  duplicates = set()
  for step, parts in zip(range(53), zip(*streams)):
    b = {'image': np.concatenate([p['image'] for p in parts])}
    out = np.asarray(flip(run_key, jnp.asarray(b['image']), jnp.asarray(step)))
    for x, y in zip(b['image'], out):
      if np.array_equal(x, x[:, ::-1]):
        continue                  # symmetric: a mirror changes nothing
      mirrored = np.array_equal(y, x[:, ::-1])
      assert mirrored or np.array_equal(y, x)
      seen.setdefault(x.tobytes(), []).append(mirrored)
  n = layout['epoch_examples'] * shards
  for key, flips in seen.items():
    if len(flips) > 3:            # identical images (duplicates in the split): not one example
      duplicates.add(key)
      continue
    assert flips == [flips[0] ^ (k % 2 == 1) for k in range(len(flips))]
  assert len(duplicates) < 10
  first = [f[0] for k, f in seen.items() if k not in duplicates]
  assert len(first) > n - 30 and 0.4 < np.mean(first) < 0.6   # a fair coin per example


def test_flip_alternate_does_not_depend_on_the_device_count():
  images = np.random.default_rng(2).integers(0, 256, (16, 6, 6, 1), dtype=np.uint8)
  outs = []
  for n in (1, 2):
    mesh = sharding.make_mesh(n)
    ops = (('flip_alternate',), ('translate', 1, 'constant'), ('erase', 0.5, 0.02, 0.33, 'noise'))
    fn = jax.jit(lambda x, step: device_augment.apply(
        ops, x, step_key=jax.random.key(1), run_key=jax.random.key(2), step=step,
        epoch_chunk=16, epoch_examples=40),
        in_shardings=(sharding.batch_sharding(mesh), sharding.replicated(mesh)))
    outs.append(np.asarray(fn(jnp.asarray(images), jnp.asarray(7))))
  np.testing.assert_array_equal(outs[0], outs[1])


# ------------------------------------------------------------------------ test-time augmentation

def test_flip_translate_tta_is_the_weighted_mean_of_the_six_views():
  model_fn = functools.partial(models.get, 'cnn', num_classes=5, in_channels=1, widths=(8,))
  mdef = state_lib.model_def(model_fn)
  variables = state_lib.create(model_fn, optax.sgd(0.1), 0, sharding.make_mesh(1))[0]
  cfg = steps.StepConfig(num_classes=5)
  images = np.random.default_rng(3).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
  got = np.exp(np.asarray(eval_steps.log_probs_fn(variables, jnp.asarray(images), model_def=mdef,
                                                  cfg=cfg, tta='flip_translate')))

  def probs(x):
    return np.asarray(jax.nn.softmax(eval_steps.forward(variables.params, variables.batch_stats,
                                                   jnp.asarray(x), model_def=mdef, cfg=cfg)))
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  down_right, up_left = padded[:, :8, :8], padded[:, 2:, 2:]
  mirror = lambda x: x[:, :, ::-1]  # noqa: E731
  want = (0.25 * (probs(images) + probs(mirror(images)))
          + 0.125 * (probs(down_right) + probs(mirror(down_right)) + probs(up_left)
                     + probs(mirror(up_left))))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


# ------------------------------------------------------------------------ optimizer

def _optim_cfg(**kw):
  c = default.get_config().optim
  c.update(kw)
  return c


_toy_grad = jax.grad(lambda p: sum(jnp.sum((v - 0.3 * (i + 1)) ** 2 * (1 + v ** 2))
                                   for i, v in enumerate(jax.tree.leaves(p))))


def _toy_run(tx, params, fast=lambda p: p):
  """9 steps on a non-quadratic toy loss (gradients at ``fast(params)``)."""
  state = tx.init(params)
  for _ in range(9):
    updates, state = tx.update(_toy_grad(fast(params)), state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_lookahead_matches_optax_lookahead(name):
  params = {'a': {'kernel': jnp.linspace(-1, 1, 6).reshape(2, 3)}, 'b': jnp.array([0.5, -2.0])}
  cfg = _optim_cfg(name=name, weight_decay=1e-2, learning_rate=0.05)
  cfg.lookahead.sync_period, cfg.lookahead.alpha = 4, 0.3
  ours = _toy_run(optim.build(cfg, optax.constant_schedule(0.05)), params)
  reference = optax.lookahead(optim._base(cfg, optax.constant_schedule(0.05)), 4, 0.3)
  theirs = _toy_run(reference, optax.LookaheadParams.init_synced(params), lambda p: p.fast)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs.fast)   # the same arithmetic
  plain = _toy_run(optim.build(_optim_cfg(name=name, weight_decay=1e-2, learning_rate=0.05),
                               optax.constant_schedule(0.05)), params)
  assert not np.allclose(plain['b'], ours['b'])


def test_group_learning_rates_scale_norm_and_bias_updates():
  """Plain SGD (no momentum, no decay): each update is -lr * factor * gradient, factor 3 for the
  normalisation layers' scale and bias, 2 for other biases, 1 for kernels."""
  model_fn = functools.partial(models.get, 'fast_cnn', num_classes=3, in_channels=1,
                               widths=((4,), (8,)), stem='none', image_size=8)
  norm = state_lib.norm_param_names(model_fn)
  assert norm == {'norms.0.scale', 'norms.0.bias', 'norms.1.scale', 'norms.1.bias'}
  params = jax.tree.map(np.asarray, state_lib.create(model_fn, optax.sgd(0.1), 0,
                                                     sharding.make_mesh(1))[0].params)
  cfg = _optim_cfg(momentum=0.0, nesterov=False, weight_decay=0.0, norm_lr_factor=3.0,
                   bias_lr_factor=2.0)
  tx = optim.build(cfg, optax.constant_schedule(0.1), norm_names=norm)
  grads = jax.tree.map(lambda p: np.full(p.shape, 0.5, np.float32), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for name, u in weights_lib.flatten(updates).items():
    factor = 3.0 if name.startswith('norms.') else 2.0 if name == 'fc.bias' else 1.0
    np.testing.assert_allclose(u, -0.1 * 0.5 * factor, rtol=1e-6)


# ------------------------------------------------------------------------ patch whitening

def _conv_valid(x, kernel):
  """out[n, y, x, o] = sum_ijc x[n, y + i, x + j, c] k[i, j, c, o] (shifted slices, numpy)."""
  kh, kw = kernel.shape[:2]
  h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  return sum(np.einsum('nyxc,co->nyxo', x[:, i:i + h, j:j + w], kernel[i, j])
             for i in range(kh) for j in range(kw))


@pytest.mark.parametrize('negatives', [False, True])
def test_whitening_filters_decorrelate_the_patches_they_come_from(negatives):
  rng = np.random.default_rng(4)
  noise = rng.normal(size=(40, 14, 14, 2))
  x = noise + np.roll(noise, 1, axis=1) + 0.5 * noise[..., ::-1] + 0.3   # correlated patches
  kernel, eigenvalues = whitening.whitening_filters(x, (3, 3, 2, 0), eps=1e-3,
                                                    negatives=negatives)
  assert kernel.shape == (3, 3, 2, 36 if negatives else 18)
  assert np.all(np.diff(eigenvalues) <= 0)
  out = _conv_valid(x, kernel).reshape(-1, kernel.shape[-1])
  cov = np.cov(out, rowvar=False)
  d = np.diag(eigenvalues / (eigenvalues + 1e-3))   # ~1 but for the smallest eigenvalues
  # with negatives the filters are v1, -v1, v2, -v2, ...: each pair is perfectly anti-correlated
  want = np.kron(d, [[1.0, -1.0], [-1.0, 1.0]]) if negatives else d
  np.testing.assert_allclose(cov, want, atol=1e-9)


def test_whitening_sees_what_the_first_conv_sees():
  c = default.get_config()
  c.model.name, c.model.stem, c.data.mean, c.data.std = 'fast_cnn', 's2d', (0.25,), (0.5,)
  images = np.random.default_rng(5).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
  normalized = steps.normalize(jnp.asarray(images), steps.StepConfig(num_classes=2, mean=(0.25,),
                                                                     std=(0.5,)))
  np.testing.assert_allclose(whitening.conv_inputs(images, c),
                             fast_cnn.space_to_depth(normalized), rtol=1e-6, atol=1e-6)
  c.model.name, c.init.patch_whitening = 'resnet18', True
  with pytest.raises(Exception, match='patch_whitening is available for the model families'):
    whitening.frozen_names(c)


# ------------------------------------------------------------------------ the trainer

def _mock_config(tmp_path, **overrides):
  c = default.get_config()
  c.data.name = 'fashion_mnist'
  c.data.data_dir = str(tmp_path / 'tfds')
  c.data.train_preprocess = ''
  c.data.device_preprocess = 'flip_alternate|translate(pad=2)|erase(prob=0.5)'
  c.data.device_resident = True    # the split on the devices (4-batch stacks gathered there)
  c.model = ml_collections.ConfigDict({
      'name': 'fast_cnn', 'widths': ((8,), (16,)), 'stem': 'none', 'final_pool': False,
      'head': 'flatten', 'hidden': 0, 'dropout': 0.0, 'image_size': 28, 'conv': 'im2col'})
  c.batch_size = c.eval_batch_size = 16
  c.num_train_steps = 24           # 64 examples: 4 steps per epoch, 6 epochs
  c.log_every_steps = 6
  c.eval_every_steps, c.eval_every_epochs = 12, -1.0
  c.checkpoint_every_steps, c.checkpoint_every_epochs = 6, -1.0
  c.keep_checkpoints = 10
  c.checkpoint.keep_best = 0
  c.progress_bar = c.tensorboard = False
  c.optim.learning_rate = 0.05
  c.optim.norm_lr_factor = 2.0
  c.optim.lookahead.sync_period = 3
  c.init.patch_whitening = c.init.freeze_whitening = True
  c.init.whitening_examples = 48
  c.evaluate.tta = 'flip_translate'
  c.eval_subset = 16
  c.steps_per_dispatch = 4
  c.mesh.num_devices = 2
  c.update_from_flattened_dict(overrides)
  return c


def _train(config, workdir, stop_at=None, monkeypatch=None):
  if stop_at is not None:  # a stop request (SIGTERM) noticed before step `stop_at`
    monkeypatch.setattr(preemption.StopWatcher, 'requested', lambda self, step: step >= stop_at)
  with tfds.testing.mock_data(num_examples=64):
    result = train.train_and_evaluate(config, str(workdir))
  monkeypatch and monkeypatch.undo()
  return result


def _final_state(workdir):
  from tests.test_fault_tolerance import load_state
  return load_state(str(workdir), 24)


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k != 'images_per_sec'} for line in f]


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  """A trained run the reference distils from (config.distill): another width, its own
  normalisation (so the step renormalises the student's pixels for it), one device; trained
  without the student's training features (device ops, Lookahead, group learning rates, patch
  whitening: its step compiles faster, and a teacher only predicts)."""
  tmp = tmp_path_factory.mktemp('speed_teacher')
  _train(_mock_config(tmp, **{'model.widths': ((4,), (8,)), 'data.mean': (0.25,),
                              'data.std': (0.4,), 'num_train_steps': 4, 'steps_per_dispatch': 1,
                              'mesh.num_devices': 1, 'evaluate.tta': '',
                              'data.device_preprocess': '', 'optim.lookahead.sync_period': 0,
                              'optim.norm_lr_factor': 1.0, 'init.patch_whitening': False,
                              'init.freeze_whitening': False}), tmp / 'run')
  return {'distill.teacher': str(tmp / 'run'), 'distill.temperature': 2.0}


@pytest.fixture(scope='module')
def reference(tmp_path_factory, teacher):
  """Every feature on (distillation too), 4 steps per dispatch, 2 devices, uninterrupted."""
  tmp = tmp_path_factory.mktemp('speed_reference')
  result = _train(_mock_config(tmp, **teacher), tmp / 'run')
  return tmp / 'run', result


def test_features_train_evaluate_and_keep_the_whitening_frozen(reference, initial_state,
                                                               tmp_path):
  workdir, result = reference
  assert result['count'] == 64 and np.isfinite(result['loss'])
  evals = [r for r in _records(workdir) if r['split'] == 'eval']
  assert [(r['step'], r['count']) for r in evals] == [(12, 16), (24, 64)]   # subset, then full
  assert all(0 <= r['teacher_agreement'] <= 1 for r in _records(workdir) if r['split'] == 'train')
  final = weights_lib.flatten(_final_state(workdir)['params'])
  initial = weights_lib.flatten(initial_state.params)
  kernel = final['convs.0.kernel']
  np.testing.assert_array_equal(kernel, initial['convs.0.kernel'])                  # frozen
  assert not np.array_equal(final['convs.1.kernel'], initial['convs.1.kernel'])  # the rest trains
  with tfds.testing.mock_data(num_examples=64):
    s = run.setup(_mock_config(tmp_path))
    images = pipeline.samples(s.config.data, s.info, eval_count=1, train_count=48)['train_images']
  want = whitening.filters_for(s.config, images, kernel.shape)   # 9 directions, 8 channels
  np.testing.assert_allclose(kernel, want[..., :8], rtol=1e-6)


def test_stop_and_resume_is_bitwise_equal_to_uninterrupted(reference, teacher, tmp_path,
                                                           monkeypatch):
  """Stopped before step 14 (inside the 4-step group 12..15, so at 12), then rerun."""
  workdir, _ = reference
  config = _mock_config(tmp_path, **teacher)
  stopped = _train(config, tmp_path / 'run', stop_at=14, monkeypatch=monkeypatch)
  assert stopped == {'interrupted_at_step': 12}
  _train(config, tmp_path / 'run')
  a, b = _final_state(workdir), _final_state(tmp_path / 'run')
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert _records(workdir) == _records(tmp_path / 'run')


@pytest.fixture(scope='module')
def initial_state(tmp_path_factory):
  """The state the runs start from (its first conv's kernel: the whitening filters), fetched;
  built once for the tests that compare with it."""
  tmp_path = tmp_path_factory.mktemp('speed_initial')
  with tfds.testing.mock_data(num_examples=64):
    s = run.setup(_mock_config(tmp_path))
    with checkpoint.Checkpointer.from_config(str(tmp_path / 'fresh'), s.config) as ckpt:
      return jax.device_get(run.restore_or_init(s, ckpt)[0])


def _max_diff(a, b):
  pairs = zip(jax.tree.leaves((a['params'], a['batch_stats'])),
              jax.tree.leaves((b['params'], b['batch_stats'])))
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


# Rounding, not maths: the bounds of the test below (as tests/test_multihost.py's, for the same
# cause). k = 1 vs 4 steps per dispatch, or 1 device vs 2, sums float32 values in another order (XLA
# fuses the step inside the scan's loop body differently; a 2-device batch mean adds per-device
# partial sums). After 6 steps that is ~1 ulp of the state's largest magnitude (measured 6e-8 to
# 1.2e-7 at magnitude 1.46 on an AVX2 AMD EPYC): EARLY_ULPS ulps are far below what a real
# difference does (a learning rate 0.2% off: 2.1e-4 at step 6). Training then amplifies rounding:
# after 24 steps 1 device vs 2 differed by 2.5e-6, like the same run with its learning rate one
# float32 ulp higher (2.4e-6 at k = 4: the noise floor, which the test measures on its k = 1 run
# so as to compile no 4-step program of its own); k = 1 vs 4 by 2e-4 on that machine (8e-7 on an
# AVX-512 one), after a jump at step 12: a last-bit difference that flips a threshold (a ReLU or
# max-pool tie) in one run, a jump a floor run need not share. Such chaotic growth stays a small
# fraction of how far training moved the state (1.66), while a learning rate 0.2% off differs by
# 2.2e-2 at step 24. So the final bound is max(FLOOR_FACTOR x floor + ABS_FLOOR, CHAOS_FRACTION x
# moved).
EARLY_STEP, EARLY_ULPS = 6, 64
FLOOR_FACTOR, ABS_FLOOR, CHAOS_FRACTION = 10.0, 1e-5, 1e-3


def _max_abs(state):
  return max(float(np.max(np.abs(np.asarray(x))))
             for x in jax.tree.leaves((state['params'], state['batch_stats'])))


def test_one_step_per_dispatch_and_one_device_give_the_same_run(reference, teacher,
                                                                initial_state, tmp_path):
  """k = 1 vs 4 on the same devices, and 1 device vs 2 (k = 4): the same steps on the same
  batches, equal up to rounding (the bounds above), at step 6 and at the end (step 24)."""
  from tests.test_fault_tolerance import load_state
  workdir, _ = reference
  ref, ref_early = _final_state(workdir), load_state(str(workdir), EARLY_STEP)
  lr = float(np.nextafter(np.float32(0.05), np.float32(1.0)))
  for name, overrides in (('k1', {'steps_per_dispatch': 1}),
                          ('ulp', {'steps_per_dispatch': 1, 'optim.learning_rate': lr}),
                          ('one_device', {'mesh.num_devices': 1})):
    _train(_mock_config(tmp_path, **teacher, **overrides), tmp_path / name)
  floor = _max_diff(_final_state(tmp_path / 'k1'), _final_state(tmp_path / 'ulp'))
  moved = _max_diff(ref, {'params': initial_state.params,
                         'batch_stats': initial_state.batch_stats})
  bound = max(FLOOR_FACTOR * floor + ABS_FLOOR, CHAOS_FRACTION * moved)
  early_bound = EARLY_ULPS * float(np.finfo(np.float32).eps) * _max_abs(ref_early)
  assert moved >= 10 * bound, (moved, bound)
  for name in ('k1', 'one_device'):
    early = _max_diff(ref_early, load_state(str(tmp_path / name), EARLY_STEP))
    diff = _max_diff(ref, _final_state(tmp_path / name))
    print(f'{name} vs the reference: max |diff| {early:.2e} at step {EARLY_STEP} (bound '
          f'{early_bound:.2e}), {diff:.2e} at step 24 (bound {bound:.2e}; 1-ulp learning-rate '
          f'floor {floor:.2e}, moved from init {moved:.2e})')
    assert early <= early_bound, f'{name} at step {EARLY_STEP}: {early:.2e} > {early_bound:.2e}'
    assert diff <= bound, f'{name} at step 24: {diff:.2e} > {bound:.2e}'


_CHILD = """
import os, signal, sys, time
import tensorflow_datasets as tfds
from imgcls_jax import checkpoint, main
kill_at = int(os.environ.get('KILL_AT_SAVE', '0'))
if kill_at:
  real_save = checkpoint.Checkpointer.save
  def save(self, step, *args, **kwargs):
    if step == kill_at:   # kill -9 before this save, once the previous one is committed
      done = os.path.join(self.directory, str(step - 6))
      while not os.path.isdir(done):
        time.sleep(0.01)
      os.kill(os.getpid(), signal.SIGKILL)
    return real_save(self, step, *args, **kwargs)
  checkpoint.Checkpointer.save = save
with tfds.testing.mock_data(num_examples=64):
  sys.exit(main.run(['imgcls_jax.main', *sys.argv[1:]]))
"""


def test_kill_9_and_rerun_ends_with_the_same_state_and_metrics(tmp_path, reference, teacher):
  """Every feature on, 4 steps per dispatch, 2 devices, as the real command line: one run killed
  with SIGKILL just before its step-18 save (step 12 committed), then the same command again,
  against the uninterrupted reference run (in this process): bitwise-equal final state and the
  same metrics records. The children see this process's 8 fake devices (their mesh takes 2, as
  here) and share the session's compilation cache: they load the programs the reference compiled
  (faster; and programs loaded from it must give the same bits)."""
  from tests import test_fault_tolerance as ft
  config_file = tmp_path / 'cfg.py'
  config_file.write_text(
      'import pathlib, sys\n'
      f'sys.path.insert(0, {REPO!r})\n'
      'from tests.test_speed_features import _mock_config\n'
      f'def get_config():\n  return _mock_config(pathlib.Path({str(tmp_path)!r}), **{teacher!r})\n')
  workdir = tmp_path / 'killed'
  for kill_at in (18, 0):
    log = str(tmp_path / f'killed_{kill_at}.log')
    os.environ['KILL_AT_SAVE'] = str(kill_at)
    try:
      proc = ft.start([f'--config={config_file}', f'--workdir={workdir}'], log, num_devices=8,
                      code=_CHILD)
    finally:
      del os.environ['KILL_AT_SAVE']
    rc, out = ft.finish(proc, log)
    if kill_at:
      assert rc == -9, out[-3000:]
      assert ft.checkpoint_steps(workdir)[-1] == 12, ft.checkpoint_steps(workdir)
    else:
      assert rc == 0, out[-3000:]
  assert 'Resuming from step 12.' in out, out[-3000:]
  ft.assert_bitwise_equal(_final_state(reference[0]), ft.load_state(str(workdir), 24))
  assert _records(reference[0]) == _records(workdir)


# ------------------------------------------------------------------------ compilation cache

def test_a_second_process_loads_its_programs_from_the_cache(tmp_path, tfds_dir):
  cache = tmp_path / 'cache'
  args = [sys.executable, '-m', 'imgcls_jax.main', '--config=configs/default.py',
          f'--config.data.data_dir={tfds_dir}', '--config.num_train_steps=2',
          '--config.model.widths=(8,16)', '--config.model.convs_per_stage=1',
          '--config.tensorboard=False',
          f'--config.compilation_cache_dir={cache}']
  listings = []
  for i in range(2):
    proc = subprocess.run([*args, f'--workdir={tmp_path}/run{i}'], capture_output=True,
                          text=True, cwd=REPO, env=subprocess_env(1), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'First training step done' in proc.stderr
    listings.append(sorted(os.listdir(cache)))
  assert len(listings[0]) >= 3          # init, train step, eval step (and the finiteness check)
  assert listings[1] == listings[0]     # the second run compiled nothing new
