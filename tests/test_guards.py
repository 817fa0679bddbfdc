"""Bad input found by probing the command line (session 27), each now one clear line or refused
before harm: a reader beside a training run, a damaged newest checkpoint, an image folder whose
classes or held-out draw changed under a resume, a run directory inside its own data, dataset
keys another dataset ignores, typos in config files, a k-NN score of an example against itself,
arrays of the wrong kind, impossible model sizes and label orders that depended on the process."""
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import configlib, embed, evaluation, inference, models, run, train
from imgcls_jax.data import digits, folder_index
from imgcls_jax.errors import UserError
from tests.conftest import REPO, checkpointed_digits_run, subprocess_env


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory, tfds_dir):
  """A digits run: 20 steps, checkpoints at 10 and 20."""
  return checkpointed_digits_run(tmp_path_factory, tfds_dir, 20)


def test_a_reader_leaves_a_saving_runs_checkpoint_alone_and_names_a_damaged_one(digits_run,
                                                                                 tmp_path):
  _, original = digits_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(original, workdir)
  # What a training run's in-flight save looks like: evaluating beside it must not delete it.
  saving = os.path.join(workdir, 'checkpoints', '30.orbax-checkpoint-tmp',
                        'state.orbax-checkpoint-tmp')
  os.makedirs(saving)
  open(os.path.join(saving, 'part'), 'w').write('being written')
  ev = evaluation.evaluate_checkpoint(workdir, None, checkpoint_spec='latest')
  assert ev.step == 20 and os.path.exists(os.path.join(saving, 'part'))
  # A damaged newest checkpoint: the older one is still evaluated; the damaged one is named.
  with open(os.path.join(workdir, 'checkpoints', '20', 'meta', 'metadata'), 'w') as f:
    f.write('garbage')
  assert evaluation.evaluate_checkpoint(workdir, None, checkpoint_spec='10').step == 10
  with pytest.raises(UserError, match=r'^Cannot read checkpoint 20 of .* \(meta/metadata: '
                     r'JSONDecodeError: .*\); .*pick another step \(10\)\.$'):
    evaluation.evaluate_checkpoint(workdir, None, checkpoint_spec='latest')


def _folder(root, classes=('c0', 'c1', 'c2'), per_class=12):
  x, y = digits.load_arrays('train')
  for k, name in enumerate(classes):
    os.makedirs(os.path.join(root, name))
    for i, image in enumerate(x[y == k][:per_class]):
      Image.fromarray(image[:, :, 0]).save(os.path.join(root, name, f'{i}.png'))
  return root


def _folder_config(digits_config, root):
  c = digits_config
  c.data.name = 'image_folder'
  c.data.folder = root
  c.data.holdout_fraction = 0.25
  c.data.mean = (0.5,)
  c.data.std = (0.25,)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_train_steps = 2
  c.checkpoint_every_steps = 2
  return c


def test_an_image_folder_resume_must_read_the_same_classes_and_draw(digits_config, tmp_path):
  root = _folder(str(tmp_path / 'images'))
  c = _folder_config(digits_config, root)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)
  c.num_train_steps = 4
  os.rename(os.path.join(root, 'c1'), os.path.join(root, 'z1'))   # c2 would become index 1
  folder_index.clear_memo()
  with pytest.raises(UserError, match=r'Cannot resume checkpoint 2 .* trained on 3 classes and '
                                      r'the data now has 3 \(gone: c1; new: z1\)'):
    train.train_and_evaluate(c, workdir)
  os.rename(os.path.join(root, 'z1'), os.path.join(root, 'c1'))
  folder_index.clear_memo()
  c.data.holdout_seed = 7       # another held-out draw would hold trained-on images
  with pytest.raises(UserError, match=r'data\.holdout_seed: 0 in the checkpoint, 7 now'):
    train.train_and_evaluate(c, workdir)
  c.data.holdout_seed = 0
  assert train.train_and_evaluate(c, workdir)['count'] > 0      # as it was: resumes


