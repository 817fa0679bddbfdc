"""Arrays files (``config.data.name='arrays:/x.npz'``, imgcls_jax/data/arrays.py): written from a
tfds dataset they hold exactly its examples; slices select what tfds selects; the training stream
is the same batches on the host, held on the devices, and split over processes; evaluation sees
every example once; training and evaluation run with TensorFlow blocked and agree with the tf.data
path's evaluation of the same model; a run killed with SIGKILL and rerun ends bit for bit as an
uninterrupted one; bad files and settings are one-line errors."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from imgcls_jax.errors import UserError
from tests.conftest import BLOCK_TF, REPO, run_without_tf, subprocess_env


@pytest.fixture(scope='module')
def digits_npz(tmp_path_factory, tfds_dir):
  """sklearn_digits (train 1,347 / test 450) written as an arrays file by the documented command
  (its main(), in this process: a child paid ~5 s of imports)."""
  import contextlib
  import io
  from imgcls_jax.data import write_arrays
  path = str(tmp_path_factory.mktemp('arrays') / 'digits.npz')
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = write_arrays.main(['write_arrays', '--dataset=sklearn_digits',
                                f'--data_dir={tfds_dir}', f'--output={path}'])
  assert status == 0, err.getvalue()[-3000:]
  assert f'--config.data.name=arrays:{path}' in out.getvalue()
  return path


def _arrays_config(digits_config, path):
  c = digits_config
  c.data.name = f'arrays:{path}'
  c.data.train_preprocess = ''                      # arrays are augmented on the device
  c.data.device_preprocess = 'translate(pad=1)'
  return c


def _digits(tfds_dir):
  from configs import default
  c = default.tfds_digits(default.get_config())
  c.data.data_dir = tfds_dir
  return c


def _tfds_split(digits_config, split):
  from imgcls_jax.data import pipeline
  images, labels = [], []
  for b in pipeline.EvalData(digits_config.data, split, local_batch_size=500).batches():
    images.append(b['image'][b['mask']])
    labels.append(b['label'][b['mask']])
  return np.concatenate(images), np.concatenate(labels)


# ------------------------------------------------------------------ the file and its splits

def test_the_written_file_holds_the_tfds_examples(digits_npz, digits_config):
  from imgcls_jax.data import arrays, sources
  tfds_info = sources.describe(digits_config.data)
  c = _arrays_config(digits_config.copy_and_resolve_references(), digits_npz)
  info = arrays.describe(c.data)
  assert info.name == f'arrays:{digits_npz}'
  for field in ('num_classes', 'class_names', 'image_shape', 'num_examples', 'multilabel'):
    assert getattr(info, field) == getattr(tfds_info, field), field
  assert info.mirror_safe is False            # digits must not be flipped; the file says so
  for split in ('train', 'test'):
    want_images, want_labels = _tfds_split(digits_config, split)
    images, labels = arrays.load(c.data).split(split)
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)


def _examples(images, labels):
  """The multiset of (pixels, label) pairs: the same examples in any order."""
  return sorted((im.tobytes(), int(lb)) for im, lb in zip(images, labels))


def test_a_digits_file_in_tfds_order_is_read_as_it_is_with_one_warning(tmp_path, digits_npz,
                                                                        caplog):
  """An arrays/sklearn_digits.npz written by an earlier version (from the tfds builder, in tfds's
  order: the same examples, other slices) is never rewritten under the runs trained on it: they
  read the slices they trained on; one warning says why slices differ from a fresh machine's and
  how to get that order. Deleted, the file is written in scikit-learn's order."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  from imgcls_jax.data import arrays
  d = load_digits()
  want = train_test_split(np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target,
                          test_size=0.25, stratify=d.target, random_state=0)[0]
  data = ml_collections.ConfigDict({'name': 'arrays:sklearn_digits', 'data_dir': str(tmp_path)})
  os.makedirs(tmp_path / 'arrays')
  path = str(tmp_path / 'arrays' / 'sklearn_digits.npz')
  shutil.copy(digits_npz, path)
  before = open(path, 'rb').read()
  with np.load(digits_npz) as z:
    tfds_order = z['train_images']
  with caplog.at_level(logging.WARNING):
    for _ in range(3):
      old, _ = arrays.load(data).split('train[80%:]')
  np.testing.assert_array_equal(old, tfds_order[-len(old):])     # the slice the run trained on
  assert open(path, 'rb').read() == before                       # not rewritten
  said = [r.getMessage() for r in caplog.records if "in tfds's order" in r.getMessage()]
  assert len(said) == 1 and "deleted, it is written in scikit-learn's order" in said[0]
  os.remove(path)
  images, _ = arrays.load(data).split('train[80%:]')
  np.testing.assert_array_equal(images[..., 0], want[-len(images):])


