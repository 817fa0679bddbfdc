"""The on-disk index cache (``data.index_cache``, ``file_probe.probe_all``): one JSON file per
folder or manifest, shared by its splits; a restart probes only new or changed files, and the
cache forgets the files that are gone but keeps every split's others."""
import json
import os
import shutil

from imgcls_jax.data import file_probe, folder_index
from tests.test_folder_index import (_data, _flat, _fresh, _png,  # noqa: F401  (_fresh: autouse)
                                     _split)


def _count_probes(monkeypatch):
  """The paths ``probe`` is called on from now on (in this process: under ``_PARALLEL_FROM``)."""
  probed = []
  real = file_probe.probe
  monkeypatch.setattr(file_probe, 'probe', lambda p: probed.append(p) or real(p))
  return probed


def _cached(cache_dir):
  """The ids the only cache file in ``cache_dir`` lists, and that file's (inode, mtime)."""
  path, = (os.path.join(cache_dir, f) for f in os.listdir(cache_dir))
  st = os.stat(path)
  with open(path) as f:
    return set(json.load(f)['files']), (st.st_ino, st.st_mtime_ns)


def test_index_is_cached_and_only_changed_files_are_probed_again(tmp_path, digits_config,
                                                                  monkeypatch):
  root = _flat(str(tmp_path / 'flat'), {'a': 4, 'b': 4})
  data = _data(digits_config, folder=root, holdout_fraction=0.25,
               index_cache=str(tmp_path / 'cache'))
  probed = _count_probes(monkeypatch)
  first = _split(data, 'all')
  assert len(probed) == 8 and os.listdir(tmp_path / 'cache')
  folder_index.clear_memo()
  probed.clear()
  assert _split(data, 'all') == first and probed == []     # a restart reads the cache
  folder_index.clear_memo()
  _png(f'{root}/a/000.png', 99, size=(8, 5))                 # one file changes
  assert _split(data, 'all').sizes_found == {(8, 8), (5, 8)}
  assert probed == [f'{root}/a/000.png']
  folder_index.clear_memo()
  probed.clear()
  data.index_cache = 'off'
  _split(data, 'all')
  assert len(probed) == 8


def test_deleted_files_leave_the_cache_and_the_other_split_stays_cached(tmp_path, digits_config,
                                                                        monkeypatch):
  """The cache never forgot a deleted file, so it grew for ever for a folder whose files change.
  Train and test of one folder share the cache file: forgetting whatever one split did not list
  would drop the other split's files, and each split would probe the other's again every time."""
  root = _flat(str(tmp_path / 'flat'), {'a': 10, 'b': 10})
  cache = str(tmp_path / 'cache')
  data = _data(digits_config, folder=root, holdout_fraction=0.25, index_cache=cache)
  probed = _count_probes(monkeypatch)
  train, test = _split(data, 'train'), _split(data, 'test')
  every = set(train.ids + test.ids)
  assert len(probed) == 20 and _cached(cache)[0] == every
  gone = {train.ids[0], train.ids[1], test.ids[0]}
  for rel in gone:
    os.remove(os.path.join(root, rel))
  folder_index.clear_memo()
  probed.clear()
  train = _split(data, 'train')          # the new draw moves files between the splits: all cached
  assert _cached(cache)[0] == every - gone   # the test split's deleted file goes too
  test = _split(data, 'test')
  assert probed == [] and sorted(train.ids + test.ids) == sorted(every - gone)
  # A folder that did not change: neither split writes the cache file again, nor probes a file.
  before = _cached(cache)
  folder_index.clear_memo()
  _split(data, 'test')
  _split(data, 'train')
  assert probed == [] and _cached(cache) == before


def test_a_deleted_split_folder_and_a_manifest_row_s_deleted_file_leave_the_cache(
    tmp_path, digits_config, monkeypatch):
  splits = str(tmp_path / 'splits')
  for split in ('train', 'test'):
    _flat(f'{splits}/{split}', {'ant': 3, 'bee': 3})
  cache = str(tmp_path / 'cache')
  data = _data(digits_config, folder=splits, holdout_fraction=0.0, index_cache=cache)
  probed = _count_probes(monkeypatch)
  _split(data, 'train')
  _split(data, 'test')
  assert len(probed) == 12 and len(_cached(cache)[0]) == 12
  shutil.rmtree(f'{splits}/test/bee')    # a whole folder of the other split goes
  folder_index.clear_memo()
  probed.clear()
  _split(data, 'train')
  assert probed == [] and _cached(cache)[0] == {f'{s}/{c}/{k:03d}.png' for s, c in (
      ('train', 'ant'), ('train', 'bee'), ('test', 'ant')) for k in range(3)}
  # A manifest row whose file is gone: 'file not found', and out of the cache.
  csv = tmp_path / 'm.csv'
  csv.write_text(''.join(f'splits/train/{c}/{k:03d}.png,{c}\n' for c in ('ant', 'bee')
                         for k in range(3)))
  data = _data(digits_config, folder=None, manifest=str(csv), holdout_fraction=0.0,
               train_split='all', eval_split='all', index_cache=str(tmp_path / 'cache2'))
  assert len(_split(data, 'all')) == 6
  os.remove(f'{splits}/train/bee/001.png')
  folder_index.clear_memo()
  probed.clear()
  every = _split(data, 'all')
  assert ('splits/train/bee/001.png', 'file not found') in every.skipped and probed == []
  assert _cached(str(tmp_path / 'cache2'))[0] == set(every.ids) and len(every) == 5