def test_a_resume_with_another_class_count_names_the_classes_before_any_shape(digits_config,
                                                                             tmp_path, caplog):
  root = _folder(str(tmp_path / 'images'))
  c = _folder_config(digits_config, root)
  c.num_train_steps = 4          # checkpoints 2 and 4
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)
  c.num_train_steps = 6
  os.rename(os.path.join(root, 'c2'), str(tmp_path / 'c2'))   # 3 classes -> 2: a smaller head
  folder_index.clear_memo()
  message = (r'^Cannot resume checkpoint {} in .*: it was trained on 3 classes and the data now '
             r'has 2 \(gone: c2\), so its class indices would mean other classes; restore the '
             r'data as it was, or train in a new --workdir')
  with pytest.raises(UserError, match=message.format(4)):
    train.train_and_evaluate(c, workdir)
  # A damaged newest checkpoint is still set aside, and the previous one's classes compared.
  with open(os.path.join(workdir, 'checkpoints', '4', 'meta', 'metadata'), 'w') as f:
    f.write('garbage')
  with pytest.raises(UserError, match=message.format(2)):
    train.train_and_evaluate(c, workdir)
  assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', '4'))
  os.rename(str(tmp_path / 'c2'), os.path.join(root, 'c2'))   # the data as it was: resumes at 2
  folder_index.clear_memo()
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(c, workdir)
  assert 'Resuming from step 2.' in caplog.text
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '6'))


def test_a_run_directory_inside_its_image_folder_is_refused_before_writing(digits_config,
                                                                           tmp_path):
  root = _folder(str(tmp_path / 'images'))
  c = _folder_config(digits_config, root)
  with pytest.raises(UserError, match='--workdir=.* is inside config.data.folder='):
    train.train_and_evaluate(c, os.path.join(root, 'runs', 'a'))
  assert sorted(os.listdir(root)) == ['c0', 'c1', 'c2']


def test_folder_keys_of_another_dataset_are_refused(digits_config, digits_run, tmp_path):
  digits_config.data.folder = str(tmp_path)
  with pytest.raises(UserError, match="config.data.folder=.* is read only when config.data.name="
                                      "'image_folder', and it is 'sklearn_digits'"):
    run.setup(digits_config)
  # A trained run given a manifest (or folder) on the command line evaluates on those labelled
  # images whatever it was trained on (tests/test_arrays_pixels.py); a missing one is named.
  _, workdir = digits_run
  with pytest.raises(UserError, match=r'labels.csv \(config.data.manifest\) does not exist'):
    evaluation.evaluate_checkpoint(workdir, None, overrides={
        'data.manifest': str(tmp_path / 'labels.csv')})