def test_a_bare_name_is_written_once_into_the_tfds_data_dir(digits_config, tmp_path, digits_npz):
  """'arrays:sklearn_digits' (the default config's): <data_dir>/arrays/sklearn_digits.npz, written
  from scikit-learn on first use, without TensorFlow, with the examples, classes and flip mark of
  the tfds builder's file (the documented command's, in tfds's order), then read as it is. Another
  bare tfds name without TensorFlow is the one-line error naming the fix."""
  from imgcls_jax.data import arrays
  c = _arrays_config(digits_config, 'x')
  c.data.name = 'arrays:sklearn_digits'
  c.data.data_dir = str(tmp_path / 'own')        # not the session's: CLI children write there
  path = os.path.join(c.data.data_dir, 'arrays', 'sklearn_digits.npz')
  mask = os.umask(0o022)                          # the usual umask: readable by the group, others
  try:
    info = arrays.describe(c.data)
  finally:
    os.umask(mask)
  assert os.stat(path).st_mode & 0o777 == 0o644   # as open() makes files, not mkstemp's 0600
  assert info.name == f'arrays:{path}' and info.num_examples == {'train': 1347, 'test': 450}
  assert info.mirror_safe is False
  with np.load(path) as got, np.load(digits_npz) as want:
    # The written file records that no preprocessing made its pixels; scikit-learn's says so
    # by its source (arrays.ArraysFile.preprocess).
    assert sorted(set(got.files) - {'source'}) == sorted(set(want.files) - {'preprocess'})
    assert str(want['preprocess']) == '' and info.stored_preprocess == ''
    for split in ('train', 'test'):
      assert _examples(got[f'{split}_images'], got[f'{split}_labels']) == _examples(
          want[f'{split}_images'], want[f'{split}_labels']), split
    for k in ('class_names', 'mirror_safe'):
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  stamp = os.stat(path).st_mtime_ns
  arrays.describe(c.data)
  assert os.stat(path).st_mtime_ns == stamp                 # not written again
  assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith('.')]   # no temp file
  (tmp_path / 'a_file').write_text('')                      # a data_dir that cannot be made
  for data_dir, match in ((str(tmp_path / 'a_file'), 'Cannot write the arrays file .* write it '
                           r'to a writable directory \(for .arrays:NAME.: config.data.data_dir'),
                          ('gs://bucket/tfds', 'which is the URL gs://bucket/tfds; set config.data.'
                           'data_dir to a local directory')):
    c.data.data_dir = data_dir
    with pytest.raises(UserError, match=match):
      arrays.describe(c.data)
  proc = run_without_tf('--import', 'imgcls_jax.data.arrays')   # and without TensorFlow:
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name, fresh in (('sklearn_digits', 'a'), ('mnist', 'b')):
    script = ('import ml_collections\nfrom imgcls_jax.data import arrays\n'
              f"print(arrays.describe(ml_collections.ConfigDict({{'name': 'arrays:{name}', "
              f"'data_dir': {str(tmp_path / fresh)!r}, 'train_split': 'train', "
              "'eval_split': 'test'})))\n")
    (tmp_path / 'probe.py').write_text(script)
    proc = run_without_tf(str(tmp_path / 'probe.py'))
    if name == 'sklearn_digits':
      assert proc.returncode == 0, proc.stderr[-2000:]
      assert "num_examples={'train': 1347, 'test': 450}" in proc.stdout
    else:
      assert proc.returncode != 0
      assert ("is written from tfds 'mnist' on first use, which needs TensorFlow (not "
              'installed here)') in proc.stderr


