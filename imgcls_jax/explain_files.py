"""The explanation maps that ``--mode=predict`` writes (``config.predict.explain``): one overlay
PNG per explained class of an image, named ``<image file name>[.<tag>].<method>.png`` with
``_<n>`` added to the stem where a name is taken. A map never replaces another prediction's; a
rerun replaces the maps its earlier output names, and removes those the new output no longer
names (see ``predict.py``)."""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterable

import numpy as np


def explain_batch(explainer: Any, maps: MapFiles, batch: list[dict[str, Any]], arrays: np.ndarray,
             multilabel: bool) -> None:
  """Adds ``explained`` and ``explanation`` to each result of a batch, writing the maps: of the
  top-1 class, or of every predicted tag (lists, in the order of ``tags``)."""
  from imgcls_jax import explain
  chosen = [r['tags'] if multilabel else r['predictions'][:1] for r in batch]
  rows = [i for i, c in enumerate(chosen) for _ in c]
  targets = np.array([t['index'] for c in chosen for t in c], np.int32)
  heat = explainer(np.asarray(arrays)[rows], targets)['heatmap'] if rows else []
  k = 0
  for r, image, c in zip(batch, arrays, chosen):
    names = [t['class'] for t in c]
    pngs = [explain.overlay_png(image, h) if maps.write_files else b''
            for h in heat[k:k + len(c)]]
    k += len(c)
    paths = maps.write(r['file'], [n if multilabel else '' for n in names], pngs)
    r['explained'], r['explanation'] = (names, paths) if multilabel else (names[0], paths[0])


class MapFiles:
  """Overlay PNGs in ``folder``, named ``<file name>[.<tag>].<method>.png`` with ``_<n>`` added
  to the stem where a name is taken: by this call, or by a file there that is not in
  ``replaces``. New files are created exclusively, so a concurrent call cannot take them either;
  ``write=False`` (the other processes of a multi-process run) only names them."""

  def __init__(self, folder: str, method: str, replaces: Iterable[str], *, write: bool = True):
    self.folder, self.method, self.write_files = folder, method, write
    self.replaces = {os.path.realpath(p) for p in replaces}
    self.used: set[str] = set()
    if write:
      os.makedirs(folder, exist_ok=True)

  def write(self, source: str, tags: list[str], pngs: list[bytes]) -> list[str]:
    """The paths of one image's maps (one per tag; '' for a single-label map), written."""
    stem = os.path.splitext(os.path.basename(source))[0]
    parts, seen = [], set()
    for i, tag in enumerate(tags):   # file-name-safe tags, distinct within the image
      part = (re.sub(r'[^\w.+-]+', '_', tag).strip('.') or '_') if tag else ''
      while part in seen:
        part += f'_{i}'
      seen.add(part)
      parts.append(f'.{part}' if part else '')
    n = 0
    while True:
      base = stem if n == 0 else f'{stem}_{n}'
      n += 1
      paths = [os.path.join(self.folder, f'{base}{p}.{self.method}.png') for p in parts]
      if any(p in self.used for p in paths) or not self._claim(paths):
        continue
      self.used.update(paths)
      if self.write_files:
        for path, data in zip(paths, pngs):
          with open(path, 'wb') as f:
            f.write(data)
      return paths

  def _claim(self, paths: list[str]) -> bool:
    """True once every path is this call's: replaceable, or newly created (empty)."""
    made = []
    for path in paths:
      if os.path.realpath(path) in self.replaces:
        continue
      if not self.write_files:
        if os.path.lexists(path):
          return False
        continue
      try:
        with open(path, 'xb'):
          made.append(path)
      except FileExistsError:
        for p in made:
          os.remove(p)
        return False
    return True


def remove_unnamed(earlier_maps: list[str], results: list[dict[str, Any]]) -> None:
  """Removes the maps of the replaced prediction file that the new one does not name (a rerun
  on fewer images, or explaining other tags): left there they would look like this output's.
  ``earlier_maps`` holds only maps unchanged since that file was written (``predict._maps_of``)."""
  named = set()
  for r in results:
    paths = r.get('explanation')
    named.update(os.path.realpath(p) for p in (paths if isinstance(paths, list) else [paths]) if p)
  gone = [p for p in earlier_maps if os.path.realpath(p) not in named and os.path.isfile(p)]
  for p in gone:
    os.remove(p)
  if gone:
    logging.info('Removed %d explanation map(s) of the replaced prediction file that this one '
                 'does not name.', len(gone))
