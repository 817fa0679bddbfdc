"""What an evaluation report must say before its figures: examples the model trained on (the
training split, copies of training images), a 'best' checkpoint picked on the split it is scored
on, files of the split passed over (unreadable, ...); and where it refuses to write."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import evaluate, label_issues, report_text, train
from imgcls_jax.data import digits
from imgcls_jax.errors import UserError

CLASSES = (0, 1, 7)


def _digits_folder(root, split, per_class, skip=0, classes=CLASSES):
  """root/<digit>/<k>.png: ``per_class`` of sklearn's ``split`` digits of each class (after the
  first ``skip``); returns their paths."""
  x, y = digits.load_arrays(split)
  paths = []
  for c in classes:
    os.makedirs(os.path.join(root, str(c)), exist_ok=True)
    for k, i in enumerate(np.flatnonzero(y == c)[skip:skip + per_class]):
      paths.append(os.path.join(root, str(c), f'{k}.png'))
      Image.fromarray(x[i, :, :, 0]).save(paths[-1])
  return paths


@pytest.fixture(scope='module')
def run(tmp_path_factory, tfds_dir):
  """An image-folder run (3 digits, 30 training images each) evaluated on its test split and
  checkpointed at steps 20 and 40: 'best' picks between two checkpoints scored on 'test'."""
  from tests.conftest import small_digits_config
  tmp = tmp_path_factory.mktemp('notes')
  data = str(tmp / 'data')
  train_files = _digits_folder(os.path.join(data, 'train'), 'train', 30)
  _digits_folder(os.path.join(data, 'test'), 'test', 10)
  c = small_digits_config(tfds_dir)
  c.data.name, c.data.folder = 'image_folder', data
  c.data.train_split, c.data.eval_split = 'train', 'test'
  c.data.train_preprocess = c.data.eval_preprocess = ''
  c.data.mean, c.data.std = (0.3,), (0.4,)
  c.eval_every_steps = c.checkpoint_every_steps = 20
  workdir = str(tmp / 'run')
  train.train_and_evaluate(c, workdir)
  return workdir, data, train_files, tmp


def _md_head(out):
  """report.md above its first section: the title, the notes and the context."""
  return open(os.path.join(out, 'report.md')).read().split('## Summary')[0]


def test_a_report_on_the_training_split_says_the_model_learnt_those_examples(run, caplog,
                                                                            capsys):
  """Was: accuracy 'on test' of the training split with no word of it (only an info line on the
  skipped label-issue search); the defaults also scored a 'best' checkpoint picked on that very
  split with no note."""
  workdir, data, train_files, tmp = run
  out = str(tmp / 'on_train')
  with caplog.at_level(logging.WARNING):
    rep = evaluate.evaluate(None, workdir, {'evaluate.split': 'train',
                                            'evaluate.output_dir': out})
  assert rep['num_examples'] == len(train_files) == 90   # the files written, counted apart
  assert rep['trained_on_split'] == 90
  saved = json.load(open(os.path.join(out, 'report.json')))
  assert saved['trained_on_split'] == 90 and 'tuned_on_split' not in saved  # picked on 'test'
  assert '> **Note:** The model trained on 90 of these 90 examples' in _md_head(out)
  assert "The model trained on 90 of the 90 examples of split 'train'" in caplog.text
  assert capsys.readouterr().out.splitlines()[1].startswith('  Note: The model trained on 90')

  # Its test split with the defaults: 'best' of the two checkpoints was picked on 'test'.
  caplog.clear()
  out = str(tmp / 'on_test')
  with caplog.at_level(logging.WARNING):
    rep = evaluate.evaluate(None, workdir, {'evaluate.output_dir': out})
  assert rep['trained_on_split'] == 0 and rep['tuned_on_split'] == ['checkpoint']
  head = _md_head(out)
  assert "the 'best' checkpoint was picked on this split" in head and 'trained on' not in head
  assert "Split 'test' is the one the 'best' checkpoint" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):   # the latest: nothing picked (and the same folder)
    rep = evaluate.evaluate(None, workdir, {'evaluate.output_dir': out,
                                            'evaluate.checkpoint': 'latest'})
  assert 'tuned_on_split' not in rep and '**Note:**' not in _md_head(out)
  assert "'best' checkpoint" not in caplog.text


def test_copies_of_training_images_and_unreadable_files_are_in_the_report(run):
  """Was: report.json counted the copies, report.md said nothing of them and called the split one
  'it did not train on'; unreadable files of the folder left only a warning line."""
  workdir, _, train_files, tmp = run
  other = str(tmp / 'other')
  _digits_folder(other, 'test', 8, skip=10)
  for k, path in enumerate(train_files[::30]):   # one training image of each class, copied
    shutil.copy(path, os.path.join(other, os.path.basename(os.path.dirname(path)), f'c{k}.png'))
  with open(os.path.join(other, '1', 'broken.png'), 'wb') as f:
    f.write(open(train_files[0], 'rb').read()[:40])
  open(os.path.join(other, '7', 'empty.png'), 'wb').close()
  out = str(tmp / 'other_report')
  rep = evaluate.evaluate(None, workdir, {'data.folder': other, 'evaluate.output_dir': out})
  assert rep['num_examples'] == 3 * 8 + 3
  saved = json.load(open(os.path.join(out, 'report.json')))
  assert saved['copies_of_training_images'] == 3 and saved['trained_on_split'] == 0
  assert saved['skipped_files']['count'] == 2
  assert sorted(f['file'] for f in saved['skipped_files']['first']) == ['1/broken.png',
                                                                        '7/empty.png']
  head = _md_head(out)
  assert '3 of these 27 images hold the bytes of images the model trained on' in head
  assert "2 file(s) in this split's folders were passed over" in head and '1/broken.png' in head
  md = open(os.path.join(out, 'report.md')).read()
  assert 'which it did not train on' not in md
  assert saved['label_issues']['method'].endswith(
      'whose files it did not train on, though 3 of them hold the bytes of images it trained '
      'on (copies): their probabilities are of learnt images, which flag a copy labelled '
      'otherwise than in training but not a wrong label it was trained with')


def test_a_split_of_one_class_skips_the_label_issue_search_in_one_line(run, caplog):
  """Was: a WARNING quoting cleanlab's 'ValueError: Labels must contain at least 2 classes'."""
  workdir, _, _, tmp = run
  ones = str(tmp / 'ones')
  _digits_folder(ones, 'test', 6, classes=(1,))
  with caplog.at_level(logging.INFO):
    rep = evaluate.evaluate(None, workdir, {'data.folder': ones,
                                            'evaluate.output_dir': str(tmp / 'ones_report')})
  assert rep['num_examples'] == 6 and 'label_issues' not in rep
  assert ("No label-issue search on split 'all': all its examples are labelled 1, and confident "
          'learning needs examples of 2 classes or more.') in caplog.text
  assert 'label-issue search failed' not in caplog.text


