"""Fashion-MNIST collage: multi-label tagging of 56x56 images holding 1-4 real garments.

Build the data once (75,000 PNGs in ~30 s: 60k train collages from Fashion-MNIST train images,
5k validation collages from 5,000 held-out train images, 10k test collages from the test split):
  python -m imgcls_jax.data.prepare_collage --out=data/fashion_mnist_collage
Command:
  python -m imgcls_jax.main --config=configs/fashion_mnist_collage.py --workdir=/tmp/collage
Sigmoid binary cross-entropy over the 10 tags; the fast CNN of fashion_mnist_quick with one more
pooling stage (56 px input); per-tag thresholds chosen for the best F1 on the validation split at
the end and saved with the checkpoint (evaluate, predict, export and serve use them).
Expected: mAP 96.78% (per-tag AP 87.5% Shirt .. 99.9% Trouser), macro F1 92.02% / micro 92.08% and
exact match 74.92% at the validation-chosen thresholds (at 0.5: macro F1 91.95%), ROC-AUC 0.9888,
on the 10k test collages, seed 0; mAP 95.6% (>= 95%) after 318 s and the whole run 474 s wall,
start-up included (benchmarks/time_to_accuracy.py --target=0.95), on the project's 2-core AMD EPYC
VM with --config.mesh.cpu_devices=1 and other jobs on the cores (load 4-5): an upper bound.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.data.name = 'image_folder'
  c.data.manifest = 'data/fashion_mnist_collage/manifest.csv'
  c.data.multilabel = True
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.train_preprocess = ''
  c.data.device_preprocess = 'flip_lr'    # a mirrored collage has the same tags
  c.data.eval_preprocess = ''
  c.data.mean = (0.143,)                  # Fashion-MNIST's mean/std, ~half the cells empty
  c.data.std = (0.29,)
  c.data.cache = True

  c.model = ml_collections.ConfigDict()
  c.model.name = 'fast_cnn'
  c.model.widths = ((16,), (32,), (64,), (128,))
  c.model.stem = 'none'
  c.model.final_pool = False
  c.model.head = 'flatten'
  c.model.hidden = 0
  c.model.dropout = 0.0
  c.model.image_size = 56
  c.dtype = 'float32'

  c.batch_size = 32
  c.eval_batch_size = 250
  c.num_epochs = 6.0
  c.label_smoothing = 0.0
  c.optim.name = 'sgd'
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4
  c.optim.schedule = 'linear'
  c.optim.warmup_epochs = 0.25
  c.optim.end_lr_factor = 0.0

  c.evaluate.threshold_split = 'validation'
  c.log_every_steps = 200
  c.eval_every_epochs = 2.0
  c.checkpoint_every_epochs = 100.0       # only at the end
  c.checkpoint.keep_best = 0
  c.checkpoint.best_metric = 'map'
  c.progress_bar = False
  c.tensorboard = False
  c.mesh.num_devices = 0
  c.mesh.cpu_devices = 2
  return c
