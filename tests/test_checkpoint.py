"""Checkpointer: keep-last-N + best-N, damaged checkpoints, config / structure checks, meshes."""
import copy
import glob
import logging
import os
import subprocess
import sys

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imgcls_jax import checkpoint, configlib, run_directory
from imgcls_jax.errors import UserError
from tests.conftest import REPO, subprocess_env


def _state(value: float) -> dict:
  return {'w': jnp.full((4, 3), value, jnp.float32), 'b': jnp.arange(3, dtype=jnp.int32),
          'step': jnp.asarray(int(value), jnp.int32)}


def _target(state: dict, sharding=None) -> dict:
  sharding = sharding or NamedSharding(Mesh(np.asarray(jax.devices()[:1]), ('data',)), P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def damage(step_dir: str) -> None:
  """Truncates every array-data file of a saved state to half its size (a torn write)."""
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
           if os.path.isfile(f)]
  assert files, f'no array data under {step_dir}'
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)


def test_keeps_the_newest_n_and_the_best_by_metric(tmp_path):
  accuracy = {2: 0.9, 4: 0.5, 6: 0.7}  # evaluated steps; the others carry no metrics
  with checkpoint.Checkpointer(str(tmp_path), keep=2, keep_best=1, best_metric='accuracy') as ckpt:
    for step in range(1, 8):
      m = {'accuracy': accuracy[step], 'loss': 1 - accuracy[step]} if step in accuracy else None
      assert ckpt.save(step, _state(step), {'step': step}, metrics=m)
    assert not ckpt.save(7, _state(7))  # already saved: no-op
    ckpt.wait()
    assert ckpt.all_steps() == [2, 6, 7]
    assert ckpt.best_step() == 2
    assert ckpt.metrics(6)['accuracy'] == 0.7 and ckpt.metrics(7) is None
    state, meta = ckpt.restore(_target(_state(0)), step=2)
  np.testing.assert_array_equal(state['w'], np.full((4, 3), 2.0))
  assert meta == {'step': 2}


def test_best_by_lowest_loss_and_synchronous_saves(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path), keep=1, keep_best=2, best_metric='loss',
                               best_mode='min', async_save=False) as ckpt:
    for step, loss in [(1, 0.3), (2, 0.9), (3, 0.1), (4, 0.5)]:
      ckpt.save(step, _state(step), metrics={'loss': loss})
      assert step in ckpt.all_steps()  # on disk when save() returns
    assert ckpt.all_steps() == [1, 3, 4] and ckpt.best_step() == 3


def test_best_metric_must_be_an_evaluation_metric(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path), keep_best=1, best_metric='f1') as ckpt:
    with pytest.raises(UserError, match=r"best_metric='f1'.*accuracy, loss"):
      ckpt.save(1, _state(1), metrics={'accuracy': 0.5, 'loss': 1.0})


# Orbax's asyncio loop reports the failed read of the damaged checkpoint once more after closing.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  with checkpoint.Checkpointer(str(tmp_path), keep=5) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(step), {'step': step})
  damage(str(tmp_path / 'checkpoints' / '3'))
  with caplog.at_level(logging.WARNING), checkpoint.Checkpointer(str(tmp_path), keep=5) as ckpt:
    with pytest.raises(UserError, match='Checkpoint 3 .* is unreadable'):
      ckpt.restore(_target(_state(0)))  # the strict restore names the damage
    restored = ckpt.restore_latest(_target(_state(0)))
    assert restored.step == 2 and restored.skipped == [3] and restored.meta == {'step': 2}
    np.testing.assert_array_equal(restored.state['w'], np.full((4, 3), 2.0))
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.save(3, _state(3))  # the step can be written again
  assert 'Checkpoint 3' in caplog.text and 'unreadable' in caplog.text
  assert 'previous good checkpoint, step 2' in caplog.text
  assert os.path.isdir(tmp_path / checkpoint.CORRUPT_DIR / '3')  # kept for inspection


