"""CIFAR-10, ResNet-18 (CIFAR stem): the standard 200-epoch recipe.

ResNet-18 with a 3x3 stride-1 stem and no max-pool (small_inputs), SGD with Nesterov momentum,
batch 128, peak lr 0.1 (1 warmup epoch), cosine decay over 200 epochs, weight decay 5e-4 on kernels,
pad-and-crop (4 px) + horizontal flip, float32 (set dtype='bfloat16' on an accelerator).

tfds downloads CIFAR-10 (~160 MB) on first use; offline, put the tfds-prepared cifar10 directory in
a data_dir and pass --config.data.data_dir=DIR.
Command:
  python -m imgcls_jax.main --config=configs/cifar10_resnet18.py --workdir=/tmp/c10_rn18
Expected: ~95% top-1 on the 10k test split (95.4% is the well-known PyTorch result for this recipe,
github.com/kuangliu/pytorch-cifar); about 11 GFLOP per step of 128, i.e. an accelerator run
(~15 min on one H100-class GPU). Not measured here: this machine is offline and CPU-only.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.data.name = 'cifar10'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.train_preprocess = 'pad_crop(pad=4)|flip_lr'
  c.data.device_preprocess = ''          # the default's one-pixel shift is for digits
  c.data.eval_preprocess = ''
  c.data.mean = (0.4914, 0.4822, 0.4465)
  c.data.std = (0.2470, 0.2435, 0.2616)
  c.data.cache = True

  c.model = ml_collections.ConfigDict()
  c.model.name = 'resnet18'
  c.model.small_inputs = True

  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = 200.0
  c.label_smoothing = 0.0
  c.optim.name = 'sgd'
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4
  c.optim.warmup_epochs = 1.0
  c.optim.schedule = 'cosine'

  c.log_every_steps = 100
  c.eval_every_epochs = 5.0
  c.checkpoint_every_epochs = 5.0
  return c
