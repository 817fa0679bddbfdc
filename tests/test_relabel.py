"""Applying a label-issue list to a manifest (imgcls_jax/relabel.py): the chosen rows get the
suggested labels, everything else is copied, and the pipeline reads the copy."""
from __future__ import annotations

import csv
import os

import pytest
from PIL import Image

from imgcls_jax import label_issues, relabel
from imgcls_jax.data import digits, folder_index, folder_layout
from imgcls_jax.errors import UserError


def _manifest(root, labels, header=('path', 'label', 'split'), extra=False):
  """root/img/<i>.png (sklearn digits) and root/labels.csv with ``labels``; returns its path."""
  x = digits.load_arrays('train')[0]
  os.makedirs(os.path.join(root, 'img'), exist_ok=True)
  rows = [list(header) + (['note'] if extra else [])]
  for i, label in enumerate(labels):
    Image.fromarray(x[i, :, :, 0]).save(os.path.join(root, f'img/{i}.png'))
    rows.append([f'img/{i}.png', label, 'train'] + ([f'n{i}'] if extra else []))
  path = os.path.join(root, 'labels.csv')
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows(rows)
  return path


def _issues(path, rows, columns):
  label_issues.write_csv(rows, path, columns)
  return path


def test_the_chosen_rows_get_the_suggested_label_and_the_rest_is_copied(tmp_path, capsys,
                                                                         digits_config):
  labels = [str(i % 3) for i in range(12)]
  manifest = _manifest(str(tmp_path / 'd'), labels, extra=True)
  rows = [{'rank': 1, 'id': 'img/4.png', 'fold': 0, 'label': '1', 'suggested': '2',
           'p_label': 0.01, 'p_suggested': 0.98},
          {'rank': 2, 'id': 'img/7.png', 'fold': 1, 'label': '0', 'suggested': '1',   # stale
           'p_label': 0.02, 'p_suggested': 0.97},
          {'rank': 3, 'id': 'img/nope.png', 'fold': 1, 'label': '0', 'suggested': '1',
           'p_label': 0.03, 'p_suggested': 0.9},
          {'rank': 4, 'id': 'img/9.png', 'fold': 2, 'label': '0', 'suggested': '2',
           'p_label': 0.1, 'p_suggested': 0.8},
          {'rank': 5, 'id': 'img/3.png', 'fold': 2, 'label': '0', 'suggested': '1',
           'p_label': 0.2, 'p_suggested': 0.7}]
  issues = _issues(str(tmp_path / 'cv_label_issues.csv'), rows, label_issues.COLUMNS)
  assert relabel.main([f'--issues={issues}', f'--manifest={manifest}', '--ranks=1-4']) == 0
  out = manifest[:-4] + '.relabelled.csv'
  printed = capsys.readouterr().out
  assert f'Relabelled 2 of the 4 chosen images (2 left alone): {out}' in printed
  assert "rank 2 (img/7.png) left alone: labelled '1' in the manifest, not '0' as listed" in printed
  assert 'rank 3 (img/nope.png) left alone: not in the manifest' in printed
  with open(out, newline='') as f:
    got = list(csv.reader(f))
  expected = [['path', 'label', 'split', 'note']] + [
      [f'img/{i}.png', {4: '2', 9: '2'}.get(i, labels[i]), 'train', f'n{i}'] for i in range(12)]
  assert got == expected   # rank 5 was not chosen; the header and the extra column are kept
  # The pipeline reads the copy: its labels are the new ones.
  digits_config.data.name, digits_config.data.manifest = 'image_folder', out
  ids, classes = folder_index.listed(folder_layout.source_of(digits_config.data), 'train',
                                     ('0', '1', '2'))
  assert dict(zip(ids, classes))['img/4.png'] == 2 and dict(zip(ids, classes))['img/3.png'] == 0


