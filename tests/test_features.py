"""Classical features: sizes from the descriptors' definitions, and properties each block must have
(gradient orientation, brightness invariance, histogram mass, edge density bounds)."""
import numpy as np
import pytest

from imgcls_jax import features
from imgcls_jax.errors import UserError


def _stripes(vertical: bool, size: int = 32) -> np.ndarray:
  """Stripes 4 px wide: vertical ones vary along x (a horizontal gradient), horizontal along y."""
  row = ((np.arange(size) // 4) % 2 * 200 + 20).astype(np.uint8)
  img = np.tile(row, (size, 1)) if vertical else np.tile(row[:, None], (1, size))
  return img[..., None]


def _checker(size: int = 32) -> np.ndarray:
  y, x = np.mgrid[:size, :size]
  return (((y // 4 + x // 4) % 2) * 200 + 20).astype(np.uint8)[..., None]


def test_block_sizes_follow_the_descriptor_definitions():
  spec = features.FeatureSpec(hog_orientations=9, hog_cell=4, hog_block=2, lbp_points=8,
                              lbp_grid=2, histogram_bins=16, edge_grid=4)
  # HOG (Dalal & Triggs): (28/4 - 2 + 1)^2 blocks x 2x2 cells x 9 bins; LBP uniform: P + 2 bins per
  # tile; one histogram per channel; edge density for the image plus each tile.
  assert features.block_sizes((28, 28, 1), spec) == {
      'hog': 6 * 6 * 2 * 2 * 9, 'lbp': 4 * 10, 'histogram': 16, 'edges': 1 + 16}
  assert features.block_sizes((28, 28, 3), spec)['histogram'] == 48  # one per colour channel
  x = np.random.RandomState(0).randint(0, 256, (5, 28, 28, 1)).astype(np.uint8)
  out = features.extract(x, spec, workers=1)
  assert out.shape == (5, 1296 + 40 + 16 + 17) and out.dtype == np.float32


def test_hog_energy_lies_in_the_gradient_orientation_bin():
  spec = features.FeatureSpec(blocks=('hog',), hog_orientations=9, hog_cell=8, hog_block=1)

  def per_bin(img):
    return features.extract(img[None], spec, workers=1)[0].reshape(-1, 9).sum(axis=0)

  vertical, horizontal = per_bin(_stripes(True)), per_bin(_stripes(False))
  # Vertical stripes: gradient along x, orientation 0 deg (bin 0); horizontal: 90 deg (bin 4).
  assert np.argmax(vertical) == 0 and np.argmax(horizontal) == 4
  assert vertical[0] > 0.9 * vertical.sum() and horizontal[4] > 0.9 * horizontal.sum()
  # Transposing the image moves the energy between the two bins.
  np.testing.assert_allclose(per_bin(np.transpose(_stripes(True), (1, 0, 2))), horizontal,
                             atol=1e-6)
  assert not per_bin(np.full((32, 32, 1), 77, np.uint8)).any()  # no gradient, no HOG


def test_gradient_and_texture_blocks_ignore_brightness_but_the_histogram_does_not():
  spec = features.FeatureSpec(hog_cell=4, lbp_grid=2, edge_grid=2)
  sizes = features.block_sizes((32, 32, 1), spec)
  img = _checker()
  brighter = (img.astype(np.int32) + 30).astype(np.uint8)  # 20..220 -> 50..250, no clipping
  a, b = features.extract(np.stack([img, brighter]), spec, workers=1)
  split = np.cumsum(list(sizes.values()))[:-1]
  blocks_a, blocks_b = dict(zip(sizes, np.split(a, split))), dict(zip(sizes, np.split(b, split)))
  for name in ('hog', 'lbp', 'edges'):
    np.testing.assert_allclose(blocks_a[name], blocks_b[name], atol=1e-6, err_msg=name)
  assert not np.allclose(blocks_a['histogram'], blocks_b['histogram'])


def test_histograms_sum_to_one_and_put_each_value_in_its_bin():
  spec = features.FeatureSpec(blocks=('histogram',), histogram_bins=16)
  rgb = np.zeros((10, 10, 3), np.uint8)
  rgb[..., 0] = 255                # red channel: all in the last bin
  rgb[:5, :, 1] = 100              # green: half in bin 100 // 16 = 6, half in bin 0
  h = features.extract(rgb[None], spec, workers=1)[0].reshape(3, 16)
  np.testing.assert_allclose(h.sum(axis=1), 1.0, rtol=1e-6)
  assert h[0, 15] == 1.0 and h[1, 6] == pytest.approx(0.5) and h[1, 0] == pytest.approx(0.5)
  assert h[2, 0] == 1.0


def test_lbp_tiles_sum_to_one_and_a_flat_image_is_all_one_code():
  spec = features.FeatureSpec(blocks=('lbp',), lbp_points=8, lbp_grid=2)
  flat = features.extract(np.full((1, 16, 16, 1), 90, np.uint8), spec, workers=1)[0].reshape(4, 10)
  np.testing.assert_allclose(flat.sum(axis=1), 1.0)
  # Inside the image every neighbour equals the centre: all 8 bits set, the uniform code P = 8.
  # (Neighbours past the border read as 0, so the 1-px frame does not: 7 x 7 of each 8 x 8 tile.)
  np.testing.assert_allclose(flat[:, 8], 49 / 64)
  noisy = features.extract(np.random.RandomState(1).randint(0, 256, (1, 16, 16, 1)).astype(
      np.uint8), spec, workers=1)[0].reshape(4, 10)
  np.testing.assert_allclose(noisy.sum(axis=1), 1.0, rtol=1e-6)
  assert (noisy > 0).sum() > 4  # noise spreads over many codes


def test_edge_density_is_a_fraction_zero_when_flat_and_higher_for_more_edges():
  spec = features.FeatureSpec(blocks=('edges',), edge_grid=2, edge_sigma=1.0)
  flat, stripes, checker = features.extract(
      np.stack([np.full((32, 32, 1), 128, np.uint8), _stripes(True), _checker()]), spec,
      workers=1)
  assert not flat.any()
  assert np.all((stripes >= 0) & (stripes <= 1)) and stripes[0] > 0
  assert checker[0] > stripes[0]  # edges in both directions


def test_parallel_extraction_equals_sequential_in_order():
  spec = features.FeatureSpec(hog_cell=4)
  x = np.random.RandomState(2).randint(0, 256, (23, 16, 16, 3)).astype(np.uint8)
  np.testing.assert_array_equal(features.extract(x, spec, workers=3, chunk=4),
                                features.extract(x, spec, workers=1))


def test_bad_specs_and_inputs():
  with pytest.raises(UserError, match='must name one or more of'):
    features.FeatureSpec(blocks=('hog', 'sift'))
  with pytest.raises(UserError, match='hog_cell=0 must be at least 1'):
    features.FeatureSpec(hog_cell=0)
  with pytest.raises(ValueError, match='uint8'):
    features.extract(np.zeros((2, 8, 8, 1), np.float32), features.FeatureSpec())