def test_config_files_are_checked_against_the_schema_and_completed(tmp_path):
  typo = tmp_path / 'typo.py'
  typo.write_text(f'import sys\nsys.path.insert(0, {REPO!r})\nfrom configs import default\n'
                  'def get_config():\n  c = default.get_config()\n  c.optim.learning_rat = 0.5\n'
                  '  return c\n')
  res = subprocess.run([sys.executable, '-m', 'imgcls_jax.main', f'--config={typo}',
                        f'--workdir={tmp_path / "run"}'], cwd=REPO, env=subprocess_env(1),
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 2 and res.stderr.strip().splitlines() == [
      f"error: The config file {typo} sets 'optim.learning_rat', which is not a config key (did "
      "you mean 'optim.learning_rate'?); see configs/default.py for the documented schema."]
  assert not (tmp_path / 'run').exists()
  import ml_collections
  small = ml_collections.ConfigDict({'data': {'name': 'sklearn_digits'}, 'num_epochs': 1.0,
                                     'optim': {'learning_rate': 0.3}})
  full = configlib.complete(small, 'small.py')
  default = configlib.load_config_file(configlib.default_config_path())
  assert full.optim.learning_rate == 0.3 and full.num_epochs == 1.0
  assert full.optim.momentum == default.optim.momentum and full.mesh == default.mesh
  assert full.model == default.model
  configlib.validate(full)


def test_knn_of_a_split_against_itself_is_skipped(digits_run, tmp_path, caplog):
  c, workdir = digits_run
  c = c.copy_and_resolve_references()
  c.embed.split = 'train'
  c.embed.output_dir = str(tmp_path / 'emb')
  c.embed.tsne_max = 0           # the projection's PCA only (t-SNE costs most of the time)
  summary = embed.embed(c, workdir)
  assert 'knn' not in summary and summary['num_examples'] > 1000
  assert "shares 1347 examples with the reference split 'train'" in caplog.text
  c.embed.split = 'test'         # no overlap: evaluated
  assert 0.2 < embed.embed(c, workdir)['knn']['accuracy'] < 1.0


def test_classifier_arrays_of_another_kind_are_one_line(digits_run):
  _, workdir = digits_run
  clf = inference.classifier(inference.load(workdir))
  good = np.zeros((2, 8, 8, 1), np.uint8)
  assert clf.predict_arrays(good)['probabilities'].shape == (2, 10)
  for bad in (good.astype(np.float32) / 255, good[0], np.zeros((2, 9, 8, 1), np.uint8)):
    with pytest.raises(UserError, match=r'takes uint8 images of shape \[N, 8, 8, 1\]'):
      clf.predict_arrays(bad)


def test_impossible_sizes_and_label_orders(digits_config):
  from flax import nnx
  for kw in (dict(widths=(0,)), dict(widths=()), dict(convs_per_stage=0)):
    with pytest.raises(UserError, match=r"Bad arguments for model 'cnn' \(ValueError: widths="):
      models.get('cnn', num_classes=10, in_channels=1, rngs=nnx.Rngs(0), **kw)
  digits_config.num_epochs = float('inf')
  with pytest.raises(UserError, match='config.num_epochs must be a finite number'):
    configlib.validate(digits_config)
  # Integer manifest labels: numerically, ties by text, whatever the process's hash seed.
  script = ('from imgcls_jax.data import folder_layout as f; '
            "print(f._sort_labels(['1', '01', '10', '2', '001']))")
  seen = {subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, 'PYTHONHASHSEED': str(seed)}).stdout.strip()
          for seed in (1, 2, 5, 9)}
  assert seen == {"('001', '01', '1', '2', '10')"}
  # A grey dataset with an RGB mean: one value is the fix.
  digits_config.num_epochs = 1.0
  digits_config.data.mean = digits_config.data.std = (0.5, 0.5, 0.5)
  with pytest.raises(UserError, match=r"has 3 values but 'sklearn_digits' images have 1 "
                                      r'channel\(s\); give 1 value \(and as many in'):
    run.setup(digits_config)


def test_manifest_split_cells_and_foreign_headers_are_one_line(tmp_path):
  from imgcls_jax.data import manifest
  path = tmp_path / 'labels.csv'
  cases = {   # rows -> what the one line says
      'path,label,split\na.png,cat,train\nb.png,dog,\nc.png,dog,test\n':
          r"Line 3 of the manifest .* \('b.png,dog,'\) \(every row needs its split\)",
      'a.png,cat\nb.png,dog,train\nc.png,dog,test\n':
          r"Line 1 of the manifest .* has 2 cells where 2 other rows have 3 \('a.png,cat'\)",
      'file,class\na.png,cat\nb.png,dog\n':
          r"first line of the manifest .* \('file,class'\) looks like a header but names no path",
  }
  for text, message in cases.items():
    path.write_text(text)
    with pytest.raises(UserError, match=message):
      manifest.read_rows(str(path))
  path.write_text('a.png,cat,train\nb.png,dog,test\n')          # as before: a split column
  assert manifest.read_rows(str(path)) == (('a.png', 'cat', 'train'), ('b.png', 'dog', 'test'))
  path.write_text('path,label\na.png,cat\nb.png,dog\n')
  assert manifest.read_rows(str(path)) == (('a.png', 'cat', None), ('b.png', 'dog', None))
  # Rows are read once per process while the file is unchanged: a rewrite of the same size is
  # read again.
  path.write_text('path,label\na.png,cow\nb.png,dog\n')
  assert manifest.read_rows(str(path)) == (('a.png', 'cow', None), ('b.png', 'dog', None))


