"""The export's output folder: what may be replaced, the marked staging folder beside it that
the formats are written into, and the swap that puts it in place whole."""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid

from imgcls_jax.errors import UserError

STAGING_MARK = '.imgcls_jax_export_staging'   # names a staging folder an export made


def _restore_orphan(out_dir: str) -> None:
  """An export killed between ``swap_in``'s two renames left the earlier export as
  ``<out_dir>.replaced-<id>`` and no ``out_dir``: put it back."""
  parent, name = os.path.split(out_dir)
  if os.path.lexists(out_dir) or not os.path.isdir(parent):
    return
  orphans = sorted((os.path.getmtime(os.path.join(parent, n)), n) for n in os.listdir(parent)
                   if n.startswith(name + '.replaced-'))
  if orphans:
    os.rename(os.path.join(parent, orphans[-1][1]), out_dir)
    logging.warning('Put back the export %s that an interrupted export had moved aside.', out_dir)


def check(out_dir: str, workdir: str) -> None:
  """The export replaces ``out_dir`` as a whole: refuse a folder that is not an earlier export
  (it would be deleted with everything in it), the run directory or a folder above it."""
  _restore_orphan(out_dir)
  fix = ('set config.export.output_dir to a new folder or to an earlier export '
         '(default: <workdir>/export).')
  if os.path.islink(out_dir):   # replaced at the end: the link would go, or the rename fail
    raise UserError(f'config.export.output_dir {out_dir} is a symbolic link; set it to the folder '
                    f'it points at ({os.path.realpath(out_dir)}) or to a new folder.')
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f'config.export.output_dir {out_dir} is a file; {fix}')
  run = os.path.abspath(workdir)
  if run == out_dir or run.startswith(out_dir.rstrip(os.sep) + os.sep):
    raise UserError(f'config.export.output_dir {out_dir} holds the run directory {run}, which an '
                    f'export would replace; {fix}')
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(
      os.path.join(out_dir, 'export.json')):
    raise UserError(f'config.export.output_dir {out_dir} holds files that are not an export '
                    f'(no export.json), which an export would replace; {fix}')
  if not os.path.isdir(out_dir):
    return
  try:
    with open(os.path.join(out_dir, 'export.json')) as f:
      written = json.load(f).get('files')
  except (OSError, ValueError, AttributeError):
    written = None   # an empty folder, or an export.json this check cannot read: as before
  if isinstance(written, list):
    extra = sorted(set(os.listdir(out_dir)) - set(written)
                   - {'export.json', 'labels.txt', STAGING_MARK})
    if extra:
      more = f' and {len(extra) - 5} more' if len(extra) > 5 else ''
      raise UserError(f"config.export.output_dir {out_dir} is an earlier export that also holds "
                      f"files an export does not write ({', '.join(extra[:5])}{more}), which "
                      f'replacing it would delete; move them out first, or {fix}')
  probe = f'{out_dir}.probe-{uuid.uuid4().hex}'   # a folder that cannot move fails now, not last
  try:
    os.rename(out_dir, probe)
  except OSError as e:
    raise UserError(f'config.export.output_dir {out_dir} cannot be replaced ({e.strerror or e}; '
                    f'e.g. a mount point or a read-only folder); {fix}') from None
  os.rename(probe, out_dir)


def _left_by_an_export(staging: str) -> bool:
  return (os.path.isdir(staging) and not os.path.islink(staging)
          and os.path.isfile(os.path.join(staging, STAGING_MARK)))


def check_staging_free(out_dir: str) -> None:
  """``<out_dir>.incomplete`` is where the export stages its files: a folder of that name that an
  export did not leave (no mark) is the user's, refused before any work."""
  staging = out_dir + '.incomplete'
  if os.path.lexists(staging) and not _left_by_an_export(staging):
    raise UserError(f'{staging} exists and holds no mark of an export, which stages its files '
                    'there (one an export before this version left is unmarked too): look '
                    'inside, then move or delete it, or set config.export.output_dir to another '
                    'folder.')


def staging(out_dir: str) -> str:
  """A new, marked ``<out_dir>.incomplete`` to write into; one left by an export that was killed
  is removed first."""
  staging = out_dir + '.incomplete'
  check_staging_free(out_dir)
  if os.path.lexists(staging):
    shutil.rmtree(staging)
  os.makedirs(staging)
  open(os.path.join(staging, STAGING_MARK), 'w').close()
  return staging


def swap_in(staging: str, out_dir: str) -> None:
  """``staging`` becomes ``out_dir``; an earlier export there is moved aside first and deleted
  last, so that a crash in between leaves one of the two whole."""
  old = None
  if os.path.isdir(out_dir):
    old = f'{out_dir}.replaced-{uuid.uuid4().hex}'
    os.rename(out_dir, old)
  try:
    os.rename(staging, out_dir)
  except BaseException:
    if old is not None:
      os.rename(old, out_dir)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
