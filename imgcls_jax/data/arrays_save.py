"""Writing an arrays file (data/arrays.py describes its contents): the one writer, used by
``arrays:NAME``'s first-use write and by ``python -m imgcls_jax.data.write_arrays``.
TensorFlow-free.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from imgcls_jax.errors import UserError


def _umask() -> int:
  mask = os.umask(0)   # read by setting it: put it back at once
  os.umask(mask)
  return mask


def save(contents: dict[str, np.ndarray], output: str, compress: bool = False) -> None:
  """Writes ``contents`` (the arrays data/arrays.py reads) to ``output`` as a ``.npz``: a uniquely
  named file in the same folder, renamed over ``output``, so that processes (on any host sharing
  the folder) writing at once each replace it whole and a reader never sees a partial file; a
  folder that cannot be written is a UserError naming the path."""
  folder = os.path.dirname(os.path.abspath(output))
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(output)}.', suffix='.npz', dir=folder)
    try:
      with os.fdopen(fd, 'wb') as f:
        (np.savez_compressed if compress else np.savez)(f, **contents)
      os.chmod(tmp, 0o666 & ~_umask())   # mkstemp's 0600 would keep a shared data_dir's users out
      os.replace(tmp, output)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
  except OSError as e:
    raise UserError(f'Cannot write the arrays file {output} ({e.strerror or e}); write it to a '
                    "writable directory (for 'arrays:NAME': config.data.data_dir or "
                    '$TFDS_DATA_DIR).') from None
