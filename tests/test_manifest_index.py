"""CSV manifests as image indexes: with and without a split column, encodings (UTF-8 only, UTF-16
named), one image never in two splits, Windows paths."""
import logging
import os
import re

import pytest

from imgcls_jax.data import folder_index, pipeline, sources
from imgcls_jax.errors import UserError
from tests.test_folder_index import (_data, _flat, _fresh, _png,  # noqa: F401  (_fresh: autouse)
                                     _split)


def test_manifest_with_and_without_a_split_column(tmp_path, digits_config, caplog):
  root = tmp_path / 'photos'
  rows = []
  for k in range(6):
    rows.append((os.path.relpath(_png(f'{root}/a/x{k}.png', k), tmp_path), 'zebra'))
    rows.append((os.path.relpath(_png(f'{root}/b/y{k}.jpg', 10 + k), tmp_path), 'aardvark'))
  rows.append(('photos/missing.png', 'zebra'))
  manifest = tmp_path / 'labels.csv'
  manifest.write_text('path,label\n' + ''.join(f'{p},{c}\n' for p, c in rows))
  data = _data(digits_config, manifest=str(manifest), holdout_fraction=0.5)
  with caplog.at_level(logging.WARNING):
    info = sources.describe(data)
  assert info.class_names == ('aardvark', 'zebra')   # sorted class names
  assert info.num_examples == {'train': 6, 'test': 6}
  assert 'photos/missing.png (file not found)' in caplog.text
  test = _split(data, 'test')
  assert all(('zebra' if i.startswith('photos/a/') else 'aardvark') == info.class_names[y]
             for i, y in zip(test.ids, test.labels))

  # A split column instead of the hold-out; numeric labels sort as numbers.
  split_csv = tmp_path / 'split.csv'
  split_csv.write_text(''.join(f'{p},{10 if c == "zebra" else 9},{"val" if k % 3 == 0 else "tr"}\n'
                               for k, (p, c) in enumerate(rows[:-1])))
  data = _data(digits_config, manifest=str(split_csv), holdout_fraction=0.0, train_split='tr',
               eval_split='val')
  folder_index.clear_memo()
  info = sources.describe(data)
  assert info.class_names == ('9', '10') and info.num_examples == {'tr': 8, 'val': 4}
  batches = list(pipeline.EvalData(data, 'val', local_batch_size=8).batches())
  assert batches[0]['mask'].sum() == 4 and batches[0]['image'].shape == (8, 8, 8, 3)

  bad = tmp_path / 'bad.csv'
  bad.write_text('path,label\nphotos/a/x0.png,zebra\nphotos/a/x1.png\n')
  data = _data(digits_config, manifest=str(bad), train_split='train', eval_split='test')
  with pytest.raises(UserError, match='Line 3 of the manifest .* is not path,label'):
    sources.describe(data)


def test_a_manifest_that_is_not_utf8_text_is_a_user_error(tmp_path, digits_config):
  manifest = tmp_path / 'm.csv'
  manifest.write_text('path,label\ncaf\xe9.png,a\n', encoding='latin-1')
  data = _data(digits_config, manifest=str(manifest))
  with pytest.raises(UserError, match=f'^The manifest {re.escape(str(manifest))} is not UTF-8 '
                     r"text \(byte 14: b'\\xe9'\); save it as a UTF-8 CSV of path,label rows\.$"):
    sources.describe(data)


@pytest.mark.parametrize('encoding', ['utf-16', 'utf-16-le', 'utf-16-be'])
def test_a_utf16_manifest_is_named_as_utf16(tmp_path, digits_config, encoding):
  """Excel's "Unicode Text" and Notepad's "Unicode" save UTF-16 with a byte-order mark; the error
  says so instead of pointing at a meaningless byte."""
  manifest = tmp_path / 'm.csv'
  bom = '' if encoding == 'utf-16' else '\ufeff'  # 'utf-16' writes its own, in native order
  manifest.write_text(bom + 'path,label\na.png,cat\n', encoding=encoding)
  assert manifest.read_bytes()[:2] in (b'\xff\xfe', b'\xfe\xff')
  data = _data(digits_config, manifest=str(manifest))
  with pytest.raises(UserError, match=f'^The manifest {re.escape(str(manifest))} is UTF-16 text; '
                     r'save it as a UTF-8 CSV of path,label rows \(in Excel: Save As '
                     r'"CSV UTF-8"\)\.$'):
    sources.describe(data)


