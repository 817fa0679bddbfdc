"""Prepares the standard tfds ``fashion_mnist`` dataset offline, from Debian's Fashion-MNIST.

Debian's package (``apt-get install -y dataset-fashion-mnist``) ships the real Fashion-MNIST files
as ``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` but with
each gzip header rewritten (stored file name dropped, mtime reset); the deflate data is unchanged.
This module puts the upstream header back (FNAME flag, the upstream mtime, the original name), which
reproduces the upstream files byte for byte, checks them against the sha256 sums that tfds itself
registers for ``fashion_mnist``, and runs the standard tfds builder with them as ``manual_dir``.

Command (once; ~10 s):
  python -m imgcls_jax.data.prepare_fashion_mnist [--data_dir=DIR] [--source_dir=DIR]
then train with ``--config.data.data_dir=DIR`` (or leave both unset for the tfds default
``~/tensorflow_datasets``).
"""
from __future__ import annotations

import hashlib
import os
import struct
import sys

from imgcls_jax.errors import UserError

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
# The gzip mtimes of the upstream files (seconds since the epoch), by file-name prefix.
UPSTREAM_MTIME = {'train': 1504176606, 't10k': 1504176627}
FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
         't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')


def upstream_bytes(debian_gz: bytes, filename: str) -> bytes:
  """The upstream ``filename`` (``*.gz``) from Debian's copy: the original gzip header put back."""
  if debian_gz[:3] != b'\x1f\x8b\x08':
    raise UserError(f'{filename} is not a gzip (deflate) file; reinstall dataset-fashion-mnist.')
  flags = debian_gz[3]
  if flags != 0:
    raise UserError(f'{filename} has unexpected gzip header flags {flags:#x} (expected Debian\'s '
                    'bare header); reinstall dataset-fashion-mnist.')
  mtime = UPSTREAM_MTIME[filename.split('-')[0]]
  # ID1 ID2 CM | FLG=FNAME | MTIME | XFL OS (kept from Debian) | name\0 | deflate data + trailer.
  header = b'\x1f\x8b\x08\x08' + struct.pack('<I', mtime) + debian_gz[8:10]
  return header + filename[:-len('.gz')].encode('ascii') + b'\x00' + debian_gz[10:]


def _registered_sha256() -> dict[str, str]:
  """file name -> sha256 as registered by tensorflow-datasets for ``fashion_mnist``."""
  from imgcls_jax.data import tf_import  # noqa: F401  (before tensorflow_datasets: no Keras)
  import tensorflow_datasets as tfds
  path = os.path.join(os.path.dirname(tfds.__file__), 'url_checksums', 'fashion_mnist.txt')
  sums = {}
  with open(path) as f:
    for line in f:
      parts = line.split()
      if len(parts) >= 3:
        sums[parts[0].rsplit('/', 1)[-1]] = parts[2]
  return sums


def write_manual_dir(source_dir: str, manual_dir: str) -> list[str]:
  """Writes the four upstream files into ``manual_dir`` (checksum-verified); returns their paths."""
  missing = [f for f in FILES if not os.path.isfile(os.path.join(source_dir, f))]
  if missing:
    raise UserError(f"Fashion-MNIST files {', '.join(missing)} are missing from {source_dir}; "
                    'install them with `apt-get install -y dataset-fashion-mnist` or pass '
                    '--source_dir.')
  sums = _registered_sha256()
  os.makedirs(manual_dir, exist_ok=True)
  paths = []
  for name in FILES:
    with open(os.path.join(source_dir, name), 'rb') as f:
      data = upstream_bytes(f.read(), name)
    digest = hashlib.sha256(data).hexdigest()
    if sums.get(name) and digest != sums[name]:
      raise UserError(f'{name} from {source_dir} does not reproduce the upstream file (sha256 '
                      f'{digest[:12]}... != {sums[name][:12]}...); reinstall '
                      'dataset-fashion-mnist.')
    path = os.path.join(manual_dir, name)
    with open(path, 'wb') as f:
      f.write(data)
    paths.append(path)
  return paths


def prepare(data_dir: str | None = None, source_dir: str = DEBIAN_DIR,
            manual_dir: str | None = None) -> str:
  """Prepares tfds ``fashion_mnist`` in ``data_dir`` (tfds default when None); returns its path."""
  from imgcls_jax.data import tf_import  # noqa: F401  (before tensorflow_datasets: no Keras)
  import tensorflow_datasets as tfds
  b = tfds.builder('fashion_mnist', data_dir=data_dir)
  if b.is_prepared():
    return str(b.data_dir)
  manual_dir = manual_dir or os.path.join(os.path.dirname(os.path.dirname(str(b.data_dir))),
                                          'downloads', 'manual', 'fashion_mnist')
  write_manual_dir(source_dir, manual_dir)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return str(b.data_dir)


def main(argv: list[str]) -> int:
  from absl import flags
  fv = flags.FlagValues()
  data_dir = flags.DEFINE_string('data_dir', None, 'tfds data_dir (default: tfds default).',
                                 flag_values=fv)
  source_dir = flags.DEFINE_string('source_dir', DEBIAN_DIR, "Debian's Fashion-MNIST files.",
                                   flag_values=fv)
  manual_dir = flags.DEFINE_string('manual_dir', None, 'Where to write the upstream files '
                                   '(default: <data_dir>/downloads/manual/fashion_mnist).',
                                   flag_values=fv)
  if any(a in ('--help', '-h', '--helpfull') for a in argv[1:]):
    print(f"{(__doc__ or '').strip()}\n\nFlags:\n{fv.get_help(prefix='  ')}")
    return 0
  try:
    fv(argv)
    path = prepare(data_dir.value, source_dir.value, manual_dir.value)
  except (UserError, flags.Error) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'fashion_mnist is prepared in {path}')
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main(sys.argv))