def test_a_damaged_orbax_metadata_file_is_one_warning_and_the_step_still_resumes(tmp_path,
                                                                                 caplog):
  """Orbax's ``_CHECKPOINT_METADATA`` (timestamps, handler names) empty or garbled: Orbax logged
  an ERROR with the file's content on each of its three reads per resume."""
  with checkpoint.Checkpointer(str(tmp_path), keep=5, keep_best=1) as ckpt:
    ckpt.save(1, _state(1), {'step': 1}, metrics={'accuracy': 0.5})
    ckpt.save(2, _state(2), {'step': 2}, metrics={'accuracy': 0.7})
  damaged = tmp_path / 'checkpoints' / '2' / '_CHECKPOINT_METADATA'
  damaged.write_text('\x00' * 5000)
  with caplog.at_level(logging.INFO), checkpoint.Checkpointer(str(tmp_path), keep=5,
                                                               keep_best=1) as ckpt:
    restored = ckpt.restore_latest(_target(_state(0)))
    assert ckpt.best_step() == 2 and ckpt.metrics(2) == {'accuracy': 0.7}
    ckpt.restore_latest(_target(_state(0)))
  assert restored.step == 2 and restored.meta == {'step': 2} and not restored.skipped
  np.testing.assert_array_equal(restored.state['w'], np.full((4, 3), 2.0))
  bad = [r for r in caplog.records if str(damaged) in r.getMessage()]
  assert [(r.levelname, r.getMessage()) for r in bad] == [(
      'WARNING', f"Orbax's metadata file {damaged} is empty or damaged; it holds only the save's "
      'timestamps, and the checkpoint is read without it.')]
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


_READ_DAMAGED = """
import sys, time
import jax, jax.numpy as jnp
from imgcls_jax import checkpoint, checkpoint_files, run_directory
from imgcls_jax.errors import UserError
import glob, os
work = sys.argv[1]
state = {'params': {f'w{i}': jnp.full((64, 64), i, jnp.float32) for i in range(40)}}
with checkpoint.Checkpointer(work, keep=3) as ckpt:
  ckpt.save(1, state, {'step': 1})
  ckpt.save(2, state, {'step': 2})
for f in glob.glob(f'{work}/checkpoints/2/state/**/d/*', recursive=True):
  os.truncate(f, 10)  # every array of the step unreadable: many reads fail at once
for _ in range(10):  # the leftovers come from a race: give it many chances
  try:
    checkpoint_files.read_weights(work, step=2)
  except UserError as e:
    print('error:', str(e)[:60], file=sys.stderr)
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
with checkpoint.Checkpointer(work, keep=3) as ckpt:
  assert ckpt.restore_latest(abstract).step == 1
time.sleep(1.0)  # the abandoned reads finish in the background
"""