def _write_arrays(capsys, *args):
  """(exit status, captured stdout and stderr) of the documented command ``python -m
  imgcls_jax.data.write_arrays ARGS``: its main() in this process (a child paid ~4 s importing
  TensorFlow, which this process has imported already)."""
  from imgcls_jax.data import write_arrays
  capsys.readouterr()
  status = write_arrays.main(['write_arrays', *args])
  return status, capsys.readouterr()


def test_an_image_folder_becomes_an_arrays_file(tmp_path, capsys):
  """write_arrays --folder: the folder's classes and held-out split, the pixels PIL decodes."""
  from PIL import Image
  rng = np.random.default_rng(0)
  pixels = {}
  for k, name in enumerate(('cat', 'dog', 'emu')):
    os.makedirs(tmp_path / 'root' / name)
    for i in range(6):
      image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
      Image.fromarray(image).save(tmp_path / 'root' / name / f'{i}.png')
      pixels[(k, image.tobytes())] = True
  out = str(tmp_path / 'mine.npz')
  status, said = _write_arrays(capsys, f'--folder={tmp_path / "root"}', '--holdout_fraction=0.34',
                               f'--output={out}')
  assert status == 0, said.err[-3000:]
  assert f'--config.data.name=arrays:{out}' in said.out
  with np.load(out) as z:
    assert list(z['class_names']) == ['cat', 'dog', 'emu']
    assert (len(z['train_labels']), len(z['test_labels'])) == (12, 6)
    assert np.bincount(z['test_labels']).tolist() == [2, 2, 2]     # stratified hold-out
    seen = {(int(k), im.tobytes()) for split in ('train', 'test')
            for im, k in zip(z[f'{split}_images'], z[f'{split}_labels'])}
  assert seen == set(pixels)


def test_a_tagging_manifest_becomes_an_arrays_file_of_0_1_rows(tmp_path, capsys):
  """write_arrays --manifest --multilabel: each image's row holds its manifest tags (there was no
  flag for tags, and --help was an unknown flag)."""
  from PIL import Image
  rng = np.random.default_rng(0)
  tags = ['', 'even', 'big;even', 'round', 'big;round;even', 'big']
  want, rows = {}, ['path,labels,split']
  for i, t in enumerate(tags * 2):
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / f'{i}.png')
    split = 'test' if i % 3 == 0 else 'train'
    want[(split, image.tobytes())] = frozenset(x for x in t.split(';') if x)
    rows.append(f'{i}.png,{t},{split}')
  (tmp_path / 'm.csv').write_text('\n'.join(rows) + '\n')
  out = str(tmp_path / 'tags.npz')
  status, said = _write_arrays(capsys, f'--manifest={tmp_path / "m.csv"}', '--multilabel',
                               f'--output={out}')
  assert status == 0, said.err[-3000:]
  with np.load(out) as z:
    names = [str(n) for n in z['class_names']]
    assert names == ['big', 'even', 'round']
    got = {(split, im.tobytes()): frozenset(n for n, on in zip(names, row) if on)
           for split in ('train', 'test')
           for im, row in zip(z[f'{split}_images'], z[f'{split}_labels'])}
    assert z['train_labels'].shape == (8, 3)
  assert got == want
  proc = subprocess.run([sys.executable, '-m', 'imgcls_jax.data.write_arrays', '--help'],
                        cwd=REPO, env=subprocess_env(1), capture_output=True, text=True,
                        timeout=300)   # the command line itself (it stops before any import)
  assert proc.returncode == 0 and '--multilabel' in proc.stdout and 'Writes a dataset' in proc.stdout


@pytest.mark.parametrize('spec', ['train[:50%]', 'train[33%:67%]', 'train[-10%:]',
                                  'train[12.5%:]', 'train[-100:]', 'train[5:17]', 'test[:1%]'])
def test_slices_select_what_tfds_selects(digits_npz, digits_config, spec):
  from imgcls_jax.data import arrays
  want_images, want_labels = _tfds_split(digits_config, spec)
  c = _arrays_config(digits_config.copy_and_resolve_references(), digits_npz)
  images, labels = arrays.load(c.data).split(spec)
  np.testing.assert_array_equal(labels, want_labels)
  np.testing.assert_array_equal(images, want_images)


# ------------------------------------------------------------------ the training stream