def test_float_and_32_bit_grey_images_keep_their_range(tmp_path):
  from imgcls_jax.data import images
  x, _ = digits.load_arrays('test')
  digit = x[0, :, :, 0]
  Image.fromarray(digit).save(tmp_path / 'd.png')
  Image.fromarray(digit.astype(np.float32) / 255, 'F').save(tmp_path / 'd_float.tif')
  Image.fromarray(digit.astype(np.int32) * 257, 'I').save(tmp_path / 'd_int.tif')
  want = images.decode(str(tmp_path / 'd.png'), channels=1)
  assert want.max() > 100
  for name in ('d_float.tif', 'd_int.tif'):
    got = images.decode(str(tmp_path / name), channels=1)
    np.testing.assert_allclose(got.astype(int), want.astype(int), atol=1, err_msg=name)


def test_weights_of_a_damaged_newest_checkpoint_name_the_way_out(digits_run, tmp_path, caplog):
  from imgcls_jax import checkpoint_files
  _, original = digits_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(original, workdir)
  with pytest.raises(UserError, match='Checkpoint step -5 is not a step; give -1'):
    checkpoint_files.read_weights(workdir, -5)
  state = os.path.join(workdir, 'checkpoints', '20', 'state')
  for name in os.listdir(state):   # truncated: the arrays gone, the tree metadata kept
    if name.startswith(('d', 'ocdbt', 'array')) or name.endswith('.zarray'):
      full = os.path.join(state, name)
      shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
  with pytest.raises(UserError, match=r'Cannot read checkpoint 20 .*; pick another step \(10\)\.'):
    checkpoint_files.read_weights(workdir)
  with pytest.raises(UserError, match=r'pick another step \(10\) with --config\.predict\.step\.'):
    inference.load(workdir, step_key='predict.step')       # as predict loads it: the key named
  shutil.rmtree(state)             # no state at all: the latest complete one, said so
  assert checkpoint_files.read_weights(workdir).meta['step'] == 10
  assert 'Checkpoint 20 in' in caplog.text and 'using step 10' in caplog.text


def test_float_images_outside_0_1_are_named_and_globs_list_files(tmp_path):
  from imgcls_jax.data import images
  Image.fromarray(np.full((4, 4), 1.01, np.float32), 'F').save(tmp_path / 'over.tif')
  with pytest.raises(images.UnreadableImage, match=r'values outside \[0, 1\]'):
    images.decode(str(tmp_path / 'over.tif'), channels=1)
  for name in ('a.png', 'b.png', 'notes.txt'):
    (tmp_path / 'g' / 'deep').mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / 'g' / 'deep' / 'x.png')
    (tmp_path / 'g' / name).write_bytes(b'x')
  got = images.list_inputs(f"{tmp_path / 'g' / '*.png'},{tmp_path / 'g' / '**' / 'x.png'}")
  assert [os.path.relpath(f, tmp_path) for f in got] == ['g/a.png', 'g/b.png', 'g/deep/x.png']
  with pytest.raises(UserError, match=r'No image file matches .*\*\.jpg \(from config.predict'):
    images.list_inputs(str(tmp_path / 'g' / '*.jpg'))
  # A folder named 'set [1]': '[1]' is a character class; the message says how to write it.
  (tmp_path / 'set [1]').mkdir()
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / 'set [1]' / 'y.png')
  with pytest.raises(UserError, match=r"matches one character: write a bracket .* as \[\[\] or"):
    images.list_inputs(str(tmp_path / 'set [1]' / '*.png'))
  assert images.list_inputs(str(tmp_path / 'set [[]1[]]' / '*.png')) == [
      str(tmp_path / 'set [1]' / 'y.png')]


