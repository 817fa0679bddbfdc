"""Fashion-MNIST in under 5 minutes on 2 CPU cores: a small fast CNN (being tuned).

Prepare the data once (Debian's dataset-fashion-mnist through the standard tfds builder):
  python -m imgcls_jax.data.prepare_fashion_mnist
Command:
  python -m imgcls_jax.main --config=configs/fashion_mnist_quick.py --workdir=/tmp/fmnist_quick
Expected: to be measured.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.data.name = 'fashion_mnist'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.train_preprocess = 'flip_lr'
  c.data.mean = (0.286,)
  c.data.std = (0.353,)
  c.model.widths = (32, 64, 128)
  c.model.convs_per_stage = 1
  c.batch_size = 256
  c.eval_batch_size = 1000
  c.num_epochs = 6.0
  c.label_smoothing = 0.1
  c.optim.learning_rate = 0.2
  c.optim.warmup_epochs = 1.0
  c.optim.weight_decay = 5e-4
  c.eval_every_epochs = 1.0
  c.checkpoint_every_epochs = 100.0
  c.progress_bar = False
  c.tensorboard = False
  if 'checkpoint' in c and 'keep_best' in c.checkpoint:
    c.checkpoint.keep_best = 0
  c.mesh.num_devices = 1
  return c
