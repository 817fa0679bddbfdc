"""Writing an arrays file (data/arrays.py describes its contents): the one writer, used by
``arrays:NAME``'s first-use write and by ``python -m imgcls_jax.data.write_arrays``.
TensorFlow-free.
"""
from __future__ import annotations

import os
import uuid

import numpy as np

from imgcls_jax.errors import UserError


def save(contents: dict[str, np.ndarray], output: str, compress: bool = False) -> None:
  """Writes ``contents`` (the arrays data/arrays.py reads) to ``output`` as a ``.npz``: a uniquely
  named file in the same folder, renamed over ``output``, so that processes (on any host sharing
  the folder) writing at once each replace it whole and a reader never sees a partial file; a
  folder that cannot be written is a UserError naming the path."""
  folder = os.path.dirname(os.path.abspath(output))
  try:
    os.makedirs(folder, exist_ok=True)
    # A unique name made as open() makes files (0666 less the umask; mkstemp's 0600 would keep
    # the other users of a shared data_dir out).
    tmp = os.path.join(folder, f'.{os.path.basename(output)}.{uuid.uuid4().hex}.npz')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
      with os.fdopen(fd, 'wb') as f:
        (np.savez_compressed if compress else np.savez)(f, **contents)
      os.replace(tmp, output)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
  except OSError as e:
    raise UserError(f'Cannot write the arrays file {output} ({e.strerror or e}); write it to a '
                    "writable directory (for 'arrays:NAME': config.data.data_dir or "
                    '$TFDS_DATA_DIR).') from None
