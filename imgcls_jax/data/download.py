"""tfds downloads on a machine that may be offline: find an unreachable download host in seconds
(``unreachable_host``) and let tfds try each download once (``one_attempt_each``), instead of its
~3.5 minutes of retries before the error (``sources.builder`` uses both)."""
from __future__ import annotations

import contextlib
import re
from typing import Iterator
from urllib.parse import urlsplit

import requests
from imgcls_jax.data import tf_import  # noqa: F401  (before tensorflow_datasets: no Keras)
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader as tfds_downloader


PROBE_TIMEOUT_S = 5.0  # for one connection attempt to a download host (unreachable_host)


def unreachable_host(b: tfds.core.DatasetBuilder) -> str:
  """'HOST (why)' of the first host of ``b``'s registered URLs that does not answer a HEAD request
  (sent through requests, as tfds downloads: the same proxy and CA settings), else ''."""
  hosts = {urlsplit(url).netloc: url for url in (b.url_infos or {})
           if url.startswith(('http://', 'https://'))}
  for host, url in hosts.items():
    try:
      requests.head(url, timeout=PROBE_TIMEOUT_S, allow_redirects=False).close()
    except requests.ConnectionError as e:  # also DNS failures, refused and timed-out connections
      why = re.search(r'\[Errno -?\d+\] [^)\'"]+', str(e))
      return f'{host} ({why.group(0) if why else type(e).__name__})'
    except requests.RequestException:  # it answered, slowly or oddly: tfds's download decides
      continue
  return ''


@contextlib.contextmanager
def one_attempt_each() -> Iterator[None]:
  """Inside the block tfds tries each download once (whether a file must be downloaded at all,
  or is in the manual_dir or downloaded already, stays its call). It otherwise retries a failed
  download 10 times with exponential backoff, ~3.5 minutes offline, and no DownloadConfig option
  changes that: this sets the module constant its downloader reads on every download."""
  saved, tfds_downloader.MAX_RETRIES = tfds_downloader.MAX_RETRIES, 0
  try:
    yield
  finally:
    tfds_downloader.MAX_RETRIES = saved