def test_host_resident_and_per_process_streams_are_the_same_batches(digits_npz, digits_config):
  """Steps 0..47 (two epochs of 21 steps of 64 and a batch across each boundary): the host stream,
  the split on an 8-device mesh, two processes' halves, and a stream resumed at step 20."""
  from imgcls_jax import dispatch, sharding
  from imgcls_jax.data import reader
  c = _arrays_config(digits_config, digits_npz)
  c.data.device_resident = True
  n, steps = 1347, 48
  host = list(zip(range(steps), reader.train_batches(c.data, seed=3, local_batch_size=64)))
  rows = np.concatenate([b['label'] for _, b in host])
  images = np.concatenate([b['image'] for _, b in host])
  split, order = reader.resident_split(c.data, 3, process_count=1)
  for e in range(2):  # each epoch reads every example once
    idx = order.indices(e * n, n)
    assert sorted(idx) == list(range(n))
    np.testing.assert_array_equal(rows[e * n:(e + 1) * n], split.labels[idx])
    np.testing.assert_array_equal(images[e * n:(e + 1) * n], split.images[idx])
  assert not np.array_equal(order.indices(0, n), order.indices(n, n))     # reshuffled per epoch
  mesh = sharding.make_mesh(8)
  resident = dispatch.resident_batches(split.images, split.labels, order.indices, start_step=0,
                                       sizes=[1] * steps, batch_size=64, mesh=mesh)
  for (_, h), r in zip(host, resident):
    np.testing.assert_array_equal(h['image'], np.asarray(r['image']))
    np.testing.assert_array_equal(h['label'], np.asarray(r['label']))
  halves = [reader.train_batches(c.data, seed=3, local_batch_size=32, process_index=p,
                                 process_count=2) for p in (0, 1)]
  resumed = reader.train_batches(c.data, seed=3, local_batch_size=64, start_step=20)
  for step, h in host:
    a, b = next(halves[0]), next(halves[1])
    np.testing.assert_array_equal(np.concatenate([a['label'], b['label']]), h['label'])
    if step >= 20:
      np.testing.assert_array_equal(next(resumed)['image'], h['image'])
  other = next(reader.train_batches(c.data, seed=4, local_batch_size=64))['label']
  assert not np.array_equal(other, host[0][1]['label'])


@pytest.mark.parametrize('processes', [1, 3])
def test_evaluation_sees_every_example_once(digits_npz, digits_config, processes):
  from imgcls_jax.data import reader
  want_images, want_labels = _tfds_split(digits_config, 'test')
  c = _arrays_config(digits_config, digits_npz)
  shares = [reader.eval_data(c.data, 'test', local_batch_size=64, process_index=p,
                             process_count=processes) for p in range(processes)]
  batches = [list(s.batches()) for s in shares]
  assert len({len(b) for b in batches}) == 1 == len({s.num_batches for s in shares})
  assert len(batches[0]) == shares[0].num_batches
  got_images = np.concatenate([b['image'][b['mask']] for bs in batches for b in bs])
  got_labels = np.concatenate([b['label'][b['mask']] for bs in batches for b in bs])
  assert all(b['image'].shape[0] == 64 for bs in batches for b in bs)
  np.testing.assert_array_equal(got_labels, want_labels)
  np.testing.assert_array_equal(got_images, want_images)
  head = list(shares[0].head_batches(2))
  assert len(head) == 2 and np.array_equal(head[1]['label'], batches[0][1]['label'])


# ------------------------------------------------------------------ without TensorFlow

# The modes of a trained run, one after the other in one child process (TensorFlow blocked there
# by run_without_tf), each through main.run as the command line calls it (a child each paid ~3 s of
# imports): argv[1] the run's report.json, copied to argv[2]/report_<i>.json after call i;
# argv[3] the calls' arguments (JSON); each call's stderr starts with a '--- call <i>' line and
# ends with '--- status <exit status>'.
_MODES = """
import json, shutil, sys
from imgcls_jax import main
report, snapshots, calls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
for i, argv in enumerate(calls):
  print(f'--- call {i}', file=sys.stderr, flush=True)
  status = main.run(['imgcls_jax.main', *argv])
  print(f'--- status {status}', file=sys.stderr, flush=True)
  shutil.copy(report, f'{snapshots}/report_{i}.json')
"""


