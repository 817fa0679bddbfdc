"""Classical ("traditional") image features with scikit-image: HOG, local-binary-pattern texture
histograms, colour / intensity histograms and edge density; numpy in, numpy out.

``extract(images_NxHxWxC, spec)`` gives one float32 row per uint8 image: the blocks named in
``spec.blocks``, concatenated in that order, each normalised on its own scale (histograms sum to 1
per region, HOG is block-normalised, edge density is a fraction). Images are processed in chunks on
a thread pool (scikit-image's kernels release the GIL for much of their work). No JAX, no
TensorFlow: the classical baseline (``classical.py``) and ``--mode=embed`` use it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from imgcls_jax.errors import UserError

BLOCKS = ('hog', 'lbp', 'histogram', 'edges')


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """Which feature blocks, and their parameters (``config.classical``; configs/default.py)."""
  blocks: tuple[str, ...] = BLOCKS
  hog_orientations: int = 9           # orientation bins of HOG
  hog_cell: int = 4                   # HOG cell size in pixels
  hog_block: int = 2                  # HOG block size in cells (L2-Hys normalised)
  lbp_points: int = 8                 # LBP neighbours P ('uniform' codes: P + 2 histogram bins)
  lbp_radius: float = 1.0             # LBP radius R in pixels
  lbp_grid: int = 2                   # LBP histograms over a grid x grid tiling of the image
  histogram_bins: int = 16            # intensity bins per channel
  edge_sigma: float = 1.0             # Gaussian sigma of the Canny edge detector
  edge_grid: int = 4                  # edge density over a grid x grid tiling

  def __post_init__(self):
    unknown = [b for b in self.blocks if b not in BLOCKS]
    if unknown or not self.blocks:
      raise UserError(f"config.classical.features={','.join(self.blocks)!r} must name one or more "
                      f"of {', '.join(BLOCKS)} (comma-separated).")
    for name in ('hog_orientations', 'hog_cell', 'hog_block', 'lbp_points', 'lbp_grid',
                 'histogram_bins', 'edge_grid'):
      if int(getattr(self, name)) < 1:
        raise UserError(f'config.classical.{name}={getattr(self, name)} must be at least 1.')


def spec_from_config(classical: Any) -> FeatureSpec:
  """``FeatureSpec`` from a ``config.classical`` section."""
  blocks = classical.features
  blocks = tuple(b.strip() for b in (blocks.split(',') if isinstance(blocks, str) else blocks)
                 if b.strip())
  return FeatureSpec(blocks=blocks, hog_orientations=int(classical.hog_orientations),
                     hog_cell=int(classical.hog_cell), hog_block=int(classical.hog_block),
                     lbp_points=int(classical.lbp_points), lbp_radius=float(classical.lbp_radius),
                     lbp_grid=int(classical.lbp_grid),
                     histogram_bins=int(classical.histogram_bins),
                     edge_sigma=float(classical.edge_sigma), edge_grid=int(classical.edge_grid))


def _grey(image_HxWxC: np.ndarray) -> np.ndarray:
  """float64 grey image in [0, 1] (ITU-R 601 luma for RGB, as skimage.color.rgb2gray)."""
  from skimage import color
  x = image_HxWxC.astype(np.float64) / 255.0
  return x[..., 0] if x.shape[-1] == 1 else color.rgb2gray(x[..., :3])


def _tiles(h: int, w: int, grid: int) -> list[tuple[slice, slice]]:
  """A grid x grid tiling of an h x w image (the last row / column of tiles takes the remainder)."""
  ys = np.linspace(0, h, min(grid, h) + 1).astype(int)
  xs = np.linspace(0, w, min(grid, w) + 1).astype(int)
  return [(slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1]))
          for i in range(len(ys) - 1) for j in range(len(xs) - 1)]


def hog(grey_HxW: np.ndarray, spec: FeatureSpec) -> np.ndarray:
  """Histogram of oriented gradients (Dalal & Triggs) with L2-Hys block normalisation."""
  from skimage import feature
  cell = min(spec.hog_cell, *grey_HxW.shape)
  cells = min(grey_HxW.shape[0] // cell, grey_HxW.shape[1] // cell)
  return feature.hog(grey_HxW, orientations=spec.hog_orientations, pixels_per_cell=(cell, cell),
                     cells_per_block=(min(spec.hog_block, cells),) * 2, block_norm='L2-Hys',
                     feature_vector=True)


def lbp(grey_HxW: np.ndarray, spec: FeatureSpec) -> np.ndarray:
  """Uniform LBP code histograms (P + 2 bins) per grid tile, each summing to 1."""
  from skimage import feature
  codes = feature.local_binary_pattern(np.round(grey_HxW * 255).astype(np.uint8), spec.lbp_points,
                                       spec.lbp_radius, method='uniform')
  bins = spec.lbp_points + 2
  out = []
  for ys, xs in _tiles(*codes.shape, spec.lbp_grid):
    counts = np.bincount(codes[ys, xs].astype(np.int64).ravel(), minlength=bins)[:bins]
    out.append(counts / max(1, counts.sum()))
  return np.concatenate(out)


def histogram(image_HxWxC: np.ndarray, spec: FeatureSpec) -> np.ndarray:
  """Per-channel intensity histograms over 0..255, each summing to 1 (colour for RGB images)."""
  from skimage import exposure
  out = []
  for c in range(image_HxWxC.shape[-1]):
    channel = image_HxWxC[..., c]
    counts, _ = exposure.histogram(channel, nbins=256, source_range='dtype')
    counts = counts.reshape(spec.histogram_bins, -1).sum(axis=1) if 256 % spec.histogram_bins == 0 \
        else np.histogram(channel, bins=spec.histogram_bins, range=(0, 256))[0]
    out.append(counts / max(1, counts.sum()))
  return np.concatenate(out).astype(np.float64)


def edges(grey_HxW: np.ndarray, spec: FeatureSpec) -> np.ndarray:
  """Canny edge density: the whole image's fraction of edge pixels, then each grid tile's."""
  from skimage import feature
  mask = feature.canny(grey_HxW, sigma=spec.edge_sigma)
  return np.array([mask.mean()] + [mask[ys, xs].mean() for ys, xs in
                                   _tiles(*mask.shape, spec.edge_grid)], np.float64)


def extract_one(image_HxWxC: np.ndarray, spec: FeatureSpec) -> np.ndarray:
  """The feature vector of one uint8 image."""
  grey = _grey(image_HxWxC)
  parts = {'hog': lambda: hog(grey, spec), 'lbp': lambda: lbp(grey, spec),
           'histogram': lambda: histogram(image_HxWxC, spec), 'edges': lambda: edges(grey, spec)}
  return np.concatenate([np.ravel(parts[b]()) for b in spec.blocks]).astype(np.float32)


def block_sizes(image_shape: Sequence[int], spec: FeatureSpec) -> dict[str, int]:
  """Length of each block for images of ``image_shape`` (H, W, C), in ``spec.blocks`` order."""
  probe = np.zeros(tuple(int(d) for d in image_shape), np.uint8)
  return {b: len(extract_one(probe, dataclasses.replace(spec, blocks=(b,)))) for b in spec.blocks}


def extract(images_NxHxWxC: np.ndarray, spec: FeatureSpec, *, workers: int = 0,
            chunk: int = 256) -> np.ndarray:
  """float32 ``N x D`` features of uint8 images, in order; ``workers`` threads (0: CPU count)."""
  images_NxHxWxC = np.asarray(images_NxHxWxC)
  if images_NxHxWxC.ndim != 4 or images_NxHxWxC.dtype != np.uint8:
    raise ValueError(f'extract takes uint8 N x H x W x C images, got {images_NxHxWxC.dtype} '
                     f'{images_NxHxWxC.shape}.')
  n = len(images_NxHxWxC)
  if n == 0:
    return np.zeros((0, 0), np.float32)

  def run(start: int) -> np.ndarray:
    return np.stack([extract_one(im, spec) for im in images_NxHxWxC[start:start + chunk]])

  workers = workers or os.cpu_count() or 1
  starts = list(range(0, n, chunk))
  if workers == 1 or len(starts) == 1:
    return np.concatenate([run(s) for s in starts])
  with concurrent.futures.ThreadPoolExecutor(min(workers, len(starts))) as pool:
    return np.concatenate(list(pool.map(run, starts)))


def split_arrays(data: Any, split: str, *, info: Any = None, batch_size: int = 512
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(uint8 ``N x H x W x C`` images as evaluation sees them, after ``data.eval_preprocess``;
  int64 labels; each one's position in the split's reading order) of every readable example of
  ``split``, once. ``info``: a trained run's ``DatasetInfo`` (its classes and channels)."""
  from imgcls_jax.data import reader  # (this module stays TF-free)
  images, labels, positions, seen = [], [], [], 0
  for batch in reader.eval_data(data, split, local_batch_size=batch_size, info=info).batches():
    keep = batch['mask'] & batch.get('valid', np.ones_like(batch['mask']))
    images.append(batch['image'][keep])
    labels.append(batch['label'][keep])
    positions.append(seen + np.flatnonzero(keep))
    seen += int(batch['mask'].sum())
  if not images or not sum(len(y) for y in labels):
    raise UserError(f"The split '{split}' of '{data.name}' has no readable examples; choose a "
                    'split with examples.')
  return (np.concatenate(images), np.concatenate(labels).astype(np.int64),
          np.concatenate(positions))
