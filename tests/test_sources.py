"""tfds splits as config values: slices that select nothing or do not parse are one-sentence user
errors naming the config key, before any reading; valid slices still read. Of the datasets tfds
prepares, one whose download host cannot be reached fails in seconds, one whose host can still
downloads, and one of a single class is refused. (Also: the test session's temporary directories,
made by tests/conftest.py, are removed by the process that made them.)"""
import hashlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader as tfds_downloader

from imgcls_jax.data import sources
from imgcls_jax.errors import UserError
from tests.conftest import REPO, subprocess_env


@pytest.mark.parametrize('key, split, match', [
    ('eval_split', 'test[:0]', r"config.data.eval_split='test\[:0\]' selects no examples"),
    ('train_split', 'train[:0]', r"config.data.train_split='train\[:0\]' selects no examples"),
    ('train_split', 'train[10:5]', r"config.data.train_split='train\[10:5\]' selects no examples"),
    ('eval_split', 'test[abc]', r"config.data.eval_split='test\[abc\]' is not a valid split"),
    ('eval_split', 'test+nope', r"config.data.eval_split='test\+nope' is not a valid split"),
    ('eval_split', 'validation', "Split 'validation' does not exist in dataset 'sklearn_digits'; "
                                 'set config.data.eval_split to one of its splits: test, train'),
])
def test_empty_or_malformed_split_slices_name_the_config_key(digits_config, key, split, match):
  setattr(digits_config.data, key, split)
  with pytest.raises(UserError, match=match):
    sources.describe(digits_config.data)
  with pytest.raises(UserError, match=match):
    sources.read(digits_config.data, split, 0, 1, drop_remainder=False)


def test_another_split_that_selects_nothing_is_named_as_given(digits_config):
  # e.g. --config.evaluate.split='test[:0]': neither data split, so the split itself is named.
  with pytest.raises(UserError, match=r"Split 'test\[:0\]' selects no examples of dataset "
                                      r"'sklearn_digits' \(test has 450, train has 1347\)"):
    sources.read(digits_config.data, 'test[:0]', 0, 1, drop_remainder=False)
  digits_config.data.eval_split = 'test[:10%]+train[:0]'
  assert sources.describe(digits_config.data).num_examples['test[:10%]+train[:0]'] == 45
  ds = sources.read(digits_config.data, 'test[:10%]+train[:0]', 0, 1, drop_remainder=False)
  assert sources.count(ds) == 45


# ---- datasets tfds must prepare: downloads, and what a dataset must hold ----

class ImgclsTestDownloaded(tfds.core.GeneratorBasedBuilder):
  """Four 2x2 images whose labels are the bytes of the one file at the URL of ``url_infos`` (a
  test sets it: tfds reads a builder's registered URLs, size, sha256 and file name from there)."""

  VERSION = tfds.core.Version('1.0.0')
  url_infos: dict = {}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(2, 2, 1)),
        'label': tfds.features.ClassLabel(names=['a', 'b'])}), supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    path = dl_manager.download(next(iter(self.url_infos)))
    labels = list(path.read_bytes())
    return {'train': self._generate_examples(labels), 'test': self._generate_examples(labels)}

  def _generate_examples(self, labels):
    for i, y in enumerate(labels):
      yield i, {'image': np.full((2, 2, 1), i, np.uint8), 'label': y}