def test_a_damaged_checkpoint_leaves_no_tracebacks_behind(tmp_path):
  """Orbax stops at the first failed read and closes its event loop while tensorstore completes the
  others: their callbacks printed 'Event loop is closed' and 'Task exception was never retrieved'
  tracebacks around the one-line error (and after the warning when resuming skips the
  checkpoint)."""
  proc = subprocess.run([sys.executable, '-c', _READ_DAMAGED, str(tmp_path)], cwd=REPO,
                        env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count('error: Cannot read checkpoint 2') == 10, proc.stderr[-3000:]
  for noise in ('Traceback', 'Event loop is closed', 'never retrieved', 'Exception ignored'):
    assert noise not in proc.stderr, proc.stderr[-3000:]


def test_no_readable_checkpoint_is_a_user_error(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.restore_latest(_target(_state(0))) is None  # empty workdir: fresh start
    ckpt.save(1, _state(1))
  damage(str(tmp_path / 'checkpoints' / '1'))
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(UserError, match='No readable checkpoint .* steps 1 were damaged'):
      ckpt.restore_latest(_target(_state(0)))


def test_state_that_does_not_fit_is_one_clear_line(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _state(1))
  other = dict(_state(0), w=jnp.zeros((4, 5)))
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(UserError) as e:
      ckpt.restore_latest(_target(other))
  msg = str(e.value)
  assert '\n' not in msg
  assert 'w is (4, 3) float32 in the checkpoint, (4, 5) float32 now' in msg
  assert os.path.isdir(tmp_path / 'checkpoints' / '1')  # a mismatch is not damage: left in place


def test_config_of_another_model_or_dataset_is_refused(digits_config, tmp_path):
  saved = configlib.config_dict(digits_config)
  digits_config.model.widths = (32, 64)
  digits_config.data.name = 'mnist'
  with pytest.raises(UserError) as e:
    configlib.check_config(saved, digits_config, 'checkpoint 7 in /runs/a/checkpoints')
  msg = str(e.value)
  assert '\n' not in msg
  assert msg.startswith('Cannot resume checkpoint 7 in /runs/a/checkpoints: it was written by a '
                        'different model or dataset (')
  assert 'data.name: "sklearn_digits" in the checkpoint, "mnist" now' in msg
  assert 'model.widths: [16, 32] in the checkpoint, [32, 64] now' in msg
  # Sigmoids per tag and one softmax have the same head shape: a tagging run resumed as
  # single-label (or the reverse) went on training without a word.
  for then in (False, True):
    c = copy.deepcopy(digits_config)
    c.data.name = 'sklearn_digits'
    c.model.widths = (16, 32)
    c.data.multilabel = then
    saved = configlib.config_dict(c)
    configlib.check_config(saved, c, 'checkpoint 7')   # the same: fine
    c.data.multilabel = not then
    with pytest.raises(UserError, match=rf'data.multilabel: {str(then).lower()} in the checkpoint, '
                       rf'{str(not then).lower()} now'):
      configlib.check_config(saved, c, 'checkpoint 7')


def test_trajectory_changes_warn_and_bookkeeping_changes_do_not(digits_config, caplog):
  saved = configlib.config_dict(digits_config)
  digits_config.mesh.num_devices = 1
  digits_config.log_every_steps = 7
  with caplog.at_level(logging.WARNING):
    configlib.check_config(saved, digits_config, 'ckpt')
  assert not caplog.records
  digits_config.optim.learning_rate = 0.01
  with caplog.at_level(logging.WARNING):
    configlib.check_config(saved, digits_config, 'ckpt')
  assert 'Resuming ckpt with a changed config (optim.learning_rate: 0.1 in the checkpoint, 0.01 now)' \
      in caplog.text
  assert 'will not match an uninterrupted one' in caplog.text


@pytest.mark.parametrize('key, value', [('data.device_preprocess', 'flip_alternate'),
                                        ('mixup.mixup_alpha', 0.2),
                                        ('data.balanced_sampling', True),
                                        ('data.read_shards', 2)])
def test_augmentation_and_sampling_changes_warn_at_resume(digits_config, caplog, key,
                                                                  value):
  """They change what the rest of the run trains on (they resumed silently, and config.json
  then recorded the new value for the whole run)."""
  saved = configlib.config_dict(digits_config)
  section, leaf = key.split('.')
  digits_config[section][leaf] = value
  with caplog.at_level(logging.WARNING):
    configlib.check_config(saved, digits_config, 'ckpt')
  assert f'Resuming ckpt with a changed config ({key}: ' in caplog.text


def test_other_evaluations_at_resume_are_warned_of(digits_config, caplog):
  """Another eval split resumed without a word: metrics.jsonl then mixed two splits' figures
  and 'best' ranked checkpoints across them."""
  saved = configlib.config_dict(digits_config)
  digits_config.data.eval_split = 'train'
  with caplog.at_level(logging.WARNING):
    configlib.check_config(saved, digits_config, 'ckpt')
  assert ("Resuming ckpt with other evaluations (data.eval_split: \"test\" in the checkpoint, "
          "\"train\" now): metrics.jsonl's earlier ones scored something else") in caplog.text
  assert 'with a changed config' not in caplog.text


def test_restore_onto_a_different_mesh(tmp_path):
  mesh8 = Mesh(np.asarray(jax.devices()), ('data',))
  state = jax.device_put(_state(5), NamedSharding(mesh8, P()))
  state['x'] = jax.device_put(jnp.arange(16.0), NamedSharding(mesh8, P('data')))  # split over 8
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(5, state)
  one = NamedSharding(Mesh(np.asarray(jax.devices()[-1:]), ('data',)), P())
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    restored = ckpt.restore_latest(_target(state, one)).state
  assert restored['x'].sharding == one and restored['w'].sharding == one
  for k in state:
    np.testing.assert_array_equal(restored[k], state[k])


def test_saving_a_state_replicated_over_8_devices_compiles_nothing(tmp_path):
  """One process writes each replicated array once, from one device: Orbax's replica-parallel
  default sliced every array on the device per replica (an eager program compiled per shape and
  offset) before writing the slices from this same host."""
  from jax import monitoring
  mesh8 = Mesh(np.asarray(jax.devices()), ('data',))
  state = jax.device_put({'w': jnp.arange(24 * 40, dtype=jnp.float32).reshape(24, 40) / 7,
                          'b': jnp.arange(56, dtype=jnp.int32)}, NamedSharding(mesh8, P()))
  jax.block_until_ready(state)
  compiled = []
  listener = lambda event, duration, **kw: compiled.append(event)
  monitoring.register_event_duration_secs_listener(listener)
  try:
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
      ckpt.save(1, state)
      ckpt.wait()
  finally:
    monitoring.unregister_event_duration_listener(listener)
  assert not [e for e in compiled if e.startswith('/jax/core/compile/')], compiled
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    restored = ckpt.restore_latest(_target(state, NamedSharding(mesh8, P()))).state
  for k in state:
    np.testing.assert_array_equal(restored[k], state[k])


def test_keys_added_since_the_checkpoint_count_as_unchanged_at_their_defaults(digits_config,
                                                                               caplog):
  # A checkpoint written before optim.schedule_free_bn_batches and fast_cnn's model.conv existed.
  digits_config.model = ml_collections.ConfigDict(dict(name='fast_cnn', widths=((8,), (16,)),
                                                       conv='xla'))
  saved = configlib.config_dict(digits_config)
  del saved['optim']['schedule_free_bn_batches']
  del saved['model']['conv']
  with caplog.at_level(logging.WARNING):
    configlib.check_config(saved, digits_config, 'ckpt')  # both at their defaults: silent
  assert not caplog.records
  digits_config.optim.schedule_free_bn_batches = 4
  with caplog.at_level(logging.WARNING):
    configlib.check_config(saved, digits_config, 'ckpt')
  assert ('optim.schedule_free_bn_batches: unset in the checkpoint, 4 now' in caplog.text)
  digits_config.model.conv = 'im2col'  # not the constructor's default: another model
  with pytest.raises(UserError) as e:
    configlib.check_config(saved, digits_config, 'ckpt')
  assert 'model.conv: unset in the checkpoint, "im2col" now' in str(e.value)


def test_a_workdir_that_is_a_file_or_inside_a_run_is_named_as_such(tmp_path):
  """Was: 'No checkpoint in <file>/checkpoints. Train first' for a file, and for RUN/checkpoints
  or RUN/checkpoints/20 the same advice to train, where the run is one folder up."""
  from imgcls_jax.errors import UserError
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  with pytest.raises(UserError, match=r'--workdir=.*a_file is a file, not a run directory'):
    run_directory.require_checkpoint(str(a_file))
  run = tmp_path / 'run'
  (run / 'checkpoints' / '20' / 'state').mkdir(parents=True)
  run_directory.require_checkpoint(str(run))          # a run: no error
  for inside in (run / 'checkpoints', run / 'checkpoints' / '20'):
    with pytest.raises(UserError, match=(rf'--workdir={inside} is inside the run directory {run}; '
                                         rf'point --workdir at {run}\.')):
      run_directory.require_checkpoint(str(inside))
  with pytest.raises(UserError, match='Train first'):
    run_directory.require_checkpoint(str(tmp_path / 'elsewhere'))


def test_a_run_whose_only_checkpoint_has_no_state_says_so(tmp_path):
  """Was: 'No finished checkpoint ...; train that run first.' for a trained run whose step folder
  lost its state (or is still being written)."""
  from imgcls_jax import checkpoint_files
  from imgcls_jax.errors import UserError
  (tmp_path / 'checkpoints' / '20').mkdir(parents=True)
  with pytest.raises(UserError, match=r'step\(s\) 20 hold no complete state .*restore the folder '
                                      'from a copy, or train the run again'):
    checkpoint_files.read_weights(str(tmp_path))
  (tmp_path / 'checkpoints' / '20').rmdir()
  with pytest.raises(UserError, match='train that run first'):
    checkpoint_files.read_weights(str(tmp_path))


def test_a_checkpoint_holding_nan_is_refused_for_inference_and_skipped_at_resume(tmp_path,
                                                                                 caplog,
                                                                                 monkeypatch):
  """Damaged bytes that still decode (or a save after divergence) gave NaN predictions with exit
  0, a normal-looking evaluation report, and at resume a 'lower the learning rate' divergence
  blamed on the next step. Inference now refuses the step, naming the arrays; resume moves it
  aside like an unreadable one and goes on from the previous step."""
  from imgcls_jax import checkpoint_files, transfer, weights

  def state(value, nan=False):
    w = np.full((4, 3), value, np.float32)
    if nan:
      w[1, 2] = np.nan
    return {'params': {'conv': {'kernel': jnp.asarray(w)}},
            'batch_stats': {'bn': {'mean': jnp.full((3,), value, jnp.float32)}},
            'step': jnp.asarray(value, jnp.int32)}

  with checkpoint.Checkpointer(str(tmp_path), keep=5) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, state(step, nan=step == 3), {'step': step})
  with pytest.raises(UserError, match=r'checkpoint 3 of .* holds NaN or infinite values '
                                      r'\(conv\.kernel\): it is damaged, or was saved after its '
                                      r'training diverged; pick another step \(1, 2\)\.'):
    checkpoint_files.read_weights(str(tmp_path))
  assert checkpoint_files.read_weights(str(tmp_path), 2).params['conv.kernel'][0, 0] == 2.0
  with pytest.raises(UserError, match='holds NaN'):   # transfer.init_from the same run
    transfer.load_weights(str(tmp_path))
  with caplog.at_level(logging.WARNING), checkpoint.Checkpointer(str(tmp_path), keep=5) as ckpt:
    restored = ckpt.restore_latest(_target(state(0)))
  assert restored.step == 2 and restored.skipped == [3]
  np.testing.assert_array_equal(restored.state['params']['conv']['kernel'], np.full((4, 3), 2.0))
  assert 'NaN or infinite' in caplog.text and os.path.isdir(tmp_path / checkpoint.CORRUPT_DIR / '3')
  # A weights file (torch import) with an infinity: named before any training starts.
  pt = tmp_path / 'w.safetensors'
  pt.write_bytes(b'')
  bad = weights.Weights(params={'fc.kernel': np.array([1.0, np.inf], np.float32)},
                        batch_stats={}, origin=str(pt))
  import imgcls_jax.torch_import as torch_import
  monkeypatch.setattr(torch_import, 'load', lambda path, model=None: bad)
  with pytest.raises(UserError, match=r'w\.safetensors holds NaN or infinite values \(fc\.kernel\)'
                                      r'.*save the weights again'):
    transfer.load_weights(str(pt))


def test_a_run_whose_checkpoints_were_moved_aside_or_an_export_says_so(tmp_path):
  """A run whose every checkpoint was damaged (moved to corrupt_checkpoints/) and an export folder
  given as --workdir were answered 'No checkpoint ... train first'."""
  from imgcls_jax import checkpoint_files, run_directory
  run = tmp_path / 'run'
  with checkpoint.Checkpointer(str(run), keep=5) as ckpt:
    ckpt.save(3, _state(3), {'step': 3})
  damage(str(run / 'checkpoints' / '3'))
  with checkpoint.Checkpointer(str(run), keep=5) as ckpt:
    with pytest.raises(UserError, match='No readable checkpoint'):
      ckpt.restore_latest(_target(_state(0)))
  moved = rf'its checkpoints were damaged and moved to {run}/corrupt_checkpoints \(step\(s\) 3\); '
  with pytest.raises(UserError, match=rf'No checkpoint in {run}/checkpoints: {moved}put back a '
                                      'good copy of one, or train the run again'):
    run_directory.require_checkpoint(str(run))
  with pytest.raises(UserError, match=rf'No finished checkpoint in {run}/checkpoints; {moved}'):
    checkpoint_files.read_weights(str(run))          # transfer.init_from / distill.teacher
  export = tmp_path / 'export'
  export.mkdir()
  (export / 'export.json').write_text('{}')
  with pytest.raises(UserError, match=rf'--workdir={export} is an export \(it holds export.json\), '
                                      'not a run directory: point --workdir at the run'):
    run_directory.require_checkpoint(str(export))


def test_a_folder_that_now_reads_in_colour_is_named_at_resume():
  """One colour image added to a grey folder makes it read as RGB: resuming then failed as a
  state mismatch of the first layer, saying to resume 'with the config that wrote it'."""
  import types
  from imgcls_jax import run
  from imgcls_jax.data.info import DatasetInfo
  grey = DatasetInfo(name='image_folder:/x', num_classes=2, class_names=('a', 'b'),
                     image_shape=(8, 8, 1), num_examples={'train': 10})
  colour = DatasetInfo(**{**grey.__dict__, 'image_shape': (8, 8, 3)})
  meta = {'class_names': ['a', 'b'], 'dataset_info': grey.to_json()}
  run._check_same_classes(types.SimpleNamespace(info=grey), meta, 'checkpoint 5')
  with pytest.raises(UserError, match=r'Cannot resume checkpoint 5: it was trained on grey images '
                                      r'and the data now reads as colour \(an image folder reads '
                                      r'in colour once any'):
    run._check_same_classes(types.SimpleNamespace(info=colour), meta, 'checkpoint 5')