def test_an_input_path_with_a_comma_in_its_name_is_one_path(tmp_path):
  """config.predict.inputs / embed.inputs / evaluate.ood_inputs are comma-separated; a file or
  folder whose own name has a comma stays one path where it exists (before: 'does not exist')."""
  from imgcls_jax.data import images
  for rel in ('scan 3,4.png', 'c,d/x.png', 'a/y.png', 'b/z.png', 'plain.png'):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / rel)
  t = str(tmp_path)
  spec = f'{t}/scan 3,4.png, {t}/plain.png,{t}/c,d ,{t}/a,{t}/b'
  assert images.comma_paths(spec) == [f'{t}/scan 3,4.png', f'{t}/plain.png', f'{t}/c,d', f'{t}/a',
                                      f'{t}/b']
  got = [os.path.relpath(f, t) for f in images.list_inputs(spec, 'embed.inputs')]
  assert got == ['scan 3,4.png', 'plain.png', 'c,d/x.png', 'a/y.png', 'b/z.png']
  with pytest.raises(UserError, match=r'Input .*/scan 3 \(from config.embed.inputs\) does not'):
    images.list_inputs(f'{t}/scan 3,5.png', 'embed.inputs')
  assert images.comma_paths(' , ') == []


def test_first_line_quotes_an_error_in_one_short_line():
  """The one way an underlying exception is quoted in a UserError: type, first line only, cut at
  a word with ' ...' past the limit, the type alone for an empty message."""
  from imgcls_jax.errors import first_line
  long = ValueError('alpha beta gamma delta\nsecond line')
  assert first_line(long) == 'ValueError: alpha beta gamma delta'
  cut = first_line(OSError('word ' * 100), limit=23)
  assert cut == 'OSError: word word word word ...'
  assert first_line(KeyError()) == 'KeyError'
  assert first_line(RuntimeError('  \n')) == 'RuntimeError'


def test_a_folder_input_follows_links_below_it_once_each(tmp_path, caplog):
  """predict / embed inputs: a linked sub-folder is read (it was skipped), a second link to it and
  a link to a folder above (a loop) are passed over with one warning."""
  import logging
  from PIL import Image
  from imgcls_jax.data import images
  (tmp_path / 'in' / 'a').mkdir(parents=True)
  (tmp_path / 'more').mkdir()
  for k in range(2):
    Image.new('L', (4, 4)).save(tmp_path / 'in' / 'a' / f'{k}.png')
    Image.new('L', (4, 4)).save(tmp_path / 'more' / f'm{k}.png')
  os.symlink(tmp_path / 'more', tmp_path / 'in' / 'a' / 'linked')
  os.symlink(tmp_path / 'more', tmp_path / 'in' / 'again')
  os.symlink(tmp_path / 'in', tmp_path / 'in' / 'a' / 'loop')
  with caplog.at_level(logging.WARNING):
    got = images.list_inputs(str(tmp_path / 'in'))
  assert sorted(os.path.relpath(f, tmp_path / 'in') for f in got) == [   # the shallower link
      'a/0.png', 'a/1.png', 'again/m0.png', 'again/m1.png']
  assert 'passed over 2 link(s)' in caplog.text
  # Paths keep the folder as it was given (predict's output names them): './in/a/0.png'.
  (tmp_path / 'in' / '.thumbs').mkdir()
  Image.new('L', (4, 4)).save(tmp_path / 'in' / '.thumbs' / 'hidden.png')
  here = os.getcwd()
  try:
    os.chdir(tmp_path)
    assert images.list_inputs('./in/')[:2] == ['./in/a/0.png', './in/a/1.png']
    assert not any('.thumbs' in f for f in images.list_inputs('./in/'))   # hidden folders: not
  finally:
    os.chdir(here)