class ImgclsTestOneClass(tfds.core.GeneratorBasedBuilder):
  """Two 2x2 images, both of the one class 'cat'."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(2, 2, 1)),
        'label': tfds.features.ClassLabel(names=['cat'])}), supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(), 'test': self._generate_examples()}

  def _generate_examples(self):
    for i in range(2):
      yield i, {'image': np.zeros((2, 2, 1), np.uint8), 'label': 0}


PAYLOAD = bytes([0, 1, 1, 0])   # the labels ImgclsTestDownloaded's file holds


def _serve_payload(url: str, monkeypatch) -> None:
  """Registers ``url`` (and PAYLOAD's size and sha256) as ImgclsTestDownloaded's download."""
  url_info = tfds.core.download.checksums.UrlInfo(
      size=tfds.core.utils.Size(len(PAYLOAD)), checksum=hashlib.sha256(PAYLOAD).hexdigest(),
      filename='labels.bin')
  monkeypatch.setattr(ImgclsTestDownloaded, 'url_infos', {url: url_info})
  for proxy in ('http_proxy', 'https_proxy', 'all_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY'):
    monkeypatch.delenv(proxy, raising=False)   # 127.0.0.1 directly, as the test means


def _closed_port() -> int:
  """A local TCP port nothing listens on (connecting to it is refused at once)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_a_download_that_cannot_reach_its_host_fails_in_seconds(digits_config, tmp_path,
                                                                monkeypatch):
  # Offline, tfds retries each download 10 times with backoff (~3.5 minutes) before failing.
  port = _closed_port()
  _serve_payload(f'http://127.0.0.1:{port}/labels.bin', monkeypatch)
  digits_config.data.name, digits_config.data.data_dir = 'imgcls_test_downloaded', str(tmp_path)
  retries, start = tfds_downloader.MAX_RETRIES, time.monotonic()
  with pytest.raises(UserError, match=re.escape(
      f"Dataset 'imgcls_test_downloaded' is not prepared in {tmp_path}/imgcls_test_downloaded/"
      f'1.0.0 and must be downloaded, but 127.0.0.1:{port} (') + r'\[Errno \d+\] Connection '
      r'refused\) ' + re.escape(
          'cannot be reached; connect to the network (or set HTTPS_PROXY), or point '
          'config.data.manual_dir at its downloaded files or config.data.data_dir at a copy '
          'prepared elsewhere.')):
    sources.describe(digits_config.data)
  assert time.monotonic() - start < 30
  assert tfds_downloader.MAX_RETRIES == retries   # later downloads retry as before


def test_a_reachable_download_host_still_downloads(digits_config, tmp_path, monkeypatch):
  """With the host up, tfds downloads and prepares as before; with the file already downloaded
  or in config.data.manual_dir, no host is needed at all."""
  class Handler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802
      self.send_response(200)
      self.send_header('Content-Length', str(len(PAYLOAD)))
      self.end_headers()

    def do_GET(self):  # noqa: N802
      retries_seen.append(tfds_downloader.MAX_RETRIES)
      self.do_HEAD()
      self.wfile.write(PAYLOAD)

    def log_message(self, *args):
      del args
  retries_seen, retries = [], tfds_downloader.MAX_RETRIES
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    _serve_payload(f'http://127.0.0.1:{server.server_address[1]}/labels.bin', monkeypatch)
    digits_config.data.name = 'imgcls_test_downloaded'
    digits_config.data.data_dir = str(tmp_path / 'online')
    info = sources.describe(digits_config.data)
  finally:
    server.shutdown()
    server.server_close()
  assert info.num_examples == {'train': 4, 'test': 4} and info.class_names == ('a', 'b')
  assert retries_seen == [retries]   # one download, with tfds's own retries
  ds = sources.read(digits_config.data, 'train', 0, 1, drop_remainder=False)
  assert {int(ex['image'][0, 0, 0]): int(ex['label']) for ex in ds.as_numpy_iterator()} == dict(
      enumerate(PAYLOAD))   # image i is labelled with byte i of the downloaded file
  # The server is gone now: the download tfds kept prepares the dataset again, and the same file
  # in a manual_dir prepares a fresh data_dir, both without the host.
  shutil.rmtree(tmp_path / 'online' / 'imgcls_test_downloaded')
  assert sources.describe(digits_config.data).num_examples == {'train': 4, 'test': 4}
  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / 'labels.bin').write_bytes(PAYLOAD)
  digits_config.data.data_dir = str(tmp_path / 'offline')
  digits_config.data.manual_dir = str(manual)
  assert sources.describe(digits_config.data).num_examples == {'train': 4, 'test': 4}


def test_a_tfds_dataset_of_one_class_is_refused(digits_config, tmp_path):
  digits_config.data.name, digits_config.data.data_dir = 'imgcls_test_one_class', str(tmp_path)
  with pytest.raises(UserError, match=re.escape(
      "Dataset 'imgcls_test_one_class' has only one class, cat (label feature 'label'); a "
      'classifier needs at least 2 classes: set config.data.name to a dataset with 2 or more.')):
    sources.describe(digits_config.data)


# ---- the test session's own temporary directories (tests/conftest.py) ----

_PROBE = '''
import os


def test_probe(worker_id):
  dirs = [os.environ['IMGCLS_JAX_CACHE_DIR'], os.environ['JAX_COMPILATION_CACHE_DIR']]
  with open(os.path.join(os.environ['PROBE_OUT'], worker_id), 'w') as f:
    f.write('\\n'.join(dirs))
  assert all(os.path.isdir(d) for d in dirs)
'''


def test_the_sessions_temp_dirs_are_removed_by_the_process_that_made_them(tmp_path):
  """In a `pytest -n 2` session both workers use the controller's cache directories (they make
  none of their own, so remove none), which are gone when the session ends."""
  (tmp_path / 'pytest.ini').write_text('[pytest]\n')   # none of the repository's addopts
  (tmp_path / 'test_probe.py').write_text(_PROBE)
  env = subprocess_env()
  del env['IMGCLS_JAX_CACHE_DIR'], env['JAX_COMPILATION_CACHE_DIR']   # a fresh session's
  env['PROBE_OUT'] = str(tmp_path)
  # --dist each: every worker runs the probe.
  out = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p',
                        'tests.conftest', '-n', '2', '--dist', 'each', str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
  seen = {(tmp_path / w).read_text() for w in ('gw0', 'gw1')}
  assert len(seen) == 1   # the controller's directories, none of a worker's own
  dirs = seen.pop().split('\n')
  assert len(dirs) == 2 and os.environ['IMGCLS_JAX_CACHE_DIR'] not in dirs
  assert [d for d in dirs if os.path.exists(d)] == []
