"""Listing the files under a folder, links followed, each real file once: what an image folder's
class folders (``folder_layout``, ``folder_index``) and a folder given to predict
(``images.list_inputs``) are read by. Imports nothing of the project."""
from __future__ import annotations

import os
from typing import Iterable


def walk(directory: str, prefix: str, skipped: list[tuple[str, str]] | None = None,
         reals: dict[str, str] | None = None) -> Iterable[str]:
  """Relative paths (``prefix/...``) of the non-hidden files under ``directory``, sorted, links
  to folders and files followed. Each real file is listed once: a link to a folder or file listed
  already, or to a folder above it (a loop), is passed over, and with ``skipped`` given, added to
  it as (relative path, why). ``reals`` (given) gets each listed file's real path -> its path."""
  top = os.path.realpath(directory)
  seen: dict[str, str] = {top: os.path.normpath(prefix)}   # real path -> relative path listed
  note = skipped.append if skipped is not None else lambda item: None

  def visit(path: str, real_dir: str, rel_dir: str) -> Iterable[str]:
    try:
      with os.scandir(path) as it:
        entries = sorted((e for e in it if not e.name.startswith('.')), key=lambda e: e.name)
    except OSError:
      return   # as os.walk: a folder that cannot be listed gives no files
    dirs = []
    for e in entries:
      rel = os.path.normpath(os.path.join(rel_dir, e.name))
      try:
        is_dir = e.is_dir()   # follows a link
      except OSError:
        is_dir = False
      real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real_dir, e.name)
      if is_dir and (real_dir == real or real_dir.startswith(real.rstrip(os.sep) + os.sep)):
        note((rel, 'a link to a folder above it, a loop; not followed'))
      elif real in seen:
        note((rel, f'the same {"folder" if is_dir else "file"} as {seen[real]}, read once'))
      elif is_dir:
        seen[real] = rel
        dirs.append((e.path, real, rel))
      else:
        seen[real] = rel
        if reals is not None:
          reals[real] = rel
        yield rel
    for sub in dirs:
      yield from visit(*sub)

  yield from visit(directory, top, prefix)