def test_a_tagging_list_elsewhere_rewrites_the_paths(tmp_path):
  manifest = _manifest(str(tmp_path / 'd'), ['a;b', 'b', '', 'a', 'c;a'],
                       header=('path', 'labels', 'split'))
  rows = [{'rank': 1, 'position': 2, 'id': 'img/2.png', 'tags': '', 'suggested': 'c',
           'missing': 'c', 'extra': '', 'quality': 0.01},
          {'rank': 2, 'position': 4, 'id': 'img/4.png', 'tags': 'a;c', 'suggested': 'a',
           'missing': '', 'extra': 'c', 'quality': 0.02}]
  issues = _issues(str(tmp_path / 'label_issues.csv'), rows, label_issues.EVAL_TAG_COLUMNS)
  out = str(tmp_path / 'elsewhere' / 'fixed.csv')
  done = relabel.relabel(issues, manifest, 'all', out)
  assert [r[0] for r in done['relabelled']] == ['1', '2'] and not done['skipped']
  with open(out, newline='') as f:
    got = list(csv.reader(f))
  assert [r[1] for r in got[1:]] == ['a;b', 'b', 'c', 'a', 'a']
  for r in got[1:]:   # relative to the copy's folder, and they name the same files
    assert r[0] == os.path.join('..', 'd', 'img', os.path.basename(r[0]))
    assert os.path.exists(os.path.join(tmp_path / 'elsewhere', r[0]))


@pytest.mark.parametrize('spec, message', [
    ('7', r"the list has no row of rank 7 \(its ranks: 1-3\)"),
    ('5-9', r"the list has no row of ranks 5-9 \(its ranks: 1-3\)"),
    ('x', r"'x' is not a rank or a range of ranks; write e.g. 1-200"),
    ('1-', r"'1-' is not a rank or a range of ranks"),
    ('3-1', r"'3-1' runs backwards; write the lower rank first"),
    (',', r'--ranks is empty'),
])
def test_bad_ranks_are_one_line(spec, message):
  with pytest.raises(UserError, match=message):
    relabel.parse_ranks(spec, [1, 2, 3])


def test_ranks_are_the_lists_own():
  assert relabel.parse_ranks('3,1-2,2', [1, 2, 3]) == [1, 2, 3]
  assert relabel.parse_ranks('ALL', [1, 2]) == [1, 2]
  assert relabel.parse_ranks('2-9', [1, 2, 3]) == [2, 3]   # a range takes the ranks it spans
  assert relabel.parse_ranks('all', [1, 3]) == relabel.parse_ranks('1-3', [1, 3]) == [1, 3]
  with pytest.raises(UserError, match='no row of rank 2 '):   # rows deleted from the list
    relabel.parse_ranks('2', [1, 3])


