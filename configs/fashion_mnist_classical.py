"""The classical baseline on Fashion-MNIST: scikit-image features -> logistic regression.

HOG (9 orientations, 4 px cells, 2x2-cell blocks: 1296 values), uniform-LBP histograms over 2x2
tiles, a 16-bin intensity histogram and Canny edge density over 4x4 tiles (1369 features),
standardised, then multinomial logistic regression (C=1), fitted on the 60k training images and
evaluated on the 10k test split with the report files of --mode=evaluate. Data as
configs/fashion_mnist_quick.py (Debian's files through the tfds builder).

Command:
  python -m imgcls_jax.main --config=configs/fashion_mnist_classical.py --mode=classical \\
      --workdir=/tmp/fmnist_classical
Expected: top-1 87.93% (measured, seed 0; AMD EPYC, 2 cores shared with other jobs, load 5-10), macro F1 0.8789 (the fashion_mnist_quick CNN: 93.15% without TTA, 0.9313), 1532 s
wall for reading, features (161 s for 60k images) and the lbfgs fit (1313 s, the slow part).
"""
import ml_collections

from configs import default, fashion_mnist_quick


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.data = fashion_mnist_quick.base_config().data   # the same data as the CNN it is compared with
  c.data.device_preprocess = ''
  c.eval_batch_size = 500
  c.classical.hog_cell = 4                # 28 px images: 7x7 cells, 6x6 blocks
  c.classical.lbp_grid = 2
  c.classical.edge_grid = 4
  c.classical.edge_sigma = 1.0
  c.classical.classifier = 'logistic'
  c.classical.C = 1.0
  c.classical.max_iter = 1000
  return c