def test_an_output_folder_of_the_users_files_or_in_the_data_is_refused_before_evaluating(run):
  """Was: --config.evaluate.output_dir=<the image folder evaluated> replaced the user's own
  report.md there and wrote the report's files among the images."""
  workdir, data, _, tmp = run
  p3 = str(tmp / 'p3')
  _digits_folder(p3, 'test', 4)
  (tmp / 'p3' / 'report.md').write_text('my notes')
  before = sorted(os.listdir(p3))
  for out in (p3, os.path.join(p3, 'reports')):
    with pytest.raises(UserError, match=r'config.evaluate.output_dir=.*p3.* is (inside )?'
                                        r'config.data.folder=.*the images being evaluated.*'
                                        'a folder outside it'):
      evaluate.evaluate(None, workdir, {'data.folder': p3, 'evaluate.output_dir': out})
  with pytest.raises(UserError, match='inside config.data.folder'):   # the run's own folder
    evaluate.evaluate(None, workdir, {'evaluate.output_dir': os.path.join(data, 'test')})
  assert sorted(os.listdir(p3)) == before and (tmp / 'p3' / 'report.md').read_text() == 'my notes'
  # A folder of the user's files, one named as a report file: refused, nothing written.
  mine = tmp / 'mine'
  mine.mkdir()
  (mine / 'confusion_matrix.csv').write_text('mine')
  with pytest.raises(UserError, match=r'holds confusion_matrix.csv, which no earlier report '
                                      'wrote and this one would overwrite'):
    evaluate.evaluate(None, workdir, {'evaluate.output_dir': str(mine)})
  assert os.listdir(mine) == ['confusion_matrix.csv']
  # An evaluation interrupted after its label-issue files, before the report.json that lists
  # them: the rerun takes them as its own (a CSV with the label-issue header), another is refused.
  from imgcls_jax import label_issues, report_files
  names = set(report_files.REPORT_FILES) | set(report_files.ISSUE_FILES)
  cut = tmp / 'cut'
  cut.mkdir()
  (cut / 'label_issues.csv').write_text(','.join(label_issues.EVAL_COLUMNS) + '\n')
  (cut / 'label_issues.png').write_bytes(b'png')
  report_files.check_output(str(cut), None, names)
  (cut / 'label_issues.csv').write_text('my,own,table\n')
  with pytest.raises(UserError, match='holds label_issues.csv, label_issues.png, which no'):
    report_files.check_output(str(cut), None, names)


def test_notes_and_label_issue_ids_as_text():
  """report.md's notes sit right below the title; an arrays split's label issues (no ids) show
  '-' for the id as errors.csv's table does, not an empty code span."""
  rep = {'num_examples': 50, 'trained_on_split': 5, 'copies_of_training_images': 2,
         'tuned_on_split': ['checkpoint', 'temperature'],
         'skipped_files': {'count': 5, 'first': [{'file': f'{k}.png', 'why': 'cannot be decoded'}
                                                 for k in range(5)]}}
  notes = report_text.notes(rep)
  assert len(notes) == 4 and notes[0].startswith('The model trained on 5 of these 50 examples')
  assert "the run's temperature was fitted on this split" in notes[2]
  assert notes[3].endswith('0.png (cannot be decoded); 1.png (cannot be decoded); 2.png (cannot '
                           'be decoded); and 2 more (report.json: skipped_files).')
  md = report_text.with_notes('# Title\n\n- split: test\n', rep)
  assert md.startswith('# Title\n\n> **Note:** The model trained on 5')
  assert md.endswith('\n\n- split: test\n')
  assert report_text.with_notes('# T\n', {'num_examples': 3, 'trained_on_split': 0}) == '# T\n'
  found = [{'rank': 1, 'position': 7, 'id': '', 'label': 'a', 'suggested': 'b', 'p_label': 0.1,
            'p_suggested': 0.9}]
  md = label_issues.markdown(label_issues.summary(found, 10, 'test', evaluation=True))
  assert md[-1] == '| 1 | - | 7 | a | b | 0.100 | 0.900 |'
  found[0]['id'] = 'train/a.png'
  md = label_issues.markdown(label_issues.summary(found, 10, 'test', evaluation=True))
  assert md[-1].startswith('| 1 | `train/a.png` | 7 |')