def test_bad_inputs_are_one_line(tmp_path, capsys):
  manifest = _manifest(str(tmp_path / 'd'), ['0', '1'])
  with pytest.raises(UserError, match='Cannot read the label-issue list'):
    relabel.relabel(str(tmp_path / 'none.csv'), manifest, 'all')
  (tmp_path / 'other.csv').write_text('a,b\n1,2\n')
  with pytest.raises(UserError, match=r'is not a label-issue list \(it lacks the column\(s\) '
                                      r'id, label, rank, suggested\)'):
    relabel.relabel(str(tmp_path / 'other.csv'), manifest, 'all')
  issues = _issues(str(tmp_path / 'i.csv'), [{'rank': 1, 'position': 0, 'id': '', 'label': '0',
                                              'suggested': '1', 'p_label': 0.1,
                                              'p_suggested': 0.9}], label_issues.EVAL_COLUMNS)
  with pytest.raises(UserError, match='names its examples by position only'):
    relabel.relabel(issues, manifest, 'all')
  issues = _issues(str(tmp_path / 'j.csv'), [{'rank': 1, 'position': 0, 'id': 'img/0.png',
                                              'label': '0', 'suggested': '1', 'p_label': 0.1,
                                              'p_suggested': 0.9}], label_issues.EVAL_COLUMNS)
  with pytest.raises(UserError, match='--out is an input'):
    relabel.relabel(issues, manifest, 'all', manifest)
  assert relabel.main([f'--issues={issues}', f'--manifest={manifest}', '--ranks=5']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["Error: --ranks='5': the list has no row of rank 5 (its ranks: 1-1); choose "
                 'ranks the list has.']
  with open(manifest) as f:
    before = f.read()
  relabel.relabel(issues, manifest, '1')
  with open(manifest) as f:
    assert f.read() == before   # the manifest itself is never written


def _folder_listing(data, split, names, root):
  """{absolute path: class} of a split as the pipeline lists it (the oracle for the copies)."""
  ids, labels = folder_index.listed(folder_layout.source_of(data), split, names)
  return {os.path.normpath(os.path.join(root, i)): names[k] for i, k in zip(ids, labels)}


@pytest.mark.parametrize('with_splits', [True, False])
def test_an_image_folder_becomes_a_relabelled_manifest(tmp_path, digits_config, with_splits):
  """--folder: a manifest of every file of the folder, each labelled by its class directory but
  the chosen rows; read by the pipeline, it lists the folder's splits exactly as the folder
  layout does, but for the relabelled images."""
  from tests.test_classical import digits_folder
  root = str(tmp_path / 'photos')
  if with_splits:
    digits_folder(root)                            # photos/{train,test}/{0,1,7}/*.png
    split, first = 'train', 'train/1/3.png'
  else:
    digits_folder(str(tmp_path / 'tmp'), bad_file=False)
    os.rename(str(tmp_path / 'tmp' / 'train'), root)   # photos/{0,1,7}/*.png
    split, first = 'all', '1/3.png'
  rows = [{'rank': 1, 'id': first, 'fold': 0, 'label': '1', 'suggested': '7', 'p_label': 0.01,
           'p_suggested': 0.98},
          {'rank': 2, 'id': first.replace('1/3', '0/2'), 'fold': 0, 'label': '0',
           'suggested': '1', 'p_label': 0.02, 'p_suggested': 0.9}]
  issues = _issues(str(tmp_path / 'cv_label_issues.csv'), rows, label_issues.COLUMNS)
  assert relabel.main([f'--issues={issues}', f'--folder={root}', '--ranks=1']) == 0
  out = root + '.relabelled.csv'
  names = ('0', '1', '7')
  c = digits_config
  c.data.name, c.data.train_split, c.data.eval_split = 'image_folder', split, split
  c.data.folder = root
  want = _folder_listing(c.data, split, names, root)
  want[os.path.join(root, first)] = '7'
  c.data.folder, c.data.manifest = '', out
  assert _folder_listing(c.data, split, names, os.path.dirname(out)) == want
  if with_splits:   # the other split too, unchanged
    c.data.folder, c.data.manifest = root, ''
    test = _folder_listing(c.data, 'test', names, root)
    c.data.folder, c.data.manifest = '', out
    assert _folder_listing(c.data, 'test', names, os.path.dirname(out)) == test
  with pytest.raises(UserError, match='The image folder .*nowhere does not exist'):
    relabel.relabel(issues, '', 'all', folder=str(tmp_path / 'nowhere'))
  odd = _issues(str(tmp_path / 'odd.csv'), [{**rows[0], 'id': 'x/3.png'}], label_issues.COLUMNS)
  with pytest.raises(UserError, match="do not name their label's class directory"):
    relabel.relabel(odd, '', 'all', folder=root)
  with pytest.raises(UserError, match=r'Give the manifest \(--manifest\) or the image folder'):
    relabel.relabel(issues, out, 'all', folder=root)


def _raw(path, text):
  with open(path, 'w', newline='') as f:
    f.write(text)
  return str(path)


def test_the_row_the_pipeline_reads_is_the_one_relabelled(tmp_path):
  """Duplicate rows (the pipeline reads the first), the same image in two splits (ambiguous: left
  alone), a blank line before the header; a tagging cell keeps its order, the added tags last."""
  row = {'fold': 0, 'p_label': 0.1, 'p_suggested': 0.9}
  issues = _issues(str(tmp_path / 'i.csv'), [
      {'rank': 1, 'id': 'a.png', 'label': 'cat', 'suggested': 'dog', **row},
      {'rank': 2, 'id': 'b.png', 'label': 'cat', 'suggested': 'dog', **row}], label_issues.COLUMNS)
  manifest = _raw(tmp_path / 'm.csv', '\npath,label,split\na.png,cat,train\nc.png,dog,train\n'
                  'a.png,cat,train\nb.png,cat,train\nb.png,cat,test\n')
  done = relabel.relabel(issues, manifest, 'all', str(tmp_path / 'out' / 'x.csv'))
  assert done['skipped'] == [('2', 'b.png', 'in more than one split of the manifest (test, '
                                           'train); fix it by hand')]
  with open(done['output'], newline='') as f:
    got = [r for r in csv.reader(f) if r]
  assert got == [['path', 'label', 'split'], ['../a.png', 'dog', 'train'],
                 ['../c.png', 'dog', 'train'], ['../a.png', 'cat', 'train'],
                 ['../b.png', 'cat', 'train'], ['../b.png', 'cat', 'test']]
  tags = _issues(str(tmp_path / 't.csv'), [
      {'rank': 1, 'id': 'a.png', 'tags': 'b;z', 'suggested': 'a;b', 'missing': 'a', 'extra': 'z',
       'quality': 0.1}], label_issues.TAG_COLUMNS)
  manifest = _raw(tmp_path / 'tags.csv', 'path,labels\na.png,z;b\nc.png,a\n')
  done = relabel.relabel(tags, manifest, 'all')
  with open(done['output'], newline='') as f:
    assert list(csv.reader(f))[1] == ['a.png', 'b;a']   # 'b' stays first, 'a' is added after


def test_more_bad_inputs_are_one_line(tmp_path):
  manifest = _raw(tmp_path / 'm.csv', 'path,label\na.png,cat\nb.png,dog\n')
  empty = _issues(str(tmp_path / 'empty.csv'), [], label_issues.COLUMNS)
  with pytest.raises(UserError, match=r'lists no label issue \(the search flagged nothing\)'):
    relabel.relabel(empty, manifest, 'all')
  issues = _issues(str(tmp_path / 'i.csv'), [{'rank': 1, 'id': 'a.png', 'fold': 0, 'label': 'cat',
                                              'suggested': 'dog', 'p_label': 0.1,
                                              'p_suggested': 0.9}], label_issues.COLUMNS)
  with pytest.raises(UserError, match=r'--out is an input'):
    relabel.relabel(issues, manifest, 'all', issues)
  (tmp_path / 'afile').write_text('x')
  with pytest.raises(UserError, match=r'Cannot write .*afile/x.csv \(.*\); choose another --out'):
    relabel.relabel(issues, manifest, 'all', str(tmp_path / 'afile' / 'x.csv'))
  (tmp_path / 'latin.csv').write_bytes('rank,id,fold,label,suggested\n1,\xe9.png,0,a,b\n'
                                       .encode('latin-1'))
  with pytest.raises(UserError, match=r'Cannot read the label-issue list .* \(not UTF-8 text\)'):
    relabel.relabel(str(tmp_path / 'latin.csv'), manifest, 'all')
  tags = _issues(str(tmp_path / 't.csv'), [
      {'rank': 1, 'id': 'cat/a.png', 'tags': 'cat', 'suggested': '', 'missing': '',
       'extra': 'cat', 'quality': 0.1}], label_issues.TAG_COLUMNS)
  os.makedirs(tmp_path / 'photos' / 'cat')
  with pytest.raises(UserError, match="A tagging run's list needs the manifest"):
    relabel.relabel(tags, '', 'all', folder=str(tmp_path / 'photos'))


def test_a_missing_manifest_or_a_directory_is_one_line(tmp_path, capsys):
  manifest = _manifest(str(tmp_path / 'd'), ['0', '1'])
  issues = _issues(str(tmp_path / 'i.csv'), [{'rank': 1, 'id': 'img/0.png', 'fold': 0,
                                              'label': '0', 'suggested': '1', 'p_label': 0.1,
                                              'p_suggested': 0.9}], label_issues.COLUMNS)
  missing, folder = str(tmp_path / 'nonexist.csv'), str(tmp_path / 'd')
  for given, why in ((missing, 'does not exist; give the CSV file of path,label rows the run read'),
                     (folder, 'is a directory; give the CSV file of path,label rows the run read')):
    assert relabel.main([f'--issues={issues}', f'--manifest={given}', '--ranks=all']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'Error: The manifest {given} {why}'), err
  with pytest.raises(UserError, match=r'The image folder .*labels.csv is a file; give the folder'):
    relabel.relabel(issues, '', 'all', folder=manifest)
  assert sorted(os.listdir(tmp_path / 'd')) == ['img', 'labels.csv']   # nothing written


def test_another_datasets_list_or_nothing_applied_writes_nothing(tmp_path, capsys):
  """A list of a tfds / arrays run (ids no manifest path matches) is refused in one line; a
  choice of rows none of which applies writes nothing, so an earlier copy is kept; many rows left
  alone for one reason are one line."""
  manifest = _manifest(str(tmp_path / 'd'), [str(i % 3) for i in range(8)])
  out = manifest[:-4] + '.relabelled.csv'
  good = _issues(str(tmp_path / 'good.csv'), [
      {'rank': 1, 'id': 'img/4.png', 'fold': 0, 'label': '1', 'suggested': '2', 'p_label': 0.01,
       'p_suggested': 0.98}], label_issues.COLUMNS)
  assert relabel.main([f'--issues={good}', f'--manifest={manifest}', '--ranks=all']) == 0
  with open(out) as f:
    earlier = f.read()
  assert 'img/4.png,2,train' in earlier
  capsys.readouterr()
  other = _issues(str(tmp_path / 'tfds.csv'), [
      {'rank': k + 1, 'id': f'sklearn_digits:train[{k}]', 'fold': 0, 'label': '0',
       'suggested': '1', 'p_label': 0.1, 'p_suggested': 0.9} for k in range(95)],
      label_issues.COLUMNS)
  assert relabel.main([f'--issues={other}', f'--manifest={manifest}', '--ranks=all']) == 2
  printed = capsys.readouterr()
  assert printed.out == '' and printed.err.strip().splitlines() == [
      f"Error: No row of the list {other} names an image of the manifest {manifest} (the list's "
      "ids look like 'sklearn_digits:train[0]', the manifest's paths like 'img/0.png'): the list "
      'is of another dataset; give the manifest the run that wrote it read.']
  with open(out) as f:
    assert f.read() == earlier   # the earlier copy is kept
  # Rows of this manifest, but none applicable: 5 not in it, 1 stale.
  rows = [{'rank': k + 1, 'id': f'img/{k + 20}.png', 'fold': 0, 'label': '0', 'suggested': '1',
           'p_label': 0.1, 'p_suggested': 0.9} for k in range(5)]
  rows += [{'rank': 6, 'id': 'img/6.png', 'fold': 0, 'label': '1', 'suggested': '2',
            'p_label': 0.1, 'p_suggested': 0.9},
           {'rank': 7, 'id': 'img/7.png', 'fold': 0, 'label': '1', 'suggested': '2',
            'p_label': 0.1, 'p_suggested': 0.9}]
  stale = _issues(str(tmp_path / 'stale.csv'), rows, label_issues.COLUMNS)
  assert relabel.main([f'--issues={stale}', f'--manifest={manifest}', '--ranks=1-6']) == 2
  printed = capsys.readouterr()
  assert printed.out.splitlines() == [
      '  5 rows left alone: not in the manifest (ranks 1 (img/20.png), 2 (img/21.png), '
      '3 (img/22.png), ...)',
      "  rank 6 (img/6.png) left alone: labelled '0' in the manifest, not '1' as listed"]
  assert printed.err.strip().splitlines() == [
      'Error: None of the 6 chosen row(s) could be applied (rank 1 (img/20.png): not in the '
      f'manifest; 5 more left alone), so nothing was written ({out} is kept as it was); choose '
      'rows the manifest still labels as the list does, or search again on this manifest.']
  with open(out) as f:
    assert f.read() == earlier
  with pytest.raises(relabel.NothingApplied, match=r'nothing was written;') as e:
    relabel.relabel(stale, manifest, '6', str(tmp_path / 'new.csv'))
  assert e.value.skipped == [('6', 'img/6.png', "labelled '0' in the manifest, not '1' as listed")]
  assert not os.path.exists(tmp_path / 'new.csv')
  # Applying one row with the others left alone still writes, the reasons summed up.
  assert relabel.main([f'--issues={stale}', f'--manifest={manifest}', '--ranks=all']) == 0
  assert capsys.readouterr().out.splitlines()[:3] == [
      '  5 rows left alone: not in the manifest (ranks 1 (img/20.png), 2 (img/21.png), '
      '3 (img/22.png), ...)',
      "  rank 6 (img/6.png) left alone: labelled '0' in the manifest, not '1' as listed",
      f'Relabelled 1 of the 7 chosen images (6 left alone): {out}']