def test_trains_and_evaluates_without_tensorflow_as_the_tf_path_scores_it(digits_npz, tfds_dir,
                                                                          tmp_path):
  """The default config (``arrays:sklearn_digits``, its file written on first use) with TensorFlow
  blocked and a fresh data_dir; the run's report (evaluate mode, also blocked) against the same
  checkpoint evaluated through tfds's sklearn_digits with TensorFlow."""
  workdir, data_dir = str(tmp_path / 'run'), str(tmp_path / 'fresh_data_dir')
  args = ['-m', 'imgcls_jax.main', '--config=configs/default.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', '--config.num_train_steps=60',
          '--config.model.widths=(16,32)', '--config.eval_every_steps=30',
          '--config.progress_bar=False', '--config.tensorboard=False']
  proc = run_without_tf(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'First training step done' in proc.stderr
  assert os.path.exists(f'{data_dir}/arrays/sklearn_digits.npz')   # written from scikit-learn
  # The inputs of the modes below: an arrays file of other classes (its labels would be read as
  # digits), one of the run's classes holding a test split only (no train split), and image files
  # of tfds's sklearn_digits test split (read with TensorFlow, here).
  garments = str(tmp_path / 'garments.npz')
  np.savez(garments, test_images=np.zeros((20, 8, 8, 1), np.uint8),
           test_labels=np.arange(20) % 10,
           class_names=np.asarray([f'garment{k}' for k in range(10)]))
  test_only = str(tmp_path / 'test_only.npz')
  with np.load(f'{data_dir}/arrays/sklearn_digits.npz') as z:
    np.savez(test_only, test_images=z['test_images'][:50], test_labels=z['test_labels'][:50],
             class_names=z['class_names'], mirror_safe=z['mirror_safe'])
  want_images, want_labels = _tfds_split(_digits(tfds_dir), 'test')
  pngs = tmp_path / 'pngs'
  pngs.mkdir()
  for i in range(5):
    Image.fromarray(want_images[i, :, :, 0]).save(pngs / f'{i}.png')
  (tmp_path / 'modes.py').write_text(_MODES)
  snapshots = tmp_path / 'reports'
  snapshots.mkdir()
  calls = [['--mode=evaluate', f'--workdir={workdir}', '--config.evaluate.checkpoint=latest'],
           ['--mode=evaluate', f'--workdir={workdir}', f'--config.data.name=arrays:{garments}'],
           ['--mode=evaluate', f'--workdir={workdir}', f'--config.data.name=arrays:{test_only}',
            f'--config.evaluate.output_dir={tmp_path / "other_report"}'],
           ['--mode=predict', f'--workdir={workdir}', f'--config.predict.inputs={pngs}',
            f'--config.predict.output={tmp_path / "p.jsonl"}']]
  proc = run_without_tf(str(tmp_path / 'modes.py'), os.path.join(workdir, 'report.json'),
                        str(snapshots), json.dumps(calls))
  assert proc.returncode == 0, proc.stderr[-3000:]
  said = proc.stderr.split('--- call ')[1:]
  assert len(said) == len(calls), proc.stderr[-3000:]
  status = [int(part.rsplit('--- status ', 1)[1].split()[0]) for part in said]
  with open(snapshots / 'report_0.json') as f:
    arrays_report = json.load(f)
  assert status[0] == 0, said[0][-3000:]
  assert arrays_report['num_examples'] == 450
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    final = [json.loads(line) for line in f if '"eval"' in line][-1]
  assert final['step'] == 60 and final['accuracy'] == pytest.approx(arrays_report['accuracy'])
  # The same run on the arrays file of other classes: refused in one line before any evaluation,
  # and the run's report is left as it was.
  assert status[1] == 2 and "has 10 classes (garment0, garment1" in said[1], said[1][-2000:]
  with open(snapshots / 'report_1.json') as f:
    assert json.load(f) == arrays_report
  # The file of the run's classes holding a test split only evaluates.
  assert status[2] == 0, said[2][-3000:]
  with open(tmp_path / 'other_report' / 'report.json') as f:
    assert json.load(f)['num_examples'] == 50
  # The oracle: the trained model's predictions on tfds's sklearn_digits test split (tf.data),
  # scored by scikit-learn.
  from sklearn import metrics as skm
  from imgcls_jax import inference
  clf = inference.classifier(inference.load(workdir))
  probs = clf.predict_arrays(want_images)['probabilities']
  assert arrays_report['accuracy'] == pytest.approx(
      skm.accuracy_score(want_labels, probs.argmax(-1)), abs=1e-12)
  assert arrays_report['macro_avg']['f1'] == pytest.approx(
      skm.f1_score(want_labels, probs.argmax(-1), average='macro'), abs=1e-9)
  # The report's ROC-AUC comes from 1,000-bin score histograms (imgcls_jax/roc.py): against
  # sklearn on the raw scores it may differ only through positive-negative pairs whose scores
  # share a bin (ties count half there) or, by last-bit differences between the two forward
  # programs, a neighbouring bin: at most the share of pairs within 2/1000 of each other.
  raw, bound = [], []
  for k in range(10):
    pos, neg = probs[want_labels == k, k], probs[want_labels != k, k]
    raw.append(skm.roc_auc_score(want_labels == k, probs[:, k]))
    bound.append(np.mean(np.abs(pos[:, None] - neg[None, :]) < 2e-3))
  assert np.mean(bound) < 0.01                               # the comparison means something
  assert abs(arrays_report['roc_auc_macro'] - np.mean(raw)) <= np.mean(bound) + 1e-12
  # predict on image files needs no TensorFlow either (the run has no eval preprocessing).
  assert status[3] == 0, said[3][-3000:]
  with open(tmp_path / 'p.jsonl') as f:
    predicted = {os.path.basename(r['file']): r['predictions'][0]['index']
                 for r in map(json.loads, f)}
  assert predicted == {f'{i}.png': int(probs[i].argmax()) for i in range(5)}
  samples = np.load(os.path.join(workdir, 'samples.npz'))   # what the run directory keeps
  n = len(samples['eval_labels'])
  assert n == 64
  with np.load(f'{data_dir}/arrays/sklearn_digits.npz') as z:   # the run's test split, in order
    np.testing.assert_array_equal(samples['eval_images'], z['test_images'][:n])
    np.testing.assert_array_equal(samples['eval_labels'], z['test_labels'][:n])


_KILLED_CHILD = BLOCK_TF + """
import os, signal, time
from imgcls_jax import checkpoint, main
kill_at = int(os.environ.get('KILL_AT_SAVE', '0'))
if kill_at:
  real_save = checkpoint.Checkpointer.save
  def save(self, step, *args, **kwargs):
    if step == kill_at:   # kill -9 before this save, once the previous one is committed
      while not os.path.isdir(os.path.join(self.directory, str(step - 10))):
        time.sleep(0.01)
      os.kill(os.getpid(), signal.SIGKILL)
    return real_save(self, step, *args, **kwargs)
  checkpoint.Checkpointer.save = save
sys.exit(main.run(['imgcls_jax.main', *sys.argv[1:]]))
"""


def test_killed_and_rerun_without_tensorflow_ends_bit_for_bit(digits_npz, tmp_path):
  """Resident arrays, 2 devices, TensorFlow blocked: killed with SIGKILL before the step-20 save
  (step 10 committed) and rerun, against an uninterrupted run: the same final state and metrics."""
  from tests import test_fault_tolerance as ft
  args = ['--config=configs/default.py', f'--config.data.name=arrays:{digits_npz}',
          '--config.data.train_preprocess=', '--config.data.device_resident=True',
          '--config.data.device_preprocess=translate(pad=1)', '--config.num_train_steps=30',
          '--config.model.widths=(8,16)', '--config.checkpoint_every_steps=10',
          '--config.eval_every_steps=10', '--config.mesh.num_devices=2',
          '--config.progress_bar=False', '--config.tensorboard=False']
  for name, kill_at in (('whole', 0), ('killed', 20), ('killed', 0)):
    log = str(tmp_path / f'{name}_{kill_at}.log')
    os.environ['KILL_AT_SAVE'] = str(kill_at)
    try:
      proc = ft.start([*args, f'--workdir={tmp_path / name}'], log, num_devices=2,
                      code=_KILLED_CHILD)
    finally:
      del os.environ['KILL_AT_SAVE']
    rc, out = ft.finish(proc, log)
    assert rc == (-9 if kill_at else 0), out[-3000:]
    if kill_at:
      assert ft.checkpoint_steps(tmp_path / name)[-1] == 10
  assert 'Resuming from step 10.' in out, out[-3000:]
  ft.assert_bitwise_equal(ft.load_state(str(tmp_path / 'whole'), 30),
                          ft.load_state(str(tmp_path / 'killed'), 30))
  assert ft.metric_records(tmp_path / 'whole') == ft.metric_records(tmp_path / 'killed')


# ------------------------------------------------------------------ bad files and settings

def _write(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


_IM = np.zeros((6, 4, 4, 1), np.uint8)
_LB = np.array([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize('contents, message', [
    (dict(train_labels=_LB), r"holds no 'NAME_images' array \(it holds: train_labels\)"),
    (dict(train_images=_IM), r"has 'train_images' but no 'train_labels'; store both"),
    (dict(train_images=_IM.astype(np.float32), train_labels=_LB),
     r"'train_images' is float32; store uint8 pixels"),
    (dict(train_images=_IM[..., 0][..., None, None], train_labels=_LB),
     r"'train_images' has shape \(6, 4, 4, 1, 1\)"),
    (dict(train_images=_IM, train_labels=_LB[:5]), r"'train_labels' has shape \(5,\) for 6"),
    (dict(train_images=_IM, train_labels=_LB.astype(np.float64)), r'is float64; store integer'),
    (dict(train_images=_IM, train_labels=_LB, class_names=np.array(['a', 'b'])),
     r"split 'train' has labels outside the 2 classes"),
    (dict(train_images=_IM, train_labels=np.zeros(6, int)), r'holds 1 class; a classifier needs'),
    (dict(train_images=_IM, train_labels=np.eye(3, dtype=np.int64)[_LB],
          class_names=np.array(['a', 'b;c', 'd'])), r"tag names may not contain ';' \('b;c'\)"),
    (dict(train_images=_IM, train_labels=_LB, test_images=np.zeros((2, 5, 5, 1), np.uint8),
          test_labels=_LB[:2]), r'splits hold images of different shapes'),
])
def test_bad_files_are_one_line_errors(digits_config, tmp_path, contents, message):
  from imgcls_jax.data import arrays
  c = _arrays_config(digits_config, _write(tmp_path / 'x.npz', **contents))
  with pytest.raises(UserError, match=message):
    arrays.describe(c.data)


def test_missing_and_unreadable_files_are_one_line_errors(digits_config, tmp_path):
  from imgcls_jax.data import arrays
  c = _arrays_config(digits_config, tmp_path / 'none.npz')
  with pytest.raises(UserError, match=r'no such file; write one with `python -m imgcls_jax.data.'):
    arrays.describe(c.data)
  (tmp_path / 'text.npz').write_text('not a zip')
  c.data.name = f'arrays:{tmp_path / "text.npz"}'
  with pytest.raises(UserError, match=r'is not a readable .npz of arrays \('):
    arrays.describe(c.data)


def test_evaluate_reads_a_moved_arrays_file_but_no_other_dataset(digits_npz, tmp_path):
  """The path of an arrays file is a location: evaluate takes another one; not a tfds name."""
  import shutil
  from imgcls_jax import inference
  saved = {'data': {'name': f'arrays:{digits_npz}'}, 'mode': {}}
  moved = shutil.copy(digits_npz, tmp_path / 'moved.npz')
  run = inference.effective_config(saved, None, {'data.name': f'arrays:{moved}'})
  assert run.data.name == f'arrays:{moved}'
  with pytest.raises(UserError, match=r'--config.data.name=sklearn_digits conflicts with the '):
    inference.effective_config(saved, None, {'data.name': 'sklearn_digits'})


@pytest.mark.parametrize('change, message', [
    (dict(train_preprocess='pad_crop(pad=1)'), r"set config.data.train_preprocess='' and use"),
    (dict(eval_preprocess='resize(size=4)'), r"set config.data.eval_preprocess='' and store"),
    (dict(balanced_sampling=True), r'set config.data.balanced_sampling=False'),
    (dict(read_shards=2), r'held whole by every process; set config.data.read_shards=1'),
    (dict(eval_split='test@/tmp/ids.txt'), r"config.data.eval_split='test@/tmp/ids.txt' lists "),
    (dict(eval_split='val'), r"Split 'val' does not exist in .*; set config.data.eval_split to "
                             r'one of: test, train'),
    (dict(eval_split='test[40:10]'), r"config.data.eval_split='test\[40:10\]' selects no "),
    (dict(eval_split='test[:9999]'), r"reaches past the 450 examples of 'test'"),
    (dict(eval_split='test[a:b]'), r"config.data.eval_split='test\[a:b\]' does not parse"),
    (dict(multilabel=True), r'stores one class per image; set config.data.multilabel=False'),
])
def test_settings_an_arrays_file_cannot_honour_are_one_line_errors(digits_npz, digits_config,
                                                                   change, message):
  from imgcls_jax.data import reader
  c = _arrays_config(digits_config, digits_npz)
  c.data.update(change)
  with pytest.raises(UserError, match=message):
    reader.describe(c.data)


def test_flips_of_a_file_that_says_they_change_the_meaning_are_refused(digits_npz, digits_config):
  from imgcls_jax import run
  c = _arrays_config(digits_config, digits_npz)
  c.data.device_preprocess = 'flip_lr'
  with pytest.raises(UserError, match=r'Horizontal flips change the meaning of .* remove flip_lr'):
    run.setup(c)


def test_modes_that_read_tfds_ids_name_the_arrays_file(digits_npz, digits_config):
  from imgcls_jax.data import folds
  c = _arrays_config(digits_config, digits_npz)
  with pytest.raises(UserError, match=r"is an arrays file, and this reads tfds datasets and "):
    folds.read_ids_and_labels(c.data, 'train')


def test_evaluating_on_an_arrays_file_of_other_classes_or_sizes_is_refused(digits_npz,
                                                                           digits_config, tmp_path):
  """A digits run evaluated on --config.data.name=arrays:<Fashion-MNIST-like file> scored it under
  the digit names (labels are indices) with exit 0; an arrays file of another image size too.
  Now both are one line; a moved copy of the run's own file still evaluates."""
  from imgcls_jax import restored_split
  from imgcls_jax.data import arrays
  own = _arrays_config(digits_config, digits_npz).data
  info = arrays.describe(own)
  rng = np.random.RandomState(0)

  def other(name, classes, hw):
    path = str(tmp_path / f'{name}.npz')
    np.savez(path, test_images=rng.randint(0, 256, (20, *hw, 1)).astype(np.uint8),
             test_labels=rng.randint(0, len(classes), 20), class_names=np.asarray(classes))
    data = own.copy_and_resolve_references()
    data.name = f'arrays:{path}'
    data.train_split = data.eval_split = 'test'
    return data

  garments = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
              'Sneaker', 'Bag', 'Ankle boot']
  with pytest.raises(UserError, match=r"has 10 classes \(T-shirt/top, Trouser, Pullover, Dress, "
                                      r"Coat, \.\.\.\) where the run was trained on 10 \(0, 1, "
                                      r"2, 3, 4, \.\.\.\); evaluate on data of the run's classes"):
    restored_split._check_other_dataset(other('garments', garments, (8, 8)), info, own.name,
                                        'test', 'data.eval_split')
  digits = [str(d) for d in range(10)]
  with pytest.raises(UserError, match=r'holds 16x16x1 images where the run reads 8x8x1; write the '
                                      r'arrays file at 8x8x1'):
    restored_split._check_other_dataset(other('big', digits, (16, 16)), info, own.name, 'test',
                                        'data.eval_split')
  restored_split._check_other_dataset(other('same', digits, (8, 8)), info, own.name, 'test',
                                      'data.eval_split')
  restored_split._check_other_dataset(own, info, own.name, 'test', 'data.eval_split')
  # A split the other file lacks: named with the key that chose it (was data.train_split).
  with pytest.raises(UserError, match=r"Split 'validation' does not exist in .*same\.npz; set "
                                      r'config\.evaluate\.split to one of: test'):
    restored_split._check_other_dataset(other('same', digits, (8, 8)), info, own.name,
                                        'validation', 'evaluate.split')