def test_a_manifest_never_puts_one_image_in_two_splits(tmp_path, digits_config, caplog):
  rows = [(os.path.relpath(_png(f'{tmp_path}/p/{c}/{k}.png', k), tmp_path), c)
          for c in ('cat', 'dog') for k in range(4)]
  csv = tmp_path / 'm.csv'
  body = ''.join(f'{p},{c},{"test" if k % 4 == 0 else "train"}\n'
                 for k, (p, c) in enumerate(rows))
  csv.write_text('path,label,split\n' + body + f'{rows[0][0]},{rows[0][1]},train\n')   # leak
  data = _data(digits_config, manifest=str(csv), holdout_fraction=0.0)
  with pytest.raises(UserError, match=r"^1 image\(s\) of the manifest .* are listed in two splits "
                     r"\(e\.g\. p/cat/0\.png: 'test' and 'train'\)"):
    sources.describe(data)
  # The same file written another way (absolute, ./) is the same image.
  csv.write_text('path,label,split\n' + body + f'{tmp_path}/./{rows[4][0]},{rows[4][1]},train\n')
  folder_index.clear_memo()
  with pytest.raises(UserError, match=r"listed in two splits \(e\.g\. .*p/dog/0\.png: 'test' and "
                     r"'train'\)"):
    sources.describe(data)
  # ... and within one split it is read once, the second listing reported.
  csv.write_text('path,label,split\n' + body + f'{tmp_path}/{rows[1][0]},{rows[1][1]},train\n')
  folder_index.clear_memo()
  with caplog.at_level(logging.WARNING):
    info = sources.describe(data)
  assert info.num_examples == {'train': 6, 'test': 2}
  assert '(listed twice)' in caplog.text
  # Rows of a split that differs from train_split only in case are named, not silently dropped.
  csv.write_text('path,label,split\n' + body.replace(',train\n', ',Train\n', 2))
  folder_index.clear_memo()
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    info = sources.describe(data)
  assert info.num_examples == {'train': 4, 'test': 2}
  assert "has 2 row(s) of split 'Train', which is not split 'train'" in caplog.text
  # A header without rows is one sentence, also where only the split column is asked for.
  for header in ('path,label\n', 'path,label,split\n'):
    csv.write_text(header)
    folder_index.clear_memo()
    with pytest.raises(UserError, match=r'^The manifest .* has a header but no rows'):
      sources.describe(data)


def test_windows_paths_in_a_manifest_are_read_with_a_warning(tmp_path, digits_config, caplog):
  for c in ('1', '2'):
    for k in range(2):
      _png(f'{tmp_path}/folder/{c}/{k}.png', k)
  csv = tmp_path / 'm.csv'
  csv.write_text(''.join(f'folder\\{c}\\{k}.png,{c}\n' for c in ('1', '2') for k in range(2)))
  data = _data(digits_config, manifest=str(csv), holdout_fraction=0.5)
  with caplog.at_level(logging.WARNING):
    every = _split(data, 'all')
  assert sorted(every.ids) == ['folder/1/0.png', 'folder/1/1.png', 'folder/2/0.png',
                               'folder/2/1.png']
  said = [r.getMessage() for r in caplog.records if 'folder separator' in r.getMessage()]
  assert said == [f"The manifest {csv} writes 4 path(s) with '\\' as the folder separator (e.g. "
                  "folder\\1\\0.png), read as folder/1/0.png; write paths with '/', which every "
                  'system reads.']
